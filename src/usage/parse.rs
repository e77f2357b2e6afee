//! Incremental readers of `model` and `usage` in OpenAI-compatible responses.
//!
//! [`SseParser`] reads a `text/event-stream` as its frames pass: it keeps only the line and the
//! event being read (capped), never a frame, and reports every event boundary so a caller can
//! cut an event out without holding anything else. [`JsonCollector`] keeps the frames of a
//! small `application/json` body (as `Bytes`, no copy) and reads them once at the end.

use std::sync::LazyLock;

use bytes::Bytes;
use memchr::memmem;
use serde::Deserialize;
use serde::de::IgnoredAny;

/// The longest line or event (bytes) the SSE parser reads; longer ones are skipped whole.
pub(crate) const MAX_EVENT: usize = 1 << 20;

/// How many events are read looking for a `model` before giving up on it.
const MODEL_TRIES: u8 = 3;

/// The largest JSON body (bytes) whose usage is read; larger bodies pass unread.
pub(crate) const MAX_JSON: usize = 4 << 20;

/// What a response told about its model and token counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Observed {
    pub(crate) model: Option<Box<str>>,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    usage: Option<TokenCounts>,
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
}

#[derive(Deserialize)]
struct TokenCounts {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
}

impl Observed {
    /// Reads one JSON document (an SSE event's data or a whole body). Returns whether it was a
    /// usage-only chunk (`usage` set and `choices` empty, the chunk `stream_options.include_usage`
    /// adds at the end of a stream), or `None` if it is not a JSON object.
    fn read(&mut self, json: &[u8]) -> Option<bool> {
        let chunk: Chunk<'_> = serde_json::from_slice(json).ok()?;
        if self.model.is_none()
            && let Some(model) = chunk.model
        {
            self.model = Some(model.into());
        }
        let usage_only = match chunk.usage {
            Some(usage) => {
                self.input_tokens = usage.prompt_tokens.or(self.input_tokens);
                self.output_tokens = usage.completion_tokens.or(self.output_tokens);
                chunk.choices.is_some_and(|c| c.is_empty())
            }
            None => false,
        };
        Some(usage_only)
    }
}

/// What follows each `"usage"` in `raw`: the value after its `:` (leading whitespace trimmed),
/// or `None` where no `:` follows (the key is not one, or its value is on another line).
fn usage_values(raw: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    static FINDER: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
    let mut from = 0;
    std::iter::from_fn(move || {
        let at = from + FINDER.find(&raw[from..])?;
        from = at + FINDER.needle().len();
        let rest = raw[from..].trim_ascii_start().strip_prefix(b":");
        Some(rest.map(<[u8]>::trim_ascii_start))
    })
}

/// Whether every `"usage"` in the raw bytes of some events is followed by `: null`: only then
/// may the fast path pass over them. Stricter than [`has_usage_object`] on purpose, since the
/// raw bytes are not the events' data (an event may split its JSON over several `data:` lines).
fn only_null_usage(raw: &[u8]) -> bool {
    usage_values(raw).all(|v| v.is_some_and(|v| v.starts_with(b"null")))
}

/// Whether `json` has a `"usage"` key followed by an object (not `null`): the only events worth
/// parsing once the model is known.
fn has_usage_object(json: &[u8]) -> bool {
    usage_values(json).any(|v| v.is_some_and(|v| v.first() == Some(&b'{')))
}

/// An event boundary reported by [`SseParser::feed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Boundary {
    /// Offset in the fed chunk just past the blank line that ended the event.
    pub(crate) end: usize,
    /// The event was a usage-only chunk.
    pub(crate) usage_only: bool,
}

/// Reads `model` and `usage` from a Server-Sent Events stream, frame by frame.
///
/// Lines end with `\n`, `\r\n` or `\r` (also when split across frames); an event's `data:`
/// lines are joined with `\n` and read when the blank line ending the event arrives. `[DONE]`,
/// comments, other fields and malformed JSON are skipped; they never stop the stream.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// The current line, when it started in an earlier frame.
    line: Vec<u8>,
    /// The data of the current event.
    data: Vec<u8>,
    has_data: bool,
    /// The current line or event outgrew [`MAX_EVENT`]: skip it.
    overflow_line: bool,
    overflow_event: bool,
    /// The last frame ended with `\r`: a `\n` opening the next one belongs to it.
    after_cr: bool,
    pub(crate) observed: Observed,
    /// Events read for their `model` so far: only the first few are, so a stream that names
    /// none is not parsed event by event.
    model_tries: u8,
    /// Events whose data was not a JSON object (besides `[DONE]`).
    pub(crate) malformed: u32,
}

impl SseParser {
    /// Reads `chunk`, calling `on_boundary` at the end of every event (a blank line).
    pub(crate) fn feed(&mut self, chunk: &[u8], mut on_boundary: impl FnMut(Boundary)) {
        let mut pos = 0;
        if std::mem::take(&mut self.after_cr) && chunk.first() == Some(&b'\n') {
            pos = 1;
        }
        let mut tried_fast = false;
        while pos < chunk.len() {
            // Fast path, the common one once the model is known: at an event's start, the
            // chunk's complete events (up to its last blank line) hold no `"usage": {…}` (a
            // `"usage": null` is fine), so they are passed over in vectorised searches instead
            // of line by line. Tried once a chunk, at its first event start.
            if !tried_fast
                && self.at_event_start()
                && (self.observed.model.is_some() || self.model_tries >= MODEL_TRIES)
            {
                tried_fast = true;
                if let Some(blank) = memmem::rfind(&chunk[pos..], b"\n\n") {
                    let end = pos + blank + 2;
                    if only_null_usage(&chunk[pos..end]) {
                        on_boundary(Boundary {
                            end,
                            usage_only: false,
                        });
                        pos = end;
                        continue;
                    }
                }
            }
            let Some(i) = memchr::memchr2(b'\n', b'\r', &chunk[pos..]) else {
                self.carry(&chunk[pos..]);
                return;
            };
            let end = pos + i;
            let mut next = end + 1;
            if chunk[end] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let blank = if self.line.is_empty() && !self.overflow_line {
                self.line_done(&chunk[pos..end])
            } else {
                self.carry(&chunk[pos..end]);
                let line = std::mem::take(&mut self.line);
                let blank = if self.overflow_line {
                    false
                } else {
                    self.line_done(&line)
                };
                self.line = line;
                self.line.clear();
                self.overflow_line = false;
                blank
            };
            if blank {
                let usage_only = self.dispatch();
                on_boundary(Boundary {
                    end: next,
                    usage_only,
                });
            }
            pos = next;
        }
    }

    /// Whether nothing of a line or an event is in progress.
    fn at_event_start(&self) -> bool {
        self.line.is_empty()
            && !self.overflow_line
            && !self.has_data
            && !self.overflow_event
            && !self.after_cr
    }

    fn carry(&mut self, part: &[u8]) {
        if self.overflow_line {
            return;
        }
        if self.line.len() + part.len() > MAX_EVENT {
            self.overflow_line = true;
            self.line = Vec::new();
        } else {
            self.line.extend_from_slice(part);
        }
    }

    /// Takes one complete line; returns whether it was blank (the end of an event).
    fn line_done(&mut self, line: &[u8]) -> bool {
        if line.is_empty() {
            return true;
        }
        if let Some(value) = line.strip_prefix(b"data") {
            let value = match value {
                [] => value,
                [b':', b' ', rest @ ..] | [b':', rest @ ..] => rest,
                // `dataX: …` is another field.
                _ => return false,
            };
            if self.overflow_event {
                return false;
            }
            if self.data.len() + value.len() + 1 > MAX_EVENT {
                self.overflow_event = true;
                self.data = Vec::new();
                return false;
            }
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
        false
    }

    /// Reads the event just ended; returns whether it was a usage-only chunk.
    fn dispatch(&mut self) -> bool {
        let overflow = std::mem::take(&mut self.overflow_event);
        if !std::mem::take(&mut self.has_data) || overflow {
            self.data.clear();
            return false;
        }
        let data = self.data.trim_ascii();
        let mut usage_only = false;
        let want_model = self.observed.model.is_none() && self.model_tries < MODEL_TRIES;
        if data != b"[DONE]" && (want_model || has_usage_object(data)) {
            self.model_tries = self.model_tries.saturating_add(1);
            match self.observed.read(data) {
                Some(only) => usage_only = only,
                None => self.malformed += 1,
            }
        }
        self.data.clear();
        usage_only
    }
}

/// Keeps a small JSON body's frames (refcounted, not copied) to read its usage at the end.
#[derive(Debug, Default)]
pub(crate) struct JsonCollector {
    parts: Vec<Bytes>,
    len: usize,
    overflow: bool,
}

impl JsonCollector {
    pub(crate) fn push(&mut self, frame: &Bytes) {
        if self.overflow {
            return;
        }
        self.len += frame.len();
        if self.len > MAX_JSON {
            self.overflow = true;
            self.parts = Vec::new();
        } else {
            self.parts.push(frame.clone());
        }
    }

    /// Reads the body; `None` if it was too large or not a JSON object.
    pub(crate) fn finish(&mut self) -> Option<Observed> {
        if self.overflow {
            return None;
        }
        let parts = std::mem::take(&mut self.parts);
        let mut observed = Observed::default();
        match parts.as_slice() {
            [one] => observed.read(one)?,
            _ => observed.read(&parts.concat())?,
        };
        Some(observed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        ": keep-alive comment\n\n",
        "data: {\"broken\": \n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\r\n\r\n",
        "event: message\ndata: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \\\"usage\\\": {\"}}]}\n\n",
        "data: not json at all\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\n",
        "data:\"usage\":{\"prompt_tokens\":17,\"completion_tokens\":42,\"total_tokens\":59}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected() -> Observed {
        Observed {
            model: Some("meta-llama/Llama-3.1-8B-Instruct".into()),
            input_tokens: Some(17),
            output_tokens: Some(42),
        }
    }

    /// What a caller relies on: every boundary reported is one of the stream's (the fast path
    /// reports only the last of a run of events without usage), the usage-only ones are all
    /// there, and so is the last. A boundary that falls between the `\r` and the `\n` of a
    /// split `\r\n` may come one byte early: the `\n` then opens the next segment as an empty
    /// line.
    fn same_boundaries(got: &[(usize, bool)], whole: &[(usize, bool)], bytes: &[u8]) -> bool {
        let matches = |g: &(usize, bool), w: &(usize, bool)| {
            g.1 == w.1 && (g.0 == w.0 || (g.0 + 1 == w.0 && bytes[g.0 - 1..=g.0] == *b"\r\n"))
        };
        got.iter().all(|g| whole.iter().any(|w| matches(g, w)))
            && whole
                .iter()
                .filter(|w| w.1)
                .all(|w| got.iter().any(|g| matches(g, w)))
            && matches(got.last().unwrap(), whole.last().unwrap())
    }

    fn run(frames: &[&[u8]]) -> (SseParser, Vec<(usize, bool)>) {
        let mut parser = SseParser::default();
        let mut boundaries = Vec::new();
        let mut offset = 0;
        for frame in frames {
            parser.feed(frame, |b| boundaries.push((offset + b.end, b.usage_only)));
            offset += frame.len();
        }
        (parser, boundaries)
    }

    #[test]
    fn whole_stream_in_one_frame() {
        let (parser, boundaries) = run(&[STREAM.as_bytes()]);
        assert_eq!(parser.observed, expected());
        assert_eq!(
            parser.malformed, 1,
            "the malformed event read while looking for the model is skipped"
        );
        assert_eq!(boundaries.len(), 8);
        assert_eq!(
            boundaries.iter().filter(|(_, u)| *u).count(),
            1,
            "one usage-only event"
        );
        assert_eq!(boundaries.last().unwrap().0, STREAM.len());
    }

    #[test]
    fn cut_at_every_byte_gives_the_same_usage_and_boundaries() {
        let bytes = STREAM.as_bytes();
        let (_, whole) = run(&[bytes]);
        for cut in 0..=bytes.len() {
            let (parser, boundaries) = run(&[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(parser.observed, expected(), "cut at {cut}");
            assert!(same_boundaries(&boundaries, &whole, bytes), "cut at {cut}");
        }
    }

    #[test]
    fn cut_into_three_at_every_pair_of_positions() {
        let bytes = STREAM.as_bytes();
        let (_, whole) = run(&[bytes]);
        for a in (0..bytes.len()).step_by(7) {
            for b in a..=bytes.len() {
                let (parser, boundaries) = run(&[&bytes[..a], &bytes[a..b], &bytes[b..]]);
                assert_eq!(parser.observed, expected(), "cuts at {a}, {b}");
                assert!(
                    same_boundaries(&boundaries, &whole, bytes),
                    "cuts at {a}, {b}"
                );
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let bytes = STREAM.as_bytes();
        let frames: Vec<&[u8]> = bytes.chunks(1).collect();
        let (parser, boundaries) = run(&frames);
        assert_eq!(parser.observed, expected());
        assert!(same_boundaries(&boundaries, &run(&[bytes]).1, bytes));
    }

    #[test]
    fn lone_cr_line_endings() {
        let stream = STREAM.replace("\r\n", "\n").replace('\n', "\r");
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            let (parser, boundaries) = run(&[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(parser.observed, expected(), "cut at {cut}");
            assert!(
                !boundaries.is_empty() && boundaries.len() <= 8,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn the_first_model_and_the_last_usage_win() {
        let stream = concat!(
            "data: {\"model\":\"a\",\"choices\":[]}\n\n",
            "data: {\"model\":\"b\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
            "data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4},\"choices\":[{}]}\n\n",
        );
        let (parser, boundaries) = run(&[stream.as_bytes()]);
        assert_eq!(parser.observed.model.as_deref(), Some("a"));
        assert_eq!(parser.observed.input_tokens, Some(3));
        assert_eq!(parser.observed.output_tokens, Some(4));
        assert!(
            boundaries.iter().all(|(_, u)| !u),
            "no event here is usage-only"
        );
    }

    #[test]
    fn an_oversized_event_is_skipped_and_the_stream_goes_on() {
        let big = "x".repeat(MAX_EVENT + 10);
        let stream = format!(
            "data: {{\"model\":\"{big}\"}}\n\ndata: {{\"model\":\"m\",\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":6}}}}\n\n"
        );
        let bytes = stream.as_bytes();
        let frames: Vec<&[u8]> = bytes.chunks(4096).collect();
        let (parser, boundaries) = run(&frames);
        assert_eq!(parser.observed.model.as_deref(), Some("m"));
        assert_eq!(parser.observed.input_tokens, Some(5));
        assert_eq!(boundaries.len(), 2);
        assert!(parser.line.capacity() <= MAX_EVENT && parser.data.capacity() <= MAX_EVENT);
    }

    #[test]
    fn anthropic_style_names_are_read_too() {
        let mut json = JsonCollector::default();
        json.push(&Bytes::from_static(
            b"{\"model\":\"m\",\"usage\":{\"input_tokens\":",
        ));
        json.push(&Bytes::from_static(b"3,\"output_tokens\":9}}"));
        let observed = json.finish().unwrap();
        assert_eq!(observed.input_tokens, Some(3));
        assert_eq!(observed.output_tokens, Some(9));
    }

    #[test]
    fn json_body_over_the_cap_or_malformed_reads_nothing() {
        let mut json = JsonCollector::default();
        json.push(&Bytes::from(vec![b' '; MAX_JSON + 1]));
        assert_eq!(json.finish(), None);
        let mut json = JsonCollector::default();
        json.push(&Bytes::from_static(b"[1,2,3]"));
        assert_eq!(json.finish(), None);
    }

    #[test]
    fn a_stream_without_a_model_is_not_parsed_event_by_event() {
        let mut stream = String::new();
        for i in 0..100 {
            stream.push_str(&format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
            ));
        }
        stream.push_str("data: {not json}\n\n");
        stream.push_str("data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":100}}\n\n");
        let (parser, _) = run(&[stream.as_bytes()]);
        assert_eq!(
            parser.model_tries,
            MODEL_TRIES + 1,
            "three tries, then the usage event"
        );
        assert_eq!(parser.malformed, 0, "the malformed event was never read");
        assert_eq!(parser.observed.output_tokens, Some(100));
        assert_eq!(parser.observed.model, None);
    }

    #[test]
    fn the_fast_path_passes_over_token_events_and_still_finds_the_usage() {
        let mut stream = String::new();
        for i in 0..300 {
            stream.push_str(&format!(
                "data: {{\"model\":\"m\",\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}],\"usage\":null}}\n\n"
            ));
        }
        stream.push_str("data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":300}}\n\n");
        stream.push_str("data: [DONE]\n\n");
        let bytes = stream.as_bytes();
        let (_, whole) = run(&[bytes]);
        for size in [1, 7, 64, 1000, 4096, 16384] {
            let frames: Vec<&[u8]> = bytes.chunks(size).collect();
            let (parser, boundaries) = run(&frames);
            assert_eq!(parser.observed.input_tokens, Some(7), "frames of {size}");
            assert_eq!(parser.observed.output_tokens, Some(300), "frames of {size}");
            assert!(
                same_boundaries(&boundaries, &whole, bytes),
                "frames of {size}"
            );
        }
        // Frames of token events (`"usage": null` and all) are passed over whole.
        for stream in [stream.clone(), stream.replace(",\"usage\":null", "")] {
            let frames: Vec<&[u8]> = stream.as_bytes().chunks(4096).collect();
            let (parser, boundaries) = run(&frames);
            assert_eq!(parser.observed.output_tokens, Some(300));
            assert!(
                boundaries.len() < whole.len() / 4,
                "{} boundaries: the fast path did not run",
                boundaries.len()
            );
        }
    }

    #[test]
    fn usage_split_over_data_lines_is_found_however_the_stream_is_cut() {
        let stream = concat!(
            "data: {\"model\":\"m\",\"choices\":[{}]}\n\n",
            "data: {\"choices\":[],\"usage\"\n",
            "data: :{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
            "data: {\"choices\":[{}],\"usage\":\n",
            "data: null}\n\n",
            "data: [DONE]\n\n",
        );
        let bytes = stream.as_bytes();
        let (_, whole) = run(&[bytes]);
        for size in [1, 5, 64, bytes.len()] {
            // Two frames first, so the model is known when the rest arrives in bigger ones.
            let (head, tail) = bytes.split_at(40);
            let mut frames: Vec<&[u8]> = vec![head];
            frames.extend(tail.chunks(size));
            let (parser, boundaries) = run(&frames);
            assert_eq!(parser.observed.output_tokens, Some(2), "frames of {size}");
            assert!(
                same_boundaries(&boundaries, &whole, bytes),
                "frames of {size}"
            );
            assert_eq!(
                boundaries.iter().filter(|b| b.1).count(),
                1,
                "the usage-only event is reported, frames of {size}"
            );
        }
        assert!(only_null_usage(b"{\"usage\" : null}{\"usage\":null}"));
        assert!(!only_null_usage(b"{\"usage\"\ndata: :{}}"));
        assert!(!only_null_usage(b"{\"usage\":{}}"));
    }

    #[test]
    fn usage_key_detection() {
        assert!(has_usage_object(b"{\"usage\" :  {\"a\":1}}"));
        assert!(!has_usage_object(b"{\"usage\":null}"));
        assert!(has_usage_object(b"{\"x\":\"\\\"usage\\\"\",\"usage\":{}}"));
        assert!(!has_usage_object(b"{\"usages\":{}}"));
    }
}
