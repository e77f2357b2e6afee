//! What a response from an endpoint's pool carries while its body streams.

use std::sync::Arc;

use super::Shared;
use crate::metric;
use crate::registry::{Endpoint, InFlight};

/// What a response from a pool carries until its body ends: the request in flight on its
/// target, and what a truncation is counted against.
pub(super) struct ServedBy {
    /// Held until the body ends or is dropped: the target's load counts the stream.
    _in_flight: InFlight,
    shared: Arc<Shared>,
    ep: Arc<Endpoint>,
    k: usize,
}

impl ServedBy {
    pub(super) fn new(
        in_flight: InFlight,
        shared: Arc<Shared>,
        ep: Arc<Endpoint>,
        k: usize,
    ) -> Self {
        Self {
            _in_flight: in_flight,
            shared,
            ep,
            k,
        }
    }

    /// The body broke off after the head went out: counted, and a failure of the target.
    pub(super) fn truncated(&self) {
        let target = &self.ep.targets()[self.k];
        tracing::Span::current().record("gateway.target", &**target.label());
        let [a, e, t] = super::eject::labels(&self.ep, target);
        metrics::counter!(metric::UPSTREAM_TRUNCATIONS, vec![a, e, t]).increment(1);
        super::eject::failed(&self.shared, &self.ep, self.k, None);
    }
}
