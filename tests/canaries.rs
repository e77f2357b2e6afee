//! Secret canaries: with tracing at TRACE level captured into a buffer (the gateway's, hyper's,
//! h2's and rustls' logs), distinctive gateway and upstream keys go through successes, every
//! kind of failure and config errors; neither key, no 8-character piece of either, nor either
//! key's SHA-256 hex may appear in any log line, response (headers or body), error message or
//! `Debug` output.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower_gateway::auth::KeyDigest;
use tower_gateway::config::{GatewayConfig, SecretSource};
use tower_gateway::forward::ForwardBuilder;
use tower_gateway::gateway::Gateway;

use support::*;

const GATEWAY_KEY: &str = "gwk_7Rq2Lm9XzT4vB8nK3pW6";
const UPSTREAM_KEY: &str = "upk_Jd5Hs8Fq1Ya3Nc7Ve2Mx";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every string a leak could hide in.
fn forbidden() -> Vec<String> {
    let mut out = Vec::new();
    for key in [GATEWAY_KEY, UPSTREAM_KEY] {
        out.push(KeyDigest::of(key).to_hex());
        for i in 0..=key.len() - 8 {
            out.push(key[i..i + 8].to_owned());
        }
    }
    out
}

fn assert_clean(what: &str, text: &str) {
    for piece in forbidden() {
        if let Some(at) = text.find(&piece) {
            let start = text[..at].rfind("\n---").unwrap_or(at.saturating_sub(300));
            let end = (at + 300).min(text.len());
            panic!(
                "{what} contains a secret piece {piece:?}:\n{}",
                &text[start..end]
            );
        }
    }
}

fn config(upstream: &str) -> String {
    format!(
        r#"
[[keys]]
id = "canary-key"
subject = "canary@example.com"
teams = ["research"]
key = "${{GW}}"

[[accounts]]
name = "coreweave-model"
header_auth = {{ X-Org = "${{UP}}" }}
access = {{ users = ["everyone"], managers = ["everyone"] }}

[[accounts.endpoints]]
name = "inference"
base_url = "{upstream}"
headers = {{ Authorization = "Bearer ${{UP}}" }}
"#
    )
}

fn secrets() -> SecretSource {
    SecretSource::from_vars(
        [("GW", GATEWAY_KEY), ("UP", UPSTREAM_KEY)],
        std::env::temp_dir(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_responses_errors_or_debug_output() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .try_init()
        .expect("this test binary installs the only subscriber");

    let mut seen = String::new();
    let mut record = |what: &str, text: String| {
        seen.push_str(&format!("\n--- {what}\n{text}"));
    };

    // A good upstream (mock W&B, requires the upstream key) and one that rejects the key
    // and echoes it back.
    let mock = MockUpstream::new(UPSTREAM_KEY, Duration::from_millis(1));
    let good = mock.spawn().await.unwrap();
    let echo = RecordingUpstream::start(|seen| async move {
        let auth = seen
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let mut res = http::Response::new(MockBody::Full(Some(Bytes::from(format!(
            "{{\"error\":\"bad key {auth}\"}}"
        )))));
        *res.status_mut() = http::StatusCode::UNAUTHORIZED;
        res.headers_mut().insert(
            "www-authenticate",
            format!("Bearer realm={auth}").parse().unwrap(),
        );
        res
    })
    .await;

    for base in [format!("http://{good}/v1"), echo.base_url()] {
        let cfg = GatewayConfig::from_toml(&config(&base), &secrets()).unwrap();
        record("config debug", format!("{cfg:?}"));
        let gateway = Gateway::builder()
            .config(cfg)
            .forward(ForwardBuilder::default().first_byte_timeout(Duration::from_secs(5)))
            .build();
        record("gateway debug", format!("{gateway:?}"));
        record("registry debug", format!("{:?}", gateway.registry()));
        let gw = serve_gateway(gateway).await;
        let base_url = gw.base_url();
        let calls: Vec<(&str, String, Option<String>, &str)> = vec![
            (
                "POST",
                format!("{base_url}/chat/completions"),
                Some(format!("Bearer {GATEWAY_KEY}")),
                r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            (
                "POST",
                format!("{base_url}/chat/completions"),
                Some(format!("Bearer {GATEWAY_KEY}")),
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            ),
            (
                "GET",
                format!("{base_url}/models"),
                Some(format!("Bearer {GATEWAY_KEY}x")),
                "",
            ),
            (
                "GET",
                format!("{base_url}/models"),
                Some(format!("Basic {GATEWAY_KEY}")),
                "",
            ),
            ("GET", format!("{base_url}/models"), None, ""),
            (
                "GET",
                format!("{base_url}/%2e%2e/{GATEWAY_KEY}"),
                Some(format!("Bearer {GATEWAY_KEY}")),
                "",
            ),
            (
                "GET",
                format!("http://{}/proxy-api/{GATEWAY_KEY}/x/models", gw.addr),
                Some(format!("Bearer {GATEWAY_KEY}")),
                "",
            ),
            (
                "GET",
                format!("http://{}/manage/accounts", gw.addr),
                Some(format!("Bearer {GATEWAY_KEY}")),
                "",
            ),
        ];
        for (method, url, auth, body) in calls {
            let mut req = Request::builder()
                .method(method)
                .uri(&url)
                .header("x-api-key", GATEWAY_KEY);
            if let Some(auth) = auth {
                req = req.header("authorization", auth);
            }
            let req = req.body(Full::<Bytes>::from(body.to_owned())).unwrap();
            let res = within("response", client().request(req)).await.unwrap();
            record(
                "response head",
                format!("{:?} {:?}", res.status(), res.headers()),
            );
            let bytes = res
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            record(
                "response body",
                String::from_utf8_lossy(&bytes).into_owned(),
            );
        }
        // The management API, whose responses must redact every header value.
        let svc_gw = GatewayConfig::from_toml(&config(&base), &secrets()).unwrap();
        record("second config debug", format!("{svc_gw:?}"));
    }

    // Config errors holding the secrets in every position an error can quote.
    let bad_configs = [
        format!("[[keys]]\nid = \"a\"\nsubject = \"s\"\nkey = [\"{GATEWAY_KEY}\"]\n"),
        format!(
            "[[keys]]\nid = \"a\"\nsubject = \"s\"\nkey = \"{GATEWAY_KEY}\"\nsha256 = \"{UPSTREAM_KEY}\"\n"
        ),
        format!("[[keys]]\nid = \"a\"\nsubject = \"s\"\nsha256 = \"{GATEWAY_KEY}\"\n"),
        format!(
            "[[accounts]]\nname = \"a\"\nheader_auth = {{ Authorization = \"Bearer {UPSTREAM_KEY}\\n\" }}\n"
        ),
        format!("[[accounts]]\nname = \"a\"\nendpoint_type = \"{UPSTREAM_KEY}\"\n"),
        format!("[[accounts]]\nname = \"a\"\n{UPSTREAM_KEY} = 1\n"),
        format!(
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\nbase_url = \"https://x/v1\"\nheaders = {{ \"Bad Name\" = \"{UPSTREAM_KEY}\" }}\n"
        ),
        format!("[[keys]]\nid = \"a\"\nsubject = \"s\"\nkey = \"${{{GATEWAY_KEY}}}\"\n"),
        format!(
            "[[keys]]\nid = \"a\"\nsubject = \"s\"\nkey = \"{GATEWAY_KEY}\"\n[[keys]]\nid = \"b\"\nsubject = \"s\"\nkey = \"{GATEWAY_KEY}\"\n"
        ),
        format!("key = \"{GATEWAY_KEY}\" oops\n"),
    ];
    for text in &bad_configs {
        let err = GatewayConfig::from_toml(text, &secrets()).unwrap_err();
        record("config error", format!("{err} / {err:?}"));
    }

    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "the capture works"
    );
    assert!(mock.requests() >= 2, "the good upstream was reached");
    assert_clean("the logs", &logs);
    assert_clean("responses, errors and Debug output", &seen);
}
