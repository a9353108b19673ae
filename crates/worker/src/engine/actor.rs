//! The engine actor's task: owns the scheduler state, the pacer and the request streams, and
//! drives steps on the compute thread. See the module docs of `engine` for the loop and its
//! invariants.
//!
//! Phases: `Idle` → (work exists) `Computing` (a plan is on the compute thread) → `Releasing`
//! (outputs applied, waiting for the paced release time) → `Idle`. Only `Idle` plans a step, so
//! at most one plan is in flight, as the engine state requires. An idle plan (work exists but
//! nothing fits, e.g. retained prefill KV holds the pool) parks the loop until a command
//! changes the state, instead of spinning.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use pdserve_engine::{
    EngineState, FinishReason as EngineFinish, Pacer, Phase as SeqPhase, Request, RequestId,
    Scheduler, SeqUpdate, StopConditions, TokenId,
};
use pdserve_protocol::internal::{SampledToken, TokenLogprob, TopToken};
use pdserve_protocol::openai::FinishReason;
use tokio::sync::{mpsc, oneshot};

use super::compute::{Job, StepDone};
use super::{
    Command, EngineEvent, EngineSnapshot, ExportError, ExportedKv, FailureKind, KvInput,
    RequestReport, Submission, SubmitError, request_key,
};
use crate::backend::SeqParams;
use crate::metrics::{EngineMetrics, RejectReason};

pub(crate) struct ActorSetup {
    pub(crate) scheduler: Scheduler,
    pub(crate) pacer: Pacer,
    pub(crate) max_waiting: usize,
    pub(crate) eos_token_ids: Vec<TokenId>,
    pub(crate) jobs: std_mpsc::Sender<Job>,
    pub(crate) metrics: EngineMetrics,
}

/// The engine's view of one live request.
struct Active {
    name: String,
    tx: mpsc::UnboundedSender<EngineEvent>,
    retain: bool,
    /// Finished with its KV retained.
    retained: bool,
    submitted: Instant,
    first_scheduled: Option<Instant>,
    simulated_ns: u64,
    prompt_tokens: u32,
    output_tokens: u32,
    report: Option<RequestReport>,
}

impl Active {
    fn report(&self, now: Instant) -> RequestReport {
        let (queue_s, compute_s) = match self.first_scheduled {
            Some(at) => (
                at.duration_since(self.submitted).as_secs_f64(),
                now.duration_since(at).as_secs_f64(),
            ),
            None => (0.0, 0.0),
        };
        RequestReport {
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            queue_s,
            compute_s,
            simulated_s: self.simulated_ns as f64 * 1e-9,
        }
    }

    fn send(&self, event: EngineEvent) {
        // A closed receiver means the client is gone; the reaper cancels the request.
        let _ = self.tx.send(event);
    }
}

enum Phase {
    Idle,
    Computing {
        started: Instant,
        ids: Vec<RequestId>,
        done: oneshot::Receiver<StepDone>,
    },
    Releasing {
        at: tokio::time::Instant,
        updates: Vec<SeqUpdate>,
    },
}

pub(crate) struct Actor {
    scheduler: Scheduler,
    state: EngineState<SeqParams>,
    pacer: Pacer,
    max_waiting: usize,
    eos_token_ids: Vec<TokenId>,
    jobs: std_mpsc::Sender<Job>,
    metrics: EngineMetrics,
    epoch: Instant,
    keys: HashMap<String, RequestId>,
    active: HashMap<RequestId, Active>,
    broken: Option<String>,
    /// The last plan was idle although work exists; wait for a command before planning again.
    parked: bool,
    /// `finished` entries of idle plans (never sent to the executor), handed to the next plan
    /// that runs, so the executor always learns which requests to forget.
    unsent_finished: Vec<(RequestId, EngineFinish)>,
}

impl Actor {
    pub(crate) fn new(setup: ActorSetup) -> Self {
        Self {
            state: setup.scheduler.new_state(),
            scheduler: setup.scheduler,
            pacer: setup.pacer,
            max_waiting: setup.max_waiting,
            eos_token_ids: setup.eos_token_ids,
            jobs: setup.jobs,
            metrics: setup.metrics,
            epoch: Instant::now(),
            keys: HashMap::new(),
            active: HashMap::new(),
            broken: None,
            parked: false,
            unsent_finished: Vec::new(),
        }
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut phase = Phase::Idle;
        loop {
            if matches!(phase, Phase::Idle) {
                self.reap_closed();
                if self.broken.is_none() && !self.parked && self.state.has_work() {
                    phase = self.start_step();
                }
            }
            let release_at = match &phase {
                Phase::Releasing { at, .. } => Some(*at),
                _ => None,
            };
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => {
                        self.parked = false;
                        self.handle(cmd);
                    }
                    None => break,
                },
                done = async {
                    match &mut phase {
                        Phase::Computing { done, .. } => done.await.ok(),
                        _ => std::future::pending().await,
                    }
                } => {
                    if let Phase::Computing { started, ids, .. } =
                        std::mem::replace(&mut phase, Phase::Idle)
                    {
                        phase = self.finish_step(started, &ids, done);
                    }
                }
                () = async {
                    match release_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Phase::Releasing { updates, .. } =
                        std::mem::replace(&mut phase, Phase::Idle)
                    {
                        self.deliver(updates);
                    }
                }
            }
            self.metrics.observe(self.state.stats(), &self.pacer);
        }
        self.fail_all(FailureKind::ShutDown, "the engine stopped");
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn ns_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { submission, reply } => {
                let result = self.submit(*submission);
                if let Err(e) = &result {
                    self.metrics.record_rejected(reject_reason(e));
                }
                // If the submitter went away, the dropped receiver is reaped as a cancel.
                let _ = reply.send(result);
            }
            Command::Cancel { request_id, reply } => {
                let found = self.cancel(&request_id);
                if let Some(reply) = reply {
                    let _ = reply.send(found);
                }
            }
            Command::Release { request_id, reply } => {
                let _ = reply.send(self.release(&request_id));
            }
            Command::Export { request_id, reply } => self.export(request_id, reply),
            Command::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
        }
    }

    fn submit(
        &mut self,
        s: Submission,
    ) -> Result<mpsc::UnboundedReceiver<EngineEvent>, SubmitError> {
        if let Some(reason) = &self.broken {
            return Err(SubmitError::Unavailable(reason.clone()));
        }
        if self.keys.contains_key(&s.request_id) {
            return Err(SubmitError::Duplicate(s.request_id));
        }
        let waiting = self.state.stats().num_waiting;
        if waiting >= self.max_waiting {
            return Err(SubmitError::QueueFull {
                waiting,
                limit: self.max_waiting,
            });
        }
        let invalid = |reason: String| SubmitError::Invalid {
            id: s.request_id.clone(),
            reason,
        };
        if s.max_output_tokens == 0 {
            return Err(invalid("`max_tokens` must be at least 1".into()));
        }
        let stop = &s.params.stop;
        let conditions = StopConditions {
            max_tokens: Some(s.max_output_tokens as usize),
            min_tokens: stop.min_tokens.min(s.max_output_tokens) as usize,
            eos_token_ids: self.eos_token_ids.clone(),
            ignore_eos: stop.ignore_eos,
            stop_token_ids: stop.stop_token_ids.clone(),
            stop_strings: Vec::new(),
        };
        let key = self.allocate_key(&s.request_id);
        let prompt_tokens = s.prompt.len();
        let mut request = Request::new(key, s.prompt, s.params)
            .with_stop(conditions)
            .arrived_at(self.now_ns());
        let (retain, arrived) = match s.kv {
            KvInput::Compute { retain } => {
                if retain {
                    request = request.with_retained_kv();
                }
                (retain, None)
            }
            KvInput::Arrived(kv) => {
                if kv.rows.tokens != prompt_tokens {
                    return Err(invalid(format!(
                        "the KV holds {} tokens but the prompt has {prompt_tokens}",
                        kv.rows.tokens
                    )));
                }
                request = request
                    .with_kv_arrived(kv.first_token.id)
                    .with_kv_draft(kv.draft_token);
                (false, Some((kv.first_token, kv.rows)))
            }
        };
        let first_update = self
            .state
            .add_request(request)
            .map_err(|e| invalid(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.keys.insert(s.request_id.clone(), key);
        self.active.insert(
            key,
            Active {
                name: s.request_id,
                tx,
                retain,
                retained: false,
                submitted: Instant::now(),
                first_scheduled: None,
                simulated_ns: 0,
                prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
                output_tokens: 0,
                report: None,
            },
        );
        self.metrics.record_prompt(prompt_tokens);
        if let (Some(update), Some((first, rows))) = (first_update, arrived) {
            if update.finish.is_none() && self.jobs.send(Job::Stage { id: key, rows }).is_err() {
                self.break_engine("the compute thread stopped".into());
                return Err(SubmitError::Unavailable(
                    "the compute thread stopped".into(),
                ));
            }
            self.deliver_one(update, Some(&first));
        }
        Ok(rx)
    }

    /// A key for `name`: its hash, probing upwards past keys of other live requests.
    fn allocate_key(&self, name: &str) -> RequestId {
        let mut key = request_key(name);
        while self.active.contains_key(&key) || self.state.sequence(key).is_some() {
            key = RequestId(key.0.wrapping_add(1));
        }
        key
    }

    fn cancel(&mut self, name: &str) -> bool {
        let Some(key) = self.keys.remove(name) else {
            return false;
        };
        let _ = self.state.cancel(key);
        if let Some(active) = self.active.remove(&key) {
            active.send(EngineEvent::Failed {
                kind: FailureKind::Aborted,
                message: format!("request `{name}` was cancelled"),
            });
        }
        true
    }

    fn release(&mut self, name: &str) -> bool {
        let Some(&key) = self.keys.get(name) else {
            return false;
        };
        let retained = self.active.get(&key).is_some_and(|a| a.retained);
        if !retained || self.state.release_kv(key).is_err() {
            return false;
        }
        self.keys.remove(name);
        if let Some(active) = self.active.remove(&key) {
            let report = active
                .report
                .clone()
                .unwrap_or_else(|| active.report(Instant::now()));
            active.send(EngineEvent::Done(report));
        }
        true
    }

    fn export(&mut self, name: String, reply: oneshot::Sender<Result<ExportedKv, ExportError>>) {
        let Some(&key) = self.keys.get(&name) else {
            let _ = reply.send(Err(ExportError::Unknown(name)));
            return;
        };
        let Some(active) = self.active.get(&key).filter(|a| a.retained) else {
            let _ = reply.send(Err(ExportError::NotRetained(name)));
            return;
        };
        let job = Job::Export {
            table: self.state.block_table(key).to_vec(),
            tokens: active.prompt_tokens as usize,
            draft_token: self.state.sequence(key).and_then(|s| s.draft()),
            request_id: name,
            reply,
        };
        if let Err(std_mpsc::SendError(Job::Export { reply, .. })) = self.jobs.send(job) {
            let _ = reply.send(Err(ExportError::Gone));
        }
    }

    fn snapshot(&self) -> EngineSnapshot {
        let mut queued: u64 = 0;
        for id in self.state.waiting() {
            if let Some(seq) = self.state.sequence(id) {
                queued += seq.prompt().len() as u64;
            }
        }
        for &id in self.state.running() {
            if let Some(seq) = self.state.sequence(id)
                && seq.phase() == SeqPhase::Prefill
            {
                queued += (seq.num_tokens() - seq.num_computed_tokens()) as u64;
            }
        }
        EngineSnapshot {
            stats: self.state.stats().clone(),
            queued_prompt_tokens: queued,
            steps_paced: self.pacer.steps_total(),
            late_steps: self.pacer.late_steps_total(),
            lag_ns_total: self.pacer.lag_ns_total(),
            simulated_ns_total: self.pacer.sim_ns_total(),
            broken: self.broken.clone(),
        }
    }

    /// Cancels requests whose receiver is gone (client disconnected without a cancel).
    fn reap_closed(&mut self) {
        let gone: Vec<String> = self
            .active
            .values()
            .filter(|a| a.tx.is_closed())
            .map(|a| a.name.clone())
            .collect();
        for name in gone {
            self.cancel(&name);
        }
    }

    fn start_step(&mut self) -> Phase {
        let now_ns = self.now_ns();
        let mut plan = match self.scheduler.step(now_ns, &mut self.state) {
            Ok(plan) => plan,
            Err(e) => {
                self.break_engine(format!("scheduler: {e}"));
                return Phase::Idle;
            }
        };
        if plan.is_idle() {
            // Nothing fits now; the in-flight marker must still be cleared.
            self.unsent_finished.append(&mut plan.finished);
            match self.state.apply(Vec::new()) {
                Ok(updates) => self.deliver(updates),
                Err(e) => self.break_engine(format!("applying an idle plan: {e}")),
            }
            self.parked = true;
            return Phase::Idle;
        }
        if !self.unsent_finished.is_empty() {
            let later = std::mem::take(&mut plan.finished);
            plan.finished = std::mem::take(&mut self.unsent_finished);
            plan.finished.extend(later);
        }
        let started = Instant::now();
        let ids: Vec<RequestId> = plan
            .prefills
            .iter()
            .map(|c| c.id)
            .chain(plan.decodes.iter().map(|d| d.id))
            .collect();
        for id in &ids {
            if let Some(active) = self.active.get_mut(id)
                && active.first_scheduled.is_none()
            {
                active.first_scheduled = Some(started);
                self.metrics
                    .record_queue_time(started.duration_since(active.submitted).as_secs_f64());
            }
        }
        let (reply, done) = oneshot::channel();
        let job = Job::Step { plan, reply };
        if self.jobs.send(job).is_err() {
            self.fail_plan("the compute thread stopped");
            self.break_engine("the compute thread stopped".into());
            return Phase::Idle;
        }
        Phase::Computing { started, ids, done }
    }

    fn fail_plan(&mut self, message: &str) {
        match self.state.fail_step(message) {
            Ok(updates) => self.deliver(updates),
            Err(e) => self.break_engine(format!("failing a step: {e}")),
        }
    }

    fn finish_step(
        &mut self,
        started: Instant,
        ids: &[RequestId],
        done: Option<StepDone>,
    ) -> Phase {
        let Some(done) = done else {
            // The compute thread died (the executor panicked).
            self.fail_plan("the compute thread stopped during a step");
            self.break_engine("the compute thread stopped during a step".into());
            return Phase::Idle;
        };
        let real_end = Instant::now();
        let updates = match done.outputs {
            Ok(seqs) => self.state.apply(seqs),
            Err(message) => self.state.fail_step(&message),
        };
        let updates = match updates {
            Ok(updates) => updates,
            Err(e) => {
                self.break_engine(format!("applying step outputs: {e}"));
                return Phase::Idle;
            }
        };
        for id in ids {
            if let Some(active) = self.active.get_mut(id) {
                active.simulated_ns = active.simulated_ns.saturating_add(done.simulated_ns);
            }
        }
        let pace = self.pacer.pace(
            self.ns_since_epoch(started),
            done.simulated_ns,
            self.ns_since_epoch(real_end),
        );
        self.metrics
            .record_step(done.simulated_ns, done.wall_ns, pace.lag_ns);
        self.metrics
            .record_step_detail(done.detail.batch_tokens, done.detail.fabric.as_ref());
        if pace.wait_ns == 0 {
            self.deliver(updates);
            return Phase::Idle;
        }
        let at = self.epoch + Duration::from_nanos(pace.release_ns);
        Phase::Releasing {
            at: tokio::time::Instant::from_std(at),
            updates,
        }
    }

    fn deliver(&mut self, updates: Vec<SeqUpdate>) {
        for update in updates {
            self.deliver_one(update, None);
        }
    }

    /// Streams one update. `first`: the prefill-sampled token whose logprobs the first event of
    /// an arrived request carries.
    fn deliver_one(&mut self, update: SeqUpdate, first: Option<&SampledToken>) {
        let key = update.id;
        let Some(active) = self.active.get_mut(&key) else {
            return; // cancelled after the step was planned
        };
        active.output_tokens = u32::try_from(update.num_output_tokens).unwrap_or(u32::MAX);
        let finish = update.finish.as_ref().map(|f| f.reason);
        let wire_finish = match finish {
            Some(EngineFinish::Length) => Some(FinishReason::Length),
            Some(EngineFinish::Stop) => Some(FinishReason::Stop),
            _ => None,
        };
        if !update.tokens.is_empty() {
            let logprobs = match first {
                Some(t) => Some(vec![TokenLogprob {
                    logprob: t.logprob,
                    top_logprobs: t.top_logprobs.clone(),
                }]),
                None => (update.logprobs.len() == update.tokens.len()).then(|| {
                    update
                        .logprobs
                        .iter()
                        .enumerate()
                        .map(|(i, &logprob)| TokenLogprob {
                            logprob,
                            top_logprobs: update
                                .top_logprobs
                                .get(i)
                                .map(|top| {
                                    top.iter()
                                        .map(|&(id, logprob)| TopToken { id, logprob })
                                        .collect()
                                })
                                .unwrap_or_default(),
                        })
                        .collect()
                }),
            };
            active.send(EngineEvent::Tokens {
                ids: update.tokens.clone(),
                logprobs,
                finish: wire_finish,
            });
        }
        let Some(reason) = finish else {
            return;
        };
        let report = active.report(Instant::now());
        match reason {
            EngineFinish::Length | EngineFinish::Stop if active.retain => {
                active.retained = true;
                active.report = Some(report.clone());
                active.send(EngineEvent::KvRetained(report));
            }
            EngineFinish::Length | EngineFinish::Stop => {
                active.send(EngineEvent::Done(report));
                self.forget(key);
            }
            EngineFinish::Abort | EngineFinish::Error => {
                let message = update
                    .finish
                    .and_then(|f| f.message)
                    .unwrap_or_else(|| format!("request ended: {}", reason.as_str()));
                let kind = if reason == EngineFinish::Abort {
                    FailureKind::Aborted
                } else {
                    FailureKind::Internal
                };
                active.send(EngineEvent::Failed { kind, message });
                // A retained request that failed still holds its blocks.
                let _ = self.state.release_kv(key);
                self.forget(key);
            }
        }
    }

    fn forget(&mut self, key: RequestId) {
        if let Some(active) = self.active.remove(&key) {
            self.keys.remove(&active.name);
        }
    }

    fn break_engine(&mut self, reason: String) {
        tracing::error!(%reason, "engine broken; failing every request");
        self.broken = Some(reason.clone());
        self.fail_all(FailureKind::Internal, &reason);
    }

    fn fail_all(&mut self, kind: FailureKind, message: &str) {
        let keys: Vec<RequestId> = self.active.keys().copied().collect();
        for key in keys {
            let _ = self.state.cancel(key);
            if let Some(active) = self.active.remove(&key) {
                active.send(EngineEvent::Failed {
                    kind,
                    message: message.to_string(),
                });
            }
        }
        self.keys.clear();
    }
}

fn reject_reason(e: &SubmitError) -> RejectReason {
    match e {
        SubmitError::QueueFull { .. } => RejectReason::QueueFull,
        SubmitError::Busy => RejectReason::Busy,
        SubmitError::Duplicate(_) => RejectReason::Duplicate,
        SubmitError::Invalid { .. } => RejectReason::Invalid,
        SubmitError::Unavailable(_) => RejectReason::Unavailable,
    }
}
