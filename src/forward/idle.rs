//! The idle timeout of a body, either way: the longest silence between two frames.
//!
//! Why not tower-http's `timeout::TimeoutBody`: it creates and registers a new `Sleep` in the
//! runtime's timer wheel on every poll after a frame, and polls it before the body, so each
//! token event of a stream costs a timer registration and removal. [`IdleTimeoutBody`] reads
//! the clock once per wait and touches its one timer only when it fires, so a burst of ready
//! frames costs nothing; its error, [`BodyIdleTimeout`](crate::error::BodyIdleTimeout), tells
//! `classify` which way the silence was.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::BoxError;
use crate::error::BodyIdleTimeout;

pin_project! {
    /// A body that fails with [`BodyIdleTimeout`] when its source stays silent for `idle`
    /// while it is being waited on.
    ///
    /// Silence is measured from the first poll that found no frame, so a slow reader
    /// (backpressure) never counts as a silent source. Unlike re-arming a timer for every
    /// frame, this reads the clock once per wait and touches the timer only when it fires:
    /// a burst of ready frames costs nothing.
    pub(crate) struct IdleTimeoutBody<B> {
        #[pin]
        body: B,
        #[pin]
        sleep: Sleep,
        idle: Duration,
        waiting_since: Option<Instant>,
    }
}

impl<B> IdleTimeoutBody<B> {
    pub(crate) fn new(idle: Duration, body: B) -> Self {
        Self {
            body,
            sleep: tokio::time::sleep(idle),
            idle,
            waiting_since: None,
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            *this.waiting_since = None;
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        let since = *this.waiting_since.get_or_insert_with(Instant::now);
        let deadline = since + *this.idle;
        // The timer's deadline is never later than the real one; when it fires early, re-arm.
        loop {
            ready!(this.sleep.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(Some(Err(BodyIdleTimeout(*this.idle).into())));
            }
            this.sleep.as_mut().reset(deadline);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use std::io;
    use tokio::sync::mpsc;

    struct Channel(mpsc::Receiver<Bytes>);

    impl Body for Channel {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_keeps_sending_runs_as_long_as_it_likes() {
        let (tx, rx) = mpsc::channel(1);
        let mut body = Box::pin(IdleTimeoutBody::new(Duration::from_secs(10), Channel(rx)));
        tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_secs(9)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
        });
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            frame.unwrap();
            frames += 1;
        }
        assert_eq!(
            frames, 100,
            "900 s of a stream with 9 s gaps under a 10 s idle timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silence_longer_than_idle_fails() {
        let (tx, rx) = mpsc::channel(1);
        let mut body = Box::pin(IdleTimeoutBody::new(Duration::from_secs(10), Channel(rx)));
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        body.frame().await.unwrap().unwrap();
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyIdleTimeout>());
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_not_a_silent_source() {
        let (tx, rx) = mpsc::channel(4);
        let mut body = Box::pin(IdleTimeoutBody::new(Duration::from_secs(10), Channel(rx)));
        for _ in 0..4 {
            tx.send(Bytes::from_static(b"x")).await.unwrap();
        }
        for _ in 0..4 {
            // The reader dawdles far past the idle timeout between reads.
            tokio::time::sleep(Duration::from_secs(60)).await;
            body.frame().await.unwrap().unwrap();
        }
    }
}
