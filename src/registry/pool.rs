//! An endpoint's compiled targets and what the gateway has learned about each: in-flight
//! requests, latency, failures and ejection.
//!
//! The learned state ([`TargetHealth`], and the endpoint's retry budget in [`PoolState`]) is
//! shared through `Arc`s that a new registry snapshot takes over from the one it replaces, for
//! every target whose base URL is unchanged: a management change to one endpoint neither
//! forgets that a target is down nor resets a retry budget.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::header::HeaderMap;
use http::uri::Uri;

use crate::model::{COMMON_PATHS, EjectPolicy, RetryPolicy, Timeouts, UpstreamBase};

/// How fast the latency estimate forgets a slow response: its weight halves every ~7 s.
const DECAY: Duration = Duration::from_secs(10);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since this process first asked, a clock every target shares.
pub(crate) fn now_ms() -> u64 {
    // Never 0, which means "never" in the fields below.
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Nanoseconds since this process first asked.
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A compiled target of an endpoint.
pub struct Target {
    pub(super) base: UpstreamBase,
    pub(super) label: Arc<str>,
    pub(super) headers: HeaderMap,
    pub(super) weight: u32,
    pub(super) priority: u32,
    pub(super) timeouts: Timeouts,
    #[cfg(feature = "forward")]
    pub(super) tls: Option<Arc<crate::tls::TlsSettings>>,
    pub(super) common_uris: [Option<Uri>; COMMON_PATHS.len()],
    pub(super) health: Arc<TargetHealth>,
}

impl Target {
    /// The parsed base URL.
    pub fn base(&self) -> &UpstreamBase {
        &self.base
    }

    /// The base URL as text: how spans, metrics and the management API name the target.
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// The target's own headers, set over the endpoint's on each request sent to it; every
    /// value marked sensitive. Empty for most targets.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The target's weight within its priority.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The target's priority (1 first).
    pub fn priority(&self) -> u32 {
        self.priority
    }

    /// The timeouts: the target's own, each one not set taking the endpoint's.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The TLS settings: the target's own, or the endpoint's.
    #[cfg(feature = "forward")]
    pub fn tls(&self) -> Option<&Arc<crate::tls::TlsSettings>> {
        self.tls.as_ref()
    }

    /// The upstream URI for the `i`th of the route's common paths, without a query.
    #[cfg(feature = "forward")]
    pub(crate) fn common_uri(&self, i: usize) -> Option<&Uri> {
        self.common_uris.get(i)?.as_ref()
    }

    /// What the gateway has learned about this target.
    pub fn health(&self) -> &Arc<TargetHealth> {
        &self.health
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("base", &self.label)
            .field("weight", &self.weight)
            .field("priority", &self.priority)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("health", &self.health.state())
            .finish_non_exhaustive()
    }
}

/// What one replica has learned about a target. Every field is updated without a lock but
/// the latency estimate's.
#[derive(Debug, Default)]
pub struct TargetHealth {
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    /// The outcomes of the last attempts, newest in bit 0 (1: a failure), and how many of
    /// them there are (at most 64).
    outcomes: AtomicU64,
    outcomes_seen: AtomicU32,
    /// Ejections since the last success: the cool-down doubles with each.
    ejections: AtomicU32,
    /// [`now_ms`] until which the target is out; 0 when it is live.
    ejected_until: AtomicU64,
    /// [`now_ms`] of the last failure; 0 for none.
    last_failure: AtomicU64,
    /// Peak-EWMA of the time to the response head in nanoseconds (an `f64`'s bits; 0 before
    /// the first answer), and when it was last updated ([`now_ns`]).
    latency: AtomicU64,
    latency_at: AtomicU64,
    /// Whether a health check is probing the target.
    probing: AtomicBool,
}

/// Why a target was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ejection {
    /// It failed `consecutive_failures` times in a row.
    Failures,
    /// `error_percent` of its last `window` attempts failed.
    ErrorRatio,
    /// It answered 429 with a `Retry-After`.
    RetryAfter,
}

impl Ejection {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Ejection::Failures => "failures",
            Ejection::ErrorRatio => "error_ratio",
            Ejection::RetryAfter => "retry_after",
        }
    }
}

/// A target's state as the management API shows it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TargetState {
    /// When the target comes back, if it is ejected.
    pub ejected_until: Option<SystemTime>,
    /// Failures since its last success.
    pub consecutive_failures: u32,
    /// Requests (and open streams) on it now.
    pub in_flight: u32,
    /// Its latency estimate (time to the response head), once it has answered.
    pub latency: Option<Duration>,
}

impl TargetHealth {
    /// Whether the target is in its pool at `now` (from [`now_ms`]).
    pub fn is_live(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// The [`now_ms`] of its last failure, 0 for none.
    pub fn last_failure(&self) -> u64 {
        self.last_failure.load(Ordering::Relaxed)
    }

    /// Requests on it now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// One more request on it, until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The latency estimate in nanoseconds, 0 before the first answer.
    pub fn cost_ns(&self) -> f64 {
        self.cost_ns_at(now_ns())
    }

    /// [`cost_ns`](Self::cost_ns) at `now` (from [`now_ns`]), so that one clock read serves
    /// the targets compared.
    pub fn cost_ns_at(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.latency.load(Ordering::Relaxed));
        if ewma == 0.0 {
            return 0.0;
        }
        let at = self.latency_at.load(Ordering::Relaxed);
        ewma * decay(now.saturating_sub(at))
    }

    /// A response head arrived after `rtt`, from an answer that was not a failure: the
    /// failure count resets and the latency estimate takes it (at once if it is slower, the
    /// peak; decayed in if it is faster).
    pub fn succeeded(&self, rtt: Duration) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
        self.push_outcome(false);
        self.observe(rtt);
    }

    /// Records an attempt's outcome.
    fn push_outcome(&self, failed: bool) {
        let bit = u64::from(failed);
        let _ = self
            .outcomes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| Some(o << 1 | bit));
        let seen = self.outcomes_seen.load(Ordering::Relaxed);
        if seen < 64 {
            self.outcomes_seen.store(seen + 1, Ordering::Relaxed);
        }
    }

    /// The latency estimate takes `rtt` (a slow failure counts too). Two answers at once may
    /// each update it from the same old value; one of them wins, which an estimate allows.
    pub fn observe(&self, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let now = now_ns();
        let ewma = f64::from_bits(self.latency.load(Ordering::Relaxed));
        let next = if ewma == 0.0 || rtt > ewma {
            rtt
        } else {
            let w = decay(now.saturating_sub(self.latency_at.load(Ordering::Relaxed)));
            ewma * w + rtt * (1.0 - w)
        };
        self.latency
            .store(next.max(1.0).to_bits(), Ordering::Relaxed);
        self.latency_at.store(now, Ordering::Relaxed);
    }

    /// A failure: the target is ejected (the answer says for how long and why) when it has
    /// failed `policy.consecutive_failures` times in a row, or `policy.error_percent` of its
    /// last `policy.window` attempts failed, and it is not already out.
    pub fn failed(&self, policy: &EjectPolicy) -> Option<(Duration, Ejection)> {
        let now = now_ms();
        self.last_failure.store(now, Ordering::Relaxed);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let window = policy.window.clamp(1, 64);
        let mask = if window == 64 {
            u64::MAX
        } else {
            (1u64 << window) - 1
        };
        self.push_outcome(true);
        let recent = (self.outcomes.load(Ordering::Relaxed) & mask).count_ones();
        let seen = self.outcomes_seen.load(Ordering::Relaxed);
        let reason = if failures >= policy.consecutive_failures {
            Ejection::Failures
        } else if policy.error_percent > 0
            && seen >= window
            && recent * 100 >= policy.error_percent * window
        {
            Ejection::ErrorRatio
        } else {
            return None;
        };
        if !self.is_live(now) {
            return None;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let cool_down = policy
            .base
            .saturating_mul(1 << n)
            .min(policy.max.max(policy.base));
        self.eject_for(cool_down, now);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        // Judged afresh when it comes back.
        self.outcomes.store(0, Ordering::Relaxed);
        self.outcomes_seen.store(0, Ordering::Relaxed);
        Some((cool_down, reason))
    }

    /// An upstream's `Retry-After`: out for `wait` (at most `policy.max`).
    pub fn retry_after(&self, wait: Duration, policy: &EjectPolicy) -> Duration {
        let now = now_ms();
        self.last_failure.store(now, Ordering::Relaxed);
        let wait = wait.min(policy.max);
        self.eject_for(wait, now);
        wait
    }

    fn eject_for(&self, d: Duration, now: u64) {
        let until = now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until.fetch_max(until, Ordering::Relaxed);
    }

    /// Back in the pool (a health check passed).
    pub fn recover(&self) {
        self.ejected_until.store(0, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Claims the health check of this target; `false` if one is already running.
    pub fn start_probing(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    /// Ends the claim of [`start_probing`](Self::start_probing).
    pub fn stop_probing(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// The state the management API shows.
    pub fn state(&self) -> TargetState {
        let now = now_ms();
        let until = self.ejected_until.load(Ordering::Relaxed);
        let latency = self.cost_ns();
        TargetState {
            ejected_until: (until > now)
                .then(|| SystemTime::now() + Duration::from_millis(until - now)),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            in_flight: self.in_flight(),
            latency: (latency > 0.0).then(|| Duration::from_nanos(latency as u64)),
        }
    }
}

/// The weight an estimate keeps after `elapsed_ns`.
fn decay(elapsed_ns: u64) -> f64 {
    (-(elapsed_ns as f64) / DECAY.as_nanos() as f64).exp()
}

/// A request in flight on a target; dropping it ends it.
#[derive(Debug)]
pub struct InFlight(Arc<TargetHealth>);

impl InFlight {
    /// The target's health.
    pub fn health(&self) -> &Arc<TargetHealth> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An endpoint's pool policies and the state its requests share (the retry budget).
pub struct PoolState {
    retry: RetryPolicy,
    eject: EjectPolicy,
    #[cfg(feature = "forward")]
    budget: tower::retry::budget::TpsBudget,
}

impl PoolState {
    pub(super) fn new(retry: RetryPolicy, eject: EjectPolicy) -> Self {
        Self {
            #[cfg(feature = "forward")]
            budget: tower::retry::budget::TpsBudget::new(
                Duration::from_secs(10),
                retry.min_per_second,
                retry.budget_percent as f32 / 100.0,
            ),
            retry,
            eject,
        }
    }

    /// When requests are retried.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// When targets are ejected.
    pub fn eject(&self) -> &EjectPolicy {
        &self.eject
    }

    /// The retry budget: one deposit per request, one withdrawal per retry.
    #[cfg(feature = "forward")]
    pub fn budget(&self) -> &tower::retry::budget::TpsBudget {
        &self.budget
    }
}

impl std::fmt::Debug for PoolState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolState")
            .field("retry", &self.retry)
            .field("eject", &self.eject)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_row_or_a_failing_share_eject_and_the_cool_down_grows() {
        let policy = EjectPolicy {
            consecutive_failures: 3,
            error_percent: 50,
            window: 10,
            base: Duration::from_secs(1),
            max: Duration::from_secs(3),
        };
        let h = TargetHealth::default();
        assert_eq!(h.failed(&policy), None);
        assert_eq!(h.failed(&policy), None);
        assert_eq!(
            h.failed(&policy),
            Some((Duration::from_secs(1), Ejection::Failures))
        );
        assert!(!h.is_live(now_ms()));
        // Out already: no second ejection.
        assert_eq!(h.failed(&policy), None);
        h.recover();
        for _ in 0..3 {
            h.failed(&policy);
        }
        assert!(h.state().ejected_until.is_some());
        h.recover();
        for _ in 0..3 {
            h.failed(&policy);
        }
        // 1 s, 2 s, then capped at 3 s.
        let until = h.state().ejected_until.unwrap();
        let left = until.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_millis(2500), "{left:?}");

        // Every other attempt fails: never three in a row, but half of the last ten.
        let h = TargetHealth::default();
        let mut ejected = None;
        for i in 0..20 {
            if i % 2 == 0 {
                h.succeeded(Duration::from_millis(1));
            } else if let Some(e) = h.failed(&policy) {
                ejected = Some((i, e));
                break;
            }
        }
        assert_eq!(
            ejected,
            Some((9, (Duration::from_secs(1), Ejection::ErrorRatio))),
            "ejected once ten attempts were seen"
        );
        // A success resets the growth.
        h.recover();
        h.succeeded(Duration::from_millis(1));
        assert_eq!(h.state().consecutive_failures, 0);
    }
}
