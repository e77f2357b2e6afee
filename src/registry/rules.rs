//! The rate-limit rules in force, shared by the rate limiter and whoever changes them.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::model::LimitRules;

/// The rate-limit rules in force, swapped whole while traffic flows: the rate limiter reads
/// them per request, [`Live`](super::Live) stores a new set when a change arrives.
#[derive(Clone, Debug, Default)]
pub struct SharedLimitRules(Arc<ArcSwap<LimitRules>>);

impl SharedLimitRules {
    /// Shares `rules`.
    pub fn new(rules: LimitRules) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(rules)))
    }

    /// The rules in force now.
    pub fn load(&self) -> Arc<LimitRules> {
        self.0.load_full()
    }

    /// The rules in force now, without touching the reference count (for the hot path).
    pub fn load_guard(&self) -> arc_swap::Guard<Arc<LimitRules>> {
        self.0.load()
    }

    /// Puts `rules` in force for the next request.
    pub fn store(&self, rules: LimitRules) {
        self.0.store(Arc::new(rules));
    }
}
