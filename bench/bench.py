#!/usr/bin/env python
"""wakaq benchmark: drain, enqueue, bulk enqueue, pickup latency and memory, each next to
the floor (a plain redis-py loop) measured in the same run on the same redis-server.

    .venv/bin/python bench/bench.py                 # N=20000, 3 repeats
    .venv/bin/python bench/bench.py --quick         # N=5000, 1 repeat, < 1 minute
    .venv/bin/python bench/bench.py --scale         # also the scale scenarios (1M delayed, 100k due)
    .venv/bin/python bench/bench.py --scale-only    # only those

Every repeat starts its own redis-server (free port, `--save '' --appendonly no`), pinned to
the first CPU with taskset; producer processes are pinned to the last CPU; workers are not
pinned (like the peer benchmark). Results go to bench/results/bench-<date>-<time>.json.
See bench/README.md for what each figure means.
"""
import argparse
import datetime
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from time import perf_counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WAKAQ_PY = os.path.join(ROOT, "wakaq.py")
APP_PY = os.path.join(HERE, "bench_app.py")
sys.path[:0] = [ROOT, HERE]

import redis  # noqa: E402

PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PIN = {"redis": None, "producer": None}      # CPU lists for taskset, set in main()

# ------------------------------------------------------------------ the floor (python -c)
# The floor: the same shape as the peer benchmark's raw redis-py consumer and producer.
RAW_COMMON = """
import json, os, sys, time
from time import perf_counter
import redis
HOST = os.environ["BENCH_REDIS_HOST"]; PORT = int(os.environ["BENCH_REDIS_PORT"])
KEY = "raw:default"
"""

RAW_CONSUMER = RAW_COMMON + """
_c = None
def counter():
    global _c
    if _c is None:
        _c = redis.Redis(host=HOST, port=PORT)
    return _c
def noop(i):
    counter().incr("done")
def lat(sent):
    counter().rpush("lat", time.time() - sent)
TASKS = {"noop": noop, "lat": lat}
r = redis.Redis(host=HOST, port=PORT)
while True:
    item = r.blpop([KEY], timeout=1)
    if item is None:
        continue
    msg = json.loads(item[1])
    TASKS[msg["fn"]](*msg["args"])
"""

RAW_PRODUCER = RAW_COMMON + """
r = redis.Redis(host=HOST, port=PORT)
dumps = json.dumps
cmd = sys.argv[1]
if cmd in ("enqueue", "pipe"):
    n = int(sys.argv[2])
    t0 = perf_counter()
    r.rpush(KEY, dumps({"fn": "noop", "args": [0]}))
    t1 = perf_counter()
    if cmd == "enqueue":
        for i in range(1, n):
            r.rpush(KEY, dumps({"fn": "noop", "args": [i]}))
    else:
        p = r.pipeline(transaction=False)
        for i in range(1, n):
            p.rpush(KEY, dumps({"fn": "noop", "args": [i]}))
            if i % 1000 == 0:
                p.execute()
        p.execute()
    t2 = perf_counter()
    out = {"n": n, "first_call_ms": (t1 - t0) * 1e3, "seconds": t2 - t1, "rate": (n - 1) / (t2 - t1)}
else:
    count, interval = int(sys.argv[2]), float(sys.argv[3])
    r.rpush(KEY, dumps({"fn": "lat", "args": [0.0]}))
    time.sleep(0.2)
    nxt = perf_counter()
    for _ in range(count):
        r.rpush(KEY, dumps({"fn": "lat", "args": [time.time()]}))
        nxt += interval
        d = nxt - perf_counter()
        if d > 0:
            time.sleep(d)
    out = {"count": count}
print("BENCH_RESULT " + json.dumps(out), flush=True)
"""

BARE = ("import redis, sys; r = redis.Redis(host='127.0.0.1', port=int(sys.argv[1])); "
        "r.ping(); print('ready', flush=True); sys.stdin.read()")


# ------------------------------------------------------------------ /proc helpers

def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat(pid):
    raw = _read(f"/proc/{pid}/stat")
    return raw[raw.rfind(b")") + 2:].split() if raw else None


def cpu_seconds(pid):
    """utime + stime (+ reaped children) of one process."""
    f = _stat(pid)
    return sum(int(x) for x in f[11:15]) / CLK_TCK if f else 0.0


def children(pid):
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        raw = _read(f"/proc/{pid}/task/{tid}/children")
        if raw:
            out.extend(int(x) for x in raw.split())
    return out


def tree(roots):
    seen, stack = [], list(roots)
    while stack:
        p = stack.pop()
        if p not in seen:
            seen.append(p)
            stack.extend(children(p))
    return seen


def _status_kib(pid, field, path="status"):
    raw = _read(f"/proc/{pid}/{path}")
    for ln in (raw or b"").splitlines():
        if ln.startswith(field):
            return int(ln.split()[1])
    return 0


def rss_kib(pid):
    return _status_kib(pid, b"VmRSS:")


def pss_kib(pid):
    return _status_kib(pid, b"Pss:", "smaps_rollup")


class TreeSampler(threading.Thread):
    """Peak summed RSS / PSS and max process count of a process tree, every `interval` s."""

    def __init__(self, roots, interval=0.05):
        super().__init__(daemon=True)
        self.roots, self.interval = list(roots), interval
        self.peak_rss = self.peak_pss = self.max_procs = 0
        self.seen = {}                     # pid -> starttime, for PID-exact cleanup
        self.halt = threading.Event()

    def sample(self):
        rss = pss = n = 0
        for p in tree(self.roots):
            f = _stat(p)
            if not f or f[0] == b"Z":
                continue
            self.seen.setdefault(p, int(f[19]))
            n += 1
            rss += rss_kib(p)
            pss += pss_kib(p)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.max_procs = max(self.max_procs, n)

    def run(self):
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)

    def stop(self):
        self.halt.set()
        self.join(5)


# ------------------------------------------------------------------ processes

def env_for(port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(BENCH_REDIS_HOST="127.0.0.1", BENCH_REDIS_PORT=str(port),
               PYTHONPATH=ROOT + os.pathsep + HERE)
    return env


def pinned(argv, cpus):
    return (["taskset", "-c", ",".join(map(str, cpus))] + argv) if cpus else argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, scratch):
        self.port = free_port()
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", scratch,
                "--logfile", f"redis-{self.port}.log"]
        self.proc = subprocess.Popen(pinned(argv, PIN["redis"]), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid          # taskset execs redis-server: same pid
        self.r = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)

    def stop(self):
        self.r.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_producer(argv, port, timeout=600):
    p = subprocess.run(pinned(argv, PIN["producer"]), env=env_for(port), cwd=HERE,
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    for ln in reversed(p.stdout.splitlines()):
        if ln.startswith("BENCH_RESULT "):
            return json.loads(ln[len("BENCH_RESULT "):])
    raise RuntimeError(f"producer {argv[1:3]} failed rc={p.returncode}: {p.stderr[-2000:]}")


def wakaq_producer(cmd, *args):
    return [PY, APP_PY, cmd] + [str(a) for a in args]


def raw_producer(cmd, *args):
    return [PY, "-c", RAW_PRODUCER, cmd] + [str(a) for a in args]


def worker_argvs(kind):
    if kind == "wakaq":
        return [[PY, WAKAQ_PY, "worker", "bench_app:wakaq"]]
    return [[PY, "-c", RAW_CONSUMER] for _ in range(2)]


def start(argvs, port, log):
    with open(log, "ab") as lf:
        return [subprocess.Popen(a, env=env_for(port), cwd=HERE, stdin=subprocess.DEVNULL,
                                 stdout=lf, stderr=subprocess.STDOUT) for a in argvs]


def stop(popens, seen, timeout=10.0):
    """SIGTERM the top-level processes by PID; SIGKILL whatever of the tree is left after
    `timeout` (by PID, checking the start time). Returns a note, '' if all stopped cleanly."""
    known = dict(seen)
    for p in tree([po.pid for po in popens]):
        f = _stat(p)
        if f:
            known.setdefault(p, int(f[19]))
    for po in popens:
        if po.poll() is None:
            po.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for po in popens:
        try:
            po.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    killed = []
    while time.monotonic() < deadline:
        if not [p for p, st in known.items() if _alive(p, st)]:
            break
        time.sleep(0.05)
    for p, st in known.items():
        if _alive(p, st):
            os.kill(p, signal.SIGKILL)
            killed.append(p)
    for po in popens:
        if po.poll() is None:
            po.wait()
    return f"SIGKILLed {killed}" if killed else ""


def _alive(pid, st):
    f = _stat(pid)
    return f is not None and int(f[19]) == st and f[0] != b"Z"


# ------------------------------------------------------------------ phases

def drain(server, kind, n, scratch, tag, sample_interval=0.05, timeout=300):
    """Start the workers with `n` tasks queued; poll the counter every 5 ms. The workers keep
    running (for the latency phase); returns (figures, popens, sampler)."""
    r = server.r
    info0 = int(r.info("stats")["total_commands_processed"])
    rcpu0 = cpu_seconds(server.pid)
    polls = 0
    t0 = perf_counter()
    popens = start(worker_argvs(kind), server.port, os.path.join(scratch, f"{tag}.log"))
    sampler = TreeSampler([p.pid for p in popens], sample_interval)
    sampler.start()
    t_first = v_first = t_done = None
    while True:
        v = int(r.get("done") or 0)
        polls += 1
        now = perf_counter()
        if t_first is None and v >= 1:
            t_first, v_first = now, v
        if v >= n:
            t_done = now
            break
        if now - t0 > timeout or any(p.poll() is not None for p in popens):
            break
        time.sleep(0.005)
    wcpu = sum(cpu_seconds(p) for p in tree([p.pid for p in popens]))
    rcpu = cpu_seconds(server.pid) - rcpu0
    info1 = int(r.info("stats")["total_commands_processed"])
    sampler.sample()
    if t_done is None:
        note = stop(popens, sampler.seen)
        sampler.stop()
        raise RuntimeError(f"{tag}: drain stopped at {v}/{n} ({note}); see {scratch}/{tag}.log")
    out = {"n": n, "seconds": t_done - t0, "rate": n / (t_done - t0),
           "startup_s": t_first - t0,
           "rate_excl_startup": (n - v_first) / (t_done - t_first) if t_done > t_first else None,
           "peak_rss_mib": sampler.peak_rss / 1024, "peak_pss_mib": sampler.peak_pss / 1024,
           "procs": sampler.max_procs, "worker_cpu_us_per_task": wcpu / n * 1e6,
           "redis_cpu_us_per_task": rcpu / n * 1e6,
           "redis_cmds_per_task": (info1 - info0 - polls - 1) / n}
    return out, popens, sampler


def pickup(server, kind, count, interval, settle=0.5):
    """Idle workers; `count` lat(time.time()) tasks `interval` s apart; p50 / p99 in ms."""
    r = server.r
    time.sleep(settle)
    r.delete("lat")
    argv = wakaq_producer("latency", count, interval) if kind == "wakaq" else \
        raw_producer("latency", count, interval)
    res = run_producer(argv, server.port)
    deadline = perf_counter() + 15
    while r.llen("lat") < count + 1 and perf_counter() < deadline:
        time.sleep(0.02)
    vals = sorted(float(x) * 1e3 for x in r.lrange("lat", 0, -1) if float(x) < 1e3)
    if not vals:
        raise RuntimeError(f"pickup {kind}: no latency values")
    res.update(got=len(vals), p50_ms=pct(vals, 50), p99_ms=pct(vals, 99), max_ms=vals[-1])
    return res


def pct(sorted_vals, p):
    """Nearest-rank percentile."""
    return sorted_vals[max(0, math.ceil(p / 100 * len(sorted_vals)) - 1)]


def bare_rss(port):
    """RSS / PSS of two bare `python -c "import redis; ..."` processes (connected, idle)."""
    ps = [subprocess.Popen([PY, "-c", BARE, str(port)], env=env_for(port), stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for p in ps:
            p.stdout.readline()
        time.sleep(0.1)
        return {"rss_mib": sum(rss_kib(p.pid) for p in ps) / 1024,
                "pss_mib": sum(pss_kib(p.pid) for p in ps) / 1024}
    finally:
        for p in ps:
            p.stdin.close()
            p.wait(10)


def busy_pct(secs=0.3):
    def busy():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v[:8])
    b0, t0 = busy()
    time.sleep(secs)
    b1, t1 = busy()
    return round(100 * (b1 - b0) / max(1, t1 - t0), 1)


def check_count(r, n, what):
    v = int(r.get("done") or 0)
    if v != n:
        raise RuntimeError(f"{what}: counter {v} != {n} (lost or doubled tasks)")


# ------------------------------------------------------------------ one repeat

def drain_and_pickup(server, kind, args, scratch, tag, live, **stop_kw):
    """Drain args.n queued tasks with `kind`'s workers, then measure pickup on the idle
    workers; returns (drain figures, pickup figures, a note from stopping them or None)."""
    d, popens, sampler = drain(server, kind, args.n, scratch, tag)
    live.append((popens, sampler))
    p = pickup(server, kind, args.latency_count, args.latency_interval)
    sampler.stop()
    live.pop()
    note = stop(popens, sampler.seen, **stop_kw)   # raw consumers die at once on SIGTERM
    check_count(server.r, args.n, f"{kind} drain")
    return d, p, note


def run_main(args, rep, scratch):
    res = {"repeat": rep, "busy_before_pct": busy_pct(), "notes": []}
    server = RedisServer(scratch)
    r, n = server.r, args.n
    live = []                      # (popens, sampler) to stop if a phase fails
    try:
        # the floor: RPUSH per task, 2 x (BLPOP, json.loads, call, INCR)
        r.flushall()
        res["raw_enqueue"] = run_producer(raw_producer("enqueue", n), server.port)
        res["raw_drain"], res["raw_pickup"], note = drain_and_pickup(
            server, "raw", args, scratch, f"r{rep}-raw", live, timeout=3)
        if note:
            res["notes"].append(f"raw: {note}")
        r.flushall()
        res["raw_pipe"] = run_producer(raw_producer("pipe", args.bulk_n), server.port)
        r.flushall()
        res["bare"] = bare_rss(server.port)

        # wakaq
        r.flushall()
        res["enqueue"] = run_producer(wakaq_producer("enqueue", n), server.port)
        res["drain"], res["pickup"], note = drain_and_pickup(
            server, "wakaq", args, scratch, f"r{rep}-wakaq", live)
        if note:
            res["notes"].append(f"wakaq worker: {note}")
        r.flushall()
        res["bulk"] = run_producer(wakaq_producer("bulk", args.bulk_n), server.port)
        if r.llen("{wakaq}:q:default") != args.bulk_n:
            raise RuntimeError("bulk: queue length != bulk_n")
    finally:
        for popens, sampler in live:
            sampler.stop()
            stop(popens, sampler.seen)
        server.stop()
    d, f = res["drain"], res["raw_drain"]
    res["ratio"] = {
        "drain": d["rate"] / f["rate"],
        "drain_excl_startup": d["rate_excl_startup"] / f["rate_excl_startup"],
        "enqueue": res["enqueue"]["rate"] / res["raw_enqueue"]["rate"],
        "bulk": res["bulk"]["rate"] / res["raw_pipe"]["rate"],
        "pickup_p50": res["pickup"]["p50_ms"] / res["raw_pickup"]["p50_ms"],
        "pickup_p99": res["pickup"]["p99_ms"] / res["raw_pickup"]["p99_ms"],
        "rss": d["peak_rss_mib"] / f["peak_rss_mib"],
        "pss": d["peak_pss_mib"] / f["peak_pss_mib"],
        "worker_cpu": d["worker_cpu_us_per_task"] / f["worker_cpu_us_per_task"],
        "redis_cpu": d["redis_cpu_us_per_task"] / f["redis_cpu_us_per_task"],
    }
    res["rss_above_bare_mib"] = d["peak_rss_mib"] - res["bare"]["rss_mib"]
    res["pss_above_bare_mib"] = d["peak_pss_mib"] - res["bare"]["pss_mib"]
    return res


# ------------------------------------------------------------------ scale scenarios

def driver_app(port):
    """The driver's own WakaQ on this run's redis-server, with bench_app's noop by name
    (bench_app itself reads its port from the environment of the worker processes)."""
    from wakaq import WakaQ
    app = WakaQ(queues=["default"], concurrency=2, host="127.0.0.1", port=port)

    @app.task
    def noop(i):
        pass
    return app, noop


def eta_payloads(app, noop, count, first=0):
    """Payloads exactly as wakaq builds them (WakaQ._payload) for noop(i)."""
    q = app.default_queue
    return [app._payload(noop, (i,), {}, q)[1] for i in range(first, first + count)]


def zadd_fast(r, key, payloads, score, chunk=1000, depth=20):
    pipe = r.pipeline(transaction=False)
    for k, start in enumerate(range(0, len(payloads), chunk)):
        flat = []
        for p in payloads[start:start + chunk]:
            flat += (score, p)
        pipe.execute_command("ZADD", key, *flat)
        if k % depth == depth - 1:
            pipe.execute()
    pipe.execute()


def slowlog(r):
    return [{"id": e["id"], "start": e["start_time"], "duration_us": e["duration"],
             "command": (e["command"].decode("utf-8", "replace")
                         if isinstance(e["command"], bytes) else str(e["command"]))[:120]}
            for e in r.slowlog_get(128)]


def run_scale(args, rep, scratch):
    """(a) drain of N immediate tasks with and without `eta_count` far-future delayed tasks
    pending (worker RSS too); (b) `due_count` delayed tasks due at one moment all run,
    no Redis command over 50 ms (SLOWLOG)."""
    res = {"repeat": rep, "busy_before_pct": busy_pct(), "notes": []}
    server = RedisServer(scratch)
    r, n = server.r, args.n
    app, noop = driver_app(server.port)
    eta_key, parked = "{wakaq}:eta:default", "bench:eta:parked"
    try:
        r.config_set("slowlog-log-slower-than", 50000)
        t = perf_counter()
        zadd_fast(r, eta_key, eta_payloads(app, noop, args.eta_count), time.time() + 3600)
        res["eta_load_s"] = perf_counter() - t
        res["eta_zcard"] = r.zcard(eta_key)
        res["redis_used_memory_mib"] = r.info("memory")["used_memory"] / 2**20
        r.rename(eta_key, parked)
        calls = [(i,) for i in range(n)]
        a = {}
        # same redis-server, same N, one after the other; the order alternates by repeat
        for label in (("base", "eta") if rep % 2 else ("eta", "base")):
            if label == "eta":
                r.rename(parked, eta_key)
            elif r.exists(eta_key):
                r.rename(eta_key, parked)
            r.delete("done")
            r.slowlog_reset()
            noop.delay_many(calls)
            d, popens, sampler = drain(server, "wakaq", n, scratch, f"s{rep}-a-{label}")
            sampler.stop()
            note = stop(popens, sampler.seen)
            check_count(r, n, f"scale (a) {label}")
            if note:
                res["notes"].append(f"(a) {label}: {note}")
            d["slowlog"] = slowlog(r)
            a[label] = d
        a["eta_left"] = r.zcard(eta_key) + r.zcard(parked)
        a["ratio"] = a["eta"]["rate"] / a["base"]["rate"]
        a["ratio_excl_startup"] = a["eta"]["rate_excl_startup"] / a["base"]["rate_excl_startup"]
        a["rss_growth_mib"] = a["eta"]["peak_rss_mib"] - a["base"]["peak_rss_mib"]
        res["a"] = a

        # (b) all due at one moment
        r.flushall()
        r.slowlog_reset()
        popens = start(worker_argvs("wakaq"), server.port, os.path.join(scratch, f"s{rep}-b.log"))
        sampler = TreeSampler([p.pid for p in popens], 0.1)
        sampler.start()
        try:
            deadline = time.monotonic() + 10
            while not r.zcard("{wakaq}:workers") and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)
            m = args.due_count
            payloads = eta_payloads(app, noop, m, first=10**7)
            due = time.time() + args.due_lead
            zadd_fast(r, eta_key, payloads, due)
            b = {"count": m, "loaded_before_due_s": due - time.time()}
            while time.time() < due:
                time.sleep(0.001)
            t0 = perf_counter()
            t_done = t_moved = None
            while perf_counter() - t0 < 300:
                v = int(r.get("done") or 0)
                if t_moved is None and not r.exists(eta_key):
                    t_moved = perf_counter()
                if v >= m:
                    t_done = perf_counter()
                    break
                if any(p.poll() is not None for p in popens):
                    break
                time.sleep(0.005)
            sampler.sample()
        finally:
            sampler.stop()
            note = stop(popens, sampler.seen)
        if note:
            res["notes"].append(f"(b): {note}")
        b["done"] = int(r.get("done") or 0)
        b["eta_left"] = r.zcard(eta_key)
        b["queue_left"] = r.llen("{wakaq}:q:default")
        b["seconds_from_due"] = (t_done - t0) if t_done else None
        b["all_moved_s"] = (t_moved - t0) if t_moved else None
        b["rate"] = m / (t_done - t0) if t_done else None
        b["peak_rss_mib"] = sampler.peak_rss / 1024
        b["slowlog"] = slowlog(r)
        b["max_cmd_ms"] = max((e["duration_us"] for e in b["slowlog"]), default=0) / 1e3
        res["b"] = b
    finally:
        server.stop()
    return res


# ------------------------------------------------------------------ report

def med(runs, path):
    vals = []
    for run in runs:
        v = run
        for k in path.split("."):
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def fmt(v, digits=None):
    if v is None:
        return "-"
    if digits is None:
        digits = 0 if abs(v) >= 1000 else 2 if abs(v) < 100 else 1
    return f"{v:,.{digits}f}"


def report(main_runs, scale_runs, meta):
    lines = []
    P = lines.append
    targets = []
    if main_runs:
        R = main_runs
        k = len(R)
        P(f"\nwakaq vs the floor (plain redis-py), N={meta['args']['n']}, bulk N="
          f"{meta['args']['bulk_n']}, median of {k} run(s); ratio = median of per-run ours/floor")
        P(f"{'figure':<34}{'wakaq':>12}{'floor':>12}{'ratio':>8}")
        rows = [
            ("drain tasks/s (from worker start)", "drain.rate", "raw_drain.rate", "ratio.drain"),
            ("drain tasks/s (excl. start-up)", "drain.rate_excl_startup",
             "raw_drain.rate_excl_startup", "ratio.drain_excl_startup"),
            ("start-up s (spawn -> 1st task)", "drain.startup_s", "raw_drain.startup_s", None),
            ("enqueue .delay() tasks/s", "enqueue.rate", "raw_enqueue.rate", "ratio.enqueue"),
            ("enqueue first call ms", "enqueue.first_call_ms", "raw_enqueue.first_call_ms", None),
            ("bulk .delay_many() tasks/s", "bulk.rate", "raw_pipe.rate", "ratio.bulk"),
            ("pickup p50 ms", "pickup.p50_ms", "raw_pickup.p50_ms", "ratio.pickup_p50"),
            ("pickup p99 ms", "pickup.p99_ms", "raw_pickup.p99_ms", "ratio.pickup_p99"),
            ("peak RSS MiB (tree, summed)", "drain.peak_rss_mib", "raw_drain.peak_rss_mib", "ratio.rss"),
            ("peak PSS MiB (tree, summed)", "drain.peak_pss_mib", "raw_drain.peak_pss_mib", "ratio.pss"),
            ("processes", "drain.procs", "raw_drain.procs", None),
            ("worker CPU us/task", "drain.worker_cpu_us_per_task",
             "raw_drain.worker_cpu_us_per_task", "ratio.worker_cpu"),
            ("redis CPU us/task", "drain.redis_cpu_us_per_task",
             "raw_drain.redis_cpu_us_per_task", "ratio.redis_cpu"),
            ("redis commands/task (drain)", "drain.redis_cmds_per_task",
             "raw_drain.redis_cmds_per_task", None),
        ]
        for label, ours, floor, ratio in rows:
            P(f"{label:<34}{fmt(med(R, ours)):>12}{fmt(med(R, floor)):>12}"
              f"{fmt(med(R, ratio), 2) if ratio else '':>8}")
        P(f"{'2 bare redis-py processes RSS MiB':<34}{fmt(med(R, 'bare.rss_mib')):>12}"
          f"   (PSS {fmt(med(R, 'bare.pss_mib'))}); wakaq RSS above them: "
          f"{fmt(med(R, 'rss_above_bare_mib'))} MiB (PSS {fmt(med(R, 'pss_above_bare_mib'))})")
        P("floor: producer RPUSH per task (bulk: RPUSH pipelined x1000); 2 consumers "
          "BLPOP + json.loads + call + INCR")
        targets += [
            ("drain >= 0.90 x floor", med(R, "ratio.drain"), med(R, "ratio.drain") >= 0.90),
            ("drain excl. start-up >= 0.90 x floor (info)", med(R, "ratio.drain_excl_startup"),
             med(R, "ratio.drain_excl_startup") >= 0.90),
            ("single enqueue >= 0.90 x floor", med(R, "ratio.enqueue"), med(R, "ratio.enqueue") >= 0.90),
            ("pickup p50 <= 1 ms", med(R, "pickup.p50_ms"), med(R, "pickup.p50_ms") <= 1.0),
            ("pickup p99 <= 3 ms", med(R, "pickup.p99_ms"), med(R, "pickup.p99_ms") <= 3.0),
            ("worker RSS <= 2 bare + 10 MiB", med(R, "rss_above_bare_mib"),
             med(R, "rss_above_bare_mib") <= 10.0),
            ("worker PSS <= 2 bare + 10 MiB (info)", med(R, "pss_above_bare_mib"),
             med(R, "pss_above_bare_mib") <= 10.0),
            ("bulk >= 100,000 tasks/s", med(R, "bulk.rate"), med(R, "bulk.rate") >= 100000),
        ]
    if scale_runs:
        S = scale_runs
        a = meta["args"]
        P(f"\nscale (median of {len(S)} run(s)):")
        P(f"  (a) drain of N={a['n']} with {a['eta_count']:,} delayed tasks pending (+1 h): "
          f"{fmt(med(S, 'a.eta.rate'))}/s vs {fmt(med(S, 'a.base.rate'))}/s without = "
          f"{fmt(med(S, 'a.ratio'), 3)} (excl. start-up {fmt(med(S, 'a.ratio_excl_startup'), 3)}); "
          f"peak RSS {fmt(med(S, 'a.eta.peak_rss_mib'))} vs {fmt(med(S, 'a.base.peak_rss_mib'))} MiB; "
          f"load {fmt(med(S, 'eta_load_s'))} s, redis used_memory {fmt(med(S, 'redis_used_memory_mib'))} MiB")
        P(f"  (b) {a['due_count']:,} delayed tasks due at one moment: all ran in "
          f"{fmt(med(S, 'b.seconds_from_due'))} s ({fmt(med(S, 'b.rate'))}/s) from the due time "
          f"(all moved to the queue after {fmt(med(S, 'b.all_moved_s'), 3)} s); "
          f"max SLOWLOG entry (>50 ms) {fmt(med(S, 'b.max_cmd_ms'))} ms")
        for run in S:
            for label, entries in (("(a) base", run["a"]["base"]["slowlog"]),
                                   ("(a) eta", run["a"]["eta"]["slowlog"]),
                                   ("(b)", run["b"]["slowlog"])):
                for e in entries:
                    P(f"      run {run['repeat']} {label} SLOWLOG {e['duration_us'] / 1e3:.1f} ms: "
                      f"{e['command']}")
        all_ran = all(run["b"]["done"] == a["due_count"] and run["b"]["eta_left"] == 0 for run in S)
        no_slow = all(not run["b"]["slowlog"] and not run["a"]["eta"]["slowlog"] for run in S)
        targets += [
            (f"(a) drain with {a['eta_count']:,} delayed >= 0.90 x without", med(S, "a.ratio"),
             med(S, "a.ratio") >= 0.90),
            ("(a) worker RSS does not grow (<= +1 MiB)", med(S, "a.rss_growth_mib"),
             med(S, "a.rss_growth_mib") <= 1.0),
            ("(b) all due tasks ran", med(S, "b.done"), all_ran),
            ("(b) no command over 50 ms (SLOWLOG)", med(S, "b.max_cmd_ms"), no_slow),
        ]
    P("\ntargets:")
    for label, v, ok in targets:
        P(f"  {'PASS' if ok else 'FAIL'}  {label:<46} {fmt(v, 3 if v is not None and abs(v) < 10 else None)}")
    notes = [f"run {run['repeat']}: {x}" for run in main_runs + scale_runs for x in run["notes"]]
    if notes:
        P("notes: " + "; ".join(notes))
    P(f"\n{meta['pinning']}. machine busy before runs: "
      f"{[run['busy_before_pct'] for run in main_runs + scale_runs]} %")
    return "\n".join(lines), [{"target": t, "value": v, "pass": bool(ok)} for t, v, ok in targets]


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "wakaq.py"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty wakaq.py" if dirty else "")
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="tasks per drain/enqueue (default 20000)")
    ap.add_argument("--bulk-n", type=int, default=100000, help="tasks in the delay_many() run")
    ap.add_argument("--repeat", type=int, help="runs per figure (default 3; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="N=5000, bulk N=20000, 1 repeat, "
                    "scale: 100,000 delayed and 20,000 due")
    ap.add_argument("--scale", action="store_true", help="also the scale scenarios")
    ap.add_argument("--scale-only", action="store_true", help="only the scale scenarios")
    ap.add_argument("--eta-count", type=int, default=1_000_000)
    ap.add_argument("--due-count", type=int, default=100_000)
    ap.add_argument("--due-lead", type=float, default=3.0,
                    help="(b) the due time is this many seconds after loading starts")
    ap.add_argument("--latency-count", type=int, default=200)
    ap.add_argument("--latency-interval", type=float, default=0.02)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--keep-logs", action="store_true", help="keep the scratch dir (worker logs)")
    ap.add_argument("--out", help="JSON path (default bench/results/bench-<date>-<time>.json)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.bulk_n = 5000, 20000
        args.repeat = args.repeat or 1
        args.eta_count, args.due_count = min(args.eta_count, 100_000), min(args.due_count, 20_000)
    args.repeat = args.repeat or 3
    cpus = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cpus) >= 2:
        PIN["redis"], PIN["producer"] = [cpus[0]], [cpus[-1]]
    pinning = (f"pinning: redis-server on CPU {PIN['redis'][0]} (taskset), producers on CPU "
               f"{PIN['producer'][0]}, workers and this driver unpinned") if PIN["redis"] \
        else "pinning: none"
    print(f"wakaq bench: {pinning}; python {PY}", flush=True)
    scratch = tempfile.mkdtemp(prefix="wakaq-bench-")
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "pinning": pinning,
            "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "redis_py": redis.__version__, "wakaq_git": git_rev(), "args": vars(args),
            "redis_server": subprocess.run(["redis-server", "--version"], capture_output=True,
                                           text=True).stdout.strip()}
    import wakaq
    meta["wakaq_version"] = getattr(wakaq, "__version__", None)
    main_runs, scale_runs = [], []
    t_start = perf_counter()
    for rep in range(1, args.repeat + 1):
        if not args.scale_only:
            res = run_main(args, rep, scratch)
            main_runs.append(res)
            print(f"run {rep}: drain {res['drain']['rate']:,.0f}/s (floor {res['raw_drain']['rate']:,.0f}), "
                  f"enqueue {res['enqueue']['rate']:,.0f}/s (floor {res['raw_enqueue']['rate']:,.0f}), "
                  f"bulk {res['bulk']['rate']:,.0f}/s, pickup p50/p99 "
                  f"{res['pickup']['p50_ms']:.2f}/{res['pickup']['p99_ms']:.2f} ms, "
                  f"RSS {res['drain']['peak_rss_mib']:.1f} MiB", flush=True)
        if args.scale or args.scale_only:
            res = run_scale(args, rep, scratch)
            scale_runs.append(res)
            print(f"scale run {rep}: (a) {res['a']['eta']['rate']:,.0f}/s with delayed vs "
                  f"{res['a']['base']['rate']:,.0f}/s without; (b) {res['b']['done']:,} done in "
                  f"{res['b']['seconds_from_due']} s, slowlog {len(res['b']['slowlog'])}", flush=True)
    text, targets = report(main_runs, scale_runs, meta)
    meta["seconds"] = perf_counter() - t_start
    print(text)
    out = args.out or os.path.join(HERE, "results", datetime.datetime.now().strftime(
        "bench-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "targets": targets, "runs": main_runs, "scale_runs": scale_runs,
                   "table": text}, f, indent=1)
    print(f"\nJSON: {out}" + (f"; logs in {scratch}" if args.keep_logs else ""))
    if not args.keep_logs:
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
