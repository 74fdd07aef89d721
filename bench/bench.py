#!/usr/bin/env python
"""wakaq benchmark: drain, enqueue, bulk enqueue, pickup latency and memory, each next to
the floor (a plain redis-py loop) measured in the same run on the same redis-server; and the
cases of round 2 (async tasks, idle cost, Redis Cluster, log level, many queues, bytes per
task), each measured in the same run as what it is compared to.

    .venv/bin/python bench/bench.py                 # every case but scale, 3 repeats
    .venv/bin/python bench/bench.py --quick         # N=5000, 1 repeat, about 2 minutes
    .venv/bin/python bench/bench.py --case idle,queues     # only those cases
    .venv/bin/python bench/bench.py --scale         # also the scale scenarios
                                                    # (1M delayed, 100k due)
    .venv/bin/python bench/bench.py --scale-only    # only those

Cases: main async idle cluster loglevel queues bytes (the default) and scale. A case that
raises (a feature not there yet) is reported as an error and the run goes on.
Every case starts its own redis-server(s) (free port, `--save '' --appendonly no`), pinned to
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
import traceback
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
PIN = {"redis": None, "producer": None}  # CPU lists for taskset, set in main()

# ------------------------------------------------------------------ the floor (python -c)
# The floor: the same shape as the peer benchmark's raw redis-py consumer and producer.
RAW_COMMON = """
import json, os, sys, time
from time import perf_counter
import redis
HOST = os.environ["BENCH_REDIS_HOST"]; PORT = int(os.environ["BENCH_REDIS_PORT"])
KEY = "raw:default"
"""

RAW_CONSUMER = (
    RAW_COMMON
    + """
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
def big(s):
    counter().incr("done")
TASKS = {"noop": noop, "lat": lat, "big": big}
r = redis.Redis(host=HOST, port=PORT)
while True:
    item = r.blpop([KEY], timeout=1)
    if item is None:
        continue
    msg = json.loads(item[1])
    TASKS[msg["fn"]](*msg["args"])
"""
)

# The floor with a prefetch of one (rtt case, optional variant "raw-prefetch"): the LPOP of
# the next task is sent before the current one runs and its reply read after, so the fetch's
# round trip overlaps the task's own (redis-py's send_command / read_response on the same kind
# of connection the floor uses). An empty queue: BLPOP, as the floor.
RAW_PREFETCH_CONSUMER = (
    RAW_CONSUMER.split("r = redis.Redis(host=HOST, port=PORT)\nwhile")[0]
    + """
c = redis.Redis(host=HOST, port=PORT).connection_pool.get_connection()
cur = None
while True:
    if cur is None:
        c.send_command("BLPOP", KEY, 1)
        item = c.read_response()
        if item is None:
            continue
        cur = item[1]
    c.send_command("LPOP", KEY)          # the next one, fetched while this one runs
    msg = json.loads(cur)
    TASKS[msg["fn"]](*msg["args"])
    cur = c.read_response()              # None: the queue was empty -> BLPOP
"""
)

RAW_PRODUCER = (
    RAW_COMMON
    + """
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
    out = {"n": n, "first_call_ms": (t1 - t0) * 1e3, "seconds": t2 - t1,
           "rate": (n - 1) / (t2 - t1)}
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
)

BARE = (
    "import redis, sys; r = redis.Redis(host='127.0.0.1', port=int(sys.argv[1])); "
    "r.ping(); print('ready', flush=True); sys.stdin.read()"
)


# ------------------------------------------------------------------ /proc helpers


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat(pid):
    raw = _read(f"/proc/{pid}/stat")
    return raw[raw.rfind(b")") + 2 :].split() if raw else None


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
        self.seen = {}  # pid -> starttime, for PID-exact cleanup
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


def env_for(port, cluster=False):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "BENCH_CLUSTER"
    }
    env.update(
        BENCH_REDIS_HOST="127.0.0.1",
        BENCH_REDIS_PORT=str(port),
        PYTHONPATH=ROOT + os.pathsep + HERE,
    )
    if cluster:
        env["BENCH_CLUSTER"] = "1"
    return env


def pinned(argv, cpus):
    return (["taskset", "-c", ",".join(map(str, cpus))] + argv) if cpus else argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    cluster = False

    def __init__(self, scratch, extra=()):
        self.port = free_port()
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            scratch,
            "--logfile",
            f"redis-{self.port}.log",
        ] + list(extra)
        self.proc = subprocess.Popen(
            pinned(argv, PIN["redis"]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = self.proc.pid  # taskset execs redis-server: same pid
        self.r = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        self.pids, self.node_clients = [self.pid], [self.r]

    def flushall(self):
        for c in self.node_clients:
            c.flushall()

    def stop(self):
        self.r.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RedisClusterServers:
    """A local Redis Cluster of `masters` redis-servers (no replicas), each pinned like the
    single server; created with `redis-cli --cluster create ... --cluster-yes`. `.r` is a
    redis.cluster.RedisCluster client, `.port` the first node (the one the workers are given)."""

    cluster = True

    def __init__(self, scratch, masters=3):
        self.nodes = []
        try:
            for _ in range(masters):
                self.nodes.append(
                    RedisServer(
                        scratch,
                        [
                            "--cluster-enabled",
                            "yes",
                            "--cluster-port",
                            str(free_port()),
                            "--cluster-config-file",
                            f"nodes-{os.urandom(6).hex()}.conf",
                            "--cluster-node-timeout",
                            "5000",
                        ],
                    )
                )
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            out = subprocess.run(
                ["redis-cli", "--cluster", "create", *addrs, "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            if out.returncode:
                raise RuntimeError(
                    f"redis-cli --cluster create failed: {out.stdout[-800:]}{out.stderr[-800:]}"
                )
            deadline = time.monotonic() + 30
            while not all(
                n.r.cluster("info").get("cluster_state") == "ok"
                and len(n.r.cluster("nodes")) == masters
                for n in self.nodes
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not reach cluster_state:ok in 30 s")
                time.sleep(0.1)
            self.port = self.nodes[0].port
            self.r = redis.cluster.RedisCluster(host="127.0.0.1", port=self.port)
            self.pids = [n.pid for n in self.nodes]
            self.node_clients = [n.r for n in self.nodes]
        except BaseException:
            self.stop()
            raise

    def flushall(self):
        for c in self.node_clients:
            c.flushall()

    def stop(self):
        r = getattr(self, "r", None)
        if r is not None:
            r.close()
        for n in self.nodes:
            n.stop()


def stats(server, section="stats"):
    """INFO `section` summed over the server's nodes (numbers only)."""
    tot = {}
    for c in server.node_clients:
        for k, v in c.info(section).items():
            if isinstance(v, (int, float)):
                tot[k] = tot.get(k, 0) + v
            elif isinstance(v, dict):  # commandstats: cmd -> {calls...}
                tot[k] = tot.get(k, 0) + v.get("calls", 0)
    return tot


def run_producer(argv, port, timeout=600):
    p = subprocess.run(
        pinned(argv, PIN["producer"]),
        env=env_for(port),
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    for ln in reversed(p.stdout.splitlines()):
        if ln.startswith("BENCH_RESULT "):
            return json.loads(ln[len("BENCH_RESULT ") :])
    raise RuntimeError(f"producer {argv[1:3]} failed rc={p.returncode}: {p.stderr[-2000:]}")


def wakaq_producer(cmd, *args):
    return [PY, APP_PY, cmd] + [str(a) for a in args]


def raw_producer(cmd, *args):
    return [PY, "-c", RAW_PRODUCER, cmd] + [str(a) for a in args]


def worker_argvs(kind, workers=1):
    """kind "raw": the floor's 2 consumers; otherwise a bench_app app name ("wakaq",
    "wakaq_q200", ...): `workers` x `python wakaq.py worker bench_app:KIND`."""
    if kind == "raw":
        return [[PY, "-c", RAW_CONSUMER] for _ in range(2)]
    if kind == "raw-prefetch":
        return [[PY, "-c", RAW_PREFETCH_CONSUMER] for _ in range(2)]
    return [[PY, WAKAQ_PY, "worker", f"bench_app:{kind}"] for _ in range(workers)]


def start(argvs, port, log, cluster=False):
    with open(log, "ab") as lf:
        return [
            subprocess.Popen(
                a,
                env=env_for(port, cluster),
                cwd=HERE,
                stdin=subprocess.DEVNULL,
                stdout=lf,
                stderr=subprocess.STDOUT,
            )
            for a in argvs
        ]


def stop(popens, seen, timeout=10.0):
    """SIGTERM the top-level processes by PID; SIGKILL whatever of the tree is left after
    `timeout` (by PID, checking the start time). Returns a note, '' if all stopped cleanly."""
    known = _known_tree(popens, seen)
    for po in popens:
        if po.poll() is None:
            po.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    _wait_gone(popens, known, deadline)
    killed = []
    for p, st in known.items():
        if _alive(p, st):
            os.kill(p, signal.SIGKILL)
            killed.append(p)
    for po in popens:
        if po.poll() is None:
            po.wait()
    return f"SIGKILLed {killed}" if killed else ""


def _known_tree(popens, seen):
    """{pid: start time} of every process seen or now in the trees of `popens`."""
    known = dict(seen)
    for p in tree([po.pid for po in popens]):
        f = _stat(p)
        if f:
            known.setdefault(p, int(f[19]))
    return known


def _wait_gone(popens, known, deadline):
    """Wait until the deadline for the top-level processes, then for the whole tree."""
    for po in popens:
        try:
            po.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while time.monotonic() < deadline:
        if not [p for p, st in known.items() if _alive(p, st)]:
            break
        time.sleep(0.05)


def _alive(pid, st):
    f = _stat(pid)
    return f is not None and int(f[19]) == st and f[0] != b"Z"


# ------------------------------------------------------------------ phases


def drain(
    server,
    kind,
    n,
    scratch,
    tag,
    sample_interval=0.05,
    timeout=300,
    partial=False,
    worker_port=None,
    on_first=None,
    on_done=None,
):
    """Start the workers with `n` tasks queued; poll the counter every 5 ms. The workers keep
    running (for the latency phase); returns (figures, popens, sampler). With `partial`, a
    drain that does not finish within `timeout` returns its figures (done < n) instead of
    raising. `worker_port`: the port the workers are given (a delay proxy's; default the
    server's; the driver always polls the server directly). on_first(v, popens) /
    on_done(v, popens): called when the counter is first seen >= 1 and >= n."""
    r = server.r
    cs0 = stats(server, "commandstats")
    st0 = stats(server)
    info0, in0 = int(st0["total_commands_processed"]), st0["total_net_input_bytes"]
    rcpu0 = sum(cpu_seconds(p) for p in server.pids)
    polls = 0
    t0 = perf_counter()
    popens = start(
        worker_argvs(kind),
        worker_port or server.port,
        os.path.join(scratch, f"{tag}.log"),
        server.cluster,
    )
    sampler = TreeSampler([p.pid for p in popens], sample_interval)
    sampler.start()
    t_first = v_first = t_done = None
    while True:
        v = int(r.get("done") or 0)
        polls += 1
        now = perf_counter()
        if t_first is None and v >= 1:
            t_first, v_first = now, v
            on_first and on_first(v, popens)
        if v >= n:
            t_done = now
            on_done and on_done(v, popens)
            break
        if now - t0 > timeout or any(p.poll() is not None for p in popens):
            break
        time.sleep(0.005)
    wcpu = sum(cpu_seconds(p) for p in tree([p.pid for p in popens]))
    rcpu = sum(cpu_seconds(p) for p in server.pids) - rcpu0
    st1 = stats(server)
    info1, in1 = int(st1["total_commands_processed"]), st1["total_net_input_bytes"]
    cs1 = stats(server, "commandstats")
    by_cmd = {k.replace("cmdstat_", ""): (cs1[k] - cs0.get(k, 0)) for k in cs1}
    by_cmd["get"] = by_cmd.get("get", 0) - polls  # the driver's polls
    sampler.sample()
    if (
        t_done is None
        and partial
        and t_first is not None
        and not any(p.poll() is not None for p in popens)
    ):
        return (
            {
                "n": n,
                "done": v,
                "timed_out_s": timeout,
                "seconds": None,
                "rate": v / (perf_counter() - t0),
                "startup_s": t_first - t0,
                "t_first_wall": time.time() - (perf_counter() - t_first),
            },
            popens,
            sampler,
        )
    if t_done is None:
        note = stop(popens, sampler.seen)
        sampler.stop()
        raise RuntimeError(f"{tag}: drain stopped at {v}/{n} ({note}); see {scratch}/{tag}.log")
    out = {
        "n": n,
        "done": v,
        "seconds": t_done - t0,
        "rate": n / (t_done - t0),
        "worker_cpu_s": wcpu,
        "t_done_wall": time.time() - (perf_counter() - t_done),
        "startup_s": t_first - t0,
        "rate_excl_startup": (n - v_first) / (t_done - t_first) if t_done > t_first else None,
        "peak_rss_mib": sampler.peak_rss / 1024,
        "peak_pss_mib": sampler.peak_pss / 1024,
        "procs": sampler.max_procs,
        "worker_cpu_us_per_task": wcpu / n * 1e6,
        "redis_cpu_us_per_task": rcpu / n * 1e6,
        "redis_cmds_per_task": (info1 - info0 - polls - len(server.node_clients)) / n,
        "redis_in_bytes_per_task": (in1 - in0 - polls * _resp_len("GET", "done")) / n,
        "redis_cmds_per_task_by_command": {
            k: v / n for k, v in sorted(by_cmd.items(), key=lambda kv: -kv[1]) if v > 0
        },
    }
    return out, popens, sampler


def pickup(server, kind, count, interval, settle=0.5):
    """Idle workers; `count` lat(time.time()) tasks `interval` s apart; p50 / p99 in ms."""
    r = server.r
    time.sleep(settle)
    r.delete("lat")
    argv = (
        wakaq_producer("latency", count, interval)
        if kind == "wakaq"
        else raw_producer("latency", count, interval)
    )
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
    ps = [
        subprocess.Popen(
            [PY, "-c", BARE, str(port)],
            env=env_for(port),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        for p in ps:
            p.stdout.readline()
        time.sleep(0.1)
        return {
            "rss_mib": sum(rss_kib(p.pid) for p in ps) / 1024,
            "pss_mib": sum(pss_kib(p.pid) for p in ps) / 1024,
        }
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
    note = stop(popens, sampler.seen, **stop_kw)  # raw consumers die at once on SIGTERM
    check_count(server.r, args.n, f"{kind} drain")
    return d, p, note


def run_main(args, rep, scratch):
    res = {"repeat": rep, "busy_before_pct": busy_pct(), "notes": []}
    server = RedisServer(scratch)
    r, n = server.r, args.n
    live = []  # (popens, sampler) to stop if a phase fails
    try:
        # the floor: RPUSH per task, 2 x (BLPOP, json.loads, call, INCR)
        r.flushall()
        res["raw_enqueue"] = run_producer(raw_producer("enqueue", n), server.port)
        res["raw_drain"], res["raw_pickup"], note = drain_and_pickup(
            server, "raw", args, scratch, f"r{rep}-raw", live, timeout=3
        )
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
            server, "wakaq", args, scratch, f"r{rep}-wakaq", live
        )
        if note:
            res["notes"].append(f"wakaq worker: {note}")
        r.flushall()
        res["bulk"] = run_producer(wakaq_producer("bulk", args.bulk_n), server.port)
        if r.llen(qkey(driver_app(server.port)[0])) != args.bulk_n:
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


def driver_app(port, spec="wakaq", cluster=False):
    """The driver's own copy of bench_app's app `spec` on this run's redis-server (the
    workers build theirs from their environment); returns (app, its noop task)."""
    import bench_app

    app = bench_app.make_app(spec, "127.0.0.1", port, cluster)
    return app, app.tasks["noop"]


def qkey(app, kind="q", queue=None):
    """The Redis key of `app`'s queue list ("q") or delayed set ("eta") (default queue)."""
    q = queue or app.default_queue
    return getattr(q, {"q": "key", "eta": "eta_key"}[kind], None) or app._k(kind, q.name)


def workers_key(app):
    return getattr(app, "workers_key", None) or app._k("workers")


def wait_workers(r, app, count, popens, timeout=15):
    """Until `count` workers of `app` are in its workers zset (their heartbeat)."""
    deadline = time.monotonic() + timeout
    while r.zcard(workers_key(app)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} worker(s) did not register in {timeout} s")
        if any(p.poll() is not None for p in popens):
            raise RuntimeError("a worker exited at start")
        time.sleep(0.02)


def eta_payloads(app, noop, count, first=0):
    """Payloads exactly as wakaq builds them (WakaQ._payload) for noop(i)."""
    q = app.default_queue
    return [app._payload(noop, (i,), {}, q)[1] for i in range(first, first + count)]


def zadd_fast(r, key, payloads, score, chunk=1000, depth=20):
    pipe = r.pipeline(transaction=False)
    for k, start in enumerate(range(0, len(payloads), chunk)):
        flat = []
        for p in payloads[start : start + chunk]:
            flat += (score, p)
        pipe.execute_command("ZADD", key, *flat)
        if k % depth == depth - 1:
            pipe.execute()
    pipe.execute()


def slowlog(r):
    return [
        {
            "id": e["id"],
            "start": e["start_time"],
            "duration_us": e["duration"],
            "command": (
                e["command"].decode("utf-8", "replace")
                if isinstance(e["command"], bytes)
                else str(e["command"])
            )[:120],
        }
        for e in r.slowlog_get(128)
    ]


def run_scale(args, rep, scratch):
    """(a) drain of N immediate tasks with and without `eta_count` far-future delayed tasks
    pending (worker RSS too); (b) `due_count` delayed tasks due at one moment all run,
    no Redis command over 50 ms (SLOWLOG)."""
    res = {"repeat": rep, "busy_before_pct": busy_pct(), "notes": []}
    server = RedisServer(scratch)
    r = server.r
    app, noop = driver_app(server.port)
    eta_key, parked = qkey(app, "eta"), "{%s}:bench:eta:parked" % app.prefix
    try:
        r.config_set("slowlog-log-slower-than", 50000)
        t = perf_counter()
        zadd_fast(r, eta_key, eta_payloads(app, noop, args.eta_count), time.time() + 3600)
        res["eta_load_s"] = perf_counter() - t
        res["eta_zcard"] = r.zcard(eta_key)
        res["redis_used_memory_mib"] = r.info("memory")["used_memory"] / 2**20
        r.rename(eta_key, parked)
        res["a"] = _scale_a(args, rep, scratch, server, noop, eta_key, parked, res["notes"])
        res["b"] = _scale_b(args, rep, scratch, server, app, noop, res["notes"])
    finally:
        server.stop()
    return res


def _scale_a(args, rep, scratch, server, noop, eta_key, parked, notes):
    """(a) the drains with and without the delayed tasks (renamed in and out of place)."""
    r, n = server.r, args.n
    calls = [(i,) for i in range(n)]
    a = {}
    # same redis-server, same N, one after the other; the order alternates by repeat
    for label in ("base", "eta") if rep % 2 else ("eta", "base"):
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
            notes.append(f"(a) {label}: {note}")
        d["slowlog"] = slowlog(r)
        a[label] = d
    a["eta_left"] = r.zcard(eta_key) + r.zcard(parked)
    a["ratio"] = a["eta"]["rate"] / a["base"]["rate"]
    a["ratio_excl_startup"] = a["eta"]["rate_excl_startup"] / a["base"]["rate_excl_startup"]
    a["rss_growth_mib"] = a["eta"]["peak_rss_mib"] - a["base"]["peak_rss_mib"]
    return a


def _wait_until_done(r, m, eta_key, popens, t0):
    """Poll until `m` tasks are done (or 300 s, or a worker exits); returns the times the
    last one was done and the delayed set was empty, None if not."""
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
    return t_done, t_moved


def _scale_b(args, rep, scratch, server, app, noop, notes):
    """(b) all due at one moment."""
    r, eta_key = server.r, qkey(app, "eta")
    r.flushall()
    r.slowlog_reset()
    popens = start(worker_argvs("wakaq"), server.port, os.path.join(scratch, f"s{rep}-b.log"))
    sampler = TreeSampler([p.pid for p in popens], 0.1)
    sampler.start()
    try:
        deadline = time.monotonic() + 10
        while not r.zcard(workers_key(app)) and time.monotonic() < deadline:
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
        t_done, t_moved = _wait_until_done(r, m, eta_key, popens, t0)
        sampler.sample()
    finally:
        sampler.stop()
        note = stop(popens, sampler.seen)
    if note:
        notes.append(f"(b): {note}")
    b["done"] = int(r.get("done") or 0)
    b["eta_left"] = r.zcard(eta_key)
    b["queue_left"] = r.llen(qkey(app))
    b["seconds_from_due"] = (t_done - t0) if t_done else None
    b["all_moved_s"] = (t_moved - t0) if t_moved else None
    b["rate"] = m / (t_done - t0) if t_done else None
    b["peak_rss_mib"] = sampler.peak_rss / 1024
    b["slowlog"] = slowlog(r)
    b["max_cmd_ms"] = max((e["duration_us"] for e in b["slowlog"]), default=0) / 1e3
    return b


# ------------------------------------------------------------------ the other cases (--case)


class Live:
    """Servers and worker processes a case started; close() stops whatever is left, in
    reverse order, however the case ends."""

    def __init__(self):
        self.items, self.notes = [], []

    def server(self, s):
        self.items.append(("server", s))
        return s

    def add(self, popens, sampler=None):
        if sampler is None:
            sampler = TreeSampler([p.pid for p in popens], 0.1)
            sampler.start()
        self.items.append(("procs", (popens, sampler)))
        return popens

    def stop(self, popens, tag="", **kw):
        for i, (kind, x) in enumerate(self.items):
            if kind == "procs" and x[0] is popens:
                del self.items[i]
                x[1].stop()
                note = stop(popens, x[1].seen, **kw)
                if note:
                    self.notes.append(f"{tag}: {note}")
                return note
        return ""

    def close_one(self, obj):
        """Stop one server (or proxy) added with server() now."""
        for i, (kind, x) in enumerate(self.items):
            if kind == "server" and x is obj:
                del self.items[i]
                x.stop()
                return

    def close(self):
        while self.items:
            kind, x = self.items.pop()
            try:
                if kind == "server":
                    x.stop()
                else:
                    x[1].stop()
                    stop(x[0], x[1].seen)
            except Exception as e:  # keep closing the rest
                self.notes.append(f"cleanup: {e!r}")


def timed_drain(live, server, kind, n, scratch, tag, **kw):
    """drain() with the workers stopped afterwards (raw consumers: 3 s grace)."""
    d, popens, sampler = drain(server, kind, n, scratch, tag, **kw)
    live.add(popens, sampler)
    live.stop(popens, tag, **({"timeout": 3} if kind == "raw" else {}))
    log = os.path.join(scratch, f"{tag}.log")
    d["log_bytes_per_task"] = os.path.getsize(log) / n if os.path.exists(log) else None
    return d


def raw_floor(live, server, n, scratch, tag):
    """The floor's drain: RPUSH pipelined (producer pinned), then 2 BLPOP consumers."""
    server.flushall()
    run_producer(raw_producer("pipe", n), server.port)
    d = timed_drain(live, server, "raw", n, scratch, tag)
    check_count(server.r, n, f"{tag} raw drain")
    return d


def wakaq_drain(live, server, spec, n, scratch, tag, **kw):
    """N noop tasks queued with delay_many by the driver's copy of app `spec`, then drained
    by one `python wakaq.py worker bench_app:SPEC`."""
    server.flushall()
    app, noop = driver_app(server.port, spec, server.cluster)
    noop.delay_many([(i,) for i in range(n)])
    d = timed_drain(live, server, spec, n, scratch, tag, **kw)
    check_count(server.r, n, f"{tag} drain")
    d["queue"] = app.default_queue.name
    d["queues_in_app"] = len(app.queues)
    return d


def new_res(rep):
    return {"repeat": rep, "busy_before_pct": busy_pct(), "notes": []}


def run_async(args, rep, scratch):
    """1,000 async tasks of `await asyncio.sleep(0.05)`, concurrency=2, async_concurrency=50:
    drain time against the ideal 1,000 x 0.05 / (2 x 50) = 0.5 s."""
    import bench_app

    res, live = new_res(rep), Live()
    try:
        server = live.server(RedisServer(scratch))
        r, m = server.r, args.async_n
        app, _ = driver_app(server.port, "wakaq_async")
        conc, aconc = app.concurrency, bench_app.SPECS["wakaq_async"]["async_concurrency"]
        res["app_async_concurrency_attr"] = getattr(app, "async_concurrency", None)
        app.tasks["asleep"].delay_many([(i,) for i in range(m)])
        d, popens, sampler = drain(
            server,
            "wakaq_async",
            m,
            scratch,
            f"a{rep}-async",
            timeout=args.async_timeout,
            partial=True,
        )
        live.add(popens, sampler)
        t_end = d.get("t_done_wall") or time.time()
        starts = sorted(float(r.get(k)) for k in r.scan_iter("async_t0:*"))
        live.stop(popens, "async")
        done = int(r.get("done") or 0)
        ideal = m * bench_app.ASYNC_SLEEP / (conc * aconc) if aconc else None
        res.update(
            n=m,
            concurrency=conc,
            async_concurrency=aconc,
            done=done,
            drain=d,
            children_started=len(starts),
            ideal_s=ideal,
            timed_out=d.get("seconds") is None,
        )
        if starts:
            span = t_end - starts[0]
            res["drain_from_first_start_s"] = span
            res["startup_s"] = starts[0] - (t_end - (d["seconds"] or 0)) if d["seconds"] else None
            res["rate_from_first_start"] = done / span
            if ideal:
                res["ideal_rate"] = m / ideal
                res["vs_ideal_rate"] = res["rate_from_first_start"] / res["ideal_rate"]
        res["drain_s_from_spawn"] = d["seconds"]
        if done > m:
            raise RuntimeError(f"async: counter {done} > {m} (tasks ran twice)")
    finally:
        live.close()
        res["notes"] += live.notes
    return res


def idle_window(server, secs, own):
    """Commands (and per command) Redis processed over `secs` s, minus the driver's own."""
    c0, s0 = stats(server, "commandstats"), stats(server)["total_commands_processed"]
    t0 = perf_counter()
    time.sleep(secs)
    s1, c1 = stats(server)["total_commands_processed"], stats(server, "commandstats")
    el = perf_counter() - t0
    per = {k.replace("cmdstat_", ""): (c1.get(k, 0) - c0.get(k, 0)) for k in c1}
    per = {k: v for k, v in per.items() if v}
    return {
        "seconds": el,
        "commands": s1 - s0 - own,
        "per_s": (s1 - s0 - own) / el,
        "by_command_raw": dict(sorted(per.items(), key=lambda kv: -kv[1])),
    }


def run_idle(args, rep, scratch):
    """Redis commands/s of 1 idle worker (concurrency=2, 3 queues) and of 3 idle workers over
    `--idle-seconds` (INFO stats total_commands_processed, the driver's own INFO calls
    subtracted: measured on the same server with no worker); then 3 delayed tasks (eta 1.0 /
    1.25 / 1.5 s) on the 3 idle workers: how late each ran."""
    res, live = new_res(rep), Live()
    try:
        server = live.server(RedisServer(scratch))
        r = server.r
        app, _ = driver_app(server.port, "wakaq_idle")
        cal = idle_window(server, 0.2, 0)
        own = cal["commands"]
        res["own_commands_per_window"] = own
        for workers in (1, 3):
            popens = live.add(
                start(
                    worker_argvs("wakaq_idle", workers),
                    server.port,
                    os.path.join(scratch, f"i{rep}-{workers}.log"),
                )
            )
            wait_workers(r, app, workers, popens)
            time.sleep(args.idle_settle)
            w = idle_window(server, args.idle_seconds, own)
            if any(p.poll() is not None for p in popens):
                raise RuntimeError("an idle worker exited during the window")
            res[f"w{workers}"] = w
            if workers == 3:
                r.delete("lat")
                lat = app.tasks["lat"]
                for d in (1.0, 1.25, 1.5):
                    lat.delay(time.time() + d, eta=d)
                deadline = time.monotonic() + 6
                while r.llen("lat") < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
                late = sorted(float(x) for x in r.lrange("lat", 0, -1))
                res["eta_late_ms"] = [x * 1e3 for x in late]
                res["eta_late_max_ms"] = max(late) * 1e3 if len(late) == 3 else None
            live.stop(popens, f"idle x{workers}")
    finally:
        live.close()
        res["notes"] += live.notes
    return res


def run_cluster(args, rep, scratch):
    """Drain of N noop tasks on a local 3-master Redis Cluster against a single redis-server,
    same run (and the raw floor on the single server)."""
    res, live = new_res(rep), Live()
    try:
        single = live.server(RedisServer(scratch))
        t = perf_counter()
        cl = live.server(RedisClusterServers(scratch, 3))
        res["cluster_setup_s"] = perf_counter() - t
        n = args.n
        res["raw_drain"] = raw_floor(live, single, n, scratch, f"c{rep}-raw")
        for label in ("single", "cluster") if rep % 2 else ("cluster", "single"):
            srv = single if label == "single" else cl
            res[label] = wakaq_drain(live, srv, "wakaq", n, scratch, f"c{rep}-{label}")
        app, _ = driver_app(cl.port, "wakaq", True)
        slot = cl.r.keyslot(qkey(app))
        res["app_slot"] = slot
        res["app_node"] = cl.r.get_node_from_key(qkey(app)).name
        res["ratio"] = res["cluster"]["rate"] / res["single"]["rate"]
        res["ratio_excl_startup"] = (
            res["cluster"]["rate_excl_startup"] / res["single"]["rate_excl_startup"]
        )
        res["single_vs_raw"] = res["single"]["rate"] / res["raw_drain"]["rate"]
    finally:
        live.close()
        res["notes"] += live.notes
    return res


def run_loglevel(args, rep, scratch):
    """Drain with the per-task log line (worker_log_level INFO) and without (WARNING), and
    the raw floor, same redis-server."""
    res, live = new_res(rep), Live()
    try:
        server = live.server(RedisServer(scratch))
        n = args.n
        res["raw_drain"] = raw_floor(live, server, n, scratch, f"l{rep}-raw")
        for spec in ("wakaq", "wakaq_warning") if rep % 2 else ("wakaq_warning", "wakaq"):
            label = "info" if spec == "wakaq" else "warning"
            res[label] = wakaq_drain(live, server, spec, n, scratch, f"l{rep}-{label}")
        f = res["raw_drain"]
        res["ratio"] = {k: res[k]["rate"] / f["rate"] for k in ("info", "warning")}
        res["ratio_excl_startup"] = {
            k: res[k]["rate_excl_startup"] / f["rate_excl_startup"] for k in ("info", "warning")
        }
    finally:
        live.close()
        res["notes"] += live.notes
    return res


def run_queues(args, rep, scratch):
    """Drain with 1, 50 and 200 queues in the app, every task on the lowest-priority queue."""
    res, live = new_res(rep), Live()
    try:
        server = live.server(RedisServer(scratch))
        n = args.n
        order = [1, 50, 200]
        order = order[rep % 3 :] + order[: rep % 3]  # rotate the order by repeat
        for q in order:
            res[f"q{q}"] = wakaq_drain(live, server, f"wakaq_q{q}", n, scratch, f"q{rep}-{q}")
        res["ratio"] = {f"q{q}": res[f"q{q}"]["rate"] / res["q1"]["rate"] for q in (50, 200)}
        res["ratio_excl_startup"] = {
            f"q{q}": res[f"q{q}"]["rate_excl_startup"] / res["q1"]["rate_excl_startup"]
            for q in (50, 200)
        }
    finally:
        live.close()
        res["notes"] += live.notes
    return res


def _resp_len(*parts):
    """Bytes of one command as redis-py sends it (RESP array of bulk strings)."""
    out = len(f"*{len(parts)}\r\n")
    for p in parts:
        out += len(f"${len(p)}\r\n") + len(p) + 2
    return out


def _bytes_sender(server, kind, arg):
    """send(i) of one task with the argument `arg`; for wakaq, after a warm-up task (the
    connection and the script load are not counted)."""
    r = server.r
    if kind == "raw":
        return lambda i: r.rpush("raw:default", json.dumps({"fn": "big", "args": [arg]}))
    app, _ = driver_app(server.port, kind)
    big = app.tasks["big"]
    big.delay("y")  # connect + script load, not counted
    deadline = time.monotonic() + 10
    while int(r.get("done") or 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("bytes: the warm-up task did not run")
        time.sleep(0.01)
    time.sleep(0.2)  # its ack
    r.delete("done")
    return lambda i: big.delay(arg)


def bytes_phase(server, kind, m, size, window, popens):
    """Send m tasks with a `size`-byte string argument (at most `window` not yet done),
    wait for all; Redis input bytes (INFO stats total_net_input_bytes) minus the driver's
    own polls and INFO calls."""
    r = server.r
    send = _bytes_sender(server, kind, "x" * size)
    polls = 0
    b0 = stats(server)["total_net_input_bytes"]
    t0 = perf_counter()
    done = 0
    for i in range(m):
        send(i)
        while i + 1 - done >= window:
            done = int(r.get("done") or 0)
            polls += 1
            if i + 1 - done >= window:
                time.sleep(0.0005)
            if any(p.poll() is not None for p in popens):
                raise RuntimeError(f"bytes {kind}: a worker exited")
    deadline = time.monotonic() + 120
    while done < m:
        if time.monotonic() > deadline:
            raise RuntimeError(f"bytes {kind}: {done}/{m} done after 120 s")
        time.sleep(0.002)
        done = int(r.get("done") or 0)
        polls += 1
    el = perf_counter() - t0
    time.sleep(0.3)  # the last acks
    b1 = stats(server)["total_net_input_bytes"]
    own = polls * _resp_len("GET", "done") + 2 * _resp_len("INFO", "stats")
    got = b1 - b0 - own
    return {
        "tasks": m,
        "arg_bytes": size,
        "seconds": el,
        "input_bytes": got,
        "input_bytes_per_task": got / m,
        "ratio_to_arg": got / (m * size),
        "driver_polls": polls,
    }


def run_bytes(args, rep, scratch):
    """Redis bytes received per task for tasks with a 1 MiB argument (enqueue + run + ack),
    wakaq against the raw floor (RPUSH + BLPOP) in the same run."""
    res, live = new_res(rep), Live()
    try:
        server = live.server(RedisServer(scratch))
        m, size = args.bytes_n, args.bytes_size
        app, _ = driver_app(server.port)
        for kind in ("raw", "wakaq") if rep % 2 else ("wakaq", "raw"):
            server.flushall()
            popens = live.add(
                start(worker_argvs(kind), server.port, os.path.join(scratch, f"b{rep}-{kind}.log"))
            )
            if kind != "raw":
                wait_workers(server.r, app, 1, popens)
            res[kind] = bytes_phase(server, kind, m, size, args.bytes_window, popens)
            live.stop(popens, f"bytes {kind}", **({"timeout": 3} if kind == "raw" else {}))
        res["ratio_to_raw"] = res["wakaq"]["input_bytes"] / res["raw"]["input_bytes"]
    finally:
        live.close()
        res["notes"] += live.notes
    return res


# ------------------------------------------------------------------ rtt: a remote Redis (--rtt-ms)

PROXY_PY = os.path.join(HERE, "delay_proxy.py")


class DelayProxy:
    """bench/delay_proxy.py on a free loopback port, forwarding to `target_port` with
    `delay_ms` added per round trip (half each way); counters on demand (SIGUSR1 -> one JSON
    line appended to its --stats file)."""

    def __init__(self, target_port, delay_ms, scratch, tag):
        import select

        self.port, self.lines = free_port(), 0
        self.stats_path = os.path.join(scratch, f"{tag}.proxy.jsonl")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        with open(os.path.join(scratch, f"{tag}.proxy.log"), "ab") as log:
            self.proc = subprocess.Popen(
                [
                    PY,
                    PROXY_PY,
                    "--listen",
                    str(self.port),
                    "--target",
                    str(target_port),
                    "--delay-ms",
                    str(delay_ms),
                    "--stats",
                    self.stats_path,
                    "--ready",
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self.pid = self.proc.pid
        ready = select.select([self.proc.stdout], [], [], 10)[0]
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith(b"ready"):
            self.stop()
            raise RuntimeError(f"delay proxy did not start (see {scratch}/{tag}.proxy.log)")

    def snapshot(self):
        """{connections, up_chunks, up_bytes, down_chunks, down_bytes, t, cpu_s} now."""
        cpu = cpu_seconds(self.pid)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while True:
            raw = _read(self.stats_path) or b""
            rows = raw.splitlines()
            if raw.endswith(b"\n") and len(rows) > self.lines:
                self.lines = len(rows)
                out = json.loads(rows[-1])
                out["cpu_s"] = cpu
                return out
            if time.monotonic() > deadline:
                raise RuntimeError("delay proxy: no counters after SIGUSR1")
            time.sleep(0.0005)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def ping_ms(port, count=300):
    """PING round trips on one connection (after 30 unmeasured): (p50, p99) in ms."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    try:
        for i in range(count + 30):
            t = perf_counter()
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            buf = b""
            while not buf.endswith(b"\r\n"):
                chunk = s.recv(64)
                if not chunk:
                    raise RuntimeError("PING: connection closed")
                buf += chunk
            if i >= 30:
                out.append((perf_counter() - t) * 1e3)
    finally:
        s.close()
    out.sort()
    return pct(out, 50), pct(out, 99)


def rtt_n(args, d):
    """Tasks per drain at added RTT d (ms): --rtt-n, or about 4 s of the floor's rate."""
    if args.rtt_n:
        return args.rtt_n
    if d in ("direct", "0") or float(d) == 0:
        return 10000
    return int(min(10000, max(1000, round(4000 / float(d), -2))))


def machine_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v[:8])


def cpu_mark(server, proxy, popens):
    """CPU seconds of what this run started (redis, proxy, workers, the driver and its reaped
    children) and the machine's busy/total jiffies, for foreign_cpu()."""
    t = os.times()
    ours = (
        sum(cpu_seconds(p) for p in server.pids)
        + cpu_seconds(proxy.pid)
        + sum(cpu_seconds(p) for p in tree([p.pid for p in popens]))
        + t.user
        + t.system
        + t.children_user
        + t.children_system
    )
    return {"ours_s": ours, "jiffies": machine_jiffies(), "t": perf_counter()}


def foreign_cpu(a, b):
    """CPU % (100 = one core) of the machine, of this run's processes, and of the others
    (machine - ours) between two cpu_mark()s."""
    dt = b["t"] - a["t"]
    machine = 100 * (b["jiffies"][0] - a["jiffies"][0]) / CLK_TCK / dt
    ours = 100 * (b["ours_s"] - a["ours_s"]) / dt
    return {
        "machine_cpu_pct": machine,
        "ours_cpu_pct": ours,
        "foreign_cpu_pct": max(0.0, machine - ours),
    }


def _window(a, b, tasks):
    """Proxy counters between two snapshots, per task: round trips (= chunks client -> redis,
    one per request written: no client here pipelines), chunks back, proxy CPU."""
    dt = b["t"] - a["t"]
    return {
        "tasks": tasks,
        "seconds": dt,
        "round_trips_per_task": (b["up_chunks"] - a["up_chunks"]) / tasks,
        "down_chunks_per_task": (b["down_chunks"] - a["down_chunks"]) / tasks,
        "up_bytes_per_task": (b["up_bytes"] - a["up_bytes"]) / tasks,
        "new_connections": b["connections"] - a["connections"],
        "proxy_cpu_pct": 100 * (b["cpu_s"] - a["cpu_s"]) / dt if dt > 0 else None,
    }


def rtt_variant(live, server, kind, d, n, args, scratch, tag):
    """One variant at one added RTT: N tasks queued directly, the workers (through a fresh
    delay proxy unless d == "direct") drain them, then pickup on the idle workers (producer
    direct). Returns the drain figures with "pickup", "proxy" (steady-state window of the
    drain) and "proxy_pickup" (the pickup phase, per lat task)."""
    server.flushall()
    if kind.startswith("raw"):
        run_producer(raw_producer("pipe", n), server.port)
    else:
        _, noop = driver_app(server.port, kind)
        noop.delay_many([(i,) for i in range(n)])
    proxy = None if d == "direct" else live.server(DelayProxy(server.port, float(d), scratch, tag))
    snaps = {}

    def mark(event):
        def f(v, popens):
            snaps[event] = (v, proxy.snapshot(), cpu_mark(server, proxy, popens))

        return f if proxy else None

    out, popens, sampler = drain(
        server,
        kind,
        n,
        scratch,
        tag,
        worker_port=proxy and proxy.port,
        on_first=mark("first"),
        on_done=mark("done"),
    )
    live.add(popens, sampler)
    if proxy:
        (v0, a, ca), (v1, b, cb) = snaps["first"], snaps["done"]
        out["proxy"] = _window(a, b, v1 - v0)
        out.update(foreign_cpu(ca, cb))
    if args.latency_count:
        before = proxy and proxy.snapshot()
        out["pickup"] = pickup(
            server,
            "wakaq" if kind.startswith("wakaq") else "raw",
            args.latency_count,
            args.latency_interval,
        )
        if proxy:
            time.sleep(0.3)  # the last claim / BLPOP goes out
            out["proxy_pickup"] = _window(before, proxy.snapshot(), args.latency_count + 1)
    live.stop(popens, tag, **({"timeout": 3} if kind.startswith("raw") else {}))
    check_count(server.r, n, f"{tag} drain")
    if proxy:
        live.close_one(proxy)
    return out


def wait_quiet(limit_s, busy=15.0):
    """Wait up to limit_s for the machine to be under `busy` % (of all cores); -> last %."""
    deadline = time.monotonic() + limit_s
    while True:
        b = busy_pct(0.3)
        if b < busy or time.monotonic() > deadline:
            return b


def run_rtt(args, rep, scratch):
    """The drain (and pickup) with the workers' Redis connections (queue and task body alike)
    going through bench/delay_proxy.py at each --rtt-ms; the floor (2 BLPOP consumers) and
    wakaq (1 worker, concurrency=2) each get a fresh proxy with the same settings, one
    redis-server per repeat. Producer and the driver's polls go to redis-server directly."""
    res, live = new_res(rep), Live()
    kinds = args.rtt_variants
    try:
        server = live.server(RedisServer(scratch))
        res["rtt"] = {}
        for d in args.rtt_ms:
            n = rtt_n(args, d)
            row = {"n": n}
            if d != "direct":
                p = live.server(DelayProxy(server.port, float(d), scratch, f"t{rep}-{d}-ping"))
                row["ping_p50_ms"], row["ping_p99_ms"] = ping_ms(p.port)
                live.close_one(p)
            order = kinds if rep % 2 else kinds[::-1]  # alternate the order by repeat
            for kind in order:
                for attempt in range(3):  # redone (twice at most) if others used the CPU
                    busy = wait_quiet(args.rtt_quiet_wait)
                    row[kind] = rtt_variant(
                        live, server, kind, d, n, args, scratch, f"t{rep}-{d}-{kind}-{attempt}"
                    )
                    row[kind]["busy_before_pct"] = busy
                    f = row[kind].get("foreign_cpu_pct")
                    if f is None or f <= args.rtt_max_foreign:
                        break
                    res["notes"].append(
                        f"+{d} ms {kind}: {f:.0f} % foreign CPU"
                        + (", redone" if attempt < 2 else ", kept (3rd try)")
                    )
            for kind in kinds:
                if kind != "raw" and "raw" in row:
                    row[kind]["vs_raw"] = row[kind]["rate"] / row["raw"]["rate"]
                    row[kind]["vs_raw_excl_startup"] = (
                        row[kind]["rate_excl_startup"] / row["raw"]["rate_excl_startup"]
                    )
            res["rtt"][d] = row
    finally:
        live.close()
        res["notes"] += live.notes
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


def cmd_split(d, top=8):
    by = d.get("redis_cmds_per_task_by_command") or {}
    return ", ".join(f"{k} {v:.2f}" for k, v in list(by.items())[:top])


def ge(v, t):
    return v is not None and v >= t


def le(v, t):
    return v is not None and v <= t


def _case_runs(cases, name, title, P, targets):
    """The section head of a case; its runs, or None if it did not run or has no run."""
    c = cases.get(name)
    if c is None:
        return None
    R = c["runs"]
    P(f"\n[{name}] {title} (median of {len(R)} run(s))")
    if c.get("error"):
        P(f"  ERROR: {c['error']}")
        targets.append((f"[{name}] ran without error", None, False))
    return R or None


def _report_async(R, a, P):
    targets = []
    P(
        f"  done {fmt(med(R, 'done'))}/{a['async_n']:,}; children that ran one: "
        f"{fmt(med(R, 'children_started'))}; timed out (>{a['async_timeout']} s): "
        f"{sum(bool(x.get('timed_out')) for x in R)} of {len(R)} run(s)"
    )
    P(
        f"  drain from the first task's start: {fmt(med(R, 'drain_from_first_start_s'), 3)} s "
        f"vs ideal {fmt(med(R, 'ideal_s'), 3)} s; rate {fmt(med(R, 'rate_from_first_start'))}/s "
        f"= {fmt(med(R, 'vs_ideal_rate'), 3)} x the ideal rate"
    )
    P(
        f"  from worker spawn: {fmt(med(R, 'drain_s_from_spawn'), 3)} s "
        f"(start-up to the first task {fmt(med(R, 'startup_s'), 3)} s)"
    )
    v = med(R, "vs_ideal_rate")
    targets.append(("[async] rate >= 0.5 x ideal (from 1st start)", v, ge(v, 0.5)))
    return targets


def _report_idle(R, a, P):
    targets = []
    for w in (1, 3):
        by = {}
        for run in R:
            for k, v in run[f"w{w}"]["by_command_raw"].items():
                by.setdefault(k, []).append(v / run[f"w{w}"]["seconds"])
        top = sorted(((statistics.median(v), k) for k, v in by.items()), reverse=True)[:8]
        P(
            f"  {w} idle worker(s): {fmt(med(R, f'w{w}.per_s'))} commands/s; by command "
            f"(incl. the driver's {fmt(med(R, 'own_commands_per_window'))} INFO calls): "
            + ", ".join(f"{k} {v:.2f}" for v, k in top)
        )
    P(
        "  delayed tasks (eta 1.0/1.25/1.5 s) on 3 idle workers, ran late by (ms): "
        + "; ".join(", ".join(f"{x:.0f}" for x in run.get("eta_late_ms", [])) for run in R)
    )
    v1, v3, late = med(R, "w1.per_s"), med(R, "w3.per_s"), med(R, "eta_late_max_ms")
    targets += [
        ("[idle] 1 idle worker <= 10 commands/s", v1, le(v1, 10)),
        ("[idle] 3 idle workers <= 25 commands/s", v3, le(v3, 25)),
        ("[idle] delayed task runs within 500 ms of due", late, le(late, 500)),
    ]
    return targets


def _report_cluster(R, a, P):
    targets = []
    P(
        f"  single {fmt(med(R, 'single.rate'))}/s (excl. start-up "
        f"{fmt(med(R, 'single.rate_excl_startup'))}), cluster {fmt(med(R, 'cluster.rate'))}/s "
        f"(excl. start-up {fmt(med(R, 'cluster.rate_excl_startup'))}); cluster/single "
        f"{fmt(med(R, 'ratio'), 3)} (excl. start-up {fmt(med(R, 'ratio_excl_startup'), 3)})"
    )
    P(
        f"  raw floor on the single server {fmt(med(R, 'raw_drain.rate'))}/s; single/raw "
        f"{fmt(med(R, 'single_vs_raw'), 3)}; redis commands/task single "
        f"{fmt(med(R, 'single.redis_cmds_per_task'))}, cluster (all nodes) "
        f"{fmt(med(R, 'cluster.redis_cmds_per_task'))}; app slot {R[0].get('app_slot')} on "
        f"{R[0].get('app_node')}; cluster set-up {fmt(med(R, 'cluster_setup_s'))} s"
    )
    v = med(R, "ratio")
    targets.append(("[cluster] drain on cluster / single (info)", v, ge(v, 0.0)))
    return targets


def _report_loglevel(R, a, P):
    targets = []
    for k in ("info", "warning"):
        P(
            f"  {k.upper():<8} {fmt(med(R, f'{k}.rate'))}/s (excl. start-up "
            f"{fmt(med(R, f'{k}.rate_excl_startup'))}) = {fmt(med(R, f'ratio.{k}'), 3)} x floor "
            f"(excl. start-up {fmt(med(R, f'ratio_excl_startup.{k}'), 3)}); log "
            f"{fmt(med(R, f'{k}.log_bytes_per_task'))} bytes/task"
        )
    P(
        f"  raw floor {fmt(med(R, 'raw_drain.rate'))}/s (excl. start-up "
        f"{fmt(med(R, 'raw_drain.rate_excl_startup'))})"
    )
    vi, vw = med(R, "ratio.info"), med(R, "ratio.warning")
    targets += [
        ("[loglevel] drain at INFO >= 0.80 x floor", vi, ge(vi, 0.8)),
        ("[loglevel] drain at WARNING >= 0.90 x floor", vw, ge(vw, 0.9)),
    ]
    return targets


def _report_queues(R, a, P):
    targets = []
    for q in (1, 50, 200):
        P(
            f"  {q:>3} queue(s): {fmt(med(R, f'q{q}.rate'))}/s (excl. start-up "
            f"{fmt(med(R, f'q{q}.rate_excl_startup'))}); "
            + (
                f"vs 1 queue {fmt(med(R, f'ratio.q{q}'), 3)} (excl. start-up "
                f"{fmt(med(R, f'ratio_excl_startup.q{q}'), 3)}); "
                if q > 1
                else ""
            )
            + f"redis commands/task {fmt(med(R, f'q{q}.redis_cmds_per_task'))}, "
            f"bytes in/task {fmt(med(R, f'q{q}.redis_in_bytes_per_task'))}, "
            f"redis CPU us/task {fmt(med(R, f'q{q}.redis_cpu_us_per_task'))}, "
            f"worker CPU us/task {fmt(med(R, f'q{q}.worker_cpu_us_per_task'))}"
        )
    P("  commands/task by command, 200 queues (run 1): " + cmd_split(R[0]["q200"]))
    v = med(R, "ratio.q200")
    targets.append(("[queues] 200 queues >= 0.90 x 1 queue", v, ge(v, 0.9)))
    return targets


def _report_bytes(R, a, P):
    targets = []
    for k in ("wakaq", "raw"):
        P(
            f"  {k:<6} {fmt(med(R, f'{k}.input_bytes_per_task'))} bytes/task = "
            f"{fmt(med(R, f'{k}.ratio_to_arg'), 3)} x the argument; "
            f"{fmt(med(R, f'{k}.seconds'))} s"
        )
    P(f"  wakaq / raw floor (RPUSH + BLPOP): {fmt(med(R, 'ratio_to_raw'), 3)}")
    v = med(R, "wakaq.ratio_to_arg")
    targets.append(("[bytes] input bytes <= 1.2 x payload", v, le(v, 1.2)))
    return targets


def _rtt_rows(R, d):
    """The runs' rows of the rtt case at added RTT d."""
    return [run["rtt"][d] for run in R if d in run.get("rtt", {})]


def _rtt_table(R, a, P):
    """Drain rates, ratio to the floor and pickup per added RTT, one line per RTT."""
    kinds = a["rtt_variants"]
    P(
        "  drain tasks/s from worker start (excl. start-up); x floor = median of per-run "
        "ratios; pickup p50/p99 ms; RT = requests through the proxy per task (drain) and per "
        "lat task (pickup phase)"
    )
    P(
        f"  {'RTT':<7}{'PING p50':>9}{'N':>7}  "
        + "".join(f"{k + ' /s':>22}" + ("" if k == "raw" else f"{'x floor':>8}") for k in kinds)
        + "".join(f"{k + ' pickup':>22}" for k in kinds)
    )
    for d in a["rtt_ms"]:
        rows = _rtt_rows(R, d)
        if not rows:
            continue
        ping, n = fmt(med(rows, "ping_p50_ms"), 2), fmt(med(rows, "n"))
        line = f"  {'+' + d + ' ms':<7}{ping:>9}{n:>7}  "
        for k in kinds:
            rate = f"{fmt(med(rows, f'{k}.rate'))} ({fmt(med(rows, f'{k}.rate_excl_startup'))})"
            line += f"{rate:>22}"
            if k != "raw":
                line += f"{fmt(med(rows, f'{k}.vs_raw'), 3):>8}"
        for k in kinds:
            p50, p99 = med(rows, f"{k}.pickup.p50_ms"), med(rows, f"{k}.pickup.p99_ms")
            line += f"{fmt(p50, 2) + ' / ' + fmt(p99, 2):>22}"
        P(line)


def _rtt_per_task(R, a, P):
    """Round trips, proxy / worker / foreign CPU and redis commands per task and RTT."""
    P(
        "  per task (medians): RT drain / RT pickup, proxy CPU % (drain), worker CPU us/task, "
        "redis commands/task (run 1)"
    )
    for d in a["rtt_ms"]:
        rows = _rtt_rows(R, d)
        for k in a["rtt_variants"] if rows else ():
            P(
                f"    +{d:<5} {k:<13} RT {fmt(med(rows, f'{k}.proxy.round_trips_per_task'), 2)}"
                f" / {fmt(med(rows, f'{k}.proxy_pickup.round_trips_per_task'), 2)}, proxy CPU "
                f"{fmt(med(rows, f'{k}.proxy.proxy_cpu_pct'), 1)} %, worker CPU "
                f"{fmt(med(rows, f'{k}.worker_cpu_us_per_task'))} us, foreign CPU "
                f"{fmt(med(rows, f'{k}.foreign_cpu_pct'), 1)} %; " + cmd_split(rows[0][k], 6)
            )


def _report_rtt(R, a, P):
    _rtt_table(R, a, P)
    _rtt_per_task(R, a, P)
    return []


# (case, its title from the arguments, its section): the order of the report
_CASE_REPORTS = (
    (
        "async",
        lambda a: (
            f"{a['async_n']:,} async tasks, each await asyncio.sleep(0.05); "
            "concurrency=2, async_concurrency=50"
        ),
        _report_async,
    ),
    (
        "idle",
        lambda a: (
            f"idle Redis commands/s over {a['idle_seconds']} s, app with 3 queues, concurrency=2"
        ),
        _report_idle,
    ),
    (
        "cluster",
        lambda a: f"drain of N={a['n']} on a 3-master Redis Cluster vs a single redis-server",
        _report_cluster,
    ),
    (
        "loglevel",
        lambda a: f"drain of N={a['n']} with the per-task log line (INFO) and without (WARNING)",
        _report_loglevel,
    ),
    (
        "queues",
        lambda a: f"drain of N={a['n']}, tasks on the lowest-priority queue",
        _report_queues,
    ),
    (
        "bytes",
        lambda a: (
            f"Redis bytes received per task, {a['bytes_n']:,} tasks with a "
            f"{a['bytes_size']:,}-byte argument (enqueue + run + ack)"
        ),
        _report_bytes,
    ),
    (
        "rtt",
        lambda a: (
            "a remote Redis: every worker connection (queue and task body) through "
            "bench/delay_proxy.py adding RTT ms; producer and polls direct"
        ),
        _report_rtt,
    ),
)


def report_cases(cases, meta, P):
    """The sections of the cases beyond main/scale; returns their targets."""
    a = meta["args"]
    targets = []
    for name, title, section in _CASE_REPORTS:
        R = _case_runs(cases, name, title(a), P, targets)
        if R:
            targets += section(R, a, P)
    return targets


def _report_main(R, meta, P):
    """The main section: wakaq against the floor; returns its targets."""
    targets = []
    k = len(R)
    P(
        f"\nwakaq vs the floor (plain redis-py), N={meta['args']['n']}, bulk N="
        f"{meta['args']['bulk_n']}, median of {k} run(s); ratio = median of per-run ours/floor"
    )
    P(f"{'figure':<34}{'wakaq':>12}{'floor':>12}{'ratio':>8}")
    rows = [
        ("drain tasks/s (from worker start)", "drain.rate", "raw_drain.rate", "ratio.drain"),
        (
            "drain tasks/s (excl. start-up)",
            "drain.rate_excl_startup",
            "raw_drain.rate_excl_startup",
            "ratio.drain_excl_startup",
        ),
        ("start-up s (spawn -> 1st task)", "drain.startup_s", "raw_drain.startup_s", None),
        ("enqueue .delay() tasks/s", "enqueue.rate", "raw_enqueue.rate", "ratio.enqueue"),
        ("enqueue first call ms", "enqueue.first_call_ms", "raw_enqueue.first_call_ms", None),
        ("bulk .delay_many() tasks/s", "bulk.rate", "raw_pipe.rate", "ratio.bulk"),
        ("pickup p50 ms", "pickup.p50_ms", "raw_pickup.p50_ms", "ratio.pickup_p50"),
        ("pickup p99 ms", "pickup.p99_ms", "raw_pickup.p99_ms", "ratio.pickup_p99"),
        (
            "peak RSS MiB (tree, summed)",
            "drain.peak_rss_mib",
            "raw_drain.peak_rss_mib",
            "ratio.rss",
        ),
        (
            "peak PSS MiB (tree, summed)",
            "drain.peak_pss_mib",
            "raw_drain.peak_pss_mib",
            "ratio.pss",
        ),
        ("processes", "drain.procs", "raw_drain.procs", None),
        (
            "worker CPU us/task",
            "drain.worker_cpu_us_per_task",
            "raw_drain.worker_cpu_us_per_task",
            "ratio.worker_cpu",
        ),
        (
            "redis CPU us/task",
            "drain.redis_cpu_us_per_task",
            "raw_drain.redis_cpu_us_per_task",
            "ratio.redis_cpu",
        ),
        (
            "redis commands/task (drain)",
            "drain.redis_cmds_per_task",
            "raw_drain.redis_cmds_per_task",
            None,
        ),
        (
            "redis bytes in/task (drain)",
            "drain.redis_in_bytes_per_task",
            "raw_drain.redis_in_bytes_per_task",
            None,
        ),
    ]
    for label, ours, floor, ratio in rows:
        P(
            f"{label:<34}{fmt(med(R, ours)):>12}{fmt(med(R, floor)):>12}"
            f"{fmt(med(R, ratio), 2) if ratio else '':>8}"
        )
    P(
        "  commands/task by command (run 1, wakaq drain, incl. the task's INCR): "
        + cmd_split(R[0]["drain"])
    )
    P(
        f"{'2 bare redis-py processes RSS MiB':<34}{fmt(med(R, 'bare.rss_mib')):>12}"
        f"   (PSS {fmt(med(R, 'bare.pss_mib'))}); wakaq RSS above them: "
        f"{fmt(med(R, 'rss_above_bare_mib'))} MiB (PSS {fmt(med(R, 'pss_above_bare_mib'))})"
    )
    P(
        "floor: producer RPUSH per task (bulk: RPUSH pipelined x1000); 2 consumers "
        "BLPOP + json.loads + call + INCR"
    )
    targets += [
        # The main app logs one INFO line per attempt (on by default): issue 12 allows it
        # 0.8 x floor; the 0.9 x floor drain is the loglevel case's WARNING figure.
        ("drain (INFO) >= 0.80 x floor", med(R, "ratio.drain"), med(R, "ratio.drain") >= 0.80),
        (
            "drain excl. start-up >= 0.80 x floor (info)",
            med(R, "ratio.drain_excl_startup"),
            med(R, "ratio.drain_excl_startup") >= 0.80,
        ),
        (
            "single enqueue >= 0.90 x floor",
            med(R, "ratio.enqueue"),
            med(R, "ratio.enqueue") >= 0.90,
        ),
        ("pickup p50 <= 1 ms", med(R, "pickup.p50_ms"), med(R, "pickup.p50_ms") <= 1.0),
        ("pickup p99 <= 3 ms", med(R, "pickup.p99_ms"), med(R, "pickup.p99_ms") <= 3.0),
        (
            "worker RSS <= 2 bare + 10 MiB",
            med(R, "rss_above_bare_mib"),
            med(R, "rss_above_bare_mib") <= 10.0,
        ),
        (
            "worker PSS <= 2 bare + 10 MiB (info)",
            med(R, "pss_above_bare_mib"),
            med(R, "pss_above_bare_mib") <= 10.0,
        ),
        ("bulk >= 100,000 tasks/s", med(R, "bulk.rate"), med(R, "bulk.rate") >= 100000),
    ]
    return targets


def _report_scale(S, meta, P):
    """The scale section; returns its targets."""
    targets = []
    a = meta["args"]
    P(f"\nscale (median of {len(S)} run(s)):")
    P(
        f"  (a) drain of N={a['n']} with {a['eta_count']:,} delayed tasks pending (+1 h): "
        f"{fmt(med(S, 'a.eta.rate'))}/s vs {fmt(med(S, 'a.base.rate'))}/s without = "
        f"{fmt(med(S, 'a.ratio'), 3)} "
        f"(excl. start-up {fmt(med(S, 'a.ratio_excl_startup'), 3)}); "
        f"peak RSS {fmt(med(S, 'a.eta.peak_rss_mib'))} "
        f"vs {fmt(med(S, 'a.base.peak_rss_mib'))} MiB; load {fmt(med(S, 'eta_load_s'))} s, "
        f"redis used_memory {fmt(med(S, 'redis_used_memory_mib'))} MiB"
    )
    P(
        f"  (b) {a['due_count']:,} delayed tasks due at one moment: all ran in "
        f"{fmt(med(S, 'b.seconds_from_due'))} s ({fmt(med(S, 'b.rate'))}/s) from the due time "
        f"(all moved to the queue after {fmt(med(S, 'b.all_moved_s'), 3)} s); "
        f"max SLOWLOG entry (>50 ms) {fmt(med(S, 'b.max_cmd_ms'))} ms"
    )
    for run in S:
        for label, entries in (
            ("(a) base", run["a"]["base"]["slowlog"]),
            ("(a) eta", run["a"]["eta"]["slowlog"]),
            ("(b)", run["b"]["slowlog"]),
        ):
            for e in entries:
                P(
                    f"      run {run['repeat']} {label} SLOWLOG {e['duration_us'] / 1e3:.1f} ms: "
                    f"{e['command']}"
                )
    all_ran = all(run["b"]["done"] == a["due_count"] and run["b"]["eta_left"] == 0 for run in S)
    no_slow = all(not run["b"]["slowlog"] and not run["a"]["eta"]["slowlog"] for run in S)
    targets += [
        (
            f"(a) drain with {a['eta_count']:,} delayed >= 0.90 x without",
            med(S, "a.ratio"),
            med(S, "a.ratio") >= 0.90,
        ),
        (
            "(a) worker RSS does not grow (<= +1 MiB)",
            med(S, "a.rss_growth_mib"),
            med(S, "a.rss_growth_mib") <= 1.0,
        ),
        ("(b) all due tasks ran", med(S, "b.done"), all_ran),
        ("(b) no command over 50 ms (SLOWLOG)", med(S, "b.max_cmd_ms"), no_slow),
    ]
    return targets


def report(main_runs, scale_runs, meta, cases=None):
    lines = []
    P = lines.append
    targets = []
    if main_runs:
        targets += _report_main(main_runs, meta, P)
    if scale_runs:
        targets += _report_scale(scale_runs, meta, P)
    cases = cases or {}
    targets += report_cases(cases, meta, P)
    for k in ("main", "scale"):
        if cases.get(k, {}).get("error"):
            P(f"\n[{k}] ERROR: {cases[k]['error']}")
            targets.append((f"[{k}] ran without error", None, False))
    P("\ntargets:")
    for label, v, ok in targets:
        digits = 3 if v is not None and abs(v) < 10 else None
        P(f"  {'PASS' if ok else 'FAIL'}  {label:<46} {fmt(v, digits)}")
    every = [r for c in cases.values() for r in c["runs"]] if cases else main_runs + scale_runs
    notes = [f"run {run['repeat']}: {x}" for run in every for x in run["notes"]]
    if notes:
        P("notes: " + "; ".join(notes))
    errors = [
        f"{k} (run {c['error_repeat']}): {c['error']}" for k, c in cases.items() if c.get("error")
    ]
    if errors:
        P("errors: " + "; ".join(errors))
    P(
        f"\n{meta['pinning']}. machine busy before runs: "
        f"{[run['busy_before_pct'] for run in every]} %"
    )
    return "\n".join(lines), [{"target": t, "value": v, "pass": bool(ok)} for t, v, ok in targets]


def git_rev():
    try:
        rev = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "wakaq.py"], capture_output=True, text=True
        ).stdout.strip()
        return rev + ("+dirty wakaq.py" if dirty else "")
    except OSError:
        return None


CASES = ("main", "async", "idle", "cluster", "loglevel", "queues", "bytes", "scale", "rtt")
DEFAULT_CASES = CASES[:-2]


def summary(case, res):
    """One progress line per finished case run."""
    if case == "main":
        return (
            f"drain {res['drain']['rate']:,.0f}/s (floor {res['raw_drain']['rate']:,.0f}), "
            f"enqueue {res['enqueue']['rate']:,.0f}/s (floor {res['raw_enqueue']['rate']:,.0f}), "
            f"bulk {res['bulk']['rate']:,.0f}/s, pickup p50/p99 "
            f"{res['pickup']['p50_ms']:.2f}/{res['pickup']['p99_ms']:.2f} ms, "
            f"RSS {res['drain']['peak_rss_mib']:.1f} MiB"
        )
    if case == "scale":
        return (
            f"(a) {res['a']['eta']['rate']:,.0f}/s with delayed vs "
            f"{res['a']['base']['rate']:,.0f}/s without; (b) {res['b']['done']:,} done in "
            f"{res['b']['seconds_from_due']} s, slowlog {len(res['b']['slowlog'])}"
        )
    if case == "async":
        return (
            f"{res['done']}/{res['n']} in {fmt(res.get('drain_from_first_start_s'), 3)} s from "
            f"the first start (ideal {fmt(res['ideal_s'], 3)} s)"
        )
    if case == "idle":
        return (
            f"1 worker {res['w1']['per_s']:.1f} cmds/s, 3 workers {res['w3']['per_s']:.1f} "
            f"cmds/s; delayed late by {[round(x) for x in res.get('eta_late_ms', [])]} ms"
        )
    if case == "cluster":
        return (
            f"single {res['single']['rate']:,.0f}/s, cluster {res['cluster']['rate']:,.0f}/s "
            f"({res['ratio']:.3f}), raw {res['raw_drain']['rate']:,.0f}/s"
        )
    if case == "loglevel":
        return (
            f"INFO {res['info']['rate']:,.0f}/s ({res['ratio']['info']:.3f} x floor), "
            f"WARNING {res['warning']['rate']:,.0f}/s ({res['ratio']['warning']:.3f}), "
            f"floor {res['raw_drain']['rate']:,.0f}/s"
        )
    if case == "queues":
        return ", ".join(f"{q} queues {res[f'q{q}']['rate']:,.0f}/s" for q in (1, 50, 200))
    if case == "bytes":
        return (
            f"wakaq {res['wakaq']['ratio_to_arg']:.3f} x the argument, raw "
            f"{res['raw']['ratio_to_arg']:.3f} x"
        )
    if case == "rtt":
        return _summary_rtt(res)
    return ""


def _summary_rtt(res):
    """The rtt case's progress line: each variant's drain rate (and pickup p50) per RTT."""

    def one(k, v):
        p = v.get("pickup")
        return f"{k} {v['rate']:,.0f}/s" + (f" (p50 {p['p50_ms']:.2f} ms)" if p else "")

    return "; ".join(
        f"+{d} ms: " + ", ".join(one(k, v) for k, v in row.items() if isinstance(v, dict))
        for d, row in res["rtt"].items()
    )


def _where(e):
    """Where an exception was raised: the last bench line on its way, and the last line."""
    tb = traceback.extract_tb(e.__traceback__)
    mine = [f for f in tb if f.filename.startswith(HERE)]
    where = (
        f" (at bench {os.path.basename(mine[-1].filename)}:{mine[-1].lineno} "
        f"{mine[-1].line.strip()[:80]!r}"
        if mine
        else " ("
    )
    last = tb[-1] if tb else None
    return where + (
        f"; raised in {os.path.basename(last.filename)}:{last.lineno})" if last else ")"
    )


def parse_args():
    """The command line; returns the arguments and the cases to run, in order."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--case",
        default=None,
        help=f"comma-separated cases to run, of {','.join(CASES)}; 'all' = every "
        f"case but scale and rtt (default: {','.join(DEFAULT_CASES)}; with "
        f"--rtt-ms alone: rtt)",
    )
    ap.add_argument("--n", type=int, default=20000, help="tasks per drain/enqueue (default 20000)")
    ap.add_argument("--bulk-n", type=int, default=100000, help="tasks in the delay_many() run")
    ap.add_argument("--repeat", type=int, help="runs per figure (default 3; --quick: 1)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="N=5000, bulk N=20000, 1 repeat, "
        "scale: 100,000 delayed and 20,000 due; async time-out 15 s",
    )
    ap.add_argument("--scale", action="store_true", help="also the scale scenarios")
    ap.add_argument("--scale-only", action="store_true", help="only the scale scenarios")
    ap.add_argument("--eta-count", type=int, default=1_000_000)
    ap.add_argument("--due-count", type=int, default=100_000)
    ap.add_argument(
        "--due-lead",
        type=float,
        default=3.0,
        help="(b) the due time is this many seconds after loading starts",
    )
    ap.add_argument("--latency-count", type=int, default=200)
    ap.add_argument("--latency-interval", type=float, default=0.02)
    ap.add_argument("--async-n", type=int, default=1000, help="async case: tasks (default 1000)")
    ap.add_argument(
        "--async-timeout",
        type=float,
        default=40.0,
        help="async case: give up (and report the partial rate) after this many s",
    )
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="idle case: window")
    ap.add_argument(
        "--idle-settle",
        type=float,
        default=1.0,
        help="idle case: wait this long after the workers registered",
    )
    ap.add_argument("--bytes-n", type=int, default=1000, help="bytes case: tasks")
    ap.add_argument("--bytes-size", type=int, default=2**20, help="bytes case: argument bytes")
    ap.add_argument(
        "--bytes-window",
        type=int,
        default=20,
        help="bytes case: at most this many sent and not yet done",
    )
    ap.add_argument(
        "--rtt-ms",
        help="rtt case (a remote Redis): comma-separated round-trip "
        "times in ms added by bench/delay_proxy.py between the workers and Redis "
        "('0': through the proxy, nothing added; 'direct': no proxy); given alone, "
        "only the rtt case runs (default with --case rtt: 0,0.5,1,2)",
    )
    ap.add_argument(
        "--rtt-n",
        type=int,
        help="rtt case: tasks per drain (default: 10000 at "
        "0 ms, else 4000 / RTT ms rounded, 1000..10000)",
    )
    ap.add_argument(
        "--rtt-variants",
        default="raw,wakaq",
        help="rtt case: what drains, of raw (the floor), wakaq, raw-prefetch (the "
        "floor fetching the next task while one runs) (default: %(default)s)",
    )
    ap.add_argument(
        "--rtt-max-foreign",
        type=float,
        default=20.0,
        help="rtt case: redo a drain (twice at most) when processes outside the run "
        "used more than this CPU %% during it (100 = one core; default 20)",
    )
    ap.add_argument(
        "--rtt-quiet-wait",
        type=float,
        default=30.0,
        help="rtt case: before each drain, wait up to this many s for the machine "
        "to be < 15%% busy",
    )
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--keep-logs", action="store_true", help="keep the scratch dir (worker logs)")
    ap.add_argument("--out", help="JSON path (default bench/results/bench-<date>-<time>.json)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.bulk_n = 5000, 20000
        args.repeat = args.repeat or 1
        args.eta_count, args.due_count = min(args.eta_count, 100_000), min(args.due_count, 20_000)
        args.async_timeout = min(args.async_timeout, 15.0)
    args.repeat = args.repeat or 3
    if args.case is None:
        args.case = "rtt" if args.rtt_ms else ",".join(DEFAULT_CASES)
    wanted = (
        list(DEFAULT_CASES)
        if args.case == "all"
        else [c.strip() for c in args.case.split(",") if c.strip()]
    )
    if args.rtt_ms and "rtt" not in wanted:
        wanted.append("rtt")
    args.rtt_ms = [x.strip() for x in (args.rtt_ms or "0,0.5,1,2").split(",") if x.strip()]
    for x in args.rtt_ms:
        if x != "direct":
            float(x)
    args.rtt_variants = [x.strip() for x in args.rtt_variants.split(",") if x.strip()]
    if [x for x in args.rtt_variants if x not in ("raw", "wakaq", "raw-prefetch")]:
        ap.error("--rtt-variants: raw, wakaq, raw-prefetch")
    bad = [c for c in wanted if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; cases: {', '.join(CASES)}")
    if args.scale and "scale" not in wanted:
        wanted.append("scale")
    if args.scale_only:
        wanted = ["scale"]
    args.case = ",".join(wanted)
    return args, wanted


def main():
    args, wanted = parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cpus) >= 2:
        PIN["redis"], PIN["producer"] = [cpus[0]], [cpus[-1]]
    pinning = (
        (
            f"pinning: redis-server(s) on CPU {PIN['redis'][0]} (taskset), producers on CPU "
            f"{PIN['producer'][0]}, workers and this driver unpinned"
        )
        if PIN["redis"]
        else "pinning: none"
    )
    print(f"wakaq bench: cases {args.case}; {pinning}; python {PY}", flush=True)
    scratch = tempfile.mkdtemp(prefix="wakaq-bench-")
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "pinning": pinning,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "wakaq_git": git_rev(),
        "args": vars(args),
        "redis_server": subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True
        ).stdout.strip(),
    }
    import wakaq

    meta["wakaq_version"] = getattr(wakaq, "__version__", None)
    runners = {
        "main": run_main,
        "scale": run_scale,
        "async": run_async,
        "idle": run_idle,
        "cluster": run_cluster,
        "loglevel": run_loglevel,
        "queues": run_queues,
        "bytes": run_bytes,
        "rtt": run_rtt,
    }
    cases = {c: {"runs": [], "error": None, "seconds": 0.0} for c in wanted}
    t_start = perf_counter()
    for rep in range(1, args.repeat + 1):
        for case in wanted:
            c = cases[case]
            if c["error"]:  # a case that failed is not run again
                continue
            t = perf_counter()
            try:
                res = runners[case](args, rep, scratch)
                c["runs"].append(res)
                line = summary(case, res)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                c["error"] = f"{type(e).__name__}: {e}"[:500] + _where(e)
                c["error_repeat"] = rep
                c["traceback"] = traceback.format_exc()[-4000:]
                line = f"ERROR {c['error']}"
            c["seconds"] += perf_counter() - t
            print(f"run {rep} [{case}] ({perf_counter() - t:.1f} s): {line}", flush=True)
    text, targets = report(
        cases.get("main", {}).get("runs", []), cases.get("scale", {}).get("runs", []), meta, cases
    )
    meta["seconds"] = perf_counter() - t_start
    print(text)
    print(
        f"\ntotal {meta['seconds']:.0f} s; per case: "
        + ", ".join(f"{k} {c['seconds']:.0f} s" for k, c in cases.items())
    )
    out = args.out or os.path.join(
        HERE, "results", datetime.datetime.now().strftime("bench-%Y%m%d-%H%M%S.json")
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "meta": meta,
                "targets": targets,
                "cases": cases,
                "runs": cases.get("main", {}).get("runs", []),
                "scale_runs": cases.get("scale", {}).get("runs", []),
                "table": text,
            },
            f,
            indent=1,
            default=str,
        )
    print(f"\nJSON: {out}" + (f"; logs in {scratch}" if args.keep_logs else ""))
    if not args.keep_logs:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
