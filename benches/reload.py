#!/usr/bin/env python3
"""How long an in-place upgrade (SIGHUP) keeps lb from accepting (DESIGN §10).

Starts the release lb with N built-in workers (port 0), keeps one client making requests back to
back (a new connection each, from several source addresses), and sends SIGHUP --rounds times.
For each round it reports:

- reload: SIGHUP until the new image counted the reload (`lb_reloads_total{result="ok"}`);
  this includes the preflight (`lb check` of the binary at lb's start path), which runs while lb
  keeps accepting;
- longest wait: the longest time one client request took among those in flight during the
  reload, minus the median request time outside reloads: how long a connection waited in the
  backlog while lb settled, re-executed and took over (the "not accepting" gap);
- that every worker pid and the master pid stayed and no request failed.

Usage: cargo build --release && python3 benches/reload.py [--workers 4] [--rounds 20]
       [--out benches/results/reload.md]
"""
import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def metric(addr, series):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def workers(addr):
    import json
    with urllib.request.urlopen(f"http://{addr}/workers", timeout=5) as r:
        return [w.get("pid") for w in json.load(r)["workers"]]


def request(addr, src):
    s = socket.socket()
    s.settimeout(10)
    s.bind((src, 0))
    s.connect(addr)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"bad answer {data[:40]!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lb", default=str(ROOT / "target/release/lb"))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    proc = subprocess.Popen(
        [a.lb, "-w", str(a.workers), "-l", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
         "--wait-ready", "--control", f"/tmp/lb-reload-bench-{os.getpid()}.sock"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"})
    log = []
    addr_line = threading.Event()

    def read_log():
        for line in proc.stderr:
            log.append(line.rstrip())
            if "listening on" in line:
                addr_line.set()
    threading.Thread(target=read_log, daemon=True).start()
    if not addr_line.wait(20):
        proc.kill()
        sys.exit("lb did not start: " + "\n".join(log))
    m = re.search(r"listening on ([\d.]+):(\d+), metrics on ([\d.:]+)", "\n".join(log))
    addr, maddr = (m.group(1), int(m.group(2))), m.group(3)
    deadline = time.monotonic() + 20
    while metric(maddr, "lb_worker_up{worker=\"%d\"}" % (a.workers - 1)) < 1:
        if time.monotonic() > deadline:
            sys.exit("workers not ready")
        time.sleep(0.02)
    pids = workers(maddr)

    samples = []  # (start, end)
    failures = []
    stop = threading.Event()

    def client():
        i = 0
        while not stop.is_set() and len(samples) < 2_000_000:
            src = f"127.0.{(i // 250) % 250}.{i % 250 + 1}"
            i += 1
            t = time.monotonic()
            try:
                request(addr, src)
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append(f"{src}: {e}")
            samples.append((t, time.monotonic()))
    clients = [threading.Thread(target=client) for _ in range(2)]
    for c in clients:
        c.start()
    time.sleep(1)

    rounds = []
    for r in range(a.rounds):
        before = metric(maddr, 'lb_reloads_total{result="ok"}')
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGHUP)
        limit = t0 + 10
        while metric(maddr, 'lb_reloads_total{result="ok"}') <= before:
            if time.monotonic() > limit:
                sys.exit("reload not counted within 10 s:\n" + "\n".join(log[-20:]))
            time.sleep(0.001)
        t1 = time.monotonic()
        time.sleep(0.3)  # let requests in flight during the reload finish (pacing, not sync)
        rounds.append((t0, t1))
    stop.set()
    for c in clients:
        c.join()
    assert workers(maddr) == pids, "worker pids changed"
    assert proc.poll() is None, "lb exited"
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)

    def during(t0, t1):
        return [e - s for s, e in samples if s <= t1 and e >= t0]
    quiet = [e - s for s, e in samples
             if not any(s <= t1 + 0.05 and e >= t0 - 0.05 for t0, t1 in rounds)]
    base = statistics.median(quiet)
    reload_ms = [(t1 - t0) * 1000 for t0, t1 in rounds]
    wait_ms = [max(0.0, (max(during(t0, t1) or [0]) - base) * 1000) for t0, t1 in rounds]

    def row(name, xs):
        xs = sorted(xs)
        return (f"| {name} | {statistics.median(xs):.1f} | {xs[int(len(xs) * 0.95) - 1]:.1f} "
                f"| {xs[-1]:.1f} |")
    lines = [
        f"In-place upgrade (SIGHUP), {a.workers} built-in workers, {a.rounds} rounds, "
        f"{len(samples)} requests ({len(failures)} failed), median request {base * 1000:.2f} ms "
        f"outside reloads; master and worker pids unchanged: yes",
        "",
        "| ms | median | p95 | max |",
        "|---|---|---|---|",
        row("SIGHUP → new image serving (incl. preflight)", reload_ms),
        row("longest extra wait of a client request", wait_ms),
    ]
    text = "\n".join(lines)
    print(text)
    if failures:
        print("failures:", failures[:5])
    if a.out:
        Path(a.out).write_text(text + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
