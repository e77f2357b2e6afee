//! Helpers the benches and the examples `nginx_compare` and `soak` share: pinning a thread to
//! a core, raising the limit on open files, the canned SSE token events and bodies an upstream
//! serves, the one-account gateway setup, and the HTTP clients' requests and readers.
//!
//! Each user includes this file with `#[path]` and uses only some of it.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tower_gateway::access::{Grants, Subject};
use tower_gateway::auth::{HashedKeyStore, Principal};
use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};

/// The `i`th token event: an OpenAI `chat.completion.chunk`, 157 bytes.
pub(crate) fn sse_event(i: usize) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"llama-3.1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i:05}\"}},\"finish_reason\":null}}]}}\n\n"
    )
}

pub(crate) fn leak(data: Vec<u8>) -> Bytes {
    Bytes::from_static(Box::leak(data.into_boxed_slice()))
}

/// Pins the calling thread (and the threads it starts from now on) to `core`.
#[allow(unsafe_code)]
pub(crate) fn pin_to(core: usize) {
    // SAFETY: `set` is a zeroed, then filled, `cpu_set_t` that outlives the call.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(pinned, 0, "could not pin a thread to core {core}");
}

/// Raises the soft limit on open files to the hard limit (children inherit it); returns the
/// soft limit.
#[allow(unsafe_code)]
pub(crate) fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    let wanted = limit.rlim_max.min(1 << 20);
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid `rlimit`; the call only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return wanted;
        }
    }
    limit.rlim_cur
}

// ---------------------------------------------------------------------------------------------
// The gateway under test: one key, one account with one endpoint that injects a credential.

/// The gateway key the benches' clients send.
pub(crate) const GATEWAY_KEY: &str = "gw-bench-0123456789abcdef0123456789abcdef";
/// The upstream credential the gateway (or nginx) injects.
pub(crate) const UPSTREAM_AUTHORIZATION: &str = "Bearer wandb-0123456789abcdef";

/// One account, `coreweave-model`, open to everyone, with one endpoint, `inference`, at
/// `http://{upstream}/v1` that sends `authorization` upstream.
pub(crate) fn bench_registry(upstream: SocketAddr, authorization: HeaderValue) -> Registry {
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, authorization);
    Registry::from_accounts(vec![AccountSpec {
        endpoints: vec![EndpointSpec {
            headers,
            ..EndpointSpec::new("inference", format!("http://{upstream}/v1"))
        }],
        access: Grants {
            users: vec![Subject::Everyone],
            ..Grants::default()
        },
        ..AccountSpec::new("coreweave-model")
    }])
    .unwrap()
}

/// `key`, held by `bench@example.com` of team `research`.
pub(crate) fn bench_keys(key: &str) -> HashedKeyStore {
    HashedKeyStore::new()
        .with_key(
            key,
            Principal::new("bench", "bench@example.com", ["research"]),
        )
        .unwrap()
}

/// Makes an origin-form request URI absolute, pointing at `upstream` (what a bare forwarder
/// needs).
pub(crate) fn absolute_to(
    upstream: SocketAddr,
) -> impl Fn(Request<Incoming>) -> Request<Incoming> + Clone + Send + Sync + 'static {
    let authority: Authority = upstream.to_string().parse().unwrap();
    move |mut req: Request<Incoming>| {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority.clone());
        *req.uri_mut() = Uri::from_parts(parts).expect("origin-form URI made absolute");
        req
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream's side.

/// The end of an SSE stream.
pub(crate) const DONE: &str = "data: [DONE]\n\n";
/// A non-streaming completion, ~400 bytes.
pub(crate) const COMPLETION: &str = r#"{"id":"chatcmpl-bench-0001","object":"chat.completion","created":1741570283,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"message":{"role":"assistant","content":"Streaming shows the first words as soon as they exist, so the reader starts sooner; the trade-off is more, smaller writes."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":42,"completion_tokens":31,"total_tokens":73}}"#;
/// One event per paced stream every `PACE`.
pub(crate) const PACE: Duration = Duration::from_millis(200);
/// No paced stream outlives this, whatever happens.
pub(crate) const STREAM_CAP: Duration = Duration::from_secs(60);

/// A loopback listener with a backlog deep enough for a burst of connects.
pub(crate) fn listen() -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(4096).unwrap()
}

/// Serves every connection `listener` accepts (with `TCP_NODELAY`) with a clone of `svc`, on
/// hyper-util's auto server, in a background task.
pub(crate) fn serve_each<S, B>(listener: TcpListener, svc: S)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let svc = svc.clone();
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// Reads a request body to its end (or its first error) and drops it.
pub(crate) async fn discard(mut body: Incoming) {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
}

/// Token events `0..n` (see [`sse_event`]), each over static memory.
pub(crate) fn sse_events(n: usize) -> Vec<Bytes> {
    (0..n).map(|i| leak(sse_event(i).into_bytes())).collect()
}

/// `len` bytes of `x` in frames of `frame` bytes, all over one static frame.
pub(crate) fn big_frames(len: usize, frame: usize) -> Arc<[Bytes]> {
    vec![leak(vec![b'x'; frame]); len / frame].into()
}

/// How many bytes `frames` carry.
pub(crate) fn frames_len(frames: &[Bytes]) -> usize {
    frames.iter().map(Bytes::len).sum()
}

/// A response body that hands out canned frames, one per poll, each at once. With `exact`
/// its size hint is exact, so hyper sends a `Content-Length`; otherwise it is chunked.
pub(crate) struct Frames {
    frames: Arc<[Bytes]>,
    next: usize,
    exact: bool,
}

impl Frames {
    pub(crate) fn new(frames: Arc<[Bytes]>, exact: bool) -> Self {
        Self {
            frames,
            next: 0,
            exact,
        }
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(frame) = self.frames.get(self.next).cloned() else {
            return Poll::Ready(None);
        };
        self.next += 1;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.frames.len()
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(frames_len(&self.frames[self.next..]) as u64)
        } else {
            SizeHint::default()
        }
    }
}

/// A paced SSE stream: `event` at once, then one every [`PACE`], until the generation in
/// `released` changes (then `[DONE]` and the end) or [`STREAM_CAP`] has passed.
pub(crate) struct Paced(mpsc::Receiver<Bytes>);

impl Paced {
    pub(crate) fn new(event: Bytes, mut released: watch::Receiver<u64>) -> Self {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PACE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let cap = tokio::time::sleep(STREAM_CAP);
            tokio::pin!(cap);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if tx.send(event.clone()).await.is_err() {
                            return;
                        }
                    }
                    _ = released.changed() => break,
                    () = &mut cap => break,
                }
            }
            let _ = tx.send(Bytes::from_static(DONE.as_bytes())).await;
        });
        Self(rx)
    }
}

impl Body for Paced {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

// ---------------------------------------------------------------------------------------------
// The clients' side.

/// What the streaming clients send: an OpenAI chat request.
pub(crate) const REQUEST_BODY: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Explain in two sentences why streaming responses token by token improves perceived latency."}],"stream":true,"temperature":0.7,"max_tokens":512}"#;
/// Paced streams being opened at once.
pub(crate) const OPENING: usize = 256;

pub(crate) type BenchClient = Client<HttpConnector, Full<Bytes>>;

/// hyper-util's pooled legacy client with keep-alive and `TCP_NODELAY`.
pub(crate) fn client() -> BenchClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(http)
}

/// `POST uri` with [`REQUEST_BODY`] and the gateway key.
pub(crate) fn request(uri: &Uri) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::from_static(REQUEST_BODY.as_bytes())));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri.clone();
    let headers = req.headers_mut();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {GATEWAY_KEY}")).unwrap(),
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    req
}

/// Sends [`request`]`(uri)`; returns the body of the 200 response (anything else panics).
pub(crate) async fn send(client: &BenchClient, uri: &Uri) -> Incoming {
    let res = client.request(request(uri)).await.expect("request failed");
    let status = res.status();
    if status != StatusCode::OK {
        let body = res.into_body().collect().await.map(|b| b.to_bytes());
        panic!("{uri}: {status}: {body:?}");
    }
    res.into_body()
}

/// Reads a body to its end; returns how many bytes it carried.
pub(crate) async fn drain(mut body: Incoming) -> usize {
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("response body failed").into_data() {
            n += data.len();
        }
    }
    n
}

/// The next data frame of a body, or `None` at its end.
pub(crate) async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = body.frame().await?.expect("the stream was cut");
        if let Ok(data) = frame.into_data() {
            return Some(data);
        }
    }
}

/// Runs `per_task` fetches of `uri` on each of `tasks` spawned tasks; returns the bytes each
/// task read, summed. With `each`, checks every body's length against it.
pub(crate) async fn fetch_concurrently(
    client: &BenchClient,
    uri: &Uri,
    tasks: usize,
    per_task: usize,
    each: Option<usize>,
) -> usize {
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let client = client.clone();
            let uri = uri.clone();
            tokio::spawn(async move {
                let mut n = 0;
                for _ in 0..per_task {
                    let len = drain(send(&client, &uri).await).await;
                    if let Some(expected) = each {
                        assert_eq!(len, expected, "{uri}: body length");
                    }
                    n += len;
                }
                n
            })
        })
        .collect();
    let mut n = 0;
    for handle in handles {
        n += handle.await.unwrap();
    }
    n
}

/// Sends [`request`]`(uri)` and reads up to the first non-empty data frame; returns the time
/// from sending to that frame, the frame, and the rest of the body (unread, untimed).
pub(crate) async fn time_to_first_event(
    client: &BenchClient,
    uri: &Uri,
) -> (Duration, Bytes, Incoming) {
    let req = request(uri);
    let start = Instant::now();
    let res = client.request(req).await.expect("request failed");
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    loop {
        let frame = body
            .frame()
            .await
            .expect("the stream ended before its event")
            .expect("response body failed");
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            return (start.elapsed(), data, body);
        }
    }
}

/// One client connection to `addr`, one request; returns the body once the head is 200.
/// The connection closes when the body has been read and dropped.
pub(crate) async fn open_stream(addr: SocketAddr, req: Request<Full<Bytes>>) -> Incoming {
    let tcp = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    tcp.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = sender.send_request(req).await.expect("a response head");
    assert_eq!(res.status(), StatusCode::OK, "the stream did not open");
    res.into_body()
}

/// Opens `n` streams to `addr` (at most [`OPENING`] being opened at a time), each with a
/// request of `make_request`, and returns once each has delivered its first event, with the
/// tasks that read each stream to its end. With `deadline`, panics if they have not all
/// opened by then.
pub(crate) async fn open_streams<F>(
    n: usize,
    addr: SocketAddr,
    make_request: F,
    deadline: Option<Duration>,
) -> Vec<tokio::task::JoinHandle<()>>
where
    F: Fn() -> Request<Full<Bytes>> + Clone + Send + 'static,
{
    let (first_tx, mut first_rx) = mpsc::channel::<()>(n.max(1));
    let opening = Arc::new(Semaphore::new(OPENING));
    let streams = (0..n)
        .map(|_| {
            let first_tx = first_tx.clone();
            let opening = opening.clone();
            let make_request = make_request.clone();
            tokio::spawn(async move {
                let permit = opening.acquire_owned().await.unwrap();
                let mut body = open_stream(addr, make_request()).await;
                let first = next_data(&mut body).await.expect("a first event");
                assert!(first.starts_with(b"data: "));
                drop(permit);
                first_tx.send(()).await.unwrap();
                while next_data(&mut body).await.is_some() {}
            })
        })
        .collect();
    drop(first_tx);
    let all_first = async {
        for _ in 0..n {
            first_rx
                .recv()
                .await
                .expect("a stream failed before its first event");
        }
    };
    match deadline {
        None => all_first.await,
        Some(limit) => tokio::time::timeout(limit, all_first)
            .await
            .unwrap_or_else(|_| panic!("the streams did not all open within {limit:?}")),
    }
    streams
}
