//! The deployment shape: `pdserve router|prefill|decode` as five processes from
//! config/cluster-local.toml (its ports replaced by free ones), and a decode process killed with
//! SIGKILL in the middle of a stream.

mod common;

use std::time::Duration;

use common::{Proc, START_TIMEOUT, free_port, wait_healthy};
use serde_json::{Value, json};

/// config/cluster-local.toml with every loopback port replaced by a free one; returns the file
/// and the router's base URL.
fn local_config() -> (std::path::PathBuf, String, Vec<(String, String)>) {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let mut text = std::fs::read_to_string(format!("{repo}/config/cluster-local.toml"))
        .expect("config/cluster-local.toml");
    let mut map = Vec::new();
    for port in ["8000", "8100", "8110", "8200", "8201", "8210", "8211"] {
        let new = free_port().to_string();
        text = text.replace(
            &format!("127.0.0.1:{port}\""),
            &format!("127.0.0.1:{new}\""),
        );
        map.push((port.to_string(), new));
    }
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cluster-local-{}.toml", std::process::id()));
    std::fs::write(&path, text).expect("writing the test config");
    let router = format!("http://127.0.0.1:{}", map[0].1);
    (path, router, map)
}

fn port(map: &[(String, String)], original: &str) -> String {
    map.iter()
        .find(|(o, _)| o == original)
        .map(|(_, n)| n.clone())
        .expect("mapped port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_decode_process_ends_its_stream_with_an_error_event() {
    let (config, base, map) = local_config();
    let cfg = config.to_str().expect("utf-8 path");
    let mut instances = Vec::new();
    for (role, id) in [
        ("prefill", "p0"),
        ("prefill", "p1"),
        ("decode", "d0"),
        ("decode", "d1"),
    ] {
        // Prefill unpaced; decode paced (time_scale 1) so the stream is still running when the
        // process dies.
        let scale = if role == "decode" { "1" } else { "0" };
        let name = format!("{role} {id}");
        instances.push((
            id,
            Proc::start(
                &name,
                &[
                    role,
                    "--config",
                    cfg,
                    "--instance",
                    id,
                    "--time-scale",
                    scale,
                ],
            ),
        ));
    }
    for (id, p) in &mut instances {
        let http = match *id {
            "p0" => port(&map, "8100"),
            "p1" => port(&map, "8110"),
            "d0" => port(&map, "8200"),
            _ => port(&map, "8210"),
        };
        wait_healthy(p, &format!("http://127.0.0.1:{http}/health")).await;
    }
    let mut router = Proc::start("router", &["router", "--config", cfg, "--time-scale", "0"]);
    router.wait_line("listening on http://", START_TIMEOUT);
    wait_healthy(&mut router, &format!("{base}/health")).await;

    let client = reqwest::Client::new();
    // Both decode instances serve (round robin).
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "And God said", "max_tokens": 3, "temperature": 0}))
            .send()
            .await
            .expect("completion");
        assert_eq!(r.status(), 200);
        seen.push(
            r.headers()["x-pdserve-decode-instance"]
                .to_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    seen.sort();
    assert_eq!(seen, ["d0", "d1"]);

    let mut r = client
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"prompt": "And God said", "max_tokens": 2000, "temperature": 0,
                      "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let victim = r.headers()["x-pdserve-decode-instance"]
        .to_str()
        .unwrap_or("")
        .to_string();
    let first = tokio::time::timeout(Duration::from_secs(60), r.chunk())
        .await
        .expect("a first chunk within 60 s")
        .expect("chunk read")
        .expect("a chunk");
    assert!(!first.is_empty());
    let (_, p) = instances
        .iter_mut()
        .find(|(id, _)| *id == victim)
        .unwrap_or_else(|| panic!("unknown decode instance `{victim}`"));
    p.child.kill().expect("SIGKILL the decode process");
    let mut body = String::from_utf8_lossy(&first).to_string();
    let rest = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(c)) = r.chunk().await {
            body.push_str(&String::from_utf8_lossy(&c));
        }
        body
    })
    .await
    .expect("the stream ends within 90 s of the kill");
    let events = common::sse_events(&rest);
    assert_ne!(events.last().map(String::as_str), Some("[DONE]"), "{rest}");
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("JSON event");
    assert!(
        last["error"]["message"].is_string(),
        "last event is not an error: {last}"
    );
    assert!(
        router.child.try_wait().expect("try_wait").is_none(),
        "router died: {}",
        router.stderr()
    );
    let _ = std::fs::remove_file(&config);
}
