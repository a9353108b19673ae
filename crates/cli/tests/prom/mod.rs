//! Harness of the observability test: a real Prometheus (Debian's `prometheus` package) on a free
//! loopback port with a temporary config and storage, queried over its HTTP API; killed and its
//! directory removed on drop. Every wait is bounded. Needs the `common` harness beside it
//! (`mod common; mod prom;`).

#![allow(dead_code, reason = "each test binary uses a part of the harness")]

pub mod dashboard;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Prometheus's start on a busy CI machine (it opens an empty TSDB: seconds at most).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Set (to anything) to make a missing `prometheus` binary a failure instead of a skip.
pub const REQUIRE_ENV: &str = "PDSERVE_REQUIRE_PROMETHEUS";

/// `name` on `PATH`, if it is there.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The `prometheus` and `promtool` binaries; `None` (after saying why on stderr) when they are
/// absent and [`REQUIRE_ENV`] is unset; a panic when they are absent and it is set.
pub fn binaries_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    match (find_binary("prometheus"), find_binary("promtool")) {
        (Some(p), Some(t)) => Some((p, t)),
        _ if std::env::var_os(REQUIRE_ENV).is_some() => panic!(
            "{test}: `prometheus`/`promtool` not on PATH but {REQUIRE_ENV} is set \
             (install Debian's `prometheus` package; scripts/test does)"
        ),
        _ => {
            eprintln!(
                "{test}: SKIPPED: `prometheus`/`promtool` not on PATH (Debian package \
                 `prometheus`); set {REQUIRE_ENV}=1 to make this a failure"
            );
            None
        }
    }
}

/// Seconds since the Unix epoch (Prometheus's time axis).
pub fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A scratch directory under the test target's temporary directory, removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// A fresh, empty directory named after `what`, the process and the time.
    pub fn new(what: &str) -> ScratchDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        ScratchDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running Prometheus; killed (SIGKILL) and its storage removed when dropped.
pub struct Prometheus {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log: PathBuf,
    client: reqwest::Client,
    num_targets: usize,
    // Dropped after `child` is killed (see `Drop`).
    dir: ScratchDir,
}

impl Prometheus {
    /// Starts `bin` scraping `targets` (`host:port`, job `pdserve`) every `scrape_interval_s`
    /// seconds, on a free loopback port, and waits (bounded by [`READY_TIMEOUT`]) until it is
    /// ready.
    pub async fn start(bin: &Path, targets: &[String], scrape_interval_s: u32) -> Prometheus {
        let dir = ScratchDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let i = scrape_interval_s;
        let yml = format!(
            "global:\n  scrape_interval: {i}s\n  scrape_timeout: {i}s\n\
             scrape_configs:\n  - job_name: pdserve\n    honor_labels: true\n    \
             static_configs:\n      - targets: [{list}]\n"
        );
        std::fs::write(&config, yml).expect("writing the Prometheus config");
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("creating the Prometheus log");
        let port = crate::common::free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut prom = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            client: reqwest::Client::new(),
            num_targets: targets.len(),
            dir,
        };
        prom.wait_ready().await;
        prom
    }

    /// The end of Prometheus's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn wait_ready(&mut self) {
        let url = format!("{}/-/ready", self.base);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(r) = self.client.get(&url).send().await
                && r.status() == 200
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}); log:\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within {READY_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Evaluates `expr` at `time_s` (instant query); the `data` object, or the error Prometheus
    /// gave.
    pub async fn query(&self, expr: &str, time_s: f64) -> Result<Value, String> {
        let url = format!(
            "{}/api/v1/query?query={}&time={time_s:.3}",
            self.base,
            percent_encode(expr)
        );
        let r = self
            .client
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("query not sent: {e}"))?;
        let status = r.status();
        let body: Value = r
            .json()
            .await
            .map_err(|e| format!("HTTP {status}, body not JSON: {e}"))?;
        if body["status"] != "success" {
            return Err(format!(
                "{}: {}",
                body["errorType"].as_str().unwrap_or("error"),
                body["error"].as_str().unwrap_or("(no message)")
            ));
        }
        Ok(body["data"].clone())
    }

    /// Waits (bounded by `timeout`) until every target's last scrape began at or after `after_s`
    /// (Unix seconds) and succeeded; returns the latest of those scrape times.
    pub async fn wait_scraped_after(&self, after_s: f64, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let now = unix_now_s();
            // `timestamp()` of a plain selector is the sample's own time, not the query time.
            let stamps = self
                .query("timestamp(up{job=\"pdserve\"})", now)
                .await
                .map(|d| sample_values(&d))
                .unwrap_or_default();
            let up = self
                .query("up{job=\"pdserve\"}", now)
                .await
                .map(|d| sample_values(&d))
                .unwrap_or_default();
            if stamps.len() == self.num_targets
                && up.len() == self.num_targets
                && stamps.iter().all(|t| *t >= after_s)
                && up.iter().all(|v| *v == 1.0)
            {
                return stamps.iter().copied().fold(after_s, f64::max);
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not scrape pdserve after t={after_s:.3} within {timeout:?}; \
                 targets: {}; log:\n{}",
                self.targets().await,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `/api/v1/targets` (for failure messages).
    pub async fn targets(&self) -> String {
        match self
            .client
            .get(format!("{}/api/v1/targets", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => format!("(targets unavailable: {e})"),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sample values of an instant-query result (`vector` or `scalar`); NaN where unparsable.
pub fn sample_values(data: &Value) -> Vec<f64> {
    let value = |v: &Value| {
        v[1].as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN)
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .map(|a| a.iter().map(|s| value(&s["value"])).collect())
            .unwrap_or_default(),
        Some("scalar") => vec![value(&data["result"])],
        _ => Vec::new(),
    }
}

/// `s` with every byte outside RFC 3986's unreserved set percent-encoded (a query-string value).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
