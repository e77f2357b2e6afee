//! What an endpoint's pool costs per request: the same gateway and the same non-streaming
//! completion over loopback, with the endpoint written three ways, in one group:
//!
//! - `base_url`: one `base_url`, as before pools existed;
//! - `one_target`: `targets` with one entry (the same upstream), which takes the same path;
//! - `three_targets`: three live targets of equal weight, with the default retry policy of a
//!   pool (two attempts): target choice, the body held for a replay, the retry budget, the
//!   in-flight count and the latency estimate, on every request. No request fails, so no
//!   retry happens: this is what the pool costs when all is well.
//!
//! Loopback round trips vary by more than the 0.3 µs a pool may add, so the wall-clock ratio
//! is a check, and the precise figure comes from counting instructions, which is repeatable:
//!
//! ```text
//! cargo bench --bench pools
//! # instructions per request of one arm (client and upstreams included, the same in each arm):
//! POOL_ARM=three_targets POOL_REQUESTS=2000 valgrind --tool=callgrind \
//!     --callgrind-out-file=/dev/null target/release/deps/pools-* 2>&1 | grep refs
//! ```
//!
//! With `POOL_ARM` set, the bench makes `POOL_REQUESTS` requests to that arm on one thread and
//! exits; run it with two counts and take the difference over the difference in requests.

use std::convert::Infallible;
use std::future::pending;
use std::net::SocketAddr;
use std::sync::Arc;

#[path = "support/harness.rs"]
mod harness;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use harness::{
    BenchClient, COMPLETION, GATEWAY_KEY, UPSTREAM_AUTHORIZATION, bench_keys, client, discard,
    drain, listen, send, serve_each,
};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::runtime::Runtime;
use tower_gateway::gateway::Gateway;
use tower_gateway::model::{Grants, Subject, TargetSpec};
use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};
use tower_gateway::usage::UsageTapLayer;

const ARMS: [&str; 3] = ["base_url", "one_target", "three_targets"];

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    discard(req.into_body()).await;
    let mut res = Response::new(Full::new(Bytes::from_static(COMPLETION.as_bytes())));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

fn upstream() -> SocketAddr {
    let listener = listen();
    let addr = listener.local_addr().unwrap();
    serve_each(listener, hyper::service::service_fn(answer));
    addr
}

fn registry(arm: &str, upstreams: &[SocketAddr]) -> Registry {
    let url = |a: &SocketAddr| format!("http://{a}/v1");
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static(UPSTREAM_AUTHORIZATION),
    );
    let endpoint = match arm {
        "base_url" => EndpointSpec::new("inference", url(&upstreams[0])),
        "one_target" => EndpointSpec {
            targets: vec![TargetSpec::new(url(&upstreams[0]))],
            ..EndpointSpec::new("inference", "")
        },
        _ => EndpointSpec {
            targets: upstreams.iter().map(|a| TargetSpec::new(url(a))).collect(),
            ..EndpointSpec::new("inference", "")
        },
    };
    Registry::from_accounts(vec![AccountSpec {
        endpoints: vec![EndpointSpec {
            headers,
            ..endpoint
        }],
        access: Grants {
            users: vec![Subject::Everyone],
            ..Grants::default()
        },
        ..AccountSpec::new("coreweave-model")
    }])
    .unwrap()
}

/// Starts the three upstreams and one gateway per arm; the completion URI of each arm.
fn start() -> Vec<Uri> {
    let upstreams = [upstream(), upstream(), upstream()];
    ARMS.iter()
        .map(|arm| {
            let gateway = Gateway::builder()
                .keys(bench_keys(GATEWAY_KEY))
                .registry(registry(arm, &upstreams).into())
                .usage(UsageTapLayer::disabled())
                .build();
            let listener = listen();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(tower_gateway::server::serve(
                listener,
                gateway.service(),
                pending(),
            ));
            format!("http://{addr}/proxy-api/coreweave-model/inference/chat/completions")
                .parse()
                .unwrap()
        })
        .collect()
}

async fn one(client: &BenchClient, uri: &Uri) {
    let body = send(client, uri).await;
    drain(body).await;
}

fn pools(c: &mut Criterion) {
    if let Ok(arm) = std::env::var("POOL_ARM") {
        let n: usize = std::env::var("POOL_REQUESTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1000);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let uris = start();
            let i = ARMS.iter().position(|a| *a == arm).expect("an arm");
            let client = client();
            for _ in 0..n {
                one(&client, &uris[i]).await;
            }
        });
        std::process::exit(0);
    }
    let rt = Arc::new(Runtime::new().unwrap());
    let uris = rt.block_on(async { start() });
    let client = client();
    // Warm every arm's connections (and each target's latency estimate).
    rt.block_on(async {
        for uri in &uris {
            for _ in 0..100 {
                one(&client, uri).await;
            }
        }
    });
    let mut g = c.benchmark_group("pool");
    g.throughput(Throughput::Elements(1));
    for (arm, uri) in ARMS.iter().zip(&uris) {
        g.bench_function(*arm, |b| {
            b.to_async(&*rt).iter(|| one(&client, uri));
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(60);
    targets = pools
}
criterion_main!(benches);
