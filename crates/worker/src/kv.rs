//! A request's latent KV as it travels between instances: [`KvRows`] (the frame's payload order,
//! `f32`), conversion to and from protocol KV frames, and the one-byte acknowledgement [`KvAck`]
//! that the receiver writes after each frame.
//!
//! Payload order (protocol `kv_frame`): for each layer, for each token, `c_kv[kv_lora_rank]` then
//! `k_rope[rope_dim]`. Frames are sent as `f32` with `hidden_dim = 0`: with MTP, prefill's MTP
//! module has already proposed the draft after the first token (it travels as the header's
//! `draft_token`, and its cache row is in the MTP layer's KV), so no hidden state travels; `bf16`
//! and `f16` frames are accepted and widened; `f8e4m3` is refused (nothing here scales it), and so
//! is a frame carrying a hidden state.
//!
//! Invariants: `KvRows::data.len() == layers * tokens * (kv_lora_rank + rope_dim)` (checked by
//! every constructor); conversion never panics on bad input.

use pdserve_engine::{BlockId, LatentRows, LatentShape, LatentStore, StoreError};
use pdserve_protocol::internal::SampledToken;
use pdserve_protocol::kv_frame::{
    KvDtype, KvFrameError, KvFrameHeader, KvShape, PREFIX_LEN, decode_frame, encode_frame,
};

/// A request's prompt KV: positions `0..tokens` of every layer, in frame payload order.
#[derive(Clone, Debug, PartialEq)]
pub struct KvRows {
    /// Per-token latent shape (all cached layers).
    pub shape: LatentShape,
    /// Token positions held.
    pub tokens: usize,
    /// `[layer][token][c_kv ++ k_rope]`, row-major.
    data: Vec<f32>,
}

/// A KV payload that does not match its shape, or a frame this instance cannot take.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KvError {
    /// The frame failed the protocol's validation.
    #[error(transparent)]
    Frame(#[from] KvFrameError),
    /// The frame's shape differs from this instance's latent store.
    #[error("kv frame: `{field}` is {got}, this instance needs {expected}")]
    Shape {
        /// The shape field at fault.
        field: &'static str,
        /// This instance's value.
        expected: u64,
        /// The frame's value.
        got: u64,
    },
    /// The frame's element type is not supported.
    #[error("kv frame: element type {0:?} is not supported (send f32, bf16 or f16)")]
    Dtype(KvDtype),
    /// A row array has the wrong length.
    #[error("kv rows: {got} floats, expected {expected} for {tokens} tokens")]
    Length {
        /// Floats expected.
        expected: usize,
        /// Floats given.
        got: usize,
        /// Tokens declared.
        tokens: usize,
    },
    /// The latent store refused a read or write.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The executor refused to stage or export KV.
    #[error("executor: {0}")]
    Backend(String),
}

impl KvRows {
    /// Rows from a flat array in payload order.
    pub fn new(shape: LatentShape, tokens: usize, data: Vec<f32>) -> Result<Self, KvError> {
        let expected = shape.num_layers * tokens * shape.floats_per_token_layer();
        if data.len() != expected {
            return Err(KvError::Length {
                expected,
                got: data.len(),
                tokens,
            });
        }
        Ok(Self {
            shape,
            tokens,
            data,
        })
    }

    /// Reads positions `0..tokens` of every layer through `table`.
    pub fn gather(
        store: &dyn LatentStore,
        table: &[BlockId],
        tokens: usize,
    ) -> Result<Self, KvError> {
        let shape = store.shape();
        let width = shape.floats_per_token_layer();
        let mut data = Vec::with_capacity(shape.num_layers * tokens * width);
        let mut rows = pdserve_engine::LatentRows::default();
        for layer in 0..shape.num_layers {
            store.gather_into(table, layer, tokens, &mut rows)?;
            for t in 0..tokens {
                let c = &rows.c_kv[t * shape.kv_lora_rank..(t + 1) * shape.kv_lora_rank];
                let r = &rows.k_rope[t * shape.rope_dim..(t + 1) * shape.rope_dim];
                data.extend_from_slice(c);
                data.extend_from_slice(r);
            }
        }
        Self::new(shape, tokens, data)
    }

    /// Writes positions `0..tokens` of every layer through `table`.
    pub fn scatter(&self, store: &mut dyn LatentStore, table: &[BlockId]) -> Result<(), KvError> {
        check_shape(&store.shape(), &self.shape)?;
        if self.tokens == 0 {
            return Ok(());
        }
        for (layer, rows) in self.to_layers().iter().enumerate() {
            store.write_rows(table, layer, 0, &rows.c_kv, &rows.k_rope)?;
        }
        Ok(())
    }

    /// One [`LatentRows`] per layer (the layout of the engine's `ModelExecutor` KV hand-over).
    pub fn to_layers(&self) -> Vec<LatentRows> {
        let (rank, width) = (self.shape.kv_lora_rank, self.shape.floats_per_token_layer());
        if self.tokens == 0 {
            return vec![LatentRows::default(); self.shape.num_layers];
        }
        self.data
            .chunks_exact(self.tokens * width)
            .map(|layer| {
                let mut rows = LatentRows {
                    len: self.tokens,
                    c_kv: Vec::with_capacity(self.tokens * rank),
                    k_rope: Vec::with_capacity(self.tokens * self.shape.rope_dim),
                };
                for row in layer.chunks_exact(width) {
                    rows.c_kv.extend_from_slice(&row[..rank]);
                    rows.k_rope.extend_from_slice(&row[rank..]);
                }
                rows
            })
            .collect()
    }

    /// Rows from one [`LatentRows`] per layer, each holding `tokens` rows of `shape`'s widths.
    pub fn from_layers(
        shape: LatentShape,
        tokens: usize,
        layers: &[LatentRows],
    ) -> Result<Self, KvError> {
        if layers.len() != shape.num_layers {
            return Err(KvError::Shape {
                field: "layers",
                expected: shape.num_layers as u64,
                got: layers.len() as u64,
            });
        }
        let mut data =
            Vec::with_capacity(shape.num_layers * tokens * shape.floats_per_token_layer());
        for rows in layers {
            let ok = rows.len == tokens
                && rows.c_kv.len() == tokens * shape.kv_lora_rank
                && rows.k_rope.len() == tokens * shape.rope_dim;
            if !ok {
                return Err(KvError::Length {
                    expected: tokens * shape.floats_per_token_layer(),
                    got: rows.c_kv.len() + rows.k_rope.len(),
                    tokens,
                });
            }
            for t in 0..tokens {
                data.extend_from_slice(
                    &rows.c_kv[t * shape.kv_lora_rank..(t + 1) * shape.kv_lora_rank],
                );
                data.extend_from_slice(&rows.k_rope[t * shape.rope_dim..(t + 1) * shape.rope_dim]);
            }
        }
        Self::new(shape, tokens, data)
    }

    /// The flat payload-order array.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// Bytes this KV occupies as `f32`.
    pub fn size_bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// What a prefill instance sends: everything a frame carries.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingKv<'a> {
    /// The generation.
    pub request_id: &'a str,
    /// The token sampled after the prompt.
    pub first_token: SampledToken,
    /// The sampler's seed.
    pub seed: u64,
    /// Prefill's MTP draft for the token after `first_token`.
    pub draft_token: Option<u32>,
    /// The prompt's latent KV.
    pub rows: &'a KvRows,
}

/// Encodes a frame with an `f32` payload.
pub fn encode_kv_frame(kv: &OutgoingKv<'_>) -> Result<Vec<u8>, KvFrameError> {
    let shape = kv.rows.shape;
    let as_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let header = KvFrameHeader {
        request_id: kv.request_id.to_string(),
        first_token: kv.first_token.clone(),
        seed: Some(kv.seed),
        sampled_tokens: 1,
        draft_token: kv.draft_token,
        shape: KvShape {
            layers: as_u32(shape.num_layers),
            tokens: as_u32(kv.rows.tokens),
            kv_lora_rank: as_u32(shape.kv_lora_rank),
            rope_dim: as_u32(shape.rope_dim),
            hidden_dim: 0,
            dtype: KvDtype::F32,
        },
    };
    let mut payload = Vec::with_capacity(kv.rows.data.len() * 4);
    for v in &kv.rows.data {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    encode_frame(&header, &payload)
}

/// A validated frame, widened to `f32` and checked against this instance's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct IncomingKv {
    /// The frame header.
    pub header: KvFrameHeader,
    /// The prompt's KV.
    pub rows: KvRows,
    /// Frame size on the wire.
    pub frame_bytes: usize,
}

/// Decodes `bytes` (one whole frame) and checks it against `shape`.
pub fn decode_kv_frame(
    bytes: &[u8],
    max_payload_bytes: u64,
    shape: &LatentShape,
) -> Result<IncomingKv, KvError> {
    let (header, payload) = decode_frame(bytes, max_payload_bytes)?;
    let s = header.shape;
    let got = LatentShape {
        num_layers: s.layers as usize,
        kv_lora_rank: s.kv_lora_rank as usize,
        rope_dim: s.rope_dim as usize,
    };
    check_shape(shape, &got)?;
    if s.hidden_dim != 0 {
        return Err(KvError::Shape {
            field: "hidden_dim",
            expected: 0,
            got: u64::from(s.hidden_dim),
        });
    }
    let rows = KvRows::new(*shape, s.tokens as usize, widen(s.dtype, payload)?)?;
    Ok(IncomingKv {
        header,
        rows,
        frame_bytes: bytes.len(),
    })
}

/// Fails naming the first field where `got` differs from `expected`.
pub(crate) fn check_shape(expected: &LatentShape, got: &LatentShape) -> Result<(), KvError> {
    for (field, e, g) in [
        ("layers", expected.num_layers, got.num_layers),
        ("kv_lora_rank", expected.kv_lora_rank, got.kv_lora_rank),
        ("rope_dim", expected.rope_dim, got.rope_dim),
    ] {
        if e != g {
            return Err(KvError::Shape {
                field,
                expected: e as u64,
                got: g as u64,
            });
        }
    }
    Ok(())
}

fn widen(dtype: KvDtype, payload: &[u8]) -> Result<Vec<f32>, KvError> {
    let out = match dtype {
        KvDtype::F32 => payload
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        KvDtype::Bf16 => payload
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        KvDtype::F16 => payload
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        KvDtype::F8E4M3 => return Err(KvError::Dtype(dtype)),
    };
    Ok(out)
}

/// The request id of a frame whose header body has (partly) arrived, for failing that request
/// when the rest never comes. Reads only the id field of the layout in protocol `kv_frame`.
pub fn peek_request_id(head: &[u8]) -> Option<String> {
    let len_bytes = head.get(PREFIX_LEN..PREFIX_LEN + 2)?;
    let len = usize::from(u16::from_le_bytes([len_bytes[0], len_bytes[1]]));
    let id = head.get(PREFIX_LEN + 2..PREFIX_LEN + 2 + len)?;
    std::str::from_utf8(id).ok().map(str::to_string)
}

/// The receiver's answer to one frame, one byte on the same connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvAck {
    /// Valid and taken (paired with its request, or staged until the request arrives).
    Accepted,
    /// Failed validation (checksum, shape, dtype); the request, if registered, fails.
    Invalid,
    /// Valid but not wanted: a duplicate, or its request was aborted or is gone.
    Unwanted,
    /// The receiver holds too many pending frames or requests.
    Overloaded,
}

impl KvAck {
    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            KvAck::Accepted => 0,
            KvAck::Invalid => 1,
            KvAck::Unwanted => 2,
            KvAck::Overloaded => 3,
        }
    }

    /// The ack for a byte, `None` for an unknown one.
    pub fn from_code(code: u8) -> Option<KvAck> {
        match code {
            0 => Some(KvAck::Accepted),
            1 => Some(KvAck::Invalid),
            2 => Some(KvAck::Unwanted),
            3 => Some(KvAck::Overloaded),
            _ => None,
        }
    }

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            KvAck::Accepted => "accepted",
            KvAck::Invalid => "invalid",
            KvAck::Unwanted => "unwanted",
            KvAck::Overloaded => "overloaded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdserve_engine::{BlockPool, CpuLatentStore, RequestId};

    const SHAPE: LatentShape = LatentShape {
        num_layers: 3,
        kv_lora_rank: 4,
        rope_dim: 2,
    };

    fn rows(tokens: usize) -> KvRows {
        let n = SHAPE.num_layers * tokens * SHAPE.floats_per_token_layer();
        KvRows::new(SHAPE, tokens, (0..n).map(|i| i as f32 * 0.5).collect()).unwrap()
    }

    fn first() -> SampledToken {
        SampledToken {
            id: 9,
            logprob: -0.25,
            top_logprobs: vec![],
        }
    }

    #[test]
    fn frame_round_trips_rows() {
        let r = rows(70);
        let out = OutgoingKv {
            request_id: "req-1",
            first_token: first(),
            seed: 77,
            draft_token: Some(9),
            rows: &r,
        };
        let bytes = encode_kv_frame(&out).unwrap();
        assert_eq!(peek_request_id(&bytes[..20]).as_deref(), Some("req-1"));
        let back = decode_kv_frame(&bytes, 1 << 20, &SHAPE).unwrap();
        assert_eq!(back.rows, r);
        assert_eq!(back.header.seed, Some(77));
        assert_eq!(back.header.first_token, first());
        assert_eq!(back.header.sampled_tokens, 1);
        assert_eq!(back.header.draft_token, Some(9));
        assert_eq!(back.frame_bytes, bytes.len());
    }

    #[test]
    fn per_layer_rows_convert_both_ways() {
        let r = rows(5);
        let layers = r.to_layers();
        assert_eq!(layers.len(), SHAPE.num_layers);
        assert_eq!(layers[1].c_kv.len(), 5 * SHAPE.kv_lora_rank);
        assert_eq!(KvRows::from_layers(SHAPE, 5, &layers).unwrap(), r);
        assert!(matches!(
            KvRows::from_layers(SHAPE, 5, &layers[..2]),
            Err(KvError::Shape {
                field: "layers",
                ..
            })
        ));
        assert!(KvRows::from_layers(SHAPE, 4, &layers).is_err());
    }

    #[test]
    fn frames_of_another_shape_are_refused_naming_the_field() {
        let r = rows(3);
        let out = OutgoingKv {
            request_id: "x",
            first_token: first(),
            seed: 1,
            draft_token: None,
            rows: &r,
        };
        let bytes = encode_kv_frame(&out).unwrap();
        let other = LatentShape {
            rope_dim: 3,
            ..SHAPE
        };
        let err = decode_kv_frame(&bytes, 1 << 20, &other).unwrap_err();
        assert!(
            matches!(
                err,
                KvError::Shape {
                    field: "rope_dim",
                    ..
                }
            ),
            "{err}"
        );
        let mut corrupt = bytes.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        assert!(matches!(
            decode_kv_frame(&corrupt, 1 << 20, &SHAPE),
            Err(KvError::Frame(KvFrameError::Checksum { .. }))
        ));
    }

    #[test]
    fn gather_and_scatter_move_rows_between_stores() {
        let mut pool = BlockPool::new(4);
        pool.reserve(RequestId(1), 100).unwrap();
        pool.reserve(RequestId(2), 100).unwrap();
        let (ta, tb) = (
            pool.table(RequestId(1)).to_vec(),
            pool.table(RequestId(2)).to_vec(),
        );
        let mut store = CpuLatentStore::new(SHAPE, 4).unwrap();
        let r = rows(100);
        r.scatter(&mut store, &ta).unwrap();
        assert_eq!(KvRows::gather(&store, &ta, 100).unwrap(), r);
        // Another sequence's blocks are untouched.
        assert_ne!(KvRows::gather(&store, &tb, 100).unwrap(), r);
        assert!(KvRows::new(SHAPE, 2, vec![0.0; 5]).is_err());
    }

    #[test]
    fn half_precision_payloads_are_widened_and_fp8_refused() {
        let bytes: Vec<u8> = [1.0f32, -0.5]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(widen(KvDtype::Bf16, &bytes).unwrap(), vec![1.0, -0.5]);
        assert!(matches!(
            widen(KvDtype::F8E4M3, &[0]),
            Err(KvError::Dtype(KvDtype::F8E4M3))
        ));
    }

    #[test]
    fn ack_codes_round_trip() {
        for ack in [
            KvAck::Accepted,
            KvAck::Invalid,
            KvAck::Unwanted,
            KvAck::Overloaded,
        ] {
            assert_eq!(KvAck::from_code(ack.code()), Some(ack));
        }
        assert_eq!(KvAck::from_code(200), None);
    }
}
