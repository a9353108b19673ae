//! The `loadtest` binary: every flag is documented in `--help`, and a run writes every output
//! file in its documented format.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup step must abort the test"
)]

mod common;

use clap::CommandFactory;
use common::{FakeServer, Script};
use loadtest::args::Cli;
use serde_json::Value;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_loadtest");

#[test]
fn help_documents_every_flag() {
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let cmd = Cli::command();
    let mut checked = 0;
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        assert!(
            help.contains(&format!("--{long}")),
            "--{long} missing from --help"
        );
        if long != "help" && long != "version" {
            let doc = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(!doc.trim().is_empty(), "--{long} has no help text");
            checked += 1;
        }
    }
    assert!(checked >= 50, "only {checked} flags");
    for vllm_flag in [
        "--base-url",
        "--endpoint",
        "--num-prompts",
        "--request-rate",
        "--burstiness",
        "--max-concurrency",
        "--dataset-name",
        "--dataset-path",
        "--random-input-len",
        "--random-output-len",
        "--random-range-ratio",
        "--seed",
        "--save-result",
        "--result-filename",
        "--goodput",
    ] {
        assert!(help.contains(vllm_flag), "{vllm_flag}");
    }
}

#[test]
fn invalid_flags_exit_nonzero_naming_the_flag() {
    let out = std::process::Command::new(BIN)
        .args(["--dataset-name", "sharegpt"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dataset-path"));
}

async fn run_bin(args: Vec<String>) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .output()
        .await
        .unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_writes_summary_jsonl_csv_and_plots() {
    let srv = FakeServer::start(Script {
        ttft_ms: 5,
        itl_ms: 2,
        time_scale: Some(0.5),
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "--base-url",
        &srv.base_url,
        "--endpoint",
        "/v1/chat/completions",
        "--num-prompts",
        "4",
        "--request-rate",
        "50",
        "--random-input-len",
        "16",
        "--random-output-len",
        "5",
        "--save-result",
        "--save-detailed",
        "--save-csv",
        "--plot",
        "--result-dir",
        dir.path().to_str().unwrap(),
        "--result-filename",
        "run.json",
        "--goodput",
        "ttft:1000",
        "tpot:1000",
        "--metadata",
        "tp=1",
        "--disable-tqdm",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let out = run_bin(args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Serving Benchmark Result"));
    let j = read_json(&dir.path().join("run.json"));
    assert_eq!(j["completed"], 4);
    assert_eq!(j["request_goodput"].as_f64().map(|g| g > 0.0), Some(true));
    assert_eq!(j["backend"], "openai-chat");
    assert_eq!(j["tp"], "1");
    assert_eq!(j["ttfts"].as_array().map(Vec::len), Some(4));
    assert_eq!(j["simulated"]["time_scale"], 0.5);
    let jsonl = std::fs::read_to_string(dir.path().join("run.requests.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 4);
    for line in jsonl.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["success"], true);
        assert_eq!(v["output_tokens"], 5);
    }
    let csv = std::fs::read_to_string(dir.path().join("run.requests.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    let summary_csv = std::fs::read_to_string(dir.path().join("run.summary.csv")).unwrap();
    assert_eq!(summary_csv.lines().count(), 3, "header, wall, simulated");
    for svg in ["run.latency_cdf.svg", "run.timeline.svg"] {
        let text = std::fs::read_to_string(dir.path().join(svg)).unwrap();
        assert!(text.contains("<svg") && text.contains("<polyline"), "{svg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_sweep_writes_points_table_and_curve() {
    let srv = FakeServer::start(Script {
        ttft_ms: 5,
        itl_ms: 2,
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("sw.json");
    let args: Vec<String> = [
        "--base-url",
        &srv.base_url,
        "--num-prompts",
        "3",
        "--random-output-len",
        "3",
        "--sweep-max-concurrency",
        "1,3",
        "--save-result",
        "--plot",
        "--save-csv",
        "--result-filename",
        stem.to_str().unwrap(),
        "--disable-tqdm",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let out = run_bin(args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("Sweep summary"));
    let sweep = read_json(&dir.path().join("sw.sweep.json"));
    let points = sweep["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    assert_eq!(points[1]["max_concurrency"], 3);
    assert_eq!(points[1]["summary"]["completed"], 3);
    assert!(dir.path().join("sw.point0.json").exists());
    assert!(dir.path().join("sw.point1.requests.jsonl").exists());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("sw.sweep.csv"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    let svg = std::fs::read_to_string(dir.path().join("sw.sweep.svg")).unwrap();
    assert!(svg.contains("<circle"));
}
