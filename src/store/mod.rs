//! The store: gateway keys, accounts, endpoints and grants kept in a database, shared by every
//! replica, and the audit log of every change.
//!
//! A [`Store`] is a source of the [model](crate::model), beside the configuration file. It
//! loads the whole [`Snapshot`] at once ([`Store::load`]), applies a change all or nothing
//! ([`Store::write`]: the change runs on the state read inside the transaction, is validated
//! exactly as a configuration file is, bumps the version of each record it changed, leaves an
//! [`AuditEntry`] and commits, or changes nothing), and says when the state changed
//! ([`Store::revisions`]). The hot path never waits for it: the gateway compiles each snapshot
//! into the in-memory registry and key store the layers read.
//!
//! | URL | engine | for |
//! |---|---|---|
//! | `sqlite://PATH` | SQLite, a file (created if missing) | one gateway whose management changes survive a restart |
//! | `postgres://USER@HOST/DB` | PostgreSQL | many replicas: a change made through any of them reaches every other one through `LISTEN/NOTIFY` within a second, with a full check every few seconds ([`Store::open_with`]) as a safety net for a lost notification or a dropped connection |
//!
//! The schema is versioned and migrated on open; on PostgreSQL the migrator holds an advisory
//! lock, so replicas that start at once against an empty database migrate it once. Writers
//! are serialized on one row (`gw_revision`), so two managers writing through two replicas
//! never lose an update. The client is `sqlx`: one API over both engines (its `Any` driver), a
//! migrator, and PostgreSQL's `LISTEN` (`PgListener`).
//!
//! Upstream header values are stored as written (the gateway must inject them): protect the
//! database as you would the configuration file. Gateway keys are stored as SHA-256 digests.
//!
//! # Example
//!
//! ```no_run
//! use tower_gateway::model::{AccountSpec, AuditEntry, EndpointSpec};
//! use tower_gateway::store::Store;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::open("sqlite:///var/lib/gateway/state.db").await?;
//! store
//!     .write(|state| {
//!         state.accounts.push(AccountSpec {
//!             endpoints: vec![EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1")],
//!             ..AccountSpec::new("coreweave-model")
//!         });
//!         let entry = AuditEntry {
//!             actor: "ops".into(),
//!             action: "account.create".into(),
//!             target: "coreweave-model".into(),
//!             changes: serde_json::json!({"endpoints": ["inference"]}),
//!         };
//!         Ok::<_, std::convert::Infallible>(((), vec![entry]))
//!     })
//!     .await?;
//! let snapshot = store.load().await?;
//! assert_eq!(snapshot.state.accounts[0].version, 1);
//! # Ok(())
//! # }
//! ```

mod live;
mod rows;
mod schema;

use std::fmt;
use std::sync::{Arc, Once, Weak};
use std::time::{Duration, SystemTime};

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool, Row};
use tokio::sync::watch;

pub use self::live::StoreWriter;
use self::rows::{KeyRow, TlsCache};
use self::schema::{Engine, Migrations};
use crate::model::{
    AccountSpec, AuditEntry, FieldError, KeyRecord, Snapshot, bump_rules, bump_versions, validate,
    validate_keys, validate_rules,
};

/// The PostgreSQL channel every change is announced on, with the new revision as payload.
const CHANNEL: &str = "gw_changes";

/// How often a replica checks the revision by itself, by default.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(5);

/// A store of the gateway's declarative state. Cheap to clone; clones share the connection
/// pool and the watcher. See the [module docs](self).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    pool: AnyPool,
    engine: Engine,
    /// The connection URL, for the listener's own connection. Never printed: it may hold a
    /// password.
    url: String,
    /// The latest revision known to this process.
    revision: watch::Sender<u64>,
    /// Whether the database answered the last time it was asked, and since when it has not.
    health: watch::Sender<Health>,
    tls: TlsCache,
    /// How often the revision is checked, and key usage recorded.
    resync: Duration,
    /// Held while a snapshot is loaded into a live state (see `live::catch_up`).
    loading: tokio::sync::Mutex<()>,
}

/// Whether the database answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// It answered the last time it was asked.
    Reachable,
    /// It has not answered since this time.
    Unreachable {
        /// When it first failed to answer.
        since: SystemTime,
    },
}

/// A loaded snapshot and the revision it is at.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The accounts and keys.
    pub state: Snapshot,
    /// The store's revision: one more for every committed change.
    pub revision: u64,
}

/// A store that could not answer or holds what it should not. Its message never holds a
/// secret (not the URL's password, a key's digest or a header value).
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
}

/// What went wrong with a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The database could not be reached or failed the query (503 to a management write).
    Unavailable,
    /// A row could not be read back into the model.
    Corrupt,
    /// The change holds something a store cannot keep.
    Invalid,
}

impl StoreError {
    fn unavailable(err: impl fmt::Display) -> Self {
        Self {
            kind: StoreErrorKind::Unavailable,
            message: format!("the store is unavailable: {err}"),
        }
    }

    pub(crate) fn corrupt(message: impl Into<String>) -> Self {
        Self {
            kind: StoreErrorKind::Corrupt,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self {
            kind: StoreErrorKind::Invalid,
            message: message.into(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        // sqlx's messages name the server and the query's error, never the password.
        Self::unavailable(err)
    }
}

/// Why a [`Store::write`] changed nothing.
#[derive(Debug)]
pub enum WriteError<E> {
    /// The change itself refused (a conflict, a missing record, a denied caller).
    Rejected(E),
    /// The changed state failed validation; the error names the field.
    Invalid(FieldError),
    /// The store could not apply it.
    Store(StoreError),
}

impl<E: fmt::Display> fmt::Display for WriteError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Rejected(e) => e.fmt(f),
            WriteError::Invalid(e) => e.fmt(f),
            WriteError::Store(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for WriteError<E> {}

impl<E> From<StoreError> for WriteError<E> {
    fn from(err: StoreError) -> Self {
        WriteError::Store(err)
    }
}

impl<E> From<sqlx::Error> for WriteError<E> {
    fn from(err: sqlx::Error) -> Self {
        WriteError::Store(err.into())
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("engine", &self.inner.engine)
            .field("revision", &*self.inner.revision.borrow())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `url` (`sqlite://PATH`, or `postgres://…`), migrates the schema and starts
    /// watching for changes, checking the revision every [`DEFAULT_RESYNC`].
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, DEFAULT_RESYNC).await
    }

    /// [`open`](Self::open), checking the revision by itself every `resync`.
    pub async fn open_with(url: &str, resync: Duration) -> Result<Self, StoreError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let (engine, url) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Engine::Postgres, url.to_owned())
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::invalid(
                    "a sqlite:// store URL needs a file path",
                ));
            }
            // Create the file if it is missing.
            let url = if url.contains('?') {
                url.to_owned()
            } else {
                format!("{url}?mode=rwc")
            };
            (Engine::Sqlite, url)
        } else {
            return Err(StoreError::invalid(
                "a store URL starts with sqlite:// or postgres://",
            ));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(match engine {
                Engine::Postgres => 4,
                Engine::Sqlite => 2,
            })
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await?;
        let migrator = Migrator::new(Migrations(engine))
            .await
            .map_err(|e| StoreError::invalid(format!("the store's migrations: {e}")))?;
        migrator
            .run(&pool)
            .await
            .map_err(|e| StoreError::unavailable(format!("migrating the schema failed: {e}")))?;
        let revision = read_revision(&pool).await?;
        let inner = Arc::new(Inner {
            pool,
            engine,
            url,
            revision: watch::Sender::new(revision),
            health: watch::Sender::new(Health::Reachable),
            tls: TlsCache::default(),
            resync,
            loading: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(watch_changes(Arc::downgrade(&inner), resync));
        Ok(Self { inner })
    }

    /// The revision this process knows of, and every later one as it is seen: a change
    /// committed by this process at once, one by another replica within a second on
    /// PostgreSQL (or at the next resync).
    pub fn revisions(&self) -> watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }

    /// Whether the database answered the last time it was asked, and every change of that.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.inner.health.subscribe()
    }

    /// Loads the whole state, as of one revision.
    pub async fn load(&self) -> Result<Loaded, StoreError> {
        let result = async {
            let mut tx = self.inner.pool.begin().await?;
            if self.inner.engine == Engine::Postgres {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    .execute(&mut *tx)
                    .await?;
            }
            let loaded = load_in(&mut tx, &self.inner.tls).await?;
            tx.commit().await?;
            Ok(loaded)
        }
        .await;
        self.inner.observe(&result);
        let loaded = result?;
        self.inner.seen(loaded.revision);
        Ok(loaded)
    }

    /// Applies a change all or nothing. `edit` runs on the state as the transaction reads it
    /// (never a stale copy) and returns its result and the audit entries to keep; then the
    /// changed state is validated as a configuration file is, the version of every record it
    /// changed is bumped, and it is committed with the entries. Writers are serialized, so
    /// concurrent writes through any replicas never lose each other.
    pub async fn write<T, E>(
        &self,
        edit: impl FnOnce(&mut Snapshot) -> Result<(T, Vec<AuditEntry>), E>,
    ) -> Result<T, WriteError<E>> {
        let result = self.write_inner(edit).await;
        if let Err(WriteError::Store(e)) = &result
            && e.kind == StoreErrorKind::Unavailable
        {
            self.inner.set_health(false);
        }
        result
    }

    async fn write_inner<T, E>(
        &self,
        edit: impl FnOnce(&mut Snapshot) -> Result<(T, Vec<AuditEntry>), E>,
    ) -> Result<T, WriteError<E>> {
        let tx = self.inner.pool.begin().await?;
        self.apply_in(tx, edit).await
    }

    /// A write in `tx`: the first statement takes the write lock (on the revision row in
    /// PostgreSQL, on the database in SQLite), so every writer waits here for the one before
    /// it; then `edit` runs on the state read in the transaction, the result is validated,
    /// versioned, written with its audit entries, announced and committed.
    async fn apply_in<T, E>(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        edit: impl FnOnce(&mut Snapshot) -> Result<(T, Vec<AuditEntry>), E>,
    ) -> Result<T, WriteError<E>> {
        let revision: i64 = sqlx::query_scalar(
            "UPDATE gw_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision",
        )
        .fetch_one(&mut *tx)
        .await?;
        let current = load_in(&mut tx, &self.inner.tls).await?.state;
        let mut next = current.clone();
        let checked = edit(&mut next)
            .map_err(WriteError::Rejected)
            .and_then(|done| {
                validate(&next.accounts).map_err(WriteError::Invalid)?;
                validate_keys(&next.keys).map_err(WriteError::Invalid)?;
                if let Some(rules) = &next.rate_limits {
                    validate_rules(&rules.rules, "rules").map_err(WriteError::Invalid)?;
                }
                Ok(done)
            });
        let (out, entries) = match checked {
            Ok(done) => done,
            Err(refused) => {
                // The change was checked against the committed state, which may be newer than
                // this process knew (a notification on its way): say so, so that the caller
                // catches up to it.
                self.inner.seen(u64::try_from(revision - 1).unwrap_or(0));
                return Err(refused);
            }
        };
        bump_versions(&current.accounts, &mut next.accounts);
        bump_rules(current.rate_limits.as_ref(), next.rate_limits.as_mut());
        write_diff(&mut tx, &current, &next).await?;
        audit(&mut tx, &entries).await?;
        self.inner.announce(&mut tx, revision).await?;
        tx.commit().await?;
        self.inner.set_health(true);
        self.inner.seen(u64::try_from(revision).unwrap_or(0));
        Ok(out)
    }

    /// Imports `state` into a store that was never seeded, once: what the configuration file
    /// does on the first start with a store. Returns whether it did; a store seeded before (by
    /// this replica or another, whatever was changed since) is left as it is.
    pub async fn seed(&self, state: &Snapshot, entry: AuditEntry) -> Result<bool, StoreError> {
        let mut tx = self.inner.pool.begin().await?;
        // Claimed in the same transaction as the import: a failed import leaves it unclaimed.
        let claimed = sqlx::query("UPDATE gw_revision SET seeded = 1 WHERE id = 1 AND seeded = 0")
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if claimed == 0 {
            return Ok(false);
        }
        let import = |next: &mut Snapshot| {
            next.accounts.extend(state.accounts.iter().cloned());
            next.keys.extend(state.keys.iter().cloned());
            if state
                .rate_limits
                .as_ref()
                .is_some_and(|r| !r.rules.is_empty())
            {
                next.rate_limits.clone_from(&state.rate_limits);
            }
            Ok::<_, std::convert::Infallible>(((), vec![entry]))
        };
        match self.apply_in(tx, import).await {
            Ok(()) => Ok(true),
            Err(WriteError::Rejected(never)) => match never {},
            Err(WriteError::Invalid(e)) => Err(StoreError::invalid(format!("the seed: {e}"))),
            Err(WriteError::Store(e)) => Err(e),
        }
    }

    /// The newest audit entries first: at most `limit` of them, older than the entry
    /// numbered `before` if given. Each comes with its number, the cursor for the next page,
    /// and its time.
    pub async fn audit_log(
        &self,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<(i64, SystemTime, AuditEntry)>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target, changes FROM gw_audit \
             WHERE seq < $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let seq: i64 = row.try_get(0)?;
                let at: i64 = row.try_get(1)?;
                let changes: String = row.try_get(5)?;
                let at =
                    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0));
                Ok((
                    seq,
                    at,
                    AuditEntry {
                        actor: row.try_get(2)?,
                        action: row.try_get(3)?,
                        target: row.try_get(4)?,
                        changes: serde_json::from_str(&changes).map_err(|_| {
                            StoreError::corrupt(format!("audit entry {seq}: not valid JSON"))
                        })?,
                    },
                ))
            })
            .collect()
    }

    /// Records the last day each key was used, `(id, day)`, where it is later than what the
    /// store has. It is not a change of the state: no revision, no audit entry; other replicas
    /// read it with their next snapshot.
    pub async fn record_usage(&self, used: &[(String, u32)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let result = async {
            let mut tx = self.inner.pool.begin().await?;
            for (id, day) in used {
                sqlx::query(
                    "UPDATE gw_keys SET last_used_day = $1 \
                     WHERE id = $2 AND (last_used_day IS NULL OR last_used_day < $1)",
                )
                .bind(i64::from(*day))
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        }
        .await;
        self.inner.observe(&result);
        result
    }

    /// Closes the connections; the watcher stops with the last clone.
    pub async fn close(&self) {
        self.inner.pool.close().await;
    }
}

impl Inner {
    /// Announces a committed revision to the other replicas (PostgreSQL delivers it on commit).
    async fn announce(&self, conn: &mut AnyConnection, revision: i64) -> Result<(), sqlx::Error> {
        if self.engine == Engine::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(revision.to_string())
                .execute(conn)
                .await?;
        }
        Ok(())
    }

    /// Records that `revision` is known, if it is newer.
    fn seen(&self, revision: u64) {
        self.revision.send_if_modified(|known| {
            let newer = revision > *known;
            if newer {
                *known = revision;
            }
            newer
        });
    }

    fn set_health(&self, reachable: bool) {
        self.health
            .send_if_modified(|health| match (reachable, *health) {
                (true, Health::Unreachable { .. }) => {
                    tracing::info!("the store is reachable again");
                    *health = Health::Reachable;
                    true
                }
                (false, Health::Reachable) => {
                    tracing::warn!("the store is unreachable; serving from the last snapshot");
                    *health = Health::Unreachable {
                        since: SystemTime::now(),
                    };
                    true
                }
                _ => false,
            });
    }

    fn observe<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.set_health(true),
            Err(e) if e.kind == StoreErrorKind::Unavailable => self.set_health(false),
            Err(_) => {}
        }
    }
}

async fn read_revision(pool: &AnyPool) -> Result<u64, StoreError> {
    let revision: i64 = sqlx::query_scalar("SELECT revision FROM gw_revision WHERE id = 1")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(revision).unwrap_or(0))
}

async fn load_in(conn: &mut AnyConnection, tls: &TlsCache) -> Result<Loaded, StoreError> {
    let revision: i64 = sqlx::query_scalar("SELECT revision FROM gw_revision WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    let mut accounts: Vec<AccountSpec> = Vec::new();
    let rows = sqlx::query(
        "SELECT name, version, header_auth, access FROM gw_accounts ORDER BY position, name",
    )
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let header_auth: String = row.try_get(2)?;
        let access: String = row.try_get(3)?;
        accounts.push(rows::account_of(
            row.try_get(0)?,
            row.try_get(1)?,
            &header_auth,
            &access,
        )?);
    }
    let rows = sqlx::query(
        "SELECT account, name, version, spec FROM gw_endpoints ORDER BY position, name",
    )
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let account: String = row.try_get(0)?;
        let spec: String = row.try_get(3)?;
        let ep = rows::endpoint_of(&account, row.try_get(1)?, row.try_get(2)?, &spec, tls)?;
        accounts
            .iter_mut()
            .find(|a| a.name == account)
            .ok_or_else(|| {
                StoreError::corrupt(format!("endpoint {account}/{}: no such account", ep.name))
            })?
            .endpoints
            .push(ep);
    }
    let rows = sqlx::query(
        "SELECT id, digest, subject, teams, created_at, expires_at, revoked_at, source, \
         last_used_day FROM gw_keys ORDER BY position, id",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        keys.push(rows::key_of(
            row.try_get(0)?,
            KeyRow {
                digest: row.try_get(1)?,
                subject: row.try_get(2)?,
                teams: row.try_get(3)?,
                created_at: row.try_get(4)?,
                expires_at: row.try_get(5)?,
                revoked_at: row.try_get(6)?,
                source: row.try_get(7)?,
                last_used_day: row.try_get(8)?,
            },
        )?);
    }
    let row = sqlx::query("SELECT version, rules FROM gw_rate_limits WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await?;
    let rate_limits = match row {
        None => None,
        Some(row) => {
            let rules: String = row.try_get(1)?;
            Some(rows::rules_of(row.try_get(0)?, &rules)?)
        }
    };
    Ok(Loaded {
        state: Snapshot {
            accounts,
            keys,
            rate_limits,
        },
        revision: u64::try_from(revision).unwrap_or(0),
    })
}

/// Writes the rows of `next` that differ from `current`, and deletes those it dropped.
async fn write_diff(
    conn: &mut AnyConnection,
    current: &Snapshot,
    next: &Snapshot,
) -> Result<(), StoreError> {
    let position = |i: usize| i64::try_from(i).unwrap_or(i64::MAX);
    let version = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for gone in current
        .accounts
        .iter()
        .filter(|a| !next.accounts.iter().any(|n| n.name == a.name))
    {
        sqlx::query("DELETE FROM gw_endpoints WHERE account = $1")
            .bind(&gone.name)
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM gw_accounts WHERE name = $1")
            .bind(&gone.name)
            .execute(&mut *conn)
            .await?;
    }
    for (i, account) in next.accounts.iter().enumerate() {
        let before = current
            .accounts
            .iter()
            .enumerate()
            .find(|(_, a)| a.name == account.name);
        let unchanged = before.is_some_and(|(j, a)| j == i && a.version == account.version);
        if !unchanged {
            let (header_auth, access) = rows::account_row(account)?;
            sqlx::query(
                "INSERT INTO gw_accounts (name, position, version, header_auth, access) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET \
                 position = excluded.position, version = excluded.version, \
                 header_auth = excluded.header_auth, access = excluded.access",
            )
            .bind(&account.name)
            .bind(position(i))
            .bind(version(account.version))
            .bind(header_auth)
            .bind(access)
            .execute(&mut *conn)
            .await?;
        }
        let before = before.map(|(_, a)| a);
        if let Some(before) = before {
            for gone in before
                .endpoints
                .iter()
                .filter(|e| !account.endpoints.iter().any(|n| n.name == e.name))
            {
                sqlx::query("DELETE FROM gw_endpoints WHERE account = $1 AND name = $2")
                    .bind(&account.name)
                    .bind(&gone.name)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        for (j, ep) in account.endpoints.iter().enumerate() {
            let was = before.and_then(|b| b.endpoints.iter().position(|e| e.name == ep.name));
            let unchanged = was.is_some_and(|k| {
                k == j && before.is_some_and(|b| b.endpoints[k].version == ep.version)
            });
            if unchanged {
                continue;
            }
            sqlx::query(
                "INSERT INTO gw_endpoints (account, name, position, version, spec) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account, name) DO UPDATE SET \
                 position = excluded.position, version = excluded.version, spec = excluded.spec",
            )
            .bind(&account.name)
            .bind(&ep.name)
            .bind(position(j))
            .bind(version(ep.version))
            .bind(rows::endpoint_row(ep)?)
            .execute(&mut *conn)
            .await?;
        }
    }
    for gone in current
        .keys
        .iter()
        .filter(|k| !next.keys.iter().any(|n| n.id == k.id))
    {
        sqlx::query("DELETE FROM gw_keys WHERE id = $1")
            .bind(&gone.id)
            .execute(&mut *conn)
            .await?;
    }
    for (i, key) in next.keys.iter().enumerate() {
        let unchanged = current
            .keys
            .iter()
            .position(|k| k.id == key.id)
            .is_some_and(|j| j == i && current.keys[j] == *key);
        if unchanged {
            continue;
        }
        write_key(conn, position(i), key).await?;
    }
    if let Some(rules) = &next.rate_limits
        && current.rate_limits.as_ref() != Some(rules)
    {
        sqlx::query(
            "INSERT INTO gw_rate_limits (id, version, rules) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET version = excluded.version, rules = excluded.rules",
        )
        .bind(version(rules.version))
        .bind(rows::rules_row(rules))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn write_key(
    conn: &mut AnyConnection,
    position: i64,
    key: &KeyRecord,
) -> Result<(), StoreError> {
    let row = rows::key_row(key);
    sqlx::query(
        "INSERT INTO gw_keys (id, position, digest, subject, teams, created_at, expires_at, \
         revoked_at, source, last_used_day) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (id) DO UPDATE SET position = excluded.position, digest = excluded.digest, \
         subject = excluded.subject, teams = excluded.teams, created_at = excluded.created_at, \
         expires_at = excluded.expires_at, revoked_at = excluded.revoked_at, \
         source = excluded.source, last_used_day = excluded.last_used_day",
    )
    .bind(&key.id)
    .bind(position)
    .bind(row.digest)
    .bind(row.subject)
    .bind(row.teams)
    .bind(row.created_at)
    .bind(row.expires_at)
    .bind(row.revoked_at)
    .bind(row.source)
    .bind(row.last_used_day)
    .execute(conn)
    .await?;
    Ok(())
}

async fn audit(conn: &mut AnyConnection, entries: &[AuditEntry]) -> Result<(), StoreError> {
    let now = rows::seconds(Some(SystemTime::now())).unwrap_or(0);
    for entry in entries {
        sqlx::query(
            "INSERT INTO gw_audit (at, actor, action, target, changes) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(now)
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(entry.changes.to_string())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Follows the store's revision until the store is dropped: PostgreSQL's notifications as
/// they come, and the revision row every `resync` whatever the engine (a lost notification,
/// a dropped listener, another process writing to the same SQLite file).
async fn watch_changes(inner: Weak<Inner>, resync: Duration) {
    let mut listener = None;
    loop {
        let Some(this) = inner.upgrade() else { return };
        if this.engine == Engine::Postgres && listener.is_none() {
            listener = listen(&this.url).await;
        }
        drop(this);
        let notified = match &mut listener {
            Some(l) => tokio::select! {
                note = l.recv() => match note {
                    Ok(note) => note.payload().parse::<u64>().ok(),
                    Err(error) => {
                        tracing::debug!(%error, "the store's listener failed; reconnecting");
                        listener = None;
                        None
                    }
                },
                () = tokio::time::sleep(resync) => None,
            },
            None => {
                tokio::time::sleep(resync).await;
                None
            }
        };
        let Some(this) = inner.upgrade() else { return };
        match notified {
            Some(revision) => this.seen(revision),
            None => {
                let result = read_revision(&this.pool).await;
                this.observe(&result);
                if let Ok(revision) = result {
                    this.seen(revision);
                }
            }
        }
    }
}

async fn listen(url: &str) -> Option<sqlx::postgres::PgListener> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await.ok()?;
    listener.listen(CHANNEL).await.ok()?;
    Some(listener)
}
