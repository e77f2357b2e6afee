//! The proxy path: parsing, validation and the upstream URI rewrite, as pure functions.

use std::fmt;

use http::Uri;

use crate::model::UpstreamBase;

/// A proxy path split into its parts. Every part has been validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyPath<'a> {
    /// The provider account name.
    pub account: &'a str,
    /// The endpoint name.
    pub endpoint: &'a str,
    /// The upstream path: empty, or starting with `/`, exactly as the client sent it.
    pub rest: &'a str,
}

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathError {
    /// The path is not under the prefix, or lacks an account or endpoint (404).
    NotFound,
    /// `//` inside the path (400).
    EmptySegment,
    /// `.` or `..`, plain or percent-encoded, also with `;params` (400).
    DotSegment,
    /// `%2F` (400).
    EncodedSlash,
    /// `\` or `%5C` (400).
    Backslash,
    /// A control character, plain or percent-encoded (400).
    ControlCharacter,
    /// `%25`: an encoded percent sign, the start of double encoding (400).
    DoubleEncoding,
    /// `%` not followed by two hexadecimal digits (400).
    BadPercentEncoding,
    /// A raw byte outside ASCII, or a percent-encoded byte that can never occur in UTF-8 (such
    /// as the overlong `%c0%ae` for `.`) (400).
    NonAscii,
    /// The upstream URI would be longer than an HTTP URI may be (414).
    TooLong,
}

impl PathError {
    /// The HTTP status for this error: 404, 414 or 400.
    pub fn status(self) -> http::StatusCode {
        match self {
            PathError::NotFound => http::StatusCode::NOT_FOUND,
            PathError::TooLong => http::StatusCode::URI_TOO_LONG,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }

    /// A human sentence for the error body.
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotFound => {
                "No route: use {prefix}/{providerAccountName}/{endpointName}/{path}."
            }
            PathError::EmptySegment => "The proxy path has an empty segment (`//`).",
            PathError::DotSegment => "The proxy path has a dot segment (`.` or `..`).",
            PathError::EncodedSlash => "The proxy path has an encoded slash (`%2F`).",
            PathError::Backslash => "The proxy path has a backslash.",
            PathError::ControlCharacter => "The proxy path has a control character.",
            PathError::DoubleEncoding => "The proxy path is double-encoded (`%25`).",
            PathError::BadPercentEncoding => "The proxy path has a malformed percent-encoding.",
            PathError::NonAscii => {
                "The proxy path has a raw non-ASCII byte or an invalid UTF-8 escape."
            }
            PathError::TooLong => "The upstream URI would be too long.",
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for PathError {}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Checks one segment (between slashes), raw as received.
fn check_segment(seg: &[u8]) -> Result<(), PathError> {
    if seg.is_empty() {
        return Err(PathError::EmptySegment);
    }
    // Decoded length, and dot and space counts, of the part before any `;params`.
    let mut dots = 0usize;
    let mut spaces = 0usize;
    let mut decoded_len = 0usize;
    let mut in_params = false;
    let mut i = 0;
    while i < seg.len() {
        let mut c = seg[i];
        if c == b'%' {
            let (Some(hi), Some(lo)) = (
                seg.get(i + 1).copied().and_then(hex),
                seg.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadPercentEncoding);
            };
            c = (hi << 4) | lo;
            match c {
                b'/' => return Err(PathError::EncodedSlash),
                b'%' => return Err(PathError::DoubleEncoding),
                // Bytes that never occur in UTF-8: overlong encodings of ASCII and beyond.
                0xc0 | 0xc1 | 0xf5..=0xff => return Err(PathError::NonAscii),
                _ => {}
            }
            i += 3;
        } else {
            if c >= 0x80 {
                return Err(PathError::NonAscii);
            }
            i += 1;
        }
        match c {
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            b';' => in_params = true,
            _ => {}
        }
        if !in_params {
            decoded_len += 1;
            dots += usize::from(c == b'.');
            spaces += usize::from(c == b' ');
        }
    }
    // `.`, `..`, and what some servers normalise to them (`...`, `.. `, `. .`).
    if dots > 0 && dots + spaces == decoded_len {
        return Err(PathError::DotSegment);
    }
    Ok(())
}

/// Bytes that need no closer look: visible ASCII other than `%`, `.`, `;`, `\` and `/`. A
/// segment made only of them encodes nothing, holds no control character and is never a dot
/// segment, so [`check_segment`] would accept it whenever it is not empty.
static PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = b'!';
    while c < 0x7f {
        table[c as usize] = !matches!(c, b'%' | b'.' | b';' | b'\\' | b'/');
        c += 1;
    }
    table
};

/// Checks every segment of `body` (not empty; segments separated by `/`), in order.
fn check_segments(body: &str) -> Result<(), PathError> {
    // Most paths are plain names: check those in one pass, the rest segment by segment.
    let bytes = body.as_bytes();
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate() {
        if c == b'/' {
            if i == start {
                return Err(PathError::EmptySegment);
            }
            start = i + 1;
        } else if !PLAIN[usize::from(c)] {
            return body
                .split('/')
                .try_for_each(|seg| check_segment(seg.as_bytes()));
        }
    }
    if start == bytes.len() {
        return Err(PathError::EmptySegment);
    }
    Ok(())
}

/// Splits and validates `{prefix}/{account}/{endpoint}{rest}`.
///
/// `prefix` is empty or starts with `/` and does not end with `/`. Every segment of the path
/// is checked, so an unsafe path is a 400 whether or not its account exists. A single
/// trailing slash is kept (`rest` may be `/` or end with `/`); an empty segment elsewhere is
/// refused.
pub fn parse_proxy_path<'a>(prefix: &str, path: &'a str) -> Result<ProxyPath<'a>, PathError> {
    let after = path.strip_prefix(prefix).ok_or(PathError::NotFound)?;
    let after = after.strip_prefix('/').ok_or(PathError::NotFound)?;
    let body = after.strip_suffix('/').unwrap_or(after);
    if !body.is_empty() {
        check_segments(body)?;
    }
    let (account, tail) = after.split_once('/').ok_or(PathError::NotFound)?;
    // `rest` keeps its leading slash.
    let (endpoint, rest) = tail.split_at(tail.find('/').unwrap_or(tail.len()));
    if account.is_empty() || endpoint.is_empty() {
        return Err(PathError::NotFound);
    }
    Ok(ProxyPath {
        account,
        endpoint,
        rest,
    })
}

/// Builds the absolute upstream URI: the base URL, then the validated `rest`, then the query
/// exactly as received. The scheme, authority and base path come only from `base`. The only
/// failure is a URI grown too long by a base path longer than what it replaced.
pub fn upstream_uri(
    base: &UpstreamBase,
    rest: &str,
    query: Option<&str>,
) -> Result<Uri, PathError> {
    base.join(rest, query).ok_or(PathError::TooLong)
}

/// The whole rewrite for one endpoint: the request target (origin- or absolute-form; any
/// authority in it is ignored) to the upstream URI, or why it is refused.
pub fn rewrite(prefix: &str, target: &Uri, base: &UpstreamBase) -> Result<Uri, PathError> {
    let p = parse_proxy_path(prefix, target.path())?;
    upstream_uri(base, p.rest, target.query())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "https://api.inference.wandb.ai/v1";

    fn run(prefix: &str, target: &str) -> Result<String, PathError> {
        let base = UpstreamBase::parse(BASE).unwrap();
        let uri: Uri = target.parse().expect("test target parses as a Uri");
        rewrite(prefix, &uri, &base).map(|u| u.to_string())
    }

    #[test]
    fn rewrite_table() {
        use PathError::*;
        let ok = |s: &str| Ok::<String, PathError>(s.to_owned());
        let up = "https://api.inference.wandb.ai";
        let cases: Vec<(&str, &str, Result<String, PathError>)> = vec![
            // good paths
            (
                "/proxy-api",
                "/proxy-api/cw/inference/chat/completions",
                ok(&format!("{up}/v1/chat/completions")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/models",
                ok(&format!("{up}/v1/models")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference",
                ok(&format!("{up}/v1")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/",
                ok(&format!("{up}/v1/")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/models/",
                ok(&format!("{up}/v1/models/")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/models?limit=5&x=%2F..",
                ok(&format!("{up}/v1/models?limit=5&x=%2F..")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a?",
                ok(&format!("{up}/v1/a?")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/models/meta-llama%2FLlama",
                Err(EncodedSlash),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/files/a%20b",
                ok(&format!("{up}/v1/files/a%20b")),
            ),
            ("/proxy-api", "/proxy-api/cw/inference/...", Err(DotSegment)),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/..%20/admin",
                Err(DotSegment),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/.%20./admin",
                Err(DotSegment),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/%c0%ae%c0%ae/admin",
                Err(NonAscii),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/%C1%9C",
                Err(NonAscii),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/caf%C3%A9",
                ok(&format!("{up}/v1/caf%C3%A9")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a.",
                ok(&format!("{up}/v1/a.")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/.well-known/x",
                ok(&format!("{up}/v1/.well-known/x")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a..b",
                ok(&format!("{up}/v1/a..b")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/v1@evil.com",
                ok(&format!("{up}/v1/v1@evil.com")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a;b=c",
                ok(&format!("{up}/v1/a;b=c")),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/%41",
                ok(&format!("{up}/v1/%41")),
            ),
            (
                "",
                "/cw/inference/chat/completions",
                ok(&format!("{up}/v1/chat/completions")),
            ),
            ("/gw/v2", "/gw/v2/cw/inference/x", ok(&format!("{up}/v1/x"))),
            // absolute-form targets: the authority is ignored
            (
                "/proxy-api",
                "http://evil.example:666/proxy-api/cw/inference/chat/completions",
                ok(&format!("{up}/v1/chat/completions")),
            ),
            (
                "/proxy-api",
                "https://127.0.0.1/proxy-api/cw/inference/models?q=1",
                ok(&format!("{up}/v1/models?q=1")),
            ),
            ("/proxy-api", "http://evil.example/evil", Err(NotFound)),
            // not under the prefix, or incomplete
            ("/proxy-api", "/", Err(NotFound)),
            ("/proxy-api", "/proxy-api", Err(NotFound)),
            ("/proxy-api", "/proxy-api/", Err(NotFound)),
            ("/proxy-api", "/proxy-api/cw", Err(NotFound)),
            ("/proxy-api", "/proxy-api/cw/", Err(NotFound)),
            ("/proxy-api", "/proxy-apix/cw/inference", Err(NotFound)),
            ("/proxy-api", "/other/cw/inference", Err(NotFound)),
            ("/proxy-api", "/PROXY-API/cw/inference", Err(NotFound)),
            // dot segments, plain and encoded
            (
                "/proxy-api",
                "/proxy-api/cw/inference/../../admin",
                Err(DotSegment),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/./models",
                Err(DotSegment),
            ),
            ("/proxy-api", "/proxy-api/cw/inference/..", Err(DotSegment)),
            ("/proxy-api", "/proxy-api/cw/inference/../", Err(DotSegment)),
            (
                "/proxy-api",
                "/proxy-api/../cw/inference/x",
                Err(DotSegment),
            ),
            ("/proxy-api", "/proxy-api/cw/../other/x", Err(DotSegment)),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/%2e%2e/admin",
                Err(DotSegment),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/%2E%2E/admin",
                Err(DotSegment),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/.%2e/admin",
                Err(DotSegment),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/%2e./admin",
                Err(DotSegment),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/%2e/admin",
                Err(DotSegment),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/..;/admin",
                Err(DotSegment),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/.;x=1/admin",
                Err(DotSegment),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/%2e%2e;/admin",
                Err(DotSegment),
            ),
            // encoded slashes and backslashes
            (
                "/proxy-api",
                "/proxy-api/cw/inference/..%2fadmin",
                Err(EncodedSlash),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%2Fb",
                Err(EncodedSlash),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw%2finference/x",
                Err(EncodedSlash),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/..%5cadmin",
                Err(Backslash),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%5Cb",
                Err(Backslash),
            ),
            // control characters
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%00b",
                Err(ControlCharacter),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%0d%0aHost:%20evil",
                Err(ControlCharacter),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%09",
                Err(ControlCharacter),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%7f",
                Err(ControlCharacter),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%0A",
                Err(ControlCharacter),
            ),
            // empty segments
            (
                "/proxy-api",
                "/proxy-api/cw/inference//admin",
                Err(EmptySegment),
            ),
            (
                "/proxy-api",
                "/proxy-api//cw/inference/x",
                Err(EmptySegment),
            ),
            ("/proxy-api", "/proxy-api/cw//inference", Err(EmptySegment)),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a//",
                Err(EmptySegment),
            ),
            ("/proxy-api", "//proxy-api/cw/inference", Err(NotFound)),
            // double encoding and malformed escapes
            (
                "/proxy-api",
                "/proxy-api/cw/inference/%252e%252e/admin",
                Err(DoubleEncoding),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/%252f",
                Err(DoubleEncoding),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%25",
                Err(DoubleEncoding),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%2",
                Err(BadPercentEncoding),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%zz",
                Err(BadPercentEncoding),
            ),
            (
                "/proxy-api",
                "/proxy-api/cw/inference/a%",
                Err(BadPercentEncoding),
            ),
        ];
        assert!(cases.len() >= 40);
        for (prefix, target, expected) in cases {
            assert_eq!(
                run(prefix, target),
                expected,
                "prefix {prefix:?}, target {target:?}"
            );
        }
    }

    #[test]
    fn raw_bytes_the_uri_parser_might_let_through_are_refused() {
        // `rewrite` only sees parsed `Uri`s, but `parse_proxy_path` is public: check bytes
        // that an HTTP parser may or may not reject before us.
        use PathError::*;
        for (path, err) in [
            ("/p/a/e/x\\..\\admin", Backslash),
            ("/p/a/e/x\ty", ControlCharacter),
            ("/p/a/e/x\ny", ControlCharacter),
            ("/p/a/e/x\0", ControlCharacter),
            ("/p/a\\b/e/x", Backslash),
            ("/p/a/e/\u{ff0e}\u{ff0e}/admin", NonAscii),
            ("/p/a/e/caf\u{e9}", NonAscii),
        ] {
            assert_eq!(parse_proxy_path("/p", path), Err(err), "{path:?}");
        }
    }

    #[test]
    fn a_uri_grown_past_the_limit_is_refused_not_a_panic() {
        let base = UpstreamBase::parse("http://up.example/openai/deployments/gpt-4o-prod").unwrap();
        let query = "q".repeat(65_517);
        let target: Uri = format!("/proxy-api/a/e/x?{query}").parse().unwrap();
        assert_eq!(
            rewrite("/proxy-api", &target, &base),
            Err(PathError::TooLong)
        );
        assert_eq!(PathError::TooLong.status(), 414);
    }

    #[test]
    fn every_plain_byte_passes_the_segment_check_whatever_it_follows() {
        // The table against the mechanism, for all 256 bytes: a plain byte is accepted alone,
        // after a dot (never a dot segment) and after a plain letter.
        for b in 0..=u8::MAX {
            if PLAIN[usize::from(b)] {
                for seg in [&[b][..], &[b'.', b], &[b'a', b]] {
                    assert_eq!(check_segment(seg), Ok(()), "{seg:?}");
                }
            }
        }
        assert_eq!(PLAIN.iter().filter(|&&p| p).count(), 94 - 5);
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_segment_by_segment_one() {
        // Every path of up to five bytes over an alphabet of plain bytes, separators and the
        // bytes that need a closer look.
        const ALPHABET: &[u8] = b"a2E/.%;\\ \t";
        let mut paths = vec![Vec::new()];
        let mut checked = 0;
        for _ in 0..5 {
            paths = paths
                .iter()
                .flat_map(|p| {
                    ALPHABET.iter().map(move |&c| {
                        let mut p = p.clone();
                        p.push(c);
                        p
                    })
                })
                .collect();
            for body in &paths {
                let body = std::str::from_utf8(body).unwrap();
                let by_segment = body
                    .split('/')
                    .try_for_each(|seg| check_segment(seg.as_bytes()));
                assert_eq!(check_segments(body), by_segment, "{body:?}");
                checked += 1;
            }
        }
        assert!(checked > 100_000);
    }

    #[test]
    fn parts_are_split_without_copying() {
        let p = parse_proxy_path(
            "/proxy-api",
            "/proxy-api/coreweave-model/inference/chat/completions",
        )
        .unwrap();
        assert_eq!(p.account, "coreweave-model");
        assert_eq!(p.endpoint, "inference");
        assert_eq!(p.rest, "/chat/completions");
    }
}
