//! One span per request, request ids, and the request metrics, on tower-http's
//! [`TraceLayer`] and request-id layers.
//!
//! [`Gateway::service`](crate::gateway::Gateway::service) puts these above everything else:
//!
//! ```text
//! AcceptRequestId ──▶ SetRequestId ──▶ Trace ──▶ PropagateRequestId ──▶ UpstreamRequestId ──▶ Rescue ──▶ …
//! (drop a bad id)     (x-request-id)   (span)    (id back to the client)  (the upstream's aside)
//! ```
//!
//! - **Request ids.** A client's `x-request-id` is kept if it is 1 to 128 visible ASCII
//!   characters from `A–Z a–z 0–9 - _ . : / + =`; otherwise (absent or not so) the gateway makes
//!   one ([`GatewayRequestId`]: 32 hex digits, unique per process). It goes upstream with the
//!   request and comes back on the response; an upstream's own, different `x-request-id` is
//!   returned as `x-upstream-request-id`.
//! - **The span** `gateway.request` (level `INFO`, target `tower_gateway::trace`) is made by
//!   [`MakeGatewaySpan`] and filled in as the request goes down the stack and the response
//!   streams back; it closes when the response body ends, so its duration is the call's. Its
//!   fields follow the OpenTelemetry semantic conventions where one exists:
//!
//! | field | set by | value |
//! |---|---|---|
//! | `request_id` | this span | the `x-request-id` |
//! | `otel.kind`, `otel.status_code` | this span, [`RecordResponse`] | `server`; `ERROR` on a 5xx (read by `tracing-opentelemetry`) |
//! | `service` | this span | `proxy` or `manage` |
//! | `http.request.method` | this span | |
//! | `gateway.key_id`, `gateway.subject` | `GatewayAuthLayer` | who called (never the key) |
//! | `gateway.account`, `gateway.endpoint`, `gateway.upstream_path` | the usage tap | what they called |
//! | `gen_ai.operation.name` | the usage tap | `chat`, `text_completion`, `embeddings` |
//! | `gen_ai.request.model` | the usage tap | `model` of a request body read in one frame |
//! | `http.response.status_code` | [`RecordResponse`] | |
//! | `gateway.response_source` | [`RecordResponse`] | `gateway` (it carries `x-gateway-error`) or `upstream` |
//! | `error.type` | [`RecordResponse`], the usage tap | the `x-gateway-error` code, or why a stream was cut short |
//! | `error.message` | the usage tap | the error that cut a stream short |
//! | `gateway.latency_ms` | [`RecordResponse`] | time to the response head |
//! | `gateway.time_to_first_byte_ms` | the usage tap | time to the first response body byte |
//! | `gateway.duration_ms` | the usage tap | time to the end of the response body |
//! | `gen_ai.response.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens` | the usage tap | from the response |
//! | `http.request.body.size`, `http.response.body.size` | the usage tap | bytes each way |
//! | `gateway.outcome` | the usage tap | `complete`, `failed`, `cancelled` |
//! | `gateway.upstream_request_id` | the usage tap | the upstream's own request id |
//! | `gateway.rate_limit` | the rate limiter | the limit and bucket that refused the request |
//! | `gateway.target`, `gateway.attempts` | the forwarder, for an endpoint with a pool | the target (its base URL) that answered, or whose stream broke, and the attempts made |
//! | `gateway.retry_refused` | the forwarder | why a failed attempt was not retried: `body_too_large` (over `retry.max_body_bytes`) or `budget_exhausted` |
//!
//! Headers are not recorded, so no credential can reach a span; a request the router refuses
//! records no account or endpoint, so a key pasted into an unknown account's place is not
//! logged either. (The upstream path of a routed request is recorded without its query; a key
//! a client pastes there is its own mistake, and goes upstream anyway.)
//!
//! Request [metrics](crate::usage::metric): [`RecordResponse`] counts every response by
//! status and source, and failures by cause.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_gateway::trace;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(trace::AcceptRequestIdLayer::new())
//!     .layer(trace::set_request_id())
//!     .layer(trace::layer("proxy", true))
//!     .layer(trace::propagate_request_id())
//!     .layer(trace::UpstreamRequestIdLayer::new())
//!     .service(service_fn(|req: Request<Full<Bytes>>| async move {
//!         // The request id travels with the request…
//!         assert!(req.headers().contains_key("x-request-id"));
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
//!     }));
//! let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
//! // …and comes back to the client.
//! assert_eq!(res.headers()["x-request-id"].len(), 32);
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use tower_http::classify::{ServerErrorsAsFailures, ServerErrorsFailureClass, SharedClassifier};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{MakeSpan, OnFailure, OnResponse, TraceLayer};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Span;
use tracing::field::Empty;

use crate::error::X_GATEWAY_ERROR;
use crate::metric;
pub use crate::request_id::is_valid_request_id;
use crate::request_id::{X_REQUEST_ID, X_UPSTREAM_REQUEST_ID};

/// The [`TraceLayer`] the gateway uses: [`MakeGatewaySpan`], [`RecordResponse`] and
/// [`RecordFailure`], failures being 5xx responses.
pub type GatewayTraceLayer = TraceLayer<
    SharedClassifier<ServerErrorsAsFailures>,
    MakeGatewaySpan,
    (),
    RecordResponse,
    (),
    (),
    RecordFailure,
>;

/// The service [`GatewayTraceLayer`] makes.
pub type GatewayTrace<S> = tower_http::trace::Trace<
    S,
    SharedClassifier<ServerErrorsAsFailures>,
    MakeGatewaySpan,
    (),
    RecordResponse,
    (),
    (),
    RecordFailure,
>;

/// The gateway's [`TraceLayer`] for `service` (`"proxy"` or `"manage"`, a span field and a
/// metric label), counting [metrics](crate::usage::metric) if `metrics`.
pub fn layer(service: &'static str, metrics: bool) -> GatewayTraceLayer {
    TraceLayer::new_for_http()
        .make_span_with(MakeGatewaySpan { service })
        .on_request(())
        .on_response(RecordResponse { service, metrics })
        .on_body_chunk(())
        .on_eos(())
        .on_failure(RecordFailure(()))
}

/// Sets `x-request-id` on requests without a (valid) one, with [`GatewayRequestId`].
pub fn set_request_id() -> SetRequestIdLayer<GatewayRequestId> {
    SetRequestIdLayer::x_request_id(GatewayRequestId::new())
}

/// Copies the request's `x-request-id` to the response.
pub fn propagate_request_id() -> PropagateRequestIdLayer {
    PropagateRequestIdLayer::x_request_id()
}

/// Makes the `gateway.request` span; see the [module docs](self) for its fields.
#[derive(Clone, Copy, Debug)]
pub struct MakeGatewaySpan {
    service: &'static str,
}

impl<B> MakeSpan<B> for MakeGatewaySpan {
    fn make_span(&mut self, req: &Request<B>) -> Span {
        let request_id = req
            .headers()
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok());
        tracing::info_span!(
            target: "tower_gateway::trace",
            "gateway.request",
            request_id,
            service = self.service,
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = req.method().as_str(),
            gateway.key_id = Empty,
            gateway.subject = Empty,
            gateway.account = Empty,
            gateway.endpoint = Empty,
            gateway.upstream_path = Empty,
            gen_ai.operation.name = Empty,
            gen_ai.request.model = Empty,
            http.response.status_code = Empty,
            gateway.response_source = Empty,
            "error.type" = Empty,
            "error.message" = Empty,
            gateway.latency_ms = Empty,
            gateway.time_to_first_byte_ms = Empty,
            gateway.duration_ms = Empty,
            gen_ai.response.model = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            http.request.body.size = Empty,
            http.response.body.size = Empty,
            gateway.outcome = Empty,
            gateway.upstream_request_id = Empty,
            gateway.rate_limit = Empty,
            gateway.target = Empty,
            gateway.attempts = Empty,
            gateway.retry_refused = Empty,
        )
    }
}

/// Records the status, who made the response, and the time to its head; counts it.
#[derive(Clone, Copy, Debug)]
pub struct RecordResponse {
    service: &'static str,
    metrics: bool,
}

impl<B> OnResponse<B> for RecordResponse {
    fn on_response(self, res: &Response<B>, latency: Duration, span: &Span) {
        let code = res
            .headers()
            .get(X_GATEWAY_ERROR)
            .and_then(|v| v.to_str().ok());
        let source = if code.is_some() || self.service != "proxy" {
            "gateway"
        } else {
            "upstream"
        };
        if !span.is_disabled() {
            span.record("http.response.status_code", res.status().as_u16());
            span.record("gateway.response_source", source);
            span.record("gateway.latency_ms", latency.as_secs_f64() * 1e3);
            if let Some(code) = code {
                span.record("error.type", code);
            }
            if res.status().is_server_error() {
                span.record("otel.status_code", "ERROR");
            }
        }
        if self.metrics {
            metrics::counter!(
                metric::REQUESTS,
                "status" => metric::status_label(res.status()),
                "source" => source,
                "service" => self.service,
            )
            .increment(1);
            if let Some(code) = code {
                metrics::counter!(metric::ERRORS, "cause" => code.to_owned()).increment(1);
            }
        }
    }
}

/// Logs a 5xx response at `WARN`, inside the request span.
#[derive(Clone, Copy, Debug)]
pub struct RecordFailure(());

impl OnFailure<ServerErrorsFailureClass> for RecordFailure {
    fn on_failure(&mut self, class: ServerErrorsFailureClass, latency: Duration, span: &Span) {
        let latency_ms = latency.as_secs_f64() * 1e3;
        match class {
            ServerErrorsFailureClass::StatusCode(status) => tracing::warn!(
                target: "tower_gateway::trace",
                parent: span,
                status = status.as_u16(),
                latency_ms,
                "request failed"
            ),
            ServerErrorsFailureClass::Error(error) => tracing::warn!(
                target: "tower_gateway::trace",
                parent: span,
                error,
                latency_ms,
                "request failed"
            ),
        }
    }
}

/// Makes request ids: 32 hex digits, a random per-process prefix and a counter, so ids are
/// unique in a process and unlikely to repeat across processes. Cheap: no system call.
#[derive(Clone)]
pub struct GatewayRequestId {
    /// The random prefix, as hex digits once for all ids.
    prefix: [u8; 16],
    counter: std::sync::Arc<AtomicU64>,
}

impl GatewayRequestId {
    /// A maker with a fresh random prefix.
    pub fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // std's hasher keys are random per process (and per `RandomState` after the first).
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let mut prefix = [0; 16];
        hex(hasher.finish(), &mut prefix);
        Self {
            prefix,
            counter: std::sync::Arc::new(AtomicU64::new(0)),
        }
    }

    /// The next id.
    pub fn next_id(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        buf[..16].copy_from_slice(&self.prefix);
        hex(n, &mut buf[16..]);
        HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
    }
}

fn hex(mut n: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

impl Default for GatewayRequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for GatewayRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayRequestId").finish_non_exhaustive()
    }
}

impl MakeRequestId for GatewayRequestId {
    fn make_request_id<B>(&mut self, _req: &Request<B>) -> Option<RequestId> {
        Some(RequestId::new(self.next_id()))
    }
}

/// Moves an upstream's own `x-request-id` aside, to `x-upstream-request-id`, when it differs
/// from the request's, so [`propagate_request_id`] (which keeps an id already on the response)
/// returns the gateway's.
#[derive(Clone, Copy, Debug, Default)]
pub struct UpstreamRequestIdLayer(());

impl UpstreamRequestIdLayer {
    /// Creates the layer.
    pub fn new() -> Self {
        Self(())
    }
}

impl<S> Layer<S> for UpstreamRequestIdLayer {
    type Service = UpstreamRequestId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UpstreamRequestId { inner }
    }
}

/// See [`UpstreamRequestIdLayer`].
#[derive(Clone, Copy, Debug)]
pub struct UpstreamRequestId<S> {
    inner: S,
}

impl<S, B, ResBody> Service<Request<B>> for UpstreamRequestId<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = UpstreamRequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ours = req.headers().get(X_REQUEST_ID).cloned();
        UpstreamRequestIdFuture {
            future: self.inner.call(req),
            ours,
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`UpstreamRequestId`].
    pub struct UpstreamRequestIdFuture<F> {
        #[pin]
        future: F,
        ours: Option<HeaderValue>,
    }
}

impl<F, ResBody, E> Future for UpstreamRequestIdFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.future.poll(cx))?;
        if let Some(ours) = this.ours.as_ref() {
            let headers = res.headers_mut();
            if headers
                .get(X_REQUEST_ID)
                .is_some_and(|theirs| theirs != ours)
                && let Some(theirs) = headers.remove(X_REQUEST_ID)
            {
                headers.insert(X_UPSTREAM_REQUEST_ID, theirs);
            }
        }
        Poll::Ready(Ok(res))
    }
}

impl<F> fmt::Debug for UpstreamRequestIdFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamRequestIdFuture")
            .finish_non_exhaustive()
    }
}

/// Removes a client's `x-request-id` that [`is_valid_request_id`] refuses (and all but the first
/// of several), so [`set_request_id`] makes a fresh one.
#[derive(Clone, Copy, Debug, Default)]
pub struct AcceptRequestIdLayer(());

impl AcceptRequestIdLayer {
    /// Creates the layer.
    pub fn new() -> Self {
        Self(())
    }
}

impl<S> Layer<S> for AcceptRequestIdLayer {
    type Service = AcceptRequestId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AcceptRequestId { inner }
    }
}

/// See [`AcceptRequestIdLayer`].
#[derive(Clone, Copy, Debug)]
pub struct AcceptRequestId<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for AcceptRequestId<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let headers = req.headers_mut();
        let mut ids = headers.get_all(X_REQUEST_ID).iter();
        let first = ids.next();
        // Usually one valid id, or none: nothing to do.
        if first.is_some_and(|first| ids.next().is_some() || !is_valid_request_id(first)) {
            let keep = first.filter(|id| is_valid_request_id(id)).cloned();
            headers.remove(X_REQUEST_ID);
            if let Some(id) = keep {
                headers.insert(X_REQUEST_ID, id);
            }
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_hex_digits_and_unique() {
        let maker = GatewayRequestId::new();
        let a = maker.next_id();
        let b = maker.next_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(is_valid_request_id(&a));
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(
            GatewayRequestId::new().next_id(),
            GatewayRequestId::new().next_id(),
            "two makers do not share a prefix"
        );
    }

    #[tokio::test]
    async fn an_upstream_request_id_moves_aside_for_the_gateways() {
        use tower::{ServiceExt, service_fn};
        let upstream = |id: &'static str| {
            UpstreamRequestIdLayer::new().layer(service_fn(move |req: Request<()>| async move {
                assert_eq!(
                    req.headers()["x-request-id"],
                    "req-1",
                    "the id goes upstream"
                );
                let mut res = Response::new(());
                res.headers_mut()
                    .insert(X_REQUEST_ID, HeaderValue::from_static(id));
                Ok::<_, std::convert::Infallible>(res)
            }))
        };
        let request = || {
            Request::builder()
                .header(X_REQUEST_ID, "req-1")
                .body(())
                .unwrap()
        };
        let res = upstream("upstream-7").oneshot(request()).await.unwrap();
        assert_eq!(res.headers()[X_UPSTREAM_REQUEST_ID], "upstream-7");
        assert!(
            !res.headers().contains_key(X_REQUEST_ID),
            "left for PropagateRequestId to fill in"
        );
        let res = upstream("req-1").oneshot(request()).await.unwrap();
        assert_eq!(res.headers()[X_REQUEST_ID], "req-1", "the same id stays");
        assert!(!res.headers().contains_key(X_UPSTREAM_REQUEST_ID));
    }

    #[tokio::test]
    async fn only_a_valid_first_request_id_is_accepted() {
        use tower::{ServiceExt, service_fn};
        let cases: [(&[&str], &[&str]); 6] = [
            (&[], &[]),
            (&["ok-1"], &["ok-1"]),
            (&["bad id"], &[]),
            (&["first-1", "second-2"], &["first-1"]),
            (&["first-1", "bad id"], &["first-1"]),
            // An invalid first id is dropped, and the next does not take its place.
            (&["bad id", "second-2"], &[]),
        ];
        for (sent, kept) in cases {
            let svc =
                AcceptRequestIdLayer::new().layer(service_fn(|req: Request<()>| async move {
                    let ids: Vec<HeaderValue> = req
                        .headers()
                        .get_all(X_REQUEST_ID)
                        .iter()
                        .cloned()
                        .collect();
                    Ok::<_, std::convert::Infallible>(ids)
                }));
            let mut req = Request::new(());
            for id in sent {
                req.headers_mut()
                    .append(X_REQUEST_ID, HeaderValue::from_static(id));
            }
            assert_eq!(svc.oneshot(req).await.unwrap(), kept, "{sent:?}");
        }
    }

    #[test]
    fn request_id_validation() {
        for ok in ["a", "req-123", "0f2e:ab/cd+ef=", &"x".repeat(128)] {
            assert!(
                is_valid_request_id(&HeaderValue::from_str(ok).unwrap()),
                "{ok}"
            );
        }
        for bad in [
            "",
            "has space",
            "quote\"",
            "new\tline",
            &"x".repeat(129),
            "é",
        ] {
            let v = HeaderValue::from_bytes(bad.as_bytes()).unwrap();
            assert!(!is_valid_request_id(&v), "{bad:?}");
        }
    }
}
