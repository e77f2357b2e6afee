//! The forwarder's upstream pools through the real stack: upstreams on loopback that count the
//! connections they accept, TLS ones (a private CA made in the test, ALPN `h2` or only
//! `http/1.1`) and plain ones, behind a gateway loaded from a TOML configuration.
//!
//! - a burst of requests against a cold HTTP/2 upstream opens one connection, not one per
//!   request; against an HTTP/1.1-only one it still completes; a connect that is cancelled or
//!   fails lets the requests that waited for it go on;
//! - a management update of one endpoint leaves every other endpoint's warm connections alone.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower_gateway::config::{GatewayConfig, SecretSource};
use tower_gateway::gateway::Gateway;

use support::*;

const CHAT: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"Say hello"}]}"#;
const REPLY: &str = r#"{"object":"chat.completion","choices":[{"message":{"role":"assistant","content":"hello"}}]}"#;

/// How many requests a burst starts at once.
const BURST: usize = 64;

/// How long the TLS upstreams wait after accepting a connection before the handshake, as an
/// upstream a few round trips away would: every request of a burst arrives while the first
/// connection is still being set up.
const HANDSHAKE_DELAY: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// A private PKI (as in `tests/tls.rs`).

/// A private CA and a server certificate for `localhost` and `127.0.0.1` signed by it.
struct Pki {
    ca_pem: String,
    server_der: CertificateDer<'static>,
    server_key_der: Vec<u8>,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tower-gateway pools test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.use_authority_key_identifier_extension = true;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &ca).unwrap();

        Self {
            ca_pem: ca_cert.pem(),
            server_der: server_cert.der().clone(),
            server_key_der: server_key.serialize_der(),
        }
    }

    /// A server configuration offering the `alpn` protocols.
    fn server_config(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.server_der.clone()], key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

const H2_AND_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
const H1_ONLY: &[&[u8]] = &[b"http/1.1"];

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "tower-gateway-pools-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// An upstream that counts connections.

/// What the upstream does with the connection it accepted `n`th (from 0).
#[derive(Clone, Copy, Debug)]
enum Conn {
    /// Serves it (after [`HANDSHAKE_DELAY`] when it is TLS).
    Serve,
    /// Holds it open without a word, then closes it: a handshake that never completes.
    Hold(Duration),
}

/// A hyper upstream on 127.0.0.1, TLS or plain, that answers 200 with [`REPLY`] and counts the
/// connections it accepts and the requests it answers.
struct Upstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    versions: Arc<Mutex<Vec<Version>>>,
}

impl Upstream {
    /// A plain HTTP/1.1 (or h2c) upstream.
    async fn plain() -> Self {
        Self::start(None, |_| Conn::Serve).await
    }

    /// A TLS upstream offering `alpn`; `plan` says what to do with each connection.
    async fn tls(pki: &Pki, alpn: &[&[u8]], plan: fn(usize) -> Conn) -> Self {
        Self::start(Some(TlsAcceptor::from(pki.server_config(alpn))), plan).await
    }

    async fn start(tls: Option<TlsAcceptor>, plan: fn(usize) -> Conn) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let versions = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (accepted.clone(), versions.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let n = count.fetch_add(1, Ordering::SeqCst);
                let (tls, log) = (tls.clone(), log.clone());
                tokio::spawn(async move {
                    if let Conn::Hold(hold) = plan(n) {
                        tokio::time::sleep(hold).await;
                        return;
                    }
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let _ = body.collect().await;
                            log.lock().unwrap().push(parts.version);
                            Ok::<_, Infallible>(full(
                                200,
                                &[("content-type", "application/json")],
                                REPLY,
                            ))
                        }
                    });
                    let server = auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        Some(acceptor) => {
                            tokio::time::sleep(HANDSHAKE_DELAY).await;
                            let Ok(Ok(tls)) =
                                tokio::time::timeout(WAIT, acceptor.accept(tcp)).await
                            else {
                                return;
                            };
                            server.serve_connection(TokioIo::new(tls), svc).await
                        }
                        None => server.serve_connection(TokioIo::new(tcp), svc).await,
                    };
                });
            }
        });
        Self {
            addr,
            accepted,
            versions,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn versions(&self) -> Vec<Version> {
        self.versions.lock().unwrap().clone()
    }

    fn base_url(&self, scheme: &str) -> String {
        format!("{scheme}://{}/v1", self.addr)
    }

    /// Waits until the upstream has accepted `n` connections.
    async fn accepted_at_least(&self, n: usize) {
        within("the upstream to accept a connection", async {
            while self.accepted() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway.

/// A gateway from TOML text, `${VAR}` taken from `vars`, files relative to `dir`.
fn gateway_from(toml: &str, vars: &[(&str, &str)], dir: &Path) -> Gateway {
    let secrets = SecretSource::from_vars(vars.iter().copied(), dir);
    let config = GatewayConfig::from_toml(toml, &secrets).unwrap_or_else(|e| panic!("config: {e}"));
    Gateway::builder().config(config).build()
}

/// A gateway with one endpoint ([`ACCOUNT`]/[`ENDPOINT`]) at the TLS upstream `up`, trusting
/// the test CA (so the endpoint has a pool of its own).
async fn tls_gateway(pki: &Pki, up: &Upstream) -> (TempDir, TestGateway) {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let toml = format!(
        r#"
[[keys]]
id = "pools-test"
subject = "pools@example.com"
key = "${{GATEWAY_KEY}}"

[[accounts]]
name = "{ACCOUNT}"
access = {{ users = ["everyone"] }}

[[accounts.endpoints]]
name = "{ENDPOINT}"
base_url = "{}"
headers = {{ Authorization = "Bearer ${{UPSTREAM_KEY}}" }}
tls = {{ ca_file = "ca.pem" }}
"#,
        up.base_url("https")
    );
    let vars = [("GATEWAY_KEY", GW_KEY), ("UPSTREAM_KEY", UP_KEY)];
    let gateway = gateway_from(&toml, &vars, dir.path());
    (dir, serve_gateway(gateway).await)
}

/// Starts `n` chat requests, each on a task of its own; each reads its answer to the end.
fn spawn_chats(gw: &TestGateway, n: usize) -> JoinSet<(StatusCode, String)> {
    let client = client();
    let mut requests = JoinSet::new();
    for _ in 0..n {
        let (client, uri) = (client.clone(), gw.proxy_url("/chat/completions"));
        requests.spawn(async move {
            let res = client.request(post_json(uri, CHAT)).await.unwrap();
            let status = res.status();
            (status, body_string(res).await)
        });
    }
    requests
}

/// Starts `n` chat requests at once and waits for every answer.
async fn burst(gw: &TestGateway, n: usize) -> Vec<(StatusCode, String)> {
    within("a burst of answers", spawn_chats(gw, n).join_all()).await
}

fn assert_all_ok(answers: &[(StatusCode, String)], what: &str) {
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, StatusCode::OK, "{what}, request {i}: {body}");
        assert_eq!(body, REPLY, "{what}, request {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrent connects to one upstream coalesce.

#[tokio::test]
async fn a_burst_against_a_cold_h2_upstream_opens_one_connection() {
    let pki = Pki::new();
    let up = Upstream::tls(&pki, H2_AND_H1, |_| Conn::Serve).await;
    let (_dir, gw) = tls_gateway(&pki, &up).await;

    let answers = burst(&gw, BURST).await;
    assert_all_ok(&answers, "cold burst");
    assert_eq!(
        up.accepted(),
        1,
        "{BURST} requests at once against a cold HTTP/2 upstream"
    );
    let versions = up.versions();
    assert_eq!(versions.len(), BURST);
    assert!(
        versions.iter().all(|v| *v == Version::HTTP_2),
        "{versions:?}"
    );

    // Warm: the next burst shares the same connection.
    assert_all_ok(&burst(&gw, BURST).await, "warm burst");
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn a_burst_against_an_h1_only_tls_upstream_completes() {
    let pki = Pki::new();
    let up = Upstream::tls(&pki, H1_ONLY, |_| Conn::Serve).await;
    let (_dir, gw) = tls_gateway(&pki, &up).await;

    // The first burst waits for the first connect, learns HTTP/1.1, and connects on its own;
    // the second knows and waits for nothing.
    for round in ["cold burst", "second burst"] {
        assert_all_ok(&burst(&gw, BURST).await, round);
    }
    let versions = up.versions();
    assert_eq!(versions.len(), 2 * BURST);
    assert!(
        versions.iter().all(|v| *v == Version::HTTP_11),
        "{versions:?}"
    );
    // HTTP/1.1 carries one request at a time: at most one connection per request at once.
    assert!(up.accepted() <= 2 * BURST, "{} connections", up.accepted());
}

/// Sends a chat request on a raw connection to the gateway and leaves it unanswered.
async fn start_raw_chat(gw: &TestGateway) -> TcpStream {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {GW_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT}",
        gw.addr,
        CHAT.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn a_cancelled_connect_lets_one_of_its_waiters_connect() {
    let pki = Pki::new();
    // The first connection never completes its handshake.
    let up = Upstream::tls(&pki, H2_AND_H1, |n| {
        if n == 0 {
            Conn::Hold(Duration::from_secs(60))
        } else {
            Conn::Serve
        }
    })
    .await;
    let (_dir, gw) = tls_gateway(&pki, &up).await;

    let first = start_raw_chat(&gw).await;
    up.accepted_at_least(1).await;
    let waiters = spawn_chats(&gw, 8);
    // Let them reach the gateway and wait for the first connect; then its client leaves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first);

    let answers = within("the waiters' answers", waiters.join_all()).await;
    assert_all_ok(&answers, "after the cancelled connect");
    assert_eq!(up.accepted(), 2, "one connection after the cancelled one");
}

#[tokio::test]
async fn a_failed_connect_lets_its_waiters_connect_on_their_own() {
    let pki = Pki::new();
    // The first connection is closed before the handshake: that connect fails.
    let up = Upstream::tls(&pki, H2_AND_H1, |n| {
        if n == 0 {
            Conn::Hold(Duration::from_millis(500))
        } else {
            Conn::Serve
        }
    })
    .await;
    let (_dir, gw) = tls_gateway(&pki, &up).await;

    let mut first = spawn_chats(&gw, 1);
    up.accepted_at_least(1).await;
    let waiters = spawn_chats(&gw, 8);

    let (status, body) = within("the first answer", first.join_next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let answers = within("the waiters' answers", waiters.join_all()).await;
    assert_all_ok(&answers, "after the failed connect");
    assert!(
        (2..=9).contains(&up.accepted()),
        "{} connections",
        up.accepted()
    );
}

// ---------------------------------------------------------------------------------------------
// A management update keeps warm pools.

const MGR: &str = "gw-pools-mgr-CANARY-4c7e1a90";

/// Endpoints `a` (default pool), `b` (a pool of its own: its own connect timeout) and `c`
/// (default pool), each at its own plain upstream.
fn three_endpoints_toml(a: &Upstream, b: &Upstream, c: &Upstream) -> String {
    format!(
        r#"
[[keys]]
id = "platform-manager"
subject = "pat@example.com"
teams = ["platform"]
key = "${{MGR_KEY}}"

[[accounts]]
name = "{ACCOUNT}"
access = {{ managers = ["team:platform"] }}

[[accounts.endpoints]]
name = "a"
base_url = "{}"

[[accounts.endpoints]]
name = "b"
base_url = "{}"
timeouts = {{ connect_ms = 4000 }}

[[accounts.endpoints]]
name = "c"
base_url = "{}"
"#,
        a.base_url("http"),
        b.base_url("http"),
        c.base_url("http"),
    )
}

/// A chat completion through endpoint `endpoint`, read to its end.
async fn chat_via(gw: &TestGateway, endpoint: &str) -> Answer {
    let uri = gw.url(&format!("/proxy-api/{ACCOUNT}/{endpoint}/chat/completions"));
    send_json(Method::POST, uri, Some(MGR), Some(CHAT)).await
}

#[tokio::test]
async fn a_management_update_keeps_other_endpoints_warm_connections() {
    let (a, b, c) = (
        Upstream::plain().await,
        Upstream::plain().await,
        Upstream::plain().await,
    );
    let gw = serve_app(gateway_from(
        &three_endpoints_toml(&a, &b, &c),
        &[("MGR_KEY", MGR)],
        &std::env::temp_dir(),
    ))
    .await;

    // Twice each: the second request reuses the first one's connection.
    for endpoint in ["a", "b", "c", "a", "b", "c"] {
        let ans = chat_via(&gw, endpoint).await;
        assert_eq!(ans.status, 200, "{endpoint}: {}", ans.body);
    }
    assert_eq!((a.accepted(), b.accepted(), c.accepted()), (1, 1, 1));

    // Change endpoint a (its timeouts): a new registry snapshot.
    let ans = send_json(
        Method::PUT,
        gw.url(&format!("/manage/accounts/{ACCOUNT}/endpoints/a")),
        Some(MGR),
        Some(&format!(
            r#"{{"base_url": "{}", "timeouts": {{"first_byte_ms": 60000}}}}"#,
            a.base_url("http")
        )),
    )
    .await;
    assert_eq!(ans.status, 200, "{}", ans.body);

    for endpoint in ["b", "c", "a"] {
        let ans = chat_via(&gw, endpoint).await;
        assert_eq!(ans.status, 200, "{endpoint} after the update: {}", ans.body);
    }
    assert_eq!(
        b.accepted(),
        1,
        "the endpoint with a pool of its own reconnected after another endpoint changed"
    );
    assert_eq!(
        c.accepted(),
        1,
        "an endpoint on the default pool reconnected after another endpoint changed"
    );
    assert_eq!(
        a.accepted(),
        1,
        "the changed endpoint's connection is kept too"
    );
    assert_eq!(b.versions().len(), 3);
}
