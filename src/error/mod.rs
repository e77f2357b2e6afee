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
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use pin_project_lite::pin_project;

use crate::BoxError;

mod rescue;

pub use self::rescue::{Rescue, RescueFuture, RescueLayer, classify};

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
        if self.code == "insufficient_quota" {
            // OpenAI's type for a spent budget, which its SDKs tell apart from a rate limit.
            return "insufficient_quota";
        }
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict",
            429 => "rate_limit_exceeded",
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

/// Could not connect to the upstream: TCP, TLS, or the connect timeout. The cause is its
/// [`source`](std::error::Error::source) (502 once rescued).
#[derive(Debug)]
pub struct ConnectError(pub(crate) BoxError);

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("could not connect to the upstream")
    }
}

impl StdError for ConnectError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// No body frame arrived within the idle timeout, either way (408 for a request body that
/// stalled before the response head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyIdleTimeout(pub(crate) std::time::Duration);

impl fmt::Display for BodyIdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no body data for {:?}", self.0)
    }
}

impl StdError for BodyIdleTimeout {}

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

    #[test]
    fn json_shape_and_header() {
        let err = GatewayError::invalid_path("bad \"path\"");
        let res: Response<Bytes> = err.into_response();
        assert_eq!(res.status(), 400);
        assert_eq!(res.headers()[X_GATEWAY_ERROR], "invalid_path");
        assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
        let body = res.into_body();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], "bad \"path\"");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_path");
    }
}
