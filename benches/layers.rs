//! Per-request cost of each layer, and of the whole stack, over a bare inner service.
//!
//! Every arm of the `layers` group handles the same realistic OpenAI chat request (headers an
//! OpenAI SDK sends, a JSON body) with an inner `service_fn` that answers at once; the `bare`
//! arm is that service alone, so each arm's extra time over `bare` is the layer's own cost.
//!
//! The `telemetry` group measures what the gateway runs on top of those five layers: the
//! usage tap (between routing and injection, reading a JSON completion's `model` and `usage`)
//! and the trace layers (request id, `gateway.request` span, id propagation), with no
//! subscriber and no metrics recorder installed, as in production at `RUST_LOG=warn`. Its
//! baseline is the five-layer stack, and every arm there reads the response body to its end,
//! where the tap and the span finish.
//!
//! The `limiter` group adds the in-memory rate limiter to the five layers, beside the same
//! stack without it.
//!
//! The `backed` group runs the five layers on the live state of a gateway built from the file
//! and of one built on a store (SQLite): the hot path never touches the store, so the ratio
//! should be 1.
//!
//! ```text
//! cargo bench --bench layers
//! ```

use std::convert::Infallible;
use std::hint::black_box;

#[path = "support/harness.rs"]
mod harness;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use harness::{COMPLETION, GATEWAY_KEY, UPSTREAM_AUTHORIZATION, bench_keys};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_gateway::auth::{GatewayAuthLayer, HashedKeyStore};
use tower_gateway::encoding::IdentityEncodingLayer;
use tower_gateway::error::RescueLayer;
use tower_gateway::gateway::Gateway;
use tower_gateway::inject::InjectHeadersLayer;
use tower_gateway::limits::RateLimitLayer;
use tower_gateway::model::{LimitScope, RateLimitRule, RateLimits};
use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry, SharedRegistry};
use tower_gateway::route::CustomEndpointRouteLayer;
use tower_gateway::store::Store;
use tower_gateway::trace::{self, AcceptRequestIdLayer, UpstreamRequestIdLayer};
use tower_gateway::usage::UsageTapLayer;

const BODY: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly and cite sources where you can."},{"role":"user","content":"Explain in two sentences why streaming responses token by token improves perceived latency for chat applications, and name one trade-off."}],"stream":true,"stream_options":{"include_usage":true},"temperature":0.7,"max_tokens":512}"#;

fn request() -> Request<Full<Bytes>> {
    Request::post("/proxy-api/coreweave-model/inference/chat/completions")
        .header("host", "gateway.internal:8080")
        .header("authorization", format!("Bearer {GATEWAY_KEY}"))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("accept-encoding", "gzip, deflate")
        .header("user-agent", "OpenAI/Python 1.99.9")
        .header("x-stainless-lang", "python")
        .header("x-stainless-package-version", "1.99.9")
        .header("x-stainless-os", "Linux")
        .header("x-stainless-arch", "x64")
        .header("x-stainless-runtime", "CPython")
        .header("x-stainless-runtime-version", "3.11.7")
        .header("x-stainless-retry-count", "0")
        .header("connection", "keep-alive")
        .header("content-length", BODY.len())
        .body(Full::from(BODY))
        .unwrap()
}

fn registry() -> SharedRegistry {
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_static(UPSTREAM_AUTHORIZATION),
    );
    Registry::from_accounts(vec![AccountSpec {
        endpoints: vec![EndpointSpec {
            headers,
            ..EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1")
        }],
        ..AccountSpec::new("coreweave-model")
    }])
    .unwrap()
    .into()
}

fn keys() -> HashedKeyStore {
    bench_keys(GATEWAY_KEY)
}

fn inner()
-> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    service_fn(|req: Request<Full<Bytes>>| async move {
        black_box(&req);
        Ok::<_, Infallible>(Response::new(Full::default()))
    })
}

/// Like [`inner`], answering with the headers an upstream's completion carries, so that a
/// layer adding headers to the answer meets a header map as it is in traffic, not an empty
/// one.
fn upstream_like()
-> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    service_fn(|req: Request<Full<Bytes>>| async move {
        black_box(&req);
        let res = Response::builder()
            .header("content-type", "application/json")
            .header("date", "Tue, 08 Dec 2026 01:00:00 GMT")
            .header("x-request-id", "req-0123456789abcdef")
            .header("openai-processing-ms", "412")
            .header("cache-control", "no-cache, must-revalidate")
            .body(Full::default())
            .unwrap();
        Ok::<_, Infallible>(res)
    })
}

/// Benches `svc` on [`request`]: one `oneshot` per iteration, answered at once; `finish` is
/// what is done with the response inside the measurement.
fn bench<S, B, T>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    svc: S,
    finish: impl Fn(Response<B>) -> T,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    bench_from(c, name, svc, request, finish);
}

/// [`bench`] on the requests `setup` makes, one per iteration (made outside the measurement).
fn bench_from<S, B, T>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    svc: S,
    mut setup: impl FnMut() -> Request<Full<Bytes>>,
    finish: impl Fn(Response<B>) -> T,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    c.bench_function(name, |b| {
        b.iter_batched(
            &mut setup,
            |req| {
                let res = svc
                    .clone()
                    .oneshot(req)
                    .now_or_never()
                    .expect("ready at once")
                    .unwrap();
                assert_eq!(res.status(), 200);
                finish(res)
            },
            BatchSize::SmallInput,
        )
    });
}

/// The response is returned and dropped outside the measurement.
fn run<S>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    svc: S,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>> + Clone,
    S::Error: std::fmt::Debug,
{
    bench(c, name, svc, |res| res);
}

fn layers(c: &mut Criterion) {
    let mut g = c.benchmark_group("layers");
    run(&mut g, "bare", inner());
    run(&mut g, "rescue", RescueLayer::new().layer(inner()));
    run(&mut g, "auth", GatewayAuthLayer::new(keys()).layer(inner()));
    run(
        &mut g,
        "route",
        CustomEndpointRouteLayer::new(registry()).layer(inner()),
    );
    // Inject reads the RouteMatch, so it is measured under route; compare with `route`.
    run(
        &mut g,
        "route+inject",
        CustomEndpointRouteLayer::new(registry())
            .layer(InjectHeadersLayer::from_route().layer(inner())),
    );
    run(
        &mut g,
        "identity_encoding",
        IdentityEncodingLayer::new().layer(inner()),
    );
    let stack = RescueLayer::new().layer(GatewayAuthLayer::new(keys()).layer(
        CustomEndpointRouteLayer::new(registry()).layer(
            InjectHeadersLayer::from_route().layer(IdentityEncodingLayer::new().layer(inner())),
        ),
    ));
    run(&mut g, "full_stack", stack);
    g.finish();
}

/// The inner service of the `telemetry` group: answers a non-streaming chat completion.
fn completion<B>()
-> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone {
    service_fn(|req: Request<B>| async move {
        black_box(&req);
        let mut res = Response::new(Full::from(COMPLETION));
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok::<_, Infallible>(res)
    })
}

/// Like [`run`], but reads the response body to its end inside the measurement.
fn run_to_end<S, B>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    svc: S,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    bench(c, name, svc, |res| {
        let body = res
            .into_body()
            .collect()
            .now_or_never()
            .expect("a body that is all there")
            .unwrap();
        black_box(body.to_bytes().len())
    });
}

fn telemetry(c: &mut Criterion) {
    let mut g = c.benchmark_group("telemetry");
    let stack = |tap: Option<UsageTapLayer>| {
        let inner = InjectHeadersLayer::from_route()
            .layer(IdentityEncodingLayer::new().layer(completion()));
        let tapped = tap.map_or_else(
            || UsageTapLayer::disabled().layer(inner.clone()),
            |tap| tap.layer(inner.clone()),
        );
        RescueLayer::new().layer(
            GatewayAuthLayer::new(keys())
                .layer(CustomEndpointRouteLayer::new(registry()).layer(tapped)),
        )
    };
    let traced = |svc| {
        let svc = UpstreamRequestIdLayer::new().layer(svc);
        let svc = trace::propagate_request_id().layer(svc);
        let svc = trace::layer("proxy", true).layer(svc);
        let svc = trace::set_request_id().layer(svc);
        AcceptRequestIdLayer::new().layer(svc)
    };
    run_to_end(&mut g, "five_layers", stack(None));
    run_to_end(&mut g, "five_layers+tap", stack(Some(UsageTapLayer::new())));
    run_to_end(&mut g, "five_layers+trace", traced(stack(None)));
    run_to_end(
        &mut g,
        "five_layers+tap+trace",
        traced(stack(Some(UsageTapLayer::new()))),
    );
    g.finish();
}

/// The five layers on the live registry and keys of a gateway built from the file (in memory)
/// and of one built on a store (a SQLite file): the hot path never touches the store, so the
/// two arms run the same code on the same data and should measure the same.
fn backed(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("tower-gateway-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = Gateway::builder().keys(keys()).registry(registry()).build();
    let store = rt.block_on(async {
        let store = Store::open(&format!("sqlite://{}", dir.join("state.db").display()))
            .await
            .unwrap();
        Gateway::builder()
            .keys(keys())
            .registry(registry())
            .build_with_store(store)
            .await
            .unwrap()
    });
    let stack = |gateway: &Gateway| {
        let live = gateway.live();
        RescueLayer::new().layer(GatewayAuthLayer::new(live.keys().clone()).layer(
            CustomEndpointRouteLayer::new(live.registry().clone()).layer(
                InjectHeadersLayer::from_route().layer(IdentityEncodingLayer::new().layer(inner())),
            ),
        ))
    };
    let mut g = c.benchmark_group("backed");
    run(&mut g, "file", stack(&file));
    run(&mut g, "store_sqlite", stack(&store));
    g.finish();
    drop((file, store, rt));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The five layers with the in-memory rate limiter between routing and injection, as the
/// gateway runs it, beside the same stack without it. The answer carries an upstream's usual
/// headers (the limiter adds three to them). Two limits, each with its own arm:
///
/// - `u32::MAX` requests a minute for everyone: one key, a limit no run reaches; its large
///   numbers are written into the headers afresh each time;
/// - 1,000 requests a minute per key, as a deployment would set it, over 10,000 keys taken in
///   turn (each sees a few hundred requests a run, none is refused): 10,000 buckets, and
///   header numbers under 1,024, which are shared.
fn limiter(c: &mut Criterion) {
    use std::sync::atomic::AtomicUsize;
    const KEYS: usize = 10_000;
    let rule = |rpm: u32| RateLimits {
        rules: vec![RateLimitRule {
            requests_per_minute: Some(rpm),
            ..RateLimitRule::new(LimitScope::Everyone)
        }],
        ..RateLimits::default()
    };
    let tail = || {
        InjectHeadersLayer::from_route().layer(IdentityEncodingLayer::new().layer(upstream_like()))
    };
    let without = RescueLayer::new().layer(
        GatewayAuthLayer::new(keys())
            .layer(CustomEndpointRouteLayer::new(registry()).layer(tail())),
    );
    let with = RescueLayer::new().layer(
        GatewayAuthLayer::new(keys()).layer(
            CustomEndpointRouteLayer::new(registry())
                .layer(RateLimitLayer::new(rule(u32::MAX)).layer(tail())),
        ),
    );
    let mut many = HashedKeyStore::new();
    for i in 0..KEYS {
        many.insert_key(
            &format!("gw-bench-{i}"),
            tower_gateway::auth::Principal::new(format!("k{i}"), format!("u{i}@x"), ["t"]),
        )
        .unwrap();
    }
    let many_without = RescueLayer::new().layer(
        GatewayAuthLayer::new(many.clone())
            .layer(CustomEndpointRouteLayer::new(registry()).layer(tail())),
    );
    let many_with = RescueLayer::new().layer(
        GatewayAuthLayer::new(many).layer(
            CustomEndpointRouteLayer::new(registry())
                .layer(RateLimitLayer::new(rule(1000)).layer(tail())),
        ),
    );
    let mut g = c.benchmark_group("limiter");
    run(&mut g, "five_layers", without);
    bench(&mut g, "five_layers+memory_limiter", with, |res| res);
    let next = AtomicUsize::new(0);
    rotating(&mut g, "10k_keys/five_layers", many_without, &next, KEYS);
    rotating(
        &mut g,
        "10k_keys/five_layers+memory_limiter",
        many_with,
        &next,
        KEYS,
    );
    g.finish();
}

/// Benches `svc` on [`request`] sent with the keys `gw-bench-{i}`, `i` in turn up to `keys`.
fn rotating<S, B>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    svc: S,
    next: &std::sync::atomic::AtomicUsize,
    keys: usize,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    let setup = || {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % keys;
        let mut req = request();
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer gw-bench-{i}")).unwrap(),
        );
        req
    };
    bench_from(c, name, svc, setup, |res| res);
}

criterion_group!(benches, layers, telemetry, backed, limiter);
criterion_main!(benches);
