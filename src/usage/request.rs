//! The request side of the tap: counting bytes, reading the requested model, and (on request)
//! asking a streaming chat completion for its usage.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Request};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde::Deserialize;
use tracing::Span;

use crate::BoxError;

/// The largest request body (bytes) the tap reads to add `stream_options.include_usage`.
pub(crate) const MAX_REWRITE: u64 = 1 << 20;

/// The largest single-frame request body whose `model` is read for the span.
const MAX_MODEL_PROBE: usize = 256 << 10;

pin_project! {
    /// The request body the tap passes on: the client's, counted as it streams, or the
    /// rewritten body of a chat completion asked for its usage.
    pub struct TapRequestBody<B> {
        #[pin]
        kind: Kind<B>,
        meter: RequestMeter,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Stream { #[pin] body: B },
        Full { data: Option<Bytes> },
        Failed { error: Option<BoxError> },
    }
}

/// Counts a request body's bytes and records them on the request span when it is dropped.
struct RequestMeter {
    span: Span,
    bytes: u64,
    /// The body's exact length, when the span wants the requested model read from a body that
    /// arrives in one frame.
    probe: Option<u64>,
}

impl RequestMeter {
    fn new(span: Span, exact: Option<u64>) -> Self {
        let probe = exact.filter(|n| *n as usize <= MAX_MODEL_PROBE && !span.is_disabled());
        Self {
            span,
            bytes: 0,
            probe,
        }
    }

    fn data(&mut self, data: &[u8]) {
        if self.bytes == 0
            && let Some(len) = self.probe.take()
            && len == data.len() as u64
        {
            record_request_model(&self.span, data);
        }
        self.bytes += data.len() as u64;
    }
}

impl Drop for RequestMeter {
    fn drop(&mut self) {
        self.span.record("http.request.body.size", self.bytes);
    }
}

#[derive(Deserialize)]
struct ModelOnly<'a> {
    #[serde(borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
}

fn record_request_model(span: &Span, json: &[u8]) {
    if let Ok(ModelOnly { model: Some(model) }) = serde_json::from_slice(json) {
        span.record("gen_ai.request.model", &*model);
    }
}

impl<B: Body> TapRequestBody<B> {
    pub(crate) fn stream(body: B, span: Span) -> Self {
        let exact = body.size_hint().exact();
        Self {
            kind: Kind::Stream { body },
            meter: RequestMeter::new(span, exact),
        }
    }

    pub(crate) fn full(data: Bytes, span: Span) -> Self {
        record_request_model(&span, &data);
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            meter: RequestMeter::new(span, None),
        }
    }

    pub(crate) fn failed(error: BoxError, span: Span) -> Self {
        Self {
            kind: Kind::Failed { error: Some(error) },
            meter: RequestMeter::new(span, None),
        }
    }
}

impl<B> Body for TapRequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = match this.kind.project() {
            KindProj::Stream { body } => ready!(body.poll_frame(cx)).map(|f| f.map_err(Into::into)),
            KindProj::Full { data } => data.take().map(|d| Ok(Frame::data(d))),
            KindProj::Failed { error } => error.take().map(Err),
        };
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            this.meter.data(data);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Stream { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
            Kind::Failed { error } => error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Stream { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Failed { .. } => SizeHint::default(),
        }
    }
}

impl<B> fmt::Debug for TapRequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Stream { .. } => "Stream",
            Kind::Full { .. } => "Full",
            Kind::Failed { .. } => "Failed",
        };
        f.debug_struct("TapRequestBody")
            .field("kind", &kind)
            .field("bytes", &self.meter.bytes)
            .finish()
    }
}

/// Whether the request is a completion whose body the tap may read to ask for usage: a `POST`
/// to `…/chat/completions` or `…/completions` with a JSON body of a declared length of at most
/// [`MAX_REWRITE`], not content-encoded.
pub(crate) fn may_ask_for_usage<B>(req: &Request<B>, upstream_path: &str) -> bool {
    let headers = req.headers();
    req.method() == Method::POST
        && (upstream_path.ends_with("/chat/completions") || upstream_path.ends_with("/completions"))
        && !headers.contains_key(CONTENT_ENCODING)
        && media_type(headers).is_some_and(|m| m.eq_ignore_ascii_case("application/json"))
        && headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= MAX_REWRITE)
}

/// The media type of `Content-Type`, without its parameters (`text/event-stream` of
/// `text/event-stream; charset=utf-8`).
pub(crate) fn media_type(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    value.split(';').next().map(str::trim)
}

#[derive(Deserialize)]
struct StreamFlags {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<serde_json::Value>,
}

/// Adds `"stream_options": {"include_usage": true}` to a streaming completion request that
/// did not ask for usage. `None` leaves the body as the client sent it: not a JSON object, not
/// streaming, or usage already asked for (then the client sees its usage event).
pub(crate) fn add_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let flags: StreamFlags = serde_json::from_slice(body).ok()?;
    if flags.stream != Some(true) {
        return None;
    }
    // `null` reads as `None` too: insert only where the key is truly absent.
    let absent = memchr::memmem::find(body, b"\"stream_options\"").is_none();
    match flags.stream_options {
        None if absent => {
            // Insert right after the opening brace: the client's bytes stay as they were.
            let open = body.iter().position(|b| *b == b'{')?;
            let rest = &body[open + 1..];
            let empty = rest.trim_ascii_start().first() == Some(&b'}');
            let mut out = Vec::with_capacity(body.len() + 40);
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(rest);
            Some(out)
        }
        Some(serde_json::Value::Object(options))
            if options.get("include_usage") == Some(&serde_json::Value::Bool(true)) =>
        {
            None
        }
        None | Some(serde_json::Value::Object(_)) => {
            let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
            let obj = value.as_object_mut()?;
            let options = obj
                .entry("stream_options")
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            if options.is_null() {
                *options = serde_json::Value::Object(Default::default());
            }
            options
                .as_object_mut()?
                .insert("include_usage".into(), serde_json::Value::Bool(true));
            serde_json::to_vec(&value).ok()
        }
        // Something the upstream will refuse anyway: leave it to say so.
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(body: &str) -> Option<serde_json::Value> {
        add_include_usage(body.as_bytes()).map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn adds_include_usage_to_a_streaming_request_only() {
        let v = rewritten(r#"{"model":"m","stream":true,"messages":[]}"#).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        assert_eq!(
            add_include_usage(br#"{"stream":true}"#).unwrap(),
            br#"{"stream_options":{"include_usage":true},"stream":true}"#
        );
        assert_eq!(rewritten(r#"{"model":"m","stream":false}"#), None);
        assert_eq!(rewritten(r#"{"model":"m"}"#), None);
        assert_eq!(rewritten("not json"), None);
        assert_eq!(rewritten("[1]"), None);
    }

    #[test]
    fn keeps_the_clients_own_stream_options() {
        let v = rewritten(r#"{"stream":true,"stream_options":{"other":1}}"#).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["other"], 1);
        let v = rewritten(r#"{"stream":true,"stream_options":{"include_usage":false}}"#).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let v = rewritten(r#"{"stream":true,"stream_options":null}"#).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        // Asked for already: the client keeps its usage event, nothing to hide.
        assert_eq!(
            rewritten(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            None
        );
    }

    #[test]
    fn only_bounded_json_completions_are_read() {
        let req = |method: Method, len: &str, ct: &str| {
            Request::builder()
                .method(method)
                .header(CONTENT_LENGTH, len)
                .header(CONTENT_TYPE, ct)
                .body(())
                .unwrap()
        };
        let ok = req(Method::POST, "10", "application/json; charset=utf-8");
        assert!(may_ask_for_usage(&ok, "/chat/completions"));
        assert!(may_ask_for_usage(&ok, "/v1/completions"));
        assert!(!may_ask_for_usage(&ok, "/embeddings"));
        assert!(!may_ask_for_usage(
            &req(Method::GET, "10", "application/json"),
            "/chat/completions"
        ));
        assert!(!may_ask_for_usage(
            &req(Method::POST, "10", "text/plain"),
            "/chat/completions"
        ));
        let too_big = (MAX_REWRITE + 1).to_string();
        assert!(!may_ask_for_usage(
            &req(Method::POST, &too_big, "application/json"),
            "/chat/completions"
        ));
        let chunked = Request::post("/")
            .header(CONTENT_TYPE, "application/json")
            .body(())
            .unwrap();
        assert!(!may_ask_for_usage(&chunked, "/chat/completions"));
    }
}
