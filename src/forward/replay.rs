//! A request body that can be sent again: each attempt reads what earlier attempts read (the
//! same `Bytes`, no copy) and then what the client sends next, up to a size past which the
//! body is sent once and no longer replayable.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::UpstreamRequestBody;
use crate::BoxError;

/// The client's body and what attempts have read of it.
struct Shared {
    /// What the client has not sent yet; `None` once it ended.
    rest: Option<UpstreamRequestBody>,
    /// Every data frame read so far, while `replayable`.
    recorded: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    recorded_len: u64,
    max: u64,
    replayable: bool,
    /// The attempt allowed to read; an earlier attempt's body reads nothing more.
    current: u32,
    hint: SizeHint,
}

/// The client's body, shared by the attempts of one request.
#[derive(Clone)]
pub(crate) struct Replay(Arc<Mutex<Shared>>);

impl Replay {
    /// Holds `body` for up to `max` bytes.
    pub(crate) fn new(body: UpstreamRequestBody, max: u64) -> Self {
        let hint = body.size_hint();
        let replayable = hint.lower() <= max;
        Self(Arc::new(Mutex::new(Shared {
            rest: Some(body),
            recorded: Vec::new(),
            trailers: None,
            recorded_len: 0,
            max,
            replayable,
            current: 0,
            hint,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether another attempt can send the whole body again.
    pub(crate) fn replayable(&self) -> bool {
        self.lock().replayable
    }

    /// The body of the next attempt; every earlier attempt's body stops reading.
    pub(crate) fn attempt(&self) -> ReplayBody {
        let mut shared = self.lock();
        shared.current += 1;
        ReplayBody {
            shared: self.0.clone(),
            attempt: shared.current,
            pos: 0,
            trailers_sent: false,
            hint: shared.hint,
        }
    }
}

/// One attempt's request body.
pub(crate) struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    attempt: u32,
    pos: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

/// A superseded attempt's body was read.
#[derive(Debug)]
struct Superseded;

impl std::fmt::Display for Superseded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body went to a later attempt")
    }
}

impl std::error::Error for Superseded {}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if shared.current != this.attempt {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        // Once the body outgrew the limit, the attempt reading it is the last one, and it has
        // read everything recorded.
        if shared.replayable
            && let Some(data) = shared.recorded.get(this.pos)
        {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        let Some(rest) = shared.rest.as_mut() else {
            if this.trailers_sent {
                return Poll::Ready(None);
            }
            this.trailers_sent = true;
            return Poll::Ready(shared.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        };
        let frame = match Pin::new(rest).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                shared.rest = None;
                this.trailers_sent = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let len = data.len() as u64;
                if shared.replayable && shared.recorded_len + len <= shared.max {
                    shared.recorded_len += len;
                    shared.recorded.push(data.clone());
                    this.pos += 1;
                } else if shared.replayable {
                    // Too large to hold: sent once, never again.
                    shared.replayable = false;
                    shared.recorded = Vec::new();
                }
                Frame::data(data)
            }
            Err(frame) => {
                if let Some(t) = frame.trailers_ref() {
                    shared.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                frame
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        // The end is known once the client's body has ended and this attempt has sent all of
        // it: saves hyper a poll (and a lock) per request.
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.current == self.attempt
            && shared.rest.is_none()
            && (self.trailers_sent || shared.trailers.is_none())
            && (!shared.replayable || self.pos >= shared.recorded.len())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}
