//! The store behind a running gateway: its writes as the management API's [`Writer`], and
//! every revision it sees compiled into the [`Live`] state the layers read.

use std::sync::{Arc, Weak};

use http::StatusCode;

use super::{Inner, Store, StoreErrorKind, WriteError};
use crate::error::GatewayError;
use crate::model::{AuditFuture, Edit, WriteFuture, Writer};
use crate::registry::Live;

/// The [`Writer`] of a gateway on a store: a change is written to the store (all or nothing,
/// serialized with every other replica's), then the new state is loaded into this process's
/// [`Live`] before the write answers, so a client reads its own writes here at once and on the
/// other replicas within a second.
pub struct StoreWriter {
    store: Store,
    live: Live,
}

impl StoreWriter {
    /// Writes to `store`, then refreshes `live`.
    pub fn new(store: Store, live: Live) -> Self {
        Self { store, live }
    }
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The answer to a management write the store could not take.
fn unavailable() -> GatewayError {
    GatewayError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "The gateway's store is unreachable, so changes cannot be saved now; traffic keeps \
         flowing on the last configuration. Try again later.",
    )
}

fn store_failed(err: &super::StoreError) -> GatewayError {
    match err.kind() {
        StoreErrorKind::Unavailable => unavailable(),
        StoreErrorKind::Invalid => {
            GatewayError::new(StatusCode::BAD_REQUEST, "invalid_request", err.to_string())
        }
        _ => {
            tracing::error!(error = %err, "the store holds a record it cannot read");
            GatewayError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
                "The gateway's store holds a record it cannot read; see the gateway's logs.",
            )
        }
    }
}

impl Writer for StoreWriter {
    fn write(&self, edit: Edit) -> WriteFuture<'_> {
        Box::pin(async move {
            let result = self
                .store
                .write(|state| edit(state).map(|entries| ((), entries)))
                .await;
            let answer = match result {
                Ok(()) => Ok(()),
                Err(WriteError::Rejected(e)) => Err(e),
                Err(WriteError::Invalid(e)) => Err(e.into()),
                Err(WriteError::Store(e)) => return Err(store_failed(&e)),
            };
            // Read our own write (or, after a refusal, the newer state the write was checked
            // against): catch up now rather than wait for the notification. The follower
            // finds it done and does not load it again.
            let known = *self.store.revisions().borrow();
            catch_up(&self.store, &self.live, known).await;
            answer
        })
    }

    fn audit(&self, limit: u32, before: Option<i64>) -> AuditFuture<'_> {
        Box::pin(async move {
            self.store
                .audit_log(limit, before)
                .await
                .map_err(|e| store_failed(&e))
        })
    }
}

/// Brings `live` to revision `target` at least: loads the store's state unless `live` already
/// has it. Loads are one at a time, so the writer and the follower never both load the same
/// revision. A failure keeps the last state (and is logged).
async fn catch_up(store: &Store, live: &Live, target: u64) -> bool {
    let _one_at_a_time = store.inner.loading.lock().await;
    if live.applied_revision() >= target {
        return true;
    }
    match store.load().await {
        Ok(loaded) => match live.apply_revision(loaded.state, loaded.revision) {
            Ok(_) => true,
            Err(error) => {
                tracing::error!(%error, revision = loaded.revision, "the store's state does not validate; keeping the last one");
                false
            }
        },
        Err(error) => {
            tracing::warn!(%error, "could not load the store's state; serving the last one");
            false
        }
    }
}

impl Store {
    /// Loads the state into `live` now, then keeps it current: every revision the store sees
    /// (a change through this replica or any other) is loaded and swapped in, until the store
    /// is dropped. The hot path never waits for any of it.
    pub async fn follow(&self, live: Live) -> Result<(), super::StoreError> {
        let loaded = self.load().await?;
        live.apply_revision(loaded.state, loaded.revision)
            .map_err(|e| super::StoreError::corrupt(format!("the stored state: {e}")))?;
        let mut revisions = self.revisions();
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let (weak_usage, usage_live) = (weak.clone(), live.clone());
        tokio::spawn(async move {
            while revisions.changed().await.is_ok() {
                let latest = *revisions.borrow_and_update();
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    if catch_up(&Store { inner }, &live, latest).await {
                        break;
                    }
                    // Unreachable or unreadable: try again shortly, still serving the last state.
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        });
        tokio::spawn(record_usage(weak_usage, usage_live, self.inner.resync));
        Ok(())
    }
}

/// Every `every`, writes to the store the days keys were used that it does not have yet, until
/// the store is dropped. The hot path only marks a day in memory.
async fn record_usage(weak: Weak<Inner>, live: Live, every: std::time::Duration) {
    // What this task wrote, so an unchanged day is not written again before the next load.
    let mut written: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        let store = Store { inner };
        let keys = live.keys().current();
        let used: Vec<(String, u32)> = live
            .key_records()
            .iter()
            .filter_map(|record| {
                let day = keys.used_on(&record.digest)?;
                let known = record.last_used_day.max(written.get(&record.id).copied());
                (known < Some(day)).then(|| (record.id.clone(), day))
            })
            .collect();
        match store.record_usage(&used).await {
            Ok(()) => written.extend(used),
            Err(error) => {
                tracing::debug!(%error, "could not record key usage; trying again later")
            }
        }
    }
}
