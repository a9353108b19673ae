//! `pdserve up` with the routed experts on the EP runtime (`[sim.prefill_ep_runtime]` and
//! `[sim.decode_ep_runtime]`, 8 ranks each): greedy output equals the same cluster with local
//! experts, token for token, and the decode instance's metrics show the EP group's traffic.

mod common;

use std::io::Write;

use common::{Proc, metric_sum, metrics_text, post};
use serde_json::{Value, json};

/// The modeled cluster of both processes: EP8 on GB200 NVL72 (an H800 cannot hold 32 of
/// DeepSeek-V3's experts per GPU), MTP and two-batch overlap on as `pdserve up`'s defaults.
const BASE: &str = r#"
[sim]
hardware = "gb200-nvl72"
prefill_ep_size = 8
decode_ep_size = 8

[prefill.prefill-0.engine.scheduler]
num_kv_blocks = 256
max_context_tokens = 4096
spec_tokens = 1

[prefill.prefill-0.engine.scheduler.two_batch_overlap]

[decode.decode-0.engine.scheduler]
num_kv_blocks = 256
max_context_tokens = 4096
spec_tokens = 1

[decode.decode-0.engine.scheduler.two_batch_overlap]
"#;

/// Both phases on the EP runtime; decode re-plans with EPLB every 4 steps, so weights move
/// between ranks while requests run.
const EP: &str = r#"
[sim.prefill_ep_runtime.placement]
num_redundant_experts = 8

[sim.decode_ep_runtime.placement]
num_redundant_experts = 8

[sim.decode_ep_runtime.rebalancer]
period_steps = 4
"#;

const PROMPTS: [&str; 4] = [
    "In the beginning God created",
    "The quick brown fox",
    "Once upon a time there was",
    "1, 2, 3, 4,",
];
const MAX_TOKENS: u64 = 24;

/// A uniquely named TOML file in the temp directory, removed on drop.
struct TempToml(std::path::PathBuf);

impl TempToml {
    fn new(name: &str, text: &str) -> Self {
        let file = format!("pdserve-ep-test-{}-{name}.toml", std::process::id());
        let path = std::env::temp_dir().join(file);
        let mut f = std::fs::File::create(&path).expect("temp config");
        f.write_all(text.as_bytes())
            .expect("writing the temp config");
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for TempToml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Completes every prompt at once (greedy, `MAX_TOKENS`), returning the texts in prompt order.
async fn complete_all(base: &str) -> Vec<String> {
    let client = reqwest::Client::new();
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("models JSON");
    let model = models["data"][0]["id"]
        .as_str()
        .expect("model id")
        .to_string();
    let calls = PROMPTS.iter().map(|prompt| {
        let client = client.clone();
        let body = json!({"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                          "temperature": 0, "ignore_eos": true});
        let url = format!("{base}/v1/completions");
        async move { post(&client, &url, &body).await }
    });
    let mut texts = Vec::new();
    for (status, v) in futures_join(calls).await {
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], MAX_TOKENS, "{v}");
        texts.push(v["choices"][0]["text"].as_str().expect("text").to_string());
    }
    texts
}

/// Runs the futures concurrently on the test's runtime, results in order.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("request task"));
    }
    out
}

/// Sum of the samples of `name` whose labels contain `label`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ep_runtime_serves_the_same_greedy_tokens_as_local_experts() {
    let local_cfg = TempToml::new("local", BASE);
    let ep_cfg = TempToml::new("ep", &format!("{BASE}{EP}"));
    let (mut local, local_base, _) =
        Proc::up(&["--time-scale", "0", "--config", local_cfg.path()]).await;
    let local_experts = local.wait_line("  experts ", std::time::Duration::from_secs(10));
    assert!(
        local_experts.contains("decode local"),
        "local experts by default: {local_experts}"
    );
    let expected = complete_all(&local_base).await;
    drop(local);

    let (mut ep, ep_base, _) = Proc::up(&["--time-scale", "0", "--config", ep_cfg.path()]).await;
    let banner = ep.wait_line("  experts ", std::time::Duration::from_secs(10));
    assert!(
        banner.contains("prefill EP runtime: 8 ranks, 8 redundant experts")
            && banner
                .contains("decode EP runtime: 8 ranks, 8 redundant experts, EPLB every 4 steps"),
        "{banner}"
    );
    let got = complete_all(&ep_base).await;
    assert_eq!(got, expected, "EP runtime vs local experts");

    // The decode instance's metrics (rendered by the router's /metrics) show the EP group's
    // dispatch/combine traffic and the balancedness of the placement it ran with.
    let text = metrics_text(&reqwest::Client::new(), &ep_base).await;
    let decode = "instance=\"decode-0\"";
    let bytes = metric_sum(&text, "pdserve_fabric_link_bytes_total", decode);
    assert!(bytes > 0.0, "no EP traffic on decode-0:\n{text}");
    let steps = metric_sum(&text, "pdserve_ep_balancedness_ratio_count", decode);
    assert!(steps > 0.0, "no balancedness samples on decode-0:\n{text}");
    let balance = metric_sum(&text, "pdserve_ep_balancedness_ratio_sum", decode) / steps;
    assert!(
        balance > 0.0 && balance <= 1.0,
        "mean balancedness {balance} outside (0, 1]"
    );
    let tokens = metric_sum(&text, "pdserve_ep_expert_tokens_total", decode);
    assert!(tokens > 0.0, "no expert tokens on decode-0:\n{text}");
}
