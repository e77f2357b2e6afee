//! Spans, usage records, metrics and request ids through the full stack, over loopback: a
//! real upstream, the real gateway on a real hyper server, a real client.
//!
//! Every test runs on a `current_thread` runtime, so every server and client task runs on the
//! test thread, where [`watch`] installs a capturing subscriber ([`Capture`], set with
//! `tracing::subscriber::set_default`) and a metrics recorder
//! (`metrics::set_default_local_recorder`) before anything is spawned.

mod scripted;
mod support;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde_json::Value;
use tower_gateway::auth::{HashedKeyStore, Principal};
use tower_gateway::gateway::{Gateway, GatewayBuilder};
use tower_gateway::usage::{Outcome, Usage, UsageTapLayer, metric};
use tracing::field::{Field, Visit};
use tracing::span;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use support::*;

/// Bob's gateway key (Alice's is `GW_KEY`): a canary too.
const BOB_KEY: &str = "gw-trace-CANARY-b0b5e3c7";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const SPAN: &str = "gateway.request";

// ---------------------------------------------------------------------------------------------
// A subscriber layer that keeps every closed span and every event, with their fields.

type Fields = BTreeMap<String, Value>;

#[derive(Clone, Debug)]
struct SpanRecord {
    /// Unique in a test (span ids are reused once a span closes).
    serial: u64,
    name: &'static str,
    target: String,
    fields: Fields,
}

#[derive(Clone, Debug)]
struct EventRecord {
    target: String,
    fields: Fields,
    /// The serial of the span the event happened in.
    parent: Option<u64>,
}

trait FieldsExt {
    fn fields(&self) -> &Fields;

    fn has(&self, name: &str) -> bool {
        self.fields().contains_key(name)
    }

    fn str(&self, name: &str) -> Option<&str> {
        self.fields().get(name).and_then(Value::as_str)
    }

    fn u64(&self, name: &str) -> Option<u64> {
        self.fields().get(name).and_then(Value::as_u64)
    }

    fn f64(&self, name: &str) -> Option<f64> {
        self.fields().get(name).and_then(Value::as_f64)
    }
}

impl FieldsExt for SpanRecord {
    fn fields(&self) -> &Fields {
        &self.fields
    }
}

impl FieldsExt for EventRecord {
    fn fields(&self) -> &Fields {
        &self.fields
    }
}

#[derive(Default)]
struct Captured {
    closed: Vec<SpanRecord>,
    events: Vec<EventRecord>,
    next_serial: u64,
}

/// The open span's fields, kept in the registry's extensions.
struct Open {
    serial: u64,
    fields: Fields,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Captured>>);

impl Capture {
    fn closed(&self) -> Vec<SpanRecord> {
        self.0.lock().unwrap().closed.clone()
    }

    fn events(&self) -> Vec<EventRecord> {
        self.0.lock().unwrap().events.clone()
    }

    /// The closed `gateway.request` spans.
    fn requests(&self) -> Vec<SpanRecord> {
        self.closed()
            .into_iter()
            .filter(|s| s.name == SPAN)
            .collect()
    }

    /// Waits (boundedly) until `n` request spans have closed, and returns them.
    async fn wait_requests(&self, n: usize) -> Vec<SpanRecord> {
        within("the request spans to close", async {
            loop {
                let spans = self.requests();
                if spans.len() >= n {
                    return spans;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
    }

    /// Waits for exactly one request span to close and returns it.
    async fn one_request(&self) -> SpanRecord {
        let mut spans = self.wait_requests(1).await;
        assert_eq!(spans.len(), 1, "one span per request: {spans:#?}");
        let span = spans.remove(0);
        assert_eq!(span.target, "tower_gateway::trace");
        span
    }

    /// The usage events (target `tower_gateway::usage`) inside `span`.
    fn usage_events_in(&self, span: &SpanRecord) -> Vec<EventRecord> {
        self.events()
            .into_iter()
            .filter(|e| e.target == "tower_gateway::usage" && e.parent == Some(span.serial))
            .collect()
    }

    fn usage_events(&self) -> Vec<EventRecord> {
        self.events()
            .into_iter()
            .filter(|e| e.target == "tower_gateway::usage")
            .collect()
    }

    /// Every name and value the subscriber saw, for the secret scan.
    fn all_text(&self) -> String {
        let c = self.0.lock().unwrap();
        let mut out = String::new();
        let mut push = |fields: &Fields| {
            for (k, v) in fields {
                out.push_str(&format!("{k}={v}\n"));
            }
        };
        for s in &c.closed {
            push(&s.fields);
        }
        for e in &c.events {
            push(&e.fields);
        }
        out
    }
}

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The whole chain: a secret hiding in a source must show up in the scan.
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(e) = source {
            text.push_str(&format!(": {e}"));
            source = e.source();
        }
        self.0.insert(field.name().to_owned(), Value::String(text));
    }
}

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        let serial = {
            let mut c = self.0.lock().unwrap();
            c.next_serial += 1;
            c.next_serial
        };
        let span = ctx.span(id).expect("a new span is in the registry");
        span.extensions_mut().insert(Open { serial, fields });
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(open) = span.extensions_mut().get_mut::<Open>()
        {
            values.record(&mut Visitor(&mut open.fields));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut Visitor(&mut fields));
        let parent = ctx
            .event_span(event)
            .and_then(|s| s.extensions().get::<Open>().map(|o| o.serial));
        self.0.lock().unwrap().events.push(EventRecord {
            target: event.metadata().target().to_owned(),
            fields,
            parent,
        });
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        self.0.lock().unwrap().closed.push(SpanRecord {
            serial: open.serial,
            name: span.name(),
            target: span.metadata().target().to_owned(),
            fields: open.fields,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics: one (destructive) snapshot of a `DebuggingRecorder`.

type Labels = Vec<(String, String)>;

/// `(name, labels, value)` of every metric recorded.
struct Metrics(Vec<(String, Labels, DebugValue)>);

impl Metrics {
    fn take(snapshotter: &Snapshotter) -> Self {
        Self(
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, _, _, value)| {
                    let key = key.key();
                    let labels = key
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect();
                    (key.name().to_owned(), labels, value)
                })
                .collect(),
        )
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a DebugValue> + 'a {
        self.0.iter().filter_map(move |(n, ls, v)| {
            let all = labels
                .iter()
                .all(|(k, want)| ls.iter().any(|(lk, lv)| lk == k && lv == want));
            (n == name && all).then_some(v)
        })
    }

    /// The sum of the counters `name` whose labels include `labels`.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels)
            .map(|v| match v {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }

    /// The values recorded in the histograms `name` whose labels include `labels`.
    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.matching(name, labels)
            .flat_map(|v| match v {
                DebugValue::Histogram(xs) => xs.iter().map(|x| x.into_inner()).collect::<Vec<_>>(),
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .collect()
    }

    fn text(&self) -> String {
        format!("{:?}", self.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Both, installed on the test thread in one call.

/// The test thread's subscriber and recorder, from [`watch`]; both are uninstalled when it drops.
struct Watching {
    snapshotter: Snapshotter,
    _trace: tracing::subscriber::DefaultGuard,
    _metrics: metrics::LocalRecorderGuard<'static>,
}

impl Watching {
    /// What has been counted since the last call (the snapshot is destructive).
    fn metrics(&self) -> Metrics {
        Metrics::take(&self.snapshotter)
    }
}

/// Installs a [`Capture`] as the thread's subscriber and a `DebuggingRecorder` as its metrics
/// recorder, until the returned [`Watching`] drops.
fn watch() -> (Capture, Watching) {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let _trace = tracing::subscriber::set_default(subscriber);
    // Leaked (one small recorder a test) so that its guard can live beside the snapshotter.
    let recorder: &'static DebuggingRecorder = Box::leak(Box::new(DebuggingRecorder::new()));
    let watching = Watching {
        snapshotter: recorder.snapshotter(),
        _trace,
        _metrics: metrics::set_default_local_recorder(recorder),
    };
    (capture, watching)
}

// ---------------------------------------------------------------------------------------------
// The gateway under test and the calls.

fn alice() -> Principal {
    Principal::new("alice-laptop", "alice@example.com", ["research"])
}

fn bob() -> Principal {
    Principal::new("bob-ci", "bob@example.com", ["platform", "ops"])
}

/// A gateway with Alice (`GW_KEY`) and Bob (`BOB_KEY`), one endpoint at `base_url` that injects
/// `Authorization: Bearer UP_KEY` ([`one_endpoint_registry`]), and `usage` as its tap.
fn builder(base_url: &str, usage: UsageTapLayer) -> GatewayBuilder {
    let keys = HashedKeyStore::new()
        .with_key(GW_KEY, alice())
        .unwrap()
        .with_key(BOB_KEY, bob())
        .unwrap();
    Gateway::builder()
        .keys(keys)
        .registry(one_endpoint_registry(base_url).into())
        .usage(usage)
}

/// Serves the [`builder`] gateway as it is.
async fn serve(base_url: &str, usage: UsageTapLayer) -> TestGateway {
    serve_gateway(builder(base_url, usage).build()).await
}

/// The mock W&B Inference upstream (it wants `UP_KEY`), serving in the background: its base URL.
async fn mock_upstream() -> String {
    let addr = MockUpstream::new(UP_KEY, Duration::ZERO)
        .spawn()
        .await
        .unwrap();
    format!("http://{addr}/v1")
}

/// A sink that keeps the records, and the tap that feeds it.
fn collecting_tap() -> (UsageTapLayer, Arc<Mutex<Vec<Usage>>>) {
    let records = Arc::new(Mutex::new(Vec::new()));
    let sink = records.clone();
    let tap = UsageTapLayer::new().sink(move |u: Usage| sink.lock().unwrap().push(u));
    (tap, records)
}

async fn wait_records(records: &Arc<Mutex<Vec<Usage>>>, n: usize) -> Vec<Usage> {
    within("the usage records", async {
        loop {
            let got = records.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

/// A `POST` with `key` (if any), a JSON body and `x-request-id`s (if any).
fn post(uri: Uri, key: Option<&str>, json: &str, request_ids: &[&str]) -> Request<Full<Bytes>> {
    let mut req = Request::post(uri).header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    for id in request_ids {
        req = req.header("x-request-id", *id);
    }
    req.body(Full::from(json.to_owned())).unwrap()
}

/// The [`post`] of a chat completion through `gw`.
fn chat(
    gw: &TestGateway,
    key: Option<&str>,
    json: &str,
    request_ids: &[&str],
) -> Request<Full<Bytes>> {
    post(gw.proxy_url("/chat/completions"), key, json, request_ids)
}

fn chat_body(model: &str, said: &str, stream: bool, ask_usage: bool) -> String {
    let mut v = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": said}],
    });
    if stream {
        v["stream"] = true.into();
    }
    if ask_usage {
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    v.to_string()
}

/// Sends `req` and waits for the head of the answer; the body is left to the caller.
async fn head(req: Request<Full<Bytes>>) -> Response<Incoming> {
    within("a response head", client().request(req))
        .await
        .unwrap()
}

/// Sends `req`, reads the whole answer: its head and `Ok(body)`, or `Err` if the body was cut.
async fn call(req: Request<Full<Bytes>>) -> (http::response::Parts, Result<Vec<u8>, hyper::Error>) {
    let (parts, mut body) = head(req).await.into_parts();
    let body = read_to_end(&mut body).await;
    (parts, body)
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &[u8]) -> Vec<String> {
    std::str::from_utf8(body)
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

/// `(prompt_tokens, completion_tokens)` of an OpenAI `usage` object.
fn tokens(usage: &Value) -> (u64, u64) {
    (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    )
}

/// The client's usage: from a JSON completion, or from the usage-only event of a stream.
fn client_usage(body: &[u8]) -> (u64, u64) {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return tokens(&v["usage"]);
    }
    let usage = sse_data(body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|v| v["usage"].is_object())
        .expect("the stream carries its usage");
    tokens(&usage["usage"])
}

fn is_gateway_id(v: &HeaderValue) -> bool {
    v.len() == 32 && v.as_bytes().iter().all(u8::is_ascii_hexdigit)
}

/// No canary key reaches a span field, an event field, or a metric label.
fn assert_no_secret(capture: &Capture, metrics: Option<&Metrics>) {
    let mut seen = capture.all_text();
    if let Some(m) = metrics {
        seen.push_str(&m.text());
    }
    for key in [GW_KEY, UP_KEY, BOB_KEY] {
        assert!(!seen.contains(key), "{key} leaked into:\n{seen}");
    }
    // Nor a recognisable piece of one.
    assert!(!seen.contains("CANARY"), "a key leaked into:\n{seen}");
}

/// The base URL of an upstream that is gone: a listener address nothing listens on any more.
async fn dead_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}/v1", listener.local_addr().unwrap())
}

/// A JSON answer with extra headers, for `RecordingUpstream`.
fn json_answer(status: u16, headers: &[(&str, String)], body: &str) -> Response<MockBody> {
    let mut res = Response::new(MockBody::Full(Some(Bytes::from(body.to_owned()))));
    *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
    res.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    for (name, value) in headers {
        res.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    res
}

// ---------------------------------------------------------------------------------------------
// 1. A streamed chat completion: one span with everything, one usage event.

#[tokio::test(flavor = "current_thread")]
async fn streamed_completion_makes_one_span_with_every_field_and_one_usage_event() {
    let (capture, watching) = watch();

    let (upstream, mut feeds) = sse_upstream().await;
    let gw = serve(&upstream.base_url(), UsageTapLayer::new()).await;

    let body = chat_body(MODEL, "Say hello", true, false);
    let res = head(chat(&gw, Some(GW_KEY), &body, &[])).await;
    assert_eq!(res.status(), 200);
    let client_id = res.headers()["x-request-id"].clone();
    assert!(is_gateway_id(&client_id), "{client_id:?}");

    let (path, events) = within("the upstream stream", feeds.recv()).await.unwrap();
    assert_eq!(path, "/v1/chat/completions");
    // The served model differs from the requested one, to tell them apart.
    for event in [
        r#"data: {"id":"c1","model":"llama-3.1-8b-served","choices":[{"delta":{"content":"Hi"}}]}"#,
        r#"data: {"id":"c1","model":"llama-3.1-8b-served","choices":[{"delta":{"content":" there"}}]}"#,
        r#"data: {"id":"c1","model":"llama-3.1-8b-served","choices":[],"usage":{"prompt_tokens":17,"completion_tokens":2,"total_tokens":19}}"#,
        "data: [DONE]",
    ] {
        events
            .send(Ok(Bytes::from(format!("{event}\n\n"))))
            .await
            .unwrap();
    }
    drop(events);
    let mut body = res.into_body();
    let received = read_to_end(&mut body).await.unwrap();
    assert!(received.ends_with(b"data: [DONE]\n\n"));
    drop(body);

    let span = capture.one_request().await;
    let f = |name| {
        span.str(name)
            .unwrap_or_else(|| panic!("{name} missing: {span:#?}"))
    };
    assert_eq!(f("request_id"), client_id.to_str().unwrap());
    assert_eq!(
        upstream.last().headers["x-request-id"],
        client_id,
        "the upstream saw the id the client got back"
    );
    assert_eq!(f("service"), "proxy");
    assert_eq!(f("http.request.method"), "POST");
    assert_eq!(f("gateway.key_id"), "alice-laptop");
    assert_eq!(f("gateway.subject"), "alice@example.com");
    assert_eq!(f("gateway.account"), ACCOUNT);
    assert_eq!(f("gateway.endpoint"), ENDPOINT);
    assert_eq!(f("gateway.upstream_path"), "/chat/completions");
    assert_eq!(f("gen_ai.operation.name"), "chat");
    assert_eq!(f("gen_ai.request.model"), MODEL);
    assert_eq!(f("gen_ai.response.model"), "llama-3.1-8b-served");
    assert_eq!(f("gateway.response_source"), "upstream");
    assert_eq!(f("gateway.outcome"), "complete");
    assert_eq!(span.u64("http.response.status_code"), Some(200));
    assert_eq!(span.u64("gen_ai.usage.input_tokens"), Some(17));
    assert_eq!(span.u64("gen_ai.usage.output_tokens"), Some(2));
    let ttfb = span.f64("gateway.time_to_first_byte_ms").expect("ttfb");
    let duration = span.f64("gateway.duration_ms").expect("duration");
    let latency = span.f64("gateway.latency_ms").expect("latency");
    assert!(
        ttfb >= 0.0 && ttfb <= duration,
        "ttfb {ttfb} > duration {duration}"
    );
    assert!(latency >= 0.0);
    assert_eq!(
        span.u64("http.request.body.size"),
        Some(chat_body(MODEL, "Say hello", true, false).len() as u64)
    );
    assert_eq!(
        span.u64("http.response.body.size"),
        Some(received.len() as u64),
        "the bytes the client received"
    );
    assert!(
        !span.has("error.type") && !span.has("error.message"),
        "{span:#?}"
    );
    assert!(!span.has("gateway.upstream_request_id"));

    let usage = capture.usage_events_in(&span);
    assert_eq!(usage.len(), 1, "one usage event inside the span");
    assert_eq!(capture.usage_events().len(), 1, "and none elsewhere");
    let u = &usage[0];
    assert_eq!(u.u64("gen_ai.usage.input_tokens"), Some(17));
    assert_eq!(u.u64("gen_ai.usage.output_tokens"), Some(2));
    assert_eq!(u.str("gen_ai.response.model"), Some("llama-3.1-8b-served"));
    assert_eq!(u.str("key_id"), Some("alice-laptop"));
    assert_eq!(u.str("subject"), Some("alice@example.com"));
    assert_eq!(u.str("account"), Some(ACCOUNT));
    assert_eq!(u.str("endpoint"), Some(ENDPOINT));
    assert_eq!(u.str("request_id"), client_id.to_str().ok());
    assert_eq!(u.str("outcome"), Some("complete"));
    assert_eq!(u.u64("status"), Some(200));
    assert_eq!(u.u64("response_bytes"), Some(received.len() as u64));

    let m = watching.metrics();
    let labels = [
        ("status", "200"),
        ("source", "upstream"),
        ("service", "proxy"),
    ];
    assert_eq!(m.counter(metric::REQUESTS, &labels), 1);
    assert_eq!(m.counter(metric::ERRORS, &[]), 0);
    let route = [("account", ACCOUNT), ("endpoint", ENDPOINT)];
    let input = [route[0], route[1], ("team", "research"), ("type", "input")];
    let output = [route[0], route[1], ("team", "research"), ("type", "output")];
    assert_eq!(m.counter(metric::TOKENS, &input), 17);
    assert_eq!(m.counter(metric::TOKENS, &output), 2);
    let complete = [
        route[0],
        route[1],
        ("status", "200"),
        ("outcome", "complete"),
    ];
    assert_eq!(m.counter(metric::UPSTREAM_RESPONSES, &complete), 1);
    assert_eq!(m.histogram(metric::TIME_TO_FIRST_BYTE, &route).len(), 1);
    assert_eq!(m.histogram(metric::UPSTREAM_DURATION, &route).len(), 1);
    assert_no_secret(&capture, Some(&m));
}

// ---------------------------------------------------------------------------------------------
// 2. Failed requests.

#[tokio::test(flavor = "current_thread")]
async fn unreachable_upstream_is_a_gateway_502_with_its_cause() {
    let (capture, watching) = watch();

    let gw = serve(&dead_upstream().await, UsageTapLayer::new()).await;
    let body = chat_body(MODEL, "hi", true, false);
    let (res, text) = call(chat(&gw, Some(GW_KEY), &body, &[])).await;
    text.unwrap();
    assert_eq!(res.status, 502);
    let code = res.headers["x-gateway-error"].to_str().unwrap().to_owned();
    assert_eq!(code, "upstream_unreachable");

    let span = capture.one_request().await;
    assert_eq!(span.u64("http.response.status_code"), Some(502));
    assert_eq!(span.str("gateway.response_source"), Some("gateway"));
    assert_eq!(span.str("error.type"), Some(code.as_str()));
    assert_eq!(span.str("gateway.key_id"), Some("alice-laptop"));
    assert_eq!(span.str("gateway.account"), Some(ACCOUNT));
    assert_eq!(
        span.str("request_id"),
        res.headers["x-request-id"].to_str().ok()
    );
    assert!(!span.has("gen_ai.usage.input_tokens") && !span.has("gateway.outcome"));
    assert!(
        capture.usage_events().is_empty(),
        "no upstream answer, no usage"
    );

    let m = watching.metrics();
    let labels = [
        ("status", "502"),
        ("source", "gateway"),
        ("service", "proxy"),
    ];
    assert_eq!(m.counter(metric::REQUESTS, &labels), 1);
    assert_eq!(m.counter(metric::ERRORS, &[("cause", code.as_str())]), 1);
    assert_eq!(m.counter(metric::TOKENS, &[]), 0);
    assert_no_secret(&capture, Some(&m));
}

#[tokio::test(flavor = "current_thread")]
async fn refused_requests_record_no_identity_or_route_they_did_not_establish() {
    let (capture, watching) = watch();

    let (upstream, _feeds) = sse_upstream().await;
    let gw = serve(&upstream.base_url(), UsageTapLayer::new()).await;
    let body = chat_body(MODEL, "hi", false, false);

    // No key: 401, nobody recorded.
    let (res, _) = call(chat(&gw, None, &body, &[])).await;
    assert_eq!(res.status, 401);
    let no_key = res.headers["x-gateway-error"].to_str().unwrap().to_owned();
    let span = capture.one_request().await;
    assert_eq!(span.u64("http.response.status_code"), Some(401));
    assert_eq!(span.str("gateway.response_source"), Some("gateway"));
    assert_eq!(span.str("error.type"), Some(no_key.as_str()));
    assert!(
        !span.has("gateway.key_id") && !span.has("gateway.subject"),
        "{span:#?}"
    );
    assert!(!span.has("gateway.account") && !span.has("gateway.endpoint"));

    // A known key, an unknown account: 404, the caller recorded, no account or endpoint.
    let uri = gw.url("/proxy-api/no-such-account/inference/chat/completions");
    let (res, _) = call(post(uri, Some(BOB_KEY), &body, &[])).await;
    assert_eq!(res.status, 404);
    let unknown = res.headers["x-gateway-error"].to_str().unwrap().to_owned();
    let spans = capture.wait_requests(2).await;
    assert_eq!(spans.len(), 2);
    let span = &spans[1];
    assert_eq!(span.u64("http.response.status_code"), Some(404));
    assert_eq!(span.str("gateway.response_source"), Some("gateway"));
    assert_eq!(span.str("error.type"), Some(unknown.as_str()));
    assert_eq!(span.str("gateway.key_id"), Some("bob-ci"));
    for field in [
        "gateway.account",
        "gateway.endpoint",
        "gateway.upstream_path",
        "gen_ai.operation.name",
        "gateway.outcome",
    ] {
        assert!(
            !span.has(field),
            "{field} recorded on a refused request: {span:#?}"
        );
    }

    assert_eq!(upstream.count(), 0, "nothing reached the upstream");
    assert!(capture.usage_events().is_empty());
    let m = watching.metrics();
    assert_eq!(m.counter(metric::ERRORS, &[("cause", no_key.as_str())]), 1);
    assert_eq!(m.counter(metric::ERRORS, &[("cause", unknown.as_str())]), 1);
    assert_eq!(m.counter(metric::REQUESTS, &[("source", "gateway")]), 2);
    assert_eq!(m.counter(metric::UPSTREAM_RESPONSES, &[]), 0);
    assert_no_secret(&capture, Some(&m));
}

#[tokio::test(flavor = "current_thread")]
async fn a_stream_cut_midway_is_failed_with_a_cause() {
    let (capture, watching) = watch();

    let (upstream, mut feeds) = sse_upstream().await;
    let gw = serve(&upstream.base_url(), UsageTapLayer::new()).await;
    let body = chat_body(MODEL, "hi", true, false);
    let res = head(chat(&gw, Some(GW_KEY), &body, &[])).await;
    assert_eq!(res.status(), 200);
    let (_, events) = within("the upstream stream", feeds.recv()).await.unwrap();
    let mut body = res.into_body();
    // Two events reach the client, then the upstream fails (an upstream that fails with
    // events still in its write buffer would drop them: wait for them to arrive).
    let two = format!("{}{}", sse_event(0), sse_event(1));
    for i in 0..2 {
        events.send(Ok(Bytes::from(sse_event(i)))).await.unwrap();
    }
    let mut received = Vec::new();
    while received.len() < two.len() {
        let data = next_data(&mut body).await.expect("an event").unwrap();
        received.extend_from_slice(&data);
    }
    assert_eq!(received, two.as_bytes());
    events
        .send(Err(io::Error::other("upstream fell over")))
        .await
        .unwrap();
    // One more event, the OpenAI error shape the SDKs raise, then the cut (not a clean end).
    let mut tail = Vec::new();
    let ended = loop {
        match next_data(&mut body).await {
            Some(Ok(data)) => tail.extend_from_slice(&data),
            Some(Err(err)) => break Err(err),
            None => break Ok(()),
        }
    };
    assert!(
        ended.is_err(),
        "the client sees the stream cut, not a clean end"
    );
    let tail = String::from_utf8(tail).unwrap();
    let event = tail
        .strip_prefix("\n\ndata: ")
        .and_then(|t| t.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("one error event: {tail:?}"));
    let error: serde_json::Value = serde_json::from_str(event).unwrap();
    assert_eq!(error["error"]["code"], "upstream_stream_error");
    assert_eq!(error["error"]["type"], "api_error");
    drop(body);
    drop(events);

    let span = capture.one_request().await;
    assert_eq!(span.u64("http.response.status_code"), Some(200));
    assert_eq!(span.str("gateway.response_source"), Some("upstream"));
    assert_eq!(span.str("gateway.outcome"), Some("failed"));
    assert_eq!(span.str("error.type"), Some("upstream_stream_error"));
    assert!(span.has("error.message"), "{span:#?}");
    assert_eq!(
        span.u64("http.response.body.size"),
        Some((two.len() + tail.len()) as u64),
        "the bytes that got through, the error event with them"
    );
    assert!(!span.has("gen_ai.usage.input_tokens"));

    let usage = capture.usage_events_in(&span);
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].str("outcome"), Some("failed"));

    let m = watching.metrics();
    assert_eq!(
        m.counter(metric::ERRORS, &[("cause", "upstream_stream_error")]),
        1
    );
    assert_eq!(
        m.counter(metric::UPSTREAM_RESPONSES, &[("outcome", "failed")]),
        1
    );
    assert_no_secret(&capture, Some(&m));
}

/// An upstream's own error is the upstream's, even if it forges the gateway's error header.
#[tokio::test(flavor = "current_thread")]
async fn an_upstream_5xx_is_attributed_to_the_upstream() {
    let (capture, watching) = watch();

    let upstream = RecordingUpstream::start(|_| async {
        json_answer(
            503,
            &[("x-gateway-error", "forged".to_owned())],
            r#"{"error":{"message":"overloaded"}}"#,
        )
    })
    .await;
    let gw = serve(&upstream.base_url(), UsageTapLayer::new()).await;
    let body = chat_body(MODEL, "hi", false, false);
    let (res, _) = call(chat(&gw, Some(GW_KEY), &body, &[])).await;
    assert_eq!(res.status, 503);
    assert!(!res.headers.contains_key("x-gateway-error"));

    let span = capture.one_request().await;
    assert_eq!(span.u64("http.response.status_code"), Some(503));
    assert_eq!(span.str("gateway.response_source"), Some("upstream"));
    assert!(!span.has("error.type"), "{span:#?}");
    assert_eq!(span.str("gateway.outcome"), Some("complete"));
    let m = watching.metrics();
    let labels = [("status", "503"), ("source", "upstream")];
    assert_eq!(m.counter(metric::REQUESTS, &labels), 1);
    assert_eq!(m.counter(metric::ERRORS, &[]), 0);
    assert_no_secret(&capture, Some(&m));
}

// ---------------------------------------------------------------------------------------------
// 3. Usage records per principal, streaming and not, and tokens by team.

#[tokio::test(flavor = "current_thread")]
async fn usage_records_per_principal_through_the_full_stack() {
    let (capture, watching) = watch();

    let (tap, records) = collecting_tap();
    let gw = serve(&mock_upstream().await, tap).await;

    let deepseek = "deepseek-ai/DeepSeek-V3-0324";
    // (request id, key, principal, model, what they say, streaming)
    let calls = [
        (
            "alice-stream",
            GW_KEY,
            alice(),
            MODEL,
            "one two three",
            true,
        ),
        ("alice-json", GW_KEY, alice(), MODEL, "four five", false),
        (
            "bob-stream",
            BOB_KEY,
            bob(),
            deepseek,
            "a b c d e f g",
            true,
        ),
        ("bob-json", BOB_KEY, bob(), deepseek, "h", false),
    ];
    let mut expected = Vec::new();
    for (id, key, principal, model, said, stream) in &calls {
        let body = chat_body(model, said, *stream, *stream);
        let (res, text) = call(chat(&gw, Some(key), &body, &[id])).await;
        assert_eq!(res.status, 200);
        assert_eq!(res.headers["x-request-id"], *id);
        let text = text.unwrap();
        // What the client itself was told it used.
        expected.push((*id, principal.clone(), *model, client_usage(&text)));
    }

    let got = wait_records(&records, calls.len()).await;
    assert_eq!(got.len(), calls.len(), "one record per call");
    for (id, principal, model, (input, output)) in &expected {
        let r = got
            .iter()
            .find(|r| r.request_id.as_ref().is_some_and(|v| v == id))
            .unwrap_or_else(|| panic!("no record for {id}: {got:#?}"));
        assert_eq!(r.principal.as_ref(), Some(principal), "{id}");
        assert_eq!(r.account.as_deref(), Some(ACCOUNT), "{id}");
        assert_eq!(r.endpoint.as_deref(), Some(ENDPOINT), "{id}");
        assert_eq!(r.model.as_deref(), Some(*model), "{id}");
        assert_eq!(r.input_tokens, Some(*input), "{id}");
        assert_eq!(r.output_tokens, Some(*output), "{id}");
        assert_eq!(r.status, 200, "{id}");
        assert_eq!(r.outcome, Outcome::Complete, "{id}");
        assert!(r.response_bytes > 0, "{id}");
        let ttft = r.time_to_first_token.expect("time to first token");
        assert!(ttft <= r.duration, "{id}: {ttft:?} > {:?}", r.duration);
    }
    // The custom sink replaces the tracing one.
    assert!(capture.usage_events().is_empty());

    // Tokens by team: Alice's in research, Bob's in each of his teams.
    let sum = |who: &str, pick: fn(&(u64, u64)) -> u64| -> u64 {
        expected
            .iter()
            .filter(|e| e.0.starts_with(who))
            .map(|e| pick(&e.3))
            .sum()
    };
    let (alice_in, alice_out) = (sum("alice", |t| t.0), sum("alice", |t| t.1));
    let (bob_in, bob_out) = (sum("bob", |t| t.0), sum("bob", |t| t.1));
    assert_ne!(alice_in, bob_in, "the calls differ, so a mix-up shows");
    let m = watching.metrics();
    let tokens = |team: &str, kind: &str| {
        m.counter(
            metric::TOKENS,
            &[
                ("account", ACCOUNT),
                ("endpoint", ENDPOINT),
                ("team", team),
                ("type", kind),
            ],
        )
    };
    assert_eq!(tokens("research", "input"), alice_in);
    assert_eq!(tokens("research", "output"), alice_out);
    for team in ["platform", "ops"] {
        assert_eq!(tokens(team, "input"), bob_in, "{team}");
        assert_eq!(tokens(team, "output"), bob_out, "{team}");
    }
    assert_eq!(
        m.counter(metric::TOKENS, &[]),
        alice_in + alice_out + 2 * (bob_in + bob_out),
        "no tokens counted anywhere else"
    );
    assert_eq!(
        m.counter(
            metric::REQUESTS,
            &[("status", "200"), ("source", "upstream")]
        ),
        4
    );

    // The spans agree with the records.
    let spans = capture.wait_requests(calls.len()).await;
    assert_eq!(spans.len(), calls.len());
    for (id, principal, model, (input, output)) in &expected {
        let span = spans
            .iter()
            .find(|s| s.str("request_id") == Some(id))
            .unwrap_or_else(|| panic!("no span for {id}"));
        assert_eq!(span.str("gateway.key_id"), Some(&*principal.key_id));
        assert_eq!(span.str("gen_ai.response.model"), Some(*model));
        assert_eq!(span.u64("gen_ai.usage.input_tokens"), Some(*input));
        assert_eq!(span.u64("gen_ai.usage.output_tokens"), Some(*output));
    }
    assert_no_secret(&capture, Some(&m));
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_off_records_none() {
    let (capture, watching) = watch();

    let gateway = builder(&mock_upstream().await, UsageTapLayer::new())
        .metrics(false)
        .build();
    let gw = serve_gateway(gateway).await;
    let body = chat_body(MODEL, "hi", true, true);
    let (res, text) = call(chat(&gw, Some(GW_KEY), &body, &[])).await;
    assert_eq!(res.status, 200);
    text.unwrap();
    let (res, _) = call(chat(&gw, None, &body, &[])).await;
    assert_eq!(res.status, 401);
    capture.wait_requests(2).await;
    let m = watching.metrics();
    assert!(
        m.0.is_empty(),
        "metrics(false) counts nothing: {}",
        m.text()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. `include_usage` through the full stack.

#[tokio::test(flavor = "current_thread")]
async fn include_usage_records_tokens_the_client_did_not_ask_for_without_showing_them() {
    let (capture, _watching) = watch();
    let base = mock_upstream().await;

    // What the mock counts for this conversation, as a non-streaming call reports it.
    let said = "count my tokens please";
    let (tap, records) = collecting_tap();
    let gw = serve(&base, tap.include_usage(true)).await;
    let json = chat_body(MODEL, said, false, false);
    let (res, text) = call(chat(&gw, Some(GW_KEY), &json, &[])).await;
    assert_eq!(res.status, 200);
    let want = client_usage(&text.unwrap());

    // A streaming call that did not ask: usage recorded, the client's stream as it asked.
    let stream = chat_body(MODEL, said, true, false);
    let (res, text) = call(chat(&gw, Some(GW_KEY), &stream, &["include-on"])).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.headers["content-type"], "text/event-stream");
    let text = text.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:#?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() > 3);
    for chunk in &chunks {
        assert!(
            !chunk["choices"].as_array().unwrap().is_empty(),
            "a usage-only event the client did not ask for: {chunk}"
        );
        assert!(
            chunk["usage"].is_null(),
            "usage shown to the client: {chunk}"
        );
    }
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        content,
        format!("Hello from the mock W&B Inference upstream! You said: {said}")
    );
    let got = wait_records(&records, 2).await;
    let on = got
        .iter()
        .find(|r| r.request_id.as_ref().is_some_and(|v| v == "include-on"))
        .unwrap();
    assert_eq!(
        (on.input_tokens, on.output_tokens),
        (Some(want.0), Some(want.1))
    );
    let spans = capture.wait_requests(2).await;
    let span = spans
        .iter()
        .find(|s| s.str("request_id") == Some("include-on"))
        .unwrap();
    assert_eq!(span.u64("gen_ai.usage.input_tokens"), Some(want.0));
    assert_eq!(span.u64("gen_ai.usage.output_tokens"), Some(want.1));
    assert_eq!(span.str("gen_ai.request.model"), Some(MODEL));

    // A client that asked for usage itself gets its usage event untouched.
    let asked = chat_body(MODEL, said, true, true);
    let (_, text) = call(chat(&gw, Some(GW_KEY), &asked, &[])).await;
    let text = text.unwrap();
    assert_eq!(client_usage(&text), want);
    assert!(
        sse_data(&text)
            .iter()
            .any(|d| d.contains(r#""choices":[]"#))
    );
    drop(gw);

    // The same streaming call with the option off: the mock sends no usage, none recorded.
    let (tap, records) = collecting_tap();
    let gw = serve(&base, tap).await;
    let (res, text) = call(chat(&gw, Some(GW_KEY), &stream, &["include-off"])).await;
    assert_eq!(res.status, 200);
    assert!(sse_data(&text.unwrap()).ends_with(&["[DONE]".to_owned()]));
    let off = wait_records(&records, 1).await;
    assert_eq!(off.len(), 1);
    assert_eq!(off[0].model.as_deref(), Some(MODEL));
    assert_eq!((off[0].input_tokens, off[0].output_tokens), (None, None));
    assert_no_secret(&capture, None);
}

// ---------------------------------------------------------------------------------------------
// 5. Request ids.

#[tokio::test(flavor = "current_thread")]
async fn request_ids_are_kept_replaced_or_made_and_the_upstreams_moved_aside() {
    let (capture, _watching) = watch();
    // An upstream that answers with its own id when asked to (`x-answer-id`), or echoes ours
    // (`x-echo-id`).
    let upstream = RecordingUpstream::start(|seen: Seen| async move {
        let mut headers = Vec::new();
        if let Some(own) = seen.headers.get("x-answer-id") {
            headers.push(("x-request-id", own.to_str().unwrap().to_owned()));
        }
        if seen.headers.contains_key("x-echo-id") {
            let ours = seen.headers["x-request-id"].to_str().unwrap().to_owned();
            headers.push(("x-request-id", ours));
        }
        json_answer(200, &headers, "{}")
    })
    .await;
    let gw = serve(&upstream.base_url(), UsageTapLayer::new()).await;
    let uri = || gw.proxy_url("/models");
    let get = |ids: &[&str], extra: Option<(&'static str, &'static str)>| {
        let mut req = Request::get(uri()).header("authorization", format!("Bearer {GW_KEY}"));
        for id in ids {
            req = req.header("x-request-id", *id);
        }
        if let Some((n, v)) = extra {
            req = req.header(n, v);
        }
        req.body(Full::default()).unwrap()
    };
    let mut n = 0;
    let mut last_span = async || {
        n += 1;
        capture.wait_requests(n).await.pop().unwrap()
    };

    // A valid client id is kept end to end.
    let id = "client-req-42:abc/def+=_.";
    let (res, _) = call(get(&[id], None)).await;
    assert_eq!(res.headers["x-request-id"], id);
    assert_eq!(upstream.last().headers["x-request-id"], id);
    assert_eq!(last_span().await.str("request_id"), Some(id));

    // No id, or an invalid one: the gateway makes a fresh one.
    let long = "x".repeat(200);
    let mut made = Vec::new();
    for ids in [
        &[][..],
        &["has space"],
        &[long.as_str()],
        &["quote\"d"],
        &[""],
    ] {
        let (res, _) = call(get(ids, None)).await;
        let got = res.headers["x-request-id"].clone();
        assert!(is_gateway_id(&got), "{ids:?} → {got:?}");
        assert_eq!(
            res.headers.get_all("x-request-id").iter().count(),
            1,
            "one id back"
        );
        let seen = upstream.last().headers;
        assert_eq!(
            seen.get_all("x-request-id").iter().collect::<Vec<_>>(),
            [&got]
        );
        assert_eq!(last_span().await.str("request_id"), got.to_str().ok());
        made.push(got);
    }
    made.sort();
    made.dedup();
    assert_eq!(made.len(), 5, "every made id is fresh");

    // Several ids: the first, if valid, is the one.
    let (res, _) = call(get(&["first-id", "second-id"], None)).await;
    assert_eq!(res.headers["x-request-id"], "first-id");
    let seen = upstream.last().headers;
    assert_eq!(
        seen.get_all("x-request-id").iter().collect::<Vec<_>>(),
        ["first-id"]
    );
    last_span().await;

    // The upstream answers with its own id: the client gets ours, and theirs aside.
    let (res, _) = call(get(&["ours-1"], Some(("x-answer-id", "upstream-own-7")))).await;
    assert_eq!(
        res.headers
            .get_all("x-request-id")
            .iter()
            .collect::<Vec<_>>(),
        ["ours-1"]
    );
    assert_eq!(res.headers["x-upstream-request-id"], "upstream-own-7");
    let span = last_span().await;
    assert_eq!(span.str("request_id"), Some("ours-1"));
    assert_eq!(
        span.str("gateway.upstream_request_id"),
        Some("upstream-own-7")
    );

    // … also when the client sent none.
    let (res, _) = call(get(&[], Some(("x-answer-id", "upstream-own-8")))).await;
    assert!(is_gateway_id(&res.headers["x-request-id"]));
    assert_eq!(res.headers["x-upstream-request-id"], "upstream-own-8");
    last_span().await;

    // An upstream id the gateway would refuse from a client is not logged as sent.
    let (res, _) = call(get(&["ours-3"], Some(("x-answer-id", "up id; rm -rf")))).await;
    assert_eq!(res.headers["x-request-id"], "ours-3");
    assert_eq!(res.headers["x-upstream-request-id"], "up id; rm -rf");
    assert_eq!(
        last_span().await.str("gateway.upstream_request_id"),
        Some("<not a valid request id>")
    );

    // The upstream echoes ours: one id back, nothing aside.
    let (res, _) = call(get(&["ours-2"], Some(("x-echo-id", "1")))).await;
    assert_eq!(
        res.headers
            .get_all("x-request-id")
            .iter()
            .collect::<Vec<_>>(),
        ["ours-2"]
    );
    assert!(!res.headers.contains_key("x-upstream-request-id"));
    assert!(!last_span().await.has("gateway.upstream_request_id"));

    // A refused request gets its id back too.
    let req = Request::get(uri())
        .header("x-request-id", "refused-1")
        .body(Full::default())
        .unwrap();
    let (res, _) = call(req).await;
    assert_eq!(res.status, 401);
    assert_eq!(res.headers["x-request-id"], "refused-1");
    assert_eq!(last_span().await.str("request_id"), Some("refused-1"));

    assert_no_secret(&capture, None);
}

/// With the usage tap disabled, an upstream's own `x-request-id` reaches the client in place of
/// the gateway's (and is not moved to `x-upstream-request-id`): the id swap lives in the usage
/// tap, not in the trace layers that the docs of `tower_gateway::trace` describe it under.
#[tokio::test(flavor = "current_thread")]
async fn the_client_gets_the_gateways_request_id_even_with_the_tap_disabled() {
    let (capture, _watching) = watch();
    let upstream = RecordingUpstream::start(|_| async {
        json_answer(200, &[("x-request-id", "upstream-own-9".to_owned())], "{}")
    })
    .await;
    let gw = serve(&upstream.base_url(), UsageTapLayer::disabled()).await;
    let req = Request::get(gw.proxy_url("/models"))
        .header("authorization", format!("Bearer {GW_KEY}"))
        .header("x-request-id", "ours-9")
        .body(Full::default())
        .unwrap();
    let (res, _) = call(req).await;
    let span = capture.one_request().await;
    assert_eq!(span.str("request_id"), Some("ours-9"));
    assert_eq!(
        res.headers["x-request-id"], "ours-9",
        "the client's id does not match the span's"
    );
    assert_eq!(res.headers["x-upstream-request-id"], "upstream-own-9");
}

/// `Usage::response_bytes` is documented as the "response body bytes passed to the client",
/// but with `include_usage` the tap counts the upstream's bytes, including the usage-only event
/// it cuts out (and so does `http.response.body.size`).
#[tokio::test(flavor = "current_thread")]
async fn response_bytes_are_what_the_client_received_with_include_usage() {
    let (capture, _watching) = watch();
    let (tap, records) = collecting_tap();
    let gw = serve(&mock_upstream().await, tap.include_usage(true)).await;
    let stream = chat_body(MODEL, "hi", true, false);
    let (_, text) = call(chat(&gw, Some(GW_KEY), &stream, &[])).await;
    let text = text.unwrap();
    let record = wait_records(&records, 1).await.remove(0);
    assert!(record.input_tokens.is_some());
    let span = capture.one_request().await;
    assert_eq!(
        span.u64("http.response.body.size"),
        Some(text.len() as u64),
        "span: the bytes the client received"
    );
    assert_eq!(
        record.response_bytes,
        text.len() as u64,
        "record: the bytes the client received"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. No secret anywhere in what tracing saw.

#[tokio::test(flavor = "current_thread")]
async fn no_key_reaches_a_span_or_an_event() {
    let (capture, watching) = watch();

    // The mock requires the upstream key; an echoing upstream refuses the request and repeats
    // the credential it got in its error body and a header.
    let good = mock_upstream().await;
    let echo = RecordingUpstream::start(|seen: Seen| async move {
        let auth = seen.headers["authorization"].to_str().unwrap().to_owned();
        json_answer(
            400,
            &[("x-echo", auth.clone())],
            &format!(r#"{{"error":{{"message":"bad request from {auth}"}}}}"#),
        )
    })
    .await;
    let good = serve(&good, UsageTapLayer::new()).await;
    let echo = serve(&echo.base_url(), UsageTapLayer::new()).await;
    let dead = serve(&dead_upstream().await, UsageTapLayer::new()).await;

    let stream = chat_body(MODEL, "hi", true, true);
    let json = chat_body(MODEL, "hi", false, false);
    let requests = [
        chat(&good, Some(GW_KEY), &stream, &[]),
        chat(&good, Some(BOB_KEY), &json, &[]),
        // The upstream key sent as a gateway key; the gateway key in `x-api-key`. (A key the
        // client puts in its own `x-request-id` is a valid id and logged as one: not tested.)
        chat(&good, Some(UP_KEY), &json, &[]),
        Request::post(good.proxy_url("/chat/completions"))
            .header("x-api-key", GW_KEY)
            .header("content-type", "application/json")
            .body(Full::from(json.clone()))
            .unwrap(),
        // A key pasted into the path and the query.
        post(
            good.url(&format!("/proxy-api/{GW_KEY}/{ENDPOINT}/chat/completions")),
            Some(GW_KEY),
            &json,
            &[],
        ),
        post(
            good.url(&format!(
                "/proxy-api/{ACCOUNT}/{ENDPOINT}/models?api_key={GW_KEY}"
            )),
            Some(GW_KEY),
            &json,
            &[],
        ),
        // An upstream that echoes the credential it got.
        chat(&echo, Some(GW_KEY), &json, &[]),
        chat(&dead, Some(GW_KEY), &json, &[]),
    ];
    let n = requests.len();
    let mut statuses = Vec::new();
    for req in requests {
        let (res, _) = call(req).await;
        statuses.push(res.status.as_u16());
    }
    // (The mock has no `POST /v1/models`: its own 404.)
    assert_eq!(statuses, [200, 200, 401, 200, 404, 404, 400, 502]);
    let spans = capture.wait_requests(n).await;
    assert_eq!(spans.len(), n);
    assert!(!capture.usage_events().is_empty());
    assert_no_secret(&capture, Some(&watching.metrics()));
}

// ---------------------------------------------------------------------------------------------
// Rate limits.

/// A request refused by a rate limit is one span that says which limit and bucket refused it,
/// with the 429's error type; every rule's decisions are counted.
#[tokio::test(flavor = "current_thread")]
async fn a_rate_limited_request_is_one_span_with_the_reason_and_counted() {
    use tower_gateway::model::{RateLimitRule, RateLimits};
    let (capture, watching) = watch();
    let limits = RateLimits {
        rules: vec![RateLimitRule {
            requests_per_minute: Some(1),
            ..RateLimitRule::new("key:alice-laptop".parse().unwrap())
        }],
        ..RateLimits::default()
    };
    let gw = serve_gateway(
        builder(&mock_upstream().await, UsageTapLayer::new())
            .rate_limits(limits)
            .build(),
    )
    .await;
    let body = chat_body(MODEL, "hi", false, false);
    let (first, _) = call(chat(&gw, Some(GW_KEY), &body, &[])).await;
    assert_eq!(first.status, 200);
    let (refused, _) = call(chat(&gw, Some(GW_KEY), &body, &[])).await;
    assert_eq!(refused.status, 429);

    let spans = capture.wait_requests(2).await;
    let span = spans
        .iter()
        .find(|s| s.u64("http.response.status_code") == Some(429))
        .expect("the refused request's span");
    assert_eq!(
        span.str("gateway.rate_limit"),
        Some("requests_per_minute key:alice-laptop")
    );
    assert_eq!(span.str("error.type"), Some("rate_limit_exceeded"));
    assert_eq!(span.str("gateway.response_source"), Some("gateway"));
    let allowed = spans
        .iter()
        .find(|s| s.u64("http.response.status_code") == Some(200))
        .unwrap();
    assert!(!allowed.has("gateway.rate_limit"));

    let metrics = Metrics::take(&watching.snapshotter);
    let decisions = |outcome: &str, limit: &str| {
        metrics.counter(
            metric::RATE_LIMIT_DECISIONS,
            &[
                ("scope", "key:alice-laptop"),
                ("outcome", outcome),
                ("limit", limit),
            ],
        )
    };
    assert_eq!(decisions("allowed", ""), 1);
    assert_eq!(decisions("refused", "requests_per_minute"), 1);
}

/// A registry whose endpoint is a pool of `targets` (base URL, priority), with `retry`.
fn pool_registry(
    targets: &[(&str, u32)],
    retry: tower_gateway::model::RetryPolicy,
) -> tower_gateway::registry::Registry {
    use tower_gateway::model::TargetSpec;
    use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {UP_KEY}")).unwrap(),
    );
    Registry::from_accounts(vec![AccountSpec {
        endpoints: vec![EndpointSpec {
            headers,
            targets: targets
                .iter()
                .map(|(url, priority)| TargetSpec {
                    priority: *priority,
                    ..TargetSpec::new(*url)
                })
                .collect(),
            retry: Some(retry),
            ..EndpointSpec::new(ENDPOINT, "")
        }],
        access: tower_gateway::access::Grants {
            users: vec![tower_gateway::access::Subject::Everyone],
            ..Default::default()
        },
        ..AccountSpec::new(ACCOUNT)
    }])
    .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn a_pool_names_the_target_and_counts_attempts_retries_fallbacks_and_cuts() {
    use scripted::{Act, Scripted};
    use tower_gateway::metric as m;
    let (capture, watching) = watch();
    let failing = Scripted::start(Act::Status(503, vec![])).await;
    let backup = Scripted::start(Act::Sse { events: 2 }).await;
    let retry = tower_gateway::model::RetryPolicy {
        attempts: 2,
        max_body_bytes: 300,
        ..Default::default()
    };
    let registry = pool_registry(&[(&failing.base_url(), 1), (&backup.base_url(), 2)], retry);
    let gw = serve_gateway(
        builder("http://unused.invalid", UsageTapLayer::new())
            .registry(registry.into())
            .build(),
    )
    .await;

    // A retry that falls back to priority 2 and streams from there.
    let (parts, body) = call(chat(
        &gw,
        Some(GW_KEY),
        &chat_body(MODEL, "hi", true, false),
        &[],
    ))
    .await;
    assert_eq!(parts.status, 200);
    assert!(
        String::from_utf8(body.unwrap())
            .unwrap()
            .ends_with("data: [DONE]\n\n")
    );
    let span = capture.one_request().await;
    let backup_url = backup.base_url();
    assert_eq!(span.str("gateway.target"), Some(backup_url.as_str()));
    assert_eq!(span.u64("gateway.attempts"), Some(2));
    assert!(!span.has("gateway.retry_refused"));
    let usage = capture.usage_events_in(&span);
    assert_eq!(usage[0].str("target"), Some(backup_url.as_str()));
    assert_eq!(usage[0].u64("attempts"), Some(2));
    let failing_url = failing.base_url();
    let metrics = watching.metrics();
    assert_eq!(
        metrics.counter(
            m::UPSTREAM_ATTEMPTS,
            &[
                ("target", failing_url.as_str()),
                ("outcome", "failed_status")
            ]
        ),
        1
    );
    assert_eq!(
        metrics.counter(
            m::UPSTREAM_ATTEMPTS,
            &[("target", backup_url.as_str()), ("outcome", "answered")]
        ),
        1
    );
    assert_eq!(
        metrics.counter(m::UPSTREAM_RETRIES, &[("target", backup_url.as_str())]),
        1
    );
    assert_eq!(
        metrics.counter(m::UPSTREAM_FALLBACKS, &[("target", backup_url.as_str())]),
        1
    );

    // A body over the replay limit: not retried, and the span says why.
    let big = chat_body(MODEL, &"x".repeat(500), false, false);
    let (parts, _) = call(chat(&gw, Some(GW_KEY), &big, &[])).await;
    assert_eq!(parts.status, 503);
    let spans = capture.wait_requests(2).await;
    let span = &spans[1];
    assert_eq!(span.str("gateway.retry_refused"), Some("body_too_large"));
    assert_eq!(span.str("gateway.target"), Some(failing_url.as_str()));
    assert_eq!(span.u64("gateway.attempts"), Some(1));

    // A stream cut after its head: the truncation is counted against the target that served.
    failing.set(Act::CutMidStream);
    let (parts, body) = call(chat(
        &gw,
        Some(GW_KEY),
        &chat_body(MODEL, "hi", true, false),
        &[],
    ))
    .await;
    assert_eq!(parts.status, 200);
    assert!(body.is_err(), "the stream was cut");
    let spans = capture.wait_requests(3).await;
    let span = &spans[2];
    assert_eq!(span.str("gateway.outcome"), Some("failed"));
    assert_eq!(span.str("gateway.target"), Some(failing_url.as_str()));
    let metrics = watching.metrics();
    assert_eq!(
        metrics.counter(m::UPSTREAM_TRUNCATIONS, &[("target", failing_url.as_str())]),
        1
    );
    assert_eq!(
        metrics.counter(m::UPSTREAM_RETRIES, &[]),
        0,
        "nothing retried after the head"
    );
    assert_no_secret(&capture, Some(&metrics));
}
