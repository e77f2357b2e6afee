//! Gateway key records: SHA-256 digests of keys and the principal each one authenticates,
//! held in memory by [`HashedKeyStore`]. Only digests are ever held, never keys.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::{FieldError, Principal};

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

/// Where a key record comes from: the configuration file (read-only through the management
/// API) or a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The `[[keys]]` of the configuration file.
    File,
    /// Issued through the management API and kept in a store.
    Store,
}

/// A gateway key as it is kept: its digest, never the key, with who holds it and its life.
///
/// `Debug` never shows the digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// A unique label for logs and the management API; never the secret.
    pub id: String,
    /// The SHA-256 digest of the key.
    pub digest: KeyDigest,
    /// Who holds the key, e.g. an email.
    pub subject: String,
    /// The holder's teams, for `team:NAME` grants.
    pub teams: Vec<String>,
    /// When it was issued (`None` for a key of the file).
    pub created_at: Option<SystemTime>,
    /// When it stops working, if ever.
    pub expires_at: Option<SystemTime>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<SystemTime>,
    /// Where it comes from.
    pub source: KeySource,
    /// The last day it was used, as a store last recorded it (days since 1970-01-01 UTC).
    pub last_used_day: Option<u32>,
}

impl KeyRecord {
    /// A key of the file: no times, never expires.
    pub fn new(
        id: impl Into<String>,
        digest: KeyDigest,
        subject: impl Into<String>,
        teams: Vec<String>,
    ) -> Self {
        Self {
            id: id.into(),
            digest,
            subject: subject.into(),
            teams,
            created_at: None,
            expires_at: None,
            revoked_at: None,
            source: KeySource::File,
            last_used_day: None,
        }
    }
}

/// Validates key records as a whole, as every source does before it keeps them: each `id` is
/// non-empty, without control characters and unique; each subject and team is non-empty,
/// without spaces or control characters (what `user:SUBJECT` and `team:NAME` grants accept);
/// no key is registered twice. An error names the field, e.g. `keys[2].subject`, and never
/// the key or its digest.
pub fn validate_keys(records: &[KeyRecord]) -> Result<(), FieldError> {
    let mut ids = HashSet::with_capacity(records.len());
    let mut digests: HashMap<KeyDigest, &str> = HashMap::with_capacity(records.len());
    for (i, key) in records.iter().enumerate() {
        let field = format!("keys[{i}]");
        if key.id.is_empty() || key.id.chars().any(char::is_control) {
            return Err(FieldError::new(
                format!("{field}.id"),
                "must be non-empty, without control characters",
            ));
        }
        if !ids.insert(key.id.as_str()) {
            return Err(FieldError::new(
                format!("{field}.id"),
                format!("duplicate id \"{}\"", key.id),
            ));
        }
        if !is_plain_name(&key.subject) {
            return Err(FieldError::new(
                format!("{field}.subject"),
                "must be non-empty, without spaces or control characters",
            ));
        }
        for (t, team) in key.teams.iter().enumerate() {
            if !is_plain_name(team) {
                return Err(FieldError::new(
                    format!("{field}.teams[{t}]"),
                    "must be non-empty, without spaces or control characters",
                ));
            }
        }
        if let Some(existing) = digests.insert(key.digest, &key.id) {
            return Err(FieldError::new(
                field,
                DuplicateKey {
                    existing_key_id: existing.into(),
                }
                .to_string(),
            ));
        }
    }
    Ok(())
}

/// Whether `s` is a usable name for a subject or team: non-empty, no whitespace or control
/// characters.
fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

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
    keys: HashMap<KeyDigest, Held>,
}

/// A key as the store holds it in memory: who it authenticates, until when, and the last day
/// it was used (days since 1970-01-01 UTC; 0 for never).
struct Held {
    principal: Principal,
    expires: Option<SystemTime>,
    used: AtomicU32,
}

impl Clone for Held {
    fn clone(&self) -> Self {
        Self {
            principal: self.principal.clone(),
            expires: self.expires,
            used: AtomicU32::new(self.used.load(Ordering::Relaxed)),
        }
    }
}

/// The day `t` falls on, as days since 1970-01-01 UTC.
pub fn day_of(t: SystemTime) -> u32 {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    u32::try_from(secs / 86_400).unwrap_or(u32::MAX)
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
        self.insert_until(digest, principal, None)
    }

    fn insert_until(
        &mut self,
        digest: KeyDigest,
        principal: Principal,
        expires: Option<SystemTime>,
    ) -> Result<(), DuplicateKey> {
        match self.keys.entry(digest) {
            Entry::Occupied(e) => Err(DuplicateKey {
                existing_key_id: e.get().principal.key_id.clone(),
            }),
            Entry::Vacant(v) => {
                v.insert(Held {
                    principal,
                    expires,
                    used: AtomicU32::new(0),
                });
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
    ///
    /// A key past its expiry time is not found, whether or not the store was rebuilt since.
    ///
    /// A key found is marked as used today (one clock read; see [`used_on`](Self::used_on)).
    pub fn get(&self, digest: &KeyDigest) -> Option<&Principal> {
        let held = self.keys.get(digest)?;
        let now = SystemTime::now();
        if held.expires.is_some_and(|at| now >= at) {
            return None;
        }
        let today = day_of(now);
        if held.used.load(Ordering::Relaxed) != today {
            held.used.store(today, Ordering::Relaxed);
        }
        Some(&held.principal)
    }

    /// The last day the key with `digest` was found by [`get`](Self::get) (days since
    /// 1970-01-01 UTC), by this store or the one it took over from
    /// ([`carry_usage`](Self::carry_usage)).
    pub fn used_on(&self, digest: &KeyDigest) -> Option<u32> {
        let day = self.keys.get(digest)?.used.load(Ordering::Relaxed);
        (day > 0).then_some(day)
    }

    /// Keeps the days of use `previous` recorded for the keys both hold: what a store rebuilt
    /// from a newer snapshot does before it replaces the old one.
    pub fn carry_usage(&self, previous: &HashedKeyStore) {
        for (digest, held) in &self.keys {
            if let Some(old) = previous.keys.get(digest) {
                held.used
                    .fetch_max(old.used.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    /// Registers a key record: its digest, the principal it authenticates (its `id`, subject
    /// and teams) and its expiry time. A revoked record is left out.
    pub fn insert_record(&mut self, record: &KeyRecord) -> Result<(), DuplicateKey> {
        if record.revoked_at.is_some() {
            return Ok(());
        }
        let principal = Principal::new(
            record.id.as_str(),
            record.subject.as_str(),
            record.teams.iter().map(String::as_str),
        );
        self.insert_until(record.digest, principal, record.expires_at)?;
        if let Some(day) = record.last_used_day {
            let held = self.keys.get(&record.digest).expect("just inserted");
            held.used.fetch_max(day, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The keys as records (sorted by id): what a store is seeded with when the keys were given
    /// in code rather than in a file.
    pub fn records(&self) -> Vec<KeyRecord> {
        let mut records: Vec<KeyRecord> = self
            .keys
            .iter()
            .map(|(digest, held)| KeyRecord {
                expires_at: held.expires,
                ..KeyRecord::new(
                    held.principal.key_id.to_string(),
                    *digest,
                    held.principal.subject.to_string(),
                    held.principal.teams.iter().map(|t| t.to_string()).collect(),
                )
            })
            .collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        records
    }

    /// A store of `records` (the revoked ones left out).
    pub fn from_records<'a>(
        records: impl IntoIterator<Item = &'a KeyRecord>,
    ) -> Result<Self, DuplicateKey> {
        let mut store = Self::new();
        for record in records {
            store.insert_record(record)?;
        }
        Ok(store)
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
            .field(
                "principals",
                &self.keys.values().map(|h| &h.principal).collect::<Vec<_>>(),
            )
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

    #[test]
    fn records_past_their_expiry_or_revoked_are_not_found() {
        let now = SystemTime::now();
        let hour = std::time::Duration::from_secs(3600);
        let record =
            |id: &str, key: &str| KeyRecord::new(id, KeyDigest::of(key), "s@x", vec!["t".into()]);
        let live = KeyRecord {
            expires_at: Some(now + hour),
            ..record("live", "k1")
        };
        let expired = KeyRecord {
            expires_at: Some(now - hour),
            ..record("expired", "k2")
        };
        let revoked = KeyRecord {
            revoked_at: Some(now),
            ..record("revoked", "k3")
        };
        let store = HashedKeyStore::from_records([&live, &expired, &revoked]).unwrap();
        let found = store.get(&KeyDigest::of("k1")).unwrap();
        assert_eq!((&*found.key_id, &*found.subject), ("live", "s@x"));
        assert!(found.in_team("t"));
        assert!(store.get(&KeyDigest::of("k2")).is_none());
        assert!(store.get(&KeyDigest::of("k3")).is_none());
        assert_eq!(store.len(), 2, "the revoked record is left out");
    }

    #[test]
    fn a_lookup_marks_the_day_and_a_rebuilt_store_keeps_it() {
        let record = KeyRecord::new("k", KeyDigest::of("gw-k"), "s@x", vec![]);
        let store = HashedKeyStore::from_records([&record]).unwrap();
        let digest = KeyDigest::of("gw-k");
        assert_eq!(store.used_on(&digest), None, "never used");
        store.get(&digest).unwrap();
        let today = day_of(SystemTime::now());
        assert_eq!(store.used_on(&digest), Some(today));
        let rebuilt = HashedKeyStore::from_records([&record]).unwrap();
        rebuilt.carry_usage(&store);
        assert_eq!(rebuilt.used_on(&digest), Some(today));
        let stored = KeyRecord {
            last_used_day: Some(today - 3),
            ..record
        };
        let from_store = HashedKeyStore::from_records([&stored]).unwrap();
        assert_eq!(from_store.used_on(&digest), Some(today - 3));
    }

    #[test]
    fn a_store_gives_back_its_keys_as_records() {
        let store = HashedKeyStore::new()
            .with_key("gw-b", Principal::new("b", "b@x", ["t"]))
            .unwrap()
            .with_key("gw-a", Principal::new("a", "a@x", [] as [&str; 0]))
            .unwrap();
        let records = store.records();
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(records[1].digest, KeyDigest::of("gw-b"));
        assert_eq!(records[1].teams, ["t"]);
        let again = HashedKeyStore::from_records(&records).unwrap();
        assert_eq!(&*again.get(&KeyDigest::of("gw-a")).unwrap().subject, "a@x");
    }
}
