//! The in-memory limiter: a GCRA per `requests_per_minute` bucket and a counter per
//! `concurrent_streams` bucket, behind one lock taken once per request.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::RequestQuota;
use crate::ext::Principal;
use crate::model::RateLimits;

/// What a request gets.
pub(super) enum Decision {
    /// No rule covers it.
    Unlimited,
    /// It may go on, holding these stream slots until its body ends.
    Allowed {
        permits: Permits,
        requests: Option<RequestQuota>,
    },
    /// It is over a limit: when to try again, and which limit.
    Refused { retry_after: Duration, what: String },
}

/// The concurrent-stream slots a request holds; dropping them frees them.
pub(crate) struct Permits(Vec<Arc<AtomicU32>>);

impl Drop for Permits {
    fn drop(&mut self) {
        for slot in &self.0 {
            slot.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl fmt::Debug for Permits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Permits").field(&self.0.len()).finish()
    }
}

pub(super) struct MemoryLimiter {
    limits: RateLimits,
    start: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The theoretical arrival time of each request bucket (rule, bucket id), since `start`.
    tat: HashMap<(usize, Arc<str>), Duration>,
    /// The streams in flight of each stream bucket (rule, bucket id).
    streams: HashMap<(usize, Arc<str>), Arc<AtomicU32>>,
    checks: u64,
}

impl fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("rules", &self.limits.rules.len())
            .finish_non_exhaustive()
    }
}

const MINUTE: Duration = Duration::from_secs(60);

impl MemoryLimiter {
    pub(super) fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            start: Instant::now(),
            state: Mutex::new(State::default()),
        }
    }

    pub(super) fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// Checks every rule that covers `principal` calling `route` (account, endpoint); charges
    /// them only if none refuses. One lock, no allocation unless a stream slot is taken.
    pub(super) fn check(&self, principal: &Principal, route: Option<(&str, &str)>) -> Decision {
        let (account, endpoint) = route.unwrap_or(("", ""));
        let now = self.start.elapsed();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // First every covering rule is checked; only if none refuses are they charged.
        let mut covered = false;
        for (i, rule) in self.limits.rules.iter().enumerate() {
            let Some(bucket) = rule.covers(principal, account, endpoint) else {
                continue;
            };
            covered = true;
            // Said in a refusal only.
            let name = || {
                rule.bucket(principal, account, endpoint)
                    .unwrap_or_default()
            };
            if let Some(rpm) = rule.requests_per_minute {
                let (_, tau) = gcra(rpm);
                let key = (i, bucket.clone());
                let tat = state.tat.get(&key).copied().unwrap_or(now).max(now);
                let allowed_at = tat.saturating_sub(tau);
                if now < allowed_at {
                    return Decision::Refused {
                        retry_after: allowed_at - now,
                        what: format!("{rpm} requests per minute for {}", name()),
                    };
                }
            }
            if let Some(max) = rule.concurrent_streams {
                let busy = state
                    .streams
                    .get(&(i, bucket))
                    .is_some_and(|slot| slot.load(Ordering::Acquire) >= max);
                if busy {
                    return Decision::Refused {
                        retry_after: Duration::from_secs(1),
                        what: format!("{max} concurrent streams for {}", name()),
                    };
                }
            }
        }
        if !covered {
            return Decision::Unlimited;
        }
        let mut slots: Vec<Arc<AtomicU32>> = Vec::new();
        let mut strictest: Option<RequestQuota> = None;
        for (i, rule) in self.limits.rules.iter().enumerate() {
            let Some(bucket) = rule.covers(principal, account, endpoint) else {
                continue;
            };
            if let Some(rpm) = rule.requests_per_minute {
                let (t, tau) = gcra(rpm);
                let tat = state.tat.entry((i, bucket.clone())).or_insert(now);
                let next = (*tat).max(now) + t;
                *tat = next;
                let remaining = if next > now + tau {
                    0
                } else {
                    let slack = (now + tau - next).as_nanos() / t.as_nanos().max(1);
                    u32::try_from(slack + 1).unwrap_or(u32::MAX).min(rpm)
                };
                if strictest.is_none_or(|s| remaining < s.remaining) {
                    strictest = Some(RequestQuota {
                        limit: rpm,
                        remaining,
                        reset: next - now,
                    });
                }
            }
            if rule.concurrent_streams.is_some() {
                // Taken under the lock, so two requests never both take the last slot.
                let slot = state.streams.entry((i, bucket)).or_default().clone();
                slot.fetch_add(1, Ordering::AcqRel);
                slots.push(slot);
            }
        }
        state.checks += 1;
        if state.checks % 4096 == 0 {
            // A bucket whose arrival time has passed is as good as new; a stream bucket with no
            // stream and no holder is not needed.
            state.tat.retain(|_, tat| *tat > now);
            state
                .streams
                .retain(|_, slot| Arc::strong_count(slot) > 1 || slot.load(Ordering::Acquire) > 0);
        }
        Decision::Allowed {
            permits: Permits(slots),
            requests: strictest,
        }
    }
}

/// The emission interval and the burst tolerance of `rpm` requests per minute: at most `rpm`
/// in any minute.
fn gcra(rpm: u32) -> (Duration, Duration) {
    let t = MINUTE / rpm;
    (t, MINUTE - t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LimitScope, RateLimitRule};

    fn limiter(rules: Vec<RateLimitRule>) -> MemoryLimiter {
        MemoryLimiter::new(RateLimits {
            rules,
            ..RateLimits::default()
        })
    }

    fn refused(d: &Decision) -> bool {
        matches!(d, Decision::Refused { .. })
    }

    #[test]
    fn a_minute_admits_the_limit_then_one_per_interval() {
        let l = limiter(vec![RateLimitRule {
            requests_per_minute: Some(6),
            ..RateLimitRule::new("team:research".parse().unwrap())
        }]);
        let a = Principal::new("a", "a@x", ["research"]);
        let b = Principal::new("b", "b@x", ["research"]);
        let c = Principal::new("c", "c@x", ["sales"]);
        let mut remaining = Vec::new();
        for i in 0..6 {
            // Two keys of one team share its bucket.
            let who = if i % 2 == 0 { &a } else { &b };
            match l.check(who, None) {
                Decision::Allowed { requests, .. } => remaining.push(requests.unwrap().remaining),
                _ => panic!("request {i} refused"),
            }
        }
        assert_eq!(remaining, [5, 4, 3, 2, 1, 0]);
        match l.check(&a, None) {
            Decision::Refused { retry_after, .. } => {
                assert!(retry_after <= Duration::from_secs(10), "{retry_after:?}");
                assert!(retry_after > Duration::from_secs(9), "{retry_after:?}");
            }
            _ => panic!("the seventh was admitted"),
        }
        assert!(
            matches!(l.check(&c, None), Decision::Unlimited),
            "another team"
        );
    }

    #[test]
    fn a_refusal_by_one_rule_charges_no_other() {
        let l = limiter(vec![
            RateLimitRule {
                requests_per_minute: Some(100),
                ..RateLimitRule::new(LimitScope::Everyone)
            },
            RateLimitRule {
                concurrent_streams: Some(1),
                ..RateLimitRule::new(LimitScope::Everyone)
            },
        ]);
        let p = Principal::new("a", "a@x", [] as [&str; 0]);
        let first = l.check(&p, None);
        assert!(!refused(&first));
        assert!(refused(&l.check(&p, None)), "one stream at a time");
        let remaining = |d: Decision| match d {
            Decision::Allowed { requests, .. } => requests.unwrap().remaining,
            _ => panic!("refused"),
        };
        drop(first);
        assert_eq!(
            remaining(l.check(&p, None)),
            98,
            "the refused request was not charged"
        );
    }
}
