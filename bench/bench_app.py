"""The app the benchmark's wakaq workers import, and its producer commands.

    python wakaq.py worker bench_app:wakaq          (cwd or PYTHONPATH = bench/)
    python bench_app.py enqueue N                   N single noop.delay(i); prints one JSON line
    python bench_app.py bulk N                      noop.delay_many() of N calls
    python bench_app.py latency COUNT INTERVAL      lat.delay(time.time()) COUNT times

Redis host/port come from BENCH_REDIS_HOST / BENCH_REDIS_PORT (set by bench.py). The task
bodies are those of the peer benchmark: noop(i) does INCR done on its own
redis-py connection (made lazily per process, so it is safe across fork); lat(sent) does
RPUSH lat (time.time() - sent).
"""
import json
import os
import sys
import time
from time import perf_counter

import redis

from wakaq import WakaQ

HOST = os.environ.get("BENCH_REDIS_HOST", "127.0.0.1")
if "BENCH_REDIS_PORT" not in os.environ:   # never fall back to a shared redis on 6379
    raise RuntimeError("bench_app needs BENCH_REDIS_PORT (bench.py sets it)")
PORT = int(os.environ["BENCH_REDIS_PORT"])

wakaq = WakaQ(queues=["default"], concurrency=2, host=HOST, port=PORT)

_client = None
_pid = None


def counter():
    global _client, _pid
    if _client is None or _pid != os.getpid():
        _client = redis.Redis(host=HOST, port=PORT)
        _pid = os.getpid()
    return _client


@wakaq.task
def noop(i):
    counter().incr("done")


@wakaq.task
def lat(sent):
    counter().rpush("lat", time.time() - sent)


# ----------------------------------------------------------------- producer commands

def enqueue(n):
    """N single .delay() calls; the first (connection set-up, script load) timed apart."""
    t0 = perf_counter()
    noop.delay(0)
    t1 = perf_counter()
    for i in range(1, n):
        noop.delay(i)
    t2 = perf_counter()
    return {"n": n, "first_call_ms": (t1 - t0) * 1e3, "seconds": t2 - t1,
            "rate": (n - 1) / (t2 - t1)}


def bulk(n):
    """One delay_many() of N calls (the arguments list is built before the clock starts;
    a one-task delay_many first, timed apart, sets up the connection)."""
    calls = [(i,) for i in range(1, n)]
    t0 = perf_counter()
    noop.delay_many([(0,)])
    t1 = perf_counter()
    noop.delay_many(calls)
    t2 = perf_counter()
    return {"n": n, "first_call_ms": (t1 - t0) * 1e3, "seconds": t2 - t1,
            "rate": (n - 1) / (t2 - t1)}


def latency(count, interval):
    """A warm-up lat(0.0) (its value, ~1.7e9 s, is dropped by the driver), then COUNT
    lat(time.time()) calls on a fixed schedule INTERVAL seconds apart."""
    lat.delay(0.0)
    time.sleep(0.2)
    nxt = perf_counter()
    call_ms = []
    for _ in range(count):
        a = perf_counter()
        lat.delay(time.time())
        call_ms.append((perf_counter() - a) * 1e3)
        nxt += interval
        d = nxt - perf_counter()
        if d > 0:
            time.sleep(d)
    call_ms.sort()
    return {"count": count, "enqueue_call_ms_p50": call_ms[len(call_ms) // 2]}


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "enqueue":
        out = enqueue(int(args[0]))
    elif cmd == "bulk":
        out = bulk(int(args[0]))
    elif cmd == "latency":
        out = latency(int(args[0]), float(args[1]))
    else:
        sys.exit(f"unknown command {cmd!r}")
    print("BENCH_RESULT " + json.dumps(out), flush=True)
