//! The file as written: serde types that mirror the TOML (every table refuses unknown
//! fields), and parsing whose errors give a position and never quote the source.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::model::FieldError;
use crate::model::{DEFAULT_PATH_PREFIX, EjectPolicy, Grants, HealthCheck, RetryPolicy, Timeouts};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default = "default_path_prefix")]
    pub(super) path_prefix: String,
    #[serde(default)]
    pub(super) admins: Vec<String>,
    #[serde(default)]
    pub(super) keys: Vec<RawKey>,
    #[serde(default)]
    pub(super) accounts: Vec<RawAccount>,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) rate_limits: RawRateLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimits {
    #[serde(default)]
    pub(super) backend: Option<String>,
    #[serde(default)]
    pub(super) on_backend_error: RawOnError,
    #[serde(default)]
    pub(super) key_prefix: Option<String>,
    #[serde(default)]
    pub(super) reserve_tokens: Option<u64>,
    #[serde(default)]
    pub(super) rules: Vec<RawRule>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawOnError {
    #[default]
    Open,
    Closed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) scope: String,
    #[serde(default)]
    pub(super) endpoint: Option<String>,
    #[serde(default)]
    pub(super) requests_per_minute: Option<u32>,
    #[serde(default)]
    pub(super) tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub(super) tokens_per_day: Option<u64>,
    #[serde(default)]
    pub(super) tokens_per_month: Option<u64>,
    #[serde(default)]
    pub(super) concurrent_streams: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    #[serde(default)]
    pub(super) max_request_body_bytes: Option<u64>,
}

fn default_path_prefix() -> String {
    DEFAULT_PATH_PREFIX.to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) id: String,
    pub(super) subject: String,
    #[serde(default)]
    pub(super) teams: Vec<String>,
    #[serde(default)]
    pub(super) sha256: Option<String>,
    #[serde(default)]
    pub(super) key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    pub(super) name: String,
    #[serde(default)]
    #[allow(dead_code)] // only one type is known; the field is parsed so a typo is caught
    endpoint_type: EndpointType,
    #[serde(default)]
    pub(super) header_auth: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) access: RawGrants,
    #[serde(default)]
    pub(super) endpoints: Vec<RawEndpoint>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum EndpointType {
    #[default]
    None,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGrants {
    #[serde(default)]
    pub(super) managers: Vec<String>,
    #[serde(default)]
    pub(super) users: Vec<String>,
    #[serde(default)]
    pub(super) viewers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    pub(super) name: String,
    #[serde(default)]
    pub(super) base_url: String,
    #[serde(default)]
    pub(super) targets: Vec<RawTarget>,
    #[serde(default)]
    pub(super) retry: Option<RawRetry>,
    #[serde(default)]
    pub(super) eject: RawEject,
    #[serde(default)]
    pub(super) health: Option<RawHealth>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) access: Option<RawGrants>,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
    #[serde(default)]
    pub(super) tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) base_url: String,
    #[serde(default)]
    pub(super) weight: Option<u32>,
    #[serde(default)]
    pub(super) priority: Option<u32>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
    #[serde(default)]
    pub(super) tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    #[serde(default)]
    pub(super) attempts: Option<u32>,
    #[serde(default)]
    pub(super) on_status: Option<Vec<u16>>,
    #[serde(default)]
    pub(super) budget_percent: Option<u32>,
    #[serde(default)]
    pub(super) min_per_second: Option<u32>,
    #[serde(default)]
    pub(super) max_body_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEject {
    #[serde(default)]
    pub(super) consecutive_failures: Option<u32>,
    #[serde(default)]
    pub(super) error_percent: Option<u32>,
    #[serde(default)]
    pub(super) window: Option<u32>,
    #[serde(default)]
    pub(super) base_ms: Option<u64>,
    #[serde(default)]
    pub(super) max_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) path: String,
    #[serde(default)]
    pub(super) interval_ms: Option<u64>,
}

impl RawRetry {
    pub(super) fn to_policy(&self) -> RetryPolicy {
        RetryPolicy::from_fields(
            self.attempts,
            self.on_status.clone(),
            self.budget_percent,
            self.min_per_second,
            self.max_body_bytes,
        )
    }
}

impl RawEject {
    pub(super) fn to_policy(&self) -> EjectPolicy {
        EjectPolicy::from_fields(
            self.consecutive_failures,
            self.error_percent,
            self.window,
            self.base_ms,
            self.max_ms,
        )
    }
}

impl RawHealth {
    pub(super) fn to_check(&self) -> HealthCheck {
        HealthCheck::from_fields(&self.path, self.interval_ms)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    #[serde(default)]
    pub(super) connect_ms: Option<u64>,
    #[serde(default)]
    pub(super) first_byte_ms: Option<u64>,
    #[serde(default)]
    pub(super) idle_ms: Option<u64>,
}

impl RawTimeouts {
    pub(super) fn to_timeouts(&self) -> Timeouts {
        Timeouts::from_millis(self.connect_ms, self.first_byte_ms, self.idle_ms)
    }
}

impl RawGrants {
    pub(super) fn to_grants(&self, field: &str) -> Result<Grants, FieldError> {
        Grants::parse(&self.managers, &self.users, &self.viewers, field)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    #[serde(default)]
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) client_key_file: Option<PathBuf>,
}

pub(super) fn parse(text: &str) -> Result<RawConfig, FieldError> {
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

fn toml_error(text: &str, path: Option<String>, err: &toml::de::Error) -> FieldError {
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
    FieldError::new(field, message)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
