//! Rate limits and token budgets: requests per minute, tokens per minute, day or month, and
//! concurrent streams, per key, team, subject or endpoint, counted in this process's memory
//! or in a Redis server that every replica shares.
//!
//! [`RateLimitLayer`] sits after authentication, routing and access control (it reads the
//! [`Principal`] and the [`RouteMatch`]) and before the upstream. Every
//! [rule](crate::model::RateLimitRule) that covers the caller and the endpoint applies, each
//! in its own bucket (`team:research` is one bucket for the team, `everyone` one per key,
//! `all` one for every caller together); all are checked first and charged only if none
//! refuses, so a refused request costs no other limit anything:
//!
//! - `requests_per_minute` is a GCRA (generic cell rate algorithm): at most N requests in any
//!   minute, a full minute's worth at once after a quiet minute, then one every `60/N`
//!   seconds. Unlike a fixed window it never lets 2N through around a window's edge.
//! - `tokens_per_minute` is a GCRA whose cost is tokens; `tokens_per_day` and
//!   `tokens_per_month` are budgets over the UTC day and month. A request under any of them
//!   *reserves* [`reserve_tokens`](crate::model::RateLimits::reserve_tokens) when it starts;
//!   when its response ends, streamed or not, the reservation is settled to the prompt and
//!   completion tokens the [usage tap](crate::usage) read from it (through the
//!   [`UsageReport`](crate::ext::UsageReport) response extension). A response whose count
//!   never comes (a client gone mid-stream, an answer without `usage`) stays charged its
//!   reservation. A request is refused once the budget is spent; a stream in flight is never
//!   cut, so concurrent streams overshoot a budget by at most what they produce beyond their
//!   reservations.
//! - `concurrent_streams` counts responses in flight, until their body ends or is dropped.
//!
//! A refused request never reaches the upstream: it gets 429 in the OpenAI error shape,
//! `rate_limit_exceeded` (or `insufficient_quota` for a spent day or month budget) with
//! `Retry-After` and `retry-after-ms` (the OpenAI SDKs wait that long and retry by
//! themselves), and its request span records `gateway.rate_limit` (the limit and the bucket).
//! Every answer of a limited request carries `x-ratelimit-{limit,remaining,reset}-requests`
//! and `x-ratelimit-{limit,remaining,reset}-tokens` for its strictest bucket of each kind.
//!
//! # Backends
//!
//! In memory (the default) the counters are this process's: behind a lock taken once per
//! request. With `backend = "redis://…"` (cargo feature `redis`, on by default) they live in
//! Redis and hold across every replica: one Lua script per request checks and charges all of
//! a request's counters atomically (on the server's clock, but for the name of a budget's
//! day or month), and each counter expires by itself
//! once it no longer matters; a response under a token or stream limit settles with one more
//! script when it ends, off the request's path. While Redis cannot be reached,
//! [`on_backend_error`](crate::model::RateLimits::on_backend_error) decides: `open` (the
//! default) serves and counts in this replica's memory, `closed` answers 503
//! `rate_limit_backend_unavailable`; either way a warning is logged once per outage and
//! [`metric::RATE_LIMIT_BACKEND_ERRORS`](crate::metric::RATE_LIMIT_BACKEND_ERRORS) counts
//! every such request. After a failure Redis is tried again a second later, by one request at
//! a time.
//!
//! # Changing the rules while running
//!
//! [`RateLimitLayer::shared`] reads its rules from a
//! [`SharedLimitRules`] at every request: the gateway's
//! live state, which a reload of the file, `PUT /manage/rate-limits` and the store change. A
//! rule's counts are named by its scope and endpoint, so they carry over a change of its
//! values or its place in the list. [`RateLimitLayer::usage`] reads a scope's counts without
//! charging anything (`GET /manage/rate-limits/usage?scope=…`).
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
mod plan;
#[cfg(feature = "redis")]
mod redis;
mod ticket;

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

use self::memory::MemoryLimiter;
use self::plan::{Decision, Quota, Quotas, Refusal};
use self::ticket::Ticket;
use crate::error::GatewayError;
use crate::ext::{Principal, RouteMatch};
pub use crate::model::LimitUsage;
use crate::model::{
    FieldError, LimitBackend, LimitRules, LimitScope, LimitUsageSource, RateLimits, UsageFuture,
};
use crate::registry::SharedLimitRules;

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// Where the counters are.
#[derive(Clone, Debug)]
enum Backend {
    Memory(Arc<MemoryLimiter>),
    #[cfg(feature = "redis")]
    Redis(Arc<redis::RedisLimiter>),
}

impl Backend {
    fn settings(&self) -> &RateLimits {
        match self {
            Self::Memory(m) => m.settings(),
            #[cfg(feature = "redis")]
            Self::Redis(r) => r.settings(),
        }
    }
}

/// Layer that applies [`RateLimit`]. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    backend: Backend,
    rules: SharedLimitRules,
}

impl RateLimitLayer {
    /// Enforces `limits` with the counters of their [`backend`](RateLimits::backend).
    ///
    /// # Panics
    ///
    /// If the limits are not [valid](RateLimits::validate): a Redis URL the client refuses, or
    /// Redis support not compiled in (see [`try_new`](Self::try_new)).
    pub fn new(limits: RateLimits) -> Self {
        Self::try_new(limits).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Enforces `limits` with the counters of their [`backend`](RateLimits::backend): this
    /// process's memory, or a Redis server (which is not contacted before the first request;
    /// a Redis limiter must be used inside a Tokio runtime). An error names
    /// `rate_limits.backend` and never shows the URL.
    pub fn try_new(limits: RateLimits) -> Result<Self, FieldError> {
        let rules = SharedLimitRules::new(LimitRules::new(limits.rules.clone()));
        Self::shared(limits, rules)
    }

    /// Like [`try_new`](Self::try_new), with the rules read from `rules` at every request
    /// instead of `limits.rules`: whoever holds `rules` (the gateway's [`Live`] state, fed by
    /// the management API and the store) changes them while traffic flows, and the counts of
    /// a rule whose scope and endpoint stay the same carry over.
    ///
    /// [`Live`]: crate::registry::Live
    pub fn shared(limits: RateLimits, rules: SharedLimitRules) -> Result<Self, FieldError> {
        limits.validate()?;
        let backend = match &limits.backend {
            LimitBackend::Memory => {
                Backend::Memory(Arc::new(MemoryLimiter::new(limits, rules.clone())))
            }
            #[cfg(feature = "redis")]
            LimitBackend::Redis(url) => {
                let url = url.clone();
                let limiter =
                    redis::RedisLimiter::new(limits, rules.clone(), &url).map_err(|_| {
                        FieldError::new(
                            "rate_limits.backend",
                            "is not a Redis URL the client accepts",
                        )
                    })?;
                Backend::Redis(Arc::new(limiter))
            }
            // `validate` refused it.
            #[cfg(not(feature = "redis"))]
            LimitBackend::Redis(_) => unreachable!("a Redis backend without the redis feature"),
        };
        Ok(Self { backend, rules })
    }

    /// The limits this layer enforces now: its settings and the rules in force.
    pub fn limits(&self) -> RateLimits {
        RateLimits {
            rules: self.rules.load().rules.clone(),
            ..self.backend.settings().clone()
        }
    }

    /// Where and how the limits are counted (backend, policy, prefix, reservation), without
    /// the rules, which may change while the gateway runs.
    pub fn settings(&self) -> &RateLimits {
        self.backend.settings()
    }

    /// The current usage of every limit of `scope` (as a rule writes it: `team:research`,
    /// `user:SUBJECT`, `key:ID`, `all`; a `key:ID` also reads the `everyone` rules' bucket of
    /// that key), without charging anything. An error says why the shared backend did not answer.
    pub async fn usage(&self, scope: &str) -> Result<Vec<LimitUsage>, String> {
        let scope: LimitScope = scope.parse()?;
        let mut out = Vec::new();
        let rules = self.rules.load();
        for (i, rule) in rules.rules.iter().enumerate() {
            let bucket: Arc<str> = match (&rule.scope, &scope) {
                (a, b) if a == b => match b.own_bucket() {
                    Some(bucket) => bucket,
                    None => continue,
                },
                // An `everyone` rule counts each key in a bucket of its own.
                (LimitScope::Everyone, LimitScope::Key(id)) => id.clone(),
                _ => continue,
            };
            let counts = match &self.backend {
                Backend::Memory(m) => m.peek(i, &bucket),
                #[cfg(feature = "redis")]
                Backend::Redis(r) => r.peek(i, bucket).await?,
            };
            let label = plan::scope_label(rule);
            for (limit, quota) in counts {
                out.push(LimitUsage::new(
                    i,
                    label.to_string(),
                    limit.name(),
                    limit.value(),
                    quota.remaining,
                    quota.reset,
                ));
            }
        }
        Ok(out)
    }
}

impl LimitUsageSource for RateLimitLayer {
    fn usage<'a>(&'a self, scope: &'a str) -> UsageFuture<'a> {
        Box::pin(RateLimitLayer::usage(self, scope))
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            backend: self.backend.clone(),
            rules: self.rules.clone(),
        }
    }
}

/// Middleware that refuses requests over their limits with 429. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    backend: Backend,
    rules: SharedLimitRules,
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

/// Seconds as OpenAI writes them in `x-ratelimit-reset-*`, e.g. `1.5s` or `120ms`: the values
/// under a minute (every requests-per-minute and tokens-per-minute reset) are made once and
/// shared, longer ones written each time without the formatting machinery.
fn reset(d: Duration) -> HeaderValue {
    static SHARED: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let millis = d.as_millis().min(u128::from(u64::MAX / 2)) as u64;
    // 0 to 999 ms, then 1.0 to 60.0 s in tenths.
    let index = if millis < 1000 {
        Some(millis as usize)
    } else {
        let tenths = (millis + 50) / 100;
        (tenths <= 600).then(|| 1000 + (tenths - 10) as usize)
    };
    match index {
        Some(i) => SHARED.get_or_init(|| {
            (0..1000)
                .map(write_reset)
                .chain((10..=600).map(|tenths| write_reset(tenths * 100)))
                .collect()
        })[i]
            .clone(),
        None => write_reset(millis),
    }
}

/// `millis` as `120ms` under a second, else as seconds to a tenth, `1.5s`.
fn write_reset(millis: u64) -> HeaderValue {
    let mut buf = [0u8; 32];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        buf[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    };
    if millis < 1000 {
        push(digits(millis, &mut [0u8; 20]));
        push(b"ms");
    } else {
        // Tenths of a second, rounded.
        let tenths = (millis + 50) / 100;
        push(digits(tenths / 10, &mut [0u8; 20]));
        push(&[b'.', b'0' + (tenths % 10) as u8, b's']);
    }
    HeaderValue::from_bytes(&buf[..len]).expect("digits and letters")
}

/// The decimal digits of `n`, written at the end of `buf`.
fn digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// The answer to a refused request: 429 (`rate_limit_exceeded` or `insufficient_quota`).
fn refusal<B: From<Bytes>>(refusal: &Refusal) -> Response<ResponseBody<B>> {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record(
            "gateway.rate_limit",
            format!("{} {}", refusal.limit.name(), refusal.bucket),
        );
    }
    let retry_after = refusal.retry_after;
    let mut res = GatewayError::new(
        StatusCode::TOO_MANY_REQUESTS,
        refusal.limit.refusal_code(),
        refusal.message(),
    )
    .into_response::<B>();
    let headers = res.headers_mut();
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    headers.insert(
        RETRY_AFTER_MS,
        HeaderValue::from(u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX)),
    );
    res.map(ResponseBody::plain)
}

/// The answer while the shared backend is away under the closed policy: 503.
fn unavailable<B: From<Bytes>>() -> Response<ResponseBody<B>> {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("gateway.rate_limit", "backend_unavailable");
    }
    let mut res = GatewayError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "rate_limit_backend_unavailable",
        "The gateway could not check its rate limits; try again later.",
    )
    .into_response::<B>();
    res.headers_mut().insert(RETRY_AFTER, HeaderValue::from(1));
    res.map(ResponseBody::plain)
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: From<Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // No rule (a gateway without limits): not even the extensions are looked at.
        if self.rules.load_guard().rules.is_empty() {
            return ResponseFuture::inner(
                self.inner.call(req),
                Ticket::default(),
                Quotas::default(),
            );
        }
        let ext = req.extensions();
        // Without a caller there is no bucket: access control refuses such requests.
        let Some(principal) = ext.get::<Principal>() else {
            return ResponseFuture::inner(
                self.inner.call(req),
                Ticket::default(),
                Quotas::default(),
            );
        };
        let route = ext.get::<RouteMatch>();
        match &self.backend {
            Backend::Memory(m) => {
                let route = route.map_or(("", ""), |r| (&*r.account, &*r.endpoint));
                let decision = m.check(principal, route);
                ResponseFuture {
                    kind: decide(decision, req, &mut self.inner),
                }
            }
            #[cfg(feature = "redis")]
            Backend::Redis(r) => {
                let route = route.map_or((Arc::from(""), Arc::from("")), |r| {
                    (r.account.clone(), r.endpoint.clone())
                });
                let check = r.clone().check(principal.clone(), route);
                // The ready service goes with the request; a clone stays for the next one.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture {
                    kind: Kind::Checking {
                        check: Box::pin(check),
                        req: Some(req),
                        inner: Some(inner),
                    },
                }
            }
        }
    }
}

/// Calls `inner` with an admitted request, or answers a refused one.
fn decide<S, ReqBody, ResBody>(
    decision: Decision,
    req: Request<ReqBody>,
    inner: &mut S,
) -> Kind<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    match decision {
        Decision::Unlimited => Kind::Inner {
            future: inner.call(req),
            ticket: Some(Ticket::default()),
            quotas: Quotas::default(),
        },
        Decision::Allowed { ticket, quotas } => Kind::Inner {
            future: inner.call(req),
            ticket: Some(ticket),
            quotas,
        },
        Decision::Refused(r) => Kind::Answered {
            response: Some(refusal(&r)),
        },
        Decision::Unavailable => Kind::Answered {
            response: Some(unavailable()),
        },
    }
}

type CheckFuture = Pin<Box<dyn Future<Output = Decision> + Send>>;

pin_project! {
    /// Response future of [`RateLimit`].
    pub struct ResponseFuture<S: Service<Request<ReqBody>>, ReqBody, ResBody> {
        #[pin]
        kind: Kind<S, ReqBody, ResBody>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S: Service<Request<ReqBody>>, ReqBody, ResBody> {
        Checking {
            check: CheckFuture,
            req: Option<Request<ReqBody>>,
            inner: Option<S>,
        },
        Inner {
            #[pin]
            future: S::Future,
            ticket: Option<Ticket>,
            quotas: Quotas,
        },
        Answered { response: Option<Response<ResponseBody<ResBody>>> },
    }
}

impl<S: Service<Request<ReqBody>>, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody> {
    fn inner(future: S::Future, ticket: Ticket, quotas: Quotas) -> Self {
        Self {
            kind: Kind::Inner {
                future,
                ticket: Some(ticket),
                quotas,
            },
        }
    }
}

fn quota_headers(headers: &mut http::HeaderMap, q: Quota, names: [HeaderName; 3]) {
    headers.reserve(3);
    let [limit, remaining, reset_name] = names;
    headers.insert(limit, number(q.limit));
    headers.insert(remaining, number(q.remaining));
    headers.insert(reset_name, reset(q.reset));
}

/// `n` as a header value: the numbers up to 1023 are made once and shared (a limit and most
/// remaining counts are small), larger ones each time.
fn number(n: u64) -> HeaderValue {
    static SMALL: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    match usize::try_from(n) {
        Ok(i) if i < 1024 => {
            SMALL.get_or_init(|| (0..1024u64).map(HeaderValue::from).collect())[i].clone()
        }
        _ => HeaderValue::from(n),
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.kind.as_mut().project() {
                KindProj::Checking { check, req, inner } => {
                    let decision = ready!(check.as_mut().poll(cx));
                    let req = req.take().expect("polled after completion");
                    let mut inner = inner.take().expect("polled after completion");
                    let next = decide(decision, req, &mut inner);
                    this.kind.set(next);
                }
                KindProj::Answered { response } => {
                    return Poll::Ready(Ok(response.take().expect("polled after completion")));
                }
                KindProj::Inner {
                    future,
                    ticket,
                    quotas,
                } => {
                    // On an error the ticket is dropped here: its slots freed, its tokens
                    // reserved.
                    let mut res = ready!(future.poll(cx))?;
                    let headers = res.headers_mut();
                    if let Some(q) = quotas.requests {
                        quota_headers(
                            headers,
                            q,
                            [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS],
                        );
                    }
                    if let Some(q) = quotas.tokens {
                        quota_headers(headers, q, [LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS]);
                    }
                    let ticket = ticket.take().expect("polled after completion");
                    if let Some(report) = ticket.usage_report() {
                        res.extensions_mut().insert(report);
                    }
                    return Poll::Ready(Ok(res.map(|body| ResponseBody {
                        body,
                        ticket: Some(ticket),
                    })));
                }
            }
        }
    }
}

impl<S: Service<Request<ReqBody>>, ReqBody, ResBody> fmt::Debug
    for ResponseFuture<S, ReqBody, ResBody>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// The response body of [`RateLimit`]: the inner body, holding the request's ticket
    /// (concurrent-stream slots, token reservation) until it ends or is dropped.
    pub struct ResponseBody<B> {
        #[pin]
        body: B,
        ticket: Option<Ticket>,
    }
}

impl<B> ResponseBody<B> {
    fn plain(body: B) -> Self {
        Self { body, ticket: None }
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
            // The stream is over: its slot is free for the next one (the tokens settle when
            // the usage tap has reported them too).
            this.ticket.take();
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
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_are_written_as_openai_writes_them() {
        for (d, text) in [
            (Duration::ZERO, "0ms"),
            (Duration::from_millis(120), "120ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_millis(1000), "1.0s"),
            (Duration::from_millis(1549), "1.5s"),
            (Duration::from_millis(1950), "2.0s"),
            (Duration::from_millis(59_960), "60.0s"),
            (Duration::from_millis(60_049), "60.0s"),
            (Duration::from_millis(60_050), "60.1s"),
            (Duration::from_secs(86_399), "86399.0s"),
        ] {
            assert_eq!(reset(d), text, "{d:?}");
        }
    }
}
