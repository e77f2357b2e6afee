//! Serving a gateway (or any tower HTTP service) on a TCP listener, with graceful shutdown.
//!
//! [`serve`] accepts connections (HTTP/1.1 and HTTP/2, `TCP_NODELAY` on every socket so a
//! small token event is never held back by Nagle), refuses an HTTP/1.1 request without exactly
//! one `Host` (400), serves each with hyper-util's auto connection builder (a client has 30 s to send a request head), and when `shutdown`
//! completes stops accepting, lets in-flight requests and streams finish within a grace
//! period, then closes what is left.
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
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
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
    serve_with_grace(listener, service, shutdown, DEFAULT_GRACE_PERIOD).await
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper has no header-read timeout at all (slowloris).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Reap finished connection tasks so the set stays as small as the open connections.
        while connections.try_join_next().is_some() {}
        tokio::select! {
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
                let svc = HostGuard { inner: service.clone() };
                let conn = builder
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                    .into_owned();
                let conn = graceful.watch(conn);
                connections.spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, open = connections.len(), "grace period over; closing remaining connections");
            connections.abort_all();
        }
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}
