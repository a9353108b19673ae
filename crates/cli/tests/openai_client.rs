//! The official `openai` Python client (pip `openai`, installed by scripts/test) against
//! `pdserve up`: chat, streaming chat with usage, completions, and a 404 it maps to its exception.

mod common;

use common::Proc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_talks_to_pdserve_up() {
    let (_proc, base, _dir) = Proc::up(&["--time-scale", "0"]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(&base)
        .output()
        .await
        .expect("python3 runs (the tests need Python 3 with `pip install openai`)");
    assert!(
        out.status.success(),
        "openai client script failed (is `openai` installed? scripts/test installs it):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("openai client: ok"));
}
