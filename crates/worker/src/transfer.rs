//! KV frames over TCP: [`push_frame`] (prefill side) and [`read_frame`] (decode side).
//!
//! One connection carries one or more frames, each answered by one [`KvAck`] byte. The sender
//! writes everything but the trailing checksum at once, waits until the simulated transfer time
//! (× `time_scale`) has passed, then writes the checksum: a decode instance therefore never holds
//! a complete frame before the modeled fabric would have delivered it, while the real bytes still
//! overlap the simulated time.
//!
//! Invariants: every read and write is bounded by a timeout; a reader never allocates more than
//! the frame's validated length (`frame_progress` checks the declared payload against the limit
//! before any payload byte is read); a failure after the header arrived names the request.

use std::time::Duration;

use pdserve_protocol::kv_frame::{CHECKSUM_LEN, FrameProgress, KvFrameError, frame_progress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::kv::{KvAck, peek_request_id};

/// Bytes read per system call at most.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// What a reader got.
#[derive(Debug)]
pub(crate) enum FrameRead {
    /// One complete frame (not yet validated beyond its header).
    Frame(Vec<u8>),
    /// The peer closed the connection between frames.
    Eof,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The socket failed.
    #[error("kv connection: {0}")]
    Io(#[source] std::io::Error),
    /// No progress for the idle timeout.
    #[error("kv connection idle for {0:?} in the middle of a frame")]
    Idle(Duration),
    /// The header is invalid.
    #[error(transparent)]
    Frame(#[from] KvFrameError),
    /// The peer closed the connection inside a frame.
    #[error("kv connection closed after {got} bytes of a frame")]
    Closed {
        /// Bytes received.
        got: usize,
    },
}

/// A failed read, with the request id when the header had arrived.
#[derive(Debug)]
pub(crate) struct ReadFailure {
    pub(crate) request_id: Option<String>,
    pub(crate) error: ReadError,
    /// Whether any byte of the frame had arrived (an idle connection between frames is not a
    /// failed transfer).
    pub(crate) started: bool,
}

/// Reads one frame. Each read waits at most `idle`.
pub(crate) async fn read_frame(
    stream: &mut (impl AsyncRead + Unpin),
    max_payload_bytes: u64,
    idle: Duration,
) -> Result<FrameRead, ReadFailure> {
    let mut buf: Vec<u8> = Vec::new();
    let fail = |buf: &[u8], error: ReadError| ReadFailure {
        request_id: peek_request_id(buf),
        error,
        started: !buf.is_empty(),
    };
    loop {
        let want = match frame_progress(&buf, max_payload_bytes) {
            Ok(FrameProgress::NeedAtLeast(n)) => n,
            Ok(FrameProgress::Complete(n)) if buf.len() >= n => return Ok(FrameRead::Frame(buf)),
            Ok(FrameProgress::Complete(n)) => n,
            Err(e) => return Err(fail(&buf, ReadError::Frame(e))),
        };
        while buf.len() < want {
            let old = buf.len();
            buf.resize(old + (want - old).min(READ_CHUNK_BYTES), 0);
            let n = match timeout(idle, stream.read(&mut buf[old..])).await {
                Err(_) => {
                    buf.truncate(old);
                    return Err(fail(&buf, ReadError::Idle(idle)));
                }
                Ok(Err(e)) => {
                    buf.truncate(old);
                    return Err(fail(&buf, ReadError::Io(e)));
                }
                Ok(Ok(n)) => n,
            };
            buf.truncate(old + n);
            if n == 0 {
                if buf.is_empty() {
                    return Ok(FrameRead::Eof);
                }
                let got = buf.len();
                return Err(fail(&buf, ReadError::Closed { got }));
            }
        }
    }
}

/// Writes the receiver's answer to a frame.
pub(crate) async fn write_ack(
    stream: &mut (impl AsyncWrite + Unpin),
    ack: KvAck,
    limit: Duration,
) -> std::io::Result<()> {
    match timeout(limit, async {
        stream.write_all(&[ack.code()]).await?;
        stream.flush().await
    })
    .await
    {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "writing the kv ack timed out",
        )),
    }
}

/// Limits of one push.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PushTimeouts {
    pub(crate) connect: Duration,
    pub(crate) write: Duration,
    pub(crate) ack: Duration,
}

/// Why a push failed; each names the peer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PushError {
    /// Could not connect.
    #[error("connecting to kv receiver {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// A stage ran out of time.
    #[error("kv transfer to {addr}: {stage} timed out after {after:?}")]
    Timeout {
        addr: String,
        stage: &'static str,
        after: Duration,
    },
    /// The socket failed.
    #[error("kv transfer to {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The receiver answered with an unknown byte, or closed without answering.
    #[error("kv transfer to {addr}: {detail}")]
    Protocol { addr: String, detail: String },
    /// The receiver refused the frame.
    #[error("kv transfer to {addr}: receiver answered `{}`", .ack.as_str())]
    Rejected { addr: String, ack: KvAck },
}

impl PushError {
    /// Metric label.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            PushError::Connect { .. } => "connect",
            PushError::Timeout { .. } => "timeout",
            PushError::Io { .. } | PushError::Protocol { .. } => "io",
            PushError::Rejected { .. } => "rejected",
        }
    }
}

/// Pushes one frame to `addr`: connect, write all but the checksum, wait until `hold_until`,
/// write the checksum, read the ack. Returns when the last byte was written.
pub(crate) async fn push_frame(
    addr: &str,
    frame: &[u8],
    hold_until: Option<Instant>,
    limits: PushTimeouts,
) -> Result<Instant, PushError> {
    let timed_out = |stage, after| PushError::Timeout {
        addr: addr.to_string(),
        stage,
        after,
    };
    let io = |source| PushError::Io {
        addr: addr.to_string(),
        source,
    };
    let mut stream = timeout(limits.connect, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out("connect", limits.connect))?
        .map_err(|source| PushError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    stream.set_nodelay(true).map_err(io)?;
    let split = frame.len().saturating_sub(CHECKSUM_LEN);
    timeout(limits.write, stream.write_all(&frame[..split]))
        .await
        .map_err(|_| timed_out("write", limits.write))?
        .map_err(io)?;
    if let Some(at) = hold_until {
        tokio::time::sleep_until(at).await;
    }
    timeout(limits.write, async {
        stream.write_all(&frame[split..]).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| timed_out("write", limits.write))?
    .map_err(io)?;
    let written_at = Instant::now();
    let mut ack = [0u8; 1];
    let n = timeout(limits.ack, stream.read(&mut ack))
        .await
        .map_err(|_| timed_out("acknowledgement", limits.ack))?
        .map_err(io)?;
    if n == 0 {
        return Err(PushError::Protocol {
            addr: addr.to_string(),
            detail: "the receiver closed the connection without acknowledging".into(),
        });
    }
    match KvAck::from_code(ack[0]) {
        Some(KvAck::Accepted) => Ok(written_at),
        Some(ack) => Err(PushError::Rejected {
            addr: addr.to_string(),
            ack,
        }),
        None => Err(PushError::Protocol {
            addr: addr.to_string(),
            detail: format!("unknown acknowledgement byte {}", ack[0]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdserve_engine::LatentShape;
    use pdserve_protocol::internal::SampledToken;

    use crate::kv::{KvRows, OutgoingKv, encode_kv_frame};

    fn frame(id: &str, tokens: usize) -> Vec<u8> {
        let shape = LatentShape {
            num_layers: 2,
            kv_lora_rank: 3,
            rope_dim: 1,
        };
        let rows = KvRows::new(shape, tokens, vec![0.5; 2 * tokens * 4]).unwrap();
        encode_kv_frame(&OutgoingKv {
            request_id: id,
            first_token: SampledToken {
                id: 1,
                logprob: 0.0,
                top_logprobs: vec![],
            },
            seed: 3,
            draft_token: None,
            rows: &rows,
        })
        .unwrap()
    }

    const IDLE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn reads_back_to_back_frames_then_eof() {
        let (a, b) = (frame("a", 5), frame("b", 70));
        let mut bytes = a.clone();
        bytes.extend_from_slice(&b);
        let mut reader = &bytes[..];
        for want in [a, b] {
            match read_frame(&mut reader, 1 << 20, IDLE).await.unwrap() {
                FrameRead::Frame(got) => assert_eq!(got, want),
                FrameRead::Eof => panic!("early eof"),
            }
        }
        assert!(matches!(
            read_frame(&mut reader, 1 << 20, IDLE).await.unwrap(),
            FrameRead::Eof
        ));
    }

    #[tokio::test]
    async fn a_truncated_frame_fails_naming_its_request() {
        let f = frame("req-7", 10);
        let mut reader = &f[..f.len() - 9];
        let err = read_frame(&mut reader, 1 << 20, IDLE).await.unwrap_err();
        assert_eq!(err.request_id.as_deref(), Some("req-7"));
        assert!(err.started);
        assert!(
            matches!(err.error, ReadError::Closed { .. }),
            "{:?}",
            err.error
        );
    }

    #[tokio::test]
    async fn an_oversized_payload_is_refused_before_it_is_read() {
        let f = frame("big", 100);
        let mut reader = &f[..];
        let err = read_frame(&mut reader, 64, IDLE).await.unwrap_err();
        assert!(matches!(
            err.error,
            ReadError::Frame(KvFrameError::PayloadTooLarge { .. })
        ));
        assert_eq!(err.request_id.as_deref(), Some("big"));
    }
}
