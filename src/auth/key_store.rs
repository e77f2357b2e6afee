use std::future::{Future, Ready, ready};
use std::sync::Arc;

use crate::BoxError;
use crate::ext::Principal;
use crate::model::{HashedKeyStore, KeyDigest};
use crate::registry::SharedKeyStore;

/// Looks up the [`Principal`] that owns a gateway key.
///
/// The lookup is asynchronous so a store can be backed by a database or a remote service.
/// `Ok(None)` means the key is unknown (401); `Err` means the store could not answer (503).
/// A store must never log or return the key it is given.
///
/// [`HashedKeyStore`] is the built-in, in-memory implementation.
pub trait KeyStore: Send + Sync + 'static {
    /// The future of one lookup.
    type Future: Future<Output = Result<Option<Principal>, BoxError>> + Send + 'static;

    /// Finds the principal for `key`, the secret exactly as the client sent it.
    fn lookup(&self, key: &str) -> Self::Future;

    /// Answers at once, when the store can (an in-memory store does); `None`, the default,
    /// means "use [`lookup`](Self::lookup)". It saves a future per request.
    fn lookup_now(&self, key: &str) -> Option<Result<Option<Principal>, BoxError>> {
        let _ = key;
        None
    }
}

impl<K: KeyStore + ?Sized> KeyStore for Arc<K> {
    type Future = K::Future;

    fn lookup(&self, key: &str) -> Self::Future {
        (**self).lookup(key)
    }

    fn lookup_now(&self, key: &str) -> Option<Result<Option<Principal>, BoxError>> {
        (**self).lookup_now(key)
    }
}

impl KeyStore for HashedKeyStore {
    type Future = Ready<Result<Option<Principal>, BoxError>>;

    fn lookup(&self, key: &str) -> Self::Future {
        ready(Ok(self.get(&KeyDigest::of(key)).cloned()))
    }

    fn lookup_now(&self, key: &str) -> Option<Result<Option<Principal>, BoxError>> {
        Some(Ok(self.get(&KeyDigest::of(key)).cloned()))
    }
}

impl KeyStore for SharedKeyStore {
    type Future = Ready<Result<Option<Principal>, BoxError>>;

    fn lookup(&self, key: &str) -> Self::Future {
        self.current().lookup(key)
    }

    fn lookup_now(&self, key: &str) -> Option<Result<Option<Principal>, BoxError>> {
        self.current().lookup_now(key)
    }
}
