//! Harness of the end-to-end tests: real `pdserve` processes on loopback, discovered from their
//! stdout, gated on their health endpoints (bounded waits, no fixed sleeps), killed on drop.

#![allow(dead_code, reason = "each test binary uses a part of the harness")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Loading the model and starting the services on a busy 2-core CI machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(180);

/// A running `pdserve` process; killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    stdout: Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `pdserve args…` with stdout and stderr captured.
    pub fn start(name: &str, args: &[&str]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pdserve"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start pdserve: {e}"));
        let (tx, stdout) = channel();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().expect("stderr log").push(line);
            }
        });
        Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        }
    }

    /// The process's stderr so far (for failure messages).
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr log").join("\n")
    }

    /// Waits (bounded) for a stdout line containing `marker`; returns the line.
    pub fn wait_line(&mut self, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no `{marker}` on stdout within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: exited ({:?}) before printing `{marker}`; stderr:\n{}",
                    self.name,
                    self.child.try_wait(),
                    self.stderr()
                ),
            }
        }
    }

    /// `pdserve up --port 0 …`; returns the process, its base URL and the model directory it
    /// serves, once it answers `/health` with 200.
    pub async fn up(args: &[&str]) -> (Proc, String, String) {
        let mut all = vec!["up", "--port", "0", "--threads", "1"];
        all.extend_from_slice(args);
        let mut p = Proc::start("pdserve up", &all);
        let line = p.wait_line("listening on http://", START_TIMEOUT);
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .expect("an URL on the listening line")
            .to_string();
        let model = p.wait_line("  model ", START_TIMEOUT);
        let dir = model
            .split_whitespace()
            .nth(1)
            .expect("a directory on the model line")
            .to_string();
        wait_healthy(&mut p, &format!("{url}/health")).await;
        (p, url, dir)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `url` until it answers 200 (bounded by [`START_TIMEOUT`]); fails with `p`'s stderr.
pub async fn wait_healthy(p: &mut Proc, url: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!(
                "{} exited ({status}) before {url} was healthy; stderr:\n{}",
                p.name,
                p.stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{}: {url} not healthy within {START_TIMEOUT:?}; stderr:\n{}",
            p.name,
            p.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `pdserve generate --json …` (the model alone) and returns its JSON report.
pub fn generate(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["generate", "--json", "--threads", "1"];
    all.extend_from_slice(args);
    let out = Command::new(env!("CARGO_BIN_EXE_pdserve"))
        .args(&all)
        .output()
        .expect("running pdserve generate");
    assert!(
        out.status.success(),
        "pdserve generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().expect("a JSON line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("generate's JSON: {e}: {last}"))
}

/// The SSE `data:` payloads of a response body, in order.
pub fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

/// Reserves a free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
