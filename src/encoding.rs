//! Asking the upstream for an unencoded body, and never separating a body from its
//! `Content-Encoding`.
//!
//! SSE must reach the client token by token; a compressed stream would be held back by the
//! compressor (and some OpenAI clients mishandle it). [`IdentityEncodingLayer`] replaces any
//! `Accept-Encoding` the client sent with `identity` on the way up.
//!
//! On the way down the response passes untouched: if an upstream encodes anyway, the client
//! gets the encoded bytes together with their `Content-Encoding` (and `Content-Length`), never
//! one without the other. This layer does not decode, and nothing else in the gateway strips
//! the header.
//!
//! [`IdentityEncoding`] is tower-http's [`SetRequestHeader`] in its overriding mode with a fixed
//! value, under a name that says what it is for; its future is the inner service's own.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_gateway::encoding::IdentityEncodingLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(IdentityEncodingLayer::new())
//!     .service(service_fn(|req: Request<Full<Bytes>>| async move {
//!         assert_eq!(req.headers()["accept-encoding"], "identity");
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
//!     }));
//! let req = Request::builder()
//!     .header("accept-encoding", "gzip, br")
//!     .body(Full::default())
//!     .unwrap();
//! svc.oneshot(req).await.unwrap();
//! # }
//! ```

use std::fmt;
use std::task::{Context, Poll};

use http::header::{ACCEPT_ENCODING, HeaderValue};
use http::{Request, Response};
use tower_http::set_header::SetRequestHeader;
use tower_layer::Layer;
use tower_service::Service;

/// Layer that applies [`IdentityEncoding`]. See the [module docs](self) for an example.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityEncodingLayer(());

impl IdentityEncodingLayer {
    /// Creates the layer.
    pub fn new() -> Self {
        Self(())
    }
}

impl<S> Layer<S> for IdentityEncodingLayer {
    type Service = IdentityEncoding<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdentityEncoding::new(inner)
    }
}

/// Middleware that sets `Accept-Encoding: identity` on every request, replacing whatever the
/// client sent: tower-http's [`SetRequestHeader`], overriding.
///
/// See the [module docs](self) for details and an example.
#[derive(Clone)]
pub struct IdentityEncoding<S> {
    inner: SetRequestHeader<S, HeaderValue>,
}

impl<S> IdentityEncoding<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner: SetRequestHeader::overriding(
                inner,
                ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            ),
        }
    }

    /// Returns an [`IdentityEncodingLayer`].
    pub fn layer() -> IdentityEncodingLayer {
        IdentityEncodingLayer::new()
    }

    /// Gets a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// Gets a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }
}

impl<S: fmt::Debug> fmt::Debug for IdentityEncoding<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityEncoding")
            .field("inner", self.get_ref())
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdentityEncoding<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Overriding: `insert` replaces every value the client sent.
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::Response;
    use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tower::{ServiceExt, service_fn};
    use tower_test::mock;

    #[tokio::test]
    async fn every_accept_encoding_becomes_identity() {
        for sent in [
            &[][..],
            &["gzip"],
            &["gzip, deflate, br", "zstd"],
            &["identity"],
        ] {
            let svc = IdentityEncoding::new(service_fn(|req: Request<Full<Bytes>>| async move {
                let values: Vec<_> = req.headers().get_all(ACCEPT_ENCODING).iter().collect();
                assert_eq!(values, ["identity"]);
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
            }));
            let mut req = Request::new(Full::default());
            for v in sent {
                req.headers_mut()
                    .append(ACCEPT_ENCODING, HeaderValue::from_static(v));
            }
            svc.oneshot(req).await.unwrap();
        }
    }

    #[tokio::test]
    async fn an_encoded_response_keeps_its_header_and_bytes_together() {
        let gzipped: &'static [u8] = &[
            0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let svc = IdentityEncoding::new(service_fn(move |_req: Request<Full<Bytes>>| async move {
            let mut res = Response::new(Full::<Bytes>::from(gzipped));
            res.headers_mut()
                .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            res.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(gzipped.len()));
            Ok::<_, Infallible>(res)
        }));
        let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
        assert_eq!(res.headers()[CONTENT_ENCODING], "gzip");
        assert_eq!(
            res.headers()[CONTENT_LENGTH],
            gzipped.len().to_string().as_str()
        );
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), gzipped);
    }

    /// No extra future on the hot path: the future is the inner service's own.
    #[allow(dead_code)]
    fn the_future_is_the_inner_services<S, B>(
        fut: <IdentityEncoding<S> as Service<Request<B>>>::Future,
    ) -> S::Future
    where
        S: Service<Request<B>, Response = Response<B>>,
    {
        fut
    }

    #[test]
    fn the_layer_is_copy_and_debug_shows_the_inner_service() {
        fn copy<T: Copy>(_: T) {}
        copy(IdentityEncodingLayer::default());
        let svc = IdentityEncodingLayer::new().layer("inner");
        assert_eq!(format!("{svc:?}"), r#"IdentityEncoding { inner: "inner" }"#);
        assert_eq!(*svc.get_ref(), "inner");
        assert_eq!(svc.into_inner(), "inner");
    }

    #[tokio::test]
    async fn readiness_passes_through() {
        let (mut svc, mut handle) =
            mock::spawn_layer::<Request<Full<Bytes>>, Response<Full<Bytes>>, _>(
                IdentityEncodingLayer::new(),
            );
        handle.allow(0);
        assert!(svc.poll_ready().is_pending());
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(svc.call(Request::new(Full::default())));
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.headers()[ACCEPT_ENCODING], "identity");
        send.send_response(Response::new(Full::default()));
        fut.await.unwrap().unwrap();
    }
}
