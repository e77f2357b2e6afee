//! Gateway keys and the audit log, for the gateway's admins (`admins` in the configuration).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::extract::{Path, RawQuery, State};
use axum::response::IntoResponse;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::{
    Answer, Api, Caller, ErrorBody, JsonBody, Refused, audit_entry, bad_request, json,
};
use crate::error::GatewayError;
use crate::ext::Principal;
use crate::model::{KeyDigest, KeyRecord, KeySource, Snapshot};
use crate::rfc3339;

/// The body of `POST /keys`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewKey {
    subject: String,
    #[serde(default)]
    teams: Vec<String>,
    #[serde(default)]
    expires_at: Option<String>,
}

/// The body of `POST /keys/{id}/rotate`.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Rotate {
    #[serde(default)]
    grace_seconds: u64,
}

/// A key as issued: the only answer that ever holds the key itself.
#[derive(Serialize, ToSchema)]
pub(super) struct Issued {
    id: String,
    key: String,
    subject: String,
    teams: Vec<String>,
    created_at: Option<String>,
    expires_at: Option<String>,
}

/// A key as listed: never the key or its digest.
#[derive(Serialize, ToSchema)]
pub(super) struct Listed {
    id: String,
    subject: String,
    teams: Vec<String>,
    source: &'static str,
    created_at: Option<String>,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    last_used_day: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct KeyList {
    keys: Vec<Listed>,
}

/// `limit` and `before` of `GET /audit?limit=N&before=CURSOR` (both numbers, so nothing to
/// decode).
fn audit_query(query: Option<&str>) -> Result<(u32, Option<i64>), GatewayError> {
    let (mut limit, mut before) = (50, None);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => {
                limit = value
                    .parse::<u32>()
                    .map_err(|_| bad_request("limit: must be a number from 1 to 1000"))?
            }
            "before" => {
                before =
                    Some(value.parse::<i64>().map_err(|_| {
                        bad_request("before: must be the `next` of a previous page")
                    })?)
            }
            _ => {}
        }
    }
    Ok((limit.clamp(1, 1000), before))
}

#[derive(Serialize, ToSchema)]
pub(super) struct AuditPage {
    entries: Vec<AuditView>,
    next: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct AuditView {
    at: String,
    actor: String,
    action: String,
    target: String,
    #[schema(value_type = Object)]
    changes: serde_json::Value,
}

fn time(t: Option<SystemTime>) -> Option<String> {
    t.map(rfc3339::format)
}

impl Api {
    /// Admins only: 403 for anyone else.
    pub(super) fn admin(&self, principal: &Principal) -> Result<(), GatewayError> {
        if self.admins.load().iter().any(|s| s.matches(principal)) {
            Ok(())
        } else {
            Err(GatewayError::forbidden(format!(
                "The key \"{}\" is not a gateway admin; keys, rate limits and the audit log \
                 are for the subjects in `admins`.",
                principal.key_id
            )))
        }
    }
}

/// 32 random bytes from the operating system, as 64 hexadecimal digits.
fn random_hex(bytes: usize) -> Result<String, GatewayError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|_| {
        GatewayError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_randomness",
            "The gateway could not get random bytes from the operating system.",
        )
    })?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A new key record for `subject` and `teams` and the key itself, with a fresh id.
fn issue(
    s: &Snapshot,
    subject: String,
    teams: Vec<String>,
    expires_at: Option<SystemTime>,
    key: &str,
) -> Result<KeyRecord, GatewayError> {
    let id = loop {
        let id = format!("key-{}", random_hex(6)?);
        if !s.keys.iter().any(|k| k.id == id) {
            break id;
        }
    };
    Ok(KeyRecord {
        created_at: Some(SystemTime::now()),
        expires_at,
        source: KeySource::Store,
        ..KeyRecord::new(id, KeyDigest::of(key), subject, teams)
    })
}

fn issued(record: &KeyRecord, key: String) -> Issued {
    Issued {
        id: record.id.clone(),
        key,
        subject: record.subject.clone(),
        teams: record.teams.clone(),
        created_at: time(record.created_at),
        expires_at: time(record.expires_at),
    }
}

/// Where an edit leaves the record it issued, for the answer.
type Slot = Arc<Mutex<Option<KeyRecord>>>;

fn take(slot: &Slot) -> Result<KeyRecord, GatewayError> {
    slot.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .ok_or_else(|| GatewayError::not_found("No such key."))
}

fn no_key() -> GatewayError {
    GatewayError::not_found("No such key.")
}

fn from_file() -> GatewayError {
    GatewayError::forbidden("This key comes from the configuration file; change it there.")
}

#[utoipa::path(post, path = "/keys", tag = "keys", request_body = NewKey, responses((status = 201, description = "The key, shown this once", body = Issued), (status = 400, description = "Invalid input, the field named", body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn create(
    State(api): State<Arc<Api>>,
    Caller(principal): Caller,
    JsonBody(body): JsonBody<NewKey>,
) -> Answer {
    api.admin(&principal)?;
    let expires_at = body
        .expires_at
        .as_deref()
        .map(|t| {
            rfc3339::parse(t).ok_or_else(|| {
                bad_request("expires_at: must be an RFC 3339 time, e.g. 2027-01-31T00:00:00Z")
            })
        })
        .transpose()?;
    if expires_at.is_some_and(|t| t <= SystemTime::now()) {
        return Err(bad_request("expires_at: must be in the future").into());
    }
    let key = format!("gw-{}", random_hex(32)?);
    let slot = Slot::default();
    let edit = {
        let (key, slot, principal) = (key.clone(), slot.clone(), principal.clone());
        move |s: &mut Snapshot| {
            let record = issue(s, body.subject, body.teams, expires_at, &key)?;
            let changes = serde_json::json!({
                "subject": &record.subject,
                "teams": &record.teams,
                "expires_at": time(record.expires_at),
            });
            let entry = audit_entry(
                &principal,
                "key.create",
                &format!("key:{}", record.id),
                changes,
            );
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(record.clone());
            s.keys.push(record);
            Ok(vec![entry])
        }
    };
    api.write(edit, &Default::default()).await?;
    let record = take(&slot)?;
    tracing::info!(key_id = %principal.key_id, new_key = %record.id, "gateway key issued");
    Ok(json(StatusCode::CREATED, &issued(&record, key)))
}

#[utoipa::path(get, path = "/keys", tag = "keys", responses((status = 200, description = "Every key, never a key or its digest", body = KeyList), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn list(State(api): State<Arc<Api>>, Caller(principal): Caller) -> Answer {
    api.admin(&principal)?;
    let used = api.live.keys().current();
    let keys = api
        .live
        .key_records()
        .iter()
        .map(|k| Listed {
            id: k.id.clone(),
            subject: k.subject.clone(),
            teams: k.teams.clone(),
            source: match k.source {
                KeySource::File => "file",
                KeySource::Store => "store",
            },
            created_at: time(k.created_at),
            expires_at: time(k.expires_at),
            revoked_at: time(k.revoked_at),
            last_used_day: k
                .last_used_day
                .max(used.used_on(&k.digest))
                .map(rfc3339::day),
        })
        .collect();
    Ok(json(StatusCode::OK, &KeyList { keys }))
}

#[utoipa::path(delete, path = "/keys/{id}", tag = "keys", params(("id" = String, Path, description = "The key id")), responses((status = 204, description = "Revoked"), (status = 404, description = "No such key", body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn revoke(
    State(api): State<Arc<Api>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Answer {
    api.admin(&principal)?;
    let edit = {
        let (id, principal) = (id.clone(), principal.clone());
        move |s: &mut Snapshot| {
            let key = s.keys.iter_mut().find(|k| k.id == id).ok_or_else(no_key)?;
            if key.source == KeySource::File {
                return Err(from_file());
            }
            if key.revoked_at.is_some() {
                return Ok(vec![]);
            }
            key.revoked_at = Some(SystemTime::now());
            Ok(vec![audit_entry(
                &principal,
                "key.revoke",
                &format!("key:{id}"),
                serde_json::json!({"subject": &key.subject}),
            )])
        }
    };
    api.write(edit, &Default::default()).await?;
    tracing::info!(key_id = %principal.key_id, revoked = %id, "gateway key revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/keys/{id}/rotate", tag = "keys", params(("id" = String, Path, description = "The key id")), request_body = Rotate, responses((status = 201, description = "The new key, shown this once", body = Issued), (status = 404, description = "No such key", body = ErrorBody), (status = 409, description = "The key is revoked or expired", body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn rotate(
    State(api): State<Arc<Api>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Rotate>,
) -> Answer {
    api.admin(&principal)?;
    let grace = Duration::from_secs(body.grace_seconds.min(30 * 24 * 3600));
    let key = format!("gw-{}", random_hex(32)?);
    let slot = Slot::default();
    let edit = {
        let (id, key, slot, principal) = (id.clone(), key.clone(), slot.clone(), principal.clone());
        move |s: &mut Snapshot| {
            let i = s.keys.iter().position(|k| k.id == id).ok_or_else(no_key)?;
            let old = &s.keys[i];
            if old.source == KeySource::File {
                return Err(from_file());
            }
            if old.revoked_at.is_some() || old.expires_at.is_some_and(|t| t <= SystemTime::now()) {
                return Err(GatewayError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    "This key is revoked or expired; issue a new one.",
                ));
            }
            let record = issue(
                s,
                old.subject.clone(),
                old.teams.clone(),
                old.expires_at,
                &key,
            )?;
            // The old key works for the grace period, never longer than it would have.
            let until = SystemTime::now() + grace;
            let old = &mut s.keys[i];
            old.expires_at = Some(old.expires_at.map_or(until, |t| t.min(until)));
            let changes = serde_json::json!({
                "new_id": &record.id,
                "old_expires_at": time(old.expires_at),
            });
            let entry = audit_entry(&principal, "key.rotate", &format!("key:{id}"), changes);
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(record.clone());
            s.keys.push(record);
            Ok(vec![entry])
        }
    };
    api.write(edit, &Default::default()).await?;
    let record = take(&slot)?;
    tracing::info!(key_id = %principal.key_id, rotated = %id, new_key = %record.id, "gateway key rotated");
    Ok(json(StatusCode::CREATED, &issued(&record, key)))
}

#[utoipa::path(get, path = "/audit", tag = "audit", params(("limit" = Option<u32>, Query, description = "At most this many entries (1 to 1000, default 50)"), ("before" = Option<String>, Query, description = "The `next` of the previous page")), responses((status = 200, description = "Audit entries, newest first", body = AuditPage), (status = 400, description = "A bad limit or cursor", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn audit(
    State(api): State<Arc<Api>>,
    Caller(principal): Caller,
    RawQuery(query): RawQuery,
) -> Answer {
    api.admin(&principal)?;
    let (limit, before) = audit_query(query.as_deref())?;
    let page = api
        .writer
        .audit(limit, before)
        .await
        .map_err(Refused::from)?;
    let next = (page.len() == usize::try_from(limit).unwrap_or(usize::MAX))
        .then(|| page.last().map(|(seq, _, _)| seq.to_string()))
        .flatten();
    let entries = page
        .into_iter()
        .map(|(_, at, e)| AuditView {
            at: rfc3339::format(at),
            actor: e.actor,
            action: e.action,
            target: e.target,
            changes: e.changes,
        })
        .collect();
    Ok(json(StatusCode::OK, &AuditPage { entries, next }))
}
