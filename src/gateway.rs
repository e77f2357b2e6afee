//! A builder that assembles the whole stack, in the right order.
//!
//! [`Gateway`] holds the key store, the [`SharedRegistry`] and the forwarder's connection
//! pool; [`Gateway::service`] returns the full stack
//! (`Rescue → GatewayAuth → CustomEndpointRoute → AccessControl → InjectHeaders →
//! IdentityEncoding → Forward`)
//! as a tower `Service` with error type `Infallible`, to serve with hyper
//! ([`server::serve`](crate::server::serve)) or to mount in an axum `Router`.
//!
//! # Example: from a configuration file
//!
//! ```no_run
//! use tower_gateway::config::GatewayConfig;
//! use tower_gateway::gateway::Gateway;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gateway = Gateway::from_config(GatewayConfig::load("gateway.toml")?);
//! let svc = gateway.service::<hyper::body::Incoming>();
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
//! let gateway = Gateway::builder().key_store(keys).registry(registry.into()).build();
//!
//! let app: Router = Router::new()
//!     .route("/health", axum::routing::get(|| async { "ok" }))
//!     .route_service("/proxy-api/{*path}", gateway.service::<axum::body::Body>());
//! # let _ = app;
//! ```

use std::fmt;
use std::sync::Arc;

use hyper::body::Incoming;
use tower_layer::Layer;

use crate::access::{AccessControl, AccessControlLayer};
use crate::auth::{GatewayAuth, GatewayAuthLayer, HashedKeyStore, KeyStore};
use crate::config::GatewayConfig;
use crate::encoding::{IdentityEncoding, IdentityEncodingLayer};
use crate::error::{Rescue, RescueLayer};
use crate::forward::{Forward, ForwardBuilder};
use crate::inject::{InjectHeaders, InjectHeadersLayer};
use crate::registry::SharedRegistry;
use crate::route::{CustomEndpointRoute, CustomEndpointRouteLayer, DEFAULT_PATH_PREFIX};

/// The full stack for request body `B`, as returned by [`Gateway::service`].
pub type GatewayService<K, B> = Rescue<
    GatewayAuth<CustomEndpointRoute<AccessControl<InjectHeaders<IdentityEncoding<Forward<B>>>>>, K>,
>;

/// An assembled gateway: key store, registry and connection pool. Cheap to clone.
pub struct Gateway<K = HashedKeyStore> {
    keys: Arc<K>,
    registry: SharedRegistry,
    route: CustomEndpointRouteLayer,
    path_prefix: Arc<str>,
    forward: Forward<Incoming>,
}

impl Gateway {
    /// A builder with an empty key store and registry, the `/proxy-api` prefix and default
    /// timeouts.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            keys: HashedKeyStore::new(),
            registry: SharedRegistry::default(),
            path_prefix: DEFAULT_PATH_PREFIX.to_owned(),
            forward: ForwardBuilder::default(),
        }
    }

    /// A gateway for a loaded configuration.
    pub fn from_config(config: GatewayConfig) -> Self {
        Self::builder()
            .key_store(config.keys)
            .registry(config.registry.into())
            .path_prefix(&config.path_prefix)
            .build()
    }
}

impl<K: KeyStore> Gateway<K> {
    /// The full stack, for request body `B` (`hyper::body::Incoming` under hyper,
    /// `axum::body::Body` under axum). Every service shares this gateway's key store,
    /// registry and connection pool.
    pub fn service<B>(&self) -> GatewayService<K, B> {
        let forward = self.forward.for_body::<B>();
        let stack = IdentityEncodingLayer::new().layer(forward);
        let stack = InjectHeadersLayer::from_route().layer(stack);
        let stack = AccessControlLayer::new().layer(stack);
        let stack = self.route.layer(stack);
        let stack = GatewayAuthLayer::from_arc(self.keys.clone()).layer(stack);
        RescueLayer::new().layer(stack)
    }
}

impl<K> Gateway<K> {
    /// The registry; [`SharedRegistry::store`] swaps it while traffic flows.
    pub fn registry(&self) -> &SharedRegistry {
        &self.registry
    }

    /// The key store.
    pub fn key_store(&self) -> &Arc<K> {
        &self.keys
    }

    /// The path prefix, e.g. `/proxy-api`.
    pub fn path_prefix(&self) -> &str {
        &self.path_prefix
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
        }
    }
}

impl<K> fmt::Debug for Gateway<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("path_prefix", &self.path_prefix)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Gateway`].
#[must_use]
pub struct GatewayBuilder<K = HashedKeyStore> {
    keys: K,
    registry: SharedRegistry,
    path_prefix: String,
    forward: ForwardBuilder,
}

impl<K> GatewayBuilder<K> {
    /// The key store that authenticates clients.
    pub fn key_store<K2: KeyStore>(self, keys: K2) -> GatewayBuilder<K2> {
        GatewayBuilder {
            keys,
            registry: self.registry,
            path_prefix: self.path_prefix,
            forward: self.forward,
        }
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

    /// Timeouts and pool settings of the forwarder.
    pub fn forward(mut self, forward: ForwardBuilder) -> Self {
        self.forward = forward;
        self
    }

    /// Builds the gateway.
    pub fn build(self) -> Gateway<K> {
        Gateway {
            keys: Arc::new(self.keys),
            route: CustomEndpointRouteLayer::new(self.registry.clone())
                .path_prefix(&self.path_prefix),
            registry: self.registry,
            path_prefix: self.path_prefix.into(),
            forward: self.forward.build(),
        }
    }
}
