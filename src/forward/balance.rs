//! Which target of an endpoint's pool the next attempt goes to.
//!
//! Among the live targets of the best priority that has any, two are drawn at random in
//! proportion to their weights (the power of two choices). The first drawn is taken unless the
//! second costs less than half as much, where a target's cost is its latency (the median time
//! to the response head of its last 8 answers, counted as at least 20 ms) times one plus its
//! requests in flight per unit of weight. So targets that answer alike share the traffic
//! exactly by weight (the first draw decides), and a target that is much slower or more loaded
//! than the one it is drawn against loses: its share shrinks without ever dropping to zero, so
//! it is measured again.
//!
//! An attempt after a failure prefers a target not tried yet; with no such live target it
//! takes a live one already tried. When every target is out, the least recently failed one
//! is tried (untried first): a replica never takes a whole pool out of service.

use crate::registry::{Endpoint, Target};

/// A set of target indices (an endpoint has at most 64 targets).
pub(crate) type Tried = u64;

/// The target of the next attempt at `now` (from `registry::now_ms`).
pub(crate) fn pick(ep: &Endpoint, tried: Tried, now: u64) -> usize {
    let targets = ep.targets();
    if targets.len() == 1 {
        return 0;
    }
    let order = ep.by_priority();
    let untried = |k: usize| tried & (1 << k) == 0;
    for fresh_only in [true, false] {
        let mut start = 0;
        while start < order.len() {
            let priority = targets[order[start]].priority();
            let len = order[start..]
                .iter()
                .take_while(|&&k| targets[k].priority() == priority)
                .count();
            let group = &order[start..start + len];
            let eligible =
                |k: usize| (!fresh_only || untried(k)) && targets[k].health().is_live(now);
            if let Some(k) = two_choices(targets, group, eligible) {
                return k;
            }
            start += len;
        }
    }
    order
        .iter()
        .copied()
        .min_by_key(|&k| (!untried(k), targets[k].health().last_failure()))
        .expect("an endpoint has a target")
}

/// The power of two weighted choices among the eligible targets of `group`. Who is eligible
/// is read once: a target ejected meanwhile by another request changes nothing here.
fn two_choices(
    targets: &[Target],
    group: &[usize],
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut candidates = [(0usize, 0u64); crate::model::MAX_TARGETS];
    let mut n = 0;
    let mut total = 0u64;
    for &k in group {
        if eligible(k) {
            let w = u64::from(targets[k].weight());
            total += w;
            candidates[n] = (k, total);
            n += 1;
        }
    }
    match n {
        0 => return None,
        1 => return Some(candidates[0].0),
        _ => {}
    }
    let candidates = &candidates[..n];
    // One random number, two draws: its halves, each scaled to the total weight.
    let r = fastrand::u64(..);
    let draw = |half: u64| {
        let at = (half * total) >> 32;
        candidates
            .iter()
            .find(|(_, upto)| at < *upto)
            .map_or(candidates[n - 1].0, |(k, _)| *k)
    };
    let first = draw(r & 0xffff_ffff);
    let second = draw(r >> 32);
    if first == second || cost(&targets[second]) * 2.0 >= cost(&targets[first]) {
        Some(first)
    } else {
        Some(second)
    }
}

/// Latencies below this count as this: an LLM API answers slower, and below it the jitter of a
/// loopback or a LAN would only be noise that overrides the weights.
const LATENCY_FLOOR_NS: f64 = 20e6;

/// Latency (at least the floor) times load per unit of weight.
fn cost(t: &Target) -> f64 {
    let health = t.health();
    let latency = health.cost_ns().max(LATENCY_FLOOR_NS);
    latency * (1.0 + f64::from(health.in_flight()) / f64::from(t.weight()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{AccountSpec, EndpointSpec, TargetSpec};
    use crate::registry::{EjectPolicy, Registry, now_ms};

    fn pool(targets: &[(u32, u32)]) -> Registry {
        Registry::from_accounts(vec![AccountSpec {
            endpoints: vec![EndpointSpec {
                targets: targets
                    .iter()
                    .enumerate()
                    .map(|(i, &(weight, priority))| TargetSpec {
                        weight,
                        priority,
                        ..TargetSpec::new(format!("http://t{i}"))
                    })
                    .collect(),
                ..EndpointSpec::new("e", "")
            }],
            ..AccountSpec::new("a")
        }])
        .unwrap()
    }

    fn shares(ep: &Endpoint, n: usize) -> Vec<usize> {
        let mut counts = vec![0; ep.targets().len()];
        for _ in 0..n {
            counts[pick(ep, 0, now_ms())] += 1;
        }
        counts
    }

    #[test]
    fn weights_decide_among_targets_that_answer_alike() {
        let r = pool(&[(3, 1), (1, 1), (1, 2)]);
        let ep = r.endpoint("a", "e").unwrap();
        for t in ep.targets() {
            t.health().succeeded(Duration::from_millis(10));
        }
        let counts = shares(ep, 20_000);
        // 3:1 within 2 points, and nothing for the second priority.
        let share = counts[0] as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.02, "{counts:?}");
        assert_eq!(counts[2], 0);
    }

    #[test]
    fn a_slow_or_loaded_target_loses_but_is_still_measured() {
        let r = pool(&[(1, 1), (1, 1)]);
        let ep = r.endpoint("a", "e").unwrap();
        ep.targets()[0].health().succeeded(Duration::from_millis(5));
        ep.targets()[1]
            .health()
            .succeeded(Duration::from_millis(50));
        let counts = shares(ep, 10_000);
        // The slow one wins only when drawn twice: a quarter.
        let slow = counts[1] as f64 / 10_000.0;
        assert!((slow - 0.25).abs() < 0.03, "{counts:?}");
        // Equal latency, but the first has 10 requests in flight.
        let r = pool(&[(1, 1), (1, 1)]);
        let ep = r.endpoint("a", "e").unwrap();
        for t in ep.targets() {
            t.health().succeeded(Duration::from_millis(5));
        }
        let _busy: Vec<_> = (0..10).map(|_| ep.targets()[0].health().start()).collect();
        let counts = shares(ep, 10_000);
        assert!(counts[0] < 3_000, "{counts:?}");
    }

    #[test]
    fn ejected_targets_are_skipped_and_a_pool_is_never_empty() {
        let r = pool(&[(1, 1), (1, 1), (1, 2)]);
        let ep = r.endpoint("a", "e").unwrap();
        let eject = EjectPolicy {
            consecutive_failures: 1,
            ..EjectPolicy::default()
        };
        ep.targets()[0].health().failed(&eject);
        assert_eq!(shares(ep, 200), [0, 200, 0]);
        // The untried live target comes before one tried already.
        assert_eq!(pick(ep, 1 << 1, now_ms()), 2, "falls back to priority 2");
        ep.targets()[1].health().failed(&eject);
        assert_eq!(shares(ep, 200), [0, 0, 200]);
        std::thread::sleep(Duration::from_millis(2));
        ep.targets()[2].health().failed(&eject);
        // All out: the least recently failed.
        assert_eq!(pick(ep, 0, now_ms()), 0);
        assert_eq!(pick(ep, 1, now_ms()), 1, "an untried one first");
        ep.targets()[1].health().recover();
        assert_eq!(shares(ep, 100), [0, 100, 0]);
    }

    #[test]
    fn one_slow_answer_moves_nothing_and_a_slow_target_loses_within_a_few() {
        let r = pool(&[(1, 1), (1, 1)]);
        let ep = r.endpoint("a", "e").unwrap();
        let (a, b) = (ep.targets()[0].health(), ep.targets()[1].health());
        for _ in 0..8 {
            a.succeeded(Duration::from_millis(100));
            b.succeeded(Duration::from_millis(100));
        }
        // A long completion on b (its head after 30 s): the median does not move.
        b.succeeded(Duration::from_secs(30));
        let counts = shares(ep, 10_000);
        let share = counts[1] as f64 / 10_000.0;
        assert!((share - 0.5).abs() < 0.03, "{counts:?}");
        // b turns slow for good: four more slow answers and it loses its draws.
        for _ in 0..4 {
            b.succeeded(Duration::from_millis(400));
        }
        let counts = shares(ep, 10_000);
        let share = counts[1] as f64 / 10_000.0;
        assert!((share - 0.25).abs() < 0.03, "{counts:?}");
    }
}
