//! Incremental Server-Sent Events decoder.
//!
//! [`SseDecoder`] turns the byte chunks of an HTTP body into the `data` payloads of complete
//! events. It exists apart from the HTTP client so that it can be tested on arbitrary splits of
//! the byte stream without a server.
//!
//! Invariants: an event is emitted only once its terminating blank line has arrived (or at
//! [`SseDecoder::finish`]); payload bytes are never reordered or dropped; lines may end in `\n` or
//! `\r\n`; comment lines (`:`) and fields other than `data` are skipped; several `data` lines of
//! one event are joined with `\n` as the SSE specification says.

/// Decoder state: bytes of an unterminated line and the data lines of the current event.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    data: Option<String>,
}

impl SseDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the payloads of the events they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.on_line(&line, &mut events);
            } else {
                self.line.push(b);
            }
        }
        events
    }

    /// Ends the stream: an event left without its blank line is still delivered.
    pub fn finish(&mut self) -> Option<String> {
        let mut events = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.on_line(&line, &mut events);
        }
        self.data.take().or_else(|| events.pop())
    }

    fn on_line(&mut self, line: &[u8], events: &mut Vec<String>) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return;
        }
        if line.first() == Some(&b':') {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] = b": keep-alive\n\ndata: {\"a\":1}\n\ndata:{\"b\":2}\r\n\r\nevent: x\ndata: l1\ndata: l2\n\ndata: [DONE]\n\n";

    fn expected() -> Vec<String> {
        vec![
            "{\"a\":1}".into(),
            "{\"b\":2}".into(),
            "l1\nl2".into(),
            "[DONE]".into(),
        ]
    }

    #[test]
    fn decodes_events_whole() {
        let mut d = SseDecoder::new();
        assert_eq!(d.push(STREAM), expected());
        assert_eq!(d.finish(), None);
    }

    #[test]
    fn decodes_events_split_at_every_byte_boundary() {
        for split in 0..STREAM.len() {
            let mut d = SseDecoder::new();
            let mut got = d.push(&STREAM[..split]);
            got.extend(d.push(&STREAM[split..]));
            assert_eq!(got, expected(), "split at {split}");
        }
    }

    #[test]
    fn unterminated_last_event_is_delivered_at_finish() {
        let mut d = SseDecoder::new();
        assert!(d.push(b"data: [DONE]").is_empty());
        assert_eq!(d.finish().as_deref(), Some("[DONE]"));
    }
}
