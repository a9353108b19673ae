//! Command-line flags ([`Cli`]) and their validation into a [`BenchPlan`].
//!
//! Flag names follow vLLM's `bench serve` wherever the meaning is the same, so its users can reuse
//! their command lines. Validation is the only place flags are interpreted; every error names the
//! flag at fault. A flag is never accepted and then ignored: combinations that would make one
//! meaningless are rejected.

use crate::client::ApiKind;
use crate::dataset::DatasetSpec;
use crate::metrics::SloSpec;
use crate::plan::{BenchPlan, OutputOptions, RampSpec, SweepSpec};
use crate::schedule::RampStrategy;
use clap::{Parser, ValueEnum};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// `--dataset-name` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatasetName {
    /// Synthetic prompts of random length (`--random-*`).
    Random,
    /// A ShareGPT-format JSON file (`--dataset-path`).
    Sharegpt,
    /// Synthetic shared prefixes (`--prefix-repetition-*`).
    Prefix,
    /// A Mooncake JSONL trace (`--dataset-path`), replayed at its timestamps.
    Mooncake,
}

/// `--backend` values (vLLM's names for the two OpenAI APIs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// `/v1/completions`.
    Openai,
    /// `/v1/chat/completions`.
    #[value(name = "openai-chat")]
    OpenaiChat,
}

/// `--ramp-up-strategy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RampName {
    /// Rate grows linearly with the request index.
    Linear,
    /// Rate grows geometrically with the request index.
    Exponential,
}

/// loadtest: a load generator for OpenAI-compatible servers (pdserve or any other).
///
/// Sends streaming chat or completions requests on a seeded arrival schedule and reports TTFT,
/// TPOT, ITL and E2E latency, throughput and goodput. Times are measured from each request's
/// intended send time. See loadtest/README.md for every metric's definition.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "loadtest",
    version,
    about,
    long_about,
    args_override_self = true
)]
pub struct Cli {
    // ---- Target ------------------------------------------------------------------------------
    /// Server base URL, e.g. http://127.0.0.1:8000 (repeat to spread requests round-robin over
    /// several servers). Default: http://<host>:<port>.
    #[arg(long = "base-url", value_name = "URL", help_heading = "Target")]
    pub base_url: Vec<String>,
    /// Host used when --base-url is not given.
    #[arg(long, default_value = "127.0.0.1", help_heading = "Target")]
    pub host: String,
    /// Port used when --base-url is not given.
    #[arg(long, default_value_t = 8000, help_heading = "Target")]
    pub port: u16,
    /// API path appended to each base URL.
    #[arg(long, default_value = "/v1/completions", help_heading = "Target")]
    pub endpoint: String,
    /// Request format: openai (completions) or openai-chat. Default: openai-chat when the
    /// endpoint ends in chat/completions, else openai.
    #[arg(long, value_enum, help_heading = "Target")]
    pub backend: Option<Backend>,
    /// Model name to request. Default: the first model listed by <base-url>/v1/models.
    #[arg(long, help_heading = "Target")]
    pub model: Option<String>,
    /// Extra HTTP header KEY=VALUE (repeatable). OPENAI_API_KEY, when set, is sent as a bearer
    /// token.
    #[arg(long, value_name = "KEY=VALUE", help_heading = "Target")]
    pub header: Vec<String>,
    /// Per-request time limit in seconds; a request over it fails with kind "timeout".
    #[arg(
        long,
        default_value_t = 3600.0,
        value_name = "SECONDS",
        help_heading = "Target"
    )]
    pub request_timeout: f64,

    // ---- Arrivals ----------------------------------------------------------------------------
    /// Number of requests (default 1000; for --dataset-name mooncake, the whole trace).
    #[arg(long, help_heading = "Arrivals")]
    pub num_prompts: Option<usize>,
    /// Stop sending new requests this many seconds after the start (requests in flight finish).
    #[arg(long, value_name = "SECONDS", help_heading = "Arrivals")]
    pub duration: Option<f64>,
    /// Requests per second; "inf" sends all at once (with --max-concurrency: a closed loop of
    /// fixed concurrency). Finite rates draw Gamma gaps (see --burstiness). Default: inf, or the
    /// trace's timestamps for mooncake.
    #[arg(long, value_name = "RATE", help_heading = "Arrivals")]
    pub request_rate: Option<f64>,
    /// Gamma shape of the inter-arrival gaps at a finite rate: 1 = Poisson, < 1 burstier,
    /// > 1 more regular, inf = constant gaps. The mean gap stays 1/rate.
    #[arg(long, default_value_t = 1.0, help_heading = "Arrivals")]
    pub burstiness: f64,
    /// Most requests in flight at once. With a finite rate, requests wait for a slot and the wait
    /// counts in their latency.
    #[arg(long, help_heading = "Arrivals")]
    pub max_concurrency: Option<usize>,
    /// Ramp the rate over the run's requests from --ramp-up-start-rps to --ramp-up-end-rps.
    #[arg(long, value_enum, help_heading = "Arrivals")]
    pub ramp_up_strategy: Option<RampName>,
    /// Rate of the first request of a ramp, requests/s.
    #[arg(long, help_heading = "Arrivals")]
    pub ramp_up_start_rps: Option<f64>,
    /// Rate of the last request of a ramp, requests/s.
    #[arg(long, help_heading = "Arrivals")]
    pub ramp_up_end_rps: Option<f64>,
    /// Stretch factor for trace timestamps (2 = replay at half speed).
    #[arg(long, default_value_t = 1.0, help_heading = "Arrivals")]
    pub trace_slowdown: f64,
    /// Sweep: one run per request rate in this comma-separated list ("inf" allowed), then a
    /// summary table of the throughput–latency curve.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "RATES",
        help_heading = "Arrivals"
    )]
    pub sweep_request_rates: Vec<f64>,
    /// Sweep: one run per concurrency cap in this comma-separated list.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "CAPS",
        help_heading = "Arrivals"
    )]
    pub sweep_max_concurrency: Vec<usize>,
    /// Seed of the arrival schedule and of synthetic prompts and lengths.
    #[arg(long, default_value_t = 0, help_heading = "Arrivals")]
    pub seed: u64,
    /// Unmeasured requests sent before the run starts.
    #[arg(long, default_value_t = 0, help_heading = "Arrivals")]
    pub num_warmups: usize,

    // ---- Workload ----------------------------------------------------------------------------
    /// Workload source.
    #[arg(long, value_enum, default_value = "random", help_heading = "Workload")]
    pub dataset_name: DatasetName,
    /// File for sharegpt (JSON) and mooncake (JSONL).
    #[arg(long, help_heading = "Workload")]
    pub dataset_path: Option<PathBuf>,
    /// Mean prompt length of the random dataset, tokens.
    #[arg(long, default_value_t = 1024, help_heading = "Workload")]
    pub random_input_len: usize,
    /// Mean output length of the random dataset, tokens.
    #[arg(long, default_value_t = 128, help_heading = "Workload")]
    pub random_output_len: usize,
    /// Lengths are uniform in [len·(1−r), len·(1+r)]; r in [0, 1).
    #[arg(long, default_value_t = 0.0, help_heading = "Workload")]
    pub random_range_ratio: f64,
    /// Tokens of one prefix shared by every random prompt (added to the sampled length).
    #[arg(long, default_value_t = 0, help_heading = "Workload")]
    pub random_prefix_len: usize,
    /// Fixed output length for sharegpt instead of each reply's length.
    #[arg(long, help_heading = "Workload")]
    pub sharegpt_output_len: Option<usize>,
    /// Number of distinct shared prefixes of the prefix dataset.
    #[arg(long, default_value_t = 10, help_heading = "Workload")]
    pub prefix_repetition_num_prefixes: usize,
    /// Tokens of each shared prefix.
    #[arg(long, default_value_t = 256, help_heading = "Workload")]
    pub prefix_repetition_prefix_len: usize,
    /// Tokens of each request's own suffix.
    #[arg(long, default_value_t = 256, help_heading = "Workload")]
    pub prefix_repetition_suffix_len: usize,
    /// Output tokens of each prefix-dataset request.
    #[arg(long, default_value_t = 128, help_heading = "Workload")]
    pub prefix_repetition_output_len: usize,
    /// Tokens per hash id in a mooncake trace.
    #[arg(long, default_value_t = 512, help_heading = "Workload")]
    pub mooncake_block_size: usize,
    /// Hugging Face tokenizer.json: exact prompt lengths and client-side token counts. Without
    /// it prompts are one common word per token (see README).
    #[arg(long, value_name = "PATH", help_heading = "Workload")]
    pub tokenizer: Option<PathBuf>,
    /// Send ignore_eos=true and min_tokens=max_tokens so outputs reach their length. Default:
    /// on for random, prefix, mooncake and sharegpt with --sharegpt-output-len; off otherwise.
    /// --ignore-eos=false for servers that reject these fields.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Workload")]
    pub ignore_eos: Option<bool>,
    /// Ask for cumulative usage on every chunk (stream_options.continuous_usage_stats; pdserve,
    /// vLLM, SGLang) so ITL is normalized by exact tokens per chunk.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_name = "BOOL", help_heading = "Workload")]
    pub continuous_usage_stats: bool,
    /// Request token logprobs with N alternatives (chat: logprobs=true, top_logprobs=N;
    /// completions: logprobs=N); their token lists also give exact tokens per chunk for ITL.
    #[arg(long, value_name = "N", help_heading = "Workload")]
    pub logprobs: Option<u32>,
    /// Sampling temperature (sent only when given).
    #[arg(long, help_heading = "Workload")]
    pub temperature: Option<f64>,
    /// Top-p (sent only when given).
    #[arg(long, help_heading = "Workload")]
    pub top_p: Option<f64>,
    /// Top-k (sent only when given).
    #[arg(long, help_heading = "Workload")]
    pub top_k: Option<i64>,
    /// JSON object merged into every request body (wins over other fields).
    #[arg(long, value_name = "JSON", help_heading = "Workload")]
    pub extra_body: Option<String>,

    // ---- Measurement -------------------------------------------------------------------------
    /// SLOs for goodput, milliseconds: "ttft:200 tpot:50" or "ttft:200,tpot:50,e2el:5000".
    #[arg(long, visible_alias = "slo", num_args = 1.., value_name = "METRIC:MS", help_heading = "Measurement")]
    pub goodput: Vec<String>,
    /// Percentiles reported for every latency metric (median and mean are always reported).
    #[arg(long, default_value = "90,95,99", help_heading = "Measurement")]
    pub metric_percentiles: String,
    /// Wall seconds per simulated second, overriding what the server's /v1/models reports.
    #[arg(long, help_heading = "Measurement")]
    pub time_scale: Option<f64>,

    // ---- Output ------------------------------------------------------------------------------
    /// Write the JSON summary and the per-request JSONL.
    #[arg(long, help_heading = "Output")]
    pub save_result: bool,
    /// Also put per-request arrays (input_lens, output_lens, ttfts, itls, start_times, errors)
    /// in the JSON summary, as vLLM does.
    #[arg(long, help_heading = "Output")]
    pub save_detailed: bool,
    /// Directory for all output files (created if missing).
    #[arg(long, help_heading = "Output")]
    pub result_dir: Option<PathBuf>,
    /// Name of the JSON summary; other files share its stem. Default:
    /// <label>-<rate>qps[-concurrency<n>]-<model>-<date>.json.
    #[arg(long, help_heading = "Output")]
    pub result_filename: Option<String>,
    /// Label in the file name and the summary (default: the backend name).
    #[arg(long, help_heading = "Output")]
    pub label: Option<String>,
    /// KEY=VALUE pairs recorded in the JSON summary.
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE", help_heading = "Output")]
    pub metadata: Vec<String>,
    /// Write per-request and summary CSV files.
    #[arg(long, help_heading = "Output")]
    pub save_csv: bool,
    /// Write SVG plots: latency CDFs, throughput and concurrency over time, and the sweep curve.
    #[arg(long, help_heading = "Output")]
    pub plot: bool,
    /// No live progress bar.
    #[arg(long, help_heading = "Output")]
    pub disable_tqdm: bool,
}

/// A flag value or combination that cannot be run.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{flag}: {message}")]
pub struct ArgError {
    /// The flag at fault.
    pub flag: &'static str,
    /// Why.
    pub message: String,
}

fn err(flag: &'static str, message: impl Into<String>) -> ArgError {
    ArgError {
        flag,
        message: message.into(),
    }
}

/// Parses `ttft:200 tpot:50` / `ttft:200,tpot:50` into an [`SloSpec`].
pub fn parse_slo(items: &[String]) -> Result<SloSpec, ArgError> {
    let mut slo = SloSpec::default();
    for pair in items
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (name, value) = pair
            .split_once(':')
            .ok_or_else(|| err("--goodput", format!("'{pair}' is not METRIC:MS")))?;
        let ms: f64 = value
            .trim()
            .parse()
            .map_err(|_| err("--goodput", format!("'{value}' is not a number of ms")))?;
        if !(ms >= 0.0 && ms.is_finite()) {
            return Err(err("--goodput", format!("{name}: {ms} must be ≥ 0")));
        }
        match name.trim() {
            "ttft" => slo.ttft_ms = Some(ms),
            "tpot" => slo.tpot_ms = Some(ms),
            "e2el" => slo.e2el_ms = Some(ms),
            other => {
                return Err(err(
                    "--goodput",
                    format!("unknown metric '{other}' (ttft, tpot, e2el)"),
                ));
            }
        }
    }
    Ok(slo)
}

fn parse_percentiles(s: &str) -> Result<Vec<f64>, ArgError> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| match x.parse::<f64>() {
            Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
            _ => Err(err(
                "--metric-percentiles",
                format!("'{x}' is not a percentile in [0, 100]"),
            )),
        })
        .collect()
}

fn parse_kv(flag: &'static str, items: &[String]) -> Result<Vec<(String, String)>, ArgError> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| err(flag, format!("'{s}' is not KEY=VALUE")))
        })
        .collect()
}

impl Cli {
    /// Validates the flags into a plan. `api_key` is `OPENAI_API_KEY` (passed in so tests do not
    /// depend on the environment).
    pub fn into_plan(self, api_key: Option<String>) -> Result<BenchPlan, ArgError> {
        let base_urls = if self.base_url.is_empty() {
            vec![format!("http://{}:{}", self.host, self.port)]
        } else {
            self.base_url
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect()
        };
        if let Some(bad) = base_urls
            .iter()
            .find(|u| !u.starts_with("http://") && !u.starts_with("https://"))
        {
            return Err(err("--base-url", format!("'{bad}' is not an http:// URL")));
        }
        if let Some(bad) = base_urls.iter().find(|u| u.starts_with("https://")) {
            return Err(err(
                "--base-url",
                format!("'{bad}': this build speaks plain http only (see README)"),
            ));
        }
        let endpoint = if self.endpoint.starts_with('/') {
            self.endpoint.clone()
        } else {
            format!("/{}", self.endpoint)
        };
        let api = match self.backend {
            Some(Backend::Openai) => ApiKind::Completions,
            Some(Backend::OpenaiChat) => ApiKind::Chat,
            None if endpoint.trim_end_matches('/').ends_with("chat/completions") => ApiKind::Chat,
            None => ApiKind::Completions,
        };
        let mut headers = parse_kv("--header", &self.header)?;
        let has_auth = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
        if let Some(key) = api_key.filter(|k| !k.is_empty() && !has_auth) {
            headers.push(("Authorization".into(), format!("Bearer {key}")));
        }
        if !(self.request_timeout > 0.0 && self.request_timeout.is_finite()) {
            return Err(err(
                "--request-timeout",
                "must be a positive number of seconds",
            ));
        }
        if self.max_concurrency == Some(0) {
            return Err(err("--max-concurrency", "must be ≥ 1"));
        }
        if let Some(d) = self.duration.filter(|d| d.is_nan() || *d <= 0.0) {
            return Err(err("--duration", format!("{d} must be > 0 seconds")));
        }
        if self.num_prompts == Some(0) {
            return Err(err("--num-prompts", "must be ≥ 1"));
        }
        if let Some(r) = self.request_rate.filter(|r| r.is_nan() || *r <= 0.0) {
            return Err(err("--request-rate", format!("{r} must be > 0 (or inf)")));
        }
        let ramp = match (
            self.ramp_up_strategy,
            self.ramp_up_start_rps,
            self.ramp_up_end_rps,
        ) {
            (None, None, None) => None,
            (Some(strategy), Some(start_per_s), Some(end_per_s)) => {
                if self.request_rate.is_some() {
                    return Err(err(
                        "--ramp-up-strategy",
                        "the ramp sets the rate: drop --request-rate",
                    ));
                }
                if start_per_s > end_per_s {
                    return Err(err(
                        "--ramp-up-start-rps",
                        "must not exceed --ramp-up-end-rps",
                    ));
                }
                let strategy = match strategy {
                    RampName::Linear => RampStrategy::Linear,
                    RampName::Exponential => RampStrategy::Exponential,
                };
                Some(RampSpec {
                    strategy,
                    start_per_s,
                    end_per_s,
                })
            }
            _ => {
                return Err(err(
                    "--ramp-up-strategy",
                    "needs --ramp-up-start-rps and --ramp-up-end-rps together",
                ));
            }
        };
        let sweep = match (
            self.sweep_request_rates.is_empty(),
            self.sweep_max_concurrency.is_empty(),
        ) {
            (true, true) => None,
            (false, false) => {
                return Err(err(
                    "--sweep-request-rates",
                    "sweep one of rate or concurrency, not both",
                ));
            }
            (false, true) => {
                if self.request_rate.is_some() || ramp.is_some() {
                    return Err(err(
                        "--sweep-request-rates",
                        "replaces --request-rate and ramps; drop them",
                    ));
                }
                if let Some(r) = self
                    .sweep_request_rates
                    .iter()
                    .find(|r| r.is_nan() || **r <= 0.0)
                {
                    return Err(err(
                        "--sweep-request-rates",
                        format!("{r} must be > 0 (or inf)"),
                    ));
                }
                Some(SweepSpec::RequestRates(self.sweep_request_rates.clone()))
            }
            (true, false) => {
                if self.max_concurrency.is_some() {
                    return Err(err(
                        "--sweep-max-concurrency",
                        "replaces --max-concurrency; drop it",
                    ));
                }
                if self.sweep_max_concurrency.contains(&0) {
                    return Err(err("--sweep-max-concurrency", "caps must be ≥ 1"));
                }
                Some(SweepSpec::MaxConcurrency(
                    self.sweep_max_concurrency.clone(),
                ))
            }
        };
        let needs_path = matches!(
            self.dataset_name,
            DatasetName::Sharegpt | DatasetName::Mooncake
        );
        let dataset = match (self.dataset_name, self.dataset_path.clone()) {
            (_, None) if needs_path => {
                return Err(err("--dataset-path", "required for sharegpt and mooncake"));
            }
            (_, Some(_)) if !needs_path => {
                return Err(err(
                    "--dataset-path",
                    "only sharegpt and mooncake read a file",
                ));
            }
            (DatasetName::Sharegpt, Some(path)) => DatasetSpec::ShareGpt {
                path,
                output_len: self.sharegpt_output_len,
            },
            (DatasetName::Mooncake, Some(path)) => DatasetSpec::Mooncake {
                path,
                block_size: self.mooncake_block_size,
            },
            (DatasetName::Prefix, _) => DatasetSpec::Prefix {
                num_prefixes: self.prefix_repetition_num_prefixes,
                prefix_len: self.prefix_repetition_prefix_len,
                suffix_len: self.prefix_repetition_suffix_len,
                output_len: self.prefix_repetition_output_len,
            },
            _ => DatasetSpec::Random {
                input_len: self.random_input_len,
                output_len: self.random_output_len,
                range_ratio: self.random_range_ratio,
                prefix_len: self.random_prefix_len,
            },
        };
        if self.sharegpt_output_len.is_some() && self.dataset_name != DatasetName::Sharegpt {
            return Err(err(
                "--sharegpt-output-len",
                "only applies to --dataset-name sharegpt",
            ));
        }
        let is_trace = self.dataset_name == DatasetName::Mooncake;
        if !is_trace && self.trace_slowdown != 1.0 {
            return Err(err(
                "--trace-slowdown",
                "only applies to --dataset-name mooncake",
            ));
        }
        if !(self.trace_slowdown > 0.0 && self.trace_slowdown.is_finite()) {
            return Err(err("--trace-slowdown", "must be a finite number > 0"));
        }
        let mut sampling = Map::new();
        if let Some(t) = self.temperature {
            sampling.insert("temperature".into(), Value::from(t));
        }
        if let Some(p) = self.top_p {
            sampling.insert("top_p".into(), Value::from(p));
        }
        if let Some(k) = self.top_k {
            sampling.insert("top_k".into(), Value::from(k));
        }
        let extra_body = match &self.extra_body {
            None => Map::new(),
            Some(s) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(m)) => m,
                _ => return Err(err("--extra-body", "must be a JSON object")),
            },
        };
        if let Some(s) = self.time_scale.filter(|s| !(*s >= 0.0 && s.is_finite())) {
            return Err(err("--time-scale", format!("{s} must be ≥ 0")));
        }
        let num_prompts = match self.num_prompts {
            Some(n) => Some(n),
            None if is_trace => None,
            None => Some(1000),
        };
        let ignore_eos = self
            .ignore_eos
            .unwrap_or_else(|| dataset.wants_fixed_output_len());
        Ok(BenchPlan {
            base_urls,
            endpoint,
            api,
            model: self.model,
            headers,
            request_timeout_s: self.request_timeout,
            num_prompts,
            duration_s: self.duration,
            request_rate: self.request_rate,
            burstiness: self.burstiness,
            max_concurrency: self.max_concurrency,
            ramp,
            trace_slowdown: self.trace_slowdown,
            sweep,
            seed: self.seed,
            num_warmups: self.num_warmups,
            dataset,
            tokenizer: self.tokenizer,
            ignore_eos,
            continuous_usage_stats: self.continuous_usage_stats,
            logprobs: self.logprobs,
            sampling,
            extra_body,
            slo: parse_slo(&self.goodput)?,
            percentiles: parse_percentiles(&self.metric_percentiles)?,
            time_scale_override: self.time_scale,
            output: OutputOptions {
                save_result: self.save_result,
                save_detailed: self.save_detailed,
                result_dir: self.result_dir,
                result_filename: self.result_filename,
                label: self.label,
                metadata: parse_kv("--metadata", &self.metadata)?,
                save_csv: self.save_csv,
                plot: self.plot,
            },
            progress: !self.disable_tqdm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<BenchPlan, ArgError> {
        let mut v = vec!["loadtest"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).expect("parses").into_plan(None)
    }

    #[test]
    fn defaults_match_vllm_bench_serve() {
        let p = plan(&[]).unwrap();
        assert_eq!(p.base_urls, vec!["http://127.0.0.1:8000"]);
        assert_eq!(p.endpoint, "/v1/completions");
        assert_eq!(p.api, ApiKind::Completions);
        assert_eq!(p.num_prompts, Some(1000));
        assert_eq!(p.request_rate, None);
        assert!(p.ignore_eos);
        assert_eq!(p.percentiles, vec![90.0, 95.0, 99.0]);
    }

    #[test]
    fn chat_endpoint_selects_chat_api_and_inf_rate_parses() {
        let p = plan(&[
            "--endpoint",
            "/v1/chat/completions",
            "--request-rate",
            "inf",
        ])
        .unwrap();
        assert_eq!(p.api, ApiKind::Chat);
        assert_eq!(p.request_rate, Some(f64::INFINITY));
    }

    #[test]
    fn goodput_accepts_space_and_comma_forms() {
        let p = plan(&["--goodput", "ttft:200", "tpot:50"]).unwrap();
        assert_eq!(
            p.slo,
            SloSpec {
                ttft_ms: Some(200.0),
                tpot_ms: Some(50.0),
                e2el_ms: None
            }
        );
        let p = plan(&["--slo", "ttft:1,e2el:9"]).unwrap();
        assert_eq!(p.slo.e2el_ms, Some(9.0));
        assert_eq!(plan(&["--goodput", "foo:1"]).unwrap_err().flag, "--goodput");
    }

    #[test]
    fn conflicting_flags_are_rejected_by_name() {
        assert_eq!(
            plan(&["--dataset-name", "sharegpt"]).unwrap_err().flag,
            "--dataset-path"
        );
        assert_eq!(
            plan(&["--dataset-path", "x.json"]).unwrap_err().flag,
            "--dataset-path"
        );
        let ramp = [
            "--ramp-up-strategy",
            "linear",
            "--ramp-up-start-rps",
            "1",
            "--ramp-up-end-rps",
            "2",
        ];
        assert!(plan(&ramp).is_ok());
        let mut with_rate = ramp.to_vec();
        with_rate.extend(["--request-rate", "3"]);
        assert_eq!(plan(&with_rate).unwrap_err().flag, "--ramp-up-strategy");
        assert_eq!(
            plan(&["--sweep-request-rates", "1,2", "--request-rate", "2"])
                .unwrap_err()
                .flag,
            "--sweep-request-rates"
        );
        assert_eq!(
            plan(&["--trace-slowdown", "2"]).unwrap_err().flag,
            "--trace-slowdown"
        );
        assert_eq!(
            plan(&["--base-url", "https://x"]).unwrap_err().flag,
            "--base-url"
        );
    }

    #[test]
    fn ignore_eos_defaults_by_dataset_and_can_be_turned_off() {
        assert!(!plan(&["--ignore-eos=false"]).unwrap().ignore_eos);
        assert!(plan(&["--ignore-eos"]).unwrap().ignore_eos);
        let p = plan(&["--dataset-name", "sharegpt", "--dataset-path", "s.json"]).unwrap();
        assert!(!p.ignore_eos);
        assert_eq!(p.num_prompts, Some(1000));
        let p = plan(&["--dataset-name", "mooncake", "--dataset-path", "t.jsonl"]).unwrap();
        assert_eq!(p.num_prompts, None);
    }

    #[test]
    fn repeated_flag_takes_last_value_and_base_urls_accumulate() {
        let p = plan(&[
            "--num-prompts",
            "3",
            "--num-prompts",
            "5",
            "--base-url",
            "http://a",
            "--base-url",
            "http://b/",
        ])
        .unwrap();
        assert_eq!(p.num_prompts, Some(5));
        assert_eq!(p.base_urls, vec!["http://a", "http://b"]);
        assert_eq!(
            p.targets(),
            vec!["http://a/v1/completions", "http://b/v1/completions"]
        );
    }

    #[test]
    fn api_key_becomes_bearer_header_and_sweeps_parse() {
        let cli = Cli::try_parse_from(["loadtest", "--sweep-max-concurrency", "1,4,16"]).unwrap();
        let p = cli.into_plan(Some("sk-1".into())).unwrap();
        assert_eq!(
            p.headers,
            vec![("Authorization".to_owned(), "Bearer sk-1".to_owned())]
        );
        assert_eq!(p.sweep, Some(SweepSpec::MaxConcurrency(vec![1, 4, 16])));
    }
}
