//! A builder that assembles the whole stack, in the right order.
//!
//! [`Gateway`] holds the key store, the [`SharedRegistry`] and the forwarder's connection
//! pool, and can [reload](Gateway::reload) its configuration file without a restart; [`Gateway::service`] returns the full stack
//! (`Rescue → GatewayAuth → CustomEndpointRoute → AccessControl → InjectHeaders →
//! IdentityEncoding → Forward`)
//! as a tower `Service` with error type `Infallible`, to serve with hyper
//! ([`server::serve`](crate::server::serve)) or to mount in an axum `Router`.
//!
//! # Example: from a configuration file
//!
//! ```no_run
//! use tower_gateway::gateway::Gateway;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gateway = Gateway::load("gateway.toml")?;
//! let svc = gateway.service::<hyper::body::Incoming>();
//! // Later, e.g. on SIGHUP: a bad file is refused and the running configuration stays.
//! if let Err(err) = gateway.reload() {
//!     eprintln!("reload refused: {err}");
//! }
//! # let _ = svc;
//! # Ok(())
//! # }
//! ```
//!
//! # Example: in code, mounted in axum
//!
//! axum's `nest_service` strips the prefix it is mounted at, so mount the gateway with
//! `route_service` on a wildcard, which keeps the path whole:
//!
//! ```
//! use axum::Router;
//! use tower_gateway::auth::{HashedKeyStore, Principal};
//! use tower_gateway::gateway::Gateway;
//! use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};
//!
//! let keys = HashedKeyStore::new()
//!     .with_key("gw-alice", Principal::new("alice", "alice@example.com", ["research"]))
//!     .unwrap();
//! let registry = Registry::from_accounts(vec![AccountSpec {
//!     endpoints: vec![EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1")],
//!     ..AccountSpec::new("coreweave-model")
//! }])
//! .unwrap();
//! let gateway = Gateway::builder().keys(keys).registry(registry.into()).build();
//!
//! let app: Router = Router::new()
//!     .route("/health", axum::routing::get(|| async { "ok" }))
//!     .route_service("/proxy-api/{*path}", gateway.service::<axum::body::Body>());
//! # let _ = app;
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::body::Incoming;
use tower_layer::Layer;

use crate::access::{AccessControl, AccessControlLayer};
use crate::auth::{GatewayAuth, GatewayAuthLayer, HashedKeyStore, KeyStore, SharedKeyStore};
use crate::config::{ConfigError, GatewayConfig};
use crate::encoding::{IdentityEncoding, IdentityEncodingLayer};
use crate::error::{Rescue, RescueLayer};
use crate::forward::{Forward, ForwardBuilder, ResponseBody};
use crate::inject::{InjectHeaders, InjectHeadersLayer};
use crate::limits::{LimitUsage, RateLimit, RateLimitLayer, ResponseBody as LimitedBody};
#[cfg(feature = "manage")]
use crate::manage::{DEFAULT_MANAGEMENT_PREFIX, Management};
use crate::model::{
    FieldError, KeyRecord, LimitBackend, LimitRules, RateLimits, Snapshot, Subject, Writer,
};
use crate::registry::{Live, MemoryWriter, SharedLimitRules, SharedRegistry};
use crate::route::{CustomEndpointRoute, CustomEndpointRouteLayer, DEFAULT_PATH_PREFIX};
#[cfg(feature = "store")]
use crate::store::{Store, StoreError, StoreWriter};
use crate::trace::{
    AcceptRequestId, AcceptRequestIdLayer, GatewayRequestId, GatewayTrace, UpstreamRequestId,
    UpstreamRequestIdLayer,
};
use crate::usage::{TapRequestBody, UsageBody, UsageTap, UsageTapLayer};
use tower_http::map_response_body::{MapResponseBody, MapResponseBodyLayer};
use tower_http::request_id::{PropagateRequestId, SetRequestId};

/// The full stack for request body `B`, as returned by [`Gateway::service`].
pub type GatewayService<K, B> = Traced<
    Rescue<
        GatewayAuth<
            CustomEndpointRoute<
                UsageTap<
                    AccessControl<
                        RateLimit<InjectHeaders<IdentityEncoding<Forward<TapRequestBody<B>>>>>,
                    >,
                >,
            >,
            K,
        >,
    >,
    UsageBody<LimitedBody<ResponseBody>>,
>;

/// The management API behind authentication, as returned by [`Gateway::management_service`].
#[cfg(feature = "manage")]
pub type ManagementService<K> = Traced<Rescue<GatewayAuth<Management, K>>, axum::body::Body>;

/// The [`trace`](crate::trace) layers around a service `S` whose responses have body `B`:
/// request ids, the request span, and the body boxed into a [`ResponseBody`].
pub type Traced<S, B> = AcceptRequestId<
    SetRequestId<
        MapResponseBody<
            GatewayTrace<PropagateRequestId<UpstreamRequestId<S>>>,
            fn(TracedBody<B>) -> ResponseBody,
        >,
        GatewayRequestId,
    >,
>;

/// A response body under [`GatewayTrace`].
pub type TracedBody<B> = tower_http::trace::ResponseBody<
    B,
    tower_http::classify::NeverClassifyEos<tower_http::classify::ServerErrorsFailureClass>,
    (),
    (),
    crate::trace::RecordFailure,
>;

fn boxed<B>(body: TracedBody<B>) -> ResponseBody
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::BoxError> + fmt::Display,
{
    ResponseBody::new(body)
}

fn traced<S, B>(service: &'static str, metrics: bool, inner: S) -> Traced<S, B>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::BoxError> + fmt::Display,
{
    let stack = UpstreamRequestIdLayer::new().layer(inner);
    let stack = crate::trace::propagate_request_id().layer(stack);
    let stack = crate::trace::layer(service, metrics).layer(stack);
    let stack =
        MapResponseBodyLayer::new(boxed::<B> as fn(TracedBody<B>) -> ResponseBody).layer(stack);
    let stack = crate::trace::set_request_id().layer(stack);
    AcceptRequestIdLayer::new().layer(stack)
}

/// An assembled gateway: key store, registry and connection pool. Cheap to clone; clones
/// share everything.
pub struct Gateway<K = SharedKeyStore> {
    keys: Arc<K>,
    registry: SharedRegistry,
    route: CustomEndpointRouteLayer,
    path_prefix: Arc<str>,
    forward: Forward<Incoming>,
    #[cfg(feature = "manage")]
    management: Management,
    source: Option<Arc<Path>>,
    max_request_body: Option<u64>,
    usage: UsageTapLayer,
    metrics: bool,
    live: Live,
    /// One limiter for every service this gateway makes, so they count together.
    rate_limit: RateLimitLayer,
    /// Whether the limits' backend was set apart from the file (`--redis`): a reload then
    /// keeps it, whatever the file says.
    fixed_backend: bool,
    #[cfg(feature = "store")]
    store: Option<Store>,
}

impl Gateway {
    /// A builder with no keys and no endpoints, the `/proxy-api` prefix and default timeouts.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            keys: SharedKeyStore::default(),
            registry: SharedRegistry::default(),
            path_prefix: DEFAULT_PATH_PREFIX.to_owned(),
            #[cfg(feature = "manage")]
            management_prefix: DEFAULT_MANAGEMENT_PREFIX.to_owned(),
            public_url: None,
            forward: ForwardBuilder::default(),
            source: None,
            max_request_body: None,
            usage: UsageTapLayer::new(),
            metrics: true,
            live_keys: SharedKeyStore::default(),
            key_records: Vec::new(),
            admins: Vec::new(),
            rate_limits: RateLimits::default(),
            fixed_backend: false,
        }
    }

    /// A gateway for a loaded configuration.
    pub fn from_config(config: GatewayConfig) -> Self {
        Self::builder().config(config).build()
    }

    /// Loads the configuration file at `path`; [`reload`](Self::reload) reads it again.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Ok(Self::builder().config_file(path)?.build())
    }

    /// Reads the configuration file again and applies it (see [`apply`](Self::apply)). A file
    /// that fails to load changes nothing and the error says why.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let path = self.source.as_ref().ok_or_else(|| {
            ConfigError::new(
                "reload",
                "this gateway was not loaded from a file (use Gateway::load)",
            )
        })?;
        let config = GatewayConfig::load(path)?;
        self.apply(config)?;
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(())
    }

    /// Swaps in a new configuration's keys and endpoints while traffic flows: requests and
    /// streams already in flight finish on the configuration they started with; the next
    /// request sees the new one. The path prefix cannot change while running.
    pub fn apply(&self, config: GatewayConfig) -> Result<(), ConfigError> {
        if config.path_prefix != *self.path_prefix {
            return Err(ConfigError::new(
                "path_prefix",
                "cannot change while the gateway runs; restart it to change the prefix",
            ));
        }
        // The rules change while running (below, or through the store); where and how they
        // are counted does not.
        let running = self.rate_limit.settings();
        let mut wanted = RateLimits {
            rules: Vec::new(),
            ..config.rate_limits.clone()
        };
        if self.fixed_backend {
            wanted.backend = running.backend.clone();
        }
        if wanted != *running {
            return Err(ConfigError::new(
                "rate_limits",
                "backend, on_backend_error, key_prefix and reserve_tokens cannot change while \
                 the gateway runs; restart it to change them (the rules can)",
            ));
        }
        if config.max_request_body != self.max_request_body {
            return Err(ConfigError::new(
                "limits.max_request_body_bytes",
                "cannot change while the gateway runs; restart it to change the limit",
            ));
        }
        #[cfg(feature = "store")]
        let on_store = self.store.is_some();
        #[cfg(not(feature = "store"))]
        let on_store = false;
        // On a store, the store holds the keys, accounts and grants; the file gives only the
        // settings.
        if !on_store {
            let rules = self.live.rules().load();
            let rate_limits = (rules.rules != config.rate_limits.rules).then(|| LimitRules {
                rules: config.rate_limits.rules,
                version: rules.version + 1,
            });
            self.live.apply(Snapshot {
                accounts: config.registry.specs().to_vec(),
                keys: config.key_records,
                rate_limits,
            })?;
        }
        #[cfg(feature = "manage")]
        self.management.set_admins(config.admins);
        Ok(())
    }
}

impl<K: KeyStore> Gateway<K> {
    /// The full stack, for request body `B` (`hyper::body::Incoming` under hyper,
    /// `axum::body::Body` under axum). Every service shares this gateway's key store,
    /// registry and connection pool.
    pub fn service<B>(&self) -> GatewayService<K, B> {
        let forward = self.forward.for_body::<TapRequestBody<B>>();
        let stack = IdentityEncodingLayer::new().layer(forward);
        let stack = InjectHeadersLayer::from_route().layer(stack);
        let stack = self.rate_limit.layer(stack);
        let stack = AccessControlLayer::new().layer(stack);
        let stack = self.usage.layer(stack);
        let stack = self.route.layer(stack);
        let stack = GatewayAuthLayer::from_arc(self.keys.clone()).layer(stack);
        traced("proxy", self.metrics, RescueLayer::new().layer(stack))
    }

    /// The current usage of every rate limit of `scope` (`team:NAME`, `user:SUBJECT` or
    /// `key:ID`), read from the limits' backend without charging anything: see
    /// [`RateLimitLayer::usage`].
    pub async fn rate_limits_usage(&self, scope: &str) -> Result<Vec<LimitUsage>, String> {
        self.rate_limit.usage(scope).await
    }

    /// The [management API](crate::manage) behind the same authentication, answering under
    /// [`GatewayBuilder::management_prefix`] (`/manage` by default). It serves any request body
    /// type.
    #[cfg(feature = "manage")]
    pub fn management_service(&self) -> ManagementService<K> {
        let stack = GatewayAuthLayer::from_arc(self.keys.clone()).layer(self.management.clone());
        traced("manage", self.metrics, RescueLayer::new().layer(stack))
    }
}

#[cfg(feature = "manage")]
impl<K: KeyStore> Gateway<K> {
    /// The proxy and the management API on one service: requests under the management prefix
    /// go to [`management_service`](Self::management_service), all others to
    /// [`service`](Self::service). This is what `examples/gateway.rs` serves.
    pub fn app<B>(&self) -> GatewayApp<K, B> {
        GatewayApp {
            proxy: self.service(),
            management: self.management_service(),
            management_prefix: self.management.prefix_str().into(),
            #[cfg(feature = "store")]
            health: self.store.as_ref().map(Store::health),
            // The console needs the management API, and serves nothing without it.
            #[cfg(feature = "console")]
            console: (!self.management.prefix_str().is_empty()).then(|| {
                Arc::new(crate::console::Console::new(
                    self.management.prefix_str(),
                    self.path_prefix(),
                ))
            }),
        }
    }
}

impl<K> Gateway<K> {
    /// The registry; [`SharedRegistry::store`] swaps it while traffic flows.
    pub fn registry(&self) -> &SharedRegistry {
        &self.registry
    }

    /// The live state: the registry, the managed keys and their records.
    pub fn live(&self) -> &Live {
        &self.live
    }

    /// The store this gateway runs on, if any.
    #[cfg(feature = "store")]
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// The key store.
    pub fn key_store(&self) -> &Arc<K> {
        &self.keys
    }

    /// The path prefix, e.g. `/proxy-api`.
    pub fn path_prefix(&self) -> &str {
        &self.path_prefix
    }

    /// The configuration file this gateway was loaded from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }
}

impl<K> Clone for Gateway<K> {
    fn clone(&self) -> Self {
        Self {
            keys: self.keys.clone(),
            registry: self.registry.clone(),
            route: self.route.clone(),
            path_prefix: self.path_prefix.clone(),
            forward: self.forward.clone(),
            #[cfg(feature = "manage")]
            management: self.management.clone(),
            source: self.source.clone(),
            max_request_body: self.max_request_body,
            usage: self.usage.clone(),
            metrics: self.metrics,
            live: self.live.clone(),
            rate_limit: self.rate_limit.clone(),
            fixed_backend: self.fixed_backend,
            #[cfg(feature = "store")]
            store: self.store.clone(),
        }
    }
}

impl<K> fmt::Debug for Gateway<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("path_prefix", &self.path_prefix)
            .field("registry", &self.registry)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The proxy and the management API on one service; see [`Gateway::app`].
#[cfg(feature = "manage")]
pub struct GatewayApp<K, B> {
    proxy: GatewayService<K, B>,
    management: ManagementService<K>,
    management_prefix: Arc<str>,
    #[cfg(feature = "store")]
    health: Option<tokio::sync::watch::Receiver<crate::store::Health>>,
    #[cfg(feature = "console")]
    console: Option<Arc<crate::console::Console>>,
}

#[cfg(feature = "manage")]
impl<K, B> Clone for GatewayApp<K, B> {
    fn clone(&self) -> Self {
        Self {
            proxy: self.proxy.clone(),
            management: self.management.clone(),
            management_prefix: self.management_prefix.clone(),
            #[cfg(feature = "store")]
            health: self.health.clone(),
            #[cfg(feature = "console")]
            console: self.console.clone(),
        }
    }
}

#[cfg(feature = "manage")]
impl<K, B> fmt::Debug for GatewayApp<K, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayApp")
            .field("management_prefix", &self.management_prefix)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "manage")]
impl<K, B> tower_service::Service<http::Request<B>> for GatewayApp<K, B>
where
    K: KeyStore,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::BoxError>,
{
    type Response = http::Response<crate::forward::ResponseBody>;
    type Error = std::convert::Infallible;
    type Future = AppFuture<
        <GatewayService<K, B> as tower_service::Service<http::Request<B>>>::Future,
        <ManagementService<K> as tower_service::Service<http::Request<B>>>::Future,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Both are always ready: `Rescue` turns readiness errors into responses and the
        // forwarder and the management API never wait.
        std::task::ready!(tower_service::Service::<http::Request<B>>::poll_ready(
            &mut self.proxy,
            cx
        ))?;
        tower_service::Service::<http::Request<B>>::poll_ready(&mut self.management, cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let probe = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
        if probe && (path == "/healthz" || path == "/readyz") {
            let response = if path == "/healthz" {
                probe_answer(http::StatusCode::OK, serde_json::json!({"status": "ok"}))
            } else {
                self.readiness()
            };
            return AppFuture {
                kind: AppKind::Probe {
                    response: Some(response),
                },
            };
        }
        #[cfg(feature = "console")]
        if probe
            && path.starts_with(crate::console::PATH)
            && let Some(response) = self.console.as_ref().and_then(|c| c.respond(path))
        {
            return AppFuture {
                kind: AppKind::Probe {
                    response: Some(response),
                },
            };
        }
        let to_management = !self.management_prefix.is_empty()
            && path
                .strip_prefix(&*self.management_prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if to_management {
            AppFuture {
                kind: AppKind::Management {
                    future: self.management.call(req),
                },
            }
        } else {
            AppFuture {
                kind: AppKind::Proxy {
                    future: self.proxy.call(req),
                },
            }
        }
    }
}

#[cfg(feature = "manage")]
pin_project_lite::pin_project! {
    /// Response future of [`GatewayApp`].
    pub struct AppFuture<P, M> {
        #[pin]
        kind: AppKind<P, M>,
    }
}

#[cfg(feature = "manage")]
pin_project_lite::pin_project! {
    #[project = AppKindProj]
    enum AppKind<P, M> {
        Proxy { #[pin] future: P },
        Management { #[pin] future: M },
        Probe { response: Option<http::Response<ResponseBody>> },
    }
}

#[cfg(feature = "manage")]
impl<P, M, E> std::future::Future for AppFuture<P, M>
where
    P: std::future::Future<Output = Result<http::Response<ResponseBody>, E>>,
    M: std::future::Future<Output = Result<http::Response<ResponseBody>, E>>,
{
    type Output = Result<http::Response<ResponseBody>, E>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project().kind.project() {
            AppKindProj::Proxy { future } => future.poll(cx),
            AppKindProj::Management { future } => future.poll(cx),
            AppKindProj::Probe { response } => {
                std::task::Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

/// A `/healthz` or `/readyz` answer.
#[cfg(feature = "manage")]
fn probe_answer(status: http::StatusCode, body: serde_json::Value) -> http::Response<ResponseBody> {
    let mut res = http::Response::new(ResponseBody::from(bytes::Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    res
}

#[cfg(feature = "manage")]
impl<K, B> GatewayApp<K, B> {
    /// `/readyz`: 200 while the store answers (or there is none), 503 with when it stopped
    /// answering while it does not; traffic flows either way, on the last state.
    fn readiness(&self) -> http::Response<ResponseBody> {
        #[cfg(feature = "store")]
        if let Some(health) = &self.health {
            return match *health.borrow() {
                crate::store::Health::Reachable => probe_answer(
                    http::StatusCode::OK,
                    serde_json::json!({"status": "ready", "store": "ok"}),
                ),
                crate::store::Health::Unreachable { since } => probe_answer(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({
                        "status": "not_ready",
                        "store": "stale",
                        "since": crate::rfc3339::format(since),
                    }),
                ),
            };
        }
        probe_answer(
            http::StatusCode::OK,
            serde_json::json!({"status": "ready", "store": "none"}),
        )
    }
}

/// Builds a [`Gateway`].
#[must_use]
pub struct GatewayBuilder<K = SharedKeyStore> {
    keys: K,
    registry: SharedRegistry,
    path_prefix: String,
    #[cfg(feature = "manage")]
    management_prefix: String,
    public_url: Option<String>,
    forward: ForwardBuilder,
    source: Option<PathBuf>,
    max_request_body: Option<u64>,
    usage: UsageTapLayer,
    metrics: bool,
    /// The keys the management API and a store manage: those of [`keys`](Self::keys).
    live_keys: SharedKeyStore,
    key_records: Vec<KeyRecord>,
    admins: Vec<Subject>,
    rate_limits: RateLimits,
    fixed_backend: bool,
}

impl GatewayBuilder {
    /// The gateway keys, replaceable later by [`Gateway::apply`] and [`Gateway::reload`].
    pub fn keys(mut self, keys: HashedKeyStore) -> Self {
        self.key_records = keys.records();
        self.keys = SharedKeyStore::new(keys);
        self.live_keys = self.keys.clone();
        self
    }

    /// Keys, endpoints, path prefix and limits from a loaded configuration.
    pub fn config(mut self, config: GatewayConfig) -> Self {
        self.max_request_body = config.max_request_body;
        self.admins = config.admins;
        self.rate_limits = config.rate_limits;
        let mut builder = self
            .keys(config.keys)
            .registry(config.registry.into())
            .path_prefix(&config.path_prefix);
        // The file's records, in the file's order.
        builder.key_records = config.key_records;
        builder
    }
}

impl GatewayBuilder {
    /// Loads the configuration file at `path` (see [`config`](Self::config)); the gateway
    /// built can [`reload`](Gateway::reload) it. [`Gateway::load`] is this with the other
    /// settings left at their defaults.
    pub fn config_file(self, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let mut builder = self.config(GatewayConfig::load(path)?);
        builder.source = Some(path.into());
        Ok(builder)
    }
}

impl<K> GatewayBuilder<K> {
    /// A key store of your own (a database, say). Such a gateway is not reloadable from a
    /// file.
    pub fn key_store<K2: KeyStore>(self, keys: K2) -> GatewayBuilder<K2> {
        GatewayBuilder {
            keys,
            registry: self.registry,
            path_prefix: self.path_prefix,
            #[cfg(feature = "manage")]
            management_prefix: self.management_prefix,
            public_url: self.public_url,
            forward: self.forward,
            source: self.source,
            max_request_body: self.max_request_body,
            usage: self.usage,
            metrics: self.metrics,
            // A key store of your own is not managed by the gateway.
            live_keys: SharedKeyStore::default(),
            key_records: Vec::new(),
            admins: self.admins,
            rate_limits: self.rate_limits,
            fixed_backend: self.fixed_backend,
        }
    }

    /// Replaces where the rate limits are counted (the example's `--redis URL`), keeping the
    /// rules; call it after [`config`](Self::config). An error names `rate_limits.backend`
    /// and never shows the URL.
    pub fn rate_limit_backend(mut self, backend: LimitBackend) -> Result<Self, FieldError> {
        let limits = RateLimits {
            backend,
            ..self.rate_limits.clone()
        };
        limits.validate()?;
        self.rate_limits = limits;
        self.fixed_backend = true;
        Ok(self)
    }

    /// The rate limits: request rates, token budgets and concurrent streams, and where they are
    /// counted (also `[rate_limits]` in the configuration file; see [`crate::limits`]).
    ///
    /// # Panics
    ///
    /// [`build`](Self::build) panics if they are not [valid](RateLimits::validate) (the file's
    /// are validated when it loads).
    pub fn rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limits = limits;
        self
    }

    /// The gateway admins (also `admins` in the configuration file): who manages gateway keys
    /// and reads the audit log through the management API.
    pub fn admins(mut self, admins: Vec<Subject>) -> Self {
        self.admins = admins;
        self
    }

    /// The registry of accounts and endpoints.
    pub fn registry(mut self, registry: SharedRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// The path prefix: empty, or starting with `/` and not ending with `/`.
    ///
    /// # Panics
    ///
    /// In [`build`](Self::build), if the prefix is not of that form.
    pub fn path_prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.path_prefix);
        self
    }

    /// Where the management API answers (default `/manage`).
    #[cfg(feature = "manage")]
    pub fn management_prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.management_prefix);
        self
    }

    /// The gateway's public URL (e.g. `https://llm.example.com`), used in usage snippets.
    /// By default the snippets use the request's `Host`.
    pub fn public_url(mut self, url: &str) -> Self {
        self.public_url = Some(url.to_owned());
        self
    }

    /// Timeouts and pool settings of the forwarder.
    pub fn forward(mut self, forward: ForwardBuilder) -> Self {
        self.forward = forward;
        self
    }

    /// The usage tap (default: [`UsageTapLayer::new`], records to
    /// [`TracingUsageSink`](crate::usage::TracingUsageSink), does not ask for usage). Give it
    /// a sink of your own, or [`include_usage`](UsageTapLayer::include_usage).
    pub fn usage(mut self, usage: UsageTapLayer) -> Self {
        self.usage = usage;
        self
    }

    /// Whether to record [metrics](crate::usage::metric) through the `metrics` facade (default
    /// on; nothing is recorded until the application installs a recorder).
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// Builds the gateway. Management changes live in this process's memory.
    pub fn build(self) -> Gateway<K> {
        self.build_with(|live| Arc::new(MemoryWriter::new(live.clone())))
    }

    /// Builds the gateway on `store`: the keys, accounts and grants come from it and every
    /// management change goes to it, and each change any replica makes reaches this one
    /// within a second. On the first start with an empty store, the configuration file given
    /// to [`config`](Self::config) seeds it (once, whichever replica gets there first); after
    /// that the file gives only the settings. A store that cannot be reached is an error: the
    /// gateway never starts with an empty key set that would silently deny everyone.
    #[cfg(feature = "store")]
    pub async fn build_with_store(self, store: Store) -> Result<Gateway<K>, StoreError> {
        let seed = Snapshot {
            accounts: self.registry.load().specs().to_vec(),
            keys: self.key_records.clone(),
            rate_limits: Some(LimitRules::new(self.rate_limits.rules.clone())),
        };
        if !seed.accounts.is_empty() || !seed.keys.is_empty() {
            let entry = crate::model::AuditEntry {
                actor: "config".to_owned(),
                action: "seed".to_owned(),
                target: "store".to_owned(),
                changes: serde_json::json!({
                    "accounts": seed.accounts.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
                    "keys": seed.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
                    "rate_limits": self.rate_limits.rules.len(),
                }),
            };
            if store.seed(&seed, entry).await? {
                tracing::info!("the store was empty: seeded it from the configuration file");
            }
        }
        let writer_store = store.clone();
        let mut gateway =
            self.build_with(move |live| Arc::new(StoreWriter::new(writer_store, live.clone())));
        store.follow(gateway.live.clone()).await?;
        gateway.store = Some(store);
        Ok(gateway)
    }

    fn build_with(self, writer: impl FnOnce(&Live) -> Arc<dyn Writer>) -> Gateway<K> {
        let rules = SharedLimitRules::new(LimitRules::new(self.rate_limits.rules.clone()));
        let live = Live::new(self.registry.clone(), self.live_keys, self.key_records)
            .with_rules(rules.clone());
        let writer = writer(&live);
        let rate_limit =
            RateLimitLayer::shared(self.rate_limits, rules).unwrap_or_else(|e| panic!("{e}"));
        // What the usage tap counts per endpoint, for the management API's `/usage`.
        let counts = Arc::new(crate::registry::UsageCounts::default());
        #[cfg(feature = "manage")]
        let management = {
            let m = Management::with_state(live.clone(), writer)
                .limit_usage(Arc::new(rate_limit.clone()))
                .usage_counts(counts.clone())
                .admins(self.admins)
                .prefix(&self.management_prefix)
                .proxy_prefix(&self.path_prefix);
            match &self.public_url {
                Some(url) => m.public_url(url),
                None => m,
            }
        };
        #[cfg(not(feature = "manage"))]
        drop(writer);
        Gateway {
            keys: Arc::new(self.keys),
            route: CustomEndpointRouteLayer::new(self.registry.clone())
                .path_prefix(&self.path_prefix),
            registry: self.registry,
            path_prefix: self.path_prefix.into(),
            // The configuration file's limit wins over the forwarder's settings.
            forward: match self.max_request_body {
                Some(max) => self.forward.max_request_body(max),
                None => self.forward,
            }
            .build(),
            #[cfg(feature = "manage")]
            management,
            source: self.source.map(Into::into),
            max_request_body: self.max_request_body,
            // `metrics(false)` here turns the tap's off too; the tap's own setting stays otherwise.
            usage: if self.metrics {
                self.usage.counts(counts)
            } else {
                self.usage.metrics(false).counts(counts)
            },
            metrics: self.metrics,
            live,
            rate_limit,
            fixed_backend: self.fixed_backend,
            #[cfg(feature = "store")]
            store: None,
        }
    }
}
