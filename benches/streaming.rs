//! Streaming over loopback TCP: the full gateway against a bare forwarder and no proxy at all.
//!
//! Every group has four arms, so ratios read from one run:
//!
//! - `direct`: client → upstream;
//! - `bare_forward`: client → a hyper server running only [`Forward`] (behind [`RescueLayer`],
//!   with a one-line service that makes the URI absolute) → upstream;
//! - `gateway`: client → [`Gateway::service`] (request ids, trace, rescue, auth, route, access,
//!   inject, identity encoding, forward) with one key and one endpoint → upstream, with
//!   telemetry off: no tracing subscriber, the usage tap disabled, no metrics;
//! - `gateway_telemetry`: the same gateway with telemetry on, as in production: the usage tap
//!   reading every event (and a usage record per call), metrics into a Prometheus recorder, and
//!   a `tracing` fmt subscriber at `INFO` that formats each request's span when it closes and
//!   each usage event (written to `io::sink`). `BENCH_TELEMETRY_LOG=plain|json|none` swaps that
//!   subscriber for one without ANSI colours, one writing JSON, or one that formats nothing;
//!   `devnull` writes plain lines to `/dev/null` with a `write` each on the request's task, and
//!   `devnull_nonblocking` hands them to tracing-appender's lossy non-blocking writer.
//!
//! The upstream is a hyper server that answers from canned frames (static `Bytes`, no
//! per-request work beyond draining the request body); the proxies run under
//! [`tower_gateway::server::serve`]; the client is hyper-util's pooled legacy client with
//! keep-alive and `TCP_NODELAY`. By default client, proxies and upstream share one tokio
//! multi-thread runtime (a worker per core), so on a small machine they compete for the same
//! cores: read ratios, not absolute numbers. `BENCH_LAYOUT=pinned` instead runs the proxies on
//! a one-worker runtime pinned to core 0 and the client and upstream on one pinned to core 1,
//! the layout of the issue's nginx baselines: the proxy's core is then the bottleneck of the
//! throughput workloads, but on a virtual machine an idle core is slow to wake (tens of µs per
//! cross-core hand-off), which dominates the latency workloads.
//!
//! | group | workload | throughput |
//! |---|---|---|
//! | `sse_1000_events` | one request, 1,000 SSE events of ~150 B (an OpenAI chunk each), one frame per event, sent as fast as possible | events/s |
//! | `sse_1000_events_x64` | the same, 64 streams at once | events/s |
//! | `bytes_16MiB` | a 16 MiB response in 16 KiB frames | bytes/s |
//! | `completions_c1` | small non-streaming completions (~400 B of JSON), one at a time | requests/s |
//! | `completions_c64` | the same, 64 clients at once, 16 requests each | requests/s |
//! | `first_event` | the upstream answers one event; time from sending the request to that event | time |
//!
//! ```text
//! cargo bench --bench streaming
//! cargo bench --bench streaming -- sse_1000_events/   # one group
//! BENCH_LAYOUT=pinned cargo bench --bench streaming
//! ```

use std::convert::Infallible;
use std::future::{Future, pending};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

#[path = "support/harness.rs"]
mod harness;

use bytes::Bytes;
use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use harness::{
    BenchClient, COMPLETION, DONE, Frames, GATEWAY_KEY, UPSTREAM_AUTHORIZATION, absolute_to,
    bench_keys, bench_registry, big_frames, client, discard, drain, frames_len, leak, pin_to, send,
    serve_each, sse_event, sse_events,
};
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tower::Layer;
use tower::util::MapRequest;
use tower_gateway::error::RescueLayer;
use tower_gateway::forward::{Forward, ResponseBody};
use tower_gateway::gateway::Gateway;
use tower_gateway::usage::UsageTapLayer;
use tracing::Dispatch;
use tracing::instrument::WithSubscriber;

const SSE_EVENTS: usize = 1_000;
const STREAMS: usize = 64;
const BIG_LEN: usize = 16 << 20;
const BIG_FRAME: usize = 16 << 10;
const CLIENTS: usize = 64;
const REQUESTS_PER_CLIENT: usize = 16;

const PATH_SSE: &str = "sse";
const PATH_BIG: &str = "bytes";
const PATH_COMPLETION: &str = "completions";
const PATH_FIRST: &str = "first";

/// The last event before `[DONE]`: the usage chunk of `stream_options.include_usage`.
const SSE_USAGE: &str = "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"llama-3.1\",\"choices\":[],\"usage\":{\"prompt_tokens\":57,\"completion_tokens\":998,\"total_tokens\":1055}}\n\n";

/// The upstream's answers, built once. Every frame is a `Bytes` over static memory, so
/// serving one costs neither an allocation nor a copy.
struct Canned {
    sse: Arc<[Bytes]>,
    big: Arc<[Bytes]>,
    completion: Arc<[Bytes]>,
    first: Arc<[Bytes]>,
}

impl Canned {
    fn new() -> Self {
        let mut sse = sse_events(SSE_EVENTS - 2);
        sse.push(Bytes::from_static(SSE_USAGE.as_bytes()));
        sse.push(Bytes::from_static(DONE.as_bytes()));
        Self {
            sse: sse.into(),
            big: big_frames(BIG_LEN, BIG_FRAME),
            completion: vec![Bytes::from_static(COMPLETION.as_bytes())].into(),
            first: vec![leak(sse_event(0).into_bytes())].into(),
        }
    }
}

/// Drains the request body, then answers the canned response for the last path segment.
async fn answer(
    req: Request<Incoming>,
    canned: Arc<Canned>,
) -> Result<Response<Frames>, Infallible> {
    let (parts, body) = req.into_parts();
    discard(body).await;
    let path = parts.uri.path();
    let (frames, exact, content_type) = match path.rsplit('/').next() {
        Some(PATH_SSE) => (&canned.sse, false, "text/event-stream"),
        Some(PATH_BIG) => (&canned.big, true, "application/octet-stream"),
        Some(PATH_COMPLETION) => (&canned.completion, true, "application/json"),
        Some(PATH_FIRST) => (&canned.first, false, "text/event-stream"),
        _ => {
            let mut res = Response::new(Frames::new(Arc::new([]), true));
            *res.status_mut() = StatusCode::NOT_FOUND;
            return Ok(res);
        }
    };
    let mut res = Response::new(Frames::new(frames.clone(), exact));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(res)
}

async fn spawn_upstream(canned: Arc<Canned>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_each(
        listener,
        hyper::service::service_fn(move |req| answer(req, canned.clone())),
    );
    addr
}

/// `Forward` alone (behind `RescueLayer`, which `serve` needs for an infallible service),
/// with the upstream's scheme and authority set on the request URI.
async fn spawn_bare_forward(upstream: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = RescueLayer::new().layer(MapRequest::new(
        Forward::<Incoming>::new(),
        absolute_to(upstream),
    ));
    tokio::spawn(tower_gateway::server::serve(listener, svc, pending()));
    addr
}

/// The full stack: one key, one account with one endpoint that injects a credential. With
/// `telemetry`, the default usage tap and metrics, and every call under that subscriber;
/// without, the tap disabled and no metrics.
async fn spawn_gateway(upstream: SocketAddr, telemetry: Option<Dispatch>) -> SocketAddr {
    let registry = bench_registry(upstream, HeaderValue::from_static(UPSTREAM_AUTHORIZATION));
    let keys = bench_keys(GATEWAY_KEY);
    let builder = Gateway::builder().keys(keys).registry(registry.into());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    match telemetry {
        None => {
            let gateway = builder
                .usage(UsageTapLayer::disabled())
                .metrics(false)
                .build();
            tokio::spawn(tower_gateway::server::serve(
                listener,
                gateway.service(),
                pending(),
            ));
        }
        Some(dispatch) => {
            let gateway = builder.metrics(std::env::var("XMETRICS").is_err()).build();
            let svc = Dispatched {
                inner: gateway.service(),
                dispatch,
            };
            tokio::spawn(tower_gateway::server::serve(listener, svc, pending()));
        }
    }
    addr
}

/// What `gateway_telemetry` logs with: the fmt subscriber a production gateway would run,
/// writing to `io::sink`, spans logged when they close.
fn telemetry_subscriber() -> Dispatch {
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .with_max_level(tracing::Level::INFO)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE);
    let devnull = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap()
    };
    match std::env::var("BENCH_TELEMETRY_LOG").as_deref() {
        Ok("none") => Dispatch::new(tracing_subscriber::registry()),
        Ok("plain") => Dispatch::new(fmt.with_ansi(false).finish()),
        Ok("json") => Dispatch::new(fmt.json().finish()),
        // A `write` per line on the request's task, as a gateway logging to a file or a pipe.
        Ok("devnull") => Dispatch::new(
            fmt.with_ansi(false)
                .with_writer(std::sync::Mutex::new(devnull()))
                .finish(),
        ),
        // The same lines handed to a writer thread through a bounded queue that drops (and
        // counts) lines when full, as the example gateway logs.
        Ok("devnull_nonblocking") => {
            let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(true)
                .finish(devnull());
            Box::leak(Box::new(guard));
            Dispatch::new(fmt.with_ansi(false).with_writer(writer).finish())
        }
        _ => Dispatch::new(fmt.finish()),
    }
}

/// Runs a service, and polls its response bodies, with `dispatch` as the default subscriber:
/// a process-wide subscriber would also trace the other arms.
#[derive(Clone)]
struct Dispatched<S> {
    inner: S,
    dispatch: Dispatch,
}

impl<S> tower::Service<Request<Incoming>> for Dispatched<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<DispatchedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let dispatch = self.dispatch.clone();
        let future = tracing::dispatcher::with_default(&dispatch, || self.inner.call(req));
        Box::pin(async move {
            let res = future.with_subscriber(dispatch.clone()).await?;
            Ok(res.map(|body| DispatchedBody {
                body,
                dispatch: Some(dispatch),
            }))
        })
    }
}

pin_project_lite::pin_project! {
    struct DispatchedBody {
        #[pin]
        body: ResponseBody,
        dispatch: Option<Dispatch>,
    }
}

impl From<Bytes> for DispatchedBody {
    fn from(data: Bytes) -> Self {
        Self {
            body: ResponseBody::from(data),
            dispatch: None,
        }
    }
}

impl Body for DispatchedBody {
    type Data = Bytes;
    type Error = tower_gateway::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        match this.dispatch {
            Some(d) => tracing::dispatcher::with_default(d, || this.body.poll_frame(cx)),
            None => this.body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// One arm: a client of its own and the URI of each workload.
struct Arm {
    name: &'static str,
    client: BenchClient,
    sse: Uri,
    big: Uri,
    completion: Uri,
    first: Uri,
}

impl Arm {
    fn new(name: &'static str, base: String) -> Self {
        let uri = |path: &str| format!("{base}/{path}").parse::<Uri>().unwrap();
        Self {
            name,
            client: client(),
            sse: uri(PATH_SSE),
            big: uri(PATH_BIG),
            completion: uri(PATH_COMPLETION),
            first: uri(PATH_FIRST),
        }
    }
}

async fn fetch(client: &BenchClient, uri: &Uri) -> usize {
    drain(send(client, uri).await).await
}

/// Runs `per_task` fetches of `uri` on each of `tasks` spawned tasks; returns the bytes each
/// task read, summed.
async fn fetch_concurrently(arm: &Arm, uri: &Uri, tasks: usize, per_task: usize) -> usize {
    harness::fetch_concurrently(&arm.client, uri, tasks, per_task, None).await
}

/// Time from sending the request to the first data frame; the rest is read untimed.
async fn time_to_first_event(arm: &Arm) -> Duration {
    let (elapsed, _, body) = harness::time_to_first_event(&arm.client, &arm.first).await;
    drain(body).await;
    elapsed
}

struct Expected {
    sse: usize,
    big: usize,
    completion: usize,
    first: usize,
}

/// Where the bench runs: the load (client and upstream) and the proxies, on one runtime or on
/// two, each pinned to a core of its own.
struct Layout {
    /// Runs the clients (criterion's `block_on`) and the upstream.
    load: Runtime,
    /// Runs the proxies; `None` when they share `load`.
    proxies: Option<Runtime>,
    description: String,
}

impl Layout {
    /// By default everything shares one multi-thread runtime with a worker per core.
    /// `BENCH_LAYOUT=pinned` (with two cores or more) gives the proxies a one-worker runtime
    /// pinned to core 0 and the client and upstream one pinned to core 1, as the issue's nginx
    /// baselines were measured.
    fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pinned = std::env::var("BENCH_LAYOUT").is_ok_and(|v| v == "pinned");
        if !pinned || cores < 2 {
            let load = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            return Self {
                load,
                proxies: None,
                description: format!(
                    "shared: client, upstream and proxies on one runtime, {cores} workers, \
                     unpinned (BENCH_LAYOUT=pinned for a core each)"
                ),
            };
        }
        let pinned = |core: usize| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .on_thread_start(move || pin_to(core))
                .enable_all()
                .build()
                .unwrap()
        };
        // Criterion drives the clients from this thread (`block_on`): it belongs to the load.
        pin_to(1);
        Self {
            load: pinned(1),
            proxies: Some(pinned(0)),
            description: "pinned: proxies on core 0 (one worker), client and upstream on core 1 \
                          (one worker and the bench thread)"
                .to_owned(),
        }
    }

    fn proxies(&self) -> &Runtime {
        self.proxies.as_ref().unwrap_or(&self.load)
    }
}

fn setup(layout: &Layout) -> (Vec<Arm>, Expected) {
    // Only `gateway_telemetry` records metrics (the other gateway has them off).
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("one recorder per process");
    let canned = Arc::new(Canned::new());
    let expected = Expected {
        sse: frames_len(&canned.sse),
        big: frames_len(&canned.big),
        completion: frames_len(&canned.completion),
        first: frames_len(&canned.first),
    };
    eprintln!("layout: {}", layout.description);
    let upstream = layout.load.block_on(spawn_upstream(canned));
    let bare = layout.proxies().block_on(spawn_bare_forward(upstream));
    let gateway = layout.proxies().block_on(spawn_gateway(upstream, None));
    let traced = layout
        .proxies()
        .block_on(spawn_gateway(upstream, Some(telemetry_subscriber())));
    let arms = layout.load.block_on(async {
        let arms = vec![
            Arm::new("direct", format!("http://{upstream}/v1")),
            Arm::new("bare_forward", format!("http://{bare}/v1")),
            Arm::new(
                "gateway",
                format!("http://{gateway}/proxy-api/coreweave-model/inference"),
            ),
            Arm::new(
                "gateway_telemetry",
                format!("http://{traced}/proxy-api/coreweave-model/inference"),
            ),
        ];
        // Every arm answers every workload in full before anything is timed.
        for arm in &arms {
            assert_eq!(
                fetch(&arm.client, &arm.sse).await,
                expected.sse,
                "{}",
                arm.name
            );
            assert_eq!(
                fetch(&arm.client, &arm.big).await,
                expected.big,
                "{}",
                arm.name
            );
            assert_eq!(
                fetch(&arm.client, &arm.completion).await,
                expected.completion,
                "{}",
                arm.name
            );
            assert_eq!(
                fetch(&arm.client, &arm.first).await,
                expected.first,
                "{}",
                arm.name
            );
        }
        arms
    });
    // The telemetry arm did read the usage of its four calls: the SSE stream's (998 output
    // tokens) and the completion's (31), and saw every body to its end.
    let metrics = prometheus.render();
    assert!(
        metrics.contains("type=\"output\"} 1029")
            && metrics.contains("outcome=\"complete\"} 4")
            && !metrics.contains("cancelled"),
        "the telemetry arm did not read its calls' usage:\n{metrics}"
    );
    (arms, expected)
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    throughput: Throughput,
) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(throughput);
    g
}

fn streaming(c: &mut Criterion) {
    let layout = Layout::new();
    let (arms, expected) = setup(&layout);
    let rt = &layout.load;
    let expected = &expected;

    let mut g = group(
        c,
        "sse_1000_events",
        Throughput::Elements(SSE_EVENTS as u64),
    );
    for arm in &arms {
        g.bench_function(arm.name, |b| {
            b.to_async(rt).iter(|| async move {
                assert_eq!(fetch(&arm.client, &arm.sse).await, expected.sse);
            })
        });
    }
    g.finish();

    let mut g = group(
        c,
        "sse_1000_events_x64",
        Throughput::Elements((SSE_EVENTS * STREAMS) as u64),
    );
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(5));
    for arm in &arms {
        g.bench_function(arm.name, |b| {
            b.to_async(rt).iter(|| async move {
                let n = fetch_concurrently(arm, &arm.sse, STREAMS, 1).await;
                assert_eq!(n, expected.sse * STREAMS);
            })
        });
    }
    g.finish();

    let mut g = group(c, "bytes_16MiB", Throughput::Bytes(BIG_LEN as u64));
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for arm in &arms {
        g.bench_function(arm.name, |b| {
            b.to_async(rt).iter(|| async move {
                assert_eq!(fetch(&arm.client, &arm.big).await, expected.big);
            })
        });
    }
    g.finish();

    let mut g = group(c, "completions_c1", Throughput::Elements(1));
    for arm in &arms {
        g.bench_function(arm.name, |b| {
            b.to_async(rt).iter(|| async move {
                assert_eq!(
                    fetch(&arm.client, &arm.completion).await,
                    expected.completion
                );
            })
        });
    }
    g.finish();

    let mut g = group(
        c,
        "completions_c64",
        Throughput::Elements((CLIENTS * REQUESTS_PER_CLIENT) as u64),
    );
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for arm in &arms {
        g.bench_function(arm.name, |b| {
            b.to_async(rt).iter(|| async move {
                let n =
                    fetch_concurrently(arm, &arm.completion, CLIENTS, REQUESTS_PER_CLIENT).await;
                assert_eq!(n, expected.completion * CLIENTS * REQUESTS_PER_CLIENT);
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("first_event");
    for arm in &arms {
        g.bench_function(arm.name, |b| {
            b.to_async(rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += time_to_first_event(arm).await;
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = streaming
}
criterion_main!(benches);
