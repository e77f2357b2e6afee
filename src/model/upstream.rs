//! Upstream base URLs and timeouts: where an endpoint's requests go, and how long they wait.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Parts, PathAndQuery, Scheme, Uri};

use super::FieldError;

/// The upstream paths clients call most. For these a routed request's upstream path is a
/// static string, and each compiled endpoint holds its upstream URI for them ready-made.
pub const COMMON_PATHS: [&str; 5] = [
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/models",
    "/responses",
];

/// The longest path and query an `http::Uri` holds.
const MAX_PATH_AND_QUERY: usize = u16::MAX as usize - 1;

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

    /// The absolute upstream URI for `rest` (empty or starting with `/`, already validated)
    /// and `query` (kept byte for byte): the scheme, authority and base path come only from
    /// here. `None` when the URI would be longer than an HTTP URI may be.
    pub fn join(&self, rest: &str, query: Option<&str>) -> Option<Uri> {
        // The exact length, so the buffer becomes the URI's bytes without another allocation.
        let path_len = (self.path.len() + rest.len()).max(1);
        let len = path_len + query.map_or(0, |q| q.len() + 1);
        if len >= MAX_PATH_AND_QUERY {
            return None;
        }
        let mut pq = Vec::with_capacity(len);
        pq.extend_from_slice(self.path.as_bytes());
        pq.extend_from_slice(rest.as_bytes());
        if pq.is_empty() {
            pq.push(b'/');
        }
        if let Some(q) = query {
            pq.push(b'?');
            pq.extend_from_slice(q.as_bytes());
        }
        let mut parts = Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        // Every byte here came from a parsed `Uri` or a validated base URL, and the length is
        // checked, so this cannot fail; if it ever did, refusing is the safe answer.
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(Bytes::from(pq)).ok()?);
        Uri::from_parts(parts).ok()
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

impl Timeouts {
    /// Timeouts from milliseconds, as the configuration file and the management API write
    /// them; `None` takes the forwarder's default.
    pub fn from_millis(connect: Option<u64>, first_byte: Option<u64>, idle: Option<u64>) -> Self {
        Self {
            connect: connect.map(Duration::from_millis),
            first_byte: first_byte.map(Duration::from_millis),
            idle: idle.map(Duration::from_millis),
        }
    }

    /// Checks that every timeout set is greater than zero; the error names
    /// `{field}.connect_ms` (or `first_byte_ms`, `idle_ms`).
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        for (what, d) in [
            ("connect_ms", self.connect),
            ("first_byte_ms", self.first_byte),
            ("idle_ms", self.idle),
        ] {
            if d == Some(Duration::ZERO) {
                return Err(FieldError::new(
                    format!("{field}.{what}"),
                    "must be greater than zero",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn join_keeps_the_base_and_refuses_what_is_too_long() {
        let base = UpstreamBase::parse("https://api.inference.wandb.ai/v1").unwrap();
        assert_eq!(
            base.join("/chat/completions", Some("a=1&b")).unwrap(),
            "https://api.inference.wandb.ai/v1/chat/completions?a=1&b"
        );
        let root = UpstreamBase::parse("http://127.0.0.1:9").unwrap();
        assert_eq!(root.join("", None).unwrap(), "http://127.0.0.1:9/");
        assert!(base.join(&"/a".repeat(40_000), None).is_none());
    }

    #[test]
    fn timeouts_must_be_positive() {
        let t = Timeouts::from_millis(Some(1), None, Some(0));
        assert_eq!(t.first_byte, None);
        assert_eq!(
            t.validate("timeouts").unwrap_err().field(),
            "timeouts.idle_ms"
        );
        assert!(
            Timeouts::from_millis(Some(1), Some(2), Some(3))
                .validate("t")
                .is_ok()
        );
    }
}
