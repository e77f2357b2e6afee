//! Requests and tokens per endpoint over the last day, counted in this process: what the
//! console's usage charts show.
//!
//! One bucket a minute for 24 hours per endpoint, filled by the usage tap when a response
//! ends (one short lock). Counts are this replica's: behind a load balancer, each replica
//! shows what it served.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Minutes kept.
const MINUTES: usize = 24 * 60;

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// The minute (since the Unix epoch) the counts are of; another minute's bucket is stale.
    minute: u64,
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
}

/// An endpoint's minutes, by its account and name.
type Rings = HashMap<(Arc<str>, Arc<str>), Box<[Bucket]>>;

/// Requests and tokens per endpoint over the last day, a bucket a minute, counted in this
/// process (each replica counts what it served).
#[derive(Default)]
pub struct UsageCounts {
    endpoints: Mutex<Rings>,
}

/// What one endpoint served over a span of time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Calls whose response ended.
    pub requests: u64,
    /// Prompt tokens the responses reported.
    pub input_tokens: u64,
    /// Completion tokens the responses reported.
    pub output_tokens: u64,
}

/// One endpoint's counts: the last hour by minute, the last day by hour (oldest first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointCounts {
    /// The provider account.
    pub account: Arc<str>,
    /// The endpoint.
    pub endpoint: Arc<str>,
    /// The last 60 minutes, one entry a minute, the current minute last.
    pub last_hour: Vec<Totals>,
    /// The last 24 hours, one entry an hour, the current hour last.
    pub last_day: Vec<Totals>,
}

fn minute_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

impl UsageCounts {
    /// Counts one call of `account/endpoint` now.
    pub fn record(&self, account: &Arc<str>, endpoint: &Arc<str>, input: u64, output: u64) {
        self.record_at(minute_now(), account, endpoint, input, output);
    }

    fn record_at(
        &self,
        minute: u64,
        account: &Arc<str>,
        endpoint: &Arc<str>,
        input: u64,
        output: u64,
    ) {
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let ring = map
            .entry((account.clone(), endpoint.clone()))
            .or_insert_with(|| vec![Bucket::default(); MINUTES].into_boxed_slice());
        let b = &mut ring[(minute % MINUTES as u64) as usize];
        if b.minute != minute {
            *b = Bucket {
                minute,
                ..Bucket::default()
            };
        }
        b.requests += 1;
        b.input_tokens += input;
        b.output_tokens += output;
    }

    /// Every endpoint's counts, now.
    pub fn snapshot(&self) -> Vec<EndpointCounts> {
        self.snapshot_at(minute_now(), |_, _| true)
    }

    /// The counts of the endpoints `wanted` says yes to, now. Their minutes are copied out of
    /// the lock the requests take, and added up outside it.
    pub fn snapshot_where(&self, wanted: impl Fn(&str, &str) -> bool) -> Vec<EndpointCounts> {
        self.snapshot_at(minute_now(), wanted)
    }

    fn snapshot_at(&self, now: u64, wanted: impl Fn(&str, &str) -> bool) -> Vec<EndpointCounts> {
        let copied: Rings = {
            let map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            map.iter()
                .filter(|((a, e), _)| wanted(a, e))
                .map(|(k, ring)| (k.clone(), ring.clone()))
                .collect()
        };
        let mut out: Vec<EndpointCounts> = copied
            .iter()
            .map(|((account, endpoint), ring)| {
                let at = |minute: u64| {
                    let b = ring[(minute % MINUTES as u64) as usize];
                    (b.minute == minute).then_some(b)
                };
                let add = |t: &mut Totals, b: Bucket| {
                    t.requests += b.requests;
                    t.input_tokens += b.input_tokens;
                    t.output_tokens += b.output_tokens;
                };
                let last_hour = (0..60u64)
                    .rev()
                    .map(|ago| {
                        let mut t = Totals::default();
                        if let Some(b) = now.checked_sub(ago).and_then(at) {
                            add(&mut t, b);
                        }
                        t
                    })
                    .collect();
                let this_hour = now / 60;
                let last_day = (0..24u64)
                    .rev()
                    .map(|ago| {
                        let mut t = Totals::default();
                        let Some(hour) = this_hour.checked_sub(ago) else {
                            return t;
                        };
                        for minute in hour * 60..hour * 60 + 60 {
                            if minute <= now
                                && now - minute < MINUTES as u64
                                && let Some(b) = at(minute)
                            {
                                add(&mut t, b);
                            }
                        }
                        t
                    })
                    .collect();
                EndpointCounts {
                    account: account.clone(),
                    endpoint: endpoint.clone(),
                    last_hour,
                    last_day,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.account, &a.endpoint).cmp(&(&b.account, &b.endpoint)));
        out
    }
}

impl std::fmt::Debug for UsageCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageCounts").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_and_hours_add_up_and_old_minutes_fall_out() {
        let c = UsageCounts::default();
        let (a, e): (Arc<str>, Arc<str>) = ("acct".into(), "ep".into());
        let now = 1_000_000;
        c.record_at(now, &a, &e, 10, 2);
        c.record_at(now, &a, &e, 5, 1);
        c.record_at(now - 1, &a, &e, 1, 1);
        c.record_at(now - 90, &a, &e, 7, 7);
        // A day and more ago: reused buckets, not counted.
        c.record_at(now - MINUTES as u64 - 3, &a, &e, 100, 100);
        let s = c.snapshot_at(now, |_, _| true);
        assert_eq!(s.len(), 1);
        let hour = &s[0].last_hour;
        assert_eq!(hour.len(), 60);
        assert_eq!(
            hour[59],
            Totals {
                requests: 2,
                input_tokens: 15,
                output_tokens: 3
            }
        );
        assert_eq!(hour[58].requests, 1);
        let day: u64 = s[0].last_day.iter().map(|t| t.requests).sum();
        assert_eq!(day, 4, "the call of more than a day ago is gone");
        assert_eq!(
            s[0].last_day.iter().map(|t| t.input_tokens).sum::<u64>(),
            23
        );
    }
}
