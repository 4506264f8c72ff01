#!/usr/bin/env python3
"""What aggregating the app's prom-client metrics costs a scrape of lb's /metrics (DESIGN §14).

Starts the release lb with --workers Node workers (benches/node/prom-500.js: 500 series each),
scrapes /metrics --scrapes times back to back, and reports the scrape latency (p50, p99) and the
master's CPU per scrape; then the same with --app-metrics off (lb's own families only), in one
run. The difference is what the aggregation costs.

Usage: cargo build --release && python3 benches/appmetrics.py [--workers 8] [--scrapes 200]
       [--out benches/results/appmetrics.md]
"""
import argparse
import os
import re
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run(workers, scrapes, app_metrics):
    env = dict(os.environ, NODE_PATH=str(ROOT / "examples/node/node_modules"))
    p = subprocess.Popen(
        [str(ROOT / "target/release/lb"), "-w", str(workers), "-l", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
         "--control", "off", "--app-metrics", app_metrics, "--", "node", str(ROOT / "benches/node/prom-500.js")],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        addr = None
        for line in p.stderr:
            m = re.search(r"metrics on (\S+)", line)
            if m:
                addr = m.group(1)
                break
        deadline = time.time() + 30
        while time.time() < deadline:
            with urllib.request.urlopen(f"http://{addr}/workers", timeout=5) as r:
                if r.read().decode().count('"ready"') == workers:
                    break
            time.sleep(0.2)
        body = b""
        for _ in range(3):  # warm up: every worker has answered once
            with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
                body = r.read()
        series = sum(1 for l in body.decode().splitlines() if l.startswith("bench_"))
        c0 = cpu(p.pid)
        lat = []
        for _ in range(scrapes):
            t = time.perf_counter()
            with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
                r.read()
            lat.append((time.perf_counter() - t) * 1e3)
        c1 = cpu(p.pid)
        lat.sort()
        return {"series": series, "bytes": len(body), "p50": statistics.median(lat),
                "p99": lat[int(len(lat) * 0.99) - 1], "cpu_ms": (c1 - c0) * 1e3 / scrapes}
    finally:
        p.terminate()
        p.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = [("on", run(a.workers, a.scrapes, "on")), ("off", run(a.workers, a.scrapes, "off"))]
    out = [f"{a.workers} Node workers × 500 prom-client series, {a.scrapes} scrapes back to back "
           f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs)\n",
           "| --app-metrics | app series on /metrics | body bytes | scrape p50 ms | scrape p99 ms | master CPU ms/scrape |",
           "|---|---|---|---|---|---|"]
    for name, r in rows:
        out.append(f"| {name} | {r['series']:,} | {r['bytes']:,} | {r['p50']:.2f} | {r['p99']:.2f} | {r['cpu_ms']:.2f} |")
    text = "\n".join(out) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
