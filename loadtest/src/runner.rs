//! Drives one run: sends the workload's requests at the schedule's times, under the concurrency
//! cap, and collects a [`RequestRecord`] per request sent.
//!
//! Invariants:
//! - request `i` is not sent before `t0 + intended_s[i]`; requests are sent in schedule order
//!   (a concurrency cap is FIFO);
//! - the sender never waits for a response before sending the next due request except through the
//!   cap, so a slow server cannot slow the schedule down (open loop), and a request's latency is
//!   measured from its intended time (see [`crate::record`]);
//! - with a duration bound, nothing is sent at or after `t0 + duration_s`; in an open loop,
//!   requests due but not yet sent then (held back by the cap) are counted in
//!   [`RunOutput::unsent`], never dropped silently (a closed loop has no due requests, so nothing
//!   is unsent); requests in flight finish (up to `--request-timeout`).

use crate::client::{BodyTemplate, Call, stream_request};
use crate::dataset::Workload;
use crate::record::RequestRecord;
use crate::schedule::Schedule;
use crate::stream::TokenCounter;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};

/// Settings of one run that are not the schedule or the workload.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Full endpoint URLs; request `i` goes to `targets[i % len]`.
    pub targets: Vec<String>,
    /// Request body fields.
    pub body: BodyTemplate,
    /// Most requests in flight at once (`None`: unbounded).
    pub max_concurrency: Option<usize>,
    /// Stop sending at this many seconds after the start.
    pub duration_s: Option<f64>,
    /// Per-request limit, seconds.
    pub request_timeout_s: f64,
    /// Draw a live progress bar on stderr.
    pub progress: bool,
    /// Unmeasured requests sent before the run (`--num-warmups`).
    pub num_warmups: usize,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// One record per request sent, ordered by index.
    pub records: Vec<RequestRecord>,
    /// Requests due before the duration bound that the cap kept from being sent.
    pub unsent: usize,
    /// Warmup requests that failed.
    pub warmup_failures: usize,
}

/// Shared state handed to each request task.
struct Shared {
    client: reqwest::Client,
    cfg: RunConfig,
    workload: Arc<Workload>,
    tokenizer: Option<Arc<dyn TokenCounter>>,
    open_loop: bool,
    progress: ProgressBar,
    failed: AtomicUsize,
}

fn progress_bar(enabled: bool, len: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {per_sec} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

async fn run_one(
    shared: Arc<Shared>,
    index: usize,
    intended_s: f64,
    t0: Instant,
    permit: Option<OwnedSemaphorePermit>,
) -> RequestRecord {
    let spec = shared.workload.request(index);
    let body = shared.cfg.body.build(&spec);
    let target = index % shared.cfg.targets.len().max(1);
    let url = shared.cfg.targets.get(target).map_or("", String::as_str);
    let call = Call {
        client: &shared.client,
        url,
        t0,
        timeout_s: shared.cfg.request_timeout_s,
    };
    let ex = stream_request(call, &body, shared.tokenizer.as_deref()).await;
    drop(permit);
    let usage = ex.outcome.usage;
    let record = RequestRecord {
        index,
        target,
        intended_s: if shared.open_loop {
            intended_s
        } else {
            ex.sent_s
        },
        sent_s: ex.sent_s,
        open_loop: shared.open_loop,
        end_s: ex.end_s,
        chunks: ex.outcome.chunks,
        prompt_tokens: usage.map_or(spec.prompt_tokens_estimate, |u| u.prompt_tokens),
        output_tokens: ex.outcome.output_tokens,
        usage_reported: usage.is_some(),
        expected_output_tokens: spec.max_tokens,
        chunk_token_source: ex.outcome.chunk_token_source,
        failure: ex.outcome.failure,
    };
    if !record.success() {
        let failed = shared.failed.fetch_add(1, Ordering::Relaxed) + 1;
        shared.progress.set_message(format!("failed: {failed}"));
    }
    shared.progress.inc(1);
    record
}

async fn warm_up(shared: &Arc<Shared>) -> usize {
    let n = shared.cfg.num_warmups;
    if n == 0 {
        return 0;
    }
    let cap = Arc::new(Semaphore::new(
        shared.cfg.max_concurrency.unwrap_or(n).max(1),
    ));
    let mut set = JoinSet::new();
    let t0 = Instant::now();
    for i in 0..n {
        let (shared, cap) = (Arc::clone(shared), Arc::clone(&cap));
        set.spawn(async move {
            let _permit = cap.acquire_owned().await.ok();
            let spec = shared.workload.request(i % shared.workload.len().max(1));
            let body = shared.cfg.body.build(&spec);
            let url = shared
                .cfg
                .targets
                .get(i % shared.cfg.targets.len().max(1))
                .cloned()
                .unwrap_or_default();
            let call = Call {
                client: &shared.client,
                url: &url,
                t0,
                timeout_s: shared.cfg.request_timeout_s,
            };
            stream_request(call, &body, None)
                .await
                .outcome
                .failure
                .is_some()
        });
    }
    let mut failed = 0;
    while let Some(res) = set.join_next().await {
        if res.unwrap_or(true) {
            failed += 1;
        }
    }
    failed
}

/// Runs the workload against the targets on `schedule`.
pub async fn run(
    client: reqwest::Client,
    cfg: RunConfig,
    workload: Arc<Workload>,
    schedule: &Schedule,
    tokenizer: Option<Arc<dyn TokenCounter>>,
) -> RunOutput {
    let n = schedule.intended_s.len().min(workload.len());
    let shared = Arc::new(Shared {
        client,
        progress: progress_bar(cfg.progress, n),
        cfg,
        workload,
        tokenizer,
        open_loop: schedule.open_loop,
        failed: AtomicUsize::new(0),
    });
    let warmup_failures = warm_up(&shared).await;
    let cap = shared
        .cfg
        .max_concurrency
        .map(|c| Arc::new(Semaphore::new(c.max(1))));
    let t0 = Instant::now();
    let end = shared
        .cfg
        .duration_s
        .map(|d| t0 + Duration::from_secs_f64(d));
    let mut set = JoinSet::new();
    let mut unsent = 0;
    let mut records = Vec::with_capacity(n);
    for (index, &intended_s) in schedule.intended_s.iter().take(n).enumerate() {
        sleep_until(t0 + Duration::from_secs_f64(intended_s)).await;
        let permit = match &cap {
            None => None,
            Some(sem) => {
                let acquire = Arc::clone(sem).acquire_owned();
                let got = match end {
                    Some(end) => tokio::select! {
                        p = acquire => p.ok(),
                        () = sleep_until(end) => None,
                    },
                    None => acquire.await.ok(),
                };
                if got.is_none() {
                    unsent = if shared.open_loop { n - index } else { 0 };
                    break;
                }
                got
            }
        };
        if end.is_some_and(|e| Instant::now() >= e) {
            unsent = if shared.open_loop { n - index } else { 0 };
            break;
        }
        set.spawn(run_one(Arc::clone(&shared), index, intended_s, t0, permit));
        while let Some(Ok(r)) = set.try_join_next() {
            records.push(r);
        }
    }
    while let Some(res) = set.join_next().await {
        if let Ok(r) = res {
            records.push(r);
        }
    }
    records.sort_by_key(|r| r.index);
    shared.progress.finish_and_clear();
    RunOutput {
        records,
        unsent,
        warmup_failures,
    }
}
