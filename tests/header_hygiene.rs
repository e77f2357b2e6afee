//! Header hygiene as a property, through the real stack on loopback: for random request header
//! maps (hop-by-hop headers, names listed in `Connection`, client credentials, cookies, noise)
//! the upstream sees no hop-by-hop header, no header the client named in `Connection`, no
//! client credential and exactly one `Authorization`, the configured one; for random upstream
//! response headers the client sees no hop-by-hop header and no `Set-Cookie`.

mod support;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tower_gateway::forward::ForwardBuilder;

use support::*;

const HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];
const CREDENTIALS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
];
const NOISE: &[&str] = &[
    "x-request-id",
    "x-trace",
    "openai-organization",
    "user-agent",
    "x-custom-a",
    "x-custom-b",
    "accept",
];

struct Fixture {
    runtime: Runtime,
    gateway: std::net::SocketAddr,
    upstream: RecordingUpstream,
    /// The response headers the upstream sends next, as raw `name: value` lines.
    _gw: TestGateway,
}

static RESPONSE_HEADERS: OnceLock<std::sync::Mutex<Vec<(String, String)>>> = OnceLock::new();
static CASE: AtomicUsize = AtomicUsize::new(0);

fn response_headers() -> &'static std::sync::Mutex<Vec<(String, String)>> {
    RESPONSE_HEADERS.get_or_init(Default::default)
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (upstream, gw) = runtime.block_on(async {
            let upstream = RecordingUpstream::start(|_| async {
                let mut res = full(200, &[], "ok");
                for (n, v) in response_headers().lock().unwrap().iter() {
                    res.headers_mut().append(
                        http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                        http::HeaderValue::from_str(v).unwrap(),
                    );
                }
                res
            })
            .await;
            let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
            (upstream, gw)
        });
        Fixture {
            runtime,
            gateway: gw.addr,
            upstream,
            _gw: gw,
        }
    })
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(HOP).prop_map(str::to_owned),
        prop::sample::select(CREDENTIALS).prop_map(str::to_owned),
        prop::sample::select(NOISE).prop_map(str::to_owned),
        "x-[a-z]{1,6}",
    ]
}

fn response_name() -> impl Strategy<Value = String> {
    prop_oneof![
        name(),
        Just("set-cookie".to_owned()),
        Just("proxy-authenticate".to_owned()),
        Just("x-gateway-error".to_owned()),
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1".to_owned()),
        Just("close".to_owned()),
        Just("Bearer gw-not-the-key".to_owned()),
        "[a-zA-Z0-9 ,=/-]{0,12}"
    ]
}

#[derive(Debug, Clone)]
struct Case {
    headers: Vec<(String, String)>,
    connection_lists: Vec<String>,
    response: Vec<(String, String)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((name(), value()), 0..12),
        prop::collection::vec(name(), 0..5),
        prop::collection::vec((response_name(), value()), 0..8),
    )
        .prop_map(|(headers, connection_lists, response)| Case {
            // The framing headers are the client's to get right; the property is about the rest.
            headers: headers
                .into_iter()
                .filter(|(n, _)| n != "transfer-encoding")
                .collect(),
            connection_lists,
            response: response
                .into_iter()
                .filter(|(n, _)| {
                    !matches!(
                        n.as_str(),
                        "transfer-encoding"
                            | "connection"
                            | "keep-alive"
                            | "upgrade"
                            | "te"
                            | "trailer"
                    )
                })
                .collect(),
        })
}

fn run(case: &Case) -> (http::HeaderMap, String) {
    let f = fixture();
    *response_headers().lock().unwrap() = case.response.clone();
    let before = f.upstream.count();
    let n = CASE.fetch_add(1, Ordering::SeqCst);
    let mut raw =
        format!("GET /proxy-api/{ACCOUNT}/{ENDPOINT}/models?case={n} HTTP/1.1\r\nHost: gw\r\n");
    for (name, value) in &case.headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    if !case.connection_lists.is_empty() {
        raw.push_str(&format!(
            "Connection: {}\r\n",
            case.connection_lists.join(", ")
        ));
    }
    // The real key goes last, so the random credentials above never make the request ambiguous
    // for the gateway's own authentication in a way the property does not cover.
    raw.push_str(&format!(
        "X-Api-Key: {GW_KEY}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    ));
    let response = f.runtime.block_on(async {
        let mut stream = TcpStream::connect(f.gateway).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        within(
            "response",
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut buf),
        )
        .await
        .unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    });
    let seen = if f.upstream.count() > before {
        f.upstream.last().headers
    } else {
        http::HeaderMap::new()
    };
    (seen, response)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn nothing_unwanted_crosses_the_gateway(case in case()) {
        let (seen, response) = run(&case);
        let head = response.split("\r\n\r\n").next().unwrap_or("").to_ascii_lowercase();
        // Several Authorization headers from the client are refused (401): nothing went up.
        let client_auths = case.headers.iter().filter(|(n, _)| n == "authorization").count();
        if head.starts_with("http/1.1 401") {
            prop_assert!(client_auths > 0 || case.headers.iter().any(|(n, _)| n == "x-api-key"), "{}", head);
            prop_assert!(seen.is_empty());
            return Ok(());
        }
        prop_assert!(head.starts_with("http/1.1 200"), "{}", head);
        for h in HOP {
            prop_assert!(seen.get(*h).is_none(), "{} reached the upstream", h);
        }
        for listed in &case.connection_lists {
            let protected = listed == "authorization";
            if !protected {
                prop_assert!(seen.get(listed.as_str()).is_none(), "{} was named in Connection and reached the upstream", listed);
            }
        }
        for h in ["proxy-authorization", "x-api-key", "api-key", "cookie"] {
            prop_assert!(seen.get(h).is_none(), "{} reached the upstream", h);
        }
        let auth: Vec<String> = seen.get_all("authorization").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
        prop_assert_eq!(auth, vec![format!("Bearer {UP_KEY}")]);
        prop_assert_eq!(seen.get("accept-encoding").map(|v| v.to_str().unwrap()), Some("identity"));
        for line in head.lines().skip(1) {
            let name = line.split(':').next().unwrap_or("");
            prop_assert!(!HOP.contains(&name) || name == "transfer-encoding" || name == "connection" && line.contains("close"), "{} reached the client", line);
            prop_assert!(name != "set-cookie", "set-cookie reached the client");
            prop_assert!(name != "proxy-authenticate");
            prop_assert!(name != "x-gateway-error", "an upstream x-gateway-error reached the client");
        }
    }
}
