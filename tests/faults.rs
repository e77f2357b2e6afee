//! Fault injection over loopback (issue 5, items 5 and 6): stream integrity under load,
//! upstreams that reset mid-stream, clients that disconnect, backpressure, idle timeouts, and
//! upstreams that encode anyway or lie about `Content-Length`.
//!
//! Every test takes [`LOCK`] before it builds its own runtime: shared by the tests that only
//! look at their own streams, exclusive for those that measure the whole process (open file
//! descriptors, RSS) or depend on timing, so they see no other test's sockets, threads,
//! allocations or CPU load. Every wait is bounded.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tower_gateway::forward::ForwardBuilder;

use support::*;

// ------------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------------

/// Shared by ordinary tests, held exclusively by the ones that measure the whole process.
static LOCK: RwLock<()> = RwLock::new(());

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `test` on its own runtime beside the other shared tests.
fn shared<F: Future>(test: F) -> F::Output {
    let _guard = LOCK.read().unwrap_or_else(PoisonError::into_inner);
    let rt = runtime();
    let out = rt.block_on(test);
    rt.shutdown_timeout(Duration::from_secs(1));
    out
}

/// Runs `test` on its own runtime with no other test of this file running.
fn alone<F: Future>(test: F) -> F::Output {
    let _guard = LOCK.write().unwrap_or_else(PoisonError::into_inner);
    let rt = runtime();
    let out = rt.block_on(test);
    rt.shutdown_timeout(Duration::from_secs(1));
    out
}

/// A small deterministic generator (SplitMix64): every case is reproducible from its index.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A size in `1..=max`, log-uniform: as many tiny frames as huge ones.
    fn size(&mut self, max: usize) -> usize {
        let bits = self.below(max.ilog2() as usize + 1);
        (1 + self.below(1 << bits)).min(max)
    }
}

/// Pseudo-random bytes every body is cut from (zero-copy slices), so a dropped, repeated or
/// reordered piece changes what the client sees.
const POOL_LEN: usize = 1024 * 1024 + 64 * 1024;

fn pool() -> &'static Bytes {
    static POOL: OnceLock<Bytes> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut rng = Rng::new(0x00c0_ffee);
        let mut v = Vec::with_capacity(POOL_LEN + 8);
        while v.len() < POOL_LEN {
            v.extend_from_slice(&rng.next().to_le_bytes());
        }
        v.truncate(POOL_LEN);
        Bytes::from(v)
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// `GET {proxy}{path}` with the gateway key.
fn get(gw: &TestGateway, path: &str) -> Request<Full<Bytes>> {
    Request::get(gw.proxy_url(path))
        .header("authorization", format!("Bearer {GW_KEY}"))
        .header("accept-encoding", "gzip")
        .body(Full::default())
        .unwrap()
}

/// What a client got: the head, the body bytes, and whether the body ended cleanly.
#[derive(Debug)]
struct Got {
    /// `None` when the connection or stream was cut before a response head arrived.
    status: Option<StatusCode>,
    headers: HeaderMap,
    bytes: Vec<u8>,
    /// `None` for a clean end.
    error: Option<String>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Reads a body to its end or its error, every frame within [`WAIT`].
/// `bytes` without the gateway's error event at its end (the event a cut event stream gets),
/// and whether it had one.
fn without_error_event(bytes: &[u8]) -> (&[u8], bool) {
    const START: &[u8] = b"\n\ndata: {\"error\"";
    match bytes.windows(START.len()).rposition(|w| w == START) {
        Some(at) if bytes.ends_with(b"}}\n\n") => (&bytes[..at], true),
        _ => (bytes, false),
    }
}

async fn drain(body: &mut Incoming) -> (Vec<u8>, Option<String>) {
    let mut bytes = Vec::new();
    loop {
        match next_data(body).await {
            None => return (bytes, None),
            Some(Ok(data)) => bytes.extend_from_slice(&data),
            Some(Err(err)) => return (bytes, Some(format!("{err:?}"))),
        }
    }
}

async fn fetch(client: &TestClient, req: Request<Full<Bytes>>) -> Got {
    let res = match within("a response head", client.request(req)).await {
        Ok(res) => res,
        Err(err) => {
            return Got {
                status: None,
                headers: HeaderMap::new(),
                bytes: Vec::new(),
                error: Some(format!("no response head: {err:?}")),
            };
        }
    };
    let status = Some(res.status());
    let headers = res.headers().clone();
    let (bytes, error) = drain(&mut res.into_body()).await;
    Got {
        status,
        headers,
        bytes,
        error,
    }
}

/// Reads one request head from a raw upstream connection; returns its target. Bytes after the
/// head stay in `buf`. `None` when the peer closed.
async fn read_request_target(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return head.split(' ').nth(1).map(str::to_owned);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The number after the last `/` of a request target.
fn case_index(target: &str) -> usize {
    target.rsplit('/').next().unwrap().parse().unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// The largest size the kernel lets a TCP buffer grow to (`tcp_rmem` or `tcp_wmem`).
fn tcp_buffer_max(name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .ok()
        .and_then(|v| v.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(32 << 20)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Polls `done` every 10 ms until it holds or `limit` passes; returns whether it held.
async fn settle(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Decodes one or more concatenated gzip members.
fn gunzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// 1. Integrity: 1,000 streams, 64 at a time, frames of 1 B to 64 KiB, SHA-256 end to end
// ------------------------------------------------------------------------------------------

const INTEGRITY_STREAMS: usize = 1000;
const INTEGRITY_PARALLEL: usize = 64;
const MAX_FRAME: usize = 64 * 1024;

/// Integrity stream `i`'s frames as (offset into the pool, length): 1 to 16 frames of
/// log-uniform sizes, and three fixed edge cases (all 1 byte, all 64 KiB, alternating).
fn integrity_frames(i: usize) -> Vec<(usize, usize)> {
    let mut rng = Rng::new(i as u64);
    let sizes: Vec<usize> = match i {
        0 => vec![1; 64],
        1 => vec![MAX_FRAME; 8],
        2 => (0..16)
            .map(|k| if k % 2 == 0 { 1 } else { MAX_FRAME })
            .collect(),
        _ => {
            let n = 1 + rng.below(16);
            (0..n).map(|_| rng.size(MAX_FRAME)).collect()
        }
    };
    sizes
        .into_iter()
        .map(|len| (rng.below(POOL_LEN - len + 1), len))
        .collect()
}

/// Reads integrity stream `i` and checks its SHA-256 and length against what the upstream
/// said it sent.
async fn check_integrity_stream(
    i: usize,
    client: TestClient,
    req: Request<Full<Bytes>>,
) -> Result<usize, String> {
    let res = within("an integrity stream's head", client.request(req))
        .await
        .map_err(|e| format!("stream {i}: request failed: {e}"))?;
    if res.status() != StatusCode::OK {
        return Err(format!("stream {i}: status {}", res.status()));
    }
    let header = |name: &str| res.headers()[name].to_str().unwrap().to_owned();
    let sent_sha = header("x-body-sha256");
    let sent_len: usize = header("x-body-len").parse().unwrap();
    let spec_len: usize = integrity_frames(i).iter().map(|f| f.1).sum();
    if sent_len != spec_len {
        return Err(format!(
            "stream {i}: upstream sent {sent_len} of {spec_len}"
        ));
    }
    if i % 2 == 1
        && res.headers().get(CONTENT_LENGTH).map(|v| v.as_bytes())
            != Some(sent_len.to_string().as_bytes())
    {
        return Err(format!(
            "stream {i}: content-length lost: {:?}",
            res.headers()
        ));
    }
    let mut body = res.into_body();
    let mut sha = Sha256::new();
    let mut len = 0;
    while let Some(frame) = next_data(&mut body).await {
        let data = frame.map_err(|e| format!("stream {i}: cut after {len} bytes: {e:?}"))?;
        sha.update(&data);
        len += data.len();
    }
    let got: [u8; 32] = sha.finalize().into();
    if len != sent_len || hex(&got) != sent_sha {
        return Err(format!(
            "stream {i}: received {len} bytes with SHA-256 {}, upstream sent {sent_len} with {sent_sha}",
            hex(&got)
        ));
    }
    Ok(len)
}

#[test]
fn a_thousand_streams_arrive_intact_sha256_end_to_end() {
    shared(async {
        let upstream = RecordingUpstream::start(|seen: Seen| async move {
            let i = case_index(seen.uri.path());
            let frames: Vec<Bytes> = integrity_frames(i)
                .into_iter()
                .map(|(offset, len)| pool().slice(offset..offset + len))
                .collect();
            // The upstream knows what it sends: it hashes the very frames it queues.
            let mut sha = Sha256::new();
            let mut len = 0;
            for f in &frames {
                sha.update(f);
                len += f.len();
            }
            let digest: [u8; 32] = sha.finalize().into();
            let (tx, body) = ChannelBody::channel(frames.len());
            for f in frames {
                tx.try_send(Ok(f)).unwrap();
            }
            drop(tx);
            let mut res = Response::new(MockBody::Stream(body));
            let h = res.headers_mut();
            h.insert("content-type", "application/octet-stream".parse().unwrap());
            h.insert("x-body-sha256", hex(&digest).parse().unwrap());
            h.insert("x-body-len", len.into());
            if i % 2 == 1 {
                // Odd streams are length-delimited, even ones chunked.
                h.insert(CONTENT_LENGTH, len.into());
            }
            res
        })
        .await;
        let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
        let (h1, h2) = (client(), h2_client());
        let permits = Arc::new(Semaphore::new(INTEGRITY_PARALLEL));
        let mut streams = tokio::task::JoinSet::new();
        let started = Instant::now();
        for i in 0..INTEGRITY_STREAMS {
            let permit = permits.clone().acquire_owned().await.unwrap();
            // One stream in four over HTTP/2 (64 streams multiplexed on one connection).
            let client = if i % 4 == 3 { h2.clone() } else { h1.clone() };
            let req = get(&gw, &format!("/integrity/{i}"));
            streams.spawn(async move {
                let _permit = permit;
                check_integrity_stream(i, client, req).await
            });
        }
        let mut failures = Vec::new();
        let mut bytes = 0;
        while let Some(joined) = streams.join_next().await {
            match joined.unwrap() {
                Ok(len) => bytes += len,
                Err(failure) => failures.push(failure),
            }
        }
        eprintln!(
            "integrity: {INTEGRITY_STREAMS} streams, {bytes} bytes in {:?}",
            started.elapsed()
        );
        assert!(
            failures.is_empty(),
            "{} corrupted streams: {failures:#?}",
            failures.len()
        );
        assert_eq!(upstream.count(), INTEGRITY_STREAMS);
    });
}

// ------------------------------------------------------------------------------------------
// 2. An upstream that resets or closes at a random offset: always a truncated stream
// ------------------------------------------------------------------------------------------

const CUT_CASES: usize = 100;

/// Cut case `i`: what the upstream writes before it resets (or closes), and the whole body it
/// was framing. Chunked or `Content-Length` framing, RST or FIN, HTTP/1.1 or HTTP/2 client:
/// all eight combinations, each about twelve times, at random offsets.
struct CutCase {
    chunked: bool,
    reset: bool,
    h2: bool,
    body: Vec<u8>,
    /// Response head and as much of the encoded body as is sent.
    wire: Vec<u8>,
    /// How many bytes of the encoded body are sent, of how many.
    cut: usize,
    encoded_len: usize,
}

fn cut_case(i: usize) -> CutCase {
    let mut rng = Rng::new(1_000_000 + i as u64);
    let (chunked, reset, h2) = (i % 2 == 0, (i / 2) % 2 == 0, (i / 4) % 2 == 1);
    let frames: Vec<&[u8]> = (0..1 + rng.below(12))
        .map(|_| {
            let len = rng.size(16 * 1024);
            let offset = rng.below(POOL_LEN - len + 1);
            &pool()[offset..offset + len]
        })
        .collect();
    let body = frames.concat();
    let (head, encoded) = if chunked {
        let mut encoded = Vec::new();
        for f in &frames {
            encoded.extend_from_slice(format!("{:x}\r\n", f.len()).as_bytes());
            encoded.extend_from_slice(f);
            encoded.extend_from_slice(b"\r\n");
        }
        // The last chunk (`0\r\n\r\n`) is never sent.
        (
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_owned(),
            encoded,
        )
    } else {
        (
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                body.len()
            ),
            body.clone(),
        )
    };
    // Anywhere from right after the head to the end of the data (chunked: all of it, only
    // the last chunk missing; length-delimited: at least one byte short).
    let cut = if chunked {
        rng.below(encoded.len() + 1)
    } else {
        rng.below(body.len())
    };
    let mut wire = head.into_bytes();
    wire.extend_from_slice(&encoded[..cut]);
    CutCase {
        chunked,
        reset,
        h2,
        body,
        wire,
        cut,
        encoded_len: encoded.len(),
    }
}

type Gates = Arc<Mutex<HashMap<usize, oneshot::Receiver<()>>>>;

/// A raw upstream that writes cut case `i`'s head and partial body, waits until the client has
/// the response head (its gate opens), then resets or closes the connection.
async fn cutting_upstream(gates: Gates) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let gates = gates.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some(target) = read_request_target(&mut s, &mut buf).await else {
                    return;
                };
                let i = case_index(&target);
                let case = cut_case(i);
                let gate = gates.lock().unwrap().remove(&i);
                if s.write_all(&case.wire).await.is_err() {
                    return;
                }
                let _ = s.flush().await;
                if let Some(gate) = gate {
                    let _ = tokio::time::timeout(WAIT, gate).await;
                }
                if case.reset {
                    // Zero linger: the close sends an RST.
                    s.set_zero_linger().unwrap();
                } else {
                    let _ = s.shutdown().await;
                }
                drop(s);
            });
        }
    });
    addr
}

#[test]
fn an_upstream_cut_at_a_random_offset_always_truncates_the_client_stream() {
    shared(async {
        let gates: Gates = Arc::default();
        let addr = cutting_upstream(gates.clone()).await;
        let gw = start_gateway(&format!("http://{addr}/v1"), ForwardBuilder::default()).await;
        let (h1, h2) = (client(), h2_client());
        let tasks_before = alive_tasks();
        let outcomes: Vec<Result<(), String>> = futures_util::stream::iter(0..CUT_CASES)
            .map(|i| {
                let case = cut_case(i);
                let client = if case.h2 { h2.clone() } else { h1.clone() };
                let (open_gate, gate) = oneshot::channel();
                gates.lock().unwrap().insert(i, gate);
                let req = get(&gw, &format!("/cut/{i}"));
                async move {
                    let what = format!(
                        "case {i} ({}, {}, {} client, cut after {} of {} encoded body bytes)",
                        if case.chunked {
                            "chunked"
                        } else {
                            "content-length"
                        },
                        if case.reset { "RST" } else { "FIN" },
                        if case.h2 { "HTTP/2" } else { "HTTP/1.1" },
                        case.cut,
                        case.encoded_len,
                    );
                    let res = within("a response head", client.request(req))
                        .await
                        .map_err(|e| format!("{what}: {e}"))?;
                    if res.status() != StatusCode::OK {
                        return Err(format!("{what}: status {}", res.status()));
                    }
                    // The client has the head: now the upstream may cut.
                    let _ = open_gate.send(());
                    let (bytes, error) = drain(&mut res.into_body()).await;
                    if error.is_none() {
                        return Err(format!(
                            "{what}: a clean end after {} of {} bytes",
                            bytes.len(),
                            case.body.len()
                        ));
                    }
                    // A cut event stream ends with the gateway's error event.
                    let (bytes, event) = without_error_event(&bytes);
                    if !case.body.starts_with(bytes) {
                        return Err(format!("{what}: the bytes before the cut were corrupted"));
                    }
                    // Over HTTP/2 the stream's reset may overtake the event (the client then
                    // sees the reset alone); over HTTP/1.1 the event always arrives.
                    let missing_over_h2 = case.h2 && !event;
                    if event != case.chunked && !missing_over_h2 {
                        return Err(format!(
                            "{what}: an error event {} (the stream is {})",
                            if event { "added" } else { "missing" },
                            if case.chunked {
                                "an event stream"
                            } else {
                                "a download"
                            },
                        ));
                    }
                    Ok(())
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let failures: Vec<String> = outcomes.into_iter().filter_map(Result::err).collect();
        assert!(failures.is_empty(), "{failures:#?}");
        // No task outlives its cut stream (the clients' pools and the gateway's pool timer
        // may keep one).
        drop((h1, h2));
        let settled = settle(Duration::from_secs(5), || alive_tasks() <= tasks_before + 1).await;
        eprintln!(
            "cuts: {CUT_CASES} cases; tasks {tasks_before} before, {} after",
            alive_tasks()
        );
        assert!(
            settled,
            "tasks: {tasks_before} before the cuts, {} after",
            alive_tasks()
        );
    });
}

// ------------------------------------------------------------------------------------------
// 3. A client that disconnects: the upstream is released within 1 s, nothing leaks
// ------------------------------------------------------------------------------------------

const DISCONNECT_CASES: usize = 100;

#[derive(Debug)]
enum UpstreamEvent {
    Arrived(usize),
    Released(usize, Instant),
}

/// Reports when an upstream handler (or its body's producer) is dropped.
struct ReleaseGuard(usize, mpsc::UnboundedSender<UpstreamEvent>);

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        let _ = self.1.send(UpstreamEvent::Released(self.0, Instant::now()));
    }
}

/// A hyper upstream that counts its open connections. `/hold/{i}` never answers;
/// `/stream/{i}` answers at once and streams a frame every 5 ms until its body is dropped;
/// anything else gets a small body.
async fn disconnect_upstream(
    events: mpsc::UnboundedSender<UpstreamEvent>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let counter = counter.clone();
            let events = events.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let events = events.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        if path.contains("/hold/") {
                            let i = case_index(&path);
                            let _guard = ReleaseGuard(i, events.clone());
                            let _ = events.send(UpstreamEvent::Arrived(i));
                            return std::future::pending::<
                                Result<Response<MockBody>, std::convert::Infallible>,
                            >()
                            .await;
                        }
                        if path.contains("/stream/") {
                            let i = case_index(&path);
                            let guard = ReleaseGuard(i, events.clone());
                            let (tx, body) = ChannelBody::channel(2);
                            let frame = Bytes::from_static(
                                b"data: {\"choices\":[{\"delta\":{\"content\":\"tok \"}}]}\n\n",
                            );
                            tx.try_send(Ok(frame.clone())).unwrap();
                            tokio::spawn(async move {
                                let _guard = guard;
                                loop {
                                    tokio::select! {
                                        () = tx.closed() => break,
                                        () = tokio::time::sleep(Duration::from_millis(5)) => {
                                            let _ = tx.try_send(Ok(frame.clone()));
                                        }
                                    }
                                }
                            });
                            let _ = events.send(UpstreamEvent::Arrived(i));
                            return Ok(Response::new(MockBody::Stream(body)));
                        }
                        Ok(Response::new(MockBody::Full(Some(Bytes::from_static(
                            b"ok",
                        )))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

fn raw_get(path: &str) -> String {
    format!(
        "GET /proxy-api/{ACCOUNT}/{ENDPOINT}{path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {GW_KEY}\r\n\r\n"
    )
}

async fn next_event(
    events: &mut mpsc::UnboundedReceiver<UpstreamEvent>,
    what: &str,
    want: impl Fn(&UpstreamEvent) -> bool,
) -> UpstreamEvent {
    within(what, async {
        loop {
            let event = events.recv().await.expect("the upstream is running");
            if want(&event) {
                return event;
            }
        }
    })
    .await
}

/// Disconnect case `i`: even cases leave before the first byte of the response, odd ones
/// mid-stream; in each half, every other one resets (RST) instead of closing (FIN).
async fn disconnect_once(
    i: usize,
    gw: SocketAddr,
    events: &mut mpsc::UnboundedReceiver<UpstreamEvent>,
    open: &AtomicUsize,
) -> Duration {
    let before_first_byte = i % 2 == 0;
    let reset = (i / 2) % 2 == 0;
    let open_before = open.load(Ordering::SeqCst);
    let mut s = TcpStream::connect(gw).await.unwrap();
    let path = if before_first_byte {
        format!("/hold/{i}")
    } else {
        format!("/stream/{i}")
    };
    s.write_all(raw_get(&path).as_bytes()).await.unwrap();
    next_event(
        events,
        "the request to reach the upstream",
        |e| matches!(e, UpstreamEvent::Arrived(j) if *j == i),
    )
    .await;
    if !before_first_byte {
        // The head and the start of the body.
        within("the start of the stream", async {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    if buf.len() > end + 4 {
                        assert!(buf.starts_with(b"HTTP/1.1 200"), "case {i}");
                        break;
                    }
                }
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "case {i}: the gateway closed first");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
    }
    if reset {
        s.set_zero_linger().unwrap();
    }
    let left = Instant::now();
    drop(s);
    let UpstreamEvent::Released(_, released) = next_event(
        events,
        "the upstream to be released",
        |e| matches!(e, UpstreamEvent::Released(j, _) if *j == i),
    )
    .await
    else {
        unreachable!()
    };
    let latency = released.saturating_duration_since(left);
    assert!(
        latency < Duration::from_secs(1),
        "case {i}: the upstream was released {latency:?} after the client left"
    );
    // The upstream's connection for this request closes too (none is returned to the pool).
    let closed = settle(
        Duration::from_secs(1).saturating_sub(left.elapsed()),
        || open.load(Ordering::SeqCst) <= open_before,
    )
    .await;
    assert!(
        closed,
        "case {i}: the upstream still has {} connections open, {open_before} before",
        open.load(Ordering::SeqCst)
    );
    latency
}

#[test]
fn a_client_that_disconnects_releases_the_upstream_and_leaks_nothing() {
    alone(async {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let (addr, open) = disconnect_upstream(events_tx).await;
        let gw = start_gateway(&format!("http://{addr}/v1"), ForwardBuilder::default()).await;
        // Warm up every path once (lazy statics, the pool's timer), then take the baseline.
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(
            raw_get("/ok")
                .replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        within("the warm-up answer", s.read_to_end(&mut answer))
            .await
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        drop(s);
        for i in [DISCONNECT_CASES, DISCONNECT_CASES + 1] {
            disconnect_once(i, gw.addr, &mut events, &open).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (fds, tasks, conns) = (open_fds(), alive_tasks(), open.load(Ordering::SeqCst));

        let mut worst = [Duration::ZERO; 2];
        for i in 0..DISCONNECT_CASES {
            let latency = disconnect_once(i, gw.addr, &mut events, &open).await;
            worst[i % 2] = worst[i % 2].max(latency);
        }
        let settled = settle(Duration::from_secs(5), || {
            open_fds() <= fds && alive_tasks() <= tasks && open.load(Ordering::SeqCst) <= conns
        })
        .await;
        eprintln!(
            "disconnect: worst release latency {:?} before the first byte, {:?} mid-stream; \
             fds {fds} -> {}, tasks {tasks} -> {}, upstream connections {conns} -> {}",
            worst[0],
            worst[1],
            open_fds(),
            alive_tasks(),
            open.load(Ordering::SeqCst)
        );
        assert!(
            settled,
            "leak after {DISCONNECT_CASES} disconnects: fds {fds} -> {}, tasks {tasks} -> {}, \
             upstream connections {conns} -> {}",
            open_fds(),
            alive_tasks(),
            open.load(Ordering::SeqCst)
        );

        // An HTTP/2 client leaves by resetting its stream while its connection stays open.
        let h2 = h2_client();
        for k in 0..20 {
            let i = 2 * DISCONNECT_CASES + k;
            let left = if k % 2 == 0 {
                let request = tokio::spawn(h2.request(get(&gw, &format!("/hold/{i}"))));
                next_event(
                    &mut events,
                    "the request to reach the upstream",
                    |e| matches!(e, UpstreamEvent::Arrived(j) if *j == i),
                )
                .await;
                request.abort();
                let left = Instant::now();
                let _ = request.await;
                left
            } else {
                let res = within(
                    "an HTTP/2 head",
                    h2.request(get(&gw, &format!("/stream/{i}"))),
                )
                .await
                .unwrap();
                let mut body = res.into_body();
                next_data(&mut body).await.unwrap().unwrap();
                let left = Instant::now();
                drop(body);
                left
            };
            let UpstreamEvent::Released(_, released) = next_event(
                &mut events,
                "the upstream to be released",
                |e| matches!(e, UpstreamEvent::Released(j, _) if *j == i),
            )
            .await
            else {
                unreachable!()
            };
            let latency = released.saturating_duration_since(left);
            assert!(
                latency < Duration::from_secs(1),
                "HTTP/2 case {k}: the upstream was released {latency:?} after the stream reset"
            );
        }
        drop(h2);
        let settled = settle(Duration::from_secs(5), || {
            open_fds() <= fds && alive_tasks() <= tasks && open.load(Ordering::SeqCst) <= conns
        })
        .await;
        assert!(
            settled,
            "leak after HTTP/2 stream resets: fds {fds} -> {}, tasks {tasks} -> {}, \
             upstream connections {conns} -> {}",
            open_fds(),
            alive_tasks(),
            open.load(Ordering::SeqCst)
        );
    });
}

// ------------------------------------------------------------------------------------------
// 4. A slow reader of 64 MiB: backpressure keeps the gateway's memory bounded
// ------------------------------------------------------------------------------------------

const BIG: usize = 64 * 1024 * 1024;
/// The big body repeats the pool with this period (not a multiple of the frame size).
const PERIOD: usize = 1024 * 1024 - 3;
const BIG_FRAME: usize = 64 * 1024;

/// Whether `chunk`, found at `pos` in a big body, is what the upstream sent there.
fn big_body_matches(pos: usize, chunk: &[u8]) -> bool {
    let (mut offset, mut rest) = (pos % PERIOD, chunk);
    while !rest.is_empty() {
        let n = rest.len().min(PERIOD - offset);
        if rest[..n] != pool()[offset..offset + n] {
            return false;
        }
        rest = &rest[n..];
        offset = 0;
    }
    true
}

#[test]
fn a_slow_reader_of_64_mib_keeps_gateway_memory_bounded() {
    alone(async {
        let produced = Arc::new(AtomicU64::new(0));
        let counter = produced.clone();
        let upstream = RecordingUpstream::start(move |seen: Seen| {
            let counter = counter.clone();
            async move {
                let total = case_index(seen.uri.path());
                let (tx, body) = ChannelBody::channel(2);
                tokio::spawn(async move {
                    let mut pos = 0;
                    while pos < total {
                        // No frame crosses a period: the body repeats exactly.
                        let offset = pos % PERIOD;
                        let len = BIG_FRAME.min(total - pos).min(PERIOD - offset);
                        if tx
                            .send(Ok(pool().slice(offset..offset + len)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        pos += len;
                        counter.store(pos as u64, Ordering::SeqCst);
                    }
                });
                Response::new(MockBody::Stream(body))
            }
        })
        .await;
        // A short idle timeout: a reader that stalls for longer is not a silent upstream.
        let idle = Duration::from_millis(300);
        let gw = start_gateway(
            &upstream.base_url(),
            ForwardBuilder::default().idle_timeout(idle),
        )
        .await;
        // A reader with a small, fixed receive window, like a slow client far away.
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_recv_buffer_size(Some(256 * 1024));
        let client: TestClient = Client::builder(TokioExecutor::new()).build(connector);
        let read_all = |n: usize| {
            let client = client.clone();
            let req = get(&gw, &format!("/big/{n}"));
            async move {
                let got = fetch(&client, req).await;
                assert!(got.error.is_none(), "{:?}", got.error);
                assert_eq!(got.bytes.len(), n);
                assert!(big_body_matches(0, &got.bytes));
            }
        };
        // Warm up buffers and the allocator, then take the baseline.
        read_all(4 * 1024 * 1024).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let baseline = rss_bytes();
        produced.store(0, Ordering::SeqCst);

        let res = within(
            "the big stream's head",
            client.request(get(&gw, &format!("/big/{BIG}"))),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let mut body = res.into_body();
        let (mut received, mut intact) = (0usize, true);
        let mut read_up_to = async |target: usize, body: &mut Incoming| {
            while received < target {
                match next_data(body).await {
                    Some(Ok(data)) => {
                        intact &= big_body_matches(received, &data);
                        received += data.len();
                    }
                    Some(Err(err)) => {
                        panic!("the big stream was cut after {received} bytes: {err:?}")
                    }
                    None => break,
                }
            }
            received
        };
        let mut peak_rss = 0u64;
        let mut peak_in_flight = 0u64;
        let mut sample = |received: usize| {
            let rss = rss_bytes().saturating_sub(baseline);
            let in_flight = produced
                .load(Ordering::SeqCst)
                .saturating_sub(received as u64);
            peak_rss = peak_rss.max(rss);
            peak_in_flight = peak_in_flight.max(in_flight);
            (rss, in_flight)
        };
        // Read 1 MiB, then stall for more than three idle timeouts: an unbounded gateway would
        // swallow the rest of the 64 MiB meanwhile.
        let got = read_up_to(1024 * 1024, &mut body).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (stall_rss, stall_in_flight) = sample(got);
        // Then read slowly: 4 MiB at a time, pausing after each.
        let mut target = got;
        while target < BIG {
            target = (target + 4 * 1024 * 1024).min(BIG);
            let got = read_up_to(target, &mut body).await;
            tokio::time::sleep(Duration::from_millis(40)).await;
            sample(got);
        }
        let end = next_data(&mut body).await;
        assert!(end.is_none(), "the big stream did not end cleanly: {end:?}");
        eprintln!(
            "backpressure: while stalled, RSS +{} KiB and {} KiB in flight; peaks +{} KiB RSS, {} KiB in flight",
            stall_rss / 1024,
            stall_in_flight / 1024,
            peak_rss / 1024,
            peak_in_flight / 1024
        );
        assert_eq!(received, BIG);
        assert!(intact, "the big body arrived corrupted");
        assert!(
            peak_rss < 16 * 1024 * 1024,
            "RSS grew by {} KiB while streaming 64 MiB to a slow reader",
            peak_rss / 1024
        );
        // Bytes in flight sit in the kernel's socket buffers (outside RSS), which on loopback
        // grow up to the TCP maxima: the upstream's send buffer and the gateway's receive
        // buffer on one hop, the gateway's send buffer and the reader's 256 KiB on the other.
        let allowance = tcp_buffer_max("tcp_rmem") + 2 * tcp_buffer_max("tcp_wmem") + (1 << 20);
        assert!(
            peak_in_flight < allowance + 8 * 1024 * 1024,
            "the upstream ran {} KiB ahead of the reader, more than the socket buffers ({} KiB) hold",
            peak_in_flight / 1024,
            allowance / 1024
        );
    });
}

// ------------------------------------------------------------------------------------------
// 5. Idle timeout: silence is cut, a steady trickle runs as long as it likes
// ------------------------------------------------------------------------------------------

const IDLE: Duration = Duration::from_millis(200);

/// An idle scenario: the wait before each event, then whether the upstream ends cleanly or
/// holds the stream open in silence.
struct IdleCase {
    name: &'static str,
    gaps_ms: Vec<u64>,
    then_silent: bool,
}

fn idle_cases() -> Vec<IdleCase> {
    let steady = |n: usize| {
        std::iter::once(0)
            .chain(std::iter::repeat_n(100, n - 1))
            .collect()
    };
    vec![
        IdleCase {
            name: "silent from the start",
            gaps_ms: vec![],
            then_silent: true,
        },
        IdleCase {
            name: "silent after three events",
            gaps_ms: vec![0, 100, 100],
            then_silent: true,
        },
        IdleCase {
            name: "steady for 5.5 idle timeouts, then silent",
            gaps_ms: steady(12),
            then_silent: true,
        },
        IdleCase {
            name: "a gap of 1.5 idle timeouts mid-stream",
            gaps_ms: vec![0, 100, 300, 0, 0],
            then_silent: false,
        },
        IdleCase {
            name: "steady at half the idle timeout for 5.5 idle timeouts",
            gaps_ms: steady(12),
            then_silent: false,
        },
        IdleCase {
            name: "steady at half the idle timeout for 9.5 idle timeouts",
            gaps_ms: steady(20),
            then_silent: false,
        },
    ]
}

fn idle_event(k: usize) -> Bytes {
    Bytes::from(format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"t{k} \"}}}}]}}\n\n"
    ))
}

#[test]
fn silence_past_the_idle_timeout_is_cut_and_a_steady_stream_is_not() {
    alone(async {
        let (released_tx, mut released) = mpsc::unbounded_channel::<(usize, Instant)>();
        let upstream = RecordingUpstream::start(move |seen: Seen| {
            let released_tx = released_tx.clone();
            async move {
                let i = case_index(seen.uri.path());
                let case = &idle_cases()[i];
                let (gaps, then_silent) = (case.gaps_ms.clone(), case.then_silent);
                let (tx, body) = ChannelBody::channel(1);
                tokio::spawn(async move {
                    for (k, gap) in gaps.into_iter().enumerate() {
                        tokio::select! {
                            () = tx.closed() => break,
                            () = tokio::time::sleep(Duration::from_millis(gap)) => {}
                        }
                        if tx.send(Ok(idle_event(k))).await.is_err() {
                            break;
                        }
                    }
                    if then_silent {
                        // Hold the stream open, silent, until the gateway lets go of it.
                        let _ = tokio::time::timeout(WAIT, tx.closed()).await;
                    }
                    if tx.is_closed() {
                        let _ = released_tx.send((i, Instant::now()));
                    }
                });
                let mut res = Response::new(MockBody::Stream(body));
                res.headers_mut()
                    .insert("content-type", "text/event-stream".parse().unwrap());
                res
            }
        })
        .await;
        let gw = start_gateway(
            &upstream.base_url(),
            ForwardBuilder::default().idle_timeout(IDLE),
        )
        .await;
        let client = client();
        let runs = idle_cases().into_iter().enumerate().map(|(i, case)| {
            let client = client.clone();
            let req = get(&gw, &format!("/idle/{i}"));
            async move {
                let started = Instant::now();
                let res = within("an idle case's head", client.request(req))
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::OK, "{}", case.name);
                let mut body = res.into_body();
                let (mut bytes, mut last) = (Vec::new(), Instant::now());
                let error = loop {
                    match next_data(&mut body).await {
                        None => break None,
                        Some(Ok(data)) => {
                            bytes.extend_from_slice(&data);
                            // The gateway's error event comes with the cut, not before it.
                            if !without_error_event(&bytes).1 {
                                last = Instant::now();
                            }
                        }
                        Some(Err(err)) => break Some(err),
                    }
                };
                let bytes = without_error_event(&bytes).0.to_vec();
                (i, case, bytes, error, last, Instant::now(), started)
            }
        });
        let results = futures_util::future::join_all(runs).await;
        let mut cut_at = HashMap::new();
        for (i, case, bytes, error, last, ended, started) in results {
            // The events sent before the first gap longer than the idle timeout.
            let sent = case
                .gaps_ms
                .iter()
                .position(|&g| Duration::from_millis(g) > IDLE)
                .unwrap_or(case.gaps_ms.len());
            let expected: Vec<u8> = (0..sent).flat_map(|k| idle_event(k).to_vec()).collect();
            assert_eq!(
                String::from_utf8_lossy(&bytes),
                String::from_utf8_lossy(&expected),
                "{}: the events before the cut",
                case.name
            );
            let should_cut = case.then_silent || sent < case.gaps_ms.len();
            if should_cut {
                assert!(
                    error.is_some(),
                    "{}: a silent stream ended cleanly",
                    case.name
                );
                let silence = ended - last;
                assert!(
                    silence >= IDLE * 3 / 4 && silence < IDLE + Duration::from_secs(1),
                    "{}: cut after {silence:?} of silence, idle timeout {IDLE:?}",
                    case.name
                );
                cut_at.insert(i, ended);
            } else {
                assert!(error.is_none(), "{}: cut: {error:?}", case.name);
                assert!(
                    ended - started >= IDLE * 4,
                    "{}: ran only {:?}",
                    case.name,
                    ended - started
                );
            }
        }
        // Every cut upstream saw its stream dropped within 1 s.
        within("every cut upstream to be released", async {
            let mut pending = cut_at.clone();
            while !pending.is_empty() {
                let (i, at) = released.recv().await.unwrap();
                if let Some(cut) = pending.remove(&i) {
                    assert!(
                        at.saturating_duration_since(cut) < Duration::from_secs(1),
                        "case {i}: released {:?} after the cut",
                        at.saturating_duration_since(cut)
                    );
                }
            }
        })
        .await;
    });
}

// ------------------------------------------------------------------------------------------
// 6. Encoding: an upstream that gzips anyway or lies about Content-Length
// ------------------------------------------------------------------------------------------

fn completion_json() -> Vec<u8> {
    let content = "Hello from an upstream that compresses anyway. ".repeat(40);
    serde_json::json!({
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    })
    .to_string()
    .into_bytes()
}

const SMUGGLED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: yes\r\n\r\nSMUGGLED";

/// What a raw upstream does after writing its scripted response.
enum Then {
    /// Serve the next request on the same connection.
    KeepAlive,
    /// Close (FIN).
    Close,
    /// Stay open and silent until the gateway closes.
    Hold,
}

/// The scripted raw responses, by name: (head and body bytes, what follows).
fn encoding_script(name: &str) -> (Vec<u8>, Then) {
    let json = completion_json();
    let gz = gzip(&json);
    let head = |extra: &str| {
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}\r\n").into_bytes()
    };
    let with = |mut head: Vec<u8>, body: &[u8]| {
        head.extend_from_slice(body);
        head
    };
    match name {
        "gzip-length" => (
            with(
                head(&format!(
                    "Content-Encoding: gzip\r\nContent-Length: {}\r\n",
                    gz.len()
                )),
                &gz,
            ),
            Then::KeepAlive,
        ),
        "gzip-chunked" => {
            let mut body = Vec::new();
            for piece in gz.chunks(gz.len() / 3 + 1) {
                body.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                body.extend_from_slice(piece);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            (
                with(
                    head("Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"),
                    &body,
                ),
                Then::KeepAlive,
            )
        }
        "gzip-says-more-then-closes" => (
            with(
                head(&format!(
                    "Content-Encoding: gzip\r\nContent-Length: {}\r\n",
                    gz.len() + 50
                )),
                &gz,
            ),
            Then::Close,
        ),
        "says-more-then-closes" => (
            with(
                head(&format!("Content-Length: {}\r\n", json.len() + 1)),
                &json,
            ),
            Then::Close,
        ),
        "says-more-then-holds" => (
            with(
                head(&format!("Content-Length: {}\r\n", json.len() * 2)),
                &json,
            ),
            Then::Hold,
        ),
        "says-less-then-closes" => (
            with(
                head(&format!("Content-Length: {}\r\n", json.len() / 2)),
                &json,
            ),
            Then::Close,
        ),
        "says-less-smuggles-a-response" => (
            with(with(head("Content-Length: 10\r\n"), &json[..10]), SMUGGLED),
            Then::KeepAlive,
        ),
        "two-different-lengths" => (
            with(
                head(&format!(
                    "Content-Length: 10\r\nContent-Length: {}\r\n",
                    json.len()
                )),
                &json,
            ),
            Then::KeepAlive,
        ),
        "length-and-chunked" => {
            let mut body = format!("{:x}\r\n", json.len()).into_bytes();
            body.extend_from_slice(&json);
            body.extend_from_slice(b"\r\n0\r\n\r\n");
            (
                with(
                    head("Content-Length: 10\r\nTransfer-Encoding: chunked\r\n"),
                    &body,
                ),
                Then::Close,
            )
        }
        "genuine" => (
            with(head("Content-Length: 7\r\n"), b"genuine"),
            Then::KeepAlive,
        ),
        other => panic!("no script {other}"),
    }
}

/// A raw upstream that answers `…/{name}` with [`encoding_script`]`(name)`.
async fn scripted_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(target) = read_request_target(&mut s, &mut buf).await {
                    let name = target.rsplit('/').next().unwrap().to_owned();
                    let (wire, then) = encoding_script(&name);
                    if s.write_all(&wire).await.is_err() {
                        return;
                    }
                    match then {
                        Then::KeepAlive => continue,
                        Then::Close => {
                            let _ = s.shutdown().await;
                            return;
                        }
                        Then::Hold => {
                            let mut sink = [0u8; 1024];
                            let _ = tokio::time::timeout(WAIT, async {
                                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                            })
                            .await;
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The client's body agrees with its headers: a clean body has exactly `Content-Length`
/// bytes, and a gzip body decodes.
fn assert_consistent(what: &str, got: &Got) {
    if got.error.is_some() {
        return;
    }
    if let Some(len) = got.header("content-length") {
        assert_eq!(
            len.parse::<usize>().ok(),
            Some(got.bytes.len()),
            "{what}: a clean body of {} bytes under Content-Length: {len}",
            got.bytes.len()
        );
    }
    if got.status == Some(StatusCode::OK) && got.header("content-encoding") == Some("gzip") {
        gunzip(&got.bytes)
            .unwrap_or_else(|e| panic!("{what}: a gzip body that does not decode: {e}"));
    }
}

/// A 502 the gateway made itself: the upstream's answer was refused whole.
fn is_gateway_error(got: &Got) -> bool {
    got.status == Some(StatusCode::BAD_GATEWAY) && got.headers.contains_key("x-gateway-error")
}

#[test]
fn an_upstream_that_gzips_anyway_keeps_its_content_encoding_and_bytes() {
    shared(async {
        let addr = scripted_upstream().await;
        let gw = start_gateway(&format!("http://{addr}/v1"), ForwardBuilder::default()).await;
        let json = completion_json();
        for (version, client) in [("HTTP/1.1", client()), ("HTTP/2", h2_client())] {
            for name in ["gzip-length", "gzip-chunked"] {
                let what = format!("{name} over {version}");
                let got = fetch(&client, get(&gw, &format!("/enc/{name}"))).await;
                assert_eq!(got.status, Some(StatusCode::OK), "{what}");
                assert!(got.error.is_none(), "{what}: {:?}", got.error);
                assert_eq!(got.header("content-encoding"), Some("gzip"), "{what}");
                assert_eq!(
                    got.header("content-type"),
                    Some("application/json"),
                    "{what}"
                );
                assert_eq!(got.bytes, gzip(&json), "{what}: the encoded bytes changed");
                assert_eq!(gunzip(&got.bytes).unwrap(), json, "{what}");
                if name == "gzip-length" {
                    let len = got.bytes.len().to_string();
                    assert_eq!(got.header("content-length"), Some(len.as_str()), "{what}");
                }
                assert_consistent(&what, &got);
            }
        }
    });
}

#[test]
fn per_event_gzip_members_stream_through_one_by_one() {
    shared(async {
        let (feed_tx, mut feeds) = mpsc::channel::<mpsc::Sender<Result<Bytes, std::io::Error>>>(1);
        let upstream = RecordingUpstream::start(move |_seen| {
            let feed_tx = feed_tx.clone();
            async move {
                let (events, body) = ChannelBody::channel(1);
                feed_tx.send(events).await.unwrap();
                let mut res = Response::new(MockBody::Stream(body));
                let h = res.headers_mut();
                h.insert("content-type", "text/event-stream".parse().unwrap());
                h.insert(CONTENT_ENCODING, "gzip".parse().unwrap());
                res
            }
        })
        .await;
        let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
        for (version, client) in [("HTTP/1.1", client()), ("HTTP/2", h2_client())] {
            let res = within(
                "the stream's head",
                client.request(get(&gw, "/chat/completions")),
            )
            .await
            .unwrap();
            assert_eq!(upstream.last().headers["accept-encoding"], "identity");
            assert_eq!(res.status(), StatusCode::OK, "{version}");
            assert_eq!(res.headers()[CONTENT_ENCODING], "gzip", "{version}");
            assert_eq!(
                res.headers()["content-type"],
                "text/event-stream",
                "{version}"
            );
            assert!(res.headers().get(CONTENT_LENGTH).is_none(), "{version}");
            let events = within("the upstream's sender", feeds.recv()).await.unwrap();
            let mut body = res.into_body();
            let (mut all, mut plain) = (Vec::new(), Vec::new());
            for k in 0..20 {
                let event = format!(
                    "data: {{\"choices\":[{{\"delta\":{{\"content\":\"token{k} \"}}}}]}}\n\n"
                );
                let member = gzip(event.as_bytes());
                events.send(Ok(Bytes::from(member.clone()))).await.unwrap();
                // Only this member exists: all of it must reach the client before the next.
                let mut got = Vec::new();
                while got.len() < member.len() {
                    let data = next_data(&mut body).await.expect("a member").unwrap();
                    got.extend_from_slice(&data);
                }
                assert_eq!(got, member, "{version}: member {k}");
                assert_eq!(
                    gunzip(&got).unwrap(),
                    event.as_bytes(),
                    "{version}: member {k}"
                );
                all.extend_from_slice(&got);
                plain.extend_from_slice(event.as_bytes());
            }
            drop(events);
            // (An HTTP/2 end of stream may come as an empty DATA frame.)
            let (rest, error) = drain(&mut body).await;
            assert!(
                rest.is_empty() && error.is_none(),
                "{version}: not a clean end: {} more bytes, {error:?}",
                rest.len()
            );
            assert_eq!(
                gunzip(&all).unwrap(),
                plain,
                "{version}: the members together"
            );
        }
    });
}

#[test]
fn a_content_length_lie_never_yields_a_clean_body_of_the_wrong_length() {
    shared(async {
        let addr = scripted_upstream().await;
        // A short idle timeout cuts the upstream that promises more and then holds.
        let gw = start_gateway(
            &format!("http://{addr}/v1"),
            ForwardBuilder::default().idle_timeout(Duration::from_millis(300)),
        )
        .await;
        let json = completion_json();
        for (version, client) in [("HTTP/1.1", client()), ("HTTP/2", h2_client())] {
            let fetch_case = async |name: &str| {
                let got = fetch(&client, get(&gw, &format!("/enc/{name}"))).await;
                let what = format!("{name} over {version}");
                assert_consistent(&what, &got);
                (what, got)
            };

            // Promises more than it sends, then closes or falls silent: truncated, never clean.
            for name in [
                "says-more-then-closes",
                "gzip-says-more-then-closes",
                "says-more-then-holds",
            ] {
                let (what, got) = fetch_case(name).await;
                assert!(
                    got.error.is_some() || is_gateway_error(&got),
                    "{what}: a clean end of a short body: {} bytes, headers {:?}",
                    got.bytes.len(),
                    got.headers
                );
                if got.status == Some(StatusCode::OK) {
                    assert!(
                        json.starts_with(&got.bytes) || gzip(&json).starts_with(&got.bytes),
                        "{what}"
                    );
                }
            }

            // Sends more than it promised: exactly the promised bytes (or an error).
            let (what, got) = fetch_case("says-less-then-closes").await;
            if got.error.is_none() {
                assert_eq!(got.status, Some(StatusCode::OK), "{what}");
                assert_eq!(got.bytes, json[..json.len() / 2], "{what}");
            }

            // Sends more than it promised, and the surplus is a whole second response: that
            // response must never reach anyone.
            let (what, got) = fetch_case("says-less-smuggles-a-response").await;
            if got.error.is_none() {
                assert_eq!(got.status, Some(StatusCode::OK), "{what}");
                assert_eq!(got.bytes, json[..10], "{what}");
            }
            for k in 0..4 {
                let got = fetch(&client, get(&gw, "/enc/genuine")).await;
                assert!(
                    got.headers.get("x-smuggled").is_none() && got.bytes != b"SMUGGLED",
                    "{what}: request {k} after it got the smuggled response"
                );
                assert_eq!(
                    got.status,
                    Some(StatusCode::OK),
                    "{what}: request {k} after it"
                );
                assert_eq!(got.bytes, b"genuine", "{what}: request {k} after it");
            }

            // Two different Content-Lengths: refused, or consistent.
            let (what, got) = fetch_case("two-different-lengths").await;
            assert!(
                is_gateway_error(&got) || got.error.is_some(),
                "{what}: an ambiguous length was passed on: {:?}",
                got.headers
            );

            // Content-Length beside Transfer-Encoding: chunked. The chunked framing wins
            // (RFC 9112 §6.3): a clean body is all of it, never cut to the stale length.
            let (what, got) = fetch_case("length-and-chunked").await;
            if got.error.is_none() && got.status == Some(StatusCode::OK) {
                assert_eq!(
                    got.bytes.len(),
                    json.len(),
                    "{what}: the chunked body was cut to the stale Content-Length ({:?})",
                    got.header("content-length")
                );
            }
        }
    });
}
