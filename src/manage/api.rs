//! The routes, their typed requests and answers, and the handlers.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use http::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::MAX_BODY;
use super::snippet::{EXAMPLE_MODEL, UsageSnippet};
use crate::error::GatewayError;
use crate::ext::Principal;
use crate::model::{
    AccountSpec, EndpointSpec, FieldError, Grants, Permission, Role, Timeouts, UpstreamBase,
    is_valid_name,
};
use crate::registry::{Account, Endpoint, SharedRegistry};

/// What every handler reads: the registry it manages and how to write proxy URLs.
#[derive(Debug)]
pub(super) struct Api {
    pub(super) registry: SharedRegistry,
    pub(super) proxy_prefix: Arc<str>,
    pub(super) public_url: Option<Arc<str>>,
}

/// The routes, relative to the management prefix.
pub(super) fn routes(api: Arc<Api>) -> Router {
    Router::new()
        .route("/accounts", get(list))
        .route("/accounts/{account}", get(get_account))
        .route("/accounts/{account}/access", axum::routing::put(set_access))
        .route(
            "/accounts/{account}/endpoints/{endpoint}",
            get(get_endpoint).put(put_endpoint).delete(delete_endpoint),
        )
        .route(
            "/accounts/{account}/endpoints/{endpoint}/snippet",
            get(snippet),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(api)
}

type Answer = Result<Response, GatewayError>;

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        GatewayError::into_response::<Body>(self)
    }
}

/// A JSON answer with `status`.
fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
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
pub(super) struct Caller(Principal);

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
pub(super) struct JsonBody<T>(T);

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
#[derive(Deserialize, Default)]
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
#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct TimeoutsBody {
    #[serde(default)]
    connect_ms: Option<u64>,
    #[serde(default)]
    first_byte_ms: Option<u64>,
    #[serde(default)]
    idle_ms: Option<u64>,
}

/// The body of `PUT …/endpoints/{endpoint}`. Leaving out `headers` keeps the endpoint's
/// current ones.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EndpointBody {
    base_url: String,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    access: Option<GrantsBody>,
    #[serde(default)]
    timeouts: Option<TimeoutsBody>,
}

// ---------------------------------------------------------------------------------------------
// Answers.

#[derive(Serialize)]
struct AccountList {
    accounts: Vec<AccountView>,
}

#[derive(Serialize)]
struct GrantsView {
    managers: Vec<String>,
    users: Vec<String>,
    viewers: Vec<String>,
}

impl From<&Grants> for GrantsView {
    fn from(g: &Grants) -> Self {
        let list = |s: &[crate::model::Subject]| s.iter().map(ToString::to_string).collect();
        Self {
            managers: list(&g.managers),
            users: list(&g.users),
            viewers: list(&g.viewers),
        }
    }
}

/// An account as a caller may see it: header names (never values) and the endpoints the
/// caller may view.
#[derive(Serialize)]
struct AccountView {
    name: String,
    header_names: Vec<String>,
    access: GrantsView,
    your_role: Option<&'static str>,
    endpoints: Vec<EndpointView>,
}

/// An endpoint as a caller may see it: header names (never values).
#[derive(Serialize)]
struct EndpointView {
    account: String,
    name: String,
    base_url: String,
    proxy_path: String,
    header_names: Vec<String>,
    access: Option<GrantsView>,
    effective_access: GrantsView,
    timeouts: TimeoutsBody,
    tls: bool,
    your_role: Option<&'static str>,
}

#[derive(Serialize)]
struct Deleted<'a> {
    deleted: DeletedEndpoint<'a>,
}

#[derive(Serialize)]
struct DeletedEndpoint<'a> {
    account: &'a str,
    endpoint: &'a str,
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
        let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_millis() as u64);
        let t = ep.timeouts();
        EndpointView {
            account: ep.account().to_string(),
            name: ep.name().to_string(),
            base_url: ep.base_url(),
            proxy_path: format!("{}/{}/{}", self.proxy_prefix, ep.account(), ep.name()),
            header_names,
            access: ep.access().map(GrantsView::from),
            effective_access: ep.grants().into(),
            timeouts: TimeoutsBody {
                connect_ms: ms(t.connect),
                first_byte_ms: ms(t.first_byte),
                idle_ms: ms(t.idle),
            },
            tls: ep.has_tls(),
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
        let registry = self.registry.load();
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

    /// Changes one account's spec and swaps in the new registry; nothing changes on error.
    fn update_account(
        &self,
        account: &str,
        change: impl FnOnce(&mut AccountSpec) -> Result<(), GatewayError>,
    ) -> Result<(), GatewayError> {
        self.registry.update(|specs| {
            let spec = specs
                .iter_mut()
                .find(|s| s.name == account)
                .ok_or_else(no_account)?;
            change(spec)
        })
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

async fn list(State(api): Shared, Caller(principal): Caller) -> Response {
    let registry = api.registry.load();
    let accounts = registry
        .accounts()
        .iter()
        .filter_map(|a| api.account_view(a, &principal))
        .collect();
    json(StatusCode::OK, &AccountList { accounts })
}

async fn get_account(
    State(api): Shared,
    Caller(principal): Caller,
    Path(name): Path<String>,
) -> Answer {
    let registry = api.registry.load();
    let account = registry.account(&name).ok_or_else(no_account)?;
    let view = api
        .account_view(account, &principal)
        .ok_or_else(|| denied(&principal, Permission::View, "this account"))?;
    Ok(json(StatusCode::OK, &view))
}

async fn set_access(
    State(api): Shared,
    Caller(principal): Caller,
    Path(account): Path<String>,
    JsonBody(body): JsonBody<GrantsBody>,
) -> Answer {
    let grants = body.to_grants()?;
    {
        let registry = api.registry.load();
        let a = registry.account(&account).ok_or_else(no_account)?;
        if !a.access().allows(&principal, Permission::Manage) {
            return Err(denied(&principal, Permission::Manage, "this account"));
        }
    }
    api.update_account(&account, |spec| {
        spec.access = grants;
        Ok(())
    })?;
    tracing::info!(key_id = %principal.key_id, account, "account grants replaced");
    // The change is done: answer with the new state even if it took the caller's own grant
    // away.
    let registry = api.registry.load();
    let a = registry.account(&account).ok_or_else(no_account)?;
    Ok(json(StatusCode::OK, &api.account_view_of(a, &principal)))
}

async fn get_endpoint(
    State(api): Shared,
    Caller(principal): Caller,
    Path((account, endpoint)): Path<(String, String)>,
) -> Answer {
    let ep = api.endpoint_for(&principal, &account, &endpoint, Permission::View)?;
    Ok(json(StatusCode::OK, &api.endpoint_view(&ep, &principal)))
}

async fn put_endpoint(
    State(api): Shared,
    Caller(principal): Caller,
    Path((account, endpoint)): Path<(String, String)>,
    JsonBody(body): JsonBody<EndpointBody>,
) -> Answer {
    if !is_valid_name(&endpoint) {
        return Err(bad_request(
            "name: must be 1 to 128 of A-Z a-z 0-9 - . _ ~, and not \".\" or \"..\"",
        ));
    }
    let headers = body.headers.as_ref().map(headers_from_json).transpose()?;
    let access = body
        .access
        .as_ref()
        .map(GrantsBody::to_grants)
        .transpose()?;
    let timeouts = body.timeouts.as_ref().map_or_else(Timeouts::default, |t| {
        Timeouts::from_millis(t.connect_ms, t.first_byte_ms, t.idle_ms)
    });
    let exists = {
        let registry = api.registry.load();
        let a = registry.account(&account).ok_or_else(no_account)?;
        match a.endpoint(&endpoint) {
            Some(ep) if !ep.grants().allows(&principal, Permission::Manage) => {
                return Err(denied(&principal, Permission::Manage, "this endpoint"));
            }
            Some(ep) => {
                // The endpoint's credentials (and the account's) must not follow it to a host
                // its manager picked: moving it needs the account's managers and the headers
                // sent again.
                let moves = UpstreamBase::parse(&body.base_url).is_ok_and(|new| {
                    new.scheme() != ep.base().scheme() || new.authority() != ep.base().authority()
                });
                if moves && !a.access().allows(&principal, Permission::Manage) {
                    return Err(GatewayError::forbidden(format!(
                        "The key \"{}\" may not move this endpoint to another host: that needs Manage on the account.",
                        principal.key_id
                    )));
                }
                if moves && headers.is_none() {
                    return Err(bad_request(
                        "headers: required when base_url changes host; the current headers are not sent to a new host",
                    ));
                }
                true
            }
            None if !a.access().allows(&principal, Permission::Manage) => {
                return Err(denied(&principal, Permission::Manage, "this account"));
            }
            None => false,
        }
    };
    api.update_account(&account, |spec| {
        match spec.endpoints.iter_mut().find(|e| e.name == endpoint) {
            Some(ep) => {
                ep.base_url = body.base_url;
                if let Some(h) = headers {
                    ep.headers = h;
                }
                ep.access = access;
                ep.timeouts = timeouts;
            }
            None => spec.endpoints.push(EndpointSpec {
                headers: headers.unwrap_or_default(),
                access,
                timeouts,
                ..EndpointSpec::new(endpoint.as_str(), body.base_url)
            }),
        }
        Ok(())
    })?;
    tracing::info!(key_id = %principal.key_id, account, endpoint, created = !exists, "endpoint saved");
    // The change is done: answer with the new state even if it took the caller's own grant
    // away.
    let ep = api
        .registry
        .load()
        .endpoint(&account, &endpoint)
        .cloned()
        .ok_or_else(no_endpoint)?;
    let status = if exists {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json(status, &api.endpoint_view(&ep, &principal)))
}

async fn delete_endpoint(
    State(api): Shared,
    Caller(principal): Caller,
    Path((account, endpoint)): Path<(String, String)>,
) -> Answer {
    api.endpoint_for(&principal, &account, &endpoint, Permission::Manage)?;
    api.update_account(&account, |spec| {
        let before = spec.endpoints.len();
        spec.endpoints.retain(|e| e.name != endpoint);
        if spec.endpoints.len() == before {
            return Err(no_endpoint());
        }
        Ok(())
    })?;
    tracing::info!(key_id = %principal.key_id, account, endpoint, "endpoint deleted");
    let deleted = Deleted {
        deleted: DeletedEndpoint {
            account: &account,
            endpoint: &endpoint,
        },
    };
    Ok(json(StatusCode::OK, &deleted))
}

async fn snippet(
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

async fn method_not_allowed(_caller: Caller) -> GatewayError {
    GatewayError::method_not_allowed("This method is not allowed on this resource.")
}

async fn not_found(_caller: Caller) -> GatewayError {
    GatewayError::not_found("No such management resource.")
}

// ---------------------------------------------------------------------------------------------
// Errors. Their messages never repeat names the registry does not know: a caller who pasted a
// key into the path must not get it echoed back.

fn bad_request(message: impl Into<String>) -> GatewayError {
    GatewayError::new(StatusCode::BAD_REQUEST, "invalid_request", message.into())
}

fn denied(principal: &Principal, permission: Permission, what: &str) -> GatewayError {
    GatewayError::forbidden(format!(
        "The key \"{}\" may not {permission} {what}.",
        principal.key_id
    ))
}

fn no_account() -> GatewayError {
    GatewayError::not_found("No such provider account.")
}

fn no_endpoint() -> GatewayError {
    GatewayError::not_found("No such endpoint in this provider account.")
}

/// Relative field names for API errors: `accounts[0].endpoints[1].base_url` → `base_url`.
fn relative_field(err: &FieldError) -> String {
    let field = err.field();
    let rest = match field.find(".endpoints[") {
        Some(pos) => field[pos..].split_once("].").map_or(field, |(_, r)| r),
        None => field.split_once("].").map_or(field, |(_, r)| r),
    };
    format!("{rest}: {}", err.message())
}

impl From<FieldError> for GatewayError {
    fn from(err: FieldError) -> Self {
        bad_request(relative_field(&err))
    }
}

fn headers_from_json(raw: &BTreeMap<String, String>) -> Result<http::HeaderMap, GatewayError> {
    let mut headers = http::HeaderMap::with_capacity(raw.len());
    for (name, value) in raw {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| bad_request("headers: a header name is not a valid HTTP header name"))?;
        if headers.contains_key(&header) {
            return Err(bad_request(format!(
                "headers.{name}: given twice (names are case-insensitive)"
            )));
        }
        // The value is a secret: the message never repeats it.
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            bad_request(format!(
                "headers.{name}: the value is not a valid header value"
            ))
        })?;
        value.set_sensitive(true);
        headers.insert(header, value);
    }
    Ok(headers)
}
