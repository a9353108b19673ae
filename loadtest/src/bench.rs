//! One benchmark end to end: discover the server, build the workload, run each point of the plan,
//! summarize, print and write files. [`execute`] is what the `loadtest` binary calls.
//!
//! Invariants: the workload and seed are the same for every point of a sweep; each point's
//! schedule comes from [`build_schedule`] alone; terminal tables go to the given writer, notices
//! to stderr; nothing is written to disk unless an output flag asks for it.

use crate::client::{ServerInfo, fetch_server_info};
use crate::dataset::{DatasetError, Workload};
use crate::metrics::{Summary, summarize};
use crate::output::{self, OutputError, with_suffix};
use crate::plan::{BenchPlan, Point};
use crate::plot;
use crate::prompt::PromptSynth;
use crate::record::RequestRecord;
use crate::report::{RunFacts, render_table, summary_json, utc_stamp};
use crate::runner::{RunConfig, RunOutput, run};
use crate::schedule::{ArrivalSpec, RampStrategy, ScheduleError, build_schedule};
use crate::stream::TokenCounter;
use crate::sweep::{SweepRow, render_sweep_table, sweep_json, tail_percentile};
use crate::tokenizer::{HfTokenizer, TokenizerError};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// No model given and none discoverable.
    #[error("{0}; pass --model to skip discovery")]
    Discovery(#[from] crate::client::DiscoveryError),
    /// The server lists no model.
    #[error("{url}/v1/models lists no model; pass --model")]
    NoModel {
        /// The base URL asked.
        url: String,
    },
    /// `--header` holds an invalid name or value.
    #[error("--header {name}: not a valid HTTP header")]
    Header {
        /// The header name.
        name: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build HTTP client: {0}")]
    Client(String),
    /// Bad tokenizer.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Bad dataset.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Bad arrival parameters.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// A result file could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The terminal writer failed.
    #[error("cannot write report: {0}")]
    Report(#[from] std::io::Error),
}

/// The outcome of one point.
#[derive(Debug, Clone)]
pub struct PointResult {
    /// Rate and cap.
    pub point: Point,
    /// Arrival process used.
    pub arrival: ArrivalSpec,
    /// Raw run output (records, unsent count).
    pub run: RunOutput,
    /// Wall-clock summary.
    pub wall: Summary,
    /// Simulated-time summary when a positive time scale is known.
    pub simulated: Option<Summary>,
    /// The JSON summary (as written by `--save-result`).
    pub json: Value,
    /// Files written for this point.
    pub files: Vec<PathBuf>,
}

fn arrival_name(a: &ArrivalSpec) -> &'static str {
    match a {
        ArrivalSpec::Burst => "burst",
        ArrivalSpec::Gamma { .. } => "gamma",
        ArrivalSpec::Ramp {
            strategy: RampStrategy::Linear,
            ..
        } => "ramp-linear",
        ArrivalSpec::Ramp {
            strategy: RampStrategy::Exponential,
            ..
        } => "ramp-exponential",
        ArrivalSpec::Trace { .. } => "trace",
    }
}

fn http_client(plan: &BenchPlan) -> Result<reqwest::Client, BenchError> {
    let mut headers = HeaderMap::new();
    for (k, v) in &plan.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| BenchError::Header { name: k.clone() })?;
        let value = HeaderValue::from_str(v).map_err(|_| BenchError::Header { name: k.clone() })?;
        headers.insert(name, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(usize::MAX)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| BenchError::Client(e.to_string()))
}

async fn discover(
    client: &reqwest::Client,
    plan: &BenchPlan,
) -> Result<(String, ServerInfo), BenchError> {
    let first = plan.base_urls.first().cloned().unwrap_or_default();
    let info = match fetch_server_info(client, &first, plan.model.as_deref()).await {
        Ok(info) => info,
        Err(e) if plan.model.is_some() => {
            eprintln!("note: {e}; no server time_scale is known");
            ServerInfo {
                model_id: None,
                time_scale: None,
                hardware: None,
                modeled_model: None,
                sim_mode: None,
            }
        }
        Err(e) => return Err(e.into()),
    };
    for other in plan.base_urls.iter().skip(1) {
        if let Ok(o) = fetch_server_info(client, other, plan.model.as_deref()).await
            && o.time_scale != info.time_scale
        {
            eprintln!(
                "warning: {other} reports time_scale {:?}, {first} {:?}; using the latter",
                o.time_scale, info.time_scale
            );
        }
    }
    let model = match (&plan.model, &info.model_id) {
        (Some(m), _) => m.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => return Err(BenchError::NoModel { url: first }),
    };
    Ok((model, info))
}

fn now_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_stamp(secs)
}

struct Ctx<'a> {
    plan: &'a BenchPlan,
    model: String,
    info: ServerInfo,
    time_scale: Option<f64>,
    date: String,
    label: String,
    stem: Option<PathBuf>,
}

impl Ctx<'_> {
    fn facts(
        &self,
        point: &Point,
        arrival: &ArrivalSpec,
        run: &RunOutput,
        open_loop: bool,
    ) -> RunFacts {
        let plan = self.plan;
        let mut slo_ms = Map::new();
        for (k, v) in [
            ("ttft", plan.slo.ttft_ms),
            ("tpot", plan.slo.tpot_ms),
            ("e2el", plan.slo.e2el_ms),
        ] {
            if let Some(v) = v {
                slo_ms.insert(k.into(), json!(v));
            }
        }
        RunFacts {
            date: self.date.clone(),
            backend: plan.api.backend_name().into(),
            label: self.label.clone(),
            model_id: self.model.clone(),
            tokenizer_id: plan.tokenizer.as_ref().map(|p| p.display().to_string()),
            num_prompts: run.records.len() + run.unsent,
            request_rate: point.request_rate,
            burstiness: plan.burstiness,
            max_concurrency: point.max_concurrency,
            arrival: arrival_name(arrival).into(),
            seed: plan.seed,
            dataset_name: plan.dataset.name().into(),
            base_urls: plan.base_urls.clone(),
            open_loop,
            time_scale: self.time_scale,
            hardware: self.info.hardware.clone(),
            modeled_model: self.info.modeled_model.clone(),
            sim_mode: self.info.sim_mode.clone(),
            unsent: run.unsent,
            warmup_failures: run.warmup_failures,
            slo_ms,
            metadata: plan.output.metadata.clone(),
        }
    }

    fn point_stem(&self, index: usize, count: usize, point: &Point) -> PathBuf {
        match &self.stem {
            Some(s) if count == 1 => s.clone(),
            Some(s) => with_suffix(s, &format!(".point{index}")),
            None => output::result_stem(
                self.plan.output.result_dir.as_deref(),
                None,
                &self.label,
                point.request_rate,
                point.max_concurrency,
                &self.model,
                &self.date,
            ),
        }
    }
}

fn write_point_files(
    ctx: &Ctx<'_>,
    stem: &std::path::Path,
    res: &PointResult,
) -> Result<Vec<PathBuf>, BenchError> {
    let o = &ctx.plan.output;
    let mut files = Vec::new();
    let mut put = |suffix: &str, text: String| -> Result<(), BenchError> {
        let path = with_suffix(stem, suffix);
        output::write_file(&path, &text)?;
        files.push(path);
        Ok(())
    };
    let records = &res.run.records;
    if o.save_result {
        put(".json", format!("{:#}\n", res.json))?;
        put(".requests.jsonl", output::requests_jsonl(records))?;
    }
    if o.save_csv {
        put(".requests.csv", output::requests_csv(records))?;
        let mut csv = output::summary_csv_header(&ctx.plan.percentiles);
        csv.push('\n');
        csv.push_str(&output::summary_csv_row(
            0,
            res.point.request_rate,
            res.point.max_concurrency,
            "wall",
            &res.wall,
        ));
        csv.push('\n');
        if let Some(sim) = &res.simulated {
            csv.push_str(&output::summary_csv_row(
                0,
                res.point.request_rate,
                res.point.max_concurrency,
                "simulated",
                sim,
            ));
            csv.push('\n');
        }
        put(".summary.csv", csv)?;
    }
    if o.plot {
        let scaled: Vec<RequestRecord>;
        let mut sets: Vec<(&str, &[RequestRecord])> = vec![("wall", records)];
        if let Some(scale) = ctx.time_scale.filter(|s| *s > 0.0) {
            scaled = records.iter().map(|r| r.rescaled(scale)).collect();
            sets.push(("simulated", &scaled));
        }
        put(".latency_cdf.svg", plot::latency_cdf_svg(&sets))?;
        put(".timeline.svg", plot::timeline_svg(&res.wall, "wall"))?;
    }
    Ok(files)
}

/// Runs every point of `plan`, printing tables to `out`. Returns each point's results.
pub async fn execute(
    plan: &BenchPlan,
    out: &mut dyn Write,
) -> Result<Vec<PointResult>, BenchError> {
    let client = http_client(plan)?;
    let (model, info) = discover(&client, plan).await?;
    let time_scale = plan.time_scale_override.or(info.time_scale);
    let tokenizer = plan
        .tokenizer
        .as_deref()
        .map(HfTokenizer::from_file)
        .transpose()?
        .map(Arc::new);
    let synth = tokenizer
        .clone()
        .map_or(PromptSynth::Words, PromptSynth::Tokenizer);
    let workload = Arc::new(Workload::build(
        &plan.dataset,
        plan.num_prompts,
        plan.seed,
        synth,
    )?);
    let counter: Option<Arc<dyn TokenCounter>> = tokenizer.map(|t| t as Arc<dyn TokenCounter>);
    let date = now_stamp();
    let label = plan
        .output
        .label
        .clone()
        .unwrap_or_else(|| plan.api.backend_name().to_owned());
    let stem = plan.output.result_filename.as_deref().map(|f| {
        output::result_stem(
            plan.output.result_dir.as_deref(),
            Some(f),
            &label,
            None,
            None,
            &model,
            &date,
        )
    });
    let ctx = Ctx {
        plan,
        model,
        info,
        time_scale,
        date,
        label,
        stem,
    };
    let points = plan.points();
    let mut results = Vec::with_capacity(points.len());
    for (k, point) in points.iter().enumerate() {
        let arrival = plan.arrival_for(point, &workload);
        let schedule = build_schedule(plan.seed, &arrival, &plan.bounds(&workload))?;
        let cfg = RunConfig {
            targets: plan.targets(),
            body: plan.body_template(ctx.model.clone()),
            max_concurrency: point.max_concurrency,
            duration_s: plan.duration_s,
            request_timeout_s: plan.request_timeout_s,
            progress: plan.progress,
            num_warmups: plan.num_warmups,
        };
        if points.len() > 1 {
            writeln!(
                out,
                "\n--- point {}/{}: rate {:?}, cap {:?}",
                k + 1,
                points.len(),
                point.request_rate,
                point.max_concurrency
            )?;
        }
        let run_out = run(
            client.clone(),
            cfg,
            Arc::clone(&workload),
            &schedule,
            counter.clone(),
        )
        .await;
        if run_out.warmup_failures > 0 {
            eprintln!(
                "warning: {} of {} warmup requests failed",
                run_out.warmup_failures, plan.num_warmups
            );
        }
        let wall = summarize(&run_out.records, &plan.slo, &plan.percentiles);
        let simulated = time_scale.filter(|s| *s > 0.0).map(|s| {
            let scaled: Vec<RequestRecord> =
                run_out.records.iter().map(|r| r.rescaled(s)).collect();
            summarize(&scaled, &plan.slo, &plan.percentiles)
        });
        let facts = ctx.facts(point, &arrival, &run_out, schedule.open_loop);
        write!(out, "{}", render_table(&facts, &wall, simulated.as_ref()))?;
        if let Some(f) = run_out.records.iter().find_map(|r| r.failure.as_ref()) {
            writeln!(out, "first failure: {}: {}", f.label(), f.message)?;
        }
        let json = summary_json(
            &facts,
            &wall,
            simulated.as_ref(),
            &run_out.records,
            plan.output.save_detailed,
        );
        let mut res = PointResult {
            point: *point,
            arrival,
            run: run_out,
            wall,
            simulated,
            json,
            files: Vec::new(),
        };
        if plan.output.writes_files() {
            let stem = ctx.point_stem(k, points.len(), point);
            res.files = write_point_files(&ctx, &stem, &res)?;
        }
        results.push(res);
    }
    if points.len() > 1 {
        let rows: Vec<SweepRow<'_>> = results
            .iter()
            .map(|r| SweepRow {
                point: &r.point,
                wall: &r.wall,
                simulated: r.simulated.as_ref(),
            })
            .collect();
        write!(out, "\n{}", render_sweep_table(&rows, &plan.percentiles))?;
        if plan.output.writes_files() {
            let stem = ctx.stem.clone().unwrap_or_else(|| {
                output::result_stem(
                    plan.output.result_dir.as_deref(),
                    None,
                    &ctx.label,
                    None,
                    None,
                    &ctx.model,
                    &ctx.date,
                )
                .with_file_name(format!("{}-sweep-{}", ctx.label, ctx.date))
            });
            let mut written = Vec::new();
            if plan.output.save_result {
                let j = sweep_json(&rows, results.iter().map(|r| r.json.clone()).collect());
                let path = with_suffix(&stem, ".sweep.json");
                output::write_file(&path, &format!("{j:#}\n"))?;
                written.push(path);
            }
            if plan.output.save_csv {
                let mut csv = output::summary_csv_header(&plan.percentiles);
                csv.push('\n');
                for (k, r) in results.iter().enumerate() {
                    csv.push_str(&output::summary_csv_row(
                        k,
                        r.point.request_rate,
                        r.point.max_concurrency,
                        "wall",
                        &r.wall,
                    ));
                    csv.push('\n');
                    if let Some(sim) = &r.simulated {
                        csv.push_str(&output::summary_csv_row(
                            k,
                            r.point.request_rate,
                            r.point.max_concurrency,
                            "simulated",
                            sim,
                        ));
                        csv.push('\n');
                    }
                }
                let path = with_suffix(&stem, ".sweep.csv");
                output::write_file(&path, &csv)?;
                written.push(path);
            }
            if plan.output.plot {
                let simulated = rows.iter().all(|r| r.simulated.is_some());
                let sums: Vec<&Summary> = rows
                    .iter()
                    .map(|r| {
                        if simulated {
                            r.simulated.unwrap_or(r.wall)
                        } else {
                            r.wall
                        }
                    })
                    .collect();
                let domain = if simulated { "simulated" } else { "wall" };
                let path = with_suffix(&stem, ".sweep.svg");
                let svg = plot::sweep_svg(&sums, tail_percentile(&plan.percentiles), domain);
                output::write_file(&path, &svg)?;
                written.push(path);
            }
            if let Some(last) = results.last_mut() {
                last.files.extend(written);
            }
        }
    }
    for f in results.iter().flat_map(|r| &r.files) {
        eprintln!("wrote {}", f.display());
    }
    Ok(results)
}
