//! `pdserve`: the command-line entry point.
//!
//! Each subcommand lives in its own module and exposes `Args` (clap) and `run(args)`.

use clap::{Parser, Subcommand};

mod bench;
mod generate;
mod model_cmd;
mod sim;

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
    /// Create and inspect checkpoints (`model init`, `model logits`).
    Model(model_cmd::Args),
    /// Generate text from a prompt with the model alone (no services).
    Generate(generate::Args),
    /// Benchmarks of pdserve's own components.
    Bench(bench::Args),
    /// The simulated fabric: the paper's analysis, KV sizes, single-step simulation.
    Sim(sim::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Model(args) => model_cmd::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Sim(args) => sim::run(args),
    }
}
