//! The upstream connection pool: HTTP/1.1 connections driven by the response body that uses
//! them, HTTP/2 connections (chosen by ALPN) shared by every request to the same upstream.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::header::{HOST, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;
use tokio::time::Instant;
use tower_service::Service;

use super::body::UpstreamBody;
use super::conn::{Checkin, H1Conn, Key, Return};
use super::{ConnectTimeout, UpstreamRequestBody};
use crate::BoxError;
use crate::error::ConnectError;

/// The connector: TCP (`TCP_NODELAY`, keepalive), TLS with ALPN `h2` and `http/1.1`, all
/// within the connect timeout.
pub(crate) type Connector = ConnectTimeout<HttpsConnector<HttpConnector>>;

/// A pool of upstream connections, shared by its clones.
///
/// HTTP/1.1 connections are not run by a task of their own: the request and then the response
/// body drive the connection they hold, on the task that polls them, so a body frame goes from
/// the upstream socket to the downstream one without a hand-off between tasks, and every frame
/// already read is seen at once (see [`ResponseBody`](super::ResponseBody)). An idle HTTP/1.1
/// connection waits in the pool, unpolled, for at most the pool's idle timeout; one that the
/// upstream closed meanwhile is noticed and dropped when it is checked out.
///
/// An upstream that offers HTTP/2 through ALPN gets one connection, run by a task of its own
/// and shared by every request to it. Requests that find no connection to an `https`
/// upstream while another request is connecting to it wait for that connect instead of
/// opening their own, unless the upstream is known to speak only HTTP/1.1: a burst against a
/// cold HTTP/2 upstream opens one connection, not one per request.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: HashMap<Key, Vec<Idle>>,
    /// The shared HTTP/2 connection of each upstream that offered it.
    h2: HashMap<Key, Shared>,
    /// The `https` upstreams being connected to that may turn out to speak HTTP/2: the
    /// requests that find no connection wait here for the outcome (see [`Connecting`]).
    connecting: HashMap<Key, watch::Sender<Outcome>>,
    /// The `https` upstreams whose last new connection negotiated HTTP/1.1: nobody waits for
    /// a connect to them. Cleared for an upstream when a connection to it negotiates HTTP/2.
    h1_only: HashSet<Key>,
    /// Whether a task is expiring idle connections.
    reaping: bool,
}

impl State {
    /// The shared HTTP/2 connection to `key`, if it is still open.
    fn shared_h2(&mut self, key: &Key) -> Option<http2::SendRequest<UpstreamRequestBody>> {
        let shared = self.h2.get_mut(key)?;
        if !shared.send.is_closed() {
            shared.last_used = Instant::now();
            return Some(shared.send.clone());
        }
        self.h2.remove(key);
        None
    }
}

struct Idle {
    conn: Box<H1Conn>,
    since: Instant,
}

struct Shared {
    send: http2::SendRequest<UpstreamRequestBody>,
    last_used: Instant,
}

impl fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("idle_timeout", &self.inner.idle_timeout)
            .field("max_idle_per_host", &self.inner.max_idle_per_host)
            .finish_non_exhaustive()
    }
}

/// The future of [`UpstreamClient::send`]: one allocation per request, as the legacy client.
pub(crate) type SendFuture =
    Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, BoxError>> + Send>>;

impl UpstreamClient {
    pub(crate) fn new(
        connector: Connector,
        idle_timeout: Duration,
        max_idle_per_host: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                idle_timeout,
                max_idle_per_host,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Sends `req`, whose URI is absolute, on a pooled or a new connection.
    pub(crate) fn send(&self, req: Request<UpstreamRequestBody>) -> SendFuture {
        Box::pin(self.inner.clone().send(req))
    }

    /// How many idle HTTP/1.1 connections the pool holds (for tests).
    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        self.inner.lock().idle.values().map(Vec::len).sum()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding the lock.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn send(
        self: Arc<Self>,
        mut req: Request<UpstreamRequestBody>,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        let (Some(scheme), Some(authority)) = (req.uri().scheme(), req.uri().authority()) else {
            return Err(super::NoUpstream::new().into());
        };
        let key: Key = (scheme.clone(), authority.clone());
        let mut fresh = false;
        loop {
            let pooled = if fresh { None } else { self.checkout(&key) };
            let conn = match pooled {
                Some(conn) => conn,
                // Boxed: setting up a connection (TLS, HTTP/2) is the largest state by far, and
                // the rarest.
                None => Box::pin(self.connect_or_wait(&key)).await?,
            };
            // One retry at most: the connection of a retry is never taken for a stale one.
            let reused = conn.reused && !fresh;
            let result = match conn.kind {
                Kind::H1(conn) => self.send_h1(&key, conn, req).await,
                Kind::H2(send) => send_h2(send, req).await,
            };
            match result {
                Ok(res) => return Ok(res),
                // A reused connection that closed before the request went out: the request is
                // intact, try another connection (as hyper-util's legacy client does).
                Err(mut err) if reused => match err.take_message() {
                    Some(back) => {
                        tracing::debug!(error = %err.error(), "pooled connection closed; retrying");
                        req = back;
                        fresh = true;
                    }
                    None => return Err(err.into_error().into()),
                },
                Err(err) => return Err(err.into_error().into()),
            }
        }
    }

    /// An idle connection to `key`, if one is alive: the shared HTTP/2 one, else the most
    /// recently used HTTP/1.1 one.
    fn checkout(&self, key: &Key) -> Option<Checkout> {
        let mut state = self.lock();
        if let Some(send) = state.shared_h2(key) {
            return Some(Checkout {
                kind: Kind::H2(send),
                reused: true,
            });
        }
        let idle = state.idle.get_mut(key)?;
        let now = Instant::now();
        while let Some(Idle { mut conn, since }) = idle.pop() {
            if now.saturating_duration_since(since) < self.idle_timeout && conn.is_reusable() {
                return Some(Checkout {
                    kind: Kind::H1(conn),
                    reused: true,
                });
            }
        }
        state.idle.remove(key);
        None
    }

    /// What a request that found no idle connection does: takes the shared HTTP/2 connection
    /// if one came up meanwhile, else connects, or waits for the connect in flight to an
    /// upstream that may speak HTTP/2.
    fn cold<'a>(&'a self, key: &'a Key) -> Cold<'a> {
        let mut state = self.lock();
        if let Some(send) = state.shared_h2(key) {
            return Cold::Ready(send);
        }
        // No h2c: a plain `http` upstream is always HTTP/1.1, and never waited for.
        if key.0 != Scheme::HTTPS || state.h1_only.contains(key) {
            return Cold::Connect(None);
        }
        if let Some(outcome) = state.connecting.get(key) {
            return Cold::Wait(outcome.subscribe());
        }
        state
            .connecting
            .insert(key.clone(), watch::Sender::new(Outcome::Pending));
        Cold::Connect(Some(Connecting {
            pool: self,
            key,
            outcome: Outcome::Pending,
        }))
    }

    /// A connection for a request that found none idle (or whose pooled one had closed).
    ///
    /// A waiter waits for one connect, which has the connect timeout: if it came up HTTP/2
    /// the waiter shares it; if it came up HTTP/1.1 or failed, the waiter connects on its own.
    /// Only a connect that was cancelled (its request dropped) sends its waiters back to
    /// choose again, one of them connecting and the others waiting for it.
    async fn connect_or_wait(self: &Arc<Self>, key: &Key) -> Result<Checkout, BoxError> {
        loop {
            let mut outcome = match self.cold(key) {
                Cold::Ready(send) => {
                    return Ok(Checkout {
                        kind: Kind::H2(send),
                        reused: true,
                    });
                }
                Cold::Connect(connecting) => return self.connect(key, connecting).await,
                Cold::Wait(outcome) => outcome,
            };
            // `Err`: the connect was dropped before it had an outcome.
            let settled = match outcome.wait_for(|o| !matches!(o, Outcome::Pending)).await {
                Ok(settled) => settled.clone(),
                Err(_) => Outcome::Pending,
            };
            match settled {
                Outcome::H2(send) => {
                    // As fresh as the connect's own request sees it: no retry on it.
                    return Ok(Checkout {
                        kind: Kind::H2(send),
                        reused: false,
                    });
                }
                Outcome::Http1 | Outcome::Failed => return self.connect(key, None).await,
                Outcome::Pending => tracing::debug!("upstream connect cancelled; choosing again"),
            }
        }
    }

    /// Opens a connection to `key`. With `connecting`, tells the requests waiting for it how
    /// it went, as soon as that is known.
    async fn connect(
        self: &Arc<Self>,
        key: &Key,
        mut connecting: Option<Connecting<'_>>,
    ) -> Result<Checkout, BoxError> {
        let mut settle = |outcome| {
            if let Some(connecting) = connecting.take() {
                connecting.settle(outcome);
            }
        };
        let io = match self.open(key).await {
            Ok(io) => io,
            Err(err) => {
                settle(Outcome::Failed);
                return Err(err);
            }
        };
        if io.connected().is_negotiated_h2() {
            let handshake = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await;
            let (send, conn) = match handshake {
                Ok(handshake) => handshake,
                Err(err) => {
                    settle(Outcome::Failed);
                    return Err(err.into());
                }
            };
            tokio::spawn(async move {
                if let Err(err) = conn.await {
                    tracing::debug!(error = %err, "upstream HTTP/2 connection failed");
                }
            });
            let mut state = self.lock();
            state.h2.insert(
                key.clone(),
                Shared {
                    send: send.clone(),
                    last_used: Instant::now(),
                },
            );
            state.h1_only.remove(key);
            // The reaper expires a shared HTTP/2 connection too, as it does idle HTTP/1 ones.
            self.reap_later(state);
            settle(Outcome::H2(send.clone()));
            return Ok(Checkout {
                kind: Kind::H2(send),
                reused: false,
            });
        }
        // Known before the HTTP/1.1 handshake: the waiters need not wait for it.
        settle(Outcome::Http1);
        let (send, conn) = http1::Builder::new().handshake(io).await?;
        Ok(Checkout {
            kind: Kind::H1(Box::new(H1Conn {
                send,
                conn: Some(conn),
            })),
            reused: false,
        })
    }

    /// A new TCP (and for `https`, TLS) connection to `key`, within the connect timeout.
    async fn open(&self, key: &Key) -> Result<super::conn::Io, BoxError> {
        let uri = Uri::builder()
            .scheme(key.0.clone())
            .authority(key.1.clone())
            .path_and_query("/")
            .build()?;
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(ConnectError)?;
        connector
            .call(uri)
            .await
            .map_err(|err| ConnectError(err).into())
    }

    async fn send_h1(
        self: &Arc<Self>,
        key: &Key,
        mut conn: Box<H1Conn>,
        mut req: Request<UpstreamRequestBody>,
    ) -> Result<
        Response<UpstreamBody>,
        hyper::client::conn::TrySendError<Request<UpstreamRequestBody>>,
    > {
        // As hyper-util's legacy client: the upstream's own `Host`, and the origin form.
        if !req.headers().contains_key(HOST) {
            if let Some(host) = host_header(&key.0, &key.1) {
                req.headers_mut().insert(HOST, host);
            }
        }
        let path = match req.uri().path_and_query() {
            Some(p) if p.as_str() != "/" => Uri::from(p.clone()),
            _ => Uri::default(),
        };
        *req.uri_mut() = path;
        let mut response = std::pin::pin!(conn.send.try_send_request(req));
        // The connection writes the request and reads the response head as it is polled.
        let res = poll_fn(|cx| {
            conn.drive(cx);
            response.as_mut().poll(cx)
        })
        .await?;
        let pool: Weak<dyn Checkin> = Arc::downgrade(self) as Weak<Inner>;
        Ok(res.map(|body| UpstreamBody::driving(body, conn, Return::new(pool, key.clone()))))
    }

    /// Starts the task that expires idle connections, unless it runs already (or nothing
    /// expires). Takes the lock so that one task at most is started.
    fn reap_later(self: &Arc<Self>, mut state: MutexGuard<'_, State>) {
        if state.reaping || self.idle_timeout.is_zero() {
            return;
        }
        state.reaping = true;
        drop(state);
        spawn_reaper(Arc::downgrade(self), self.idle_timeout);
    }

    /// Drops expired and closed connections; returns whether any idle one is left.
    fn reap(&self) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        let timeout = self.idle_timeout;
        state.idle.retain(|_, idle| {
            idle.retain_mut(|i| {
                now.saturating_duration_since(i.since) < timeout && i.conn.is_reusable()
            });
            !idle.is_empty()
        });
        state.h2.retain(|_, shared| {
            !shared.send.is_closed() && now.saturating_duration_since(shared.last_used) < timeout
        });
        let left = !state.idle.is_empty() || !state.h2.is_empty();
        state.reaping = left;
        left
    }
}

impl Checkin for Inner {
    /// Takes back a connection whose response has ended, if it can carry another request.
    fn checkin(self: Arc<Self>, key: Key, mut conn: Box<H1Conn>) {
        if self.max_idle_per_host == 0 || self.idle_timeout.is_zero() || !conn.is_reusable() {
            return;
        }
        let mut state = self.lock();
        let idle = state.idle.entry(key).or_default();
        if idle.len() >= self.max_idle_per_host {
            return;
        }
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
        Inner::reap_later(&self, state);
    }
}

/// Expires idle connections every `every` until the pool is dropped or empty.
fn spawn_reaper(pool: Weak<Inner>, every: Duration) {
    let every = every.max(Duration::from_millis(100));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match pool.upgrade() {
                Some(pool) if pool.reap() => {}
                _ => return,
            }
        }
    });
}

/// The `Host` header for an upstream: its host, with the port unless it is the scheme's default.
fn host_header(scheme: &Scheme, authority: &Authority) -> Option<HeaderValue> {
    let default = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let host = authority.host();
    match authority.port_u16() {
        Some(port) if port != default => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        _ => HeaderValue::from_str(host).ok(),
    }
}

async fn send_h2(
    mut send: http2::SendRequest<UpstreamRequestBody>,
    req: Request<UpstreamRequestBody>,
) -> Result<Response<UpstreamBody>, hyper::client::conn::TrySendError<Request<UpstreamRequestBody>>>
{
    if let Err(error) = poll_fn(|cx| send.poll_ready(cx)).await {
        tracing::debug!(%error, "upstream HTTP/2 connection closed");
    }
    let res = send.try_send_request(req).await?;
    Ok(res.map(UpstreamBody::h2))
}

struct Checkout {
    kind: Kind,
    reused: bool,
}

/// What a request that found no idle connection does (see [`Inner::cold`]).
enum Cold<'a> {
    /// Takes the shared HTTP/2 connection that came up meanwhile.
    Ready(http2::SendRequest<UpstreamRequestBody>),
    /// Connects; with the registration that others wait on, when they may.
    Connect(Option<Connecting<'a>>),
    /// Waits for the outcome of the connect in flight.
    Wait(watch::Receiver<Outcome>),
}

/// How a connect that others wait for went.
#[derive(Clone)]
enum Outcome {
    /// Not known yet; still so when the channel closes, the connect was cancelled.
    Pending,
    /// It negotiated HTTP/2: the connection to share.
    H2(http2::SendRequest<UpstreamRequestBody>),
    /// It negotiated HTTP/1.1, which is not shared: connect on your own.
    Http1,
    /// It failed: connect on your own.
    Failed,
}

/// The registration of a connect in flight that other requests wait for. Dropping it, when
/// the connect settles or when its request is dropped, ends the wait: it leaves the pool's
/// `connecting` map, records an HTTP/1.1 upstream, and hands the outcome to every waiter.
struct Connecting<'a> {
    pool: &'a Inner,
    key: &'a Key,
    /// [`Outcome::Pending`] until settled: so it stays when the connect is cancelled.
    outcome: Outcome,
}

impl Connecting<'_> {
    fn settle(mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        let waiters = state.connecting.remove(self.key);
        if matches!(self.outcome, Outcome::Http1) {
            state.h1_only.insert(self.key.clone());
        }
        drop(state);
        let outcome = std::mem::replace(&mut self.outcome, Outcome::Pending);
        if let Some(waiters) = waiters
            && !matches!(outcome, Outcome::Pending)
        {
            waiters.send_replace(outcome);
        }
        // The sender drops here: the waiters of a cancelled connect wake with no outcome.
    }
}

enum Kind {
    // Boxed: a connection is ~2 KiB, and moves from the pool through the request future into
    // the response body.
    H1(Box<H1Conn>),
    H2(http2::SendRequest<UpstreamRequestBody>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::{Forward, ForwardBuilder};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;
    use tower_service::Service;

    const WAIT: Duration = Duration::from_secs(10);

    /// Reads one request head (the tests send no bodies); `false` at the end of the stream.
    async fn read_head(stream: &mut TcpStream) -> bool {
        let mut head = Vec::new();
        let mut byte = [0; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    }

    /// A raw HTTP/1.1 upstream: `respond` answers the `n`th request of a connection with the
    /// bytes to write; it hangs up when it has no answer for the next one. Counts the
    /// connections it accepts, and says when it has closed one.
    async fn upstream(
        respond: fn(usize) -> Option<Vec<u8>>,
    ) -> (SocketAddr, Arc<AtomicUsize>, mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let mut n = 0;
                    while read_head(&mut stream).await {
                        match respond(n) {
                            Some(bytes) => stream.write_all(&bytes).await.unwrap(),
                            None => break,
                        }
                        n += 1;
                        if respond(n).is_none() {
                            break;
                        }
                    }
                    drop(stream);
                    let _ = closed_tx.send(());
                });
            }
        });
        (addr, accepted, closed)
    }

    fn forward() -> Forward<Full<Bytes>> {
        Forward::new()
    }

    /// Sends a GET to the upstream at `addr`; the response, in time.
    async fn call(
        fwd: &mut Forward<Full<Bytes>>,
        addr: SocketAddr,
    ) -> Response<crate::forward::ResponseBody> {
        let req = Request::get(format!("http://{addr}/v1/chat/completions"))
            .body(Full::default())
            .unwrap();
        tokio::time::timeout(WAIT, fwd.call(req))
            .await
            .expect("response in time")
            .expect("response")
    }

    /// Sends a GET and reads the whole body: its bytes, and how many frames brought them.
    async fn get(fwd: &mut Forward<Full<Bytes>>, addr: SocketAddr) -> (Vec<u8>, usize) {
        let mut body = Box::pin(call(fwd, addr).await.into_body());
        let (mut data, mut frames) = (Vec::new(), 0);
        while let Some(frame) = tokio::time::timeout(WAIT, body.frame()).await.unwrap() {
            data.extend_from_slice(&frame.unwrap().into_data().unwrap());
            frames += 1;
        }
        (data, frames)
    }

    fn idle_count(fwd: &Forward<Full<Bytes>>) -> usize {
        fwd.shared.client.idle_count()
    }

    fn sized(n: usize) -> Option<Vec<u8>> {
        Some(format!("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nr{n:02}").into_bytes())
    }

    fn chunked(n: usize) -> Option<Vec<u8>> {
        Some(
            format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nr{n:02}\r\n0\r\n\r\n"
            )
            .into_bytes(),
        )
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_after_sized_and_chunked_bodies() {
        let (addr, accepted, _) =
            upstream(|n| if n % 2 == 0 { sized(n) } else { chunked(n) }).await;
        let mut fwd = forward();
        for n in 0..4 {
            let (data, _) = get(&mut fwd, addr).await;
            assert_eq!(data, format!("r{n:02}").as_bytes());
            assert_eq!(idle_count(&fwd), 1, "request {n} returned its connection");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_reused() {
        // One response per connection, without `Connection: close`: the upstream just hangs up.
        let (addr, accepted, mut closed) = upstream(|n| if n == 0 { sized(0) } else { None }).await;
        let mut fwd = forward();
        for n in 0..3 {
            let (data, _) = get(&mut fwd, addr).await;
            assert_eq!(data, b"r00", "request {n}");
            // The upstream has closed the connection the pool holds.
            tokio::time::timeout(WAIT, closed.recv()).await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_empty_body_returns_its_connection_without_being_polled() {
        let (addr, accepted, _) =
            upstream(|_| Some(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec())).await;
        let mut fwd = forward();
        for n in 0..2 {
            let res = call(&mut fwd, addr).await;
            // As hyper's server does: a body already at its end is never polled.
            assert!(http_body::Body::is_end_stream(res.body()));
            drop(res);
            assert_eq!(idle_count(&fwd), 1, "request {n} returned its connection");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn idle_connections_expire_after_the_pool_idle_timeout() {
        let (addr, accepted, _) = upstream(sized).await;
        let mut fwd: Forward<Full<Bytes>> = ForwardBuilder::default()
            .pool_idle_timeout(Duration::from_millis(100))
            .build();
        get(&mut fwd, addr).await;
        assert_eq!(idle_count(&fwd), 1);
        tokio::time::timeout(WAIT, async {
            while idle_count(&fwd) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the reaper drops the expired connection");
        get(&mut fwd, addr).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_response_with_connection_close_does_not_go_back_to_the_pool() {
        let (addr, accepted, _) = upstream(|n| {
            Some(
                format!("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nr{n:02}")
                    .into_bytes(),
            )
        })
        .await;
        let mut fwd = forward();
        for _ in 0..2 {
            assert_eq!(get(&mut fwd, addr).await.0, b"r00");
            assert_eq!(idle_count(&fwd), 0);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    fn event(i: usize) -> String {
        format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i:05}\"}}}}]}}\n\n"
        )
    }

    fn fifty_events(_: usize) -> Option<Vec<u8>> {
        let mut out = String::from(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        for i in 0..50 {
            let e = event(i);
            out += &format!("{:x}\r\n{e}\r\n", e.len());
        }
        out += "0\r\n\r\n";
        Some(out.into_bytes())
    }

    #[tokio::test]
    async fn events_that_arrive_together_leave_as_one_frame() {
        let (addr, _, _) = upstream(fifty_events).await;
        let mut fwd = forward();
        let (data, frames) = get(&mut fwd, addr).await;
        let want: String = (0..50).map(event).collect();
        assert_eq!(data, want.as_bytes());
        // 50 events of ~60 bytes written at once: hyper reads them 8 KiB at a time at most.
        assert!(
            frames <= 2,
            "50 events that arrived together went out as {frames} frames"
        );
    }

    #[tokio::test]
    async fn a_lone_event_is_not_held_back_for_the_next() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (next_tx, mut next_rx) = mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_head(&mut stream).await;
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            stream.write_all(head.as_bytes()).await.unwrap();
            for i in 0..3 {
                let e = event(i);
                let chunk = format!("{:x}\r\n{e}\r\n", e.len());
                stream.write_all(chunk.as_bytes()).await.unwrap();
                // The next event is sent only once the client has seen this one.
                next_rx.recv().await.unwrap();
            }
            stream.write_all(b"0\r\n\r\n").await.unwrap();
        });
        let mut fwd = forward();
        let mut body = Box::pin(call(&mut fwd, addr).await.into_body());
        for i in 0..3 {
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .expect("the event arrives without the next one")
                .unwrap()
                .unwrap();
            assert_eq!(frame.into_data().unwrap(), event(i).as_bytes());
            next_tx.send(()).unwrap();
        }
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn an_upstream_that_hangs_up_mid_body_truncates_with_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_head(&mut stream).await;
            let cut = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
            stream.write_all(cut.as_bytes()).await.unwrap();
        });
        let mut fwd = forward();
        let mut body = Box::pin(call(&mut fwd, addr).await.into_body());
        let mut data = Vec::new();
        let err = loop {
            match tokio::time::timeout(WAIT, body.frame()).await.unwrap() {
                Some(Ok(frame)) => data.extend_from_slice(&frame.into_data().unwrap()),
                Some(Err(err)) => break err,
                None => panic!("a cut stream ended cleanly"),
            }
        };
        assert_eq!(data, b"hello");
        tracing::debug!(%err, "cut");
        assert_eq!(
            idle_count(&fwd),
            0,
            "a cut response never returns its connection"
        );
    }

    #[test]
    fn host_header_drops_only_the_default_port() {
        let cases = [
            ("http", "example.com", "example.com"),
            ("http", "example.com:80", "example.com"),
            ("http", "example.com:443", "example.com:443"),
            ("https", "example.com:443", "example.com"),
            ("https", "example.com:8443", "example.com:8443"),
            ("http", "127.0.0.1:8080", "127.0.0.1:8080"),
            ("http", "[::1]:8080", "[::1]:8080"),
        ];
        for (scheme, authority, want) in cases {
            let scheme: Scheme = scheme.parse().unwrap();
            let authority: Authority = authority.parse().unwrap();
            assert_eq!(
                host_header(&scheme, &authority).unwrap(),
                want,
                "{scheme}://{authority}"
            );
        }
    }

    #[tokio::test]
    async fn a_last_frame_held_while_joining_still_returns_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_head(&mut stream).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-length: 6000\r\n\r\n";
            let mut first = head.as_bytes().to_vec();
            first.extend_from_slice(&[b'a'; 1000]);
            stream.write_all(&first).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.write_all(&[b'b'; 5000]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut fwd = forward();
        let res = call(&mut fwd, addr).await;
        // Both writes are read before the body is polled: a small frame, then a large last one
        // that waits while the small one goes out. (Slower, the path is not taken, and the
        // test still passes.)
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut body = Box::pin(res.into_body());
        let mut n = 0;
        let mut frames = 0;
        // As hyper's server does: stop once is_end_stream says so.
        while !http_body::Body::is_end_stream(&*body) {
            let f = body.frame().await.unwrap().unwrap();
            n += f.into_data().unwrap().len();
            frames += 1;
        }
        assert_eq!(n, 6000);
        drop(body);
        assert_eq!(idle_count(&fwd), 1, "connection returned ({frames} frames)");
    }
}
