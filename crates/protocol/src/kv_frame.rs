//! The KV frame: how a prefill instance hands a request's latent KV cache and first token to a decode
//! instance over TCP. Types and byte encoding only; no I/O.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! 0        magic  "PDKV"                         4 bytes
//! 4        version u16 (= KV_FRAME_VERSION)
//! 6        header_len u16                        bytes of the header body that follows
//! 8        header body:
//!            request_id_len u16, request_id (UTF-8)
//!            dtype u8 (1 bf16, 2 f16, 3 f32, 4 f8e4m3),
//!            flags u8 (bit 0: seed present, bit 1: draft present)
//!            first_token_id u32, first_token_logprob f32
//!            n_top u8, n_top × (token_id u32, logprob f32)
//!            seed u64 (0 when absent), sampled_tokens u32
//!            draft_token_id u32 (0 when absent)
//!            layers u32, tokens u32, kv_lora_rank u32, rope_dim u32, hidden_dim u32
//!            payload_len u64
//! 8+h      payload (payload_len bytes)
//! end-4    crc32 (IEEE, crc32fast) of every byte before it
//! ```
//!
//! Payload: for each layer, for each token, `c_kv[kv_lora_rank]` then `k_rope[rope_dim]`; then, when
//! `hidden_dim > 0`, the main model's final hidden state (after the final norm) at the last prompt
//! position, which the decode side's MTP module needs for its first draft. Elements are `dtype`,
//! little-endian.
//!
//! Invariants: [`decode_frame`] accepts exactly the bytes [`encode_frame`] produces and rejects
//! anything else with a [`KvFrameError`] (bad magic, unknown version, length or shape mismatch,
//! checksum), never panicking, and never trusting a length before checking it against
//! `max_payload_bytes` (so a corrupted header cannot make a reader allocate gigabytes).
//! `sampled_tokens` counts the draws already taken from the seeded sampler (1 after prefill), so the
//! decode side continues the same random stream. With MTP, `draft_token_id` is the token prefill's
//! MTP module proposed after the first token; decode verifies it in its first step.

use crate::internal::{SampledToken, TopToken};

/// Frame magic.
pub const KV_FRAME_MAGIC: [u8; 4] = *b"PDKV";
/// Current frame version.
pub const KV_FRAME_VERSION: u16 = 2;
/// Bytes before the header body: magic, version, header_len.
pub const PREFIX_LEN: usize = 8;
/// Bytes of the trailing checksum.
pub const CHECKSUM_LEN: usize = 4;

/// Element type of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
    /// FP8 E4M3.
    F8E4M3,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        match self {
            KvDtype::Bf16 | KvDtype::F16 => 2,
            KvDtype::F32 => 4,
            KvDtype::F8E4M3 => 1,
        }
    }

    fn code(self) -> u8 {
        match self {
            KvDtype::Bf16 => 1,
            KvDtype::F16 => 2,
            KvDtype::F32 => 3,
            KvDtype::F8E4M3 => 4,
        }
    }

    fn from_code(code: u8) -> Result<KvDtype, KvFrameError> {
        match code {
            1 => Ok(KvDtype::Bf16),
            2 => Ok(KvDtype::F16),
            3 => Ok(KvDtype::F32),
            4 => Ok(KvDtype::F8E4M3),
            other => Err(KvFrameError::UnknownDtype(other)),
        }
    }
}

/// Shape of the latent KV in the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Layers (main model; the MTP layer's cache is rebuilt on the decode side).
    pub layers: u32,
    /// Prompt tokens.
    pub tokens: u32,
    /// `c_kv` width.
    pub kv_lora_rank: u32,
    /// `k_rope` width.
    pub rope_dim: u32,
    /// Width of the trailing hidden state; 0 when absent.
    pub hidden_dim: u32,
    /// Element type.
    pub dtype: KvDtype,
}

impl KvShape {
    /// Payload bytes implied by the shape, or `None` on overflow.
    pub fn payload_bytes(&self) -> Option<u64> {
        let per_token = u64::from(self.kv_lora_rank).checked_add(u64::from(self.rope_dim))?;
        let kv = u64::from(self.layers)
            .checked_mul(u64::from(self.tokens))?
            .checked_mul(per_token)?;
        kv.checked_add(u64::from(self.hidden_dim))?
            .checked_mul(self.dtype.size_bytes())
    }
}

/// Everything in the frame but the payload.
#[derive(Debug, Clone, PartialEq)]
pub struct KvFrameHeader {
    /// The generation this KV belongs to.
    pub request_id: String,
    /// The first token, sampled by prefill; decode emits it first.
    pub first_token: SampledToken,
    /// Seed of the generation's sampler, if seeded.
    pub seed: Option<u64>,
    /// Draws already taken from the sampler (1 after prefill).
    pub sampled_tokens: u32,
    /// The MTP draft for the token after `first_token`, when prefill proposed one.
    pub draft_token: Option<u32>,
    /// Payload shape.
    pub shape: KvShape,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvFrameError {
    /// The first four bytes are not `PDKV`.
    #[error("kv frame: bad magic {found:?} (expected \"PDKV\")")]
    BadMagic {
        /// What was there.
        found: [u8; 4],
    },
    /// A version this code does not read.
    #[error("kv frame: unsupported version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Frame version.
        found: u16,
        /// Supported version.
        supported: u16,
    },
    /// Fewer bytes than the frame declares.
    #[error("kv frame: truncated: {needed} bytes needed, {got} available")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// More bytes than the frame declares.
    #[error("kv frame: {extra} unexpected bytes after the checksum")]
    TrailingBytes {
        /// Extra bytes.
        extra: usize,
    },
    /// The header body does not parse to exactly `header_len` bytes.
    #[error("kv frame: header_len is {declared} but the header body is {parsed} bytes")]
    HeaderLength {
        /// Declared.
        declared: usize,
        /// Parsed.
        parsed: usize,
    },
    /// Unknown dtype code.
    #[error("kv frame: unknown dtype code {0}")]
    UnknownDtype(u8),
    /// The request id is not UTF-8.
    #[error("kv frame: request_id is not valid UTF-8")]
    RequestIdEncoding,
    /// The request id is longer than 65535 bytes (encoding only).
    #[error("kv frame: request_id of {0} bytes exceeds 65535")]
    RequestIdTooLong(usize),
    /// More than 255 top logprobs (encoding only).
    #[error("kv frame: {0} top logprobs exceed 255")]
    TooManyTopLogprobs(usize),
    /// The shape's byte size overflows u64.
    #[error("kv frame: shape {0:?} overflows")]
    ShapeOverflow(KvShape),
    /// `payload_len` disagrees with the shape (or, when encoding, the payload given).
    #[error("kv frame: payload is {declared} bytes but the shape implies {expected}")]
    PayloadLength {
        /// Declared / given.
        declared: u64,
        /// Implied by the shape.
        expected: u64,
    },
    /// `payload_len` exceeds the reader's limit.
    #[error("kv frame: payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Declared.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// Checksum mismatch.
    #[error(
        "kv frame: checksum mismatch (frame says {expected:#010x}, bytes give {computed:#010x})"
    )]
    Checksum {
        /// Stored.
        expected: u32,
        /// Computed.
        computed: u32,
    },
}

/// Encodes a frame. The payload must match the header's shape.
pub fn encode_frame(header: &KvFrameHeader, payload: &[u8]) -> Result<Vec<u8>, KvFrameError> {
    let expected = header
        .shape
        .payload_bytes()
        .ok_or(KvFrameError::ShapeOverflow(header.shape))?;
    if payload.len() as u64 != expected {
        return Err(KvFrameError::PayloadLength {
            declared: payload.len() as u64,
            expected,
        });
    }
    let id = header.request_id.as_bytes();
    let id_len = u16::try_from(id.len()).map_err(|_| KvFrameError::RequestIdTooLong(id.len()))?;
    let tops = &header.first_token.top_logprobs;
    let n_top =
        u8::try_from(tops.len()).map_err(|_| KvFrameError::TooManyTopLogprobs(tops.len()))?;

    let mut body = Vec::with_capacity(64 + id.len() + tops.len() * 8);
    body.extend_from_slice(&id_len.to_le_bytes());
    body.extend_from_slice(id);
    body.push(header.shape.dtype.code());
    body.push(u8::from(header.seed.is_some()) | u8::from(header.draft_token.is_some()) << 1);
    body.extend_from_slice(&header.first_token.id.to_le_bytes());
    body.extend_from_slice(&header.first_token.logprob.to_le_bytes());
    body.push(n_top);
    for t in tops {
        body.extend_from_slice(&t.id.to_le_bytes());
        body.extend_from_slice(&t.logprob.to_le_bytes());
    }
    body.extend_from_slice(&header.seed.unwrap_or(0).to_le_bytes());
    body.extend_from_slice(&header.sampled_tokens.to_le_bytes());
    body.extend_from_slice(&header.draft_token.unwrap_or(0).to_le_bytes());
    let s = &header.shape;
    for v in [s.layers, s.tokens, s.kv_lora_rank, s.rope_dim, s.hidden_dim] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&expected.to_le_bytes());
    // The body is at most 2 + 65535 + 18 + 255 × 8 + 40 bytes, which can exceed u16 only through
    // a very long request id.
    let header_len =
        u16::try_from(body.len()).map_err(|_| KvFrameError::RequestIdTooLong(id.len()))?;

    let mut out = Vec::with_capacity(PREFIX_LEN + body.len() + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(&KV_FRAME_MAGIC);
    out.extend_from_slice(&KV_FRAME_VERSION.to_le_bytes());
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// How far a streaming reader has got with a frame, from the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameProgress {
    /// Read until the buffer holds at least this many bytes, then ask again.
    NeedAtLeast(usize),
    /// The whole frame is this many bytes; read exactly that, then call [`decode_frame`].
    Complete(usize),
}

/// Tells a reader how many bytes to read next, validating what is already there (magic, version,
/// header, payload length against `max_payload_bytes`).
pub fn frame_progress(head: &[u8], max_payload_bytes: u64) -> Result<FrameProgress, KvFrameError> {
    if head.len() < PREFIX_LEN {
        return Ok(FrameProgress::NeedAtLeast(PREFIX_LEN));
    }
    let header_len = parse_prefix(head)?;
    let header_end = PREFIX_LEN + header_len;
    if head.len() < header_end {
        return Ok(FrameProgress::NeedAtLeast(header_end));
    }
    let header = parse_header_body(&head[PREFIX_LEN..header_end], max_payload_bytes)?;
    let payload = header_payload_len(&header)?;
    Ok(FrameProgress::Complete(header_end + payload + CHECKSUM_LEN))
}

/// Decodes and validates a complete frame; returns the header and the payload bytes.
pub fn decode_frame(
    bytes: &[u8],
    max_payload_bytes: u64,
) -> Result<(KvFrameHeader, &[u8]), KvFrameError> {
    if bytes.len() < PREFIX_LEN {
        return Err(KvFrameError::Truncated {
            needed: PREFIX_LEN,
            got: bytes.len(),
        });
    }
    let header_len = parse_prefix(bytes)?;
    let header_end = PREFIX_LEN + header_len;
    let body = bytes
        .get(PREFIX_LEN..header_end)
        .ok_or(KvFrameError::Truncated {
            needed: header_end,
            got: bytes.len(),
        })?;
    let header = parse_header_body(body, max_payload_bytes)?;
    let payload_len = header_payload_len(&header)?;
    let payload_end = header_end + payload_len;
    let total = payload_end + CHECKSUM_LEN;
    if bytes.len() < total {
        return Err(KvFrameError::Truncated {
            needed: total,
            got: bytes.len(),
        });
    }
    if bytes.len() > total {
        return Err(KvFrameError::TrailingBytes {
            extra: bytes.len() - total,
        });
    }
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(&bytes[payload_end..total]);
    let expected = u32::from_le_bytes(crc_bytes);
    let computed = crc32fast::hash(&bytes[..payload_end]);
    if expected != computed {
        return Err(KvFrameError::Checksum { expected, computed });
    }
    Ok((header, &bytes[header_end..payload_end]))
}

fn header_payload_len(header: &KvFrameHeader) -> Result<usize, KvFrameError> {
    let len = header
        .shape
        .payload_bytes()
        .ok_or(KvFrameError::ShapeOverflow(header.shape))?;
    usize::try_from(len).map_err(|_| KvFrameError::ShapeOverflow(header.shape))
}

fn parse_prefix(bytes: &[u8]) -> Result<usize, KvFrameError> {
    let mut r = Reader::new(bytes);
    let magic = r.array::<4>()?;
    if magic != KV_FRAME_MAGIC {
        return Err(KvFrameError::BadMagic { found: magic });
    }
    let version = r.u16()?;
    if version != KV_FRAME_VERSION {
        return Err(KvFrameError::UnsupportedVersion {
            found: version,
            supported: KV_FRAME_VERSION,
        });
    }
    Ok(usize::from(r.u16()?))
}

fn parse_header_body(body: &[u8], max_payload_bytes: u64) -> Result<KvFrameHeader, KvFrameError> {
    let mut r = Reader::new(body);
    let id_len = usize::from(r.u16()?);
    let request_id = std::str::from_utf8(r.bytes(id_len)?)
        .map_err(|_| KvFrameError::RequestIdEncoding)?
        .to_string();
    let dtype = KvDtype::from_code(r.u8()?)?;
    let flags = r.u8()?;
    let (has_seed, has_draft) = (flags & 1 == 1, flags & 2 == 2);
    let first_id = r.u32()?;
    let first_logprob = r.f32()?;
    let n_top = r.u8()?;
    let mut top_logprobs = Vec::with_capacity(usize::from(n_top));
    for _ in 0..n_top {
        let id = r.u32()?;
        let logprob = r.f32()?;
        top_logprobs.push(TopToken { id, logprob });
    }
    let seed = r.u64()?;
    let sampled_tokens = r.u32()?;
    let draft_token = r.u32()?;
    let shape = KvShape {
        layers: r.u32()?,
        tokens: r.u32()?,
        kv_lora_rank: r.u32()?,
        rope_dim: r.u32()?,
        hidden_dim: r.u32()?,
        dtype,
    };
    let payload_len = r.u64()?;
    if r.pos != body.len() {
        return Err(KvFrameError::HeaderLength {
            declared: body.len(),
            parsed: r.pos,
        });
    }
    if payload_len > max_payload_bytes {
        return Err(KvFrameError::PayloadTooLarge {
            len: payload_len,
            max: max_payload_bytes,
        });
    }
    let expected = shape
        .payload_bytes()
        .ok_or(KvFrameError::ShapeOverflow(shape))?;
    if payload_len != expected {
        return Err(KvFrameError::PayloadLength {
            declared: payload_len,
            expected,
        });
    }
    Ok(KvFrameHeader {
        request_id,
        first_token: SampledToken {
            id: first_id,
            logprob: first_logprob,
            top_logprobs,
        },
        seed: has_seed.then_some(seed),
        sampled_tokens,
        draft_token: has_draft.then_some(draft_token),
        shape,
    })
}

/// Bounds-checked little-endian reader over a header body.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], KvFrameError> {
        let end = self.pos.saturating_add(n);
        let out = self
            .bytes
            .get(self.pos..end)
            .ok_or(KvFrameError::HeaderLength {
                declared: self.bytes.len(),
                parsed: end,
            })?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], KvFrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, KvFrameError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, KvFrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, KvFrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, KvFrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn f32(&mut self) -> Result<f32, KvFrameError> {
        Ok(f32::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
#[path = "kv_frame_tests.rs"]
mod tests;
