//! Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection and must not be
//! forwarded, in either direction.

use http::header::{self, HeaderName};

/// The fixed hop-by-hop names, plus `Proxy-Connection` (a non-standard one clients still send).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `name` is one of the fixed hop-by-hop headers.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// End-to-end headers that `Connection` may never remove: the body's framing and encoding,
/// and what the gateway itself asks of the upstream.
#[cfg(any(feature = "forward", test))]
const NEVER_HOP_BY_HOP: [HeaderName; 4] = [
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::ACCEPT_ENCODING,
];

/// Removes the fixed hop-by-hop headers and the headers named in `Connection`.
///
/// A peer cannot use `Connection` to strip what the gateway guarantees: the headers in
/// [`NEVER_HOP_BY_HOP`] stay, and so do headers whose every value is marked sensitive, which
/// are the ones the gateway injected (the upstream credential and custom headers), since the
/// client's own credentials were already removed.
#[cfg(any(feature = "forward", test))]
pub(crate) fn remove_hop_by_hop(headers: &mut http::HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        // A cheap clone of the values (reference-counted bytes) so the map can change below.
        let listed: Vec<http::HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect();
        for token in listed
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let protected = NEVER_HOP_BY_HOP
                .iter()
                .any(|n| n.as_str().eq_ignore_ascii_case(token))
                || {
                    let mut values = headers.get_all(token).iter().peekable();
                    values.peek().is_some() && values.all(http::HeaderValue::is_sensitive)
                };
            if !protected {
                headers.remove(token);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn removes_fixed_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, X-Secret-Hop , close"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-secret-hop", "1"),
            ("x-other", "2"),
            ("content-type", "application/json"),
            ("x-request-id", "abc"),
        ] {
            h.append(HeaderName::from_static(n), v.parse().unwrap());
        }
        remove_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-request-id"]);
    }

    #[test]
    fn connection_cannot_remove_what_the_gateway_guarantees() {
        let mut h = HeaderMap::new();
        let mut injected = http::HeaderValue::from_static("Bearer upstream");
        injected.set_sensitive(true);
        h.insert("authorization", injected);
        let mut project = http::HeaderValue::from_static("team/proj");
        project.set_sensitive(true);
        h.insert("openai-project", project);
        h.insert("accept-encoding", "identity".parse().unwrap());
        h.insert("content-length", "2".parse().unwrap());
        h.insert("content-encoding", "gzip".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("x-client-hop", "1".parse().unwrap());
        h.insert(
            "connection",
            "close, Authorization, OpenAI-Project, accept-encoding, Content-Length, content-encoding, content-type, X-Client-Hop"
                .parse()
                .unwrap(),
        );
        remove_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "accept-encoding",
                "authorization",
                "content-encoding",
                "content-length",
                "content-type",
                "openai-project"
            ]
        );
    }
}
