//! The routes, their typed requests and answers, and the handlers.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{CONTENT_TYPE, ETAG, HOST, HeaderMap, HeaderName, HeaderValue, IF_MATCH};
use http::request::Parts;
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::MAX_BODY;
use super::snippet::{EXAMPLE_MODEL, UsageSnippet};
use crate::error::GatewayError;
use crate::ext::Principal;
use crate::model::{
    AccountSpec, AuditEntry, EjectPolicy, EndpointSpec, Grants, HealthCheck, LimitUsageSource,
    Permission, RetryPolicy, Role, Snapshot, Subject, TargetSpec, Timeouts, UpstreamBase, Writer,
    is_valid_name,
};
use crate::registry::{Account, Endpoint, Live};

/// What every handler reads: the live state, where changes go, and how to write proxy URLs.
/// Cloning shares the state, the writer and the admins.
#[derive(Clone)]
pub(super) struct Api {
    pub(super) live: Live,
    pub(super) writer: Arc<dyn Writer>,
    pub(super) proxy_prefix: Arc<str>,
    pub(super) public_url: Option<Arc<str>>,
    /// Shared by every clone of the service, and replaced by a reload.
    pub(super) admins: Arc<arc_swap::ArcSwap<Vec<Subject>>>,
    /// The rate limiter's counts, for `/rate-limits/usage`.
    pub(super) usage: Option<Arc<dyn LimitUsageSource>>,
    /// The usage tap's counts per endpoint, for `/usage`.
    pub(super) counts: Option<Arc<crate::registry::UsageCounts>>,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("live", &self.live)
            .field("proxy_prefix", &self.proxy_prefix)
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

pub(super) type Answer = Result<Response, Refused>;

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        GatewayError::into_response::<Body>(self)
    }
}

/// A JSON answer with `status`.
pub(super) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).expect("plain data serializes");
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

// ---------------------------------------------------------------------------------------------
// Extractors.

/// The authenticated caller, put in the request by `GatewayAuthLayer`. A request without one
/// is denied, whatever it asks for.
pub(super) struct Caller(pub(super) Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, GatewayError> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| {
                GatewayError::forbidden(
                    "The request has no authenticated caller, so access is denied.",
                )
            })
    }
}

/// A JSON body of at most [`MAX_BODY`] bytes. Its errors name the field and never quote a
/// value: a value may be a secret.
pub(super) struct JsonBody<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = GatewayError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, GatewayError> {
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|err| {
                if err.is::<http_body_util::LengthLimitError>() {
                    GatewayError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "The request body is larger than 64 KiB.",
                    )
                } else {
                    bad_request("The request body could not be read.")
                }
            })?
            .to_bytes();
        parse_json(&body).map(JsonBody)
    }
}

fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, GatewayError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        // serde quotes offending values, which may be secrets: name the field only.
        let path = err.path().to_string();
        let inner = err.into_inner();
        let what = if inner.is_syntax() || inner.is_eof() {
            "the body is not valid JSON".to_owned()
        } else {
            let msg = inner.to_string();
            match msg.find(" at line ") {
                Some(i) if msg.starts_with("unknown field") || msg.starts_with("missing field") => {
                    msg[..i].to_owned()
                }
                _ => "has the wrong type".to_owned(),
            }
        };
        bad_request(if path == "." {
            what
        } else {
            format!("{path}: {what}")
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// The body of `PUT …/access`, and the `access` of an endpoint: subjects as strings
/// (`everyone`, `team:NAME`, `user:SUBJECT`), each list `[]` when left out.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct GrantsBody {
    #[serde(default)]
    managers: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    viewers: Vec<String>,
}

impl GrantsBody {
    fn to_grants(&self) -> Result<Grants, GatewayError> {
        Grants::parse(&self.managers, &self.users, &self.viewers, "access")
            .map_err(|e| bad_request(e.to_string()))
    }
}

/// An endpoint's timeouts, in milliseconds; each one left out takes the forwarder's default.
#[derive(Deserialize, Serialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TimeoutsBody {
    #[serde(default)]
    connect_ms: Option<u64>,
    #[serde(default)]
    first_byte_ms: Option<u64>,
    #[serde(default)]
    idle_ms: Option<u64>,
}

impl TimeoutsBody {
    fn of(t: Timeouts) -> Self {
        let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_millis() as u64);
        Self {
            connect_ms: ms(t.connect),
            first_byte_ms: ms(t.first_byte),
            idle_ms: ms(t.idle),
        }
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts::from_millis(self.connect_ms, self.first_byte_ms, self.idle_ms)
    }
}

/// The body of `PUT /accounts/{account}`. Leaving out `header_auth` or `access` keeps the
/// account's current ones (none for a new account). A new account may come with its first
/// `endpoint`, written with it in one change (the console's wizard saves both or neither).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AccountBody {
    #[serde(default)]
    header_auth: Option<BTreeMap<String, String>>,
    #[serde(default)]
    access: Option<GrantsBody>,
    #[serde(default)]
    endpoint: Option<FirstEndpoint>,
}

/// The first endpoint of a new account: its name and what `PUT …/endpoints/{name}` takes for
/// one upstream.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct FirstEndpoint {
    name: String,
    base_url: String,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    access: Option<GrantsBody>,
    #[serde(default)]
    timeouts: Option<TimeoutsBody>,
}

/// A target of an endpoint's pool. Leaving out `headers` keeps those of the current target
/// with the same `base_url`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TargetBody {
    base_url: String,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    timeouts: Option<TimeoutsBody>,
}

/// When a request is retried on another target; a field left out takes its default.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RetryBody {
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    on_status: Option<Vec<u16>>,
    #[serde(default)]
    budget_percent: Option<u32>,
    #[serde(default)]
    min_per_second: Option<u32>,
    #[serde(default)]
    max_body_bytes: Option<u64>,
}

impl RetryBody {
    fn policy(&self) -> RetryPolicy {
        RetryPolicy::from_fields(
            self.attempts,
            self.on_status.clone(),
            self.budget_percent,
            self.min_per_second,
            self.max_body_bytes,
        )
    }

    fn of(r: &RetryPolicy) -> Self {
        Self {
            attempts: Some(r.attempts),
            on_status: Some(r.on_status.clone()),
            budget_percent: Some(r.budget_percent),
            min_per_second: Some(r.min_per_second),
            max_body_bytes: Some(r.max_body_bytes),
        }
    }
}

/// When a failing target is taken out; a field left out takes its default.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EjectBody {
    #[serde(default)]
    consecutive_failures: Option<u32>,
    #[serde(default)]
    error_percent: Option<u32>,
    #[serde(default)]
    window: Option<u32>,
    #[serde(default)]
    base_ms: Option<u64>,
    #[serde(default)]
    max_ms: Option<u64>,
}

impl EjectBody {
    fn policy(&self) -> EjectPolicy {
        EjectPolicy::from_fields(
            self.consecutive_failures,
            self.error_percent,
            self.window,
            self.base_ms,
            self.max_ms,
        )
    }

    fn of(e: &EjectPolicy) -> Self {
        Self {
            consecutive_failures: Some(e.consecutive_failures),
            error_percent: Some(e.error_percent),
            window: Some(e.window),
            base_ms: Some(e.base.as_millis() as u64),
            max_ms: Some(e.max.as_millis() as u64),
        }
    }
}

/// The active health check of ejected targets.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthBody {
    path: String,
    #[serde(default)]
    interval_ms: Option<u64>,
}

impl HealthBody {
    fn check(&self) -> HealthCheck {
        HealthCheck::from_fields(&self.path, self.interval_ms)
    }

    fn of(h: &HealthCheck) -> Self {
        Self {
            path: h.path.clone(),
            interval_ms: Some(h.interval.as_millis() as u64),
        }
    }
}

/// The body of `PUT …/endpoints/{endpoint}`: `base_url` (one upstream) or `targets` (a
/// pool). Leaving out `headers` keeps the endpoint's current ones.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EndpointBody {
    #[serde(default)]
    base_url: String,
    #[serde(default)]
    targets: Option<Vec<TargetBody>>,
    #[serde(default)]
    retry: Option<RetryBody>,
    #[serde(default)]
    eject: Option<EjectBody>,
    #[serde(default)]
    health: Option<HealthBody>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    access: Option<GrantsBody>,
    #[serde(default)]
    timeouts: Option<TimeoutsBody>,
}

// ---------------------------------------------------------------------------------------------
// Answers.

#[derive(Serialize, ToSchema)]
pub(super) struct AccountList {
    accounts: Vec<AccountView>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct GrantsView {
    managers: Vec<String>,
    users: Vec<String>,
    viewers: Vec<String>,
}

impl From<&Grants> for GrantsView {
    fn from(g: &Grants) -> Self {
        let list = |s: &[Subject]| s.iter().map(ToString::to_string).collect();
        Self {
            managers: list(&g.managers),
            users: list(&g.users),
            viewers: list(&g.viewers),
        }
    }
}

/// An account as a caller may see it: header names (never values) and the endpoints the
/// caller may view.
#[derive(Serialize, ToSchema)]
pub(super) struct AccountView {
    name: String,
    header_names: Vec<String>,
    access: GrantsView,
    your_role: Option<&'static str>,
    endpoints: Vec<EndpointView>,
}

/// An endpoint as a caller may see it: header names (never values).
#[derive(Serialize, ToSchema)]
pub(super) struct EndpointView {
    account: String,
    name: String,
    base_url: String,
    proxy_path: String,
    header_names: Vec<String>,
    access: Option<GrantsView>,
    effective_access: GrantsView,
    timeouts: TimeoutsBody,
    tls: bool,
    /// Every target (one for an endpoint with a `base_url`), with what this replica has
    /// learned about it.
    targets: Vec<TargetView>,
    /// Whether the endpoint is written with `targets` (a pool) rather than `base_url`.
    uses_targets: bool,
    /// The retry policy in force (the default one if the endpoint sets none).
    retry: RetryBody,
    eject: EjectBody,
    health: Option<HealthBody>,
    your_role: Option<&'static str>,
}

/// A target of an endpoint as a caller may see it, with its state on this replica.
#[derive(Serialize, ToSchema)]
pub(super) struct TargetView {
    base_url: String,
    weight: u32,
    priority: u32,
    header_names: Vec<String>,
    /// The timeouts in force, the endpoint's where the target sets none.
    timeouts: TimeoutsBody,
    tls: bool,
    /// `live` or `ejected`.
    state: &'static str,
    /// When an ejected target comes back (RFC 3339).
    ejected_until: Option<String>,
    consecutive_failures: u32,
    in_flight: u32,
    /// The latency estimate (peak-EWMA of the time to the response head).
    latency_ms: Option<f64>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct Deleted {
    deleted: DeletedEndpoint,
}

#[derive(Serialize, ToSchema)]
pub(super) struct DeletedEndpoint {
    account: String,
    endpoint: String,
}

/// The error shape of every answer the gateway makes itself (OpenAI's).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // a schema only: errors are written by `GatewayError`
pub(super) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub(super) struct ErrorDetail {
    message: String,
    r#type: String,
    code: String,
}

fn role_name(role: Option<Role>) -> Option<&'static str> {
    role.map(|r| match r {
        Role::Manager => "manager",
        Role::User => "user",
        Role::Viewer => "viewer",
    })
}

impl Api {
    /// The account as `principal` may see it, or `None` if it may see nothing of it.
    fn account_view(&self, account: &Account, principal: &Principal) -> Option<AccountView> {
        let visible = account.access().role_of(principal).is_some()
            || account
                .endpoints()
                .iter()
                .any(|ep| ep.grants().allows(principal, Permission::View));
        visible.then(|| self.account_view_of(account, principal))
    }

    /// The account with the endpoints `principal` may view.
    fn account_view_of(&self, account: &Account, principal: &Principal) -> AccountView {
        AccountView {
            name: account.name().to_string(),
            header_names: account
                .header_names()
                .iter()
                .map(|n| n.as_str().to_owned())
                .collect(),
            access: account.access().into(),
            your_role: role_name(account.access().role_of(principal)),
            endpoints: account
                .endpoints()
                .iter()
                .filter(|ep| ep.grants().allows(principal, Permission::View))
                .map(|ep| self.endpoint_view(ep, principal))
                .collect(),
        }
    }

    fn endpoint_view(&self, ep: &Endpoint, principal: &Principal) -> EndpointView {
        let mut header_names: Vec<String> =
            ep.headers().keys().map(|n| n.as_str().to_owned()).collect();
        header_names.extend(
            ep.header_templates()
                .iter()
                .map(|(n, _)| n.as_str().to_owned()),
        );
        header_names.sort_unstable();
        let targets = ep
            .targets()
            .iter()
            .map(|target| {
                let state = target.health().state();
                TargetView {
                    base_url: target.label().to_string(),
                    weight: target.weight(),
                    priority: target.priority(),
                    header_names: target
                        .headers()
                        .keys()
                        .map(|n| n.as_str().to_owned())
                        .collect(),
                    timeouts: TimeoutsBody::of(target.timeouts()),
                    tls: target.tls().is_some(),
                    state: if state.ejected_until.is_some() {
                        "ejected"
                    } else {
                        "live"
                    },
                    ejected_until: state.ejected_until.map(crate::rfc3339::format),
                    consecutive_failures: state.consecutive_failures,
                    in_flight: state.in_flight,
                    latency_ms: state.latency.map(|d| d.as_secs_f64() * 1e3),
                }
            })
            .collect();
        EndpointView {
            account: ep.account().to_string(),
            name: ep.name().to_string(),
            base_url: ep.base_url(),
            proxy_path: format!("{}/{}/{}", self.proxy_prefix, ep.account(), ep.name()),
            header_names,
            access: ep.access().map(GrantsView::from),
            effective_access: ep.grants().into(),
            timeouts: TimeoutsBody::of(ep.timeouts()),
            tls: ep.has_tls(),
            targets,
            uses_targets: ep.uses_targets(),
            retry: RetryBody::of(ep.pool().retry()),
            eject: EjectBody::of(ep.pool().eject()),
            health: ep.health_check().map(HealthBody::of),
            your_role: role_name(ep.grants().role_of(principal)),
        }
    }

    /// The endpoint, if it exists and `principal` holds `permission` on it.
    fn endpoint_for(
        &self,
        principal: &Principal,
        account: &str,
        endpoint: &str,
        permission: Permission,
    ) -> Result<Arc<Endpoint>, GatewayError> {
        let registry = self.live.registry().load();
        let ep = registry
            .account(account)
            .ok_or_else(no_account)?
            .endpoint(endpoint)
            .ok_or_else(no_endpoint)?;
        if ep.grants().allows(principal, permission) {
            Ok(ep.clone())
        } else {
            Err(denied(principal, permission, "this endpoint"))
        }
    }

    /// The origin of the proxy URLs in snippets: the public URL, or the request's `Host`.
    fn origin(&self, headers: &HeaderMap) -> String {
        match (
            &self.public_url,
            headers.get(HOST).and_then(|h| h.to_str().ok()),
        ) {
            (Some(url), _) => url.to_string(),
            (None, Some(host)) if host.parse::<http::uri::Authority>().is_ok() => {
                format!("http://{host}")
            }
            (None, _) => "http://localhost".to_owned(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers.

type Shared = State<Arc<Api>>;

#[utoipa::path(get, path = "/accounts", tag = "accounts", responses((status = 200, description = "The accounts and endpoints the caller may view", body = AccountList), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn list(State(api): Shared, Caller(principal): Caller) -> Response {
    let registry = api.live.registry().load();
    let accounts = registry
        .accounts()
        .iter()
        .filter_map(|a| api.account_view(a, &principal))
        .collect();
    json(StatusCode::OK, &AccountList { accounts })
}

#[utoipa::path(get, path = "/accounts/{account}", tag = "accounts", params(("account" = String, Path, description = "The provider account name")), responses((status = 200, description = "One account; ETag: its version", body = AccountView), (status = 404, description = "No such account", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn get_account(
    State(api): Shared,
    Caller(principal): Caller,
    Path(name): Path<String>,
) -> Answer {
    let registry = api.live.registry().load();
    let account = registry.account(&name).ok_or_else(no_account)?;
    let view = api
        .account_view(account, &principal)
        .ok_or_else(|| denied(&principal, Permission::View, "this account"))?;
    Ok(tagged(json(StatusCode::OK, &view), account.version()))
}

#[utoipa::path(put, path = "/accounts/{account}/access", tag = "accounts", params(("account" = String, Path, description = "The provider account name"), ("If-Match" = Option<String>, Header, description = "An ETag from a GET: the write applies only to that version")), request_body = GrantsBody, responses((status = 200, description = "The new grants are in force", body = AccountView), (status = 400, description = "Invalid input, the field named", body = ErrorBody), (status = 404, description = "No such account", body = ErrorBody), (status = 409, description = "A stale If-Match; ETag: the current version", body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn set_access(
    State(api): Shared,
    Caller(principal): Caller,
    Path(account): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<GrantsBody>,
) -> Answer {
    let grants = body.to_grants()?;
    let if_match = if_match(&headers)?;
    let conflict = Conflict::default();
    let edit = {
        let (principal, account, conflict) = (principal.clone(), account.clone(), conflict.clone());
        move |s: &mut Snapshot| {
            let spec = account_mut(s, &account)?;
            if !spec.access.allows(&principal, Permission::Manage) {
                return Err(denied(&principal, Permission::Manage, "this account"));
            }
            conflict.check(if_match.as_ref(), Some(spec.version))?;
            let changes = serde_json::json!({ "access": GrantsView::from(&grants) });
            spec.access = grants;
            Ok(vec![audit_entry(
                &principal,
                "account.access",
                &account,
                changes,
            )])
        }
    };
    api.write(edit, &conflict).await?;
    tracing::info!(key_id = %principal.key_id, account, "account grants replaced");
    // The change is done: answer with the new state even if it took the caller's own grant
    // away.
    let registry = api.live.registry().load();
    let a = registry.account(&account).ok_or_else(no_account)?;
    Ok(tagged(
        json(StatusCode::OK, &api.account_view_of(a, &principal)),
        a.version(),
    ))
}

#[utoipa::path(put, path = "/accounts/{account}", tag = "accounts", params(("account" = String, Path, description = "The provider account name"), ("If-Match" = Option<String>, Header, description = "An ETag from a GET: the write applies only to that version")), request_body = AccountBody, responses((status = 200, description = "Updated", body = AccountView), (status = 201, description = "Created (admins only)", body = AccountView), (status = 400, description = "Invalid input, the field named", body = ErrorBody), (status = 409, description = "A stale If-Match; ETag: the current version", body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn put_account(
    State(api): Shared,
    Caller(principal): Caller,
    Path(account): Path<String>,
    request_headers: HeaderMap,
    JsonBody(body): JsonBody<AccountBody>,
) -> Answer {
    check_name(&account, "name")?;
    let header_auth = body
        .header_auth
        .as_ref()
        .map(|h| headers_from_json(h, "header_auth"))
        .transpose()?;
    let access = body
        .access
        .as_ref()
        .map(GrantsBody::to_grants)
        .transpose()?;
    let first = match &body.endpoint {
        None => None,
        Some(ep) => {
            check_name(&ep.name, "endpoint.name")?;
            Some(EndpointSpec {
                headers: ep
                    .headers
                    .as_ref()
                    .map(|h| headers_from_json(h, "endpoint.headers"))
                    .transpose()?
                    .unwrap_or_default(),
                access: ep
                    .access
                    .as_ref()
                    .map(|g| {
                        Grants::parse(&g.managers, &g.users, &g.viewers, "endpoint.access")
                            .map_err(|e| bad_request(e.to_string()))
                    })
                    .transpose()?,
                timeouts: ep
                    .timeouts
                    .as_ref()
                    .map_or_else(Timeouts::default, TimeoutsBody::timeouts),
                ..EndpointSpec::new(ep.name.as_str(), ep.base_url.as_str())
            })
        }
    };
    let if_match = if_match(&request_headers)?;
    let create_only = create_only(&request_headers);
    let conflict = Conflict::default();
    let created = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let is_admin = api.admin(&principal).is_ok();
    let edit = {
        let (principal, account) = (principal.clone(), account.clone());
        let (conflict, created) = (conflict.clone(), created.clone());
        move |s: &mut Snapshot| {
            let existing = s.accounts.iter().position(|a| a.name == account);
            let changes = serde_json::json!({
                "header_names": header_auth.as_ref().map(|h| h.keys().map(|n| n.as_str().to_owned()).collect::<Vec<_>>()),
                "access": access.as_ref().map(GrantsView::from),
                "created": existing.is_none(),
                "endpoint": first.as_ref().map(|e| serde_json::json!({
                    "name": &e.name,
                    "base_url": &e.base_url,
                    "header_names": e.headers.keys().map(|n| n.as_str().to_owned()).collect::<Vec<_>>(),
                })),
            });
            match existing {
                Some(_) if create_only => return Err(exists_already("an account")),
                Some(_) if first.is_some() => {
                    return Err(bad_request(
                        "endpoint: only with a new account; add an endpoint to this one with PUT …/endpoints/{name}",
                    ));
                }
                Some(i) => {
                    let spec = &mut s.accounts[i];
                    if !spec.access.allows(&principal, Permission::Manage) {
                        return Err(denied(&principal, Permission::Manage, "this account"));
                    }
                    conflict.check(if_match.as_ref(), Some(spec.version))?;
                    if let Some(h) = header_auth {
                        spec.header_auth = h;
                    }
                    if let Some(g) = access {
                        spec.access = g;
                    }
                }
                None if !is_admin => {
                    return Err(GatewayError::forbidden(format!(
                        "The key \"{}\" may not create an account: that is for the gateway's admins.",
                        principal.key_id
                    )));
                }
                None => {
                    conflict.check(if_match.as_ref(), None)?;
                    created.store(true, std::sync::atomic::Ordering::Relaxed);
                    // Without grants, the admin who creates it manages it: an account nobody
                    // may manage could be changed through the file or the store only.
                    let access = access.unwrap_or_else(|| Grants {
                        managers: vec![Subject::User(principal.subject.clone())],
                        ..Grants::default()
                    });
                    s.accounts.push(AccountSpec {
                        header_auth: header_auth.unwrap_or_default(),
                        access,
                        endpoints: first.into_iter().collect(),
                        ..AccountSpec::new(account.as_str())
                    });
                }
            }
            Ok(vec![audit_entry(
                &principal,
                "account.put",
                &account,
                changes,
            )])
        }
    };
    api.write(edit, &conflict).await?;
    let created = created.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(key_id = %principal.key_id, account, created, "account saved");
    let registry = api.live.registry().load();
    let a = registry.account(&account).ok_or_else(no_account)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(tagged(
        json(status, &api.account_view_of(a, &principal)),
        a.version(),
    ))
}

#[utoipa::path(get, path = "/accounts/{account}/endpoints/{endpoint}", tag = "endpoints", params(("account" = String, Path, description = "The provider account name"), ("endpoint" = String, Path, description = "The endpoint name")), responses((status = 200, description = "One endpoint; ETag: its version", body = EndpointView), (status = 404, description = "No such account or endpoint", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn get_endpoint(
    State(api): Shared,
    Caller(principal): Caller,
    Path((account, endpoint)): Path<(String, String)>,
) -> Answer {
    let ep = api.endpoint_for(&principal, &account, &endpoint, Permission::View)?;
    Ok(tagged(
        json(StatusCode::OK, &api.endpoint_view(&ep, &principal)),
        ep.version(),
    ))
}

#[utoipa::path(put, path = "/accounts/{account}/endpoints/{endpoint}", tag = "endpoints", params(("account" = String, Path, description = "The provider account name"), ("endpoint" = String, Path, description = "The endpoint name"), ("If-Match" = Option<String>, Header, description = "An ETag from a GET: the write applies only to that version")), request_body = EndpointBody, responses((status = 200, description = "Replaced", body = EndpointView), (status = 201, description = "Created", body = EndpointView), (status = 400, description = "Invalid input, the field named", body = ErrorBody), (status = 404, description = "No such account", body = ErrorBody), (status = 409, description = "A stale If-Match; ETag: the current version", body = ErrorBody), (status = 413, description = "A body over 64 KiB", body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn put_endpoint(
    State(api): Shared,
    Caller(principal): Caller,
    Path((account, endpoint)): Path<(String, String)>,
    request_headers: HeaderMap,
    JsonBody(body): JsonBody<EndpointBody>,
) -> Answer {
    check_name(&endpoint, "name")?;
    let headers = body
        .headers
        .as_ref()
        .map(|h| headers_from_json(h, "headers"))
        .transpose()?;
    let targets = body
        .targets
        .as_ref()
        .map(|targets| {
            targets
                .iter()
                .enumerate()
                .map(|(k, t)| {
                    let headers = t
                        .headers
                        .as_ref()
                        .map(|h| headers_from_json(h, &format!("targets[{k}].headers")))
                        .transpose()?;
                    let spec = TargetSpec {
                        weight: t.weight.unwrap_or(1),
                        priority: t.priority.unwrap_or(1),
                        timeouts: t
                            .timeouts
                            .as_ref()
                            .map_or_else(Timeouts::default, TimeoutsBody::timeouts),
                        ..TargetSpec::new(t.base_url.as_str())
                    };
                    Ok::<_, GatewayError>((spec, headers))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    let retry = body.retry.as_ref().map(RetryBody::policy);
    let eject = body
        .eject
        .as_ref()
        .map_or_else(EjectPolicy::default, EjectBody::policy);
    let health = body.health.as_ref().map(HealthBody::check);
    let new_hosts = hosts(
        std::iter::once(body.base_url.as_str())
            .filter(|u| !u.is_empty())
            .chain(targets.iter().map(|(t, _)| t.base_url.as_str())),
    );
    let access = body
        .access
        .as_ref()
        .map(GrantsBody::to_grants)
        .transpose()?;
    let timeouts = body.timeouts.as_ref().map_or_else(Timeouts::default, |t| {
        Timeouts::from_millis(t.connect_ms, t.first_byte_ms, t.idle_ms)
    });
    let if_match = if_match(&request_headers)?;
    let create_only = create_only(&request_headers);
    let conflict = Conflict::default();
    let created = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let edit = {
        let (principal, account, endpoint) = (principal.clone(), account.clone(), endpoint.clone());
        let (conflict, created) = (conflict.clone(), created.clone());
        move |s: &mut Snapshot| {
            let spec = account_mut(s, &account)?;
            let manages_account = spec.access.allows(&principal, Permission::Manage);
            let existing = spec.endpoints.iter().position(|e| e.name == endpoint);
            match existing.map(|i| &spec.endpoints[i]) {
                Some(_) if create_only => return Err(exists_already("an endpoint")),
                Some(ep) => {
                    let grants = spec.access.for_endpoint(ep.access.as_ref());
                    if !grants.allows(&principal, Permission::Manage) {
                        return Err(denied(&principal, Permission::Manage, "this endpoint"));
                    }
                    // The endpoint's credentials (and the account's) must not follow it to a
                    // host its manager picked: moving it needs the account's managers and the
                    // headers sent again.
                    let old_hosts = hosts(ep.base_urls());
                    let moves = new_hosts.iter().any(|h| !old_hosts.contains(h));
                    if moves && !manages_account {
                        return Err(GatewayError::forbidden(format!(
                            "The key \"{}\" may not move this endpoint to another host: that needs Manage on the account.",
                            principal.key_id
                        )));
                    }
                    if moves && headers.is_none() {
                        return Err(bad_request(
                            "headers: required when base_url or a target changes host; the current headers are not sent to a new host",
                        ));
                    }
                    // Within the hosts it had, a credential the caller did not type must not
                    // reach a host that did not get it before (a target's own header dropped,
                    // a target moved to another path of its host).
                    let before = exposure(
                        &spec.header_auth,
                        &ep.headers,
                        &ep.targets,
                        &ep.base_url,
                        None,
                    );
                    let carried_targets: Vec<(TargetSpec, bool)> = targets
                        .iter()
                        .map(|(t, h)| {
                            let mut t = t.clone();
                            match h {
                                Some(h) => t.headers = h.clone(),
                                None => {
                                    t.headers = ep
                                        .targets
                                        .iter()
                                        .find(|o| o.base_url == t.base_url)
                                        .map(|o| o.headers.clone())
                                        .unwrap_or_default();
                                }
                            }
                            (t, h.is_some())
                        })
                        .collect();
                    let after = exposure(
                        &spec.header_auth,
                        headers.as_ref().unwrap_or(&ep.headers),
                        &carried_targets
                            .iter()
                            .map(|(t, _)| t.clone())
                            .collect::<Vec<_>>(),
                        &body.base_url,
                        Some((headers.is_some(), &carried_targets)),
                    );
                    let fresh = |x: &&Exposed| !x.typed && !before.iter().any(|b| b.same(x));
                    if let Some(exposed) = after.iter().find(fresh) {
                        if !manages_account {
                            return Err(GatewayError::forbidden(format!(
                                "The key \"{}\" may not send a stored credential ({}) to a target that did not get it: that needs Manage on the account.",
                                principal.key_id, exposed.name
                            )));
                        }
                    }
                    if let Some(exposed) = after.iter().filter(|x| !x.from_account).find(fresh) {
                        return Err(bad_request(format!(
                            "headers: send the {} header again: its stored value would reach a target that did not get it",
                            exposed.name
                        )));
                    }
                    conflict.check(if_match.as_ref(), Some(ep.version))?;
                }
                None if !manages_account => {
                    return Err(denied(&principal, Permission::Manage, "this account"));
                }
                None => conflict.check(if_match.as_ref(), None)?,
            }
            let mut header_names: Vec<String> = headers
                .iter()
                .flat_map(|h| h.keys().map(|n| n.as_str().to_owned()))
                .collect();
            header_names.dedup();
            let target_names: Vec<serde_json::Value> = targets
                .iter()
                .map(|(t, h)| {
                    serde_json::json!({
                        "base_url": &t.base_url,
                        "weight": t.weight,
                        "priority": t.priority,
                        "header_names": h.as_ref().map(|h| h.keys().map(|n| n.as_str().to_owned()).collect::<Vec<_>>()),
                    })
                })
                .collect();
            let changes = serde_json::json!({
                "base_url": &body.base_url,
                "targets": (!target_names.is_empty()).then_some(target_names),
                "retry": body.retry.as_ref(),
                "eject": body.eject.as_ref(),
                "health": body.health.as_ref(),
                "header_names": headers.as_ref().map(|_| header_names),
                "access": access.as_ref().map(GrantsView::from),
                "timeouts": body.timeouts.as_ref(),
                "created": existing.is_none(),
            });
            // A target sent without headers keeps those of the current target with its base
            // URL (and its TLS settings, which the API does not set).
            let current: &[TargetSpec] = match existing {
                Some(i) => &spec.endpoints[i].targets,
                None => &[],
            };
            let targets: Vec<TargetSpec> = targets
                .into_iter()
                .map(|(mut t, h)| {
                    let was = current.iter().find(|o| o.base_url == t.base_url);
                    t.headers = h
                        .or_else(|| was.map(|o| o.headers.clone()))
                        .unwrap_or_default();
                    t.tls = was.and_then(|o| o.tls.clone());
                    t
                })
                .collect();
            match existing {
                Some(i) => {
                    let ep = &mut spec.endpoints[i];
                    ep.base_url = body.base_url;
                    ep.targets = targets;
                    ep.retry = retry;
                    ep.eject = eject;
                    ep.health = health;
                    if let Some(h) = headers {
                        ep.headers = h;
                    }
                    ep.access = access;
                    ep.timeouts = timeouts;
                }
                None => {
                    created.store(true, std::sync::atomic::Ordering::Relaxed);
                    spec.endpoints.push(EndpointSpec {
                        headers: headers.unwrap_or_default(),
                        access,
                        timeouts,
                        targets,
                        retry,
                        eject,
                        health,
                        ..EndpointSpec::new(endpoint.as_str(), body.base_url)
                    });
                }
            }
            let target = format!("{account}/{endpoint}");
            Ok(vec![audit_entry(
                &principal,
                "endpoint.put",
                &target,
                changes,
            )])
        }
    };
    api.write(edit, &conflict).await?;
    let created = created.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(key_id = %principal.key_id, account, endpoint, created, "endpoint saved");
    // The change is done: answer with the new state even if it took the caller's own grant
    // away.
    let ep = api
        .live
        .registry()
        .load()
        .endpoint(&account, &endpoint)
        .cloned()
        .ok_or_else(no_endpoint)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(tagged(
        json(status, &api.endpoint_view(&ep, &principal)),
        ep.version(),
    ))
}

#[utoipa::path(delete, path = "/accounts/{account}/endpoints/{endpoint}", tag = "endpoints", params(("account" = String, Path, description = "The provider account name"), ("endpoint" = String, Path, description = "The endpoint name"), ("If-Match" = Option<String>, Header, description = "An ETag from a GET: the write applies only to that version")), responses((status = 200, description = "Deleted", body = Deleted), (status = 404, description = "No such account or endpoint", body = ErrorBody), (status = 409, description = "A stale If-Match; ETag: the current version", body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn delete_endpoint(
    State(api): Shared,
    Caller(principal): Caller,
    Path((account, endpoint)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let if_match = if_match(&headers)?;
    let conflict = Conflict::default();
    let edit = {
        let (principal, account, endpoint) = (principal.clone(), account.clone(), endpoint.clone());
        let conflict = conflict.clone();
        move |s: &mut Snapshot| {
            let spec = account_mut(s, &account)?;
            let i = spec
                .endpoints
                .iter()
                .position(|e| e.name == endpoint)
                .ok_or_else(no_endpoint)?;
            let grants = spec.access.for_endpoint(spec.endpoints[i].access.as_ref());
            if !grants.allows(&principal, Permission::Manage) {
                return Err(denied(&principal, Permission::Manage, "this endpoint"));
            }
            conflict.check(if_match.as_ref(), Some(spec.endpoints[i].version))?;
            spec.endpoints.remove(i);
            let target = format!("{account}/{endpoint}");
            Ok(vec![audit_entry(
                &principal,
                "endpoint.delete",
                &target,
                serde_json::json!({}),
            )])
        }
    };
    api.write(edit, &conflict).await?;
    tracing::info!(key_id = %principal.key_id, account, endpoint, "endpoint deleted");
    let deleted = Deleted {
        deleted: DeletedEndpoint {
            account: account.clone(),
            endpoint: endpoint.clone(),
        },
    };
    Ok(json(StatusCode::OK, &deleted))
}

#[utoipa::path(get, path = "/accounts/{account}/endpoints/{endpoint}/snippet", tag = "endpoints", params(("account" = String, Path, description = "The provider account name"), ("endpoint" = String, Path, description = "The endpoint name")), responses((status = 200, description = "How to call the endpoint through the gateway", body = UsageSnippet), (status = 404, description = "No such account or endpoint", body = ErrorBody), (status = 401, description = "No or unknown gateway key", body = ErrorBody), (status = 403, description = "The caller lacks the permission", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn snippet(
    State(api): Shared,
    Caller(principal): Caller,
    Path((account, endpoint)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let ep = api.endpoint_for(&principal, &account, &endpoint, Permission::View)?;
    let base = format!(
        "{}{}/{}/{}",
        api.origin(&headers),
        api.proxy_prefix,
        ep.account(),
        ep.name()
    );
    let snippet = UsageSnippet::new(&base, "$GATEWAY_KEY", EXAMPLE_MODEL);
    Ok(json(StatusCode::OK, &snippet))
}

/// One endpoint's counts as `GET /usage` answers them.
#[derive(Serialize, ToSchema)]
pub(super) struct EndpointUsageView {
    account: String,
    endpoint: String,
    /// Totals of the last hour and of the last day.
    hour: TotalsView,
    day: TotalsView,
    /// Requests a minute over the last hour, oldest first.
    requests_per_minute: Vec<u64>,
    /// Requests and tokens an hour over the last day, oldest first.
    requests_per_hour: Vec<u64>,
    tokens_per_hour: Vec<u64>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct TotalsView {
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Serialize, ToSchema)]
pub(super) struct UsageView {
    /// The endpoints the caller may view that served calls in the last day.
    endpoints: Vec<EndpointUsageView>,
}

#[utoipa::path(get, path = "/usage", tag = "accounts", responses((status = 200, description = "Requests and tokens per endpoint over the last hour and day, as this replica counted them", body = UsageView), (status = 401, description = "No or unknown gateway key", body = ErrorBody)), security(("bearer" = [])))]
pub(super) async fn usage(State(api): Shared, Caller(principal): Caller) -> Answer {
    let registry = api.live.registry().load();
    // Only the endpoints the caller may view are read (and copied out of the lock).
    let counts = api
        .counts
        .as_ref()
        .map(|c| {
            c.snapshot_where(|account, endpoint| {
                registry
                    .endpoint(account, endpoint)
                    .is_some_and(|ep| ep.grants().allows(&principal, Permission::View))
            })
        })
        .unwrap_or_default();
    let sum = |ts: &[crate::registry::Totals]| TotalsView {
        requests: ts.iter().map(|t| t.requests).sum(),
        input_tokens: ts.iter().map(|t| t.input_tokens).sum(),
        output_tokens: ts.iter().map(|t| t.output_tokens).sum(),
    };
    let endpoints = counts
        .iter()
        .map(|c| EndpointUsageView {
            account: c.account.to_string(),
            endpoint: c.endpoint.to_string(),
            hour: sum(&c.last_hour),
            day: sum(&c.last_day),
            requests_per_minute: c.last_hour.iter().map(|t| t.requests).collect(),
            requests_per_hour: c.last_day.iter().map(|t| t.requests).collect(),
            tokens_per_hour: c
                .last_day
                .iter()
                .map(|t| t.input_tokens + t.output_tokens)
                .collect(),
        })
        .collect();
    Ok(json(StatusCode::OK, &UsageView { endpoints }))
}

pub(super) async fn method_not_allowed(_caller: Caller) -> GatewayError {
    GatewayError::method_not_allowed("This method is not allowed on this resource.")
}

pub(super) async fn not_found(_caller: Caller) -> GatewayError {
    GatewayError::not_found("No such management resource.")
}

// ---------------------------------------------------------------------------------------------
// Versions: `ETag` on what a GET or a write answers, `If-Match` on writes.

/// `response` with `ETag: "<version>"`.
pub(super) fn tagged(mut response: Response, version: u64) -> Response {
    response.headers_mut().insert(
        ETAG,
        HeaderValue::from_str(&format!("\"{version}\"")).expect("digits"),
    );
    response
}

/// What a request's `If-Match` asks for: `*` (any current version) or a list of versions.
pub(super) enum IfMatch {
    Any,
    Versions(Vec<u64>),
}

/// Whether the request says `If-None-Match: *`: create only, never replace.
pub(super) fn create_only(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .any(|v| v.as_bytes().trim_ascii() == b"*")
}

/// The answer to a create-only write of a record that exists (412, naming the field).
fn exists_already(what: &str) -> GatewayError {
    GatewayError::new(
        StatusCode::PRECONDITION_FAILED,
        "already_exists",
        format!("name: {what} with this name exists already (the write said If-None-Match: *)"),
    )
}

pub(super) fn if_match(headers: &HeaderMap) -> Result<Option<IfMatch>, GatewayError> {
    let mut values = headers.get_all(IF_MATCH).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let mut versions = Vec::new();
    for value in values {
        let text = value
            .to_str()
            .map_err(|_| bad_request("If-Match: must hold ETags from a GET"))?;
        for tag in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if tag == "*" {
                return Ok(Some(IfMatch::Any));
            }
            let version = tag
                .trim_start_matches("W/")
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or_else(|| bad_request("If-Match: must hold ETags from a GET"))?;
            versions.push(version);
        }
    }
    Ok(Some(IfMatch::Versions(versions)))
}

/// Where a write that found a stale `If-Match` leaves the current version, for the 409's
/// `ETag`.
#[derive(Clone, Default)]
pub(super) struct Conflict(Arc<std::sync::Mutex<Option<u64>>>);

impl Conflict {
    /// Refuses the write with 409 when `expected` does not match `current` (the record's
    /// version, `None` if it does not exist).
    pub(super) fn check(
        &self,
        expected: Option<&IfMatch>,
        current: Option<u64>,
    ) -> Result<(), GatewayError> {
        let matches = match (expected, current) {
            (None, _) => true,
            (Some(IfMatch::Any), current) => current.is_some(),
            (Some(IfMatch::Versions(v)), Some(current)) => v.contains(&current),
            (Some(IfMatch::Versions(_)), None) => false,
        };
        if matches {
            return Ok(());
        }
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = current;
        Err(GatewayError::new(
            StatusCode::CONFLICT,
            "conflict",
            "The record changed since the version in If-Match; GET it again and retry.",
        ))
    }

    /// The current version a refused write saw.
    fn current(&self) -> Option<u64> {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub(super) fn audit_entry(
    principal: &Principal,
    action: &str,
    target: &str,
    changes: serde_json::Value,
) -> AuditEntry {
    AuditEntry {
        actor: format!("{} ({})", principal.key_id, principal.subject),
        action: action.to_owned(),
        target: target.to_owned(),
        changes,
    }
}

impl Api {
    /// Runs `edit` through the writer; a 409 carries the current `ETag`.
    pub(super) async fn write(
        &self,
        edit: impl FnOnce(&mut Snapshot) -> Result<Vec<AuditEntry>, GatewayError> + Send + 'static,
        conflict: &Conflict,
    ) -> Result<(), Refused> {
        match self.writer.write(Box::new(edit)).await {
            Ok(()) => Ok(()),
            Err(err) if err.status() == StatusCode::CONFLICT => {
                Err(Refused(err, conflict.current()))
            }
            Err(err) => Err(Refused(err, None)),
        }
    }
}

/// An error answer, with the current `ETag` of a conflict.
pub(super) struct Refused(GatewayError, Option<u64>);

impl From<GatewayError> for Refused {
    fn from(err: GatewayError) -> Self {
        Refused(err, None)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let response = GatewayError::into_response::<Body>(self.0);
        match self.1 {
            Some(version) => tagged(response, version),
            None => response,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors. Their messages never repeat names the registry does not know: a caller who pasted a
// key into the path must not get it echoed back.

pub(super) fn bad_request(message: impl Into<String>) -> GatewayError {
    GatewayError::new(StatusCode::BAD_REQUEST, "invalid_request", message.into())
}

fn denied(principal: &Principal, permission: Permission, what: &str) -> GatewayError {
    GatewayError::forbidden(format!(
        "The key \"{}\" may not {permission} {what}.",
        principal.key_id
    ))
}

/// The account named `name` in the state a write applies to.
fn account_mut<'a>(s: &'a mut Snapshot, name: &str) -> Result<&'a mut AccountSpec, GatewayError> {
    s.accounts
        .iter_mut()
        .find(|a| a.name == name)
        .ok_or_else(no_account)
}

fn no_account() -> GatewayError {
    GatewayError::not_found("No such provider account.")
}

fn no_endpoint() -> GatewayError {
    GatewayError::not_found("No such endpoint in this provider account.")
}

/// One credential one host receives: from an endpoint's headers over the account's, and a
/// target's own over both.
struct Exposed {
    host: (String, String),
    name: HeaderName,
    value: HeaderValue,
    /// Typed in the request being made (not a stored value carried along).
    typed: bool,
    /// The account's `header_auth`, which account managers are trusted with.
    from_account: bool,
}

impl Exposed {
    fn same(&self, other: &Exposed) -> bool {
        self.host == other.host && self.name == other.name && self.value == other.value
    }
}

/// Every (host, header, value) an endpoint sends, with where each value comes from. `typed`:
/// whether the endpoint's headers, and each target's, were sent in this request.
fn exposure(
    account: &http::HeaderMap,
    endpoint: &http::HeaderMap,
    targets: &[TargetSpec],
    base_url: &str,
    typed: Option<(bool, &[(TargetSpec, bool)])>,
) -> Vec<Exposed> {
    let one = [TargetSpec::new(base_url)];
    let (list, own_typed): (&[TargetSpec], Vec<bool>) = if targets.is_empty() {
        (&one, vec![false])
    } else {
        let flags = match typed {
            Some((_, t)) => t.iter().map(|(_, f)| *f).collect(),
            None => vec![false; targets.len()],
        };
        (targets, flags)
    };
    let endpoint_typed = typed.is_some_and(|(e, _)| e);
    let mut out = Vec::new();
    for (t, own) in list.iter().zip(own_typed) {
        let Some(host) = hosts(std::iter::once(t.base_url.as_str())).pop() else {
            continue;
        };
        let mut add = |name: &HeaderName, value: &HeaderValue, typed: bool, from_account: bool| {
            out.push(Exposed {
                host: host.clone(),
                name: name.clone(),
                value: value.clone(),
                typed,
                from_account,
            });
        };
        for (name, value) in account {
            if !endpoint.contains_key(name) && !t.headers.contains_key(name) {
                add(name, value, false, true);
            }
        }
        for (name, value) in endpoint {
            if !t.headers.contains_key(name) {
                add(name, value, endpoint_typed, false);
            }
        }
        for (name, value) in &t.headers {
            add(name, value, own, false);
        }
    }
    out
}

/// A 400 naming `field` unless `name` is a valid account or endpoint name.
fn check_name(name: &str, field: &str) -> Result<(), GatewayError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(bad_request(format!("{field}: {}", crate::model::NAME_RULE)))
    }
}

/// The schemes and authorities of base URLs (those that parse).
fn hosts<'a>(urls: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    urls.filter_map(|u| UpstreamBase::parse(u).ok())
        .map(|b| (b.scheme().to_string(), b.authority().to_string()))
        .collect()
}

fn headers_from_json(
    raw: &BTreeMap<String, String>,
    field: &str,
) -> Result<http::HeaderMap, GatewayError> {
    let mut headers = http::HeaderMap::with_capacity(raw.len());
    for (name, value) in raw {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            bad_request(format!(
                "{field}: a header name is not a valid HTTP header name"
            ))
        })?;
        if headers.contains_key(&header) {
            return Err(bad_request(format!(
                "{field}.{name}: given twice (names are case-insensitive)"
            )));
        }
        // The value is a secret: the message never repeats it.
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            bad_request(format!(
                "{field}.{name}: the value is not a valid header value"
            ))
        })?;
        value.set_sensitive(true);
        headers.insert(header, value);
    }
    Ok(headers)
}
