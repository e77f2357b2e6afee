//! Soak test: N concurrent streaming chat completions for T seconds through the full gateway
//! against the in-process mock W&B upstream, every stream's content checked.
//!
//! ```text
//! cargo run --release --example soak -- [--streams N] [--seconds T] [--token-delay-ms D]
//! ```
//!
//! Each client keeps opening streams for T seconds, `N` at a time; each stream asks the mock
//! to echo a unique message and checks that the reassembled completion is exactly the expected
//! text and ends with `data: [DONE]`. It prints streams completed, bytes, errors (failed or
//! corrupted streams) and the process's peak RSS. Every stream costs about four file
//! descriptors (client, gateway in and out, upstream): N = 10,000 needs `ulimit -n` ≥ 45,000,
//! or run it as several smaller soaks.

#[path = "../benches/support/harness.rs"]
mod harness;
#[path = "support/mock_upstream.rs"]
mod mock_upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::bench_registry;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower_gateway::auth::{HashedKeyStore, Principal};
use tower_gateway::gateway::Gateway;

const GATEWAY_KEY: &str = "gw-soak-key";
const UPSTREAM_KEY: &str = "soak-upstream-key";

#[derive(Default)]
struct Totals {
    completed: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
    corrupted: AtomicU64,
}

fn arg(name: &str, default: u64) -> u64 {
    let mut args = std::env::args();
    while let Some(a) = args.next() {
        if a == name {
            return args
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"));
        }
    }
    default
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let streams = arg("--streams", 256);
    let seconds = arg("--seconds", 10);
    let token_delay = Duration::from_millis(arg("--token-delay-ms", 5));

    let mock = mock_upstream::MockUpstream::new(UPSTREAM_KEY, token_delay);
    let upstream = mock.spawn().await.expect("mock upstream");
    let registry = bench_registry(upstream, format!("Bearer {UPSTREAM_KEY}").parse().unwrap());
    let keys = HashedKeyStore::new()
        .with_key(
            GATEWAY_KEY,
            Principal::new("soak", "soak@example.com", ["load"]),
        )
        .unwrap();
    let gateway = Gateway::builder()
        .keys(keys)
        .registry(registry.into())
        .build();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tower_gateway::server::serve(
        listener,
        gateway.service(),
        std::future::pending(),
    ));

    let url = format!("http://{addr}/proxy-api/coreweave-model/inference/chat/completions");
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build_http();
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    println!(
        "soak: {streams} concurrent streams for {seconds} s through http://{addr} (token delay {token_delay:?})"
    );

    let workers: Vec<_> = (0..streams)
        .map(|worker| {
            let (client, url, totals) = (client.clone(), url.clone(), totals.clone());
            tokio::spawn(async move {
                let mut round = 0u64;
                while Instant::now() < deadline {
                    round += 1;
                    let said = format!("soak {worker} {round}");
                    let body = format!(
                        r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"{said}"}}]}}"#
                    );
                    let req = Request::post(&url)
                        .header("authorization", format!("Bearer {GATEWAY_KEY}"))
                        .header("content-type", "application/json")
                        .body(Full::from(body))
                        .unwrap();
                    match stream_once(&client, req).await {
                        Ok((bytes, text)) => {
                            totals.bytes.fetch_add(bytes, Ordering::Relaxed);
                            let expected = format!("Hello from the mock W&B Inference upstream! You said: {said}");
                            if text == expected {
                                totals.completed.fetch_add(1, Ordering::Relaxed);
                            } else {
                                totals.corrupted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(err) => {
                            if totals.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("stream failed: {err}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed();
    let completed = totals.completed.load(Ordering::Relaxed);
    println!("streams completed  {completed}");
    println!(
        "bytes              {}",
        totals.bytes.load(Ordering::Relaxed)
    );
    println!(
        "failed             {}",
        totals.failed.load(Ordering::Relaxed)
    );
    println!(
        "corrupted          {}",
        totals.corrupted.load(Ordering::Relaxed)
    );
    println!(
        "streams/s          {:.0}",
        completed as f64 / elapsed.as_secs_f64()
    );
    println!(
        "peak RSS           {} KiB (client, gateway and upstream in one process)",
        peak_rss_kib()
    );
    if totals.failed.load(Ordering::Relaxed) + totals.corrupted.load(Ordering::Relaxed) > 0 {
        std::process::exit(1);
    }
}

/// One streaming completion: the bytes received and the reassembled content.
async fn stream_once(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<(u64, String), String> {
    let res = client.request(req).await.map_err(|e| e.to_string())?;
    if res.status() != 200 {
        return Err(format!("status {}", res.status()));
    }
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let text = std::str::from_utf8(&body).map_err(|e| e.to_string())?;
    if !text.ends_with("data: [DONE]\n\n") {
        return Err("the stream did not end with [DONE]".to_owned());
    }
    let mut content = String::new();
    for event in text
        .split("\n\n")
        .filter(|e| !e.is_empty() && *e != "data: [DONE]")
    {
        let json = event
            .strip_prefix("data: ")
            .ok_or("an event without `data: `")?;
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
    }
    Ok((body.len() as u64, content))
}
