//! An upstream that fails in scripted ways, on raw TCP so that every failure is exact: refuse
//! (a port nothing listens on), answer, answer with a status, reset before the head, reset in
//! the middle of a stream, never answer, answer slowly.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the upstream does with each request.
#[derive(Clone, Debug)]
pub enum Act {
    /// A 200 chat completion (JSON, with `usage`), after `delay`.
    Ok { delay: Duration },
    /// A 200 event stream of `events` token events and `[DONE]`.
    Sse { events: usize },
    /// An error status with a JSON body and these extra headers.
    Status(u16, Vec<(&'static str, String)>),
    /// Reads the request, then resets the connection without a response.
    ResetBeforeHead,
    /// Sends an event stream's head and two events, then resets the connection.
    CutMidStream,
    /// Reads the request and never answers; notes when the client closes the connection.
    Hang,
}

/// One request as the upstream read it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

struct State {
    act: Mutex<Act>,
    seen: Mutex<Vec<Request>>,
    /// Requests read, whatever happened to them.
    count: AtomicUsize,
    /// Connections closed by the client while a request hung.
    hung_closed: AtomicUsize,
    changed: Notify,
}

/// A scripted upstream on 127.0.0.1; it stops when dropped.
pub struct Scripted {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    pub async fn start(act: Act) -> Self {
        Self::on(TcpListener::bind("127.0.0.1:0").await.unwrap(), act)
    }

    /// A scripted upstream on `addr` (a port a dead target used).
    pub async fn start_at(addr: SocketAddr, act: Act) -> Self {
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        Self::on(listener, act)
    }

    fn on(listener: TcpListener, act: Act) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            act: Mutex::new(act),
            seen: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            hung_closed: AtomicUsize::new(0),
            changed: Notify::new(),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, s.clone()));
            }
        });
        Self { addr, state, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set(&self, act: Act) {
        *self.state.act.lock().unwrap() = act;
    }

    pub fn count(&self) -> usize {
        self.state.count.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Request> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn hung_closed(&self) -> usize {
        self.state.hung_closed.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `f` holds.
    pub async fn until(&self, what: &str, f: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f(self) {
            let notified = self.state.changed.notified();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for {what}");
            }
        }
    }
}

/// A port nothing listens on: connections to it are refused.
pub async fn refusing_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

async fn serve(mut stream: TcpStream, state: Arc<State>) {
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        state.seen.lock().unwrap().push(req);
        state.count.fetch_add(1, Ordering::SeqCst);
        state.changed.notify_waiters();
        let act = state.act.lock().unwrap().clone();
        match act {
            Act::Ok { delay } => {
                tokio::time::sleep(delay).await;
                let body = r#"{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                if write(&mut stream, &[head.as_bytes(), body.as_bytes()])
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Act::Sse { events } => {
                let mut out = String::from(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                );
                for i in 0..events {
                    out.push_str(&chunk(&event(i)));
                }
                out.push_str(&chunk("data: [DONE]\n\n"));
                out.push_str("0\r\n\r\n");
                if write(&mut stream, &[out.as_bytes()]).await.is_err() {
                    return;
                }
            }
            Act::Status(code, extra) => {
                let body = format!(
                    r#"{{"error":{{"message":"scripted {code}","type":"server_error","code":null}}}}"#
                );
                let mut head = format!(
                    "HTTP/1.1 {code} Scripted\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    body.len()
                );
                for (name, value) in extra {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                head.push_str("\r\n");
                if write(&mut stream, &[head.as_bytes(), body.as_bytes()])
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Act::ResetBeforeHead => {
                reset(stream);
                return;
            }
            Act::CutMidStream => {
                let out = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{}{}",
                    chunk(&event(0)),
                    chunk(&event(1))
                );
                let _ = write(&mut stream, &[out.as_bytes()]).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                reset(stream);
                return;
            }
            Act::Hang => {
                // Until the client closes (EOF or reset).
                let mut sink = [0u8; 1024];
                loop {
                    match stream.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                state.hung_closed.fetch_add(1, Ordering::SeqCst);
                state.changed.notify_waiters();
                return;
            }
        }
    }
}

fn event(i: usize) -> String {
    format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} \"}},\"finish_reason\":null}}]}}\n\n"
    )
}

fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

async fn write(stream: &mut TcpStream, parts: &[&[u8]]) -> std::io::Result<()> {
    for p in parts {
        stream.write_all(p).await?;
    }
    stream.flush().await
}

/// Closes with a TCP reset (linger zero), not a clean FIN.
fn reset(stream: TcpStream) {
    let std = stream.into_std().unwrap();
    socket_linger_zero(&std);
    drop(std);
}

fn socket_linger_zero(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized `linger`.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Reads one request (head, then a `Content-Length` or chunked body); `None` at EOF.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if !fill(stream, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while buf.len() < len {
            if !fill(stream, buf).await {
                return None;
            }
        }
        body.extend(buf.drain(..len));
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if !fill(stream, buf).await {
                    return None;
                }
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                if !fill(stream, buf).await {
                    return None;
                }
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
            if size == 0 {
                break;
            }
        }
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
