//! The upstream client service: forwarding a routed request and streaming the response back.
//!
//! [`Forward`] sends each request to its absolute URI (set by
//! [`CustomEndpointRouteLayer`](crate::route::CustomEndpointRouteLayer), or by the caller when
//! used alone) through its connection pool, [`UpstreamClient`], over rustls (system roots plus
//! an endpoint's own [`TlsSettings`]), HTTP/2 where the upstream offers it through ALPN:
//!
//! - the request is sent in origin form with the upstream's own `Host`, as HTTP/1.1 (or h2);
//! - hop-by-hop headers (`Connection` and every header it names, `Keep-Alive`,
//!   `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
//!   `Proxy-Authorization`, `Proxy-Authenticate`) are removed both ways, and so are `Cookie`
//!   and `Set-Cookie` unless [`ForwardBuilder::pass_cookies`] says otherwise;
//! - bodies stream both ways, never collected, and nothing waits for a frame that has not
//!   arrived: a lone response frame goes on at once, while small frames that were already
//!   read when the client's connection asks for more (token events that arrived together) are
//!   joined into one, so they leave in one write with one chunk header; large frames pass
//!   without a copy (see [`ResponseBody`]);
//! - an HTTP/1.1 upstream connection has no task of its own: the response future and then the
//!   response body drive it on the task that serves the client, so a frame crosses the gateway
//!   without a hand-off between tasks, and a slow client slows the upstream read (backpressure);
//!   once the body has ended the connection goes back to the pool, and dropping the body (a
//!   client that went away) closes it;
//! - redirects are passed to the client, never followed;
//! - timeouts: connect (TCP and TLS), first byte (the response head), and idle (the longest
//!   silence between two body frames, either way); an idle timeout mid-stream truncates the
//!   stream;
//! - an upstream 401 or 403 is the upstream refusing the gateway's own credential: it becomes
//!   [`UpstreamCredentialRejected`] and its body, which may echo the key, is dropped.
//!
//! Failures are `Err`s of small typed errors; put [`RescueLayer`](crate::error::RescueLayer)
//! above the stack to turn them into 502/504 JSON responses.
//!
//! # Pools
//!
//! An endpoint with several targets (or with retries) is sent to as a pool:
//!
//! - each attempt goes to a target chosen among the live ones of the best priority by the power
//!   of two weighted choices over latency and load (see the balancing rules in the README's
//!   *Upstream pools*), with the target's own headers set over the endpoint's and its own
//!   timeouts and TLS settings;
//! - a connect failure, a reset before the response head, a first-byte timeout or a status the
//!   endpoint's [`RetryPolicy`](crate::model::RetryPolicy) names is retried on another target
//!   (the next priority when the current one has no live target left), only while nothing has
//!   gone to the client; the request body is replayed from the frames already sent, up to
//!   `max_body_bytes`; the endpoint's retry budget caps retries at a share of its requests;
//! - failures eject a target for a growing cool-down, a 429 with `Retry-After` until then, and
//!   an optional health check brings it back early
//!   ([`TargetHealth`](crate::registry::TargetHealth) keeps what was learned);
//! - the response carries [`Served`](crate::ext::Served) (the target and the attempts), and the
//!   request span records `gateway.target` and `gateway.attempts`.
//!
//! ```
//! use tower_gateway::model::{RetryPolicy, TargetSpec};
//! use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};
//!
//! let registry = Registry::from_accounts(vec![AccountSpec {
//!     endpoints: vec![EndpointSpec {
//!         targets: vec![
//!             TargetSpec { weight: 3, ..TargetSpec::new("https://api.inference.wandb.ai/v1") },
//!             TargetSpec { priority: 2, ..TargetSpec::new("https://backup.example/v1") },
//!         ],
//!         retry: Some(RetryPolicy { attempts: 2, ..RetryPolicy::default() }),
//!         ..EndpointSpec::new("inference", "")
//!     }],
//!     ..AccountSpec::new("coreweave-model")
//! }])
//! .unwrap();
//! let ep = registry.endpoint("coreweave-model", "inference").unwrap();
//! assert_eq!(ep.targets().len(), 2);
//! assert!(!ep.is_single());
//! assert!(ep.targets()[1].health().is_live(0));
//! ```
//!
//! # Example
//!
//! ```no_run
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_gateway::error::RescueLayer;
//! use tower_gateway::forward::Forward;
//! use tower_gateway::inject::InjectHeadersLayer;
//! use http_body_util::Full;
//! use bytes::Bytes;
//!
//! # #[tokio::main]
//! # async fn main() {
//! // A single fixed upstream, no registry: the caller sets the absolute URI.
//! let mut headers = http::HeaderMap::new();
//! headers.insert("authorization", "Bearer upstream-key".parse().unwrap());
//! let svc = ServiceBuilder::new()
//!     .layer(RescueLayer::new())
//!     .layer(InjectHeadersLayer::fixed(headers))
//!     .service(Forward::<Full<Bytes>>::new());
//! let req = http::Request::get("https://api.inference.wandb.ai/v1/models")
//!     .body(Full::default())
//!     .unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! println!("{}", res.status());
//! # }
//! ```

mod attempts;
mod balance;
mod body;
mod conn;
mod eject;
mod idle;
mod pool;
mod replay;
mod served;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use pin_project_lite::pin_project;
use tower_service::Service;

pub use self::body::ResponseBody;
use self::idle::IdleTimeoutBody;
pub use self::pool::UpstreamClient;
pub use crate::error::{BodyIdleTimeout, ConnectError};
pub use crate::tls::{TlsError, TlsFiles, TlsSettings};

use crate::BoxError;
use crate::error::{
    InvalidRequestBody, NoUpstream, PayloadTooLarge, UnsupportedTransferEncoding,
    UpstreamCredentialRejected, UpstreamTimeout,
};
use crate::ext::RouteMatch;
use crate::hop::remove_hop_by_hop;
use crate::model::Timeouts;
use crate::tls;

/// The request body sent upstream: the client's body behind an idle timeout.
pub type UpstreamRequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// A connector whose whole connection setup, TCP and TLS handshake, has a deadline.
#[derive(Clone, Debug)]
pub struct ConnectTimeout<C> {
    inner: C,
    timeout: Duration,
}

impl<C> Service<http::Uri> for ConnectTimeout<C>
where
    C: Service<http::Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    // One allocation per new connection, not per request.
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_elapsed) => Err(ConnectTimedOut(timeout).into()),
            }
        })
    }
}

/// The connection (TCP and TLS) was not set up within the connect timeout.
#[derive(Debug, Clone, Copy)]
pub struct ConnectTimedOut(Duration);

impl fmt::Display for ConnectTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connecting to the upstream took longer than {:?}",
            self.0
        )
    }
}

impl std::error::Error for ConnectTimedOut {}

/// Default connect timeout: 10 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default first-byte timeout: 10 min, for long non-streaming completions of reasoning models.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default idle timeout between body frames: 5 min.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default largest request body: 32 MiB (a chat request with a few large images).
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 32 * 1024 * 1024;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Resolved {
    connect: Duration,
    first_byte: Duration,
    idle: Duration,
}

impl Resolved {
    fn with(self, t: Timeouts) -> Self {
        Self {
            connect: t.connect.unwrap_or(self.connect),
            first_byte: t.first_byte.unwrap_or(self.first_byte),
            idle: t.idle.unwrap_or(self.idle),
        }
    }
}

/// What every clone of a [`Forward`] shares: the default pool, the pools of endpoints that
/// connect differently, and the settings it was built with.
struct Shared {
    client: UpstreamClient,
    clients: Mutex<HashMap<PoolKey, UpstreamClient>>,
    settings: ForwardBuilder,
}

impl Shared {
    /// The client and timeouts for a target. Targets with their own TLS settings or connect
    /// timeout get a pool of their own, kept by this forwarder (not by the registry) and
    /// shared by every target that connects the same way; the others share the default pool.
    ///
    /// The default pool is borrowed: most requests take no reference count at all.
    fn client_for(
        &self,
        tls: Option<&Arc<TlsSettings>>,
        timeouts: Timeouts,
    ) -> (Cow<'_, UpstreamClient>, Resolved) {
        let defaults = self.settings.defaults;
        let t = defaults.with(timeouts);
        if tls.is_none() && t.connect == defaults.connect {
            return (Cow::Borrowed(&self.client), t);
        }
        let key = PoolKey {
            tls: tls.cloned(),
            connect: t.connect,
        };
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = clients.get(&key) {
            return (Cow::Owned(client.clone()), t);
        }
        // A new pool: first drop those whose settings no registry snapshot holds any more.
        clients.retain(|key, _| key.in_use());
        let tls = key
            .tls
            .as_ref()
            .map_or_else(tls::default_client_config, |s| s.client_config());
        let client = build_client(tls, t.connect, &self.settings);
        clients.insert(key, client.clone());
        (Cow::Owned(client), t)
    }
}

/// What decides how a connection is made, beyond the upstream's scheme and authority (which
/// key the connections inside each pool): the TLS settings and the connect timeout. Endpoints
/// that agree on both share one pool, whatever registry snapshot they come from, so a change
/// to one endpoint leaves every other endpoint's warm connections alone.
#[derive(Clone)]
struct PoolKey {
    /// Compared by identity: the registry keeps an endpoint's settings (an `Arc`) across
    /// every change that does not touch them.
    tls: Option<Arc<TlsSettings>>,
    connect: Duration,
}

impl PoolKey {
    fn tls_ptr(&self) -> *const TlsSettings {
        self.tls.as_ref().map_or(std::ptr::null(), Arc::as_ptr)
    }

    /// Whether some endpoint may still use this pool: its TLS settings are held by a
    /// registry snapshot. A pool for the connect timeout alone is cheap and always kept.
    fn in_use(&self) -> bool {
        self.tls
            .as_ref()
            .is_none_or(|tls| Arc::strong_count(tls) > 1)
    }
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        self.tls_ptr() == other.tls_ptr() && self.connect == other.connect
    }
}

impl Eq for PoolKey {}

impl Hash for PoolKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.tls_ptr().hash(state);
        self.connect.hash(state);
    }
}

/// A pooled client over `tls`, with the pool settings of `settings`.
fn build_client(
    tls: rustls::ClientConfig,
    connect: Duration,
    settings: &ForwardBuilder,
) -> UpstreamClient {
    let (pool_idle_timeout, pool_max_idle_per_host) =
        (settings.pool_idle_timeout, settings.pool_max_idle_per_host);
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let connector = ConnectTimeout {
        inner: https,
        timeout: connect,
    };
    UpstreamClient::new(connector, pool_idle_timeout, pool_max_idle_per_host)
}

/// Builds a [`Forward`].
#[derive(Clone, Debug)]
#[must_use]
pub struct ForwardBuilder {
    defaults: Resolved,
    max_request_body: u64,
    pass_cookies: bool,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
}

impl Default for ForwardBuilder {
    fn default() -> Self {
        Self {
            defaults: Resolved {
                connect: DEFAULT_CONNECT_TIMEOUT,
                first_byte: DEFAULT_FIRST_BYTE_TIMEOUT,
                idle: DEFAULT_IDLE_TIMEOUT,
            },
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            pass_cookies: false,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 64,
        }
    }
}

impl ForwardBuilder {
    /// Default connect timeout, for endpoints that set none.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.defaults.connect = d;
        self
    }

    /// Default first-byte timeout, for endpoints that set none.
    pub fn first_byte_timeout(mut self, d: Duration) -> Self {
        self.defaults.first_byte = d;
        self
    }

    /// Default idle timeout between body frames, for endpoints that set none.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.defaults.idle = d;
        self
    }

    /// The largest request body forwarded (default 32 MiB). A larger `Content-Length` is
    /// refused before the upstream is contacted; a streamed body that grows past it is cut.
    /// Both become a 413 once rescued.
    pub fn max_request_body(mut self, bytes: u64) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// Whether `Cookie` goes upstream and `Set-Cookie` comes back (default: neither). A
    /// client's cookies are credentials for the gateway's own domain, not the upstream's, and
    /// an upstream's cookies would be set on the gateway's domain.
    pub fn pass_cookies(mut self, pass: bool) -> Self {
        self.pass_cookies = pass;
        self
    }

    /// How long an idle pooled connection is kept (default 90 s).
    pub fn pool_idle_timeout(mut self, d: Duration) -> Self {
        self.pool_idle_timeout = d;
        self
    }

    /// How many idle HTTP/1.1 connections are kept per upstream host (default 64). Each holds
    /// about 20 KiB of buffers; a burst of streams beyond it reconnects instead of keeping
    /// its connections afterwards.
    pub fn pool_max_idle_per_host(mut self, n: usize) -> Self {
        self.pool_max_idle_per_host = n;
        self
    }

    /// Builds the service. The system trust roots are loaded on first use, once per process.
    pub fn build<B>(self) -> Forward<B> {
        let client = build_client(tls::default_client_config(), self.defaults.connect, &self);
        Forward {
            shared: Arc::new(Shared {
                client,
                clients: Mutex::new(HashMap::new()),
                settings: self,
            }),
            _body: PhantomData,
        }
    }
}

/// The forwarding service. See the [module docs](self).
///
/// `B` is the request body type: `hyper::body::Incoming` under a hyper server,
/// `axum::body::Body` under axum. Cloning is cheap; clones share the connection pool.
pub struct Forward<B = Incoming> {
    shared: Arc<Shared>,
    _body: PhantomData<fn(B)>,
}

impl<B> Forward<B> {
    /// A forwarder with the default timeouts and pool settings.
    pub fn new() -> Self {
        ForwardBuilder::default().build()
    }

    /// A builder for timeouts and pool settings.
    pub fn builder() -> ForwardBuilder {
        ForwardBuilder::default()
    }

    /// The same forwarder (sharing its connection pool) for another request body type.
    pub fn for_body<B2>(&self) -> Forward<B2> {
        Forward {
            shared: self.shared.clone(),
            _body: PhantomData,
        }
    }

    /// How many pools of their own endpoints have (for tests).
    #[cfg(test)]
    fn own_pools(&self) -> usize {
        self.shared.clients.lock().unwrap().len()
    }
}

impl<B> Default for Forward<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B> Clone for Forward<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _body: PhantomData,
        }
    }
}

impl<B> fmt::Debug for Forward<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for Forward<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Always ready: the pool connects or reuses per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        if parts.uri.scheme().is_none() || parts.uri.authority().is_none() {
            return ResponseFuture::failed(NoUpstream::new().into());
        }
        let settings = &self.shared.settings;
        let max = settings.max_request_body;
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max) || body.size_hint().lower() > max {
            return ResponseFuture::failed(PayloadTooLarge::new().into());
        }
        // Only plain chunked framing, which the server has already decoded, may be re-framed;
        // `gzip, chunked` or `chunked, chunked` would reach the upstream as something else.
        let mut codings = parts
            .headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter();
        if let Some(first) = codings.next()
            && (codings.next().is_some()
                || !first
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"chunked"))
        {
            return ResponseFuture::failed(UnsupportedTransferEncoding::new().into());
        }
        // The endpoint is held by the request's `RouteMatch`, which moves upstream with it.
        let route = parts.extensions.get::<RouteMatch>();
        let shared = &*self.shared;
        let (client, t) = match route {
            Some(r) if !r.target.is_single() => return self.call_pool(parts, body),
            Some(r) => {
                let target = &r.target.targets()[0];
                crate::registry::set_target_headers(&mut parts.headers, target.headers());
                shared.client_for(target.tls(), target.timeouts())
            }
            None => (Cow::Borrowed(&shared.client), settings.defaults),
        };
        prepare(&mut parts, settings.pass_cookies);
        let limit = usize::try_from(max).unwrap_or(usize::MAX);
        // A broken client body is the client's fault (400), not the upstream's.
        let body = body.map_err(|e| InvalidRequestBody(e.into()));
        let body = UnsyncBoxBody::new(IdleTimeoutBody::new(t.idle, Limited::new(body, limit)));
        let future = client.send(Request::from_parts(parts, body));
        ResponseFuture {
            state: State::Waiting {
                future: tokio::time::timeout(t.first_byte, future),
                idle: t.idle,
                pass_cookies: settings.pass_cookies,
            },
        }
    }
}

/// What every attempt's request has in common: no hop-by-hop headers, no `Host` (the
/// connection sets the upstream's), no cookies unless they pass, HTTP/1.1 semantics.
fn prepare(parts: &mut http::request::Parts, pass_cookies: bool) {
    remove_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    if !pass_cookies {
        parts.headers.remove(http::header::COOKIE);
    }
    parts.version = Version::HTTP_11;
}

impl<B> Forward<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// A request to an endpoint with a pool or retries: its body held for a replay, attempts
    /// made by [`attempts::Attempts`].
    fn call_pool(&self, mut parts: http::request::Parts, body: B) -> ResponseFuture {
        let settings = &self.shared.settings;
        let route = parts
            .extensions
            .remove::<RouteMatch>()
            .expect("called with a route");
        prepare(&mut parts, settings.pass_cookies);
        parts.extensions = http::Extensions::new();
        let limit = usize::try_from(settings.max_request_body).unwrap_or(usize::MAX);
        // The client's body is held once, behind its limit and the endpoint's idle timeout,
        // so that its failures are known to be the client's whichever attempt reads it.
        let idle = settings.defaults.with(route.target.timeouts()).idle;
        let body = body.map_err(|e| InvalidRequestBody(e.into()));
        let body = UnsyncBoxBody::new(IdleTimeoutBody::new(idle, Limited::new(body, limit)));
        let retry = route.target.pool().retry();
        // Held for a replay only if a retry can happen.
        let max = if retry.attempts > 1 {
            retry.max_body_bytes
        } else {
            0
        };
        let replay = replay::Replay::new(body, max);
        let attempts = attempts::Attempts {
            shared: self.shared.clone(),
            ep: route.target,
            path: route.upstream_path,
            parts,
            replay,
        };
        ResponseFuture {
            state: State::Pool {
                future: Box::pin(attempts.run()),
            },
        }
    }
}

pin_project! {
    /// Response future of [`Forward`].
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Waiting {
            #[pin]
            future: tokio::time::Timeout<pool::SendFuture>,
            idle: Duration,
            pass_cookies: bool,
        },
        Pool {
            future: Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, BoxError>> + Send>>,
        },
        Failed { error: Option<BoxError> },
    }
}

impl ResponseFuture {
    fn failed(error: BoxError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
            StateProj::Waiting {
                future,
                idle,
                pass_cookies,
            } => {
                let res = match ready!(future.poll(cx)) {
                    Err(_elapsed) => return Poll::Ready(Err(UpstreamTimeout::new().into())),
                    Ok(Err(err)) => return Poll::Ready(Err(err)),
                    Ok(Ok(res)) => res,
                };
                Poll::Ready(finish(res, *idle, *pass_cookies, None))
            }
            StateProj::Pool { future } => future.as_mut().poll(cx),
        }
    }
}

/// The client's response from an upstream response head: an upstream 401 or 403 becomes an
/// error, hop-by-hop headers and stale framing go, and the body streams behind the idle
/// timeout.
fn finish(
    res: Response<body::UpstreamBody>,
    idle: Duration,
    pass_cookies: bool,
    served: Option<Box<served::ServedBy>>,
) -> Result<Response<ResponseBody>, BoxError> {
    if res.status() == StatusCode::UNAUTHORIZED || res.status() == StatusCode::FORBIDDEN {
        tracing::warn!(
            status = res.status().as_u16(),
            "upstream rejected the gateway's credential"
        );
        return Err(UpstreamCredentialRejected::new().into());
    }
    let (mut parts, body) = res.into_parts();
    // RFC 9112 §6.3: a message with both framings was read as chunked; its
    // `Content-Length` is stale and would make the server cut the body short.
    if parts.headers.contains_key(http::header::TRANSFER_ENCODING) {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    remove_hop_by_hop(&mut parts.headers);
    // Only the gateway's own responses carry this header.
    parts.headers.remove(crate::error::X_GATEWAY_ERROR);
    if !pass_cookies {
        parts.headers.remove(http::header::SET_COOKIE);
    }
    // An event stream in plain text (an encoded one cannot take an added event).
    let sse = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        && parts
            .headers
            .get(http::header::CONTENT_ENCODING)
            .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let body = ResponseBody::upstream(IdleTimeoutBody::new(idle, body), sse, served);
    Ok(Response::from_parts(parts, body))
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AccountSpec;
    use crate::registry::{EndpointSpec, Registry, SharedRegistry};
    use http_body_util::Full;

    fn endpoint(
        name: &str,
        connect_ms: Option<u64>,
        tls: Option<&Arc<TlsSettings>>,
    ) -> EndpointSpec {
        EndpointSpec {
            timeouts: Timeouts::from_millis(connect_ms, None, None),
            tls: tls.cloned(),
            ..EndpointSpec::new(name, "https://example.com/v1")
        }
    }

    #[tokio::test]
    async fn endpoints_that_connect_alike_share_a_pool_that_outlives_registry_changes() {
        let tls = Arc::new(TlsSettings::from_pem(None, None, None).unwrap());
        let shared = SharedRegistry::new(
            Registry::from_accounts(vec![AccountSpec {
                endpoints: vec![
                    endpoint("a", None, Some(&tls)),
                    endpoint("b", None, Some(&tls)),
                    endpoint("c", Some(5), None),
                    endpoint("d", None, None),
                ],
                ..AccountSpec::new("x")
            }])
            .unwrap(),
        );
        let fwd = Forward::<Full<Bytes>>::new();
        let use_all = |names: &[&str]| {
            let registry = shared.load_full();
            for name in names {
                let ep = registry.endpoint("x", name).unwrap();
                fwd.shared.client_for(ep.tls(), ep.timeouts());
            }
        };
        use_all(&["a", "b", "c", "d"]);
        assert_eq!(
            fwd.own_pools(),
            2,
            "a and b share one; c has one; d the default"
        );
        // A change to d rebuilds every endpoint of the snapshot; the pools stay.
        shared
            .update(|specs| {
                specs[0].endpoints[3].base_url = "https://example.org/v1".into();
                Ok::<_, crate::model::FieldError>(())
            })
            .unwrap();
        use_all(&["a", "b", "c", "d"]);
        assert_eq!(fwd.own_pools(), 2);
        // New settings for a and b (a reload, say): the pool of the old ones goes once no
        // snapshot holds them.
        let fresh = Arc::new(TlsSettings::from_pem(None, None, None).unwrap());
        shared
            .update(|specs| {
                specs[0].endpoints[0].tls = Some(fresh.clone());
                specs[0].endpoints[1].tls = Some(fresh.clone());
                Ok::<_, crate::model::FieldError>(())
            })
            .unwrap();
        drop(tls);
        use_all(&["a", "b"]);
        assert_eq!(fwd.own_pools(), 2, "the old settings' pool was dropped");
    }
}
