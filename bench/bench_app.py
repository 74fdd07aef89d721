"""The apps the benchmark's wakaq workers import, and its producer commands.

    python wakaq.py worker bench_app:wakaq          (cwd or PYTHONPATH = bench/; or
    python wakaq.py worker bench.bench_app:wakaq     from the repository root)
    python bench_app.py enqueue N                   N single noop.delay(i); prints one JSON line
    python bench_app.py bulk N                      noop.delay_many() of N calls
    python bench_app.py latency COUNT INTERVAL      lat.delay(time.time()) COUNT times

The apps (attributes of this module, built on first access from the environment):

    wakaq           queues ["default"], concurrency=2 (the main figures; worker_log_level INFO)
    wakaq_warning   the same at worker_log_level=WARNING            (--case loglevel)
    wakaq_q1 / wakaq_q50 / wakaq_q200
                    1, 50, 200 queues q0..qN-1; tasks go to the last = lowest priority
                                                                    (--case queues)
    wakaq_idle      3 queues, concurrency=2                         (--case idle)
    wakaq_async     concurrency=2, async_concurrency=50             (--case async)

Every app has the same tasks: noop(i), lat(sent), big(s) (a large argument), asleep(i) (async,
`await asyncio.sleep(0.05)`). `make_app(spec, host, port, cluster)` builds one of them
anywhere (bench.py enqueues with its own copy).

Redis host/port come from BENCH_REDIS_HOST / BENCH_REDIS_PORT (set by bench.py);
BENCH_CLUSTER=1 means that node is part of a Redis Cluster (the task bodies' counter client is
then a redis.cluster.RedisCluster). The task bodies are those of the peer benchmark: noop(i)
does INCR done on its own redis-py connection (made lazily per process, so it is safe across
fork); lat(sent) does RPUSH lat (time.time() - sent).
"""

import asyncio
import json
import logging
import os
import sys
import time
from time import perf_counter

import redis

from wakaq import WakaQ

SPECS = {
    "wakaq": {},
    "wakaq_warning": {"worker_log_level": logging.WARNING},
    "wakaq_q1": {"queues": ["q0"]},
    "wakaq_q50": {"queues": [f"q{i}" for i in range(50)]},
    "wakaq_q200": {"queues": [f"q{i}" for i in range(200)]},
    "wakaq_idle": {"queues": ["a", "b", "c"]},
    "wakaq_async": {"async_concurrency": 50},
}
ASYNC_SLEEP = 0.05


def _env():
    if "BENCH_REDIS_PORT" not in os.environ:  # never fall back to a shared redis on 6379
        raise RuntimeError("bench_app needs BENCH_REDIS_PORT (bench.py sets it)")
    return (
        os.environ.get("BENCH_REDIS_HOST", "127.0.0.1"),
        int(os.environ["BENCH_REDIS_PORT"]),
        os.environ.get("BENCH_CLUSTER") == "1",
    )


_client = None
_pid = None


def counter():
    """This process's plain redis-py client for the task bodies (not wakaq's)."""
    global _client, _pid
    if _client is None or _pid != os.getpid():
        host, port, cluster = _env()
        _client = (
            redis.cluster.RedisCluster(host=host, port=port)
            if cluster
            else redis.Redis(host=host, port=port)
        )
        _pid = os.getpid()
    return _client


_async_started = False


def make_app(spec="wakaq", host=None, port=None, cluster=None):
    """A WakaQ of SPECS[spec] with the bench tasks registered."""
    if host is None:
        host, port, cluster = _env()
    kw = {"queues": ["default"], "concurrency": 2, **SPECS[spec]}
    app = WakaQ(url=f"redis://{host}:{port}/0", **kw)

    @app.task
    def noop(i):
        counter().incr("done")

    @app.task
    def lat(sent):
        counter().rpush("lat", time.time() - sent)

    @app.task
    def big(s):
        counter().incr("done")

    @app.task
    async def asleep(i):
        global _async_started
        if not _async_started:  # one SET per child: when its first async task started
            _async_started = True
            counter().set(f"async_t0:{os.getpid()}", time.time())
        await asyncio.sleep(ASYNC_SLEEP)
        counter().incr("done")

    return app


_apps = {}


def app(spec="wakaq"):
    if spec not in _apps:
        _apps[spec] = make_app(spec)
    return _apps[spec]


def __getattr__(name):  # bench_app.wakaq etc., built on first access
    if name in SPECS:
        return app(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------- producer commands


def enqueue(n):
    """N single .delay() calls; the first (connection set-up, script load) timed apart."""
    noop = app().tasks["noop"]
    t0 = perf_counter()
    noop.delay(0)
    t1 = perf_counter()
    for i in range(1, n):
        noop.delay(i)
    t2 = perf_counter()
    return {
        "n": n,
        "first_call_ms": (t1 - t0) * 1e3,
        "seconds": t2 - t1,
        "rate": (n - 1) / (t2 - t1),
    }


def bulk(n):
    """One delay_many() of N calls (the arguments list is built before the clock starts;
    a one-task delay_many first, timed apart, sets up the connection)."""
    noop = app().tasks["noop"]
    calls = [(i,) for i in range(1, n)]
    t0 = perf_counter()
    noop.delay_many([(0,)])
    t1 = perf_counter()
    noop.delay_many(calls)
    t2 = perf_counter()
    return {
        "n": n,
        "first_call_ms": (t1 - t0) * 1e3,
        "seconds": t2 - t1,
        "rate": (n - 1) / (t2 - t1),
    }


def latency(count, interval):
    """A warm-up lat(0.0) (its value, ~1.7e9 s, is dropped by the driver), then COUNT
    lat(time.time()) calls on a fixed schedule INTERVAL seconds apart."""
    lat = app().tasks["lat"]
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
