//! The decode instance's KV receiver: a TCP listener whose connections carry KV frames, each
//! validated (protocol checks, then this instance's shape), offered to the rendezvous, and
//! answered with one [`KvAck`] byte.
//!
//! A frame that fails validation, or a connection that breaks off or idles out inside a frame,
//! fails the decode request it names (the header's id) with `kv_invalid`; since KV is staged in
//! memory until admission and blocks are only allocated by the scheduler when the pair is
//! admitted, a failed transfer never holds blocks. After an invalid frame the connection is
//! closed (its byte stream can no longer be trusted).

use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use pdserve_engine::LatentShape;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::rendezvous::RendezvousHandle;
use crate::kv::{KvAck, decode_kv_frame, peek_request_id};
use crate::transfer::{FrameRead, ReadError, read_frame, write_ack};

/// Counters of frame outcomes (`accepted|invalid|unwanted|overloaded|failed`) and bytes.
#[derive(Clone, Debug)]
pub(crate) struct ReceiverMetrics {
    pub(crate) accepted: Counter,
    pub(crate) invalid: Counter,
    pub(crate) unwanted: Counter,
    pub(crate) overloaded: Counter,
    pub(crate) failed: Counter,
    pub(crate) bytes: Counter,
}

impl ReceiverMetrics {
    fn outcome(&self, ack: KvAck) -> &Counter {
        match ack {
            KvAck::Accepted => &self.accepted,
            KvAck::Invalid => &self.invalid,
            KvAck::Unwanted => &self.unwanted,
            KvAck::Overloaded => &self.overloaded,
        }
    }
}

/// What every connection needs.
#[derive(Debug)]
pub(crate) struct ReceiverContext {
    pub(crate) rendezvous: RendezvousHandle,
    pub(crate) shape: LatentShape,
    pub(crate) max_payload_bytes: u64,
    pub(crate) idle: Duration,
    pub(crate) metrics: ReceiverMetrics,
}

/// Accepts connections until `stop` turns true.
pub(crate) async fn run(
    listener: TcpListener,
    ctx: Arc<ReceiverContext>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let ctx = Arc::clone(&ctx);
                    tokio::spawn(async move {
                        tracing::trace!(%peer, "kv connection");
                        connection(stream, &ctx).await;
                    });
                }
                Err(e) => {
                    // Accept errors (e.g. out of file descriptors) are transient.
                    tracing::warn!(error = %e, "kv receiver: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

async fn connection(mut stream: TcpStream, ctx: &ReceiverContext) {
    let _ = stream.set_nodelay(true);
    loop {
        let bytes = match read_frame(&mut stream, ctx.max_payload_bytes, ctx.idle).await {
            Ok(FrameRead::Frame(bytes)) => bytes,
            Ok(FrameRead::Eof) => return,
            Err(failure) => {
                if failure.started {
                    ctx.metrics.failed.increment(1);
                    tracing::warn!(
                        request_id = failure.request_id.as_deref().unwrap_or("?"),
                        error = %failure.error,
                        "kv transfer failed"
                    );
                    if let Some(id) = failure.request_id {
                        ctx.rendezvous
                            .frame_failed(id, failure.error.to_string())
                            .await;
                    }
                    if matches!(failure.error, ReadError::Frame(_)) {
                        let _ = write_ack(&mut stream, KvAck::Invalid, ctx.idle).await;
                    }
                }
                return;
            }
        };
        let ack = match decode_kv_frame(&bytes, ctx.max_payload_bytes, &ctx.shape) {
            Ok(kv) => {
                let size = kv.frame_bytes as u64;
                let ack = ctx.rendezvous.frame(kv).await;
                if ack == KvAck::Accepted {
                    ctx.metrics.bytes.increment(size);
                }
                ack
            }
            Err(e) => {
                let id = peek_request_id(&bytes);
                tracing::warn!(request_id = id.as_deref().unwrap_or("?"), error = %e, "invalid kv frame");
                if let Some(id) = id {
                    ctx.rendezvous.frame_failed(id, e.to_string()).await;
                }
                KvAck::Invalid
            }
        };
        ctx.metrics.outcome(ack).increment(1);
        if write_ack(&mut stream, ack, ctx.idle).await.is_err() || ack == KvAck::Invalid {
            return;
        }
    }
}
