#!/usr/bin/env python3
"""Chaos soak: lb under mixed load while faults arrive on a seeded random schedule.

    python3 benches/soak.py --seconds 75                 # what CI runs
    python3 benches/soak.py --minutes 60 --worker node   # a long run (builtin | node | cluster)

Load (all from many 127.20.x.y source addresses): HTTP churn (one request per connection),
keep-alive clients, WebSockets exchanging checksummed binary messages, large uploads echoed
back and compared, idle connections (silent, or half a request line), bursts of thousands of
connections. Faults: SIGKILL of a worker, SIGSTOP/SIGCONT, SIGUSR2 rolls, SIGHUP reloads
(the config file changes), fd exhaustion (the running lb's soft RLIMIT_NOFILE lowered, and a
worker's, which then NACKs what lb hands it), garbage written into a worker's channel, and workers that leave helper processes behind
(one in their process group, one daemonised into its own session) every time they start.

Invariants are checked while it runs and at the end, and printed as one table. Exit status 1
(and a line `INVARIANT BROKEN: <name>: <detail>`) if any fails; 2 if the soak itself cannot run.
"""
import argparse
import asyncio
import base64
import bisect
import ctypes
import hashlib
import json
import os
import random
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "benches/soak"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
HELLO = re.compile(rb"worker (\S+) pid (\d+)")
GARBAGE = [b"\x00\x01\xfe\xff not json \xc3\x28\n", b"{\"truncated\": \n",
           b"[1, 2, 3\n", b"}{\n"]


def now():
    return time.monotonic()


def behind(ip):
    """The client address a balancer in front reports for the soak's source address `ip`."""
    return "10." + ip.split(".", 1)[1]


def proxy_v2(client_ip, client_port, port):
    """A PROXY protocol v2 header (TCP over IPv4) for `client_ip:client_port` → 127.0.0.1:port."""
    return (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton(client_ip)
            + socket.inet_aton("127.0.0.1") + struct.pack("!HH", client_port, port))


PROXY_REASONS = ("missing", "malformed", "timeout", "closed", "overflow")


def series(m, name, **labels):
    """A sample of a parsed /metrics scrape, 0 if absent."""
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return m.get(f"{name}{{{lab}}}" if lab else name, 0)


class Soak:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.t0 = now()
        self.stop_load = False
        self.stop_faults = False
        self.faults_until = None
        # What the clients saw.
        self.count = {k: 0 for k in (
            "http_ok", "keepalive_ok", "ws_opened", "ws_messages", "upload_ok", "upload_bytes",
            "idle_opened", "idle_closed_by_worker", "burst_ok", "connects")}
        self.failures = []      # (kind, t_start, t_end, ip, pid or None, error)
        self.corrupt = []       # (kind, detail)
        self.sticky_checks = 0
        self.sticky_misses = []  # (t_start, t_end, ip, expected, got)
        self.faults = {k: 0 for k in (
            "kill", "stop", "roll", "reload", "burst", "fd_exhaustion", "worker_fd_exhaustion",
            "garbage", "bad_proxy_headers")}
        self.fault_log = []     # (t, kind, detail)
        self.killed = {}        # pid -> t (SIGKILLed by the soak)
        self.drained = {}       # pid -> t (asked to drain by a roll)
        self.stopped = []       # (pid, t_from, t_to): stopped or at its fd limit
        self.kill_times = []
        self.scrapes = []       # (t, {slot: (pid, state)}, metrics dict)
        self.scrape_errors = 0
        self.monotonic_breaks = []
        self.accounting_breaks = []
        self.zombie_seen = {}   # pid -> first t seen as zombie
        self.zombie_breaks = []
        self.descendants = {}   # (pid, starttime) -> comm
        self.garbage_lines = 0
        self.bad_headers = 0
        self.limits = {}        # pid -> (soft, hard) before any fault
        self.bursts = []        # (t_from, t_to) of each burst
        self.fault_errors = []
        self.invariants = []    # (name, ok, detail)

    def t(self):
        return now() - self.t0

    # ---- lb process -------------------------------------------------------------------------

    def start_lb(self):
        a = self.a
        self.dir = Path(tempfile.mkdtemp(prefix="lb-soak-"))
        self.config = self.dir / "lb.toml"
        self.write_config(5)
        lb = str(a.lb)
        argv = [lb, "--config", str(self.config), "--listen", "127.0.0.1:0",
                "--metrics", "127.0.0.1:0", "--control", str(self.dir / "lb.sock"),
                "-w", str(a.workers), "--hash-seed", str(a.hash_seed), "-p", a.policy,
                "--shutdown-timeout", "3s", "--client-header-timeout", "10s",
                "--keepalive-timeout", "15s"]
        if a.proxy:
            argv += ["--proxy-protocol", "strip", "--proxy-timeout", "2s"]
        env = dict(os.environ)
        env["NODE_PATH"] = str(ROOT / "examples/node/node_modules")
        env.pop("PORT", None)
        if a.worker == "builtin":
            # The built-in worker, started through a shell that leaves helpers behind.
            script = ("sleep 86400 </dev/null >/dev/null 2>&1 & "
                      "(setsid sleep 86400 </dev/null >/dev/null 2>&1 &); "
                      "exec \"$0\" builtin-worker")
            argv += ["--", "sh", "-c", script, lb]
        elif a.worker == "node":
            argv += ["--", "node", str(SOAK / "sticky.js")]
        else:
            argv += ["--", "node", str(SOAK / "cluster.js")]
        self.log = open(self.dir / "lb.log", "wb")
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log, start_new_session=True)
        deadline = now() + 20
        while now() < deadline:
            text = ANSI.sub("", (self.dir / "lb.log").read_text(errors="replace"))
            m = re.search(r"listening on (\S+):(\d+), metrics on (\S+):(\d+)", text)
            if m:
                self.port = int(m.group(2))
                self.metrics = (m.group(3), int(m.group(4)))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        sys.exit(f"soak: lb did not start; its log:\n{(self.dir / 'lb.log').read_text()}")

    def write_config(self, queue_timeout):
        # Reloads flip queue_timeout between 5 s and 6 s: a real change each time.
        self.config.write_text(f"queue_timeout = \"{queue_timeout}s\"\n")

    def lb_fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def lb_status(self):
        st = {}
        for line in open(f"/proc/{self.proc.pid}/status"):
            k, _, v = line.partition(":")
            st[k] = v.strip()
        return {"fds": self.lb_fds(), "rss": int(st["VmRSS"].split()[0]) * 1024,
                "threads": int(st["Threads"])}

    # ---- HTTP/WebSocket client pieces --------------------------------------------------------

    async def connect(self, ip, timeout=20, header=True):
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port, local_addr=(ip, 0), limit=1 << 20),
            timeout)
        self.count["connects"] += 1
        if self.a.proxy and header:
            # As a balancer in front would: a PROXY v2 header naming the real client.
            w.write(proxy_v2(behind(ip), self.rng.randint(1024, 65535), self.port))
        return r, w

    @staticmethod
    async def read_response(r, timeout=20):
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if b":" in line:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
        if status == 101:
            return status, headers, b""
        if b"content-length" in headers:
            body = await asyncio.wait_for(r.readexactly(int(headers[b"content-length"])), timeout)
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int((await asyncio.wait_for(r.readuntil(b"\r\n"), timeout)).strip(), 16)
                chunk = await asyncio.wait_for(r.readexactly(size + 2), timeout)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = await asyncio.wait_for(r.read(), timeout)
        return status, headers, body

    def hello(self, body):
        m = HELLO.search(body)
        if not m:
            raise ValueError(f"unexpected body {body[:80]!r}")
        return int(m.group(1)), int(m.group(2))

    def check_sticky(self, t_start, t_end, ip, slot):
        if self.a.policy != "sticky":
            return
        self.sticky_checks += 1
        want = self.route[ip]
        if slot != want:
            self.sticky_misses.append((t_start, t_end, ip, want, slot))

    def fail(self, kind, t_start, ip, pid, err):
        self.failures.append((kind, t_start, self.t(), ip, pid, f"{type(err).__name__}: {err}"))

    @staticmethod
    async def close(w):
        try:
            w.close()
            await asyncio.wait_for(w.wait_closed(), 5)
        except Exception:
            pass

    # ---- load --------------------------------------------------------------------------------

    def ip(self):
        return self.rng.choice(self.ips)

    async def churn(self):
        while not self.stop_load:
            ip, t_start, pid = self.ip(), self.t(), None
            try:
                r, w = await self.connect(ip)
                w.write(b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                status, _, body = await self.read_response(r)
                slot, pid = self.hello(body)
                assert status == 200, status
                self.check_sticky(t_start, self.t(), ip, slot)
                self.count["http_ok"] += 1
                await self.close(w)
            except Exception as e:
                self.fail("churn", t_start, ip, pid, e)
            await asyncio.sleep(self.rng.uniform(0, 0.02))

    async def keepalive(self):
        while not self.stop_load:
            ip, t_start, pid, served = self.ip(), self.t(), None, 0
            until = now() + self.rng.uniform(2, 10)
            try:
                r, w = await self.connect(ip)
                while now() < until and not self.stop_load:
                    t_req = self.t()
                    w.write(b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n")
                    try:
                        status, _, body = await self.read_response(r)
                    except asyncio.IncompleteReadError as e:
                        if served and not e.partial:
                            # The server closed an idle kept-alive connection as the next request
                            # went out: the race every HTTP client retries (RFC 9112 §9.3.1).
                            break
                        raise
                    slot, p = self.hello(body)
                    if pid is None:
                        pid = p
                        # lb routed the connection when it accepted it: any time since t_start.
                        self.check_sticky(t_start, self.t(), ip, slot)
                    elif p != pid:
                        raise AssertionError(f"keep-alive connection moved from pid {pid} to {p}")
                    served += 1
                    self.count["keepalive_ok"] += 1
                    await asyncio.sleep(self.rng.uniform(0.05, 0.3))
                await self.close(w)
            except Exception as e:
                self.fail("keepalive", t_start, ip, pid, e)

    async def ws_send(self, w, payload):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x82])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        m = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
        w.write(head + mask + masked)
        await w.drain()

    async def ws_recv(self, r, w, timeout):
        parts = []
        while True:
            b0, b1 = await asyncio.wait_for(r.readexactly(2), timeout)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await r.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await r.readexactly(8))[0]
            mask = await r.readexactly(4) if b1 & 0x80 else None
            data = await asyncio.wait_for(r.readexactly(n), timeout)
            if mask:
                m = (mask * (n // 4 + 1))[:n]
                data = (int.from_bytes(data, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
            op = b0 & 0x0F
            if op == 0x8:
                raise ConnectionError("WebSocket closed by the server")
            if op == 0x9:
                continue  # ping: the servers here never send one
            if op == 0xA:
                continue
            parts.append(data)
            if b0 & 0x80:
                return b"".join(parts)

    async def websocket(self, i):
        await asyncio.sleep(self.rng.uniform(0, self.a.ramp))
        while not self.stop_load:
            ip, t_start, pid, outstanding = self.ips[i % len(self.ips)], self.t(), None, False
            try:
                r, w = await self.connect(ip)
                w.write(b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n")
                _, _, body = await self.read_response(r)
                slot, pid = self.hello(body)
                self.check_sticky(t_start, self.t(), ip, slot)
                key = base64.b64encode(os.urandom(16)).decode()
                w.write(("GET /ws HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                         f"Sec-WebSocket-Key: {key}\r\n\r\n").encode())
                status, _, _ = await self.read_response(r)
                assert status == 101, f"upgrade answered {status}"
                self.count["ws_opened"] += 1
                seq = 0
                while not self.stop_load:
                    await asyncio.sleep(self.rng.uniform(0.5, 2 * self.a.ws_interval - 0.5))
                    if self.stop_load:
                        break
                    size = 65536 if self.rng.random() < 0.01 else self.rng.randint(1, 2048)
                    body = self.rng.randbytes(size)
                    msg = struct.pack("!QI", seq, zlib.crc32(body)) + body
                    outstanding = True
                    await self.ws_send(w, msg)
                    echo = await self.ws_recv(r, w, 25)
                    outstanding = False
                    if echo != msg:
                        s, c = struct.unpack("!QI", echo[:12]) if len(echo) >= 12 else (-1, -1)
                        self.corrupt.append(("websocket", f"pid {pid} seq {seq}: got seq {s} "
                                             f"crc-ok {zlib.crc32(echo[12:]) == c} "
                                             f"len {len(echo)} want {len(msg)}"))
                        break
                    seq += 1
                    self.count["ws_messages"] += 1
                # Clean close.
                w.write(bytes([0x88, 0x82]) + b"\x00\x00\x00\x00" + struct.pack("!H", 1000))
                await self.close(w)
            except Exception as e:
                kind = "ws_message" if outstanding else "websocket"
                self.fail(kind, t_start, ip, pid, e)
                await asyncio.sleep(self.rng.uniform(0.1, 1))

    async def upload(self):
        while not self.stop_load:
            ip, t_start, pid = self.ip(), self.t(), None
            size = self.rng.randint(1 << 20, 8 << 20)
            body = self.rng.randbytes(size)
            try:
                r, w = await self.connect(ip)
                w.write(b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n")
                _, _, hello = await self.read_response(r)
                slot, pid = self.hello(hello)
                w.write(f"POST /echo HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
                        f"Content-Length: {size}\r\n\r\n".encode())
                # Send and receive at once: the echo streams back while the body goes out.
                async def send():
                    try:
                        for off in range(0, size, 1 << 16):
                            w.write(body[off:off + (1 << 16)])
                            await w.drain()
                    except (ConnectionError, OSError):
                        pass  # the read side reports it
                sender = asyncio.create_task(send())
                try:
                    status, _, echo = await self.read_response(r, timeout=60)
                finally:
                    await sender
                assert status == 200, status
                if hashlib.sha256(echo).digest() != hashlib.sha256(body).digest():
                    self.corrupt.append(("upload", f"pid {pid}: {len(echo)} bytes back of {size}"))
                else:
                    self.count["upload_ok"] += 1
                    self.count["upload_bytes"] += size
                await self.close(w)
            except Exception as e:
                self.fail("upload", t_start, ip, pid, e)
            await asyncio.sleep(self.rng.uniform(0, 0.5))

    async def idle(self, i):
        await asyncio.sleep(self.rng.uniform(0, self.a.ramp))
        while not self.stop_load:
            try:
                r, w = await self.connect(self.ips[i % len(self.ips)])
                if i % 2:
                    w.write(b"GET / HT")  # half a request line, then nothing
                self.count["idle_opened"] += 1
                while not self.stop_load:
                    try:
                        data = await asyncio.wait_for(r.read(4096), 1)
                    except asyncio.TimeoutError:
                        continue
                    if not data:
                        self.count["idle_closed_by_worker"] += 1
                        break
                await self.close(w)
            except Exception:
                await asyncio.sleep(0.5)

    async def burst(self, n):
        t_burst = self.t()
        try:
            await self._burst(n)
        finally:
            self.bursts.append((t_burst, self.t()))

    async def _burst(self, n):
        async def one():
            ip, t_start, pid = self.ip(), self.t(), None
            try:
                r, w = await self.connect(ip, timeout=30)
                w.write(b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                status, _, body = await self.read_response(r, timeout=30)
                slot, pid = self.hello(body)
                self.check_sticky(t_start, self.t(), ip, slot)
                self.count["burst_ok"] += 1
                await self.close(w)
            except Exception as e:
                self.fail("burst", t_start, ip, pid, e)
        await asyncio.gather(*(one() for _ in range(n)))

    # ---- observation -------------------------------------------------------------------------

    async def http_get(self, path):
        r, w = await asyncio.wait_for(asyncio.open_connection(*self.metrics), 5)
        w.write(f"GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode())
        status, _, body = await self.read_response(r, 5)
        await self.close(w)
        if status != 200:
            raise ValueError(f"{path} answered {status}")
        return body

    @staticmethod
    def parse_metrics(text):
        out = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                out[k] = float(v)
        return out

    async def scrape(self):
        t = self.t()
        m = self.parse_metrics(await self.http_get("/metrics"))
        doc = json.loads(await self.http_get("/workers"))
        states = {w["slot"]: (w["pid"], w["state"]) for w in doc["workers"]}
        if self.scrapes:
            prev = self.scrapes[-1][2]
            for k, v in m.items():
                counter = k.split("{")[0].endswith(("_total", "_count", "_sum", "_bucket"))
                if counter and k in prev and v < prev[k]:
                    self.monotonic_breaks.append(f"{k} went {prev[k]:g} → {v:g} at {t:.1f}s")
        # What a scrape shows is lb's state at some moment between t and now.
        self.scrapes.append((t, states, m, self.t()))
        # While running, in flight = accepted − delivered − closed: never negative.
        gap = self.accounting_gap(m)
        if gap < 0:
            self.accounting_breaks.append(f"at {t:.1f}s: {-gap:g} more delivered+closed than accepted")
        return m

    @staticmethod
    def accounting_gap(m):
        delivered = sum(v for k, v in m.items() if k.startswith("lb_worker_connections_total{"))
        return m["lb_accepted_connections_total"] - delivered - Soak.counted_closes(m)

    @staticmethod
    def counted_closes(m):
        """Connections lb closed itself, each for a counted reason."""
        return (sum(series(m, "lb_handoff_failures_total", reason=r)
                    for r in ("no_worker", "queue_full", "refused"))
                + sum(series(m, "lb_proxy_header_errors_total", reason=r) for r in PROXY_REASONS))

    def scan_processes(self):
        """lb's descendants (remembered by pid and start time) and zombies among its children."""
        parent, info = {}, {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            rest = stat[stat.rfind(")") + 2:].split()
            pid = int(d)
            parent[pid] = int(rest[1])
            info[pid] = (rest[0], rest[19], stat[stat.find("(") + 1:stat.rfind(")")])
        lb = self.proc.pid
        t = self.t()
        for pid in parent:
            p, depth = pid, 0
            while p in parent and p != lb and p > 1 and depth < 64:
                p, depth = parent[p], depth + 1
            if p == lb and pid != lb:
                state, start, comm = info[pid]
                self.descendants[(pid, start)] = comm
                if state == "Z" and parent[pid] == lb:
                    first = self.zombie_seen.setdefault(pid, t)
                    if t - first > 5 and pid not in self.zombie_breaks:
                        self.zombie_breaks.append(pid)
                else:
                    self.zombie_seen.pop(pid, None)

    async def observe(self):
        while not self.stop_load:
            try:
                await self.scrape()
            except Exception:
                self.scrape_errors += 1
            self.scan_processes()
            await asyncio.sleep(1)

    def workers(self, ready_only=True):
        if not self.scrapes:
            return []
        return [(s, pid) for s, (pid, st) in self.scrapes[-1][1].items()
                if pid and (st == "ready" or not ready_only)]

    # ---- faults ------------------------------------------------------------------------------

    def note(self, kind, detail=""):
        self.faults[kind] += 1
        self.fault_log.append((self.t(), kind, detail))

    async def fault_kill(self):
        ws = self.workers()
        if not ws:
            return
        slot, pid = self.rng.choice(ws)
        self.killed[pid] = self.t()
        self.kill_times.append(self.t())
        os.kill(pid, signal.SIGKILL)
        self.note("kill", f"slot {slot} pid {pid}")

    async def fault_stop(self):
        ws = self.workers()
        if not ws:
            return
        slot, pid = self.rng.choice(ws)
        hold = self.rng.uniform(0.5, 3)
        t_from = self.t()
        os.kill(pid, signal.SIGSTOP)
        self.note("stop", f"slot {slot} pid {pid} for {hold:.1f}s")
        await asyncio.sleep(hold)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        self.stopped.append((pid, t_from, self.t()))

    async def fault_roll(self):
        for _, pid in self.workers(ready_only=False):
            self.drained.setdefault(pid, self.t())
        os.kill(self.proc.pid, signal.SIGUSR2)
        self.note("roll")

    async def fault_reload(self):
        self.write_config(6 if self.faults["reload"] % 2 == 0 else 5)
        os.kill(self.proc.pid, signal.SIGHUP)
        self.note("reload")

    async def fault_burst(self):
        n = self.rng.randint(self.a.burst // 2, self.a.burst)
        self.note("burst", f"{n} connections")
        await self.burst(n)

    def original_limit(self, pid):
        """A process's fd limit before any fault touched it (faults overlap: restoring what the
        previous one set would leave the limit low)."""
        if pid not in self.limits:
            self.limits[pid] = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        return self.limits[pid]

    async def fault_fds(self):
        soft, hard = self.original_limit(self.proc.pid)
        low = self.lb_fds() + self.rng.randint(0, 3)
        hold = self.rng.uniform(1, 3)
        resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (min(low, soft), hard))
        self.note("fd_exhaustion", f"soft limit {low} for {hold:.1f}s")
        await asyncio.sleep(hold)
        resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))

    async def fault_worker_fds(self):
        """A worker at its open-file limit cannot take a passed fd: it NACKs (Node) or closes
        the connection it cannot receive — lb must route the connection elsewhere."""
        ws = self.workers()
        if not ws:
            return
        slot, pid = self.rng.choice(ws)
        try:
            soft, hard = self.original_limit(pid)
            # The limit applies to fd numbers: set it to the lowest free one.
            used = {int(f) for f in os.listdir(f"/proc/{pid}/fd")}
            low = min(set(range(len(used) + 1)) - used)
            hold = self.rng.uniform(0.5, 2)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (min(low, soft), hard))
        except (ProcessLookupError, FileNotFoundError):
            return
        t_from = self.t()
        self.note("worker_fd_exhaustion", f"slot {slot} pid {pid}: soft limit {low} for {hold:.1f}s")
        await asyncio.sleep(hold)
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        except ProcessLookupError:
            pass
        # Its clients may go elsewhere meanwhile (lb routes a NACKed connection on).
        self.stopped.append((pid, t_from, self.t()))

    async def fault_bad_headers(self):
        """Connections whose PROXY header is missing, garbage, cut short or never sent: lb must
        close each and count it, and serve everyone else meanwhile."""
        n = self.rng.randint(20, 200)
        self.note("bad_proxy_headers", f"{n} connections")
        conns = []
        for i in range(n):
            try:
                r, w = await self.connect(self.ip(), header=False)
            except Exception:
                continue
            kind = i % 4
            if kind == 0:
                w.write(b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n")   # no header
            elif kind == 1:
                w.write(b"\r\n\r\n\x00\r\nQUIT\n\x99garbage")  # bad version
            elif kind == 2:
                w.write(b"PROXY TCP4 10.1")                          # cut short, then closed
                w.write_eof()
            # kind 3: nothing at all (lb's --proxy-timeout closes it)
            conns.append((r, w))
        self.bad_headers += len(conns)
        for r, w in conns:
            try:
                data = await asyncio.wait_for(r.read(), 10)
                if data:
                    self.corrupt.append(("proxy", f"a connection with a bad header got {data[:40]!r}"))
            except (asyncio.TimeoutError, ConnectionError):
                pass
            await self.close(w)

    async def fault_garbage(self):
        ws = self.workers()
        if not ws:
            return
        slot, pid = self.rng.choice(ws)
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            fd = libc.syscall(438, pidfd, 3, 0)  # pidfd_getfd: the worker's end of its channel
            if fd < 0:
                return  # it has just exited (a zombie has no fds)
            try:
                lines = self.rng.sample(GARBAGE, 2)
                os.write(fd, b"".join(lines))
                self.garbage_lines += len(lines)
            finally:
                os.close(fd)
        finally:
            os.close(pidfd)
        self.note("garbage", f"slot {slot} pid {pid}")

    async def chaos(self):
        fns = {"kill": self.fault_kill, "stop": self.fault_stop, "roll": self.fault_roll,
               "reload": self.fault_reload, "burst": self.fault_burst,
               "fd_exhaustion": self.fault_fds, "worker_fd_exhaustion": self.fault_worker_fds,
               "garbage": self.fault_garbage}
        weights = [3, 2, 1, 1, 1, 1, 2, 2]
        if self.a.proxy:
            fns["bad_proxy_headers"] = self.fault_bad_headers
            weights.append(2)
        kinds = list(fns)
        running = set()

        async def guarded(kind):
            try:
                await fns[kind]()
            except Exception as e:
                self.fault_errors.append(f"{kind}: {type(e).__name__}: {e}")

        await asyncio.sleep(self.a.ramp + 2)
        while now() < self.faults_until:
            kind = self.rng.choices(kinds, weights)[0]
            task = asyncio.create_task(guarded(kind))
            running.add(task)
            task.add_done_callback(running.discard)
            await asyncio.sleep(min(self.rng.expovariate(1 / self.a.fault_every),
                                    max(0, self.faults_until - now())))
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    # ---- judging -----------------------------------------------------------------------------

    def around(self, t_from, t_to):
        """Indices of the scrapes from the last one surely taken before t_from (it ended before)
        to the first one surely taken after t_to (it started after), and all in between."""
        ends = [s[3] for s in self.scrapes]
        starts = [s[0] for s in self.scrapes]
        lo = max(bisect.bisect_right(ends, t_from) - 1, 0)
        hi = min(bisect.bisect_left(starts, t_to), len(self.scrapes) - 1)
        return range(lo, hi + 1)

    def scrapes_around(self, t_from, t_to, slot):
        """The scrapes around [t_from, t_to]: (time, slot's pid and state, its
        lb_sticky_moved_total), to explain a stickiness miss."""
        return [(f"{self.scrapes[k][0]:.2f}-{self.scrapes[k][3]:.2f}s", self.scrapes[k][1].get(slot),
                 series(self.scrapes[k][2], "lb_sticky_moved_total", worker=slot))
                for k in self.around(t_from, t_to)]

    def slot_disturbed(self, slot, t_from, t_to):
        """Whether sticky may have sent a client of `slot` elsewhere in [t_from, t_to]: the slot
        was not ready in a scrape around that time, or its worker was stopped/killed/rolled."""
        ks = self.around(t_from, t_to)
        if not ks:
            return True
        for k in ks:
            if self.scrapes[k][1].get(slot, (None, None))[1] != "ready":
                return True
        pids = {self.scrapes[k][1][slot][0] for k in ks if slot in self.scrapes[k][1]}
        margin = self.a.stall_timeout + 1
        # lb itself reports when it passes over an up worker (at --max-pending, e.g. in a
        # burst or a flood after an accept pause, or it refused): its clients' next choice.
        moved = lambda k: series(self.scrapes[k][2], "lb_sticky_moved_total", worker=slot)
        if moved(ks[-1]) > moved(ks[0]):
            return True
        for pid, a, b in self.stopped:
            if pid in pids and a - margin <= t_to and b + 1 >= t_from:
                return True
        for pid, t in list(self.killed.items()) + list(self.drained.items()):
            if pid in pids and t is not None and t - margin <= t_to:
                return True
        return False

    def read_lb_log(self):
        """The workers lb says it drained (rolls, reloads) or killed: their clients may lose their
        connections (a drain ends at --shutdown-timeout), nobody else's may."""
        text = ANSI.sub("", (self.dir / "lb.log").read_text(errors="replace"))
        for m in re.finditer(r"(draining old worker|killing it) slot=\d+ pid=(\d+)", text):
            self.drained.setdefault(int(m.group(2)), None)

    def excused(self, f):
        kind, t_start, t_end, ip, pid, err = f
        if pid is not None:
            # The connection was on a known worker: lost only if that worker was killed (by us,
            # or by lb after a roll's drain timeout).
            return pid in self.killed or pid in self.drained
        # No answer yet, so the worker is unknown: a kill during the attempt may explain it.
        i = bisect.bisect_left(self.kill_times, t_start - 1)
        return i < len(self.kill_times) and self.kill_times[i] <= t_end + 1

    def judge(self, end, final_metrics, base, after, leftovers, exit_code):
        inv = self.invariants

        def check(name, ok, detail):
            inv.append((name, ok, detail))

        # Accounting.
        accepted = final_metrics["lb_accepted_connections_total"]
        gap = self.accounting_gap(final_metrics)
        closed = self.counted_closes(final_metrics)
        check("every accepted connection accounted for", gap == 0 and not self.accounting_breaks,
              f"accepted {accepted:g} = delivered {accepted - closed - gap:g} + closed "
              f"{closed:g} (+ {gap:g} unaccounted)" + "; ".join(self.accounting_breaks[:3]))
        check("lb accepted every connection the clients made",
              accepted == self.count["connects"],
              f"clients connected {self.count['connects']}, lb accepted {accepted:g}")
        # Losses.
        unexcused = [f for f in self.failures if not self.excused(f)]
        lost_ws = [f for f in self.failures if f[0] == "ws_message"]
        check("connections lost only with a killed worker (or closed for a counted reason)",
              len(unexcused) <= closed,
              f"{len(self.failures)} failed, {len(self.failures) - len(unexcused)} on killed/"
              f"drained workers, {len(unexcused)} unexplained vs {closed:g} counted closes"
              + "".join(f"\n      {u[0]} {u[1]:.1f}-{u[2]:.1f}s {u[3]} pid {u[4]}: {u[5]}"
                        for u in unexcused[:8]))
        check("WebSocket messages lost only with a killed worker",
              all(self.excused(f) for f in lost_ws),
              f"{len(lost_ws)} lost, all on killed/drained workers" if all(
                  self.excused(f) for f in lost_ws) else
              f"{sum(not self.excused(f) for f in lost_ws)} lost on live workers")
        check("no corrupted WebSocket message or upload", not self.corrupt,
              f"{self.count['ws_messages']} messages, {self.count['upload_ok']} uploads "
              f"({self.count['upload_bytes'] / 2**20:.0f} MiB) intact"
              + "".join(f"\n      {k}: {d}" for k, d in self.corrupt[:5]))
        check("/metrics counters monotonic", not self.monotonic_breaks,
              f"{len(self.scrapes)} scrapes" + "".join(f"\n      {b}" for b in self.monotonic_breaks[:5]))
        misses = [m for m in self.sticky_misses if not self.slot_disturbed(m[3], m[0], m[1])]
        check("sticky: every client on its `lb route` slot while that slot was up",
              not misses,
              f"{self.sticky_checks} checked, {len(self.sticky_misses)} elsewhere while their "
              f"slot was down/stopped/rolling or lb counted them moved (lb_sticky_moved_total), "
              f"{len(misses)} otherwise"
              + "".join(f"\n      {m[2]} wanted {m[3]} got {m[4]} at {m[0]:.2f}-{m[1]:.2f}s; "
                        f"scrapes around: {self.scrapes_around(m[0], m[1], m[3])}"
                        for m in misses[:5]))
        malformed = series(final_metrics, "lb_channel_messages_dropped_total", reason="malformed")
        check("garbage on a channel counted as malformed", malformed >= self.garbage_lines,
              f"{self.garbage_lines} garbage lines written, {malformed:g} counted")
        if self.a.proxy:
            refused = sum(series(final_metrics, "lb_proxy_header_errors_total", reason=r)
                          for r in PROXY_REASONS)
            check("every bad PROXY header closed and counted", refused == self.bad_headers,
                  f"{self.bad_headers} sent, {refused:g} counted")
        check("service live after the faults (quiet tail ≥ 10 churn requests/s)",
              self.tail_rate >= 10, f"{self.tail_rate:.0f} requests/s")
        check("fleet recovered: every slot ready after the faults", end["all_ready"],
              end["states"])
        fd_ok = after["fds"] <= base["fds"] + 2
        rss_ok = after["rss"] <= base["rss"] + self.a.rss_slack * 2**20
        thr_ok = after["threads"] <= base["threads"] + 1
        check("master fds, RSS and threads back to their start values",
              fd_ok and rss_ok and thr_ok,
              f"fds {base['fds']} → {after['fds']} (≤ +2), RSS {base['rss'] / 2**20:.1f} → "
              f"{after['rss'] / 2**20:.1f} MiB (≤ +{self.a.rss_slack}), threads "
              f"{base['threads']} → {after['threads']} (≤ +1)")
        check("no zombie", not self.zombie_breaks and not end["zombies"],
              f"zombies that stayed > 5 s: {self.zombie_breaks}, at the end: {end['zombies']}")
        check("no process left after shutdown; lb exited 0", not leftovers and exit_code == 0,
              f"{len(self.descendants)} descendants seen (incl. "
              f"{sum(1 for c in self.descendants.values() if c == 'sleep')} helpers the workers "
              f"left), {len(leftovers)} alive after lb exited with {exit_code}"
              + "".join(f"\n      pid {p} {c}" for p, c in leftovers[:5]))

    # ---- main --------------------------------------------------------------------------------

    async def run(self):
        a = self.a
        self.ips = [f"127.20.{i // 250}.{i % 250 + 1}" for i in range(a.ips)]
        self.route = {}
        for ip in self.ips:
            out = subprocess.run([str(a.lb), "route", behind(ip) if a.proxy else ip,
                                  "-w", str(a.workers),
                                  "--hash-seed", str(a.hash_seed)],
                                 capture_output=True, text=True, check=True)
            self.route[ip] = int(out.stdout.strip())
        self.start_lb()
        # Every slot ready before the baseline.
        deadline = now() + 30
        while now() < deadline:
            try:
                await self.scrape()
                if len(self.workers()) == a.workers:
                    break
            except Exception:
                pass
            await asyncio.sleep(0.2)
        else:
            sys.exit("soak: the workers did not all become ready in 30 s")
        self.scrapes.clear()
        base = self.lb_status()
        self.scan_processes()
        self.t0 = now()
        load_until = self.t0 + a.seconds
        self.faults_until = load_until - a.quiet
        tasks = [asyncio.create_task(self.observe())]
        tasks += [asyncio.create_task(self.churn()) for _ in range(a.churn)]
        tasks += [asyncio.create_task(self.keepalive()) for _ in range(a.keepalive)]
        tasks += [asyncio.create_task(self.websocket(i)) for i in range(a.websockets)]
        tasks += [asyncio.create_task(self.upload()) for _ in range(a.uploads)]
        tasks += [asyncio.create_task(self.idle(i)) for i in range(a.idle)]
        chaos = asyncio.create_task(self.chaos())
        last = [0.0]

        def progress():
            if now() - last[0] >= a.progress:
                last[0] = now()
                print(f"  {self.t():5.0f}s  http {self.count['http_ok']}  keep-alive "
                      f"{self.count['keepalive_ok']}  ws msgs {self.count['ws_messages']}  "
                      f"uploads {self.count['upload_ok']}  failures {len(self.failures)}  faults "
                      f"{sum(self.faults.values())}", flush=True)

        while now() < self.faults_until:
            await asyncio.sleep(1)
            progress()
        await chaos
        # Liveness: after the last fault, the quiet tail is served (a loose floor, not a speed
        # target: a healthy run does hundreds of requests a second here).
        tail_from, tail_t = self.count["http_ok"], now()
        while now() < load_until:
            await asyncio.sleep(0.5)
            progress()
        self.tail_rate = (self.count["http_ok"] - tail_from) / max(now() - tail_t, 0.001)
        self.stop_load = True
        await asyncio.wait(tasks, timeout=60)
        # Quiesce: every slot ready again, nothing queued or in flight.
        end = {"all_ready": False, "states": "", "zombies": []}
        deadline = now() + 45
        final = None
        while now() < deadline:
            try:
                final = await self.scrape()
                end["all_ready"] = len(self.workers()) == a.workers
                if end["all_ready"] and self.accounting_gap(final) == 0:
                    break
            except Exception:
                pass
            await asyncio.sleep(0.25)
        end["states"] = ", ".join(f"{s}: {st}" for s, (_, st) in sorted(self.scrapes[-1][1].items()))
        # Master resources back to their start values (allowing time for closes to land).
        deadline = now() + 15
        while True:
            after = self.lb_status()
            if after["fds"] <= base["fds"] + 2 or now() > deadline:
                break
            await asyncio.sleep(0.2)
        deadline = now() + 5
        while now() < deadline:
            self.zombie_seen.clear()
            self.scan_processes()
            if not self.zombie_seen:
                break
            await asyncio.sleep(0.2)
        end["zombies"] = sorted(self.zombie_seen)
        # Graceful shutdown; then nothing of it may be left.
        self.scan_processes()
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = "timeout"
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        leftovers = []
        for (pid, start), comm in self.descendants.items():
            try:
                stat = open(f"/proc/{pid}/stat").read()
                if stat[stat.rfind(")") + 2:].split()[19] == start:
                    leftovers.append((pid, comm))
                    os.kill(pid, signal.SIGKILL)
            except (OSError, IndexError):
                pass
        self.read_lb_log()
        with open(self.dir / "faults.txt", "w") as f:
            for t, kind, detail in self.fault_log:
                f.write(f"{t:8.2f}s {kind} {detail}\n")
        self.judge(end, final or self.scrapes[-1][2], base, after, leftovers, code)
        return final or self.scrapes[-1][2]

    def report(self, final):
        a = self.a
        lines = []
        p = lines.append
        p(f"lb soak: {a.worker} workers ×{a.workers}{' behind PROXY headers' if a.proxy else ''}, "
          f"{a.seconds:.0f} s (faults for "
          f"{a.seconds - a.quiet:.0f} s, then {a.quiet:.0f} s quiet), seed {a.seed}")
        p(f"load: {self.count['connects']} connections — {self.count['http_ok']} churn requests, "
          f"{self.count['keepalive_ok']} keep-alive requests, {self.count['burst_ok']} in bursts, "
          f"{self.count['ws_opened']} WebSockets ({a.websockets} at once) with "
          f"{self.count['ws_messages']} messages, {self.count['upload_ok']} uploads "
          f"({self.count['upload_bytes'] / 2**20:.0f} MiB), {self.count['idle_opened']} idle "
          f"connections ({self.count['idle_closed_by_worker']} closed by the worker's timeout)")
        p("faults: " + ", ".join(f"{k} {v}" for k, v in self.faults.items())
          + (f" (could not inject: {'; '.join(self.fault_errors[:3])})" if self.fault_errors else ""))
        by = {}
        for f in self.failures:
            cause = ("killed" if f[4] in self.killed else "rolled" if f[4] in self.drained
                     else "kill during attempt" if self.excused(f) else "unexplained")
            by[(f[0], cause)] = by.get((f[0], cause), 0) + 1
        p("client-side failures: " + (", ".join(f"{k} on {c} worker: {n}" if c in ("killed", "rolled")
                                                else f"{k} ({c}): {n}"
                                                for (k, c), n in sorted(by.items())) or "none"))
        failures = ", ".join(f"{r} {series(final, 'lb_handoff_failures_total', reason=r):g}"
                             for r in ("nack", "send_error", "worker_exit", "no_worker",
                                       "queue_full"))
        restarts = sum(v for k, v in final.items() if k.startswith("lb_worker_restarts_total"))
        p(f"lb counted: accepted {series(final, 'lb_accepted_connections_total'):g}, handoff "
          f"failures {failures}, refused {series(final, 'lb_handoff_failures_total', reason='refused'):g}, accept errors (out of fds) "
          f"{series(final, 'lb_accept_errors_total', kind='exhausted'):g}, restarts {restarts:g}, "
          f"reloads ok {series(final, 'lb_reloads_total', result='ok'):g}")
        p("")
        p("| invariant | result | detail |")
        p("|---|---|---|")
        for name, ok, detail in self.invariants:
            first, *more = detail.split("\n")
            p(f"| {name} | {'ok' if ok else 'BROKEN'} | {first} |")
            for m in more:
                p(f"|   |   | {m.strip()} |")
        text = "\n".join(lines)
        print(text, flush=True)
        if a.summary:
            Path(a.summary).write_text(text + "\n")
        broken = [(n, d) for n, ok, d in self.invariants if not ok]
        for n, d in broken:
            print(f"INVARIANT BROKEN: {n}: {d.splitlines()[0]}", flush=True)
        if broken:
            print(f"(lb's log: {self.dir / 'lb.log'}, faults: {self.dir / 'faults.txt'})")
        return 1 if broken else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=75)
    ap.add_argument("--minutes", type=float, help="run this long instead of --seconds")
    ap.add_argument("--worker", choices=["builtin", "node", "cluster"], default="builtin")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hash-seed", type=int, default=7)
    ap.add_argument("--policy", default="sticky")
    ap.add_argument("--proxy", action="store_true",
                    help="lb behind a balancer: every connection starts with a PROXY v2 header")
    ap.add_argument("--ips", type=int, default=200, help="client source addresses")
    ap.add_argument("--websockets", type=int, default=1000)
    ap.add_argument("--ws-interval", type=float, default=1.5, help="mean seconds between messages")
    ap.add_argument("--churn", type=int, default=12, help="concurrent churn clients")
    ap.add_argument("--keepalive", type=int, default=12)
    ap.add_argument("--uploads", type=int, default=2)
    ap.add_argument("--idle", type=int, default=100)
    ap.add_argument("--burst", type=int, default=2000, help="largest burst of connections")
    ap.add_argument("--fault-every", type=float, default=2.5, help="mean seconds between faults")
    ap.add_argument("--quiet", type=float, default=10, help="seconds at the end without faults")
    ap.add_argument("--ramp", type=float, default=5, help="seconds to open the WebSockets over")
    ap.add_argument("--stall-timeout", type=float, default=2, help="lb's --stall-timeout")
    ap.add_argument("--rss-slack", type=float, default=16, help="MiB the master may keep")
    ap.add_argument("--progress", type=float, default=15, help="seconds between progress lines")
    ap.add_argument("--summary", help="also write the summary to this file")
    ap.add_argument("--lb", default=str(ROOT / "target/release/lb"))
    a = ap.parse_args()
    if a.minutes:
        a.seconds = a.minutes * 60
    if not Path(a.lb).exists():
        sys.exit(f"soak: {a.lb} not found (cargo build --release)")
    want = 4 * (a.websockets + a.idle + a.burst + 1000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(want, soft), hard), hard))
    s = Soak(a)
    try:
        final = asyncio.run(s.run())
    except KeyboardInterrupt:
        if hasattr(s, "proc"):
            os.killpg(s.proc.pid, signal.SIGKILL)
        raise
    sys.exit(s.report(final))


if __name__ == "__main__":
    main()
