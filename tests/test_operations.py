"""Operator capabilities (API.md, "Additions (round 3)"): failed attempts as dead letters
and `retry_on`, cancel by id (and its cost), the Prometheus exporter, `health` and stopping
while Redis is away, `wait_replicas`, and what the logs and `info` show an operator.

    python -m pytest -q tests/test_operations.py

Real `python wakaq.py worker|metrics|info|scheduler tests.test_operations:APP` processes
against the session's private server (conftest.py), real signals, and a second real
redis-server as a replica. Metrics are read over HTTP from the `metrics` command; the
cancel tests read the same text from the function that command serves.
"""

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

import wakaq
from conftest import (
    ENV,
    URL,
    Proc,
    RedisServer,
    _free_port,
    attempt,
    children,
    cli,
    dead,
    kill_pids,
    leftovers,
    needs_private,
    pid_alive,
    rec,
    registered_pids,
    retrying,
    runs,
    slow,
    wait_for,
    workers_ready,
)
from wakaq import Cancelled, CronTask, Queue, WakaQ, WakaQError

APP = "tests.test_operations:app"

# ===================================================================== apps and tasks

# "idle" is served by no worker that runs with --exclude-queues idle; "default" is the
# default queue (the lowest priority).
app = WakaQ(
    queues=[(0, "high"), (1, "idle"), (2, "default")],
    url=URL,
    concurrency=1,
    heartbeat_timeout=2,
    hard_timeout=20,
    schedules=[CronTask("0 0 1 1 *", "note", args=["new year"])],  # never due in a test
)


@app.task
def note(tag):
    rec("note", tag, os.getpid())


@app.task
def noop(i):
    pass


@app.task
def hold(tag):
    """Runs until the test sets test:go:TAG (30 s at most)."""
    rec("hold", tag)
    deadline = time.monotonic() + 30
    while not retrying(lambda c: c.exists(f"test:go:{tag}")) and time.monotonic() < deadline:
        time.sleep(0.02)


def go(r, tag):
    r.set(f"test:go:{tag}", 1)


@app.task
def flaky(tag):
    """Raises until the test sets test:fixed (the fix is deployed)."""
    rec("flaky", tag, attempt())
    if not retrying(lambda c: c.exists("test:fixed")):
        raise ValueError(f"not fixed yet: {tag}\nthe second line of the message")
    rec("flaky-ok", tag, attempt())


@app.task
def boom():
    raise ValueError("boom-marker")


@app.task(max_retries=2)
def cancellable(tag):
    """Sleeps in short steps for 30 s; records a Cancelled raised in its code, re-raises it."""
    rec("started", tag, attempt(), os.getpid())
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            time.sleep(0.05)
    except Cancelled as e:
        rec("caught", tag, attempt(), type(e).__name__, isinstance(e, WakaQError))
        raise


@app.task(soft_timeout=0.3, hard_timeout=10, max_retries=1)
def late_once(tag):
    """Overruns its soft timeout on the first attempt only."""
    rec("late", tag, attempt())
    if attempt() == 1:
        time.sleep(5)


@app.task
def printer(text):
    print(text)
    rec("printer", os.getpid())


class NotReady(ValueError):
    """retry_on=(ValueError,) covers its subclasses."""


ERRORS = {"value": ValueError, "key": KeyError, "type": TypeError, "subclass": NotReady}

retry_app = WakaQ(
    queues=[Queue("strict", priority=0, retry_on=(ValueError,), max_retries=2), (1, "loose")],
    url=URL,
    concurrency=1,
    retry_on=(KeyError,),
    max_retries=1,
)


def raise_it(tag, kind):
    rec("raised", tag, attempt())
    raise ERRORS[kind](f"{tag} failed")


retry_app.task(raise_it, name="plain_raiser")
retry_app.task(raise_it, name="picky_raiser", retry_on=(TypeError,))

dead_app = WakaQ(queues=["default"], url=URL, concurrency=1, max_dead=3)

# A schedule every second, for the scheduler's own tests.
CRON_APP = "tests.test_operations:cron_app"
cron_app = WakaQ(queues=["default"], url=URL, schedules=[CronTask("* * * * * *", "tick")])


@cron_app.task
def tick():
    pass


@dead_app.task
def numbered(n):
    rec("numbered", n)
    raise ValueError(f"number {n}")


# .delay() waits until one replica has the write, for at most socket_timeout
replicated = WakaQ(queues=["default"], url=URL, wait_replicas=1, socket_timeout=1)


@replicated.task
def stored(tag):
    pass


# Counted exactly: a done attempt is counted by the script that acks it.
count_app = WakaQ(queues=["default"], url=URL, concurrency=1, heartbeat_timeout=2)


@count_app.task(hard_timeout=1)
def quick_or_long(seconds):
    rec("quick_or_long", seconds)
    time.sleep(seconds)


# An app that adds its own handler to wakaq's logger in each child.
handler_app = WakaQ(queues=["default"], url=URL, concurrency=1)


@handler_app.after_worker_started
def add_a_handler():
    handler = logging.FileHandler(os.environ["APP_LOG"])
    handler.setFormatter(logging.Formatter("app-handler %(levelname)s %(message)s"))
    logging.getLogger("wakaq").addHandler(handler)


@handler_app.task
def handled(tag):
    rec("handled", tag)


pair_app = WakaQ(queues=["default"], url=URL, concurrency=1, async_concurrency=2)
_released = None


@pair_app.task
async def pair(role):
    """ "b" waits for "a": both end in the same turn of the child's event loop."""
    global _released
    _released = _released or asyncio.Event()
    rec("pair", role)
    if role == "b":
        await _released.wait()
    else:
        await asyncio.sleep(0.2)
        _released.set()


@pair_app.task(hard_timeout=1)
def overrun():
    rec("overrun")
    time.sleep(30)


# ===================================================================== helpers

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Every line of Prometheus text format 0.0.4, checked: -> (types, samples) with
    samples {(name, frozenset(labels.items())): float value}."""
    assert text.endswith("\n"), text[-200:]
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert re.match(rf"# HELP {_NAME} \S", line), line
            continue
        m = re.match(rf"# TYPE ({_NAME}) (counter|gauge|histogram)$", line)
        if m:
            assert m[1] not in types, f"two TYPE lines for {m[1]}"
            types[m[1]] = m[2]
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a HELP, TYPE or sample line: {line!r}"
        name, labels, value = m.groups()
        pairs = _LABEL.findall(labels or "")
        assert ",".join(f'{k}="{v}"' for k, v in pairs) == (labels or ""), line
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or types.get(family) == "histogram", f"no TYPE for {line!r}"
        key = (name, frozenset(pairs))
        assert key not in samples, f"a repeated sample: {line!r}"
        samples[key] = float(value)
    return types, samples


def sample(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def totals(samples, **labels):
    """{(task, outcome): count} of the wakaq_tasks_total samples matching `labels`."""
    out = {}
    for (name, pairs), value in samples.items():
        d = dict(pairs)
        if name == "wakaq_tasks_total" and labels.items() <= d.items():
            out[(d["task"], d["outcome"])] = value
    return out


def app_metrics(the_app=app):
    """What `metrics` serves for the app, read here without HTTP."""
    return parse_metrics(wakaq._prometheus(the_app))[1]


def scrape(port, path="/metrics"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4"), resp.headers
        return resp.read().decode()


def start_metrics(spawn, port):
    m = spawn("metrics", APP, "--port", str(port))

    def answers():
        try:
            return scrape(port)
        except (urllib.error.URLError, ConnectionError):
            assert m.alive(), m.log()
            return None

    wait_for(answers, f"the exporter on port {port}", diag=m.log)
    return m


def info_json(*extra):
    out = cli("info", APP, "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def health():
    """(exit status, the one line `health` printed)."""
    out = cli("health", APP)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and not out.stderr.strip(), (out.stdout, out.stderr)
    return out.returncode, lines[0]


def worker_ready(r, w, n_children, spawn):
    wait_for(
        lambda: w.pid in registered_pids(r, 60) and len(children(w.pid)) == n_children,
        f"worker {w.pid} to heartbeat and fork {n_children} children",
        20,
        diag=spawn.tails,
    )


def notes(r):
    return [tag for tag, _ in runs(r, "note")]


def sigterm_and_time(p, timeout=5):
    """SIGTERM the process; -> (exit status, seconds from the signal to its exit)."""
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGTERM)
    try:
        code = p.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {timeout}s after SIGTERM:\n{p.log()}") from None
    return code, time.monotonic() - t0


# ===================================================================== failed attempts


@slow
def test_a_raised_task_is_a_dead_letter_that_dead_lists_and_requeue_runs_after_the_fix(r, spawn):
    w = spawn("worker", APP)
    task_id = flaky.delay("a")
    [entry] = wait_for(lambda: dead(r), "the dead letter", diag=spawn.tails)
    reason = "raised ValueError: not fixed yet: a"  # the first line of the message
    assert (entry["id"], entry["name"], entry["queue"]) == (task_id, "flaky", "default")
    assert (entry["attempts"], entry["reason"]) == (1, reason), entry
    assert runs(r, "flaky") == [["a", 1]]  # not retried (max_retries 0)
    out = cli("dead", APP)
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.strip().splitlines()
    assert re.search(rf"^{task_id} flaky queue=default attempts=1 reason='{reason}'", line), line
    out = cli("dead", APP, "--json")
    [listed] = json.loads(out.stdout)
    assert {
        "id": task_id,
        "name": "flaky",
        "queue": "default",
        "attempts": 1,
        "reason": reason,
    }.items() <= listed.items(), listed
    assert {"at", "when", "args"} <= listed.keys() and "payload" not in listed, listed
    r.set("test:fixed", 1)  # the fix is deployed
    out = cli("dead", APP, "--requeue", task_id)
    assert (out.returncode, out.stdout.strip()) == (0, "requeued 1 dead task(s)"), out
    wait_for(lambda: runs(r, "flaky-ok"), "the requeued task to succeed", diag=spawn.tails)
    assert runs(r, "flaky-ok") == [["a", 1]]  # a fresh attempt count
    assert dead(r) == [] and cli("dead", APP).stdout.strip() == "no dead tasks"
    assert f"task flaky id={task_id} dead-lettered after 1 attempt(s): {reason}" in w.log()


RETRY_CASES = [  # task, queue, error -> attempts; which retry_on and max_retries apply
    ("plain_raiser", "strict", "value", 3),  # the queue's retry_on and max_retries=2
    ("plain_raiser", "strict", "subclass", 3),  # a subclass of a retry_on class
    ("plain_raiser", "strict", "key", 1),  # the queue's retry_on replaces the app's
    ("plain_raiser", "loose", "key", 2),  # the app's retry_on and max_retries=1
    ("plain_raiser", "loose", "value", 1),  # not in the app's retry_on
    ("picky_raiser", "strict", "type", 3),  # the task's retry_on, the queue's max_retries
    ("picky_raiser", "strict", "value", 1),  # the task's retry_on replaces the queue's
]


@slow
def test_retry_on_takes_the_task_then_the_queue_then_the_app_and_dead_letters_at_the_end(r, spawn):
    ids = {}
    for task, queue, kind, _ in RETRY_CASES:
        tag = f"{task}-{queue}-{kind}"
        ids[tag] = retry_app.tasks[task].delay(tag, kind, queue=queue)
    w = spawn("worker", "tests.test_operations:retry_app")
    wait_for(lambda: len(dead(r)) == len(RETRY_CASES), "every task's dead letter", diag=spawn.tails)
    letters = {e["id"]: e for e in dead(r)}
    attempts = {}
    for tag, n in runs(r, "raised"):
        attempts.setdefault(tag, []).append(n)
    for task, queue, kind, expected in RETRY_CASES:
        tag = f"{task}-{queue}-{kind}"
        entry = letters[ids[tag]]
        reason = f"raised {ERRORS[kind].__name__}: {ERRORS[kind](f'{tag} failed')}"
        assert (entry["name"], entry["queue"], entry["attempts"], entry["reason"]) == (
            task,
            queue,
            expected,
            reason,
        ), entry
        assert attempts[tag] == list(range(1, expected + 1)), (tag, attempts[tag])
        if expected > 1:
            assert re.search(rf"task {task} id={ids[tag]} attempt 1: .*; requeued", w.log())
    assert not leftovers(r, retry_app), leftovers(r, retry_app)


@slow
def test_max_dead_keeps_the_newest_dead_letters_and_the_worker_logs_each_drop(r, spawn):
    ids = numbered.delay_many([(n,) for n in range(5)])
    w = spawn("worker", "tests.test_operations:dead_app")

    def dropped():
        return sum(int(n) for n in re.findall(r"max_dead=3: dropped the (\d+) oldest", w.log()))

    wait_for(
        lambda: len(runs(r, "numbered")) == 5 and dropped() == 2,
        "five failures and two drops logged",
        diag=spawn.tails,
    )
    assert [(e["id"], e["reason"]) for e in dead(r)] == [
        (ids[n], f"raised ValueError: number {n}") for n in (2, 3, 4)
    ]
    assert cli("dead", "tests.test_operations:dead_app").stdout.count(" numbered ") == 3


# ===================================================================== cancel


@slow
def test_cancel_says_what_it_found_and_cancelled_pending_and_delayed_tasks_never_run(r, spawn):
    w = spawn("worker", APP)
    workers_ready(r, [w], app, spawn.tails)
    hold.delay("c")  # keeps the only child busy while the others wait
    wait_for(lambda: runs(r, "hold"), "the child to be busy", diag=spawn.tails)
    victim, _ = note.delay("victim"), note.delay("after")
    late_victim = note.delay("late victim", eta=0.5)
    note.delay("late after", eta=1.0)
    assert app.cancel(victim) == "pending"
    assert app.cancel(late_victim) == "delayed"
    assert app.cancel("no-such-task-id") is None
    go(r, "c")
    # FIFO with one child: a victim would have run before the task behind it
    wait_for(lambda: "late after" in notes(r), "the survivors to run", diag=spawn.tails)
    assert notes(r) == ["after", "late after"]
    boom_id = boom.delay()
    wait_for(lambda: dead(r), "boom's dead letter", diag=spawn.tails)
    assert app.cancel(boom_id) == "dead"
    assert dead(r) == [] and app.cancel(boom_id) is None
    note.delay("last")
    wait_for(lambda: "last" in notes(r), "the next task", diag=spawn.tails)
    assert notes(r) == ["after", "late after", "last"]
    assert totals(app_metrics(), task="note") == {("note", "cancelled"): 2, ("note", "done"): 3}


def test_the_cancel_command_prints_each_id_and_exits_1_if_one_was_not_found(r):
    pending, delayed = note.delay("p"), note.delay("d", eta=600)
    out = cli("cancel", APP, pending, "no-such-task-id", delayed)
    assert out.returncode == 1, out
    assert out.stdout.splitlines() == [
        f"{pending} pending",
        "no-such-task-id not found",
        f"{delayed} delayed",
    ]
    other = note.delay("q")
    out = cli("cancel", APP, other)
    assert (out.returncode, out.stdout.strip()) == (0, f"{other} pending"), out
    out = cli("cancel", APP, other)  # gone now
    assert (out.returncode, out.stdout.strip()) == (1, f"{other} not found"), out


@slow
def test_a_running_task_gets_cancelled_in_its_code_within_2s_and_is_not_retried_or_dead(r, spawn):
    w = spawn("worker", APP)
    task_id = cancellable.delay("run")  # max_retries=2: a failed attempt would be retried
    wait_for(lambda: runs(r, "started"), "the task to start", diag=spawn.tails)
    t0 = time.monotonic()
    assert app.cancel(task_id) == "running"
    wait_for(lambda: runs(r, "caught"), "Cancelled in the task", 5, 0.01, diag=spawn.tails)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"Cancelled came {elapsed:.2f}s after cancel()"
    assert runs(r, "caught") == [["run", 1, "Cancelled", True]]
    counts = wait_for(
        lambda: (lambda t: ("cancellable", "cancelled") in t and t)(
            totals(app_metrics(), task="cancellable")
        ),
        "the cancelled attempt to be released",
        diag=spawn.tails,
    )
    assert counts == {("cancellable", "cancelled"): 1}  # neither retried nor dead
    assert not leftovers(r, app) and dead(r) == [], (leftovers(r, app), dead(r))
    note.delay("next")
    wait_for(lambda: notes(r) == ["next"], "the worker to carry on", diag=spawn.tails)
    assert len(runs(r, "started")) == 1 and w.alive()
    assert re.search(rf"task cancellable id={task_id} attempt=1 cancelled in", w.log()), w.log()


@slow
def test_a_running_task_is_cancelled_even_among_stale_cancels_of_its_child_older_claims(r, spawn):
    """Cancel members for the same field and child but an older claim (token "PID-N") come
    in the same batch as the live one: they are dropped and do not undo the live cancel."""
    w = spawn("worker", APP)
    workers_ready(r, [w], app, spawn.tails)
    noop.delay_many([(i,) for i in range(60)])  # claims 1..60 and more of the one child
    task_id = cancellable.delay("stale")
    wait_for(lambda: runs(r, "started"), "the task to start", diag=spawn.tails)
    [wid] = [x.decode() for x in r.zrange("{wakaq}:workers", 0, -1)]
    fields = r.hgetall(f"{{wakaq}}:inflight:{wid}")
    [field] = [
        f.decode() for f, v in fields.items() if v.startswith(b'{"id":"%s"' % task_id.encode())
    ]
    pid, claim = map(int, fields[f"{field}:t".encode()].split(b"-"))
    assert claim > 60, claim
    os.kill(w.pid, signal.SIGSTOP)  # the stale members and the cancel reach one poll
    try:
        r.sadd(f"{{wakaq}}:cancel:{wid}", *(f"{field} {pid}-{n}" for n in range(1, claim)))
        assert app.cancel(task_id) == "running"
    finally:
        os.kill(w.pid, signal.SIGCONT)
    wait_for(lambda: runs(r, "caught"), "Cancelled in the task", 5, diag=spawn.tails)
    assert runs(r, "caught") == [["stale", 1, "Cancelled", True]]
    assert len(runs(r, "started")) == 1 and dead(r) == [] and w.alive()


@slow
def test_a_pending_task_cancelled_before_a_worker_restart_never_runs_after_it(r, spawn):
    w1 = spawn("worker", APP)
    hold.delay("restart")
    wait_for(lambda: runs(r, "hold"), "the child to be busy", diag=spawn.tails)
    victim = note.delay("victim")
    assert app.cancel(victim) == "pending"
    os.kill(w1.pid, signal.SIGTERM)  # a deploy: the running task finishes first
    go(r, "restart")
    assert w1.wait_exit(diag=spawn.tails) == 0
    spawn("worker", APP)
    note.delay("after")
    wait_for(lambda: notes(r) == ["after"], "the task behind it to run", diag=spawn.tails)
    assert not leftovers(r, app) and notes(r) == ["after"]


@slow
def test_a_task_cancelled_while_its_worker_is_frozen_is_not_retried_after_the_worker_dies(r, spawn):
    """The cancel reaches Redis but never the worker: SIGSTOP, cancel, SIGKILL. The task's
    in-flight record is taken back by another worker as "worker died", which would retry
    it (max_retries=2); the cancellation stays recorded and drops it instead."""
    w1 = spawn("worker", APP)
    task_id = cancellable.delay("frozen")
    wait_for(lambda: runs(r, "started"), "the task to start", diag=spawn.tails)
    pids = [w1.pid, *children(w1.pid)]  # a child runs in its own process group
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        assert app.cancel(task_id) == "running"
    finally:
        kill_pids(pids)
    wait_for(lambda: not any(pid_alive(p) for p in pids), "the frozen worker to die")
    w2 = spawn("worker", APP)
    wait_for(lambda: "taking back its 1 task(s)" in w2.log(), "the adoption", diag=spawn.tails)
    wait_for(
        lambda: totals(app_metrics(), task="cancellable").get(("cancellable", "cancelled")),
        "the adopted task's release",
        diag=spawn.tails,
    )
    assert totals(app_metrics(), task="cancellable") == {
        ("cancellable", "worker_died"): 1,
        ("cancellable", "cancelled"): 1,
    }
    note.delay("after")
    wait_for(lambda: notes(r) == ["after"], "the next task", diag=spawn.tails)
    assert [s[:2] for s in runs(r, "started")] == [["frozen", 1]] and dead(r) == []
    assert not leftovers(r, app), leftovers(r, app)


@slow
def test_cancelling_one_id_among_a_million_queued_tasks_takes_under_a_second(r):
    t0 = time.monotonic()
    ids = []
    for start in range(0, 1_000_000, 50_000):
        ids += noop.delay_many([(i,) for i in range(start, start + 50_000)])
    print(f"\nenqueued 1,000,000 tasks in {time.monotonic() - t0:.1f}s")
    assert r.llen("{wakaq}:q:default") == 1_000_000
    for task_id in (ids[500_000], ids[-1], ids[0]):
        t0 = time.monotonic()
        found = app.cancel(task_id)
        elapsed = time.monotonic() - t0
        print(f"cancel {task_id}: {found} in {elapsed * 1000:.1f} ms")
        assert found == "pending" and elapsed < 1.0, (found, elapsed)
    t0 = time.monotonic()
    assert app.cancel("no-such-task-id") is None
    assert time.monotonic() - t0 < 1.0


@slow
def test_the_cost_of_a_claim_does_not_grow_with_the_number_of_cancellations(r, spawn):
    """Redis's own time per script call (INFO commandstats) while a worker drains 2,000
    tasks, with no cancellations and with 100,000 cancelled ids of other tasks waiting."""
    probe = noop.delay(0, eta=600)
    assert app.cancel(probe) == "delayed"
    when = r.hget("{wakaq}:cancelled", probe)  # what a cancellation looks like
    assert when is not None and cli("purge", APP, "default").stdout.strip() == "1"

    def drain_cost():
        noop.delay_many([(i,) for i in range(2000)])
        r.config_resetstat()
        w = spawn("worker", APP)
        wait_for(lambda: not leftovers(r, app), "the drain", 60, diag=spawn.tails)
        stats = r.info("commandstats")["cmdstat_evalsha"]
        os.kill(w.pid, signal.SIGTERM)
        assert w.wait_exit(diag=spawn.tails) == 0
        assert stats["calls"] >= 2000, stats
        return stats["usec_per_call"]

    before = drain_cost()
    pipe = r.pipeline(transaction=False)
    for start in range(0, 100_000, 10_000):
        pipe.hset(
            "{wakaq}:cancelled", mapping={f"other{i}": when for i in range(start, start + 10_000)}
        )
    pipe.execute()
    assert r.hlen("{wakaq}:cancelled") >= 100_000
    after = drain_cost()
    print(f"\nmicroseconds per script call: {before} without, {after} with 100,000 cancelled")
    assert after < 2 * before, (before, after)


# ===================================================================== metrics


def check_histograms(samples, attempts):
    """Buckets cumulative and ascending, +Inf = _count = the attempts of each (queue, task)."""
    series = {}
    for (name, pairs), value in samples.items():
        d = dict(pairs)
        if name == "wakaq_task_duration_seconds_bucket":
            le = d.pop("le")
            series.setdefault((d["queue"], d["task"]), []).append((float(le), value))
    assert set(series) == set(attempts), (sorted(series), sorted(attempts))
    for (queue, task), points in series.items():
        points.sort()
        counts = [n for _, n in points]
        assert counts == sorted(counts) and points[-1][0] == float("inf"), (task, points)
        labels = dict(queue=queue, task=task)
        count = sample(samples, "wakaq_task_duration_seconds_count", **labels)
        assert counts[-1] == count == attempts[(queue, task)], (task, points, count)
        assert sample(samples, "wakaq_task_duration_seconds_sum", **labels) >= 0


@slow
def test_an_attempt_line_reaches_a_handler_the_app_adds_and_the_worker_log_alike(r, spawn):
    """The worker writes its attempts' lines straight to its stream only while its own
    handler is the only one; an app's handler on wakaq's logger gets them as records."""
    app_log = os.path.join(spawn.folder, "app.log")
    w = Proc(
        ["worker", "tests.test_operations:handler_app"], spawn.folder, {**ENV, "APP_LOG": app_log}
    )
    spawn.append(w)
    task_id = handled.delay("x")
    line = rf"task handled id={task_id} attempt=1 done in \d+\.\d+s$"

    def app_lines():
        return open(app_log).read() if os.path.exists(app_log) else ""

    wait_for(lambda: re.search(line, app_lines(), re.M), "the app's handler to get it", diag=w.log)
    assert re.search(rf"^app-handler INFO {line}", app_lines(), re.M), app_lines()
    assert re.search(rf"^{_STAMP} INFO wakaq pid=\d+ task=handled: {line}", w.log(), re.M), w.log()


@slow
def test_the_metrics_command_serves_every_outcome_duration_and_gauge_and_keeps_counts(r, spawn):
    t0 = time.monotonic()
    note.delay_many([("unserved 1",), ("unserved 2",)], queue="idle")  # no worker serves it
    note.delay("much later", eta=600)
    w = spawn("worker", APP, "--exclude-queues", "idle", "--concurrency", "2")
    worker_ready(r, w, 2, spawn)
    port = _free_port()
    m = start_metrics(spawn, port)
    hold.delay("metrics")  # running while we scrape
    wait_for(lambda: runs(r, "hold"), "the hold task to start", diag=spawn.tails)
    note.delay_many([("a",), ("b",), ("c",)])
    boom.delay()
    late_once.delay("m")
    expected = {
        ("note", "done"): 3,
        ("boom", "raised"): 1,
        ("boom", "dead"): 1,
        ("late_once", "soft_timeout"): 1,
        ("late_once", "retried"): 1,
        ("late_once", "done"): 1,
    }
    types, samples = wait_for(
        lambda: (lambda ts: totals(ts[1], queue="default") == expected and ts)(
            parse_metrics(scrape(port))
        ),
        "the outcomes in /metrics",
        diag=lambda: scrape(port) + spawn.tails(),
    )
    assert types["wakaq_tasks_total"] == "counter"
    assert types["wakaq_task_duration_seconds"] == "histogram"
    for gauge in ("pending", "delayed", "latency_seconds"):
        assert types[f"wakaq_queue_{gauge}"] == "gauge"
    assert {types[f"wakaq_{g}"] for g in ("running", "dead", "workers")} == {"gauge"}
    check_histograms(
        samples, {("default", "note"): 3, ("default", "boom"): 1, ("default", "late_once"): 2}
    )
    late_sum = sample(samples, "wakaq_task_duration_seconds_sum", queue="default", task="late_once")
    assert 0.3 <= late_sum < 3, late_sum  # the soft timeout's 0.3 s, and a quick second run
    pending = {q: sample(samples, "wakaq_queue_pending", queue=q) for q in app._queues}
    assert pending == {"high": 0, "idle": 2, "default": 0}, pending
    delayed = {q: sample(samples, "wakaq_queue_delayed", queue=q) for q in app._queues}
    assert delayed == {"high": 0, "idle": 0, "default": 1}, delayed
    latency = sample(samples, "wakaq_queue_latency_seconds", queue="idle")
    assert 0 < latency <= time.monotonic() - t0 + 1, latency
    assert sample(samples, "wakaq_queue_latency_seconds", queue="default") == 0
    assert [sample(samples, f"wakaq_{g}") for g in ("running", "dead", "workers")] == [1, 1, 1]
    for path in ("/", "/other", "/metrics/x"):
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(port, path)
        assert e.value.code == 404, path

    # Restarts: the worker and the exporter; the counts live in Redis.
    go(r, "metrics")
    expected[("hold", "done")] = 1
    wait_for(lambda: totals(parse_metrics(scrape(port))[1]) == expected, "hold done")
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait_exit(diag=spawn.tails) == 0
    os.kill(m.pid, signal.SIGTERM)
    assert m.wait_exit(5, diag=m.log) == 0
    port = _free_port()
    start_metrics(spawn, port)
    samples = parse_metrics(scrape(port))[1]
    assert totals(samples) == expected
    assert [sample(samples, f"wakaq_{g}") for g in ("running", "workers")] == [0, 0]
    spawn("worker", APP, "--exclude-queues", "idle")
    note.delay("d")
    expected[("note", "done")] = 4
    wait_for(
        lambda: totals(parse_metrics(scrape(port))[1]) == expected,
        "the new worker's count added to the old ones",
        diag=spawn.tails,
    )
    assert sample(parse_metrics(scrape(port))[1], "wakaq_workers") == 1


# ===================================================================== liveness and stopping


@slow
@needs_private
def test_health_passes_while_a_worker_runs_even_with_redis_down_and_fails_once_it_stops(
    r, spawn, redis_server
):
    assert health()[0] == 1
    w = spawn("worker", APP)
    workers_ready(r, [w], app, spawn.tails)
    wait_for(lambda: health()[0] == 0, "health to pass", diag=spawn.tails)
    redis_server.stop()
    try:
        wait_for(lambda: "lost Redis" in w.log(), "the worker to notice", diag=spawn.tails)
        end = time.monotonic() + app.heartbeat_timeout * 1.5
        while time.monotonic() < end:  # longer than heartbeat_timeout without Redis
            code, line = health()
            assert code == 0, line
        assert w.alive()
    finally:
        redis_server.start()
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait_exit(diag=spawn.tails) == 0
    code, line = health()
    assert code == 1 and "no worker" in line and socket.gethostname() in line, line


@slow
def test_health_fails_while_the_worker_loop_is_stuck_and_passes_once_it_turns_again(r, spawn):
    w = spawn("worker", APP)
    workers_ready(r, [w], app, spawn.tails)
    wait_for(lambda: health()[0] == 0, "health to pass", diag=spawn.tails)
    os.kill(w.pid, signal.SIGSTOP)  # the parent's loop stops turning
    try:
        t0 = time.monotonic()
        code, line = wait_for(
            lambda: (lambda h: h[0] == 1 and h)(health()), "health to fail", 10, 0.1
        )
        stuck = time.monotonic() - t0
        assert app.heartbeat_timeout - 0.3 <= stuck < app.heartbeat_timeout + 3, stuck
        assert line.startswith("unhealthy") and "limit 2s" in line, line
    finally:
        os.kill(w.pid, signal.SIGCONT)
    wait_for(lambda: health()[0] == 0, "health to pass again", diag=spawn.tails)


def idle_in_blpop(r):
    """True once a child of the worker waits for work in BLPOP: the worker is idle."""
    return any(c["cmd"] == "blpop" for c in r.client_list())


@slow
@needs_private
@pytest.mark.parametrize("redis_state", ["up", "stopped"])
def test_sigterm_to_an_idle_worker_exits_0_within_a_second_with_redis_up_or_stopped(
    r, spawn, redis_server, redis_state
):
    w = spawn("worker", APP)
    workers_ready(r, [w], app, spawn.tails)
    wait_for(lambda: idle_in_blpop(r), "the child to wait for work", diag=spawn.tails)
    kids = children(w.pid)
    try:
        if redis_state == "stopped":
            redis_server.stop()
            wait_for(lambda: "lost Redis" in w.log(), "the worker to notice", diag=spawn.tails)
        code, seconds = sigterm_and_time(w)
        print(f"\nRedis {redis_state}: exit {code} {seconds:.2f}s after SIGTERM")
        assert code == 0 and seconds < 1.0, (code, seconds, w.log())
        assert not [p for p in kids if pid_alive(p)], "a child outlived the parent"
    finally:
        kill_pids(p for p in kids if pid_alive(p))
        if redis_state == "stopped":
            redis_server.start()


@slow
@needs_private
def test_sigterm_to_a_worker_started_while_redis_is_down_exits_0_within_a_second(
    r, spawn, redis_server
):
    """Its child's first claim fails (connection refused): no task was taken, the worker
    is idle."""
    redis_server.stop()
    try:
        w = spawn("worker", APP)
        wait_for(
            lambda: "child 0 lost Redis" in w.log() and "worker lost Redis" in w.log(),
            "the worker and its child to find Redis down",
            diag=spawn.tails,
        )
        kids = children(w.pid)
        code, seconds = sigterm_and_time(w)
        print(f"\nexit {code} {seconds:.2f}s after SIGTERM")
        assert code == 0 and seconds < 1.0, (code, seconds, w.log())
        assert not [p for p in kids if pid_alive(p)], "a child outlived the parent"
    finally:
        redis_server.start()


@slow
@needs_private
def test_sigterm_to_an_idle_worker_exits_0_within_a_second_while_redis_does_not_answer(
    r, spawn, redis_server
):
    """Redis SIGSTOPped: connections open but nothing answers, as in a network partition."""
    w = spawn("worker", APP)
    workers_ready(r, [w], app, spawn.tails)
    wait_for(lambda: idle_in_blpop(r), "the child to wait for work", diag=spawn.tails)
    kids = children(w.pid)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        code, seconds = sigterm_and_time(w)
        print(f"\nexit {code} {seconds:.2f}s after SIGTERM")
        assert code == 0 and seconds < 1.0, (code, seconds, w.log())
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        kill_pids(p for p in kids if pid_alive(p))


# ===================================================================== wait_replicas


@slow
@needs_private
def test_wait_replicas_delay_returns_once_a_replica_has_the_task_else_raises_naming_the_ids(
    r, redis_server, tmp_path
):
    port = _free_port()
    replica = RedisServer(
        port, str(tmp_path / "replica"), "--replicaof", "127.0.0.1", str(redis_server.port)
    )
    delay = r.config_get("repl-diskless-sync-delay")["repl-diskless-sync-delay"]
    r.config_set("repl-diskless-sync-delay", 0)  # the first sync at once, not after 5 s
    replica.start()
    try:
        rc = replica.client()
        wait_for(
            lambda: (
                rc.info("replication").get("master_link_status") == "up"
                and r.info("replication").get("slave0", {}).get("state") == "online"
            ),
            "the replica to sync and the master to count it online",
            diag=lambda: (rc.info("replication"), r.info("replication")),
        )
        wait_for(
            lambda: r.set("test:probe", 1) and r.wait(1, 200) == 1,
            "the replica to acknowledge a write",
            diag=lambda: (rc.info("replication"), r.info("replication")),
        )
        task_id = stored.delay("kept")
        assert isinstance(task_id, str)
        # acknowledged: the replica holds it already
        assert [json.loads(p)["id"] for p in rc.lrange("{wakaq}:q:default", 0, -1)] == [task_id]
        rc.close()
    finally:
        replica.stop()
        r.config_set("repl-diskless-sync-delay", delay)
    t0 = time.monotonic()
    with pytest.raises(WakaQError) as e:
        stored.delay("unacknowledged")
    elapsed = time.monotonic() - t0
    last = json.loads(r.lindex("{wakaq}:q:default", -1))["id"]  # queued on the master
    assert last != task_id and last in str(e.value), str(e.value)
    assert "wait_replicas=1" in str(e.value) and elapsed < 1.5, (str(e.value), elapsed)
    with pytest.raises(WakaQError) as e:
        stored.delay_many([("x",), ("y",)])
    both = [json.loads(p)["id"] for p in r.lrange("{wakaq}:q:default", -2, -1)]
    assert all(i in str(e.value) for i in both), (both, str(e.value))


# ===================================================================== logs and the command line

_STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]"


@slow
def test_the_worker_log_says_requeued_and_stamps_a_printed_line_with_pid_and_task(r, spawn):
    w = spawn("worker", APP)
    late_id = late_once.delay("log")
    print_id = printer.delay("hello-from-the-task")
    wait_for(
        lambda: len(runs(r, "late")) == 2 and runs(r, "printer"), "both tasks", diag=spawn.tails
    )
    wait_for(lambda: "attempt=2 done" in w.log(), "the last attempt's line", diag=spawn.tails)
    log = w.log()
    assert re.search(
        rf"^{_STAMP} WARNING wakaq pid=\d+: task late_once id={late_id} "
        r"attempt 1: soft timeout; requeued$",
        log,
        re.M,
    ), log
    [[child]] = runs(r, "printer")
    assert re.search(
        rf"^{_STAMP} INFO wakaq\.print pid={child} task=printer: hello-from-the-task$", log, re.M
    ), log
    assert child != w.pid
    assert re.search(rf"task printer id={print_id} attempt=1 done in \d+\.\d+s$", log, re.M), log


@slow
def test_worker_loglevel_warning_hides_the_per_attempt_info_lines(r, spawn):
    w = spawn("worker", APP, "--loglevel", "WARNING")
    note.delay("quiet")
    boom_id = boom.delay()
    wait_for(lambda: "dead-lettered" in w.log(), "the dead letter's warning", diag=spawn.tails)
    assert notes(r) == ["quiet"]
    log = w.log()
    assert f"task boom id={boom_id} dead-lettered after 1 attempt(s)" in log, log
    assert not re.search(r"attempt=1 (done|raised)", log), log
    assert " INFO " not in log, log


@slow
@pytest.mark.parametrize("level", ["DEBUG", "WARNING"])
def test_scheduler_loglevel_sets_what_it_logs(r, spawn, level):
    s = spawn("scheduler", CRON_APP, "--loglevel", level)
    wait_for(lambda: r.llen("{wakaq}:q:default") >= 2, "two ticks enqueued", diag=s.log)
    code, _ = sigterm_and_time(s)
    assert code == 0, s.log()
    enqueued = re.findall(rf"^{_STAMP} INFO wakaq pid=\d+: enqueued tick for ", s.log(), re.M)
    assert len(enqueued) == (r.llen("{wakaq}:q:default") if level == "DEBUG" else 0), s.log()


def test_scheduler_refuses_an_unknown_loglevel_in_one_line():
    out = cli("scheduler", CRON_APP, "--loglevel", "LOUD")
    assert out.returncode == 2 and "LOUD" in out.stderr, out
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@slow
@needs_private
def test_a_scheduler_started_while_redis_is_down_waits_for_it_then_enqueues(r, spawn, redis_server):
    redis_server.stop()
    try:
        s = spawn("scheduler", CRON_APP)
        wait_for(
            lambda: not s.alive() or "lost Redis" in s.log(),
            "the scheduler to find Redis down",
            diag=s.log,
        )
        assert s.alive(), f"the scheduler exited {s.popen.returncode}:\n{s.log()}"
    finally:
        redis_server.start()
    wait_for(lambda: r.llen("{wakaq}:q:default"), "a tick once Redis is back", diag=s.log)


@slow
def test_info_lists_each_worker_and_warns_about_a_queue_no_live_worker_serves(r, spawn):
    w = spawn("worker", APP, "--exclude-queues", "idle")
    workers_ready(r, [w], app, spawn.tails)
    hold.delay("info")
    wait_for(lambda: runs(r, "hold"), "the child to be busy", diag=spawn.tails)
    note.delay("waits on a served queue")
    note.delay("waits on an unserved queue", queue="idle")
    try:
        info = wait_for(
            lambda: (lambda i: i["workers_list"][0]["running"] == 1 and i)(info_json()),
            "info to count the running task",
        )
        [worker] = info["workers_list"]
        assert worker["id"].split(".")[-2] == str(w.pid)
        assert (worker["host"], worker["queues"], worker["alive"]) == (
            socket.gethostname(),
            ["high", "default"],
            True,
        ), worker
        assert 0 <= worker["seconds_since_heartbeat"] < app.heartbeat_timeout, worker
        assert info["unserved_queues"] == ["idle"], info
        text = cli("info", APP).stdout
        assert re.search(
            rf"^worker {re.escape(worker['id'])} host={re.escape(socket.gethostname())} "
            r"queues=high,default running=1 heartbeat=\d+(\.\d+)?s ago$",
            text,
            re.M,
        ), text
        warnings = [line for line in text.splitlines() if line.startswith("warning")]
        assert warnings == ["warning: queue idle has pending tasks and no live worker serves it"], (
            text
        )
    finally:
        go(r, "info")


def watch_screens(watch):
    return re.split(r"^queue +priority", watch.log(), flags=re.M)[1:]


def watch_rates(watch, queue):
    """[(enqueued/s, done/s)] of `queue` on every screen that shows rates."""
    rate = r"enqueued (\d+\.\d)/s +done (\d+\.\d)/s"
    return [
        tuple(map(float, m))
        for screen in watch_screens(watch)
        for m in re.findall(rf"^{queue} .*{rate}$", screen, re.M)
    ]


@slow
def test_info_watch_redraws_with_per_queue_enqueued_and_done_rates(r, spawn):
    spawn("worker", APP, "--exclude-queues", "idle")
    note.delay("warm-up")  # both queues have counts before the watch starts
    note.delay("stays", queue="idle")
    wait_for(lambda: totals(app_metrics()).get(("note", "done")), "the first count")
    watch = spawn("info", APP, "--watch", "0.5")
    wait_for(lambda: watch_screens(watch), "the first screen", diag=watch.log)
    note.delay_many([(f"w{i}",) for i in range(4)])
    note.delay_many([("stays",)] * 3, queue="idle")
    wait_for(
        lambda: (
            any(e > 0 and d > 0 for e, d in watch_rates(watch, "default"))
            and any(e > 0 for e, _ in watch_rates(watch, "idle"))
        ),
        "a screen with enqueued and done rates",
        diag=watch.log,
    )
    assert all(d == 0 for _, d in watch_rates(watch, "idle")), watch_rates(watch, "idle")
    assert len(watch_screens(watch)) >= 2
    os.kill(watch.pid, signal.SIGINT)  # Ctrl-C
    assert watch.wait_exit(5, diag=watch.log) == 0
    assert "Traceback" not in watch.log(), watch.log()


@slow
def test_info_watch_counts_the_first_tasks_a_queue_ever_gets(r, spawn):
    watch = spawn("info", APP, "--watch", "0.5")
    wait_for(lambda: watch_screens(watch), "the first screen", diag=watch.log)
    note.delay_many([("first",)] * 3, queue="idle")
    wait_for(
        lambda: any(e > 0 for e, _ in watch_rates(watch, "idle")),
        "a screen with idle's enqueued rate",
        5,
        diag=watch.log,
    )


def outcome_counts(the_app):
    """{(queue, task, outcome): attempts} from the stats hash, as `metrics` reads it."""
    return wakaq._counters(the_app.redis.hgetall(the_app._k("stats")))[0]


@slow
def test_a_done_attempt_is_counted_by_its_ack_while_the_next_runs_and_after_that_is_killed(
    r, spawn
):
    quick_or_long.delay_many([(0,), (30,)])
    spawn("worker", "tests.test_operations:count_app")
    wait_for(lambda: len(runs(r, "quick_or_long")) == 2, "both to start", diag=spawn.tails)
    done = ("default", "quick_or_long", "done")
    assert outcome_counts(count_app).get(done) == 1  # acked and counted by the 2nd claim
    wait_for(
        lambda: ("default", "quick_or_long", "hard_timeout") in outcome_counts(count_app),
        "the long one's hard timeout",
        diag=spawn.tails,
    )
    assert outcome_counts(count_app).get(done) == 1


@slow
def test_attempts_that_end_together_are_counted_once_when_their_child_is_killed(r, spawn):
    pair.delay("b")
    pair.delay("a")
    overrun.delay()  # claimed after one of the pair's acks; its hard timeout kills the child
    spawn("worker", "tests.test_operations:pair_app")
    wait_for(
        lambda: ("default", "overrun", "hard_timeout") in outcome_counts(pair_app),
        "the hard timeout",
        diag=spawn.tails,
    )
    wait_for(lambda: not leftovers(r, pair_app), "every field released", diag=spawn.tails)
    assert outcome_counts(pair_app).get(("default", "pair", "done")) == 2
