//! The gateway keys the auth layer reads, swapped atomically while traffic flows.

use std::fmt;
use std::sync::Arc;

use crate::model::HashedKeyStore;

/// A [`HashedKeyStore`] that can be replaced while traffic flows (on a configuration reload).
///
/// Lookups read the current store lock-free; [`store`](Self::store) swaps it atomically.
#[derive(Clone, Default)]
pub struct SharedKeyStore {
    current: Arc<arc_swap::ArcSwap<HashedKeyStore>>,
}

impl SharedKeyStore {
    /// Holds `store` as the current keys.
    pub fn new(store: HashedKeyStore) -> Self {
        Self {
            current: Arc::new(arc_swap::ArcSwap::from_pointee(store)),
        }
    }

    /// Replaces the keys. Requests already authenticated are not affected.
    pub fn store(&self, store: HashedKeyStore) {
        self.current.store(Arc::new(store));
    }

    /// The current keys.
    pub fn load(&self) -> Arc<HashedKeyStore> {
        self.current.load_full()
    }

    /// The current keys, without touching their reference count (for the hot path).
    pub fn current(&self) -> arc_swap::Guard<Arc<HashedKeyStore>> {
        self.current.load()
    }
}

impl fmt::Debug for SharedKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedKeyStore")
            .field(&*self.current.load())
            .finish()
    }
}

impl From<HashedKeyStore> for SharedKeyStore {
    fn from(store: HashedKeyStore) -> Self {
        Self::new(store)
    }
}
