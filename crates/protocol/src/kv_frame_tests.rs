use super::*;
use proptest::prelude::*;

const MAX: u64 = 1 << 20;

fn header(tokens: u32, seed: Option<u64>, tops: usize) -> KvFrameHeader {
    KvFrameHeader {
        request_id: "cmpl-abc-0".to_string(),
        first_token: SampledToken {
            id: 42,
            logprob: -0.25,
            top_logprobs: (0..tops)
                .map(|i| TopToken {
                    id: i as u32,
                    logprob: -(i as f32),
                })
                .collect(),
        },
        seed,
        sampled_tokens: 1,
        draft_token: None,
        shape: KvShape {
            layers: 2,
            tokens,
            kv_lora_rank: 4,
            rope_dim: 2,
            hidden_dim: 3,
            dtype: KvDtype::Bf16,
        },
    }
}

fn payload_for(h: &KvFrameHeader) -> Vec<u8> {
    let n = h.shape.payload_bytes().unwrap() as usize;
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn payload_size_follows_the_shape() {
    // 2 layers × 5 tokens × (4 + 2) + 3 hidden = 63 elements of 2 bytes.
    assert_eq!(header(5, None, 0).shape.payload_bytes(), Some(126));
}

#[test]
fn encode_rejects_a_payload_that_does_not_match_the_shape() {
    let h = header(5, None, 0);
    let err = encode_frame(&h, &[0u8; 10]).unwrap_err();
    assert_eq!(
        err,
        KvFrameError::PayloadLength {
            declared: 10,
            expected: 126
        }
    );
}

#[test]
fn progress_walks_a_reader_through_the_frame() {
    let h = header(3, Some(9), 2);
    let frame = encode_frame(&h, &payload_for(&h)).unwrap();
    assert_eq!(
        frame_progress(&frame[..3], MAX).unwrap(),
        FrameProgress::NeedAtLeast(8)
    );
    let FrameProgress::NeedAtLeast(header_end) = frame_progress(&frame[..8], MAX).unwrap() else {
        panic!("expected NeedAtLeast");
    };
    assert!(header_end > 8);
    assert_eq!(
        frame_progress(&frame[..header_end], MAX).unwrap(),
        FrameProgress::Complete(frame.len())
    );
}

#[test]
fn corrupted_fields_give_named_errors() {
    let h = header(3, None, 1);
    let frame = encode_frame(&h, &payload_for(&h)).unwrap();

    let mut bad = frame.clone();
    bad[0] = b'X';
    assert!(matches!(
        decode_frame(&bad, MAX),
        Err(KvFrameError::BadMagic { .. })
    ));

    let mut bad = frame.clone();
    bad[4] = 9;
    assert!(matches!(
        decode_frame(&bad, MAX),
        Err(KvFrameError::UnsupportedVersion { found: 9, .. })
    ));

    let mut bad = frame.clone();
    let last = bad.len() - 6;
    bad[last] ^= 0x10;
    assert!(matches!(
        decode_frame(&bad, MAX),
        Err(KvFrameError::Checksum { .. })
    ));

    assert!(matches!(
        decode_frame(&frame[..frame.len() - 1], MAX),
        Err(KvFrameError::Truncated { .. })
    ));
    let mut long = frame.clone();
    long.push(0);
    assert_eq!(
        decode_frame(&long, MAX).unwrap_err(),
        KvFrameError::TrailingBytes { extra: 1 }
    );

    assert!(matches!(
        decode_frame(&frame, 10),
        Err(KvFrameError::PayloadTooLarge { len: _, max: 10 })
    ));
}

fn arb_header() -> impl Strategy<Value = KvFrameHeader> {
    (
        "[a-z0-9-]{0,40}",
        any::<u32>(),
        -100.0f32..0.0,
        proptest::collection::vec((any::<u32>(), -100.0f32..0.0), 0..20),
        proptest::option::of(any::<u64>()),
        (any::<u32>(), proptest::option::of(any::<u32>())),
        (0u32..4, 0u32..6, 0u32..5, 0u32..3, 0u32..4),
        prop_oneof![
            Just(KvDtype::Bf16),
            Just(KvDtype::F16),
            Just(KvDtype::F32),
            Just(KvDtype::F8E4M3)
        ],
    )
        .prop_map(
            |(request_id, id, logprob, tops, seed, (sampled_tokens, draft_token), dims, dtype)| {
                KvFrameHeader {
                    request_id,
                    first_token: SampledToken {
                        id,
                        logprob,
                        top_logprobs: tops
                            .into_iter()
                            .map(|(id, logprob)| TopToken { id, logprob })
                            .collect(),
                    },
                    seed,
                    sampled_tokens,
                    draft_token,
                    shape: KvShape {
                        layers: dims.0,
                        tokens: dims.1,
                        kv_lora_rank: dims.2,
                        rope_dim: dims.3,
                        hidden_dim: dims.4,
                        dtype,
                    },
                }
            },
        )
}

proptest! {
    #[test]
    fn encode_then_decode_is_the_identity(h in arb_header(), fill in any::<u8>()) {
        let payload = vec![fill; h.shape.payload_bytes().unwrap() as usize];
        let frame = encode_frame(&h, &payload).unwrap();
        let (back, body) = decode_frame(&frame, MAX).unwrap();
        prop_assert_eq!(back, h);
        prop_assert_eq!(body, &payload[..]);
        prop_assert_eq!(frame_progress(&frame, MAX).unwrap(), FrameProgress::Complete(frame.len()));
    }

    #[test]
    fn any_single_byte_corruption_is_an_error(
        h in arb_header(),
        pos in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let payload = vec![3u8; h.shape.payload_bytes().unwrap() as usize];
        let mut frame = encode_frame(&h, &payload).unwrap();
        let i = pos.index(frame.len());
        frame[i] ^= flip;
        prop_assert!(decode_frame(&frame, MAX).is_err());
    }

    #[test]
    fn truncation_is_an_error(h in arb_header(), cut in any::<prop::sample::Index>()) {
        let payload = vec![1u8; h.shape.payload_bytes().unwrap() as usize];
        let frame = encode_frame(&h, &payload).unwrap();
        let n = cut.index(frame.len());
        prop_assert!(decode_frame(&frame[..n], MAX).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_frame(&bytes, MAX);
        let _ = frame_progress(&bytes, MAX);
        let mut framed = KV_FRAME_MAGIC.to_vec();
        framed.extend_from_slice(&KV_FRAME_VERSION.to_le_bytes());
        framed.extend_from_slice(&bytes);
        let _ = decode_frame(&framed, MAX);
        let _ = frame_progress(&framed, MAX);
    }
}
