//! What a response from an endpoint's pool carries while its body streams.

use std::sync::Arc;

use crate::metric;
use crate::model::EjectPolicy;
use crate::registry::{Endpoint, InFlight};

/// What a response from a pool carries until its body ends: the request in flight on its
/// target, and the names to count a truncation under.
pub(crate) struct ServedBy {
    in_flight: InFlight,
    ep: Arc<Endpoint>,
    target: Arc<str>,
}

impl ServedBy {
    pub(crate) fn new(in_flight: InFlight, ep: Arc<Endpoint>, target: Arc<str>) -> Self {
        Self {
            in_flight,
            ep,
            target,
        }
    }

    /// The body broke off after the head went out: counted, and a failure of the target.
    pub(crate) fn truncated(&self) {
        tracing::Span::current().record("gateway.target", &*self.target);
        metrics::counter!(
            metric::UPSTREAM_TRUNCATIONS,
            "account" => self.ep.account().to_string(),
            "endpoint" => self.ep.name().to_string(),
            "target" => self.target.to_string()
        )
        .increment(1);
        let policy: &EjectPolicy = self.ep.pool().eject();
        self.in_flight.health().failed(policy);
    }
}
