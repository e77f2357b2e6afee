//! Shared test fixtures: real hyper servers on loopback, a real gateway, a real client.

#![allow(dead_code)]

#[path = "../../examples/support/mock_upstream.rs"]
pub mod mock_upstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower_gateway::access::{Grants, Subject};
use tower_gateway::auth::{HashedKeyStore, Principal};
use tower_gateway::forward::ForwardBuilder;
use tower_gateway::gateway::Gateway;
use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};

#[allow(unused_imports)]
pub use mock_upstream::{ChannelBody, MockBody, MockUpstream};

/// The client's gateway key: distinctive so a leak is easy to spot.
pub const GW_KEY: &str = "gw-e2e-CANARY-7f3a9c21";
/// The upstream credential the gateway injects.
pub const UP_KEY: &str = "up-e2e-CANARY-91c2b8d4";
pub const ACCOUNT: &str = "coreweave-model";
pub const ENDPOINT: &str = "inference";

/// Bounds every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A running gateway on loopback. Dropping it stops the server.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    _stop: oneshot::Sender<()>,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> Uri {
        format!("http://{}{path}", self.addr).parse().unwrap()
    }

    pub fn proxy_url(&self, upstream_path: &str) -> Uri {
        self.url(&format!("/proxy-api/{ACCOUNT}/{ENDPOINT}{upstream_path}"))
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/proxy-api/{ACCOUNT}/{ENDPOINT}", self.addr)
    }
}

/// The registry of [`start_gateway`]: the account `ACCOUNT`, open to everyone, with one endpoint
/// `ENDPOINT` at `base_url` that injects `Authorization: Bearer UP_KEY`.
pub fn one_endpoint_registry(base_url: &str) -> Registry {
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {UP_KEY}")).unwrap(),
    );
    Registry::from_accounts(vec![AccountSpec {
        endpoints: vec![EndpointSpec {
            headers,
            ..EndpointSpec::new(ENDPOINT, base_url)
        }],
        access: Grants {
            users: vec![Subject::Everyone],
            ..Grants::default()
        },
        ..AccountSpec::new(ACCOUNT)
    }])
    .unwrap()
}

/// A gateway with one key (`GW_KEY`) and one endpoint at `base_url` that injects
/// `Authorization: Bearer UP_KEY` (the [`one_endpoint_registry`]).
pub async fn start_gateway(base_url: &str, forward: ForwardBuilder) -> TestGateway {
    let keys = HashedKeyStore::new()
        .with_key(
            GW_KEY,
            Principal::new("e2e", "e2e@example.com", ["research"]),
        )
        .unwrap();
    let gateway = Gateway::builder()
        .keys(keys)
        .registry(one_endpoint_registry(base_url).into())
        .forward(forward)
        .build();
    serve_gateway(gateway).await
}

pub async fn serve_gateway(gateway: Gateway) -> TestGateway {
    let svc = gateway.service();
    serve_with(gateway, svc).await
}

/// Serves `svc` on 127.0.0.1:0 until the returned `TestGateway` is dropped.
async fn serve_with<S, B>(gateway: Gateway, svc: S) -> TestGateway
where
    S: tower::Service<
            Request<Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<tower_gateway::BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        tower_gateway::server::serve_with_grace(
            listener,
            svc,
            async {
                let _ = stopped.await;
            },
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    });
    TestGateway {
        addr,
        gateway,
        _stop: stop,
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// `POST` with the gateway key and a JSON body.
pub fn post_json(uri: Uri, json: &str) -> Request<Full<Bytes>> {
    Request::post(uri)
        .header("authorization", format!("Bearer {GW_KEY}"))
        .header("content-type", "application/json")
        .body(Full::from(json.to_owned()))
        .unwrap()
}

pub async fn body_string(res: Response<Incoming>) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// What an upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body_len: usize,
}

type Handler =
    Arc<dyn Fn(Seen) -> Pin<Box<dyn Future<Output = Response<MockBody>> + Send>> + Send + Sync>;

/// A hyper upstream that records every request (and drains its body) before answering with
/// `handler`.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl RecordingUpstream {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |seen| Box::pin(handler(seen)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let log = log.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body_len = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes().len())
                                .unwrap_or(0);
                            let seen = Seen {
                                method: parts.method,
                                uri: parts.uri,
                                version: parts.version,
                                headers: parts.headers,
                                body_len,
                            };
                            log.lock().unwrap().push(seen.clone());
                            Ok::<_, Infallible>(handler(seen).await)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream saw a request")
    }
}

pub fn full(
    status: u16,
    headers: &[(&'static str, &'static str)],
    body: &'static str,
) -> Response<MockBody> {
    let mut res = Response::new(MockBody::Full(Some(Bytes::from_static(body.as_bytes()))));
    *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
    for (n, v) in headers {
        res.headers_mut()
            .append(HeaderName::from_static(n), HeaderValue::from_static(v));
    }
    res
}

/// Reads the next data frame; `None` at a clean end; panics on timeout.
pub async fn next_data(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        match within("a body frame", body.frame()).await {
            None => return None,
            Some(Err(e)) => return Some(Err(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
        }
    }
}

/// Reads a body to its end: `Ok(bytes)` on a clean end, `Err` if it was cut.
pub async fn read_to_end(body: &mut Incoming) -> Result<Vec<u8>, hyper::Error> {
    let mut out = Vec::new();
    while let Some(frame) = next_data(body).await {
        out.extend_from_slice(&frame?);
    }
    Ok(out)
}

/// Serves `gateway.app()`: the proxy and the management API (under `/manage`) on one port.
pub async fn serve_app(gateway: Gateway) -> TestGateway {
    let svc = gateway.app::<Incoming>();
    serve_with(gateway, svc).await
}

/// What a call answered: status, headers and the whole body as text.
#[derive(Debug)]
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    /// The body as JSON; panics if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The message of a gateway error body.
    pub fn error_message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body: {}", self.body))
            .to_owned()
    }
}

/// Sends `method uri` with `Authorization: Bearer key` (if any) and a JSON body (if any), and
/// reads the whole answer, all within [`WAIT`].
pub async fn send_json(method: Method, uri: Uri, key: Option<&str>, body: Option<&str>) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::from(body.unwrap_or_default().to_owned()))
        .unwrap();
    within("an answer", async {
        let res = client().request(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    })
    .await
}

/// Where a [`sse_upstream`] hands over each stream it opens: the request path and the sender
/// that feeds the response body (drop it for a clean end).
pub type StreamFeeds = tokio::sync::mpsc::UnboundedReceiver<(
    String,
    tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
)>;

/// A [`RecordingUpstream`] that answers `POST …/chat/completions` with an SSE body fed by
/// the test (through [`StreamFeeds`]) and anything else with a small JSON body
/// `{"upstream_path": PATH}`.
pub async fn sse_upstream() -> (RecordingUpstream, StreamFeeds) {
    let (feed_tx, feed_rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = RecordingUpstream::start(move |seen: Seen| {
        let feed_tx = feed_tx.clone();
        async move {
            let path = seen.uri.path().to_owned();
            if seen.method == Method::POST && path.ends_with("/chat/completions") {
                let (events, body) = ChannelBody::channel(8);
                let _ = feed_tx.send((path, events));
                let mut res = Response::new(MockBody::Stream(body));
                res.headers_mut().insert(
                    "content-type",
                    HeaderValue::from_static("text/event-stream"),
                );
                res
            } else {
                let body = serde_json::json!({ "upstream_path": path }).to_string();
                let mut res = Response::new(MockBody::Full(Some(Bytes::from(body))));
                res.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/json"));
                res
            }
        }
    })
    .await;
    (upstream, feed_rx)
}

/// The `i`th token event of a test stream.
pub fn sse_event(i: usize) -> String {
    format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"token{i} \"}}}}]}}\n\n")
}

/// The last event of an OpenAI stream.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// `POST`s a streaming chat request with `key` and returns the body once the head is 200.
pub async fn open_stream(uri: Uri, key: &str) -> Incoming {
    let req = Request::post(uri)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::from(
            r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#,
        ))
        .unwrap();
    let res = within("a stream's response head", client().request(req))
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "the stream did not open");
    res.into_body()
}

/// A configuration file's TOML: `keys` as (id, team, key), each with the subject
/// `{id}@example.com`, and the account `ACCOUNT`, open to everyone, whose endpoint `ENDPOINT`
/// at `base_url` sends `Authorization: Bearer UP_KEY`.
pub fn one_account_toml(base_url: &str, keys: &[(&str, &str, &str)]) -> String {
    let mut toml = String::new();
    for (id, team, key) in keys {
        toml.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nsubject = \"{id}@example.com\"\nteams = [\"{team}\"]\nkey = \"{key}\"\n\n"
        ));
    }
    toml.push_str(&format!(
        "[[accounts]]\nname = \"{ACCOUNT}\"\naccess = {{ users = [\"everyone\"] }}\n\n\
         [[accounts.endpoints]]\nname = \"{ENDPOINT}\"\nbase_url = \"{base_url}\"\n\
         headers = {{ Authorization = \"Bearer {UP_KEY}\" }}\n\n"
    ));
    toml
}

/// A gateway built from a configuration file's `toml` (no secrets to expand).
pub fn gateway_from_toml(toml: &str) -> Gateway {
    let config = tower_gateway::config::GatewayConfig::from_toml(
        toml,
        &tower_gateway::config::SecretSource::from_vars(
            [] as [(&str, &str); 0],
            std::env::temp_dir(),
        ),
    )
    .unwrap_or_else(|e| panic!("config: {e}"));
    Gateway::builder().config(config).build()
}
