//! What one request did: [`RequestRecord`], the unit every metric is computed from.
//!
//! All times are seconds from the start of the run (the instant the first request was due), on
//! the client's monotonic clock. Invariants: `intended_s ≤ sent_s ≤ end_s` up to clock
//! resolution; `chunks` holds only chunks with non-empty generated text, in arrival order, so
//! `chunks[0].at_s` is the first-token time; a record with `failure == None` completed its stream
//! with at least one content chunk.
//!
//! Latency origin (see `loadtest/README.md`): an open-loop request (a rate, ramp or trace
//! schedule) is timed from its *intended* send time, so client-side waiting (a concurrency cap, a
//! late sender) is part of its latency and a stalled server cannot hide it (no coordinated
//! omission). A burst / closed-loop request has no intended time and is timed from its send time.

use serde::Serialize;

/// One streamed chunk that carried generated text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chunk {
    /// Arrival time of the network read that completed the chunk.
    pub at_s: f64,
    /// Tokens attributed to the chunk (see [`ChunkTokenSource`]); may be fractional when only
    /// the total is known.
    pub tokens: f64,
}

/// Where the per-chunk token counts used for ITL normalization came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ChunkTokenSource {
    /// Cumulative `usage` on every chunk (`stream_options.continuous_usage_stats`).
    Usage,
    /// Length of the chunk's `logprobs` token list.
    Logprobs,
    /// The `--tokenizer` applied to the chunk's text.
    Tokenizer,
    /// Output tokens divided evenly among chunks (one token per chunk when counts agree).
    Uniform,
}

/// Why a request failed. The label (`kind`) is a bounded set so failures can be counted by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The connection could not be made or broke before a response.
    Connect,
    /// `--request-timeout` expired.
    Timeout,
    /// The server answered with a non-2xx status.
    Http,
    /// The stream carried an `error` object.
    StreamError,
    /// A body or chunk was not valid JSON/SSE of the expected shape.
    Protocol,
    /// The stream ended without `data: [DONE]` (connection dropped mid-stream).
    Incomplete,
    /// The stream finished but carried no generated text.
    Empty,
}

/// A classified failure: kind, HTTP status where there is one, and the diagnostic message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    /// Failure class.
    pub kind: FailureKind,
    /// HTTP status when `kind == Http`.
    pub status: Option<u16>,
    /// Human-readable detail (server error message, transport error).
    pub message: String,
}

impl Failure {
    /// The counting label: `http_<status>` for HTTP failures, the kind name otherwise.
    pub fn label(&self) -> String {
        match (self.kind, self.status) {
            (FailureKind::Http, Some(code)) => format!("http_{code}"),
            (kind, _) => match kind {
                FailureKind::Connect => "connect",
                FailureKind::Timeout => "timeout",
                FailureKind::Http => "http",
                FailureKind::StreamError => "stream_error",
                FailureKind::Protocol => "protocol",
                FailureKind::Incomplete => "incomplete",
                FailureKind::Empty => "empty",
            }
            .to_owned(),
        }
    }
}

/// Everything measured about one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// Position in the run (0-based, send order).
    pub index: usize,
    /// Index into the run's target URLs.
    pub target: usize,
    /// When the schedule wanted the request sent.
    pub intended_s: f64,
    /// When the HTTP request was actually started.
    pub sent_s: f64,
    /// Whether latency is measured from `intended_s` (true) or `sent_s` (false).
    pub open_loop: bool,
    /// When the response finished (stream end, error, or timeout).
    pub end_s: f64,
    /// Content chunks, in arrival order.
    pub chunks: Vec<Chunk>,
    /// Prompt tokens: the server's `usage.prompt_tokens`, else the client's estimate.
    pub prompt_tokens: u64,
    /// Output tokens: the server's `usage.completion_tokens`, else a client-side count.
    pub output_tokens: u64,
    /// Whether both token counts came from the server's `usage`.
    pub usage_reported: bool,
    /// The `max_tokens` the request asked for.
    pub expected_output_tokens: u64,
    /// How `chunks[..].tokens` were obtained.
    pub chunk_token_source: ChunkTokenSource,
    /// `None` for a successful request.
    pub failure: Option<Failure>,
}

impl RequestRecord {
    /// Whether the request succeeded.
    pub fn success(&self) -> bool {
        self.failure.is_none()
    }

    /// The instant latencies are measured from.
    pub fn origin_s(&self) -> f64 {
        if self.open_loop {
            self.intended_s
        } else {
            self.sent_s
        }
    }

    /// Client-side wait between the intended and actual send time (0 in a closed loop).
    pub fn queue_s(&self) -> f64 {
        if self.open_loop {
            (self.sent_s - self.intended_s).max(0.0)
        } else {
            0.0
        }
    }

    /// Time to first token: first non-empty chunk minus origin.
    pub fn ttft_s(&self) -> Option<f64> {
        self.chunks.first().map(|c| c.at_s - self.origin_s())
    }

    /// End-to-end latency: end of response minus origin.
    pub fn e2el_s(&self) -> f64 {
        self.end_s - self.origin_s()
    }

    /// `(E2EL − TTFT)/(output_tokens − 1)`; `None` for fewer than two output tokens.
    pub fn tpot_s(&self) -> Option<f64> {
        let ttft = self.ttft_s()?;
        (self.output_tokens > 1).then(|| (self.e2el_s() - ttft) / (self.output_tokens - 1) as f64)
    }

    /// Inter-token latencies: for each chunk after the first, the gap since the previous chunk
    /// divided by the tokens the chunk carried.
    pub fn itls_s(&self) -> Vec<f64> {
        self.chunks
            .windows(2)
            .map(|w| (w[1].at_s - w[0].at_s) / w[1].tokens.max(f64::MIN_POSITIVE))
            .collect()
    }

    /// The same record with every time divided by `time_scale` (wall → simulated time).
    pub fn rescaled(&self, time_scale: f64) -> Self {
        let f = |t: f64| t / time_scale;
        Self {
            intended_s: f(self.intended_s),
            sent_s: f(self.sent_s),
            end_s: f(self.end_s),
            chunks: self
                .chunks
                .iter()
                .map(|c| Chunk {
                    at_s: f(c.at_s),
                    tokens: c.tokens,
                })
                .collect(),
            failure: self.failure.clone(),
            ..*self
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A successful record whose chunks arrive at the given times, one token each.
    pub(crate) fn record_with_chunks(
        intended_s: f64,
        sent_s: f64,
        at: &[f64],
        end_s: f64,
    ) -> RequestRecord {
        RequestRecord {
            index: 0,
            target: 0,
            intended_s,
            sent_s,
            open_loop: true,
            end_s,
            chunks: at
                .iter()
                .map(|&a| Chunk {
                    at_s: a,
                    tokens: 1.0,
                })
                .collect(),
            prompt_tokens: 10,
            output_tokens: at.len() as u64,
            usage_reported: true,
            expected_output_tokens: at.len() as u64,
            chunk_token_source: ChunkTokenSource::Uniform,
            failure: None,
        }
    }

    #[test]
    fn open_loop_latency_counts_from_intended_time() {
        let r = record_with_chunks(1.0, 1.5, &[2.0, 2.1, 2.2], 2.2);
        assert!((r.ttft_s().unwrap() - 1.0).abs() < 1e-12);
        assert!((r.e2el_s() - 1.2).abs() < 1e-12);
        assert!((r.queue_s() - 0.5).abs() < 1e-12);
        let closed = RequestRecord {
            open_loop: false,
            ..r
        };
        assert!((closed.ttft_s().unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(closed.queue_s(), 0.0);
    }

    #[test]
    fn tpot_excludes_first_token_and_itl_normalizes_by_chunk_tokens() {
        let mut r = record_with_chunks(0.0, 0.0, &[0.1, 0.3, 0.5], 0.5);
        r.chunks[1].tokens = 2.0;
        r.chunks[2].tokens = 2.0;
        r.output_tokens = 5;
        // (0.5 − 0.1)/(5 − 1) = 0.1; chunk gaps 0.2 over 2 tokens each.
        assert!((r.tpot_s().unwrap() - 0.1).abs() < 1e-12);
        for itl in r.itls_s() {
            assert!((itl - 0.1).abs() < 1e-12);
        }
    }

    #[test]
    fn single_token_output_has_no_tpot() {
        let r = record_with_chunks(0.0, 0.0, &[0.1], 0.1);
        assert_eq!(r.tpot_s(), None);
        assert!(r.itls_s().is_empty());
    }

    #[test]
    fn rescaling_divides_times_and_keeps_tokens() {
        let r = record_with_chunks(2.0, 2.0, &[4.0, 6.0], 6.0).rescaled(2.0);
        assert_eq!(r.intended_s, 1.0);
        assert_eq!(r.chunks[1].at_s, 3.0);
        assert_eq!(r.output_tokens, 2);
    }

    #[test]
    fn http_failures_are_labeled_by_status() {
        let f = Failure {
            kind: FailureKind::Http,
            status: Some(503),
            message: String::new(),
        };
        assert_eq!(f.label(), "http_503");
        let f = Failure {
            kind: FailureKind::Incomplete,
            status: None,
            message: String::new(),
        };
        assert_eq!(f.label(), "incomplete");
    }
}
