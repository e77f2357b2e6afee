//! The versioned schema, one set of migrations per engine, applied on open by sqlx's migrator
//! (which holds PostgreSQL's advisory lock while it runs, so replicas that start at once
//! against an empty database apply each migration once and the others wait for it).

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType};

/// The database engine behind a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Engine {
    Postgres,
    Sqlite,
}

/// Version 1: the declarative state, the revision every change bumps, the audit log.
const V1_POSTGRES: &str = r#"
CREATE TABLE gw_revision (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL,
    seeded BIGINT NOT NULL
);
INSERT INTO gw_revision (id, revision, seeded) VALUES (1, 0, 0);
CREATE TABLE gw_accounts (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    version BIGINT NOT NULL,
    header_auth TEXT NOT NULL,
    access TEXT NOT NULL
);
CREATE TABLE gw_endpoints (
    account TEXT NOT NULL,
    name TEXT NOT NULL,
    position BIGINT NOT NULL,
    version BIGINT NOT NULL,
    spec TEXT NOT NULL,
    PRIMARY KEY (account, name)
);
CREATE TABLE gw_keys (
    id TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    teams TEXT NOT NULL,
    created_at BIGINT,
    expires_at BIGINT,
    revoked_at BIGINT,
    source TEXT NOT NULL
);
CREATE TABLE gw_audit (
    seq BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    changes TEXT NOT NULL
);
"#;

const V1_SQLITE: &str = r#"
CREATE TABLE gw_revision (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL,
    seeded INTEGER NOT NULL
);
INSERT INTO gw_revision (id, revision, seeded) VALUES (1, 0, 0);
CREATE TABLE gw_accounts (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    version INTEGER NOT NULL,
    header_auth TEXT NOT NULL,
    access TEXT NOT NULL
);
CREATE TABLE gw_endpoints (
    account TEXT NOT NULL,
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,
    PRIMARY KEY (account, name)
);
CREATE TABLE gw_keys (
    id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    teams TEXT NOT NULL,
    created_at INTEGER,
    expires_at INTEGER,
    revoked_at INTEGER,
    source TEXT NOT NULL
);
CREATE TABLE gw_audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    changes TEXT NOT NULL
);
"#;

/// Version 2: the last day each key was used (days since 1970-01-01 UTC), recorded off the
/// hot path.
const V2: &str = "ALTER TABLE gw_keys ADD COLUMN last_used_day BIGINT;";

/// Version 3: the rate-limit rules, one row (`id = 1`) holding them as JSON with their
/// version; no row means the store never held rules (the file's apply).
const V3: &str = "CREATE TABLE gw_rate_limits (id INTEGER PRIMARY KEY, version BIGINT NOT NULL, \
                  rules TEXT NOT NULL);";

/// The migrations of `engine`, in order.
#[derive(Debug)]
pub(super) struct Migrations(pub(super) Engine);

impl MigrationSource<'static> for Migrations {
    fn resolve(self) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send>> {
        let v1 = match self.0 {
            Engine::Postgres => V1_POSTGRES,
            Engine::Sqlite => V1_SQLITE,
        };
        let migrations = vec![
            Migration::new(
                1,
                Cow::Borrowed("gateway state"),
                MigrationType::Simple,
                Cow::Borrowed(v1),
                false,
            ),
            Migration::new(
                2,
                Cow::Borrowed("key usage"),
                MigrationType::Simple,
                Cow::Borrowed(V2),
                false,
            ),
            Migration::new(
                3,
                Cow::Borrowed("rate limits"),
                MigrationType::Simple,
                Cow::Borrowed(V3),
                false,
            ),
        ];
        Box::pin(async move { Ok(migrations) })
    }
}
