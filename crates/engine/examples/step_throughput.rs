//! Measures the host cost of the scheduler's decision loop (plan + apply, scripted executor) with a
//! large decode batch: `cargo run --release -p pdserve-engine --example step_throughput`.
//! Shape: 256 running sequences at DeepSeek's production average context (4,989 tokens), MTP on.

use std::time::Instant;

use pdserve_engine::{
    Executor, Request, RequestId, Scheduler, SchedulerConfig, ScriptedExecutor, StopConditions,
    WorkWeights,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let running = 256;
    let context = 4_989;
    let scheduler = Scheduler::new(SchedulerConfig {
        num_kv_blocks: running * (context + 1_000) / 64 + 64,
        max_batched_tokens: 1 << 20,
        max_running_seqs: running,
        prefill_chunk_tokens: 8_192,
        max_context_tokens: 8_192,
        spec_tokens: 1,
        two_batch_overlap: Some(WorkWeights::default()),
    })?;
    let mut state = scheduler.new_state::<()>();
    for i in 0..running as u64 {
        let stop = StopConditions {
            max_tokens: Some(100_000),
            ..StopConditions::default()
        };
        state.add_request(
            Request::new(RequestId(i), vec![1; context], ())
                .with_kv_arrived(2)
                .with_stop(stop),
        )?;
    }
    let mut executor = ScriptedExecutor::new(1000).with_reject_every(8);
    let mut now_ns = 0;
    let steps = 500;
    let mut tokens = 0usize;
    let start = Instant::now();
    for _ in 0..steps {
        let plan = scheduler.step(now_ns, &mut state)?;
        let Ok(out) = executor.execute(&plan);
        tokens += state
            .apply(out.seqs)?
            .iter()
            .map(|u| u.tokens.len())
            .sum::<usize>();
        now_ns += 1_000_000;
    }
    let elapsed = start.elapsed();
    println!(
        "{steps} steps x {running} decodes: {:.1} us per step (plan + execute + apply), {tokens} tokens, \
         acceptance {:.3}, kv usage {:.3}, preemptions {}",
        elapsed.as_secs_f64() * 1e6 / steps as f64,
        state.stats().spec_acceptance_rate().unwrap_or(0.0),
        state.stats().kv_usage_fraction(),
        state.stats().preemptions_total,
    );
    Ok(())
}
