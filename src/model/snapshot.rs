//! The declarative state a source of the model holds, loaded whole: accounts and key records,
//! and the audit entry every change leaves.

use super::{AccountSpec, KeyRecord};

/// Everything a source of the model keeps: the accounts (with their endpoints and grants) and
/// the gateway keys. A store loads it whole and applies a change to it all or nothing.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The provider accounts, in order.
    pub accounts: Vec<AccountSpec>,
    /// The gateway keys, revoked ones included.
    pub keys: Vec<KeyRecord>,
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
