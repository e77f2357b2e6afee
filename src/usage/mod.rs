//! The usage tap: who used which endpoint, which model, how many tokens, how fast.
//!
//! [`UsageTapLayer`] sits below routing (it reads the [`Principal`] and the
//! [`RouteMatch`]) and reads OpenAI-compatible responses as they pass, without holding or
//! delaying a frame:
//!
//! - `text/event-stream`: an incremental parser reads each event's `data:` as the blank line
//!   ending it arrives, keeping only the current line and event (at most 1 MiB each; longer
//!   ones are skipped), however the events are cut into frames. The first `model` and the last
//!   `usage` win; malformed events are skipped, and the stream goes on untouched.
//! - `application/json` (up to 4 MiB): the frames are kept (as `Bytes`, no copy) and read once
//!   at the end.
//!
//! When the response ends (or fails, or the client goes away) the tap records on the request
//! span the model, the token counts, the time to the first byte, the duration and the bytes
//! (see [`trace`](crate::trace) for the span), counts [metrics](metric), and hands a [`Usage`]
//! record to a [`UsageSink`]: by default [`TracingUsageSink`], an `INFO` event with target
//! `tower_gateway::usage`.
//!
//! # Asking for usage: `include_usage`
//!
//! An OpenAI streaming chat completion carries `usage` only if the request said
//! `"stream_options": {"include_usage": true}`. With
//! [`UsageTapLayer::include_usage`]`(true)` (off by default) the tap adds it to a streaming
//! `POST …/completions` request that did not ask (a JSON body of a declared length of at most
//! 1 MiB, read whole before it goes upstream, within the endpoint's idle timeout or 5 minutes:
//! a broken upload is a 400 and a stalled one a 408 under `RescueLayer`), and removes from the response stream the one
//! usage-only event (`"choices": []`) the client did not ask for, so the client sees the
//! events it would have seen. Two things change for such a client: the other chunks carry
//! `"usage": null` (as OpenAI sends them), and bytes of an event split across frames reach
//! it when the event is complete rather than piece by piece. A client that asked for usage
//! itself gets its stream untouched.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_gateway::usage::{Usage, UsageTapLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let records = Arc::new(Mutex::new(Vec::<Usage>::new()));
//! let sink = records.clone();
//! let svc = ServiceBuilder::new()
//!     .layer(UsageTapLayer::new().sink(move |u: Usage| sink.lock().unwrap().push(u)))
//!     .service(service_fn(|_req: Request<_>| async {
//!         let sse = "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
//!                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1}}\n\n\
//!                    data: [DONE]\n\n";
//!         let res = Response::builder()
//!             .header("content-type", "text/event-stream")
//!             .body(Full::new(Bytes::from(sse)))
//!             .unwrap();
//!         Ok::<_, std::convert::Infallible>(res)
//!     }));
//! let res = svc.oneshot(Request::new(Full::<Bytes>::default())).await.unwrap();
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert!(body.ends_with(b"data: [DONE]\n\n"));
//! let usage = &records.lock().unwrap()[0];
//! assert_eq!(usage.model.as_deref(), Some("m"));
//! assert_eq!((usage.input_tokens, usage.output_tokens), (Some(9), Some(1)));
//! # }
//! ```

mod body;
mod parse;
mod request;
pub use crate::registry::{EndpointCounts, Totals, UsageCounts};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::combinators::{Collect, MapErr};
use http_body_util::{BodyExt, Limited};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Span;

pub use self::body::UsageBody;
use self::body::{Meter, Mode};
use self::parse::{JsonCollector, SseParser};
pub use self::request::TapRequestBody;
use crate::error::X_GATEWAY_ERROR;
use crate::ext::{Principal, RouteMatch, Served, UsageReport};

pub use crate::metric;
pub use crate::request_id::{X_REQUEST_ID, X_UPSTREAM_REQUEST_ID};

/// How a call's response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream finished the body.
    Complete,
    /// The body was cut short by an error (the upstream reset or fell silent).
    Failed,
    /// The client went away before the end.
    Cancelled,
}

impl Outcome {
    /// `complete`, `failed` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One call's usage, handed to a [`UsageSink`] when the response body ends.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Usage {
    /// Who called (from [`GatewayAuthLayer`](crate::auth::GatewayAuthLayer)).
    pub principal: Option<Principal>,
    /// The provider account (from the [`RouteMatch`]).
    pub account: Option<Arc<str>>,
    /// The endpoint (from the [`RouteMatch`]).
    pub endpoint: Option<Arc<str>>,
    /// The request's `x-request-id`.
    pub request_id: Option<HeaderValue>,
    /// The upstream's status.
    pub status: StatusCode,
    /// The model the response names (the first `model` seen).
    pub model: Option<String>,
    /// `usage.prompt_tokens` (or `input_tokens`).
    pub input_tokens: Option<u64>,
    /// `usage.completion_tokens` (or `output_tokens`).
    pub output_tokens: Option<u64>,
    /// From the request reaching the tap to the first response body byte: for a stream, its
    /// first event.
    pub time_to_first_token: Option<Duration>,
    /// From the request reaching the tap to the end of the response body.
    pub duration: Duration,
    /// Response body bytes passed to the client.
    pub response_bytes: u64,
    /// How the body ended.
    pub outcome: Outcome,
    /// For an endpoint with a pool: the target that answered (its base URL).
    pub target: Option<Arc<str>>,
    /// For an endpoint with a pool: the attempts made, the one that answered included.
    pub attempts: Option<u32>,
}

/// Where [`Usage`] records go. Called once per call, on the task streaming the response, so
/// it must not block: hand the record to a channel for anything slow. Closures
/// `Fn(Usage) + Send + Sync` are sinks.
pub trait UsageSink: Send + Sync + 'static {
    /// Takes one call's record.
    fn record(&self, usage: Usage);
}

impl<F> UsageSink for F
where
    F: Fn(Usage) + Send + Sync + 'static,
{
    fn record(&self, usage: Usage) {
        self(usage)
    }
}

/// The default [`UsageSink`]: one `INFO` event per call, target `tower_gateway::usage`, inside
/// the request span. Its fields: `key_id`, `subject`, `account`, `endpoint`, `request_id`,
/// `status`, `gen_ai.response.model`, `gen_ai.usage.input_tokens`,
/// `gen_ai.usage.output_tokens`, `time_to_first_token_ms`, `duration_ms`, `response_bytes`,
/// `outcome`, and for an endpoint with a pool `target` and `attempts`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingUsageSink;

impl UsageSink for TracingUsageSink {
    fn record(&self, u: Usage) {
        let principal = u.principal.as_ref();
        tracing::info!(
            target: "tower_gateway::usage",
            key_id = principal.map(|p| &*p.key_id),
            subject = principal.map(|p| &*p.subject),
            account = u.account.as_deref(),
            endpoint = u.endpoint.as_deref(),
            request_id = u.request_id.as_ref().and_then(|v| v.to_str().ok()),
            status = u.status.as_u16(),
            gen_ai.response.model = u.model.as_deref(),
            gen_ai.usage.input_tokens = u.input_tokens,
            gen_ai.usage.output_tokens = u.output_tokens,
            time_to_first_token_ms = u.time_to_first_token.map(|t| t.as_secs_f64() * 1e3),
            duration_ms = u.duration.as_secs_f64() * 1e3,
            response_bytes = u.response_bytes,
            outcome = u.outcome.as_str(),
            target = u.target.as_deref(),
            attempts = u.attempts,
            "usage"
        );
    }
}

#[derive(Clone)]
pub(crate) struct Settings {
    enabled: bool,
    sink: Option<Arc<dyn UsageSink>>,
    counts: Option<Arc<UsageCounts>>,
    metrics: bool,
    include_usage: bool,
}

/// Applies [`UsageTap`]; see the [module docs](self).
#[derive(Clone)]
pub struct UsageTapLayer {
    settings: Arc<Settings>,
}

impl UsageTapLayer {
    /// A tap that records to [`TracingUsageSink`] and the metrics, and does not ask for usage.
    pub fn new() -> Self {
        Self {
            settings: Arc::new(Settings {
                enabled: true,
                sink: Some(Arc::new(TracingUsageSink)),
                counts: None,
                metrics: true,
                include_usage: false,
            }),
        }
    }

    /// A tap that does nothing but pass requests and responses on (to measure what the tap
    /// costs, or to switch it off in a stack whose type includes it).
    pub fn disabled() -> Self {
        Self {
            settings: Arc::new(Settings {
                enabled: false,
                sink: None,
                counts: None,
                metrics: false,
                include_usage: false,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(Arc::make_mut(&mut self.settings));
        self
    }

    /// Sends [`Usage`] records to `sink` instead.
    pub fn sink(self, sink: impl UsageSink) -> Self {
        self.with(|s| s.sink = Some(Arc::new(sink)))
    }

    /// Also counts each call's requests and tokens per endpoint in `counts` (the console's
    /// usage charts; [`Gateway`](crate::gateway::Gateway) sets it).
    pub fn counts(self, counts: Arc<UsageCounts>) -> Self {
        self.with(|s| s.counts = Some(counts))
    }

    /// Makes no [`Usage`] records (spans and metrics stay).
    pub fn without_sink(self) -> Self {
        self.with(|s| s.sink = None)
    }

    /// Whether to record [metrics](metric) (on by default).
    pub fn metrics(self, on: bool) -> Self {
        self.with(|s| s.metrics = on)
    }

    /// Whether to ask streaming completions for their usage; see the
    /// [module docs](self#asking-for-usage-include_usage). Off by default.
    pub fn include_usage(self, on: bool) -> Self {
        self.with(|s| s.include_usage = on)
    }
}

impl Default for UsageTapLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for UsageTapLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        f.debug_struct("UsageTapLayer")
            .field("enabled", &s.enabled)
            .field("sink", &s.sink.is_some())
            .field("metrics", &s.metrics)
            .field("include_usage", &s.include_usage)
            .finish()
    }
}

impl<S> Layer<S> for UsageTapLayer {
    type Service = UsageTap<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UsageTap {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// Reads usage from the responses of the inner service; see the [module docs](self).
#[derive(Clone)]
pub struct UsageTap<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S> fmt::Debug for UsageTap<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageTap").finish_non_exhaustive()
    }
}

/// What the tap knows of a call before the upstream answers.
pub(crate) struct CallInfo {
    start: Instant,
    span: Span,
    principal: Option<Principal>,
    account: Option<Arc<str>>,
    endpoint: Option<Arc<str>>,
    request_id: Option<HeaderValue>,
    hide_usage_event: bool,
    served: Option<Served>,
}

/// A request body the tap reads whole, its errors boxed.
type ReadBody<B> = MapErr<B, fn(<B as Body>::Error) -> crate::BoxError>;

fn into_box<E: Into<crate::BoxError>>(err: E) -> crate::BoxError {
    err.into()
}

/// How long the tap waits for a request body it reads whole, when the endpoint sets no idle
/// timeout.
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(300);

/// The error of an upload that stalled while the tap read it (408 under `RescueLayer`, as when
/// the forwarder's idle timeout catches it).
fn stalled(idle: Duration) -> crate::BoxError {
    Box::new(crate::error::BodyIdleTimeout(idle))
}

/// `gen_ai.operation.name` for an OpenAI-style path.
fn operation(path: &str) -> Option<&'static str> {
    if path.ends_with("/chat/completions") {
        Some("chat")
    } else if path.ends_with("/completions") {
        Some("text_completion")
    } else if path.ends_with("/embeddings") {
        Some("embeddings")
    } else {
        None
    }
}

impl<S, B, RB> Service<Request<B>> for UsageTap<S>
where
    S: Service<Request<TapRequestBody<B>>, Response = Response<RB>> + Clone,
    B: Body<Data = Bytes>,
    B::Error: Into<crate::BoxError>,
    RB: Body<Data = Bytes>,
    RB::Error: Into<crate::BoxError>,
{
    type Response = Response<UsageBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let settings = self.settings.clone();
        if !settings.enabled {
            let (parts, body) = req.into_parts();
            let body = TapRequestBody::stream(body, Span::none());
            return ResponseFuture {
                state: State::Calling {
                    future: self.inner.call(Request::from_parts(parts, body)),
                },
                call: None,
                settings,
            };
        }
        let span = Span::current();
        let route = req.extensions().get::<RouteMatch>();
        if let Some(route) = route
            && !span.is_disabled()
        {
            span.record("gateway.account", &*route.account);
            span.record("gateway.endpoint", &*route.endpoint);
            span.record("gateway.upstream_path", &*route.upstream_path);
            if let Some(op) = operation(&route.upstream_path) {
                span.record("gen_ai.operation.name", op);
            }
        }
        let rewrite = settings.include_usage
            && route.is_some_and(|r| request::may_ask_for_usage(&req, &r.upstream_path));
        // The read is bounded in size (1 MiB) and in time: the endpoint's idle timeout.
        let idle = route
            .and_then(|r| r.target.timeouts().idle)
            .unwrap_or(DEFAULT_READ_TIMEOUT);
        let call = CallInfo {
            start: Instant::now(),
            span: span.clone(),
            principal: req.extensions().get::<Principal>().cloned(),
            account: route.map(|r| r.account.clone()),
            endpoint: route.map(|r| r.endpoint.clone()),
            request_id: req.headers().get(X_REQUEST_ID).cloned(),
            hide_usage_event: false,
            served: None,
        };
        let (parts, body) = req.into_parts();
        let state = if rewrite {
            // The ready service goes with the request; a clone stays for the next one.
            let clone = self.inner.clone();
            let inner = std::mem::replace(&mut self.inner, clone);
            State::Reading {
                // Bounded by itself too, not only by the declared length: the layer works alone.
                collect: tokio::time::timeout(
                    idle,
                    Limited::new(
                        body.map_err(into_box::<B::Error> as fn(B::Error) -> crate::BoxError),
                        request::MAX_REWRITE as usize,
                    )
                    .collect(),
                ),
                idle,
                parts: Some(parts),
                inner: Some(inner),
            }
        } else {
            let body = TapRequestBody::stream(body, span);
            State::Calling {
                future: self.inner.call(Request::from_parts(parts, body)),
            }
        };
        ResponseFuture {
            state,
            call: Some(call),
            settings,
        }
    }
}

pin_project! {
    /// Response future of [`UsageTap`].
    pub struct ResponseFuture<S: Service<Request<TapRequestBody<B>>>, B: Body> {
        #[pin]
        state: State<S, B>,
        call: Option<CallInfo>,
        settings: Arc<Settings>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Request<TapRequestBody<B>>>, B: Body> {
        Reading {
            #[pin]
            collect: tokio::time::Timeout<Collect<Limited<ReadBody<B>>>>,
            idle: Duration,
            parts: Option<http::request::Parts>,
            inner: Option<S>,
        },
        Calling { #[pin] future: S::Future },
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<TapRequestBody<B>>, Response = Response<RB>>,
    B: Body<Data = Bytes>,
    B::Error: Into<crate::BoxError>,
    RB: Body<Data = Bytes>,
{
    type Output = Result<Response<UsageBody<RB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reading {
                    collect,
                    idle,
                    parts,
                    inner,
                } => {
                    let collected = match ready!(collect.poll(cx)) {
                        Ok(Ok(collected)) => Ok(collected),
                        Ok(Err(err)) => Err(err),
                        Err(_elapsed) => Err(stalled(*idle)),
                    };
                    let mut parts = parts.take().expect("polled after completion");
                    let mut inner = inner.take().expect("polled after completion");
                    let call = this.call.as_mut().expect("polled after completion");
                    let span = call.span.clone();
                    let body = match collected {
                        Ok(collected) => {
                            let data = collected.to_bytes();
                            match request::add_include_usage(&data) {
                                Some(asked) => {
                                    call.hide_usage_event = true;
                                    parts.headers.insert(CONTENT_LENGTH, asked.len().into());
                                    TapRequestBody::full(asked.into(), span)
                                }
                                None => TapRequestBody::full(data, span),
                            }
                        }
                        // The forwarder answers a broken (400) or stalled (408) upload.
                        Err(err) => TapRequestBody::failed(err, span),
                    };
                    let future = inner.call(Request::from_parts(parts, body));
                    this.state.set(State::Calling { future });
                }
                StateProj::Calling { future } => {
                    let res = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(respond(this.call.take(), this.settings, res)));
                }
            }
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<TapRequestBody<B>>>,
    B: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

fn respond<RB: Body>(
    call: Option<CallInfo>,
    settings: &Arc<Settings>,
    res: Response<RB>,
) -> Response<UsageBody<RB>> {
    let Some(mut call) = call else {
        return res.map(UsageBody::passthrough);
    };
    // A response the gateway made itself (a 403 below the tap): nothing upstream to read.
    if res.headers().contains_key(X_GATEWAY_ERROR) {
        return res.map(UsageBody::passthrough);
    }
    let (mut parts, body) = res.into_parts();
    let report = parts.extensions.remove::<UsageReport>();
    call.served = parts.extensions.get::<Served>().cloned();
    // `trace::UpstreamRequestId` moves a different upstream id aside; the span notes it.
    if let Some(theirs) = parts.headers.get(X_REQUEST_ID)
        && call.request_id.as_ref().is_some_and(|ours| ours != theirs)
        && !call.span.is_disabled()
    {
        let value = match crate::request_id::is_valid_request_id(theirs) {
            true => theirs.to_str().unwrap_or_default(),
            false => "<not a valid request id>",
        };
        call.span.record("gateway.upstream_request_id", value);
    }
    let encoded = parts
        .headers
        .get(CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let mode = match request::media_type(&parts.headers) {
        _ if encoded => Mode::Count,
        Some(m) if m.eq_ignore_ascii_case("text/event-stream") => Mode::Sse(SseParser::default()),
        Some(m) if m.eq_ignore_ascii_case("application/json") => {
            Mode::Json(JsonCollector::default())
        }
        _ => Mode::Count,
    };
    let hide = call.hide_usage_event && matches!(mode, Mode::Sse(_));
    if hide {
        parts.headers.remove(CONTENT_LENGTH);
    }
    let ended = body.is_end_stream();
    let mut meter = Meter::new(call, settings.clone(), parts.status, mode, report);
    if ended {
        // hyper does not poll a body that is already at its end.
        meter.finish_complete();
    }
    Response::from_parts(parts, UsageBody::new(body, meter, hide))
}

#[cfg(all(test, feature = "forward"))]
mod tests;
