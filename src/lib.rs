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
//! client ──▶ RescueLayer ──▶ GatewayAuthLayer ──▶ CustomEndpointRouteLayer
//!            (Err → 502/504)  (key → Principal)    (path → RouteMatch, upstream URI)
//!        ──▶ InjectHeadersLayer ──▶ IdentityEncodingLayer ──▶ Forward ──▶ upstream
//!            (upstream secret)      (Accept-Encoding: identity) (hop-by-hop, timeouts, streaming)
//! ```
//!
//! | layer | module | rejects with |
//! |---|---|---|
//! | [`RescueLayer`](error::RescueLayer) | [`error`] | maps transport errors to 502/503/504 |
//! | [`GatewayAuthLayer`](auth::GatewayAuthLayer) | [`auth`] | 401 |
//! | [`CustomEndpointRouteLayer`](route::CustomEndpointRouteLayer) | [`route`] | 400, 404, 405 |
//! | [`InjectHeadersLayer`](inject::InjectHeadersLayer) | [`inject`] | never |
//! | [`IdentityEncodingLayer`](encoding::IdentityEncodingLayer) | [`encoding`] | never |
//! | [`Forward`](forward::Forward) | [`forward`] | `Err` (mapped by `RescueLayer`) |
//!
//! Layers talk only through typed request extensions:
//!
//! | extension | inserted by | read by |
//! |---|---|---|
//! | [`Principal`](auth::Principal) `{ key_id, subject, teams }` | `GatewayAuthLayer` | access control (next release), tracing, usage |
//! | [`RouteMatch`](route::RouteMatch) `{ account, endpoint, upstream_path, target }` | `CustomEndpointRouteLayer` | `InjectHeadersLayer`, `Forward`, tracing |
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
//! use tower_gateway::config::GatewayConfig;
//! use tower_gateway::gateway::Gateway;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = GatewayConfig::load("gateway.toml")?;
//! let gateway = Gateway::from_config(config);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! tower_gateway::server::serve(listener, gateway.service(), std::future::pending()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `auth` | [`auth`]: `GatewayAuthLayer`, `KeyStore`, `HashedKeyStore` (sha2, subtle) |
//! | `forward` | [`forward`]: the hyper-util client with rustls and timeouts |
//! | `config` | [`config`]: the TOML configuration (serde, toml) |
//! | `gateway` (default) | all of the above, [`gateway`] and [`server`] |
//! | `manage` (default) | [`manage`]: the management API |
//!
//! [`route`], [`inject`], [`encoding`], [`registry`] and [`error`] are always available.

#![deny(missing_docs, unsafe_code, rust_2018_idioms, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod access;
#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "config")]
pub mod config;
pub mod encoding;
pub mod error;
#[cfg(feature = "forward")]
pub mod forward;
#[cfg(feature = "gateway")]
pub mod gateway;
mod hop;
pub mod inject;
#[cfg(feature = "manage")]
pub mod manage;
pub mod registry;
pub mod route;
#[cfg(feature = "gateway")]
pub mod server;

/// A boxed error, the error type of the stack below [`RescueLayer`](error::RescueLayer).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
