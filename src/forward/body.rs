use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use super::IdleTimeoutBody;
use super::conn::{ConnectionClosed, H1Conn, Return};
use super::served::ServedBy;

use crate::BoxError;

pin_project! {
    /// The response body of [`Forward`](super::Forward): the upstream's body, streamed as it
    /// arrives, or a small gateway-made body.
    ///
    /// Each poll hands on what the upstream has sent so far, never waiting for more: small
    /// frames (under 4 KiB) that were already read when the body is polled, token events that
    /// arrived together, go on joined into one (up to 16 KiB), so they leave in one write with
    /// one chunk header; larger frames go on as hyper read them, without a copy.
    ///
    /// An upstream that fails or falls silent for longer than the idle timeout ends the body
    /// with an error, so the client sees a truncated stream, never a clean end. A
    /// `text/event-stream` gets one more event first, in the OpenAI error shape
    /// (`data: {"error": {...}}`, after a blank line that ends any event cut in half), which the
    /// OpenAI SDKs raise as an error: a stream cut short never reads as a short answer.
    pub struct ResponseBody {
        #[pin]
        kind: Kind,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Upstream {
            #[pin]
            body: IdleTimeoutBody<UpstreamBody>,
            // For an event stream: the error that follows the error event, once the server has
            // had a moment to write the event out.
            sse: bool,
            failed: Option<(BoxError, Pin<Box<tokio::time::Sleep>>)>,
            // The target of a pool that answered, until the body ends.
            served: Option<Box<ServedBy>>,
        },
        Full { data: Option<Bytes> },
        Boxed { #[pin] body: UnsyncBoxBody<Bytes, BoxError> },
    }
}

impl ResponseBody {
    /// The upstream's body; `sse` if it is an event stream (`text/event-stream`).
    pub(super) fn upstream(
        body: IdleTimeoutBody<UpstreamBody>,
        sse: bool,
        served: Option<Box<ServedBy>>,
    ) -> Self {
        Self {
            kind: Kind::Upstream {
                body,
                sse,
                failed: None,
                served,
            },
        }
    }
}

impl ResponseBody {
    /// Boxes any other body (the gateway's traced and tapped response bodies), so every
    /// service of the gateway answers with one body type.
    pub fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self {
            kind: Kind::Boxed {
                body: UnsyncBoxBody::new(body.map_err(Into::into)),
            },
        }
    }
}

impl From<Bytes> for ResponseBody {
    fn from(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl Default for ResponseBody {
    fn default() -> Self {
        Self::from(Bytes::new())
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Upstream {
                body,
                sse,
                failed,
                served,
            } => {
                if let Some((_, pause)) = failed.as_mut() {
                    // The error makes the server drop the connection (HTTP/1.1) or reset the
                    // stream (HTTP/2), discarding what it has not written yet: the event
                    // goes out first.
                    ready!(pause.as_mut().poll(cx));
                    let (err, _) = failed.take().expect("checked above");
                    return Poll::Ready(Some(Err(err)));
                }
                match ready!(body.poll_frame(cx)) {
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "upstream response body failed; truncating the stream");
                        if let Some(by) = served.take() {
                            by.truncated();
                        }
                        if *sse {
                            // The event first; the error on the next poll, so the connection
                            // still ends without a clean end of the body.
                            *sse = false;
                            let event = stream_error_event(&err);
                            *failed = Some((err, Box::pin(tokio::time::sleep(EVENT_GRACE))));
                            return Poll::Ready(Some(Ok(Frame::data(event))));
                        }
                        Poll::Ready(Some(Err(err)))
                    }
                    other => Poll::Ready(other),
                }
            }
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Boxed { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, failed, .. } => failed.is_none() && body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
            Kind::Boxed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Boxed { body } => body.size_hint(),
        }
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Upstream { .. } => "Upstream",
            Kind::Full { .. } => "Full",
            Kind::Boxed { .. } => "Boxed",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

/// How long the error event has to leave before the error that cuts the stream.
const EVENT_GRACE: std::time::Duration = std::time::Duration::from_millis(25);

/// The SSE event that tells a client its stream was cut: the OpenAI error shape, with
/// `x-gateway-error`'s code for the cause.
fn stream_error_event(err: &BoxError) -> Bytes {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    let mut code = "upstream_stream_error";
    while let Some(e) = cause {
        if e.is::<crate::error::BodyIdleTimeout>() {
            code = "upstream_idle_timeout";
            break;
        }
        cause = e.source();
    }
    let message = match code {
        "upstream_idle_timeout" => {
            "The upstream fell silent in the middle of the stream; the answer is incomplete."
        }
        _ => "The upstream stream broke off in the middle; the answer is incomplete.",
    };
    let json =
        crate::error::GatewayError::new(http::StatusCode::BAD_GATEWAY, code, message).to_json();
    let mut event = BytesMut::with_capacity(json.len() + 10);
    event.extend_from_slice(b"\n\ndata: ");
    event.extend_from_slice(&json);
    event.extend_from_slice(b"\n\n");
    event.freeze()
}

/// A frame of at least this many bytes is passed on as it is, never copied.
const SMALL_FRAME: usize = 4 << 10;
/// Frames are joined up to this many bytes.
const MAX_JOINED: usize = 16 << 10;

/// An upstream response body: hyper's body, and for HTTP/1.1 the connection that feeds it,
/// driven here so that every frame already in its read buffer is decoded on this poll.
pub(crate) struct UpstreamBody {
    body: Incoming,
    /// The HTTP/1.1 connection, and where it goes back once the body has ended.
    conn: Option<(Box<H1Conn>, Return)>,
    /// What followed the frames joined by the last poll, for the next one.
    next: Option<Option<Result<Frame<Bytes>, BoxError>>>,
}

impl UpstreamBody {
    /// A body whose connection runs elsewhere (HTTP/2).
    pub(crate) fn h2(body: Incoming) -> Self {
        Self {
            body,
            conn: None,
            next: None,
        }
    }

    /// A body that drives its own HTTP/1.1 connection. An empty body (`Content-Length: 0`,
    /// 204, 304, `HEAD`) is never polled: its connection goes back to the pool at once.
    pub(crate) fn driving(body: Incoming, conn: Box<H1Conn>, ret: Return) -> Self {
        let mut this = Self {
            body,
            conn: Some((conn, ret)),
            next: None,
        };
        if this.body.is_end_stream() {
            this.release();
        }
        this
    }

    /// Drives the connection, then takes the next frame if there is one.
    fn poll_one(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let open = match &mut self.conn {
            Some((conn, _)) => conn.drive(cx),
            None => true,
        };
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(None) => {
                self.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending if open => Poll::Pending,
            // Nothing can arrive any more; hyper has already said why if it knew.
            Poll::Pending => {
                self.conn = None;
                Poll::Ready(Some(Err(ConnectionClosed.into())))
            }
        }
    }

    /// Hands on `frame`. A body with a `Content-Length` is not polled after its last byte: when
    /// this is it, the connection goes back to the pool now.
    fn pass(&mut self, frame: Frame<Bytes>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.next.is_none() && self.body.is_end_stream() {
            self.release();
        }
        Poll::Ready(Some(Ok(frame)))
    }

    /// Returns the connection to the pool once the body has ended (the pool drives it to see
    /// the end of the response before it keeps it).
    fn release(&mut self) {
        if let Some((conn, ret)) = self.conn.take() {
            ret.checkin(conn);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(next) = this.next.take() {
            // A held last frame of a body of known length ends it: hyper will not poll again,
            // so the connection goes back to the pool now, as in `pass`.
            return match next {
                Some(Ok(frame)) => this.pass(frame),
                other => Poll::Ready(other),
            };
        }
        let first = match ready!(this.poll_one(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.len() < SMALL_FRAME => data,
                Ok(data) => return this.pass(Frame::data(data)),
                Err(frame) => return this.pass(frame),
            },
            other => return Poll::Ready(other),
        };
        // Every small frame that is already here goes with the first; none is waited for. Each
        // is copied out at once, so hyper's read buffer is free again before its next read
        // and is reused in place instead of reallocated while the frame is still held.
        let mut joined = BytesMut::with_capacity(first.len());
        joined.extend_from_slice(&first);
        drop(first);
        loop {
            match this.poll_one(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data)
                        if data.len() < SMALL_FRAME && joined.len() + data.len() <= MAX_JOINED =>
                    {
                        joined.extend_from_slice(&data);
                    }
                    Ok(data) => {
                        this.next = Some(Some(Ok(Frame::data(data))));
                        break;
                    }
                    Err(frame) => {
                        this.next = Some(Some(Ok(frame)));
                        break;
                    }
                },
                Poll::Ready(other) => {
                    this.next = Some(other);
                    break;
                }
            }
        }
        let data = joined.freeze();
        this.pass(Frame::data(data))
    }

    fn is_end_stream(&self) -> bool {
        match &self.next {
            None => self.body.is_end_stream(),
            // The end was read while joining frames: nothing is left to poll for.
            Some(None) => true,
            Some(Some(_)) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.body.size_hint();
        let held = match &self.next {
            Some(Some(Ok(frame))) => frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        let mut sum = SizeHint::new();
        sum.set_lower(hint.lower() + held);
        if let Some(upper) = hint.upper() {
            sum.set_upper(upper + held);
        }
        sum
    }
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("http1", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}
