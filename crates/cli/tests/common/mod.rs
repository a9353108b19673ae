//! Harness of the end-to-end tests: real `pdserve` processes on loopback, discovered from their
//! stdout, gated on their health endpoints (bounded waits, no fixed sleeps), killed on drop.

#![allow(dead_code, reason = "each test binary uses a part of the harness")]

use std::io::{BufRead, BufReader};
use std::path::Path;
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

/// POSTs `body` as JSON; returns the status and the JSON answer.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = client
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body read");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON body ({e}): {text}"));
    (status, v)
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

/// An instance of a [`Cluster`].
pub struct Instance {
    /// Instance id from config/cluster-local.toml (`p0`, `p1`, `d0`, `d1`).
    pub id: &'static str,
    /// `prefill` or `decode`.
    pub role: &'static str,
    /// Base URL of its internal HTTP API.
    pub url: String,
    /// The process.
    pub proc: Proc,
}

/// config/cluster-local.toml on free loopback ports, and the processes started from it.
pub struct Cluster {
    /// The config file (with free ports).
    pub config: std::path::PathBuf,
    text: String,
    ports: Vec<(String, String)>,
    /// Started instances (see [`Cluster::start`]).
    pub instances: Vec<Instance>,
}

impl Cluster {
    /// Writes the config (every loopback port replaced by a free one; `tag` names the file) and
    /// starts p0, p1 (at `prefill_time_scale`), d0 and d1 (at `decode_time_scale`); returns once
    /// every instance answers `/health`. No router yet: see [`Cluster::start_router`].
    pub async fn start(tag: &str, prefill_time_scale: &str, decode_time_scale: &str) -> Cluster {
        let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        let mut text = std::fs::read_to_string(format!("{repo}/config/cluster-local.toml"))
            .expect("config/cluster-local.toml");
        let mut ports = Vec::new();
        for port in ["8000", "8100", "8110", "8200", "8201", "8210", "8211"] {
            let new = free_port().to_string();
            text = text.replace(
                &format!("127.0.0.1:{port}\""),
                &format!("127.0.0.1:{new}\""),
            );
            ports.push((port.to_string(), new));
        }
        let config = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cluster-{tag}-{}.toml", std::process::id()));
        std::fs::write(&config, &text).expect("writing the test config");
        let cfg = config.to_str().expect("utf-8 path").to_string();
        let mut instances = Vec::new();
        for (role, id, port) in [
            ("prefill", "p0", "8100"),
            ("prefill", "p1", "8110"),
            ("decode", "d0", "8200"),
            ("decode", "d1", "8210"),
        ] {
            let scale = if role == "prefill" {
                prefill_time_scale
            } else {
                decode_time_scale
            };
            let args = [
                role,
                "--config",
                &cfg,
                "--instance",
                id,
                "--time-scale",
                scale,
            ];
            let mapped = &ports.iter().find(|(o, _)| o == port).expect("mapped").1;
            instances.push(Instance {
                id,
                role,
                url: format!("http://127.0.0.1:{mapped}"),
                proc: Proc::start(&format!("{role} {id}"), &args),
            });
        }
        for i in &mut instances {
            wait_healthy(&mut i.proc, &format!("{}/health", i.url)).await;
        }
        Cluster {
            config,
            text,
            ports,
            instances,
        }
    }

    /// The instance `id`.
    pub fn instance(&mut self, id: &str) -> &mut Instance {
        self.instances
            .iter_mut()
            .find(|i| i.id == id)
            .unwrap_or_else(|| panic!("no instance `{id}`"))
    }

    /// Starts a router on a free port with the cluster's config, after `edit` (e.g. a policy
    /// change) when given, and `args`; returns it and its base URL once `/health` answers 200.
    pub async fn start_router(
        &self,
        edit: Option<&dyn Fn(&str) -> String>,
        args: &[&str],
    ) -> (Proc, String) {
        let listen = format!("127.0.0.1:{}", free_port());
        let path = match edit {
            None => self.config.clone(),
            Some(f) => {
                let path = self.config.with_extension(format!("{}.toml", free_port()));
                std::fs::write(&path, f(&self.text)).expect("writing the router config");
                path
            }
        };
        let cfg = path.to_str().expect("utf-8 path");
        let mut all = vec!["router", "--config", cfg, "--listen", &listen];
        all.extend_from_slice(args);
        let mut router = Proc::start("router", &all);
        router.wait_line("listening on http://", START_TIMEOUT);
        let url = format!("http://{listen}");
        wait_healthy(&mut router, &format!("{url}/health")).await;
        (router, url)
    }

    /// The router URL of the unedited config.
    pub fn router_url(&self) -> String {
        let port = &self
            .ports
            .iter()
            .find(|(o, _)| o == "8000")
            .expect("mapped")
            .1;
        format!("http://127.0.0.1:{port}")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

/// An instance's `/internal/stats`.
pub async fn instance_stats(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client
        .get(format!("{url}/internal/stats"))
        .send()
        .await
        .expect("stats request")
        .json()
        .await
        .expect("stats JSON")
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes (then panics with `what`).
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET {base}/metrics` as text.
pub async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The sum of the samples of metric `name` whose labels contain `label`, in a Prometheus text
/// exposition.
pub fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
