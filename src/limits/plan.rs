//! What a request is counted in: one counter per limit of each rule that covers it, and the
//! calendar windows of the token budgets. Shared by both backends, so they agree on names,
//! windows and answers.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::ticket::Ticket;
use crate::ext::Principal;
use crate::model::RateLimitRule;

/// What a request gets.
pub(super) enum Decision {
    /// No rule covers it.
    Unlimited,
    /// It may go on, holding this ticket until its response ends.
    Allowed { ticket: Ticket, quotas: Quotas },
    /// It is over a limit.
    Refused(Refusal),
    /// The shared backend cannot be reached and the policy is to fail closed.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Unavailable,
}

/// A rule's `scope` label in the metrics: its scope, and its endpoint if it names one
/// (`team:research@coreweave-model/inference`).
pub(super) fn scope_label(rule: &RateLimitRule) -> Arc<str> {
    match &rule.endpoint {
        Some((a, e)) => format!("{}@{a}/{e}", rule.scope).into(),
        None => rule.scope.to_string().into(),
    }
}

/// The counter of the requests a rule allowed, registered once per rule when the rules are
/// compiled (a recorder installed later than that sees none of them until the next change).
#[cfg(feature = "trace")]
pub(super) type Allowed = metrics::Counter;

/// Without the `trace` feature there is no counter.
#[cfg(not(feature = "trace"))]
#[derive(Clone, Copy)]
pub(super) struct Allowed;

#[cfg(not(feature = "trace"))]
impl Allowed {
    pub(super) fn increment(&self, _n: u64) {}
}

/// The counter of the requests the rule labelled `scope` allowed.
#[cfg(feature = "trace")]
pub(super) fn allowed_counter(scope: &Arc<str>) -> Allowed {
    metrics::counter!(
        crate::metric::RATE_LIMIT_DECISIONS,
        "scope" => metrics::SharedString::from(scope.clone()),
        "outcome" => "allowed",
        "limit" => "",
    )
}

/// No counter without the `trace` feature.
#[cfg(not(feature = "trace"))]
pub(super) fn allowed_counter(_scope: &Arc<str>) -> Allowed {
    Allowed
}

/// Counts a decision of one rule in the metrics.
#[cfg(feature = "trace")]
pub(super) fn count(scope: &Arc<str>, outcome: &'static str, limit: &'static str) {
    metrics::counter!(
        crate::metric::RATE_LIMIT_DECISIONS,
        "scope" => metrics::SharedString::from(scope.clone()),
        "outcome" => outcome,
        "limit" => limit,
    )
    .increment(1);
}

/// Counts a decision of one rule in the metrics (none without the `trace` feature).
#[cfg(not(feature = "trace"))]
pub(super) fn count(_scope: &Arc<str>, _outcome: &'static str, _limit: &'static str) {}

pub(super) const MINUTE: Duration = Duration::from_secs(60);

/// One limit of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Limit {
    /// `requests_per_minute`: a GCRA.
    Requests(u32),
    /// `tokens_per_minute`: a GCRA whose cost is the tokens.
    TokensPerMinute(u64),
    /// `tokens_per_day` (UTC).
    TokensPerDay(u64),
    /// `tokens_per_month` (UTC).
    TokensPerMonth(u64),
    /// `concurrent_streams`.
    Streams(u32),
}

impl Limit {
    /// The limits a rule sets, in a fixed order.
    pub(super) fn of(rule: &RateLimitRule) -> impl Iterator<Item = Limit> {
        [
            rule.requests_per_minute.map(Limit::Requests),
            rule.tokens_per_minute.map(Limit::TokensPerMinute),
            rule.tokens_per_day.map(Limit::TokensPerDay),
            rule.tokens_per_month.map(Limit::TokensPerMonth),
            rule.concurrent_streams.map(Limit::Streams),
        ]
        .into_iter()
        .flatten()
    }

    /// The field that sets it, also the `limit` label of the metrics.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Requests(_) => "requests_per_minute",
            Self::TokensPerMinute(_) => "tokens_per_minute",
            Self::TokensPerDay(_) => "tokens_per_day",
            Self::TokensPerMonth(_) => "tokens_per_month",
            Self::Streams(_) => "concurrent_streams",
        }
    }

    /// Its value.
    pub(super) fn value(self) -> u64 {
        match self {
            Self::Requests(n) | Self::Streams(n) => u64::from(n),
            Self::TokensPerMinute(n) | Self::TokensPerDay(n) | Self::TokensPerMonth(n) => n,
        }
    }

    /// Whether it counts tokens (and so is settled when the response ends).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(super) fn counts_tokens(self) -> bool {
        matches!(
            self,
            Self::TokensPerMinute(_) | Self::TokensPerDay(_) | Self::TokensPerMonth(_)
        )
    }

    /// The OpenAI error code of a refusal: a spent day or month budget is `insufficient_quota`,
    /// anything that refills within a minute `rate_limit_exceeded`.
    pub(super) fn refusal_code(self) -> &'static str {
        match self {
            Self::TokensPerDay(_) | Self::TokensPerMonth(_) => "insufficient_quota",
            _ => "rate_limit_exceeded",
        }
    }

    /// A short tag for counter names.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(super) fn tag(self) -> &'static str {
        match self {
            Self::Requests(_) => "rpm",
            Self::TokensPerMinute(_) => "tpm",
            Self::TokensPerDay(_) => "tpd",
            Self::TokensPerMonth(_) => "tpmo",
            Self::Streams(_) => "streams",
        }
    }

    /// The calendar window of a budget at `now`: its number and when it ends.
    pub(super) fn window(self, now: SystemTime) -> Option<Window> {
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let day = secs / 86_400;
        let (id, end_day) = match self {
            Self::TokensPerDay(_) => (day, day + 1),
            Self::TokensPerMonth(_) => {
                let (y, m) = year_month(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (y * 12 + (m - 1), days_from_civil(ny, nm))
            }
            _ => return None,
        };
        let end = UNIX_EPOCH + Duration::from_secs(end_day * 86_400);
        Some(Window {
            id,
            left: end.duration_since(now).unwrap_or_default(),
        })
    }
}

/// A budget's calendar window: a day or a month (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Window {
    /// Days since 1970 for a day, `year * 12 + month - 1` for a month.
    pub(super) id: u64,
    /// Until it ends.
    pub(super) left: Duration,
}

/// The year and month (1 to 12) of a day counted from 1970-01-01 (H. Hinnant's algorithm).
fn year_month(days: u64) -> (u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m)
}

/// The day (from 1970-01-01) of the first of month `m` of year `y`.
fn days_from_civil(y: u64, m: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The GCRA emission interval and burst tolerance of `rpm` requests per minute: at most
/// `rpm` in any minute.
pub(super) fn gcra(rpm: u32) -> (Duration, Duration) {
    let t = MINUTE / rpm.max(1);
    (t, MINUTE - t)
}

/// The time `tokens` take to refill at `per_minute` tokens a minute.
pub(super) fn token_time(tokens: u64, per_minute: u64) -> Duration {
    let nanos = u128::from(tokens) * MINUTE.as_nanos() / u128::from(per_minute.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The remaining requests of a GCRA whose arrival time is `ahead` of now.
fn remaining_requests(rpm: u32, ahead: Duration) -> u32 {
    let (t, tau) = gcra(rpm);
    if ahead > tau {
        0
    } else {
        // Nanoseconds fit in 64 bits for 584 years: no 128-bit division on the hot path.
        let slack = (tau - ahead).as_nanos() as u64 / (t.as_nanos() as u64).max(1);
        u32::try_from(slack + 1).unwrap_or(u32::MAX).min(rpm)
    }
}

/// The remaining tokens of a tokens-per-minute bucket whose arrival time is `ahead` of now.
fn remaining_tokens(per_minute: u64, ahead: Duration) -> u64 {
    let room = MINUTE.saturating_sub(ahead);
    let tokens = room.as_nanos() * u128::from(per_minute) / MINUTE.as_nanos();
    u64::try_from(tokens).unwrap_or(u64::MAX).min(per_minute)
}

/// What a backend read of one counter, for [`Limit::quota`].
#[derive(Clone, Copy, Debug)]
pub(super) enum Reading {
    /// A GCRA: how far its arrival time is ahead of now (zero when it has passed).
    Ahead(Duration),
    /// A budget: the tokens used in its window, and until the window ends.
    Used(u64, Duration),
    /// Streams in flight.
    Busy(u64),
}

impl Limit {
    /// What a client is told of this limit, from its counter: what is left and until it is
    /// whole again. Both backends answer through this, after a charge or a read.
    pub(super) fn quota(self, reading: Reading) -> Quota {
        let limit = self.value();
        let (remaining, reset) = match (self, reading) {
            (Self::Requests(rpm), Reading::Ahead(ahead)) => {
                (u64::from(remaining_requests(rpm, ahead)), ahead)
            }
            (Self::TokensPerMinute(n), Reading::Ahead(ahead)) => {
                (remaining_tokens(n, ahead), ahead)
            }
            (_, Reading::Used(used, left)) => (limit.saturating_sub(used), left),
            (_, Reading::Busy(busy)) => (limit.saturating_sub(busy), Duration::ZERO),
            (_, Reading::Ahead(ahead)) => (0, ahead),
        };
        Quota {
            limit,
            remaining,
            reset,
        }
    }
}

/// What a client is told about one kind of limit: its strictest bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Quota {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
}

impl Quota {
    /// Keeps the stricter of `self` and `other`: the one with less left.
    pub(super) fn stricter(slot: &mut Option<Quota>, other: Quota) {
        if slot.is_none_or(|s| other.remaining < s.remaining) {
            *slot = Some(other);
        }
    }
}

/// The answer to a request that may go on: what its response headers say.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Quotas {
    pub(crate) requests: Option<Quota>,
    pub(crate) tokens: Option<Quota>,
}

impl Quotas {
    pub(super) fn add(&mut self, limit: Limit, quota: Quota) {
        match limit {
            Limit::Requests(_) => Quota::stricter(&mut self.requests, quota),
            Limit::Streams(_) => {}
            _ => Quota::stricter(&mut self.tokens, quota),
        }
    }
}

/// A refused request: which limit of which rule, for whom, and when to try again.
#[derive(Clone, Debug)]
pub(crate) struct Refusal {
    pub(crate) limit: Limit,
    pub(crate) bucket: String,
    pub(crate) retry_after: Duration,
}

impl Refusal {
    pub(super) fn new(
        rule: &RateLimitRule,
        limit: Limit,
        principal: &Principal,
        route: (&str, &str),
        retry_after: Duration,
    ) -> Self {
        Self {
            limit,
            bucket: rule.bucket(principal, route.0, route.1).unwrap_or_default(),
            retry_after,
        }
    }

    /// The message of the 429.
    pub(super) fn message(&self) -> String {
        let what = match self.limit {
            Limit::Requests(n) => format!("{n} requests per minute"),
            Limit::TokensPerMinute(n) => format!("{n} tokens per minute"),
            Limit::TokensPerDay(n) => format!("the budget of {n} tokens per day"),
            Limit::TokensPerMonth(n) => format!("the budget of {n} tokens per month"),
            Limit::Streams(n) => format!("{n} concurrent streams"),
        };
        let verb = match self.limit {
            Limit::TokensPerDay(_) | Limit::TokensPerMonth(_) => "spent",
            _ => "reached",
        };
        format!(
            "Rate limit {verb}: {what} for {}. Retry after {:.1}s.",
            self.bucket,
            self.retry_after.as_secs_f64()
        )
    }
}

/// Every limit that covers a request: `(rule, bucket id, limit)`, without allocating unless
/// some rule covers it.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(super) fn covering(
    rules: &[RateLimitRule],
    principal: &Principal,
    (account, endpoint): (&str, &str),
) -> Vec<(usize, Arc<str>, Limit)> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if let Some(bucket) = rule.covers(principal, account, endpoint) {
            for limit in Limit::of(rule) {
                out.push((i, bucket.clone(), limit));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(days: u64, secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(days * 86_400 + secs)
    }

    #[test]
    fn windows_are_utc_days_and_months() {
        // 2026-12-08 is day 20_795; December ends with day 20_818.
        assert_eq!(days_from_civil(2026, 12), 20_788);
        assert_eq!(year_month(20_795), (2026, 12));
        assert_eq!(year_month(20_788), (2026, 12));
        assert_eq!(year_month(20_787), (2026, 11));
        assert_eq!(days_from_civil(2027, 1), 20_819);
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(days_from_civil(2024, 3) - days_from_civil(2024, 2), 29);
        let day = Limit::TokensPerDay(1).window(at(20_795, 3600)).unwrap();
        assert_eq!(day.id, 20_795);
        assert_eq!(day.left, Duration::from_secs(23 * 3600));
        let month = Limit::TokensPerMonth(1).window(at(20_795, 0)).unwrap();
        assert_eq!(month.id, 2026 * 12 + 11);
        assert_eq!(month.left, Duration::from_secs(24 * 86_400));
        let next = Limit::TokensPerMonth(1).window(at(20_819, 0)).unwrap();
        assert_eq!(next.id, 2027 * 12);
        assert_eq!(Limit::Requests(1).window(at(0, 0)), None);
    }

    #[test]
    fn token_buckets_refill_over_a_minute() {
        assert_eq!(token_time(100, 6000), Duration::from_secs(1));
        assert_eq!(remaining_tokens(6000, Duration::ZERO), 6000);
        assert_eq!(remaining_tokens(6000, Duration::from_secs(30)), 3000);
        assert_eq!(remaining_tokens(6000, MINUTE), 0);
        assert_eq!(remaining_requests(6, Duration::from_secs(10)), 5);
        let q = Limit::TokensPerDay(100).quota(Reading::Used(130, Duration::from_secs(5)));
        assert_eq!(
            (q.limit, q.remaining, q.reset),
            (100, 0, Duration::from_secs(5))
        );
        assert_eq!(Limit::Streams(3).quota(Reading::Busy(1)).remaining, 2);
    }
}
