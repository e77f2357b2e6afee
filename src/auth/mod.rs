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

use std::sync::Arc;

pub use self::key_store::{
    DuplicateKey, HashedKeyStore, InvalidDigest, KeyDigest, KeyStore, SharedKeyStore,
};
pub use self::service::{GatewayAuth, GatewayAuthLayer, ResponseFuture};

/// Who is calling: inserted into the request extensions by [`GatewayAuthLayer`].
///
/// It holds no secret: `key_id` is a label for logs, never the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The label of the key that authenticated the request.
    pub key_id: Arc<str>,
    /// The person or service that owns the key.
    pub subject: Arc<str>,
    /// The teams the subject belongs to.
    pub teams: Arc<[Arc<str>]>,
}

impl Principal {
    /// A principal.
    pub fn new<T: Into<Arc<str>>>(
        key_id: impl Into<Arc<str>>,
        subject: impl Into<Arc<str>>,
        teams: impl IntoIterator<Item = T>,
    ) -> Self {
        Self {
            key_id: key_id.into(),
            subject: subject.into(),
            teams: teams.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether the principal belongs to `team`.
    pub fn in_team(&self, team: &str) -> bool {
        self.teams.iter().any(|t| &**t == team)
    }
}
