//! The inline HTTP/1.1 connection: driven by the request future and then by the response body
//! that uses it, on the task that serves the client, instead of by a task of its own.
//!
//! Why it is hand-written and not hyper-util's legacy client: a connection run by a spawned
//! task hands every body frame from that task to the client's, and a token event waits for
//! the hand-off; driven inline, a frame goes from the upstream socket to the client's without
//! one, and every frame already read is seen on the same poll (`benches/streaming.rs` measures
//! the gateway against nginx on exactly this).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use http::uri::{Authority, Scheme};
use hyper::client::conn::http1;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::UpstreamRequestBody;

/// What the connector yields: TCP, with TLS for `https`.
pub(crate) type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Where a connection goes: an upstream's scheme and authority.
pub(crate) type Key = (Scheme, Authority);

/// The upstream connection closed before the response body ended, without saying why.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionClosed;

impl fmt::Display for ConnectionClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the upstream connection closed before the response ended")
    }
}

impl std::error::Error for ConnectionClosed {}

/// An HTTP/1.1 connection and the handle that sends requests on it. The connection makes
/// progress only when [`drive`](Self::drive)n.
pub(crate) struct H1Conn {
    pub(crate) send: http1::SendRequest<UpstreamRequestBody>,
    /// `None` once the connection has closed.
    pub(crate) conn: Option<http1::Connection<Io, UpstreamRequestBody>>,
}

impl H1Conn {
    /// Lets the connection write and read what it can. Returns `false` once it has closed.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = &mut self.conn else {
            return false;
        };
        match Pin::new(conn).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                if let Err(error) = result {
                    // The request or the response body has been given the error too.
                    tracing::debug!(%error, "upstream connection failed");
                }
                self.conn = None;
                false
            }
        }
    }

    /// Whether the connection is open and waiting for a request. Lets it read first, so that
    /// an upstream that closed it (or wrote something unasked) is noticed.
    pub(crate) fn is_reusable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx) && matches!(self.send.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }
}

/// Where a finished HTTP/1.1 response body returns its connection.
pub(crate) struct Return {
    pool: Weak<dyn Checkin>,
    key: Key,
}

impl Return {
    pub(crate) fn new(pool: Weak<dyn Checkin>, key: Key) -> Self {
        Self { pool, key }
    }

    pub(crate) fn checkin(self, conn: Box<H1Conn>) {
        if let Some(pool) = self.pool.upgrade() {
            pool.checkin(self.key, conn);
        }
    }
}

/// A pool that takes connections back. A body knows its pool only by this, so the body needs
/// nothing of the pool while the pool builds bodies.
pub(crate) trait Checkin: Send + Sync {
    /// Takes back a connection whose response has ended, if it can carry another request.
    fn checkin(self: Arc<Self>, key: Key, conn: Box<H1Conn>);
}
