//! `pdserve`: the command-line entry point.
//!
//! Each subcommand lives in its own module and exposes `Args` (clap) and `run(args)`.

use clap::{Parser, Subcommand};

mod bench;
mod bench_decode;
mod eval;
mod generate;
mod model_cmd;
mod serve;
mod services;
mod sim;
mod up;

/// pdserve: DeepSeek-V3's inference architecture (prefill/decode disaggregation, expert
/// parallelism, two-micro-batch overlap, MTP) on a simulated H800 fabric.
#[derive(Debug, Parser)]
#[command(name = "pdserve", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Router + one prefill + one decode instance in one process (the quickest start).
    Up(up::Args),
    /// The OpenAI front door alone (instances from `[router]` in --config).
    Router(serve::RouterArgs),
    /// One prefill instance (`[prefill.<id>]` in --config).
    Prefill(serve::InstanceArgs),
    /// One decode instance (`[decode.<id>]` in --config).
    Decode(serve::InstanceArgs),
    /// Create and inspect checkpoints (`model init`, `model logits`).
    Model(model_cmd::Args),
    /// Generate text from a prompt with the model alone (no services).
    Generate(generate::Args),
    /// Benchmarks of pdserve's own components.
    Bench(bench::Args),
    /// Held-out perplexity and MTP acceptance of a checkpoint, measured by pdserve.
    Eval(eval::Args),
    /// The simulated fabric: the paper's analysis, KV sizes, single-step simulation.
    Sim(sim::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up(args) => up::run(args),
        Command::Router(args) => serve::run_router(args),
        Command::Prefill(args) => serve::run_prefill(args),
        Command::Decode(args) => serve::run_decode(args),
        Command::Model(args) => model_cmd::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Sim(args) => sim::run(args),
    }
}
