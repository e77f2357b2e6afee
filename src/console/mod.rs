//! A console for managers in the browser, served by [`Gateway::app`](crate::gateway::Gateway::app)
//! under `/console`: sign in with a gateway key, list accounts and endpoints, add a Custom
//! Endpoint with a three-step wizard, edit and delete, copy the usage snippet, and (for
//! admins) issue, rotate and revoke keys and read the audit log.
//!
//! It is three static files compiled into the binary (an HTML page, an ES module and a style
//! sheet: no front-end build, nothing fetched from elsewhere) and it talks only to the
//! management API, so whatever it does the API does, under the API's checks. The page is
//! safe by construction:
//!
//! - a strict `Content-Security-Policy`: scripts, styles and requests from this origin only,
//!   no inline script or style, no frames (`frame-ancestors 'none'`, and `X-Frame-Options:
//!   DENY`);
//! - every value from the API is put in the page as text, never parsed as HTML;
//! - the gateway key stays in the tab's `sessionStorage` and goes out only as a bearer header
//!   (never in a cookie or a URL); header values typed into a form are sent once and never
//!   shown again.
//!
//! ```
//! # #[cfg(feature = "console")] {
//! use tower_gateway::console::Console;
//!
//! let console = Console::new("/manage", "/proxy-api");
//! let page = console.respond::<bytes::Bytes>("/console/").unwrap();
//! assert_eq!(page.status(), 200);
//! assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
//! assert_eq!(console.respond::<bytes::Bytes>("/console/../secret").unwrap().status(), 404);
//! assert!(console.respond::<bytes::Bytes>("/proxy-api/x").is_none());
//! # }
//! ```

use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use http::{HeaderValue, Response, StatusCode};

/// Where the console is served.
pub const PATH: &str = "/console";

const INDEX: &str = include_str!("assets/index.html");
const APP: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// The policy of every console response.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The console's files, and the little it needs to know about the gateway.
#[derive(Clone, Debug)]
pub struct Console {
    config: Bytes,
}

impl Console {
    /// A console for a gateway whose management API is under `management` and whose proxy is
    /// under `proxy`.
    pub fn new(management: &str, proxy: &str) -> Self {
        let config = serde_json::json!({ "management": management, "proxy": proxy });
        Self {
            config: Bytes::from(config.to_string()),
        }
    }

    /// The answer to a `GET` of `path`, if `path` is one of the console's (`/console`,
    /// `/console/` and its files); `None` for any other path.
    pub fn respond<B: From<Bytes>>(&self, path: &str) -> Option<Response<B>> {
        let rest = path.strip_prefix(PATH)?;
        let (body, content_type) = match rest {
            "" => return Some(redirect()),
            "/" | "/index.html" => (
                Bytes::from_static(INDEX.as_bytes()),
                "text/html; charset=utf-8",
            ),
            "/app.js" => (
                Bytes::from_static(APP.as_bytes()),
                "text/javascript; charset=utf-8",
            ),
            "/style.css" => (
                Bytes::from_static(STYLE.as_bytes()),
                "text/css; charset=utf-8",
            ),
            "/config.json" => (self.config.clone(), "application/json"),
            _ if rest.starts_with('/') => return Some(not_found()),
            _ => return None,
        };
        let mut res = Response::new(B::from(body));
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        secure(&mut res);
        Some(res)
    }
}

/// The headers every console answer carries.
fn secure<B>(res: &mut Response<B>) {
    let h = res.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn redirect<B: From<Bytes>>() -> Response<B> {
    let mut res = Response::new(B::from(Bytes::new()));
    *res.status_mut() = StatusCode::MOVED_PERMANENTLY;
    res.headers_mut().insert(
        http::header::LOCATION,
        HeaderValue::from_static("/console/"),
    );
    secure(&mut res);
    res
}

fn not_found<B: From<Bytes>>() -> Response<B> {
    let mut res = crate::error::GatewayError::not_found("No such console file.").into_response();
    secure(&mut res);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_served_with_the_policy_and_nothing_else_is() {
        let c = Console::new("/manage", "/proxy-api");
        for (path, ty) in [
            ("/console/", "text/html"),
            ("/console/app.js", "text/javascript"),
            ("/console/style.css", "text/css"),
            ("/console/config.json", "application/json"),
        ] {
            let res = c.respond::<Bytes>(path).unwrap();
            assert_eq!(res.status(), 200, "{path}");
            assert!(
                res.headers()[CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .starts_with(ty)
            );
            assert_eq!(res.headers()[CONTENT_SECURITY_POLICY], CSP);
            assert_eq!(res.headers()[X_FRAME_OPTIONS], "DENY");
        }
        assert_eq!(c.respond::<Bytes>("/console").unwrap().status(), 301);
        assert_eq!(
            c.respond::<Bytes>("/console/nope.js").unwrap().status(),
            404
        );
        assert!(c.respond::<Bytes>("/consolex").is_none());
        assert!(c.respond::<Bytes>("/manage").is_none());
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_builds_no_html_from_strings() {
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="));
        assert!(INDEX.contains(r#"<script type="module" src="app.js"></script>"#));
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!APP.contains(banned), "app.js uses {banned}");
        }
    }
}
