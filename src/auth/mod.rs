//! Client authentication with gateway API keys.
//!
//! [`GatewayAuthLayer`] reads the gateway key from `Authorization: Bearer <key>` (or
//! `x-api-key: <key>`), asks a [`KeyStore`] who owns it, inserts that [`Principal`] into the
//! request extensions and removes every client credential header (`Authorization`,
//! `Proxy-Authorization`, `x-api-key`, `api-key`) before calling the inner service, so the
//! client's key can never travel upstream. A missing or unknown key gets a 401 in the JSON
//! error shape of [`crate::error`]; a key store that fails gets a
//! [`KeyStoreUnavailable`](crate::error::KeyStoreUnavailable) error (503 once rescued).
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_gateway::auth::{GatewayAuthLayer, HashedKeyStore, Principal};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = HashedKeyStore::new()
//!     .with_key("gw-alice", Principal::new("alice-laptop", "alice@example.com", ["research"]))
//!     .unwrap();
//!
//! let svc = ServiceBuilder::new()
//!     .layer(GatewayAuthLayer::new(store))
//!     .service(service_fn(|req: Request<Full<Bytes>>| async move {
//!         let who = req.extensions().get::<Principal>().unwrap();
//!         assert_eq!(&*who.subject, "alice@example.com");
//!         assert!(req.headers().get("authorization").is_none());
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::from("hello")))
//!     }));
//!
//! let req = Request::builder()
//!     .header("authorization", "Bearer gw-alice")
//!     .body(Full::default())
//!     .unwrap();
//! assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
//!
//! let anonymous = Request::new(Full::default());
//! assert_eq!(svc.oneshot(anonymous).await.unwrap().status(), 401);
//! # }
//! ```

mod key_store;
mod service;

pub use self::key_store::KeyStore;
pub use self::service::{GatewayAuth, GatewayAuthLayer, ResponseFuture};
pub use crate::ext::Principal;
pub use crate::model::{DuplicateKey, HashedKeyStore, InvalidDigest, KeyDigest};
pub use crate::registry::SharedKeyStore;
