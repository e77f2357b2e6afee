//! The rate limiter counted in Redis, beside the same stack with the limiter in memory and
//! without a limiter, all in one group so the ratios come from one run.
//!
//! The stack is the five layers (rescue, auth, route, limiter, inject, identity encoding) in
//! front of a service that answers at once; the limiter has one rule that covers every caller
//! (a request rate and a daily token budget no run reaches), so every request is checked and
//! charged and none is refused. Each iteration sends 64 requests at once (64 keys, one task
//! each) and waits for all of them, on a multi-threaded runtime: what is measured is the time
//! of a batch at concurrency 64, reported per request with criterion's throughput.
//!
//! Redis is the machine's (`BENCH_REDIS_URL`, default `redis://127.0.0.1:6379`), under a key
//! prefix of this run's own that is deleted at the end. Without Redis the Redis arm is
//! skipped, and says so.
//!
//! ```text
//! cargo bench --bench limits
//! ```

#[path = "support/harness.rs"]
mod harness;

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use tower::{Layer, ServiceExt, service_fn};
use tower_gateway::auth::{HashedKeyStore, Principal};
use tower_gateway::encoding::IdentityEncodingLayer;
use tower_gateway::error::RescueLayer;
use tower_gateway::inject::InjectHeadersLayer;
use tower_gateway::limits::RateLimitLayer;
use tower_gateway::model::{LimitBackend, LimitScope, RateLimitRule, RateLimits};
use tower_gateway::registry::SharedRegistry;
use tower_gateway::route::CustomEndpointRouteLayer;

const CONCURRENCY: usize = 64;

/// The benches' one-account registry (its upstream is never dialled here).
fn registry() -> SharedRegistry {
    let upstream = "127.0.0.1:9".parse().expect("an address");
    harness::bench_registry(upstream, HeaderValue::from_static("Bearer up")).into()
}

fn keys() -> HashedKeyStore {
    let mut keys = HashedKeyStore::new();
    for i in 0..CONCURRENCY {
        keys.insert_key(
            &format!("gw-bench-{i}"),
            Principal::new(format!("k{i}"), format!("u{i}@example.com"), ["bench"]),
        )
        .unwrap();
    }
    keys
}

fn request(i: usize) -> Request<Full<Bytes>> {
    Request::post("/proxy-api/coreweave-model/inference/chat/completions")
        .header("authorization", format!("Bearer gw-bench-{i}"))
        .header("content-type", "application/json")
        .body(Full::from(r#"{"model":"m","messages":[]}"#))
        .unwrap()
}

fn limits(backend: LimitBackend, prefix: &str) -> RateLimits {
    RateLimits {
        backend,
        key_prefix: prefix.to_owned(),
        rules: vec![RateLimitRule {
            requests_per_minute: Some(u32::MAX),
            tokens_per_day: Some(u64::MAX / 4),
            ..RateLimitRule::new(LimitScope::Everyone)
        }],
        ..RateLimits::default()
    }
}

type Svc =
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

/// The five layers, with `limiter` between routing and injection if given.
fn stack(limiter: Option<RateLimitLayer>) -> Svc {
    let inner = service_fn(|req: Request<Full<Bytes>>| async move {
        black_box(&req);
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let tail = InjectHeadersLayer::from_route().layer(IdentityEncodingLayer::new().layer(inner));
    match limiter {
        // The same mapping of the answer as the limited arms, so only the limiter differs.
        None => Svc::new(
            RescueLayer::new()
                .layer(
                    tower_gateway::auth::GatewayAuthLayer::new(keys())
                        .layer(CustomEndpointRouteLayer::new(registry()).layer(tail)),
                )
                .map_response(|res: Response<_>| res.map(|b| Full::new(drain(b)))),
        ),
        Some(limiter) => {
            Svc::new(
                RescueLayer::new()
                    .layer(tower_gateway::auth::GatewayAuthLayer::new(keys()).layer(
                        CustomEndpointRouteLayer::new(registry()).layer(limiter.layer(tail)),
                    ))
                    .map_response(|res: Response<_>| res.map(|b| Full::new(drain(b)))),
            )
        }
    }
}

/// The limiter's body around an empty body: nothing to read.
fn drain<B>(_body: B) -> Bytes {
    Bytes::new()
}

async fn batch(svc: &Svc) {
    let mut tasks = Vec::with_capacity(CONCURRENCY);
    for i in 0..CONCURRENCY {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot(request(i)).await.unwrap();
            assert_eq!(res.status(), 200, "a bench request was refused");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn redis_url() -> String {
    std::env::var("BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn redis_reachable() -> bool {
    redis::Client::open(redis_url())
        .and_then(|c| c.get_connection_with_timeout(std::time::Duration::from_secs(2)))
        .is_ok()
}

fn clean(prefix: &str) {
    if let Ok(mut conn) = redis::Client::open(redis_url()).and_then(|c| c.get_connection()) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

fn limiter(c: &mut Criterion) {
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    );
    let prefix = format!("gw-bench-{}:", std::process::id());
    let mut g = c.benchmark_group("limiter_c64");
    g.throughput(Throughput::Elements(CONCURRENCY as u64));
    let arms: Vec<(&str, Svc)> = {
        let _guard = rt.enter();
        let mut arms = vec![
            ("five_layers", stack(None)),
            (
                "five_layers+memory_limiter",
                stack(Some(RateLimitLayer::new(limits(
                    LimitBackend::Memory,
                    &prefix,
                )))),
            ),
        ];
        if redis_reachable() {
            arms.push((
                "five_layers+redis_limiter",
                stack(Some(RateLimitLayer::new(limits(
                    LimitBackend::Redis(redis_url()),
                    &prefix,
                )))),
            ));
        } else {
            eprintln!("SKIPPED: Redis is not reachable; the Redis arm did not run");
        }
        arms
    };
    for (name, svc) in arms {
        g.bench_function(name, |b| b.to_async(&*rt).iter(|| batch(&svc)));
    }
    g.finish();
    clean(&prefix);
}

criterion_group!(benches, limiter);
criterion_main!(benches);
