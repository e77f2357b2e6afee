//! [`RescueLayer`]: the one place where transport errors become the gateway's error responses
//! ([`classify`] walks `source()`, as linkerd2-proxy's `HttpRescue` does).

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::{
    BodyIdleTimeout, ConnectError, GatewayError, InvalidRequestBody, KeyStoreUnavailable,
    NoUpstream, PayloadTooLarge, UnsupportedTransferEncoding, UpstreamCredentialRejected,
    UpstreamTimeout,
};
use crate::BoxError;

/// Maps a transport error to the gateway's error response, walking the `source()` chain.
///
/// This is the only place where errors become statuses.
pub fn classify(err: &(dyn StdError + 'static)) -> GatewayError {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
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
        if e.is::<BodyIdleTimeout>() {
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
        if e.is::<ConnectError>() {
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
/// See the [module docs](crate::error) for an example.
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
/// See the [module docs](crate::error) for an example.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::X_GATEWAY_ERROR;
    use http_body_util::Full;
    use tower::{Service, ServiceExt, service_fn};

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
        let stalled =
            InvalidRequestBody(Box::new(BodyIdleTimeout(std::time::Duration::from_secs(1))));
        assert_eq!(classify(&stalled).code(), "request_body_timeout");
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
