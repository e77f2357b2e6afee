//! Request smuggling and limits, over raw TCP sockets against the running stack (issue 5,
//! item 2).
//!
//! Every case is a script run on its own gateway (`max_request_body(1024)`) in front of its own
//! upstream: bytes written to a raw `TcpStream` on 127.0.0.1, the answers expected in order
//! (status line, and for the gateway's own answers the `x-gateway-error` header and JSON
//! body), whether the gateway must then close the connection, and what the upstream may see.
//! Every read is bounded by [`READ`].
//!
//! The upstream counts request heads ([`Upstream::count`], like `RecordingUpstream::count`)
//! and, separately, requests whose body arrived complete ([`Upstream::complete`]). A
//! request refused on its head must not move either. A request whose *body* turns out to be
//! malformed (bad chunk framing, over the limit while streaming) can only be detected after the
//! gateway started streaming it: the head may reach the upstream, but the body is cut, so the
//! upstream never sees a complete request ([`Reach::NeverComplete`]).
//!
//! Every request that reaches the upstream is also checked for unambiguous framing: never both
//! `Content-Length` and `Transfer-Encoding`, a `Content-Length` equal to the bytes received,
//! and never the client's gateway key.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower_gateway::forward::ForwardBuilder;

use support::{ACCOUNT, ENDPOINT, GW_KEY, start_gateway};

/// The request body limit of every gateway in this file.
const LIMIT: u64 = 1024;
/// Bounds every read and write on a client socket.
const READ: Duration = Duration::from_secs(3);
/// How long a request whose body was cut gets to settle at the upstream before it is counted.
const SETTLE: Duration = Duration::from_millis(100);

/// What the upstream answers to every request it gets.
const UPSTREAM_BODY: &[u8] = b"ok";

// ---------------------------------------------------------------------------------------------
// The upstream
// ---------------------------------------------------------------------------------------------

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// The whole body, or why it did not arrive complete.
    body: Result<Bytes, String>,
}

/// A hyper HTTP/1.1 upstream that counts request heads as they arrive and records each request
/// once its body ended, cleanly or not.
struct Upstream {
    addr: SocketAddr,
    heads: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (h, s) = (heads.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (heads, seen) = (h.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        heads.fetch_add(1, Ordering::SeqCst);
                        let seen = seen.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .map_err(|e| e.to_string());
                            seen.lock().unwrap().push(Seen {
                                method: parts.method,
                                uri: parts.uri,
                                version: parts.version,
                                headers: parts.headers,
                                body,
                            });
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                UPSTREAM_BODY,
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, heads, seen }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Request heads received.
    fn count(&self) -> usize {
        self.heads.load(Ordering::SeqCst)
    }

    /// Requests received with their whole body.
    fn complete(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.body.is_ok())
            .count()
    }

    fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The client side: a raw socket and a small HTTP/1 response reader
// ---------------------------------------------------------------------------------------------

/// One response as read off the wire.
#[derive(Debug)]
struct Answer {
    status_line: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Conn {
    case: &'static str,
    stream: TcpStream,
    buf: Vec<u8>,
    /// Everything received, for failure messages.
    transcript: Vec<u8>,
}

impl Conn {
    async fn connect(case: &'static str, addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(READ, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("{case}: connect timed out"))
            .unwrap();
        Self {
            case,
            stream,
            buf: Vec::new(),
            transcript: Vec::new(),
        }
    }

    fn received(&self) -> String {
        let t = String::from_utf8_lossy(&self.transcript);
        t.chars().take(600).collect()
    }

    /// Writes `bytes`. The gateway may answer and close before reading them all (a 431, a 413),
    /// so a failed write is not a failure: the answer is what counts.
    async fn write(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(READ, self.stream.write_all(bytes)).await;
    }

    async fn half_close(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Reads more bytes into the buffer: `false` on end of stream (EOF or reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(READ, self.stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "{}: nothing more from the gateway within {READ:?}; received so far:\n{}",
                self.case,
                self.received()
            ),
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.transcript.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(
                self.fill().await,
                "{}: closed in the middle of a response:\n{}",
                self.case,
                self.received()
            );
        }
    }

    async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await,
                "{}: closed in the middle of a body:\n{}",
                self.case,
                self.received()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// The next response, or `None` if the connection ends before its first byte.
    async fn response(&mut self) -> Option<Answer> {
        while self.buf.is_empty() {
            if !self.fill().await {
                return None;
            }
        }
        let status_line = self.line().await;
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse::<u16>().ok())
            .unwrap_or_else(|| {
                panic!(
                    "{}: not a status line: {status_line:?}\n{}",
                    self.case,
                    self.received()
                )
            });
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("{}: bad header line {line:?}", self.case));
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut answer = Answer {
            status_line,
            status,
            headers,
            body: Vec::new(),
        };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Some(answer);
        }
        if let Some(len) = answer.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            answer.body = self.exact(len).await;
        } else if answer
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let size = self.line().await;
                let size = size.split(';').next().unwrap().trim();
                let size = usize::from_str_radix(size, 16).expect("chunk size");
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                answer.body.extend(self.exact(size).await);
                assert_eq!(self.exact(2).await, b"\r\n", "{}: chunk end", self.case);
            }
        } else {
            // Delimited by the end of the connection.
            while self.fill().await {}
            answer.body = std::mem::take(&mut self.buf);
        }
        Some(answer)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// The table's vocabulary
// ---------------------------------------------------------------------------------------------

/// One step of a case's script.
#[derive(Clone, Copy)]
enum Step {
    /// Write these bytes; `{P}` is the proxy path of the upstream's `/v1/chat/completions` and
    /// `{A}` the header line `Authorization: Bearer <gateway key>`.
    Write(&'static str),
    /// Write generated bytes (the large requests).
    WriteWith(fn() -> Vec<u8>),
    /// Shut down our writing half: no more bytes will come.
    HalfClose,
    /// Read the next response and check it.
    Expect(Resp),
    /// The gateway closes the connection (EOF or reset) without another response.
    Closed,
}

/// An expected response.
#[derive(Clone, Copy, Debug)]
enum Resp {
    /// The upstream's answer, relayed: its status and body, no `x-gateway-error`.
    Relayed(u16),
    /// The gateway's own answer: status, `x-gateway-error: <code>`, JSON body with that code.
    Gateway(u16, &'static str),
    /// hyper's automatic answer to an unparseable head: the status, no `x-gateway-error`, no
    /// body.
    Hyper(u16),
    /// An interim `100 Continue`.
    Continue,
    /// Refused with one of these statuses, by hyper or the gateway (a gateway answer must still
    /// carry a consistent `x-gateway-error` and JSON body).
    Refused(&'static [u16]),
}

/// What the upstream may see of the case, counted once the script is done.
#[derive(Clone, Copy, Debug)]
enum Reach {
    /// Nothing at all: no request head.
    Untouched,
    /// Exactly this many requests, each complete.
    Times(usize),
    /// Perhaps the head of one request, but never a complete request.
    NeverComplete,
}

use Reach::*;
use Resp::*;
use Step::*;

/// Extra checks on the requests the upstream saw (with the upstream's address).
type Check = fn(&[Seen], SocketAddr);

fn proxy_path() -> String {
    format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions")
}

fn expand(template: &str) -> Vec<u8> {
    template
        .replace("{P}", &proxy_path())
        .replace("{A}", &format!("Authorization: Bearer {GW_KEY}"))
        .into_bytes()
}

async fn run(case: &'static str, script: &[Step], reach: Reach, check: Option<Check>) {
    let upstream = Upstream::start().await;
    let gw = start_gateway(
        &upstream.base_url(),
        ForwardBuilder::default().max_request_body(LIMIT),
    )
    .await;
    let mut conn = Conn::connect(case, gw.addr).await;
    for step in script {
        match *step {
            Write(template) => conn.write(&expand(template)).await,
            WriteWith(make) => conn.write(&make()).await,
            HalfClose => conn.half_close().await,
            Expect(want) => {
                let got = conn.response().await.unwrap_or_else(|| {
                    panic!(
                        "{case}: connection closed, expected {want:?}; received:\n{}",
                        conn.received()
                    )
                });
                check_answer(case, want, &got, &conn.received());
            }
            Closed => {
                if let Some(got) = conn.response().await {
                    panic!(
                        "{case}: expected the connection to close, got another response {:?}; received:\n{}",
                        got.status_line,
                        conn.received()
                    );
                }
            }
        }
    }
    if matches!(reach, NeverComplete) {
        tokio::time::sleep(SETTLE).await;
    }
    let (heads, complete) = (upstream.count(), upstream.complete());
    match reach {
        Untouched => assert_eq!(
            (heads, complete),
            (0, 0),
            "{case}: a refused request reached the upstream (heads, complete requests): {:#?}",
            upstream.all()
        ),
        Times(n) => assert_eq!(
            (heads, complete),
            (n, n),
            "{case}: the upstream should have seen {n} complete request(s) (heads, complete): {:#?}",
            upstream.all()
        ),
        NeverComplete => {
            assert!(
                heads <= 1 && complete == 0,
                "{case}: a malformed or oversized body reached the upstream complete \
                 (heads {heads}, complete {complete}): {:#?}",
                upstream.all()
            );
        }
    }
    let seen = upstream.all();
    for s in seen.iter().filter(|s| s.body.is_ok()) {
        check_framing(case, s);
    }
    if let Some(check) = check {
        check(&seen, upstream.addr);
    }
}

fn check_answer(case: &str, want: Resp, got: &Answer, received: &str) {
    let ctx = || {
        format!(
            "{case}: expected {want:?}, got {:?}\n{received}",
            got.status_line
        )
    };
    let gateway_error = got.header("x-gateway-error");
    match want {
        Relayed(status) => {
            assert_eq!(got.status, status, "{}", ctx());
            assert!(gateway_error.is_none(), "{}", ctx());
            assert_eq!(got.body, UPSTREAM_BODY, "{}", ctx());
        }
        Gateway(status, code) => {
            assert_eq!(got.status, status, "{}", ctx());
            assert_eq!(gateway_error, Some(code), "{}", ctx());
        }
        Hyper(status) => {
            assert_eq!(got.status, status, "{}", ctx());
            assert!(gateway_error.is_none(), "{}", ctx());
            assert!(got.body.is_empty(), "{}", ctx());
        }
        Continue => assert_eq!(got.status, 100, "{}", ctx()),
        Refused(statuses) => assert!(statuses.contains(&got.status), "{}", ctx()),
    }
    // Every answer the gateway makes itself is JSON that agrees with its header, and none
    // repeats the client's key.
    if let Some(code) = gateway_error {
        assert_eq!(
            got.header("content-type"),
            Some("application/json"),
            "{}",
            ctx()
        );
        let body: serde_json::Value = serde_json::from_slice(&got.body)
            .unwrap_or_else(|e| panic!("{}: body not JSON ({e})", ctx()));
        assert_eq!(body["error"]["code"], code, "{}", ctx());
        assert!(body["error"]["message"].is_string(), "{}", ctx());
    }
    assert!(
        find(&got.body, GW_KEY.as_bytes()).is_none(),
        "{}: the key was echoed",
        ctx()
    );
}

/// A request that reached the upstream is framed one way only, and carries no client key.
fn check_framing(case: &str, s: &Seen) {
    let cl = s.headers.get_all("content-length").iter().count();
    let te = s.headers.contains_key("transfer-encoding");
    assert!(
        !(cl > 0 && te),
        "{case}: the upstream got both Content-Length and Transfer-Encoding: {s:#?}"
    );
    assert!(
        cl <= 1,
        "{case}: the upstream got {cl} Content-Length: {s:#?}"
    );
    if let (Some(len), Ok(body)) = (s.headers.get("content-length"), &s.body) {
        assert_eq!(
            len.to_str().unwrap().parse::<usize>().ok(),
            Some(body.len()),
            "{case}: the upstream's Content-Length disagrees with its body: {s:#?}"
        );
    }
    for (name, value) in &s.headers {
        assert!(
            !value
                .as_bytes()
                .windows(GW_KEY.len())
                .any(|w| w == GW_KEY.as_bytes()),
            "{case}: the gateway key reached the upstream in {name}"
        );
    }
    assert_eq!(s.version, Version::HTTP_11, "{case}");
}

// Checks on what the upstream saw.

fn one_body(seen: &[Seen], want: &[u8]) {
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(seen[0].body.as_deref().ok(), Some(want), "{seen:#?}");
}

fn body_hello(seen: &[Seen], _: SocketAddr) {
    one_body(seen, b"hello");
}

fn body_empty(seen: &[Seen], _: SocketAddr) {
    one_body(seen, b"");
}

fn body_smuggled(seen: &[Seen], _: SocketAddr) {
    one_body(seen, b"SMUGGLED");
}

fn upstream_host(seen: &[Seen], upstream: SocketAddr) {
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(seen[0].method, Method::GET, "{seen:#?}");
    assert_eq!(seen[0].uri.path(), "/v1/chat/completions", "{seen:#?}");
    assert_eq!(
        seen[0].headers.get_all("host").iter().collect::<Vec<_>>(),
        vec![upstream.to_string().as_str()],
        "{seen:#?}"
    );
}

fn no_upgrade(seen: &[Seen], _: SocketAddr) {
    assert_eq!(seen.len(), 1, "{seen:#?}");
    for h in ["upgrade", "connection", "http2-settings"] {
        assert!(
            !seen[0].headers.contains_key(h),
            "{h} reached the upstream: {seen:#?}"
        );
    }
}

// Generated requests.

fn head_with(extra: &str) -> Vec<u8> {
    let mut head = expand("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\n");
    head.extend_from_slice(extra.as_bytes());
    head.extend_from_slice(b"\r\n");
    head
}

/// One 1 MiB header: well past hyper's 408 KiB read buffer (8 KiB + 100 × 4 KiB). hyper checks
/// the buffer only between reads, so a head just over 408 KiB can still be accepted when the
/// last read brings it in whole; 1 MiB never is.
fn oversized_header_block() -> Vec<u8> {
    head_with(&format!("X-Big: {}\r\n", "a".repeat(1 << 20)))
}

/// 120 small headers: past hyper's 100 headers.
fn many_headers() -> Vec<u8> {
    head_with(
        &(0..120)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>(),
    )
}

/// A 70 000-byte target: over hyper's 65 534-byte URI limit, inside its head buffer.
fn long_uri() -> Vec<u8> {
    expand(&format!(
        "GET {{P}}?q={} HTTP/1.1\r\nHost: gw\r\n{{A}}\r\n\r\n",
        "a".repeat(70_000)
    ))
}

/// A 500 000-byte request line: the head never completes inside hyper's buffer.
fn huge_request_line() -> Vec<u8> {
    expand(&format!(
        "GET {{P}}?q={} HTTP/1.1\r\nHost: gw\r\n{{A}}\r\n\r\n",
        "a".repeat(500_000)
    ))
}

/// A declared and sent body of 4 KiB, over the 1 KiB limit.
fn declared_over_limit() -> Vec<u8> {
    let mut req = expand("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 4096\r\n\r\n");
    req.extend(std::iter::repeat_n(b'x', 4096));
    req
}

/// A chunked body of 4 × 512 bytes, over the 1 KiB limit.
fn chunked_over_limit() -> Vec<u8> {
    let mut req =
        expand("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend(std::iter::repeat_n(b'x', 512));
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

macro_rules! cases {
    ($(
        $(#[$doc:meta])*
        $name:ident: [$($step:expr),* $(,)?] => $reach:expr $(, check $check:expr)?;
    )*) => {$(
        $(#[$doc])*
        #[tokio::test]
        async fn $name() {
            let check: Option<Check> = None $(.or(Some($check as Check)))?;
            run(stringify!($name), &[$($step),*], $reach, check).await;
        }
    )*};
}

cases! {
    // --- Content-Length together with Transfer-Encoding ---------------------------------------
    //
    // RFC 9112 §6.1/§6.3: Transfer-Encoding overrides Content-Length; a server may reject the
    // message, or process it by Transfer-Encoding, drop Content-Length before forwarding, and
    // close the connection after responding. hyper does the latter (it removes the
    // Content-Length header and turns keep-alive off), so the gateway cannot even see that
    // both were sent. What must hold: the upstream gets one request framed one way only, and
    // whatever a Content-Length-reading front end would have taken for a second request is
    // never processed.

    /// CL first, then TE: TE wins (body `hello`), CL is not forwarded, the connection closes.
    cl_then_te_chunked: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        Expect(Relayed(200)), Closed,
    ] => Times(1), check body_hello;

    /// TE first, then CL: the same.
    te_then_cl_chunked: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        Expect(Relayed(200)), Closed,
    ] => Times(1), check body_hello;

    /// CL.TE: a CL-framed reader would leave `G` as the start of the next request; the
    /// connection closes instead, and the upstream gets an empty body.
    cl_te_desync_prefix: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG"),
        Expect(Relayed(200)), Closed,
    ] => Times(1), check body_empty;

    /// TE.CL: a CL-framed reader would stop after `8\r\n` and read `SMUGGLED` as a request; the
    /// chunked body is `SMUGGLED`, one request.
    te_cl_desync_body: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"),
        Expect(Relayed(200)), Closed,
    ] => Times(1), check body_smuggled;

    /// A complete authenticated request behind a CL+TE message is never processed: the
    /// connection closes after the first response, so the upstream sees exactly one request.
    cl_te_smuggled_request_is_dropped: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\n\r\n"),
        Expect(Relayed(200)), Closed,
    ] => Times(1), check body_empty;

    /// `xchunked` is not `chunked`: a non-chunked final coding in a request is a 400.
    te_xchunked_with_cl: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// `chunked, identity`: the final coding is not chunked: 400.
    te_chunked_identity_with_cl: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked, identity\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// Two TE lines, the last `identity`: 400.
    te_two_lines_last_identity: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// `Transfer-Encoding:  chunked` (extra OWS) is plain `chunked`: processed as the CL+TE
    /// cases above.
    te_extra_space_with_cl: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 4\r\nTransfer-Encoding:  chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        Expect(Relayed(200)), Closed,
    ] => Times(1), check body_hello;

    /// `Transfer-Encoding:\tchunked` (tab is OWS) is plain `chunked` too.
    te_tab_with_cl: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 4\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        Expect(Relayed(200)), Closed,
    ] => Times(1), check body_hello;

    /// ` Transfer-Encoding: chunked` at the start of a line is obs-fold: 400.
    te_line_folded_with_cl: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 5\r\n Transfer-Encoding: chunked\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// `gzip, chunked`: hyper removes the chunking, but the gateway drops the hop-by-hop
    /// `Transfer-Encoding` and would forward gzip bytes as if they were the body. A coding the
    /// gateway does not apply must be refused (RFC 9112 §6.1: 501), not silently stripped.
    /// Observed today: 200, forwarded with the gzip coding dropped.
    te_gzip_chunked: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        Expect(Refused(&[400, 501])),
    ] => Untouched;

    /// `chunked, chunked`: chunked applied twice is invalid (RFC 9112 §6.1); decoding once and
    /// forwarding the inner chunk framing as data must not happen. Observed today: 200, the
    /// upstream gets `5\r\nhello\r\n` as the body.
    te_chunked_twice: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked, chunked\r\n\r\na\r\n5\r\nhello\r\n\r\n0\r\n\r\n"),
        Expect(Refused(&[400, 501])),
    ] => Untouched;

    // --- Content-Length values ----------------------------------------------------------------

    /// Two differing Content-Length lines: 400, and the connection closes.
    cl_duplicate_differing: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// One Content-Length line with two differing values: 400.
    cl_list_differing: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 5, 6\r\n\r\nhello!"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// Two identical Content-Length lines: unambiguous (RFC 9110 §8.6 allows it); forwarded
    /// with a single Content-Length.
    cl_duplicate_identical: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        Expect(Relayed(200)),
    ] => Times(1), check body_hello;

    /// `5, 5` in one line: hyper refuses a list outright (400), which is safe.
    cl_list_identical: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 5, 5\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// A sign is not a digit: 400.
    cl_plus_sign: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: +5\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// A negative length: 400.
    cl_negative: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: -1\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// A space inside the number: 400.
    cl_inner_space: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 1 0\r\n\r\nhelloworld"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// Hexadecimal: 400.
    cl_hex: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 0x5\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// 2^64: overflows u64: 400.
    cl_overflow: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 18446744073709551616\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// u64::MAX parses but is past hyper's largest body length: hyper answers 431.
    cl_u64_max: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 18446744073709551615\r\n\r\nhello"),
        Expect(Hyper(431)), Closed,
    ] => Untouched;

    // --- Transfer-Encoding that is not chunked ------------------------------------------------

    /// `gzip` alone on HTTP/1.1: the body length cannot be known: 400.
    te_gzip_only: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: gzip\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// `identity` (removed from HTTP/1.1): 400.
    te_identity_only: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: identity\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// HTTP/1.0 has no Transfer-Encoding at all: 400.
    te_chunked_on_http10: [
        Write("POST {P} HTTP/1.0\r\n{A}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    // --- Chunked bodies -----------------------------------------------------------------------
    //
    // A body is streamed: its framing errors are found after the head went upstream, so the
    // upstream may see a head, but its body is cut and never completes. The client must get a
    // 400 (its body was malformed: not a 502 that blames the upstream), never a 2xx, and the
    // connection must close. Observed today: the upstream never gets a complete request and
    // the connection closes, but the client gets `502 upstream_error`, so the 400 cases below
    // fail until the client's body errors are classified as such.

    /// A chunk size past u64: the body is refused.
    chunk_size_overflow: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        Expect(Refused(&[400])), Closed,
    ] => NeverComplete;

    /// A chunk size that is not hexadecimal.
    chunk_size_not_hex: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        Expect(Refused(&[400])), Closed,
    ] => NeverComplete;

    /// A negative chunk size.
    chunk_size_negative: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
        Expect(Refused(&[400])), Closed,
    ] => NeverComplete;

    /// Chunk extensions are legal and ignored: forwarded, body `hello`.
    chunk_extension: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value;x=\"q\"\r\nhello\r\n0\r\n\r\n"),
        Expect(Relayed(200)),
    ] => Times(1), check body_hello;

    /// A bare LF inside a chunk extension: refused.
    chunk_extension_bare_lf: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\n\r\n5;ext\nhello\r\n0\r\n\r\n"),
        Expect(Refused(&[400])), Closed,
    ] => NeverComplete;

    /// Chunk data longer than its size (no CRLF after the data): refused.
    chunk_data_longer_than_size: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n"),
        Expect(Refused(&[400])), Closed,
    ] => NeverComplete;

    /// The last chunk without the final CRLF, then the client stops sending: the body never
    /// completes, so the upstream never gets a complete request.
    chunk_missing_final_crlf: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"),
        HalfClose,
        Expect(Refused(&[400])), Closed,
    ] => NeverComplete;

    /// A chunked body over the 1 KiB limit: 413, and the upstream's copy is cut.
    chunked_body_over_limit: [
        WriteWith(chunked_over_limit),
        Expect(Gateway(413, "payload_too_large")),
    ] => NeverComplete;

    // --- Header syntax ------------------------------------------------------------------------

    /// obs-fold with a space (RFC 9112 §5.2: reject with 400).
    obs_fold_space: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nX-Note: a\r\n b\r\n\r\n"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// obs-fold with a tab.
    obs_fold_tab: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nX-Note: a\r\n\tb\r\n\r\n"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// Whitespace around the Content-Length value is OWS: forwarded as 5 bytes.
    cl_surrounding_ows: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: \t 5 \t\r\n\r\nhello"),
        Expect(Relayed(200)),
    ] => Times(1), check body_hello;

    /// `Content-Length : 5` (whitespace before the colon, RFC 9112 §5.1: 400).
    space_before_colon_cl: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length : 5\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// `Transfer-Encoding : chunked` next to a Content-Length.
    space_before_colon_te: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 5\r\nTransfer-Encoding : chunked\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// A space inside a header name.
    space_in_header_name: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nX Note: a\r\n\r\n"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// Bare LF line endings: RFC 9112 §2.2 lets a recipient accept them, and hyper does; the
    /// gateway re-serialises the request with CRLF, so no upstream ever sees a bare LF.
    bare_lf_line_endings: [
        Write("GET {P} HTTP/1.1\nHost: gw\n{A}\n\n"),
        Expect(Relayed(200)),
    ] => Times(1), check body_empty;

    /// A NUL in a header value: 400.
    nul_in_header_value: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nX-Note: a\0b\r\n\r\n"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    /// A bare CR inside a header value (a CR-only line break hiding a Transfer-Encoding): 400.
    cr_in_header_value: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nX-Note: a\rTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    // --- Size limits --------------------------------------------------------------------------

    /// A header block past hyper's buffer: a bare 431 (hyper's own, no JSON body).
    header_block_too_large: [WriteWith(oversized_header_block), Expect(Hyper(431)), Closed] => Untouched;

    /// More than 100 header lines: 431.
    too_many_headers: [WriteWith(many_headers), Expect(Hyper(431)), Closed] => Untouched;

    /// A 70 000-byte URI in a head that fits hyper's buffer: hyper's own 414.
    uri_too_long: [WriteWith(long_uri), Expect(Hyper(414)), Closed] => Untouched;

    /// A 500 000-byte request line: the head overflows hyper's buffer first: 431.
    request_line_too_large: [WriteWith(huge_request_line), Expect(Hyper(431)), Closed] => Untouched;

    /// A declared body over the limit, sent in full: 413 before the upstream is contacted.
    declared_body_over_limit: [
        WriteWith(declared_over_limit),
        Expect(Gateway(413, "payload_too_large")),
    ] => Untouched;

    /// A declared body of 2^63 bytes, none sent: 413 at once.
    declared_body_huge: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 9223372036854775807\r\n\r\n"),
        Expect(Gateway(413, "payload_too_large")),
    ] => Untouched;

    /// `Expect: 100-continue` with a body over the limit: 413 without a `100 Continue`, so the
    /// client never sends the body.
    expect_continue_over_limit: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nExpect: 100-continue\r\nContent-Length: 1048576\r\n\r\n"),
        Expect(Gateway(413, "payload_too_large")),
    ] => Untouched;

    /// Control: `Expect: 100-continue` within the limit: `100 Continue`, then the body, then
    /// the upstream's answer.
    expect_continue_within_limit: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"),
        Expect(Continue),
        Write("hello"),
        Expect(Relayed(200)),
    ] => Times(1), check body_hello;

    /// Control: a body within the limit is forwarded.
    body_within_limit: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 5\r\n\r\nhello"),
        Expect(Relayed(200)),
    ] => Times(1), check body_hello;

    // --- HTTP/1.0 -----------------------------------------------------------------------------

    /// HTTP/1.0 without Host is valid; forwarded with the upstream's own Host; then closed.
    http10_without_host: [
        Write("GET {P} HTTP/1.0\r\n{A}\r\n\r\n"),
        Expect(Relayed(200)), Closed,
    ] => Times(1), check upstream_host;

    /// HTTP/1.0 keep-alive, pipelined: the second request has no key, so it is a 401 (or is
    /// never read), and never reaches the upstream.
    http10_keep_alive_pipelined: [
        Write("GET {P} HTTP/1.0\r\nConnection: keep-alive\r\n{A}\r\n\r\nGET {P} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
        Expect(Relayed(200)), Expect(Gateway(401, "invalid_api_key")),
    ] => Times(1);

    /// An HTTP/1.0 POST without a length has an empty body (RFC 9112 §6.3); what follows is
    /// never read as a request, since 1.0 closes: an authenticated request hidden there never
    /// reaches the upstream.
    http10_post_without_length: [
        Write("POST {P} HTTP/1.0\r\n{A}\r\n\r\nGET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\n\r\n"),
        Expect(Relayed(200)), Closed,
    ] => Times(1), check body_empty;

    /// An HTTP/1.0 keep-alive POST without a length: the body is empty, and the bytes meant as
    /// its body are parsed as the next request: not HTTP, so 400 and close.
    http10_keep_alive_post_without_length: [
        Write("POST {P} HTTP/1.0\r\nConnection: keep-alive\r\n{A}\r\n\r\n{\"model\": \"x\"}\r\n\r\n"),
        Expect(Relayed(200)), Expect(Hyper(400)), Closed,
    ] => Times(1), check body_empty;

    /// An HTTP/0.9 request line (no version): 400.
    http09_request_line: [
        Write("GET {P}\r\n\r\n"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    // --- Host and request targets -------------------------------------------------------------

    /// HTTP/1.1 without Host: RFC 9112 §3.2 says a server MUST answer 400. Observed today:
    /// hyper accepts it and the gateway forwards it (200).
    http11_without_host: [
        Write("GET {P} HTTP/1.1\r\n{A}\r\n\r\n"),
        Expect(Refused(&[400])),
    ] => Untouched;

    /// Two Host lines: RFC 9112 §3.2 says 400. Observed today: forwarded (200); the upstream
    /// gets only its own Host.
    two_host_headers: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\nHost: evil.example\r\n{A}\r\n\r\n"),
        Expect(Refused(&[400])),
    ] => Untouched;

    /// An absolute-form target naming another host: allowed; it goes to the configured
    /// upstream, which sees its own Host.
    absolute_form_other_host: [
        Write("GET http://evil.example:666{P} HTTP/1.1\r\nHost: evil.example:666\r\n{A}\r\n\r\n"),
        Expect(Relayed(200)),
    ] => Times(1), check upstream_host;

    /// `OPTIONS *`: no route: 404, nothing upstream.
    options_asterisk: [
        Write("OPTIONS * HTTP/1.1\r\nHost: gw\r\n{A}\r\n\r\n"),
        Expect(Gateway(404, "not_found")),
    ] => Untouched;

    /// Two spaces in the request line: 400.
    request_line_double_space: [
        Write("GET  {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\n\r\n"),
        Expect(Hyper(400)), Closed,
    ] => Untouched;

    // --- Methods ------------------------------------------------------------------------------

    /// CONNECT with a valid key: 405, no tunnel, nothing upstream.
    connect_with_key: [
        Write("CONNECT api.inference.wandb.ai:443 HTTP/1.1\r\nHost: api.inference.wandb.ai:443\r\n{A}\r\n\r\n"),
        Expect(Gateway(405, "method_not_allowed")),
    ] => Untouched;

    /// CONNECT without a key: 401 (authentication comes first).
    connect_without_key: [
        Write("CONNECT api.inference.wandb.ai:443 HTTP/1.1\r\nHost: api.inference.wandb.ai:443\r\n\r\n"),
        Expect(Gateway(401, "invalid_api_key")),
    ] => Untouched;

    /// TRACE to a proxy path: 405.
    trace_with_key: [
        Write("TRACE {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\n\r\n"),
        Expect(Gateway(405, "method_not_allowed")),
    ] => Untouched;

    // --- Upgrades ----------------------------------------------------------------------------

    /// h2c upgrade smuggling: `Upgrade` and `HTTP2-Settings` are hop-by-hop, so the upstream
    /// never gets the offer and can never switch the connection to a tunnel past the gateway.
    h2c_upgrade_is_not_forwarded: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
        Expect(Relayed(200)),
    ] => Times(1), check no_upgrade;

    /// `Upgrade` alone, not named in `Connection`: still hop-by-hop, still not forwarded.
    upgrade_without_connection_is_not_forwarded: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nUpgrade: websocket\r\n\r\n"),
        Expect(Relayed(200)),
    ] => Times(1), check no_upgrade;

    // --- Pipelining and trailing bytes --------------------------------------------------------

    /// A valid request and, in the same packet, one without a key: the second is answered on
    /// its own with a 401 and never reaches the upstream.
    pipelined_second_without_key: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\n\r\nGET {P} HTTP/1.1\r\nHost: gw\r\n\r\n"),
        Expect(Relayed(200)), Expect(Gateway(401, "invalid_api_key")),
    ] => Times(1);

    /// Control: two valid pipelined requests are both answered, in order.
    pipelined_both_with_key: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 2\r\n\r\n{}GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\n\r\n"),
        Expect(Relayed(200)), Expect(Relayed(200)),
    ] => Times(2);

    /// `Content-Length: 0` GET followed by a request: the trailing bytes are a request of their
    /// own, unauthenticated: 401.
    cl0_get_then_smuggled_request: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 0\r\n\r\nGET {P} HTTP/1.1\r\nHost: gw\r\n\r\n"),
        Expect(Relayed(200)), Expect(Gateway(401, "invalid_api_key")),
    ] => Times(1), check body_empty;

    /// `Content-Length: 0` GET followed by garbage: the garbage is a malformed request: 400,
    /// then close.
    cl0_get_then_garbage: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 0\r\n\r\nhello\r\n\r\n"),
        Expect(Relayed(200)), Expect(Hyper(400)), Closed,
    ] => Times(1), check body_empty;

    /// A head that never ends (the client stops sending mid-head): nothing to answer, so the
    /// right behaviour is to close without a response; nothing reaches the upstream.
    truncated_head_then_eof: [
        Write("GET {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\n"),
        HalfClose,
        Closed,
    ] => Untouched;

    /// A Content-Length shorter than what follows: the rest (`GPOST …`) is a request of its
    /// own, without a key: 401.
    cl_shorter_than_body: [
        Write("POST {P} HTTP/1.1\r\nHost: gw\r\n{A}\r\nContent-Length: 2\r\n\r\n{}GPOST {P} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n"),
        Expect(Relayed(200)), Expect(Gateway(401, "invalid_api_key")),
    ] => Times(1);
}
