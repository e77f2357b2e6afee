//! Routing `{prefix}/{providerAccountName}/{endpointName}/{upstream-path}` to an endpoint.
//!
//! [`CustomEndpointRouteLayer`] parses the request path against a
//! [`SharedRegistry`](crate::registry::SharedRegistry), refuses unsafe paths with 400 (dot
//! segments plain or encoded, encoded `/` and `\`, control characters, empty segments, double
//! encoding), unknown accounts and endpoints with 404, and CONNECT and TRACE with 405. For a
//! good path it rewrites the request URI to the absolute upstream URI (the endpoint's base URL,
//! then the path exactly as sent, then the query byte for byte) and inserts a [`RouteMatch`].
//! The upstream scheme, host, port and base path come only from the registry: nothing in the
//! request can change them, and the authority of an absolute-form request target is ignored.
//!
//! The rewrite itself is the pure function [`rewrite`].
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};
//! use tower_gateway::route::{CustomEndpointRouteLayer, RouteMatch};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let registry = Registry::from_accounts(vec![AccountSpec {
//!     endpoints: vec![EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1")],
//!     ..AccountSpec::new("coreweave-model")
//! }])
//! .unwrap();
//!
//! let svc = ServiceBuilder::new()
//!     .layer(CustomEndpointRouteLayer::new(registry.into()))
//!     .service(service_fn(|req: Request<Full<Bytes>>| async move {
//!         assert_eq!(req.uri(), "https://api.inference.wandb.ai/v1/chat/completions?x=1");
//!         let route = req.extensions().get::<RouteMatch>().unwrap();
//!         assert_eq!((&*route.account, &*route.endpoint), ("coreweave-model", "inference"));
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
//!     }));
//!
//! let req = Request::post("/proxy-api/coreweave-model/inference/chat/completions?x=1")
//!     .body(Full::default())
//!     .unwrap();
//! assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
//!
//! let evil = Request::get("/proxy-api/coreweave-model/inference/%2e%2e/admin")
//!     .body(Full::default())
//!     .unwrap();
//! assert_eq!(svc.oneshot(evil).await.unwrap().status(), 400);
//! # }
//! ```

mod path;
mod service;

use std::borrow::Cow;

pub use self::path::{PathError, ProxyPath, parse_proxy_path, rewrite, upstream_uri};
pub use self::service::{CustomEndpointRoute, CustomEndpointRouteLayer};
pub use crate::error::ResponseFuture;
pub use crate::ext::RouteMatch;
pub use crate::model::DEFAULT_PATH_PREFIX;

use crate::model::COMMON_PATHS;

/// The index of `rest` in [`COMMON_PATHS`].
pub(crate) fn common_path(rest: &str) -> Option<usize> {
    COMMON_PATHS.iter().position(|common| *common == rest)
}

/// `rest` as a [`RouteMatch::upstream_path`]: borrowed if it is the common path `common`.
pub(crate) fn upstream_path(common: Option<usize>, rest: &str) -> Cow<'static, str> {
    match common {
        Some(i) => Cow::Borrowed(COMMON_PATHS[i]),
        None => Cow::Owned(rest.to_owned()),
    }
}
