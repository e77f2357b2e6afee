//! The hasher of the registry's name maps.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};

/// Account and endpoint names to their index, hashed with [`NameHasher`].
pub(super) type NameMap = HashMap<Arc<str>, usize, NameHasherBuilder>;

/// A multiply-rotate hasher (FxHash's) for the name maps, several times cheaper than SipHash
/// on a short name, and every request looks up two.
///
/// A client only looks names up, and a lookup probes no further than the configured names' own
/// collisions, whatever name it asks for. The names themselves come from the configuration or
/// from a manager of the account (the [management API](crate::manage) adds endpoints), an
/// authenticated caller. The hasher starts from a random per-process seed, so a set of
/// colliding names is not fixed ahead of time; it is not a keyed hash like SipHash, so it
/// limits, rather than rules out, what a manager who adds many crafted names can do to lookups.
pub(super) struct NameHasher(u64);

/// Builds [`NameHasher`]s from the per-process seed.
#[derive(Clone, Copy)]
pub(super) struct NameHasherBuilder(u64);

impl Default for NameHasherBuilder {
    fn default() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        Self(*SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(())))
    }
}

impl BuildHasher for NameHasherBuilder {
    type Hasher = NameHasher;

    fn build_hasher(&self) -> NameHasher {
        NameHasher(self.0)
    }
}

impl NameHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.add(u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        let tail = words.remainder();
        if !tail.is_empty() {
            let mut word = [0; 8];
            word[..tail.len()].copy_from_slice(tail);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.add(u64::from(byte));
    }

    fn finish(&self) -> u64 {
        // The multiplication leaves its best bits on top; the table indexes by the low ones.
        self.0.rotate_left(26)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_hashes_depend_on_the_seed() {
        // Names that collide under one seed need not under another: the low bits (the bucket)
        // of the same names differ between two seeds.
        let (a, b) = (NameHasherBuilder(1), NameHasherBuilder(2));
        for name in ["e", "chat", "endpoint-0123456789"] {
            assert_ne!(a.hash_one(name) & 0xfff, b.hash_one(name) & 0xfff, "{name}");
        }
        assert_eq!(
            NameHasherBuilder::default().0,
            NameHasherBuilder::default().0,
            "one seed per process"
        );
    }

    #[test]
    fn the_name_hasher_spreads_similar_names() {
        let build = NameHasherBuilder::default();
        let names: Vec<String> = (0..4096)
            .flat_map(|i| {
                [
                    format!("account-{i}"),
                    format!("endpoint{i}"),
                    format!("{i}"),
                ]
            })
            .collect();
        let hashes: std::collections::HashSet<u64> =
            names.iter().map(|n| build.hash_one(n.as_str())).collect();
        assert_eq!(hashes.len(), names.len());
        // The low bits pick the bucket: they must differ too.
        let low: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 0xfff).collect();
        assert!(low.len() > 3000, "{} distinct low bits", low.len());
    }
}
