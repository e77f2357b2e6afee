//! Upstream pools: an endpoint's targets, and how it retries, ejects and health-checks them.
//!
//! An endpoint has one `base_url` (one target) or a list of [`TargetSpec`]s. Each target has a
//! weight (its share of traffic among the live targets of its priority), a priority (1 is
//! tried first; a higher number only when every target of the lower ones is out), and its own
//! headers, timeouts and TLS settings, merged over the endpoint's.

use std::time::Duration;

#[cfg(feature = "forward")]
use std::sync::Arc;

use http::header::HeaderMap;

use super::{FieldError, Timeouts, UpstreamBase};

/// The most targets one endpoint may have.
pub const MAX_TARGETS: usize = 64;
/// The largest weight a target may have.
pub const MAX_WEIGHT: u32 = 10_000;

/// One upstream of an endpoint's pool, as a user writes it.
///
/// `Debug` shows header names, never values.
#[derive(Clone)]
pub struct TargetSpec {
    /// Base URL, e.g. `https://vllm-a.internal/v1`.
    pub base_url: String,
    /// The target's share of traffic among the live targets of its priority (default 1).
    pub weight: u32,
    /// 1 (the default) is used first; 2 only when every target of priority 1 is out; and so on.
    pub priority: u32,
    /// Headers merged over the endpoint's (which are merged over the account's). They may not
    /// use templates: a target is picked after the headers of the endpoint are filled.
    pub headers: HeaderMap,
    /// Timeouts; each one not set takes the endpoint's.
    pub timeouts: Timeouts,
    /// TLS settings; `None` takes the endpoint's.
    #[cfg(feature = "forward")]
    pub tls: Option<Arc<crate::tls::TlsSettings>>,
}

impl TargetSpec {
    /// A target of weight 1 and priority 1, with nothing of its own.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            weight: 1,
            priority: 1,
            headers: HeaderMap::new(),
            timeouts: Timeouts::default(),
            #[cfg(feature = "forward")]
            tls: None,
        }
    }

    /// Whether `other` is the same target: base URL, weight, priority, headers, timeouts and
    /// TLS settings (by identity).
    pub fn same_content(&self, other: &Self) -> bool {
        #[cfg(feature = "forward")]
        let same_tls = same_tls(&self.tls, &other.tls);
        #[cfg(not(feature = "forward"))]
        let same_tls = true;
        self.base_url == other.base_url
            && self.weight == other.weight
            && self.priority == other.priority
            && self.headers == other.headers
            && self.timeouts == other.timeouts
            && same_tls
    }

    /// Checks the target; errors name `{field}.base_url`, `{field}.weight`, ….
    pub(super) fn validate(&self, field: &str) -> Result<(), FieldError> {
        UpstreamBase::parse(&self.base_url)
            .map_err(|m| FieldError::new(format!("{field}.base_url"), m))?;
        if !(1..=MAX_WEIGHT).contains(&self.weight) {
            return Err(FieldError::new(
                format!("{field}.weight"),
                format!("must be from 1 to {MAX_WEIGHT}"),
            ));
        }
        if !(1..=100).contains(&self.priority) {
            return Err(FieldError::new(
                format!("{field}.priority"),
                "must be from 1 (used first) to 100",
            ));
        }
        for (name, value) in &self.headers {
            if super::HeaderTemplate::parse(value).is_some() {
                return Err(FieldError::new(
                    format!("{field}.headers.{name}"),
                    "a target's headers cannot use {subject}, {team} or {key_id}: put the template in the endpoint's headers",
                ));
            }
        }
        self.timeouts.validate(&format!("{field}.timeouts"))
    }
}

impl std::fmt::Debug for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("TargetSpec");
        d.field("base_url", &self.base_url)
            .field("weight", &self.weight)
            .field("priority", &self.priority)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeouts", &self.timeouts);
        #[cfg(feature = "forward")]
        d.field("tls", &self.tls);
        d.finish()
    }
}

/// Whether two TLS settings are the same ones: by identity, as a registry keeps them across
/// every change that does not touch them.
#[cfg(feature = "forward")]
pub(super) fn same_tls(
    a: &Option<Arc<crate::tls::TlsSettings>>,
    b: &Option<Arc<crate::tls::TlsSettings>>,
) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// When a request is tried again on another target.
///
/// Only while nothing has reached the client: a connect failure, a connection reset before the
/// response head, a first-byte timeout, or a response whose status is in `on_status` (its
/// body is dropped unread) is retried; a response that went out never is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 disables retries).
    pub attempts: u32,
    /// Upstream statuses that are retried; the last attempt's response goes to the client as
    /// it is.
    pub on_status: Vec<u16>,
    /// At most this percent of the endpoint's recent requests (the last 10 s) may be retries,
    /// on top of `min_per_second`.
    pub budget_percent: u32,
    /// Retries allowed per second whatever the traffic, so a quiet endpoint can still fail over.
    pub min_per_second: u32,
    /// The largest request body held for a replay. A larger body is sent once, not retried.
    pub max_body_bytes: u64,
}

/// The statuses retried by default: too many requests, bad gateway, unavailable, gateway timeout.
pub const DEFAULT_RETRY_ON: [u16; 4] = [429, 502, 503, 504];

impl RetryPolicy {
    /// The policy of an endpoint that sets none: one attempt for a single target; for a pool,
    /// two (one fallback) on the default statuses.
    pub fn default_for(targets: usize) -> Self {
        Self {
            attempts: if targets > 1 { 2 } else { 1 },
            ..Self::default()
        }
    }

    /// A policy from the fields a user wrote (the file or the API); each one left out takes
    /// its [default](Self::default).
    pub fn from_fields(
        attempts: Option<u32>,
        on_status: Option<Vec<u16>>,
        budget_percent: Option<u32>,
        min_per_second: Option<u32>,
        max_body_bytes: Option<u64>,
    ) -> Self {
        let d = Self::default();
        Self {
            attempts: attempts.unwrap_or(d.attempts),
            on_status: on_status.unwrap_or(d.on_status),
            budget_percent: budget_percent.unwrap_or(d.budget_percent),
            min_per_second: min_per_second.unwrap_or(d.min_per_second),
            max_body_bytes: max_body_bytes.unwrap_or(d.max_body_bytes),
        }
    }

    /// Checks the policy; errors name `{field}.attempts`, ….
    pub(super) fn validate(&self, field: &str) -> Result<(), FieldError> {
        if !(1..=10).contains(&self.attempts) {
            return Err(FieldError::new(
                format!("{field}.attempts"),
                "must be from 1 (no retries) to 10",
            ));
        }
        if let Some(i) = self.on_status.iter().position(|s| !(400..=599).contains(s)) {
            return Err(FieldError::new(
                format!("{field}.on_status[{i}]"),
                "must be an error status, 400 to 599",
            ));
        }
        if self.budget_percent > 1000 {
            return Err(FieldError::new(
                format!("{field}.budget_percent"),
                "must be from 0 to 1000",
            ));
        }
        if self.min_per_second > 10_000 {
            return Err(FieldError::new(
                format!("{field}.min_per_second"),
                "must be from 0 to 10000",
            ));
        }
        Ok(())
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            on_status: DEFAULT_RETRY_ON.to_vec(),
            budget_percent: 20,
            min_per_second: 10,
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

/// When a failing target is taken out of its pool, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EjectPolicy {
    /// Failures in a row (connect errors, resets, timeouts, 5xx, 429) that eject a target.
    pub consecutive_failures: u32,
    /// The share of failures among a target's last `window` attempts that ejects it, in
    /// percent (0: no such rule): a target that fails every other request never fails five
    /// times in a row.
    pub error_percent: u32,
    /// How many of a target's last attempts `error_percent` is taken over (2 to 64).
    pub window: u32,
    /// The first cool-down; each ejection that follows without a success in between doubles it.
    pub base: Duration,
    /// The longest cool-down (also the longest an upstream's `Retry-After` is honoured).
    pub max: Duration,
}

impl Default for EjectPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            error_percent: 50,
            window: 20,
            base: Duration::from_secs(10),
            max: Duration::from_secs(300),
        }
    }
}

impl EjectPolicy {
    /// A policy from the fields a user wrote, the cool-downs in milliseconds; each one left
    /// out takes its [default](Self::default).
    pub fn from_fields(
        consecutive_failures: Option<u32>,
        error_percent: Option<u32>,
        window: Option<u32>,
        base_ms: Option<u64>,
        max_ms: Option<u64>,
    ) -> Self {
        let d = Self::default();
        Self {
            consecutive_failures: consecutive_failures.unwrap_or(d.consecutive_failures),
            error_percent: error_percent.unwrap_or(d.error_percent),
            window: window.unwrap_or(d.window),
            base: base_ms.map_or(d.base, Duration::from_millis),
            max: max_ms.map_or(d.max, Duration::from_millis),
        }
    }

    pub(super) fn validate(&self, field: &str) -> Result<(), FieldError> {
        if self.consecutive_failures == 0 {
            return Err(FieldError::new(
                format!("{field}.consecutive_failures"),
                "must be at least 1",
            ));
        }
        if self.error_percent > 100 {
            return Err(FieldError::new(
                format!("{field}.error_percent"),
                "must be from 0 (no ratio rule) to 100",
            ));
        }
        if !(2..=64).contains(&self.window) {
            return Err(FieldError::new(
                format!("{field}.window"),
                "must be from 2 to 64 attempts",
            ));
        }
        if self.base.is_zero() {
            return Err(FieldError::new(
                format!("{field}.base_ms"),
                "must be greater than zero",
            ));
        }
        if self.max < self.base {
            return Err(FieldError::new(
                format!("{field}.max_ms"),
                "must be at least base_ms",
            ));
        }
        Ok(())
    }
}

/// An active health check: while a target is ejected, `GET {base_url}{path}` every `interval`
/// with the target's headers; a 2xx brings it back before its cool-down ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// The path after the base URL, starting with `/` (e.g. `/models`).
    pub path: String,
    /// Time between two probes of an ejected target.
    pub interval: Duration,
}

/// The probe interval when none is written.
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);

impl HealthCheck {
    /// A check of `path` every `interval_ms` (default 5 s).
    pub fn from_fields(path: &str, interval_ms: Option<u64>) -> Self {
        Self {
            path: path.to_owned(),
            interval: interval_ms.map_or(DEFAULT_HEALTH_INTERVAL, Duration::from_millis),
        }
    }

    pub(super) fn validate(&self, field: &str) -> Result<(), FieldError> {
        let base = UpstreamBase::parse("http://h").expect("a valid base URL");
        if !self.path.starts_with('/')
            || self.path.contains(['?', '#'])
            || base.join(&self.path, None).is_none()
        {
            return Err(FieldError::new(
                format!("{field}.path"),
                "must be a path starting with / (e.g. /models), without a query",
            ));
        }
        if self.interval < Duration::from_millis(100) {
            return Err(FieldError::new(
                format!("{field}.interval_ms"),
                "must be at least 100",
            ));
        }
        Ok(())
    }
}
