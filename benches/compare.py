#!/usr/bin/env python3
"""lb against the tools users would pick instead, measured in one run, interleaved.

Run through benches/run.sh (which builds lb and installs nginx, HAProxy and the npm packages).
Every configuration fronts 2 workers on loopback and is started once; the workloads then visit the
configurations round-robin for --rounds rounds, so machine noise hits all of them alike, and the
median of the rounds is reported. CPU is read from /proc/PID/stat around each measurement and
reported per connection (churn) or per request (keep-alive): on this shared machine CPU per unit
of work is far steadier than throughput.

Writes benches/results/results.json, results.md and chart.svg.
"""
import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LB = ROOT / "target/release/lb"
LOADGEN = ROOT / "target/release/examples/loadgen"
HELLO = ROOT / "benches/node/hello.js"
CLUSTER = ROOT / "benches/node/cluster.js"
PRIMARY = ROOT / "examples/node/primary.js"
NODE_SERVER = ROOT / "examples/node/server.js"
OUT = ROOT / "benches/results"
TICK = os.sysconf("SC_CLK_TCK")
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv, env=None, **kw):
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("NODE_PATH", str(ROOT / "examples/node/node_modules"))
    p = subprocess.Popen([str(a) for a in argv], env=e, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL),
                         start_new_session=True, **kw)
    PROCS.append(p)
    return p


def stop_all():
    for p in PROCS:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 5
    for p in PROCS:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        c = children(todo.pop())
        out += c
        todo += c
    return out


def cpu(pids):
    total = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except OSError:
            pass
    return total / TICK


def rss(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"nothing answered on port {port}")


class Config:
    """One balancer setup: how to find its balancer and worker processes."""

    def __init__(self, name, kind, port, balancer, workers, group, backends=2):
        self.name, self.kind, self.port = name, kind, port
        self.balancer_pids, self.worker_pids, self.group = balancer, workers, group
        # How many workers the responses should spread over (None: responses do not say which
        # worker answered, e.g. nginx answering itself).
        self.backends = backends
        # Extra loadgen flags for this configuration (e.g. a cookie for --hash-key cookie:…).
        self.load_flags = []


def lb_config(name, policy, cmd=None, lb=None, env=None, extra=()):
    port = free_port()
    argv = [lb or LB, "-l", f"127.0.0.1:{port}", "--metrics", "off", "-w", "2", "-p", policy, *extra]
    if has_flag(lb or LB, "--control"):
        argv[5:5] = ["--control", "off"]  # several lbs run at once: no shared control socket
    if cmd:
        argv += ["--"] + cmd
    p = start(argv, env={k: v.format(port=port) for k, v in (env or {}).items()})
    wait_port(port)
    return Config(name, "node" if cmd else "builtin", port, lambda: [p.pid], lambda: descendants(p.pid),
                  "node" if cmd else "builtin")


def has_flag(binary, flag):
    """Whether this lb binary knows `flag` (an older one in an A/B may not)."""
    out = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    return flag in out.stdout


def builtin_direct(port):
    return start([LB, "builtin-worker", "--listen", f"127.0.0.1:{port}"])


def node_direct(port):
    return start(["node", HELLO], env={"LISTEN_PORT": str(port)})


def configs(selected, base_lb=None):
    made = []
    want = lambda n: selected is None or n in selected

    if want("direct"):
        port = free_port()
        p = builtin_direct(port)
        wait_port(port)
        made.append(Config("direct", "builtin", port, lambda: [], lambda p=p: [p.pid], "builtin", 1))
    if want("reuseport-2"):
        port = free_port()
        ps = [builtin_direct(port), builtin_direct(port)]
        wait_port(port)
        made.append(Config("reuseport-2", "builtin", port, lambda: [], lambda ps=ps: [x.pid for x in ps], "builtin"))
    for policy in ["sticky", "round-robin", "least-connections"]:
        if want(f"lb-{policy}"):
            made.append(lb_config(f"lb-{policy}", policy))
        if base_lb and want(f"lb-{policy}"):
            # The same configuration with another lb binary, interleaved: an A/B in one run.
            made.append(lb_config(f"lb-{policy}@base", policy, lb=base_lb))
    if want("lb-cookie") and has_flag(LB, "--hash-key"):
        # Sticky on a cookie peeked from the request head (each client sends its own).
        c = lb_config("lb-cookie", "sticky", extra=["--hash-key", "cookie:sid"])
        c.load_flags = ["--cookie", "sid"]
        made.append(c)
    if want("lb-bounded") and has_flag(LB, "--balance-factor"):
        # Sticky with bounded loads (HAProxy's hash-balance-factor 125).
        made.append(lb_config("lb-bounded", "sticky", extra=["--balance-factor", "1.25"]))
    if want("lb-kernel") and has_flag(LB, "--steering"):
        # Kernel steering: per-slot SO_REUSEPORT listeners and the sticky BPF program; the
        # built-in workers accept for themselves.
        made.append(lb_config("lb-kernel", "sticky", extra=["--steering", "kernel"]))
    if want("nginx-self") and have("nginx"):
        made.append(nginx_config("nginx-self", None))
    for backend in ["builtin", "node"]:
        if want(f"nginx-iphash-{backend}") and have("nginx"):
            made.append(nginx_config(f"nginx-iphash-{backend}", backend))
        if want(f"haproxy-source-{backend}") and have("haproxy"):
            made.append(haproxy_config(f"haproxy-source-{backend}", backend))
    if want("node-direct"):
        port = free_port()
        p = node_direct(port)
        wait_port(port)
        made.append(Config("node-direct", "node", port, lambda: [], lambda p=p: [p.pid], "node", 1))
    for policy in ["none", "rr"]:
        if want(f"node-cluster-{policy}"):
            port = free_port()
            p = start(["node", CLUSTER, port, 2, policy])
            wait_port(port)
            made.append(Config(f"node-cluster-{policy}", "node", port,
                               (lambda p=p: [p.pid]) if policy == "rr" else (lambda: []),
                               (lambda p=p: descendants(p.pid)) if policy == "rr" else (lambda p=p: [p.pid] + descendants(p.pid)),
                               "node"))
    if want("node-sticky-primary"):
        port = free_port()
        p = start(["node", PRIMARY, port, 2, HELLO])
        wait_port(port)
        made.append(Config("node-sticky-primary", "node", port, lambda p=p: [p.pid], lambda p=p: descendants(p.pid), "node"))
    if want("lb-node"):
        made.append(lb_config("lb-node", "sticky", ["node", str(HELLO)]))
    if want("lb-node-cluster-kernel") and has_flag(LB, "--steering"):
        # The cluster app under kernel steering: each Node worker accepts from its slot's listener.
        made.append(lb_config("lb-node-cluster-kernel", "sticky", ["node", str(HELLO)],
                              env={"LISTEN_PORT": "{port}"}, extra=["--steering", "kernel"]))
    if want("lb-node-cluster"):
        # The same worker as a cluster app that calls listen() on lb's port (cluster newconn).
        made.append(lb_config("lb-node-cluster", "sticky", ["node", str(HELLO)], env={"LISTEN_PORT": "{port}"}))
    return made


def have(tool):
    return subprocess.call(["sh", "-c", f"command -v {tool}"], stdout=subprocess.DEVNULL) == 0


def backends(kind):
    ports = [free_port(), free_port()]
    ps = [builtin_direct(p) if kind == "builtin" else node_direct(p) for p in ports]
    for p in ports:
        wait_port(p)
    return ports, ps


def nginx_config(name, backend):
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="lb-bench-nginx-"))
    if backend is None:
        server = "location / { return 200 'ok\\n'; }"
        upstream, ps = "", []
    else:
        ports, ps = backends(backend)
        upstream = "upstream be { ip_hash; " + " ".join(f"server 127.0.0.1:{p};" for p in ports) + " keepalive 64; }"
        server = ("location / { proxy_pass http://be; proxy_http_version 1.1; "
                  "proxy_set_header Connection \"\"; } "
                  "location /ws { proxy_pass http://be; proxy_http_version 1.1; "
                  "proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade; "
                  "proxy_read_timeout 1h; }")
    conf = f"""
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
daemon off;
worker_rlimit_nofile 100000;
events {{ worker_connections 40000; }}
http {{
  access_log off;
  {upstream}
  server {{ listen 127.0.0.1:{port} backlog=4096; keepalive_requests 1000000; {server} }}
}}
"""
    (tmp / "nginx.conf").write_text(conf)
    p = start(["nginx", "-c", tmp / "nginx.conf", "-p", tmp])
    wait_port(port)
    return Config(name, backend or "nginx", port, lambda p=p: [p.pid] + descendants(p.pid),
                  lambda ps=ps: [x.pid for x in ps] + sum((descendants(x.pid) for x in ps), []),
                  backend or "builtin", 2 if backend else None)


def haproxy_config(name, backend):
    port = free_port()
    # HAProxy refuses to start if maxconn needs more fds than the limit (2 per connection).
    maxconn = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2
    ports, ps = backends(backend)
    tmp = Path(tempfile.mkdtemp(prefix="lb-bench-haproxy-"))
    conf = f"""
global
  maxconn {maxconn}
  nbthread 2
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  balance source
  server a 127.0.0.1:{ports[0]}
  server b 127.0.0.1:{ports[1]}
"""
    (tmp / "haproxy.cfg").write_text(conf)
    p = start(["haproxy", "-db", "-f", tmp / "haproxy.cfg"])
    wait_port(port)
    return Config(name, backend, port, lambda p=p: [p.pid],
                  lambda ps=ps: [x.pid for x in ps] + sum((descendants(x.pid) for x in ps), []), backend)


def loadgen(port, mode, seconds, extra=()):
    out = subprocess.run([LOADGEN, f"127.0.0.1:{port}", mode, "--seconds", str(seconds), *extra],
                         capture_output=True, text=True, timeout=seconds + 60)
    return json.loads(out.stdout)


def measure(c, mode, seconds):
    bal, wk = c.balancer_pids(), c.worker_pids()
    b0, w0 = cpu(bal), cpu(wk)
    r = loadgen(c.port, mode, seconds, c.load_flags)
    b1, w1 = cpu(bal), cpu(wk)
    n = max(r["requests"], 1)
    counts = [v for k, v in r["bodies"].items()]
    # max/mean over the workers there are, not over those that answered: 2.00 with 2 workers
    # means one of them got everything.
    share = max(counts) / (sum(counts) / c.backends) if c.backends and counts else None
    return {
        "rps": r["rps"], "p50_us": r["p50_us"], "p99_us": r["p99_us"], "errors": r["errors"],
        "balancer_cpu_us": (b1 - b0) * 1e6 / n, "server_cpu_us": (b1 - b0 + w1 - w0) * 1e6 / n,
        "balancer_rss": rss(bal), "workers": len(counts), "share": share, "answered_by": len(counts),
    }


def ws_measure(c, conns):
    bal = c.balancer_pids()
    rss0_b, rss0_w = rss(bal), rss(c.worker_pids())
    g = subprocess.Popen([LOADGEN, f"127.0.0.1:{c.port}", "ws", "--conns", str(conns), "--path", "/ws"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = g.stdout.readline()
    r = json.loads(line)
    time.sleep(0.5)  # let workers settle their per-connection state before reading RSS
    out = {"conns": r["connections"], "errors": r["errors"], "seconds": r["seconds"],
           "balancer_rss_before": rss0_b, "balancer_rss_after": rss(bal),
           "workers_rss_before": rss0_w, "workers_rss_after": rss(c.worker_pids())}
    g.stdin.close()
    g.wait(timeout=60)
    return out


# Configurations the WebSocket echo workload visits: every lb mode and the peers a user would
# put in front of the same workers instead.
WSECHO = ["reuseport-2", "lb-sticky", "lb-kernel", "nginx-iphash-builtin", "haproxy-source-builtin",
          "node-cluster-none", "lb-node", "lb-node-cluster", "lb-node-cluster-kernel",
          "node-sticky-primary", "nginx-iphash-node", "haproxy-source-node"]


def wsecho_measure(c, conns, seconds):
    """`conns` WebSockets echoing 64-byte messages back to back for `seconds`: messages/s, round
    trip, CPU per message of the balancer and of balancer + workers, and the load generator's
    own CPU (to show whether it was the bottleneck)."""
    bal, wk = c.balancer_pids(), c.worker_pids()
    b0, w0 = cpu(bal), cpu(wk)
    r = loadgen(c.port, "wsecho", seconds, ["--conns", str(conns), "--path", "/ws"])
    b1, w1 = cpu(bal), cpu(wk)
    n = max(r["messages"], 1)
    return {"msgs_per_s": r["msgs_per_s"], "p50_us": r["p50_us"], "p99_us": r["p99_us"],
            "errors": r["errors"], "connections": r["connections"],
            "balancer_cpu_us": (b1 - b0) * 1e6 / n, "server_cpu_us": (b1 - b0 + w1 - w0) * 1e6 / n,
            "loadgen_cpu_share": r["loadgen_cpu_s"] / r["seconds"]}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--ws-conns", type=int, default=10000)
    ap.add_argument("--wsecho-conns", type=int, default=1000,
                    help="WebSockets in the echo workload (0 skips it)")
    ap.add_argument("--only", help="comma-separated configuration names")
    ap.add_argument("--base-lb", help="another lb binary: adds lb-*@base rows for an A/B in one run")
    ap.add_argument("--out", help="where to write results (default benches/results; benches/results/ab with --base-lb)")
    ap.add_argument("--replot", action="store_true", help="only redraw the table and charts from results.json")
    a = ap.parse_args()
    global OUT
    if a.out:
        OUT = Path(a.out)
    elif a.base_lb:
        OUT = OUT / "ab"  # an A/B run never replaces the full results
    if a.replot:
        saved = json.loads((OUT / "results.json").read_text())
        write_outputs(saved["results"], saved["websockets"], saved["meta"])
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # root may raise the hard limit: 10 000 WebSockets through a proxy need ~40 000 fds
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 100000), max(hard, 100000)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    selected = set(a.only.split(",")) if a.only else None
    # SIGTERM (a timeout, a kill by pid) ends the run through `finally`, which stops every
    # process it started instead of leaving them running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cs = configs(selected, a.base_lb)
        print(f"configurations: {', '.join(c.name for c in cs)}", file=sys.stderr)
        runs = {c.name: {"churn": [], "keepalive": []} for c in cs}
        echo = {c.name: [] for c in cs if c.name in WSECHO and a.wsecho_conns}
        for rnd in range(a.rounds):
            for c in cs:
                if c.name in echo:
                    m = wsecho_measure(c, a.wsecho_conns, a.seconds)
                    echo[c.name].append(m)
                    print(f"round {rnd + 1} wsecho    {c.name:24} {m['msgs_per_s']:9.0f}/s  balancer "
                          f"{m['balancer_cpu_us']:6.2f} µs  server {m['server_cpu_us']:6.2f} µs  p99 {m['p99_us']} µs  "
                          f"loadgen {m['loadgen_cpu_share']:.2f} CPU  errors {m['errors']}"
                          + ("  <-- CLIENT ERRORS" if m["errors"] else ""), file=sys.stderr)
            for mode in ["churn", "keepalive"]:
                for c in cs:
                    m = measure(c, mode, a.seconds)
                    runs[c.name][mode].append(m)
                    share = "—" if m["share"] is None else f"{m['share']:.2f}"
                    print(f"round {rnd + 1} {mode:9} {c.name:24} {m['rps']:9.0f}/s  balancer {m['balancer_cpu_us']:6.1f} µs  "
                          f"server {m['server_cpu_us']:6.1f} µs  p99 {m['p99_us']} µs  share {share}  errors {m['errors']}"
                          + ("  <-- CLIENT ERRORS" if m["errors"] else ""), file=sys.stderr)
        ws = {}
        for c in cs:
            # (HAProxy is left out: one process needs 2 fds per connection, over this machine's
            # 20 000-fd hard limit at 10 000 connections.)
            if c.name in ("lb-sticky", "lb-node", "node-sticky-primary", "nginx-iphash-builtin") and a.ws_conns:
                ws[c.name] = ws_measure(c, a.ws_conns)
                print(f"ws {c.name}: {ws[c.name]}", file=sys.stderr)
    finally:
        stop_all()
    summary = {}
    for c in cs:
        s = {"kind": c.kind}
        for mode in ["churn", "keepalive"]:
            rs = runs[c.name][mode]
            s[mode] = {k: med([r[k] for r in rs]) for k in rs[0] if k != "workers"}
            s[mode]["rounds"] = [r["rps"] for r in rs]
            s[mode + "_all"] = rs
        summary[c.name] = s
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": a.rounds, "seconds": a.seconds,
            "cpus": os.cpu_count(), "kernel": os.uname().release}
    wsecho = {n: {k: med([r[k] for r in rs]) for k in rs[0]} for n, rs in echo.items() if rs}
    meta["wsecho"] = {"conns": a.wsecho_conns, "results": wsecho}
    (OUT / "results.json").write_text(json.dumps({"meta": meta, "results": summary, "websockets": ws}, indent=2))
    write_outputs(summary, ws, meta)
    bad = [n for n, s in summary.items() for m in ("churn_all", "keepalive_all") if any(r["errors"] for r in s[m])]
    bad += [n for n, w in ws.items() if w["errors"]]
    bad += [n for n, rs in echo.items() if any(r["errors"] for r in rs)]
    if bad:
        print(f"client errors in: {', '.join(sorted(set(bad)))}", file=sys.stderr)
        sys.exit(1)


def write_outputs(summary, ws, meta):
    (OUT / "results.md").write_text(markdown(summary, ws, meta))
    (OUT / "chart.svg").write_text(chart(summary))
    (OUT / "cpu.svg").write_text(cpu_chart(summary))
    print((OUT / "results.md").read_text())


def baseline(summary, kind):
    return summary.get("direct" if kind != "node" else "node-direct")


def fmt(x, unit=""):
    if x is None:
        return "—"
    return f"{x:,.0f}{unit}" if abs(x) >= 100 else f"{x:.1f}{unit}"


def markdown(summary, ws, meta):
    lines = [f"Measured {meta['date']} on {meta['cpus']} CPUs (Linux {meta['kernel']}), {meta['rounds']} interleaved "
             f"rounds of {meta['seconds']:g} s per workload, medians. 50 concurrent clients from 64 source addresses "
             "(8 /16s, 64 /24s); every configuration fronts 2 workers; worker share is max/mean over those 2 "
             "(2.00: one worker got everything). CPU columns are per connection (churn) or per request (keep-alive).",
             "",
             "| configuration | churn conn/s | × direct | balancer CPU µs/conn | server CPU µs/conn | churn p50 / p99 µs "
             "| keep-alive req/s | × direct | balancer CPU µs/req | keep-alive p99 µs | worker share churn / keep-alive (max/mean) "
             "| client errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    with_errors = []
    for name, s in summary.items():
        ch, ka = s["churn"], s["keepalive"]
        base = baseline(summary, s["kind"])
        shares = " / ".join("—" if m["share"] is None else f"{m['share']:.2f}" for m in (ch, ka))
        errors = sum(sum(r["errors"] for r in s[mode + "_all"]) for mode in ("churn", "keepalive")) \
            if "churn_all" in s else (ch["errors"] or 0) + (ka["errors"] or 0)
        if errors:
            with_errors.append(name)
        rc = ch["rps"] / base["churn"]["rps"] if base else None
        rk = ka["rps"] / base["keepalive"]["rps"] if base else None
        lines.append(f"| {name} | {fmt(ch['rps'])} | {fmt(rc and rc * 100, '%')} | {fmt(ch['balancer_cpu_us'])} | "
                     f"{fmt(ch['server_cpu_us'])} | {fmt(ch['p50_us'])} / {fmt(ch['p99_us'])} | {fmt(ka['rps'])} | "
                     f"{fmt(rk and rk * 100, '%')} | {fmt(ka['balancer_cpu_us'])} | {fmt(ka['p99_us'])} | "
                     f"{shares} | {'**' + str(errors) + '**' if errors else 0} |")
    if with_errors:
        lines += ["", f"**Rows with client errors (their figures are not comparable): {', '.join(with_errors)}.**"]
    if ws:
        lines += ["", "Idle WebSocket connections:", "",
                  "| configuration | connections | time to open | balancer RSS before → after | workers RSS before → after |",
                  "|---|---|---|---|---|"]
        mib = lambda b: f"{b / 1048576:.1f} MiB"
        for name, w in ws.items():
            lines.append(f"| {name} | {w['conns']:,} (errors {w['errors']}) | {w['seconds']:.2f} s | "
                         f"{mib(w['balancer_rss_before'])} → {mib(w['balancer_rss_after'])} | "
                         f"{mib(w['workers_rss_before'])} → {mib(w['workers_rss_after'])} |")
    echo = meta.get("wsecho", {}).get("results")
    if echo:
        lines += ["", f"WebSocket echo: {meta['wsecho']['conns']:,} WebSockets from 64 addresses, each sending a "
                  "64-byte message and waiting for its echo, back to back; medians of the rounds. CPU per "
                  "message; `× reuseport` compares with the 2 workers serving their own sockets. The load "
                  "generator's CPU (1.00 = one core) shows whether it was the limit.", "",
                  "| configuration | messages/s | × reuseport | p50 / p99 µs | balancer CPU µs/msg "
                  "| balancer + workers CPU µs/msg | load generator CPU | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        base = echo.get("reuseport-2")
        for name, e in echo.items():
            ratio = e["msgs_per_s"] / base["msgs_per_s"] if base else None
            lines.append(f"| {name} | {fmt(e['msgs_per_s'])} | {fmt(ratio and ratio * 100, '%')} | "
                         f"{fmt(e['p50_us'])} / {fmt(e['p99_us'])} | {e['balancer_cpu_us']:.2f} | "
                         f"{e['server_cpu_us']:.2f} | {e['loadgen_cpu_share']:.2f} | {e['errors']:g} |")
    return "\n".join(lines) + "\n"


def svg_open(w, h, title, legend):
    """The start of a chart: canvas, title, and legend entries (x, colour, label)."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{title}</text>']
    for x, colour, label in legend:
        out.append(f'<rect x="{x}" y="30" width="10" height="10" fill="{colour}"/><text x="{x + 14}" y="39">{label}</text>')
    return out


def chart(summary):
    """Horizontal bars: churn and keep-alive throughput as % of the matching direct baseline."""
    rows = []
    for name, s in summary.items():
        base = baseline(summary, s["kind"])
        if base:
            rows.append((name, s["churn"]["rps"] / base["churn"]["rps"] * 100,
                         s["keepalive"]["rps"] / base["keepalive"]["rps"] * 100))
    top = max([max(r[1], r[2]) for r in rows] + [100])
    w, left, bar, gap = 820, 210, 11, 10
    h = 60 + len(rows) * (2 * bar + gap)
    scale = (w - left - 60) / top
    out = svg_open(w, h, "Throughput as % of direct (same worker kind, same run)",
                   [(left, "#3b7dd8", "churn (new connection per request)"), (left + 240, "#e8892e", "keep-alive")])
    x100 = left + 100 * scale
    for i, (name, c, k) in enumerate(rows):
        y = 52 + i * (2 * bar + gap)
        out.append(f'<text x="{left - 6}" y="{y + bar + 4}" text-anchor="end">{name}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{c * scale:.1f}" height="{bar}" fill="#3b7dd8"/>')
        out.append(f'<text x="{left + c * scale + 4:.1f}" y="{y + bar - 2}">{c:.0f}%</text>')
        out.append(f'<rect x="{left}" y="{y + bar}" width="{k * scale:.1f}" height="{bar}" fill="#e8892e"/>')
        out.append(f'<text x="{left + k * scale + 4:.1f}" y="{y + 2 * bar - 2}">{k:.0f}%</text>')
    out.append(f'<line x1="{x100:.1f}" y1="45" x2="{x100:.1f}" y2="{h - 5}" stroke="#555" stroke-dasharray="4 3"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def cpu_chart(summary):
    """Stacked bars: server CPU µs per churn connection, split into balancer and workers."""
    rows = [(n, s["churn"]["balancer_cpu_us"], s["churn"]["server_cpu_us"]) for n, s in summary.items()]
    top = max(r[2] for r in rows)
    w, left, bar, gap = 820, 210, 14, 8
    h = 60 + len(rows) * (bar + gap)
    scale = (w - left - 70) / top
    out = svg_open(w, h, "CPU per connection under churn, µs (lower is better)",
                   [(left, "#c0392b", "balancer"), (left + 100, "#95a5a6", "workers")])
    for i, (name, b, total) in enumerate(rows):
        y = 50 + i * (bar + gap)
        out.append(f'<text x="{left - 6}" y="{y + bar - 3}" text-anchor="end">{name}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{b * scale:.1f}" height="{bar}" fill="#c0392b"/>')
        out.append(f'<rect x="{left + b * scale:.1f}" y="{y}" width="{(total - b) * scale:.1f}" height="{bar}" fill="#95a5a6"/>')
        out.append(f'<text x="{left + total * scale + 4:.1f}" y="{y + bar - 3}">{total:.0f} ({b:.0f})</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
