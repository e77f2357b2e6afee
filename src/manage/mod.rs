//! The management API: list, inspect, create, update and delete endpoints and grants while
//! traffic flows, and get a ready-to-paste usage snippet for an endpoint.
//!
//! [`Management`] is a tower service answering JSON under a prefix (`/manage` by default),
//! built on an axum `Router` with typed requests and answers;
//! [`Management::router`] gives that router alone, to nest in an axum app of your own.
//! [`Gateway::management_service`](crate::gateway::Gateway::management_service) puts the same
//! [`GatewayAuthLayer`](crate::auth::GatewayAuthLayer) in front of it as the proxy, and every
//! operation checks the caller's [`Permission`](crate::model::Permission) with the same [grants](crate::access):
//!
//! | method and path (under the prefix) | permission | does |
//! |---|---|---|
//! | `GET /accounts` | View | the accounts and endpoints the caller may view |
//! | `GET /accounts/{account}` | View (account) | one account and its viewable endpoints |
//! | `PUT /accounts/{account}/access` | Manage (account) | replaces the account's grants |
//! | `GET /accounts/{account}/endpoints/{endpoint}` | View (endpoint) | one endpoint |
//! | `PUT /accounts/{account}/endpoints/{endpoint}` | Manage (account to create, endpoint to update) | creates or replaces an endpoint |
//! | `DELETE /accounts/{account}/endpoints/{endpoint}` | Manage (endpoint) | deletes an endpoint |
//! | `GET /accounts/{account}/endpoints/{endpoint}/snippet` | View (endpoint) | base URL and curl, Python and Rust snippets |
//! | `GET /keys`, `POST /keys`, `DELETE /keys/{id}`, `POST /keys/{id}/rotate` | admin | gateway keys |
//! | `GET /audit?limit=N&before=CURSOR` | admin | the audit log, newest first |
//! | `GET /rate-limits` | admin | the rate-limit rules in force (`ETag`: their version) |
//! | `PUT /rate-limits` | admin | replaces the rules (`{"rules": [...]}`, each as in the file; `If-Match`) |
//! | `GET /rate-limits/usage?scope=team:NAME` | admin | each limit of a scope: used, remaining, reset |
//!
//! A path may end with `/`; a path segment is taken as sent (`%20` is not decoded into a
//! space), so a name that is not valid stays invalid whatever its encoding.
//!
//! Header values are write-only: responses list header *names*, never values. A `PUT` of an
//! endpoint takes `{"base_url": …, "headers": {…}, "access": {…}, "timeouts": {…}}`, or a pool,
//! `{"targets": [{"base_url": …, "weight": …, "priority": …, "headers": {…}, "timeouts": {…}}],
//! "retry": {…}, "eject": {…}, "health": {…}}`; leaving out `headers` keeps the endpoint's
//! current ones (and a target's, those of the current target with its `base_url`), so a client
//! never needs to hold the secrets to change a grant. Credentials never silently follow an
//! endpoint to another host: a scheme, host or port that none of its current targets has needs
//! Manage on the account and the `headers` sent again, and a target at a new URL gets no
//! headers of its own unless they are sent. The `GET` of an endpoint shows each target's state
//! on this replica (`live` or `ejected`, until when, failures, requests in flight, latency). Account managers are trusted with the account's credentials (an
//! endpoint they create inherits `header_auth`). Values are taken literally: `${VAR}` is not expanded here (it
//! would let a manager read the gateway's environment). Invalid input is a 400 naming the
//! field, and nothing changes. A change swaps the registry atomically: streams in flight
//! finish on the configuration they started with, the next request sees the change.
//! Changes live in memory: a reload from the configuration file or a restart replaces them.
//!
//! # Example
//!
//! ```
//! use axum::Router;
//! use tower_gateway::gateway::Gateway;
//!
//! let gateway = Gateway::builder().build();
//! let app: Router = Router::new()
//!     .route_service("/manage/{*rest}", gateway.management_service())
//!     .fallback_service(gateway.service::<axum::body::Body>());
//! # let _ = app;
//! ```

mod api;
mod keys;
mod limits;
mod snippet;

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body as AxumBody;
use axum::routing::future::RouteFuture;
use axum::routing::{delete, get, post, put};
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body::Body;
use tower_service::Service;
use utoipa::OpenApi;

pub use self::snippet::{EXAMPLE_MODEL, UsageSnippet};
use crate::BoxError;
use crate::error::{GatewayError, ResponseFuture};
use crate::model::DEFAULT_PATH_PREFIX;
use crate::model::{LimitUsageSource, Subject, Writer};
use crate::registry::{Live, MemoryWriter, SharedKeyStore, SharedRegistry};

/// The default prefix of the management API, `/manage`.
pub const DEFAULT_MANAGEMENT_PREFIX: &str = "/manage";

/// The largest request body the management API reads: 64 KiB.
pub const MAX_BODY: usize = 64 * 1024;

/// The management API service. See the [module docs](self).
///
/// It expects a [`Principal`](crate::ext::Principal) in the request extensions (put
/// `GatewayAuthLayer` in front of it); a request without one is denied. Cloning is cheap.
#[derive(Clone)]
pub struct Management {
    api: Arc<api::Api>,
    prefix: Arc<str>,
    router: Router,
}

impl fmt::Debug for Management {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Management")
            .field("prefix", &self.prefix)
            .field("proxy_prefix", &self.api.proxy_prefix)
            .field("public_url", &self.api.public_url)
            .finish_non_exhaustive()
    }
}

impl Management {
    /// Manages `registry`, answering under `/manage`.
    ///
    /// Changes live in memory ([`MemoryWriter`]); keys cannot be managed (there are none).
    pub fn new(registry: SharedRegistry) -> Self {
        let live = Live::new(registry, SharedKeyStore::default(), Vec::new());
        let writer = Arc::new(MemoryWriter::new(live.clone()));
        Self::with_state(live, writer)
    }

    /// Manages `live`, sending every change to `writer` (a [`MemoryWriter`] over the same
    /// `live`, or a store's), answering under `/manage`.
    pub fn with_state(live: Live, writer: Arc<dyn Writer>) -> Self {
        Self::with(
            api::Api {
                live,
                writer,
                proxy_prefix: DEFAULT_PATH_PREFIX.into(),
                public_url: None,
                admins: Arc::default(),
                usage: None,
                counts: None,
            },
            DEFAULT_MANAGEMENT_PREFIX.into(),
        )
    }

    fn with(api: api::Api, prefix: Arc<str>) -> Self {
        let api = Arc::new(api);
        Self {
            router: routes(api.clone(), &prefix),
            api,
            prefix,
        }
    }

    fn change(self, f: impl FnOnce(&mut api::Api)) -> Self {
        let mut api = api::Api::clone(&self.api);
        f(&mut api);
        Self::with(api, self.prefix)
    }

    /// The prefix this API answers under (empty when mounted with a prefix-stripping router).
    #[must_use]
    pub fn prefix(self, prefix: &str) -> Self {
        Self::with(api::Api::clone(&self.api), prefix.into())
    }

    #[cfg(feature = "gateway")]
    pub(crate) fn prefix_str(&self) -> &str {
        &self.prefix
    }

    /// The proxy's path prefix, for the URLs in snippets.
    #[must_use]
    pub fn proxy_prefix(self, prefix: &str) -> Self {
        self.change(|api| api.proxy_prefix = prefix.into())
    }

    /// The gateway's public URL for snippets (e.g. `https://llm.example.com`). By default the
    /// request's `Host` with `http://`.
    #[must_use]
    pub fn public_url(self, url: &str) -> Self {
        self.change(|api| api.public_url = Some(url.trim_end_matches('/').into()))
    }

    /// The gateway admins: the subjects who manage gateway keys (`/keys`) and read the audit
    /// log (`/audit`). None by default.
    #[must_use]
    pub fn admins(self, admins: Vec<Subject>) -> Self {
        self.set_admins(admins);
        self
    }

    /// Where `GET /rate-limits/usage` reads the counts: the gateway's
    /// [`RateLimitLayer`](crate::limits::RateLimitLayer). Without one it answers no limits.
    #[must_use]
    pub fn limit_usage(self, source: Arc<dyn LimitUsageSource>) -> Self {
        self.change(|api| api.usage = Some(source))
    }

    /// Where `GET /usage` reads each endpoint's requests and tokens over the last hour and day:
    /// the counts the gateway's usage tap keeps.
    pub fn usage_counts(self, counts: Arc<crate::registry::UsageCounts>) -> Self {
        self.change(|api| api.counts = Some(counts))
    }

    /// Replaces the gateway admins while the API serves (what a configuration reload does);
    /// every clone of this service sees the new list on its next request.
    pub fn set_admins(&self, admins: Vec<Subject>) {
        self.api.admins.store(Arc::new(admins));
    }

    /// The routes alone, relative to the prefix (`/accounts`, …), to nest in an axum app:
    /// `Router::new().nest("/manage", management.router())`. Put the gateway's
    /// authentication in front of them. Unlike the service, the router does not accept a
    /// trailing `/` and decodes percent-encoded path segments.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The request with its path relative to the prefix, without a trailing `/` and with `%`
    /// escaped, so that the router hands every segment on as it was sent; `None` if the path
    /// is not under the prefix.
    fn relative<B>(&self, req: Request<B>) -> Option<Request<B>> {
        let (mut parts, body) = req.into_parts();
        let rest = parts
            .uri
            .path()
            .strip_prefix(&*self.prefix)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))?;
        let rest = rest.trim_end_matches('/').replace('%', "%25");
        let path_and_query = match parts.uri.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest,
        };
        let path_and_query = if path_and_query.starts_with('/') {
            path_and_query
        } else {
            format!("/{path_and_query}")
        };
        parts.uri = Uri::from(PathAndQuery::try_from(path_and_query).ok()?);
        Some(Request::from_parts(parts, body))
    }
}

/// The management API's OpenAPI 3 document, generated from its request and answer types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tower-gateway management API",
        description = "Accounts, endpoints, grants, gateway keys and the audit log of a tower-gateway. Every answer the gateway makes itself has the OpenAI error shape and an `x-gateway-error` header."
    ),
    paths(
        api::list,
        api::get_account,
        api::put_account,
        api::usage,
        api::set_access,
        api::get_endpoint,
        api::put_endpoint,
        api::delete_endpoint,
        api::snippet,
        keys::create,
        keys::list,
        keys::revoke,
        keys::rotate,
        keys::audit,
        limits::get_rules,
        limits::put_rules,
        limits::usage,
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Every operation takes a gateway key: `Authorization: Bearer <key>`.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document with its server at `prefix`, as JSON.
pub fn openapi_json(prefix: &str) -> String {
    let mut doc = ApiDoc::openapi();
    doc.servers = Some(vec![utoipa::openapi::Server::new(if prefix.is_empty() {
        "/"
    } else {
        prefix
    })]);
    doc.to_json().expect("the document serializes")
}

/// The routes, relative to the management prefix.
fn routes(api: Arc<api::Api>, prefix: &str) -> Router {
    let doc = Bytes::from(openapi_json(prefix));
    Router::new()
        .route(
            "/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move {
                    let mut res = Response::new(AxumBody::from(doc));
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    res
                }
            }),
        )
        .route("/accounts", get(api::list))
        .route(
            "/accounts/{account}",
            get(api::get_account).put(api::put_account),
        )
        .route("/accounts/{account}/access", put(api::set_access))
        .route(
            "/accounts/{account}/endpoints/{endpoint}",
            get(api::get_endpoint)
                .put(api::put_endpoint)
                .delete(api::delete_endpoint),
        )
        .route(
            "/accounts/{account}/endpoints/{endpoint}/snippet",
            get(api::snippet),
        )
        .route("/keys", get(keys::list).post(keys::create))
        .route("/keys/{id}", delete(keys::revoke))
        .route("/keys/{id}/rotate", post(keys::rotate))
        .route("/audit", get(keys::audit))
        .route(
            "/rate-limits",
            get(limits::get_rules).put(limits::put_rules),
        )
        .route("/rate-limits/usage", get(limits::usage))
        .route("/usage", get(api::usage))
        .method_not_allowed_fallback(api::method_not_allowed)
        .fallback(api::not_found)
        .with_state(api)
}

impl<B> Service<Request<B>> for Management
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<AxumBody>;
    type Error = Infallible;
    type Future = ResponseFuture<RouteFuture<Infallible>, AxumBody>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The router is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let denied = req.extensions().get::<crate::ext::Principal>().is_none();
        match self.relative(req) {
            Some(req) => ResponseFuture::inner(self.router.call(req.map(AxumBody::new))),
            None if denied => ResponseFuture::reject(
                GatewayError::forbidden(
                    "The request has no authenticated caller, so access is denied.",
                )
                .into_response(),
            ),
            None => ResponseFuture::reject(
                GatewayError::not_found("No such management resource.").into_response(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext::Principal;
    use crate::model::{AccountSpec, EndpointSpec, Grants};
    use crate::registry::Registry;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    fn management() -> Management {
        let registry = Registry::from_accounts(vec![AccountSpec {
            access: Grants::parse(&["everyone"], &[], &[], "access").unwrap(),
            endpoints: vec![EndpointSpec::new("inference", "https://example.com/v1")],
            ..AccountSpec::new("acct")
        }])
        .unwrap();
        Management::new(registry.into())
    }

    async fn call(svc: Management, method: &str, path: &str, who: bool) -> (u16, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::<Bytes>::default())
            .unwrap();
        if who {
            req.extensions_mut()
                .insert(Principal::new("k", "a@x", [] as [&str; 0]));
        }
        let res = svc.oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn paths_are_routed_as_sent() {
        let cases = [
            ("GET", "/manage/accounts", true, 200),
            ("GET", "/manage/accounts/", true, 200),
            (
                "GET",
                "/manage/accounts/acct/endpoints/inference/",
                true,
                200,
            ),
            // A percent-encoded name is not decoded into a valid one.
            ("GET", "/manage/accounts/%61cct", true, 404),
            ("PUT", "/manage/accounts/acct/endpoints/e%2Ex", true, 400),
            ("POST", "/manage/accounts", true, 405),
            ("GET", "/manage/nothing", true, 404),
            ("GET", "/manage", true, 404),
            ("GET", "/elsewhere", true, 404),
            // Without a caller, nothing is answered but a denial.
            ("GET", "/manage/accounts", false, 403),
            ("GET", "/manage/nothing", false, 403),
            ("POST", "/manage/accounts", false, 403),
            ("GET", "/elsewhere", false, 403),
        ];
        for (method, path, who, want) in cases {
            let (status, body) = call(management(), method, path, who).await;
            assert_eq!(status, want, "{method} {path}: {body}");
            if status != 200 {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert!(v["error"]["code"].is_string(), "{method} {path}: {body}");
            }
        }
    }

    #[tokio::test]
    async fn the_router_nests_in_an_axum_app() {
        let app = axum::Router::new().nest("/admin", management().router());
        let mut req = Request::get("/admin/accounts/acct")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(Principal::new("k", "a@x", [] as [&str; 0]));
        let res = app.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["name"], "acct");
        assert_eq!(v["your_role"], "manager");
    }
}
