#!/usr/bin/env python
"""Pickup latency of three shapes of an idle consumer's wait, through bench/delay_proxy.py at
each added RTT: how much a wait that returns the task itself would save wakaq.

    .venv/bin/python bench/idle_probe.py --rtt-ms 0,1,2 --count 200

Shapes (one consumer process on one connection through the proxy; the producer, direct,
sends every INTERVAL s one EVALSHA that RPUSHes the task to the queue and a token to the wake
list, as wakaq's enqueue does):

  queue         BLPOP on the queue itself: the task comes with the wake-up (the raw floor)
  wake,claim    BLPOP on the wake list, then a claim (EVALSHA of a script that LPOPs the
                queue): two round trips, wakaq 2.0's idle path
  wake+claim    the same two commands written together: Redis runs the claim right after the
                BLPOP is served (a blocked client's next command waits in its buffer), so
                both replies come back together

After each task the consumer makes one more claim (it acks; it returns nothing unless the next
task is already there), as a wakaq child does, then waits again; for `queue` that claim is an
LPOP. A stale wake-up (its task taken by that claim) costs one empty wait+claim.
Latency = time.time() in the consumer when it has the task - time.time() before the
producer's EVALSHA (same clock). Nearest-rank p50 / p99 / mean in ms. The claim script here
only LPOPs; wakaq's does more work inside Redis (tens of us), not more round trips.
Pinning as bench.py: redis-server on the first CPU, the producer (this process) on the last,
proxy and consumer unpinned. Every process it starts (redis-server on a free port, the proxy,
the consumer) is stopped by PID.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SHAPES = ("queue", "wake,claim", "wake+claim")
PUSH = "redis.call('RPUSH', KEYS[1], ARGV[1]); redis.call('RPUSH', KEYS[2], '1'); return 1"
CLAIM = "return redis.call('LPOP', KEYS[1])"


def consumer(shape, port, count):
    """Runs in its own process: take `count` tasks, print their latencies (JSON)."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
    sha = r.script_load(CLAIM)
    c = r.connection_pool.get_connection()
    out, wait, task = [], 2, None

    def claim():
        c.send_command("EVALSHA", sha, 1, "q")
        return c.read_response()

    print("ready", flush=True)
    while len(out) < count:
        if task is None:  # idle: wait
            if shape == "queue":
                c.send_command("BLPOP", "q", wait)
                got = c.read_response()
                task = got and got[1]
            elif shape == "wake,claim":
                c.send_command("BLPOP", "wake", wait)
                c.read_response()
                task = claim()
            else:
                c.send_packed_command(
                    c.pack_commands([("BLPOP", "wake", wait), ("EVALSHA", sha, 1, "q")])
                )
                c.read_response()
                task = c.read_response()
            if task is None:
                continue
        out.append(time.time() - float(task))  # "runs" it
        if shape == "queue":  # the next one (the floor has no ack;
            c.send_command("LPOP", "q")  # kept alike): usually empty
            task = c.read_response()
        else:
            task = claim()  # the next claim (acks this one)
    print(json.dumps(out), flush=True)


def pct(v, p):
    import math

    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]


def run_consumer(push, proxy, shape, d, rep, a, scratch):
    """One consumer of `shape` through `proxy`, `a.count` tasks pushed `a.interval` s apart;
    its latencies (ms), sorted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    errf = os.path.join(scratch, f"consumer-{rep}-{d}-{shape}.err")
    with open(errf, "wb") as err:
        p = subprocess.Popen(
            [sys.executable, __file__, "--consumer", shape, str(proxy.port), str(a.count)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        if p.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"consumer {shape}: {open(errf).read()[-2000:]}")
        time.sleep(0.2)
        nxt = time.perf_counter()
        for _ in range(a.count):
            push(keys=["q", "wake"], args=[repr(time.time())])
            nxt += a.interval
            time.sleep(max(0.0, nxt - time.perf_counter()))
        line = p.stdout.readline()
        if not line.strip():
            p.wait(10)
            raise RuntimeError(
                f"consumer {shape} (+{d} ms) exited {p.returncode}: {open(errf).read()[-2000:]}"
            )
        lat = sorted(x * 1e3 for x in json.loads(line))
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    return lat


def probe(server, a, scratch):
    """Every shape at every RTT, `a.repeat` times: {rtt: {shape: [{p50, p99, mean, all}]}}."""
    import bench  # DelayProxy

    res = {}
    r = server.r
    push = r.register_script(PUSH)
    for rep in range(a.repeat):
        for d in a.rtt_ms.split(","):
            proxy = bench.DelayProxy(server.port, float(d), scratch, f"p{rep}-{d}")
            try:
                for shape in SHAPES if rep % 2 == 0 else SHAPES[::-1]:
                    r.delete("q", "wake")
                    lat = run_consumer(push, proxy, shape, d, rep, a, scratch)
                    res.setdefault(d, {}).setdefault(shape, []).append(
                        {
                            "p50": pct(lat, 50),
                            "p99": pct(lat, 99),
                            "mean": statistics.mean(lat),
                            "all": lat,
                        }
                    )
            finally:
                proxy.stop()
    return res


def print_table(res, a):
    print(
        f"pickup ms (p50 / p99 / mean; median of {a.repeat} run(s)), {a.count} tasks "
        f"{a.interval * 1e3:g} ms apart, consumer through the proxy"
    )
    print(f"{'RTT':<8}" + "".join(f"{s:>24}" for s in SHAPES))
    for d, by in res.items():
        cell = {
            s: "/".join(
                f"{statistics.median(x[k] for x in by[s]):.2f}" for k in ("p50", "p99", "mean")
            )
            for s in SHAPES
        }
        print(f"{'+' + d + ' ms':<8}" + "".join(f"{cell[s]:>24}" for s in SHAPES))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtt-ms", default="0,1,2")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", help="JSON file for the raw latencies")
    a = ap.parse_args()
    import bench  # RedisServer, DelayProxy

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:  # as bench.py: redis-server on the first CPU, the
        bench.PIN["redis"] = [cpus[0]]  # producer (this process) on the last
        os.sched_setaffinity(0, {cpus[-1]})
    scratch = tempfile.mkdtemp(prefix="wakaq-idle-probe-")
    server = bench.RedisServer(scratch)
    try:
        res = probe(server, a, scratch)
    finally:
        server.stop()
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    print_table(res, a)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--consumer":
        consumer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
