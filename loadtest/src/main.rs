//! The `loadtest` binary: parse flags, run the benchmark, exit non-zero on a setup error.

use clap::Parser;
use loadtest::args::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let plan = cli.into_plan(std::env::var("OPENAI_API_KEY").ok())?;
    let mut stdout = std::io::stdout();
    loadtest::bench::execute(&plan, &mut stdout).await?;
    Ok(())
}
