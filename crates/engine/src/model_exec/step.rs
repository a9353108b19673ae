//! One step of the [`ModelExecutor`]: forwards, sampling, draft verification, MTP drafting.
//!
//! Positions (for a request whose new tokens start at `p`): the main forward appends main-layer
//! rows `p..`; the MTP entry of position `i` combines `h_i` (the main model's final hidden state at
//! `i`) with the token at `i + 1`, so it can be computed only once that token is known. After a step
//! the MTP layer holds entries for every position before the request's next input position,
//! except that a prefill chunk that does not sample leaves its last position pending (its next
//! token is the next chunk's first). Hence the MTP layer's length at the start of a step equals the
//! first MTP position of the step: `p` for a decode, `p − 1` for a chunk with a pending position.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use pdserve_model::sampling::token_logprobs;
use pdserve_model::{ForwardOptions, LogitsWanted, SamplingParams, SequenceInput};

use super::cache::PagedCache;
use super::{DraftMode, ExecError, ExpertBackend, ModelExecutor, RoutedRequest, StepRouting};
use crate::block_pool::BlockId;
use crate::executor::{SeqOutput, StepOutputs};
use crate::plan::{DecodeItem, PrefillChunk, StepPlan};
use crate::sequence::{RequestId, TokenId};
use crate::spec::{
    argmax, sample_index, target_probs, verify_point_mass, verify_with_draft_distribution,
};

/// One sequence's work in the step.
#[derive(Clone, Copy, Debug)]
enum Work<'p> {
    Prefill(&'p PrefillChunk<SamplingParams>),
    Decode(&'p DecodeItem<SamplingParams>),
}

impl<'p> Work<'p> {
    fn id(&self) -> RequestId {
        match self {
            Work::Prefill(c) => c.id,
            Work::Decode(d) => d.id,
        }
    }
    fn params(&self) -> &'p SamplingParams {
        match self {
            Work::Prefill(c) => &c.params,
            Work::Decode(d) => &d.params,
        }
    }
    /// Output index of the first token this item samples (its draw index).
    fn output_index(&self) -> usize {
        match self {
            Work::Prefill(c) => c.num_output_tokens,
            Work::Decode(d) => d.num_output_tokens,
        }
    }
    fn micro_batch(&self) -> u8 {
        match self {
            Work::Prefill(c) => c.micro_batch,
            Work::Decode(d) => d.micro_batch,
        }
    }
    fn table(&self) -> &'p [BlockId] {
        match self {
            Work::Prefill(c) => &c.block_table,
            Work::Decode(d) => &d.block_table,
        }
    }
    fn start_pos(&self) -> usize {
        match self {
            Work::Prefill(c) => c.start_pos,
            Work::Decode(d) => d.position,
        }
    }
    fn input(&self) -> SequenceInput {
        match self {
            Work::Prefill(c) => SequenceInput::new(c.id.0, c.tokens.clone(), c.start_pos)
                .with_logits(if c.samples {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                }),
            Work::Decode(d) => {
                let mut tokens = vec![d.input_token];
                tokens.extend(d.draft_token);
                let logits = if d.draft_token.is_some() {
                    LogitsWanted::All
                } else {
                    LogitsWanted::Last
                };
                SequenceInput::new(d.id.0, tokens, d.position).with_logits(logits)
            }
        }
    }
}

/// The MTP module's input for one sequence.
struct MtpInput {
    /// Index of the work item in its group.
    item: usize,
    input: SequenceInput,
    /// `[len, hidden]` row-major.
    hidden: Vec<f32>,
    /// Draft wanted (the chunk sampled, or a decode).
    drafts: bool,
}

impl<X: ExpertBackend> ModelExecutor<X> {
    /// Runs every non-failed sequence of `plan`, in one or two forwards.
    pub(super) fn run_plan(
        &mut self,
        plan: &StepPlan<SamplingParams>,
        mut failed: HashSet<RequestId>,
    ) -> Result<StepOutputs<StepRouting>, ExecError> {
        let all: Vec<Work<'_>> = plan
            .prefills
            .iter()
            .map(Work::Prefill)
            .chain(plan.decodes.iter().map(Work::Decode))
            .collect();
        let mut runnable = Vec::with_capacity(all.len());
        for w in all {
            if failed.contains(&w.id()) || self.ensure_seq(w.id(), w.params()).is_none() {
                failed.insert(w.id());
                continue;
            }
            runnable.push(w);
        }
        self.stats.failed_seqs_total += failed.len() as u64;
        let groups: Vec<Vec<Work<'_>>> =
            if self.config.split_micro_batches && plan.micro_batch_work.is_some() {
                (0..2u8)
                    .map(|mb| {
                        runnable
                            .iter()
                            .copied()
                            .filter(|w| w.micro_batch() == mb)
                            .collect()
                    })
                    .collect()
            } else {
                vec![runnable]
            };
        let spec = plan.spec_tokens > 0;
        let mut routing = StepRouting {
            placements: self.experts.fabric_placements()?,
            ..StepRouting::default()
        };
        let mut outputs = Vec::new();
        let mut ran = false;
        for group in groups.iter().filter(|g| !g.is_empty()) {
            self.run_group(group, spec, &mut routing, &mut outputs)?;
            ran = true;
        }
        if ran {
            self.experts.end_step()?;
            routing.served_gpus = self.experts.served_gpus()?;
        }
        Ok(StepOutputs {
            seqs: outputs,
            routing,
        })
    }

    fn rank_of(&self, id: RequestId) -> u32 {
        self.seqs.get(&id).map_or(0, |s| s.rank)
    }

    /// One forward (plus its MTP forward) over `group`.
    fn run_group(
        &mut self,
        group: &[Work<'_>],
        spec: bool,
        routing: &mut StepRouting,
        outputs: &mut Vec<SeqOutput>,
    ) -> Result<(), ExecError> {
        let main_layers = self.model.config().num_hidden_layers;
        let inputs: Vec<SequenceInput> = group.iter().map(Work::input).collect();
        let token_ranks: Vec<u32> = group
            .iter()
            .zip(&inputs)
            .flat_map(|(w, i)| std::iter::repeat_n(self.rank_of(w.id()), i.tokens.len()))
            .collect();
        self.experts.begin_forward(&token_ranks)?;
        let device = self.model.device().clone();
        let out = {
            let mut cache = PagedCache::new(&mut self.store, &device);
            for w in group {
                cache.register(w.id().0, w.table(), 0..main_layers, w.start_pos());
            }
            self.model.forward(
                &inputs,
                &mut cache,
                &self.experts,
                &ForwardOptions::default(),
            )?
        };
        let n_rows = token_ranks.len();
        self.stats.forwards_total += 1;
        self.stats.main_tokens_total += n_rows as u64;

        // Logits rows of each item, in position order.
        let logits: Vec<Vec<f32>> = out.logits.to_vec2()?;
        let mut rows_of: Vec<Vec<usize>> = vec![Vec::new(); group.len()];
        for (r, row) in out.logit_rows.iter().enumerate() {
            if let Some(v) = rows_of.get_mut(row.batch_index) {
                v.push(r);
            }
        }
        let hidden_width = self.model.config().hidden_size;
        let hidden: Vec<f32> = if spec {
            out.hidden.flatten_all()?.to_vec1()?
        } else {
            Vec::new()
        };

        // Routing entries, sampling and verification.
        let mut offset = routing.num_rows;
        let mut emitted: Vec<Option<Vec<TokenId>>> = Vec::with_capacity(group.len());
        for (b, w) in group.iter().enumerate() {
            let len = inputs[b].tokens.len();
            routing.requests.push(RoutedRequest {
                id: w.id(),
                rank: self.rank_of(w.id()),
                micro_batch: w.micro_batch(),
                cached_tokens: w.start_pos(),
                rows: offset..offset + len,
                mtp_rows: 0..0,
            });
            offset += len;
            let rows: Vec<&[f32]> = rows_of[b].iter().map(|&r| logits[r].as_slice()).collect();
            let result = match w {
                Work::Prefill(c) if !c.samples => None,
                Work::Prefill(c) => Some(self.sample_one(c, &rows)?),
                Work::Decode(d) => Some(self.verify_decode(d, &rows)?),
            };
            match result {
                Some(out) => {
                    emitted.push(Some(out.tokens.clone()));
                    outputs.push(out);
                }
                None => emitted.push(None),
            }
        }
        routing.push_main(out.routing, n_rows);

        if spec {
            let first_output = outputs.len() - emitted.iter().filter(|e| e.is_some()).count();
            let mtp = self.mtp_inputs(group, &inputs, &emitted, &hidden, hidden_width)?;
            self.run_mtp(group, mtp, first_output, routing, outputs)?;
        }
        Ok(())
    }

    /// Samples the token after a prefill's last chunk (output index `num_output_tokens`).
    fn sample_one(
        &mut self,
        c: &PrefillChunk<SamplingParams>,
        rows: &[&[f32]],
    ) -> Result<SeqOutput, ExecError> {
        let row = rows
            .last()
            .copied()
            .ok_or_else(|| internal(c.id, "no logits for a sampling chunk"))?;
        let seq = self
            .seqs
            .get(&c.id)
            .ok_or_else(|| internal(c.id, "no state"))?;
        let t = seq.sampler.sample_at(row, c.num_output_tokens)?;
        Ok(seq_output(c.id, &c.params, &[(t.id, row)]))
    }

    /// Verifies a decode's draft (if any) and returns the accepted tokens. The token at output
    /// index `k` is sampled with draw `k` (`k = num_output_tokens` for the input position, `k + 1`
    /// after an accepted draft).
    fn verify_decode(
        &mut self,
        d: &DecodeItem<SamplingParams>,
        rows: &[&[f32]],
    ) -> Result<SeqOutput, ExecError> {
        let mode = self.config.draft;
        let k = d.num_output_tokens;
        let seq = self
            .seqs
            .get_mut(&d.id)
            .ok_or_else(|| internal(d.id, "no state"))?;
        let first = *rows
            .first()
            .ok_or_else(|| internal(d.id, "no logits for a decode"))?;
        let tokens = match d.draft_token {
            None => vec![(seq.sampler.sample_at(first, k)?.id, first)],
            Some(draft) => {
                let verdict = match (mode, seq.draft_q.take()) {
                    (DraftMode::Sample, Some(q)) => {
                        let p = target_probs(&d.params.masked_logits(first, k), &d.params);
                        let (ua, ur) = (seq.spec_rng.uniform(), seq.spec_rng.uniform());
                        verify_with_draft_distribution(&p, &q, draft, ua, ur)
                    }
                    _ => verify_point_mass(first, draft, &seq.sampler, k)?.0,
                };
                self.stats.drafts_verified_total += 1;
                if verdict.is_accepted() {
                    if let Some(c) = self.stats.drafts_accepted_per_pos.first_mut() {
                        *c += 1;
                    }
                    let second = *rows
                        .get(1)
                        .ok_or_else(|| internal(d.id, "no logits after the draft"))?;
                    let bonus = seq.sampler.sample_at(second, k + 1)?.id;
                    vec![(draft, first), (bonus, second)]
                } else {
                    vec![(verdict.token(draft), first)]
                }
            }
        };
        Ok(seq_output(d.id, &d.params, &tokens))
    }

    /// The MTP inputs of `group` (see the module docs), updating pending hidden states.
    fn mtp_inputs(
        &mut self,
        group: &[Work<'_>],
        inputs: &[SequenceInput],
        emitted: &[Option<Vec<TokenId>>],
        hidden: &[f32],
        width: usize,
    ) -> Result<Vec<MtpInput>, ExecError> {
        let mut out = Vec::new();
        let mut row0 = 0usize;
        for (b, w) in group.iter().enumerate() {
            let n = inputs[b].tokens.len();
            let h_row = |i: usize| &hidden[(row0 + i) * width..(row0 + i + 1) * width];
            let id = w.id();
            let seq = self
                .seqs
                .get_mut(&id)
                .ok_or_else(|| internal(id, "no state"))?;
            match w {
                Work::Decode(d) => {
                    // Positions p .. p + e - 1 with the emitted tokens as "next" tokens.
                    let tokens = emitted[b].clone().unwrap_or_default();
                    let mut h = Vec::with_capacity(tokens.len() * width);
                    for i in 0..tokens.len().min(n) {
                        h.extend_from_slice(h_row(i));
                    }
                    out.push(MtpInput {
                        item: b,
                        input: SequenceInput::new(id.0, tokens, d.position),
                        hidden: h,
                        drafts: true,
                    });
                }
                Work::Prefill(c) => {
                    let (s, e) = (c.start_pos, c.start_pos + c.tokens.len());
                    let mut tokens = Vec::new();
                    let mut h = Vec::new();
                    let mut first = s;
                    if s > 0 {
                        match seq.mtp_pending.take() {
                            Some((pos, pending)) if pos + 1 == s => {
                                tokens.push(c.tokens[0]);
                                h.extend_from_slice(&pending);
                                first = s - 1;
                            }
                            _ => {
                                return Err(internal(
                                    id,
                                    &format!("no pending MTP state for the chunk starting at {s}"),
                                ));
                            }
                        }
                    }
                    // Positions s .. e - 2 take the chunk's own next tokens.
                    for i in 0..n.saturating_sub(1) {
                        tokens.push(c.tokens[i + 1]);
                        h.extend_from_slice(h_row(i));
                    }
                    match emitted[b].as_ref().and_then(|t| t.first()) {
                        // Position e - 1 takes the sampled token.
                        Some(&t) => {
                            tokens.push(t);
                            h.extend_from_slice(h_row(n - 1));
                        }
                        None => seq.mtp_pending = Some((e - 1, h_row(n - 1).to_vec())),
                    }
                    if !tokens.is_empty() {
                        let drafts = emitted[b].is_some();
                        let logits = if drafts {
                            LogitsWanted::Last
                        } else {
                            LogitsWanted::None
                        };
                        out.push(MtpInput {
                            item: b,
                            input: SequenceInput::new(id.0, tokens, first).with_logits(logits),
                            hidden: h,
                            drafts,
                        });
                    }
                }
            }
            row0 += n;
        }
        Ok(out)
    }

    /// Runs the MTP module and attaches drafts to the outputs of `group` (which start at
    /// `outputs[first_output]`, in group order, one per item that emitted tokens).
    fn run_mtp(
        &mut self,
        group: &[Work<'_>],
        mtp: Vec<MtpInput>,
        first_output: usize,
        routing: &mut StepRouting,
        outputs: &mut [SeqOutput],
    ) -> Result<(), ExecError> {
        let mtp: Vec<MtpInput> = mtp
            .into_iter()
            .filter(|m| !m.input.tokens.is_empty())
            .collect();
        if mtp.is_empty() {
            return Ok(());
        }
        let layer = self.model.config().num_hidden_layers;
        let width = self.model.config().hidden_size;
        let inputs: Vec<SequenceInput> = mtp.iter().map(|m| m.input.clone()).collect();
        let n_rows: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        let flat: Vec<f32> = mtp.iter().flat_map(|m| m.hidden.iter().copied()).collect();
        let device = self.model.device().clone();
        let hidden = Tensor::from_vec(flat, (n_rows, width), &device)?;
        let token_ranks: Vec<u32> = mtp
            .iter()
            .flat_map(|m| {
                std::iter::repeat_n(self.rank_of(group[m.item].id()), m.input.tokens.len())
            })
            .collect();
        self.experts.begin_forward(&token_ranks)?;
        let out = {
            let mut cache = PagedCache::new(&mut self.store, &device);
            for m in &mtp {
                let w = &group[m.item];
                cache.register(w.id().0, w.table(), layer..layer + 1, m.input.start_pos);
            }
            self.model.mtp_forward(
                &inputs,
                &hidden,
                &mut cache,
                &self.experts,
                &ForwardOptions::default(),
            )?
        };
        self.stats.mtp_forwards_total += 1;
        self.stats.mtp_tokens_total += n_rows as u64;
        let logits: Vec<Vec<f32>> = out.logits.to_vec2()?;
        let mut last_row: HashMap<usize, usize> = HashMap::new();
        for (r, row) in out.logit_rows.iter().enumerate() {
            last_row.insert(row.batch_index, r);
        }
        // Output index of each group item that emitted tokens.
        let mut out_index: HashMap<RequestId, usize> = HashMap::new();
        for (k, o) in outputs.iter().enumerate().skip(first_output) {
            out_index.insert(o.id, k);
        }
        let mut row = routing.num_mtp_rows;
        let base = routing.requests.len() - group.len();
        for (b, m) in mtp.iter().enumerate() {
            let len = m.input.tokens.len();
            if let Some(req) = routing.requests.get_mut(base + m.item) {
                req.mtp_rows = row..row + len;
            }
            row += len;
            if !m.drafts {
                continue;
            }
            let id = group[m.item].id();
            let Some(&r) = last_row.get(&b) else {
                continue;
            };
            let Some(&k) = out_index.get(&id) else {
                continue;
            };
            // The draft proposes the token after the last emitted one.
            let index = group[m.item].output_index() + outputs[k].tokens.len();
            let params = group[m.item].params();
            outputs[k].draft = Some(self.draft_from(id, params, &logits[r], index)?);
        }
        routing.push_mtp(out.routing, n_rows);
        Ok(())
    }

    /// The draft token for output index `index` from MTP logits (under the `min_tokens` mask, as
    /// the target token will be).
    fn draft_from(
        &mut self,
        id: RequestId,
        params: &SamplingParams,
        logits: &[f32],
        index: usize,
    ) -> Result<TokenId, ExecError> {
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or_else(|| internal(id, "no state"))?;
        let logits = params.masked_logits(logits, index);
        match self.config.draft {
            DraftMode::Greedy => Ok(argmax(&logits) as TokenId),
            DraftMode::Sample => {
                let q = target_probs(&logits, params);
                let d = sample_index(&q, seq.spec_rng.uniform()).unwrap_or(0) as TokenId;
                seq.draft_q = Some(q);
                Ok(d)
            }
        }
    }
}

/// The output of `id` for `tokens` (each with the logits row it was sampled from), with logprobs
/// of the unmodified rows when `params` asks for them.
fn seq_output(id: RequestId, params: &SamplingParams, tokens: &[(TokenId, &[f32])]) -> SeqOutput {
    let mut out = SeqOutput {
        id,
        tokens: tokens.iter().map(|(t, _)| *t).collect(),
        ..SeqOutput::default()
    };
    if params.logprobs.is_some() {
        for &(t, row) in tokens {
            let lp = token_logprobs(row, t, params.logprobs);
            out.logprobs.push(lp.logprob.unwrap_or(f32::NEG_INFINITY));
            out.top_logprobs.push(lp.top_logprobs);
        }
    }
    out
}

fn internal(id: RequestId, problem: &str) -> ExecError {
    ExecError::Sequence {
        id,
        problem: problem.to_string(),
    }
}
