//! A target's failures: counted, ejecting it when they pile up, logged and measured once per
//! ejection, and health-checked while it is out.

use std::sync::Arc;
use std::time::Duration;

use http::Request;

use super::{Shared, UpstreamRequestBody};
use crate::metric;
use crate::registry::{Ejection, Endpoint, Target, TargetHealth, now_ms};

/// The labels of a target's metrics: shared strings, no copies.
pub(super) fn labels(ep: &Endpoint, target: &Target) -> [metrics::Label; 3] {
    [
        metrics::Label::new("account", ep.account().clone()),
        metrics::Label::new("endpoint", ep.name().clone()),
        metrics::Label::new("target", target.label().clone()),
    ]
}

/// Counts one attempt on `target` by its outcome.
pub(super) fn count_attempt(ep: &Endpoint, target: &Target, outcome: &'static str) {
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

/// A failure of target `k`: counted towards its ejection, or (an upstream's 429 with
/// `retry_after`) ejecting it until then. An ejection is logged and counted once, and a target
/// ejected for its failures is health-checked if the endpoint says so (not one that asked to
/// be left alone until its `Retry-After`).
pub(super) fn failed(shared: &Arc<Shared>, ep: &Endpoint, k: usize, retry_after: Option<Duration>) {
    let target = &ep.targets()[k];
    let policy = ep.pool().eject();
    let health = target.health();
    let ejected = match retry_after {
        Some(wait) if !wait.is_zero() => health
            .retry_after(wait, policy)
            .map(|d| (d, Ejection::RetryAfter)),
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
        cool_down_ms = u64::try_from(cool_down.as_millis()).unwrap_or(u64::MAX),
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
    if reason != Ejection::RetryAfter && ep.targets().len() > 1 {
        probe(shared.clone(), health.clone(), target.label().clone());
    }
}

/// While the target is out, `GET`s what its [`Probe`](crate::registry::Probe) says, every
/// interval; a 2xx brings it back. Each round reads the probe of the newest registry snapshot
/// (its credentials, path and interval, or none: then it stops), and the task holds only the
/// target's health, so it ends once no snapshot holds the target, or when the target is back.
fn probe(shared: Arc<Shared>, health: Arc<TargetHealth>, label: Arc<str>) {
    if health.probe().is_none() || !health.start_probing() {
        return;
    }
    tokio::spawn(async move {
        loop {
            let Some(spec) = health.probe() else { break };
            tokio::time::sleep(spec.interval).await;
            if Arc::strong_count(&health) == 1 || health.is_live(now_ms()) {
                break;
            }
            let Some(spec) = health.probe() else { break };
            let (client, t) = shared.client_for(spec.tls.as_ref(), spec.timeouts);
            let mut req = Request::new(UpstreamRequestBody::default());
            *req.uri_mut() = spec.uri.clone();
            *req.headers_mut() = spec.headers.clone();
            let wait = t.first_byte.min(spec.interval.max(Duration::from_secs(1)));
            let answer = tokio::time::timeout(wait, client.send(req)).await;
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
