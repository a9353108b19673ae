//! Integration tests of the engine actor and the prefill and decode services: real HTTP and
//! real TCP on loopback, the scripted stand-in model, gates instead of sleeps.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions: a failure must panic the test"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use pdserve_engine::{ScriptedExecutor, TokenId};
use pdserve_protocol::internal::{
    AbortRequest, DecodeErrorKind, DecodeEvent, PrefillResponse, SampledToken,
};
use pdserve_protocol::openai::FinishReason;
use pdserve_worker::{
    EngineEvent, FailureKind, KvInput, KvRows, OutgoingKv, ScriptedBackend, SeqParams, Submission,
    SubmitError, encode_kv_frame, request_key, spawn_engine,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The scripted model's token `k` of request `id` (same on prefill and decode).
fn token(id: &str, k: usize) -> TokenId {
    ScriptedExecutor::new(VOCAB).token(request_key(id), k)
}

/// The KV a prefill instance computes for `prompt`, in frame order.
fn expected_kv(prompt: &[u32]) -> KvRows {
    let mut data = Vec::new();
    for layer in 0..SHAPE.num_layers {
        for (pos, &t) in prompt.iter().enumerate() {
            let (c, r) = ScriptedBackend::latent_row(&SHAPE, t, pos, layer);
            data.extend(c);
            data.extend(r);
        }
    }
    KvRows::new(SHAPE, prompt.len(), data).unwrap()
}

fn token_ids(events: &[DecodeEvent]) -> Vec<u32> {
    events
        .iter()
        .flat_map(|e| match e {
            DecodeEvent::Tokens { ids, .. } => ids.clone(),
            _ => vec![],
        })
        .collect()
}

/// Opens the decode stream, then runs the prefill leg; returns both answers.
async fn generate(
    prefill: &Server,
    decode: &Server,
    id: &str,
    prompt: &[u32],
    max_tokens: u32,
) -> (PrefillResponse, Events) {
    let events = open_decode(
        &decode.base,
        &decode_request(id, prompt, max_tokens, 10_000),
    )
    .await;
    let (status, body) = post_json(
        &prefill.base,
        "/internal/prefill",
        &prefill_request(id, prompt, max_tokens, &decode.kv_addr),
    )
    .await;
    assert_eq!(status, 200, "prefill: {body}");
    (serde_json::from_value(body).unwrap(), events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_then_decode_streams_the_frame_token_then_the_model_tokens() {
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::unbounded_channel();
    let decode = start_decode(
        decode_config(),
        parts(TestBackend::new().probed(probe_tx), clock(1_000, 1_000)),
    )
    .await;
    let prefill = start_prefill(
        prefill_config(),
        parts(TestBackend::new(), clock(1_000, 1_000)),
    )
    .await;
    let prompt = prompt(100); // two blocks, three prefill chunks of at most 48
    let (answer, events) = generate(&prefill, &decode, "gen-1", &prompt, 6).await;

    assert_eq!(answer.request_id, "gen-1");
    assert_eq!(answer.prompt_tokens, 100);
    assert_eq!(answer.first_token.id, token("gen-1", 0));
    let events = events.collect().await;
    let ids = token_ids(&events);
    assert_eq!(
        ids[0], answer.first_token.id,
        "decode emits the frame's token first"
    );
    let want: Vec<u32> = (0..6).map(|k| token("gen-1", k)).collect();
    assert_eq!(ids, want);
    match &events[events.len() - 2] {
        DecodeEvent::Tokens { finish_reason, .. } => {
            assert_eq!(*finish_reason, Some(FinishReason::Length));
        }
        other => panic!("expected the last tokens, got {other:?}"),
    }
    match events.last().unwrap() {
        DecodeEvent::Done { usage, .. } => {
            assert_eq!((usage.prompt_tokens, usage.completion_tokens), (100, 6));
        }
        other => panic!("expected done, got {other:?}"),
    }
    // The KV crossed TCP intact: the decode instance's first step saw the prefill's rows.
    let probe = probe_rx.recv().await.unwrap();
    assert_eq!(probe.id, request_key("gen-1"));
    assert_eq!(probe.rows, expected_kv(&prompt));

    let p = eventually_stats(&prefill.base, "prefill frees its blocks", all_blocks_free).await;
    let d = eventually_stats(&decode.base, "decode frees its blocks", all_blocks_free).await;
    // Both report the cached layer count the router compares before pairing them.
    let layers = Some(SHAPE.num_layers as u32);
    assert_eq!((p.kv_layers, d.kv_layers), (layers, layers));
    let text = metrics_text(&decode.base).await;
    assert!(
        text.contains(
            "pdserve_decode_kv_frames_total{instance=\"decode-test\",outcome=\"accepted\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("pdserve_decode_num_requests_running"),
        "{text}"
    );
    let text = metrics_text(&prefill.base).await;
    assert!(
        text.contains("pdserve_prefill_kv_transfer_seconds_count{instance=\"prefill-test\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_arriving_before_its_decode_request_is_admitted_when_it_registers() {
    let decode = start_decode(
        decode_config(),
        parts(TestBackend::new(), clock(1_000, 1_000)),
    )
    .await;
    let prefill = start_prefill(
        prefill_config(),
        parts(TestBackend::new(), clock(1_000, 1_000)),
    )
    .await;
    let prompt = prompt(30);
    let (status, body) = post_json(
        &prefill.base,
        "/internal/prefill",
        &prefill_request("early", &prompt, 4, &decode.kv_addr),
    )
    .await;
    assert_eq!(status, 200, "the staged frame is acknowledged: {body}");
    let staged = stats(&decode.base).await;
    assert!(all_blocks_free(&staged), "a staged frame holds no blocks");

    let events = open_decode(&decode.base, &decode_request("early", &prompt, 4, 10_000))
        .await
        .collect()
        .await;
    let want: Vec<u32> = (0..4).map(|k| token("early", k)).collect();
    assert_eq!(token_ids(&events), want);
    match events.last().unwrap() {
        DecodeEvent::Done { timings, .. } => assert_eq!(timings.kv_wait_s, 0.0),
        other => panic!("expected done, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_request_without_kv_ends_with_kv_timeout_and_a_late_frame_is_unwanted() {
    let decode = start_decode(
        decode_config(),
        parts(TestBackend::new(), clock(1_000, 1_000)),
    )
    .await;
    let prefill = start_prefill(
        prefill_config(),
        parts(TestBackend::new(), clock(1_000, 1_000)),
    )
    .await;
    let prompt = prompt(10);
    let events = open_decode(&decode.base, &decode_request("late", &prompt, 4, 30))
        .await
        .collect()
        .await;
    match events.as_slice() {
        [DecodeEvent::Error { kind, .. }] => assert_eq!(*kind, DecodeErrorKind::KvTimeout),
        other => panic!("expected one kv_timeout error, got {other:?}"),
    }
    let (status, body) = post_json(
        &prefill.base,
        "/internal/prefill",
        &prefill_request("late", &prompt, 4, &decode.kv_addr),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "kv_transfer_unwanted");
    eventually_stats(&prefill.base, "prefill frees its blocks", all_blocks_free).await;
    let s = stats(&decode.base).await;
    assert_eq!(s.waiting, 0);
    assert!(all_blocks_free(&s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_truncated_frames_fail_their_requests_and_hold_no_blocks() {
    let decode = start_decode(
        decode_config(),
        parts(TestBackend::new(), clock(1_000, 1_000)),
    )
    .await;
    let prompt = prompt(20);
    let rows = expected_kv(&prompt);
    let frame = |id: &str| {
        encode_kv_frame(&OutgoingKv {
            request_id: id,
            first_token: SampledToken {
                id: 3,
                logprob: -0.5,
                top_logprobs: vec![],
            },
            seed: 7,
            draft_token: None,
            rows: &rows,
        })
        .unwrap()
    };

    let corrupt_events =
        open_decode(&decode.base, &decode_request("bad", &prompt, 4, 10_000)).await;
    let mut corrupt = frame("bad");
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x5a;
    let mut conn = tokio::net::TcpStream::connect(&decode.kv_addr)
        .await
        .unwrap();
    conn.write_all(&corrupt).await.unwrap();
    let mut ack = [0u8; 1];
    conn.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack[0], pdserve_worker::KvAck::Invalid.code());
    match corrupt_events.collect().await.as_slice() {
        [DecodeEvent::Error { kind, message }] => {
            assert_eq!(*kind, DecodeErrorKind::KvInvalid);
            assert!(message.contains("checksum"), "{message}");
        }
        other => panic!("expected one kv_invalid error, got {other:?}"),
    }

    let cut_events = open_decode(&decode.base, &decode_request("cut", &prompt, 4, 10_000)).await;
    let whole = frame("cut");
    let mut conn = tokio::net::TcpStream::connect(&decode.kv_addr)
        .await
        .unwrap();
    conn.write_all(&whole[..whole.len() / 2]).await.unwrap();
    drop(conn);
    match cut_events.collect().await.as_slice() {
        [DecodeEvent::Error { kind, message }] => {
            assert_eq!(*kind, DecodeErrorKind::KvInvalid);
            assert!(message.contains("closed"), "{message}");
        }
        other => panic!("expected one kv_invalid error, got {other:?}"),
    }
    let s = stats(&decode.base).await;
    assert!(all_blocks_free(&s));
    assert_eq!((s.running, s.waiting), (0, 0));
    let text = metrics_text(&decode.base).await;
    assert!(
        text.contains(
            "pdserve_decode_kv_frames_total{instance=\"decode-test\",outcome=\"invalid\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "pdserve_decode_kv_frames_total{instance=\"decode-test\",outcome=\"failed\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_frees_the_blocks_of_a_running_decode_at_once() {
    let gate = Gate::closed();
    let decode = start_decode(
        decode_config(),
        parts(TestBackend::new().gated(&gate), clock(1_000, 1_000)),
    )
    .await;
    let prefill = start_prefill(
        prefill_config(),
        parts(TestBackend::new(), clock(1_000, 1_000)),
    )
    .await;
    let (_, mut events) = generate(&prefill, &decode, "stop-me", &prompt(70), 50).await;
    assert!(matches!(
        events.next().await,
        Some(DecodeEvent::Tokens { .. })
    ));
    gate.entered(1).await; // the first decode step holds the request's blocks
    let held = stats(&decode.base).await;
    assert_eq!(held.kv_blocks_total - held.kv_blocks_free, 2);

    let (status, body) = post_json(
        &decode.base,
        "/internal/abort",
        &AbortRequest {
            request_id: "stop-me".into(),
        },
    )
    .await;
    assert_eq!((status, body["found"].as_bool()), (200, Some(true)));
    assert!(
        all_blocks_free(&stats(&decode.base).await),
        "freed before the step ends"
    );
    match events.next().await {
        Some(DecodeEvent::Error { kind, .. }) => assert_eq!(kind, DecodeErrorKind::Aborted),
        other => panic!("expected an aborted error, got {other:?}"),
    }
    assert!(events.next().await.is_none());
    gate.open();
    let (_, again) = post_json(
        &decode.base,
        "/internal/abort",
        &AbortRequest {
            request_id: "stop-me".into(),
        },
    )
    .await;
    assert_eq!(again["found"], false, "abort is idempotent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_decode_and_frees_its_blocks() {
    let gate = Gate::closed();
    let decode = start_decode(
        decode_config(),
        parts(TestBackend::new().gated(&gate), clock(1_000, 1_000)),
    )
    .await;
    let prefill = start_prefill(
        prefill_config(),
        parts(TestBackend::new(), clock(1_000, 1_000)),
    )
    .await;
    // 900 tokens cannot finish within the few steps released below.
    let (_, mut events) = generate(&prefill, &decode, "gone", &prompt(100), 900).await;
    assert!(matches!(
        events.next().await,
        Some(DecodeEvent::Tokens { .. })
    ));
    gate.entered(1).await;
    drop(events);
    let aborted = "pdserve_decode_requests_finished_total{instance=\"decode-test\",finished_reason=\"abort\"} 1";
    let mut released = 0;
    while !metrics_text(&decode.base).await.contains(aborted) {
        assert!(released < 400, "the disconnect was never noticed");
        gate.release(1); // each step writes to the closed connection
        released += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eventually_stats(&decode.base, "decode frees its blocks", all_blocks_free).await;
    gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_services_release_no_earlier_than_simulated_time_times_scale() {
    let scale = 2.0;
    let (prefill_step_ns, kv_ns, decode_step_ns) = (3_000_000, 20_000_000, 4_000_000);
    let mut pc = prefill_config();
    pc.engine.time_scale = scale;
    let mut dc = decode_config();
    dc.engine.time_scale = scale;
    let decode = start_decode(dc, parts(TestBackend::new(), clock(decode_step_ns, 0))).await;
    let prefill = start_prefill(pc, parts(TestBackend::new(), clock(prefill_step_ns, kv_ns))).await;
    let started = Instant::now();
    // 100 prompt tokens: 3 prefill steps; 6 output tokens: 5 decode steps.
    let (answer, events) = generate(&prefill, &decode, "paced", &prompt(100), 6).await;
    let events = events.collect().await;
    let elapsed = started.elapsed().as_secs_f64();

    let ms = |ns: u64| ns as f64 * 1e-9;
    let t = &answer.timings;
    assert!(
        (t.simulated_prefill_s - 3.0 * ms(prefill_step_ns)).abs() < 1e-9,
        "{t:?}"
    );
    assert!(t.prefill_s >= 3.0 * ms(prefill_step_ns) * scale, "{t:?}");
    assert!(t.transfer_s >= ms(kv_ns) * scale, "{t:?}");
    let DecodeEvent::Done { timings, .. } = events.last().unwrap() else {
        panic!("expected done, got {events:?}");
    };
    assert!((timings.simulated_decode_s - 5.0 * ms(decode_step_ns)).abs() < 1e-9);
    assert!(
        timings.decode_s >= 5.0 * ms(decode_step_ns) * scale,
        "{timings:?}"
    );
    let floor = (3.0 * ms(prefill_step_ns) + ms(kv_ns) + 5.0 * ms(decode_step_ns)) * scale;
    assert!(elapsed >= floor, "{elapsed} s < {floor} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_are_refused_with_429() {
    let gate = Gate::closed();
    let mut pc = prefill_config();
    pc.engine.scheduler.max_running_seqs = 1;
    pc.engine.max_waiting_requests = 1;
    let prefill = start_prefill(
        pc,
        parts(TestBackend::new().gated(&gate), clock(1_000, 1_000)),
    )
    .await;
    let nowhere = "127.0.0.1:9"; // never reached: both requests are aborted first
    let send = |id: &'static str| {
        let base = prefill.base.clone();
        tokio::spawn(async move {
            post_json(
                &base,
                "/internal/prefill",
                &prefill_request(id, &prompt(8), 4, nowhere),
            )
            .await
        })
    };
    let running = send("a");
    gate.entered(1).await;
    let queued = send("b");
    eventually_stats(&prefill.base, "b queued", |s| s.waiting == 1).await;
    let (status, body) = post_json(
        &prefill.base,
        "/internal/prefill",
        &prefill_request("c", &prompt(8), 4, nowhere),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "queue_full");
    for id in ["a", "b"] {
        let abort = AbortRequest {
            request_id: id.into(),
        };
        assert_eq!(
            post_json(&prefill.base, "/internal/abort", &abort).await.0,
            200
        );
    }
    for task in [running, queued] {
        let (status, body) = task.await.unwrap();
        assert_eq!(
            (status, &body["error"]["code"]),
            (503, &serde_json::json!("aborted"))
        );
    }
    assert!(all_blocks_free(&stats(&prefill.base).await));
    gate.open();

    let mut dc = decode_config();
    dc.max_pending_requests = 1;
    let decode = start_decode(dc, parts(TestBackend::new(), clock(1_000, 1_000))).await;
    let first = open_decode(&decode.base, &decode_request("x", &prompt(8), 4, 60_000)).await;
    let (status, body) = post_json(
        &decode.base,
        "/internal/decode",
        &decode_request("y", &prompt(8), 4, 60_000),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    let abort = AbortRequest {
        request_id: "x".into(),
    };
    assert_eq!(
        post_json(&decode.base, "/internal/abort", &abort).await.1["found"],
        true
    );
    match first.collect().await.as_slice() {
        [DecodeEvent::Error { kind, .. }] => assert_eq!(*kind, DecodeErrorKind::Aborted),
        other => panic!("expected one aborted error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_waiting_for_blocks_held_by_a_transfer_runs_once_they_are_released() {
    let mut pc = prefill_config();
    pc.engine.scheduler.num_kv_blocks = 16; // one 1024-token context; a 600-token prompt takes 10
    let prefill = start_prefill(pc, parts(TestBackend::new(), clock(1_000, 1_000))).await;
    let acks = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let (kv_addr, mut frames) = holding_kv_receiver(std::sync::Arc::clone(&acks)).await;
    let send = |id: &'static str| {
        let (base, kv_addr) = (prefill.base.clone(), kv_addr.clone());
        tokio::spawn(async move {
            post_json(
                &base,
                "/internal/prefill",
                &prefill_request(id, &prompt(600), 4, &kv_addr),
            )
            .await
        })
    };
    let first = send("first");
    assert_eq!(frames.recv().await.as_deref(), Some("first"));
    let second = send("second");
    let parked =
        eventually_stats(&prefill.base, "second waits for blocks", |s| s.waiting == 1).await;
    assert_eq!(
        (parked.running, parked.kv_blocks_free),
        (0, 6),
        "first's KV is retained"
    );

    acks.add_permits(1);
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(frames.recv().await.as_deref(), Some("second"));
    acks.add_permits(1);
    let (status, body) = second.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(all_blocks_free(&stats(&prefill.base).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transfer_frees_the_prefill_blocks_and_says_why() {
    let prefill = start_prefill(
        prefill_config(),
        parts(TestBackend::new(), clock(1_000, 1_000)),
    )
    .await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }; // dropped: nothing listens there
    let (status, body) = post_json(
        &prefill.base,
        "/internal/prefill",
        &prefill_request("lost", &prompt(40), 4, &closed),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "kv_transfer_connect_failed");
    assert!(
        !body.to_string().contains(&closed),
        "the address stays in the diagnostic"
    );
    eventually_stats(&prefill.base, "prefill frees its blocks", all_blocks_free).await;
    let text = metrics_text(&prefill.base).await;
    assert!(
        text.contains("pdserve_prefill_kv_transfer_failures_total{instance=\"prefill-test\",reason=\"connect\"} 1"),
        "{text}"
    );
    let (status, body) = post_json(
        &prefill.base,
        "/internal/prefill",
        &prefill_request("", &prompt(4), 4, &closed),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["param"]),
        (400, &serde_json::json!("request_id"))
    );
}

// ---- The engine actor on its own ----

fn submission(id: &str, prompt_len: usize, max_tokens: u32) -> Submission {
    Submission {
        request_id: id.into(),
        prompt: prompt(prompt_len),
        params: SeqParams {
            sampling: Default::default(),
            stop: pdserve_protocol::params::StopParams {
                max_tokens,
                stop_token_ids: vec![],
                ignore_eos: false,
                min_tokens: 0,
            },
        },
        max_output_tokens: max_tokens,
        kv: KvInput::Compute { retain: false },
    }
}

fn engine(
    backend: TestBackend,
    clock: pdserve_worker::LinearFabricClock,
    scale: f64,
) -> pdserve_worker::EngineHandle {
    let mut config = engine_config();
    config.time_scale = scale;
    spawn_engine(
        &config,
        parts(backend, clock),
        pdserve_worker::metrics::EngineMetrics::noop(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_releases_step_k_no_earlier_than_k_scaled_step_times() {
    let (step_ns, scale) = (4_000_000u64, 1.5);
    let handle = engine(TestBackend::new(), clock(step_ns, 0), scale);
    let submitted = Instant::now();
    // A 10-token prompt is one prefill step; then 4 decode steps for 5 tokens.
    let mut stream = handle.submit(submission("paced", 10, 5)).await.unwrap();
    let mut k = 0u32;
    while let Some(event) = stream.next().await {
        match event {
            EngineEvent::Tokens { ids, .. } => {
                k += ids.len() as u32;
                let floor = Duration::from_nanos(step_ns).mul_f64(scale) * k;
                assert!(submitted.elapsed() >= floor, "token {k} before {floor:?}");
            }
            EngineEvent::Done(report) => {
                assert_eq!(report.output_tokens, 5);
                assert!((report.simulated_s - 5.0 * step_ns as f64 * 1e-9).abs() < 1e-12);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(k, 5);
    let snap = handle.snapshot().await.unwrap();
    assert_eq!(snap.simulated_ns_total, 5 * step_ns);
    assert_eq!(snap.steps_paced, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_cancels_the_request_and_frees_its_blocks() {
    let gate = Gate::closed();
    let handle = engine(TestBackend::new().gated(&gate), clock(1_000, 0), 0.0);
    let stream = handle.submit(submission("dropped", 100, 50)).await.unwrap();
    gate.entered(1).await;
    assert!(handle.snapshot().await.unwrap().stats.kv_blocks_used > 0);
    assert!(matches!(
        handle.submit(submission("dropped", 5, 2)).await,
        Err(SubmitError::Duplicate(_))
    ));
    drop(stream);
    // The cancel is queued before this snapshot command, so it is already applied.
    let snap = handle.snapshot().await.unwrap();
    assert_eq!(snap.stats.kv_blocks_used, 0);
    assert_eq!(snap.stats.requests_finished_total.abort, 1);
    gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_executor_ends_every_request_with_one_error_and_no_blocks() {
    let handle = engine(TestBackend::new().failing_at_step(2), clock(1_000, 0), 0.0);
    let mut a = handle.submit(submission("a", 20, 10)).await.unwrap();
    let mut events = Vec::new();
    while let Some(e) = a.next().await {
        events.push(e);
    }
    let terminal: Vec<_> = events.iter().filter(|e| e.is_terminal()).collect();
    assert_eq!(terminal.len(), 1, "{events:?}");
    assert!(
        matches!(
            terminal[0],
            EngineEvent::Failed {
                kind: FailureKind::Internal,
                ..
            }
        ),
        "{events:?}"
    );
    assert_eq!(handle.snapshot().await.unwrap().stats.kv_blocks_used, 0);
    // Later requests still run: a step failure is not an engine failure.
    let mut b = handle.submit(submission("b", 5, 2)).await.unwrap();
    let mut last = None;
    while let Some(e) = b.next().await {
        last = Some(e);
    }
    assert!(matches!(last, Some(EngineEvent::Done(_))), "{last:?}");
}
