//! loadtest against a scripted fake OpenAI server: measured latencies match the script,
//! coordinated omission is avoided, failures are counted, schedules are reproducible.
//!
//! Tolerances: the fake server delays by exactly its script *after* it receives a request, so
//! every latency has a hard lower bound (the script). Upper bounds are generous (tens of ms) so a
//! loaded 2-core machine does not break them; medians are used where one late chunk could skew a
//! single sample.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup step must abort the test"
)]

mod common;

use clap::Parser;
use common::{Behavior, FakeServer, Script, closed_port_url, word_level_tokenizer};
use loadtest::args::Cli;
use loadtest::bench::{PointResult, execute};
use loadtest::metrics::percentile;
use loadtest::record::{ChunkTokenSource, RequestRecord};
use loadtest::schedule::{ArrivalSpec, ScheduleBounds, build_schedule};
use std::io::Write;
use std::sync::Arc;

async fn bench(args: &[&str]) -> (Vec<PointResult>, String) {
    let mut v = vec!["loadtest", "--disable-tqdm", "--random-input-len", "8"];
    v.extend_from_slice(args);
    let plan = Cli::try_parse_from(v).unwrap().into_plan(None).unwrap();
    let mut out = Vec::new();
    let res = execute(&plan, &mut out).await.unwrap();
    (res, String::from_utf8(out).unwrap())
}

fn ms(s: f64) -> f64 {
    s * 1e3
}

fn median_ms(values_s: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values_s.map(ms).collect();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

fn ttfts_ms(records: &[RequestRecord]) -> Vec<f64> {
    records.iter().map(|r| ms(r.ttft_s().unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_chat_ttft_tpot_itl_match_the_script() {
    let srv = FakeServer::start(Script {
        ttft_ms: 50,
        itl_ms: 20,
        ..Script::default()
    })
    .await;
    let (res, table) = bench(&[
        "--base-url",
        &srv.base_url,
        "--endpoint",
        "/v1/chat/completions",
        "--num-prompts",
        "6",
        "--max-concurrency",
        "2",
        "--random-output-len",
        "10",
    ])
    .await;
    let r = &res[0];
    assert_eq!((r.wall.completed, r.wall.failed), (6, 0));
    let ttfts = ttfts_ms(&r.run.records);
    for &t in &ttfts {
        assert!((50.0..250.0).contains(&t), "TTFT {t} ms, scripted 50 ms");
    }
    let ttft = median_ms(ttfts.iter().map(|t| t / 1e3));
    assert!(
        (50.0..90.0).contains(&ttft),
        "median TTFT {ttft} ms, scripted 50 ms"
    );
    for rec in &r.run.records {
        assert_eq!(rec.output_tokens, 10);
        assert_eq!(rec.prompt_tokens, 8);
        assert!(rec.usage_reported);
    }
    let tpot = median_ms(r.run.records.iter().filter_map(RequestRecord::tpot_s));
    assert!(
        (17.0..45.0).contains(&tpot),
        "median TPOT {tpot} ms, scripted 20 ms"
    );
    let itl = median_ms(r.run.records.iter().flat_map(RequestRecord::itls_s));
    assert!(
        (15.0..45.0).contains(&itl),
        "median ITL {itl} ms, scripted 20 ms"
    );
    assert_eq!(r.wall.total_output_tokens, 60);
    assert_eq!(r.wall.max_concurrent_requests, 2);
    assert!(table.contains("Mean TTFT (ms):"));
    let body = &srv.seen().bodies[0];
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_completion_tokens"], 10);
    assert_eq!(body["ignore_eos"], true);
    assert_eq!(body["min_tokens"], 10);
    assert_eq!(body["model"], "fake-model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn itl_is_normalized_by_tokens_per_chunk() {
    // 60 ms per 2-token chunk: normalized ITL ≈ 30 ms; without normalization it would be ≥ 60.
    let script = Script {
        ttft_ms: 30,
        itl_ms: 60,
        tokens_per_chunk: 2,
        ..Script::default()
    };
    let srv = FakeServer::start(script).await;
    let base = [
        "--base-url",
        &srv.base_url,
        "--num-prompts",
        "3",
        "--max-concurrency",
        "3",
        "--random-output-len",
        "10",
    ];
    for (extra, source) in [
        (&["--continuous-usage-stats"][..], ChunkTokenSource::Usage),
        (
            &["--logprobs", "1", "--endpoint", "/v1/chat/completions"],
            ChunkTokenSource::Logprobs,
        ),
        (&["--logprobs", "0"], ChunkTokenSource::Logprobs),
        (&[], ChunkTokenSource::Uniform),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let (res, _) = bench(&args).await;
        let recs = &res[0].run.records;
        assert!(
            recs.iter()
                .all(|r| r.success() && r.chunk_token_source == source && r.chunks.len() == 5)
        );
        assert!(
            recs.iter()
                .all(|r| r.chunks.iter().all(|c| c.tokens == 2.0))
        );
        let itl = median_ms(recs.iter().flat_map(RequestRecord::itls_s));
        assert!(
            (25.0..50.0).contains(&itl),
            "{source:?}: median ITL {itl} ms, scripted 60 ms per 2 tokens"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_server_shows_in_latency_of_requests_due_during_stall() {
    // The server answers nothing until 5 requests have arrived; with constant 50 ms gaps the 5th
    // is due at 200 ms, so request i (due at 50·i ms) cannot see its first token before
    // 200 + 10 ms after the start: its TTFT is at least 210 − 50·i ms.
    let script = Script {
        ttft_ms: 10,
        itl_ms: 5,
        hold_until_arrivals: Some(5),
        ..Script::default()
    };
    let srv = FakeServer::start(script).await;
    let (res, _) = bench(&[
        "--base-url",
        &srv.base_url,
        "--num-prompts",
        "8",
        "--request-rate",
        "20",
        "--burstiness",
        "inf",
        "--random-output-len",
        "3",
    ])
    .await;
    let recs = &res[0].run.records;
    assert!(recs.iter().all(|r| r.open_loop && r.success()));
    for (i, t) in ttfts_ms(recs).into_iter().enumerate().take(5) {
        let floor = 210.0 - 50.0 * i as f64;
        assert!(t >= floor - 0.5, "request {i}: TTFT {t} ms < {floor} ms");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_held_by_the_cap_during_a_stall_count_their_wait() {
    // Request 0 takes 300 ms to its first token; the cap of 1 holds requests due at 50, 100, …
    // until it finishes. Measured from their intended times, their TTFT includes that wait.
    let script = Script {
        ttft_ms: 10,
        itl_ms: 5,
        behavior: Arc::new(|n| {
            if n == 0 {
                Behavior::SlowFirstToken { ttft_ms: 300 }
            } else {
                Behavior::Stream
            }
        }),
        ..Script::default()
    };
    let srv = FakeServer::start(script).await;
    let (res, table) = bench(&[
        "--base-url",
        &srv.base_url,
        "--num-prompts",
        "6",
        "--request-rate",
        "20",
        "--burstiness",
        "inf",
        "--max-concurrency",
        "1",
        "--random-output-len",
        "2",
    ])
    .await;
    let recs = &res[0].run.records;
    assert!(recs.iter().all(RequestRecord::success));
    for (i, r) in recs.iter().enumerate().skip(1) {
        // Request 0 ends at ≥ 305 ms; request i is due at 50·i ms and then waits ≥ 10 ms more.
        let floor = 315.0 - 50.0 * i as f64;
        let ttft = ms(r.ttft_s().unwrap());
        assert!(
            ttft >= floor - 0.5,
            "request {i}: TTFT {ttft} ms < {floor} ms"
        );
        assert!(ms(r.queue_s()) >= 305.0 - 50.0 * i as f64 - 0.5);
    }
    // Timed from the actual send, request 1 would look fast: that is the omission avoided.
    let r1 = &recs[1];
    assert!(r1.chunks[0].at_s - r1.sent_s < r1.ttft_s().unwrap() - 0.1);
    assert!(res[0].wall.client_queue.mean_ms > 100.0);
    assert!(table.contains("Client queue time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_kind_not_dropped() {
    let script = Script {
        ttft_ms: 5,
        itl_ms: 2,
        behavior: Arc::new(|n| match n % 4 {
            1 => Behavior::Status(503),
            2 => Behavior::ErrorAfter(1),
            3 => Behavior::DropAfter(1),
            _ => Behavior::Stream,
        }),
        ..Script::default()
    };
    let srv = FakeServer::start(script).await;
    let (res, table) = bench(&[
        "--base-url",
        &srv.base_url,
        "--num-prompts",
        "8",
        "--max-concurrency",
        "1",
        "--random-output-len",
        "4",
        "--endpoint",
        "/v1/chat/completions",
    ])
    .await;
    let r = &res[0];
    assert_eq!(r.run.records.len(), 8);
    assert_eq!((r.wall.completed, r.wall.failed), (2, 6));
    let kinds: Vec<(&str, usize)> = r
        .wall
        .failures_by_kind
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        kinds,
        vec![("http_503", 2), ("incomplete", 2), ("stream_error", 2)]
    );
    let msg = r.run.records[1].failure.as_ref().map(|f| f.message.clone());
    assert_eq!(msg.as_deref(), Some("scripted 503"));
    assert!(table.contains("http_503:"));
    assert_eq!(r.json["failed"], 6);
    assert_eq!(r.json["failures_by_kind"]["stream_error"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_and_timeouts_are_failures() {
    let url = closed_port_url().await;
    let (res, _) = bench(&[
        "--base-url",
        &url,
        "--model",
        "m",
        "--num-prompts",
        "3",
        "--random-output-len",
        "2",
    ])
    .await;
    assert_eq!(res[0].wall.failures_by_kind.get("connect"), Some(&3));

    let srv = FakeServer::start(Script {
        ttft_ms: 2000,
        ..Script::default()
    })
    .await;
    let (res, _) = bench(&[
        "--base-url",
        &srv.base_url,
        "--num-prompts",
        "2",
        "--request-timeout",
        "0.2",
        "--random-output-len",
        "2",
    ])
    .await;
    assert_eq!(res[0].wall.failures_by_kind.get("timeout"), Some(&2));
    assert!(res[0].run.records.iter().all(|r| r.e2el_s() < 1.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_gives_same_schedule() {
    let srv = FakeServer::start(Script {
        ttft_ms: 1,
        itl_ms: 1,
        ..Script::default()
    })
    .await;
    let run = |seed: &'static str| {
        let url = srv.base_url.clone();
        async move {
            let (res, _) = bench(&[
                "--base-url",
                &url,
                "--num-prompts",
                "10",
                "--request-rate",
                "100",
                "--seed",
                seed,
                "--random-output-len",
                "2",
                "--random-range-ratio",
                "0.5",
            ])
            .await;
            res[0]
                .run
                .records
                .iter()
                .map(|r| r.intended_s)
                .collect::<Vec<_>>()
        }
    };
    let a = run("7").await;
    let b = run("7").await;
    let c = run("8").await;
    assert_eq!(a, b);
    assert_ne!(a, c);
    let spec = ArrivalSpec::Gamma {
        rate_per_s: 100.0,
        burstiness: 1.0,
    };
    let expected = build_schedule(
        7,
        &spec,
        &ScheduleBounds {
            count: 10,
            duration_s: None,
        },
    )
    .unwrap();
    assert_eq!(a, expected.intended_s);
    // The workload is seeded too: the same prompts (compared as sets: two requests sent within
    // a millisecond may reach the server in either order).
    let prompts: Vec<String> = srv
        .seen()
        .bodies
        .iter()
        .map(|b| b["prompt"].to_string())
        .collect();
    let run_set = |k: usize| {
        let mut v = prompts[10 * k..10 * (k + 1)].to_vec();
        v.sort();
        v
    };
    assert_eq!(run_set(0), run_set(1));
    assert_ne!(run_set(0), run_set(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_time_scale_converts_results_to_simulated_time() {
    let srv = FakeServer::start(Script {
        ttft_ms: 20,
        itl_ms: 10,
        time_scale: Some(2.0),
        ..Script::default()
    })
    .await;
    let (res, table) = bench(&[
        "--base-url",
        &srv.base_url,
        "--num-prompts",
        "3",
        "--random-output-len",
        "4",
    ])
    .await;
    let r = &res[0];
    let sim = r.simulated.as_ref().unwrap();
    assert!((sim.ttft.mean_ms * 2.0 - r.wall.ttft.mean_ms).abs() < 1e-9);
    assert!((sim.output_throughput - 2.0 * r.wall.output_throughput).abs() < 1e-6);
    assert_eq!(r.json["time_scale"], 2.0);
    assert_eq!(r.json["hardware"], "h800");
    assert_eq!(r.json["simulated"]["time_scale"], 2.0);
    assert!(table.contains("time_scale 2 (simulated = wall ÷ 2, hardware h800)"));

    let plain = FakeServer::start(Script {
        ttft_ms: 1,
        itl_ms: 1,
        ..Script::default()
    })
    .await;
    let (res, _) = bench(&[
        "--base-url",
        &plain.base_url,
        "--num-prompts",
        "1",
        "--random-output-len",
        "2",
    ])
    .await;
    assert!(res[0].simulated.is_none());
    assert!(res[0].json["simulated"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mooncake_trace_replays_timestamps_with_shared_prefixes() {
    let mut trace = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        trace,
        r#"{{"timestamp": 1000, "input_length": 8, "output_length": 3, "hash_ids": [1, 2]}}"#
    )
    .unwrap();
    writeln!(
        trace,
        r#"{{"timestamp": 1100, "input_length": 8, "output_length": 2, "hash_ids": [1, 3]}}"#
    )
    .unwrap();
    writeln!(
        trace,
        r#"{{"timestamp": 1200, "input_length": 4, "output_length": 1, "hash_ids": [4]}}"#
    )
    .unwrap();
    let srv = FakeServer::start(Script {
        ttft_ms: 1,
        itl_ms: 1,
        ..Script::default()
    })
    .await;
    let path = trace.path().to_str().unwrap().to_owned();
    let (res, _) = bench(&[
        "--base-url",
        &srv.base_url,
        "--dataset-name",
        "mooncake",
        "--dataset-path",
        &path,
        "--mooncake-block-size",
        "4",
    ])
    .await;
    let recs = &res[0].run.records;
    let intended: Vec<f64> = recs.iter().map(|r| r.intended_s).collect();
    assert_eq!(intended.len(), 3);
    for (got, want) in intended.iter().zip([0.0, 0.1, 0.2]) {
        assert!((got - want).abs() < 1e-9);
    }
    assert_eq!(
        recs.iter().map(|r| r.output_tokens).collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    let words: Vec<Vec<String>> = srv
        .seen()
        .bodies
        .iter()
        .map(|b| {
            b["prompt"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .collect();
    assert_eq!(words[0][..4], words[1][..4]);
    assert_ne!(words[0][4..], words[1][4..]);
    assert_ne!(words[2][..], words[0][..4]);
    assert_eq!(res[0].json["arrival"], "trace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bounds_sending_and_counts_due_requests_left_unsent() {
    // Open loop: 10 requests due in the first 0.5 s, but each takes ≥ 100 ms and the cap is 1, so
    // some are still waiting when the window closes; they are reported, not silently dropped.
    let srv = FakeServer::start(Script {
        ttft_ms: 100,
        itl_ms: 1,
        ..Script::default()
    })
    .await;
    let (res, table) = bench(&[
        "--base-url",
        &srv.base_url,
        "--num-prompts",
        "100",
        "--request-rate",
        "20",
        "--burstiness",
        "inf",
        "--max-concurrency",
        "1",
        "--duration",
        "0.5",
        "--random-output-len",
        "2",
    ])
    .await;
    let r = &res[0];
    assert!(r.run.unsent > 0);
    assert_eq!(r.run.records.len() + r.run.unsent, 10);
    assert!(r.run.records.iter().all(|rec| rec.sent_s < 0.5));
    assert!(table.contains("Unsent at end of duration:"));
    assert_eq!(r.json["unsent"], r.run.unsent);

    // Closed loop: requests are issued while the window is open; none is "due", none unsent.
    let (res, _) = bench(&[
        "--base-url",
        &srv.base_url,
        "--num-prompts",
        "100",
        "--max-concurrency",
        "1",
        "--duration",
        "0.3",
        "--random-output-len",
        "2",
    ])
    .await;
    let r = &res[0];
    assert_eq!(r.run.unsent, 0);
    assert!(
        (1..=3).contains(&r.run.records.len()),
        "{} requests",
        r.run.records.len()
    );
    assert!(
        r.run
            .records
            .iter()
            .all(|rec| rec.sent_s < 0.3 && rec.success())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizer_sets_exact_prompt_lengths_and_counts_chunk_tokens() {
    let tok = word_level_tokenizer();
    let srv = FakeServer::start(Script {
        ttft_ms: 5,
        itl_ms: 20,
        tokens_per_chunk: 2,
        ..Script::default()
    })
    .await;
    let (res, _) = bench(&[
        "--base-url",
        &srv.base_url,
        "--num-prompts",
        "2",
        "--random-input-len",
        "33",
        "--random-output-len",
        "6",
        "--tokenizer",
        tok.path().to_str().unwrap(),
    ])
    .await;
    let r = &res[0];
    assert!(
        r.run
            .records
            .iter()
            .all(|rec| rec.success() && rec.prompt_tokens == 33)
    );
    assert!(
        r.run
            .records
            .iter()
            .all(|rec| rec.chunk_token_source == ChunkTokenSource::Tokenizer)
    );
    assert!(
        r.run
            .records
            .iter()
            .all(|rec| rec.chunks.iter().all(|c| c.tokens == 2.0))
    );
    assert_eq!(r.json["tokenizer_id"], tok.path().to_str().unwrap());
}
