//! The Redis limiter: the same limits as in memory, counted in one Redis server that every
//! replica shares.
//!
//! A request costs one round trip: one Lua script checks every limit that covers it and, only
//! if none refuses, charges them all, atomically. Request and tokens-per-minute counters run
//! on the server's clock (`TIME`), so replicas with skewed clocks still agree; a day or month
//! budget's counter is named after its window by the replica's clock (keep the replicas'
//! clocks in sync, as for any log). Every counter expires by itself once it no longer matters
//! (a GCRA when its arrival time has passed, a budget a minute after its window, a stream set
//! after its lease). A response under a token or stream limit settles once more when it ends,
//! off the request's path.
//!
//! While Redis cannot be reached (an error, or no answer within the timeout) the policy
//! decides: *open* counts the request in this replica's memory instead, *closed* answers 503.
//! After a failure the next second goes straight to the policy; then one request at a time
//! tries Redis again while the others keep to the policy, so a hung Redis costs one request
//! the timeout, not all of them. A check whose answer never came may still have run: the
//! stream slot it may have taken is released at once (its other charges stand, erring on the
//! side of the limit).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::memory::{Compiled, MemoryLimiter};
use super::plan::{Decision, Limit, Quota, Quotas, Reading, Refusal, count, covering, gcra};
use super::ticket::{Settle, Ticket};
use crate::ext::Principal;
use crate::model::{OnBackendError, RateLimits};
use crate::registry::SharedLimitRules;

/// How long a request waits for Redis before the policy decides.
const TIMEOUT: Duration = Duration::from_millis(500);
/// After a failure, how long requests go straight to the policy.
const BACKOFF: Duration = Duration::from_secs(1);
/// How long a stream holds its slot if its replica dies before releasing it.
const STREAM_LEASE: Duration = Duration::from_secs(15 * 60);

/// Checks every limit (`KEYS[i]`, with `ARGV[3i+1..3i+3]` = kind, a, b), and charges them all
/// only if none refuses. Kinds: `r` requests GCRA (a = interval µs), `t` tokens per minute
/// (a = µs per token), `q` budget (a = limit, b = TTL ms), `s` streams (a = limit). Answers
/// `{0, i, retry µs}` for a refusal by limit `i`, or `{1, v1, v2, …}`: per limit the arrival
/// time after the charge minus now (µs) for `r`/`t`, the tokens used for `q`, the streams for
/// `s`.
const CHECK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local reserve = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local member = ARGV[3]
local minute = 60000000
local function tat_of(key)
  local v = tonumber(redis.call('GET', key))
  if v == nil or v < now then return now end
  return v
end
for i, key in ipairs(KEYS) do
  local kind = ARGV[3 * i + 1]
  local a = tonumber(ARGV[3 * i + 2])
  if kind == 'r' then
    local allowed_at = tat_of(key) - (minute - a)
    if now < allowed_at then return {0, i, allowed_at - now} end
  elseif kind == 't' then
    local tat = tat_of(key)
    if tat >= now + minute then return {0, i, tat - minute - now + 1000} end
  elseif kind == 'q' then
    local used = tonumber(redis.call('GET', key)) or 0
    if used >= a then return {0, i, 0} end
  elseif kind == 's' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) >= a then return {0, i, 1000000} end
  end
end
local out = {1}
for i, key in ipairs(KEYS) do
  local kind = ARGV[3 * i + 1]
  local a = tonumber(ARGV[3 * i + 2])
  local b = tonumber(ARGV[3 * i + 3])
  if kind == 'r' or kind == 't' then
    local cost = a
    if kind == 't' then cost = reserve * a end
    local tat = tat_of(key) + cost
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
    out[i + 1] = tat - now
  elseif kind == 'q' then
    local used = redis.call('INCRBY', key, reserve)
    if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, b) end
    out[i + 1] = used
  elseif kind == 's' then
    redis.call('ZADD', key, now + lease, member)
    redis.call('PEXPIRE', key, math.ceil(lease / 1000) + 1000)
    out[i + 1] = redis.call('ZCARD', key)
  end
end
return out
";

/// Settles a response: `ARGV[1]` = tokens used minus reserved, `ARGV[2]` = the stream's
/// member, `ARGV[3]` = µs since the charge; per key `ARGV[2i+2..2i+3]` = kind, a (as for the
/// check). A tokens-per-minute counter gone (expired while the response ran) starts again from
/// now; a refund comes only within the minute of the charge, and never below an empty bucket.
const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local delta = tonumber(ARGV[1])
local age = tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
  local kind = ARGV[2 * i + 2]
  local a = tonumber(ARGV[2 * i + 3])
  if kind == 't' and (delta > 0 or (delta < 0 and age < 60000000)) then
    local v = tonumber(redis.call('GET', key))
    if v == nil or v < now then v = now end
    v = v + delta * a
    if v > now then
      redis.call('SET', key, string.format('%.0f', v), 'PX', math.ceil((v - now) / 1000) + 1000)
    else
      redis.call('DEL', key)
    end
  elseif kind == 'q' and delta ~= 0 then
    if redis.call('EXISTS', key) == 1 then
      if redis.call('INCRBY', key, delta) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
    end
  elseif kind == 's' then
    redis.call('ZREM', key, ARGV[2])
  end
end
return 1
";

/// Reads the counters of some limits without charging: per key `ARGV[2i-1..2i]` = kind, a.
/// Answers per limit what the check answers after a charge, for a charge of nothing.
const PEEK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local kind = ARGV[2 * i - 1]
  if kind == 'r' or kind == 't' then
    local v = tonumber(redis.call('GET', key))
    if v == nil or v < now then v = now end
    out[i] = v - now
  elseif kind == 'q' then
    out[i] = tonumber(redis.call('GET', key)) or 0
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    out[i] = redis.call('ZCARD', key)
  end
end
return out
";

pub(super) struct RedisLimiter {
    /// The rules, and the counters used while Redis is away under the open policy.
    local: Arc<MemoryLimiter>,
    client: Client,
    /// Made on first use, inside the runtime.
    conn: OnceLock<ConnectionManager>,
    check: Script,
    settle: Script,
    peek: Script,
    start: Instant,
    /// Milliseconds since `start` until which Redis is not tried.
    down_until: AtomicU64,
    /// Whether the last attempt failed (logged once per outage).
    down: AtomicBool,
    /// Whether a request is trying Redis again after a failure (the others wait for its
    /// answer under the policy, rather than each waiting out the timeout on a hung Redis).
    probing: AtomicBool,
    /// This replica's random prefix of stream members.
    replica: u64,
    streams: AtomicU64,
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client's URL may hold a password.
        f.debug_struct("RedisLimiter")
            .field("rules", &self.local.compiled().rules.rules.len())
            .finish_non_exhaustive()
    }
}

/// One counter of a request, as the scripts see it.
struct Counter {
    rule: usize,
    limit: Limit,
    key: String,
    /// The budget's window, for a budget.
    window: Option<super::plan::Window>,
}

impl Counter {
    fn kind(&self) -> &'static str {
        match self.limit {
            Limit::Requests(_) => "r",
            Limit::TokensPerMinute(_) => "t",
            Limit::TokensPerDay(_) | Limit::TokensPerMonth(_) => "q",
            Limit::Streams(_) => "s",
        }
    }

    /// The script's `a`: the interval of a GCRA in µs, or the limit.
    fn a(&self) -> f64 {
        match self.limit {
            Limit::Requests(rpm) => gcra(rpm).0.as_secs_f64() * 1e6,
            Limit::TokensPerMinute(n) => 60e6 / n.max(1) as f64,
            other => other.value() as f64,
        }
    }
}

impl RedisLimiter {
    /// A limiter on the Redis server at `url`. Nothing connects until the first request.
    pub(super) fn new(
        limits: RateLimits,
        rules: SharedLimitRules,
        url: &str,
    ) -> Result<Self, redis::RedisError> {
        let client = Client::open(url)?;
        Ok(Self {
            local: Arc::new(MemoryLimiter::new(limits, rules)),
            client,
            conn: OnceLock::new(),
            check: Script::new(CHECK),
            settle: Script::new(SETTLE),
            peek: Script::new(PEEK),
            start: Instant::now(),
            down_until: AtomicU64::new(0),
            down: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            replica: RandomState::new().hash_one(std::process::id()),
            streams: AtomicU64::new(0),
        })
    }

    /// Backend, policy, prefix and reservation (without the rules).
    pub(super) fn settings(&self) -> &RateLimits {
        self.local.settings()
    }

    fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF);
        let conn = self.client.get_connection_manager_lazy(config)?;
        Ok(self.conn.get_or_init(|| conn).clone())
    }

    /// The counter of `limit` of rule `rule` for `bucket`: named by the rule's scope and
    /// endpoint (not its place in the list, so reordering or retuning the rules keeps the
    /// counts), the bucket and, for a budget, its window.
    fn counter(
        &self,
        compiled: &Compiled,
        rule: usize,
        bucket: &str,
        limit: Limit,
        wall: SystemTime,
    ) -> Counter {
        let window = limit.window(wall);
        let mut key = format!(
            "{}{}:{}:{bucket}",
            self.settings().key_prefix,
            limit.tag(),
            compiled.labels[rule]
        );
        if let Some(w) = window {
            key.push_str(&format!(":{}", w.id));
        }
        Counter {
            rule,
            limit,
            key,
            window,
        }
    }

    fn counters(
        &self,
        compiled: &Compiled,
        principal: &Principal,
        route: (&str, &str),
    ) -> Vec<Counter> {
        let wall = SystemTime::now();
        covering(&compiled.rules.rules, principal, route)
            .into_iter()
            .map(|(rule, bucket, limit)| self.counter(compiled, rule, &bucket, limit, wall))
            .collect()
    }

    /// Whether Redis is resting after a failure.
    fn resting(&self) -> bool {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        now < self.down_until.load(Ordering::Relaxed)
    }

    fn failed(&self, err: &dyn fmt::Display) {
        let until = self.start.elapsed() + BACKOFF;
        self.down_until.store(
            u64::try_from(until.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if !self.down.swap(true, Ordering::Relaxed) {
            let policy = match self.settings().on_backend_error {
                OnBackendError::Open => "serving, counting in this replica's memory",
                OnBackendError::Closed => "refusing limited requests with 503",
            };
            tracing::warn!(
                target: "tower_gateway::limits",
                error = %err,
                "the rate-limit backend (Redis) cannot be reached: {policy}"
            );
        }
    }

    fn recovered(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(
                target: "tower_gateway::limits",
                "the rate-limit backend (Redis) answers again: limits are shared again"
            );
        }
    }

    /// What the policy says while Redis is away.
    fn fallback(self: &Arc<Self>, principal: &Principal, route: (&str, &str)) -> Decision {
        let open = self.settings().on_backend_error == OnBackendError::Open;
        backend_error(open);
        if open {
            self.local.check(principal, route)
        } else {
            Decision::Unavailable
        }
    }

    /// Checks and charges every limit covering `principal` calling `route`, in one round
    /// trip.
    pub(super) async fn check(
        self: Arc<Self>,
        principal: Principal,
        route: (Arc<str>, Arc<str>),
    ) -> Decision {
        let route_ref = (&*route.0, &*route.1);
        let compiled = arc_swap::Guard::into_inner(self.local.compiled());
        let counters = self.counters(&compiled, &principal, route_ref);
        if counters.is_empty() {
            return Decision::Unlimited;
        }
        if self.resting() {
            return self.fallback(&principal, route_ref);
        }
        // After a failure one request at a time tries Redis again.
        let _probe = match Probe::start(&self.down, &self.probing) {
            Some(probe) => probe,
            None => return self.fallback(&principal, route_ref),
        };
        let conn = match self.connection() {
            Ok(conn) => conn,
            Err(err) => {
                self.failed(&err);
                return self.fallback(&principal, route_ref);
            }
        };
        let reserve = self.settings().reserve_tokens;
        let has_streams = counters
            .iter()
            .any(|c| matches!(c.limit, Limit::Streams(_)));
        let member = if has_streams {
            format!(
                "{:x}:{}",
                self.replica,
                self.streams.fetch_add(1, Ordering::Relaxed)
            )
        } else {
            String::new()
        };
        let mut call = self.check.prepare_invoke();
        call.arg(reserve)
            .arg(STREAM_LEASE.as_micros() as u64)
            .arg(&member);
        for c in &counters {
            let ttl = c.window.map_or(0, |w| w.left.as_millis() as u64 + 60_000);
            call.key(&c.key).arg(c.kind()).arg(c.a()).arg(ttl);
        }
        // The script may run even if its answer never comes (a timeout, or this future
        // dropped by a client gone): until the answer is read, a stream slot it may have taken
        // is released when this guard drops.
        let mut pending = Pending::new(self.clone(), &counters, &member);
        let mut conn_for_call = conn;
        let answer: Result<Vec<i64>, String> =
            match tokio::time::timeout(TIMEOUT, call.invoke_async(&mut conn_for_call)).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
            };
        let answer = match answer {
            Ok(answer) if !answer.is_empty() => answer,
            Ok(_) => {
                self.failed(&"an empty answer");
                return self.fallback(&principal, route_ref);
            }
            Err(err) => {
                self.failed(&err);
                return self.fallback(&principal, route_ref);
            }
        };
        pending.disarm();
        self.recovered();
        if answer[0] == 0 {
            let i = answer
                .get(1)
                .and_then(|&i| usize::try_from(i - 1).ok())
                .unwrap_or(0);
            let Some(c) = counters.get(i) else {
                return self.fallback(&principal, route_ref);
            };
            let retry_after = match c.window {
                Some(w) => w.left,
                None => Duration::from_micros(answer.get(2).map_or(0, |&v| v.max(0) as u64)),
            };
            count(&compiled.labels[c.rule], "refused", c.limit.name());
            return Decision::Refused(Refusal::new(
                &compiled.rules.rules[c.rule],
                c.limit,
                &principal,
                route_ref,
                retry_after,
            ));
        }
        let mut quotas = Quotas::default();
        let mut last_rule = None;
        for (c, &v) in counters.iter().zip(&answer[1..]) {
            if last_rule != Some(c.rule) {
                compiled.allowed[c.rule].increment(1);
                last_rule = Some(c.rule);
            }
            quotas.add(c.limit, quota(c, v));
        }
        // Only the counters settled at the end go with the ticket.
        let settled: Settled = counters
            .iter()
            .filter(|c| c.limit.counts_tokens() || matches!(c.limit, Limit::Streams(_)))
            .map(|c| (c.key.clone(), c.kind(), c.a()))
            .collect();
        let mut ticket = Ticket::default();
        if !settled.is_empty() {
            let tokens = counters.iter().any(|c| c.limit.counts_tokens());
            let limiter = self.clone();
            let charged = Instant::now();
            ticket.settle = Some(Arc::new(Settle::new(
                tokens.then_some(reserve),
                move |delta| {
                    limiter.settle_later(settled, member, delta, charged.elapsed());
                },
            )));
        }
        Decision::Allowed { ticket, quotas }
    }

    /// Settles a response on a task of its own: its tokens, its stream slot. Without a Tokio
    /// runtime (a process shutting down) nothing is sent: a reservation stands, and a stream
    /// slot waits for its lease.
    fn settle_later(self: Arc<Self>, counters: Settled, member: String, delta: i64, age: Duration) {
        let only_tokens = counters.iter().all(|(_, kind, _)| *kind != "s");
        if delta == 0 && only_tokens {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let Ok(mut conn) = self.connection() else {
                return;
            };
            let mut call = self.settle.prepare_invoke();
            call.arg(delta)
                .arg(&member)
                .arg(u64::try_from(age.as_micros()).unwrap_or(u64::MAX));
            for (key, kind, a) in &counters {
                call.key(key).arg(*kind).arg(*a);
            }
            let done = tokio::time::timeout(TIMEOUT, call.invoke_async::<i64>(&mut conn)).await;
            if !matches!(done, Ok(Ok(_))) {
                // The reservation stands (or the slot waits for its lease): limits err on the
                // side of the budget.
                tracing::debug!(target: "tower_gateway::limits", "a settlement did not reach Redis");
            }
        });
    }

    /// The counts of rule `rule`'s limits for `bucket`, from Redis.
    pub(super) async fn peek(
        &self,
        rule: usize,
        bucket: Arc<str>,
    ) -> Result<Vec<(Limit, Quota)>, String> {
        let compiled = arc_swap::Guard::into_inner(self.local.compiled());
        let Some(r) = compiled.rules.rules.get(rule) else {
            return Ok(Vec::new());
        };
        let wall = SystemTime::now();
        let counters: Vec<Counter> = Limit::of(r)
            .map(|limit| self.counter(&compiled, rule, &bucket, limit, wall))
            .collect();
        let mut conn = self.connection().map_err(|e| e.to_string())?;
        let mut call = self.peek.prepare_invoke();
        for c in &counters {
            call.key(&c.key).arg(c.kind()).arg(c.a());
        }
        let answer: Vec<i64> = tokio::time::timeout(TIMEOUT, call.invoke_async(&mut conn))
            .await
            .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        Ok(counters
            .iter()
            .zip(answer)
            .map(|(c, v)| (c.limit, quota(c, v)))
            .collect())
    }
}

/// Lets one request at a time try Redis again after a failure; clears the flag when dropped.
struct Probe<'a>(Option<&'a AtomicBool>);

impl<'a> Probe<'a> {
    /// `Some` if this request may go to Redis: it is up, or this request is the one probing.
    fn start(down: &AtomicBool, probing: &'a AtomicBool) -> Option<Self> {
        if !down.load(Ordering::Relaxed) {
            return Some(Self(None));
        }
        (!probing.swap(true, Ordering::AcqRel)).then_some(Self(Some(probing)))
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(false, Ordering::Release);
        }
    }
}

/// The counters a response settles: key, kind and the script's `a`.
type Settled = Vec<(String, &'static str, f64)>;

/// A check whose answer has not been read: dropped armed, it releases the stream slot the
/// script may have taken (a `ZREM` of a member never added changes nothing).
struct Pending {
    release: Option<(Arc<RedisLimiter>, Settled, String)>,
}

impl Pending {
    fn new(limiter: Arc<RedisLimiter>, counters: &[Counter], member: &str) -> Self {
        let streams: Vec<_> = counters
            .iter()
            .filter(|c| matches!(c.limit, Limit::Streams(_)))
            .map(|c| (c.key.clone(), c.kind(), c.a()))
            .collect();
        Self {
            release: (!streams.is_empty()).then(|| (limiter, streams, member.to_owned())),
        }
    }

    /// The answer was read: the ticket (or the refusal) takes it from here.
    fn disarm(&mut self) {
        self.release = None;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some((limiter, streams, member)) = self.release.take() {
            limiter.settle_later(streams, member, 0, Duration::ZERO);
        }
    }
}

/// What a counter's value as the scripts answer it (µs ahead of now for a GCRA, tokens used
/// for a budget, streams for a stream set) says to the client.
fn quota(c: &Counter, v: i64) -> Quota {
    let v = u64::try_from(v).unwrap_or(0);
    let reading = match c.limit {
        Limit::Requests(_) | Limit::TokensPerMinute(_) => Reading::Ahead(Duration::from_micros(v)),
        Limit::TokensPerDay(_) | Limit::TokensPerMonth(_) => {
            Reading::Used(v, c.window.map_or(Duration::ZERO, |w| w.left))
        }
        Limit::Streams(_) => Reading::Busy(v),
    };
    c.limit.quota(reading)
}

#[cfg(feature = "trace")]
fn backend_error(open: bool) {
    metrics::counter!(
        crate::metric::RATE_LIMIT_BACKEND_ERRORS,
        "policy" => if open { "open" } else { "closed" },
    )
    .increment(1);
}

#[cfg(not(feature = "trace"))]
fn backend_error(_open: bool) {}
