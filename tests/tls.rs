//! The forwarder's TLS path against a real TLS upstream on loopback: a private CA made in the
//! test, a rustls server behind hyper-util's `auto::Builder`, and a gateway loaded from a TOML
//! configuration exactly as users write it.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower_gateway::config::{GatewayConfig, SecretSource};
use tower_gateway::error::X_GATEWAY_ERROR;
use tower_gateway::gateway::Gateway;

use support::*;

const CHAT: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"Say hello"}]}"#;
const REPLY: &str = r#"{"object":"chat.completion","choices":[{"message":{"role":"assistant","content":"hello over tls"}}]}"#;

// ---------------------------------------------------------------------------------------------
// A private PKI, made fresh for each test.

/// A private CA, a server certificate for `localhost` and `127.0.0.1`, a client certificate,
/// all signed by the CA, and an unrelated key.
struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_der: CertificateDer<'static>,
    server_key_der: Vec<u8>,
    client_pem: String,
    client_der: CertificateDer<'static>,
    client_key_pem: String,
    unrelated_key_pem: String,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tower-gateway test CA");
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

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "tower-gateway");
        client_params.use_authority_key_identifier_extension = true;
        client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params.signed_by(&client_key, &ca).unwrap();

        Self {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            server_der: server_cert.der().clone(),
            server_key_der: server_key.serialize_der(),
            client_pem: client_cert.pem(),
            client_der: client_cert.der().clone(),
            client_key_pem: client_key.serialize_pem(),
            unrelated_key_pem: KeyPair::generate().unwrap().serialize_pem(),
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A server configuration offering `h2` and `http/1.1`; with `require_client_cert`, it
    /// refuses clients without a certificate signed by the CA.
    fn server_config(&self, require_client_cert: bool) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Self::provider())
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()));
        let mut config = builder
            .with_single_cert(vec![self.server_der.clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

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
            "tower-gateway-tls-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, contents: &str) {
        std::fs::write(self.0.join(name), contents).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// A TLS upstream.

/// What the TLS upstream saw of one request, and of the connection it came on.
#[derive(Clone, Debug)]
struct SeenTls {
    version: Version,
    authorization: Option<String>,
    alpn: Option<Vec<u8>>,
    client_cert: Option<CertificateDer<'static>>,
}

/// A rustls + hyper upstream on 127.0.0.1 that answers 200 with [`REPLY`] and records every
/// request and every failed handshake.
struct TlsUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenTls>>>,
    failed_handshakes: Arc<AtomicUsize>,
}

impl TlsUpstream {
    async fn start(config: Arc<ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(config);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let failed_handshakes = Arc::new(AtomicUsize::new(0));
        let (log, failed) = (seen.clone(), failed_handshakes.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, log, failed) = (acceptor.clone(), log.clone(), failed.clone());
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(WAIT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        _ => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    let (_, conn) = tls.get_ref();
                    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
                    let client_cert = conn
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|c| c.clone().into_owned());
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        let alpn = alpn.clone();
                        let client_cert = client_cert.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let _ = body.collect().await;
                            log.lock().unwrap().push(SeenTls {
                                version: parts.version,
                                authorization: parts
                                    .headers
                                    .get("authorization")
                                    .map(|v| v.to_str().unwrap().to_owned()),
                                alpn,
                                client_cert,
                            });
                            Ok::<_, Infallible>(full(
                                200,
                                &[("content-type", "application/json")],
                                REPLY,
                            ))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            seen,
            failed_handshakes,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn requests(&self) -> Vec<SeenTls> {
        self.seen.lock().unwrap().clone()
    }

    fn failed_handshakes(&self) -> usize {
        self.failed_handshakes.load(Ordering::SeqCst)
    }

    /// Waits until the upstream has refused at least one handshake: proof that the gateway
    /// reached it and TLS, not the network, failed.
    async fn refused_a_handshake(&self) {
        within("a refused handshake", async {
            while self.failed_handshakes() == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway, from a configuration file's text.

/// The configuration users would write: one key, one endpoint at `base_url` with the upstream
/// key injected, and the given inline `tls` table (or none).
fn config_toml(base_url: &str, tls: Option<&str>) -> String {
    let tls = tls.map(|t| format!("tls = {t}\n")).unwrap_or_default();
    format!(
        r#"
[[keys]]
id = "tls-test"
subject = "tls@example.com"
teams = ["research"]
key = "${{GATEWAY_KEY}}"

[[accounts]]
name = "{ACCOUNT}"
access = {{ users = ["everyone"] }}

[[accounts.endpoints]]
name = "{ENDPOINT}"
base_url = "{base_url}"
headers = {{ Authorization = "Bearer ${{UPSTREAM_KEY}}" }}
{tls}"#
    )
}

fn load(toml: &str, dir: &Path) -> Result<GatewayConfig, tower_gateway::config::ConfigError> {
    let secrets = SecretSource::from_vars([("GATEWAY_KEY", GW_KEY), ("UPSTREAM_KEY", UP_KEY)], dir);
    GatewayConfig::from_toml(toml, &secrets)
}

/// Writes the PEM files, loads the configuration and serves the gateway.
async fn gateway_for(pki: &Pki, base_url: &str, tls: Option<&str>) -> (TempDir, TestGateway) {
    let dir = TempDir::new();
    dir.write("ca.pem", &pki.ca_pem);
    dir.write("client.pem", &pki.client_pem);
    dir.write("client.key", &pki.client_key_pem);
    let config = load(&config_toml(base_url, tls), dir.path()).unwrap();
    let gw = serve_gateway(Gateway::from_config(config)).await;
    (dir, gw)
}

const CA_ONLY: &str = r#"{ ca_file = "ca.pem" }"#;
const CA_AND_CLIENT_CERT: &str =
    r#"{ ca_file = "ca.pem", client_cert_file = "client.pem", client_key_file = "client.key" }"#;

async fn chat(gw: &TestGateway) -> (StatusCode, http::HeaderMap, String) {
    let res = within(
        "the gateway's response",
        client().request(post_json(gw.proxy_url("/chat/completions"), CHAT)),
    )
    .await
    .unwrap();
    let (parts, body) = res.into_parts();
    let body = within("the gateway's body", body.collect())
        .await
        .unwrap()
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

fn gateway_error(headers: &http::HeaderMap) -> Option<&str> {
    headers.get(X_GATEWAY_ERROR).map(|v| v.to_str().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn ca_file_trusts_a_private_upstream_over_h2() {
    let pki = Pki::new();
    let up = TlsUpstream::start(pki.server_config(false)).await;
    let base_url = format!("https://localhost:{}/v1", up.port());
    let (_dir, gw) = gateway_for(&pki, &base_url, Some(CA_ONLY)).await;

    let (status, headers, body) = chat(&gw).await;
    assert_eq!(status, 200, "{headers:?} {body}");
    assert_eq!(gateway_error(&headers), None);
    assert_eq!(body, REPLY);

    let seen = up.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(seen[0].version, Version::HTTP_2);
    let expected = format!("Bearer {UP_KEY}");
    assert_eq!(seen[0].authorization.as_deref(), Some(expected.as_str()));
    assert_eq!(seen[0].client_cert, None);

    // A second request reuses the pooled h2 connection and still succeeds.
    let (status, _, body) = chat(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(up.requests().len(), 2);
    assert_eq!(up.failed_handshakes(), 0);
}

#[tokio::test]
async fn without_tls_settings_a_private_upstream_is_refused() {
    let pki = Pki::new();
    let up = TlsUpstream::start(pki.server_config(false)).await;
    let base_url = format!("https://localhost:{}/v1", up.port());
    let (_dir, gw) = gateway_for(&pki, &base_url, None).await;

    let (status, headers, body) = chat(&gw).await;
    assert_eq!(status, 502, "{headers:?} {body}");
    assert_eq!(
        gateway_error(&headers),
        Some("upstream_unreachable"),
        "{body}"
    );
    assert!(!body.contains(UP_KEY), "{body}");
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    up.refused_a_handshake().await;
}

#[tokio::test]
async fn client_certificate_is_presented_when_the_upstream_requires_one() {
    let pki = Pki::new();
    let up = TlsUpstream::start(pki.server_config(true)).await;
    let base_url = format!("https://127.0.0.1:{}/v1", up.port());
    let (_dir, gw) = gateway_for(&pki, &base_url, Some(CA_AND_CLIENT_CERT)).await;

    let (status, headers, body) = chat(&gw).await;
    assert_eq!(status, 200, "{headers:?} {body}");
    assert_eq!(body, REPLY);

    let seen = up.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].client_cert.as_ref(), Some(&pki.client_der));
    assert_eq!(seen[0].version, Version::HTTP_2);
    let expected = format!("Bearer {UP_KEY}");
    assert_eq!(seen[0].authorization.as_deref(), Some(expected.as_str()));
    assert_eq!(up.failed_handshakes(), 0);
}

#[tokio::test]
async fn without_a_client_certificate_an_mtls_upstream_fails_with_502() {
    let pki = Pki::new();
    let up = TlsUpstream::start(pki.server_config(true)).await;
    let base_url = format!("https://127.0.0.1:{}/v1", up.port());
    let (_dir, gw) = gateway_for(&pki, &base_url, Some(CA_ONLY)).await;

    let (status, headers, body) = chat(&gw).await;
    assert_eq!(status, 502, "{headers:?} {body}");
    assert!(gateway_error(&headers).is_some(), "{headers:?} {body}");
    assert!(!body.contains(UP_KEY), "{body}");
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    up.refused_a_handshake().await;
}

#[tokio::test]
async fn a_client_key_that_does_not_match_the_certificate_fails_to_load() {
    let pki = Pki::new();
    let dir = TempDir::new();
    dir.write("ca.pem", &pki.ca_pem);
    dir.write("client.pem", &pki.client_pem);
    dir.write("client.key", &pki.unrelated_key_pem);
    let toml = config_toml("https://localhost:8443/v1", Some(CA_AND_CLIENT_CERT));

    let err = load(&toml, dir.path()).unwrap_err();
    assert!(
        err.field().ends_with("tls.client_key_file"),
        "field {:?}: {err}",
        err.field()
    );
    assert_eq!(err.field(), "accounts[0].endpoints[0].tls.client_key_file");
    for text in [
        err.to_string(),
        format!("{err:?}"),
        err.message().to_owned(),
    ] {
        assert!(!text.contains("-----BEGIN"), "{text}");
        assert!(!text.contains(GW_KEY) && !text.contains(UP_KEY), "{text}");
        for line in pki
            .unrelated_key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
        {
            assert!(!text.contains(line), "{text}");
        }
    }

    // The matching key loads.
    dir.write("client.key", &pki.client_key_pem);
    load(&toml, dir.path()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// A pool of HTTP/2 targets: hyper sends an h2 request body from a task of its own, so a
// failure of the client's body reaches the attempt as a stream reset, not as the client's
// error. It must still be the client's: answered 413 or 408, never retried, never counted
// against a target.

/// A gateway on a pool of two TLS targets (ports `a`, `b`) trusting the test CA, with a
/// 1,000-byte request limit and `extra` endpoint fields.
async fn h2_pool(pki: &Pki, a: u16, b: u16, extra: &str) -> (TempDir, TestGateway) {
    let dir = TempDir::new();
    dir.write("ca.pem", &pki.ca_pem);
    let toml = format!(
        "[limits]\nmax_request_body_bytes = 1000\n\n\
         [[keys]]\nid = \"k\"\nsubject = \"k@example.com\"\nkey = \"{GW_KEY}\"\n\n\
         [[accounts]]\nname = \"{ACCOUNT}\"\nheader_auth = {{ Authorization = \"Bearer {UP_KEY}\" }}\n\
         access = {{ managers = [\"everyone\"] }}\n\n\
         [[accounts.endpoints]]\nname = \"{ENDPOINT}\"\ntls = {{ ca_file = \"ca.pem\" }}\n\
         targets = [{{ base_url = \"https://localhost:{a}/v1\" }}, {{ base_url = \"https://localhost:{b}/v1\" }}]\n\
         eject = {{ consecutive_failures = 1 }}\n{extra}\n"
    );
    let secrets = SecretSource::from_vars([] as [(&str, &str); 0], dir.path());
    let config = GatewayConfig::from_toml(&toml, &secrets).unwrap();
    let gw = serve_app(Gateway::builder().config(config).build()).await;
    (dir, gw)
}

/// Sends `chunks` (each after its pause, in ms) as a chunked body; the status and the
/// `x-gateway-error` code.
async fn send_chunks(gw: &TestGateway, chunks: Vec<(&'static [u8], u64)>) -> (StatusCode, String) {
    let (tx, stream) = ChannelBody::channel(4);
    tokio::spawn(async move {
        for (c, pause_ms) in chunks {
            tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
            if tx.send(Ok(bytes::Bytes::from_static(c))).await.is_err() {
                return;
            }
        }
        // The body stays open: only the gateway's limit or timeout ends it.
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    });
    let req = http::Request::post(gw.proxy_url("/chat/completions"))
        .header("authorization", format!("Bearer {GW_KEY}"))
        .header("content-type", "application/json")
        .body(stream)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<ChannelBody>();
    let res = within("the answer", client.request(req)).await.unwrap();
    let code = res
        .headers()
        .get(X_GATEWAY_ERROR)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (res.status(), code)
}

async fn target_failures(gw: &TestGateway) -> Vec<serde_json::Value> {
    let got = send_json(
        http::Method::GET,
        gw.url(&format!("/manage/accounts/{ACCOUNT}/endpoints/{ENDPOINT}")),
        Some(GW_KEY),
        None,
    )
    .await;
    got.json()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["consecutive_failures"].clone())
        .collect()
}

#[tokio::test]
async fn a_client_body_that_fails_is_the_clients_fault_on_an_h2_pool() {
    let pki = Pki::new();
    let a = TlsUpstream::start(pki.server_config(false)).await;
    let b = TlsUpstream::start(pki.server_config(false)).await;
    let (_dir, gw) = h2_pool(&pki, a.port(), b.port(), "timeouts = { idle_ms = 300 }").await;
    // Over the limit, in the middle of the body.
    let big: &'static [u8] = &[b'x'; 500];
    let (status, code) = send_chunks(&gw, (0..10).map(|_| (big, 20)).collect()).await;
    assert_eq!((status.as_u16(), code.as_str()), (413, "payload_too_large"));
    assert_eq!(target_failures(&gw).await, [0, 0], "a target was blamed");
    // Silent in the middle of the body.
    let (status, code) = send_chunks(&gw, vec![(b"{\"model\":", 0), (b"\"m\"}", 2_000)]).await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (408, "request_body_timeout")
    );
    assert_eq!(target_failures(&gw).await, [0, 0], "a target was blamed");
    // The targets serve as ever, over HTTP/2.
    let ok = send_json(
        http::Method::POST,
        gw.proxy_url("/chat/completions"),
        Some(GW_KEY),
        Some(CHAT),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let seen: Vec<_> = a.requests().into_iter().chain(b.requests()).collect();
    assert!(seen.iter().any(|s| s.version == Version::HTTP_2));
}
