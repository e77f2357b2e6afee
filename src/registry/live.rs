//! What the gateway serves, kept together: the accounts (compiled in a [`SharedRegistry`]), the
//! key records (compiled in a [`SharedKeyStore`]), and the writer of this process's memory.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use super::SharedLimitRules;
use super::{Registry, SharedKeyStore, SharedRegistry};
use crate::error::GatewayError;
use crate::model::{
    AuditEntry, AuditFuture, Edit, FieldError, HashedKeyStore, KeyRecord, Snapshot, WriteFuture,
    Writer, bump_rules, bump_versions, validate, validate_keys, validate_rules,
};

/// The live state: the registry and keys the layers read, and the key records they were
/// compiled from. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Live {
    registry: SharedRegistry,
    keys: SharedKeyStore,
    records: Arc<ArcSwap<Vec<KeyRecord>>>,
    rules: SharedLimitRules,
    /// The revision of a source applied last, so an older load never replaces a newer one.
    revision: Arc<Mutex<u64>>,
}

impl Live {
    /// Holds `registry` and `keys`, compiled from `records` (which may be empty when the keys
    /// came from elsewhere).
    pub fn new(registry: SharedRegistry, keys: SharedKeyStore, records: Vec<KeyRecord>) -> Self {
        Self {
            registry,
            keys,
            records: Arc::new(ArcSwap::from_pointee(records)),
            rules: SharedLimitRules::default(),
            revision: Arc::new(Mutex::new(0)),
        }
    }

    /// Serves `rules` as the rate-limit rules, shared with the rate limiter.
    pub fn with_rules(mut self, rules: SharedLimitRules) -> Self {
        self.rules = rules;
        self
    }

    /// The rate-limit rules in force.
    pub fn rules(&self) -> &SharedLimitRules {
        &self.rules
    }

    /// The registry the route layer reads.
    pub fn registry(&self) -> &SharedRegistry {
        &self.registry
    }

    /// The keys the auth layer reads.
    pub fn keys(&self) -> &SharedKeyStore {
        &self.keys
    }

    /// The key records, revoked ones included.
    pub fn key_records(&self) -> Arc<Vec<KeyRecord>> {
        self.records.load_full()
    }

    /// The current state as a source holds it.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            accounts: self.registry.load().specs().to_vec(),
            keys: self.records.load().to_vec(),
            rate_limits: Some((*self.rules.load()).clone()),
        }
    }

    /// Compiles `snapshot` and swaps it in: requests already routed or authenticated finish on
    /// what they started with, the next request sees it. On an error nothing changes.
    pub fn apply(&self, snapshot: Snapshot) -> Result<(), FieldError> {
        let _order = self.revision.lock().unwrap_or_else(PoisonError::into_inner);
        self.swap(snapshot)
    }

    /// The revision of the source snapshot applied last (0 before any).
    pub fn applied_revision(&self) -> u64 {
        *self.revision.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`apply`](Self::apply) for a snapshot a source loaded at `revision`: one older than the
    /// last applied is dropped (two loads that finish out of order never go back in time).
    /// Returns whether it was applied.
    pub fn apply_revision(&self, snapshot: Snapshot, revision: u64) -> Result<bool, FieldError> {
        let mut applied = self.revision.lock().unwrap_or_else(PoisonError::into_inner);
        if revision < *applied {
            return Ok(false);
        }
        self.swap(snapshot)?;
        *applied = revision;
        Ok(true)
    }

    fn swap(&self, snapshot: Snapshot) -> Result<(), FieldError> {
        validate_keys(&snapshot.keys)?;
        if let Some(rules) = &snapshot.rate_limits {
            validate_rules(&rules.rules, "rate_limits.rules")?;
        }
        let keys = HashedKeyStore::from_records(&snapshot.keys)
            .map_err(|e| FieldError::new("keys", e.to_string()))?;
        let registry = Registry::from_accounts(snapshot.accounts)?;
        keys.carry_usage(&self.keys.current());
        self.registry.store(registry);
        self.keys.store(keys);
        self.records.store(Arc::new(snapshot.keys));
        // A source that never held rules leaves the file's in force.
        if let Some(rules) = snapshot.rate_limits
            && *self.rules.load() != rules
        {
            self.rules.store(rules);
        }
        Ok(())
    }
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("registry", &self.registry)
            .field("keys", &self.records.load().len())
            .finish()
    }
}

/// How many audit entries a [`MemoryWriter`] keeps.
const MEMORY_AUDIT: usize = 1000;

/// The [`Writer`] of a gateway without a store: changes live in this process's memory until a
/// reload or a restart. It keeps the last 1,000 audit entries.
pub struct MemoryWriter {
    live: Live,
    /// Writers one at a time, so two changes never lose each other.
    state: Mutex<AuditLog>,
}

#[derive(Default)]
struct AuditLog {
    next: i64,
    entries: VecDeque<(i64, SystemTime, AuditEntry)>,
}

impl MemoryWriter {
    /// Writes to `live`.
    pub fn new(live: Live) -> Self {
        Self {
            live,
            state: Mutex::new(AuditLog {
                next: 1,
                entries: VecDeque::new(),
            }),
        }
    }

    fn apply(&self, edit: Edit) -> Result<(), GatewayError> {
        let mut log = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.live.snapshot();
        let mut next = current.clone();
        let entries = edit(&mut next)?;
        validate(&next.accounts)?;
        validate_keys(&next.keys)?;
        if let Some(rules) = &next.rate_limits {
            validate_rules(&rules.rules, "rules")?;
        }
        bump_versions(&current.accounts, &mut next.accounts);
        bump_rules(current.rate_limits.as_ref(), next.rate_limits.as_mut());
        self.live.apply(next)?;
        let now = SystemTime::now();
        for entry in entries {
            let seq = log.next;
            log.next += 1;
            log.entries.push_back((seq, now, entry));
            if log.entries.len() > MEMORY_AUDIT {
                log.entries.pop_front();
            }
        }
        Ok(())
    }
}

impl fmt::Debug for MemoryWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryWriter").finish_non_exhaustive()
    }
}

impl Writer for MemoryWriter {
    fn write(&self, edit: Edit) -> WriteFuture<'_> {
        let result = self.apply(edit);
        Box::pin(std::future::ready(result))
    }

    fn audit(&self, limit: u32, before: Option<i64>) -> AuditFuture<'_> {
        let log = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let page = log
            .entries
            .iter()
            .rev()
            .filter(|(seq, _, _)| before.is_none_or(|b| *seq < b))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .cloned()
            .collect();
        Box::pin(std::future::ready(Ok(page)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccountSpec, EndpointSpec, KeyDigest};

    fn entry(action: &str) -> AuditEntry {
        AuditEntry {
            actor: "t".into(),
            action: action.into(),
            target: "x".into(),
            changes: serde_json::json!({}),
        }
    }

    #[tokio::test]
    async fn a_memory_write_is_validated_versioned_audited_and_served() {
        let live = Live::new(SharedRegistry::default(), SharedKeyStore::default(), vec![]);
        let writer = MemoryWriter::new(live.clone());
        writer
            .write(Box::new(|s: &mut Snapshot| {
                s.accounts.push(AccountSpec {
                    endpoints: vec![EndpointSpec::new("e", "https://x/v1")],
                    ..AccountSpec::new("a")
                });
                s.keys
                    .push(KeyRecord::new("k", KeyDigest::of("gw-k"), "s@x", vec![]));
                Ok(vec![entry("first")])
            }))
            .await
            .unwrap();
        assert_eq!(
            live.registry().load().endpoint("a", "e").unwrap().version(),
            1
        );
        assert!(live.keys().current().get(&KeyDigest::of("gw-k")).is_some());
        let invalid = writer
            .write(Box::new(|s: &mut Snapshot| {
                s.accounts[0].endpoints[0].base_url = "https://x/v1/".into();
                Ok(vec![entry("second")])
            }))
            .await
            .unwrap_err();
        assert_eq!(invalid.status(), 400);
        assert!(invalid.message().starts_with("base_url:"), "{invalid}");
        let refused = writer
            .write(Box::new(|_: &mut Snapshot| {
                Err(GatewayError::not_found("no"))
            }))
            .await
            .unwrap_err();
        assert_eq!(refused.status(), 404);
        let log = writer.audit(10, None).await.unwrap();
        assert_eq!(log.len(), 1, "refused and invalid writes leave no entry");
        assert_eq!(log[0].2.action, "first");
        assert_eq!(
            live.snapshot().accounts[0].endpoints[0].base_url,
            "https://x/v1"
        );
    }
}
