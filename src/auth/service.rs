use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderMap, HeaderName, PROXY_AUTHORIZATION};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::{KeyStore, Principal};
use crate::BoxError;
use crate::error::{GatewayError, KeyStoreUnavailable};

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Layer that applies [`GatewayAuth`]. See the [module docs](super) for an example.
pub struct GatewayAuthLayer<K> {
    store: Arc<K>,
}

impl<K> GatewayAuthLayer<K> {
    /// Authenticates against `store`.
    pub fn new(store: K) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// Authenticates against a shared store.
    pub fn from_arc(store: Arc<K>) -> Self {
        Self { store }
    }
}

impl<K> Clone for GatewayAuthLayer<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
        }
    }
}

impl<K> fmt::Debug for GatewayAuthLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayAuthLayer").finish_non_exhaustive()
    }
}

impl<S, K> Layer<S> for GatewayAuthLayer<K> {
    type Service = GatewayAuth<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        GatewayAuth {
            inner,
            store: self.store.clone(),
        }
    }
}

/// Middleware that authenticates the caller's gateway key and inserts its [`Principal`].
///
/// See the [module docs](super) for details and an example.
pub struct GatewayAuth<S, K> {
    inner: S,
    store: Arc<K>,
}

impl<S, K> GatewayAuth<S, K> {
    /// Wraps `inner`, authenticating against `store`.
    pub fn new(inner: S, store: K) -> Self {
        Self {
            inner,
            store: Arc::new(store),
        }
    }

    /// Returns a [`GatewayAuthLayer`].
    pub fn layer(store: K) -> GatewayAuthLayer<K> {
        GatewayAuthLayer::new(store)
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

impl<S: Clone, K> Clone for GatewayAuth<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            store: self.store.clone(),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for GatewayAuth<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayAuth")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Finds the gateway key: `Authorization: Bearer <key>`, else `x-api-key: <key>`.
fn credential(headers: &HeaderMap) -> Result<&str, &'static str> {
    let mut auth = headers.get_all(AUTHORIZATION).iter();
    let first = auth.next();
    if auth.next().is_some() {
        return Err("Send exactly one Authorization header.");
    }
    if let Some(value) = first {
        // `to_str` leaves visible ASCII and tabs, so ASCII trimming is all the trimming there is.
        let value = value
            .to_str()
            .map_err(|_| "The Authorization header is malformed.")?
            .trim_ascii();
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            let token = token.trim_ascii();
            return if token.is_empty() {
                Err(
                    "The Authorization header has no key; send `Authorization: Bearer <gateway key>`.",
                )
            } else {
                Ok(token)
            };
        }
        if !headers.contains_key(X_API_KEY) {
            return Err("Use `Authorization: Bearer <gateway key>`.");
        }
    }
    let mut keys = headers.get_all(X_API_KEY).iter();
    match (keys.next(), keys.next()) {
        (None, _) => Err(
            "Missing gateway API key; send `Authorization: Bearer <gateway key>` or `x-api-key`.",
        ),
        (Some(_), Some(_)) => Err("Send exactly one x-api-key header."),
        (Some(v), None) => match v.to_str().map(str::trim_ascii) {
            Ok(key) if !key.is_empty() => Ok(key),
            _ => Err("The x-api-key header is malformed."),
        },
    }
}

/// Removes every header that can carry a client credential.
fn strip_credentials(headers: &mut HeaderMap) {
    headers.remove(AUTHORIZATION);
    // The others are rare: one look over the names is cheaper than three lookups that miss.
    let others = [PROXY_AUTHORIZATION, X_API_KEY, API_KEY];
    if headers.keys().any(|name| others.contains(name)) {
        for name in others {
            headers.remove(name);
        }
    }
}

impl<S, K, ReqBody, ResBody> Service<Request<ReqBody>> for GatewayAuth<S, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    K: KeyStore,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<K::Future, S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let key = match credential(req.headers()) {
            Ok(key) => key,
            Err(message) => return ResponseFuture::unauthorized(message),
        };
        // A store that can answer at once (the in-memory one) saves the future and the clone
        // of the inner service.
        if let Some(answer) = self.store.lookup_now(key) {
            return match answer {
                Ok(Some(principal)) => {
                    strip_credentials(req.headers_mut());
                    record_principal(&principal);
                    req.extensions_mut().insert(principal);
                    ResponseFuture {
                        state: State::Inner {
                            future: self.inner.call(req),
                        },
                    }
                }
                Ok(None) => ResponseFuture::unauthorized(INVALID_KEY),
                Err(err) => ResponseFuture::store_failed(err),
            };
        }
        let lookup = self.store.lookup(key);
        strip_credentials(req.headers_mut());
        // The instance that was polled ready is the one that will be called.
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        ResponseFuture {
            // Boxed, so that the future of a store that answers at once, the common case,
            // does not carry room for a request and a service it never holds.
            state: State::Lookup {
                pending: Box::pin(Pending {
                    lookup,
                    inner: Some(inner),
                    req: Some(req),
                }),
            },
        }
    }
}

pin_project! {
    /// Response future of [`GatewayAuth`].
    pub struct ResponseFuture<L, S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<L, S, ReqBody, ResBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<L, S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
    {
        Lookup {
            pending: Pin<Box<Pending<L, S, ReqBody>>>,
        },
        Inner {
            #[pin]
            future: S::Future,
        },
        Reject {
            response: Option<Response<ResBody>>,
        },
        Failed {
            error: Option<BoxError>,
        },
    }
}

pin_project! {
    /// A lookup by a store that answers asynchronously, with what the inner call needs.
    #[project = PendingProj]
    struct Pending<L, S, ReqBody> {
        #[pin]
        lookup: L,
        inner: Option<S>,
        req: Option<Request<ReqBody>>,
    }
}

const INVALID_KEY: &str = "Invalid gateway API key.";

impl<L, S, ReqBody, ResBody> ResponseFuture<L, S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
    ResBody: From<Bytes>,
{
    fn unauthorized(message: &'static str) -> Self {
        Self {
            state: State::Reject {
                response: Some(GatewayError::unauthorized(message).into_response()),
            },
        }
    }

    fn store_failed(err: BoxError) -> Self {
        tracing::error!(error = %err, "key store lookup failed");
        Self {
            state: State::Failed {
                error: Some(KeyStoreUnavailable::new().into()),
            },
        }
    }
}

impl<L, S, ReqBody, ResBody> Future for ResponseFuture<L, S, ReqBody, ResBody>
where
    L: Future<Output = Result<Option<Principal>, BoxError>>,
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Lookup { pending } => {
                    let PendingProj { lookup, inner, req } = pending.as_mut().project();
                    match ready!(lookup.poll(cx)) {
                        Ok(Some(principal)) => {
                            let mut req = req.take().expect("polled after completion");
                            let mut inner = inner.take().expect("polled after completion");
                            record_principal(&principal);
                            req.extensions_mut().insert(principal);
                            let future = inner.call(req);
                            state.set(State::Inner { future });
                        }
                        Ok(None) => {
                            let err = GatewayError::unauthorized(INVALID_KEY);
                            return Poll::Ready(Ok(err.into_response()));
                        }
                        Err(err) => {
                            tracing::error!(error = %err, "key store lookup failed");
                            return Poll::Ready(Err(KeyStoreUnavailable::new().into()));
                        }
                    }
                }
                StateProj::Inner { future } => return future.poll(cx).map_err(Into::into),
                StateProj::Reject { response } => {
                    return Poll::Ready(Ok(response.take().expect("polled after completion")));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
            }
        }
    }
}

impl<L, S, ReqBody, ResBody> fmt::Debug for ResponseFuture<L, S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Records who called on the current span (the request span of
/// [`trace`](crate::trace), when there is one): the key's label and its subject, never the key.
fn record_principal(principal: &Principal) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("gateway.key_id", &*principal.key_id);
        span.record("gateway.subject", &*principal.subject);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::HashedKeyStore;
    use crate::error::X_GATEWAY_ERROR;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use std::future::Ready;
    use tower::{ServiceBuilder, ServiceExt, service_fn};
    use tower_test::mock;

    fn store() -> HashedKeyStore {
        HashedKeyStore::new()
            .with_key(
                "gw-alice-key",
                Principal::new("alice-laptop", "alice@example.com", ["research"]),
            )
            .unwrap()
    }

    fn request(headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut b = Request::builder().uri("/proxy-api/a/e/chat/completions");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(Full::default()).unwrap()
    }

    #[tokio::test]
    async fn accepted_keys_reach_inner_without_any_credential() {
        let cases: &[&[(&str, &str)]] = &[
            &[("authorization", "Bearer gw-alice-key")],
            &[("authorization", "bearer   gw-alice-key  ")],
            &[("x-api-key", "gw-alice-key")],
            &[
                ("authorization", "Basic Zm9v"),
                ("x-api-key", "gw-alice-key"),
            ],
            &[
                ("authorization", "Bearer gw-alice-key"),
                ("proxy-authorization", "Basic Zm9v"),
                ("api-key", "azure-style"),
                ("x-api-key", "other"),
            ],
            &[
                ("authorization", "Bearer gw-alice-key"),
                ("api-key", "one"),
                ("api-key", "two"),
            ],
            &[
                ("x-client", "kept"),
                ("authorization", "Bearer gw-alice-key"),
                ("proxy-authorization", "Basic Zm9v"),
            ],
        ];
        for headers in cases {
            let svc = ServiceBuilder::new()
                .layer(GatewayAuthLayer::new(store()))
                .service(service_fn(|req: Request<Full<Bytes>>| async move {
                    let p = req.extensions().get::<Principal>().expect("principal");
                    assert_eq!(&*p.key_id, "alice-laptop");
                    assert!(p.in_team("research"));
                    for h in [
                        "authorization",
                        "proxy-authorization",
                        "x-api-key",
                        "api-key",
                    ] {
                        assert!(
                            req.headers().get(h).is_none(),
                            "{h} reached the inner service"
                        );
                    }
                    Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok")))
                }));
            let res = svc.oneshot(request(headers)).await.unwrap();
            assert_eq!(res.status(), 200, "{headers:?}");
        }
    }

    #[tokio::test]
    async fn rejected_requests_never_reach_inner() {
        let cases: &[&[(&str, &str)]] = &[
            &[],
            &[("authorization", "Bearer wrong")],
            &[("authorization", "Bearer ")],
            &[("authorization", "Basic Zm9v")],
            &[("authorization", "gw-alice-key")],
            &[("x-api-key", "")],
            &[("x-api-key", "wrong")],
            &[
                ("authorization", "Bearer gw-alice-key"),
                ("authorization", "Bearer gw-alice-key"),
            ],
            &[("x-api-key", "gw-alice-key"), ("x-api-key", "gw-alice-key")],
        ];
        for headers in cases {
            let svc = ServiceBuilder::new()
                .layer(GatewayAuthLayer::new(store()))
                .service(service_fn(|_req: Request<Full<Bytes>>| async move {
                    panic!("a rejected request reached the inner service");
                    #[allow(unreachable_code)]
                    Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
                }));
            let res = svc.oneshot(request(headers)).await.unwrap();
            assert_eq!(res.status(), 401, "{headers:?}");
            assert_eq!(res.headers()[X_GATEWAY_ERROR], "invalid_api_key");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let text = std::str::from_utf8(&body).unwrap();
            assert!(
                !text.contains("gw-alice-key") && !text.contains("wrong"),
                "{text}"
            );
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(v["error"]["type"], "authentication_error");
        }
    }

    #[tokio::test]
    async fn readiness_passes_through() {
        let (mut svc, mut handle) =
            mock::spawn_layer::<Request<Full<Bytes>>, Response<Full<Bytes>>, _>(
                GatewayAuthLayer::new(store()),
            );
        handle.allow(0);
        assert!(svc.poll_ready().is_pending());
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(svc.call(request(&[("authorization", "Bearer gw-alice-key")])));
        let (req, send) = handle.next_request().await.unwrap();
        assert!(req.extensions().get::<Principal>().is_some());
        assert!(req.headers().get("authorization").is_none());
        send.send_response(Response::new(Full::from("upstream")));
        assert_eq!(fut.await.unwrap().unwrap().status(), 200);
    }

    struct FailingStore;
    impl KeyStore for FailingStore {
        type Future = Ready<Result<Option<Principal>, BoxError>>;
        fn lookup(&self, _key: &str) -> Self::Future {
            std::future::ready(Err("database is down".into()))
        }
    }

    #[tokio::test]
    async fn store_failure_is_an_error_not_an_allow() {
        let svc = ServiceBuilder::new()
            .layer(GatewayAuthLayer::new(FailingStore))
            .service(service_fn(|_req: Request<Full<Bytes>>| async move {
                panic!("reached inner");
                #[allow(unreachable_code)]
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
            }));
        let err = svc
            .oneshot(request(&[("authorization", "Bearer anything")]))
            .await
            .unwrap_err();
        assert!(err.is::<KeyStoreUnavailable>());
    }

    /// A store that only answers asynchronously, like a database would.
    struct SlowStore(HashedKeyStore);
    impl KeyStore for SlowStore {
        type Future =
            std::pin::Pin<Box<dyn Future<Output = Result<Option<Principal>, BoxError>> + Send>>;
        fn lookup(&self, key: &str) -> Self::Future {
            let answer = self.0.get(&crate::auth::KeyDigest::of(key)).cloned();
            Box::pin(async move {
                tokio::task::yield_now().await;
                Ok(answer)
            })
        }
    }

    #[tokio::test]
    async fn asynchronous_stores_work_too() {
        for (key, status) in [("gw-alice-key", 200), ("nope", 401)] {
            let svc = ServiceBuilder::new()
                .layer(GatewayAuthLayer::new(SlowStore(store())))
                .service(service_fn(|req: Request<Full<Bytes>>| async move {
                    assert!(req.extensions().get::<Principal>().is_some());
                    assert!(req.headers().get("authorization").is_none());
                    Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
                }));
            let res = svc
                .oneshot(request(&[("authorization", &format!("Bearer {key}"))]))
                .await
                .unwrap();
            assert_eq!(res.status(), status);
        }
    }

    /// The fields recorded on spans while it is the default subscriber, as `name=value`.
    #[derive(Clone, Default)]
    struct Recorded(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorded {
        fn on_record(
            &self,
            _: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Fields<'a>(&'a mut Vec<String>);
            impl tracing::field::Visit for Fields<'_> {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                    self.0.push(format!("{}={value:?}", field.name()));
                }
            }
            values.record(&mut Fields(&mut self.0.lock().unwrap()));
        }
    }

    async fn recorded_on_the_span<K: KeyStore>(store: K) -> Vec<String> {
        use tracing::Instrument;
        use tracing_subscriber::layer::SubscriberExt;
        let recorded = Recorded::default();
        let _default =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(recorded.clone()));
        let span = tracing::info_span!(
            "request",
            gateway.key_id = tracing::field::Empty,
            gateway.subject = tracing::field::Empty,
        );
        let svc = GatewayAuthLayer::new(store).layer(service_fn(|_: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }));
        let req = request(&[("authorization", "Bearer gw-alice-key")]);
        let res = svc.oneshot(req).instrument(span).await.unwrap();
        assert_eq!(res.status(), 200);
        recorded.0.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn who_called_is_recorded_on_the_span_and_never_the_key() {
        let expected = [
            r#"gateway.key_id="alice-laptop""#,
            r#"gateway.subject="alice@example.com""#,
        ];
        for recorded in [
            recorded_on_the_span(store()).await,
            recorded_on_the_span(SlowStore(store())).await,
        ] {
            assert_eq!(recorded, expected);
        }
    }

    #[test]
    fn credential_parsing_table() {
        let h = |pairs: &[(&'static str, &'static str)]| -> HeaderMap {
            pairs
                .iter()
                .map(|(n, v)| (HeaderName::from_static(n), v.parse().unwrap()))
                .collect()
        };
        assert_eq!(credential(&h(&[("authorization", "Bearer k1")])), Ok("k1"));
        assert_eq!(credential(&h(&[("authorization", "BEARER k1")])), Ok("k1"));
        assert_eq!(credential(&h(&[("x-api-key", " k2 ")])), Ok("k2"));
        assert_eq!(
            credential(&h(&[("authorization", "Bearer k1"), ("x-api-key", "k2")])),
            Ok("k1")
        );
        assert!(credential(&h(&[])).is_err());
        assert!(credential(&h(&[("authorization", "Token k1")])).is_err());
        // Spaces and tabs around the scheme and the key; the scheme ends at the first space.
        assert_eq!(
            credential(&h(&[("authorization", "\t Bearer \t k1\t ")])),
            Ok("k1")
        );
        assert_eq!(
            credential(&h(&[("authorization", "bearer  k 1")])),
            Ok("k 1")
        );
        assert!(credential(&h(&[("authorization", "Bearer\tk1")])).is_err());
        assert!(credential(&h(&[("authorization", "Bearer \t ")])).is_err());
        assert!(credential(&h(&[("x-api-key", "\t ")])).is_err());
        let mut raw = HeaderMap::new();
        raw.insert(
            AUTHORIZATION,
            http::HeaderValue::from_bytes(b"Bearer k\xe9").unwrap(),
        );
        assert_eq!(
            credential(&raw),
            Err("The Authorization header is malformed.")
        );
    }
}
