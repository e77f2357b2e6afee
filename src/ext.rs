//! The request extensions the layers talk through, and nothing else.
//!
//! | extension | inserted by | read by |
//! |---|---|---|
//! | [`Principal`] | [`GatewayAuthLayer`](crate::auth::GatewayAuthLayer) | access control, header templates, the usage tap, the management API |
//! | [`RouteMatch`] | [`CustomEndpointRouteLayer`](crate::route::CustomEndpointRouteLayer) | access control, header injection, the usage tap, the forwarder |
//! | [`UsageReport`] (a *response* extension) | [`RateLimitLayer`](crate::limits::RateLimitLayer) | the usage tap, which reports the response's tokens through it |
//! | [`Served`] (a *response* extension) | the forwarder, for an endpoint with a pool | the usage tap, which names the target in its record |
//!
//! They live here, apart from the layers that insert them, so that a layer that reads one
//! imports this module and not another layer. Both are always compiled, whatever the features.
//! `Principal` is defined with the [model](crate::model) (grants decide on it; a key record
//! holds one) and re-exported here.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

pub use crate::model::Principal;
use crate::registry::Endpoint;

/// Which endpoint a request was routed to: inserted into the request extensions by
/// [`CustomEndpointRouteLayer`](crate::route::CustomEndpointRouteLayer).
#[derive(Clone, Debug)]
pub struct RouteMatch {
    /// The provider account name.
    pub account: Arc<str>,
    /// The endpoint name.
    pub endpoint: Arc<str>,
    /// The upstream path as the client sent it (empty or starting with `/`), without the query.
    ///
    /// The paths clients call most (`/chat/completions`, `/completions`, `/embeddings`,
    /// `/models`, `/responses`) are borrowed static strings, so routing to them allocates
    /// nothing for this field; any other path is owned.
    pub upstream_path: Cow<'static, str>,
    /// The endpoint's configuration, from the registry snapshot the request was routed with.
    pub target: Arc<Endpoint>,
}

/// Which target of an endpoint's pool answered, and after how many attempts: a *response*
/// extension inserted by the forwarder for an endpoint with several targets or retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// The target's base URL.
    pub target: Arc<str>,
    /// Attempts made, the one that answered included.
    pub attempts: u32,
}

/// A wish for a response's token count, carried up in the *response* extensions: a layer below
/// the usage tap (the rate limiter, settling a token reservation) inserts it, and the tap calls
/// [`report`](Self::report) once with the prompt and completion tokens it read, when the body
/// ends. A response whose count is never read (no usage in it, a client gone mid-stream) is
/// never reported, and the wisher keeps its own estimate.
#[derive(Clone)]
pub struct UsageReport(Arc<dyn Fn(u64) + Send + Sync>);

impl UsageReport {
    /// A report that calls `f` with the response's total tokens.
    pub fn new(f: impl Fn(u64) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Reports the response's prompt plus completion tokens.
    pub fn report(&self, tokens: u64) {
        (self.0)(tokens)
    }
}

impl fmt::Debug for UsageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageReport").finish_non_exhaustive()
    }
}
