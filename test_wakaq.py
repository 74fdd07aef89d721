"""Tests for wakaq.py: a private real Redis, real worker processes, real signals.

    python -m pytest -q test_wakaq.py

Redis: the session starts its own `redis-server --port N --save "" --appendonly no`
in a temp dir on a free port and flushes it before each test. Without a `redis-server`
binary the tests use WAKAQ_TEST_REDIS_URL (only `wakaq:*` and `test:*` keys are
deleted there, and the Redis-restart test is skipped); with neither they are skipped,
unless CI is set, when they fail. The URL is fixed at import time and passed to worker
processes in WAKAQ_TEST_URL, because they import the apps below as `test_wakaq:APP`.

Process tests (marked `slow`; run by default, `-m "not slow"` leaves them out) start `python wakaq.py worker|scheduler ...`,
wait on an observable outcome with a deadline (a Redis key, an exit code, a log line)
and always stop their processes in teardown. Tasks record what happened in `test:*`
lists. Pure tests at the top need no Redis.
"""
import asyncio
import decimal
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from urllib.parse import urlparse

import pytest
import redis

import wakaq
from wakaq import CronTask, Queue, SoftTimeout, WakaQ, current_task

HERE = os.path.dirname(os.path.abspath(__file__))
REDIS_SERVER = shutil.which("redis-server")
slow = pytest.mark.slow


# ===================================================================== harness

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if "WAKAQ_TEST_URL" not in os.environ:     # the pytest process decides; workers inherit
    if REDIS_SERVER:
        os.environ["WAKAQ_TEST_PORT"] = str(_free_port())
        os.environ["WAKAQ_TEST_URL"] = f"redis://127.0.0.1:{os.environ['WAKAQ_TEST_PORT']}/0"
    else:
        os.environ["WAKAQ_TEST_URL"] = os.environ.get("WAKAQ_TEST_REDIS_URL", "")
for kind in ("worker", "scheduler"):
    os.environ.setdefault(f"WAKAQ_TEST_{kind.upper()}_LOG", os.path.join(
        tempfile.gettempdir(), f"wakaq-test-{os.getpid()}-{kind}.log"))
PRIVATE = bool(os.environ.get("WAKAQ_TEST_PORT"))
URL = os.environ["WAKAQ_TEST_URL"] or "redis://127.0.0.1:1/0"   # unreachable: tests skip
LOG_FILE = os.environ["WAKAQ_TEST_WORKER_LOG"]
SCHED_LOG_FILE = os.environ["WAKAQ_TEST_SCHEDULER_LOG"]


def wait_for(predicate, what, timeout=15.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"gave up after {timeout}s waiting for {what}")


class RedisServer:
    """The private redis-server; stop() and start() on the same port for outage tests."""

    def __init__(self, port, folder):
        self.port, self.folder, self.proc = port, folder, None

    def start(self):
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.folder],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def up():
            try:
                return client.ping()
            except redis.ConnectionError:
                assert self.proc.poll() is None, "redis-server exited at start"
        wait_for(up, f"redis-server on port {self.port}")
        client.close()

    def stop(self, keep_data=False):
        """keep_data: SHUTDOWN SAVE (the next start loads the dump); else SIGKILL."""
        if keep_data:    # a raw socket: redis-py would retry the dropped connection
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(b"SHUTDOWN SAVE\r\n")
                s.recv(100)
        else:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def restart(self, keep_data=False):
        self.stop(keep_data)
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if not PRIVATE:
        if not os.environ["WAKAQ_TEST_URL"]:
            if os.environ.get("CI"):
                pytest.fail("no redis-server binary and no WAKAQ_TEST_REDIS_URL under CI")
            pytest.skip("no redis-server binary and no WAKAQ_TEST_REDIS_URL")
        yield None
        return
    server = RedisServer(int(os.environ["WAKAQ_TEST_PORT"]), str(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.proc.kill()
        server.proc.wait(timeout=10)


@pytest.fixture
def r(redis_server):
    """A client on the test Redis, emptied first."""
    client = redis.Redis.from_url(URL)
    if PRIVATE:
        client.flushall()
    else:
        for pattern in ("wakaq:*", "test:*"):
            for key in client.scan_iter(pattern):
                client.delete(key)
    yield client
    client.close()


# print() must reach the log without help from the environment's buffering settings
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


class Proc:
    """A `python wakaq.py ...` process; stdout and stderr go to a temp file."""

    def __init__(self, args, folder):
        fd, self.log_path = tempfile.mkstemp(prefix="wakaq-", suffix=".log", dir=folder)
        with os.fdopen(fd, "w") as out:
            self.popen = subprocess.Popen([sys.executable, "wakaq.py", *args], cwd=HERE,
                                          stdin=subprocess.DEVNULL, stdout=out, env=ENV,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def alive(self):
        return self.popen.poll() is None

    def wait_exit(self, timeout=15.0):
        wait_for(lambda: not self.alive(), f"process {self.pid} to exit", timeout)
        return self.popen.returncode

    def stop(self):
        """Stop now (two stop signals), SIGKILL the process group after a deadline."""
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                if self.alive():
                    os.kill(self.pid, sig)
                    time.sleep(0.05)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            try:
                os.killpg(self.pid, signal.SIGKILL)    # the parent and any stray children
            except (ProcessLookupError, PermissionError):
                pass
            self.popen.wait()


@pytest.fixture
def spawn(r, tmp_path):
    """spawn("worker", "app") starts `python wakaq.py worker test_wakaq:app`."""
    procs = []

    def start(command, app_name="app", *extra):
        p = Proc([command, f"test_wakaq:{app_name}", *extra], str(tmp_path))
        procs.append(p)
        return p
    yield start
    for p in reversed(procs):
        p.stop()


def cli(*args, timeout=30):
    return subprocess.run([sys.executable, "wakaq.py", *args], cwd=HERE, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _list(r, key):
    return [json.loads(x) for x in r.lrange(key, 0, -1)]


def runs(r, key):            # what tasks recorded with rec(key, ...)
    return _list(r, f"test:{key}")


def dead(r):
    return _list(r, "wakaq:dead")


def queue(r, name):
    return _list(r, f"wakaq:q:{name}")


def read_file(path):
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()


@pytest.fixture
def log_file(request):
    """Remove a log file before and after the test."""
    path = request.param
    if os.path.exists(path):
        os.remove(path)
    yield path
    if os.path.exists(path):
        os.remove(path)


def worker_ready(r, n=1):
    wait_for(lambda: r.zcard("wakaq:workers") >= n, f"{n} worker heartbeat(s)")


# ===================================================================== the test apps and tasks

_conn = [None, None]


def rec(key, *values):
    """Record what a task saw in the list test:KEY (one client per process)."""
    if _conn[1] != os.getpid():
        _conn[:] = [redis.Redis.from_url(URL), os.getpid()]
    _conn[0].rpush(f"test:{key}", json.dumps(values))


def attempt():
    return current_task()["attempt"]


app = WakaQ(queues=[(1, "mid"), "default", (0, "high")], url=URL, concurrency=1,
            heartbeat_timeout=2, hard_timeout=20)


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
        except Exception as e:          # swallows SoftTimeout: the hard timeout must act
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


excluding_app = WakaQ(queues=[(0, "high"), "default"], url=URL, concurrency=1,
                      exclude_queues=["high"])
excluding_app.task(note.fn)

recycle_app = WakaQ(url=URL, concurrency=1, max_tasks_per_worker=2)
pid_task = recycle_app.task(lambda: rec("pids", os.getpid()), name="pid_task")

logfile_app = WakaQ(url=URL, concurrency=1, worker_log_file=LOG_FILE)
logfile_app.task(chatty.fn)

sched_app = WakaQ(url=URL, concurrency=1, schedules=[CronTask("* * * * * *", "tick")],
                  scheduler_log_file=SCHED_LOG_FILE)
sched_app.task(lambda: None, name="tick")

eager_app = WakaQ(url=URL, eager=True)
eager_add = eager_app.task(lambda a, b: rec("eager", a + b, os.getpid()), name="eager_add")


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
    assert wakaq._limits_for(a, None, None) == (10.0, 20.0, 3)
    assert wakaq._limits_for(a, t_plain, q) == (5.0, 20.0, 2)
    assert wakaq._limits_for(a, t_own, q) == (0.0, 7.0, 0)


def test_concurrency_evaluates_arithmetic_of_cores_and_rejects_anything_else():
    assert wakaq._concurrency(3) == 3
    assert wakaq._concurrency("cores*2", cores=4) == 8
    assert wakaq._concurrency("cores - 1", cores=3) == 2
    assert wakaq._concurrency("cores // 2 + 1", cores=5) == 3
    for bad in ("cores ** 2", "__import__('os')", "cores(", "cores - 4", "1/0", "ncpu"):
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


def test_meminfo_and_cgroup_text_parse_to_percentages():
    meminfo = "MemTotal:       1000000 kB\nMemFree:  100 kB\nMemAvailable:    250000 kB\n"
    assert wakaq._parse_meminfo(meminfo) == pytest.approx(75.0)
    assert wakaq._parse_cgroup("max\n", "12345\n") is None
    assert wakaq._parse_cgroup("2000\n", "500\n") == pytest.approx(25.0)


def test_due_fires_a_missed_schedule_once_for_its_latest_tick():
    every5 = CronTask("*/5 * * * *", "x")
    last = datetime(2024, 1, 1, 10, 0)
    assert wakaq._due([every5], last, datetime(2024, 1, 1, 10, 17)) == \
        [(every5, datetime(2024, 1, 1, 10, 15))]
    assert wakaq._due([every5], last, datetime(2024, 1, 1, 10, 4, 59)) == []
    assert wakaq._due([every5], last, datetime(2024, 1, 1, 10, 5)) == \
        [(every5, datetime(2024, 1, 1, 10, 5))]


def test_due_reads_a_sixth_field_as_seconds():
    every10s = CronTask("* * * * * */10", "x")
    assert wakaq._due([every10s], datetime(2024, 1, 1, 10, 0, 0),
                      datetime(2024, 1, 1, 10, 0, 25)) == [(every10s, datetime(2024, 1, 1, 10, 0, 20))]
    assert wakaq._due([every10s], datetime(2024, 1, 1, 10, 0, 20),
                      datetime(2024, 1, 1, 10, 0, 29)) == []


def test_due_honours_the_app_timezone_across_a_dst_change():
    ny = WakaQ(url=URL, timezone="America/New_York").tz
    nine = CronTask("0 9 * * *", "x")
    # 2024-03-10: New York moves from EST (-5) to EDT (-4); 09:00 local is 13:00 UTC
    [(_, fire)] = wakaq._due([nine], datetime(2024, 3, 9, 9, 30, tzinfo=ny),
                             datetime(2024, 3, 10, 9, 30, tzinfo=ny))
    assert fire.astimezone(timezone.utc) == datetime(2024, 3, 10, 13, 0, tzinfo=timezone.utc)
    tokyo = WakaQ(url=URL, timezone="Asia/Tokyo").tz
    [(_, fire)] = wakaq._due([nine], datetime(2024, 1, 1, 8, 59, tzinfo=tokyo),
                             datetime(2024, 1, 1, 9, 0, 30, tzinfo=tokyo))
    assert fire.astimezone(timezone.utc) == datetime(2024, 1, 1, 0, 0, tzinfo=timezone.utc)


# ===================================================================== configuration errors

def test_hard_timeout_not_above_soft_timeout_names_both_values():
    with pytest.raises(ValueError, match=r"hard_timeout \(5s\).*soft_timeout \(10s\)"):
        WakaQ(url=URL, soft_timeout=10, hard_timeout=5)
    with pytest.raises(ValueError, match="hard_timeout"):
        WakaQ(queues=[Queue("q", soft_timeout=3, hard_timeout=3)], url=URL)
    with pytest.raises(ValueError, match="'t'.*hard_timeout"):
        WakaQ(url=URL).task(lambda: None, name="t", soft_timeout=timedelta(seconds=2),
                            hard_timeout=1)


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
    with pytest.raises(ValueError, match="'cores - 1000'"):
        WakaQ(url=URL, concurrency="cores - 1000")


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
    assert runs(r, "order") == [["here"]] and r.keys("wakaq:*") == []


def test_delay_returns_a_str_id_and_pushes_onto_the_task_queue(r):
    task_id = add.delay(1, b=2)
    assert isinstance(task_id, str) and task_id
    [msg] = queue(r, "default")
    assert (msg["id"], msg["name"], msg["args"], msg["kwargs"], msg["retry"]) == \
        (task_id, "add", [1], {"b": 2}, 0)
    add.delay(3, 4, queue="high")
    assert [m["args"] for m in queue(r, "high")] == [[3, 4]]


def test_host_port_and_db_settings_reach_the_same_redis_as_url(r):
    u = urlparse(URL)
    other = WakaQ(host=u.hostname, port=u.port or 6379, db=int(u.path.strip("/") or 0),
                  username=u.username, password=u.password)
    other.task(add.fn)
    task_id = other.tasks["add"].delay(1, 2)
    assert [m["id"] for m in queue(r, "default")] == [task_id]


def test_eta_puts_the_task_in_the_delayed_set_at_its_due_time(r):
    now = time.time()
    add.delay(1, 1, eta=60)
    add.delay(2, 2, eta=timedelta(seconds=30))
    add.delay(3, 3, eta=datetime(2030, 1, 1, 12, 0))                # naive = UTC
    add.delay(4, 4, eta=datetime(2030, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))))
    assert r.llen("wakaq:q:default") == 0
    scores = {tuple(json.loads(p)["args"]): s
              for p, s in r.zrange("wakaq:eta:default", 0, -1, withscores=True)}
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
    assert r.zcard("wakaq:eta:default") == 2


def test_delay_many_enqueues_every_call_and_returns_their_ids(r):
    ids = add.delay_many([(1, 2), [3, 4], {"args": [5], "kwargs": {"b": 6}}])
    assert len(ids) == 3 and len(set(ids)) == 3
    assert [(m["id"], m["args"], m["kwargs"]) for m in queue(r, "default")] == \
        [(ids[0], [1, 2], {}), (ids[1], [3, 4], {}), (ids[2], [5], {"b": 6})]


def test_delay_with_an_unserializable_argument_raises_and_enqueues_nothing(r):
    with pytest.raises(TypeError):
        add.delay(object(), 1)
    with pytest.raises(TypeError):
        add.delay_many([(1, 2), (object(), 2)])
    with pytest.raises(TypeError):
        add.delay(1, b=object(), eta=30)
    assert r.keys("wakaq:*") == []


def test_eager_delay_runs_the_task_inline_and_touches_no_queue(r):
    task_id = eager_add.delay(2, 3)
    assert isinstance(task_id, str)
    assert runs(r, "eager") == [[5, os.getpid()]]
    assert eager_add.broadcast(1, 1) == 1
    assert r.keys("wakaq:*") == []


def test_broadcast_with_no_live_workers_returns_zero(r):
    assert where.broadcast() == 0
    assert r.keys("wakaq:bcast:*") == []


@slow
def test_broadcast_runs_once_on_each_live_worker_and_returns_their_number(r, spawn):
    w1, w2 = spawn("worker"), spawn("worker")
    worker_ready(r, 2)
    assert json.loads(cli("info", "test_wakaq:app", "--json").stdout)["workers"] == 2
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
    wait_for(lambda: r.keys("wakaq:q:*") == [] and not any(
        r.hlen(k) for k in r.keys("wakaq:inflight:*")), "the task to leave Redis")


@slow
def test_a_due_eta_task_runs_and_a_future_one_waits(r, spawn):
    add.delay(1, 1, eta=0.3)
    add.delay(9, 9, eta=3600)
    spawn("worker")
    wait_for(lambda: runs(r, "add"), "the due task to run")
    assert [x[:2] for x in runs(r, "add")] == [[1, 1]]
    assert r.zcard("wakaq:eta:default") == 1


@slow
def test_the_lower_priority_number_is_served_first(r, spawn):
    for q, tag in (("default", "d1"), ("mid", "m1"), ("high", "h1"), ("default", "d2"),
                   ("mid", "m2"), ("high", "h2")):
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
    assert started[2] == w.pid and started[1] != w.pid           # in the child, after fork
    assert [e for e in events if e[0] != "started"] == [
        ["before"], ["wrap", "hooked", [1], {"y": 2}, "list", "dict"], ["task", 1, 2], ["after"]]


@slow
def test_soft_timeout_raises_inside_the_task_retries_at_the_end_then_dead_letters(r, spawn):
    too_slow.delay()
    note.delay("after")
    spawn("worker")
    [entry] = wait_for(lambda: dead(r), "the dead letter")
    assert runs(r, "soft") == [[1], [2]]
    assert [t for [t] in runs(r, "order")] == ["too_slow:1", "after", "too_slow:2"]
    assert (entry["name"], entry["queue"], entry["attempts"], entry["reason"]) == \
        ("too_slow", "default", 2, "soft timeout")


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
def test_an_ordinary_exception_is_logged_with_traceback_and_not_retried(r, spawn):
    w = spawn("worker")
    boom.delay()
    wait_for(lambda: "ValueError: boom-marker" in w.log(), "the traceback in the log")
    add.delay(1, 1)
    wait_for(lambda: runs(r, "add"), "the next task")
    assert runs(r, "boom") == [[1]]
    assert dead(r) == [] and r.llen("wakaq:q:default") == 0
    assert "Traceback (most recent call last)" in w.log()
    assert re.search(r"task=boom.*task boom raised", w.log())


@slow
def test_kill_9_of_a_child_mid_task_retries_the_task_in_a_new_child(r, spawn):
    w = spawn("worker")
    sleeps_on_first_attempt.delay()
    [[n, pid, _]] = wait_for(lambda: runs(r, "attempts"), "the first attempt")
    assert n == 1 and r.llen("wakaq:q:default") == 0
    [inflight] = r.keys("wakaq:inflight:*")          # in Redis until its attempt ends
    assert [json.loads(p)["name"] for p in r.hvals(inflight)] == ["sleeps_on_first_attempt"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(runs(r, "attempts")) == 2, "the second attempt")
    [n2, pid2, ppid2] = runs(r, "attempts")[1]
    assert (n2, ppid2) == (2, w.pid) and pid2 != pid
    assert w.alive() and dead(r) == []


@slow
def test_a_child_killed_on_its_last_attempt_is_dead_lettered_as_worker_died(r, spawn):
    w = spawn("worker")
    sleepy.delay(30, "doomed")                       # max_retries 0
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
    os.killpg(a.pid, signal.SIGKILL)
    a.wait_exit()
    b = spawn("worker")
    wait_for(lambda: len(runs(r, "attempts")) == 2, "worker B to take the task back", 25)
    assert runs(r, "attempts")[1][0] == 2 and runs(r, "attempts")[1][2] == b.pid
    assert dead(r) == []
    assert "taking back its 1 task(s)" in b.log()


@slow
@pytest.mark.skipif(not PRIVATE, reason="needs the private redis-server")
def test_redis_restart_mid_run_loses_nothing_and_is_logged_once(r, spawn, redis_server):
    w = spawn("worker")
    sleepy.delay(3, "running")       # it records its end after Redis is back
    wait_for(lambda: runs(r, "started"), "the first task to start")
    add.delay_many([(1, 1), (2, 2), (3, 3)])
    redis_server.stop(keep_data=True)
    wait_for(lambda: "worker lost Redis" in w.log(), "the worker to notice the outage")
    time.sleep(0.5)    # keep Redis down a moment longer, so the child notices too
    redis_server.start()
    add.delay(4, 4)
    wait_for(lambda: len(runs(r, "add")) == 4, "all four adds after the restart", 25)
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
    assert r.zcard("wakaq:workers") == 0


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
    note.delay("excluded", queue="high")          # would run first if it were served
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
    raw = json.dumps({"id": "x1", "name": "no_such_task", "queue": "default", "retry": 0,
                      "args": [], "kwargs": {}})
    r.rpush("wakaq:q:default", raw)
    r.rpush("wakaq:wake:default", 1)
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
    wait_for(lambda: "logged-by-chatty" in w.log() and "printed-by-chatty" in w.log(),
             "the task's output in the worker log")
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
    wait_for(lambda: r.llen("wakaq:q:default") >= 4, "four ticks", 20)
    pipe = r.pipeline(transaction=True)                 # one atomic snapshot
    pipe.lrange("wakaq:q:default", 0, -1)
    pipe.keys("wakaq:cron:*")
    ticks, locks = pipe.execute()
    elapsed = time.time() - started
    assert {json.loads(m)["name"] for m in ticks} == {"tick"}
    assert len(ticks) == len(locks)                      # one payload per tick, not per scheduler
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


@pytest.mark.parametrize("spec", ["no_such_module_xyz:app", "test_wakaq:no_such_app",
                                  "test_wakaq:wait_for", "test_wakaq"])
def test_a_bad_app_prints_one_line_and_exits_two(spec):
    out = cli("info", spec)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and spec in out.stderr


def test_bad_arguments_exit_two():
    for args in ([], ["bogus"], ["info"], ["purge", "test_wakaq:app"],
                 ["dead", "test_wakaq:app", "--requeue", "--purge"], ["info", "x:y", "--nope"]):
        assert cli(*args).returncode == 2, args
    out = cli("purge", "test_wakaq:app", "nope")          # an unknown queue
    assert out.returncode == 2 and "'nope'" in out.stderr


def test_info_json_reports_queues_inflight_dead_and_workers(r):
    add.delay(1, 1)
    add.delay(2, 2)
    add.delay(3, 3, queue="high", eta=60)
    r.rpush("wakaq:dead", wakaq._dead_entry("{}", None, "bad payload"))
    out = cli("info", "test_wakaq:app", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["queues"] == {"high": {"priority": 0, "pending": 0, "delayed": 1},
                              "mid": {"priority": 1, "pending": 0, "delayed": 0},
                              "default": {"priority": 2, "pending": 2, "delayed": 0}}
    assert (info["inflight"], info["dead"], info["workers"]) == (0, 1, 0)
    assert cli("info", "test_wakaq:app").returncode == 0


def test_purge_prints_pending_plus_delayed_and_empties_both(r):
    add.delay_many([(1, 1), (2, 2)])
    add.delay(3, 3, eta=60)
    add.delay(4, 4, queue="high")
    out = cli("purge", "test_wakaq:app", "default")
    assert (out.returncode, out.stdout.strip()) == (0, "3")
    assert r.llen("wakaq:q:default") == 0 and r.zcard("wakaq:eta:default") == 0
    assert r.llen("wakaq:q:high") == 1


def _make_dead(r, reason="soft timeout", retry=1, queue_name="default"):
    add.delay(5, 6, queue=queue_name)
    raw = r.lpop(f"wakaq:q:{queue_name}")
    msg = json.loads(raw)
    msg["retry"] = retry
    r.rpush("wakaq:dead", wakaq._dead_entry(json.dumps(msg), msg, reason))
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
    assert r.llen("wakaq:dead") == 0
    [msg] = queue(r, "default")
    assert (msg["id"], msg["name"], msg["args"]) == (task_id, "add", [5, 6])
    assert [m["id"] for m in queue(r, "high")] == [high_id]


def test_dead_purge_deletes_them(r):
    _make_dead(r)
    _make_dead(r, "hard timeout")
    assert cli("dead", "test_wakaq:app", "--purge").returncode == 0
    assert r.llen("wakaq:dead") == 0 and r.llen("wakaq:q:default") == 0
