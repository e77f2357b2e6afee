use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use super::{
    DEFAULT_PATH_PREFIX, PathError, RouteMatch, common_path, parse_proxy_path, upstream_path,
    upstream_uri,
};
use crate::error::{GatewayError, ResponseFuture};
use crate::model::is_valid_prefix;
use crate::registry::SharedRegistry;

/// Layer that applies [`CustomEndpointRoute`]. See the [module docs](super) for an example.
#[derive(Clone, Debug)]
pub struct CustomEndpointRouteLayer {
    config: Arc<Config>,
}

/// What a [`CustomEndpointRoute`] routes with, behind one `Arc`: the service is cloned per
/// request, and one reference count is cheaper than two.
#[derive(Clone, Debug)]
struct Config {
    registry: SharedRegistry,
    prefix: Box<str>,
}

impl CustomEndpointRouteLayer {
    /// Routes under [`DEFAULT_PATH_PREFIX`] (`/proxy-api`) to the endpoints of `registry`.
    pub fn new(registry: SharedRegistry) -> Self {
        Self {
            config: Arc::new(Config {
                registry,
                prefix: DEFAULT_PATH_PREFIX.into(),
            }),
        }
    }

    /// Sets the path prefix: empty, or starting with `/` and not ending with `/`.
    ///
    /// # Panics
    ///
    /// If the prefix is not of that form.
    #[must_use]
    pub fn path_prefix(mut self, prefix: &str) -> Self {
        assert!(
            is_valid_prefix(prefix),
            "a path prefix is empty or starts with `/` and does not end with `/`"
        );
        Arc::make_mut(&mut self.config).prefix = prefix.into();
        self
    }
}

impl<S> Layer<S> for CustomEndpointRouteLayer {
    type Service = CustomEndpointRoute<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CustomEndpointRoute {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Middleware that routes a proxy path to its endpoint and rewrites the URI.
///
/// See the [module docs](super) for details and an example.
#[derive(Clone)]
pub struct CustomEndpointRoute<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> CustomEndpointRoute<S> {
    /// Wraps `inner`, routing under `/proxy-api`.
    pub fn new(inner: S, registry: SharedRegistry) -> Self {
        CustomEndpointRouteLayer::new(registry).layer(inner)
    }

    /// Returns a [`CustomEndpointRouteLayer`].
    pub fn layer(registry: SharedRegistry) -> CustomEndpointRouteLayer {
        CustomEndpointRouteLayer::new(registry)
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

impl<S: fmt::Debug> fmt::Debug for CustomEndpointRoute<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomEndpointRoute")
            .field("inner", &self.inner)
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

impl<S> CustomEndpointRoute<S> {
    fn path_error(&self, e: PathError) -> GatewayError {
        match e.status() {
            StatusCode::NOT_FOUND => GatewayError::not_found(format!(
                "No route: use {}/{{providerAccountName}}/{{endpointName}}/{{path}}.",
                self.config.prefix
            )),
            StatusCode::URI_TOO_LONG => {
                GatewayError::new(StatusCode::URI_TOO_LONG, "uri_too_long", e.message())
            }
            _ => GatewayError::invalid_path(e.message()),
        }
    }

    fn route<B>(&self, req: &mut Request<B>) -> Result<(), GatewayError> {
        if req.method() == Method::CONNECT || req.method() == Method::TRACE {
            return Err(GatewayError::method_not_allowed(format!(
                "The gateway does not proxy {} requests.",
                req.method()
            )));
        }
        let path = parse_proxy_path(&self.config.prefix, req.uri().path())
            .map_err(|e| self.path_error(e))?;
        let registry = self.config.registry.load();
        // Error messages name only what the registry knows: a client that pasted a key into
        // the path must not get it echoed back.
        let account = registry
            .account(path.account)
            .ok_or_else(|| GatewayError::not_found("No such provider account."))?;
        let target = account.endpoint(path.endpoint).ok_or_else(|| {
            GatewayError::not_found(format!(
                "No such endpoint in provider account \"{}\".",
                account.name()
            ))
        })?;
        let common = common_path(path.rest);
        // A common path without a query has its upstream URI ready-made: a clone, where
        // building one allocates and parses.
        let ready_made = common
            .filter(|_| req.uri().query().is_none())
            .and_then(|i| target.common_uri(i));
        let uri = match ready_made {
            Some(uri) => uri.clone(),
            None => upstream_uri(target.base(), path.rest, req.uri().query())
                .map_err(|e| self.path_error(e))?,
        };
        let route = RouteMatch {
            account: target.account().clone(),
            endpoint: target.name().clone(),
            upstream_path: upstream_path(common, path.rest),
            target: target.clone(),
        };
        *req.uri_mut() = uri;
        req.extensions_mut().insert(route);
        Ok(())
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CustomEndpointRoute<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match self.route(&mut req) {
            Ok(()) => ResponseFuture::inner(self.inner.call(req)),
            Err(err) => ResponseFuture::reject(err.into_response()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::X_GATEWAY_ERROR;
    use crate::registry::{AccountSpec, EndpointSpec, Registry};
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tower::{ServiceExt, service_fn};
    use tower_test::mock;

    fn registry() -> SharedRegistry {
        Registry::from_accounts(vec![AccountSpec {
            endpoints: vec![
                EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1"),
                EndpointSpec::new("local", "http://127.0.0.1:9999"),
            ],
            ..AccountSpec::new("coreweave-model")
        }])
        .unwrap()
        .into()
    }

    fn svc()
    -> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
    {
        CustomEndpointRouteLayer::new(registry()).layer(service_fn(
            |req: Request<Full<Bytes>>| async move {
                let route = req.extensions().get::<RouteMatch>().expect("route match");
                let body = format!(
                    "{} {} {} {}",
                    route.account,
                    route.endpoint,
                    route.upstream_path,
                    req.uri()
                );
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(body)))
            },
        ))
    }

    async fn call(method: Method, target: &str) -> (u16, Option<String>, String) {
        let req = Request::builder()
            .method(method)
            .uri(target)
            .body(Full::default())
            .unwrap();
        let res = svc().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let code = res
            .headers()
            .get(X_GATEWAY_ERROR)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, code, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn routes_and_rewrites() {
        let (status, code, body) = call(
            Method::POST,
            "/proxy-api/coreweave-model/inference/chat/completions?stream=true",
        )
        .await;
        assert_eq!((status, code), (200, None));
        assert_eq!(
            body,
            "coreweave-model inference /chat/completions https://api.inference.wandb.ai/v1/chat/completions?stream=true"
        );
        let (_, _, body) = call(Method::GET, "/proxy-api/coreweave-model/local/models").await;
        assert!(body.ends_with("http://127.0.0.1:9999/models"), "{body}");
    }

    #[tokio::test]
    async fn ready_made_and_built_upstream_uris_agree() {
        let bases = [
            "https://api.inference.wandb.ai/v1",
            "http://127.0.0.1:9999",
            "http://up.example:8080/openai/deployments/gpt-4o",
        ];
        let registry = Registry::from_accounts(vec![AccountSpec {
            endpoints: bases
                .iter()
                .enumerate()
                .map(|(i, base)| EndpointSpec::new(format!("e{i}"), *base))
                .collect(),
            ..AccountSpec::new("a")
        }])
        .unwrap();
        let svc = CustomEndpointRouteLayer::new(registry.into()).layer(service_fn(
            |req: Request<Full<Bytes>>| async move {
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(req.uri().to_string())))
            },
        ));
        let mut checked = 0;
        for (i, base) in bases.iter().enumerate() {
            let parsed = crate::registry::UpstreamBase::parse(base).unwrap();
            let ready_made = crate::model::COMMON_PATHS.iter().copied();
            for rest in ready_made.chain(["", "/", "/chat/completions/", "/models/x"]) {
                for query in [None, Some(""), Some("stream=true")] {
                    let target = match query {
                        Some(q) => format!("/proxy-api/a/e{i}{rest}?{q}"),
                        None => format!("/proxy-api/a/e{i}{rest}"),
                    };
                    let req = Request::get(&target).body(Full::default()).unwrap();
                    let res = svc.clone().oneshot(req).await.unwrap();
                    let body = res.into_body().collect().await.unwrap().to_bytes();
                    let expected = upstream_uri(&parsed, rest, query).unwrap().to_string();
                    assert_eq!(body, expected, "{target}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 3 * 9 * 3);
    }

    #[test]
    fn common_upstream_paths_are_static() {
        use std::borrow::Cow;
        for (rest, borrowed) in [
            ("/chat/completions", true),
            ("/completions", true),
            ("/embeddings", true),
            ("/models", true),
            ("/responses", true),
            ("/chat/completions/", false),
            ("/models/llama", false),
            ("/Models", false),
            ("", false),
        ] {
            let path = upstream_path(common_path(rest), rest);
            assert_eq!(path, rest);
            assert_eq!(matches!(path, Cow::Borrowed(_)), borrowed, "{rest:?}");
        }
    }

    #[tokio::test]
    async fn rejections() {
        let cases = [
            (
                Method::GET,
                "/proxy-api/nope/inference/models",
                404,
                "not_found",
            ),
            (
                Method::GET,
                "/proxy-api/coreweave-model/nope/models",
                404,
                "not_found",
            ),
            (Method::GET, "/elsewhere", 404, "not_found"),
            (
                Method::GET,
                "/proxy-api/coreweave-model/inference/../x",
                400,
                "invalid_path",
            ),
            (
                Method::GET,
                "/proxy-api/nope/inference/%2e%2e/x",
                400,
                "invalid_path",
            ),
            (
                Method::TRACE,
                "/proxy-api/coreweave-model/inference/models",
                405,
                "method_not_allowed",
            ),
        ];
        for (method, target, status, code) in cases {
            let (s, c, body) = call(method.clone(), target).await;
            assert_eq!(
                (s, c.as_deref()),
                (status, Some(code)),
                "{method} {target}: {body}"
            );
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(v["error"]["message"].as_str().unwrap().len() > 10);
        }
    }

    #[tokio::test]
    async fn connect_is_refused() {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("api.inference.wandb.ai:443")
            .body(Full::default())
            .unwrap();
        let res = svc().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 405);
        assert!(res.headers().contains_key(http::header::ALLOW));
    }

    #[tokio::test]
    async fn a_registry_swap_takes_effect_for_the_next_request() {
        let shared = registry();
        let svc = CustomEndpointRouteLayer::new(shared.clone()).layer(service_fn(
            |req: Request<Full<Bytes>>| async move {
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(req.uri().to_string())))
            },
        ));
        let req = || {
            Request::get("/proxy-api/coreweave-model/inference/models")
                .body(Full::default())
                .unwrap()
        };
        assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), 200);
        shared.store(Registry::default());
        assert_eq!(svc.oneshot(req()).await.unwrap().status(), 404);
    }

    #[tokio::test]
    async fn custom_and_empty_prefix() {
        for (prefix, target) in [
            ("", "/coreweave-model/inference/models"),
            ("/gw", "/gw/coreweave-model/inference/models"),
        ] {
            let svc = CustomEndpointRouteLayer::new(registry())
                .path_prefix(prefix)
                .layer(service_fn(|req: Request<Full<Bytes>>| async move {
                    Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(req.uri().to_string())))
                }));
            let res = svc
                .oneshot(Request::get(target).body(Full::default()).unwrap())
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{prefix:?}");
        }
        assert!(is_valid_prefix("") && is_valid_prefix("/proxy-api") && is_valid_prefix("/a/b"));
        assert!(
            !is_valid_prefix("/")
                && !is_valid_prefix("proxy")
                && !is_valid_prefix("/a/")
                && !is_valid_prefix("/a//b")
        );
    }

    #[tokio::test]
    async fn readiness_passes_through() {
        let (mut svc, mut handle) =
            mock::spawn_layer::<Request<Full<Bytes>>, Response<Full<Bytes>>, _>(
                CustomEndpointRouteLayer::new(registry()),
            );
        handle.allow(0);
        assert!(svc.poll_ready().is_pending());
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(
            svc.call(
                Request::get("/proxy-api/coreweave-model/inference/models")
                    .body(Full::default())
                    .unwrap(),
            ),
        );
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.uri(), "https://api.inference.wandb.ai/v1/models");
        send.send_response(Response::new(Full::default()));
        assert_eq!(fut.await.unwrap().unwrap().status(), 200);
    }
}
