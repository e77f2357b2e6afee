//! An endpoint's compiled targets and what the gateway has learned about each: in-flight
//! requests, latency, failures and ejection.
//!
//! The learned state ([`TargetHealth`], and the endpoint's retry budget in [`PoolState`]) is
//! shared through `Arc`s that a new registry snapshot takes over from the one it replaces, for
//! every target whose base URL is unchanged: a management change to one endpoint neither
//! forgets that a target is down nor resets a retry budget.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::header::HeaderMap;
use http::uri::Uri;

use crate::model::{COMMON_PATHS, EjectPolicy, RetryPolicy, Timeouts, UpstreamBase};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since this process first asked, a clock every target shares.
pub(crate) fn now_ms() -> u64 {
    // Never 0, which means "never" in the fields below.
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Sets a target's own headers over `headers` (the endpoint's): each name replaced, not
/// appended to.
pub fn set_target_headers(headers: &mut HeaderMap, own: &HeaderMap) {
    if own.is_empty() {
        return;
    }
    for name in own.keys() {
        headers.remove(name);
    }
    for (name, value) in own {
        headers.append(name.clone(), value.clone());
    }
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
/// the recent latencies'.
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
    /// `now_ms` until which the target is out; 0 when it is live.
    ejected_until: AtomicU64,
    /// `now_ms` before which a health check may not bring it back (an upstream's
    /// `Retry-After`).
    not_before: AtomicU64,
    /// `now_ms` of the last failure; 0 for none.
    last_failure: AtomicU64,
    /// The last [`LATENCY_SAMPLES`] times to the response head, in microseconds, and their
    /// median (0 before the first answer).
    recent: Mutex<Recent>,
    latency_us: AtomicU32,
    /// Whether a health check is probing the target.
    probing: AtomicBool,
    /// What a health check sends, from the newest registry snapshot that holds the target.
    probe: Mutex<Option<Arc<Probe>>>,
}

/// How many recent latencies the estimate is the median of.
pub const LATENCY_SAMPLES: usize = 8;

#[derive(Debug, Default)]
struct Recent {
    samples: [u32; LATENCY_SAMPLES],
    next: usize,
    len: usize,
}

/// A health check of one target, as the newest registry snapshot describes it.
#[derive(Debug)]
pub struct Probe {
    /// `GET` this.
    pub uri: Uri,
    /// With these headers (the endpoint's and the target's, templates left out).
    pub headers: HeaderMap,
    /// Every this long.
    pub interval: Duration,
    /// The target's timeouts.
    pub timeouts: Timeouts,
    /// The target's TLS settings.
    #[cfg(feature = "forward")]
    pub tls: Option<Arc<crate::tls::TlsSettings>>,
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
    /// Its latency estimate (the median time to the response head of its recent answers).
    pub latency: Option<Duration>,
}

impl TargetHealth {
    /// Whether the target is in its pool at `now` (from `now_ms`).
    pub fn is_live(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// The `now_ms` of its last failure, 0 for none.
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

    /// The latency estimate in nanoseconds: the median time to the response head of its last
    /// [`LATENCY_SAMPLES`] answers, 0 before the first.
    ///
    /// A median, not the peak-EWMA of tower's balancer: the time to the head of an LLM answer
    /// depends on the answer (a long non-streaming completion takes seconds), so one slow
    /// answer must not make a target look slow for seconds, while a target that is slow answer
    /// after answer must, within a few answers.
    pub fn cost_ns(&self) -> f64 {
        f64::from(self.latency_us.load(Ordering::Relaxed)) * 1e3
    }

    /// A response head arrived after `rtt`, from an answer that was not a failure: the
    /// failure count resets and the latency estimate takes it.
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

    /// The latency estimate takes `rtt` (a slow failure counts too).
    pub fn observe(&self, rtt: Duration) {
        let us = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX).max(1);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let r = &mut *recent;
        r.samples[r.next] = us;
        r.next = (r.next + 1) % LATENCY_SAMPLES;
        r.len = (r.len + 1).min(LATENCY_SAMPLES);
        let mut sorted = [0u32; LATENCY_SAMPLES];
        sorted[..r.len].copy_from_slice(&r.samples[..r.len]);
        sorted[..r.len].sort_unstable();
        let median = sorted[(r.len - 1) / 2];
        drop(recent);
        self.latency_us.store(median, Ordering::Relaxed);
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

    /// A failure: the target is ejected (the answer says for how long and why) when it has
    /// failed `policy.consecutive_failures` times in a row, or `policy.error_percent` of its
    /// last `policy.window` attempts failed. A failure while it is out (a request that was in
    /// flight) is not counted; of failures at once, one ejects.
    pub fn failed(&self, policy: &EjectPolicy) -> Option<(Duration, Ejection)> {
        let now = now_ms();
        self.last_failure.store(now, Ordering::Relaxed);
        let was = self.ejected_until.load(Ordering::Relaxed);
        if was > now {
            return None;
        }
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
        let n = self.ejections.load(Ordering::Relaxed).min(16);
        let cool_down = policy
            .base
            .saturating_mul(1 << n)
            .min(policy.max.max(policy.base));
        let until = now.saturating_add(millis(cool_down));
        // Only the failure that takes it out counts the ejection.
        if self
            .ejected_until
            .compare_exchange(was, until, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        // Judged afresh when it comes back.
        self.outcomes.store(0, Ordering::Relaxed);
        self.outcomes_seen.store(0, Ordering::Relaxed);
        Some((cool_down, reason))
    }

    /// An upstream's `Retry-After`: out for `wait` (at most `policy.max`), and no health check
    /// brings it back before then. `None` if it was out for as long already.
    pub fn retry_after(&self, wait: Duration, policy: &EjectPolicy) -> Option<Duration> {
        let now = now_ms();
        self.last_failure.store(now, Ordering::Relaxed);
        let wait = wait.min(policy.max);
        let until = now.saturating_add(millis(wait));
        self.not_before.fetch_max(until, Ordering::Relaxed);
        let was = self.ejected_until.fetch_max(until, Ordering::AcqRel);
        (was < until).then_some(wait)
    }

    /// Back in the pool (a health check passed), unless an upstream's `Retry-After` says not
    /// yet: then at that time.
    pub fn recover(&self) {
        let not_before = self.not_before.load(Ordering::Relaxed);
        let until = if not_before > now_ms() { not_before } else { 0 };
        self.ejected_until.store(until, Ordering::Relaxed);
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

    /// What a health check sends now: the newest snapshot's; `None` if it has none.
    pub fn probe(&self) -> Option<Arc<Probe>> {
        self.probe.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn set_probe(&self, probe: Option<Arc<Probe>>) {
        *self.probe.lock().unwrap_or_else(|e| e.into_inner()) = probe;
    }

    /// The state the management API shows.
    pub fn state(&self) -> TargetState {
        let now = now_ms();
        let until = self.ejected_until.load(Ordering::Relaxed);
        let latency = self.latency_us.load(Ordering::Relaxed);
        TargetState {
            ejected_until: (until > now)
                .then(|| SystemTime::now() + Duration::from_millis(until - now)),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            in_flight: self.in_flight(),
            latency: (latency > 0).then(|| Duration::from_micros(u64::from(latency))),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
