//! The gateway's TOML configuration: keys, accounts and endpoints, with secrets read from the
//! environment or from files.
//!
//! [`GatewayConfig::load`] reads a file, expands secrets, validates everything and builds the
//! [`HashedKeyStore`] and the [`Registry`] the layers run on. A configuration that loads is
//! complete: every URL parsed, every header checked, every TLS file read.
//!
//! # The file
//!
//! ```toml
//! path_prefix = "/proxy-api"          # optional
//!
//! [[keys]]                            # gateway API keys; clients only ever hold these
//! id = "alice-laptop"                 # a label for logs, never the secret
//! subject = "alice@example.com"
//! teams = ["research"]
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! # key = "${ALICE_GATEWAY_KEY}"      # or the key itself, hashed at load time
//!
//! [[accounts]]                        # a provider account
//! name = "coreweave-model"
//! endpoint_type = "none"
//! header_auth = { Authorization = "Bearer ${SHARED_KEY}" }   # endpoints inherit it
//! [accounts.access]
//! managers = ["team:platform"]
//! users = ["everyone"]
//! viewers = []
//!
//! [[accounts.endpoints]]              # an integration
//! name = "inference"
//! base_url = "https://api.inference.wandb.ai/v1"
//! headers = { Authorization = "Bearer ${WANDB_API_KEY}" }    # overrides header_auth
//! # access = { users = ["team:research"] }
//! # timeouts = { connect_ms = 10000, first_byte_ms = 600000, idle_ms = 300000 }
//! # tls = { ca_file = "ca.pem", client_cert_file = "c.pem", client_key_file = "k.pem" }
//!
//! [[accounts.endpoints]]              # a pool: several upstreams instead of one base_url
//! name = "pooled"
//! targets = [
//!   { base_url = "https://api.inference.wandb.ai/v1", weight = 3 },
//!   { base_url = "https://vllm-a.internal/v1", headers = { Authorization = "Bearer ${VLLM_KEY}" } },
//!   { base_url = "https://backup.example/v1", priority = 2 },
//! ]
//! retry = { attempts = 3, on_status = [429, 502, 503, 504], budget_percent = 20 }
//! # eject = { consecutive_failures = 5, base_ms = 10000, max_ms = 300000 }
//! # health = { path = "/models", interval_ms = 5000 }
//! ```
//!
//! A proxy URL is `{gateway}{path_prefix}/{account name}/{endpoint name}/{upstream path}`.
//!
//! # Reference
//!
//! Every table refuses fields it does not know, so a misspelt field is an error, not a silent
//! default.
//!
//! | field | type | default | meaning |
//! |---|---|---|---|
//! | `path_prefix` | string | `"/proxy-api"` | prefix of every proxy path: empty, or `/name[/name…]` with no trailing slash |
//! | `admins` | array of subjects | `[]` | who manages gateway keys and reads the audit log once a store is used: `"user:SUBJECT"`, `"team:NAME"` or `"everyone"` |
//! | `limits.max_request_body_bytes` | integer > 0 | 33554432 (32 MiB) | largest request body forwarded; larger is a 413 |
//! | `keys` | array of tables | `[]` | the gateway API keys |
//! | `keys[].id` | string | required | a unique label for logs; never the secret |
//! | `keys[].subject` | string | required | who holds the key, e.g. an email; no spaces |
//! | `keys[].teams` | array of strings | `[]` | the holder's teams, for `team:NAME` grants; no spaces |
//! | `keys[].sha256` | string, secret | — | the key's SHA-256 digest, 64 hex digits |
//! | `keys[].key` | string, secret | — | the key itself, hashed at load time (set exactly one of `sha256` and `key`) |
//! | `accounts` | array of tables | `[]` | the provider accounts |
//! | `accounts[].name` | string | required | the account's path segment: 1 to 128 of `A-Z a-z 0-9 - . _ ~`, unique |
//! | `accounts[].endpoint_type` | string | `"none"` | the kind of provider; only `"none"` (a plain HTTP upstream) is known |
//! | `accounts[].header_auth` | table of strings, secret | `{}` | headers injected into every request to the account's endpoints |
//! | `accounts[].access` | table | no grants | who may manage, use and view the account (see below) |
//! | `accounts[].endpoints` | array of tables | `[]` | the account's endpoints |
//! | `accounts[].endpoints[].name` | string | required | the endpoint's path segment, same rules as an account name, unique in its account |
//! | `accounts[].endpoints[].base_url` | string | required unless `targets` | `http(s)://host[:port][/path]`: no trailing slash, user info, query or fragment |
//! | `accounts[].endpoints[].targets` | array of tables | none | a pool instead of `base_url`, at most 64 targets (see [`forward`](crate::forward)) |
//! | `accounts[].endpoints[].targets[].base_url` | string | required | as `base_url` |
//! | `accounts[].endpoints[].targets[].weight` | integer 1 to 10000 | 1 | share of traffic among the live targets of its priority |
//! | `accounts[].endpoints[].targets[].priority` | integer 1 to 100 | 1 | 1 first; a higher number only when every target of the lower ones is out |
//! | `accounts[].endpoints[].targets[].headers` | table of strings, secret | `{}` | set over the endpoint's headers for this target; no templates |
//! | `accounts[].endpoints[].targets[].timeouts`, `.tls` | tables | the endpoint's | as the endpoint's |
//! | `accounts[].endpoints[].retry.attempts` | integer 1 to 10 | 1 (one target), 2 (a pool), 3 when `retry` is set | attempts in all |
//! | `accounts[].endpoints[].retry.on_status` | array of 400 to 599 | `[429, 502, 503, 504]` | statuses retried |
//! | `accounts[].endpoints[].retry.budget_percent` | integer 0 to 1000 | 20 | retries allowed per 100 requests of the last 10 s |
//! | `accounts[].endpoints[].retry.min_per_second` | integer | 10 | retries allowed per second whatever the traffic |
//! | `accounts[].endpoints[].retry.max_body_bytes` | integer | 4194304 | largest request body held for a replay |
//! | `accounts[].endpoints[].eject.consecutive_failures` | integer > 0 | 5 | failures in a row that eject a target |
//! | `accounts[].endpoints[].eject.error_percent`, `window` | 0 to 100, 2 to 64 | 50, 20 | or this share of failures among its last `window` attempts (0: off) |
//! | `accounts[].endpoints[].eject.base_ms`, `max_ms` | integers > 0 | 10000, 300000 | the first cool-down, doubling up to `max_ms` |
//! | `accounts[].endpoints[].health.path` | string | none | probe of an ejected target: `GET {base_url}{path}` |
//! | `accounts[].endpoints[].health.interval_ms` | integer >= 100 | 5000 | time between two probes |
//! | `accounts[].endpoints[].headers` | table of strings, secret | `{}` | headers injected into the endpoint's requests; a name also in `header_auth` replaces it |
//! | `accounts[].endpoints[].access` | table | the account's | grants that replace the account's for this endpoint |
//! | `accounts[].endpoints[].timeouts.connect_ms` | integer > 0 | forwarder default | time to connect (TCP and TLS), in milliseconds |
//! | `accounts[].endpoints[].timeouts.first_byte_ms` | integer > 0 | forwarder default | time from sending the request to the response head |
//! | `accounts[].endpoints[].timeouts.idle_ms` | integer > 0 | forwarder default | longest silence between two body frames |
//! | `accounts[].endpoints[].tls.ca_file` | path | none | PEM CA certificates trusted besides the system roots |
//! | `accounts[].endpoints[].tls.client_cert_file` | path | none | PEM client certificate chain (needs `client_key_file`) |
//! | `accounts[].endpoints[].tls.client_key_file` | path | none | PEM private key of the client certificate (needs `client_cert_file`) |
//!
//! An `access` table has three optional arrays of subjects, each `[]` by default: `managers`
//! (edit, update, delete, use and view), `users` (use and view) and `viewers` (view). A
//! subject is `"everyone"`, `"team:NAME"` or `"user:SUBJECT"`. See [`crate::access`].
//!
//! Header names are case-insensitive, so one table may not hold two names that differ only
//! by case. Headers the gateway manages itself (`Host`, `Content-Length`, `Accept-Encoding`
//! and the hop-by-hop headers such as `Connection`) cannot be configured. Injected values are
//! marked sensitive, so they never appear in `Debug` output or traces.
//!
//! Relative TLS paths are resolved against the configuration file's directory (the
//! [`SecretSource`]'s base directory).
//!
//! # Secrets
//!
//! The fields marked *secret* above (`keys[].key`, `keys[].sha256` and every header value)
//! may refer to secrets instead of holding them:
//!
//! - `${VAR}` is replaced by the environment variable `VAR` (letters, digits and `_`, not
//!   starting with a digit);
//! - `${file:PATH}` is replaced by the contents of the file `PATH`, relative to the
//!   configuration file's directory, with one trailing newline (`\n` or `\r\n`) removed.
//!
//! A `$` not followed by `{` is kept as it is, and expanded text is not expanded again. A
//! missing variable or unreadable file fails the load. Other fields are never expanded.
//!
//! # Errors
//!
//! A [`ConfigError`] names the field and the problem, e.g.
//! `accounts[0].endpoints[1].base_url: must not end with a slash`. It never holds a secret:
//! not a key, a digest or a header value, whether written in the file or read from the
//! environment. TOML syntax and type errors give the position as line and column and replace
//! every quoted value in the message with `"<redacted>"`.
//!
//! # Example
//!
//! ```
//! use tower_gateway::config::{GatewayConfig, SecretSource};
//!
//! let toml = r#"
//!     [[keys]]
//!     id = "alice-laptop"
//!     subject = "alice@example.com"
//!     key = "${ALICE_GATEWAY_KEY}"
//!
//!     [[accounts]]
//!     name = "coreweave-model"
//!     access = { users = ["everyone"] }
//!
//!     [[accounts.endpoints]]
//!     name = "inference"
//!     base_url = "https://api.inference.wandb.ai/v1"
//!     headers = { Authorization = "Bearer ${WANDB_API_KEY}" }
//! "#;
//! let secrets = SecretSource::from_vars(
//!     [("ALICE_GATEWAY_KEY", "gw-alice"), ("WANDB_API_KEY", "wandb-secret")],
//!     ".",
//! );
//! let config = GatewayConfig::from_toml(toml, &secrets).unwrap();
//!
//! assert_eq!(config.path_prefix, "/proxy-api");
//! assert_eq!(config.keys.len(), 1);
//! let ep = config.registry.endpoint("coreweave-model", "inference").unwrap();
//! assert_eq!(ep.headers()["authorization"], "Bearer wandb-secret");
//!
//! // A missing variable names the field, never a value.
//! let err = GatewayConfig::from_toml(toml, &SecretSource::from_vars([("ALICE_GATEWAY_KEY", "gw-alice")], "."))
//!     .unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "accounts[0].endpoints[0].headers.Authorization: environment variable WANDB_API_KEY is not set",
//! );
//! ```

mod file;
mod secrets;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub use self::secrets::{Secret, SecretSource};
use crate::model::{
    AccountSpec, EndpointSpec, FieldError, Grants, HashedKeyStore, KeyDigest, KeyRecord,
    LimitBackend, LimitScope, OnBackendError, RateLimitRule, RateLimits, Subject, TargetSpec,
    is_valid_prefix, validate_keys,
};
use crate::registry::Registry;
use crate::tls::TlsSettings;

/// A loaded, validated gateway configuration: the path prefix, key store and registry the
/// gateway builder assembles the stack from.
///
/// See the [module docs](self) for the file format.
#[derive(Debug)]
pub struct GatewayConfig {
    /// The prefix of every proxy path, `/proxy-api` by default; may be empty.
    pub path_prefix: String,
    /// The gateway API keys, as digests.
    pub keys: HashedKeyStore,
    /// The same keys as records, to seed a store with.
    pub key_records: Vec<KeyRecord>,
    /// `admins`: the subjects who manage gateway keys and read the audit log.
    pub admins: Vec<Subject>,
    /// `[rate_limits]`: request rates, token budgets and concurrent streams.
    pub rate_limits: RateLimits,
    /// The accounts and endpoints.
    pub registry: Registry,
    /// `limits.max_request_body_bytes`: the largest request body forwarded, if set (the
    /// forwarder's default, 32 MiB, otherwise).
    pub max_request_body: Option<u64>,
}

impl GatewayConfig {
    /// Reads and validates the configuration file at `path`.
    ///
    /// `${VAR}` reads the process environment and `${file:PATH}` a file relative to the
    /// configuration file's directory, as do relative TLS paths.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(path.display().to_string(), format!("cannot read: {e}"))
        })?;
        let base_dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Self::from_toml(&text, &SecretSource::process_env(base_dir))
    }

    /// Parses and validates TOML text, taking secrets (and the base directory for relative
    /// paths) from `secrets`.
    pub fn from_toml(text: &str, secrets: &SecretSource) -> Result<Self, ConfigError> {
        let raw = file::parse(text)?;
        build(raw, secrets)
    }
}

/// A configuration that failed to load: the field (`accounts[0].endpoints[1].base_url`, `line N`
/// for a TOML syntax error, or the file's path when it cannot be read) and the problem. The
/// same type as a registry's validation error.
///
/// Neither its `Display` nor its `Debug` output ever contains a secret.
pub type ConfigError = FieldError;

fn build(raw: file::RawConfig, secrets: &SecretSource) -> Result<GatewayConfig, FieldError> {
    if !is_valid_prefix(&raw.path_prefix) {
        return Err(FieldError::new(
            "path_prefix",
            "must be empty or \"/\" followed by names (A-Z a-z 0-9 - . _ ~) separated by \"/\", \
             with no trailing slash",
        ));
    }
    let key_records = build_keys(raw.keys, secrets)?;
    let keys = HashedKeyStore::from_records(&key_records)
        .map_err(|e| FieldError::new("keys", e.to_string()))?;
    let accounts = raw
        .accounts
        .into_iter()
        .enumerate()
        .map(|(i, account)| build_account(i, account, secrets))
        .collect::<Result<Vec<_>, _>>()?;
    let registry = Registry::from_accounts(accounts)?;
    if raw.limits.max_request_body_bytes == Some(0) {
        return Err(FieldError::new(
            "limits.max_request_body_bytes",
            "must be greater than zero",
        ));
    }
    let admins = Grants::parse(&raw.admins, &[], &[], "admins")
        .map_err(|e| FieldError::new(e.field().replace(".managers", ""), e.message()))?
        .managers;
    let rate_limits = build_rate_limits(raw.rate_limits, secrets)?;
    Ok(GatewayConfig {
        rate_limits,
        path_prefix: raw.path_prefix,
        keys,
        key_records,
        admins,
        registry,
        max_request_body: raw.limits.max_request_body_bytes,
    })
}

fn build_keys(
    raw: Vec<file::RawKey>,
    secrets: &SecretSource,
) -> Result<Vec<KeyRecord>, FieldError> {
    let mut records = Vec::with_capacity(raw.len());
    for (i, key) in raw.into_iter().enumerate() {
        let field = format!("keys[{i}]");
        let digest = match (&key.sha256, &key.key) {
            (Some(hex), None) => {
                let field = format!("{field}.sha256");
                let hex = secrets.expand(&field, hex)?;
                KeyDigest::from_hex(hex.expose())
                    .map_err(|e| FieldError::new(field, e.to_string()))?
            }
            (None, Some(text)) => {
                let field = format!("{field}.key");
                let secret = secrets.expand(&field, text)?;
                if secret.expose().is_empty() {
                    return Err(FieldError::new(field, "must not be empty"));
                }
                KeyDigest::of(secret.expose())
            }
            _ => {
                return Err(FieldError::new(field, "set exactly one of sha256 or key"));
            }
        };
        records.push(KeyRecord::new(key.id, digest, key.subject, key.teams));
    }
    validate_keys(&records)?;
    Ok(records)
}

fn build_rate_limits(
    raw: file::RawRateLimits,
    secrets: &SecretSource,
) -> Result<RateLimits, FieldError> {
    let backend = match raw.backend {
        None => LimitBackend::Memory,
        // A Redis URL may hold a password: it may come from `${VAR}`, and is never shown.
        Some(text) => match secrets.expand("rate_limits.backend", &text)?.expose() {
            "memory" => LimitBackend::Memory,
            url => LimitBackend::Redis(url.to_owned()),
        },
    };
    let mut rules = Vec::with_capacity(raw.rules.len());
    for (i, rule) in raw.rules.into_iter().enumerate() {
        let field = format!("rate_limits.rules[{i}]");
        let scope: LimitScope = rule
            .scope
            .parse()
            .map_err(|e: String| FieldError::new(format!("{field}.scope"), e))?;
        let endpoint = rule
            .endpoint
            .map(|e| {
                RateLimits::parse_endpoint(&e).ok_or_else(|| {
                    FieldError::new(
                        format!("{field}.endpoint"),
                        "must be ACCOUNT/ENDPOINT, two valid names",
                    )
                })
            })
            .transpose()?;
        rules.push(RateLimitRule {
            endpoint,
            requests_per_minute: rule.requests_per_minute,
            tokens_per_minute: rule.tokens_per_minute,
            tokens_per_day: rule.tokens_per_day,
            tokens_per_month: rule.tokens_per_month,
            concurrent_streams: rule.concurrent_streams,
            ..RateLimitRule::new(scope)
        });
    }
    let limits = RateLimits {
        backend,
        on_backend_error: match raw.on_backend_error {
            file::RawOnError::Open => OnBackendError::Open,
            file::RawOnError::Closed => OnBackendError::Closed,
        },
        key_prefix: raw
            .key_prefix
            .unwrap_or_else(|| RateLimits::default().key_prefix),
        reserve_tokens: raw
            .reserve_tokens
            .unwrap_or(RateLimits::default().reserve_tokens),
        rules,
    };
    limits.validate()?;
    Ok(limits)
}

fn build_headers(
    raw: &BTreeMap<String, String>,
    field: &str,
    secrets: &SecretSource,
) -> Result<HeaderMap, FieldError> {
    let mut headers = HeaderMap::with_capacity(raw.len());
    for (name, value) in raw {
        let field = format!("{field}.{name}");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| FieldError::new(&field, "is not a valid header name"))?;
        if headers.contains_key(&header) {
            return Err(FieldError::new(
                field,
                "is set twice (header names are case-insensitive)",
            ));
        }
        let value = secrets.expand(&field, value)?;
        // The value is never quoted: it is a secret.
        let value = HeaderValue::from_str(value.expose()).map_err(|_| {
            FieldError::new(
                &field,
                "the value is not a valid header value (it holds a line break or another \
                 control character)",
            )
        })?;
        headers.insert(header, value);
    }
    Ok(headers)
}

fn build_account(
    i: usize,
    raw: file::RawAccount,
    secrets: &SecretSource,
) -> Result<AccountSpec, FieldError> {
    let field = format!("accounts[{i}]");
    let header_auth = build_headers(&raw.header_auth, &format!("{field}.header_auth"), secrets)?;
    let access = raw.access.to_grants(&format!("{field}.access"))?;
    let endpoints = raw
        .endpoints
        .into_iter()
        .enumerate()
        .map(|(j, ep)| build_endpoint(&format!("{field}.endpoints[{j}]"), ep, secrets))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AccountSpec {
        header_auth,
        access,
        endpoints,
        ..AccountSpec::new(raw.name)
    })
}

fn build_endpoint(
    field: &str,
    raw: file::RawEndpoint,
    secrets: &SecretSource,
) -> Result<EndpointSpec, FieldError> {
    let headers = build_headers(&raw.headers, &format!("{field}.headers"), secrets)?;
    let access = raw
        .access
        .map(|g| g.to_grants(&format!("{field}.access")))
        .transpose()?;
    let timeouts = raw.timeouts.to_timeouts();
    let tls = build_tls(raw.tls, field, secrets)?;
    let targets = raw
        .targets
        .into_iter()
        .enumerate()
        .map(|(k, t)| {
            let field = format!("{field}.targets[{k}]");
            Ok(TargetSpec {
                weight: t.weight.unwrap_or(1),
                priority: t.priority.unwrap_or(1),
                headers: build_headers(&t.headers, &format!("{field}.headers"), secrets)?,
                timeouts: t.timeouts.to_timeouts(),
                tls: build_tls(t.tls, &field, secrets)?,
                ..TargetSpec::new(t.base_url)
            })
        })
        .collect::<Result<Vec<_>, FieldError>>()?;
    Ok(EndpointSpec {
        headers,
        access,
        timeouts,
        tls,
        targets,
        retry: raw.retry.as_ref().map(file::RawRetry::to_policy),
        eject: raw.eject.to_policy(),
        health: raw.health.as_ref().map(file::RawHealth::to_check),
        ..EndpointSpec::new(raw.name, raw.base_url)
    })
}

fn build_tls(
    raw: Option<file::RawTls>,
    field: &str,
    secrets: &SecretSource,
) -> Result<Option<Arc<TlsSettings>>, FieldError> {
    raw.map(|tls| {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| secrets.base_dir().join(p));
        TlsSettings::from_files(
            path(&tls.ca_file).as_deref(),
            path(&tls.client_cert_file).as_deref(),
            path(&tls.client_key_file).as_deref(),
        )
        .map(Arc::new)
        .map_err(|e| FieldError::new(format!("{field}.tls.{}", e.field), e.message))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> Result<GatewayConfig, FieldError> {
        GatewayConfig::from_toml(toml, &SecretSource::from_vars([("K", "gw-k")], "."))
    }

    #[test]
    fn admins_and_key_records() {
        let config = load(
            r#"
            admins = ["user:ops@example.com", "team:platform"]
            [[keys]]
            id = "ops"
            subject = "ops@example.com"
            teams = ["platform"]
            key = "${K}"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.admins,
            [
                Subject::User("ops@example.com".into()),
                Subject::Team("platform".into())
            ]
        );
        assert_eq!(config.key_records.len(), 1);
        assert_eq!(config.key_records[0].digest, KeyDigest::of("gw-k"));
        assert!(config.keys.get(&KeyDigest::of("gw-k")).is_some());
        let err = load(r#"admins = ["team:platform", "ops"]"#).unwrap_err();
        assert_eq!(err.field(), "admins[1]", "{err}");
    }

    #[test]
    fn rate_limits_parse_and_name_the_field() {
        let table = |rules: &str| {
            load(&format!(
                r#"
                [rate_limits]
                backend = "${{K}}"
                on_backend_error = "closed"
                key_prefix = "gw-test:"
                {rules}
                "#
            ))
        };
        // `K` is `gw-k`: not a Redis URL, and never shown.
        let err = table("").unwrap_err();
        assert_eq!(err.field(), "rate_limits.backend");
        let redis = load("[rate_limits]\nbackend = \"redis://:pw-9@127.0.0.1:6379\"").unwrap();
        assert_eq!(
            redis.rate_limits.backend,
            LimitBackend::Redis("redis://:pw-9@127.0.0.1:6379".into())
        );
        assert!(!format!("{redis:?}").contains("pw-9"));
        let bad = load("[rate_limits]\nbackend = \"http://:pw-9@127.0.0.1\"").unwrap_err();
        assert_eq!(bad.field(), "rate_limits.backend");
        assert!(!bad.to_string().contains("pw-9"), "{bad}");
        assert!(!err.to_string().contains("gw-k"), "{err}");
        let ok =
            load("[rate_limits]\nbackend = \"memory\"\non_backend_error = \"closed\"").unwrap();
        assert_eq!(ok.rate_limits.backend, LimitBackend::Memory);
        assert_eq!(ok.rate_limits.on_backend_error, OnBackendError::Closed);
        assert_eq!(load("").unwrap().rate_limits, RateLimits::default());
        let enforced = load(
            "[[rate_limits.rules]]\nscope = \"team:research\"\nendpoint = \"a/b\"\nrequests_per_minute = 600\nconcurrent_streams = 8",
        )
        .unwrap();
        assert_eq!(enforced.rate_limits.rules[0].requests_per_minute, Some(600));
        let budget = load(
            "[rate_limits]\nreserve_tokens = 64\n[[rate_limits.rules]]\nscope = \"team:research\"\ntokens_per_minute = 200_000\ntokens_per_day = 2_000_000\ntokens_per_month = 40_000_000",
        )
        .unwrap();
        assert_eq!(budget.rate_limits.reserve_tokens, 64);
        assert_eq!(
            budget.rate_limits.rules[0].tokens_per_month,
            Some(40_000_000)
        );
        let reserve = load("[rate_limits]\nreserve_tokens = 5_000_000_000").unwrap_err();
        assert_eq!(reserve.field(), "rate_limits.reserve_tokens");
        let rules = |rule: &str| load(&format!("[[rate_limits.rules]]\n{rule}"));
        for (rule, field) in [
            (
                "scope = \"group:x\"\nrequests_per_minute = 1",
                "rate_limits.rules[0].scope",
            ),
            (
                "scope = \"everyone\"\nendpoint = \"a\"\nrequests_per_minute = 1",
                "rate_limits.rules[0].endpoint",
            ),
            ("scope = \"everyone\"", "rate_limits.rules[0]"),
            (
                "scope = \"everyone\"\ntokens_per_day = 0",
                "rate_limits.rules[0].tokens_per_day",
            ),
            (
                "scope = \"everyone\"\nrequests_per_hour = 1",
                "rate_limits.rules[0].requests_per_hour",
            ),
        ] {
            let err = rules(rule).unwrap_err();
            assert_eq!(err.field(), field, "{rule}: {err}");
        }
    }
}
