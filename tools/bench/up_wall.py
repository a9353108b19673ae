#!/usr/bin/env python3
"""Wall-clock cost of a `pdserve up` configuration (docs/deploy.md, "Routed experts on the EP runtime").

Starts `pdserve up --port 0 --time-scale 0 [--config CONFIG]`, measures start-up to the banner,
20 concurrent greedy 64-token completions, then 5 sequential ones, and prints one JSON line.
The completions are written to OUT (default: up_wall.out.json) so two configurations can be
compared token for token.

    python3 tools/bench/up_wall.py target/release/pdserve config/pdserve.toml
    python3 tools/bench/up_wall.py target/release/pdserve my-ep-runtime.toml   # EP sections on
"""
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request


def main() -> None:
    binary, config = sys.argv[1], sys.argv[2]
    out_path = sys.argv[3] if len(sys.argv) > 3 else "up_wall.out.json"
    args = [binary, "up", "--port", "0", "--time-scale", "0", "--config", config]
    t0 = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url, banner = None, []
    for line in proc.stdout:
        banner.append(line.rstrip())
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
        if line.lstrip().startswith("try"):
            break
    if url is None:
        sys.exit(f"up_wall: pdserve up printed no address: {banner}")
    startup_s = time.time() - t0
    model = json.load(urllib.request.urlopen(url + "/v1/models", timeout=60))["data"][0]["id"]

    def complete(i: int, out: dict) -> None:
        body = json.dumps({"model": model, "prompt": f"Request number {i}: in the beginning",
                           "max_tokens": 64, "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        out[i] = json.load(urllib.request.urlopen(req, timeout=600))["choices"][0]["text"]

    try:
        concurrent: dict = {}
        t1 = time.time()
        threads = [threading.Thread(target=complete, args=(i, concurrent)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_s = time.time() - t1
        t2 = time.time()
        for i in range(5):
            complete(i, {})
        sequential_s = time.time() - t2
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps({"config": config, "startup_s": round(startup_s, 2),
                      "concurrent20_s": round(concurrent_s, 2),
                      "sequential5_s": round(sequential_s, 2),
                      "banner": [b for b in banner if "experts" in b or "EP" in b]}))
    with open(out_path, "w") as f:
        json.dump([concurrent[i] for i in range(20)], f)


if __name__ == "__main__":
    main()
