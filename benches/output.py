#!/usr/bin/env python3
"""What --worker-output costs (DESIGN §15): the same workers writing the same lines under
inherit, prefix and json, in one run.

Starts the release lb with --workers Node workers (tests/fixtures/output.js: each writes --lines
lines to stdout, every tenth also to stderr, as fast as Node can), reads lb's stdout and stderr
to their `done` lines, and reports the wall time, the lines per second and lb's CPU per 1,000
lines (the whole process: the master's readers and the writer thread). Under inherit the
workers write to the bench's pipes themselves and lb's CPU is what it spends anyway.

Usage: cargo build --release && python3 benches/output.py [--workers 4] [--lines 200000]
       [--out benches/results/output.md]
"""
import argparse
import os
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def drain(stream, counts, key):
    for line in stream:
        counts[key] += 1
        if b"done slot=" in line:
            counts[key + "_done"] += 1


def run(workers, lines, mode):
    env = dict(os.environ, LINES=str(lines), OUTPUT="lines", RUST_LOG="warn")
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [str(ROOT / "target/release/lb"), "-w", str(workers), "-l", "127.0.0.1:0", "--metrics", "off",
         "--control", "off", "--worker-output", mode, "--", "node", str(ROOT / "tests/fixtures/output.js")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    counts = {"out": 0, "out_done": 0, "err": 0, "err_done": 0}
    readers = [threading.Thread(target=drain, args=(p.stdout, counts, "out"), daemon=True),
               threading.Thread(target=drain, args=(p.stderr, counts, "err"), daemon=True)]
    for r in readers:
        r.start()
    try:
        deadline = time.time() + 300
        while (counts["out_done"] < workers or counts["err_done"] < workers) and time.time() < deadline:
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        used = cpu(p.pid)
    finally:
        p.terminate()
        p.wait(timeout=30)
    total = workers * (lines + lines // 10 + 2)
    return {"mode": mode, "wall": wall, "lines": total, "rate": total / wall, "cpu_ms_per_k": used * 1e3 / total * 1000,
            "complete": counts["out_done"] == workers and counts["err_done"] == workers}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = [run(a.workers, a.lines, m) for m in ("inherit", "prefix", "json")]
    text = (f"{a.workers} Node workers × {a.lines:,} stdout lines (+10 % on stderr), written as fast as Node can "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs)\n\n"
            "| --worker-output | lines | wall s | lines/s | lb CPU ms per 1,000 lines | all lines seen |\n|---|---|---|---|---|---|\n")
    for r in rows:
        text += (f"| {r['mode']} | {r['lines']:,} | {r['wall']:.2f} | {r['rate']:,.0f} | {r['cpu_ms_per_k']:.2f} | "
                 f"{'yes' if r['complete'] else 'NO'} |\n")
    print(text, end="")
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
