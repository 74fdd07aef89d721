"""Task execution: soft timeouts that always land in the task's own code, async tasks on one
lasting event loop per child with async_concurrency, async hooks and wrappers, and eager
mode that matches a worker.

    python -m pytest -q tests/test_execution.py

Real `python wakaq.py worker tests.test_execution:APP` processes against the session's
private server (conftest.py). Each group of cases has its own module-level app with its own
`prefix=` (texec1 ... texec11), so the apps never see each other's keys. Tasks record what
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
        for pattern in [f"{{texec{i}}}:*" for i in range(1, 12)]:
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


class SlowStr:
    """A value whose str() takes a while: logging it spends most of the time in logging."""

    def __str__(self):
        time.sleep(0.05)
        return "slow value"


@soft_app.task(soft_timeout=0.5, hard_timeout=4, max_retries=0)
def logs_slow_values(myid):
    """Logs values whose __str__ sleeps, for 3 s: the soft timeout comes due inside logging
    (inside __str__, called by logging) and must reach this code as SoftTimeout."""
    started = time.monotonic()
    try:
        while time.monotonic() - started < 3:
            tlog.info("value: %s", SlowStr())
    except SoftTimeout:
        rec("slow_str", myid, "soft", round(time.monotonic() - started, 3))
        raise
    rec("slow_str", myid, "finished", round(time.monotonic() - started, 3))


def _quick_call_under_alarm_helper():
    """The common `signal.alarm()` timeout helper around a quick call: its own SIGALRM
    handler, alarm(5), the call, then alarm(0) and the old handler back."""

    def on_alarm(signum, frame):
        raise TimeoutError("the helper's own timeout")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(5)
    try:
        return sum(range(1000))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@soft_app.task(soft_timeout=1, hard_timeout=4, max_retries=0)
def uses_alarm_helper(myid):
    started = time.monotonic()
    _quick_call_under_alarm_helper()
    try:
        while time.monotonic() - started < 3:
            time.sleep(0.05)
    except SoftTimeout:
        rec("alarm_helper", myid, "soft", round(time.monotonic() - started, 3))
        raise
    rec("alarm_helper", myid, "done", round(time.monotonic() - started, 3))


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


# --- async bookkeeping: acks, CancelledError, failing async hooks -------------------
ack_app = WakaQ(url=URL, prefix="texec6", concurrency=1, async_concurrency=4, hard_timeout=20)


@ack_app.task
async def ack_nap(tag, seconds):
    rec("ack_start", tag, os.getpid())
    await asyncio.sleep(seconds)
    rec("ack_end", tag, os.getpid())


# hard_timeout 1.5 s and a retry: a finished task charged a hard timeout later would run again
_BOOKKEEPING = dict(
    url=URL,
    concurrency=1,
    async_concurrency=4,
    hard_timeout=1.5,
    max_retries=1,
    heartbeat_timeout=2,
)
cancelled_app = WakaQ(prefix="texec7", **_BOOKKEEPING)
failing_hook_app = WakaQ(prefix="texec8", **_BOOKKEEPING)
cancelled_one_app = WakaQ(url=URL, prefix="texec9", concurrency=1, async_concurrency=1)


async def _ends_cancelled(tag):
    """Ends in asyncio.CancelledError that it raises itself (nobody cancelled it)."""
    rec("bk_ran", tag, attempt(), os.getpid())
    await asyncio.sleep(0.01)
    raise asyncio.CancelledError()


async def _plain_async(tag):
    rec("bk_ran", tag, attempt(), os.getpid())
    await asyncio.sleep(0.01)


for _app in (cancelled_app, cancelled_one_app):
    _app.task(_ends_cancelled, name="first_task")
    _app.task(_plain_async, name="next_task")
failing_hook_app.task(_plain_async, name="first_task")
failing_hook_app.task(_plain_async, name="next_task")


@failing_hook_app.after_task_finished
async def _after_raises():
    await asyncio.sleep(0)
    raise RuntimeError("the after hook fails")


# --- a sync task whose async hook awaits while an async task of the same child runs ---
mixed_app = WakaQ(url=URL, prefix="texec10", concurrency=1, async_concurrency=2, hard_timeout=8)


@mixed_app.before_task_started
async def _before_awaits_past_the_soft_timeout():
    if current_task()["name"] == "sync_after_hook":
        await asyncio.sleep(0.6)  # past the task's soft_timeout, while busy_async runs


@mixed_app.task
async def busy_async():
    """Busy in its own code (blocking 20 ms steps) between awaits for about 1.2 s."""
    rec("mixed", "async", "started")
    try:
        for _ in range(60):
            time.sleep(0.02)
            await asyncio.sleep(0)
    except BaseException as e:
        rec("mixed", "async", type(e).__name__)
        raise
    rec("mixed", "async", "done")


@mixed_app.task(soft_timeout=0.3, hard_timeout=5, max_retries=0)
def sync_after_hook():
    rec("mixed", "sync", "started")
    try:
        time.sleep(2)
    except SoftTimeout:
        rec("mixed", "sync", "soft")
        raise
    rec("mixed", "sync", "done")


# --- retry_backoff with a retry count far past 2**32 ----------------------------------
backoff_app = WakaQ(url=URL, prefix="texec11", concurrency=1, hard_timeout=5)


@backoff_app.task(soft_timeout=0.2, hard_timeout=3, max_retries=2000, retry_backoff=1)
def late_retry():
    rec("late_retry", attempt(), os.getpid())
    time.sleep(2)


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


def test_eager_delay_of_an_async_task_inside_a_running_event_loop_runs_it_and_returns_its_id():
    EAGER_SEEN.clear()

    async def main():
        return eager_async_probe.delay("from a running loop")

    task_id = asyncio.run(main())
    [(cur, value)] = EAGER_SEEN
    assert isinstance(task_id, str) and task_id
    assert (cur["id"], cur["name"], value) == (task_id, "eager_async_probe", "from a running loop")
    assert current_task() is None


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


def _soft_outcome(r, workers, task, key):
    """Run task(0) on a soft_app worker; -> its one [myid, outcome, seconds] record, the worker."""
    w = workers("worker", "tests.test_execution:soft_app")
    ready(r, w, soft_app)
    task.delay(0)
    [outcome] = wait_for(
        lambda: runs(r, key), f"{task.name} to record how it ended", 10, diag=w.log
    )
    return outcome, w


def _soft_dead_letter(r, w, name):
    [entry] = wait_for(lambda: dead_of(r, soft_app), f"{name}'s dead letter", 5, diag=w.log)
    assert (entry["name"], entry["reason"]) == (name, "soft timeout"), entry


@slow
def test_a_soft_timeout_due_inside_a_slow_str_called_by_logging_lands_in_the_task(r, workers):
    (_, what, seconds), w = _soft_outcome(r, workers, logs_slow_values, "slow_str")
    assert what == "soft", f"SoftTimeout never reached the task ({what} after {seconds}s)"
    assert seconds < 1.5, f"soft_timeout=0.5 reached the task only after {seconds}s"
    _soft_dead_letter(r, w, "logs_slow_values")
    log = w.log()
    assert "--- Logging error ---" not in log, log[-3000:]
    assert "hard timeout" not in log and "crashed" not in log, log[-3000:]


@slow
def test_a_task_that_used_the_signal_alarm_timeout_helper_still_gets_its_soft_timeout(r, workers):
    (_, what, seconds), w = _soft_outcome(r, workers, uses_alarm_helper, "alarm_helper")
    assert what == "soft", f"the task ran {what} after {seconds}s: its soft timeout was lost"
    assert seconds < 2.0, f"soft_timeout=1 reached the task only after {seconds}s"
    _soft_dead_letter(r, w, "uses_alarm_helper")
    assert "hard timeout" not in w.log()


@slow
def test_a_sync_task_whose_async_hook_awaits_gets_its_soft_timeout_not_the_async_task(r, workers):
    """The async task runs (busy in its own code) while the sync task's before hook awaits past
    the sync task's soft timeout: the SoftTimeout is the sync task's, raised in its own code."""
    w = workers("worker", "tests.test_execution:mixed_app")
    ready(r, w, mixed_app)
    busy_async.delay()
    wait_for(lambda: runs(r, "mixed"), "the async task to start", 5, diag=w.log)
    sync_after_hook.delay()
    wait_for(
        lambda: (
            ["async", "started"] in runs(r, "mixed")
            and any(x[0] == "async" and x[1] != "started" for x in runs(r, "mixed"))
            and any(x[0] == "sync" and x[1] != "started" for x in runs(r, "mixed"))
        ),
        "both tasks to end",
        10,
        diag=lambda: f"{runs(r, 'mixed')}\n{w.log()[-2000:]}",
    )
    ends = {who: what for who, what in runs(r, "mixed") if what != "started"}
    assert ends == {"sync": "soft", "async": "done"}, (
        f"the sync task's soft timeout went astray: {runs(r, 'mixed')}"
    )
    [entry] = wait_for(lambda: dead_of(r, mixed_app), "the dead letter", 5, diag=w.log)
    assert (entry["name"], entry["reason"]) == ("sync_after_hook", "soft timeout"), entry


@slow
def test_a_failed_attempt_with_a_retry_count_past_2_to_the_32_is_delayed_at_most_an_hour(
    r, workers
):
    """retry_backoff * 2**1500 overflows a float: the delay is capped (MAX_BACKOFF, an hour)
    and the child carries on."""
    task_id = late_retry.delay()
    q = backoff_app.default_queue
    raw = r.lpop(q.key)  # the same payload, as if it had failed 1,500 times already
    assert json.loads(raw)["retry"] == 0
    r.lpush(q.key, raw.replace(b'"retry":0,', b'"retry":1500,', 1))
    w = workers("worker", "tests.test_execution:backoff_app")
    ready(r, w, backoff_app)
    [child] = children(w.pid)
    wait_for(
        lambda: r.zcard(q.eta_key), "the failed attempt to be requeued delayed", 10, diag=w.log
    )
    [(payload, due)] = r.zrange(q.eta_key, 0, -1, withscores=True)
    sec, usec = r.time()
    wait = due - (sec + usec / 1e6)
    msg = json.loads(payload)
    assert (msg["id"], msg["retry"]) == (task_id, 1501), msg
    assert 1800 <= wait <= 3600, f"retried in {wait:.0f}s: more than an hour (or no backoff)"
    assert runs(r, "late_retry") == [[1501, child]]
    assert children(w.pid) == [child], "the child crashed"
    log = w.log()
    assert "crashed" not in log and "Traceback" not in log, log[-3000:]
    assert dead_of(r, backoff_app) == [] and w.alive()


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


@slow
def test_short_async_tasks_are_acked_while_a_long_one_still_runs_in_the_same_child(r, workers):
    w = workers("worker", "tests.test_execution:ack_app")
    ready(r, w, ack_app)
    long_id = ack_nap.delay("long", 4)
    wait_for(lambda: runs(r, "ack_start"), "the long task to start", 5, diag=w.log)
    for tag in ("s1", "s2", "s3"):
        ack_nap.delay(tag, 0.05)
    wait_for(lambda: len(runs(r, "ack_end")) == 3, "the three short tasks to end", 3, diag=w.log)
    wait_for(
        lambda: [m["id"] for m in running_payloads(r, ack_app)] == [long_id],
        "the short tasks to leave the in-flight hash",
        1.5,
        diag=lambda: f"in flight: {[m['args'] for m in running_payloads(r, ack_app)]}",
    )
    info = json.loads(cli("info", "tests.test_execution:ack_app", "--json").stdout)
    assert [t["id"] for t in info["running"]] == [long_id], info["running"]
    assert info["inflight"] == 1, info
    assert "long" not in [tag for tag, _ in runs(r, "ack_end")], "the long one ended: void"
    assert len({pid for _, pid in runs(r, "ack_start")}) == 1, "not all four in one child"


def _ran(r):
    return [tuple(x) for x in runs(r, "bk_ran")]


def _evalsha_calls(r):
    return r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


@slow
@pytest.mark.parametrize(
    "spec, dead_reasons",
    [("cancelled_app", ["raised CancelledError"]), ("failing_hook_app", [])],
    ids=["the-task-raises-CancelledError", "an-async-after-hook-raises"],
)
def test_after_an_async_attempt_ends_badly_the_child_runs_on_idles_quietly_and_stops(
    r, workers, spec, dead_reasons
):
    """The attempt's bookkeeping ends however it ended: the child runs the next task, does not
    spin while idle, is not charged a hard timeout for the finished task and stops on SIGTERM."""
    the_app = globals()[spec]
    w = workers("worker", f"tests.test_execution:{spec}")
    ready(r, w, the_app)
    [child] = children(w.pid)
    the_app.tasks["first_task"].delay("first")
    wait_for(lambda: _ran(r), "the first task to run", 5, diag=w.log)
    the_app.tasks["next_task"].delay("next")
    wait_for(lambda: len(_ran(r)) >= 2, "the next task to run", 5, diag=w.log)
    assert _ran(r) == [("first", 1, child), ("next", 1, child)]
    wait_for(
        lambda: not running_payloads(r, the_app),
        "nothing left in flight",
        3,
        diag=lambda: f"in flight: {running_payloads(r, the_app)}\n{w.log()[-2000:]}",
    )
    r.config_resetstat()
    time.sleep(2)  # an idle window, measured; it also outlasts the 1.5 s hard timeout
    calls = _evalsha_calls(r)
    assert calls < 50, f"{calls} EVALSHA calls in 2 s on an idle queue: the child spins"
    assert _ran(r) == [("first", 1, child), ("next", 1, child)], "a finished task ran again"
    assert [e["reason"][: len("raised CancelledError")] for e in dead_of(r, the_app)] == (
        dead_reasons
    )
    assert children(w.pid) == [child], w.log()[-3000:]
    log = w.log()
    assert "hard timeout" not in log and "crashed" not in log, log[-3000:]
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait_exit(5, diag=lambda: w.log()[-2000:]) == 0


@slow
def test_cancelled_error_from_an_async_task_is_its_error_and_the_child_runs_on(r, workers):
    """async_concurrency=1: the task's own CancelledError is logged and dead-lettered as the
    task's error, like any exception; the same child runs the next task."""
    w = workers("worker", "tests.test_execution:cancelled_one_app")
    ready(r, w, cancelled_one_app)
    cancelled_one_app.tasks["first_task"].delay("first")
    [entry] = wait_for(
        lambda: dead_of(r, cancelled_one_app), "the dead letter", 5, diag=lambda: w.log()[-2000:]
    )
    assert entry["reason"].startswith("raised CancelledError"), entry
    assert (entry["name"], entry["attempts"]) == ("first_task", 1)
    cancelled_one_app.tasks["next_task"].delay("next")
    wait_for(lambda: len(_ran(r)) == 2, "the next task to run", 5, diag=w.log)
    [(_, _, first_pid), (_, _, next_pid)] = _ran(r)
    assert first_pid == next_pid, "the child crashed and was forked again"
    log = w.log()
    assert re.search(r"task first_task raised.*\n(.*\n)*.*CancelledError", log), log[-3000:]
    assert "crashed" not in log and "worker died" not in log, log[-3000:]


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
