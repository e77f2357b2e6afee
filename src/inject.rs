//! Injecting the upstream credential and custom headers.
//!
//! [`InjectHeadersLayer::from_route`] injects the headers of the endpoint a request was routed
//! to (its account's `header_auth`, overridden by the endpoint's own headers, as precomputed
//! in the [`registry`](crate::registry)); [`InjectHeadersLayer::fixed`] injects a static header
//! list and needs no registry. Either way each configured header replaces every value the
//! client sent under that name, and every injected value is marked
//! [sensitive](http::HeaderValue::set_sensitive) so that `Debug` and tracing never show it.
//!
//! # Per-caller header templates
//!
//! A configured header value may hold the placeholders `{subject}`, `{team}` and `{key_id}`,
//! filled from the request's [`Principal`] (`{team}` is the first of
//! the key's teams). W&B attributes usage with an `OpenAI-Project: <team>/<project>` header, so
//! `OpenAI-Project = "{team}/inference"` bills each team's calls to the team's project. A
//! caller for whom a placeholder has no value (no team, or no principal at all) gets a 403
//! with a clear message instead of a malformed header. Templates are precompiled per endpoint;
//! endpoints without placeholders pay nothing for them.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{HeaderMap, Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_gateway::inject::InjectHeadersLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut headers = HeaderMap::new();
//! headers.insert("authorization", "Bearer upstream-key".parse().unwrap());
//!
//! let svc = ServiceBuilder::new()
//!     .layer(InjectHeadersLayer::fixed(headers))
//!     .service(service_fn(|req: Request<Full<Bytes>>| async move {
//!         let auth = req.headers().get_all("authorization").iter().collect::<Vec<_>>();
//!         assert_eq!(auth, ["Bearer upstream-key"]);
//!         assert!(auth[0].is_sensitive());
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
//!     }));
//!
//! let req = Request::builder()
//!     .header("authorization", "Bearer something-else")
//!     .body(Full::default())
//!     .unwrap();
//! svc.oneshot(req).await.unwrap();
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

pub use crate::model::{HeaderTemplate, TemplateVar};

use crate::error::{GatewayError, ResponseFuture};
use crate::ext::{Principal, RouteMatch};
use crate::registry::Endpoint;

#[derive(Clone)]
enum Source {
    Route,
    Fixed(Arc<HeaderMap>),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Route => f.write_str("Route"),
            // Names only: the values are secrets.
            Source::Fixed(h) => f
                .debug_tuple("Fixed")
                .field(&h.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// Layer that applies [`InjectHeaders`]. See the [module docs](self) for an example.
#[derive(Clone, Debug)]
pub struct InjectHeadersLayer {
    source: Source,
}

impl InjectHeadersLayer {
    /// Injects the headers of the request's [`RouteMatch`] endpoint. A request without a
    /// `RouteMatch` passes unchanged.
    pub fn from_route() -> Self {
        Self {
            source: Source::Route,
        }
    }

    /// Injects `headers` into every request; their values are marked sensitive.
    pub fn fixed(mut headers: HeaderMap) -> Self {
        for value in headers.values_mut() {
            value.set_sensitive(true);
        }
        Self {
            source: Source::Fixed(Arc::new(headers)),
        }
    }
}

impl<S> Layer<S> for InjectHeadersLayer {
    type Service = InjectHeaders<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InjectHeaders {
            inner,
            source: self.source.clone(),
        }
    }
}

/// Middleware that sets the upstream credential and custom headers.
///
/// See the [module docs](self) for details and an example.
#[derive(Clone, Debug)]
pub struct InjectHeaders<S> {
    inner: S,
    source: Source,
}

impl<S> InjectHeaders<S> {
    /// Wraps `inner`, injecting the routed endpoint's headers.
    pub fn from_route(inner: S) -> Self {
        InjectHeadersLayer::from_route().layer(inner)
    }

    /// Wraps `inner`, injecting `headers`.
    pub fn fixed(inner: S, headers: HeaderMap) -> Self {
        InjectHeadersLayer::fixed(headers).layer(inner)
    }

    /// Gets a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Gets a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Replaces, in `target`, every header named in `injected` with the injected values.
fn apply(target: &mut HeaderMap, injected: &HeaderMap) {
    // A name's values come one after another: the first replaces whatever the client sent,
    // the others join it.
    let mut last: Option<&HeaderName> = None;
    for (name, value) in injected {
        if last == Some(name) {
            target.append(name.clone(), value.clone());
        } else {
            target.insert(name.clone(), value.clone());
            last = Some(name);
        }
    }
}

/// Renders and sets the route's templated headers, or says why not.
fn apply_templates(
    headers: &mut HeaderMap,
    extensions: &http::Extensions,
    endpoint: &Endpoint,
) -> Result<(), GatewayError> {
    let templates: &[(HeaderName, HeaderTemplate)] = endpoint.header_templates();
    if templates.is_empty() {
        return Ok(());
    }
    let principal = extensions.get::<Principal>();
    let mut rendered = Vec::with_capacity(templates.len());
    for (name, template) in templates {
        let value = template.render_for(principal).map_err(|var| {
            GatewayError::forbidden(format!(
                "The header `{name}` of endpoint \"{}\" needs {} for the caller, and this key has none.",
                endpoint.name(),
                var.placeholder()
            ))
        })?;
        rendered.push((name, value));
    }
    for (name, _) in templates {
        headers.remove(name);
    }
    for (name, value) in rendered {
        headers.append(name.clone(), value);
    }
    Ok(())
}

impl<S, B, ResBody> Service<Request<B>> for InjectHeaders<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        match &self.source {
            Source::Route => {
                let http::request::Parts {
                    headers,
                    extensions,
                    ..
                } = &mut parts;
                if let Some(route) = extensions.get::<RouteMatch>() {
                    apply(headers, route.target.headers());
                    if let Err(err) = apply_templates(headers, extensions, &route.target) {
                        return ResponseFuture::reject(err.into_response());
                    }
                }
            }
            Source::Fixed(headers) => apply(&mut parts.headers, headers),
        }
        ResponseFuture::inner(self.inner.call(Request::from_parts(parts, body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{AccountSpec, EndpointSpec, Registry};
    use crate::route::CustomEndpointRouteLayer;
    use bytes::Bytes;
    use http::{HeaderName, HeaderValue, Response};
    use http_body_util::Full;
    use std::convert::Infallible;
    use tower::{ServiceBuilder, ServiceExt, service_fn};
    use tower_test::mock;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[tokio::test]
    async fn route_headers_override_the_client() {
        let registry = Registry::from_accounts(vec![AccountSpec {
            header_auth: map(&[
                ("authorization", "Bearer shared"),
                ("openai-organization", "org-1"),
            ]),
            endpoints: vec![EndpointSpec {
                headers: map(&[
                    ("authorization", "Bearer wandb-key"),
                    ("openai-project", "team/proj"),
                ]),
                ..EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1")
            }],
            ..AccountSpec::new("cw")
        }])
        .unwrap();
        let svc = ServiceBuilder::new()
            .layer(CustomEndpointRouteLayer::new(registry.into()))
            .layer(InjectHeadersLayer::from_route())
            .service(service_fn(|req: Request<Full<Bytes>>| async move {
                let h = req.headers();
                let auth: Vec<_> = h.get_all("authorization").iter().collect();
                assert_eq!(auth, ["Bearer wandb-key"]);
                assert_eq!(h.get_all("openai-project").iter().count(), 1);
                assert_eq!(h["openai-project"], "team/proj");
                assert_eq!(h["openai-organization"], "org-1");
                assert_eq!(h["x-client-header"], "kept");
                for (name, value) in h {
                    if name != "x-client-header" {
                        assert!(value.is_sensitive(), "{name} not sensitive");
                    }
                }
                assert!(!format!("{req:?}").contains("wandb-key"));
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
            }));
        let req = Request::post("/proxy-api/cw/inference/chat/completions")
            .header("authorization", "Bearer client-tries-its-own")
            .header("authorization", "Bearer and-another")
            .header("openai-project", "client/spoof")
            .header("x-client-header", "kept")
            .body(Full::default())
            .unwrap();
        assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn every_injected_value_replaces_every_client_value() {
        let mut injected = map(&[("authorization", "Bearer up"), ("x-b", "b1")]);
        injected.append("x-multi", HeaderValue::from_static("m1"));
        injected.append("x-multi", HeaderValue::from_static("m2"));
        injected.append("x-b", HeaderValue::from_static("b2"));
        let svc = InjectHeaders::fixed(
            service_fn(|req: Request<Full<Bytes>>| async move {
                let h = req.headers();
                let all = |n: &str| h.get_all(n).iter().cloned().collect::<Vec<_>>();
                assert_eq!(all("authorization"), ["Bearer up"]);
                assert_eq!(all("x-multi"), ["m1", "m2"]);
                assert_eq!(all("x-b"), ["b1", "b2"]);
                assert_eq!(all("x-client"), ["kept"]);
                assert_eq!(h.len(), 6);
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
            }),
            injected,
        );
        let req = Request::get("/")
            .header("x-multi", "client-1")
            .header("authorization", "Bearer client")
            .header("x-multi", "client-2")
            .header("x-b", "client")
            .header("x-client", "kept")
            .body(Full::default())
            .unwrap();
        svc.oneshot(req).await.unwrap();
    }

    #[tokio::test]
    async fn without_a_route_match_nothing_is_injected() {
        let svc = InjectHeaders::from_route(service_fn(|req: Request<Full<Bytes>>| async move {
            assert!(req.headers().is_empty());
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }));
        svc.oneshot(Request::new(Full::default())).await.unwrap();
    }

    #[tokio::test]
    async fn fixed_headers_and_readiness() {
        let (mut svc, mut handle) =
            mock::spawn_layer::<Request<Full<Bytes>>, Response<Full<Bytes>>, _>(
                InjectHeadersLayer::fixed(map(&[("x-api-secret", "s3cret")])),
            );
        handle.allow(0);
        assert!(svc.poll_ready().is_pending());
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(
            svc.call(
                Request::get("/")
                    .header("x-api-secret", "client")
                    .body(Full::default())
                    .unwrap(),
            ),
        );
        let (req, send) = handle.next_request().await.unwrap();
        let values: Vec<_> = req.headers().get_all("x-api-secret").iter().collect();
        assert_eq!(values, ["s3cret"]);
        assert!(values[0].is_sensitive());
        send.send_response(Response::new(Full::default()));
        fut.await.unwrap().unwrap();
        let layer = InjectHeadersLayer::fixed(map(&[("x-api-secret", "s3cret")]));
        assert!(!format!("{layer:?}").contains("s3cret"));
    }

    mod templates {
        use super::*;
        use crate::error::X_GATEWAY_ERROR;
        use http_body_util::BodyExt;

        fn svc()
        -> impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
        > + Clone {
            let registry = Registry::from_accounts(vec![AccountSpec {
                endpoints: vec![EndpointSpec {
                    headers: map(&[
                        ("authorization", "Bearer wandb-key"),
                        ("openai-project", "{team}/inference"),
                        ("x-caller", "{subject} via {key_id}"),
                        ("x-braces", "{not-a-placeholder}"),
                    ]),
                    ..EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1")
                }],
                ..AccountSpec::new("cw")
            }])
            .unwrap();
            let ep = registry.endpoint("cw", "inference").unwrap();
            assert_eq!(ep.header_templates().len(), 2);
            assert!(
                !format!("{ep:?}").contains("inference\"]"),
                "literal parts are not shown"
            );
            ServiceBuilder::new()
                .layer(CustomEndpointRouteLayer::new(registry.into()))
                .layer(InjectHeadersLayer::from_route())
                .service(service_fn(|req: Request<Full<Bytes>>| async move {
                    let h = req.headers();
                    let body = format!(
                        "{}|{}|{}|{}",
                        h["openai-project"].to_str().unwrap(),
                        h["x-caller"].to_str().unwrap(),
                        h["x-braces"].to_str().unwrap(),
                        h.get_all("openai-project").iter().count(),
                    );
                    assert!(h["openai-project"].is_sensitive());
                    Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(body)))
                }))
        }

        async fn call(principal: Option<Principal>) -> (u16, String) {
            let mut req = Request::post("/proxy-api/cw/inference/chat/completions")
                .header("openai-project", "spoofed/project")
                .body(Full::default())
                .unwrap();
            if let Some(p) = principal {
                req.extensions_mut().insert(p);
            }
            let res = svc().oneshot(req).await.unwrap();
            let status = res.status().as_u16();
            if status == 403 {
                assert_eq!(res.headers()[X_GATEWAY_ERROR], "permission_denied");
            }
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }

        #[tokio::test]
        async fn placeholders_are_filled_per_caller() {
            let alice = Principal::new("alice-laptop", "alice@example.com", ["research", "sales"]);
            assert_eq!(
                call(Some(alice)).await,
                (
                    200,
                    "research/inference|alice@example.com via alice-laptop|{not-a-placeholder}|1"
                        .to_owned()
                )
            );
            let bob = Principal::new("bob-ci", "bob@example.com", ["platform"]);
            assert_eq!(
                call(Some(bob)).await.1,
                "platform/inference|bob@example.com via bob-ci|{not-a-placeholder}|1"
            );
        }

        #[tokio::test]
        async fn a_missing_variable_is_a_403_not_a_malformed_header() {
            let loner = Principal::new("solo", "solo@example.com", [] as [&str; 0]);
            let (status, body) = call(Some(loner)).await;
            assert_eq!(status, 403);
            assert!(
                body.contains("`openai-project`") && body.contains("{team}"),
                "{body}"
            );
            let (status, _) = call(None).await;
            assert_eq!(status, 403);
        }
    }
}
