//! The model: the declarative types that every source of configuration shares (the TOML
//! file, the management API, and a store), and their validation.
//!
//! | type | what it describes |
//! |---|---|
//! | [`AccountSpec`], [`EndpointSpec`] | a provider account and its endpoints, as a user writes them |
//! | [`Grants`], [`Subject`], [`Role`], [`Permission`] | who may manage, use and view them |
//! | [`HeaderTemplate`] | an injected header value filled per caller (`{team}`, `{subject}`, `{key_id}`) |
//! | [`UpstreamBase`], [`Timeouts`] | where an endpoint's requests go, and how long they wait |
//! | [`Principal`] | who is calling: a key's label, subject and teams |
//! | [`HashedKeyStore`], [`KeyDigest`] | gateway key records: digests and the principal of each (feature `auth`) |
//! | [`RateLimits`], [`RateLimitRule`], [`LimitScope`] | request rates, token budgets and concurrent streams, per key, team, subject or endpoint |
//! | [`FieldError`] | the one validation error: the field, as a path, and the problem |
//!
//! This module imports no layer and no transport: the layers, the sources and the
//! [`registry`](crate::registry) (the compiled snapshot the hot path reads) import it.
//!
//! # Example
//!
//! ```
//! use tower_gateway::model::{AccountSpec, EndpointSpec, Grants, validate};
//!
//! let accounts = vec![AccountSpec {
//!     access: Grants::parse(&["team:platform"], &["everyone"], &[], "access").unwrap(),
//!     endpoints: vec![EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1/")],
//!     ..AccountSpec::new("coreweave-model")
//! }];
//! let err = validate(&accounts).unwrap_err();
//! assert_eq!(err.field(), "accounts[0].endpoints[0].base_url");
//! assert_eq!(err.message(), "must not end with a slash");
//! ```

mod account;
mod grants;
#[cfg(feature = "auth")]
mod keys;
mod limits;
mod pool;
mod principal;
#[cfg(feature = "auth")]
mod snapshot;
mod template;
mod upstream;

use std::fmt;

pub use self::account::{AccountSpec, EndpointSpec, bump_versions, validate};
pub use self::grants::{Grants, InvalidSubject, Permission, Role, Subject};
#[cfg(feature = "auth")]
pub use self::keys::{
    DuplicateKey, HashedKeyStore, InvalidDigest, KeyDigest, KeyRecord, KeySource, day_of,
    validate_keys,
};
pub use self::limits::{
    LimitBackend, LimitRules, LimitScope, LimitUsage, LimitUsageSource, OnBackendError,
    RateLimitRule, RateLimits, UsageFuture, bump_rules, validate_rules,
};
pub use self::pool::{
    DEFAULT_RETRY_ON, EjectPolicy, HealthCheck, MAX_TARGETS, MAX_WEIGHT, RetryPolicy, TargetSpec,
};
pub use self::principal::Principal;
#[cfg(feature = "auth")]
pub use self::snapshot::{AuditEntry, AuditFuture, Edit, Snapshot, WriteFuture, Writer};
pub use self::template::{HeaderTemplate, TemplateVar};
pub use self::upstream::{COMMON_PATHS, Timeouts, UpstreamBase};

/// The default path prefix of the proxy, `/proxy-api`.
pub const DEFAULT_PATH_PREFIX: &str = "/proxy-api";

/// Whether `name` may be an account or endpoint name: a single path segment of unreserved
/// characters (`A-Z a-z 0-9 - . _ ~`), not `.` or `..`, at most 128 bytes.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

pub(crate) const NAME_RULE: &str =
    "must be 1 to 128 of A-Z a-z 0-9 - . _ ~, and not \".\" or \"..\"";

/// Whether `prefix` is a valid path prefix: empty, or `/seg/seg` of valid names.
pub fn is_valid_prefix(prefix: &str) -> bool {
    prefix.is_empty()
        || prefix
            .strip_prefix('/')
            .is_some_and(|rest| rest.split('/').all(is_valid_name))
}

/// A field that failed validation: its path (`accounts[0].endpoints[1].base_url`) and the
/// problem. It never contains a header value or any other secret. Every source of the
/// model (the configuration file, the management API) and the registry report errors with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    field: String,
    message: String,
}

impl FieldError {
    /// An error for `field` (a path such as `accounts[0].name`) saying `message`, which must
    /// hold no secret.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field in error, as a path into the configuration.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The problem.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// A validation error as the management API answers it: 400 `invalid_request`, naming the
/// field relative to the record the request is about (`accounts[0].endpoints[1].base_url` →
/// `base_url`, `keys[2].subject` → `subject`). Any other field (`rules[1].scope`, a list the
/// caller sent whole) is named as it is.
impl From<FieldError> for crate::error::GatewayError {
    fn from(err: FieldError) -> Self {
        let field = err.field();
        let record = |prefix: &str| {
            field
                .strip_prefix(prefix)
                .and_then(|rest| rest.split_once("]."))
                .map(|(_, rest)| rest)
        };
        let rest = match field.find(".endpoints[") {
            Some(pos) if field.starts_with("accounts[") => record(&field[..pos + 11]),
            _ => record("accounts[").or_else(|| record("keys[")),
        }
        .unwrap_or(field);
        crate::error::GatewayError::new(
            http::StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{rest}: {}", err.message()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::FieldError;
    use crate::error::GatewayError;

    #[test]
    fn an_api_error_names_the_field_within_its_record() {
        let message = |field: &str| {
            GatewayError::from(FieldError::new(field, "bad"))
                .message()
                .to_owned()
        };
        assert_eq!(
            message("accounts[0].endpoints[1].base_url"),
            "base_url: bad"
        );
        assert_eq!(message("accounts[3].header_auth"), "header_auth: bad");
        assert_eq!(message("keys[2].subject"), "subject: bad");
        assert_eq!(
            message("rules[1].requests_per_minute"),
            "rules[1].requests_per_minute: bad"
        );
        assert_eq!(message("accounts[0]"), "accounts[0]: bad");
        assert_eq!(message("admins"), "admins: bad");
    }
}
