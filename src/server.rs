//! Serving a gateway (or any tower HTTP service) on a TCP listener, with graceful shutdown.
//!
//! [`serve`] accepts connections (HTTP/1.1 and HTTP/2, `TCP_NODELAY` on every socket so a
//! small token event is never held back by Nagle), refuses an HTTP/1.1 request without exactly
//! one `Host` (400), serves each as HTTP/1.1 or, when its first bytes are the HTTP/2 preface,
//! HTTP/2 (a client has 30 s to send a request head; a connection's task holds only its own
//! protocol's state, which keeps an open stream's memory down), and when `shutdown`
//! completes stops accepting, lets in-flight requests and streams finish within a grace
//! period, then closes what is left.
//!
//! After a burst, the allocator keeps what closed connections freed (on glibc, most of it,
//! however long the process then idles). With [`ServeOptions::release_memory`] turned on,
//! [`serve_with_options`] gives it back: once at least [`RELEASE_MEMORY_AFTER`] connections have
//! closed and at most half of the most that were open remain, it asks glibc to return its free
//! pages (`malloc_trim`), off the runtime's worker threads, at most once per
//! [`RELEASE_MEMORY_INTERVAL`]; a steady load never triggers it. It is off by default (and so
//! in [`serve`] and [`serve_with_grace`]): giving memory back with glibc's `malloc_trim` is the
//! application's decision, not a library's. It does nothing on other C libraries, or for
//! memory a custom `#[global_allocator]` owns (tune that allocator instead).
//!
//! ```no_run
//! use tower_gateway::gateway::Gateway;
//!
//! # #[tokio::main]
//! # async fn main() -> std::io::Result<()> {
//! let gateway = Gateway::builder().build();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! println!("listening on http://{}", listener.local_addr()?);
//! tower_gateway::server::serve(listener, gateway.service(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tower_service::Service;

use crate::BoxError;
use crate::error::{GatewayError, ResponseFuture};

/// Refuses what RFC 9112 §3.2 says a server must refuse: an HTTP/1.1 request without exactly
/// one `Host`, and any request with several.
#[derive(Clone)]
struct HostGuard<S> {
    inner: S,
}

impl<S, B> Service<Request<Incoming>> for HostGuard<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    B: From<Bytes>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, B>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let hosts = req.headers().get_all(http::header::HOST).iter().count();
        if hosts > 1 || (hosts == 0 && req.version() == http::Version::HTTP_11) {
            let err = GatewayError::new(
                http::StatusCode::BAD_REQUEST,
                "invalid_request",
                "An HTTP/1.1 request needs exactly one Host header.",
            );
            return ResponseFuture::reject(err.into_response());
        }
        ResponseFuture::inner(self.inner.call(req))
    }
}

/// How long in-flight requests may run on after shutdown begins, by default: 30 s.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);

/// How long a client may take to send a request head: 30 s.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How many connections must have closed since the last release before
/// [`serve_with_options`] gives free memory back to the system, when
/// [`ServeOptions::release_memory`] is on: 64.
pub const RELEASE_MEMORY_AFTER: usize = 64;

/// How often [`serve_with_options`] looks at whether connections have closed, when
/// [`ServeOptions::release_memory`] is on, and so the most often it gives memory back: 1 s.
pub const RELEASE_MEMORY_INTERVAL: Duration = Duration::from_secs(1);

/// How [`serve_with_options`] runs: the grace period, and whether memory goes back to the
/// system after bursts.
///
/// By default the grace period is [`DEFAULT_GRACE_PERIOD`] and memory is not released: giving
/// the allocator's free pages back with glibc's `malloc_trim` is the application's decision,
/// so an application that wants it turns it on with [`release_memory(true)`](Self::release_memory).
///
/// ```
/// use std::time::Duration;
/// use tower_gateway::server::ServeOptions;
///
/// let options = ServeOptions::new()
///     .grace_period(Duration::from_secs(10))
///     .release_memory(true);
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    grace: Duration,
    release_memory: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            grace: DEFAULT_GRACE_PERIOD,
            release_memory: false,
        }
    }
}

impl ServeOptions {
    /// The defaults: a grace period of [`DEFAULT_GRACE_PERIOD`], memory not released.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long in-flight requests may run on after shutdown begins.
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Whether to give the allocator's free memory back to the system (glibc's `malloc_trim`)
    /// once many connections have closed (see the [module docs](self)). Off by default: that is
    /// the application's decision.
    pub fn release_memory(mut self, release: bool) -> Self {
        self.release_memory = release;
        self
    }
}

/// Serves `service` on `listener` until `shutdown` completes, then drains for
/// [`DEFAULT_GRACE_PERIOD`].
pub async fn serve<S, B, F>(listener: TcpListener, service: S, shutdown: F) -> io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    F: Future<Output = ()>,
{
    serve_with_options(listener, service, shutdown, ServeOptions::default()).await
}

/// Like [`serve`], with the grace period given.
pub async fn serve_with_grace<S, B, F>(
    listener: TcpListener,
    service: S,
    shutdown: F,
    grace: Duration,
) -> io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    F: Future<Output = ()>,
{
    let options = ServeOptions::default().grace_period(grace);
    serve_with_options(listener, service, shutdown, options).await
}

/// Like [`serve`], with [`ServeOptions`].
pub async fn serve_with_options<S, B, F>(
    listener: TcpListener,
    service: S,
    shutdown: F,
    options: ServeOptions,
) -> io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    F: Future<Output = ()>,
{
    let builders = Arc::new(Builders::new());
    let graceful = GracefulShutdown::new();
    // Tells connections still waiting for their first bytes that shutdown has begun.
    let (stopping, stopping_rx) = tokio::sync::watch::channel(());
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut release = MemoryRelease::new(options.release_memory);
    let mut check = tokio::time::interval(RELEASE_MEMORY_INTERVAL);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Reap finished connection tasks so the set stays as small as the open connections.
        while connections.try_join_next().is_some() {}
        tokio::select! {
            _ = check.tick(), if release.enabled => release.check(connections.len()),
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "could not set TCP_NODELAY");
                }
                let svc = TowerToHyperService::new(HostGuard { inner: service.clone() });
                let builders = Arc::clone(&builders);
                let watcher = graceful.watcher();
                let mut stopping = stopping_rx.clone();
                connections.spawn(async move {
                    let sniffed = tokio::select! {
                        sniffed = tokio::time::timeout(HEADER_READ_TIMEOUT, sniff(&stream)) => sniffed,
                        _ = stopping.changed() => return,
                    };
                    let io = TokioIo::new(stream);
                    // Each protocol's connection is its own future, so an HTTP/1.1 connection's
                    // task holds HTTP/1.1 state only; the others are boxed.
                    let served: Result<(), BoxError> = match sniffed {
                        Ok(Ok(Protocol::Http1)) => watcher
                            .watch(builders.http1.serve_connection(io, svc))
                            .await
                            .map_err(Into::into),
                        Ok(Ok(Protocol::Http2)) => {
                            Box::pin(watcher.watch(builders.http2.serve_connection(io, svc)))
                                .await
                                .map_err(Into::into)
                        }
                        Ok(Ok(Protocol::Unsure)) => {
                            Box::pin(watcher.watch(builders.auto.serve_connection(io, svc))).await
                        }
                        Ok(Err(err)) => Err(err.into()),
                        // Nothing sent within the header-read timeout.
                        Err(_) => return,
                    };
                    if let Err(err) = served {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                });
                release.opened(connections.len());
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    drop(stopping);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(options.grace) => {
            tracing::warn!(grace = ?options.grace, open = connections.len(), "grace period over; closing remaining connections");
            connections.abort_all();
        }
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// hyper's connection builders, shared by every connection.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// For a connection whose first bytes do not tell yet: hyper-util reads until they do.
    auto: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new() -> Self {
        // The same settings on each builder. Without a timer hyper has no header-read timeout
        // at all (slowloris).
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(HTTP2_KEEP_ALIVE_INTERVAL);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        auto.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(HTTP2_KEEP_ALIVE_INTERVAL);
        Self { http1, http2, auto }
    }
}

/// What a connection's first bytes say it speaks.
#[derive(Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge: the connection preface.
    Http2,
    /// The start of the preface, not all of it yet.
    Unsure,
}

/// How often an HTTP/2 connection pings its client: 20 s.
const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits for a connection's first bytes and tells its protocol from them, without reading
/// them (hyper reads them again).
async fn sniff(stream: &TcpStream) -> io::Result<Protocol> {
    let mut first = [0; H2_PREFACE.len()];
    let n = stream.peek(&mut first).await?;
    Ok(protocol_of(&first[..n]))
}

fn protocol_of(first: &[u8]) -> Protocol {
    if first.is_empty() || !H2_PREFACE.starts_with(first) {
        Protocol::Http1
    } else if first.len() == H2_PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Unsure
    }
}

/// When to give free memory back: after at least [`RELEASE_MEMORY_AFTER`] connections closed
/// and at most half of the most recently seen peak remain open.
#[derive(Debug)]
struct MemoryRelease {
    enabled: bool,
    /// The most connections open at once since the last release.
    peak: usize,
}

impl MemoryRelease {
    fn new(enabled: bool) -> Self {
        Self {
            enabled: enabled && cfg!(all(target_os = "linux", target_env = "gnu")),
            peak: 0,
        }
    }

    fn opened(&mut self, open: usize) {
        self.peak = self.peak.max(open);
    }

    /// Whether `open` connections, against the peak, call for a release.
    fn due(&self, open: usize) -> bool {
        self.peak.saturating_sub(open) >= RELEASE_MEMORY_AFTER && open <= self.peak / 2
    }

    fn check(&mut self, open: usize) {
        if self.due(open) {
            let closed = self.peak - open;
            self.peak = open;
            // malloc_trim walks every arena: keep it off the runtime's worker threads.
            drop(tokio::task::spawn_blocking(move || {
                let start = std::time::Instant::now();
                release_free_memory();
                tracing::debug!(closed, took = ?start.elapsed(), "gave free memory back to the system");
            }));
        }
    }
}

/// Asks the allocator to return its free pages to the system: glibc's `malloc_trim(0)`, which
/// also returns free pages in the middle of its heaps, not only at their top.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: malloc_trim has no preconditions; it takes the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_release_waits_for_a_burst_to_end() {
        let mut release = MemoryRelease {
            enabled: true,
            peak: 0,
        };
        // A steady load: connections come and go, never many fewer than the peak.
        for open in [10, 40, 35, 50, 45] {
            release.opened(open);
            assert!(
                !release.due(open),
                "{open} open of a peak of {}",
                release.peak
            );
        }
        // A burst of 1,000 that ends: not due while more than half remain.
        release.opened(1_000);
        assert!(!release.due(900));
        assert!(!release.due(501));
        assert!(release.due(500));
        assert!(release.due(0));
        // Releasing resets the peak to what is open, so it is not due again at once.
        release.check(0);
        assert_eq!(release.peak, 0);
        assert!(!release.due(0));
        // Fewer than RELEASE_MEMORY_AFTER closed is never due, however small the rest.
        release.opened(RELEASE_MEMORY_AFTER - 1);
        assert!(!release.due(0));
        release.opened(RELEASE_MEMORY_AFTER);
        assert!(release.due(0));
    }

    #[test]
    fn memory_is_not_released_by_default() {
        assert!(!ServeOptions::default().release_memory);
        assert!(!ServeOptions::new().release_memory);
        assert!(!MemoryRelease::new(ServeOptions::default().release_memory).enabled);
        assert!(ServeOptions::new().release_memory(true).release_memory);
    }

    #[test]
    fn the_first_bytes_tell_the_protocol() {
        assert_eq!(protocol_of(b""), Protocol::Http1);
        assert_eq!(
            protocol_of(b"POST /proxy-api/a/b HTTP/1.1\r\n"),
            Protocol::Http1
        );
        assert_eq!(protocol_of(b"PRI * HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(protocol_of(b"P"), Protocol::Unsure);
        assert_eq!(protocol_of(b"PRI * HTTP/2.0\r\n"), Protocol::Unsure);
        assert_eq!(protocol_of(H2_PREFACE), Protocol::Http2);
    }
}
