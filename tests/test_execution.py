"""Task execution: soft timeouts that always land in the task's own code, async tasks on one
lasting event loop per child with async_concurrency, async hooks and wrappers, and eager
mode that matches a worker.

    python -m pytest -q tests/test_execution.py

Real `python wakaq.py worker tests.test_execution:APP` processes against the session's
private server (conftest.py). Each group of cases has its own module-level app with its own
`prefix=` (texec1 ... texec5), so the apps never see each other's keys. Tasks record what
they saw in `test:*` lists through conftest.rec().
"""

import asyncio
import inspect
import json
import logging
import math
import os
import re
import signal
import time

import pytest
import redis
import redis.asyncio

from wakaq import Queue, SoftTimeout, WakaQ, current_task
from conftest import PRIVATE, URL, attempt, children, cli, rec, runs, slow, wait_for

tlog = logging.getLogger("texec.task")


# ===================================================================== helpers


def dead_of(r, the_app):
    return [json.loads(x) for x in r.lrange(the_app._k("dead"), 0, -1)]


def running_payloads(r, the_app):
    """The task payloads held in any in-flight hash of the app (claim tokens, start times
    and other bookkeeping fields are left out: only values that decode to a task)."""
    found = []
    for key in r.scan_iter(the_app._k("inflight", "*")):
        for value in r.hvals(key):
            try:
                msg = json.loads(value)
            except ValueError:
                continue
            if isinstance(msg, dict) and "name" in msg and "id" in msg:
                found.append(msg)
    return found


def ready(r, proc, the_app, timeout=20):
    """Wait until the worker heartbeats under the app's prefix and has forked every child."""

    def up():
        ids = [w.decode() for w in r.zrange(the_app._k("workers"), 0, -1)]
        return (
            any(w.rsplit(".", 2)[1] == str(proc.pid) for w in ids)
            and len(children(proc.pid)) == the_app.concurrency
        )

    wait_for(
        up,
        f"worker {proc.pid} to heartbeat and fork {the_app.concurrency} child(ren)",
        timeout,
        diag=lambda: proc.log()[-3000:],
    )


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.fixture
def workers(spawn, r):
    """spawn(), plus: at teardown the worker children are killed by pid as well (the
    children may live in process groups of their own, which Proc.stop() does not reach)."""
    yield spawn
    kids = {c for p in spawn for c in children(p.pid)}
    for p in reversed(spawn):
        p.stop()
    for pid in kids:
        if b"wakaq.py" in _cmdline(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if not PRIVATE:
        for pattern in ("{texec1}:*", "{texec2}:*", "{texec3}:*", "{texec4}:*"):
            for key in r.scan_iter(pattern):
                r.delete(key)


# ===================================================================== apps and tasks

# --- soft timeouts landing anywhere ------------------------------------------------
RACY_RETRIES = 2  # every task ends: raised, or dead-lettered after 3 soft timeouts
soft_app = WakaQ(url=URL, prefix="texec1", concurrency=2, hard_timeout=5)


@soft_app.task(soft_timeout=0.02, max_retries=RACY_RETRIES)
def racy(myid, us, chatty):
    """Sleeps (or logs and sleeps) about the soft timeout, then raises ValueError."""
    n = attempt()
    try:
        rec("racy_start", myid, n, os.getpid())
        end = time.monotonic() + us / 1e6
        if chatty:
            while time.monotonic() < end:
                tlog.info("racy %d tick", myid)
                time.sleep(0.002)
            tlog.info("racy %d raising", myid)
        else:
            time.sleep(max(0.0, end - time.monotonic()))
        raise ValueError(f"racy-{myid}-a{n}")
    except SoftTimeout:
        rec("racy_soft", myid, n)
        raise


@soft_app.task(soft_timeout=0.1, hard_timeout=4, max_retries=0)
def log_storm(myid):
    """Logs in a tight loop well past its soft timeout: the alarm almost surely lands inside
    logging, and must still reach this code as SoftTimeout."""
    rec("storm_start", myid, os.getpid())
    started = time.monotonic()
    try:
        while time.monotonic() - started < 1.5:
            tlog.info("storm %d line", myid)
    except SoftTimeout:
        rec("storm", myid, "soft", round(time.monotonic() - started, 3))
        raise
    rec("storm", myid, "finished", round(time.monotonic() - started, 3))


# --- async tasks -------------------------------------------------------------------
async_app = WakaQ(url=URL, prefix="texec2", concurrency=1, async_concurrency=3, hard_timeout=10)
_shared = None  # one lazily created redis.asyncio client per process, as apps do


def _shared_client():
    global _shared
    if _shared is None:
        _shared = redis.asyncio.Redis.from_url(URL)
    return _shared


@async_app.task
async def shared_client_task(i):
    client = _shared_client()
    await client.incr("test:texec:shared")
    await asyncio.sleep(0.05)
    await client.rpush("test:texec:shared_writes", i)
    rec("shared", i, os.getpid(), id(asyncio.get_running_loop()))


@async_app.task
async def nap(tag, seconds):
    rec("nap_start", tag, os.getpid(), time.time())
    await asyncio.sleep(seconds)
    rec("nap_end", tag, os.getpid(), time.time())


@async_app.task(soft_timeout=0.5, hard_timeout=8, max_retries=0)
async def nap_soft(tag):
    rec("nap_start", tag, os.getpid(), time.time())
    try:
        await asyncio.sleep(3)
    except BaseException as e:
        rec("nap_soft_exc", tag, type(e).__name__)
        raise
    rec("nap_end", tag, os.getpid(), time.time())


@async_app.task(hard_timeout=1.5, max_retries=1)
async def nap_hard():
    """Never finishes: every attempt is over its hard deadline."""
    rec("hard_start", attempt(), os.getpid())
    await asyncio.sleep(30)
    rec("hard_end", attempt())


@async_app.task
async def nap_once(tag):
    """Long on its first run only (counted in Redis, so a re-run is short)."""
    rec("once_start", tag, attempt(), os.getpid())
    first = redis.Redis.from_url(URL).incr(f"test:texec:once:{tag}") == 1
    await asyncio.sleep(4 if first else 0.1)
    rec("once_end", tag, attempt(), os.getpid())


# --- async hooks and wrappers ----------------------------------------------------
hooks_app = WakaQ(url=URL, prefix="texec3", concurrency=1)


@hooks_app.before_task_started
async def _before():
    await asyncio.sleep(0)
    rec("h3", "before")


@hooks_app.after_task_finished
async def _after():
    await asyncio.sleep(0)
    rec("h3", "after")


@hooks_app.wrap_tasks_with
async def _async_wrapper(fn, args, kwargs):
    await asyncio.sleep(0)
    rec("h3", "wrap", args)
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


@hooks_app.task
def h3_sync(x):
    rec("h3", "task", "sync", x)


@hooks_app.task
async def h3_async(x):
    await asyncio.sleep(0.01)
    rec("h3", "task", "async", x)


plainwrap_app = WakaQ(url=URL, prefix="texec4", concurrency=1)


@plainwrap_app.wrap_tasks_with
def _plain_wrapper(fn, args, kwargs):
    rec("h4", "wrap", args)
    return fn(*args, **kwargs)  # a coroutine for an async task: wakaq awaits it


@plainwrap_app.task
async def h4_async(x):
    await asyncio.sleep(0.01)
    rec("h4", "task", x)


# --- eager mode ----------------------------------------------------------------
eager_app = WakaQ(url=URL, prefix="texec5", eager=True)
EAGER_SEEN = []


@eager_app.task
def eager_probe(value):
    EAGER_SEEN.append((current_task(), value))


@eager_app.task
async def eager_async_probe(value):
    await asyncio.sleep(0)
    EAGER_SEEN.append((current_task(), value))


# ===================================================================== settings, no Redis


def _builders(bad):
    yield "WakaQ(soft_timeout)", "soft_timeout", lambda: WakaQ(url=URL, soft_timeout=bad)
    yield "WakaQ(hard_timeout)", "hard_timeout", lambda: WakaQ(url=URL, hard_timeout=bad)
    yield (
        "Queue(soft_timeout)",
        "soft_timeout",
        lambda: WakaQ(queues=[Queue("q", soft_timeout=bad)], url=URL),
    )
    yield (
        "Queue(hard_timeout)",
        "hard_timeout",
        lambda: WakaQ(queues=[Queue("q", priority=0, hard_timeout=bad)], url=URL),
    )
    yield (
        "task(soft_timeout)",
        "soft_timeout",
        lambda: WakaQ(url=URL).task(lambda: None, name="t", soft_timeout=bad),
    )
    yield (
        "task(hard_timeout)",
        "hard_timeout",
        lambda: WakaQ(url=URL).task(lambda: None, name="t", hard_timeout=bad),
    )


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), float("-inf")], ids=repr)
def test_non_finite_timeouts_raise_value_error_naming_the_value(bad):
    # the value as a word ("inf" inside "infinite" does not count as naming it)
    value = re.compile(r"(?<![A-Za-z])%s(?![A-Za-z])" % re.escape(repr(bad)))
    problems = []
    for where, setting, build in _builders(bad):
        try:
            build()
        except ValueError as e:
            if not (value.search(str(e)) and setting in str(e)):
                problems.append(f"{where}: message does not name {setting}={bad!r}: {e}")
        else:
            problems.append(f"{where}={bad!r} was accepted")
    assert not problems, "; ".join(problems)


def test_finite_timeouts_are_still_accepted():
    a = WakaQ(
        url=URL,
        soft_timeout=1e9,
        hard_timeout=2e9,
        queues=[Queue("q", soft_timeout=0.02, hard_timeout=0.5)],
    )
    a.task(lambda: None, name="t", soft_timeout=0.5, hard_timeout=1)
    assert math.isfinite(a.soft_timeout) and math.isfinite(a.hard_timeout)


# ===================================================================== eager mode, no Redis


def test_eager_current_task_matches_a_worker_and_broadcast_round_trips_like_delay():
    EAGER_SEEN.clear()
    assert current_task() is None
    task_id = eager_probe.delay((1, (2, 3)))
    [(cur, value)] = EAGER_SEEN
    assert cur == {"id": task_id, "name": "eager_probe", "queue": "default", "attempt": 1}
    assert value == [1, [2, 3]] and type(value) is list  # a tuple arrives as a list
    EAGER_SEEN.clear()
    assert eager_probe.broadcast((4, 5)) == 1
    [(cur, value)] = EAGER_SEEN
    assert set(cur) == {"id", "name", "queue", "attempt"}
    assert (cur["name"], cur["queue"], cur["attempt"]) == ("eager_probe", "default", 1)
    assert isinstance(cur["id"], str) and cur["id"]
    assert value == [4, 5] and type(value) is list, f"broadcast skipped the serializer: {value!r}"
    EAGER_SEEN.clear()
    eager_async_probe.delay({"s": (6,)})
    [(cur, value)] = EAGER_SEEN
    assert (cur["name"], cur["attempt"]) == ("eager_async_probe", 1)
    assert value == {"s": [6]}
    assert current_task() is None  # reset after the task
    with pytest.raises(TypeError):
        eager_probe.broadcast(object())  # the serializer ran


def test_async_concurrency_accepts_ints_and_cores_expressions_and_names_bad_ones():
    WakaQ(url=URL, async_concurrency=5)
    WakaQ(url=URL, async_concurrency="cores*2")
    WakaQ(url=URL, async_concurrency=0)
    with pytest.raises(ValueError, match=re.escape(repr("cores ** 2"))):
        WakaQ(url=URL, async_concurrency="cores ** 2")


# ===================================================================== soft timeouts


def _racy_problems(myid, ids_raised, ids_dead, started, soft):
    """What is wrong with the outcome of racy task `myid`: it ended once (raised at one
    attempt, or dead-lettered after its last), attempts started once each up to the final
    one, and SoftTimeout was seen only in attempts that timed out."""
    if len(ids_raised) + len(ids_dead) != 1:
        return [
            f"{myid}: raised at attempts {ids_raised}, dead-lettered "
            f"{[(e['attempts'], e['reason']) for e in ids_dead]}"
        ]
    problems = []
    s = sorted(started)
    last = ids_raised[0] if ids_raised else RACY_RETRIES + 1
    if ids_dead and ids_dead[0]["attempts"] != last:
        problems.append(f"{myid}: dead after {ids_dead[0]['attempts']} attempts")
    if (
        len(s) != len(set(s))
        or not set(s) <= set(range(1, last + 1))
        or (ids_raised and last not in s)
    ):
        problems.append(f"{myid}: attempts started {s}, final outcome at attempt {last}")
    failed = set(range(1, last)) if ids_raised else set(range(1, last + 1))
    if not set(soft.get(myid, [])) <= failed:
        problems.append(
            f"{myid}: SoftTimeout seen in attempts {soft[myid]}, "
            f"but only {sorted(failed)} timed out"
        )
    return problems


@slow
def test_300_soft_timeouts_landing_anywhere_never_crash_a_child_and_each_task_ends_once(r, workers):
    n = 300
    w = workers("worker", "tests.test_execution:soft_app")
    ready(r, w, soft_app)
    for i in range(n):  # sleeps from 18.0 to 20.5 ms around the 20 ms soft timeout
        racy.delay(i, 18000 + (i * 37 % 26) * 100, i % 3 == 0)
    # the end of the traceback of a ValueError that left the task (not one that a later
    # exception was chained to)
    final_line = re.compile(
        r"^ValueError: racy-(\d+)-a(\d+)$"
        r"(?!\n+(?:During handling|The above exception))",
        re.M,
    )

    def outcomes():
        log = w.log()
        raised = {}
        for myid, att in final_line.findall(log):
            raised.setdefault(int(myid), []).append(int(att))
        dead = {}
        for e in dead_of(r, soft_app):  # a raised task is a dead letter too: count it once
            msg = json.loads(e["payload"])
            if not e["reason"].startswith("raised ValueError: racy-"):
                dead.setdefault(msg["args"][0], []).append(e)
        return log, raised, dead

    def all_ended():
        _, raised, dead = outcomes()
        return (
            len(set(raised) | set(dead)) >= n
            and not running_payloads(r, soft_app)
            and r.llen(soft_app._k("q", "default")) == 0
        )

    wait_for(
        all_ended,
        f"all {n} tasks to reach a final outcome",
        60,
        interval=0.2,
        diag=lambda: w.log()[-3000:],
    )
    time.sleep(0.3)  # anything that would still (wrongly) happen, happens now
    log, raised, dead = outcomes()
    assert "--- Logging error ---" not in log
    assert "crashed" not in log, log[log.index("crashed") - 2000 :][:4000]
    reasons = [e["reason"] for entries in dead.values() for e in entries]
    assert set(reasons) <= {"soft timeout"}, f"dead letters: {sorted(set(reasons))}"
    starts = runs(r, "racy_start")
    pids = {pid for _, _, pid in starts}
    assert len(pids) == soft_app.concurrency, f"children crashed and were re-forked: {pids}"
    assert w.alive()

    started, soft = {}, {}
    for myid, att, _ in starts:
        started.setdefault(myid, []).append(att)
    for myid, att in runs(r, "racy_soft"):
        soft.setdefault(myid, []).append(att)
    problems = [
        problem
        for myid in range(n)
        for problem in _racy_problems(
            myid, raised.get(myid, []), dead.get(myid, []), started.get(myid, []), soft
        )
    ]
    assert not problems, f"{len(problems)} tasks: " + "; ".join(problems[:20])
    # the race was really exercised: both outcomes and some retries happened
    assert raised and dead and any(len(v) > 1 for v in started.values())


def _run_storms(r, workers):
    """Three log_storm tasks on soft_app; returns their [myid, outcome, seconds] and the log."""
    w = workers("worker", "tests.test_execution:soft_app")
    for i in range(3):
        log_storm.delay(i)
    wait_for(
        lambda: len(runs(r, "storm")) == 3,
        "three storms to end",
        20,
        interval=0.1,
        diag=lambda: f"{runs(r, 'storm')}\n{w.log()[-500:]}",
    )
    wait_for(lambda: not running_payloads(r, soft_app), "the storms to leave in-flight", 5)
    time.sleep(0.2)
    assert w.alive()
    return sorted(runs(r, "storm")), w.log()


@slow
def test_a_task_logging_in_a_tight_loop_gets_soft_timeout_in_its_own_code(r, workers):
    outcomes, log = _run_storms(r, workers)
    assert [(i, what) for i, what, _ in outcomes] == [(0, "soft"), (1, "soft"), (2, "soft")], (
        f"SoftTimeout was swallowed: {outcomes}"
    )
    assert (
        sorted((e["name"], e["reason"], e["attempts"]) for e in dead_of(r, soft_app))
        == [("log_storm", "soft timeout", 1)] * 3
    )
    assert "--- Logging error ---" not in log
    assert "crashed" not in log
    assert len({pid for _, pid in runs(r, "storm_start")}) <= soft_app.concurrency


@slow
def test_a_soft_timeout_held_back_by_logging_lands_as_soon_as_the_task_runs_again(r, workers):
    """Control is back in log_storm's own loop microseconds after each log call, so a
    SoftTimeout that waited out a logging call arrives promptly, not many timeouts later."""
    outcomes, _ = _run_storms(r, workers)
    late = [(i, secs) for i, what, secs in outcomes if what == "soft" and secs >= 0.3]
    assert all(what == "soft" for _, what, _ in outcomes), outcomes
    assert not late, f"soft_timeout=0.1 reached the task only after (task, seconds) {late}"


# ===================================================================== async tasks


@slow
def test_async_tasks_share_one_lazily_created_redis_asyncio_client(r, workers):
    w = workers("worker", "tests.test_execution:async_app")
    ready(r, w, async_app)
    for i in range(5):
        shared_client_task.delay(i)
    wait_for(
        lambda: r.llen("test:texec:shared_writes") == 5 and len(runs(r, "shared")) == 5,
        "five async tasks to write and record",
        15,
        diag=lambda: f"{runs(r, 'shared')}\n{w.log()[-1200:]}",
    )
    time.sleep(0.1)
    got = runs(r, "shared")
    assert sorted(i for i, _, _ in got) == [0, 1, 2, 3, 4]
    assert len({pid for _, pid, _ in got}) == 1
    assert len({loop for _, _, loop in got}) == 1, "a new event loop per task"
    log = w.log()
    assert "RuntimeError" not in log and " raised" not in log, log[-3000:]


@slow
def test_three_1s_async_tasks_run_at_once_in_one_child_each_in_flight(r, workers):
    w = workers("worker", "tests.test_execution:async_app")
    ready(r, w, async_app)
    t0 = time.time()
    for tag in ("a", "b", "c"):
        nap.delay(tag, 1.0)
    names = wait_for(
        lambda: len(running_payloads(r, async_app)) == 3 and running_payloads(r, async_app),
        "all three in flight at once",
        2.5,
        interval=0.01,
        diag=lambda: f"{runs(r, 'nap_start')}\n{w.log()[-2000:]}",
    )
    assert sorted(m["args"][0] for m in names) == ["a", "b", "c"]
    wait_for(
        lambda: len(runs(r, "nap_end")) == 3, "three naps to end", 10, diag=lambda: w.log()[-2000:]
    )
    took = max(t for _, _, t in runs(r, "nap_end")) - t0
    assert took < 1.8, f"three 1 s async tasks took {took:.2f}s on one child"
    assert len({pid for _, pid, _ in runs(r, "nap_start")}) == 1
    wait_for(lambda: not running_payloads(r, async_app), "the in-flight entries to go", 5)


@slow
def test_each_concurrent_async_task_has_its_own_soft_timeout(r, workers):
    w = workers("worker", "tests.test_execution:async_app")
    ready(r, w, async_app)
    t0 = time.time()
    nap_soft.delay("slow")
    nap.delay("a", 1.0)
    nap.delay("b", 1.0)
    wait_for(
        lambda: len(runs(r, "nap_end")) == 2 and dead_of(r, async_app),
        "the two naps to end and the slow one to be dead-lettered",
        10,
        diag=lambda: f"{runs(r, 'nap_end')} {dead_of(r, async_app)}\n{w.log()[-2000:]}",
    )
    time.sleep(0.2)
    [entry] = dead_of(r, async_app)
    assert (entry["name"], entry["reason"], entry["attempts"]) == ("nap_soft", "soft timeout", 1)
    ends = {tag: (pid, t) for tag, pid, t in runs(r, "nap_end")}
    starts = {tag: (pid, t) for tag, pid, t in runs(r, "nap_start")}
    assert sorted(ends) == ["a", "b"]  # the slow one never ended
    assert len({pid for pid, _ in starts.values()}) == 1  # all three in one child
    for tag in ("a", "b"):
        assert 0.95 <= ends[tag][1] - starts[tag][1] < 1.6, (tag, starts, ends)
    assert max(t for _, t in ends.values()) - t0 < 2.5  # they ran side by side
    assert w.alive() and "crashed" not in w.log()


@slow
def test_a_hard_timeout_charges_only_the_late_async_task_the_others_go_back_unchanged(r, workers):
    w = workers("worker", "tests.test_execution:async_app")
    ready(r, w, async_app)
    nap_once.delay("a")
    nap_once.delay("b")
    nap_hard.delay()
    wait_for(
        lambda: len(runs(r, "once_start")) == 2 and runs(r, "hard_start"),
        "the three tasks to start",
        5,
        diag=lambda: w.log()[-2000:],
    )
    [first_child] = children(w.pid)
    info = json.loads(
        cli("info", "tests.test_execution:async_app", "--json").stdout
    )  # checked last
    wait_for(
        lambda: len(dead_of(r, async_app)) == 1 and len(runs(r, "once_end")) == 2,
        "nap_hard dead-lettered and a, b finished",
        15,
        interval=0.05,
        diag=lambda: (
            f"{runs(r, 'once_start')} {runs(r, 'hard_start')} "
            f"{dead_of(r, async_app)}\n{w.log()[-2500:]}"
        ),
    )
    wait_for(lambda: not running_payloads(r, async_app), "nothing left in flight", 5)
    [entry] = dead_of(r, async_app)
    assert (entry["name"], entry["reason"], entry["attempts"]) == ("nap_hard", "hard timeout", 2)
    hard = runs(r, "hard_start")
    assert [n for n, _ in hard] == [1, 2] and hard[0][1] == first_child != hard[1][1]
    assert runs(r, "hard_end") == []
    for tag in ("a", "b"):
        started = [(n, pid) for t, n, pid in runs(r, "once_start") if t == tag]
        ended = [(n, pid) for t, n, pid in runs(r, "once_end") if t == tag]
        assert [n for n, _ in started] == [1, 1], f"{tag} started {started}"  # no retry used
        assert started[0][1] == first_child and started[1][1] != first_child
        assert ended == [started[1]], f"{tag} ended {ended}"
    assert w.alive()
    assert info["inflight"] == 3, f"info --json while three tasks ran: {info}"


# ===================================================================== async hooks and wrappers


@slow
def test_async_hooks_and_wrappers_are_awaited_and_a_plain_wrapper_runs_an_async_task(r, workers):
    w3 = workers("worker", "tests.test_execution:hooks_app")
    w4 = workers("worker", "tests.test_execution:plainwrap_app")
    h3_sync.delay(1)
    h3_async.delay(2)
    h4_async.delay(5)
    wait_for(
        lambda: runs(r, "h3").count(["after"]) == 2 and len(runs(r, "h4")) == 2,
        "both apps' tasks and hooks",
        15,
        diag=lambda: f"{runs(r, 'h3')} {runs(r, 'h4')}\n{w3.log()[-1500:]}\n{w4.log()[-1500:]}",
    )
    assert runs(r, "h3") == [
        ["before"],
        ["wrap", [1]],
        ["task", "sync", 1],
        ["after"],
        ["before"],
        ["wrap", [2]],
        ["task", "async", 2],
        ["after"],
    ]
    assert runs(r, "h4") == [["wrap", [5]], ["task", 5]]
    for w in (w3, w4):
        assert "never awaited" not in w.log() and " raised" not in w.log(), w.log()[-2000:]
