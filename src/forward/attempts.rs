//! Sending a request to an endpoint's pool: a target per attempt, retries before the first
//! byte, ejection, the retry budget and health checks.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::RETRY_AFTER;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use tower::retry::budget::Budget;

use super::balance::{self, Tried};
use super::eject;
use super::replay::{self, Replay};
use super::served::ServedBy;
use super::{ResponseBody, Shared, UpstreamRequestBody};
use crate::BoxError;
use crate::error::UpstreamTimeout;
use crate::ext::Served;
use crate::metric;
use crate::model::COMMON_PATHS;
use crate::registry::{Endpoint, InFlight, now_ms, set_target_headers};

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
        let mut body = Some(replay.first());
        loop {
            attempt += 1;
            let k = balance::pick(&ep, tried, now_ms());
            let target = &ep.targets()[k];
            let again = tried & (1 << k) != 0;
            tried |= 1 << k;
            if let Some(p) = previous {
                metrics::counter!(
                    metric::UPSTREAM_RETRIES,
                    eject::labels(&ep, target).to_vec()
                )
                .increment(1);
                if target.priority() > ep.targets()[p].priority() {
                    metrics::counter!(
                        metric::UPSTREAM_FALLBACKS,
                        eject::labels(&ep, target).to_vec()
                    )
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
            let this_body = body.take().expect("each attempt has a body");
            let mut req = Request::new(UpstreamRequestBody::new(this_body));
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri;
            *req.version_mut() = Version::HTTP_11;
            *req.headers_mut() = headers;
            let in_flight = target.health().start();
            let started = Instant::now();
            let sent = tokio::time::timeout(t.first_byte, client.send(req)).await;
            let rtt = started.elapsed();
            // The client's own body failed (too large, silent, broken): no target is to blame
            // and none would do better. Over HTTP/2 the attempt's error does not say so.
            if let Some(fault) = replay.client_fault() {
                replay.stop();
                return Err(fault);
            }
            let health = target.health();
            let failure = match sent {
                // Still sending a slow client's body: the silence is not the target's.
                Err(_elapsed) if !replay.sent_all() => {
                    replay.stop();
                    return Err(UpstreamTimeout::new().into());
                }
                Err(_elapsed) => Failure::Timeout,
                Ok(Err(err)) if replay::is_client_fault(&err) => {
                    replay.stop();
                    return Err(err);
                }
                Ok(Err(err)) => Failure::Error(err),
                Ok(Ok(res)) => {
                    let status = res.status();
                    let failed =
                        status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                    eject::count_attempt(
                        &ep,
                        target,
                        if failed { "failed_status" } else { "answered" },
                    );
                    if failed {
                        health.observe(rtt);
                        let retry_after = (status == StatusCode::TOO_MANY_REQUESTS)
                            .then(|| retry_after(res.headers()))
                            .flatten();
                        eject::failed(&shared, &ep, k, retry_after);
                    } else {
                        health.succeeded(rtt);
                    }
                    let retried = retry.on_status.contains(&status.as_u16());
                    if !retried || attempt >= retry.attempts {
                        replay.stop();
                        return served(&shared, &ep, k, res, in_flight, attempt, &t);
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
                eject::count_attempt(&ep, target, outcome);
                eject::failed(&shared, &ep, k, None);
                if let Failure::Error(err) = &failure {
                    tracing::debug!(target = %target.label(), error = %err, "upstream attempt failed");
                }
            }
            let refused = if attempt >= retry.attempts {
                None
            } else if !pool.budget().withdraw() {
                metrics::counter!(
                    metric::UPSTREAM_BUDGET_EXHAUSTED,
                    eject::labels(&ep, target).to_vec()
                )
                .increment(1);
                Some("budget_exhausted")
            } else {
                // The next attempt's body, which supersedes this one's at once.
                match replay.next_attempt() {
                    Some(next) => {
                        body = Some(next);
                        continue;
                    }
                    None => Some("body_too_large"),
                }
            };
            replay.stop();
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
                    served(&shared, &ep, k, *res, in_flight, attempt, &t)
                }
            };
        }
    }
}

/// The response of the attempt that answered, with the target named.
fn served(
    shared: &Arc<Shared>,
    ep: &Arc<Endpoint>,
    k: usize,
    res: Response<super::body::UpstreamBody>,
    in_flight: InFlight,
    attempts: u32,
    t: &super::Resolved,
) -> Result<Response<ResponseBody>, BoxError> {
    let target = &ep.targets()[k];
    let span = tracing::Span::current();
    span.record("gateway.target", &**target.label());
    span.record("gateway.attempts", attempts);
    let by = ServedBy::new(in_flight, shared.clone(), ep.clone(), k);
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

/// An upstream's `Retry-After` (seconds or an HTTP date), or OpenAI's `retry-after-ms`; an
/// absurd value is taken as an hour (the ejection is capped lower anyway).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    const CAP: Duration = Duration::from_secs(3600);
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::try_from_secs_f64(ms / 1e3).map_or(CAP, |d| d.min(CAP)));
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(CAP));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .min(CAP),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_dates_and_milliseconds_and_survives_absurd_values() {
        let h = |name: &'static str, v: &str| {
            let mut m = HeaderMap::new();
            m.insert(name, v.parse().unwrap());
            retry_after(&m)
        };
        assert_eq!(h("retry-after", "7"), Some(Duration::from_secs(7)));
        assert_eq!(h("retry-after-ms", "250"), Some(Duration::from_millis(250)));
        assert_eq!(h("retry-after-ms", "1e30"), Some(Duration::from_secs(3600)));
        assert_eq!(
            h("retry-after", "99999999999999"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            h("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(h("retry-after-ms", "-5"), None);
        assert_eq!(h("retry-after", "soon"), None);
    }
}
