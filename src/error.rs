//! The gateway's own error responses, and the one place where transport errors become them.
//!
//! Every response the gateway makes itself (a rejection by a layer, or a transport failure
//! mapped by [`Rescue`]) carries a JSON body in the OpenAI error shape, so OpenAI SDKs show
//! the message, and an `x-gateway-error: <code>` header, so it is never confused with an
//! upstream response:
//!
//! ```json
//! {"error": {"message": "…", "type": "…", "code": "…"}}
//! ```
//!
//! Layers reject with responses, never with `Err`. `Err` is for transport failures: small typed
//! error structs ([`UpstreamTimeout`], [`UpstreamCredentialRejected`], [`KeyStoreUnavailable`],
//! hyper-util's client errors) boxed as [`BoxError`]. [`RescueLayer`] sits at the top of the
//! stack and maps them to statuses in one place ([`classify`]) by walking `source()`, the way
//! linkerd2-proxy's `HttpRescue` does.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_gateway::error::{RescueLayer, UpstreamTimeout};
//! use tower_gateway::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new().layer(RescueLayer::new()).service(service_fn(
//!     |_req: Request<Full<Bytes>>| async {
//!         Err::<Response<Full<Bytes>>, BoxError>(UpstreamTimeout::new().into())
//!     },
//! ));
//! let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
//! assert_eq!(res.status(), 504);
//! assert_eq!(res.headers()["x-gateway-error"], "upstream_timeout");
//! # }
//! ```

use std::borrow::Cow;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::BoxError;

/// The header every gateway-made response carries, holding the error code.
pub const X_GATEWAY_ERROR: HeaderName = HeaderName::from_static("x-gateway-error");

/// An error response made by the gateway itself.
///
/// The message is a human sentence. It must never contain a key, a key's digest or an upstream
/// header value; the constructors in this crate only put fixed text and validated names in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayError {
    status: StatusCode,
    code: &'static str,
    message: Cow<'static, str>,
}

impl GatewayError {
    /// An error with the given status, machine-readable code and human message.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 401: the request carries no gateway key, or one the key store does not know.
    pub fn unauthorized(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_api_key", message)
    }

    /// 403: the caller lacks the permission.
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_denied", message)
    }

    /// 400: the proxy path is malformed or unsafe.
    pub fn invalid_path(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_path", message)
    }

    /// 404: no such account or endpoint, or a path outside the proxy prefix.
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 405: a method a proxy must not tunnel (CONNECT, TRACE, ...).
    pub fn method_not_allowed(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The machine-readable code, also sent as `x-gateway-error`.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The human message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The OpenAI error `type` for this status.
    pub fn error_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// The JSON body of this error.
    pub fn to_json(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.error_type(),
                "code": self.code,
            }
        });
        Bytes::from(body.to_string())
    }

    /// The response: status, `content-type: application/json`, `x-gateway-error` and the body.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut res = Response::new(B::from(self.to_json()));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(X_GATEWAY_ERROR, HeaderValue::from_static(self.code));
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        res
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl StdError for GatewayError {}

/// The client's request body was malformed (a bad chunk, say) (400): the client's fault, not
/// the upstream's.
#[derive(Debug)]
pub struct InvalidRequestBody(pub BoxError);

impl fmt::Display for InvalidRequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request body is malformed: {}", self.0)
    }
}

impl StdError for InvalidRequestBody {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

macro_rules! transport_error {
    ($(#[$doc:meta])* $name:ident, $display:literal) => {
        $(#[$doc])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $name(());

        impl $name {
            /// Creates the error.
            pub fn new() -> Self {
                Self(())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($display)
            }
        }

        impl StdError for $name {}
    };
}

transport_error!(
    /// The upstream gave no response head within the first-byte timeout (504).
    UpstreamTimeout,
    "upstream gave no response head in time"
);
transport_error!(
    /// The upstream answered 401 or 403 to the gateway's own credential (502); its body is
    /// dropped because it may echo the key.
    UpstreamCredentialRejected,
    "upstream rejected the gateway's credential"
);
transport_error!(
    /// The key store could not answer (503).
    KeyStoreUnavailable,
    "the key store is unavailable"
);
transport_error!(
    /// The request body is larger than the gateway forwards (413).
    PayloadTooLarge,
    "the request body is over the limit"
);
transport_error!(
    /// The request's `Transfer-Encoding` is not plain `chunked` (501): forwarding it would
    /// hand the upstream a body framed differently from what the gateway read.
    UnsupportedTransferEncoding,
    "the request's Transfer-Encoding is not supported"
);
transport_error!(
    /// The request reached the forwarder without an absolute upstream URI (500): the route
    /// layer is missing from the stack.
    NoUpstream,
    "request has no upstream URI; is CustomEndpointRouteLayer in the stack?"
);

/// Maps a transport error to the gateway's error response, walking the `source()` chain.
///
/// This is the only place where errors become statuses.
pub fn classify(err: &(dyn StdError + 'static)) -> GatewayError {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    #[cfg_attr(not(feature = "forward"), allow(unused_mut))]
    let mut connect = false;
    while let Some(e) = cur {
        if e.is::<UpstreamTimeout>() {
            return GatewayError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "The upstream gave no response in time.",
            );
        }
        if e.is::<UpstreamCredentialRejected>() {
            return GatewayError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_auth_failed",
                "The upstream rejected the gateway's credential for this endpoint; ask the \
                 endpoint's managers to check its configured headers.",
            );
        }
        if e.is::<KeyStoreUnavailable>() {
            return GatewayError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "key_store_unavailable",
                "The gateway could not check the API key; try again later.",
            );
        }
        if e.is::<PayloadTooLarge>() || e.is::<http_body_util::LengthLimitError>() {
            return GatewayError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "The request body is larger than the gateway accepts.",
            );
        }
        #[cfg(feature = "forward")]
        if e.is::<crate::forward::BodyIdleTimeout>() {
            // Observable as a status only before the response head: the client's upload stalled.
            return GatewayError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_body_timeout",
                "The request body stalled for longer than the idle timeout.",
            );
        }
        if e.is::<InvalidRequestBody>() {
            // The wrapper of whatever the client's body failed with: a client-side cause it
            // knows (an upload that stalled, or grew past the limit) says more than "malformed".
            if let Some(inner) = e.source().map(classify)
                && inner.status().is_client_error()
            {
                return inner;
            }
            return GatewayError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_body",
                "The request body is malformed.",
            );
        }
        if e.is::<UnsupportedTransferEncoding>() {
            return GatewayError::new(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported_transfer_encoding",
                "Only `Transfer-Encoding: chunked` is supported.",
            );
        }
        if e.is::<NoUpstream>() {
            return GatewayError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no_upstream",
                "The gateway has no upstream for this request.",
            );
        }
        #[cfg(feature = "forward")]
        if e.is::<crate::forward::ConnectError>() {
            connect = true;
        }
        cur = e.source();
    }
    if connect {
        GatewayError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            "The gateway could not connect to the upstream.",
        )
    } else {
        GatewayError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "The upstream connection failed before a response arrived.",
        )
    }
}

/// Layer that applies [`Rescue`]: transport errors become JSON error responses.
///
/// See the [module docs](self) for an example.
#[derive(Clone, Copy, Debug, Default)]
pub struct RescueLayer(());

impl RescueLayer {
    /// Creates the layer.
    pub fn new() -> Self {
        Self(())
    }
}

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rescue::new(inner)
    }
}

/// Middleware that turns the inner service's errors into responses via [`classify`].
///
/// Its error type is [`Infallible`], so the stack can be nested in an axum `Router`.
/// See the [module docs](self) for an example.
#[derive(Clone, Debug)]
pub struct Rescue<S> {
    inner: S,
    /// A readiness failure of `inner`, answered by the next `call` without calling `inner`.
    failed: Option<GatewayError>,
}

impl<S> Rescue<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            failed: None,
        }
    }

    /// Returns a [`RescueLayer`].
    pub fn layer() -> RescueLayer {
        RescueLayer::new()
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

impl<S, Req, B> Service<Req> for Rescue<S>
where
    S: Service<Req, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: From<Bytes>,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = RescueFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        // A readiness failure is answered by the next call, without calling the inner service
        // (which was not ready), instead of closing the connection.
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(err)) => {
                let err: BoxError = err.into();
                let mapped = classify(&*err);
                tracing::error!(error = %err, status = mapped.status().as_u16(), "inner service failed readiness");
                self.failed = Some(mapped);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The inner future is built where it stays, not moved through a temporary.
        if self.failed.is_none() {
            return RescueFuture {
                kind: RescueKind::Inner {
                    future: self.inner.call(req),
                },
            };
        }
        let response = self.failed.take().map(GatewayError::into_response);
        RescueFuture {
            kind: RescueKind::Failed { response },
        }
    }
}

pin_project! {
    /// Response future of [`Rescue`].
    pub struct RescueFuture<F, B> {
        #[pin]
        kind: RescueKind<F, B>,
    }
}

pin_project! {
    #[project = RescueKindProj]
    enum RescueKind<F, B> {
        Inner { #[pin] future: F },
        Failed { response: Option<Response<B>> },
    }
}

impl<F, B, E> Future for RescueFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: From<Bytes>,
{
    type Output = Result<Response<B>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = match self.project().kind.project() {
            RescueKindProj::Inner { future } => future,
            RescueKindProj::Failed { response } => {
                return Poll::Ready(Ok(response.take().expect("polled after completion")));
            }
        };
        match ready!(future.poll(cx)) {
            Ok(res) => Poll::Ready(Ok(res)),
            Err(err) => {
                let err: BoxError = err.into();
                let mapped = classify(&*err);
                tracing::warn!(error = %err, status = mapped.status().as_u16(), code = mapped.code(), "upstream request failed");
                Poll::Ready(Ok(mapped.into_response()))
            }
        }
    }
}

impl<F, B> fmt::Debug for RescueFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RescueFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// Response future of a layer that can reject: either the inner service's future or a
    /// ready-made rejection.
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Inner { #[pin] future: F },
        Reject { response: Option<Response<B>> },
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    pub(crate) fn reject(response: Response<B>) -> Self {
        Self {
            kind: Kind::Reject {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future.poll(cx),
            KindProj::Reject { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use tower::{Service, ServiceExt, service_fn};

    #[test]
    fn json_shape_and_header() {
        let err = GatewayError::invalid_path("bad \"path\"");
        let res: Response<Full<Bytes>> = err.into_response();
        assert_eq!(res.status(), 400);
        assert_eq!(res.headers()[X_GATEWAY_ERROR], "invalid_path");
        assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
        let body = futures_body(res);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], "bad \"path\"");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_path");
    }

    fn futures_body(res: Response<Full<Bytes>>) -> Bytes {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(res.into_body().collect())
            .unwrap()
            .to_bytes()
    }

    #[derive(Debug)]
    struct Wrapper(BoxError);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapper")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn classify_walks_the_source_chain() {
        let cases: Vec<(BoxError, u16, &str)> = vec![
            (UpstreamTimeout::new().into(), 504, "upstream_timeout"),
            (
                Box::new(Wrapper(UpstreamTimeout::new().into())),
                504,
                "upstream_timeout",
            ),
            (
                UpstreamCredentialRejected::new().into(),
                502,
                "upstream_auth_failed",
            ),
            (
                KeyStoreUnavailable::new().into(),
                503,
                "key_store_unavailable",
            ),
            (NoUpstream::new().into(), 500, "no_upstream"),
            (PayloadTooLarge::new().into(), 413, "payload_too_large"),
            (
                Box::new(InvalidRequestBody("bad chunk".into())),
                400,
                "invalid_request_body",
            ),
            // The wrapper defers to a client-side cause it holds, and only to one.
            (
                Box::new(InvalidRequestBody(PayloadTooLarge::new().into())),
                413,
                "payload_too_large",
            ),
            (
                Box::new(InvalidRequestBody(UpstreamTimeout::new().into())),
                400,
                "invalid_request_body",
            ),
            (
                UnsupportedTransferEncoding::new().into(),
                501,
                "unsupported_transfer_encoding",
            ),
            ("something else".into(), 502, "upstream_error"),
        ];
        #[cfg(feature = "forward")]
        {
            let stalled = InvalidRequestBody(Box::new(crate::forward::BodyIdleTimeout(
                std::time::Duration::from_secs(1),
            )));
            assert_eq!(classify(&stalled).code(), "request_body_timeout");
        }
        for (err, status, code) in cases {
            let mapped = classify(&*err);
            assert_eq!(mapped.status().as_u16(), status, "{err}");
            assert_eq!(mapped.code(), code, "{err}");
        }
    }

    /// A service that fails readiness once and panics if called without being ready.
    #[derive(Clone)]
    struct FailsReadiness {
        ready: bool,
    }

    impl Service<()> for FailsReadiness {
        type Response = Response<Full<Bytes>>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Self::Response, BoxError>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.ready = false;
            Poll::Ready(Err(KeyStoreUnavailable::new().into()))
        }

        fn call(&mut self, _req: ()) -> Self::Future {
            assert!(self.ready, "called without being ready");
            std::future::ready(Ok(Response::new(Full::default())))
        }
    }

    #[tokio::test]
    async fn a_readiness_failure_is_answered_without_calling_the_inner_service() {
        let svc = Rescue::new(FailsReadiness { ready: false });
        let res = svc.oneshot(()).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()[X_GATEWAY_ERROR], "key_store_unavailable");
    }

    #[tokio::test]
    async fn readiness_passes_through() {
        let (mut svc, mut handle) =
            tower_test::mock::spawn_layer::<(), Response<Full<Bytes>>, _>(RescueLayer::new());
        handle.allow(0);
        assert!(svc.poll_ready().is_pending());
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(svc.call(()));
        let ((), send) = handle.next_request().await.unwrap();
        send.send_error(UpstreamTimeout::new());
        assert_eq!(fut.await.unwrap().unwrap().status(), 504);
    }

    #[tokio::test]
    async fn rescue_maps_errors_and_passes_responses() {
        let ok = Rescue::new(service_fn(|_: ()| async {
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from("hi")))
        }));
        let res = ok.oneshot(()).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get(X_GATEWAY_ERROR).is_none());

        let failing = Rescue::new(service_fn(|_: ()| async {
            Err::<Response<Full<Bytes>>, BoxError>(UpstreamCredentialRejected::new().into())
        }));
        let res = failing.oneshot(()).await.unwrap();
        assert_eq!(res.status(), 502);
        assert_eq!(res.headers()[X_GATEWAY_ERROR], "upstream_auth_failed");
    }
}
