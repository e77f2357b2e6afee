//! The accounts and endpoints the gateway proxies to, as one immutable snapshot that can be
//! swapped atomically while traffic flows.
//!
//! A [`Registry`] is built once from [`AccountSpec`]s (by hand or by [`config`](crate::config))
//! and validated as a whole. Everything that does not depend on the request is computed here,
//! once: the parsed base URL and the injected header map, values already marked sensitive.
//!
//! [`SharedRegistry`] holds the current snapshot. Each request takes the snapshot once (an
//! `Arc` of its [`Endpoint`] travels in [`RouteMatch`](crate::route::RouteMatch)), so a
//! request that started before a swap finishes on the configuration it started with.
//!
//! ```
//! use http::HeaderMap;
//! use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry, SharedRegistry};
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("authorization", "Bearer upstream-key".parse().unwrap());
//! let registry = Registry::from_accounts(vec![AccountSpec {
//!     endpoints: vec![EndpointSpec {
//!         headers,
//!         ..EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1")
//!     }],
//!     ..AccountSpec::new("coreweave-model")
//! }])
//! .unwrap();
//!
//! let ep = registry.endpoint("coreweave-model", "inference").unwrap();
//! assert_eq!(ep.base_url(), "https://api.inference.wandb.ai/v1");
//! assert!(ep.headers()["authorization"].is_sensitive());
//!
//! let shared = SharedRegistry::new(registry);
//! shared.store(Registry::default()); // swap: new requests see no endpoints
//! assert!(shared.load().endpoint("coreweave-model", "inference").is_none());
//! ```

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName};
use http::uri::{Authority, Scheme, Uri};

use crate::access::Grants;
use crate::inject::HeaderTemplate;
use crate::route::{COMMON_PATHS, upstream_uri};

/// The parsed base URL of an endpoint: the upstream path is appended to `path`, and the
/// scheme and authority can never change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamBase {
    scheme: Scheme,
    authority: Authority,
    path: Box<str>,
}

impl UpstreamBase {
    /// Parses and checks a base URL: `http` or `https`, a host, no user info, query or
    /// fragment, no trailing slash, no dot segments.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| "is not a valid absolute URL".to_owned())?;
        let scheme = uri.scheme().cloned().ok_or_else(|| {
            "must be an absolute URL starting with https:// or http://".to_owned()
        })?;
        if scheme != Scheme::HTTPS && scheme != Scheme::HTTP {
            return Err("must use the https or http scheme".to_owned());
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| "must name a host".to_owned())?;
        if authority.as_str().contains('@') {
            return Err("must not contain user info (put credentials in headers)".to_owned());
        }
        if authority.host().is_empty() {
            return Err("must name a host".to_owned());
        }
        if uri.query().is_some() || url.contains('?') {
            return Err("must not have a query string".to_owned());
        }
        if url.contains('#') {
            return Err("must not have a fragment".to_owned());
        }
        let path = uri.path();
        let path = if path == "/" && !url.ends_with('/') {
            ""
        } else {
            path
        };
        if path.ends_with('/') {
            return Err("must not end with a slash".to_owned());
        }
        if path.split('/').skip(1).any(|seg| {
            let lower = seg.to_ascii_lowercase();
            seg.is_empty()
                || matches!(
                    lower.as_str(),
                    "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e."
                )
        }) {
            return Err("must not have empty or dot segments".to_owned());
        }
        Ok(Self {
            scheme,
            authority,
            path: path.into(),
        })
    }

    /// The scheme, `http` or `https`.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// The host and port.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The base path, empty or starting with `/`, never ending with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for UpstreamBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.path)
    }
}

/// Timeouts for one endpoint; `None` takes the forwarder's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// Time to establish the TCP (and TLS) connection.
    pub connect: Option<Duration>,
    /// Time from sending the request to the upstream's response head.
    pub first_byte: Option<Duration>,
    /// Longest silence between two body frames, either way.
    pub idle: Option<Duration>,
}

/// The description of an endpoint, as a user writes it.
///
/// `Debug` shows header names, never values.
#[derive(Clone)]
pub struct EndpointSpec {
    /// The endpoint name, the second path segment after the prefix.
    pub name: String,
    /// Base URL, e.g. `https://api.inference.wandb.ai/v1`.
    pub base_url: String,
    /// Custom headers; they override the account's `header_auth`.
    pub headers: HeaderMap,
    /// Per-endpoint grants overriding the account's.
    pub access: Option<Grants>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Extra trust roots and a client certificate.
    #[cfg(feature = "forward")]
    pub tls: Option<Arc<crate::forward::TlsSettings>>,
}

impl EndpointSpec {
    /// An endpoint with no headers, grants, timeouts or TLS settings of its own.
    pub fn new(name: impl Into<String>, base_url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            base_url: base_url.into(),
            headers: HeaderMap::new(),
            access: None,
            timeouts: Timeouts::default(),
            #[cfg(feature = "forward")]
            tls: None,
        }
    }
}

/// The description of a provider account, as a user writes it.
///
/// `Debug` shows header names, never values.
#[derive(Clone)]
pub struct AccountSpec {
    /// The account name, the first path segment after the prefix.
    pub name: String,
    /// Headers every endpoint of the account inherits.
    pub header_auth: HeaderMap,
    /// Who may manage, use and view the account's endpoints.
    pub access: Grants,
    /// The endpoints.
    pub endpoints: Vec<EndpointSpec>,
}

impl AccountSpec {
    /// An account with no headers, grants or endpoints.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            header_auth: HeaderMap::new(),
            access: Grants::default(),
            endpoints: Vec::new(),
        }
    }
}

impl fmt::Debug for EndpointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("EndpointSpec");
        d.field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("access", &self.access)
            .field("timeouts", &self.timeouts);
        #[cfg(feature = "forward")]
        d.field("tls", &self.tls);
        d.finish()
    }
}

impl fmt::Debug for AccountSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountSpec")
            .field("name", &self.name)
            .field("header_auth", &self.header_auth.keys().collect::<Vec<_>>())
            .field("access", &self.access)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// A field that failed validation: its path (`accounts[0].endpoints[1].base_url`) and the
/// problem. It never contains a header value or any other secret. Both the registry and the
/// [configuration](crate::config) report errors with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    field: String,
    message: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field in error, as a path into the configuration.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The problem.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// A registry that failed validation.
pub type RegistryError = FieldError;

/// A compiled endpoint: what the route, inject and forward layers need, precomputed.
pub struct Endpoint {
    account: Arc<str>,
    name: Arc<str>,
    base: UpstreamBase,
    headers: HeaderMap,
    templates: Vec<(HeaderName, HeaderTemplate)>,
    access: Option<Grants>,
    grants: Arc<Grants>,
    timeouts: Timeouts,
    /// The upstream URI of each of the route's common paths, without a query.
    common_uris: [Option<Uri>; COMMON_PATHS.len()],
    #[cfg(feature = "forward")]
    pub(crate) tls: Option<Arc<crate::forward::TlsSettings>>,
    #[cfg(feature = "forward")]
    pub(crate) client: OnceLock<crate::forward::UpstreamClient>,
}

impl Endpoint {
    /// The account name.
    pub fn account(&self) -> &Arc<str> {
        &self.account
    }

    /// The endpoint name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The parsed base URL.
    pub fn base(&self) -> &UpstreamBase {
        &self.base
    }

    /// The base URL as text.
    pub fn base_url(&self) -> String {
        self.base.to_string()
    }

    /// The headers to inject: the account's `header_auth` overridden by the endpoint's own
    /// headers, every value marked sensitive.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The headers whose values hold `{subject}`, `{team}` or `{key_id}`, filled per request
    /// by [`InjectHeaders`](crate::inject::InjectHeaders). They are not in
    /// [`headers`](Self::headers).
    pub fn header_templates(&self) -> &[(HeaderName, HeaderTemplate)] {
        &self.templates
    }

    /// The per-endpoint grants as configured, if any override the account's.
    pub fn access(&self) -> Option<&Grants> {
        self.access.as_ref()
    }

    /// The grants in force for this endpoint: the account's, or the endpoint's override, whose
    /// `users` and `viewers` replace the account's while the account's managers stay managers.
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// The timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The upstream URI for the `i`th of the route's common paths, without a query.
    pub(crate) fn common_uri(&self, i: usize) -> Option<&Uri> {
        self.common_uris.get(i)?.as_ref()
    }

    /// Whether the endpoint has TLS settings of its own (extra roots or a client certificate).
    pub fn has_tls(&self) -> bool {
        #[cfg(feature = "forward")]
        return self.tls.is_some();
        #[cfg(not(feature = "forward"))]
        return false;
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("account", &self.account)
            .field("name", &self.name)
            .field("base", &format_args!("{}", self.base))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("header_templates", &self.templates)
            .field("access", &self.access)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

/// Account and endpoint names to their index, hashed with [`NameHasher`].
type NameMap = HashMap<Arc<str>, usize, NameHasherBuilder>;

/// A multiply-rotate hasher (FxHash's) for the name maps, several times cheaper than SipHash
/// on a short name, and every request looks up two.
///
/// A client only looks names up, and a lookup probes no further than the configured names' own
/// collisions, whatever name it asks for. The names themselves come from the configuration or
/// from a manager of the account (the [management API](crate::manage) adds endpoints), an
/// authenticated caller. The hasher starts from a random per-process seed, so a set of
/// colliding names is not fixed ahead of time; it is not a keyed hash like SipHash, so it
/// limits, rather than rules out, what a manager who adds many crafted names can do to lookups.
struct NameHasher(u64);

/// Builds [`NameHasher`]s from the per-process seed.
#[derive(Clone, Copy)]
struct NameHasherBuilder(u64);

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

/// A compiled account.
#[derive(Debug)]
pub struct Account {
    name: Arc<str>,
    access: Grants,
    header_names: Vec<HeaderName>,
    endpoints: Vec<Arc<Endpoint>>,
    by_name: NameMap,
}

impl Account {
    /// The account name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The account's grants.
    pub fn access(&self) -> &Grants {
        &self.access
    }

    /// The names (never the values) of the account's `header_auth` headers.
    pub fn header_names(&self) -> &[HeaderName] {
        &self.header_names
    }

    /// The endpoints, in the order they were given.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// One endpoint by name.
    pub fn endpoint(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.by_name.get(name).map(|&i| &self.endpoints[i])
    }
}

/// An immutable snapshot of every account and endpoint.
#[derive(Debug, Default)]
pub struct Registry {
    accounts: Vec<Account>,
    by_name: NameMap,
    specs: Vec<AccountSpec>,
}

/// Whether `name` may be an account or endpoint name: a single path segment of unreserved
/// characters (`A-Z a-z 0-9 - . _ ~`), not `.` or `..`, at most 128 bytes.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

const NAME_RULE: &str = "must be 1 to 128 of A-Z a-z 0-9 - . _ ~, and not \".\" or \"..\"";

/// Headers a configuration may not inject: the proxy owns them.
fn forbidden_header(name: &HeaderName) -> bool {
    crate::hop::is_hop_by_hop(name)
        || name == header::HOST
        || name == header::CONTENT_LENGTH
        || name == header::ACCEPT_ENCODING
}

fn check_headers(headers: &HeaderMap, field: &str) -> Result<(), RegistryError> {
    for name in headers.keys() {
        if forbidden_header(name) {
            return Err(RegistryError::new(
                format!("{field}.{name}"),
                "this header is managed by the gateway and cannot be configured",
            ));
        }
    }
    Ok(())
}

impl Registry {
    /// Validates and compiles the accounts. Errors name the field, e.g.
    /// `accounts[0].endpoints[1].base_url`.
    pub fn from_accounts(accounts: Vec<AccountSpec>) -> Result<Self, RegistryError> {
        let mut specs = accounts.clone();
        for spec in &mut specs {
            let endpoint_headers = spec.endpoints.iter_mut().map(|e| &mut e.headers);
            for headers in std::iter::once(&mut spec.header_auth).chain(endpoint_headers) {
                for value in headers.values_mut() {
                    value.set_sensitive(true);
                }
            }
        }
        let mut registry = Registry {
            specs,
            ..Registry::default()
        };
        for (i, spec) in accounts.into_iter().enumerate() {
            let field = format!("accounts[{i}]");
            if !is_valid_name(&spec.name) {
                return Err(RegistryError::new(format!("{field}.name"), NAME_RULE));
            }
            check_headers(&spec.header_auth, &format!("{field}.header_auth"))?;
            let account_name: Arc<str> = spec.name.as_str().into();
            let account_grants = Arc::new(spec.access.clone());
            let mut account = Account {
                name: account_name.clone(),
                access: spec.access,
                header_names: spec.header_auth.keys().cloned().collect(),
                endpoints: Vec::with_capacity(spec.endpoints.len()),
                by_name: NameMap::with_capacity_and_hasher(
                    spec.endpoints.len(),
                    Default::default(),
                ),
            };
            for (j, ep) in spec.endpoints.into_iter().enumerate() {
                let field = format!("{field}.endpoints[{j}]");
                if !is_valid_name(&ep.name) {
                    return Err(RegistryError::new(format!("{field}.name"), NAME_RULE));
                }
                let base = UpstreamBase::parse(&ep.base_url)
                    .map_err(|m| RegistryError::new(format!("{field}.base_url"), m))?;
                check_headers(&ep.headers, &format!("{field}.headers"))?;
                for (what, d) in [
                    ("connect_ms", ep.timeouts.connect),
                    ("first_byte_ms", ep.timeouts.first_byte),
                    ("idle_ms", ep.timeouts.idle),
                ] {
                    if d == Some(Duration::ZERO) {
                        return Err(RegistryError::new(
                            format!("{field}.timeouts.{what}"),
                            "must be greater than zero",
                        ));
                    }
                }
                let mut headers = spec.header_auth.clone();
                for name in ep.headers.keys() {
                    headers.remove(name);
                }
                for (name, value) in &ep.headers {
                    headers.append(name.clone(), value.clone());
                }
                for value in headers.values_mut() {
                    value.set_sensitive(true);
                }
                let templates: Vec<(HeaderName, HeaderTemplate)> = headers
                    .iter()
                    .filter_map(|(name, value)| {
                        HeaderTemplate::parse(value).map(|t| (name.clone(), t))
                    })
                    .collect();
                for (name, _) in &templates {
                    headers.remove(name);
                }
                let grants = match &ep.access {
                    None => account_grants.clone(),
                    Some(own) => {
                        let mut managers = account_grants.managers.clone();
                        managers.extend(
                            own.managers
                                .iter()
                                .filter(|m| !account_grants.managers.contains(m))
                                .cloned(),
                        );
                        Arc::new(Grants {
                            managers,
                            users: own.users.clone(),
                            viewers: own.viewers.clone(),
                        })
                    }
                };
                let name: Arc<str> = ep.name.as_str().into();
                match account.by_name.entry(name.clone()) {
                    Entry::Occupied(_) => {
                        return Err(RegistryError::new(
                            format!("{field}.name"),
                            format!(
                                "duplicate endpoint name \"{name}\" in account \"{account_name}\""
                            ),
                        ));
                    }
                    Entry::Vacant(v) => {
                        v.insert(account.endpoints.len());
                    }
                }
                let common_uris = COMMON_PATHS.map(|path| upstream_uri(&base, path, None).ok());
                account.endpoints.push(Arc::new(Endpoint {
                    account: account_name.clone(),
                    name,
                    base,
                    headers,
                    templates,
                    access: ep.access,
                    grants,
                    timeouts: ep.timeouts,
                    common_uris,
                    #[cfg(feature = "forward")]
                    tls: ep.tls,
                    #[cfg(feature = "forward")]
                    client: OnceLock::new(),
                }));
            }
            match registry.by_name.entry(account_name.clone()) {
                Entry::Occupied(_) => {
                    return Err(RegistryError::new(
                        format!("{field}.name"),
                        format!("duplicate account name \"{account_name}\""),
                    ));
                }
                Entry::Vacant(v) => {
                    v.insert(registry.accounts.len());
                }
            }
            registry.accounts.push(account);
        }
        Ok(registry)
    }

    /// The specs this registry was built from, to derive a changed registry from.
    pub fn specs(&self) -> &[AccountSpec] {
        &self.specs
    }

    /// The accounts, in the order they were given.
    pub fn accounts(&self) -> &[Account] {
        &self.accounts
    }

    /// One account by name.
    pub fn account(&self, name: &str) -> Option<&Account> {
        self.by_name.get(name).map(|&i| &self.accounts[i])
    }

    /// One endpoint by account and endpoint name.
    pub fn endpoint(&self, account: &str, endpoint: &str) -> Option<&Arc<Endpoint>> {
        self.account(account)?.endpoint(endpoint)
    }
}

/// The current [`Registry`], swappable atomically; cheap to clone (an `Arc`).
///
/// Readers never wait: each request loads the snapshot lock-free. Writers ([`store`],
/// [`update`]) are serialized so that two concurrent updates cannot lose each other.
///
/// [`store`]: SharedRegistry::store
/// [`update`]: SharedRegistry::update
#[derive(Clone)]
pub struct SharedRegistry {
    current: Arc<ArcSwap<Registry>>,
    writer: Arc<Mutex<()>>,
}

impl SharedRegistry {
    /// Holds `registry` as the current snapshot.
    pub fn new(registry: Registry) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(registry)),
            writer: Arc::new(Mutex::new(())),
        }
    }

    /// Changes the current specs and swaps in the registry built from them; on any error
    /// (from `change` or from validation) the current registry stays.
    pub fn update<E>(
        &self,
        change: impl FnOnce(&mut Vec<AccountSpec>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<RegistryError>,
    {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut specs = self.current.load().specs().to_vec();
        change(&mut specs)?;
        let next = Registry::from_accounts(specs)?;
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// The current snapshot.
    pub fn load(&self) -> arc_swap::Guard<Arc<Registry>> {
        self.current.load()
    }

    /// The current snapshot as an owned `Arc`.
    pub fn load_full(&self) -> Arc<Registry> {
        self.current.load_full()
    }

    /// Replaces the snapshot. Requests already routed keep the endpoint they started with.
    pub fn store(&self, registry: Registry) {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.current.store(Arc::new(registry));
    }
}

impl Default for SharedRegistry {
    fn default() -> Self {
        Self::new(Registry::default())
    }
}

impl From<Registry> for SharedRegistry {
    fn from(registry: Registry) -> Self {
        Self::new(registry)
    }
}

impl fmt::Debug for SharedRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedRegistry")
            .field(&*self.load())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn endpoints_hold_the_upstream_uris_of_the_common_paths() {
        let registry = Registry::from_accounts(vec![AccountSpec {
            endpoints: vec![EndpointSpec::new("e", "https://api.inference.wandb.ai/v1")],
            ..AccountSpec::new("a")
        }])
        .unwrap();
        let ep = registry.endpoint("a", "e").unwrap();
        let uris: Vec<String> = (0..COMMON_PATHS.len())
            .map(|i| ep.common_uri(i).unwrap().to_string())
            .collect();
        assert_eq!(
            uris,
            [
                "https://api.inference.wandb.ai/v1/chat/completions",
                "https://api.inference.wandb.ai/v1/completions",
                "https://api.inference.wandb.ai/v1/embeddings",
                "https://api.inference.wandb.ai/v1/models",
                "https://api.inference.wandb.ai/v1/responses",
            ]
        );
        assert!(ep.common_uri(COMMON_PATHS.len()).is_none());
    }

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

    #[test]
    fn base_urls() {
        let ok = [
            (
                "https://api.inference.wandb.ai/v1",
                "https",
                "api.inference.wandb.ai",
                "/v1",
            ),
            ("http://127.0.0.1:8080", "http", "127.0.0.1:8080", ""),
            ("http://[::1]:9/a/b", "http", "[::1]:9", "/a/b"),
        ];
        for (url, scheme, authority, path) in ok {
            let b = UpstreamBase::parse(url).unwrap();
            assert_eq!(b.scheme().as_str(), scheme);
            assert_eq!(b.authority().as_str(), authority);
            assert_eq!(b.path(), path);
            assert_eq!(b.to_string(), url);
        }
        let bad = [
            "api.example.com/v1",
            "ftp://example.com",
            "https://example.com/v1/",
            "https://example.com/",
            "https://user:pw@example.com/v1",
            "https://example.com/v1?x=1",
            "https://example.com/v1#f",
            "https://example.com/a/../b",
            "https://example.com/a//b",
            "https://example.com/%2E%2E/b",
            "",
        ];
        for url in bad {
            assert!(UpstreamBase::parse(url).is_err(), "{url:?}");
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn endpoint_headers_override_account_headers_and_are_sensitive() {
        let reg = Registry::from_accounts(vec![AccountSpec {
            header_auth: headers(&[("authorization", "Bearer shared"), ("x-org", "acme")]),
            endpoints: vec![
                EndpointSpec {
                    headers: headers(&[("authorization", "Bearer own")]),
                    ..EndpointSpec::new("own", "https://example.com/v1")
                },
                EndpointSpec::new("inherits", "https://example.com/v1"),
            ],
            ..AccountSpec::new("acct")
        }])
        .unwrap();
        let own = reg.endpoint("acct", "own").unwrap();
        assert_eq!(own.headers().get_all("authorization").iter().count(), 1);
        assert_eq!(own.headers()["authorization"], "Bearer own");
        assert_eq!(own.headers()["x-org"], "acme");
        assert!(own.headers().values().all(HeaderValue::is_sensitive));
        let inherits = reg.endpoint("acct", "inherits").unwrap();
        assert_eq!(inherits.headers()["authorization"], "Bearer shared");
        assert!(format!("{own:?}").find("Bearer").is_none());
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(Vec<AccountSpec>, &str)> = vec![
            (vec![AccountSpec::new("a/b")], "accounts[0].name"),
            (vec![AccountSpec::new("..")], "accounts[0].name"),
            (
                vec![AccountSpec::new("a"), AccountSpec::new("a")],
                "accounts[1].name",
            ),
            (
                vec![AccountSpec {
                    endpoints: vec![EndpointSpec::new("e", "https://x/v1/")],
                    ..AccountSpec::new("a")
                }],
                "accounts[0].endpoints[0].base_url",
            ),
            (
                vec![AccountSpec {
                    endpoints: vec![
                        EndpointSpec::new("e", "https://x/v1"),
                        EndpointSpec::new("e", "https://y/v1"),
                    ],
                    ..AccountSpec::new("a")
                }],
                "accounts[0].endpoints[1].name",
            ),
            (
                vec![AccountSpec {
                    header_auth: headers(&[("connection", "close")]),
                    ..AccountSpec::new("a")
                }],
                "accounts[0].header_auth.connection",
            ),
            (
                vec![AccountSpec {
                    endpoints: vec![EndpointSpec {
                        headers: headers(&[("host", "evil")]),
                        ..EndpointSpec::new("e", "https://x/v1")
                    }],
                    ..AccountSpec::new("a")
                }],
                "accounts[0].endpoints[0].headers.host",
            ),
            (
                vec![AccountSpec {
                    endpoints: vec![EndpointSpec {
                        timeouts: Timeouts {
                            idle: Some(Duration::ZERO),
                            ..Timeouts::default()
                        },
                        ..EndpointSpec::new("e", "https://x/v1")
                    }],
                    ..AccountSpec::new("a")
                }],
                "accounts[0].endpoints[0].timeouts.idle_ms",
            ),
        ];
        for (accounts, field) in cases {
            let err = Registry::from_accounts(accounts).unwrap_err();
            assert_eq!(err.field(), field, "{err}");
        }
    }
}
