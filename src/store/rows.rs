//! The model's records as the tables hold them (JSON text and integers), and back.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::model::{
    AccountSpec, EjectPolicy, EndpointSpec, Grants, HealthCheck, KeyDigest, KeyRecord, KeySource,
    LimitRules, RateLimitRule, RetryPolicy, Subject, TargetSpec, Timeouts,
};
use crate::tls::{TlsFiles, TlsSettings};

#[derive(Serialize, Deserialize, Default)]
pub(super) struct GrantsRow {
    #[serde(default)]
    managers: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    viewers: Vec<String>,
}

impl GrantsRow {
    pub(super) fn of(g: &Grants) -> Self {
        let list = |s: &[Subject]| s.iter().map(ToString::to_string).collect();
        Self {
            managers: list(&g.managers),
            users: list(&g.users),
            viewers: list(&g.viewers),
        }
    }

    fn grants(&self, what: &str) -> Result<Grants, StoreError> {
        Grants::parse(&self.managers, &self.users, &self.viewers, "access")
            .map_err(|e| StoreError::corrupt(format!("{what}: {e}")))
    }
}

#[derive(Serialize, Deserialize, Default)]
struct TimeoutsRow {
    connect_ms: Option<u64>,
    first_byte_ms: Option<u64>,
    idle_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct TlsRow {
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
}

/// A target of an endpoint's pool, within its `spec` column.
#[derive(Serialize, Deserialize)]
struct TargetRow {
    base_url: String,
    weight: u32,
    priority: u32,
    #[serde(default)]
    headers: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    timeouts: TimeoutsRow,
    #[serde(default)]
    tls: Option<TlsRow>,
}

#[derive(Serialize, Deserialize)]
struct RetryRow {
    attempts: u32,
    on_status: Vec<u16>,
    budget_percent: u32,
    min_per_second: u32,
    max_body_bytes: u64,
}

#[derive(Serialize, Deserialize)]
struct EjectRow {
    consecutive_failures: u32,
    #[serde(default = "default_error_percent")]
    error_percent: u32,
    #[serde(default = "default_window")]
    window: u32,
    base_ms: u64,
    max_ms: u64,
}

fn default_error_percent() -> u32 {
    EjectPolicy::default().error_percent
}

fn default_window() -> u32 {
    EjectPolicy::default().window
}

#[derive(Serialize, Deserialize)]
struct HealthRow {
    path: String,
    interval_ms: u64,
}

/// An endpoint's spec as the `spec` column holds it. The pool's fields are absent from rows
/// written before pools existed, and read as one `base_url` with the default policies.
#[derive(Serialize, Deserialize)]
struct EndpointRow {
    #[serde(default)]
    base_url: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    targets: Vec<TargetRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry: Option<RetryRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eject: Option<EjectRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health: Option<HealthRow>,
    #[serde(default)]
    headers: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    access: Option<GrantsRow>,
    #[serde(default)]
    timeouts: TimeoutsRow,
    #[serde(default)]
    tls: Option<TlsRow>,
}

/// Header values are kept as written: they are the upstream credentials the gateway injects.
pub(super) fn headers_json(headers: &HeaderMap) -> Result<String, StoreError> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        let value = std::str::from_utf8(value.as_bytes())
            .map_err(|_| StoreError::invalid(format!("header {name}: the value is not UTF-8")))?;
        map.entry(name.as_str().to_owned())
            .or_default()
            .push(value.to_owned());
    }
    Ok(serde_json::to_string(&map).expect("strings serialize"))
}

fn headers_of(map: &BTreeMap<String, Vec<String>>, what: &str) -> Result<HeaderMap, StoreError> {
    let mut headers = HeaderMap::with_capacity(map.len());
    for (name, values) in map {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| StoreError::corrupt(format!("{what}: a header name is not valid")))?;
        for value in values {
            // The value is never quoted: it is a secret.
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                StoreError::corrupt(format!("{what}: the value of header {name} is not valid"))
            })?;
            value.set_sensitive(true);
            headers.append(name.clone(), value);
        }
    }
    Ok(headers)
}

pub(super) fn account_row(a: &AccountSpec) -> Result<(String, String), StoreError> {
    Ok((
        headers_json(&a.header_auth)?,
        serde_json::to_string(&GrantsRow::of(&a.access)).expect("strings serialize"),
    ))
}

pub(super) fn account_of(
    name: String,
    version: i64,
    header_auth: &str,
    access: &str,
) -> Result<AccountSpec, StoreError> {
    let what = format!("account {name}");
    let headers: BTreeMap<String, Vec<String>> = serde_json::from_str(header_auth)
        .map_err(|_| StoreError::corrupt(format!("{what}: header_auth is not valid JSON")))?;
    let access: GrantsRow = serde_json::from_str(access)
        .map_err(|_| StoreError::corrupt(format!("{what}: access is not valid JSON")))?;
    Ok(AccountSpec {
        header_auth: headers_of(&headers, &what)?,
        access: access.grants(&what)?,
        version: u64::try_from(version).unwrap_or(0),
        ..AccountSpec::new(name)
    })
}

fn tls_row(tls: Option<&Arc<TlsSettings>>, what: &str) -> Result<Option<TlsRow>, StoreError> {
    let Some(settings) = tls else {
        return Ok(None);
    };
    let files = settings.files().ok_or_else(|| {
        StoreError::invalid(format!(
            "endpoint {what}: TLS settings built from PEM data, not files, cannot be stored"
        ))
    })?;
    Ok(Some(TlsRow {
        ca_file: files.ca_file.clone(),
        client_cert_file: files.client_cert_file.clone(),
        client_key_file: files.client_key_file.clone(),
    }))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn timeouts_row(t: Timeouts) -> TimeoutsRow {
    TimeoutsRow {
        connect_ms: t.connect.map(ms),
        first_byte_ms: t.first_byte.map(ms),
        idle_ms: t.idle.map(ms),
    }
}

fn timeouts_of(t: &TimeoutsRow) -> Timeouts {
    Timeouts::from_millis(t.connect_ms, t.first_byte_ms, t.idle_ms)
}

fn headers_row(headers: &HeaderMap) -> Result<BTreeMap<String, Vec<String>>, StoreError> {
    Ok(serde_json::from_str(&headers_json(headers)?).expect("just serialized"))
}

pub(super) fn endpoint_row(ep: &EndpointSpec) -> Result<String, StoreError> {
    let targets = ep
        .targets
        .iter()
        .map(|t| {
            Ok(TargetRow {
                base_url: t.base_url.clone(),
                weight: t.weight,
                priority: t.priority,
                headers: headers_row(&t.headers)?,
                timeouts: timeouts_row(t.timeouts),
                tls: tls_row(t.tls.as_ref(), &ep.name)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let row = EndpointRow {
        base_url: ep.base_url.clone(),
        targets,
        retry: ep.retry.as_ref().map(|r| RetryRow {
            attempts: r.attempts,
            on_status: r.on_status.clone(),
            budget_percent: r.budget_percent,
            min_per_second: r.min_per_second,
            max_body_bytes: r.max_body_bytes,
        }),
        eject: (ep.eject != EjectPolicy::default()).then(|| EjectRow {
            consecutive_failures: ep.eject.consecutive_failures,
            error_percent: ep.eject.error_percent,
            window: ep.eject.window,
            base_ms: ms(ep.eject.base),
            max_ms: ms(ep.eject.max),
        }),
        health: ep.health.as_ref().map(|h| HealthRow {
            path: h.path.clone(),
            interval_ms: ms(h.interval),
        }),
        headers: headers_row(&ep.headers)?,
        access: ep.access.as_ref().map(GrantsRow::of),
        timeouts: timeouts_row(ep.timeouts),
        tls: tls_row(ep.tls.as_ref(), &ep.name)?,
    };
    Ok(serde_json::to_string(&row).expect("strings serialize"))
}

/// TLS settings read once per set of files, so that every snapshot loaded shares them (and so
/// the forwarder's pool for them stays warm across changes).
#[derive(Default)]
pub(super) struct TlsCache(Mutex<HashMap<TlsFiles, Arc<TlsSettings>>>);

impl TlsCache {
    fn get(&self, files: TlsFiles, what: &str) -> Result<Arc<TlsSettings>, StoreError> {
        let mut cache = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(settings) = cache.get(&files) {
            return Ok(settings.clone());
        }
        let settings = Arc::new(
            files
                .load()
                .map_err(|e| StoreError::corrupt(format!("{what}: tls.{e}")))?,
        );
        cache.insert(files, settings.clone());
        Ok(settings)
    }
}

pub(super) fn endpoint_of(
    account: &str,
    name: String,
    version: i64,
    spec: &str,
    tls: &TlsCache,
) -> Result<EndpointSpec, StoreError> {
    let what = format!("endpoint {account}/{name}");
    let row: EndpointRow = serde_json::from_str(spec)
        .map_err(|_| StoreError::corrupt(format!("{what}: spec is not valid JSON")))?;
    let load_tls = |t: Option<TlsRow>| {
        t.map(|t| {
            tls.get(
                TlsFiles {
                    ca_file: t.ca_file,
                    client_cert_file: t.client_cert_file,
                    client_key_file: t.client_key_file,
                },
                &what,
            )
        })
        .transpose()
    };
    let targets = row
        .targets
        .into_iter()
        .map(|t| {
            Ok(TargetSpec {
                weight: t.weight,
                priority: t.priority,
                headers: headers_of(&t.headers, &what)?,
                timeouts: timeouts_of(&t.timeouts),
                tls: load_tls(t.tls)?,
                ..TargetSpec::new(t.base_url)
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(EndpointSpec {
        headers: headers_of(&row.headers, &what)?,
        access: row.access.map(|g| g.grants(&what)).transpose()?,
        timeouts: timeouts_of(&row.timeouts),
        tls: load_tls(row.tls)?,
        targets,
        retry: row.retry.map(|r| RetryPolicy {
            attempts: r.attempts,
            on_status: r.on_status,
            budget_percent: r.budget_percent,
            min_per_second: r.min_per_second,
            max_body_bytes: r.max_body_bytes,
        }),
        eject: row
            .eject
            .map_or_else(EjectPolicy::default, |e| EjectPolicy {
                consecutive_failures: e.consecutive_failures,
                error_percent: e.error_percent,
                window: e.window,
                base: Duration::from_millis(e.base_ms),
                max: Duration::from_millis(e.max_ms),
            }),
        health: row.health.map(|h| HealthCheck {
            path: h.path,
            interval: Duration::from_millis(h.interval_ms),
        }),
        version: u64::try_from(version).unwrap_or(0),
        ..EndpointSpec::new(name, row.base_url)
    })
}

pub(super) fn seconds(t: Option<SystemTime>) -> Option<i64> {
    t.map(|t| match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    })
}

fn time_of(secs: Option<i64>) -> Option<SystemTime> {
    secs.map(|s| UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0)))
}

pub(super) fn source_name(source: KeySource) -> &'static str {
    match source {
        KeySource::File => "file",
        KeySource::Store => "store",
    }
}

/// The columns of a `gw_keys` row after its id and position.
pub(super) struct KeyRow {
    pub(super) digest: String,
    pub(super) subject: String,
    pub(super) teams: String,
    pub(super) created_at: Option<i64>,
    pub(super) expires_at: Option<i64>,
    pub(super) revoked_at: Option<i64>,
    pub(super) source: String,
    pub(super) last_used_day: Option<i64>,
}

pub(super) fn key_row(k: &KeyRecord) -> KeyRow {
    KeyRow {
        digest: k.digest.to_hex(),
        subject: k.subject.clone(),
        teams: serde_json::to_string(&k.teams).expect("strings serialize"),
        created_at: seconds(k.created_at),
        expires_at: seconds(k.expires_at),
        revoked_at: seconds(k.revoked_at),
        source: source_name(k.source).to_owned(),
        last_used_day: k.last_used_day.map(i64::from),
    }
}

pub(super) fn key_of(id: String, row: KeyRow) -> Result<KeyRecord, StoreError> {
    let what = format!("key {id}");
    let digest = KeyDigest::from_hex(&row.digest)
        .map_err(|_| StoreError::corrupt(format!("{what}: the digest is not valid")))?;
    let teams: Vec<String> = serde_json::from_str(&row.teams)
        .map_err(|_| StoreError::corrupt(format!("{what}: teams is not valid JSON")))?;
    let source = match row.source.as_str() {
        "file" => KeySource::File,
        "store" => KeySource::Store,
        _ => return Err(StoreError::corrupt(format!("{what}: unknown source"))),
    };
    Ok(KeyRecord {
        created_at: time_of(row.created_at),
        expires_at: time_of(row.expires_at),
        revoked_at: time_of(row.revoked_at),
        source,
        last_used_day: row.last_used_day.and_then(|d| u32::try_from(d).ok()),
        ..KeyRecord::new(id, digest, row.subject, teams)
    })
}

/// The rate-limit rules as the store keeps them: a JSON array of rules in the file's shape.
pub(super) fn rules_row(rules: &LimitRules) -> String {
    serde_json::Value::Array(rules.rules.iter().map(RateLimitRule::to_json).collect()).to_string()
}

/// The rate-limit rules of their row.
pub(super) fn rules_of(version: i64, text: &str) -> Result<LimitRules, StoreError> {
    let corrupt = |e: &dyn std::fmt::Display| StoreError::corrupt(format!("rate limits: {e}"));
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| corrupt(&e))?;
    let items = value.as_array().ok_or_else(|| corrupt(&"not an array"))?;
    let rules = items
        .iter()
        .enumerate()
        .map(|(i, v)| RateLimitRule::from_json(v, &format!("rules[{i}]")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| corrupt(&e))?;
    Ok(LimitRules {
        rules,
        version: u64::try_from(version).unwrap_or(0),
    })
}
