//! HTTP client of the internal API (see `pdserve_protocol::internal`): one call per endpoint, every
//! failure classified once into a [`LegError`] that knows whether a retry elsewhere makes sense and
//! how to present itself to the client.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use pdserve_protocol::internal::{
    ABORT_PATH, AbortRequest, DECODE_PATH, DecodeEvent, DecodeRequest, HEALTH_PATH, InstanceStats,
    PREFILL_PATH, PrefillRequest, PrefillResponse, STATS_PATH,
};
use pdserve_protocol::{ApiError, ErrorEnvelope, ErrorKind};

use crate::config::TimeoutConfig;
use crate::instances::Instance;

/// Longest line accepted on a decode stream (a `tokens` event with logprobs is a few KiB).
const MAX_EVENT_LINE_BYTES: usize = 1 << 20;

/// A failed call to an instance.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LegError {
    /// The TCP connection could not be made (or broke before an answer).
    #[error("{url}: connection failed: {detail}")]
    Connect {
        /// Endpoint.
        url: String,
        /// Underlying error.
        detail: String,
    },
    /// No answer in time.
    #[error("{url}: no answer within {after_ms} ms")]
    Timeout {
        /// Endpoint.
        url: String,
        /// The limit.
        after_ms: u64,
    },
    /// A non-success status.
    #[error("{url}: status {status}: {detail}")]
    Status {
        /// Endpoint.
        url: String,
        /// HTTP status.
        status: u16,
        /// The envelope's message, or the raw body.
        detail: String,
    },
    /// An answer that does not follow the internal API.
    #[error("{url}: protocol violation: {detail}")]
    Protocol {
        /// Endpoint.
        url: String,
        /// What was wrong.
        detail: String,
    },
}

impl LegError {
    /// Whether another instance may succeed where this one failed.
    pub fn retryable(&self) -> bool {
        match self {
            LegError::Connect { .. } | LegError::Timeout { .. } | LegError::Protocol { .. } => true,
            LegError::Status { status, .. } => *status >= 500 || *status == 429,
        }
    }

    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            LegError::Connect { .. } => "connect",
            LegError::Timeout { .. } => "timeout",
            LegError::Status { status, .. } if *status >= 500 => "status_5xx",
            LegError::Status { .. } => "status_4xx",
            LegError::Protocol { .. } => "protocol",
        }
    }

    /// The client-facing error for a failure of `stage` (`prefill` or `decode`); the details go
    /// to the diagnostic.
    pub fn to_api_error(&self, stage: &str) -> ApiError {
        let (kind, message) = match self {
            LegError::Timeout { .. } => {
                (ErrorKind::Timeout, format!("the {stage} stage timed out"))
            }
            LegError::Status { status, detail, .. }
                if (400..500).contains(status) && *status != 429 =>
            {
                // The instance rejected the request itself: pass its reason on.
                (
                    ErrorKind::from_status(*status),
                    format!("the {stage} instance rejected the request: {detail}"),
                )
            }
            _ => (
                ErrorKind::Unavailable,
                format!("the {stage} stage failed; try again"),
            ),
        };
        ApiError::new(kind, message)
            .with_code(format!("{stage}_failed"))
            .with_diagnostic(self.to_string())
    }
}

/// Client of the instances' internal API.
#[derive(Debug, Clone)]
pub struct InstanceClient {
    http: reqwest::Client,
    probe_timeout: Duration,
    abort_timeout: Duration,
}

impl InstanceClient {
    /// A client with the configured connect, probe and abort timeouts.
    pub fn new(timeouts: &TimeoutConfig) -> Result<InstanceClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(timeouts.connect_ms))
            .tcp_nodelay(true)
            .build()?;
        Ok(InstanceClient {
            http,
            probe_timeout: Duration::from_millis(timeouts.probe_ms),
            abort_timeout: Duration::from_millis(timeouts.abort_ms),
        })
    }

    /// `POST /internal/prefill` within `timeout`.
    pub async fn prefill(
        &self,
        instance: &Instance,
        request: &PrefillRequest,
        timeout: Duration,
    ) -> Result<PrefillResponse, LegError> {
        let url = instance.url(PREFILL_PATH);
        let send = self.http.post(&url).json(request).send();
        let response = with_timeout(&url, timeout, async {
            let r = send.await.map_err(|e| classify(&url, &e))?;
            let r = check_status(&url, r).await?;
            r.json::<PrefillResponse>()
                .await
                .map_err(|e| LegError::Protocol {
                    url: url.clone(),
                    detail: format!("bad prefill answer: {e}"),
                })
        })
        .await?;
        if response.request_id != request.request_id {
            return Err(LegError::Protocol {
                url,
                detail: format!(
                    "answer for request `{}` to request `{}`",
                    response.request_id, request.request_id
                ),
            });
        }
        Ok(response)
    }

    /// `POST /internal/decode`; returns once the response head arrived (the instance has
    /// registered the request), within `timeout`.
    pub async fn open_decode(
        &self,
        instance: &Instance,
        request: &DecodeRequest,
        timeout: Duration,
    ) -> Result<DecodeEvents, LegError> {
        let url = instance.url(DECODE_PATH);
        let send = self.http.post(&url).json(request).send();
        let response = with_timeout(&url, timeout, async {
            let r = send.await.map_err(|e| classify(&url, &e))?;
            check_status(&url, r).await
        })
        .await?;
        Ok(DecodeEvents {
            url,
            body: response.bytes_stream().boxed(),
            lines: LineBuffer::default(),
            ended: false,
        })
    }

    /// `POST /internal/abort` (idempotent).
    pub async fn abort(&self, instance: &Instance, request_id: &str) -> Result<(), LegError> {
        let url = instance.url(ABORT_PATH);
        let body = AbortRequest {
            request_id: request_id.to_string(),
        };
        let send = self.http.post(&url).json(&body).send();
        with_timeout(&url, self.abort_timeout, async {
            let r = send.await.map_err(|e| classify(&url, &e))?;
            check_status(&url, r).await.map(|_| ())
        })
        .await
    }

    /// `GET /health`, then `GET /internal/stats`.
    pub async fn probe(&self, instance: &Instance) -> Result<InstanceStats, LegError> {
        let health_url = instance.url(HEALTH_PATH);
        let stats_url = instance.url(STATS_PATH);
        with_timeout(&health_url, self.probe_timeout, async {
            let r = self
                .http
                .get(&health_url)
                .send()
                .await
                .map_err(|e| classify(&health_url, &e))?;
            check_status(&health_url, r).await?;
            let r = self
                .http
                .get(&stats_url)
                .send()
                .await
                .map_err(|e| classify(&stats_url, &e))?;
            let r = check_status(&stats_url, r).await?;
            r.json::<InstanceStats>()
                .await
                .map_err(|e| LegError::Protocol {
                    url: stats_url.clone(),
                    detail: format!("bad stats: {e}"),
                })
        })
        .await
    }
}

async fn with_timeout<T>(
    url: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, LegError>>,
) -> Result<T, LegError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(LegError::Timeout {
                url: url.to_string(),
                after_ms: timeout.as_millis() as u64,
            })
        })
}

fn classify(url: &str, e: &reqwest::Error) -> LegError {
    if e.is_timeout() {
        LegError::Timeout {
            url: url.to_string(),
            after_ms: 0,
        }
    } else {
        LegError::Connect {
            url: url.to_string(),
            detail: e.to_string(),
        }
    }
}

async fn check_status(
    url: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, LegError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.bytes().await.unwrap_or_default();
    let detail = match serde_json::from_slice::<ErrorEnvelope>(&body) {
        Ok(envelope) => envelope.error.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    };
    Err(LegError::Status {
        url: url.to_string(),
        status: status.as_u16(),
        detail,
    })
}

/// The event stream of one decode request (newline-delimited JSON).
pub struct DecodeEvents {
    url: String,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    lines: LineBuffer,
    ended: bool,
}

impl std::fmt::Debug for DecodeEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeEvents")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl DecodeEvents {
    /// The next event; `None` when the stream ended (cleanly or not: the caller decides whether
    /// an end without `done`/`error` is a failure).
    pub async fn next(&mut self) -> Option<Result<DecodeEvent, LegError>> {
        loop {
            match self.lines.next_line() {
                Ok(Some(line)) => {
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some(
                        serde_json::from_slice(&line).map_err(|e| LegError::Protocol {
                            url: self.url.clone(),
                            detail: format!("bad decode event: {e}"),
                        }),
                    );
                }
                Ok(None) => {}
                Err(detail) => {
                    return Some(Err(LegError::Protocol {
                        url: self.url.clone(),
                        detail,
                    }));
                }
            }
            if self.ended {
                return None;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.lines.push(&chunk),
                Some(Err(e)) => {
                    self.ended = true;
                    return Some(Err(LegError::Connect {
                        url: self.url.clone(),
                        detail: format!("decode stream broke: {e}"),
                    }));
                }
                None => {
                    self.ended = true;
                    self.lines.finish();
                }
            }
        }
    }
}

/// Splits a byte stream into lines (`\n`-terminated; a final unterminated line counts once the
/// stream has ended).
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    finished: bool,
}

impl LineBuffer {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Marks the end of the stream.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// The next complete line without its terminator; an error when a line exceeds the limit.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, String> {
        if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            return Ok(Some(line));
        }
        if self.buf.len() > MAX_EVENT_LINE_BYTES {
            return Err(format!(
                "decode event line exceeds {MAX_EVENT_LINE_BYTES} bytes"
            ));
        }
        if self.finished && !self.buf.is_empty() {
            return Ok(Some(std::mem::take(&mut self.buf)));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_are_reassembled() {
        let mut b = LineBuffer::default();
        b.push(b"{\"a\":");
        assert_eq!(b.next_line(), Ok(None));
        b.push(b"1}\n{\"b\"");
        assert_eq!(b.next_line(), Ok(Some(b"{\"a\":1}".to_vec())));
        assert_eq!(b.next_line(), Ok(None));
        b.push(b":2}");
        b.finish();
        assert_eq!(b.next_line(), Ok(Some(b"{\"b\":2}".to_vec())));
        assert_eq!(b.next_line(), Ok(None));
    }

    #[test]
    fn an_endless_line_is_an_error() {
        let mut b = LineBuffer::default();
        b.push(&vec![b'x'; MAX_EVENT_LINE_BYTES + 1]);
        assert!(b.next_line().is_err());
    }

    #[test]
    fn only_server_side_failures_are_retried() {
        let status = |s| LegError::Status {
            url: "u".into(),
            status: s,
            detail: "d".into(),
        };
        assert!(status(503).retryable());
        assert!(status(429).retryable());
        assert!(!status(400).retryable());
        let e = status(400).to_api_error("prefill");
        assert_eq!(e.status(), 400);
        assert!(e.message.contains("rejected"));
        let e = LegError::Timeout {
            url: "http://10.0.0.1/x".into(),
            after_ms: 5,
        }
        .to_api_error("prefill");
        assert_eq!(e.status(), 504);
        assert!(!e.message.contains("10.0.0.1"));
    }
}
