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

use std::fmt;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

mod counts;
#[cfg(feature = "auth")]
mod keys;
#[cfg(feature = "auth")]
mod live;
mod names;
mod pool;
mod rules;

pub use self::counts::{EndpointCounts, Totals, UsageCounts};
#[cfg(feature = "auth")]
pub use self::keys::SharedKeyStore;
#[cfg(feature = "auth")]
pub use self::live::{Live, MemoryWriter};
use self::names::NameMap;
#[cfg(feature = "forward")]
pub(crate) use self::pool::now_ms;
pub use self::pool::{
    Ejection, InFlight, LATENCY_SAMPLES, PoolState, Probe, Target, TargetHealth, TargetState,
    set_target_headers,
};
pub use self::rules::SharedLimitRules;
use http::header::{HeaderMap, HeaderName};
use http::uri::Uri;

pub use crate::model::{
    AccountSpec, EjectPolicy, EndpointSpec, FieldError, HealthCheck, RetryPolicy, TargetSpec,
    Timeouts, UpstreamBase, is_valid_name,
};
use crate::model::{COMMON_PATHS, Grants, HeaderTemplate};

/// The model's one validation error, [`FieldError`], under the name this module had for it.
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
    tls: Option<Arc<crate::tls::TlsSettings>>,
    targets: Box<[Target]>,
    /// Indices into `targets`, by priority (stable), and where each priority starts.
    order: Box<[usize]>,
    pool: Arc<PoolState>,
    health_check: Option<HealthCheck>,
    /// Whether it was written with `targets` (a pool, even of one) rather than `base_url`.
    uses_targets: bool,
    version: u64,
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

    /// The parsed base URL of the first target (the endpoint's `base_url`, or its first
    /// target's): where the route points a request before the forwarder picks a target.
    pub fn base(&self) -> &UpstreamBase {
        &self.base
    }

    /// The base URL of the first target as text.
    pub fn base_url(&self) -> String {
        self.base.to_string()
    }

    /// The targets, in the order they were given (one for an endpoint with a `base_url`).
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The indices of [`targets`](Self::targets) from the first priority to the last (in the
    /// order given within each).
    pub fn by_priority(&self) -> &[usize] {
        &self.order
    }

    /// Whether the endpoint was written with `targets` (a pool, even of one) rather than one
    /// `base_url`.
    pub fn uses_targets(&self) -> bool {
        self.uses_targets
    }

    /// Whether requests go to exactly one target, tried once: no choice, no retry.
    pub fn is_single(&self) -> bool {
        self.targets.len() == 1 && self.pool.retry().attempts <= 1
    }

    /// The pool's policies and its retry budget.
    pub fn pool(&self) -> &PoolState {
        &self.pool
    }

    /// The active health check of ejected targets, if any.
    pub fn health_check(&self) -> Option<&HealthCheck> {
        self.health_check.as_ref()
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

    /// The endpoint's version (see [`EndpointSpec::version`]).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The upstream URI for the `i`th of the route's common paths, without a query.
    pub(crate) fn common_uri(&self, i: usize) -> Option<&Uri> {
        self.common_uris.get(i)?.as_ref()
    }

    /// The endpoint's own TLS settings (extra roots or a client certificate), if any.
    #[cfg(feature = "forward")]
    pub fn tls(&self) -> Option<&Arc<crate::tls::TlsSettings>> {
        self.tls.as_ref()
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
            .field("targets", &self.targets)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
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
    version: u64,
}

impl Account {
    /// The account's version (see [`AccountSpec::version`]).
    pub fn version(&self) -> u64 {
        self.version
    }

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

impl Account {
    /// Compiles a validated account.
    fn compile(spec: &AccountSpec, field: &str) -> Result<Self, FieldError> {
        let name: Arc<str> = spec.name.as_str().into();
        let mut account = Account {
            name: name.clone(),
            access: spec.access.clone(),
            header_names: spec.header_auth.keys().cloned().collect(),
            endpoints: Vec::with_capacity(spec.endpoints.len()),
            by_name: NameMap::with_capacity_and_hasher(spec.endpoints.len(), Default::default()),
            version: spec.version,
        };
        // Endpoints without grants of their own share the account's.
        let account_grants = Arc::new(spec.access.clone());
        for (j, ep) in spec.endpoints.iter().enumerate() {
            let targets = compile_targets(ep, &format!("{field}.endpoints[{j}]"))?;
            let base = targets[0].base.clone();
            let mut order: Vec<usize> = (0..targets.len()).collect();
            order.sort_by_key(|&k| targets[k].priority);
            let retry = ep
                .retry
                .clone()
                .unwrap_or_else(|| RetryPolicy::default_for(targets.len()));
            let mut headers = spec.headers_for(ep);
            let templates: Vec<(HeaderName, HeaderTemplate)> = headers
                .iter()
                .filter_map(|(name, value)| HeaderTemplate::parse(value).map(|t| (name.clone(), t)))
                .collect();
            for (name, _) in &templates {
                headers.remove(name);
            }
            for target in targets.iter() {
                let probe = ep.health.as_ref().and_then(|check| {
                    let mut probe_headers = headers.clone();
                    set_target_headers(&mut probe_headers, &target.headers);
                    Some(Arc::new(Probe {
                        uri: target.base.join(&check.path, None)?,
                        headers: probe_headers,
                        interval: check.interval,
                        timeouts: target.timeouts,
                        #[cfg(feature = "forward")]
                        tls: target.tls.clone(),
                    }))
                });
                target.health.set_probe(probe);
            }
            let grants = match &ep.access {
                None => account_grants.clone(),
                Some(own) => Arc::new(spec.access.for_endpoint(Some(own))),
            };
            let common_uris = targets[0].common_uris.clone();
            let endpoint_name: Arc<str> = ep.name.as_str().into();
            account
                .by_name
                .insert(endpoint_name.clone(), account.endpoints.len());
            account.endpoints.push(Arc::new(Endpoint {
                account: name.clone(),
                name: endpoint_name,
                base,
                headers,
                templates,
                access: ep.access.clone(),
                grants,
                timeouts: ep.timeouts,
                common_uris,
                #[cfg(feature = "forward")]
                tls: ep.tls.clone(),
                targets,
                order: order.into(),
                pool: Arc::new(PoolState::new(retry, ep.eject)),
                health_check: ep.health.clone(),
                uses_targets: !ep.targets.is_empty(),
                version: ep.version,
            }));
        }
        Ok(account)
    }
}

/// The targets of an endpoint, compiled: one for its `base_url`, or one per target, each with
/// its timeouts and TLS settings merged over the endpoint's.
fn compile_targets(ep: &EndpointSpec, field: &str) -> Result<Box<[Target]>, FieldError> {
    let one;
    let specs: &[TargetSpec] = if ep.targets.is_empty() {
        one = [TargetSpec::new(ep.base_url.as_str())];
        &one
    } else {
        &ep.targets
    };
    let field_of = |k: usize| {
        if ep.targets.is_empty() {
            format!("{field}.base_url")
        } else {
            format!("{field}.targets[{k}].base_url")
        }
    };
    specs
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let base =
                UpstreamBase::parse(&t.base_url).map_err(|m| FieldError::new(field_of(k), m))?;
            let mut headers = t.headers.clone();
            for value in headers.values_mut() {
                value.set_sensitive(true);
            }
            let own = t.timeouts;
            let timeouts = Timeouts {
                connect: own.connect.or(ep.timeouts.connect),
                first_byte: own.first_byte.or(ep.timeouts.first_byte),
                idle: own.idle.or(ep.timeouts.idle),
            };
            Ok(Target {
                label: base.to_string().into(),
                common_uris: COMMON_PATHS.map(|path| base.join(path, None)),
                base,
                headers,
                weight: t.weight,
                priority: t.priority,
                timeouts,
                #[cfg(feature = "forward")]
                tls: t.tls.clone().or_else(|| ep.tls.clone()),
                health: Arc::default(),
            })
        })
        .collect()
}

/// An immutable snapshot of every account and endpoint.
#[derive(Debug, Default)]
pub struct Registry {
    accounts: Vec<Account>,
    by_name: NameMap,
    specs: Vec<AccountSpec>,
}

impl Registry {
    /// Validates ([`model::validate`](crate::model::validate)) and compiles the accounts.
    /// Errors name the field, e.g. `accounts[0].endpoints[1].base_url`.
    pub fn from_accounts(accounts: Vec<AccountSpec>) -> Result<Self, FieldError> {
        crate::model::validate(&accounts)?;
        let mut specs = accounts.clone();
        for spec in &mut specs {
            let target_headers: Vec<&mut HeaderMap> = spec
                .endpoints
                .iter_mut()
                .flat_map(|e| e.targets.iter_mut().map(|t| &mut t.headers))
                .collect();
            for headers in target_headers {
                for value in headers.values_mut() {
                    value.set_sensitive(true);
                }
            }
            let endpoint_headers = spec.endpoints.iter_mut().map(|e| &mut e.headers);
            for headers in std::iter::once(&mut spec.header_auth).chain(endpoint_headers) {
                for value in headers.values_mut() {
                    value.set_sensitive(true);
                }
            }
        }
        let mut registry = Registry {
            by_name: NameMap::with_capacity_and_hasher(accounts.len(), Default::default()),
            specs,
            ..Registry::default()
        };
        for (i, spec) in accounts.iter().enumerate() {
            let account = Account::compile(spec, &format!("accounts[{i}]"))?;
            registry
                .by_name
                .insert(account.name.clone(), registry.accounts.len());
            registry.accounts.push(account);
        }
        Ok(registry)
    }

    /// Takes over what `old` has learned about the targets this registry shares with it (same
    /// account, endpoint and base URL), and the retry budgets of endpoints whose retry policy
    /// is unchanged, so a swap forgets nothing about the upstreams.
    pub fn adopt_state(&mut self, old: &Registry) {
        for account in &mut self.accounts {
            let Some(was) = old.account(&account.name) else {
                continue;
            };
            for ep in &mut account.endpoints {
                let Some(prev) = was.endpoint(&ep.name) else {
                    continue;
                };
                let Some(ep) = Arc::get_mut(ep) else {
                    continue;
                };
                if prev.pool.retry() == ep.pool.retry() && prev.pool.eject() == ep.pool.eject() {
                    ep.pool = prev.pool.clone();
                }
                for target in ep.targets.iter_mut() {
                    if let Some(p) = prev.targets.iter().find(|p| p.label == target.label) {
                        // The learned state stays; what a health check sends is this
                        // snapshot's (its credentials, its path, or none).
                        p.health.set_probe(target.health.probe());
                        target.health = p.health.clone();
                    }
                }
            }
        }
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
        E: From<FieldError>,
    {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut specs = self.current.load().specs().to_vec();
        change(&mut specs)?;
        let mut next = Registry::from_accounts(specs)?;
        next.adopt_state(&self.current.load());
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

    /// Replaces the snapshot, which takes over what the current one has learned about the
    /// upstreams (see [`Registry::adopt_state`]). Requests already routed keep the endpoint
    /// they started with.
    pub fn store(&self, mut registry: Registry) {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        registry.adopt_state(&self.current.load());
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
}
