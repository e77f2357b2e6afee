//! Roles, subjects and grants, and [`AccessControlLayer`], which enforces them.
//!
//! A grant names subjects for each role; each role has the permissions of the roles below it:
//!
//! | role | [`Permission`]s |
//! |---|---|
//! | [`Role::Manager`] | `Manage` (edit, update, delete), `Use`, `View` |
//! | [`Role::User`] | `Use` (call the endpoint), `View` |
//! | [`Role::Viewer`] | `View` |
//!
//! A [`Subject`] is `everyone` (every authenticated principal), `team:NAME` or
//! `user:SUBJECT`. Grants are set per account; an endpoint may override them: its `users` and
//! `viewers` replace the account's, while the account's managers stay managers of every
//! endpoint (an endpoint's own `managers` are added to them), so a platform team cannot lock
//! itself out of an endpoint.
//!
//! [`AccessControlLayer`] reads the [`Principal`](crate::auth::Principal) and the
//! [`RouteMatch`](crate::route::RouteMatch) of each request and lets it through only if the
//! principal holds the `Use` permission on the routed endpoint. A denied request gets a 403 in
//! the JSON error shape and never reaches the inner service. A request without a `Principal`
//! (the layer placed without authentication in front of it) is denied, never allowed.
//! [`AccessControlLayer::custom`] takes any [`AccessPolicy`], including a closure.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_gateway::access::{AccessControlLayer, Grants, Subject};
//! use tower_gateway::auth::{GatewayAuthLayer, HashedKeyStore, Principal};
//! use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};
//! use tower_gateway::route::CustomEndpointRouteLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let keys = HashedKeyStore::new()
//!     .with_key("gw-alice", Principal::new("alice", "alice@example.com", ["research"])).unwrap()
//!     .with_key("gw-bob", Principal::new("bob", "bob@example.com", ["sales"])).unwrap();
//! let registry = Registry::from_accounts(vec![AccountSpec {
//!     access: Grants { users: vec![Subject::Team("research".into())], ..Grants::default() },
//!     endpoints: vec![EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1")],
//!     ..AccountSpec::new("coreweave-model")
//! }])
//! .unwrap();
//!
//! let svc = ServiceBuilder::new()
//!     .layer(GatewayAuthLayer::new(keys))
//!     .layer(CustomEndpointRouteLayer::new(registry.into()))
//!     .layer(AccessControlLayer::new())
//!     .service(service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::from("upstream")))
//!     }));
//!
//! let call = |key: &str| {
//!     Request::post("/proxy-api/coreweave-model/inference/chat/completions")
//!         .header("authorization", format!("Bearer {key}"))
//!         .body(Full::default())
//!         .unwrap()
//! };
//! assert_eq!(svc.clone().oneshot(call("gw-alice")).await.unwrap().status(), 200);
//! assert_eq!(svc.oneshot(call("gw-bob")).await.unwrap().status(), 403);
//! # }
//! ```

mod layer;

pub use self::layer::{AccessControl, AccessControlLayer, AccessPolicy, GrantsPolicy};

pub use crate::model::{Grants, InvalidSubject, Permission, Role, Subject};
