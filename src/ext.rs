//! The request extensions the layers talk through, and nothing else.
//!
//! | extension | inserted by | read by |
//! |---|---|---|
//! | [`Principal`] | [`GatewayAuthLayer`](crate::auth::GatewayAuthLayer) | access control, header templates, the usage tap, the management API |
//! | [`RouteMatch`] | [`CustomEndpointRouteLayer`](crate::route::CustomEndpointRouteLayer) | access control, header injection, the usage tap, the forwarder |
//!
//! They live here, apart from the layers that insert them, so that a layer that reads one
//! imports this module and not another layer. Both are always compiled, whatever the features.

use std::borrow::Cow;
use std::sync::Arc;

use crate::registry::Endpoint;

/// Who is calling: inserted into the request extensions by [`GatewayAuthLayer`](crate::auth::GatewayAuthLayer).
///
/// It holds no secret: `key_id` is a label for logs, never the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The label of the key that authenticated the request.
    pub key_id: Arc<str>,
    /// The person or service that owns the key.
    pub subject: Arc<str>,
    /// The teams the subject belongs to.
    pub teams: Arc<[Arc<str>]>,
}

impl Principal {
    /// A principal.
    pub fn new<T: Into<Arc<str>>>(
        key_id: impl Into<Arc<str>>,
        subject: impl Into<Arc<str>>,
        teams: impl IntoIterator<Item = T>,
    ) -> Self {
        Self {
            key_id: key_id.into(),
            subject: subject.into(),
            teams: teams.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether the principal belongs to `team`.
    pub fn in_team(&self, team: &str) -> bool {
        self.teams.iter().any(|t| &**t == team)
    }
}

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
