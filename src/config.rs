//! The gateway's TOML configuration: keys, accounts and endpoints, with secrets read from the
//! environment or from files.
//!
//! [`GatewayConfig::load`] reads a file, expands secrets, validates everything and builds the
//! [`HashedKeyStore`] and the [`Registry`] the layers run on. A configuration that loads is
//! complete: every URL parsed, every header checked, every TLS file read.
//!
//! # The file
//!
//! ```toml
//! path_prefix = "/proxy-api"          # optional
//!
//! [[keys]]                            # gateway API keys; clients only ever hold these
//! id = "alice-laptop"                 # a label for logs, never the secret
//! subject = "alice@example.com"
//! teams = ["research"]
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! # key = "${ALICE_GATEWAY_KEY}"      # or the key itself, hashed at load time
//!
//! [[accounts]]                        # a provider account
//! name = "coreweave-model"
//! endpoint_type = "none"
//! header_auth = { Authorization = "Bearer ${SHARED_KEY}" }   # endpoints inherit it
//! [accounts.access]
//! managers = ["team:platform"]
//! users = ["everyone"]
//! viewers = []
//!
//! [[accounts.endpoints]]              # an integration
//! name = "inference"
//! base_url = "https://api.inference.wandb.ai/v1"
//! headers = { Authorization = "Bearer ${WANDB_API_KEY}" }    # overrides header_auth
//! # access = { users = ["team:research"] }
//! # timeouts = { connect_ms = 10000, first_byte_ms = 600000, idle_ms = 300000 }
//! # tls = { ca_file = "ca.pem", client_cert_file = "c.pem", client_key_file = "k.pem" }
//! ```
//!
//! A proxy URL is `{gateway}{path_prefix}/{account name}/{endpoint name}/{upstream path}`.
//!
//! # Reference
//!
//! Every table refuses fields it does not know, so a misspelt field is an error, not a silent
//! default.
//!
//! | field | type | default | meaning |
//! |---|---|---|---|
//! | `path_prefix` | string | `"/proxy-api"` | prefix of every proxy path: empty, or `/name[/name…]` with no trailing slash |
//! | `limits.max_request_body_bytes` | integer > 0 | 33554432 (32 MiB) | largest request body forwarded; larger is a 413 |
//! | `keys` | array of tables | `[]` | the gateway API keys |
//! | `keys[].id` | string | required | a unique label for logs; never the secret |
//! | `keys[].subject` | string | required | who holds the key, e.g. an email; no spaces |
//! | `keys[].teams` | array of strings | `[]` | the holder's teams, for `team:NAME` grants; no spaces |
//! | `keys[].sha256` | string, secret | — | the key's SHA-256 digest, 64 hex digits |
//! | `keys[].key` | string, secret | — | the key itself, hashed at load time (set exactly one of `sha256` and `key`) |
//! | `accounts` | array of tables | `[]` | the provider accounts |
//! | `accounts[].name` | string | required | the account's path segment: 1 to 128 of `A-Z a-z 0-9 - . _ ~`, unique |
//! | `accounts[].endpoint_type` | string | `"none"` | the kind of provider; only `"none"` (a plain HTTP upstream) is known |
//! | `accounts[].header_auth` | table of strings, secret | `{}` | headers injected into every request to the account's endpoints |
//! | `accounts[].access` | table | no grants | who may manage, use and view the account (see below) |
//! | `accounts[].endpoints` | array of tables | `[]` | the account's endpoints |
//! | `accounts[].endpoints[].name` | string | required | the endpoint's path segment, same rules as an account name, unique in its account |
//! | `accounts[].endpoints[].base_url` | string | required | `http(s)://host[:port][/path]`: no trailing slash, user info, query or fragment |
//! | `accounts[].endpoints[].headers` | table of strings, secret | `{}` | headers injected into the endpoint's requests; a name also in `header_auth` replaces it |
//! | `accounts[].endpoints[].access` | table | the account's | grants that replace the account's for this endpoint |
//! | `accounts[].endpoints[].timeouts.connect_ms` | integer > 0 | forwarder default | time to connect (TCP and TLS), in milliseconds |
//! | `accounts[].endpoints[].timeouts.first_byte_ms` | integer > 0 | forwarder default | time from sending the request to the response head |
//! | `accounts[].endpoints[].timeouts.idle_ms` | integer > 0 | forwarder default | longest silence between two body frames |
//! | `accounts[].endpoints[].tls.ca_file` | path | none | PEM CA certificates trusted besides the system roots |
//! | `accounts[].endpoints[].tls.client_cert_file` | path | none | PEM client certificate chain (needs `client_key_file`) |
//! | `accounts[].endpoints[].tls.client_key_file` | path | none | PEM private key of the client certificate (needs `client_cert_file`) |
//!
//! An `access` table has three optional arrays of subjects, each `[]` by default: `managers`
//! (edit, update, delete, use and view), `users` (use and view) and `viewers` (view). A
//! subject is `"everyone"`, `"team:NAME"` or `"user:SUBJECT"`. See [`crate::access`].
//!
//! Header names are case-insensitive, so one table may not hold two names that differ only
//! by case. Headers the gateway manages itself (`Host`, `Content-Length`, `Accept-Encoding`
//! and the hop-by-hop headers such as `Connection`) cannot be configured. Injected values are
//! marked sensitive, so they never appear in `Debug` output or traces.
//!
//! Relative TLS paths are resolved against the configuration file's directory (the
//! [`SecretSource`]'s base directory).
//!
//! # Secrets
//!
//! The fields marked *secret* above (`keys[].key`, `keys[].sha256` and every header value)
//! may refer to secrets instead of holding them:
//!
//! - `${VAR}` is replaced by the environment variable `VAR` (letters, digits and `_`, not
//!   starting with a digit);
//! - `${file:PATH}` is replaced by the contents of the file `PATH`, relative to the
//!   configuration file's directory, with one trailing newline (`\n` or `\r\n`) removed.
//!
//! A `$` not followed by `{` is kept as it is, and expanded text is not expanded again. A
//! missing variable or unreadable file fails the load. Other fields are never expanded.
//!
//! # Errors
//!
//! A [`ConfigError`] names the field and the problem, e.g.
//! `accounts[0].endpoints[1].base_url: must not end with a slash`. It never holds a secret:
//! not a key, a digest or a header value, whether written in the file or read from the
//! environment. TOML syntax and type errors give the position as line and column and replace
//! every quoted value in the message with `"<redacted>"`.
//!
//! # Example
//!
//! ```
//! use tower_gateway::config::{GatewayConfig, SecretSource};
//!
//! let toml = r#"
//!     [[keys]]
//!     id = "alice-laptop"
//!     subject = "alice@example.com"
//!     key = "${ALICE_GATEWAY_KEY}"
//!
//!     [[accounts]]
//!     name = "coreweave-model"
//!     access = { users = ["everyone"] }
//!
//!     [[accounts.endpoints]]
//!     name = "inference"
//!     base_url = "https://api.inference.wandb.ai/v1"
//!     headers = { Authorization = "Bearer ${WANDB_API_KEY}" }
//! "#;
//! let secrets = SecretSource::from_vars(
//!     [("ALICE_GATEWAY_KEY", "gw-alice"), ("WANDB_API_KEY", "wandb-secret")],
//!     ".",
//! );
//! let config = GatewayConfig::from_toml(toml, &secrets).unwrap();
//!
//! assert_eq!(config.path_prefix, "/proxy-api");
//! assert_eq!(config.keys.len(), 1);
//! let ep = config.registry.endpoint("coreweave-model", "inference").unwrap();
//! assert_eq!(ep.headers()["authorization"], "Bearer wandb-secret");
//!
//! // A missing variable names the field, never a value.
//! let err = GatewayConfig::from_toml(toml, &SecretSource::from_vars([("ALICE_GATEWAY_KEY", "gw-alice")], "."))
//!     .unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "accounts[0].endpoints[0].headers.Authorization: environment variable WANDB_API_KEY is not set",
//! );
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::access::{Grants, Subject};
use crate::auth::{HashedKeyStore, KeyDigest, Principal};
use crate::forward::TlsSettings;
use crate::registry::{AccountSpec, EndpointSpec, FieldError, Registry, Timeouts};
use crate::route::{DEFAULT_PATH_PREFIX, is_valid_prefix};

/// A loaded, validated gateway configuration: the path prefix, key store and registry the
/// gateway builder assembles the stack from.
///
/// See the [module docs](self) for the file format.
#[derive(Debug)]
pub struct GatewayConfig {
    /// The prefix of every proxy path, `/proxy-api` by default; may be empty.
    pub path_prefix: String,
    /// The gateway API keys, as digests.
    pub keys: HashedKeyStore,
    /// The accounts and endpoints.
    pub registry: Registry,
    /// `limits.max_request_body_bytes`: the largest request body forwarded, if set (the
    /// forwarder's default, 32 MiB, otherwise).
    pub max_request_body: Option<u64>,
}

impl GatewayConfig {
    /// Reads and validates the configuration file at `path`.
    ///
    /// `${VAR}` reads the process environment and `${file:PATH}` a file relative to the
    /// configuration file's directory, as do relative TLS paths.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(path.display().to_string(), format!("cannot read: {e}"))
        })?;
        let base_dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Self::from_toml(&text, &SecretSource::process_env(base_dir))
    }

    /// Parses and validates TOML text, taking secrets (and the base directory for relative
    /// paths) from `secrets`.
    pub fn from_toml(text: &str, secrets: &SecretSource) -> Result<Self, ConfigError> {
        let raw = parse(text)?;
        build(raw, secrets)
    }
}

/// A configuration that failed to load: the field (`accounts[0].endpoints[1].base_url`, `line N`
/// for a TOML syntax error, or the file's path when it cannot be read) and the problem. The
/// same type as a registry's validation error.
///
/// Neither its `Display` nor its `Debug` output ever contains a secret.
pub type ConfigError = FieldError;

/// A resolved secret: `Debug` prints `Secret(<redacted>)`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Clone)]
enum Vars {
    Process,
    Fixed(HashMap<String, String>),
}

/// Where `${VAR}` and `${file:PATH}` come from: environment variables (the process's own, or
/// a fixed set) and a base directory for relative file paths.
///
/// `Debug` shows variable names, never values.
#[derive(Clone)]
pub struct SecretSource {
    vars: Vars,
    base_dir: PathBuf,
}

impl SecretSource {
    /// Variables from the process environment; files relative to `base_dir`.
    pub fn process_env(base_dir: impl Into<PathBuf>) -> Self {
        Self {
            vars: Vars::Process,
            base_dir: base_dir.into(),
        }
    }

    /// A fixed set of variables (the process environment is not read); files relative to
    /// `base_dir`.
    pub fn from_vars<I, K, V>(vars: I, base_dir: impl Into<PathBuf>) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            vars: Vars::Fixed(
                vars.into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
            base_dir: base_dir.into(),
        }
    }

    /// The directory relative file paths are resolved against.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Expands every `${VAR}` and `${file:PATH}` in `text`. An error names `field` and never
    /// contains the text or a secret.
    pub fn expand(&self, field: &str, text: &str) -> Result<Secret, ConfigError> {
        self.expand_inner(text)
            .map(Secret)
            .map_err(|m| ConfigError::new(field, m))
    }

    fn expand_inner(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| "unterminated `${` (close it with `}`)".to_owned())?;
            let inner = &after[..end];
            if let Some(path) = inner.strip_prefix("file:") {
                out.push_str(&self.read_file(path)?);
            } else {
                out.push_str(&self.var(inner)?);
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn var(&self, name: &str) -> Result<String, String> {
        if name.is_empty() {
            return Err("empty variable name in `${}`".to_owned());
        }
        let valid = name
            .bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
        if !valid {
            // The text between the braces is not shown: it may be a misplaced secret.
            return Err(
                "invalid variable name in `${...}`: use letters, digits and _, not starting with a digit"
                    .to_owned(),
            );
        }
        // A conventional name (UPPER_CASE) is shown; anything else may be a key pasted
        // between the braces, so it is not.
        let shown = |name: &str| {
            if name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                name.to_owned()
            } else {
                "(its name is not shown: it is not UPPER_CASE)".to_owned()
            }
        };
        match &self.vars {
            Vars::Process => std::env::var(name).map_err(|e| match e {
                std::env::VarError::NotPresent => {
                    format!("environment variable {} is not set", shown(name))
                }
                std::env::VarError::NotUnicode(_) => {
                    format!("environment variable {} is not valid UTF-8", shown(name))
                }
            }),
            Vars::Fixed(map) => map
                .get(name)
                .cloned()
                .ok_or_else(|| format!("environment variable {} is not set", shown(name))),
        }
    }

    fn read_file(&self, path: &str) -> Result<String, String> {
        if path.is_empty() {
            return Err("empty file path in `${file:}`".to_owned());
        }
        let full = self.base_dir.join(path);
        let mut text = std::fs::read_to_string(&full)
            .map_err(|e| format!("cannot read secret file {}: {e}", full.display()))?;
        if text.ends_with("\r\n") {
            text.truncate(text.len() - 2);
        } else if text.ends_with('\n') {
            text.truncate(text.len() - 1);
        }
        Ok(text)
    }
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SecretSource");
        match &self.vars {
            Vars::Process => d.field("vars", &format_args!("<process environment>")),
            Vars::Fixed(map) => {
                let mut names: Vec<&str> = map.keys().map(String::as_str).collect();
                names.sort_unstable();
                d.field("vars", &names)
            }
        };
        d.field("base_dir", &self.base_dir).finish()
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_path_prefix")]
    path_prefix: String,
    #[serde(default)]
    keys: Vec<RawKey>,
    #[serde(default)]
    accounts: Vec<RawAccount>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    max_request_body_bytes: Option<u64>,
}

fn default_path_prefix() -> String {
    DEFAULT_PATH_PREFIX.to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    subject: String,
    #[serde(default)]
    teams: Vec<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    name: String,
    #[serde(default)]
    #[allow(dead_code)] // only one type is known; the field is parsed so a typo is caught
    endpoint_type: EndpointType,
    #[serde(default)]
    header_auth: BTreeMap<String, String>,
    #[serde(default)]
    access: RawGrants,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum EndpointType {
    #[default]
    None,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGrants {
    #[serde(default)]
    managers: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    viewers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    name: String,
    base_url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    access: Option<RawGrants>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    tls: Option<RawTls>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    #[serde(default)]
    connect_ms: Option<u64>,
    #[serde(default)]
    first_byte_ms: Option<u64>,
    #[serde(default)]
    idle_ms: Option<u64>,
}

impl RawTimeouts {
    pub(crate) fn to_timeouts(&self) -> Timeouts {
        let ms = |v: Option<u64>| v.map(Duration::from_millis);
        Timeouts {
            connect: ms(self.connect_ms),
            first_byte: ms(self.first_byte_ms),
            idle: ms(self.idle_ms),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    client_cert_file: Option<PathBuf>,
    #[serde(default)]
    client_key_file: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Parsing, with errors that never quote the source.

fn parse(text: &str) -> Result<RawConfig, ConfigError> {
    // `toml::de::Error`'s `Display` quotes the offending source line, which may hold a
    // literal secret: only its message (redacted) and position are used.
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, None, &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e
            .path()
            .iter()
            .map(|segment| match segment {
                serde_path_to_error::Segment::Seq { index } => format!("[{index}]"),
                serde_path_to_error::Segment::Map { key }
                | serde_path_to_error::Segment::Enum { variant: key } => {
                    format!(".{}", shown_name(key))
                }
                serde_path_to_error::Segment::Unknown => ".?".to_owned(),
            })
            .collect::<String>();
        let path = path.strip_prefix('.').unwrap_or(&path).to_owned();
        toml_error(text, Some(path), e.inner())
    })
}

/// A name from the file (a field or header name) as an error may show it: names with digits or
/// over 40 characters are hidden, since a key pasted in the wrong place looks like that.
fn shown_name(name: &str) -> &str {
    let plain = name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || b == b'_' || b == b'-');
    if plain { name } else { "<name hidden>" }
}

fn toml_error(text: &str, path: Option<String>, err: &toml::de::Error) -> ConfigError {
    let message = redact_quoted(err.message());
    let position = err.span().map(|span| line_column(text, span.start));
    let field = match (path, position) {
        (Some(path), _) if path != "." && !path.is_empty() => path,
        (_, Some((line, _))) => format!("line {line}"),
        _ => "(document)".to_owned(),
    };
    let message = match position {
        Some((line, column)) => format!("{message} (line {line}, column {column})"),
        None => message,
    };
    ConfigError::new(field, message)
}

/// The 1-based line and column (in characters) of byte offset `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Replaces every value a serde or TOML message quotes with `<redacted>`: double-quoted
/// strings (`invalid type: string "sk-…", expected …`, backslash escapes honoured, an
/// unterminated quote redacted to the end) and the value of an `unknown variant `…``. A quote
/// character named as an expected token (`` `"` ``) is kept.
fn redact_quoted(message: &str) -> String {
    const VARIANT: &str = "unknown variant `";
    const FIELD: &str = "unknown field `";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("`\"`") {
            out.push_str("`\"`");
            rest = &rest[3..];
        } else if let Some(after) = rest.strip_prefix(FIELD) {
            let end = after.find('`').unwrap_or(after.len());
            out.push_str(FIELD);
            out.push_str(shown_name(&after[..end]));
            out.push('`');
            rest = after.get(end + 1..).unwrap_or("");
        } else if let Some(after) = rest.strip_prefix(VARIANT) {
            out.push_str(VARIANT);
            out.push_str("<redacted>`");
            rest = after.find('`').map_or("", |end| &after[end + 1..]);
        } else if c == '"' {
            out.push_str("\"<redacted>\"");
            let mut chars = rest[1..].char_indices();
            rest = loop {
                match chars.next() {
                    Some((_, '\\')) => {
                        chars.next();
                    }
                    Some((i, '"')) => break &rest[1 + i + 1..],
                    Some(_) => {}
                    None => break "",
                }
            };
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Validation.

fn build(raw: RawConfig, secrets: &SecretSource) -> Result<GatewayConfig, ConfigError> {
    if !is_valid_prefix(&raw.path_prefix) {
        return Err(ConfigError::new(
            "path_prefix",
            "must be empty or \"/\" followed by names (A-Z a-z 0-9 - . _ ~) separated by \"/\", \
             with no trailing slash",
        ));
    }
    let keys = build_keys(raw.keys, secrets)?;
    let accounts = raw
        .accounts
        .into_iter()
        .enumerate()
        .map(|(i, account)| build_account(i, account, secrets))
        .collect::<Result<Vec<_>, _>>()?;
    let registry = Registry::from_accounts(accounts)?;
    if raw.limits.max_request_body_bytes == Some(0) {
        return Err(ConfigError::new(
            "limits.max_request_body_bytes",
            "must be greater than zero",
        ));
    }
    Ok(GatewayConfig {
        path_prefix: raw.path_prefix,
        keys,
        registry,
        max_request_body: raw.limits.max_request_body_bytes,
    })
}

/// Whether `s` is a usable name for a subject or team: non-empty, no whitespace or control
/// characters (the syntax `user:SUBJECT` and `team:NAME` grants accept).
fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn build_keys(raw: Vec<RawKey>, secrets: &SecretSource) -> Result<HashedKeyStore, ConfigError> {
    let mut store = HashedKeyStore::new();
    let mut ids = HashSet::new();
    for (i, key) in raw.into_iter().enumerate() {
        let field = format!("keys[{i}]");
        if key.id.is_empty() || key.id.chars().any(char::is_control) {
            return Err(ConfigError::new(
                format!("{field}.id"),
                "must be non-empty, without control characters",
            ));
        }
        if !ids.insert(key.id.clone()) {
            return Err(ConfigError::new(
                format!("{field}.id"),
                format!("duplicate id \"{}\"", key.id),
            ));
        }
        if !is_plain_name(&key.subject) {
            return Err(ConfigError::new(
                format!("{field}.subject"),
                "must be non-empty, without spaces or control characters",
            ));
        }
        for (t, team) in key.teams.iter().enumerate() {
            if !is_plain_name(team) {
                return Err(ConfigError::new(
                    format!("{field}.teams[{t}]"),
                    "must be non-empty, without spaces or control characters",
                ));
            }
        }
        let digest = match (&key.sha256, &key.key) {
            (Some(hex), None) => {
                let field = format!("{field}.sha256");
                let hex = secrets.expand(&field, hex)?;
                KeyDigest::from_hex(hex.expose())
                    .map_err(|e| ConfigError::new(field, e.to_string()))?
            }
            (None, Some(text)) => {
                let field = format!("{field}.key");
                let secret = secrets.expand(&field, text)?;
                if secret.expose().is_empty() {
                    return Err(ConfigError::new(field, "must not be empty"));
                }
                KeyDigest::of(secret.expose())
            }
            _ => {
                return Err(ConfigError::new(field, "set exactly one of sha256 or key"));
            }
        };
        let principal = Principal::new(key.id, key.subject, key.teams);
        store
            .insert_digest(digest, principal)
            .map_err(|e| ConfigError::new(field, e.to_string()))?;
    }
    Ok(store)
}

fn build_headers(
    raw: &BTreeMap<String, String>,
    field: &str,
    secrets: &SecretSource,
) -> Result<HeaderMap, ConfigError> {
    let mut headers = HeaderMap::with_capacity(raw.len());
    for (name, value) in raw {
        let field = format!("{field}.{name}");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::new(&field, "is not a valid header name"))?;
        if headers.contains_key(&header) {
            return Err(ConfigError::new(
                field,
                "is set twice (header names are case-insensitive)",
            ));
        }
        let value = secrets.expand(&field, value)?;
        // The value is never quoted: it is a secret.
        let value = HeaderValue::from_str(value.expose()).map_err(|_| {
            ConfigError::new(
                &field,
                "the value is not a valid header value (it holds a line break or another \
                 control character)",
            )
        })?;
        headers.insert(header, value);
    }
    Ok(headers)
}

pub(crate) fn build_grants(raw: RawGrants, field: &str) -> Result<Grants, ConfigError> {
    let subjects = |list: Vec<String>, role: &str| -> Result<Vec<Subject>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(k, s)| {
                Subject::from_str(s)
                    .map_err(|e| ConfigError::new(format!("{field}.{role}[{k}]"), e.to_string()))
            })
            .collect()
    };
    Ok(Grants {
        managers: subjects(raw.managers, "managers")?,
        users: subjects(raw.users, "users")?,
        viewers: subjects(raw.viewers, "viewers")?,
    })
}

fn build_account(
    i: usize,
    raw: RawAccount,
    secrets: &SecretSource,
) -> Result<AccountSpec, ConfigError> {
    let field = format!("accounts[{i}]");
    let header_auth = build_headers(&raw.header_auth, &format!("{field}.header_auth"), secrets)?;
    let access = build_grants(raw.access, &format!("{field}.access"))?;
    let endpoints = raw
        .endpoints
        .into_iter()
        .enumerate()
        .map(|(j, ep)| build_endpoint(&format!("{field}.endpoints[{j}]"), ep, secrets))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AccountSpec {
        header_auth,
        access,
        endpoints,
        ..AccountSpec::new(raw.name)
    })
}

fn build_endpoint(
    field: &str,
    raw: RawEndpoint,
    secrets: &SecretSource,
) -> Result<EndpointSpec, ConfigError> {
    let headers = build_headers(&raw.headers, &format!("{field}.headers"), secrets)?;
    let access = raw
        .access
        .map(|g| build_grants(g, &format!("{field}.access")))
        .transpose()?;
    let timeouts = raw.timeouts.to_timeouts();
    let tls = raw
        .tls
        .map(|tls| {
            let path = |p: &Option<PathBuf>| p.as_ref().map(|p| secrets.base_dir().join(p));
            TlsSettings::from_files(
                path(&tls.ca_file).as_deref(),
                path(&tls.client_cert_file).as_deref(),
                path(&tls.client_key_file).as_deref(),
            )
            .map(Arc::new)
            .map_err(|e| ConfigError::new(format!("{field}.tls.{}", e.field), e.message))
        })
        .transpose()?;
    Ok(EndpointSpec {
        headers,
        access,
        timeouts,
        tls,
        ..EndpointSpec::new(raw.name, raw.base_url)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SecretSource {
        SecretSource::from_vars(
            [
                ("KEY", "sk-123"),
                ("EMPTY", ""),
                ("A_1", "a"),
                ("DOLLAR", "${KEY}"),
            ],
            std::env::temp_dir(),
        )
    }

    #[test]
    fn expansion() {
        let ok: &[(&str, &str)] = &[
            ("", ""),
            ("plain", "plain"),
            ("${KEY}", "sk-123"),
            ("Bearer ${KEY}", "Bearer sk-123"),
            ("${KEY}${A_1}", "sk-123a"),
            ("[${EMPTY}]", "[]"),
            ("$KEY", "$KEY"),
            ("$", "$"),
            ("a$b$", "a$b$"),
            ("$${KEY}", "$sk-123"),
            ("}${A_1}}", "}a}"),
            // Expanded text is not expanded again.
            ("${DOLLAR}", "${KEY}"),
        ];
        for (input, want) in ok {
            let got = source().expand("f", input);
            assert_eq!(got.as_ref().map(Secret::expose), Ok(*want), "{input:?}");
        }
        let bad: &[(&str, &str)] = &[
            ("${", "unterminated"),
            ("Bearer ${KEY", "unterminated"),
            ("${KEY}${", "unterminated"),
            ("${}", "empty variable name"),
            ("${MISSING}", "environment variable MISSING is not set"),
            ("${1X}", "invalid variable name"),
            ("${sk-literal}", "invalid variable name"),
            ("${a b}", "invalid variable name"),
            ("${file:}", "empty file path"),
            ("${file:no-such-file-5e3f9a7c}", "cannot read secret file"),
        ];
        for (input, want) in bad {
            let err = source().expand("keys[0].key", input).unwrap_err();
            assert_eq!(err.field(), "keys[0].key", "{input:?}");
            assert!(err.message().contains(want), "{input:?}: {err}");
        }
        // The text inside an invalid reference is never echoed.
        let err = source().expand("f", "${sk-literal}").unwrap_err();
        assert!(!err.to_string().contains("sk-literal"), "{err}");
    }

    #[test]
    fn file_secrets_trim_one_newline() {
        let dir =
            std::env::temp_dir().join(format!("tower-gateway-config-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases = [
            ("lf", "s1\n", "s1"),
            ("crlf", "s2\r\n", "s2"),
            ("two", "s3\n\n", "s3\n"),
            ("none", "s4", "s4"),
            ("cr", "s5\r", "s5\r"),
        ];
        for (name, contents, _) in cases {
            std::fs::write(dir.join(name), contents).unwrap();
        }
        let src = SecretSource::from_vars([] as [(&str, &str); 0], &dir);
        for (name, _, want) in cases {
            let got = src.expand("f", &format!("${{file:{name}}}")).unwrap();
            assert_eq!(got.expose(), want, "{name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn redaction() {
        let cases = [
            ("no quotes", "no quotes"),
            (
                "invalid type: string \"sk-123\", expected a sequence",
                "invalid type: string \"<redacted>\", expected a sequence",
            ),
            (
                "a \"x\\\"y\" b \"z\" c",
                "a \"<redacted>\" b \"<redacted>\" c",
            ),
            ("unterminated \"sk-123", "unterminated \"<redacted>\""),
            (
                "trailing backslash \"sk\\",
                "trailing backslash \"<redacted>\"",
            ),
            ("unknown field `kye`", "unknown field `kye`"),
            (
                "unknown field `sk_9f8e7d6c5b4a`, expected one of `name`",
                "unknown field `<name hidden>`, expected one of `name`",
            ),
            (
                "invalid basic string, expected `\"`",
                "invalid basic string, expected `\"`",
            ),
            (
                "unknown variant `sk-123`, expected `none`",
                "unknown variant `<redacted>`, expected `none`",
            ),
            ("unknown variant `sk-123", "unknown variant `<redacted>`"),
            ("é \"ü\" ß", "é \"<redacted>\" ß"),
        ];
        for (input, want) in cases {
            assert_eq!(redact_quoted(input), want, "{input:?}");
        }
    }

    #[test]
    fn line_and_column() {
        let text = "a = 1\nbé = x\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 10), (2, 4));
        assert_eq!(line_column(text, 8), (2, 2)); // inside the é: its start
        assert_eq!(line_column(text, 999), (3, 1));
    }

    #[test]
    fn debug_hides_values() {
        let s = source();
        let dbg = format!("{s:?}");
        assert!(dbg.contains("KEY") && !dbg.contains("sk-123"), "{dbg}");
        let secret = s.expand("f", "${KEY}").unwrap();
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    }
}
