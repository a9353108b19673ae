//! `pdserve eval` on a short held-out snippet: the trained checkpoint (models/tiny-v1) against the
//! same architecture and tokenizer with random weights, in one run (ratios, no wall-clock bounds).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn pdserve(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pdserve"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("pdserve runs");
    assert!(
        out.status.success(),
        "pdserve {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// The first `chars` characters of the first document of each source in the committed sample.
fn write_snippet(path: &Path, chars: usize) {
    let sample = std::fs::read_to_string(repo().join("tools/train/heldout/sample.jsonl"))
        .expect("tools/train/heldout/sample.jsonl");
    let mut seen = Vec::new();
    let mut out = String::new();
    for line in sample.lines() {
        let mut doc: Value = serde_json::from_str(line).expect("a JSON document");
        let source = doc["source"].as_str().expect("source").to_string();
        if seen.contains(&source) {
            continue;
        }
        let text: String = doc["text"]
            .as_str()
            .expect("text")
            .chars()
            .take(chars)
            .collect();
        doc["text"] = Value::String(text);
        out.push_str(&doc.to_string());
        out.push('\n');
        seen.push(source);
    }
    assert_eq!(
        seen.len(),
        2,
        "the sample has Bible and Shakespeare documents"
    );
    std::fs::write(path, out).expect("write the snippet");
}

/// A checkpoint with models/tiny-v1's config (unquantized) and tokenizer but random weights.
fn write_random_twin(dir: &Path, tmp: &Path) {
    let trained = repo().join("models/tiny-v1");
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(trained.join("config.json")).expect("config.json"),
    )
    .expect("config JSON");
    config
        .as_object_mut()
        .expect("config object")
        .remove("quantization_config");
    let config_path = tmp.join("random-config.json");
    std::fs::write(&config_path, config.to_string()).expect("write config");
    pdserve(&[
        "model",
        "init",
        "--config",
        config_path.to_str().expect("utf-8 path"),
        "--seed",
        "0",
        "--out",
        dir.to_str().expect("utf-8 path"),
    ]);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(trained.join(f), dir.join(f)).expect("copy the tokenizer");
    }
}

fn eval(model: &Path, text: &Path) -> Value {
    let out = pdserve(&[
        "eval",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--text",
        text.to_str().expect("utf-8 path"),
        "--window",
        "256",
        "--prefixes",
        "16",
        "--prefix-min",
        "8",
        "--prefix-max",
        "64",
        "--continuations",
        "2",
        "--prompt-len",
        "16",
        "--new-tokens",
        "24",
        "--json",
    ]);
    serde_json::from_str(&out).expect("one JSON report")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// The engine's counters and the executor's agree, and every prefix verified one draft.
fn assert_counters_consistent(r: &Value, what: &str) {
    for w in ["accept_prefixes", "accept_greedy"] {
        let a = &r[w];
        assert_eq!(a["drafts"], a["exec_drafts_verified"], "{what} {w}: {a}");
        assert_eq!(
            a["accepted_per_pos"], a["exec_accepted_per_pos"],
            "{what} {w}"
        );
        assert_eq!(a["accepted_per_pos"][0], a["accepted"], "{what} {w}");
    }
    assert_eq!(
        r["accept_prefixes"]["drafts"], 16,
        "{what}: one draft per prefix"
    );
    assert_eq!(
        r["accept_greedy"]["mtp_off"]["identical_tokens"], true,
        "{what}: greedy tokens are the same with MTP on and off"
    );
}

#[test]
fn trained_checkpoint_has_low_heldout_perplexity_and_accepted_drafts_where_random_weights_have_none()
 {
    let tmp = std::env::temp_dir().join(format!("pdserve-eval-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let snippet = tmp.join("snippet.jsonl");
    write_snippet(&snippet, 1500);
    let random = tmp.join("random");
    write_random_twin(&random, &tmp);

    let trained = eval(&repo().join("models/tiny-v1"), &snippet);
    let untrained = eval(&random, &snippet);
    std::fs::remove_dir_all(&tmp).ok();

    let vocab = 4096.0;
    let ppl = f(&trained["perplexity"]["all"]["ppl"]);
    let random_ppl = f(&untrained["perplexity"]["all"]["ppl"]);
    assert!(ppl.is_finite() && ppl > 1.0, "trained ppl {ppl}");
    // A loose bound: an eighth of the vocabulary. Uniform guessing scores the vocabulary size.
    assert!(ppl < vocab / 8.0, "trained ppl {ppl}");
    assert!(random_ppl > vocab / 8.0, "random-weight ppl {random_ppl}");
    assert!(
        random_ppl > 10.0 * ppl,
        "random {random_ppl} vs trained {ppl}"
    );
    assert_eq!(
        trained["perplexity"]["all"]["tokens"],
        untrained["perplexity"]["all"]["tokens"]
    );

    assert_counters_consistent(&trained, "trained");
    assert_counters_consistent(&untrained, "random");
    let accept = f(&trained["accept_prefixes"]["rate"]);
    let random_accept = f(&untrained["accept_prefixes"]["rate"]);
    assert!(accept > 0.3, "trained acceptance on prefixes {accept}");
    assert!(
        random_accept < 0.1,
        "random-weight acceptance on prefixes {random_accept}"
    );
    let greedy = &trained["accept_greedy"];
    assert!(
        f(&greedy["rate"]) > 0.3,
        "trained acceptance along greedy text {greedy}"
    );
    assert!(
        f(&greedy["tokens_per_decode_step"]) > f(&greedy["mtp_off"]["tokens_per_decode_step"]),
        "accepted drafts save decode steps: {greedy}"
    );
}
