use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use super::IdleTimeoutBody;

use crate::BoxError;

pin_project! {
    /// The response body of [`Forward`](super::Forward): the upstream's body streamed frame by
    /// frame (each frame is the `Bytes` hyper read, passed on without a copy), or a small
    /// gateway-made body.
    ///
    /// An upstream that fails or falls silent for longer than the idle timeout ends the body
    /// with an error, so the client sees a truncated stream, never a clean end.
    pub struct ResponseBody {
        #[pin]
        kind: Kind,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Upstream { #[pin] body: IdleTimeoutBody<Incoming> },
        Full { data: Option<Bytes> },
        Boxed { #[pin] body: UnsyncBoxBody<Bytes, BoxError> },
    }
}

impl ResponseBody {
    pub(crate) fn upstream(body: IdleTimeoutBody<Incoming>) -> Self {
        Self {
            kind: Kind::Upstream { body },
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
            KindProj::Upstream { body } => match ready!(body.poll_frame(cx)) {
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "upstream response body failed; truncating the stream");
                    Poll::Ready(Some(Err(err)))
                }
                other => Poll::Ready(other),
            },
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Boxed { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
            Kind::Boxed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body } => body.size_hint(),
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
