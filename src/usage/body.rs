//! The response side of the tap: a body that reads usage as frames pass, and the meter that
//! turns what it read into a span's fields, metrics and a [`Usage`] record.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::parse::{JsonCollector, MAX_EVENT, Observed, SseParser};
use super::{CallInfo, Outcome, Settings, Usage};
use crate::BoxError;
use crate::ext::UsageReport;

/// How the tap reads a response body.
#[derive(Debug)]
pub(crate) enum Mode {
    /// Not a body it understands (or content-encoded): counted, not read.
    Count,
    Sse(SseParser),
    Json(JsonCollector),
}

/// What the tap knows of one call once the upstream answered.
pub(crate) struct Meter {
    info: CallInfo,
    settings: Arc<Settings>,
    status: StatusCode,
    mode: Mode,
    first_byte: Option<Duration>,
    bytes: u64,
    done: bool,
    /// Told the tokens when the body ends, for a layer below that limits them.
    report: Option<UsageReport>,
}

impl Meter {
    pub(crate) fn new(
        info: CallInfo,
        settings: Arc<Settings>,
        status: StatusCode,
        mode: Mode,
        report: Option<UsageReport>,
    ) -> Self {
        Self {
            info,
            settings,
            status,
            mode,
            first_byte: None,
            bytes: 0,
            done: false,
            report,
        }
    }

    fn saw(&mut self, data: &[u8]) {
        if self.first_byte.is_none() && !data.is_empty() {
            self.first_byte = Some(self.info.start.elapsed());
        }
        self.bytes += data.len() as u64;
    }

    /// Reads a frame that passes unchanged.
    fn data(&mut self, data: &Bytes) {
        self.saw(data);
        match &mut self.mode {
            Mode::Count => {}
            Mode::Sse(parser) => parser.feed(data, |_| {}),
            Mode::Json(json) => json.push(data),
        }
    }

    /// Reads a frame of a stream whose usage-only event the client did not ask for, and returns
    /// what goes on to the client: every complete event but that one. Bytes of an event not yet
    /// complete wait in `held` for its end (they are useless to the client before it).
    fn filter(&mut self, data: Bytes, held: &mut BytesMut) -> Bytes {
        let out = self.cut(data, held);
        // What the client gets is what counts.
        self.saw(&out);
        out
    }

    fn cut(&mut self, data: Bytes, held: &mut BytesMut) -> Bytes {
        let Mode::Sse(parser) = &mut self.mode else {
            return data;
        };
        let h = held.len();
        let mut last = 0;
        let mut drops: Vec<(usize, usize)> = Vec::new();
        parser.feed(&data, |b| {
            let end = h + b.end;
            if b.usage_only {
                drops.push((last, end));
            }
            last = end;
        });
        if last == 0 {
            held.extend_from_slice(&data);
            if held.len() > MAX_EVENT {
                // An event the parser skips as too long: pass it on rather than hold it.
                return held.split().freeze();
            }
            return Bytes::new();
        }
        if h == 0 && drops.is_empty() {
            let out = data.slice(..last);
            held.extend_from_slice(&data[last..]);
            return out;
        }
        // Rare: an event spanned frames, or the usage event is cut out. Copy.
        let mut combined = std::mem::take(held);
        combined.extend_from_slice(&data);
        let mut out = BytesMut::with_capacity(last);
        let mut from = 0;
        for (start, end) in drops {
            out.extend_from_slice(&combined[from..start]);
            from = end;
        }
        out.extend_from_slice(&combined[from..last]);
        *held = combined.split_off(last);
        out.freeze()
    }

    /// Records a body already at its end (hyper will not poll it).
    pub(crate) fn finish_complete(&mut self) {
        self.finish(Outcome::Complete, None);
    }

    /// Records a body that ended. A filtered stream's unfinished last event goes out as it is
    /// (next, from `filter`), so it counts.
    fn end(&mut self, filter: Option<&mut Filter>) {
        if let Some(filter) = filter {
            filter.ended = true;
            self.saw(&filter.held);
        }
        self.finish_complete();
    }

    fn finish(&mut self, outcome: Outcome, error: Option<&BoxError>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let observed = match &mut self.mode {
            Mode::Count => Observed::default(),
            Mode::Sse(parser) => std::mem::take(&mut parser.observed),
            Mode::Json(json) => json.finish().unwrap_or_default(),
        };
        if let Some(report) = self.report.take()
            && (observed.input_tokens.is_some() || observed.output_tokens.is_some())
        {
            let tokens = observed.input_tokens.unwrap_or(0) + observed.output_tokens.unwrap_or(0);
            report.report(tokens);
        }
        let duration = self.info.start.elapsed();
        let span = &self.info.span;
        if !span.is_disabled() {
            if let Some(model) = &observed.model {
                span.record("gen_ai.response.model", &**model);
            }
            if let Some(n) = observed.input_tokens {
                span.record("gen_ai.usage.input_tokens", n);
            }
            if let Some(n) = observed.output_tokens {
                span.record("gen_ai.usage.output_tokens", n);
            }
            if let Some(t) = self.first_byte {
                span.record("gateway.time_to_first_byte_ms", millis(t));
            }
            span.record("gateway.duration_ms", millis(duration));
            span.record("http.response.body.size", self.bytes);
            span.record("gateway.outcome", outcome.as_str());
            if let Some(err) = error {
                span.record("error.type", stream_error_cause(err));
                span.record("error.message", tracing::field::display(err));
            }
        }
        if self.settings.metrics {
            self.metrics(&observed, duration, outcome, error);
        }
        if let (Some(counts), Some(account), Some(endpoint)) = (
            &self.settings.counts,
            &self.info.account,
            &self.info.endpoint,
        ) {
            counts.record(
                account,
                endpoint,
                observed.input_tokens.unwrap_or(0),
                observed.output_tokens.unwrap_or(0),
            );
        }
        if let Some(sink) = &self.settings.sink {
            let usage = Usage {
                principal: self.info.principal.take(),
                account: self.info.account.take(),
                endpoint: self.info.endpoint.take(),
                request_id: self.info.request_id.take(),
                status: self.status,
                model: observed.model.map(String::from),
                input_tokens: observed.input_tokens,
                output_tokens: observed.output_tokens,
                time_to_first_token: self.first_byte,
                duration,
                response_bytes: self.bytes,
                outcome,
                attempts: self.info.served.as_ref().map(|s| s.attempts),
                target: self.info.served.take().map(|s| s.target),
            };
            span.in_scope(|| sink.record(usage));
        }
    }

    fn metrics(
        &self,
        observed: &Observed,
        duration: Duration,
        outcome: Outcome,
        error: Option<&BoxError>,
    ) {
        use metrics::SharedString;
        let label = |name: &Option<Arc<str>>| {
            name.clone()
                .map_or(SharedString::const_str(""), SharedString::from)
        };
        let (account, endpoint) = (label(&self.info.account), label(&self.info.endpoint));
        metrics::counter!(
            super::metric::UPSTREAM_RESPONSES,
            "account" => account.clone(),
            "endpoint" => endpoint.clone(),
            "status" => super::metric::status_label(self.status),
            "outcome" => outcome.as_str(),
        )
        .increment(1);
        if let Some(t) = self.first_byte {
            metrics::histogram!(
                super::metric::TIME_TO_FIRST_BYTE,
                "account" => account.clone(),
                "endpoint" => endpoint.clone(),
            )
            .record(t.as_secs_f64());
        }
        metrics::histogram!(
            super::metric::UPSTREAM_DURATION,
            "account" => account.clone(),
            "endpoint" => endpoint.clone(),
        )
        .record(duration.as_secs_f64());
        if let Some(err) = error {
            metrics::counter!(super::metric::ERRORS, "cause" => stream_error_cause(err))
                .increment(1);
        }
        let count = |team: SharedString| {
            for (kind, n) in [
                ("input", observed.input_tokens),
                ("output", observed.output_tokens),
            ] {
                if let Some(n) = n {
                    metrics::counter!(
                        super::metric::TOKENS,
                        "account" => account.clone(),
                        "endpoint" => endpoint.clone(),
                        "team" => team.clone(),
                        "type" => kind,
                    )
                    .increment(n);
                }
            }
        };
        // A principal in several teams counts toward each; one in none toward "".
        match self.info.principal.as_ref().map(|p| &p.teams[..]) {
            Some(teams) if !teams.is_empty() => {
                for team in teams {
                    count(SharedString::from(team.clone()));
                }
            }
            _ => count(SharedString::const_str("")),
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // The body was dropped before its end: the client went away.
        self.finish(Outcome::Cancelled, None);
    }
}

impl fmt::Debug for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meter")
            .field("status", &self.status)
            .field("mode", &self.mode)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The cause label of an error that cut a response stream short.
fn stream_error_cause(err: &BoxError) -> &'static str {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    while let Some(e) = cur {
        #[cfg(feature = "forward")]
        if e.is::<crate::error::BodyIdleTimeout>() {
            return "upstream_idle_timeout";
        }
        cur = e.source();
    }
    "upstream_stream_error"
}

pin_project! {
    /// The response body of [`UsageTap`](super::UsageTap): the inner body, frames passed on as
    /// they come, read for usage on the way.
    pub struct UsageBody<B> {
        #[pin]
        inner: B,
        meter: Option<Box<Meter>>,
        // Set when the tap asked the upstream for a usage event the client did not ask for.
        filter: Option<Box<Filter>>,
    }
}

#[derive(Debug, Default)]
struct Filter {
    held: BytesMut,
    ended: bool,
    /// The upstream's trailers, which go out after what was held.
    trailers: Option<http::HeaderMap>,
}

impl<B> UsageBody<B> {
    /// A body read by `meter`; `hide_usage_event` filters out the usage-only event.
    pub(crate) fn new(inner: B, meter: Meter, hide_usage_event: bool) -> Self {
        Self {
            inner,
            meter: Some(Box::new(meter)),
            filter: hide_usage_event.then(Box::default),
        }
    }

    /// A body the tap does not read (a response the gateway made itself).
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            inner,
            meter: None,
            filter: None,
        }
    }
}

impl<B: From<Bytes>> From<Bytes> for UsageBody<B> {
    fn from(data: Bytes) -> Self {
        Self::passthrough(B::from(data))
    }
}

impl<B> Body for UsageBody<B>
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
        let mut this = self.project();
        loop {
            if let Some(filter) = this.filter.as_deref_mut()
                && filter.ended
            {
                // An unfinished last event goes out as it is, then the trailers.
                let rest = filter.held.split().freeze();
                if !rest.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                return Poll::Ready(filter.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(err)) => {
                    let err = err.into();
                    if let Some(meter) = this.meter.as_deref_mut() {
                        meter.finish(Outcome::Failed, Some(&err));
                    }
                    return Poll::Ready(Some(Err(err)));
                }
                None => {
                    if let Some(meter) = this.meter.as_deref_mut() {
                        meter.end(this.filter.as_deref_mut());
                    }
                    if this.filter.is_none() {
                        return Poll::Ready(None);
                    }
                    // The filter hands on what it held.
                    continue;
                }
            };
            let Some(meter) = this.meter.as_deref_mut() else {
                return Poll::Ready(Some(Ok(frame)));
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                // Trailers are a body's last frame: the body has ended.
                Err(frame) => {
                    meter.end(this.filter.as_deref_mut());
                    match (this.filter.as_deref_mut(), frame.into_trailers()) {
                        (Some(filter), Ok(trailers)) => {
                            filter.trailers = Some(trailers);
                            continue;
                        }
                        (_, Ok(trailers)) => {
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        (_, Err(frame)) => return Poll::Ready(Some(Ok(frame))),
                    }
                }
            };
            // A body of known length ends with its last frame: hyper never polls it again.
            let last = this.inner.is_end_stream();
            let out = match this.filter.as_deref_mut() {
                None => {
                    meter.data(&data);
                    data
                }
                Some(filter) => meter.filter(data, &mut filter.held),
            };
            if last {
                meter.end(this.filter.as_deref_mut());
            }
            // A filtered frame that held all it read goes nowhere: read on (or end).
            if !out.is_empty() || this.filter.is_none() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.filter {
            Some(filter) => filter.ended && filter.held.is_empty() && filter.trailers.is_none(),
            None => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.filter {
            Some(_) => SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

impl<B> fmt::Debug for UsageBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageBody")
            .field("meter", &self.meter)
            .finish_non_exhaustive()
    }
}
