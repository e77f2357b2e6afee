//! Rate limits: requests per minute and concurrent streams, per key, team, subject or
//! endpoint, counted in this process's memory.
//!
//! [`RateLimitLayer`] sits after authentication, routing and access control (it reads the
//! [`Principal`] and the [`RouteMatch`]) and
//! before the upstream. Every [rule](crate::model::RateLimitRule) that covers the caller and
//! the endpoint applies, each in its own bucket (`team:research` is one bucket for the team,
//! `everyone` one per key); the strictest refuses:
//!
//! - `requests_per_minute` is a GCRA (generic cell rate algorithm): at most N requests in any
//!   minute, a full minute's worth at once after a quiet minute, then one every `60/N`
//!   seconds. Unlike a fixed window it never lets 2N through around a window's edge.
//! - `concurrent_streams` counts responses in flight, until their body ends or is dropped.
//!
//! A refused request never reaches the upstream: it gets 429 in the OpenAI error shape
//! (`rate_limit_exceeded`) with `Retry-After` and `retry-after-ms` (the OpenAI SDKs wait that
//! long and retry by themselves). Every response of a request under a `requests_per_minute`
//! limit carries `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests` and
//! `x-ratelimit-reset-requests` for its strictest bucket.
//!
//! Token budgets and a Redis backend shared by replicas come next; the configuration refuses
//! them until then.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_gateway::ext::{Principal, RouteMatch};
//! use tower_gateway::limits::RateLimitLayer;
//! use tower_gateway::model::{LimitScope, RateLimitRule, RateLimits};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let limits = RateLimits {
//!     rules: vec![RateLimitRule {
//!         requests_per_minute: Some(2),
//!         ..RateLimitRule::new(LimitScope::Everyone)
//!     }],
//!     ..RateLimits::default()
//! };
//! let svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(limits))
//!     .service(service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
//!     }));
//! let call = || {
//!     let mut req = Request::new(Full::default());
//!     req.extensions_mut().insert(Principal::new("ci", "ci@example.com", [] as [&str; 0]));
//!     req
//! };
//! assert_eq!(svc.clone().oneshot(call()).await.unwrap().status(), 200);
//! assert_eq!(svc.clone().oneshot(call()).await.unwrap().status(), 200);
//! let refused = svc.oneshot(call()).await.unwrap();
//! assert_eq!(refused.status(), 429);
//! assert!(refused.headers().contains_key("retry-after"));
//! # }
//! ```

mod memory;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use self::memory::{Decision, MemoryLimiter, Permits};
use crate::error::GatewayError;
use crate::ext::{Principal, RouteMatch};
use crate::model::RateLimits;

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// Layer that applies [`RateLimit`]. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limiter: Arc<MemoryLimiter>,
}

impl RateLimitLayer {
    /// Enforces `limits` in this process's memory.
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limiter: Arc::new(MemoryLimiter::new(limits)),
        }
    }
}

impl RateLimitLayer {
    /// The limits this layer enforces.
    pub fn limits(&self) -> &RateLimits {
        self.limiter.limits()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// Middleware that refuses requests over their limits with 429. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<MemoryLimiter>,
}

impl<S> RateLimit<S> {
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

/// Seconds as OpenAI writes them in `x-ratelimit-reset-*`, e.g. `1.5s` or `120ms`.
fn reset(d: Duration) -> HeaderValue {
    let text = if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    };
    HeaderValue::from_str(&text).expect("digits and letters")
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if self.limiter.limits().rules.is_empty() {
            // No rule: not even the extensions are looked at.
            return ResponseFuture::inner(self.inner.call(req), None, None);
        }
        let ext = req.extensions();
        let decision = match ext.get::<Principal>() {
            Some(principal) => {
                let route = ext.get::<RouteMatch>().map(|r| (&*r.account, &*r.endpoint));
                self.limiter.check(principal, route)
            }
            // Without a caller there is no bucket: access control refuses such requests.
            None => Decision::Unlimited,
        };
        match decision {
            Decision::Unlimited => ResponseFuture::inner(self.inner.call(req), None, None),
            Decision::Allowed { permits, requests } => {
                ResponseFuture::inner(self.inner.call(req), Some(permits), requests)
            }
            Decision::Refused { retry_after, what } => {
                let mut res = GatewayError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    format!("Rate limit reached: {what}. Retry after {retry_after:?}."),
                )
                .into_response::<ResBody>();
                let headers = res.headers_mut();
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
                headers.insert(
                    RETRY_AFTER_MS,
                    HeaderValue::from(u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX)),
                );
                ResponseFuture {
                    kind: Kind::Refused {
                        response: Some(res.map(ResponseBody::plain)),
                    },
                }
            }
        }
    }
}

/// The request headers' view of the strictest `requests_per_minute` bucket.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestQuota {
    pub(crate) limit: u32,
    pub(crate) remaining: u32,
    pub(crate) reset: Duration,
}

pin_project! {
    /// Response future of [`RateLimit`].
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Inner {
            #[pin]
            future: F,
            permits: Option<Permits>,
            requests: Option<RequestQuota>,
        },
        Refused { response: Option<Response<ResponseBody<B>>> },
    }
}

impl<F, B> ResponseFuture<F, B> {
    fn inner(future: F, permits: Option<Permits>, requests: Option<RequestQuota>) -> Self {
        Self {
            kind: Kind::Inner {
                future,
                permits,
                requests,
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            KindProj::Inner {
                future,
                permits,
                requests,
            } => {
                // On an error the permits are dropped here, and so released.
                let mut res = ready!(future.poll(cx))?;
                if let Some(q) = requests {
                    let headers = res.headers_mut();
                    headers.insert(LIMIT_REQUESTS, HeaderValue::from(q.limit));
                    headers.insert(REMAINING_REQUESTS, HeaderValue::from(q.remaining));
                    headers.insert(RESET_REQUESTS, reset(q.reset));
                }
                let permits = permits.take();
                Poll::Ready(Ok(res.map(|body| ResponseBody {
                    body,
                    _permits: permits,
                })))
            }
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// The response body of [`RateLimit`]: the inner body, holding the request's
    /// concurrent-stream permits until it ends or is dropped.
    pub struct ResponseBody<B> {
        #[pin]
        body: B,
        _permits: Option<Permits>,
    }
}

impl<B> ResponseBody<B> {
    fn plain(body: B) -> Self {
        Self {
            body,
            _permits: None,
        }
    }
}

impl<B: From<Bytes>> From<Bytes> for ResponseBody<B> {
    fn from(data: Bytes) -> Self {
        Self::plain(B::from(data))
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if frame.is_none() {
            // The stream is over: its slot is free for the next one.
            this._permits.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("holds_permits", &self._permits.is_some())
            .finish_non_exhaustive()
    }
}
