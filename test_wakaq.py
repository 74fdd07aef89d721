"""The core suite: wakaq.py against one private redis-server (see conftest.py), real worker
and scheduler processes, real signals.

    python -m pytest -q test_wakaq.py

The apps below are imported by worker processes as `test_wakaq:APP` (spawn("worker",
"APP")). Process tests are marked `slow` (run by default; `-m "not slow"` leaves them
out); pure tests at the top need no Redis.
"""

import asyncio
import decimal
import json
import logging
import os
import random
import re
import signal
import sys
import time
from datetime import date, datetime, timedelta, timezone
from urllib.parse import urlparse

import pytest
import redis

import wakaq
from conftest import (
    CHAOS_SETTINGS,
    DONE,
    KILL_REASONS,
    LENS,
    LOG_FILE,
    MEM_FLAG,
    SCHED_LOG_FILE,
    STARTED,
    URL,
    _free_port,
    attempt,
    check_dead_letters,
    check_run_log,
    children,
    cli,
    dead,
    dead_myid,
    done_ids,
    enqueue_chaos,
    duplicates,
    inflight,
    leftovers,
    needs_private,
    queue,
    read_file,
    rec,
    record_run,
    registered_pids,
    run_log,
    runs,
    settled,
    sleep_then_record,
    slow,
    task_redis,
    wait_for,
    workers_ready,
)
from wakaq import CronTask, Queue, SoftTimeout, WakaQ, current_task


def info_json():
    return json.loads(cli("info", "test_wakaq:app", "--json").stdout)


# ===================================================================== the test apps and tasks


app = WakaQ(
    queues=[(1, "mid"), "default", (0, "high")],
    url=URL,
    concurrency=1,
    heartbeat_timeout=2,
    hard_timeout=20,
)


@app.task
def add(a, b):
    rec("add", a, b, attempt(), os.getpid(), os.getppid())
    rec("order", "add")


@app.task
def note(tag):
    rec("order", tag)


@app.task
async def async_add(a, b):
    await asyncio.sleep(0.01)
    rec("async_add", a + b, current_task()["name"])


@app.task
def sleepy(seconds, tag):
    rec("started", tag, attempt(), os.getpid())
    time.sleep(seconds)
    rec("finished", tag)


@app.task(max_retries=1)
def sleeps_on_first_attempt():
    rec("attempts", attempt(), os.getpid(), os.getppid())
    if attempt() == 1:
        time.sleep(30)


@app.task(soft_timeout=0.5, hard_timeout=3, max_retries=1)
def too_slow():
    rec("order", f"too_slow:{attempt()}")
    try:
        time.sleep(5)
    except SoftTimeout:
        rec("soft", attempt())
        raise


@app.task(soft_timeout=0.5, hard_timeout=1)
def stubborn():
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except Exception as e:  # swallows SoftTimeout: the hard timeout must act
            rec("caught", type(e).__name__)


@app.task(max_retries=2)
def boom():
    rec("boom", attempt())
    raise ValueError("boom-marker")


@app.task
def chatty():
    print("printed-by-chatty")
    logging.getLogger("x").info("logged-by-chatty")
    rec("chatty", 1)


@app.task
def which_module():
    main = sys.modules.get("__main__")
    rec("which", sys.modules.get("wakaq") is main, isinstance(app, main.WakaQ))


@app.task
def where():
    rec("where", os.getppid())


@app.task(max_retries=1)
def sleepy_once(seconds, tag):
    """Sleeps on its first attempt only; records both ends of every attempt."""
    rec("started", tag, attempt(), os.getpid(), os.getppid())
    time.sleep(seconds if attempt() == 1 else 0)
    rec("finished", tag, attempt(), os.getpid())


class GuardedApp(WakaQ):
    """Its memory guard holds only while the file MEM_FLAG exists: max_mem_percent is then
    the app's own 1 (exceeded on any machine), else 99. A worker whose guard holds from
    the start forks no child at all, so the test turns it on while children run."""

    @property
    def max_mem_percent(self):
        return self._max_mem if os.path.exists(MEM_FLAG) else 99

    @max_mem_percent.setter
    def max_mem_percent(self, value):
        self._max_mem = value


mem_app = GuardedApp(url=URL, concurrency=2, max_mem_percent=1)
mem_app.task(note.fn)


@mem_app.task
def hog(megabytes, seconds):
    ballast = b"x" * (megabytes << 20)  # resident: this child is the biggest
    rec("started", "hog", attempt(), os.getpid())
    time.sleep(seconds)
    rec("finished", "hog", len(ballast) >> 20, os.getpid())


hooks_app = WakaQ(url=URL, concurrency=1)
hooks_app.after_worker_started(lambda: rec("hooks", "started", os.getpid(), os.getppid()))
hooks_app.before_task_started(lambda: rec("hooks", "before"))
hooks_app.after_task_finished(lambda: rec("hooks", "after"))


@hooks_app.wrap_tasks_with
def _wrap(fn, args, kwargs):
    rec("hooks", "wrap", fn.__name__, args, kwargs, type(args).__name__, type(kwargs).__name__)
    return fn(*args, **kwargs)


@hooks_app.task
def hooked(x, y=0):
    rec("hooks", "task", x, y)


excluding_app = WakaQ(
    queues=[(0, "high"), "default"], url=URL, concurrency=1, exclude_queues=["high"]
)
excluding_app.task(note.fn)

recycle_app = WakaQ(url=URL, concurrency=1, max_tasks_per_worker=2)
pid_task = recycle_app.task(lambda: rec("pids", os.getpid()), name="pid_task")

logfile_app = WakaQ(url=URL, concurrency=1, worker_log_file=LOG_FILE)
logfile_app.task(chatty.fn)

sched_app = WakaQ(
    url=URL,
    concurrency=1,
    schedules=[CronTask("* * * * * *", "tick")],
    scheduler_log_file=SCHED_LOG_FILE,
)
sched_app.task(lambda: None, name="tick")

eager_app = WakaQ(url=URL, eager=True)
eager_add = eager_app.task(lambda a, b: rec("eager", a + b, os.getpid()), name="eager_add")


class _AttrDict(dict):
    """A result that answers any attribute from its keys (a KeyError for others)."""

    __getattr__ = dict.__getitem__


eager_attrs = eager_app.task(lambda: _AttrDict(a=1), name="eager_attrs")


# The chaos, deploy and bad-input tasks record each finished run with record_run().
chaos_app = WakaQ(url=URL, **CHAOS_SETTINGS)
chaos_job = chaos_app.task(sleep_then_record, name="chaos_job")
deploy_app = WakaQ(queues=["default"], url=URL, concurrency=2, heartbeat_timeout=15)
bad_app = WakaQ(queues=["default"], url=URL, concurrency=1, heartbeat_timeout=15)


@deploy_app.task
def deploy_job(myid, ms):
    task_redis().incr(STARTED)  # no chaos here: a plain command is enough
    time.sleep(ms / 1000)
    record_run(myid)


@bad_app.task
def checkin(myid):
    record_run(myid)


@bad_app.task
def measure(myid, data):
    task_redis().hset(LENS, myid, len(data))
    record_run(myid)


@bad_app.task
def two_args(myid, b):
    record_run(myid)


# ===================================================================== pure units, no Redis


def test_seconds_accepts_numbers_and_timedeltas_and_keeps_none_and_zero():
    assert wakaq._seconds(2, "x") == 2.0
    assert wakaq._seconds(0.5, "x") == 0.5
    assert wakaq._seconds(timedelta(minutes=1, milliseconds=500), "x") == 60.5
    assert wakaq._seconds(None, "x") is None
    assert wakaq._seconds(0, "x") == 0.0
    with pytest.raises(TypeError, match="soft_timeout.*'10'"):
        wakaq._seconds("10", "soft_timeout")
    with pytest.raises(ValueError, match="-1"):
        wakaq._seconds(-1, "eta")


def test_limits_take_task_then_queue_then_app_and_zero_is_not_unset():
    q = Queue("q", priority=0, soft_timeout=5, max_retries=2)
    a = WakaQ(queues=[q], url=URL, soft_timeout=10, hard_timeout=20, max_retries=3)
    t_plain = a.task(lambda: None, name="plain")
    t_own = a.task(lambda: None, name="own", soft_timeout=0, max_retries=0, hard_timeout=7)
    assert wakaq._limits_for(a, None, None)[:3] == (10.0, 20.0, 3)
    assert wakaq._limits_for(a, t_plain, q)[:3] == (5.0, 20.0, 2)
    assert wakaq._limits_for(a, t_own, q)[:3] == (0.0, 7.0, 0)


def test_concurrency_evaluates_arithmetic_of_cores_and_rejects_anything_else():
    assert wakaq._concurrency(3) == 3
    assert wakaq._concurrency("cores*2", cores=4) == 8
    assert wakaq._concurrency("cores - 1", cores=3) == 2
    assert wakaq._concurrency("cores // 2 + 1", cores=5) == 3
    assert wakaq._concurrency("cores - 1", cores=1) == 1  # one child on a one-core host
    for bad in ("cores ** 2", "__import__('os')", "cores(", "1/0", "ncpu"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            wakaq._concurrency(bad, cores=2)
    with pytest.raises(TypeError):
        wakaq._concurrency(True)


def test_import_app_accepts_colon_and_dot_forms_and_rejects_non_apps():
    assert wakaq._import_app("test_wakaq:app") is app
    assert wakaq._import_app("test_wakaq.hooks_app") is hooks_app
    with pytest.raises(ModuleNotFoundError):
        wakaq._import_app("no_such_module_xyz:app")
    with pytest.raises(AttributeError):
        wakaq._import_app("test_wakaq:no_such_app")
    with pytest.raises(TypeError, match="wait_for"):
        wakaq._import_app("test_wakaq:wait_for")
    with pytest.raises(ValueError):
        wakaq._import_app("app")


def roundtrip(value):
    return wakaq._loads(wakaq._dumps(value))


def test_serializer_round_trips_the_extra_types():
    aware = datetime(2024, 5, 1, 12, 30, 15, 250, tzinfo=timezone(timedelta(hours=2)))
    assert roundtrip(aware) == datetime(2024, 5, 1, 10, 30, 15, 250)
    assert roundtrip(aware).tzinfo is None
    assert roundtrip(datetime(2024, 5, 1, 1, 2)) == datetime(2024, 5, 1, 1, 2)
    assert roundtrip(date(2024, 2, 29)) == date(2024, 2, 29)
    assert type(roundtrip(date(2024, 2, 29))) is date
    assert roundtrip(timedelta(days=-1, seconds=5, microseconds=7)) == timedelta(-1, 5, 7)
    d = roundtrip(decimal.Decimal("1.10"))
    assert isinstance(d, decimal.Decimal) and str(d) == "1.10"
    assert roundtrip(b"\x00\xff binary") == b"\x00\xff binary"
    assert sorted(roundtrip({3, 1, 2})) == [1, 2, 3]
    assert roundtrip((1, (2, 3))) == [1, [2, 3]]
    nested = {"when": [date(2020, 1, 1)], "n": {"d": decimal.Decimal("2")}}
    assert roundtrip(nested) == nested


def test_serializer_raises_type_error_for_unknown_types_instead_of_str():
    for bad in (object(), complex(1, 2), [1, {"x": Queue("q")}]):
        with pytest.raises(TypeError):
            wakaq._dumps(bad)


def test_cgroup_text_parses_to_percentages():  # no limit: /proc/meminfo (test_delivery)
    assert wakaq._parse_cgroup("max\n", "12345\n") is None
    assert wakaq._parse_cgroup("2000\n", "500\n") == pytest.approx(25.0)
    # inactive page cache does not count; cgroup v1 says "no limit" with a huge number
    stat = "anon 100\ninactive_file 1000\nactive_file 5\n"
    assert wakaq._parse_cgroup("2000\n", "1500\n", stat) == pytest.approx(25.0)
    assert wakaq._parse_cgroup("9223372036854771712\n", "1500\n", "total_inactive_file 9\n") is None


def test_hard_timeout_not_above_soft_timeout_names_both_values():
    with pytest.raises(ValueError, match=r"hard_timeout \(5s\).*soft_timeout \(10s\)"):
        WakaQ(url=URL, soft_timeout=10, hard_timeout=5)
    with pytest.raises(ValueError, match="hard_timeout"):
        WakaQ(queues=[Queue("q", soft_timeout=3, hard_timeout=3)], url=URL)
    with pytest.raises(ValueError, match="'t'.*hard_timeout"):
        WakaQ(url=URL).task(
            lambda: None, name="t", soft_timeout=timedelta(seconds=2), hard_timeout=1
        )


def test_unknown_queue_is_named_in_task_exclude_queues_and_cron_task():
    a = WakaQ(queues=["a", "b"], url=URL)
    with pytest.raises(ValueError, match="'zz'"):
        a.task(lambda: None, name="t", queue="zz")
    with pytest.raises(ValueError, match="'zz'"):
        WakaQ(queues=["a", "b"], url=URL, exclude_queues=["zz"])
    with pytest.raises(ValueError, match="'zz'"):
        WakaQ(queues=["a"], url=URL, schedules=[CronTask("* * * * *", "t", queue="zz")])


def test_bad_cron_expression_is_named():
    for bad in ("61 * * * *", "* * *", "every minute", "* * * * * * * *"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            CronTask(bad, "t")


def test_bad_concurrency_expression_is_named():
    with pytest.raises(ValueError, match=re.escape("'cores ** 2'")):
        WakaQ(url=URL, concurrency="cores ** 2")
    assert WakaQ(url=URL, concurrency="cores - 1000").concurrency == 1  # at least one child
    with pytest.raises(ValueError, match="0"):
        WakaQ(url=URL, concurrency=0)


def test_max_mem_percent_outside_1_to_99_is_named():
    for bad in (0, 100, 150, -5):
        with pytest.raises(ValueError, match=str(bad)):
            WakaQ(url=URL, max_mem_percent=bad)
    assert WakaQ(url=URL, max_mem_percent=99).max_mem_percent == 99


def test_duplicate_task_name_raises_at_decoration():
    a = WakaQ(url=URL)
    a.task(lambda: None, name="same")
    with pytest.raises(ValueError, match="'same'"):
        a.task(lambda: None, name="same")


def test_unknown_timezone_is_named():
    with pytest.raises(ValueError, match="Mars/Olympus_Mons"):
        WakaQ(url=URL, timezone="Mars/Olympus_Mons")


def test_plain_queue_names_rank_below_numbered_ones_and_the_last_is_the_default():
    a = WakaQ(queues=["plain", (5, "five"), Queue("zero", priority=0)], url=URL)
    assert [q.name for q in a.queues] == ["zero", "five", "plain"]
    assert a.default_queue.name == "plain"
    assert app.default_queue.name == "default"


# ===================================================================== enqueue against real Redis


def test_calling_a_task_runs_it_here_and_now(r):
    note("here")
    assert runs(r, "order") == [["here"]] and r.keys("{wakaq}:*") == []


def test_delay_returns_a_str_id_and_pushes_onto_the_task_queue(r):
    task_id = add.delay(1, b=2)
    assert isinstance(task_id, str) and task_id
    [msg] = queue(r, "default")
    assert (msg["id"], msg["name"], msg["args"], msg["kwargs"], msg["retry"]) == (
        task_id,
        "add",
        [1],
        {"b": 2},
        0,
    )
    add.delay(3, 4, queue="high")
    assert [m["args"] for m in queue(r, "high")] == [[3, 4]]


def test_host_port_and_db_settings_reach_the_same_redis_as_url(r):
    u = urlparse(URL)
    other = WakaQ(
        host=u.hostname,
        port=u.port or 6379,
        db=int(u.path.strip("/") or 0),
        username=u.username,
        password=u.password,
    )
    other.task(add.fn)
    task_id = other.tasks["add"].delay(1, 2)
    assert [m["id"] for m in queue(r, "default")] == [task_id]


def test_eta_puts_the_task_in_the_delayed_set_at_its_due_time(r):
    now = time.time()
    add.delay(1, 1, eta=60)
    add.delay(2, 2, eta=timedelta(seconds=30))
    add.delay(3, 3, eta=datetime(2030, 1, 1, 12, 0))  # naive = UTC
    add.delay(4, 4, eta=datetime(2030, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))))
    assert r.llen("{wakaq}:q:default") == 0
    scores = {
        tuple(json.loads(p)["args"]): s
        for p, s in r.zrange("{wakaq}:eta:default", 0, -1, withscores=True)
    }
    assert scores[(1, 1)] == pytest.approx(now + 60, abs=2)
    assert scores[(2, 2)] == pytest.approx(now + 30, abs=2)
    noon_utc = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc).timestamp()
    assert scores[(3, 3)] == noon_utc and scores[(4, 4)] == noon_utc


def test_two_identical_delayed_calls_are_two_tasks(r):
    first, second = add.delay(1, 2), add.delay(1, 2)
    assert first != second
    assert [m["id"] for m in queue(r, "default")] == [first, second]
    add.delay(1, 2, eta=10)
    add.delay(1, 2, eta=10)
    assert r.zcard("{wakaq}:eta:default") == 2


def test_delay_many_enqueues_every_call_and_returns_their_ids(r):
    ids = add.delay_many([(1, 2), [3, 4], {"args": [5], "kwargs": {"b": 6}}])
    assert len(ids) == 3 and len(set(ids)) == 3
    assert [(m["id"], m["args"], m["kwargs"]) for m in queue(r, "default")] == [
        (ids[0], [1, 2], {}),
        (ids[1], [3, 4], {}),
        (ids[2], [5], {"b": 6}),
    ]


def test_delay_with_an_unserializable_argument_raises_and_enqueues_nothing(r):
    with pytest.raises(TypeError):
        add.delay(object(), 1)
    with pytest.raises(TypeError):
        add.delay_many([(1, 2), (object(), 2)])
    with pytest.raises(TypeError):
        add.delay(1, b=object(), eta=30)
    circular = []
    circular.append(circular)
    for bad in ({1: "json would make this key a str"}, {"__wakaq__": "our tag"}, circular):
        with pytest.raises(TypeError):
            add.delay(bad, 1)
    assert r.keys("{wakaq}:*") == []


def test_delay_many_with_kwargs_that_are_not_a_dict_raises_type_error_and_enqueues_nothing(r):
    for bad in (["b", 2], "b=2", 7):
        with pytest.raises(TypeError):
            add.delay_many([(1, 2), {"args": [1], "kwargs": bad}])
    assert r.keys("{wakaq}:*") == []


def test_delay_many_type_error_names_the_kwargs_value_that_is_not_a_dict(r):
    with pytest.raises(TypeError, match=re.escape(repr("b=2"))):
        add.delay_many([{"args": [1], "kwargs": "b=2"}])


def test_an_eta_timedelta_in_the_past_runs_now_like_negative_seconds(r):
    first = add.delay(1, 1, eta=timedelta(seconds=-5))
    second = add.delay(2, 2, eta=-5)
    assert [m["id"] for m in queue(r, "default")] == [first, second]
    assert r.zcard("{wakaq}:eta:default") == 0


def test_the_bare_connection_reads_every_reply_with_redis_py_parser(r):
    """app._conn (wakaq's own connection for .delay()): a status reply, and an array holding an
    error, are read whole, so the next command on the same connection gets its own reply."""
    conn = WakaQ(url=URL)._conn
    assert conn.execute_command("SET", "test:parser", "v") in (b"OK", True, "OK")
    assert conn.execute_command("GET", "test:parser") in (b"v", "v")
    script = "return {1, redis.error_reply('an error inside an array'), 'after'}"
    try:
        reply = conn.execute_command("EVAL", script, 0)
    except redis.ResponseError as e:  # raising it is fine too, once the array was read whole
        reply = e
    assert conn.execute_command("PING") in (b"PONG", True, "PONG"), f"after {reply!r}"
    assert conn.execute_command("GET", "test:parser") in (b"v", "v")


def test_eager_delay_runs_the_task_inline_and_touches_no_queue(r):
    task_id = eager_add.delay(2, 3)
    assert isinstance(task_id, str)
    assert runs(r, "eager") == [[5, os.getpid()]]
    assert eager_add.broadcast(1, 1) == 1
    assert r.keys("{wakaq}:*") == []


def test_a_task_may_return_an_object_whose_attributes_are_its_keys():
    eager_attrs.delay()  # is it awaitable? asked of its type, not of the object
    assert eager_attrs() == {"a": 1}


def test_broadcast_with_no_live_workers_returns_zero(r):
    assert where.broadcast() == 0
    assert r.keys("{wakaq}:bcast:*") == []


@slow
def test_broadcast_runs_once_on_each_live_worker_and_returns_their_number(r, spawn):
    w1, w2 = spawn("worker"), spawn("worker")
    workers_ready(r, [w1, w2], app)
    assert info_json()["workers"] == 2
    assert where.broadcast() == 2
    wait_for(lambda: len(runs(r, "where")) >= 2, "the broadcast to run on both workers")
    add.delay(0, 0)
    wait_for(lambda: runs(r, "add"), "a later task to run")
    assert sorted(p for [p] in runs(r, "where")) == sorted([w1.pid, w2.pid])


# ===================================================================== worker behaviour


@slow
def test_a_delayed_task_runs_in_a_worker_child(r, spawn):
    w = spawn("worker")
    add.delay(2, 3)
    [[a, b, n, pid, ppid]] = wait_for(lambda: runs(r, "add"), "add to run")
    assert (a, b, n, ppid) == (2, 3, 1, w.pid) and pid != w.pid
    wait_for(
        lambda: r.keys("{wakaq}:q:*") == [] and not any(inflight(r).values()),
        "the task to leave Redis",
    )


@slow
def test_an_idle_worker_picks_a_task_up_at_once_after_redis_lost_its_scripts(r, spawn):
    """An idle child's claim waits in Redis behind its BLPOP. If Redis has lost the claim
    script meanwhile (a restart, a failover), the claim goes again as EVAL without a second
    BLPOP (the wake-up was spent): the task runs at once, not after wait_timeout (5 s)."""
    w = spawn("worker")
    workers_ready(r, [w], app)
    wait_for(lambda: any(c["cmd"] == "blpop" for c in r.client_list()), "the child to wait")
    r.script_flush()
    started = time.monotonic()
    add.delay(4, 5)
    wait_for(lambda: runs(r, "add"), "add to run", 10)
    assert time.monotonic() - started < 2.0


@slow
def test_a_stopping_worker_puts_back_a_claim_that_no_child_of_its_will_run(r, spawn):
    """A stop can cut an idle child's wait just as Redis runs the claim written behind its
    BLPOP: the task is then in the worker's in-flight hash, and no child will run it. Once
    its children are gone, the worker puts it back at the front: it never started."""
    w = spawn("worker")
    workers_ready(r, [w], app)
    [wid] = [m for m in r.zrange("{wakaq}:workers", 0, -1) if f".{w.pid}.".encode() in m]
    task_id, raw = app._payload(add, [7, 8], {}, app.default_queue)
    r.hset(b"{wakaq}:inflight:" + wid, mapping={"5.0": raw, "5.0:t": "999999-1"})
    os.kill(w.pid, signal.SIGTERM)
    w.popen.wait(10)
    assert r.lrange("{wakaq}:q:default", 0, -1) == [raw.encode()]
    assert r.zscore("{wakaq}:workers", wid) is None


@slow
def test_a_due_eta_task_runs_and_a_future_one_waits(r, spawn):
    add.delay(1, 1, eta=0.3)
    add.delay(9, 9, eta=3600)
    spawn("worker")
    wait_for(lambda: runs(r, "add"), "the due task to run")
    assert [x[:2] for x in runs(r, "add")] == [[1, 1]]
    assert r.zcard("{wakaq}:eta:default") == 1


@slow
def test_the_lower_priority_number_is_served_first(r, spawn):
    for q, tag in (
        ("default", "d1"),
        ("mid", "m1"),
        ("high", "h1"),
        ("default", "d2"),
        ("mid", "m2"),
        ("high", "h2"),
    ):
        note.delay(tag, queue=q)
    spawn("worker")
    wait_for(lambda: len(runs(r, "order")) == 6, "six tasks to run")
    assert [t for [t] in runs(r, "order")] == ["h1", "h2", "m1", "m2", "d1", "d2"]


@slow
def test_an_async_task_runs_to_completion(r, spawn):
    spawn("worker")
    async_add.delay(2, 5)
    assert wait_for(lambda: runs(r, "async_add"), "the async task") == [[7, "async_add"]]


@slow
def test_hooks_run_in_the_child_around_each_task_and_the_wrapper_runs_it(r, spawn):
    w = spawn("worker", "hooks_app")
    hooked.delay(1, y=2)
    wait_for(lambda: ["after"] in runs(r, "hooks"), "after_task_finished")
    events = runs(r, "hooks")
    [started] = [e for e in events if e[0] == "started"]
    assert started[2] == w.pid and started[1] != w.pid  # in the child, after fork
    assert [e for e in events if e[0] != "started"] == [
        ["before"],
        ["wrap", "hooked", [1], {"y": 2}, "list", "dict"],
        ["task", 1, 2],
        ["after"],
    ]


@slow
def test_soft_timeout_raises_inside_the_task_retries_at_the_end_then_dead_letters(r, spawn):
    too_slow.delay()
    note.delay("after")
    spawn("worker")
    [entry] = wait_for(lambda: dead(r), "the dead letter")
    assert runs(r, "soft") == [[1], [2]]
    assert [t for [t] in runs(r, "order")] == ["too_slow:1", "after", "too_slow:2"]
    assert (entry["name"], entry["queue"], entry["attempts"], entry["reason"]) == (
        "too_slow",
        "default",
        2,
        "soft timeout",
    )


@slow
def test_a_task_that_swallows_soft_timeout_is_killed_at_the_hard_timeout(r, spawn):
    w = spawn("worker")
    started = time.monotonic()
    stubborn.delay()
    [entry] = wait_for(lambda: dead(r), "the dead letter")
    assert time.monotonic() - started < 8
    assert ["SoftTimeout"] in runs(r, "caught")
    assert (entry["name"], entry["attempts"], entry["reason"]) == ("stubborn", 1, "hard timeout")
    add.delay(1, 1)
    wait_for(lambda: runs(r, "add"), "the re-forked child to run the next task")
    assert w.alive()


@slow
def test_an_ordinary_exception_is_logged_not_retried_and_recorded_as_a_dead_letter(r, spawn):
    w = spawn("worker")
    boom_id = boom.delay()
    wait_for(lambda: "ValueError: boom-marker" in w.log(), "the traceback in the log")
    add.delay(1, 1)
    wait_for(lambda: runs(r, "add"), "the next task")
    assert runs(r, "boom") == [[1]]
    [entry] = dead(r)
    assert (entry["id"], entry["name"], entry["attempts"]) == (boom_id, "boom", 1)
    assert entry["reason"].startswith("raised ValueError: boom-marker")
    assert r.llen("{wakaq}:q:default") == 0
    assert "Traceback (most recent call last)" in w.log()
    assert re.search(r"task=boom.*task boom raised", w.log())


@slow
def test_kill_9_of_a_child_mid_task_retries_the_task_in_a_new_child(r, spawn):
    w = spawn("worker")
    sleeps_on_first_attempt.delay()
    [[n, pid, _]] = wait_for(lambda: runs(r, "attempts"), "the first attempt")
    assert n == 1 and r.llen("{wakaq}:q:default") == 0
    [running] = inflight(r).values()  # in Redis until its attempt ends
    assert [json.loads(p)["name"] for p in running.values()] == ["sleeps_on_first_attempt"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(runs(r, "attempts")) == 2, "the second attempt")
    [n2, pid2, ppid2] = runs(r, "attempts")[1]
    assert (n2, ppid2) == (2, w.pid) and pid2 != pid
    assert w.alive() and dead(r) == []


@slow
def test_a_child_killed_on_its_last_attempt_is_dead_lettered_as_worker_died(r, spawn):
    w = spawn("worker")
    sleepy.delay(30, "doomed")  # max_retries 0
    [[_, _, pid]] = wait_for(lambda: runs(r, "started"), "the task to start")
    os.kill(pid, signal.SIGKILL)
    [entry] = wait_for(lambda: dead(r), "the dead letter")
    assert (entry["name"], entry["attempts"], entry["reason"]) == ("sleepy", 1, "worker died")
    assert w.alive()


@slow
def test_kill_9_of_a_whole_worker_lets_another_worker_take_its_task_back(r, spawn):
    a = spawn("worker")
    sleeps_on_first_attempt.delay()
    wait_for(lambda: runs(r, "attempts"), "the first attempt in worker A")
    a.kill()
    b = spawn("worker")
    wait_for(lambda: len(runs(r, "attempts")) == 2, "worker B to take the task back", 25)
    assert runs(r, "attempts")[1][0] == 2 and runs(r, "attempts")[1][2] == b.pid
    assert dead(r) == []
    assert "taking back its 1 task(s)" in b.log()


@slow
def test_a_worker_cut_off_longer_than_heartbeat_timeout_has_its_task_taken_back(r, spawn):
    a = spawn("worker")
    sleepy_once.delay(3, "cut-off")
    [[_, n, a_child, ppid]] = wait_for(lambda: runs(r, "started"), "the first attempt in A")
    assert (n, ppid) == (1, a.pid)
    b = spawn("worker")
    workers_ready(r, [a, b], app, spawn.tails)
    a.signal_group(signal.SIGSTOP)  # A's parent and child fall silent, connections open
    try:
        wait_for(
            lambda: len(runs(r, "started")) == 2,
            "worker B to take the task back",
            15,
            diag=spawn.tails,
        )
        assert a.pid not in registered_pids(r, float("inf")), "A's heartbeat entry is left"
    finally:
        a.signal_group(signal.SIGCONT)
    [_, n2, b_child, ppid2] = runs(r, "started")[1]
    assert (n2, ppid2) == (2, b.pid)
    assert "taking back its 1 task(s)" in b.log()
    # A carries on: its child finishes the old attempt too (at least once allows it) ...
    wait_for(
        lambda: sorted(runs(r, "finished")) == [["cut-off", 1, a_child], ["cut-off", 2, b_child]],
        "both attempts to finish",
        diag=spawn.tails,
    )
    # ... and A heartbeats again and serves: a broadcast reaches both workers
    wait_for(lambda: info_json()["workers"] == 2, "worker A to heartbeat again")
    assert registered_pids(r, app.heartbeat_timeout) == {a.pid, b.pid}
    assert where.broadcast() == 2
    wait_for(lambda: len(runs(r, "where")) == 2, "the broadcast to run on both workers")
    assert sorted(p for [p] in runs(r, "where")) == sorted([a.pid, b.pid])
    wait_for(lambda: not any(inflight(r).values()), "nothing left in flight")
    assert a.alive() and b.alive() and children(a.pid) == [a_child]
    assert dead(r) == [] and len(runs(r, "started")) == 2
    assert "Traceback" not in a.log() + b.log(), spawn.tails(40)


@slow
def test_memory_guard_stops_only_the_biggest_child_after_its_task_and_forks_none_while_high(
    r, spawn
):
    w = spawn("worker", "mem_app")
    workers_ready(r, [w], mem_app, spawn.tails)
    hog.delay(100, 2.0)
    [[_, _, hog_pid]] = wait_for(lambda: runs(r, "started"), "the hog to start")
    [other] = set(children(w.pid)) - {hog_pid}
    stops = r"memory at \d+% \(max_mem_percent=1\): stopping child (\d+)"
    try:
        open(MEM_FLAG, "w").close()  # memory is now above max_mem_percent
        first = wait_for(lambda: re.search(stops, w.log()), "the memory guard's log line", 5)
        assert int(first[1]) == hog_pid, "the guard did not pick the largest RSS"
        wait_for(lambda: children(w.pid) == [other], "the biggest child to exit", diag=spawn.tails)
        assert runs(r, "finished") == [["hog", 100, hog_pid]]  # its task ran to the end
        note.delay("while high")  # the other child still serves
        wait_for(lambda: runs(r, "order") == [["while high"]], "the other child to run a task")
        deadline = time.monotonic() + 2  # one stop per episode; no fork while high
        while time.monotonic() < deadline:
            assert children(w.pid) == [other]
            time.sleep(0.05)
        assert [int(p) for p in re.findall(stops, w.log())] == [hog_pid]
        assert "exited with" not in w.log(), w.log()  # it exited 0
        assert dead(r) == [] and w.alive()
    finally:
        if os.path.exists(MEM_FLAG):
            os.remove(MEM_FLAG)
    wait_for(lambda: len(children(w.pid)) == 2, "a child forked again once memory is low")
    assert len(runs(r, "started")) == 1 and "Traceback" not in w.log()


@slow
@needs_private
def test_redis_restart_mid_run_loses_nothing_and_is_logged_once(r, spawn, redis_server):
    w = spawn("worker")
    sleepy.delay(3, "running")  # it records its end after Redis is back
    wait_for(lambda: runs(r, "started"), "the first task to start")
    add.delay_many([(1, 1), (2, 2), (3, 3)])
    redis_server.stop(graceful=True)
    wait_for(lambda: "worker lost Redis" in w.log(), "the worker to notice the outage")
    time.sleep(0.5)  # keep Redis down a moment longer, so the child notices too
    redis_server.start()
    add.delay(4, 4)
    wait_for(
        lambda: len(runs(r, "add")) == 4,
        "all four adds after the restart",
        25,
        diag=lambda: (
            f"adds: {runs(r, 'add')}, dead: {dead(r)}, queue: {queue(r, 'default')}"
            f", in flight: {inflight(r)}, ready: {r.zrange('{wakaq}:ready', 0, -1)}, workers: "
            f"{r.zrange('{wakaq}:workers', 0, -1)}, keys: {r.keys('*')}\n{spawn.tails(30)}"
        ),
    )
    assert sorted(x[0] for x in runs(r, "add")) == [1, 2, 3, 4]
    log = w.log()
    assert runs(r, "finished") == [["running"]], log
    assert w.alive()
    assert log.count("worker lost Redis") == 1
    assert all(log.count(f"child {i} lost Redis") <= 1 for i in range(app.concurrency))
    assert "Traceback" not in log, log


@slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_lets_running_tasks_finish_and_exits_zero(r, spawn, sig):
    w = spawn("worker")
    sleepy.delay(1.0, "running")
    wait_for(lambda: runs(r, "started"), "the task to start")
    add.delay(1, 1)
    add.delay(2, 2)
    os.kill(w.pid, sig)
    assert w.wait_exit() == 0
    assert runs(r, "finished") == [["running"]]
    assert runs(r, "add") == []
    assert [m["args"] for m in queue(r, "default")] == [[1, 1], [2, 2]]
    assert r.zcard("{wakaq}:workers") == 0


@slow
def test_second_stop_signal_stops_at_once_and_requeues_the_task_at_the_front(r, spawn):
    w = spawn("worker")
    task_id = sleepy.delay(30, "long")
    wait_for(lambda: runs(r, "started"), "the task to start")
    add.delay(1, 1)
    started = time.monotonic()
    os.kill(w.pid, signal.SIGTERM)
    wait_for(lambda: "stopping" in w.log(), "the first signal to be seen")
    os.kill(w.pid, signal.SIGINT)
    w.wait_exit(10)
    assert time.monotonic() - started < 8
    front, nxt = queue(r, "default")
    assert (front["id"], front["retry"], nxt["name"]) == (task_id, 0, "add")
    assert dead(r) == [] and runs(r, "finished") == []


@slow
def test_a_worker_does_not_serve_its_excluded_queues(r, spawn):
    note.delay("excluded", queue="high")  # would run first if it were served
    note.delay_many([("served",), ("later",)])
    spawn("worker", "excluding_app")
    wait_for(lambda: len(runs(r, "order")) == 2, "the default queue's tasks")
    assert runs(r, "order") == [["served"], ["later"]]
    assert [m["args"] for m in queue(r, "high")] == [["excluded"]]


@slow
def test_max_tasks_per_worker_recycles_the_child(r, spawn):
    spawn("worker", "recycle_app")
    for _ in range(5):
        pid_task.delay()
    wait_for(lambda: len(runs(r, "pids")) == 5, "five tasks")
    p = [pid for [pid] in runs(r, "pids")]
    assert p[0] == p[1] != p[2] == p[3] != p[4] and p[0] != p[4]


@slow
def test_unknown_task_is_dead_lettered_and_the_worker_carries_on(r, spawn):
    w = spawn("worker")
    raw = json.dumps(
        {
            "id": "x1",
            "name": "no_such_task",
            "queue": "default",
            "retry": 0,
            "args": [],
            "kwargs": {},
        }
    )
    r.rpush("{wakaq}:q:default", raw)
    r.zadd("{wakaq}:ready", {"default": 0})  # the non-empty queues, by rank
    r.rpush("{wakaq}:wake:default", 1)
    add.delay(1, 1)
    wait_for(lambda: runs(r, "add"), "the next task to run")
    [entry] = dead(r)
    assert (entry["id"], entry["name"], entry["reason"]) == ("x1", "no_such_task", "unknown task")
    assert json.loads(entry["payload"]) == json.loads(raw)
    assert w.alive()


@slow
def test_print_and_log_lines_in_a_task_reach_the_worker_stderr_naming_the_task(r, spawn):
    w = spawn("worker")
    chatty.delay()
    wait_for(
        lambda: "logged-by-chatty" in w.log() and "printed-by-chatty" in w.log(),
        "the task's output in the worker log",
    )
    assert re.search(r"^.*task=chatty.*logged-by-chatty$", w.log(), re.M)


@slow
@pytest.mark.parametrize("log_file", [LOG_FILE], indirect=True)
def test_worker_log_file_receives_the_task_output_instead_of_stderr(r, spawn, log_file):
    w = spawn("worker", "logfile_app")
    chatty.delay()

    def in_file():
        text = read_file(log_file)
        return "logged-by-chatty" in text and "printed-by-chatty" in text and text

    text = wait_for(in_file, "the task's output in worker_log_file")
    assert "task=chatty" in text and "started" in text
    assert "chatty" not in w.log()


@slow
def test_the_app_sees_one_wakaq_module_when_run_as_a_script(r, spawn):
    spawn("worker")
    which_module.delay()
    assert wait_for(lambda: runs(r, "which"), "the task") == [[True, True]]


# ===================================================================== scheduler


@slow
@pytest.mark.parametrize("log_file", [SCHED_LOG_FILE], indirect=True)
def test_two_schedulers_enqueue_each_tick_exactly_once(r, spawn, log_file):
    started = time.time()
    spawn("scheduler", "sched_app")
    spawn("scheduler", "sched_app")
    wait_for(lambda: r.llen("{wakaq}:q:default") >= 4, "four ticks", 20)
    pipe = r.pipeline(transaction=True)  # one atomic snapshot
    pipe.lrange("{wakaq}:q:default", 0, -1)
    pipe.keys("{wakaq}:cron:*")
    ticks, locks = pipe.execute()
    elapsed = time.time() - started
    assert {json.loads(m)["name"] for m in ticks} == {"tick"}
    assert len(locks) == 1  # one record of the last tick per schedule
    assert len(ticks) <= elapsed + 1


@slow
@pytest.mark.parametrize("log_file", [SCHED_LOG_FILE], indirect=True)
def test_scheduler_logs_to_its_log_file_and_exits_zero_on_sigterm(r, spawn, log_file):
    s = spawn("scheduler", "sched_app")
    wait_for(lambda: "scheduler started" in read_file(log_file), "the scheduler's log file")
    os.kill(s.pid, signal.SIGTERM)
    assert s.wait_exit(10) == 0


# ===================================================================== command line


def test_help_exits_zero_for_the_top_level_and_every_command():
    for args in ([], ["worker"], ["scheduler"], ["info"], ["purge"], ["dead"]):
        out = cli(*args, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout, args


@pytest.mark.parametrize(
    "spec",
    ["no_such_module_xyz:app", "test_wakaq:no_such_app", "test_wakaq:wait_for", "test_wakaq"],
)
def test_a_bad_app_prints_one_line_and_exits_two(spec):
    out = cli("info", spec)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and spec in out.stderr


def test_bad_arguments_exit_two():
    for args in (
        [],
        ["bogus"],
        ["info"],
        ["purge", "test_wakaq:app"],
        ["dead", "test_wakaq:app", "--requeue", "--purge"],
        ["info", "x:y", "--nope"],
    ):
        assert cli(*args).returncode == 2, args
    out = cli("purge", "test_wakaq:app", "nope")  # an unknown queue
    assert out.returncode == 2 and "'nope'" in out.stderr


def test_info_json_reports_queues_inflight_dead_and_workers(r):
    add.delay(1, 1)
    add.delay(2, 2)
    add.delay(3, 3, queue="high", eta=60)
    r.rpush("{wakaq}:dead", wakaq._dead_entry("{}", None, "bad payload"))
    out = cli("info", "test_wakaq:app", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["queues"] == {
        "high": {"priority": 0, "pending": 0, "delayed": 1},
        "mid": {"priority": 1, "pending": 0, "delayed": 0},
        "default": {"priority": 2, "pending": 2, "delayed": 0},
    }
    assert (info["inflight"], info["dead"], info["workers"]) == (0, 1, 0)
    assert cli("info", "test_wakaq:app").returncode == 0


def test_purge_prints_pending_plus_delayed_and_empties_both(r):
    add.delay_many([(1, 1), (2, 2)])
    add.delay(3, 3, eta=60)
    add.delay(4, 4, queue="high")
    out = cli("purge", "test_wakaq:app", "default")
    assert (out.returncode, out.stdout.strip()) == (0, "3")
    assert r.llen("{wakaq}:q:default") == 0 and r.zcard("{wakaq}:eta:default") == 0
    assert r.llen("{wakaq}:q:high") == 1


def test_concurrency_none_is_refused_when_the_app_is_defined():
    with pytest.raises(TypeError, match="concurrency"):
        WakaQ(url=URL, concurrency=None)


def test_purge_also_forgets_the_cancellations_of_the_tasks_it_removed(r):
    """A cancelled pending task leaves a tombstone that its claim would drop; once purge has
    removed the task, no claim will, so purge drops it (else every claim pays for it)."""
    doomed, kept = add.delay(1, 1), add.delay(2, 2, queue="high")
    assert (app.cancel(doomed), app.cancel(kept)) == ("pending", "pending")
    assert cli("purge", "test_wakaq:app", "default").returncode == 0
    assert r.hkeys("{wakaq}:cancelled") == [kept.encode()]


def _make_dead(r, reason="soft timeout", retry=1, queue_name="default"):
    add.delay(5, 6, queue=queue_name)
    raw = r.lpop(f"{{wakaq}}:q:{queue_name}")
    msg = json.loads(raw)
    msg["retry"] = retry
    r.rpush("{wakaq}:dead", wakaq._dead_entry(json.dumps(msg), msg, reason))
    return msg["id"]


def test_dead_lists_name_queue_attempts_and_reason(r):
    _make_dead(r)
    out = cli("dead", "test_wakaq:app")
    assert out.returncode == 0
    [line] = out.stdout.strip().splitlines()
    assert re.search(r"\badd\b.*\bdefault\b.*\b2\b.*soft timeout", line), line


def test_dead_requeue_puts_tasks_back_on_their_queue(r):
    task_id = _make_dead(r)
    high_id = _make_dead(r, "hard timeout", queue_name="high")
    out = cli("dead", "test_wakaq:app", "--requeue")
    assert out.returncode == 0
    assert r.llen("{wakaq}:dead") == 0
    [msg] = queue(r, "default")
    assert (msg["id"], msg["name"], msg["args"]) == (task_id, "add", [5, 6])
    assert [m["id"] for m in queue(r, "high")] == [high_id]


def test_dead_purge_deletes_them(r):
    _make_dead(r)
    _make_dead(r, "hard timeout")
    assert cli("dead", "test_wakaq:app", "--purge").returncode == 0
    assert r.llen("{wakaq}:dead") == 0 and r.llen("{wakaq}:q:default") == 0


# ===================================================================== chaos


def _kill_a_child(live, rng, spawn):
    for _ in range(50):  # a child may be between fork and exec
        kids = [k for p in live for k in children(p.pid)]
        if kids:
            break
        time.sleep(0.05)
    assert kids, "no worker children to kill\n" + spawn.tails()
    os.kill(rng.choice(kids), signal.SIGKILL)


def _chaos_action(action, r, redis_server, spawn, live, rng):
    """One chaos action; a worker kill returns the (victim, replacement) workers."""
    if action == "child":
        _kill_a_child(live, rng, spawn)
    elif action == "client_kill":
        r.execute_command("CLIENT", "KILL", "TYPE", "normal")  # SKIPME yes: not us
    elif action == "redis_restart":
        redis_server.restart()  # SIGKILL: a crash; the AOF keeps data
        assert r.get("test:chaos:sentinel") == b"kept", "redis-server lost its data on restart"
    elif action == "worker_kill":
        victim = rng.choice(live)
        victim.kill()  # parent and children at once
        live.remove(victim)
        replacement = spawn("worker", "chaos_app")
        live.append(replacement)
        return victim, replacement
    return None


class ChaosSettled:
    """A wait_for predicate: every task done (or dead by a kill) and nothing queued, delayed
    or in flight. It fails at once if a long-dead worker's in-flight tasks are not taken
    back, or if tasks are missing while nothing is left to run them for 5 s."""

    def __init__(self, r, the_app, expected, diag):
        self.r, self.app, self.expected, self.diag = r, the_app, set(expected), diag
        self.dead_letters, self.quiet_since = [], None

    def __call__(self):
        self.dead_letters = dead(self.r)
        killed = {dead_myid(e) for e in self.dead_letters if e.get("reason") in KILL_REASONS}
        complete = (done_ids(self.r) | killed) >= self.expected
        left = leftovers(self.r, self.app)
        cut_off = time.time() - 3 * self.app.heartbeat_timeout - 5
        long_dead = {w.decode() for w in self.r.zrangebyscore("{wakaq}:workers", "-inf", cut_off)}
        if any(k.rpartition(":")[2] in long_dead for k in left):
            raise AssertionError(
                "a dead worker's in-flight tasks were not taken back\n" + self.diag()
            )
        if left:
            self.quiet_since = None
        elif not complete:  # nothing queued, delayed or in flight, yet tasks missing
            self.quiet_since = self.quiet_since or time.monotonic()
            if time.monotonic() - self.quiet_since > 5:
                raise AssertionError("tasks lost: nothing is left to run them\n" + self.diag())
        return complete and not left


def _logs_summary(spawn):
    logs = "".join(p.log() for p in spawn)
    print(
        f"worker logs: {logs.count('task released (worker died)')} tasks released after "
        f"a kill, {logs.count('taking back')} dead worker(s) taken back, "
        f"{logs.count('lost Redis')} outages logged, {logs.count('Traceback')} tracebacks"
    )
    return logs


@slow
@needs_private
def test_chaos_kills_restarts_and_disconnects_lose_nothing(r, redis_server, spawn):
    started = time.monotonic()
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    print(f"\nchaos seed {seed}")
    survivor_candidates = [spawn("worker", "chaos_app") for _ in range(2)]
    workers_ready(r, survivor_candidates, chaos_app, spawn.tails)

    # 2,000 tasks: three priorities, a quarter of them delayed by 0.5-12 s.
    expected = enqueue_chaos(chaos_job, rng, 2000, 12)
    r.set("test:chaos:sentinel", "kept")
    print(f"enqueued {len(expected)} tasks in {time.monotonic() - started:.1f}s")

    actions = ["child"] * 12 + ["client_kill"] * 3 + ["redis_restart", "worker_kill"]
    rng.shuffle(actions)
    live = list(survivor_candidates)
    victim = replacement = None
    chaos_start = time.monotonic()
    for action in actions:
        time.sleep(rng.uniform(0.15, 0.6))  # a bounded random pause between actions
        killed = _chaos_action(action, r, redis_server, spawn, live, rng)
        if killed:
            victim, replacement = killed
    survivor = next(p for p in survivor_candidates if p is not victim)
    left_at_end = len(expected) - r.scard(DONE)
    print(
        f"chaos actions {actions} in {time.monotonic() - chaos_start:.1f}s; "
        f"{left_at_end} tasks were not done yet when the chaos ended"
    )

    def diag():
        missing = sorted(set(expected) - done_ids(r))
        return (
            f"missing {len(missing)}: {missing[:20]}\nleft: {leftovers(r, chaos_app)}\n"
            f"dead: {r.llen(chaos_app.dead_key)}\nworkers: "
            f"{r.zrange(chaos_app.workers_key, 0, -1, withscores=True)}\n{spawn.tails()}"
        )

    settled_now = ChaosSettled(r, chaos_app, expected, diag)
    deadline_left = max(10.0, 105 - (time.monotonic() - started))
    wait_for(
        settled_now,
        "every task done and nothing queued or in flight",
        deadline_left,
        interval=0.05,
        diag=diag,
    )

    done = done_ids(r)
    dup, run_counts = duplicates(r)
    lost = set(expected) - done
    print(
        f"chaos: {len(done)} done, {len(lost)} lost, {dup} duplicates, "
        f"{len(settled_now.dead_letters)} dead, {time.monotonic() - started:.1f}s in all"
    )
    check_dead_letters(settled_now.dead_letters, lost)
    # the kills hit running tasks, so some ran again as a later attempt
    retried, twice = check_run_log(run_log(r), expected, run_counts)
    print(f"{retried} runs were retries (attempt > 1); attempts of the duplicated: {twice}")
    assert retried, "no kill hit a running task: the chaos did not test anything"

    # The survivor and the replacement still run and heartbeat; the victim was taken back.
    assert survivor.alive(), "the surviving worker exited\n" + spawn.tails()
    assert replacement.alive(), "the replacement worker exited\n" + spawn.tails()
    wait_for(
        lambda: (
            registered_pids(r, float("inf"))
            == registered_pids(r, chaos_app.heartbeat_timeout)
            == {survivor.pid, replacement.pid}
        ),
        "{wakaq}:workers to list exactly the survivor and the replacement, "
        "the killed worker taken back",
        15,
        diag=diag,
    )
    logs = _logs_summary(spawn)
    assert "Traceback" not in logs, (
        "a worker process crashed or a task failed\n" + logs[logs.index("Traceback") - 300 :][:3000]
    )
    wait_for(
        lambda: all(len(children(p.pid)) == chaos_app.concurrency for p in (survivor, replacement)),
        "both workers to have their children",
        10,
        diag=diag,
    )
    assert not leftovers(r, chaos_app)


# ===================================================================== deploy


@slow
def test_deploy_sigterm_while_tasks_run_loses_and_repeats_nothing(r, spawn):
    started = time.monotonic()
    rng = random.Random()
    old = [spawn("worker", "deploy_app") for _ in range(2)]
    workers_ready(r, old, deploy_app, spawn.tails)
    calls = [(f"d{i}", rng.randint(50, 200)) for i in range(240)]
    expected = {myid for myid, _ in calls}
    deploy_job.delay_many(calls[:200])
    deploy_job.delay_many(calls[200:], eta=1.5)

    for _ in range(2):  # two deploys in a row
        target = len(done_ids(r)) + 20
        wait_for(
            lambda target=target: (
                len(done_ids(r)) >= target and sum(len(v) for v in inflight(r).values()) >= 2
            ),
            "tasks running before the deploy",
            30,
            diag=spawn.tails,
        )
        for p in old:
            os.kill(p.pid, signal.SIGTERM)
        new = [spawn("worker", "deploy_app") for _ in range(2)]  # a rolling deploy
        for p in old:
            code = p.wait_exit(15, diag=spawn.tails)  # a worker stops within 15s
            assert code == 0, f"worker exited {code} after SIGTERM\n" + spawn.tails()
        assert not registered_pids(r, float("inf")) & {p.pid for p in old}, (
            "a stopped worker left its heartbeat entry behind"
        )
        old = new

    def diag():
        return (
            f"missing {sorted(expected - done_ids(r))[:20]}\n"
            f"left {leftovers(r, deploy_app)}\n{spawn.tails()}"
        )

    wait_for(
        lambda: done_ids(r) >= expected and not leftovers(r, deploy_app),
        "every deployed-over task done",
        60,
        diag=diag,
    )
    dup, run_counts = duplicates(r)
    print(
        f"\ndeploy: {len(done_ids(r))} done, {dup} duplicates, "
        f"{r.llen('wakaq:dead')} dead, {time.monotonic() - started:.1f}s"
    )
    assert done_ids(r) == expected
    assert dup == 0, f"run twice: {sorted(k for k, v in run_counts.items() if v > 1)}"
    assert int(r.get(STARTED)) == len(run_log(r)), "a stop interrupted a running task"
    assert dead(r) == []
    assert all(line["attempt"] == 1 for line in run_log(r)), "a stop used up a retry"
    assert all(p.alive() for p in old)
    assert "Traceback" not in "".join(p.log() for p in spawn), spawn.tails(40)


# ===================================================================== bad input


def _valid_payload(name="checkin", myid="x", **over):
    msg = {"id": "bad1", "name": name, "queue": "default", "retry": 0, "args": [myid], "kwargs": {}}
    msg.update(over)
    return json.dumps(msg)


BAD_PAYLOADS = {
    "not-json": (b"this is not json {", "bad payload"),
    "json-list": (b"[1, 2, 3]", "bad payload"),
    "json-object-wrong-keys": (b'{"hello": "world"}', "bad payload"),
    "json-wrong-types": (_valid_payload(args={"a": 1}, kwargs=[]).encode(), "bad payload"),
    "unknown-task": (_valid_payload(name="no_such_task").encode(), "unknown task"),
    "not-utf8": (_valid_payload(myid="XX").encode().replace(b"XX", b"\xff\xfe"), "bad payload"),
    "not-utf8-bare": (b"\xff\xfe\xfd\xc3\x28", "bad payload"),
    "unknown-queue": (_valid_payload(queue="nowhere").encode(), "unknown queue"),
    "tag-unknown": (_valid_payload(myid={"__wakaq__": "pickle", "v": "x"}).encode(), "bad payload"),
    "tag-overflow": (
        _valid_payload(myid={"__wakaq__": "timedelta", "v": [1e300]}).encode(),
        "bad payload",
    ),
    "nested-100k": (b"[" * 100_000, "bad payload"),
    "nested-100k-closed": (b"[" * 100_000 + b"]" * 100_000, "bad payload"),
}


@pytest.fixture
def bad_worker(r, spawn):
    proc = spawn("worker", "bad_app")
    workers_ready(r, [proc], bad_app, spawn.tails)
    checkin.delay("before")
    wait_for(lambda: "before" in done_ids(r), "the first good task", diag=spawn.tails)
    (line,) = run_log(r)
    return proc, line["pid"]


@slow
@pytest.mark.parametrize("kind", list(BAD_PAYLOADS))
def test_bad_payload_is_dead_lettered_and_worker_carries_on(r, spawn, bad_worker, kind):
    proc, child_pid = bad_worker
    raw, reason = BAD_PAYLOADS[kind]
    r.rpush("{wakaq}:q:default", raw)  # straight onto the list, no wake-up token
    r.zadd("{wakaq}:ready", {"default": 0})  # the non-empty queues, by rank
    wait_for(
        lambda: r.llen("{wakaq}:dead") >= 1, f"the {kind} payload dead-lettered", diag=spawn.tails
    )
    checkin.delay("after")
    wait_for(lambda: "after" in done_ids(r), "the next good task", diag=spawn.tails)

    (entry,) = dead(r)
    assert set(entry) >= {"id", "name", "queue", "attempts", "reason", "at", "payload"}
    assert entry["reason"].startswith(reason), entry["reason"]
    assert isinstance(entry["payload"], str) and entry["payload"]
    print(f"\n{kind}: dead-lettered with reason {entry['reason']!r}")
    if kind == "unknown-task":
        assert entry["name"] == "no_such_task" and entry["queue"] == "default"
    elif raw.isascii():
        assert entry["payload"] == raw.decode()
    assert proc.alive()
    assert [line["pid"] for line in run_log(r)] == [child_pid, child_pid], (
        "the child was replaced: it crashed on the bad payload\n" + spawn.tails()
    )
    assert done_ids(r) == {"before", "after"}
    settled(r, bad_app, spawn)


@slow
def test_20_mib_argument_runs_normally(r, spawn, bad_worker):
    proc, child_pid = bad_worker
    data = "0123456789abcdef" * (20 * 1024 * 1024 // 16)
    started = time.monotonic()
    measure.delay("big", data)
    wait_for(lambda: "big" in done_ids(r), "the 20 MiB task", 30, diag=spawn.tails)
    print(f"\n20 MiB argument: enqueued and run in {time.monotonic() - started:.2f}s")
    assert int(r.hget(LENS, "big")) == len(data) == 20 * 1024 * 1024
    assert dead(r) == []
    assert run_log(r)[-1]["pid"] == child_pid
    settled(r, bad_app, spawn)


def test_delay_with_redis_unreachable_raises_connection_error_quickly():
    closed = _free_port()  # nothing listens there
    nowhere_app = WakaQ(queues=["default"], url=f"redis://127.0.0.1:{closed}/0")

    @nowhere_app.task
    def nowhere(x):
        pass

    for kwargs in ({}, {"eta": 30}):
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError) as err:
            nowhere.delay(1, **kwargs)
        assert time.monotonic() - started < 5, kwargs
        assert str(closed) in str(err.value), f"the error does not name the address: {err}"
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        nowhere.delay_many([(1,), (2,)])
    assert time.monotonic() - started < 5


@slow
def test_arguments_not_matching_the_signature_are_an_ordinary_task_error(r, spawn, bad_worker):
    proc, child_pid = bad_worker
    two_args.delay("missing-b")  # too few
    two_args.delay("extra", 2, 3)  # too many
    two_args.delay("kw", b=2, c=3)  # an unexpected keyword
    checkin.delay("after")
    wait_for(lambda: "after" in done_ids(r), "the task after the bad calls", diag=spawn.tails)
    wait_for(
        lambda: proc.log().count("TypeError") >= 3,
        "three TypeErrors in the worker's log",
        10,
        diag=spawn.tails,
    )
    log = proc.log()
    assert "Traceback" in log and "two_args" in log
    assert done_ids(r) == {"before", "after"}
    assert [line["pid"] for line in run_log(r)] == [child_pid, child_pid], (
        "the child was replaced after a signature mismatch\n" + spawn.tails()
    )
    assert children(proc.pid) == [child_pid]
    assert [e["reason"].split(":")[0] for e in dead(r)] == ["raised TypeError"] * 3
    settled(r, bad_app, spawn)
    assert proc.alive()


# ============================================================ flat costs, retry_backoff, log lines

many_app = WakaQ(
    queues=[(i, f"q{i}") for i in range(100)],
    url=URL,
    concurrency=1,
    prefix="many",
    exclude_queues=[f"q{i}" for i in range(1, 100, 2)],
)
backoff_app = WakaQ(
    url=URL,
    concurrency=1,
    prefix="backoff",
    max_retries=2,
    retry_backoff=1,
    soft_timeout=0.2,
    hard_timeout=5,
)


@many_app.task
def ordered(tag):
    rec("ordered", tag)


@backoff_app.task
def slow_then_fine():
    n = attempt()
    rec("backoff", n, time.time())
    if n < 3:
        time.sleep(1)  # past the soft timeout: a failed attempt, retried later


@slow
def test_strict_priority_across_100_queues_and_exclusions_with_many_queues(r, spawn):
    """Tasks land on several of 100 queues at once (odd ones excluded): the worker runs the
    served ones strictly by priority, FIFO within a queue, and leaves the excluded ones."""
    served = [0, 98, 2, 50, 10, 96, 4, 60]
    for i in served + [1, 99, 51]:
        ordered.delay_many([(f"q{i}-a",), (f"q{i}-b",)], queue=f"q{i}")
    w = spawn("worker", "many_app")
    expect = [f"q{i}-{x}" for i in sorted(served) for x in "ab"]
    wait_for(lambda: len(runs(r, "ordered")) >= len(expect), "the served tasks", diag=spawn.tails)
    time.sleep(0.3)  # a task from an excluded queue would show up now
    assert [x[0] for x in runs(r, "ordered")] == expect
    assert {i: r.llen(f"{{many}}:q:q{i}") for i in (1, 51, 99)} == {1: 2, 51: 2, 99: 2}
    assert "Traceback" not in w.log()


@needs_private
def test_an_ack_after_the_task_was_released_and_claimed_again_does_not_ack_the_new_attempt(r):
    """The scripts themselves, against Redis: attempt 1 (token A) is released by a dead-child
    path and claimed again (token B); a late ack with token A acks nothing."""
    app_, wid = WakaQ(url=URL, prefix="ack"), "host.1.ab"
    inflight, ready = app_._k("inflight", wid), app_._k("ready")
    keys = [inflight, app_._k("serve", "x")]
    r.zadd(app_.workers_key, {wid: time.time()})
    r.sadd(app_._k("serve", "x"), "default")
    task = app_.task(lambda: None, name="t")
    task.delay()

    def claim(ack, token):  # an ack of token `ack` (done), then a claim under `token`
        return wakaq._CLAIM(r, keys, [token, "", "", "", "0.0", ack])

    def release(token, payload, outcome):
        args = wakaq._release_args(app_, "0.0", token, payload, outcome, None, wid)
        return wakaq._release(app_, r, inflight, args)

    payload = claim("", "A")
    assert r.hget(inflight, "0.0:t") == b"A"
    died = wakaq._Outcome("worker_died", "worker died", True)  # max_retries=0: dead
    assert release("A", payload, died)
    requeued = json.dumps({**json.loads(payload), "retry": 0}, separators=(",", ":"))
    r.rpush(app_.default_queue.key, requeued)
    r.zadd(ready, {"default": 0})
    again = claim("", "B")
    assert r.hget(inflight, "0.0:t") == b"B"
    assert json.loads(again)["id"] == json.loads(payload)["id"]
    assert not release("A", payload, wakaq._DONE)  # the late ack
    assert r.hget(inflight, "0.0:t") == b"B"
    assert claim("A", "C") == again  # a claim acking A hands B's attempt out again,
    assert r.hget(inflight, "0.0:t") == b"C"  # under its own token (the parent's shm knows it)


@slow
def test_retry_backoff_delays_each_retry_and_every_attempt_is_logged(r, spawn):
    w = spawn("worker", "backoff_app")
    slow_then_fine.delay()
    wait_for(lambda: len(runs(r, "backoff")) == 3, "three attempts", 20, diag=spawn.tails)
    (_, t1), (_, t2), (_, t3) = runs(r, "backoff")
    assert 0.9 <= t2 - t1 <= 2.0, t2 - t1  # 0.2 s soft timeout + 1 s backoff (jitter 25%)
    assert 1.6 <= t3 - t2 <= 3.5, t3 - t2  # 0.2 s + 2 s
    wait_for(lambda: "attempt=3 done" in w.log(), "the third attempt's log line")
    log = w.log()
    assert re.search(r"task slow_then_fine id=\w+ attempt=1 soft timeout in 0\.\d+s", log), log
    assert "attempt=2 soft timeout" in log and dead(r) == []


@slow
def test_a_dead_lettered_task_is_logged_with_its_id_and_reason(r, spawn):
    w = spawn("worker")
    task_id = too_slow.delay()
    wait_for(lambda: dead(r), "the dead letter")
    wait_for(lambda: f"id={task_id} dead-lettered" in w.log(), "the dead-letter log line")
    assert re.search(
        rf"task too_slow id={task_id} dead-lettered after \d+ attempt\(s\): "
        r"soft timeout",
        w.log(),
    )


def test_delay_many_with_an_eta_keeps_enqueue_order(r):
    ids = add.delay_many([(i, i) for i in range(40)], eta=30)
    stored = r.zrange("{wakaq}:eta:default", 0, -1)
    assert [json.loads(p)["id"] for p in stored] == ids


@slow
def test_an_idle_worker_exits_within_a_second_of_sigterm(r, spawn):
    w = spawn("worker", "deploy_app")
    workers_ready(r, [w], deploy_app)
    time.sleep(0.3)  # let the children settle into their wait
    sent = time.monotonic()
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait_exit(5) == 0
    assert time.monotonic() - sent < 1.0, time.monotonic() - sent
