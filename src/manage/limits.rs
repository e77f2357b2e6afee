//! The rate-limit rules and their current usage, for the gateway's admins. A change is
//! validated as the file's `[[rate_limits.rules]]` are (a 400 names `rules[i].field`), goes
//! through the writer like every other change (audited; on a store it reaches every replica
//! within a second) and carries a version (`ETag`, `If-Match`).

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::{
    Answer, Api, Caller, Conflict, ErrorBody, JsonBody, audit_entry, bad_request, if_match, json,
    tagged,
};
use crate::error::GatewayError;
use crate::model::{LimitRules, LimitScope, RateLimitRule, Snapshot};

/// The rules as the API answers them, in the shape of the file's `[[rate_limits.rules]]`.
#[derive(Serialize, ToSchema)]
pub(super) struct RulesView {
    #[schema(value_type = Vec<Object>)]
    rules: Vec<serde_json::Value>,
    version: u64,
}

/// The body of `PUT /rate-limits`: the whole list, replacing the rules in force.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RulesBody {
    #[schema(value_type = Vec<Object>)]
    rules: Vec<serde_json::Value>,
}

/// One limit's usage, as `GET /rate-limits/usage` answers it.
#[derive(Serialize, ToSchema)]
pub(super) struct UsageView {
    rule: usize,
    scope: String,
    limit: &'static str,
    value: u64,
    used: u64,
    remaining: u64,
    reset_seconds: f64,
}

#[derive(Serialize, ToSchema)]
pub(super) struct UsageList {
    scope: String,
    limits: Vec<UsageView>,
}

fn view(rules: &LimitRules) -> RulesView {
    RulesView {
        rules: rules.rules.iter().map(RateLimitRule::to_json).collect(),
        version: rules.version,
    }
}

#[utoipa::path(get, path = "/rate-limits", tag = "rate limits", responses((status = 200, description = "The rules in force; ETag: their version", body = RulesView), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn get_rules(State(api): State<Arc<Api>>, Caller(principal): Caller) -> Answer {
    api.admin(&principal)?;
    let rules = api.live.rules().load();
    Ok(tagged(json(StatusCode::OK, &view(&rules)), rules.version))
}

#[utoipa::path(put, path = "/rate-limits", tag = "rate limits", params(("If-Match" = Option<String>, Header, description = "An ETag from a GET: the write applies only to that version")), request_body = RulesBody, responses((status = 200, description = "The new rules are in force", body = RulesView), (status = 400, description = "Invalid input, the field named", body = ErrorBody), (status = 409, description = "A stale If-Match; ETag: the current version", body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn put_rules(
    State(api): State<Arc<Api>>,
    Caller(principal): Caller,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RulesBody>,
) -> Answer {
    api.admin(&principal)?;
    let rules = body
        .rules
        .iter()
        .enumerate()
        .map(|(i, v)| RateLimitRule::from_json(v, &format!("rules[{i}]")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(GatewayError::from)?;
    let if_match = if_match(&headers)?;
    let conflict = Conflict::default();
    let edit = {
        let (principal, conflict) = (principal.clone(), conflict.clone());
        move |s: &mut Snapshot| {
            let current = s.rate_limits.as_ref().map_or(0, |r| r.version);
            conflict.check(if_match.as_ref(), Some(current))?;
            let changes = serde_json::json!({
                "rules": rules.iter().map(RateLimitRule::to_json).collect::<Vec<_>>(),
            });
            s.rate_limits = Some(LimitRules {
                rules,
                version: current,
            });
            Ok(vec![audit_entry(
                &principal,
                "rate_limits.put",
                "rate_limits",
                changes,
            )])
        }
    };
    api.write(edit, &conflict).await?;
    tracing::info!(key_id = %principal.key_id, "rate-limit rules replaced");
    let rules = api.live.rules().load();
    Ok(tagged(json(StatusCode::OK, &view(&rules)), rules.version))
}

/// The `scope` of `?scope=…`, percent-decoded.
fn scope_query(query: Option<&str>) -> Result<String, GatewayError> {
    let raw = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("scope="))
        .ok_or_else(|| bad_request("scope: required, e.g. ?scope=team:research"))?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = raw
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| bad_request("scope: a broken percent escape"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad_request("scope: must be UTF-8"))
}

#[utoipa::path(get, path = "/rate-limits/usage", tag = "rate limits", params(("scope" = String, Query, description = "team:NAME, user:SUBJECT or key:ID")), responses((status = 200, description = "Each limit of the scope: used, remaining, reset", body = UsageList), (status = 400, description = "No or a malformed scope", body = ErrorBody), (status = 503, description = "The counters could not be read", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn usage(
    State(api): State<Arc<Api>>,
    Caller(principal): Caller,
    RawQuery(query): RawQuery,
) -> Answer {
    api.admin(&principal)?;
    let scope = scope_query(query.as_deref())?;
    scope
        .parse::<LimitScope>()
        .map_err(|e| bad_request(format!("scope: {e}")))?;
    let Some(source) = &api.usage else {
        return Ok(json(
            StatusCode::OK,
            &UsageList {
                scope,
                limits: Vec::new(),
            },
        ));
    };
    let limits = source.usage(&scope).await.map_err(|err| {
        tracing::warn!(error = %err, "the rate-limit counters could not be read");
        GatewayError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "rate_limit_backend_unavailable",
            "The rate-limit counters could not be read; try again later.",
        )
    })?;
    let limits = limits
        .into_iter()
        .map(|u| UsageView {
            rule: u.rule,
            scope: u.scope,
            limit: u.limit,
            value: u.value,
            used: u.value.saturating_sub(u.remaining),
            remaining: u.remaining,
            reset_seconds: u.reset.as_secs_f64(),
        })
        .collect();
    Ok(json(StatusCode::OK, &UsageList { scope, limits }))
}

#[cfg(test)]
mod tests {
    use super::scope_query;

    #[test]
    fn the_scope_is_percent_decoded_and_a_broken_one_refused() {
        assert_eq!(
            scope_query(Some("scope=user%3Aa%40x.com")).unwrap(),
            "user:a@x.com"
        );
        assert_eq!(
            scope_query(Some("x=1&scope=team:research")).unwrap(),
            "team:research"
        );
        for bad in [
            None,
            Some(""),
            Some("scope=%zz"),
            Some("scope=%4"),
            Some("scope=%FF"),
        ] {
            assert!(scope_query(bad).is_err(), "{bad:?}");
        }
    }
}
