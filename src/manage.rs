//! The management API: list, inspect, create, update and delete endpoints and grants while
//! traffic flows, and get a ready-to-paste usage snippet for an endpoint.
//!
//! [`Management`] is a tower service answering JSON under a prefix (`/manage` by default).
//! [`Gateway::management_service`](crate::gateway::Gateway::management_service) puts the same
//! [`GatewayAuthLayer`](crate::auth::GatewayAuthLayer) in front of it as the proxy, and every
//! operation checks the caller's [`Permission`] with the same [grants](crate::access):
//!
//! | method and path (under the prefix) | permission | does |
//! |---|---|---|
//! | `GET /accounts` | View | the accounts and endpoints the caller may view |
//! | `GET /accounts/{account}` | View (account) | one account and its viewable endpoints |
//! | `PUT /accounts/{account}/access` | Manage (account) | replaces the account's grants |
//! | `GET /accounts/{account}/endpoints/{endpoint}` | View (endpoint) | one endpoint |
//! | `PUT /accounts/{account}/endpoints/{endpoint}` | Manage (account to create, endpoint to update) | creates or replaces an endpoint |
//! | `DELETE /accounts/{account}/endpoints/{endpoint}` | Manage (endpoint) | deletes an endpoint |
//! | `GET /accounts/{account}/endpoints/{endpoint}/snippet` | View (endpoint) | base URL and curl, Python and Rust snippets |
//!
//! Header values are write-only: responses list header *names*, never values. A `PUT` of an
//! endpoint takes `{"base_url": …, "headers": {…}, "access": {…}, "timeouts": {…}}`; leaving
//! out `headers` keeps the endpoint's current ones, so a client never needs to hold the
//! secrets to change a grant. Credentials never silently follow an endpoint to another host:
//! changing the scheme, host or port of `base_url` needs Manage on the account and the
//! `headers` sent again. Account managers are trusted with the account's credentials (an
//! endpoint they create inherits `header_auth`). Values are taken literally: `${VAR}` is not expanded here (it
//! would let a manager read the gateway's environment). Invalid input is a 400 naming the
//! field, and nothing changes. A change swaps the registry atomically: streams in flight
//! finish on the configuration they started with, the next request sees the change.
//! Changes live in memory: a reload from the configuration file or a restart replaces them.
//!
//! # Example
//!
//! ```
//! use axum::Router;
//! use tower_gateway::gateway::Gateway;
//!
//! let gateway = Gateway::builder().build();
//! let app: Router = Router::new()
//!     .route_service("/manage/{*rest}", gateway.management_service())
//!     .fallback_service(gateway.service::<axum::body::Body>());
//! # let _ = app;
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::{Value, json};
use tower_service::Service;

use crate::BoxError;
use crate::access::{Grants, Permission, Role};
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::forward::ResponseBody;
use crate::registry::{
    Account, AccountSpec, Endpoint, EndpointSpec, RegistryError, SharedRegistry, UpstreamBase,
    is_valid_name,
};
use crate::route::DEFAULT_PATH_PREFIX;

/// The default prefix of the management API, `/manage`.
pub const DEFAULT_MANAGEMENT_PREFIX: &str = "/manage";

/// The largest request body the management API reads: 64 KiB.
pub const MAX_BODY: usize = 64 * 1024;

/// How to call an endpoint through the gateway: the base URL for OpenAI-compatible clients
/// and ready-to-paste snippets. The management API and the demo print the same thing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UsageSnippet {
    /// The base URL clients configure, e.g. `http://host/proxy-api/coreweave-model/inference`.
    pub base_url: String,
    /// A streaming chat completion with curl.
    pub curl: String,
    /// The same with the OpenAI Python client.
    pub python: String,
    /// The same in Rust with the `async-openai` crate.
    pub rust: String,
}

impl UsageSnippet {
    /// Snippets for `base_url`, authenticating with `api_key` (a real key, or a placeholder
    /// such as `$GATEWAY_KEY`) and asking for `model`.
    pub fn new(base_url: &str, api_key: &str, model: &str) -> Self {
        let curl = format!(
            r#"curl -N {base_url}/chat/completions \
  -H "Authorization: Bearer {api_key}" \
  -H "Content-Type: application/json" \
  -d '{{"model": "{model}", "stream": true,
       "messages": [{{"role": "user", "content": "Say hello"}}]}}'"#
        );
        let python = format!(
            r#"from openai import OpenAI

client = OpenAI(base_url="{base_url}", api_key="{api_key}")
stream = client.chat.completions.create(
    model="{model}",
    messages=[{{"role": "user", "content": "Say hello"}}],
    stream=True,
)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)"#
        );
        let rust = format!(
            r#"use async_openai::{{Client, config::OpenAIConfig}};
use async_openai::types::chat::{{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs}};
use futures_util::StreamExt;

let client = Client::with_config(
    OpenAIConfig::new().with_api_base("{base_url}").with_api_key("{api_key}"),
);
let request = CreateChatCompletionRequestArgs::default()
    .model("{model}")
    .messages([ChatCompletionRequestUserMessageArgs::default().content("Say hello").build()?.into()])
    .build()?;
let mut stream = client.chat().create_stream(request).await?;
while let Some(chunk) = stream.next().await {{
    if let Some(text) = chunk?.choices.first().and_then(|c| c.delta.content.as_deref()) {{
        print!("{{text}}");
    }}
}}"#
        );
        Self {
            base_url: base_url.to_owned(),
            curl,
            python,
            rust,
        }
    }
}

/// The model the snippets ask for.
pub const EXAMPLE_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// The management API service. See the [module docs](self).
///
/// It expects a [`Principal`] in the request extensions (put `GatewayAuthLayer` in front of
/// it); a request without one is denied.
#[derive(Clone)]
pub struct Management {
    registry: SharedRegistry,
    prefix: Arc<str>,
    proxy_prefix: Arc<str>,
    public_url: Option<Arc<str>>,
}

impl fmt::Debug for Management {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Management")
            .field("prefix", &self.prefix)
            .field("proxy_prefix", &self.proxy_prefix)
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

impl Management {
    /// Manages `registry`, answering under `/manage`.
    pub fn new(registry: SharedRegistry) -> Self {
        Self {
            registry,
            prefix: DEFAULT_MANAGEMENT_PREFIX.into(),
            proxy_prefix: DEFAULT_PATH_PREFIX.into(),
            public_url: None,
        }
    }

    /// The prefix this API answers under (empty when mounted with a prefix-stripping router).
    #[must_use]
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self
    }

    #[cfg(feature = "gateway")]
    pub(crate) fn prefix_str(&self) -> &str {
        &self.prefix
    }

    /// The proxy's path prefix, for the URLs in snippets.
    #[must_use]
    pub fn proxy_prefix(mut self, prefix: &str) -> Self {
        self.proxy_prefix = prefix.into();
        self
    }

    /// The gateway's public URL for snippets (e.g. `https://llm.example.com`). By default the
    /// request's `Host` with `http://`.
    #[must_use]
    pub fn public_url(mut self, url: &str) -> Self {
        self.public_url = Some(url.trim_end_matches('/').into());
        self
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<B> Service<Request<B>> for Management
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ResponseBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let res = match this.handle(req).await {
                Ok((status, body)) => {
                    let mut res = Response::new(ResponseBody::from(Bytes::from(body.to_string())));
                    *res.status_mut() = status;
                    res.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    res
                }
                Err(err) => err.into_response(),
            };
            Ok(res)
        })
    }
}

fn bad_request(message: impl Into<String>) -> GatewayError {
    GatewayError::new(StatusCode::BAD_REQUEST, "invalid_request", message.into())
}

fn denied(principal: &Principal, permission: Permission, what: &str) -> GatewayError {
    GatewayError::forbidden(format!(
        "The key \"{}\" may not {permission} {what}.",
        principal.key_id
    ))
}

/// The grants of a `PUT`: subjects as strings, each list `[]` when left out.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGrants {
    #[serde(default)]
    managers: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    viewers: Vec<String>,
}

fn build_grants(raw: RawGrants, field: &str) -> Result<Grants, RegistryError> {
    Grants::parse(&raw.managers, &raw.users, &raw.viewers, field)
}

/// The timeouts of an endpoint, in milliseconds; each one left out takes the default.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default)]
    connect_ms: Option<u64>,
    #[serde(default)]
    first_byte_ms: Option<u64>,
    #[serde(default)]
    idle_ms: Option<u64>,
}

impl RawTimeouts {
    fn to_timeouts(&self) -> crate::model::Timeouts {
        crate::model::Timeouts::from_millis(self.connect_ms, self.first_byte_ms, self.idle_ms)
    }
}

/// The endpoint body of `PUT .../endpoints/{endpoint}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointBody {
    base_url: String,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    access: Option<RawGrants>,
    #[serde(default)]
    timeouts: Option<RawTimeouts>,
}

fn grants_json(g: &Grants) -> Value {
    let list = |s: &[crate::access::Subject]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    json!({"managers": list(&g.managers), "users": list(&g.users), "viewers": list(&g.viewers)})
}

fn role_json(role: Option<Role>) -> Value {
    match role {
        Some(Role::Manager) => json!("manager"),
        Some(Role::User) => json!("user"),
        Some(Role::Viewer) => json!("viewer"),
        None => Value::Null,
    }
}

/// Relative field names for API errors: `accounts[0].endpoints[1].base_url` → `base_url`.
fn relative_field(err: &RegistryError) -> String {
    let field = err.field();
    let rest = match field.find(".endpoints[") {
        Some(pos) => field[pos..].split_once("].").map_or(field, |(_, r)| r),
        None => field.split_once("].").map_or(field, |(_, r)| r),
    };
    format!("{rest}: {}", err.message())
}

impl From<RegistryError> for GatewayError {
    fn from(err: RegistryError) -> Self {
        bad_request(relative_field(&err))
    }
}

impl Management {
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

    async fn handle<B>(&self, req: Request<B>) -> Result<(StatusCode, Value), GatewayError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let principal = req
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| {
                GatewayError::forbidden(
                    "The request has no authenticated caller, so access is denied.",
                )
            })?;
        let path = req
            .uri()
            .path()
            .strip_prefix(&*self.prefix)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            .ok_or_else(|| GatewayError::not_found("No such management resource."))?
            .trim_end_matches('/')
            .to_owned();
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let method = req.method().clone();
        match (method, segments.as_slice()) {
            (Method::GET, ["accounts"]) => Ok((StatusCode::OK, self.list(&principal))),
            (Method::GET, ["accounts", account]) => self.get_account(&principal, account),
            (Method::PUT, ["accounts", account, "access"]) => {
                let account = (*account).to_owned();
                let body: RawGrants = read_json(req).await?;
                self.set_account_access(&principal, &account, body)
            }
            (Method::GET, ["accounts", account, "endpoints", endpoint]) => {
                let ep = self.endpoint_for(&principal, account, endpoint, Permission::View)?;
                Ok((
                    StatusCode::OK,
                    endpoint_json(&ep, &principal, &self.proxy_prefix),
                ))
            }
            (Method::PUT, ["accounts", account, "endpoints", endpoint]) => {
                let (account, endpoint) = ((*account).to_owned(), (*endpoint).to_owned());
                let body: EndpointBody = read_json(req).await?;
                self.put_endpoint(&principal, &account, &endpoint, body)
            }
            (Method::DELETE, ["accounts", account, "endpoints", endpoint]) => {
                self.delete_endpoint(&principal, account, endpoint)
            }
            (Method::GET, ["accounts", account, "endpoints", endpoint, "snippet"]) => {
                let ep = self.endpoint_for(&principal, account, endpoint, Permission::View)?;
                let base = format!(
                    "{}{}/{}/{}",
                    self.origin(req.headers()),
                    self.proxy_prefix,
                    ep.account(),
                    ep.name()
                );
                let snippet = UsageSnippet::new(&base, "$GATEWAY_KEY", EXAMPLE_MODEL);
                Ok((
                    StatusCode::OK,
                    serde_json::to_value(snippet).expect("plain strings"),
                ))
            }
            (_, ["accounts"] | ["accounts", _] | ["accounts", _, "access"])
            | (_, ["accounts", _, "endpoints", _] | ["accounts", _, "endpoints", _, "snippet"]) => {
                Err(GatewayError::method_not_allowed(
                    "This method is not allowed on this resource.",
                ))
            }
            _ => Err(GatewayError::not_found("No such management resource.")),
        }
    }

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

    fn list(&self, principal: &Principal) -> Value {
        let registry = self.registry.load();
        let accounts: Vec<Value> = registry
            .accounts()
            .iter()
            .filter_map(|a| account_json(a, principal, &self.proxy_prefix))
            .collect();
        json!({ "accounts": accounts })
    }

    fn get_account(
        &self,
        principal: &Principal,
        name: &str,
    ) -> Result<(StatusCode, Value), GatewayError> {
        let registry = self.registry.load();
        let account = registry.account(name).ok_or_else(no_account)?;
        account_json(account, principal, &self.proxy_prefix)
            .map(|v| (StatusCode::OK, v))
            .ok_or_else(|| denied(principal, Permission::View, "this account"))
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

    fn set_account_access(
        &self,
        principal: &Principal,
        account: &str,
        body: RawGrants,
    ) -> Result<(StatusCode, Value), GatewayError> {
        let grants = build_grants(body, "access").map_err(|e| bad_request(e.to_string()))?;
        {
            let registry = self.registry.load();
            let a = registry.account(account).ok_or_else(no_account)?;
            if !a.access().allows(principal, Permission::Manage) {
                return Err(denied(principal, Permission::Manage, "this account"));
            }
        }
        self.update_account(account, |spec| {
            spec.access = grants;
            Ok::<_, GatewayError>(())
        })?;
        tracing::info!(key_id = %principal.key_id, account, "account grants replaced");
        // The change is done: answer with the new state even if it took the caller's own
        // grant away.
        let registry = self.registry.load();
        let a = registry.account(account).ok_or_else(no_account)?;
        Ok((
            StatusCode::OK,
            account_view(a, principal, &self.proxy_prefix),
        ))
    }

    fn put_endpoint(
        &self,
        principal: &Principal,
        account: &str,
        endpoint: &str,
        body: EndpointBody,
    ) -> Result<(StatusCode, Value), GatewayError> {
        if !is_valid_name(endpoint) {
            return Err(bad_request(
                "name: must be 1 to 128 of A-Z a-z 0-9 - . _ ~, and not \".\" or \"..\"",
            ));
        }
        let headers = body.headers.as_ref().map(headers_from_json).transpose()?;
        let access = body
            .access
            .map(|g| build_grants(g, "access"))
            .transpose()
            .map_err(|e| bad_request(e.to_string()))?;
        let timeouts = body
            .timeouts
            .as_ref()
            .map(RawTimeouts::to_timeouts)
            .unwrap_or_default();
        let exists = {
            let registry = self.registry.load();
            let a = registry.account(account).ok_or_else(no_account)?;
            match a.endpoint(endpoint) {
                Some(ep) if !ep.grants().allows(principal, Permission::Manage) => {
                    return Err(denied(principal, Permission::Manage, "this endpoint"));
                }
                Some(ep) => {
                    // The endpoint's credentials (and the account's) must not follow it to a
                    // host its manager picked: moving it needs the account's managers and the
                    // headers sent again.
                    let moves = UpstreamBase::parse(&body.base_url).is_ok_and(|new| {
                        new.scheme() != ep.base().scheme()
                            || new.authority() != ep.base().authority()
                    });
                    if moves && !a.access().allows(principal, Permission::Manage) {
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
                None if !a.access().allows(principal, Permission::Manage) => {
                    return Err(denied(principal, Permission::Manage, "this account"));
                }
                None => false,
            }
        };
        self.update_account(account, |spec| {
            match spec.endpoints.iter_mut().find(|e| e.name == endpoint) {
                Some(ep) => {
                    ep.base_url = body.base_url.clone();
                    if let Some(h) = &headers {
                        ep.headers = h.clone();
                    }
                    ep.access = access.clone();
                    ep.timeouts = timeouts;
                }
                None => spec.endpoints.push(EndpointSpec {
                    headers: headers.clone().unwrap_or_default(),
                    access: access.clone(),
                    timeouts,
                    ..EndpointSpec::new(endpoint, body.base_url.clone())
                }),
            }
            Ok::<_, GatewayError>(())
        })?;
        tracing::info!(key_id = %principal.key_id, account, endpoint, created = !exists, "endpoint saved");
        // The change is done: answer with the new state even if it took the caller's own
        // grant away.
        let ep = self
            .registry
            .load()
            .endpoint(account, endpoint)
            .cloned()
            .ok_or_else(no_endpoint)?;
        let status = if exists {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok((status, endpoint_json(&ep, principal, &self.proxy_prefix)))
    }

    fn delete_endpoint(
        &self,
        principal: &Principal,
        account: &str,
        endpoint: &str,
    ) -> Result<(StatusCode, Value), GatewayError> {
        self.endpoint_for(principal, account, endpoint, Permission::Manage)?;
        self.update_account(account, |spec| {
            let before = spec.endpoints.len();
            spec.endpoints.retain(|e| e.name != endpoint);
            if spec.endpoints.len() == before {
                return Err(no_endpoint());
            }
            Ok::<_, GatewayError>(())
        })?;
        tracing::info!(key_id = %principal.key_id, account, endpoint, "endpoint deleted");
        Ok((
            StatusCode::OK,
            json!({"deleted": {"account": account, "endpoint": endpoint}}),
        ))
    }
}

// Error messages never repeat names the registry does not know: a caller who pasted a key into
// the path must not get it echoed back.
fn no_account() -> GatewayError {
    GatewayError::not_found("No such provider account.")
}

fn no_endpoint() -> GatewayError {
    GatewayError::not_found("No such endpoint in this provider account.")
}

fn headers_from_json(raw: &BTreeMap<String, String>) -> Result<HeaderMap, GatewayError> {
    let mut headers = HeaderMap::with_capacity(raw.len());
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

async fn read_json<B, T>(req: Request<B>) -> Result<T, GatewayError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    T: for<'de> Deserialize<'de>,
{
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
    let mut de = serde_json::Deserializer::from_slice(&body);
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

/// The account as `principal` may see it, or `None` if it may see nothing of it.
fn account_json(account: &Account, principal: &Principal, proxy_prefix: &str) -> Option<Value> {
    let visible = account.access().role_of(principal).is_some()
        || account
            .endpoints()
            .iter()
            .any(|ep| ep.grants().allows(principal, Permission::View));
    visible.then(|| account_view(account, principal, proxy_prefix))
}

/// The account with the endpoints `principal` may view.
fn account_view(account: &Account, principal: &Principal, proxy_prefix: &str) -> Value {
    let role = account.access().role_of(principal);
    let endpoints: Vec<Value> = account
        .endpoints()
        .iter()
        .filter(|ep| ep.grants().allows(principal, Permission::View))
        .map(|ep| endpoint_json(ep, principal, proxy_prefix))
        .collect();
    json!({
        "name": &**account.name(),
        "header_names": account.header_names().iter().map(HeaderName::as_str).collect::<Vec<_>>(),
        "access": grants_json(account.access()),
        "your_role": role_json(role),
        "endpoints": endpoints,
    })
}

fn endpoint_json(ep: &Endpoint, principal: &Principal, proxy_prefix: &str) -> Value {
    let mut header_names: Vec<&str> = ep.headers().keys().map(HeaderName::as_str).collect();
    header_names.extend(ep.header_templates().iter().map(|(n, _)| n.as_str()));
    header_names.sort_unstable();
    let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_millis() as u64);
    let t = ep.timeouts();
    json!({
        "account": &**ep.account(),
        "name": &**ep.name(),
        "base_url": ep.base_url(),
        "proxy_path": format!("{proxy_prefix}/{}/{}", ep.account(), ep.name()),
        "header_names": header_names,
        "access": ep.access().map(grants_json),
        "effective_access": grants_json(ep.grants()),
        "timeouts": {"connect_ms": ms(t.connect), "first_byte_ms": ms(t.first_byte), "idle_ms": ms(t.idle)},
        "tls": ep.has_tls(),
        "your_role": role_json(ep.grants().role_of(principal)),
    })
}
