//! Gateway key records: SHA-256 digests of keys and the principal each one authenticates,
//! held in memory by [`HashedKeyStore`]. Only digests are ever held, never keys.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::Principal;

/// The SHA-256 digest of a gateway key.
///
/// Equality is constant-time. `Debug` never shows the digest.
#[derive(Clone, Copy, Eq)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// The digest of `key`.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses 64 hexadecimal digits (either case).
    pub fn from_hex(hex: &str) -> Result<Self, InvalidDigest> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return Err(InvalidDigest(()));
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            let hi = hex_value(pair[0]).ok_or(InvalidDigest(()))?;
            let lo = hex_value(pair[1]).ok_or(InvalidDigest(()))?;
            *byte = (hi << 4) | lo;
        }
        Ok(Self(out))
    }

    /// The digest as 64 lowercase hexadecimal digits.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(DIGITS[usize::from(b >> 4)] as char);
            s.push(DIGITS[usize::from(b & 0xf)] as char);
        }
        s
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl KeyDigest {
    /// The digest as four machine words.
    fn words(&self) -> [u64; 4] {
        let mut words = [0; 4];
        for (word, bytes) in words.iter_mut().zip(self.0.chunks_exact(8)) {
            *word = u64::from_ne_bytes(bytes.try_into().expect("8 bytes"));
        }
        words
    }
}

impl PartialEq for KeyDigest {
    fn eq(&self, other: &Self) -> bool {
        // Constant time, a word at a time.
        self.words().ct_eq(&other.words()).into()
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // 64 bits of a SHA-256 digest are as evenly spread as all 256, and a quarter of the
        // work for the hasher; equality still compares all of them.
        state.write_u64(self.words()[0]);
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(<redacted>)")
    }
}

/// A digest that is not 64 hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidDigest(());

impl fmt::Display for InvalidDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a SHA-256 digest is 64 hexadecimal digits")
    }
}

impl std::error::Error for InvalidDigest {}

/// A key (or digest) registered twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    /// The `key_id` of the principal that already holds the key.
    pub existing_key_id: Arc<str>,
}

impl fmt::Display for DuplicateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the same key is already registered as \"{}\"",
            self.existing_key_id
        )
    }
}

impl std::error::Error for DuplicateKey {}

/// The built-in [`KeyStore`](crate::auth::KeyStore): SHA-256 digests of keys in memory, compared in constant time.
///
/// Only digests are held, never keys. A lookup hashes the presented key and finds its digest
/// in a map whose equality is [constant-time](KeyDigest); the map's own hashing runs over 64
/// bits of the SHA-256 digest with a random SipHash key, so its timing says nothing useful
/// about any key.
///
/// ```
/// use tower_gateway::auth::{HashedKeyStore, KeyDigest, Principal};
///
/// let store = HashedKeyStore::new()
///     .with_key("gw-alice", Principal::new("alice-laptop", "alice@example.com", ["research"]))
///     .unwrap();
/// assert!(store.get(&KeyDigest::of("gw-alice")).is_some());
/// assert!(store.get(&KeyDigest::of("gw-mallory")).is_none());
/// ```
#[derive(Clone, Default)]
pub struct HashedKeyStore {
    keys: HashMap<KeyDigest, Principal>,
}

impl HashedKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the digest of a key.
    pub fn insert_digest(
        &mut self,
        digest: KeyDigest,
        principal: Principal,
    ) -> Result<(), DuplicateKey> {
        match self.keys.entry(digest) {
            Entry::Occupied(e) => Err(DuplicateKey {
                existing_key_id: e.get().key_id.clone(),
            }),
            Entry::Vacant(v) => {
                v.insert(principal);
                Ok(())
            }
        }
    }

    /// Registers a key; only its digest is kept.
    pub fn insert_key(&mut self, key: &str, principal: Principal) -> Result<(), DuplicateKey> {
        self.insert_digest(KeyDigest::of(key), principal)
    }

    /// Builder form of [`insert_key`](Self::insert_key).
    pub fn with_key(mut self, key: &str, principal: Principal) -> Result<Self, DuplicateKey> {
        self.insert_key(key, principal)?;
        Ok(self)
    }

    /// The principal registered for a digest.
    pub fn get(&self, digest: &KeyDigest) -> Option<&Principal> {
        self.keys.get(digest)
    }

    /// How many keys are registered.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is registered.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for HashedKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashedKeyStore")
            .field("principals", &self.keys.values().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_differing_in_any_one_bit_are_different_keys() {
        let d = KeyDigest::of("gw-alice");
        let mut store = HashedKeyStore::new();
        store
            .insert_digest(d, Principal::new("a", "a@x", [] as [&str; 0]))
            .unwrap();
        assert_eq!(d, KeyDigest(d.0));
        for bit in 0..256 {
            let mut other = d.0;
            other[bit / 8] ^= 1 << (bit % 8);
            let other = KeyDigest(other);
            assert_ne!(d, other, "bit {bit}");
            assert!(store.get(&other).is_none(), "bit {bit}");
        }
        assert!(store.get(&d).is_some());
    }

    #[test]
    fn digest_hex_round_trip_and_known_vector() {
        let d = KeyDigest::of("test");
        assert_eq!(
            d.to_hex(),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(KeyDigest::from_hex(&d.to_hex().to_uppercase()).unwrap(), d);
        for bad in ["", "9f86", &"g".repeat(64), &"0".repeat(65)] {
            assert!(KeyDigest::from_hex(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format!("{d:?}"), "KeyDigest(<redacted>)");
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let mut store = HashedKeyStore::new();
        store
            .insert_key("k", Principal::new("a", "a@x", [] as [&str; 0]))
            .unwrap();
        let err = store
            .insert_digest(
                KeyDigest::of("k"),
                Principal::new("b", "b@x", [] as [&str; 0]),
            )
            .unwrap_err();
        assert_eq!(&*err.existing_key_id, "a");
        assert_eq!(store.len(), 1);
    }
}
