//! Observability end to end: the Grafana dashboards in dashboards/ against a real Prometheus
//! (Debian's `prometheus` package) scraping a real `pdserve up`, after a short load. Every PromQL
//! expression of every panel must return data; every metric it names must be in the catalog
//! (`pdserve_protocol::metrics`); the shipped dashboards/prometheus.yml must pass
//! `promtool check config` and scrape `pdserve up` and every process of
//! config/cluster-local.toml.
//!
//! Without the `prometheus`/`promtool` binaries the tests that need them print why and pass,
//! unless `PDSERVE_REQUIRE_PROMETHEUS` is set (scripts/test sets it).

mod common;
mod prom;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Proc;
use pdserve_protocol::metrics::{self, MetricKind};
use prom::dashboard::{self, Dashboard};
use prom::{Prometheus, sample_values, unix_now_s};
use serde_json::{Value, json};

/// Scrape interval of the test's Prometheus.
const SCRAPE_INTERVAL_S: u32 = 1;

/// Bound on waiting for Prometheus to scrape what the load did.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(20);

/// The TOML given to `pdserve up`: MTP (depth 1, prefill and decode alike: the KV frame carries
/// the MTP layer) and two-batch overlap on decode, so that spec-decode and TBO series move.
const UP_CONFIG: &str = r#"
[prefill.prefill-0.engine.scheduler]
num_kv_blocks = 256
max_context_tokens = 4096
spec_tokens = 1

[decode.decode-0.engine.scheduler]
num_kv_blocks = 256
max_context_tokens = 4096
spec_tokens = 1

[decode.decode-0.engine.scheduler.two_batch_overlap]
"#;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dashboards() -> Vec<Dashboard> {
    let all = dashboard::load_all(&repo().join("dashboards"));
    assert!(!all.is_empty(), "no dashboards/*.json");
    all
}

/// `label_values(<selector>, <label>)` of a query variable, as `(selector, label)`.
fn label_values(query: &str) -> Option<(String, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_string(), label.trim().to_string()))
}

/// The query variables' PromQL, as `(dashboard, variable, count by (label) (selector))`.
fn variable_queries(d: &Dashboard) -> Vec<(String, String, String)> {
    d.json["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().unwrap_or("?").to_string();
            let query = v["query"]
                .as_str()
                .or(v["query"]["query"].as_str())
                .unwrap_or_default();
            let (selector, label) = label_values(query).unwrap_or_else(|| {
                panic!(
                    "{}: variable `{name}`: only label_values(…) is supported",
                    d.file
                )
            });
            (
                d.file.clone(),
                name,
                format!("count by ({label}) ({selector})"),
            )
        })
        .collect()
}

/// Every PromQL expression of a dashboard, panels' targets and query variables alike, as
/// `(where, expression)`.
fn expressions(d: &Dashboard) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = dashboard::queries(d)
        .into_iter()
        .map(|q| (q.to_string(), q.expr))
        .collect();
    out.extend(
        variable_queries(d)
            .into_iter()
            .map(|(file, var, e)| (format!("{file} / variable {var}"), e)),
    );
    out
}

/// Whether every occurrence of `name` in `expr` is the argument of `rate(` or `increase(`.
fn read_through_rate(expr: &str, name: &str) -> bool {
    let mut from = 0;
    while let Some(pos) = expr[from..].find(name).map(|p| p + from) {
        let end = pos + name.len();
        let whole_word = !expr[..pos].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && !expr[end..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        let before = expr[..pos].trim_end();
        if whole_word && !(before.ends_with("rate(") || before.ends_with("increase(")) {
            return false;
        }
        from = end;
    }
    true
}

#[test]
fn every_dashboard_metric_and_label_is_in_the_catalog() {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for d in dashboards() {
        for (at, expr) in expressions(&d) {
            let used = dashboard::metric_names(&expr);
            let mut allowed: BTreeSet<&str> = ["job", "instance", "__name__"].into();
            for name in &used {
                names.insert(name.clone());
                match metrics::find(name) {
                    None => problems.push(format!("{at}: `{name}` is not in the catalog")),
                    Some(def) => {
                        allowed.extend(def.labels);
                        if def.kind == MetricKind::Histogram {
                            allowed.insert("le");
                        }
                        // Counters and histogram series only make sense as rates; gauges never.
                        let cumulative = def.kind != MetricKind::Gauge;
                        if cumulative != read_through_rate(&expr, name) {
                            problems.push(format!(
                                "{at}: {} `{name}` {}",
                                def.kind.as_str(),
                                if cumulative {
                                    "read without rate()"
                                } else {
                                    "read through rate()"
                                }
                            ));
                        }
                    }
                }
            }
            for label in dashboard::labels_used(&expr) {
                if !allowed.contains(label.as_str()) {
                    problems.push(format!(
                        "{at}: label `{label}` is not a label of {used:?} in the catalog"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(names.len() > 20, "suspiciously few metrics: {names:?}");
}

#[test]
fn dashboards_are_grafana_json_with_a_datasource_variable_and_rate_windows() {
    let mut uids = BTreeSet::new();
    let mut problems = Vec::new();
    for d in dashboards() {
        let j = &d.json;
        let f = &d.file;
        if !uids.insert(j["uid"].as_str().unwrap_or_default().to_string()) {
            problems.push(format!("{f}: uid missing or repeated"));
        }
        if j["title"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{f}: no title"));
        }
        if j["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
            problems.push(format!("{f}: schemaVersion below 36 (Grafana 9.x)"));
        }
        let vars = j["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !vars.iter().any(|v| {
            v["type"] == "datasource" && v["name"] == "datasource" && v["query"] == "prometheus"
        }) {
            problems.push(format!("{f}: no `datasource` variable of type prometheus"));
        }
        if let Err(e) = dashboard::variables(&d) {
            problems.push(e);
        }
        let mut ids = BTreeSet::new();
        for p in dashboard::panels(&d) {
            let title = p["title"].as_str().unwrap_or("(untitled)");
            if !ids.insert(p["id"].as_u64().unwrap_or(0)) {
                problems.push(format!("{f} / {title}: panel id missing or repeated"));
            }
            for k in ["x", "y", "w", "h"] {
                if p["gridPos"][k].as_u64().is_none() {
                    problems.push(format!("{f} / {title}: gridPos.{k} missing"));
                }
            }
            if p["type"] == "row" {
                continue;
            }
            if p["description"].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{f} / {title}: no description"));
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problems.push(format!("{f} / {title}: no targets"));
            }
            for ds in
                std::iter::once(&p["datasource"]).chain(targets.iter().map(|t| &t["datasource"]))
            {
                if ds["uid"] != "${datasource}" {
                    problems.push(format!(
                        "{f} / {title}: datasource is not ${{datasource}}: {ds}"
                    ));
                }
            }
        }
        for q in dashboard::queries(&d) {
            if q.expr.trim().is_empty() {
                problems.push(format!("{q}: empty expr"));
            }
            for range in dashboard::ranges(&q.expr) {
                if range != "$__rate_interval" {
                    problems.push(format!(
                        "{q}: range [{range}] instead of [$__rate_interval]"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn shipped_prometheus_yml_scrapes_pdserve_up_and_every_cluster_local_process() {
    let yml = std::fs::read_to_string(repo().join("dashboards/prometheus.yml"))
        .expect("dashboards/prometheus.yml");
    let cluster: toml::Table = toml::from_str(
        &std::fs::read_to_string(repo().join("config/cluster-local.toml"))
            .expect("config/cluster-local.toml"),
    )
    .expect("config/cluster-local.toml parses");
    let mut http = vec![
        "127.0.0.1:8000".to_string(), // `pdserve up`'s default
        cluster["router"]["listen"]
            .as_str()
            .expect("router.listen")
            .to_string(),
    ];
    for role in ["prefill", "decode"] {
        let sections = cluster[role].as_table().expect("instance sections");
        assert!(
            !sections.is_empty(),
            "no [{role}.*] in config/cluster-local.toml"
        );
        for (id, s) in sections {
            http.push(
                s["http_listen"]
                    .as_str()
                    .unwrap_or_else(|| panic!("[{role}.{id}] http_listen"))
                    .to_string(),
            );
        }
    }
    for addr in &http {
        assert!(
            yml.contains(&format!("'{addr}'")),
            "dashboards/prometheus.yml does not scrape {addr}"
        );
    }
    assert!(
        yml.contains("honor_labels: true"),
        "instance labels need honor_labels"
    );
}

#[test]
fn promtool_accepts_the_shipped_prometheus_yml() {
    let Some((_, promtool)) = prom::binaries_or_skip("promtool_accepts_the_shipped_prometheus_yml")
    else {
        return;
    };
    let out = std::process::Command::new(promtool)
        .args(["check", "config"])
        .arg(repo().join("dashboards/prometheus.yml"))
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool check config failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Posts `body` to `url`; the completion tokens it reports (streamed or not). Fails on a non-200.
async fn generate(client: &reqwest::Client, url: String, body: Value) -> u64 {
    let stream = body["stream"] == true;
    let r = client
        .post(&url)
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let status = r.status();
    let text = r.text().await.expect("body read");
    assert_eq!(status, 200, "{url}: {text}");
    let usage = if stream {
        let events = common::sse_events(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        events[..events.len() - 1]
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .find(|c| c["usage"].is_object())
            .map(|c| c["usage"].clone())
            .unwrap_or_else(|| panic!("no usage chunk: {text}"))
    } else {
        serde_json::from_str::<Value>(&text).expect("JSON body")["usage"].clone()
    };
    usage["completion_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("usage: {usage}"))
}

/// The short load: chat and completions, streaming and not, concurrently, long enough outputs
/// (`ignore_eos`) that MTP drafts are verified and the decode batch holds several requests (TBO
/// splits it). Returns (requests, completion tokens).
async fn drive_load(base: &str) -> (u64, u64) {
    let client = reqwest::Client::new();
    let chat = format!("{base}/v1/chat/completions");
    let completions = format!("{base}/v1/completions");
    let msg = |text: &str| json!([{"role": "user", "content": text}]);
    let usage = json!({"include_usage": true});
    let bodies = [
        (
            &chat,
            json!({"messages": msg("Who made the light?"), "max_tokens": 64,
                   "ignore_eos": true, "temperature": 0}),
        ),
        (
            &chat,
            json!({"messages": msg("Tell me of the sea."), "max_tokens": 40,
                   "ignore_eos": true, "stream": true, "stream_options": usage}),
        ),
        (
            &chat,
            json!({"messages": msg("And the evening and the morning"), "max_tokens": 32,
                   "ignore_eos": true, "temperature": 0.8, "seed": 7, "stream": true,
                   "stream_options": usage}),
        ),
        (
            &completions,
            json!({"prompt": "In the beginning God created", "max_tokens": 48,
                   "ignore_eos": true, "temperature": 0}),
        ),
        (
            &completions,
            json!({"prompt": "Shall I compare thee", "max_tokens": 24, "ignore_eos": true,
                   "stream": true, "stream_options": usage}),
        ),
    ];
    let mut set = tokio::task::JoinSet::new();
    for (url, body) in bodies {
        let (client, url) = (client.clone(), url.clone());
        set.spawn(async move { generate(&client, url, body).await });
    }
    let (mut requests, mut tokens) = (0, 0);
    while let Some(done) = set.join_next().await {
        tokens += done.expect("request task");
        requests += 1;
    }
    (requests, tokens)
}

/// Waits (bounded) until Prometheus's latest sample of `expr` (a scalar-valued sum) is `want`.
async fn wait_for_value(prom: &Prometheus, expr: &str, want: f64) {
    let deadline = std::time::Instant::now() + SCRAPE_TIMEOUT;
    loop {
        let got = prom
            .query(expr, unix_now_s())
            .await
            .map(|d| sample_values(&d));
        if matches!(&got, Ok(v) if v.len() == 1 && v[0] == want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "`{expr}` did not reach {want} within {SCRAPE_TIMEOUT:?} (last: {got:?}); log:\n{}",
            prom.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Why `data` (an instant-query result) is not data: empty, or no finite sample.
fn no_data(data: &Value) -> Option<String> {
    let values = sample_values(data);
    if values.is_empty() {
        return Some(format!("empty result ({})", data["resultType"]));
    }
    if !values.iter().any(|v| v.is_finite()) {
        return Some(format!("no finite sample: {values:?}"));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let test = "every_dashboard_query_returns_data_from_a_real_prometheus";
    let Some((prometheus, _)) = prom::binaries_or_skip(test) else {
        return;
    };
    let dir = prom::ScratchDir::new("pdserve-up-config");
    let config = dir.path().join("up.toml");
    std::fs::write(&config, UP_CONFIG).expect("writing the pdserve config");
    let config = config.to_str().expect("utf-8 path");
    // Paced (time_scale 1): simulation-lag series exist only for paced steps.
    let (mut up, base, _) = Proc::up(&["--time-scale", "1", "--config", config]).await;
    let target = base.trim_start_matches("http://").to_string();

    let started_s = unix_now_s();
    let prom = Prometheus::start(&prometheus, &[target], SCRAPE_INTERVAL_S).await;
    prom.wait_scraped_after(started_s, SCRAPE_TIMEOUT).await;

    // Two waves with a scrape between: the first creates the series, the second moves them, so
    // that every rate() over the window sees an increase.
    let (mut requests, mut tokens) = drive_load(&base).await;
    prom.wait_scraped_after(unix_now_s(), SCRAPE_TIMEOUT).await;
    let (r, t) = drive_load(&base).await;
    requests += r;
    tokens += t;
    assert!(
        up.child.try_wait().expect("try_wait").is_none(),
        "pdserve up exited; stderr:\n{}",
        up.stderr()
    );
    // Gates, not sleeps: Prometheus holds the whole load once the router's and the decode
    // engine's counters read what the responses said.
    wait_for_value(
        &prom,
        "sum(pdserve_router_generation_tokens_total)",
        tokens as f64,
    )
    .await;
    wait_for_value(
        &prom,
        "sum(pdserve_decode_requests_finished_total)",
        requests as f64,
    )
    .await;
    let at_s = unix_now_s();
    // A fixed window over the whole run (≥ 4 scrape intervals), standing in for $__rate_interval.
    let window_s = ((at_s - started_s).ceil() as u64 + 2).max(4 * u64::from(SCRAPE_INTERVAL_S));
    let window = format!("{window_s}s");

    let mut evaluated = 0;
    let mut failures = Vec::new();
    for d in dashboards() {
        let vars: BTreeMap<String, String> =
            dashboard::variables(&d).unwrap_or_else(|e| panic!("{e}"));
        for (at, expr) in expressions(&d) {
            let expanded = match dashboard::expand(&expr, &vars, &window) {
                Ok(e) => e,
                Err(e) => {
                    failures.push(format!("{at}: {e}"));
                    continue;
                }
            };
            evaluated += 1;
            let problem = match prom.query(&expanded, at_s).await {
                Err(e) => Some(e),
                Ok(data) => no_data(&data),
            };
            if let Some(problem) = problem {
                failures.push(format!("{at}: {problem}\n    {expanded}"));
            }
        }
    }
    println!(
        "{evaluated} dashboard expressions evaluated over [{window}] after {requests} requests \
         ({tokens} completion tokens)"
    );
    assert!(
        failures.is_empty(),
        "{} of {evaluated} dashboard expressions returned no data:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(evaluated > 50, "only {evaluated} expressions evaluated");
}
