//! The in-memory limiter: a GCRA per `requests_per_minute` and `tokens_per_minute` bucket, a
//! counter per day or month budget and per `concurrent_streams` bucket, behind one lock taken
//! once per request (and once more when a response under a token limit settles).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use super::plan::{
    Allowed, Decision, Limit, MINUTE, Quota, Quotas, Reading, Refusal, allowed_counter, count,
    gcra, scope_label, token_time,
};
use super::ticket::{Settle, Ticket};
use crate::ext::Principal;
use crate::model::{LimitRules, RateLimits};
use crate::registry::SharedLimitRules;

pub(super) struct MemoryLimiter {
    /// Backend, policy, prefix, reservation; `rules` is left empty (they come from `rules`).
    settings: RateLimits,
    rules: SharedLimitRules,
    compiled: ArcSwap<Compiled>,
    start: Instant,
    state: Mutex<State>,
}

/// The rules in force, with what the hot path needs of each.
pub(super) struct Compiled {
    pub(super) rules: Arc<LimitRules>,
    /// Each rule's `scope` label in the metrics (and its name in Redis).
    pub(super) labels: Vec<Arc<str>>,
    /// Each rule's counter id: the same for the same scope and endpoint whatever the rule's
    /// place or values, so a change of the rules keeps the counts.
    ids: Vec<u32>,
    /// Each rule's counter of allowed requests in the metrics.
    pub(super) allowed: Vec<Allowed>,
}

/// The counters of one limit of one rule (by id) for one bucket.
type Key = (u32, u8, Arc<str>);

#[derive(Default)]
struct State {
    /// The theoretical arrival time (since `start`) of each requests or tokens per minute
    /// bucket.
    tat: HashMap<Key, Duration, Fx>,
    /// The window and the tokens used in it, of each day or month budget.
    budget: HashMap<Key, (u64, u64), Fx>,
    /// The streams in flight of each stream bucket.
    streams: HashMap<Key, Arc<AtomicU32>, Fx>,
    checks: u64,
    /// The id of every scope label seen.
    ids: HashMap<Arc<str>, u32>,
}

/// One token charge to settle when the response ends.
struct TokenCharge {
    key: Key,
    /// When it was charged (since `start`): a refund comes only while the reservation is still
    /// in the minute it was charged to.
    at: Duration,
    /// A tokens-per-minute limit's value (`None` for a budget).
    per_minute: Option<u64>,
    /// The budget's window when it was charged (a settlement after it ended is dropped).
    window: Option<u64>,
}

impl fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("rules", &self.rules.load_guard().rules.len())
            .finish_non_exhaustive()
    }
}

fn kind(limit: Limit) -> u8 {
    match limit {
        Limit::Requests(_) => 0,
        Limit::TokensPerMinute(_) => 1,
        Limit::TokensPerDay(_) => 2,
        Limit::TokensPerMonth(_) => 3,
        Limit::Streams(_) => 4,
    }
}

impl MemoryLimiter {
    pub(super) fn new(mut settings: RateLimits, rules: SharedLimitRules) -> Self {
        settings.rules = Vec::new();
        let mut state = State::default();
        let compiled = compile(&mut state, rules.load());
        Self {
            settings,
            rules,
            compiled: ArcSwap::from_pointee(compiled),
            start: Instant::now(),
            state: Mutex::new(state),
        }
    }

    /// Backend, policy, prefix and reservation (without the rules).
    pub(super) fn settings(&self) -> &RateLimits {
        &self.settings
    }

    /// The rules in force, compiled once per change.
    pub(super) fn compiled(&self) -> arc_swap::Guard<Arc<Compiled>> {
        let current = self.compiled.load();
        let rules = self.rules.load_guard();
        if Arc::ptr_eq(&current.rules, &rules) {
            return current;
        }
        drop(current);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let next = compile(&mut state, Arc::clone(&rules));
        self.compiled.store(Arc::new(next));
        self.compiled.load()
    }

    /// Checks every limit that covers `principal` calling `route` (account, endpoint); charges
    /// them only if none refuses. One lock; no allocation unless a stream slot or tokens are
    /// taken.
    pub(super) fn check(self: &Arc<Self>, principal: &Principal, route: (&str, &str)) -> Decision {
        let (account, endpoint) = route;
        let compiled = self.compiled();
        let rules = &compiled.rules.rules;
        if rules.is_empty() {
            return Decision::Unlimited;
        }
        let now = self.start.elapsed();
        let mut wall: Option<SystemTime> = None;
        let reserve = self.settings.reserve_tokens;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // First every covering limit is checked; only if none refuses are they charged.
        let mut covered = false;
        for (i, rule) in rules.iter().enumerate() {
            let Some(bucket) = rule.covers(principal, account, endpoint) else {
                continue;
            };
            covered = true;
            for limit in Limit::of(rule) {
                let key = (compiled.ids[i], kind(limit), bucket.clone());
                let retry_after = match limit {
                    Limit::Requests(rpm) => {
                        let (_, tau) = gcra(rpm);
                        let tat = state.tat.get(&key).copied().unwrap_or(now).max(now);
                        let allowed_at = tat.saturating_sub(tau);
                        (now < allowed_at).then(|| allowed_at - now)
                    }
                    Limit::TokensPerMinute(_) => {
                        let tat = state.tat.get(&key).copied().unwrap_or(now).max(now);
                        // The minute is full: it has room again once the oldest tokens age out.
                        (tat >= now + MINUTE).then(|| tat - MINUTE - now + Duration::from_millis(1))
                    }
                    Limit::TokensPerDay(max) | Limit::TokensPerMonth(max) => {
                        let window = limit.window(*wall.get_or_insert_with(SystemTime::now));
                        let window = window.expect("a budget has a window");
                        let used = match state.budget.get(&key) {
                            Some(&(id, used)) if id == window.id => used,
                            _ => 0,
                        };
                        (used >= max).then_some(window.left)
                    }
                    Limit::Streams(max) => state
                        .streams
                        .get(&key)
                        .is_some_and(|slot| slot.load(Ordering::Acquire) >= max)
                        .then_some(Duration::from_secs(1)),
                };
                if let Some(retry_after) = retry_after {
                    count(&compiled.labels[i], "refused", limit.name());
                    return Decision::Refused(Refusal::new(
                        rule,
                        limit,
                        principal,
                        route,
                        retry_after,
                    ));
                }
            }
        }
        if !covered {
            return Decision::Unlimited;
        }
        let mut ticket = Ticket::default();
        let mut quotas = Quotas::default();
        let mut charges: Vec<TokenCharge> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let Some(bucket) = rule.covers(principal, account, endpoint) else {
                continue;
            };
            compiled.allowed[i].increment(1);
            for limit in Limit::of(rule) {
                let key = (compiled.ids[i], kind(limit), bucket.clone());
                match limit {
                    Limit::Requests(rpm) => {
                        let (t, _) = gcra(rpm);
                        let tat = state.tat.entry(key).or_insert(now);
                        *tat = (*tat).max(now) + t;
                        quotas.add(limit, limit.quota(Reading::Ahead(*tat - now)));
                    }
                    Limit::TokensPerMinute(per_minute) => {
                        let tat = state.tat.entry(key.clone()).or_insert(now);
                        *tat = (*tat).max(now) + token_time(reserve, per_minute);
                        quotas.add(limit, limit.quota(Reading::Ahead(*tat - now)));
                        charges.push(TokenCharge {
                            key,
                            at: now,
                            per_minute: Some(per_minute),
                            window: None,
                        });
                    }
                    Limit::TokensPerDay(_) | Limit::TokensPerMonth(_) => {
                        let window = limit
                            .window(*wall.get_or_insert_with(SystemTime::now))
                            .expect("a budget has a window");
                        let entry = state.budget.entry(key.clone()).or_insert((window.id, 0));
                        if entry.0 != window.id {
                            *entry = (window.id, 0);
                        }
                        entry.1 = entry.1.saturating_add(reserve);
                        quotas.add(limit, limit.quota(Reading::Used(entry.1, window.left)));
                        charges.push(TokenCharge {
                            key,
                            at: now,
                            per_minute: None,
                            window: Some(window.id),
                        });
                    }
                    Limit::Streams(_) => {
                        // Taken under the lock, so two requests never both take the last slot.
                        let slot = state.streams.entry(key).or_default().clone();
                        slot.fetch_add(1, Ordering::AcqRel);
                        ticket.slots.push(slot);
                    }
                }
            }
        }
        state.checks += 1;
        if state.checks % 4096 == 0 {
            // A bucket whose arrival time has passed is as good as new; a stream bucket with no
            // stream and no holder is not needed; a budget of a past window is spent history.
            state.tat.retain(|_, tat| *tat > now);
            state
                .streams
                .retain(|_, slot| Arc::strong_count(slot) > 1 || slot.load(Ordering::Acquire) > 0);
            if let Some(wall) = wall {
                state.budget.retain(|(_, k, _), (id, _)| {
                    let limit = if *k == 2 {
                        Limit::TokensPerDay(1)
                    } else {
                        Limit::TokensPerMonth(1)
                    };
                    limit.window(wall).is_some_and(|w| w.id == *id)
                });
            }
        }
        drop(state);
        if !charges.is_empty() {
            let limiter = self.clone();
            ticket.settle = Some(Arc::new(Settle::new(Some(reserve), move |delta| {
                limiter.settle(&charges, delta);
            })));
        }
        Decision::Allowed { ticket, quotas }
    }

    /// Corrects the token charges of a response by `delta` (what it used minus what it
    /// reserved).
    fn settle(&self, charges: &[TokenCharge], delta: i64) {
        if delta == 0 {
            return;
        }
        let now = self.start.elapsed();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for charge in charges {
            match charge.window {
                None => {
                    let per_minute = charge.per_minute.unwrap_or(1);
                    let time = token_time(delta.unsigned_abs(), per_minute);
                    if delta > 0 {
                        // A bucket gone idle (and collected) meanwhile starts again from now.
                        let tat = state.tat.entry(charge.key.clone()).or_insert(now);
                        *tat = (*tat).max(now) + time;
                    } else if now.saturating_sub(charge.at) < MINUTE
                        && let Some(tat) = state.tat.get_mut(&charge.key)
                    {
                        // A refund of a reservation that has aged out of the minute would make
                        // room that other traffic filled; and a bucket never goes below empty.
                        *tat = tat.saturating_sub(time).max(now);
                    }
                }
                Some(window) => {
                    if let Some((id, used)) = state.budget.get_mut(&charge.key)
                        && *id == window
                    {
                        *used = used.saturating_add_signed(delta);
                    }
                }
            }
        }
    }

    /// The current counts of every limit of rule `rule` for bucket `bucket`, without charging.
    pub(super) fn peek(&self, rule: usize, bucket: &Arc<str>) -> Vec<(Limit, Quota)> {
        let compiled = self.compiled();
        let Some(r) = compiled.rules.rules.get(rule) else {
            return Vec::new();
        };
        let id = compiled.ids[rule];
        let now = self.start.elapsed();
        let wall = SystemTime::now();
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        Limit::of(r)
            .map(|limit| {
                let key = (id, kind(limit), bucket.clone());
                let reading = match limit {
                    Limit::Requests(_) | Limit::TokensPerMinute(_) => Reading::Ahead(
                        state
                            .tat
                            .get(&key)
                            .map_or(Duration::ZERO, |tat| tat.saturating_sub(now)),
                    ),
                    Limit::TokensPerDay(_) | Limit::TokensPerMonth(_) => {
                        let window = limit.window(wall).expect("a budget has a window");
                        let used = match state.budget.get(&key) {
                            Some(&(id, used)) if id == window.id => used,
                            _ => 0,
                        };
                        Reading::Used(used, window.left)
                    }
                    Limit::Streams(_) => Reading::Busy(
                        state
                            .streams
                            .get(&key)
                            .map_or(0, |slot| u64::from(slot.load(Ordering::Acquire))),
                    ),
                };
                let quota = limit.quota(reading);
                (limit, quota)
            })
            .collect()
    }
}

/// The hasher of the counters: FxHash (rustc's), several times cheaper than SipHash on these
/// short keys. SipHash guards against keys chosen to collide; these keys are not chosen by
/// callers: a bucket is the key id, team or subject of an authenticated caller, from the
/// configuration or the store.
#[derive(Clone, Copy, Default)]
struct Fx;

impl BuildHasher for Fx {
    type Hasher = FxHasher;

    fn build_hasher(&self) -> FxHasher {
        FxHasher(0)
    }
}

struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("eight bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What the hot path needs of `rules`: each rule's label, and its counter id (the same for
/// the same label, from the interner in `state`).
fn compile(state: &mut State, rules: Arc<LimitRules>) -> Compiled {
    let labels: Vec<Arc<str>> = rules.rules.iter().map(scope_label).collect();
    let ids = labels
        .iter()
        .map(|label| {
            let next = u32::try_from(state.ids.len()).unwrap_or(u32::MAX);
            *state.ids.entry(label.clone()).or_insert(next)
        })
        .collect();
    let allowed = labels.iter().map(allowed_counter).collect();
    Compiled {
        rules,
        labels,
        ids,
        allowed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LimitScope, RateLimitRule};

    fn limiter(rules: Vec<RateLimitRule>) -> Arc<MemoryLimiter> {
        Arc::new(MemoryLimiter::new(
            RateLimits {
                reserve_tokens: 100,
                ..RateLimits::default()
            },
            SharedLimitRules::new(LimitRules::new(rules)),
        ))
    }

    const NO_ROUTE: (&str, &str) = ("", "");

    fn refused(d: &Decision) -> bool {
        matches!(d, Decision::Refused(_))
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
            match l.check(who, NO_ROUTE) {
                Decision::Allowed { quotas, .. } => {
                    remaining.push(quotas.requests.unwrap().remaining)
                }
                _ => panic!("request {i} refused"),
            }
        }
        assert_eq!(remaining, [5, 4, 3, 2, 1, 0]);
        match l.check(&a, NO_ROUTE) {
            Decision::Refused(r) => {
                assert!(r.retry_after <= Duration::from_secs(10), "{r:?}");
                assert!(r.retry_after > Duration::from_secs(9), "{r:?}");
                assert_eq!(r.bucket, "team:research");
            }
            _ => panic!("the seventh was admitted"),
        }
        assert!(
            matches!(l.check(&c, NO_ROUTE), Decision::Unlimited),
            "another team"
        );
    }

    #[test]
    fn all_is_one_bucket_for_every_caller_of_an_endpoint() {
        let l = limiter(vec![RateLimitRule {
            endpoint: Some(("acct".into(), "inference".into())),
            requests_per_minute: Some(2),
            ..RateLimitRule::new(LimitScope::All)
        }]);
        let a = Principal::new("a", "a@x", [] as [&str; 0]);
        let b = Principal::new("b", "b@x", ["t"]);
        assert!(!refused(&l.check(&a, ("acct", "inference"))));
        assert!(!refused(&l.check(&b, ("acct", "inference"))));
        match l.check(&a, ("acct", "inference")) {
            Decision::Refused(r) => assert_eq!(r.bucket, "all callers@acct/inference"),
            _ => panic!("a third request to the endpoint was admitted"),
        }
        assert!(matches!(
            l.check(&a, ("acct", "other")),
            Decision::Unlimited
        ));
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
        let first = l.check(&p, NO_ROUTE);
        assert!(!refused(&first));
        assert!(refused(&l.check(&p, NO_ROUTE)), "one stream at a time");
        let remaining = |d: Decision| match d {
            Decision::Allowed { quotas, .. } => quotas.requests.unwrap().remaining,
            _ => panic!("refused"),
        };
        drop(first);
        assert_eq!(
            remaining(l.check(&p, NO_ROUTE)),
            98,
            "the refused request was not charged"
        );
    }

    fn allowed(d: Decision) -> (Ticket, Quotas) {
        match d {
            Decision::Allowed { ticket, quotas } => (ticket, quotas),
            Decision::Refused(r) => panic!("refused: {}", r.message()),
            Decision::Unlimited | Decision::Unavailable => panic!("not admitted"),
        }
    }

    #[test]
    fn a_budget_reserves_settles_and_then_refuses() {
        let l = limiter(vec![RateLimitRule {
            tokens_per_day: Some(1000),
            ..RateLimitRule::new("team:research".parse().unwrap())
        }]);
        let p = Principal::new("a", "a@x", ["research"]);
        // Reserved 100, used 700.
        let (ticket, quotas) = allowed(l.check(&p, NO_ROUTE));
        assert_eq!(quotas.tokens.unwrap().remaining, 900);
        let report = ticket
            .usage_report()
            .expect("a token limit asks for the count");
        report.report(700);
        drop((ticket, report));
        // 700 used: one more may start, and two in flight reserve 100 each.
        let (first, quotas) = allowed(l.check(&p, NO_ROUTE));
        assert_eq!(quotas.tokens.unwrap().remaining, 200);
        let (second, _) = allowed(l.check(&p, NO_ROUTE));
        // The first reports 250, the second never reports (a client gone): its 100 stand.
        let report = first.usage_report().unwrap();
        report.report(250);
        drop((first, report, second));
        match l.check(&p, NO_ROUTE) {
            Decision::Refused(r) => {
                assert_eq!(r.limit.refusal_code(), "insufficient_quota");
                assert!(r.retry_after <= Duration::from_secs(86_400));
                assert!(
                    r.message().contains("1000 tokens per day"),
                    "{}",
                    r.message()
                );
            }
            _ => panic!("the spent budget admitted a request"),
        }
        let peek = l.peek(0, &Arc::from("research"));
        assert_eq!(peek[0].1.remaining, 0, "1050 of 1000 used");
    }

    #[test]
    fn a_settlement_charges_a_bucket_collected_meanwhile_and_refunds_only_within_the_minute() {
        let l = limiter(vec![RateLimitRule {
            tokens_per_minute: Some(6000),
            ..RateLimitRule::new(LimitScope::Everyone)
        }]);
        let p = Principal::new("a", "a@x", [] as [&str; 0]);
        let (ticket, _) = allowed(l.check(&p, NO_ROUTE));
        // The bucket is collected (idle) while the long response runs.
        l.state.lock().unwrap().tat.clear();
        let report = ticket.usage_report().unwrap();
        report.report(6200);
        drop((ticket, report));
        assert!(
            refused(&l.check(&p, NO_ROUTE)),
            "the 6100 tokens over the reservation were charged: a full minute and more"
        );
        // A refund never takes a bucket below empty.
        let l = limiter(vec![RateLimitRule {
            tokens_per_minute: Some(6000),
            ..RateLimitRule::new(LimitScope::Everyone)
        }]);
        let (ticket, _) = allowed(l.check(&p, NO_ROUTE));
        let report = ticket.usage_report().unwrap();
        report.report(0);
        drop((ticket, report));
        let (_, quotas) = allowed(l.check(&p, NO_ROUTE));
        assert_eq!(
            quotas.tokens.unwrap().remaining,
            5900,
            "only this request's 100 are held"
        );
    }

    #[test]
    fn tokens_per_minute_refill() {
        let l = limiter(vec![RateLimitRule {
            tokens_per_minute: Some(6000),
            ..RateLimitRule::new(LimitScope::Everyone)
        }]);
        let p = Principal::new("a", "a@x", [] as [&str; 0]);
        let (ticket, _) = allowed(l.check(&p, NO_ROUTE));
        let report = ticket.usage_report().unwrap();
        report.report(6100);
        drop((ticket, report));
        let Decision::Refused(r) = l.check(&p, NO_ROUTE) else {
            panic!("a full minute admitted a request");
        };
        assert_eq!(r.limit.refusal_code(), "rate_limit_exceeded");
        // 6100 tokens in a minute of 6000: room again once 100 have aged out, in a second.
        assert!(r.retry_after <= Duration::from_millis(1001), "{r:?}");
        assert!(r.retry_after > Duration::from_millis(900), "{r:?}");
    }
}
