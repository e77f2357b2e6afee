//! End to end over loopback: a real upstream, the full gateway stack on a real hyper server,
//! a real client.

mod support;

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower_gateway::forward::ForwardBuilder;
use tower_gateway::registry::Registry;

use support::*;

const CHAT: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"Say hello"}]}"#;
const CHAT_STREAM: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

async fn mock_gateway(token_delay: Duration) -> (MockUpstream, TestGateway) {
    let mock = MockUpstream::new(UP_KEY, token_delay);
    let addr = mock.spawn().await.unwrap();
    let gw = start_gateway(&format!("http://{addr}/v1"), ForwardBuilder::default()).await;
    (mock, gw)
}

/// Sends `req` with a fresh client and waits (within [`WAIT`]) for the response head.
async fn respond(req: Request<Full<Bytes>>) -> Response<Incoming> {
    within("response", client().request(req)).await.unwrap()
}

/// `POST …/chat/completions` with the gateway key and `body`; the response head.
async fn chat(gw: &TestGateway, body: &str) -> Response<Incoming> {
    respond(post_json(gw.proxy_url("/chat/completions"), body)).await
}

/// A request to `upstream_path` of the test endpoint, with the gateway key.
fn keyed(method: Method, gw: &TestGateway, upstream_path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(gw.proxy_url(upstream_path))
        .header("authorization", format!("Bearer {GW_KEY}"))
}

/// A client whose request bodies the test feeds frame by frame.
fn streaming_client() -> Client<HttpConnector, ChannelBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An upstream that accepts one connection and then says nothing for 30 s.
async fn silent_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await; // hold the socket, answer nothing
        drop(s);
    });
    addr
}

#[tokio::test]
async fn non_streaming_completion_through_the_full_stack() {
    let (mock, gw) = mock_gateway(Duration::ZERO).await;
    let res = chat(&gw, CHAT).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_str(&body_string(res).await).unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("You said: Say hello")
    );
    assert_eq!(mock.requests(), 1);

    let res = respond(
        Request::get(gw.proxy_url("/models"))
            .header("x-api-key", GW_KEY)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert!(body_string(res).await.contains("Llama-3.1-8B-Instruct"));
}

#[tokio::test]
async fn sse_stream_through_the_full_stack() {
    let (_mock, gw) = mock_gateway(Duration::from_millis(1)).await;
    let res = chat(&gw, CHAT_STREAM).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let text = String::from_utf8(read_to_end(&mut body).await.unwrap()).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.len() > 5, "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e.strip_prefix("data: ").unwrap()).unwrap()
        })
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(
        content,
        "Hello from the mock W&B Inference upstream! You said: Say hello"
    );
}

/// The upstream sends event N+1 only after the client has received event N: a gateway that
/// buffered, or waited for a second frame before writing, would stall here and time out.
#[tokio::test]
async fn events_arrive_one_by_one() {
    let (feed_tx, mut feed_rx) =
        tokio::sync::mpsc::channel::<tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>>(1);
    let feed_tx = std::sync::Arc::new(feed_tx);
    let upstream = RecordingUpstream::start(move |_seen| {
        let feed_tx = feed_tx.clone();
        async move {
            let (events, body) = ChannelBody::channel(1);
            feed_tx.send(events).await.unwrap();
            let mut res = http::Response::new(MockBody::Stream(body));
            res.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            res
        }
    })
    .await;
    let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
    let res = chat(&gw, CHAT_STREAM).await;
    let events = within("the upstream's sender", feed_rx.recv())
        .await
        .unwrap();
    let mut body = res.into_body();
    for i in 0..20 {
        let event =
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"token{i} \"}}}}]}}\n\n");
        events.send(Ok(Bytes::from(event.clone()))).await.unwrap();
        // Only this one event exists: it must reach the client before the next is sent.
        let got = next_data(&mut body).await.expect("event").unwrap();
        assert_eq!(got, event.as_bytes(), "event {i}");
    }
    drop(events);
    assert!(
        next_data(&mut body).await.is_none(),
        "a clean end after the upstream's clean end"
    );
}

#[tokio::test]
async fn the_upstream_sees_only_the_configured_credential() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "{}") }).await;
    let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
    let req = keyed(Method::POST, &gw, "/chat/completions")
        .header("x-api-key", GW_KEY)
        .header("api-key", GW_KEY)
        .header("proxy-authorization", format!("Basic {GW_KEY}"))
        .header("accept-encoding", "gzip, br")
        .header("x-request-id", "req-1")
        .body(Full::from(CHAT))
        .unwrap();
    let res = respond(req).await;
    assert_eq!(res.status(), 200);
    let seen = upstream.last();
    let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auth, [format!("Bearer {UP_KEY}").as_str()]);
    for h in ["x-api-key", "api-key", "proxy-authorization"] {
        assert!(seen.headers.get(h).is_none(), "{h} reached the upstream");
    }
    for (name, value) in &seen.headers {
        assert!(
            !value
                .as_bytes()
                .windows(GW_KEY.len())
                .any(|w| w == GW_KEY.as_bytes()),
            "client key in {name}"
        );
    }
    assert_eq!(seen.headers["accept-encoding"], "identity");
    assert_eq!(seen.headers["host"], upstream.addr.to_string().as_str());
    assert_eq!(seen.headers["x-request-id"], "req-1");
    assert_eq!(seen.uri.path(), "/v1/chat/completions");
    assert_eq!(seen.body_len, CHAT.len());
}

#[tokio::test]
async fn query_is_kept_byte_for_byte_and_absolute_form_authority_is_ignored() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "ok") }).await;
    let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;

    let req = keyed(Method::GET, &gw, "/models?limit=5&after=a%2Fb&q=x+y&empty=")
        .body(Full::default())
        .unwrap();
    assert_eq!(respond(req).await.status(), 200);
    assert_eq!(
        upstream.last().uri.to_string(),
        "/v1/models?limit=5&after=a%2Fb&q=x+y&empty="
    );

    // An absolute-form target naming another host: only the path counts.
    let raw = format!(
        "GET http://evil.example:666/proxy-api/{ACCOUNT}/{ENDPOINT}/models HTTP/1.1\r\nHost: evil.example:666\r\nAuthorization: Bearer {GW_KEY}\r\nConnection: close\r\n\r\n"
    );
    let response = raw_exchange(gw.addr, raw.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.last();
    assert_eq!(seen.uri.path(), "/v1/models");
    assert_eq!(seen.headers["host"], upstream.addr.to_string().as_str());
}

async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    within("raw response", stream.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    // Upstream: a raw socket, so the response headers are exactly what we write.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let head = read_head(&mut s).await;
        head_tx.send(head).unwrap();
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive, X-Hop-Resp\r\nX-Hop-Resp: 1\r\n\
              Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTrailer: x-sum\r\nX-End-To-End: kept\r\nContent-Length: 2\r\n\r\nok",
        )
        .await
        .unwrap();
        let _ = s.shutdown().await;
    });
    let gw = start_gateway(
        &format!("http://{upstream_addr}/v1"),
        ForwardBuilder::default(),
    )
    .await;
    let raw = format!(
        "POST /proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {GW_KEY}\r\n\
         Connection: keep-alive, X-Hop-Req\r\nX-Hop-Req: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
         TE: trailers\r\nX-End-To-End: kept\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let seen = within("upstream request head", head_rx)
        .await
        .unwrap()
        .to_ascii_lowercase();
    for h in [
        "x-hop-req:",
        "keep-alive:",
        "proxy-connection:",
        "te:",
        "connection: keep-alive",
        "x-api-key",
        GW_KEY,
    ] {
        assert!(
            !seen.contains(&h.to_ascii_lowercase()),
            "{h} reached the upstream:\n{seen}"
        );
    }
    assert!(seen.contains("x-end-to-end: kept"), "{seen}");
    let response = read_head(&mut stream).await.to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 200"), "{response}");
    for h in [
        "x-hop-resp",
        "keep-alive:",
        "proxy-connection",
        "upgrade",
        "trailer",
    ] {
        assert!(!response.contains(h), "{h} reached the client:\n{response}");
    }
    assert!(response.contains("x-end-to-end: kept"), "{response}");
}

/// Reads up to the end of an HTTP head.
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = within("a head", s.read(&mut byte)).await.unwrap();
        assert!(
            n > 0,
            "connection closed in the head: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn assert_gateway_error(status: StatusCode, code: &str, res: &Response<Incoming>) {
    assert_eq!(res.status(), status);
    assert_eq!(res.headers()["x-gateway-error"], code);
    assert_eq!(res.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn upstream_down_is_a_502() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let gw = start_gateway(&format!("http://{dead}/v1"), ForwardBuilder::default()).await;
    let res = chat(&gw, CHAT).await;
    assert_gateway_error(StatusCode::BAD_GATEWAY, "upstream_unreachable", &res);
    let body: serde_json::Value = serde_json::from_str(&body_string(res).await).unwrap();
    assert_eq!(body["error"]["type"], "api_error");
}

#[tokio::test]
async fn upstream_silent_is_a_504() {
    let addr = silent_upstream().await;
    let gw = start_gateway(
        &format!("http://{addr}/v1"),
        ForwardBuilder::default().first_byte_timeout(Duration::from_millis(300)),
    )
    .await;
    let res = chat(&gw, CHAT).await;
    assert_gateway_error(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", &res);
}

#[tokio::test]
async fn upstream_rejecting_the_credential_is_a_502_without_its_body() {
    let upstream = RecordingUpstream::start(|_| async {
        full(
            401,
            &[("content-type", "application/json")],
            r#"{"error":"bad key up-e2e-CANARY-91c2b8d4"}"#,
        )
    })
    .await;
    let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
    let res = chat(&gw, CHAT).await;
    assert_gateway_error(StatusCode::BAD_GATEWAY, "upstream_auth_failed", &res);
    let body = body_string(res).await;
    assert!(
        !body.contains(UP_KEY) && !body.contains("bad key"),
        "{body}"
    );
}

#[tokio::test]
async fn gateway_rejections_are_json_and_never_reach_the_upstream() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "ok") }).await;
    let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
    let auth = format!("Bearer {GW_KEY}");
    let cases: Vec<(Method, String, Option<&str>, StatusCode, &str)> = vec![
        (
            Method::POST,
            format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions"),
            None,
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
        ),
        (
            Method::POST,
            format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions"),
            Some("Bearer gw-wrong"),
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
        ),
        (
            Method::GET,
            format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/%2e%2e/admin"),
            Some(&auth),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            Method::GET,
            format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/a%2fb"),
            Some(&auth),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            Method::GET,
            format!("/proxy-api/{ACCOUNT}/{ENDPOINT}//x"),
            Some(&auth),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            Method::GET,
            format!("/proxy-api/{ACCOUNT}/nope/models"),
            Some(&auth),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/proxy-api/nope/inference/models".to_owned(),
            Some(&auth),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/".to_owned(),
            Some(&auth),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::TRACE,
            format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/models"),
            Some(&auth),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (method, path, auth, status, code) in cases {
        let mut req = Request::builder().method(method.clone()).uri(gw.url(&path));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let res = respond(req.body(Full::default()).unwrap()).await;
        assert_gateway_error(status, code, &res);
        let body: serde_json::Value = serde_json::from_str(&body_string(res).await).unwrap();
        assert!(body["error"]["message"].is_string(), "{method} {path}");
    }
    // CONNECT over a raw socket (clients refuse to build one with a path).
    let raw = format!(
        "CONNECT api.inference.wandb.ai:443 HTTP/1.1\r\nHost: api.inference.wandb.ai:443\r\nAuthorization: Bearer {GW_KEY}\r\n\r\n"
    );
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert_eq!(
        upstream.count(),
        0,
        "a rejected request reached the upstream"
    );
}

#[tokio::test]
async fn an_upstream_reset_mid_stream_truncates_the_client_stream() {
    for close in ["reset", "close-chunked", "close-short-length"] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_head(&mut s).await;
            let head: &[u8] = if close == "close-short-length" {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 1000\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            };
            s.write_all(head).await.unwrap();
            let event = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
            if close == "close-short-length" {
                s.write_all(event).await.unwrap();
            } else {
                s.write_all(format!("{:x}\r\n", event.len()).as_bytes())
                    .await
                    .unwrap();
                s.write_all(event).await.unwrap();
                s.write_all(b"\r\n").await.unwrap();
            }
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            if close == "reset" {
                // Zero linger makes the close an RST; it does not block.
                #[allow(deprecated)]
                s.set_linger(Some(Duration::ZERO)).unwrap();
            }
            drop(s);
        });
        let gw = start_gateway(&format!("http://{addr}/v1"), ForwardBuilder::default()).await;
        let res = chat(&gw, CHAT_STREAM).await;
        assert_eq!(res.status(), 200);
        let mut body = res.into_body();
        let first = next_data(&mut body).await.expect("first event").unwrap();
        assert!(first.starts_with(b"data: "), "{close}");
        let rest = read_to_end(&mut body).await;
        assert!(
            rest.is_err(),
            "{close}: the client saw a clean end of a truncated stream: {rest:?}"
        );
    }
}

#[tokio::test]
async fn a_silent_upstream_mid_stream_is_cut_by_the_idle_timeout() {
    let upstream = RecordingUpstream::start(|_| async {
        let (tx, body) = ChannelBody::channel(1);
        tokio::spawn(async move {
            tx.send(Ok(Bytes::from_static(b"data: 1\n\n")))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await; // then silence
            drop(tx);
        });
        http::Response::new(MockBody::Stream(body))
    })
    .await;
    let gw = start_gateway(
        &upstream.base_url(),
        ForwardBuilder::default().idle_timeout(Duration::from_millis(300)),
    )
    .await;
    let res = chat(&gw, CHAT_STREAM).await;
    let mut body = res.into_body();
    assert_eq!(
        next_data(&mut body).await.unwrap().unwrap(),
        &b"data: 1\n\n"[..]
    );
    assert!(
        read_to_end(&mut body).await.is_err(),
        "an idle-timed-out stream must not end cleanly"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_closes_the_upstream_request() {
    let (sender_tx, mut sender_rx) = tokio::sync::mpsc::channel(1);
    let sender_tx = std::sync::Arc::new(sender_tx);
    let upstream = RecordingUpstream::start(move |_| {
        let sender_tx = sender_tx.clone();
        async move {
            let (tx, body) = ChannelBody::channel(1);
            tx.send(Ok(Bytes::from_static(b"data: first\n\n")))
                .await
                .unwrap();
            sender_tx.send(tx).await.unwrap();
            http::Response::new(MockBody::Stream(body))
        }
    })
    .await;
    let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
    let client = client();
    let res = client
        .request(post_json(gw.proxy_url("/chat/completions"), CHAT_STREAM))
        .await
        .unwrap();
    let upstream_tx = within("upstream stream", sender_rx.recv()).await.unwrap();
    let mut body = res.into_body();
    assert_eq!(
        next_data(&mut body).await.unwrap().unwrap(),
        &b"data: first\n\n"[..]
    );
    // The client goes away mid-stream.
    drop(body);
    drop(client);
    // The upstream's response body is dropped when its connection closes.
    within("the upstream to see the client leave", upstream_tx.closed()).await;
}

#[tokio::test]
async fn an_encoded_upstream_body_keeps_its_content_encoding() {
    let gz: &'static [u8] = &[
        0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xcb, 0x48, 0xcd, 0xc9, 0xc9, 7, 0, 0x86, 0xa6, 0x10,
        0x36, 5, 0, 0, 0,
    ];
    let upstream = RecordingUpstream::start(move |_| async move {
        let mut res = http::Response::new(MockBody::Full(Some(Bytes::from_static(gz))));
        res.headers_mut()
            .insert("content-encoding", "gzip".parse().unwrap());
        res.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        res
    })
    .await;
    let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
    let req = keyed(Method::GET, &gw, "/models")
        .header("accept-encoding", "gzip")
        .body(Full::default())
        .unwrap();
    let res = respond(req).await;
    assert_eq!(upstream.last().headers["accept-encoding"], "identity");
    assert_eq!(res.headers()["content-encoding"], "gzip");
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), gz);
}

#[tokio::test]
async fn a_large_request_body_streams_to_the_upstream() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "ok") }).await;
    let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
    let (tx, body) = ChannelBody::channel(2);
    let producer = tokio::spawn(async move {
        for _ in 0..256 {
            tx.send(Ok(Bytes::from(vec![b'x'; 16 * 1024])))
                .await
                .unwrap();
        }
    });
    let req = keyed(Method::POST, &gw, "/files").body(body).unwrap();
    let client = streaming_client();
    let res = within("response", client.request(req)).await.unwrap();
    producer.await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(upstream.last().body_len, 256 * 16 * 1024);
}

#[tokio::test]
async fn a_registry_swap_leaves_streams_in_flight_intact() {
    let (mock, gw) = mock_gateway(Duration::from_millis(20)).await;
    let res = chat(&gw, CHAT_STREAM).await;
    let mut body = res.into_body();
    next_data(&mut body).await.unwrap().unwrap();
    gw.gateway.registry().store(Registry::default());
    let rest = String::from_utf8(read_to_end(&mut body).await.unwrap()).unwrap();
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let res = chat(&gw, CHAT).await;
    assert_eq!(res.status(), 404);
    assert_eq!(mock.requests(), 1);
}

#[tokio::test]
async fn http2_clients_are_served_too() {
    let (_mock, gw) = mock_gateway(Duration::ZERO).await;
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let res = within(
        "h2 response",
        h2.request(post_json(gw.proxy_url("/chat/completions"), CHAT_STREAM)),
    )
    .await
    .unwrap();
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    let text = String::from_utf8(read_to_end(&mut res.into_body()).await.unwrap()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
}

/// The server tells HTTP/2 from HTTP/1.1 by the connection's first bytes; a client whose
/// first packet holds only the start of the HTTP/2 preface is still served HTTP/2.
#[tokio::test]
async fn an_http2_preface_split_across_packets_is_still_http2() {
    const SENT_FIRST: usize = 9; // "PRI * HTT"
    let (_mock, gw) = mock_gateway(Duration::ZERO).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .write_all(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..SENT_FIRST])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let io = hyper_util::rt::TokioIo::new(SkipWritten {
        inner: stream,
        skip: SENT_FIRST,
    });
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = within(
        "h2 response",
        send.send_request(post_json(gw.proxy_url("/chat/completions"), CHAT_STREAM)),
    )
    .await
    .unwrap();
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    let text = String::from_utf8(read_to_end(&mut res.into_body()).await.unwrap()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

/// An HTTP/1.1 request whose first packet is a lone `P` (which could start the HTTP/2
/// preface) is served as HTTP/1.1 once the rest arrives.
#[tokio::test]
async fn an_http1_request_that_starts_like_the_http2_preface_is_http1() {
    let (_mock, gw) = mock_gateway(Duration::ZERO).await;
    let request = format!(
        "POST /proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions HTTP/1.1\r\nHost: gw\r\n\
         Authorization: Bearer {GW_KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{CHAT}",
        CHAT.len()
    );
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(&request.as_bytes()[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(&request.as_bytes()[1..]).await.unwrap();
    let mut out = Vec::new();
    within("raw response", stream.read_to_end(&mut out))
        .await
        .unwrap();
    let response = String::from_utf8_lossy(&out);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

/// A connection that has sent nothing does not hold shutdown up for the grace period.
#[tokio::test]
async fn shutdown_does_not_wait_for_connections_that_sent_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tower_gateway::server::serve_with_grace(
        listener,
        tower_gateway::gateway::Gateway::builder().build().service(),
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(3600),
    ));
    let _silent = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.send(()).unwrap();
    within("shutdown", server).await.unwrap().unwrap();
}

/// A connection that sends nothing, or stops halfway through its request head, is closed once
/// the header-read timeout has passed (slowloris). Time is paused, so the 30 s pass at once.
#[tokio::test(start_paused = true)]
async fn a_silent_or_stalled_connection_is_closed_after_the_header_timeout() {
    use tower_gateway::server::HEADER_READ_TIMEOUT;
    let (_mock, gw) = mock_gateway(Duration::ZERO).await;
    for sent in [&b""[..], b"POST /proxy-api/a/b HTTP/1.1\r\nHost: gw\r\n"] {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut out = Vec::new();
        // Ends (EOF or reset) only when the gateway closes the connection.
        let closed =
            tokio::time::timeout(2 * HEADER_READ_TIMEOUT, stream.read_to_end(&mut out)).await;
        assert!(closed.is_ok(), "still open having sent {sent:?}");
        assert!(
            start.elapsed() >= HEADER_READ_TIMEOUT,
            "closed after {:?} having sent {sent:?}",
            start.elapsed()
        );
        assert!(
            out.is_empty() || String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
}

/// Pretends to write the first `skip` bytes (the test sent them itself), then writes through.
struct SkipWritten {
    inner: TcpStream,
    skip: usize,
}

impl tokio::io::AsyncRead for SkipWritten {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SkipWritten {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            self.skip -= n;
            return std::task::Poll::Ready(Ok(n));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A client's `Connection` header may name hop-by-hop headers of its own, but never strip
/// what the gateway guarantees: the injected credential and `Accept-Encoding: identity`.
#[tokio::test]
async fn connection_cannot_strip_the_injected_credential() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "ok") }).await;
    let gw = start_gateway(&upstream.base_url(), ForwardBuilder::default()).await;
    let raw = format!(
        "GET /proxy-api/{ACCOUNT}/{ENDPOINT}/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {GW_KEY}\r\n\
         Accept-Encoding: gzip\r\nX-Own-Hop: 1\r\nConnection: close, authorization, accept-encoding, x-own-hop\r\n\r\n"
    );
    let response = raw_exchange(gw.addr, raw.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.last();
    let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auth, [format!("Bearer {UP_KEY}").as_str()]);
    assert_eq!(seen.headers["accept-encoding"], "identity");
    assert!(seen.headers.get("x-own-hop").is_none());
}

/// An upstream cannot separate a body from its `Content-Encoding` with `Connection`, nor pose
/// as the gateway with `x-gateway-error`.
#[tokio::test]
async fn upstream_connection_cannot_strip_content_encoding() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read_head(&mut s).await;
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: application/json\r\nX-Gateway-Error: fake\r\n\
              Connection: close, content-encoding, content-length\r\nContent-Length: 3\r\n\r\n\x1f\x8b\x08",
        )
        .await
        .unwrap();
        let _ = s.shutdown().await;
    });
    let gw = start_gateway(&format!("http://{addr}/v1"), ForwardBuilder::default()).await;
    let req = keyed(Method::GET, &gw, "/models")
        .body(Full::default())
        .unwrap();
    let res = respond(req).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-encoding"], "gzip");
    assert!(res.headers().get("x-gateway-error").is_none());
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        &b"\x1f\x8b\x08"[..]
    );
}

#[tokio::test]
async fn request_bodies_over_the_limit_are_refused() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "ok") }).await;
    let gw = start_gateway(
        &upstream.base_url(),
        ForwardBuilder::default().max_request_body(1024),
    )
    .await;
    // Declared too large: refused before the upstream is contacted.
    let req = keyed(Method::POST, &gw, "/chat/completions")
        .body(Full::from(vec![b'x'; 4096]))
        .unwrap();
    let res = respond(req).await;
    assert_gateway_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", &res);
    assert_eq!(upstream.count(), 0);
    // Streamed without a length and growing past the limit: cut, and a 413.
    let (tx, body) = ChannelBody::channel(4);
    tokio::spawn(async move {
        for _ in 0..8 {
            if tx.send(Ok(Bytes::from(vec![b'x'; 512]))).await.is_err() {
                break;
            }
        }
    });
    let req = keyed(Method::POST, &gw, "/chat/completions")
        .body(body)
        .unwrap();
    let streaming = streaming_client();
    let res = within("response", streaming.request(req)).await.unwrap();
    assert_gateway_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", &res);
    // Within the limit: forwarded.
    let res = chat(&gw, CHAT).await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_uri_that_would_grow_too_long_is_a_414() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "ok") }).await;
    // The base path is longer than the `/proxy-api/{account}/{endpoint}` it replaces, so a
    // target just under the URI limit grows past it.
    let base = format!(
        "http://{}/openai/deployments/gpt-4o-prod-east-us-2/extensions/v1",
        upstream.addr
    );
    let gw = start_gateway(&base, ForwardBuilder::default()).await;
    let query = "q".repeat(65_480);
    let raw = format!(
        "GET /proxy-api/{ACCOUNT}/{ENDPOINT}/models?{query} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {GW_KEY}\r\nConnection: close\r\n\r\n"
    );
    let response = raw_exchange(gw.addr, raw.as_bytes()).await;
    assert!(
        response.starts_with("HTTP/1.1 414"),
        "{}",
        &response[..response.len().min(200)]
    );
    assert!(
        response
            .to_ascii_lowercase()
            .contains("x-gateway-error: uri_too_long")
    );
    assert_eq!(upstream.count(), 0);
}

/// The request body streams too: an upstream that echoes each request frame as it arrives,
/// and a client that sends frame N+1 only after it got frame N back.
#[tokio::test]
async fn request_and_response_bodies_stream_in_lockstep() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
            // The response body is the request body, frame by frame.
            Ok::<_, std::convert::Infallible>(http::Response::new(req.into_body()))
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await;
    });
    let gw = start_gateway(&format!("http://{addr}/v1"), ForwardBuilder::default()).await;
    let (tx, body) = ChannelBody::channel(1);
    let req = keyed(Method::POST, &gw, "/echo").body(body).unwrap();
    let streaming = streaming_client();
    let first = Bytes::from_static(b"frame-0;");
    tx.send(Ok(first.clone())).await.unwrap();
    let res = within("response head", streaming.request(req))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    assert_eq!(next_data(&mut body).await.unwrap().unwrap(), first);
    for i in 1..10 {
        let frame = Bytes::from(format!("frame-{i};"));
        tx.send(Ok(frame.clone())).await.unwrap();
        assert_eq!(
            next_data(&mut body).await.unwrap().unwrap(),
            frame,
            "frame {i}"
        );
    }
    drop(tx);
    assert!(next_data(&mut body).await.is_none());
}

#[tokio::test]
async fn cookies_pass_only_when_configured() {
    for pass in [false, true] {
        let upstream = RecordingUpstream::start(|_| async {
            full(200, &[("set-cookie", "session=up; Path=/")], "ok")
        })
        .await;
        let gw = start_gateway(
            &upstream.base_url(),
            ForwardBuilder::default().pass_cookies(pass),
        )
        .await;
        let req = keyed(Method::GET, &gw, "/models")
            .header("cookie", "gateway_session=abc")
            .body(Full::default())
            .unwrap();
        let res = respond(req).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers().contains_key("set-cookie"), pass);
        assert_eq!(upstream.last().headers.contains_key("cookie"), pass);
    }
}

#[tokio::test]
async fn the_config_files_body_limit_applies_and_cannot_change_on_reload() {
    use tower_gateway::config::{GatewayConfig, SecretSource};
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "ok") }).await;
    let toml = |limit: u64| {
        format!(
            "[limits]\nmax_request_body_bytes = {limit}\n[[keys]]\nid = \"k\"\nsubject = \"s\"\nkey = \"{GW_KEY}\"\n\
             [[accounts]]\nname = \"{ACCOUNT}\"\naccess = {{ users = [\"everyone\"] }}\n\
             [[accounts.endpoints]]\nname = \"{ENDPOINT}\"\nbase_url = \"{}\"\n",
            upstream.base_url()
        )
    };
    let secrets = SecretSource::from_vars(Vec::<(String, String)>::new(), std::env::temp_dir());
    let config = GatewayConfig::from_toml(&toml(1024), &secrets).unwrap();
    let gateway = tower_gateway::gateway::Gateway::builder()
        .config(config)
        .forward(ForwardBuilder::default())
        .build();
    let gw = serve_gateway(gateway).await;
    let req = keyed(Method::POST, &gw, "/chat/completions")
        .body(Full::from(vec![b'x'; 2048]))
        .unwrap();
    let res = respond(req).await;
    assert_gateway_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", &res);
    assert_eq!(upstream.count(), 0);
    let err = gw
        .gateway
        .apply(GatewayConfig::from_toml(&toml(4096), &secrets).unwrap())
        .unwrap_err();
    assert_eq!(err.field(), "limits.max_request_body_bytes");
    gw.gateway
        .apply(GatewayConfig::from_toml(&toml(1024), &secrets).unwrap())
        .unwrap();
}

/// The connect timeout covers the TLS handshake: an upstream that accepts TCP and then says
/// nothing is unreachable after `connect`, not a 504 after the (much longer) first-byte timeout.
#[tokio::test]
async fn a_silent_tls_handshake_is_bounded_by_the_connect_timeout() {
    let addr = silent_upstream().await; // accepts, never answers the ClientHello
    let gw = start_gateway(
        &format!("https://{addr}/v1"),
        ForwardBuilder::default()
            .connect_timeout(Duration::from_millis(300))
            .first_byte_timeout(Duration::from_secs(20)),
    )
    .await;
    let started = std::time::Instant::now();
    let res = chat(&gw, CHAT).await;
    assert_gateway_error(StatusCode::BAD_GATEWAY, "upstream_unreachable", &res);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// A client whose upload stalls past the idle timeout gets a 408, and the upstream never
/// receives a complete request.
#[tokio::test]
async fn a_stalled_request_body_is_a_408() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "ok") }).await;
    let gw = start_gateway(
        &upstream.base_url(),
        ForwardBuilder::default().idle_timeout(Duration::from_millis(300)),
    )
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {GW_KEY}\r\nContent-Length: 100\r\n\r\n{{\"model\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let response = read_head(&mut stream).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("x-gateway-error: request_body_timeout"),
        "{response}"
    );
    assert!(
        upstream
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.body_len < 100)
    );
}
