#!/usr/bin/env python3
"""socket.io's documented cluster app (examples/node/socketio-sticky.js, 2 workers, advanced
serialization) behind three primaries, measured in one run, interleaved:

- lb-peek:     lb --handoff socket.io            (sid routing: lb peeks at each request line)
- lb-nopeek:   lb --handoff socket.io --peek-timeout 0s  (the same handoff, no peeking: what
               peeking costs; lb's default handoff, sticky-session:connection, cannot serve this
               app at all — its worker ignores that message)
- sio-primary: node socketio-sticky.js           (socket.io's own setupMaster: the Node primary
               reads each connection's first chunk and re-sends it over IPC)

Workloads, each a new TCP connection per request (setupWorker answers `Connection: close`):
- polling:   a long-polling session's first two requests: the handshake (GET, no sid: the policy
             picks) and a POST of the connect packet carrying the sid (must reach the session's
             worker) — 2 connections per session;
- websocket: a WebSocket handshake on /socket.io/?transport=websocket, the open packet read, close.

Reported: connections/s and the primary's CPU per connection (lb's master, or the Node primary;
workers not counted), median of --rounds rounds. Run: benches/sticky.sh (builds and installs).
Writes benches/results/sticky/results.json and results.md.
"""
import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LB = ROOT / "target/release/lb"
APP = ROOT / "examples/node/socketio-sticky.js"
OUT = ROOT / "benches/results/sticky"
TICK = os.sysconf("SC_CLK_TCK")
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv, env):
    e = dict(os.environ, NODE_PATH=str(ROOT / "examples/node/node_modules"), **env)
    p = subprocess.Popen([str(a) for a in argv], env=e, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    PROCS.append(p)
    return p


def stop_all():
    for p in PROCS:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in PROCS:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def cpu_ticks(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def recv_all(s):
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def http(port, raw):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        return recv_all(s)


def polling_session(port):
    head = http(port, b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
    body = head.split(b"\r\n\r\n", 1)[1]
    sid = json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])["sid"]
    post = (f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: text/plain\r\nContent-Length: 2\r\n\r\n40").encode()
    r = http(port, post)
    if not r.startswith(b"HTTP/1.1 200") or not r.endswith(b"ok"):
        raise RuntimeError(f"POST with sid answered {r[:80]!r}")
    return 2


def websocket(port):
    key = base64.b64encode(os.urandom(16)).decode()
    req = ("GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(req.encode())
        data = b""
        while b"\r\n\r\n" not in data or b"sid" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        if not data.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade answered {data[:80]!r}")
    return 1


WORKLOADS = {"polling": polling_session, "websocket": websocket}


def load(port, work, seconds, threads):
    done, errors = [0], [0]
    lock = threading.Lock()
    stop = time.time() + seconds

    def run():
        n = e = 0
        while time.time() < stop:
            try:
                n += work(port)
            except (OSError, RuntimeError, ValueError):
                e += 1
        with lock:
            done[0] += n
            errors[0] += e

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return done[0], errors[0]


def wait_ready(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            polling_session(port)
            return
        except (OSError, RuntimeError, ValueError):
            time.sleep(0.2)
    raise RuntimeError(f"nothing serves on {port}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    configs = {}
    try:
        for name, extra in [("lb-peek", []), ("lb-nopeek", ["--peek-timeout", "0s"])]:
            port = free_port()
            p = start([LB, "-l", f"127.0.0.1:{port}", "--metrics", "off", "--control", "off",
                       "-w", "2", "--serialization", "advanced", "--handoff", "socket.io", *extra,
                       "--", "node", APP], {})
            configs[name] = (port, p.pid)
        port = free_port()
        p = start(["node", APP], {"PORT": str(port), "NODE_OPTIONS": ""})
        configs["sio-primary"] = (port, p.pid)
        # socketio-sticky.js forks one worker per CPU: 2 here, as lb's -w 2.
        for name, (port, _) in configs.items():
            wait_ready(port)
        results = {c: {w: [] for w in WORKLOADS} for c in configs}
        for r in range(args.rounds):
            for w, work in WORKLOADS.items():
                for c, (port, pid) in configs.items():
                    before = cpu_ticks(pid)
                    t0 = time.time()
                    n, errors = load(port, work, args.seconds, args.threads)
                    elapsed = time.time() - t0
                    ticks = cpu_ticks(pid) - before
                    results[c][w].append({
                        "conns_per_s": n / elapsed, "errors": errors,
                        "primary_us_per_conn": ticks / TICK * 1e6 / max(n, 1),
                    })
                    print(f"round {r + 1} {w:9} {c:11} {n / elapsed:8.0f} conn/s "
                          f"{ticks / TICK * 1e6 / max(n, 1):7.1f} µs primary CPU/conn "
                          f"{errors} errors", flush=True)
    finally:
        stop_all()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| workload | primary | connections/s | primary CPU per connection | errors |",
             "|---|---|---|---|---|"]
    for w in WORKLOADS:
        for c in configs:
            runs = results[c][w]
            lines.append(
                f"| {w} | {c} | {statistics.median(x['conns_per_s'] for x in runs):.0f} | "
                f"{statistics.median(x['primary_us_per_conn'] for x in runs):.1f} µs | "
                f"{sum(x['errors'] for x in runs)} |")
    md = "\n".join(lines) + "\n"
    (OUT / "results.md").write_text(
        f"# socket.io cluster app: lb vs socket.io's own primary\n\n{args.rounds} rounds of "
        f"{args.seconds:g} s, {args.threads} client threads, medians. `benches/sticky.sh`.\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
