//! An in-process mock of W&B Inference, an OpenAI-compatible API: `GET /v1/models` and
//! `POST /v1/chat/completions`, streaming (SSE) and not. It requires its own API key, so a
//! successful call through the gateway proves the gateway injected the upstream credential.
//!
//! Shared by the demo (`examples/gateway.rs`) and the tests, which include this file with
//! `#[path]`.

#![allow(dead_code)]

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Models the mock lists, named like W&B Inference's.
pub const MODELS: &[&str] = &[
    "meta-llama/Llama-3.1-8B-Instruct",
    "deepseek-ai/DeepSeek-V3-0324",
    "Qwen/Qwen3-235B-A22B-Instruct-2507",
];

/// A response body fed from a channel: each message is one frame, sent as soon as it arrives.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
}

impl ChannelBody {
    /// A body and the sender that feeds it. Dropping the sender ends the body cleanly;
    /// sending an `Err` ends it with an error.
    pub fn channel(capacity: usize) -> (mpsc::Sender<Result<Bytes, io::Error>>, Self) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Self { rx })
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx).map(|m| m.map(|r| r.map(Frame::data)))
    }
}

/// Either a whole body or a channel-fed stream.
pub enum MockBody {
    Full(Option<Bytes>),
    Stream(ChannelBody),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            MockBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            MockBody::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }
}

/// The mock upstream's settings.
#[derive(Clone)]
pub struct MockUpstream {
    key: Arc<str>,
    token_delay: Duration,
    requests: Arc<AtomicUsize>,
}

impl MockUpstream {
    /// A mock that requires `Authorization: Bearer {key}` and waits `token_delay` between
    /// streamed events.
    pub fn new(key: &str, token_delay: Duration) -> Self {
        Self {
            key: key.into(),
            token_delay,
            requests: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many requests reached the mock.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Binds `127.0.0.1:0` and serves in the background; returns the address.
    pub async fn spawn(&self) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mock = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let mock = mock.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let mock = mock.clone();
                        async move { Ok::<_, Infallible>(mock.handle(req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(addr)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<MockBody> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let authorized = req
            .headers()
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == format!("Bearer {}", self.key).as_bytes());
        if !authorized {
            return json_response(
                StatusCode::UNAUTHORIZED,
                json!({"error": {"message": "Invalid API key", "type": "authentication_error", "code": "invalid_api_key"}}),
            );
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/v1/models") => json_response(
                StatusCode::OK,
                json!({
                    "object": "list",
                    "data": MODELS.iter().map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "wandb"})).collect::<Vec<_>>(),
                }),
            ),
            (&Method::POST, "/v1/chat/completions") => {
                let Ok(body) = req.into_body().collect().await else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        json!({"error": {"message": "unreadable body", "type": "invalid_request_error"}}),
                    );
                };
                let Ok(request) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        json!({"error": {"message": "body is not JSON", "type": "invalid_request_error"}}),
                    );
                };
                self.chat(&request)
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": {"message": "no such route on the mock upstream", "type": "invalid_request_error"}}),
            ),
        }
    }

    fn chat(&self, request: &Value) -> Response<MockBody> {
        let model = request["model"].as_str().unwrap_or(MODELS[0]).to_owned();
        let said = request["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or("nothing");
        let reply = format!("Hello from the mock W&B Inference upstream! You said: {said}");
        let words: Vec<String> = reply.split_inclusive(' ').map(str::to_owned).collect();
        let prompt_tokens = said.split_whitespace().count() as u64 + 8;
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": words.len(), "total_tokens": prompt_tokens + words.len() as u64});
        let id = "chatcmpl-mock-0001";
        let created = 1_700_000_000u64;
        if request["stream"] != true {
            return json_response(
                StatusCode::OK,
                json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                    "usage": usage,
                }),
            );
        }
        let include_usage = request["stream_options"]["include_usage"] == true;
        let (tx, body) = ChannelBody::channel(4);
        let delay = self.token_delay;
        tokio::spawn(async move {
            let chunk = |delta: Value, finish: Value| {
                let v = json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                });
                Bytes::from(format!("data: {v}\n\n"))
            };
            let mut events = vec![chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )];
            events.extend(
                words
                    .iter()
                    .map(|w| chunk(json!({"content": w}), Value::Null)),
            );
            events.push(chunk(json!({}), json!("stop")));
            if include_usage {
                let v = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage});
                events.push(Bytes::from(format!("data: {v}\n\n")));
            }
            events.push(Bytes::from_static(b"data: [DONE]\n\n"));
            for event in events {
                if tx.send(Ok(event)).await.is_err() {
                    return; // the client went away
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
        });
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(MockBody::Stream(body))
            .expect("static response parts")
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(MockBody::Full(Some(Bytes::from(body.to_string()))))
        .expect("static response parts")
}
