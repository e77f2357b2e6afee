//! Sending a request to an endpoint's pool: a target per attempt, retries before the first
//! byte, ejection, the retry budget and health checks.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::RETRY_AFTER;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use tower::retry::budget::Budget;

use super::balance::{self, Tried};
use super::replay::Replay;
use super::served::ServedBy;
use super::{IdleTimeoutBody, ResponseBody, Shared, UpstreamRequestBody};
use crate::BoxError;
use crate::error::{InvalidRequestBody, UpstreamTimeout};
use crate::ext::Served;
use crate::metric;
use crate::model::COMMON_PATHS;
use crate::registry::{Ejection, Endpoint, InFlight, Target, TargetHealth, now_ms};

/// The longest pause before an attempt goes to a target already tried.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The request as the client sent it, less its body: each attempt gets a copy.
pub(super) struct Attempts {
    pub(super) shared: Arc<Shared>,
    pub(super) ep: Arc<crate::registry::Endpoint>,
    pub(super) path: Cow<'static, str>,
    pub(super) parts: http::request::Parts,
    pub(super) replay: Replay,
}

/// How an attempt failed.
enum Failure {
    /// No response head within the first-byte timeout.
    Timeout,
    /// No response head: the connection failed or was reset.
    Error(BoxError),
    /// A response whose status is retried.
    Status(Box<Response<super::body::UpstreamBody>>, InFlight),
}

impl Attempts {
    /// Sends attempts until one answers, retries run out, or the budget says no.
    pub(super) async fn run(self) -> Result<Response<ResponseBody>, BoxError> {
        let Attempts {
            shared,
            ep,
            path,
            parts,
            replay,
        } = self;
        let pool = ep.pool();
        let retry = pool.retry();
        pool.budget().deposit();
        let common = COMMON_PATHS.iter().position(|p| *p == path);
        let mut tried: Tried = 0;
        let mut previous: Option<usize> = None;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let k = balance::pick(&ep, tried, now_ms());
            let target = &ep.targets()[k];
            let again = tried & (1 << k) != 0;
            tried |= 1 << k;
            if let Some(p) = previous {
                metrics::counter!(metric::UPSTREAM_RETRIES, labels(&ep, target).to_vec())
                    .increment(1);
                if target.priority() > ep.targets()[p].priority() {
                    metrics::counter!(metric::UPSTREAM_FALLBACKS, labels(&ep, target).to_vec())
                        .increment(1);
                    tracing::info!(target = %target.label(), attempt, "falling back to a target of a later priority");
                }
                if again {
                    // The same target again (no other is live): a short, growing pause.
                    let backoff =
                        Duration::from_millis(25 << (attempt - 2).min(6)).min(MAX_BACKOFF);
                    tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() * 0.5)).await;
                }
            }
            previous = Some(k);
            let uri = match common {
                Some(i) if parts.uri.query().is_none() => target.common_uri(i).cloned(),
                _ => target.base().join(&path, parts.uri.query()),
            };
            let Some(uri) = uri else {
                return Err(crate::error::NoUpstream::new().into());
            };
            let (client, t) = shared.client_for(target.tls(), target.timeouts());
            let mut headers = parts.headers.clone();
            set_target_headers(&mut headers, target.headers());
            let body = UnsyncBoxBody::new(IdleTimeoutBody::new(t.idle, replay.attempt()));
            let mut req = Request::new(body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri;
            *req.version_mut() = Version::HTTP_11;
            *req.headers_mut() = headers;
            let in_flight = target.health().start();
            let started = Instant::now();
            let sent = tokio::time::timeout(t.first_byte, client.send(req)).await;
            let rtt = started.elapsed();
            let health = target.health();
            let failure = match sent {
                Err(_elapsed) => Failure::Timeout,
                Ok(Err(err)) if client_fault(&err) => return Err(err),
                Ok(Err(err)) => Failure::Error(err),
                Ok(Ok(res)) => {
                    let status = res.status();
                    let failed =
                        status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                    let outcome = if failed { "failed_status" } else { "answered" };
                    counter_attempt(&ep, target, outcome);
                    if failed {
                        health.observe(rtt);
                        let retry_after = (status == StatusCode::TOO_MANY_REQUESTS)
                            .then(|| retry_after(res.headers()))
                            .flatten();
                        failed_target(&shared, &ep, k, retry_after);
                    } else {
                        health.succeeded(rtt);
                    }
                    let retried = retry.on_status.contains(&status.as_u16());
                    if !retried || attempt >= retry.attempts {
                        return served(&shared, &ep, target, res, in_flight, attempt, &t);
                    }
                    Failure::Status(Box::new(res), in_flight)
                }
            };
            if !matches!(failure, Failure::Status(..)) {
                let outcome = if matches!(failure, Failure::Timeout) {
                    "timeout"
                } else {
                    "error"
                };
                counter_attempt(&ep, target, outcome);
                failed_target(&shared, &ep, k, None);
                if let Failure::Error(err) = &failure {
                    tracing::debug!(target = %target.label(), error = %err, "upstream attempt failed");
                }
            }
            let refused = if attempt >= retry.attempts {
                None
            } else if !replay.replayable() {
                Some("body_too_large")
            } else if !pool.budget().withdraw() {
                metrics::counter!(
                    metric::UPSTREAM_BUDGET_EXHAUSTED,
                    labels(&ep, target).to_vec()
                )
                .increment(1);
                Some("budget_exhausted")
            } else {
                continue;
            };
            let span = tracing::Span::current();
            span.record("gateway.target", &**target.label());
            span.record("gateway.attempts", attempt);
            if let Some(why) = refused {
                span.record("gateway.retry_refused", why);
                tracing::info!(target = %target.label(), attempt, reason = why, "not retried");
            }
            return match failure {
                Failure::Timeout => Err(UpstreamTimeout::new().into()),
                Failure::Error(err) => Err(err),
                Failure::Status(res, in_flight) => {
                    served(&shared, &ep, target, *res, in_flight, attempt, &t)
                }
            };
        }
    }
}

/// The response of the attempt that answered, with the target named.
fn served(
    shared: &Shared,
    ep: &Arc<Endpoint>,
    target: &Target,
    res: Response<super::body::UpstreamBody>,
    in_flight: InFlight,
    attempts: u32,
    t: &super::Resolved,
) -> Result<Response<ResponseBody>, BoxError> {
    let span = tracing::Span::current();
    span.record("gateway.target", &**target.label());
    span.record("gateway.attempts", attempts);
    let by = ServedBy::new(in_flight, ep.clone(), target.label().clone());
    let mut res = super::finish(
        res,
        t.idle,
        shared.settings.pass_cookies,
        Some(Box::new(by)),
    )?;
    res.extensions_mut().insert(Served {
        target: target.label().clone(),
        attempts,
    });
    Ok(res)
}

/// Sets a target's own headers over the endpoint's: each name replaced, not appended to.
pub(super) fn set_target_headers(headers: &mut HeaderMap, own: &HeaderMap) {
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

/// Whether the attempt failed because of the client's body (broken, too large, silent): no
/// other target would do better, and the target is not to blame.
fn client_fault(err: &BoxError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    while let Some(e) = cause {
        if e.is::<InvalidRequestBody>()
            || e.is::<http_body_util::LengthLimitError>()
            || e.is::<crate::error::BodyIdleTimeout>()
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// An upstream's `Retry-After` (seconds or an HTTP date), or OpenAI's `retry-after-ms`.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1e3));
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// The labels of a target's metrics: shared strings, no copies.
fn labels(ep: &Endpoint, target: &Target) -> [metrics::Label; 3] {
    [
        metrics::Label::new("account", ep.account().clone()),
        metrics::Label::new("endpoint", ep.name().clone()),
        metrics::Label::new("target", target.label().clone()),
    ]
}

fn counter_attempt(ep: &Endpoint, target: &Target, outcome: &'static str) {
    let [a, e, t] = labels(ep, target);
    metrics::counter!(
        metric::UPSTREAM_ATTEMPTS,
        vec![
            a,
            e,
            t,
            metrics::Label::from_static_parts("outcome", outcome)
        ]
    )
    .increment(1);
}

/// A failed attempt on target `k`: counted towards its ejection, or ejecting it until the
/// upstream's `Retry-After`; an ejected target is health-checked if the endpoint says so.
fn failed_target(
    shared: &Arc<Shared>,
    ep: &Arc<Endpoint>,
    k: usize,
    retry_after: Option<Duration>,
) {
    let target = &ep.targets()[k];
    let policy = ep.pool().eject();
    let health = target.health();
    let ejected = match retry_after {
        Some(wait) if !wait.is_zero() => {
            Some((health.retry_after(wait, policy), Ejection::RetryAfter))
        }
        _ => health.failed(policy),
    };
    let Some((cool_down, reason)) = ejected else {
        return;
    };
    tracing::warn!(
        account = %ep.account(),
        endpoint = %ep.name(),
        target = %target.label(),
        reason = reason.as_str(),
        cool_down_ms = cool_down.as_millis() as u64,
        "upstream target ejected"
    );
    let [a, e, t] = labels(ep, target);
    metrics::counter!(
        metric::UPSTREAM_EJECTIONS,
        vec![
            a,
            e,
            t,
            metrics::Label::from_static_parts("reason", reason.as_str())
        ]
    )
    .increment(1);
    if ep.targets().len() > 1
        && let Some(check) = ep.health_check()
    {
        probe(shared.clone(), ep, k, check.interval, &check.path);
    }
}

/// While target `k` is ejected, `GET {base}{path}` every `interval`; a 2xx brings it back.
/// The probe holds only the target's health, so it ends when no registry snapshot holds the
/// target any more.
fn probe(shared: Arc<Shared>, ep: &Endpoint, k: usize, interval: Duration, path: &str) {
    let target = &ep.targets()[k];
    let health: Arc<TargetHealth> = target.health().clone();
    let Some(uri) = target.base().join(path, None) else {
        return;
    };
    if !health.start_probing() {
        return;
    }
    let mut headers = ep.headers().clone();
    set_target_headers(&mut headers, target.headers());
    let (client, t) = shared.client_for(target.tls(), target.timeouts());
    let client = client.into_owned();
    let label = target.label().clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            if Arc::strong_count(&health) == 1 || health.is_live(now_ms()) {
                break;
            }
            let mut req = Request::new(UpstreamRequestBody::default());
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers.clone();
            let answer = tokio::time::timeout(
                t.first_byte.min(interval.max(Duration::from_secs(1))),
                client.send(req),
            )
            .await;
            if let Ok(Ok(res)) = answer
                && res.status().is_success()
            {
                health.recover();
                tracing::info!(target = %label, "upstream target passed its health check; back in the pool");
                break;
            }
        }
        health.stop_probing();
    });
}
