//! Rate limits and token budgets as a user writes them (`[rate_limits]` in the file), and their
//! validation.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::{FieldError, Principal, is_valid_name};

/// Who a limit applies to. Each matching caller is counted in the scope's bucket:
/// `team:NAME` is one bucket for the whole team, `user:SUBJECT` one for that subject,
/// `key:ID` one for that key, `everyone` one bucket *per key*, and `all` one bucket shared by
/// every caller (with an endpoint: that endpoint's total).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LimitScope {
    /// Every caller, each key counted on its own.
    Everyone,
    /// Every caller, counted together.
    All,
    /// Every key of the team, counted together.
    Team(Arc<str>),
    /// Every key of the subject, counted together.
    User(Arc<str>),
    /// One key, by its id.
    Key(Arc<str>),
}

impl FromStr for LimitScope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let named = |rest: &str| {
            if rest.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Err("must be followed by a name without spaces or control characters".to_owned())
            } else {
                Ok(Arc::<str>::from(rest))
            }
        };
        if s == "everyone" {
            Ok(Self::Everyone)
        } else if s == "all" {
            Ok(Self::All)
        } else if let Some(rest) = s.strip_prefix("team:") {
            named(rest).map(Self::Team)
        } else if let Some(rest) = s.strip_prefix("user:") {
            named(rest).map(Self::User)
        } else if let Some(rest) = s.strip_prefix("key:") {
            named(rest).map(Self::Key)
        } else {
            Err(
                "a scope is \"everyone\" (each key), \"all\" (every caller together), \
                 \"team:NAME\", \"user:SUBJECT\" or \"key:ID\""
                    .to_owned(),
            )
        }
    }
}

impl fmt::Display for LimitScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Everyone => f.write_str("everyone"),
            Self::All => f.write_str("all"),
            Self::Team(t) => write!(f, "team:{t}"),
            Self::User(u) => write!(f, "user:{u}"),
            Self::Key(k) => write!(f, "key:{k}"),
        }
    }
}

impl LimitScope {
    /// The name of the bucket `principal` is counted in under this scope, without allocating
    /// (the key id, team or subject, shared), or `None` if the scope does not cover it. Only
    /// unique within one scope: the kind of scope is not part of it.
    pub fn bucket_id(&self, principal: &Principal) -> Option<Arc<str>> {
        match self {
            Self::Everyone => Some(principal.key_id.clone()),
            Self::All => self.own_bucket(),
            Self::Team(team) => principal.in_team(team).then(|| team.clone()),
            Self::User(subject) => (*principal.subject == **subject).then(|| subject.clone()),
            Self::Key(id) => (*principal.key_id == **id).then(|| id.clone()),
        }
    }

    /// The one bucket of a scope that has one (every scope but `everyone`, which has one per
    /// key): the team, subject or key id, or `*` for `all`.
    pub fn own_bucket(&self) -> Option<Arc<str>> {
        match self {
            Self::Everyone => None,
            Self::All => {
                // Shared, so that the hot path does not allocate it per request.
                static ALL: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
                Some(ALL.get_or_init(|| Arc::from("*")).clone())
            }
            Self::Team(name) | Self::User(name) | Self::Key(name) => Some(name.clone()),
        }
    }

    /// The bucket `principal` is counted in under this scope, or `None` if the scope does not
    /// cover it: `key:ID` for `everyone` and `key:` scopes, the team or subject otherwise.
    pub fn bucket(&self, principal: &Principal) -> Option<String> {
        match self {
            Self::Everyone => Some(format!("key:{}", principal.key_id)),
            Self::All => Some("all callers".to_owned()),
            Self::Team(team) => principal.in_team(team).then(|| format!("team:{team}")),
            Self::User(subject) => {
                (*principal.subject == **subject).then(|| format!("user:{subject}"))
            }
            Self::Key(id) => (*principal.key_id == **id).then(|| format!("key:{id}")),
        }
    }
}

/// One limit rule: a scope, optionally one endpoint, and any of the limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitRule {
    /// Who it applies to.
    pub scope: LimitScope,
    /// `(account, endpoint)` when it applies to one endpoint only.
    pub endpoint: Option<(String, String)>,
    /// Requests per minute, admitted smoothly (not a fixed window).
    pub requests_per_minute: Option<u32>,
    /// Prompt and completion tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Tokens per day (UTC).
    pub tokens_per_day: Option<u64>,
    /// Tokens per month (UTC).
    pub tokens_per_month: Option<u64>,
    /// Responses streaming at once.
    pub concurrent_streams: Option<u32>,
}

impl RateLimitRule {
    /// A rule for `scope` with no limit yet.
    pub fn new(scope: LimitScope) -> Self {
        Self {
            scope,
            endpoint: None,
            requests_per_minute: None,
            tokens_per_minute: None,
            tokens_per_day: None,
            tokens_per_month: None,
            concurrent_streams: None,
        }
    }

    /// Whether the rule limits tokens per minute, day or month.
    pub fn limits_tokens(&self) -> bool {
        self.tokens_per_minute.is_some()
            || self.tokens_per_day.is_some()
            || self.tokens_per_month.is_some()
    }

    /// Whether the rule covers a request by `principal` to `account/endpoint`: the bucket's
    /// name within this rule ([`LimitScope::bucket_id`]), without allocating.
    pub fn covers(&self, principal: &Principal, account: &str, endpoint: &str) -> Option<Arc<str>> {
        match &self.endpoint {
            Some((a, e)) if a != account || e != endpoint => None,
            _ => self.scope.bucket_id(principal),
        }
    }

    /// Whether the rule covers a request by `principal` to `account/endpoint`, and in which
    /// bucket it is counted (the endpoint's own when the rule names one), as text for messages.
    pub fn bucket(&self, principal: &Principal, account: &str, endpoint: &str) -> Option<String> {
        let who = self.scope.bucket(principal)?;
        match &self.endpoint {
            None => Some(who),
            Some((a, e)) if a == account && e == endpoint => Some(format!("{who}@{a}/{e}")),
            Some(_) => None,
        }
    }
}

/// Checks rules; an error names the field under `prefix` (`rate_limits.rules` in the file,
/// `rules` in the management API), e.g. `rate_limits.rules[2].endpoint`.
pub fn validate_rules(rules: &[RateLimitRule], prefix: &str) -> Result<(), FieldError> {
    for (i, rule) in rules.iter().enumerate() {
        let field = format!("{prefix}[{i}]");
        if let Some((account, endpoint)) = &rule.endpoint
            && !(is_valid_name(account) && is_valid_name(endpoint))
        {
            return Err(FieldError::new(
                format!("{field}.endpoint"),
                "must be ACCOUNT/ENDPOINT, two valid names",
            ));
        }
        if let Some(j) = rules[..i]
            .iter()
            .position(|r| r.scope == rule.scope && r.endpoint == rule.endpoint)
        {
            return Err(FieldError::new(
                format!("{field}.scope"),
                format!(
                    "repeats the scope and endpoint of {prefix}[{j}]; put both limits in one \
                     rule"
                ),
            ));
        }
        let limits = [
            (
                "requests_per_minute",
                rule.requests_per_minute.map(u64::from),
            ),
            ("tokens_per_minute", rule.tokens_per_minute),
            ("tokens_per_day", rule.tokens_per_day),
            ("tokens_per_month", rule.tokens_per_month),
            ("concurrent_streams", rule.concurrent_streams.map(u64::from)),
        ];
        if limits.iter().all(|(_, v)| v.is_none()) {
            return Err(FieldError::new(
                field,
                "sets no limit: give at least one of requests_per_minute, tokens_per_minute, \
                 tokens_per_day, tokens_per_month, concurrent_streams",
            ));
        }
        for (name, value) in limits {
            if value == Some(0) {
                return Err(FieldError::new(
                    format!("{field}.{name}"),
                    "must be greater than zero (leave it out for no limit)",
                ));
            }
        }
    }
    Ok(())
}

/// The rate-limit rules as shared state (the store, the management API), with their version:
/// a change through any replica reaches every other one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitRules {
    /// The rules; every matching one applies.
    pub rules: Vec<RateLimitRule>,
    /// Bumped by every change; the `ETag` of `/manage/rate-limits`.
    pub version: u64,
}

impl LimitRules {
    /// Rules at version 0.
    pub fn new(rules: Vec<RateLimitRule>) -> Self {
        Self { rules, version: 0 }
    }
}

/// Bumps the version of `next` if its rules differ from `current`'s.
pub fn bump_rules(current: Option<&LimitRules>, next: Option<&mut LimitRules>) {
    if let Some(next) = next {
        let before = current.map_or(0, |c| c.version);
        if current.is_none_or(|c| c.rules != next.rules) {
            next.version = before + 1;
        } else {
            next.version = before;
        }
    }
}

impl RateLimitRule {
    /// The rule as JSON, in the shape of the file's `[[rate_limits.rules]]` (what the store
    /// keeps and the management API answers).
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        map.insert("scope".into(), self.scope.to_string().into());
        if let Some((a, e)) = &self.endpoint {
            map.insert("endpoint".into(), format!("{a}/{e}").into());
        }
        let limits = [
            (
                "requests_per_minute",
                self.requests_per_minute.map(u64::from),
            ),
            ("tokens_per_minute", self.tokens_per_minute),
            ("tokens_per_day", self.tokens_per_day),
            ("tokens_per_month", self.tokens_per_month),
            ("concurrent_streams", self.concurrent_streams.map(u64::from)),
        ];
        for (name, value) in limits {
            if let Some(v) = value {
                map.insert(name.into(), v.into());
            }
        }
        serde_json::Value::Object(map)
    }

    /// A rule from its JSON (see [`to_json`](Self::to_json)); an error names the field under
    /// `field`, e.g. `rules[1].requests_per_minute`. Checked further by [`validate_rules`].
    pub fn from_json(value: &serde_json::Value, field: &str) -> Result<Self, FieldError> {
        let map = value
            .as_object()
            .ok_or_else(|| FieldError::new(field, "must be an object"))?;
        const KNOWN: [&str; 7] = [
            "scope",
            "endpoint",
            "requests_per_minute",
            "tokens_per_minute",
            "tokens_per_day",
            "tokens_per_month",
            "concurrent_streams",
        ];
        if let Some(unknown) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(FieldError::new(
                format!("{field}.{unknown}"),
                format!(
                    "is not a field of a rule; the fields are {}",
                    KNOWN.join(", ")
                ),
            ));
        }
        let scope = map
            .get("scope")
            .and_then(|v| v.as_str())
            .ok_or_else(|| FieldError::new(format!("{field}.scope"), "is required, a string"))?
            .parse()
            .map_err(|e: String| FieldError::new(format!("{field}.scope"), e))?;
        let endpoint =
            match map.get("endpoint") {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(v.as_str().and_then(RateLimits::parse_endpoint).ok_or_else(
                    || {
                        FieldError::new(
                            format!("{field}.endpoint"),
                            "must be ACCOUNT/ENDPOINT, two valid names",
                        )
                    },
                )?),
            };
        let number = |name: &str| -> Result<Option<u64>, FieldError> {
            match map.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    FieldError::new(format!("{field}.{name}"), "must be a whole number")
                }),
            }
        };
        let small = |name: &str| -> Result<Option<u32>, FieldError> {
            number(name)?
                .map(|n| {
                    u32::try_from(n).map_err(|_| {
                        FieldError::new(format!("{field}.{name}"), "must be at most 4294967295")
                    })
                })
                .transpose()
        };
        Ok(Self {
            endpoint,
            requests_per_minute: small("requests_per_minute")?,
            tokens_per_minute: number("tokens_per_minute")?,
            tokens_per_day: number("tokens_per_day")?,
            tokens_per_month: number("tokens_per_month")?,
            concurrent_streams: small("concurrent_streams")?,
            ..Self::new(scope)
        })
    }
}

/// One limit's current usage, as the rate limiter reads it without charging.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitUsage {
    /// The rule's index in the rules.
    pub rule: usize,
    /// The rule's scope, with `@ACCOUNT/ENDPOINT` if it names one.
    pub scope: String,
    /// The limit: `requests_per_minute`, `tokens_per_minute`, `tokens_per_day`,
    /// `tokens_per_month` or `concurrent_streams`.
    pub limit: &'static str,
    /// Its value.
    pub value: u64,
    /// What is left of it now.
    pub remaining: u64,
    /// Until it is whole again (a budget: until its window ends).
    pub reset: std::time::Duration,
}

impl LimitUsage {
    /// A usage record.
    pub fn new(
        rule: usize,
        scope: String,
        limit: &'static str,
        value: u64,
        remaining: u64,
        reset: std::time::Duration,
    ) -> Self {
        Self {
            rule,
            scope,
            limit,
            value,
            remaining,
            reset,
        }
    }
}

/// The future of [`LimitUsageSource::usage`].
pub type UsageFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<LimitUsage>, String>> + Send + 'a>,
>;

/// Where the management API reads a scope's current usage: the gateway's rate limiter.
pub trait LimitUsageSource: Send + Sync + 'static {
    /// The usage of every limit of `scope` (`team:NAME`, `user:SUBJECT`, `key:ID`), or why
    /// the counters could not be read.
    fn usage<'a>(&'a self, scope: &'a str) -> UsageFuture<'a>;
}

/// Where the counters live.
#[derive(Clone, PartialEq, Eq)]
pub enum LimitBackend {
    /// This process's memory: limits hold for one replica.
    Memory,
    /// A Redis server shared by every replica (`redis://` or `rediss://`).
    Redis(String),
}

impl fmt::Debug for LimitBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("Memory"),
            // The URL may hold a password.
            Self::Redis(_) => f.write_str("Redis(<redacted>)"),
        }
    }
}

/// What a request meets while the backend cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnBackendError {
    /// Serve it, log it and count it locally (the default).
    #[default]
    Open,
    /// Refuse it with 503.
    Closed,
}

/// The rate limits of a gateway: where they are counted, what happens when that place cannot
/// be reached, and the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// Where the counters live.
    pub backend: LimitBackend,
    /// What happens while the backend cannot be reached.
    pub on_backend_error: OnBackendError,
    /// The prefix of every counter's key in a shared backend.
    pub key_prefix: String,
    /// The tokens a request under a token limit reserves when it starts, before its real
    /// count is known; settled to the count the usage tap reads when the response ends (a
    /// response without a count, e.g. a client gone mid-stream, stays charged the
    /// reservation). Many concurrent requests overshoot a budget by at most what they
    /// produce beyond their reservations.
    pub reserve_tokens: u64,
    /// The rules; every matching one applies, and the strictest refuses.
    pub rules: Vec<RateLimitRule>,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            backend: LimitBackend::Memory,
            on_backend_error: OnBackendError::Open,
            key_prefix: "gw:".to_owned(),
            reserve_tokens: 1000,
            rules: Vec::new(),
        }
    }
}

impl RateLimits {
    /// Checks the limits; an error names the field, e.g. `rate_limits.rules[2].endpoint`, and
    /// never the backend URL (it may hold a password).
    pub fn validate(&self) -> Result<(), FieldError> {
        if let LimitBackend::Redis(url) = &self.backend {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(FieldError::new(
                    "rate_limits.backend",
                    "must be \"memory\" or a redis:// or rediss:// URL",
                ));
            }
            // The client parses without connecting; its error may quote the URL, so it is
            // not passed on.
            #[cfg(feature = "redis")]
            if redis::Client::open(url.as_str()).is_err() {
                return Err(FieldError::new(
                    "rate_limits.backend",
                    "is not a Redis URL: redis://[:PASSWORD@]HOST[:PORT][/DB] or rediss://…",
                ));
            }
            #[cfg(not(feature = "redis"))]
            return Err(FieldError::new(
                "rate_limits.backend",
                "Redis support is not compiled in (cargo feature \"redis\")",
            ));
        }
        if self.key_prefix.len() > 64
            || self
                .key_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(FieldError::new(
                "rate_limits.key_prefix",
                "must be at most 64 characters, without spaces or control characters",
            ));
        }
        if self.reserve_tokens > 1_000_000_000 {
            return Err(FieldError::new(
                "rate_limits.reserve_tokens",
                "must be at most 1000000000",
            ));
        }
        validate_rules(&self.rules, "rate_limits.rules")
    }

    /// Whether any rule limits tokens (and so needs the usage tap's counts).
    pub fn limits_tokens(&self) -> bool {
        self.rules.iter().any(RateLimitRule::limits_tokens)
    }

    /// The `account/endpoint` text of a rule's `endpoint`, split and checked.
    pub fn parse_endpoint(text: &str) -> Option<(String, String)> {
        let (a, e) = text.split_once('/')?;
        (is_valid_name(a) && is_valid_name(e)).then(|| (a.to_owned(), e.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_print_and_bucket() {
        for ok in ["everyone", "all", "team:research", "user:a@x", "key:ci"] {
            assert_eq!(ok.parse::<LimitScope>().unwrap().to_string(), ok);
        }
        for bad in ["", "team:", "group:x", "key:a b", "Everyone"] {
            assert!(bad.parse::<LimitScope>().is_err(), "{bad:?}");
        }
        let p = Principal::new("k1", "a@x", ["research"]);
        let bucket = |s: &str| s.parse::<LimitScope>().unwrap().bucket(&p);
        assert_eq!(bucket("everyone").as_deref(), Some("key:k1"));
        assert_eq!(bucket("all").as_deref(), Some("all callers"));
        assert_eq!(bucket("team:research").as_deref(), Some("team:research"));
        assert_eq!(bucket("team:sales"), None);
        assert_eq!(bucket("user:a@x").as_deref(), Some("user:a@x"));
        assert_eq!(bucket("key:k2"), None);
        let rule = RateLimitRule {
            endpoint: Some(("acct".into(), "inference".into())),
            ..RateLimitRule::new(LimitScope::Everyone)
        };
        assert_eq!(
            rule.bucket(&p, "acct", "inference").as_deref(),
            Some("key:k1@acct/inference")
        );
        assert_eq!(rule.bucket(&p, "acct", "other"), None);
    }

    #[test]
    fn validation_names_the_field() {
        let rule = |f: fn(&mut RateLimitRule)| {
            let mut r = RateLimitRule {
                requests_per_minute: Some(60),
                ..RateLimitRule::new(LimitScope::Everyone)
            };
            f(&mut r);
            RateLimits {
                rules: vec![r],
                ..RateLimits::default()
            }
        };
        assert!(rule(|_| {}).validate().is_ok());
        let cases: Vec<(RateLimits, &str)> = vec![
            (
                rule(|r| r.requests_per_minute = None),
                "rate_limits.rules[0]",
            ),
            (
                rule(|r| r.tokens_per_day = Some(0)),
                "rate_limits.rules[0].tokens_per_day",
            ),
            (
                rule(|r| r.endpoint = Some(("a".into(), "..".into()))),
                "rate_limits.rules[0].endpoint",
            ),
            (
                RateLimits {
                    backend: LimitBackend::Redis("http://secret@x".into()),
                    ..RateLimits::default()
                },
                "rate_limits.backend",
            ),
            (
                RateLimits {
                    backend: LimitBackend::Redis(
                        "redis://:secret@host:port-is-not-a-number".into(),
                    ),
                    ..RateLimits::default()
                },
                "rate_limits.backend",
            ),
            (
                RateLimits {
                    rules: vec![
                        RateLimitRule {
                            requests_per_minute: Some(1),
                            ..RateLimitRule::new(LimitScope::Everyone)
                        },
                        RateLimitRule {
                            tokens_per_day: Some(1),
                            ..RateLimitRule::new(LimitScope::Everyone)
                        },
                    ],
                    ..RateLimits::default()
                },
                "rate_limits.rules[1].scope",
            ),
            (
                RateLimits {
                    key_prefix: "a b".into(),
                    ..RateLimits::default()
                },
                "rate_limits.key_prefix",
            ),
        ];
        for (limits, field) in cases {
            let err = limits.validate().unwrap_err();
            assert_eq!(err.field(), field, "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        assert_eq!(
            RateLimits::parse_endpoint("coreweave-model/inference"),
            Some(("coreweave-model".into(), "inference".into()))
        );
        assert_eq!(RateLimits::parse_endpoint("a/b/c"), None);
        assert_eq!(
            format!("{:?}", LimitBackend::Redis("redis://:pw@h".into())),
            "Redis(<redacted>)"
        );
    }
}
