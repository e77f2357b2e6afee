//! The declarative state a source of the model holds, loaded whole: accounts and key records,
//! and the audit entry every change leaves.

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use super::{AccountSpec, KeyRecord, LimitRules};
use crate::error::GatewayError;

/// Everything a source of the model keeps: the accounts (with their endpoints and grants) and
/// the gateway keys. A store loads it whole and applies a change to it all or nothing.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The provider accounts, in order.
    pub accounts: Vec<AccountSpec>,
    /// The gateway keys, revoked ones included.
    pub keys: Vec<KeyRecord>,
    /// The rate-limit rules, or `None` where the source never held any (a store seeded before
    /// it kept them): then the configuration file's rules apply.
    pub rate_limits: Option<LimitRules>,
}

/// One entry of the audit log: who changed what. It never holds a secret value: a change of
/// headers names the headers, never their values, and a key is named by its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// Who made the change: the key id and subject of the caller, e.g. `ops-laptop
    /// (user:ops@example.com)`, or `config` for a seed from the file.
    pub actor: String,
    /// What was done, e.g. `endpoint.put`, `account.access`, `key.create`, `key.revoke`.
    pub action: String,
    /// What it was done to, e.g. `coreweave-model/inference` or `key:ops-ci`.
    pub target: String,
    /// The fields that changed, as JSON, secret values left out.
    pub changes: serde_json::Value,
}

/// A change of the model, applied all or nothing by a [`Writer`]: it edits the state and
/// returns the audit entries to keep, or refuses with the error to answer (a 404, a 403, a 409
/// conflict), and then nothing changes.
pub type Edit = Box<dyn FnOnce(&mut Snapshot) -> Result<Vec<AuditEntry>, GatewayError> + Send>;

/// The future of [`Writer::write`].
pub type WriteFuture<'a> = Pin<Box<dyn Future<Output = Result<(), GatewayError>> + Send + 'a>>;

/// Where the management API's changes go: the memory of this process (the default, see
/// [`MemoryWriter`](crate::registry::MemoryWriter)) or a [store](crate::store).
///
/// A writer runs an [`Edit`] on the current state, validates the result as a configuration
/// file is validated (an invalid change is a 400 naming the field), bumps the version of each
/// record it changed, keeps the audit entries, and makes the change visible to this process
/// before it returns `Ok`, so a client reads its own writes.
pub trait Writer: Send + Sync + 'static {
    /// Applies `edit`, or changes nothing.
    fn write(&self, edit: Edit) -> WriteFuture<'_>;

    /// The newest audit entries first: at most `limit`, older than the entry numbered
    /// `before`; each with its number (the cursor of the next page) and its time.
    fn audit(&self, limit: u32, before: Option<i64>) -> AuditFuture<'_>;
}

/// The future of [`Writer::audit`].
pub type AuditFuture<'a> = Pin<
    Box<dyn Future<Output = Result<Vec<(i64, SystemTime, AuditEntry)>, GatewayError>> + Send + 'a>,
>;
