//! Composable [tower](https://docs.rs/tower) layers that turn a hyper or axum stack into an authenticating
//! *custom-endpoint proxy* for LLM inference APIs, W&B Inference first.
//!
//! Clients call `{gateway}/proxy-api/{providerAccountName}/{endpointName}/{path}` with a
//! gateway API key. The gateway checks who they are, swaps in the upstream credential, asks
//! for an unencoded body and streams the reply back frame by frame. Clients never see the
//! upstream key; the upstream never sees the client's key.
//!
//! # The stack, in order
//!
//! ```text
//! client ──▶ request ids ──▶ TraceLayer ──▶ RescueLayer ──▶ GatewayAuthLayer ──▶ CustomEndpointRouteLayer
//!            (x-request-id)  (one span)     (Err → 5xx)      (key → Principal)    (path → RouteMatch, URI)
//!        ──▶ UsageTapLayer ──▶ AccessControlLayer ──▶ RateLimitLayer ──▶ InjectHeadersLayer ──▶ IdentityEncodingLayer ──▶ Forward ──▶ upstream
//!            (model, tokens)   (Principal × RouteMatch) (429)             (upstream secret)     (Accept-Encoding: identity) (hop-by-hop, timeouts)
//! ```
//!
//! | layer | module | rejects with |
//! |---|---|---|
//! | request ids, [`TraceLayer`](tower_http::trace::TraceLayer) | [`trace`] | never |
//! | [`RescueLayer`](error::RescueLayer) | [`error`] (`error/rescue.rs`) | maps transport errors to 502/503/504 |
//! | [`GatewayAuthLayer`](auth::GatewayAuthLayer) | [`auth`] | 401 |
//! | [`CustomEndpointRouteLayer`](route::CustomEndpointRouteLayer) | [`route`] | 400, 404, 405, 414 |
//! | [`UsageTapLayer`](usage::UsageTapLayer) | [`usage`] | never |
//! | [`AccessControlLayer`](access::AccessControlLayer) | [`access`] | 403 |
//! | [`RateLimitLayer`](limits::RateLimitLayer) | [`limits`] | 429 (requests and tokens per minute, token budgets, concurrent streams; in memory or on Redis) |
//! | [`InjectHeadersLayer`](inject::InjectHeadersLayer) | [`inject`] | 403 (a header template without a value) |
//! | [`IdentityEncodingLayer`](encoding::IdentityEncodingLayer) | [`encoding`] | never |
//! | [`Forward`](forward::Forward) | [`forward`] | `Err` (mapped by `RescueLayer` to 413, 502, 504) |
//!
//! Layers talk only through typed request extensions:
//!
//! | extension | inserted by | read by |
//! |---|---|---|
//! | [`Principal`](ext::Principal) `{ key_id, subject, teams }` | `GatewayAuthLayer` | `AccessControlLayer`, `InjectHeadersLayer` (templates), `UsageTapLayer`, the management API |
//! | [`RouteMatch`](ext::RouteMatch) `{ account, endpoint, upstream_path, target }` | `CustomEndpointRouteLayer` | `AccessControlLayer`, `InjectHeadersLayer`, `UsageTapLayer`, `Forward` |
//!
//! Both live in [`ext`], apart from the layers that insert them, so no layer imports another.
//!
//! Each layer also works alone: a static header set
//! ([`InjectHeadersLayer::fixed`](inject::InjectHeadersLayer::fixed)), a single fixed upstream
//! ([`Forward`](forward::Forward) on an absolute URI), a key store without routing.
//!
//! [`Gateway`](gateway::Gateway) assembles the whole stack in this order from a
//! [configuration file](config).
//!
//! # Example
//!
//! ```no_run
//! use tower_gateway::gateway::Gateway;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gateway = Gateway::load("gateway.toml")?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! // The proxy under /proxy-api and the management API under /manage.
//! tower_gateway::server::serve(listener, gateway.app(), std::future::pending()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `auth` | [`auth`]: `GatewayAuthLayer`, `KeyStore`, `HashedKeyStore` (sha2, subtle) |
//! | `forward` | [`forward`] and [`tls`]: the upstream client (its own pools, rustls, HTTP/2 by ALPN, timeouts) |
//! | `config` | [`config`]: the TOML configuration (serde, toml) |
//! | `trace` | [`trace`], [`usage`] and [`metric`]: request ids and spans (tower-http), the usage tap, metrics (the `metrics` facade) |
//! | `gateway` (default) | all of the above, [`gateway`] and [`server`] |
//! | `manage` (default) | [`manage`]: the management API, on an axum `Router` (axum, without its default features) |
//! | `console` (default) | [`console`]: the managers' console in the browser, served by `Gateway::app()` under `/console` |
//! | `store` (default) | [`store`]: accounts, keys and limits in PostgreSQL or SQLite, shared by replicas (sqlx) |
//! | `redis` (default) | rate-limit counters in Redis, shared by replicas (the `redis` crate) |
//!
//! [`model`], [`ext`], [`registry`], [`route`], [`access`], [`limits`], [`inject`], [`encoding`],
//! [`error`] and [`request_id`] are always available.
//!
//! # Module map
//!
//! Arrows run one way: **model ← layers ← gateway**. A test (`tests/architecture.rs`) reads
//! `src/` and fails, naming the edge, on any import against this table or any cycle.
//!
//! | module | owns | may import |
//! |---|---|---|
//! | [`model`] | the declarative types every source shares (accounts, endpoints, grants, key records, header templates, base URLs, timeouts) and their validation ([`FieldError`](model::FieldError)) | leaves |
//! | [`registry`] | the compiled snapshot the hot path reads, swapped atomically | the model, leaves |
//! | [`ext`] | the request extensions `Principal` and `RouteMatch` | the model, the registry |
//! | [`error`] | the gateway's own errors, every transport error, the reject future, and `RescueLayer` with the one `classify` | nothing |
//! | `hop`, [`request_id`], [`metric`], [`tls`] | leaves: hop-by-hop headers, request-id names and rule, metric names, TLS settings | leaves |
//! | [`auth`], [`route`], [`access`], [`inject`], [`encoding`] | the five layers | the model, the registry, the extensions, leaves; never another layer |
//! | [`limits`] | the rate-limit layer and its counters (memory, Redis) | the same |
//! | [`trace`], [`usage`] | telemetry layers: request ids and spans, the usage tap | the same |
//! | [`forward`] | transport: the forwarder, the inline HTTP/1.1 connection, the connection pools (owned here, keyed by how they connect), timeouts; an endpoint's pool of targets (balance, retries with the body replayed, ejection, health checks) | the same |
//! | [`config`] | a source of the model: the TOML file, secrets, redaction | the model, the registry, the extensions, leaves |
//! | [`manage`] | the management API (axum `Router`, typed JSON) | the model, the registry, the extensions, leaves |
//! | [`console`] | the console's files and their security headers | the same |
//! | [`server`] | the listener: HTTP/1.1 and HTTP/2, graceful shutdown | leaves |
//! | [`gateway`] | the assembly: the only module that imports every layer | everything |

#![deny(missing_docs, unsafe_code, rust_2018_idioms, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod access;
#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "config")]
pub mod config;
#[cfg(feature = "console")]
pub mod console;
pub mod encoding;
pub mod error;
pub mod ext;
#[cfg(feature = "forward")]
pub mod forward;
#[cfg(feature = "gateway")]
pub mod gateway;
mod hop;
pub mod inject;
pub mod limits;
#[cfg(feature = "manage")]
pub mod manage;
#[cfg(any(feature = "trace", feature = "forward"))]
pub mod metric;
pub mod model;
pub mod registry;
pub mod request_id;
#[cfg(any(feature = "manage", feature = "store"))]
pub mod rfc3339;
pub mod route;
#[cfg(feature = "gateway")]
pub mod server;
#[cfg(feature = "store")]
pub mod store;
#[cfg(feature = "forward")]
pub mod tls;
#[cfg(feature = "trace")]
pub mod trace;
#[cfg(feature = "trace")]
pub mod usage;

/// A boxed error, the error type of the stack below [`RescueLayer`](error::RescueLayer).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
