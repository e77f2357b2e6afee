//! Accounts and endpoints as a user writes them, and the validation every change passes.

use std::collections::HashSet;
use std::fmt;
#[cfg(feature = "forward")]
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};

use super::pool::MAX_TARGETS;
use super::{
    EjectPolicy, FieldError, Grants, HealthCheck, NAME_RULE, RetryPolicy, TargetSpec, Timeouts,
    UpstreamBase, is_valid_name,
};

/// The description of an endpoint, as a user writes it.
///
/// `Debug` shows header names, never values.
#[derive(Clone)]
pub struct EndpointSpec {
    /// The endpoint name, the second path segment after the prefix.
    pub name: String,
    /// Base URL, e.g. `https://api.inference.wandb.ai/v1`: the endpoint's one target. Empty
    /// when [`targets`](Self::targets) are given instead.
    pub base_url: String,
    /// The endpoint's pool, instead of `base_url`: several upstreams with weights and
    /// priorities. Empty for an endpoint with one `base_url`.
    pub targets: Vec<TargetSpec>,
    /// When a request is tried again on another target; `None` takes
    /// [`RetryPolicy::default_for`] the number of targets.
    pub retry: Option<RetryPolicy>,
    /// When a failing target is taken out of the pool.
    pub eject: EjectPolicy,
    /// An active health check of ejected targets, if any.
    pub health: Option<HealthCheck>,
    /// Custom headers; they override the account's `header_auth`.
    pub headers: HeaderMap,
    /// Per-endpoint grants overriding the account's.
    pub access: Option<Grants>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Extra trust roots and a client certificate.
    #[cfg(feature = "forward")]
    pub tls: Option<Arc<crate::tls::TlsSettings>>,
    /// The record's version: 0 until a change is made through the management API or a store,
    /// then one more on every change of the endpoint. The management API answers it as the
    /// `ETag`.
    pub version: u64,
}

impl EndpointSpec {
    /// An endpoint with no headers, grants, timeouts or TLS settings of its own.
    pub fn new(name: impl Into<String>, base_url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            base_url: base_url.into(),
            targets: Vec::new(),
            retry: None,
            eject: EjectPolicy::default(),
            health: None,
            headers: HeaderMap::new(),
            access: None,
            timeouts: Timeouts::default(),
            #[cfg(feature = "forward")]
            tls: None,
            version: 0,
        }
    }

    /// The base URLs of the endpoint's targets: its `base_url`, or each target's.
    pub fn base_urls(&self) -> impl Iterator<Item = &str> {
        let one = self.targets.is_empty().then_some(self.base_url.as_str());
        one.into_iter()
            .chain(self.targets.iter().map(|t| t.base_url.as_str()))
    }

    /// Whether `other` describes the same endpoint, whatever the versions: the same name, base
    /// URL or targets, pool policies, headers (names and values), grants, timeouts and TLS
    /// settings.
    pub fn same_content(&self, other: &Self) -> bool {
        #[cfg(feature = "forward")]
        let same_tls = super::pool::same_tls(&self.tls, &other.tls);
        #[cfg(not(feature = "forward"))]
        let same_tls = true;
        self.name == other.name
            && self.base_url == other.base_url
            && self.targets.len() == other.targets.len()
            && self
                .targets
                .iter()
                .zip(&other.targets)
                .all(|(a, b)| a.same_content(b))
            && self.retry == other.retry
            && self.eject == other.eject
            && self.health == other.health
            && self.headers == other.headers
            && self.access == other.access
            && self.timeouts == other.timeouts
            && same_tls
    }
}

/// The description of a provider account, as a user writes it.
///
/// `Debug` shows header names, never values.
#[derive(Clone)]
pub struct AccountSpec {
    /// The account name, the first path segment after the prefix.
    pub name: String,
    /// Headers every endpoint of the account inherits.
    pub header_auth: HeaderMap,
    /// Who may manage, use and view the account's endpoints.
    pub access: Grants,
    /// The endpoints.
    pub endpoints: Vec<EndpointSpec>,
    /// The record's version: 0 until a change is made through the management API or a store,
    /// then one more on every change of the account's own fields (`header_auth`, `access`).
    pub version: u64,
}

impl AccountSpec {
    /// An account with no headers, grants or endpoints.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            header_auth: HeaderMap::new(),
            access: Grants::default(),
            endpoints: Vec::new(),
            version: 0,
        }
    }

    /// Whether `other` has the same name, `header_auth` and grants, whatever its endpoints and
    /// versions.
    pub fn same_own_content(&self, other: &Self) -> bool {
        self.name == other.name
            && self.header_auth == other.header_auth
            && self.access == other.access
    }
}

/// Bumps the version of every account and endpoint of `next` that is new or differs from its
/// record in `current` (by name): what a change through the management API or a store does
/// before it is applied. A record that did not change keeps its version.
pub fn bump_versions(current: &[AccountSpec], next: &mut [AccountSpec]) {
    for account in next.iter_mut() {
        let before = current.iter().find(|a| a.name == account.name);
        account.version = match before {
            Some(b) if b.same_own_content(account) => b.version,
            Some(b) => b.version + 1,
            None => account.version.max(1),
        };
        for ep in &mut account.endpoints {
            let was = before.and_then(|b| b.endpoints.iter().find(|e| e.name == ep.name));
            ep.version = match was {
                Some(w) if w.same_content(ep) => w.version,
                Some(w) => w.version + 1,
                None => ep.version.max(1),
            };
        }
    }
}

impl fmt::Debug for EndpointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("EndpointSpec");
        d.field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("targets", &self.targets)
            .field("retry", &self.retry)
            .field("eject", &self.eject)
            .field("health", &self.health)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("access", &self.access)
            .field("timeouts", &self.timeouts)
            .field("version", &self.version);
        #[cfg(feature = "forward")]
        d.field("tls", &self.tls);
        d.finish()
    }
}

impl fmt::Debug for AccountSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountSpec")
            .field("name", &self.name)
            .field("header_auth", &self.header_auth.keys().collect::<Vec<_>>())
            .field("access", &self.access)
            .field("endpoints", &self.endpoints)
            .field("version", &self.version)
            .finish()
    }
}

impl AccountSpec {
    /// The headers an endpoint of this account injects: the account's `header_auth`, each
    /// name the endpoint sets replaced by the endpoint's values; all marked sensitive.
    pub fn headers_for(&self, endpoint: &EndpointSpec) -> HeaderMap {
        let mut headers = self.header_auth.clone();
        for name in endpoint.headers.keys() {
            headers.remove(name);
        }
        for (name, value) in &endpoint.headers {
            headers.append(name.clone(), value.clone());
        }
        for value in headers.values_mut() {
            value.set_sensitive(true);
        }
        headers
    }
}

/// Validates accounts as a whole, the checks every source (the file, the management API, a
/// store) passes through before a change is applied: names, unique names, base URLs, headers
/// the gateway owns, timeouts. An error names the field, e.g.
/// `accounts[0].endpoints[1].base_url`, and never a header value.
pub fn validate(accounts: &[AccountSpec]) -> Result<(), FieldError> {
    let mut account_names = HashSet::with_capacity(accounts.len());
    for (i, account) in accounts.iter().enumerate() {
        let field = format!("accounts[{i}]");
        check_name(&account.name, &field)?;
        check_headers(&account.header_auth, &format!("{field}.header_auth"))?;
        let mut endpoint_names = HashSet::with_capacity(account.endpoints.len());
        for (j, ep) in account.endpoints.iter().enumerate() {
            let field = format!("{field}.endpoints[{j}]");
            check_name(&ep.name, &field)?;
            validate_pool(ep, &field)?;
            check_headers(&ep.headers, &format!("{field}.headers"))?;
            ep.timeouts.validate(&format!("{field}.timeouts"))?;
            if !endpoint_names.insert(ep.name.as_str()) {
                return Err(FieldError::new(
                    format!("{field}.name"),
                    format!(
                        "duplicate endpoint name \"{}\" in account \"{}\"",
                        ep.name, account.name
                    ),
                ));
            }
        }
        if !account_names.insert(account.name.as_str()) {
            return Err(FieldError::new(
                format!("{field}.name"),
                format!("duplicate account name \"{}\"", account.name),
            ));
        }
    }
    Ok(())
}

/// The endpoint's upstreams: one `base_url` or a list of targets, and the pool's policies.
fn validate_pool(ep: &EndpointSpec, field: &str) -> Result<(), FieldError> {
    if ep.targets.is_empty() && ep.base_url.is_empty() {
        return Err(FieldError::new(
            format!("{field}.base_url"),
            "is required: give base_url (one upstream) or targets (a pool)",
        ));
    } else if ep.targets.is_empty() {
        UpstreamBase::parse(&ep.base_url)
            .map_err(|m| FieldError::new(format!("{field}.base_url"), m))?;
    } else if !ep.base_url.is_empty() {
        return Err(FieldError::new(
            format!("{field}.base_url"),
            "give base_url (one upstream) or targets (a pool), not both",
        ));
    } else if ep.targets.len() > MAX_TARGETS {
        return Err(FieldError::new(
            format!("{field}.targets"),
            format!("at most {MAX_TARGETS} targets"),
        ));
    }
    for (k, target) in ep.targets.iter().enumerate() {
        let field = format!("{field}.targets[{k}]");
        target.validate(&field)?;
        check_headers(&target.headers, &format!("{field}.headers"))?;
    }
    if let Some(retry) = &ep.retry {
        retry.validate(&format!("{field}.retry"))?;
    }
    ep.eject.validate(&format!("{field}.eject"))?;
    if let Some(health) = &ep.health {
        health.validate(&format!("{field}.health"))?;
    }
    Ok(())
}

fn check_name(name: &str, field: &str) -> Result<(), FieldError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(FieldError::new(format!("{field}.name"), NAME_RULE))
    }
}

/// Headers a configuration may not inject: the proxy owns them.
fn forbidden_header(name: &HeaderName) -> bool {
    crate::hop::is_hop_by_hop(name)
        || name == header::HOST
        || name == header::CONTENT_LENGTH
        || name == header::ACCEPT_ENCODING
}

fn check_headers(headers: &HeaderMap, field: &str) -> Result<(), FieldError> {
    for name in headers.keys() {
        if forbidden_header(name) {
            return Err(FieldError::new(
                format!("{field}.{name}"),
                "this header is managed by the gateway and cannot be configured",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::time::Duration;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn endpoint_headers_override_account_headers_and_are_sensitive() {
        let account = AccountSpec {
            header_auth: headers(&[("authorization", "Bearer shared"), ("x-org", "acme")]),
            ..AccountSpec::new("acct")
        };
        let own = EndpointSpec {
            headers: headers(&[("authorization", "Bearer own")]),
            ..EndpointSpec::new("own", "https://example.com/v1")
        };
        let merged = account.headers_for(&own);
        assert_eq!(merged.get_all("authorization").iter().count(), 1);
        assert_eq!(merged["authorization"], "Bearer own");
        assert_eq!(merged["x-org"], "acme");
        assert!(merged.values().all(HeaderValue::is_sensitive));
        let inherits = account.headers_for(&EndpointSpec::new("i", "https://example.com/v1"));
        assert_eq!(inherits["authorization"], "Bearer shared");
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(Vec<AccountSpec>, &str)> = vec![
            (vec![AccountSpec::new("a/b")], "accounts[0].name"),
            (vec![AccountSpec::new("..")], "accounts[0].name"),
            (
                vec![AccountSpec::new("a"), AccountSpec::new("a")],
                "accounts[1].name",
            ),
            (
                vec![AccountSpec {
                    endpoints: vec![EndpointSpec::new("e", "https://x/v1/")],
                    ..AccountSpec::new("a")
                }],
                "accounts[0].endpoints[0].base_url",
            ),
            (
                vec![AccountSpec {
                    endpoints: vec![
                        EndpointSpec::new("e", "https://x/v1"),
                        EndpointSpec::new("e", "https://y/v1"),
                    ],
                    ..AccountSpec::new("a")
                }],
                "accounts[0].endpoints[1].name",
            ),
            (
                vec![AccountSpec {
                    header_auth: headers(&[("connection", "close")]),
                    ..AccountSpec::new("a")
                }],
                "accounts[0].header_auth.connection",
            ),
            (
                vec![AccountSpec {
                    endpoints: vec![EndpointSpec {
                        headers: headers(&[("host", "evil")]),
                        ..EndpointSpec::new("e", "https://x/v1")
                    }],
                    ..AccountSpec::new("a")
                }],
                "accounts[0].endpoints[0].headers.host",
            ),
            (
                vec![AccountSpec {
                    endpoints: vec![EndpointSpec {
                        timeouts: Timeouts {
                            idle: Some(Duration::ZERO),
                            ..Timeouts::default()
                        },
                        ..EndpointSpec::new("e", "https://x/v1")
                    }],
                    ..AccountSpec::new("a")
                }],
                "accounts[0].endpoints[0].timeouts.idle_ms",
            ),
        ];
        for (accounts, field) in cases {
            let err = validate(&accounts).unwrap_err();
            assert_eq!(err.field(), field, "{err}");
        }
    }

    #[test]
    fn versions_move_only_for_what_changed() {
        let current = vec![AccountSpec {
            endpoints: vec![
                EndpointSpec::new("a", "https://x/v1"),
                EndpointSpec::new("b", "https://x/v1"),
            ],
            ..AccountSpec::new("acct")
        }];
        let mut next = current.clone();
        bump_versions(&[], &mut next);
        assert_eq!(
            (
                next[0].version,
                next[0].endpoints[0].version,
                next[0].endpoints[1].version
            ),
            (1, 1, 1),
            "new records start at 1"
        );
        let current = next.clone();
        next[0].endpoints[1].base_url = "https://y/v1".into();
        next[0]
            .endpoints
            .push(EndpointSpec::new("c", "https://x/v1"));
        bump_versions(&current, &mut next);
        let versions: Vec<u64> = next[0].endpoints.iter().map(|e| e.version).collect();
        assert_eq!(versions, [1, 2, 1]);
        assert_eq!(
            next[0].version, 1,
            "the account's own fields did not change"
        );
        let current = next.clone();
        next[0].access.users.push(super::super::Subject::Everyone);
        bump_versions(&current, &mut next);
        assert_eq!(next[0].version, 2);
    }
}
