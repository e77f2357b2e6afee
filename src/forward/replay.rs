//! A request body that can be sent again: each attempt reads what earlier attempts read (the
//! same `Bytes`, no copy) and then what the client sends next, up to a size past which the
//! body is sent once and no longer replayable.
//!
//! Only one attempt reads at a time: starting the next one ([`Replay::next_attempt`])
//! supersedes the one before, whose body reads nothing more, even if an HTTP/2 connection's
//! task still polls it. A failure of the client's own body (too large, silent, broken) is kept:
//! every later read fails with it, and [`Replay::client_fault`] tells the attempt loop that
//! the client, not the target, is to blame.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::UpstreamRequestBody;
use crate::BoxError;
use crate::error::{BodyIdleTimeout, InvalidRequestBody, PayloadTooLarge};

/// How the client's body failed.
#[derive(Clone, Debug)]
enum ClientFault {
    TooLarge,
    Silent(Duration),
    Broken(String),
}

impl ClientFault {
    /// How the client's body failed, if `err` says it did: too large, silent or broken.
    fn find(err: &BoxError) -> Option<Self> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
        while let Some(e) = cause {
            if e.is::<http_body_util::LengthLimitError>() || e.is::<PayloadTooLarge>() {
                return Some(Self::TooLarge);
            }
            if let Some(t) = e.downcast_ref::<BodyIdleTimeout>() {
                return Some(Self::Silent(t.0));
            }
            if e.is::<InvalidRequestBody>() {
                return Some(Self::Broken(e.to_string()));
            }
            cause = e.source();
        }
        None
    }

    /// An error of the client's body itself: whatever it is, it is the client's.
    fn of(err: &BoxError) -> Self {
        Self::find(err).unwrap_or_else(|| Self::Broken(err.to_string()))
    }

    /// The error the rescue layer answers for it (413, 408, 400), as on the direct path.
    fn error(&self) -> BoxError {
        match self {
            Self::TooLarge => PayloadTooLarge::new().into(),
            Self::Silent(d) => BodyIdleTimeout(*d).into(),
            Self::Broken(m) => InvalidRequestBody(m.clone().into()).into(),
        }
    }
}

/// The client's body and what attempts have read of it.
struct Shared {
    /// What the client has not sent yet; `None` once it ended.
    rest: Option<UpstreamRequestBody>,
    /// Every data frame read so far, while `replayable`; frames before `pos` were read by the
    /// current attempt.
    recorded: Vec<Bytes>,
    pos: usize,
    trailers: Option<HeaderMap>,
    /// Whether the current attempt has sent the trailers.
    trailers_sent: bool,
    recorded_len: u64,
    /// Bytes read from the client so far, and how many its body declared.
    read_len: u64,
    exact: Option<u64>,
    max: u64,
    replayable: bool,
    fault: Option<ClientFault>,
    /// The attempt allowed to read; an earlier attempt's body reads nothing more.
    current: u32,
    hint: SizeHint,
}

/// Whether an attempt's error is the client's body failing (too large, silent, broken), as
/// the error says; over HTTP/2 it may not, and [`Replay::client_fault`] does.
pub(crate) fn is_client_fault(err: &BoxError) -> bool {
    ClientFault::find(err).is_some()
}

/// The client's body, shared by the attempts of one request.
#[derive(Clone)]
pub(crate) struct Replay(Arc<Mutex<Shared>>);

impl Replay {
    /// Holds `body` (the client's, already behind its size limit and idle timeout) for up to
    /// `max` bytes; with `max` 0, a body is sent once.
    pub(crate) fn new(body: UpstreamRequestBody, max: u64) -> Self {
        let hint = body.size_hint();
        let replayable = hint.lower() <= max;
        Self(Arc::new(Mutex::new(Shared {
            rest: Some(body),
            recorded: Vec::new(),
            pos: 0,
            trailers: None,
            trailers_sent: false,
            recorded_len: 0,
            read_len: 0,
            exact: hint.exact(),
            max,
            replayable,
            fault: None,
            current: 1,
            hint,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first attempt's body.
    pub(crate) fn first(&self) -> ReplayBody {
        let shared = self.lock();
        ReplayBody {
            shared: self.0.clone(),
            attempt: shared.current,
            hint: shared.hint,
        }
    }

    /// The next attempt's body, which supersedes every earlier one at once; `None` if the body
    /// cannot be sent again (it outgrew the limit, or the client's body failed).
    pub(crate) fn next_attempt(&self) -> Option<ReplayBody> {
        let mut shared = self.lock();
        if !shared.replayable || shared.fault.is_some() {
            return None;
        }
        shared.current += 1;
        shared.pos = 0;
        shared.trailers_sent = false;
        Some(ReplayBody {
            shared: self.0.clone(),
            attempt: shared.current,
            hint: shared.hint,
        })
    }

    /// The client's body failed: its error (what the client would get on the direct path).
    pub(crate) fn client_fault(&self) -> Option<BoxError> {
        self.lock().fault.as_ref().map(ClientFault::error)
    }

    /// Whether the current attempt has sent the whole body (so a silence that follows is the
    /// upstream's, not the client's).
    pub(crate) fn sent_all(&self) -> bool {
        let shared = self.lock();
        // HTTP/1.1 stops reading a body at its declared length, before its end is seen.
        let client_done = shared.rest.is_none() || shared.exact == Some(shared.read_len);
        client_done
            && shared.fault.is_none()
            && (!shared.replayable || shared.pos >= shared.recorded.len())
    }

    /// No attempt follows: what the current attempt has read is let go, and nothing more is
    /// kept.
    pub(crate) fn stop(&self) {
        let mut shared = self.lock();
        let read = shared.pos.min(shared.recorded.len());
        shared.recorded.drain(..read);
        shared.pos = 0;
        shared.max = 0;
        shared.replayable = false;
    }
}

/// One attempt's request body.
pub(crate) struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    attempt: u32,
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
        let mut guard = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &mut *guard;
        if shared.current != this.attempt {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        if let Some(fault) = &shared.fault {
            return Poll::Ready(Some(Err(fault.error())));
        }
        if let Some(data) = shared.recorded.get(shared.pos) {
            shared.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        if let Some(rest) = shared.rest.as_mut() {
            match Pin::new(rest).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => shared.rest = None,
                Poll::Ready(Some(Err(err))) => {
                    // Kept: no later attempt sends a body cut short as if it were whole.
                    shared.fault = Some(ClientFault::of(&err));
                    shared.replayable = false;
                    shared.recorded = Vec::new();
                    shared.pos = 0;
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            let len = data.len() as u64;
                            shared.read_len += len;
                            if shared.replayable && shared.recorded_len + len <= shared.max {
                                shared.recorded_len += len;
                                shared.recorded.push(data.clone());
                                shared.pos += 1;
                            } else if shared.replayable {
                                // Too large to hold: sent once, never again.
                                shared.replayable = false;
                                shared.recorded = Vec::new();
                                shared.pos = 0;
                            }
                            Frame::data(data)
                        }
                        Err(frame) => {
                            if let Some(t) = frame.trailers_ref() {
                                shared.trailers = Some(t.clone());
                                shared.trailers_sent = true;
                            }
                            frame
                        }
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
        // The client's body has ended (HTTP/2 may stop polling after the trailers, so an
        // attempt that replays sends them from the record).
        if !shared.trailers_sent
            && let Some(trailers) = shared.trailers.clone()
        {
            shared.trailers_sent = true;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        // Known once the client's body has ended and this attempt has sent all of it: saves
        // hyper a poll (and a lock) per request.
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.current == self.attempt
            && shared.fault.is_none()
            && shared.rest.is_none()
            && shared.pos >= shared.recorded.len()
            && (shared.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use http_body_util::combinators::UnsyncBoxBody;

    /// A client body of `frames`, then `end`: `None` ends it, `Some` fails it.
    fn client(frames: &[&'static str], end: Option<BoxError>) -> UpstreamRequestBody {
        let mut items: Vec<Result<Frame<Bytes>, BoxError>> = frames
            .iter()
            .map(|f| Ok(Frame::data(Bytes::from_static(f.as_bytes()))))
            .collect();
        items.extend(end.map(Err));
        UnsyncBoxBody::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            items,
        )))
    }

    async fn read(mut body: ReplayBody) -> (Vec<u8>, Option<String>) {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => out.extend_from_slice(&f.into_data().unwrap_or_default()),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn a_second_attempt_sends_what_the_first_read_and_then_the_rest() {
        let replay = Replay::new(client(&["ab", "cd", "ef"], None), 100);
        let mut first = replay.first();
        // The first attempt reads two frames and fails.
        first.frame().await.unwrap().unwrap();
        first.frame().await.unwrap().unwrap();
        let second = replay.next_attempt().unwrap();
        assert!(first.frame().await.unwrap().is_err(), "superseded");
        assert_eq!(read(second).await, (b"abcdef".to_vec(), None));
        let third = replay.next_attempt().unwrap();
        assert_eq!(read(third).await, (b"abcdef".to_vec(), None));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_replayable_even_when_the_check_races_the_read() {
        let replay = Replay::new(client(&["aaaa", "bbbb", "cccc"], None), 6);
        let mut first = replay.first();
        first.frame().await.unwrap().unwrap();
        // The limit is crossed by the first attempt's next read: no attempt follows.
        first.frame().await.unwrap().unwrap();
        assert!(replay.next_attempt().is_none());
        assert_eq!(read(first).await, (b"cccc".to_vec(), None));
    }

    #[tokio::test]
    async fn a_client_body_that_fails_stays_failed_and_is_the_clients_fault() {
        let replay = Replay::new(
            client(
                &["{\"model\":"],
                Some(InvalidRequestBody("bad chunk".into()).into()),
            ),
            100,
        );
        let (got, err) = read(replay.first()).await;
        assert_eq!(got, b"{\"model\":");
        assert!(err.is_some());
        assert!(replay.next_attempt().is_none(), "never sent cut short");
        assert!(replay.client_fault().unwrap().is::<InvalidRequestBody>());
        let replay = Replay::new(client(&["x"], Some(PayloadTooLarge::new().into())), 100);
        let _ = read(replay.first()).await;
        assert!(replay.client_fault().unwrap().is::<PayloadTooLarge>());
    }

    #[tokio::test]
    async fn trailers_are_replayed_and_stop_lets_go_of_what_was_read() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "1".parse().unwrap());
        let items: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let body = UnsyncBoxBody::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            items,
        )));
        let replay = Replay::new(body, 100);
        let mut first = replay.first();
        first.frame().await.unwrap().unwrap();
        let t = first.frame().await.unwrap().unwrap();
        assert_eq!(t.trailers_ref(), Some(&trailers));
        let mut second = replay.next_attempt().unwrap();
        assert_eq!(
            second.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        assert_eq!(
            second.frame().await.unwrap().unwrap().trailers_ref(),
            Some(&trailers)
        );
        assert!(second.frame().await.is_none());
        assert!(second.is_end_stream());
        replay.stop();
        assert!(replay.next_attempt().is_none());
        assert!(replay.sent_all());
    }
}
