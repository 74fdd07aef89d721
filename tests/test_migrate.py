"""Replacing the original WakaQ: its app forms work here, and `migrate` moves its tasks.

    python -m pytest -q tests/test_migrate.py

The migration tests run the REAL original (PyPI `wakaq==3.0.7`) in its own venv, made
once per session under a temp dir. It runs only in subprocesses started with that venv's
python, from a folder that holds nothing but the producer script, so its `wakaq` package
and our `wakaq.py` never meet in one interpreter (the producer asserts which one it got).
Without the network to install it they are skipped (under CI they fail).
"""

import inspect
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import uuid
from datetime import date, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlparse

import pytest

from conftest import URL, Proc, cli, rec, retrying, runs, slow, wait_for, workers_ready
from wakaq import CronTask, Queue, Task, WakaQ, current_task

_url = urlparse(URL)
HOST, PORT, DB = _url.hostname, _url.port or 6379, int(_url.path.strip("/") or 0)


# ===================================================================== the migration app

# The same queues as the original's app in PRODUCER: both tuple orders, a per-queue prefix.
app = WakaQ(
    queues=[(0, "high"), ("default", 5), Queue("other", priority=3, prefix="legacy")],
    url=URL,
    concurrency=1,
    heartbeat_timeout=2,
)


@app.task(queue="high")
def check(tag, *args, **kwargs):
    """Records what arrived, as repr() (equal values have equal reprs here)."""
    rec(
        "check",
        tag,
        repr(args),
        repr(sorted(kwargs.items())),
        current_task()["queue"],
        current_task()["attempt"],
    )


@app.task(queue="other")
def other(tag):
    rec("check", tag, "()", "[]", current_task()["queue"], current_task()["attempt"])


# ===================================================================== the README's app

# Every setting and form the original's README (3.0.7) documents, plus its WakaQ's other
# __init__ parameters; the queue names are the README's. The README's schedules fire every
# minute at most, so a 2-tuple and a 4-tuple that fire every second are added.
Q_HIGH = "a-high-priority-queue"
Q_MED = "a-medium-priority-queue"
Q_LOW = "a-low-priority-queue"
Q_OTHER = "another-queue"
Q_DEFAULT = "default-lowest-priority-queue"
README_LOG = os.path.join(tempfile.gettempdir(), f"wakaq-test-readme-{PORT}-%s.log")

readme = WakaQ(
    queues=[
        (0, Q_HIGH),
        (1, Q_MED),
        (2, Q_LOW),
        Queue(Q_OTHER, priority=3, max_retries=5, soft_timeout=300, hard_timeout=360),
        Q_DEFAULT,
    ],
    concurrency="cores*4",
    async_concurrency=0,
    soft_timeout=30,
    hard_timeout=timedelta(minutes=1),
    max_retries=3,
    max_mem_percent=98,
    max_tasks_per_worker=5000,
    schedules=[
        CronTask("* * * * *", "mytask", queue=Q_MED, args=[2, 2], kwargs={}),
        ("*/5 * * * *", "mytask", [1, 1], {}),
        ("*/10 * * * *", "anothertask"),
        ("* * * * * *", "tick"),
        ("* * * * * *", "mytask", [20, 22], {}),
    ],
    host=HOST,
    port=PORT,
    db=DB,
    username=None,
    password=None,
    exclude_queues=[Q_LOW],
    worker_log_file=README_LOG % "worker",
    scheduler_log_file=README_LOG % "scheduler",
    worker_log_level=logging.INFO,
    scheduler_log_level=logging.DEBUG,
    socket_timeout=15,
    socket_connect_timeout=15,
    health_check_interval=30,
    wait_timeout=1,
)


@readme.task(queue=Q_MED, max_retries=7, soft_timeout=420, hard_timeout=480)
def mytask(x, y):
    """Adds."""
    rec("readme", "mytask", x + y, current_task()["queue"])


@readme.task
def a_cpu_intensive_task():
    rec("readme", "a_cpu_intensive_task")


@readme.task
async def an_io_intensive_task():
    rec("readme", "an_io_intensive_task")


@readme.task
def anothertask():
    rec("readme", "anothertask")


@readme.task
def tick():
    rec("readme", "tick")


@readme.wrap_tasks_with
async def custom_task_decorator(fn, args, kwargs):
    rec("readme-wrap", fn.__name__)
    if inspect.iscoroutinefunction(fn):
        await fn(*args, **kwargs)
    else:
        fn(*args, **kwargs)


@readme.after_worker_started
def _started():
    rec("readme-hook", "after_worker_started")


@readme.before_task_started()
def _before():
    retrying(lambda c: c.incr("test:readme-before"))


@readme.after_task_finished()
async def _after():
    retrying(lambda c: c.incr("test:readme-after"))


# ===================================================================== no Redis needed


def test_queue_tuples_take_either_order_and_queue_keeps_the_originals_prefix():
    w = WakaQ(queues=[("b", 5), (1, "a"), Queue("c", priority=3, prefix="legacy"), "d"])
    assert [(q.name, q.priority) for q in w.queues] == [("a", 1), ("c", 3), ("b", 5), ("d", None)]
    assert [q.prefix for q in w.queues] == ["wakaq", "legacy", "wakaq", "wakaq"]
    assert Queue("x", prefix="my:app!").prefix == "myapp"  # cleaned as the original did
    with pytest.raises((TypeError, ValueError)):
        WakaQ(queues=[("a", "b")])


def test_schedules_take_the_originals_tuples():
    assert all(isinstance(c, CronTask) for c in readme.schedules)
    got = [(c.schedule, c.task_name, c.queue, c.args, c.kwargs) for c in readme.schedules]
    assert got[1:3] == [
        ("*/5 * * * *", "mytask", None, [1, 1], {}),
        ("*/10 * * * *", "anothertask", None, [], {}),
    ]
    for bad in [("* * * * *",), ("* * * * *", "mytask", [1]), "nope"]:
        with pytest.raises((TypeError, ValueError)):
            WakaQ(schedules=[bad])
    with pytest.raises(ValueError):
        WakaQ(schedules=[("not cron", "mytask")])


def test_hook_decorators_work_with_and_without_parentheses():
    w = WakaQ()
    for kind in ("after_worker_started", "before_task_started", "after_task_finished"):

        def plain():
            pass

        def called():
            pass

        assert getattr(w, kind)(plain) is plain
        assert getattr(w, kind)()(called) is called
        assert w._hooks[kind] == [plain, called]
    assert w.wrap_tasks_with()(custom_task_decorator) is custom_task_decorator
    assert readme._hooks["before_task_started"] == [_before]


def test_a_task_keeps_its_functions_name_qualname_module_and_doc():
    assert isinstance(mytask, Task)
    assert (mytask.__name__, mytask.__qualname__, mytask.__module__, mytask.__doc__) == (
        "mytask",
        "mytask",
        __name__,
        "Adds.",
    )
    assert mytask.__wrapped__ is mytask.fn and inspect.iscoroutinefunction(an_io_intensive_task.fn)


@pytest.mark.parametrize(
    "code",
    [
        "from wakaq.exceptions import SoftTimeout, WakaQError\nimport wakaq",
        "import wakaq\nfrom wakaq.exceptions import SoftTimeout, WakaQError",
    ],
    ids=["exceptions-first", "wakaq-first"],
)
def test_the_originals_exceptions_module_imports_in_either_order(code):
    check = "\nassert SoftTimeout is wakaq.SoftTimeout and WakaQError is wakaq.WakaQError"
    out = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_exceptions_module_imports_from_a_vendored_copy(tmp_path):
    package = tmp_path / "myapp" / "vendor"
    package.mkdir(parents=True)
    for folder in (package, package.parent):
        (folder / "__init__.py").write_text("")
    (package / "wakaq.py").write_text(open(wakaq_file()).read())
    code = (
        "from myapp.vendor.wakaq.exceptions import SoftTimeout\n"
        "from myapp.vendor import wakaq\n"
        "assert SoftTimeout is wakaq.SoftTimeout"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def wakaq_file():
    import wakaq

    return wakaq.__file__


def test_broker_is_the_apps_redis_client_as_in_the_original(r):
    app = WakaQ(url=URL)
    assert app.broker is app.redis and app.broker.ping()


# ===================================================================== the README's app runs


@slow
def test_the_readme_app_worker_and_scheduler_run_every_kind_of_task(r, spawn):
    for kind in ("worker", "scheduler"):
        if os.path.exists(README_LOG % kind):
            os.remove(README_LOG % kind)
    worker = spawn("worker", "tests.test_migrate:readme")
    workers_ready(r, [worker], readme, diag=spawn.tails)
    spawn("scheduler", "tests.test_migrate:readme")
    mytask.delay(1, 1)
    mytask.delay(1, 1, queue=Q_HIGH)
    anothertask.delay()
    anothertask.delay(eta=timedelta(seconds=1))
    a_cpu_intensive_task.delay()
    an_io_intensive_task.delay()
    want = {
        ("mytask", 2, Q_MED),
        ("mytask", 2, Q_HIGH),
        ("mytask", 42, Q_MED),
        ("anothertask",),
        ("a_cpu_intensive_task",),
        ("an_io_intensive_task",),
        ("tick",),
    }

    def diag():
        return f"{runs(r, 'readme')}\n{spawn.tails()}\n" + "\n".join(
            open(README_LOG % k).read()[-2000:]
            for k in ("worker", "scheduler")
            if os.path.exists(README_LOG % k)
        )

    wait_for(
        lambda: (
            want <= {tuple(x) for x in runs(r, "readme")}
            and [x[0] for x in runs(r, "readme")].count("anothertask") >= 2
        ),
        "every kind of task to run",
        20,
        diag=diag,
    )
    assert {"mytask", "anothertask", "tick", "an_io_intensive_task"} <= {
        x[0] for x in runs(r, "readme-wrap")
    }
    assert runs(r, "readme-hook")[0] == ["after_worker_started"]
    wait_for(lambda: int(r.get("test:readme-after") or 0) >= len(want), "the async hook", 5)
    assert int(r.get("test:readme-before")) >= len(want)
    assert "mytask" in open(README_LOG % "worker").read()
    assert os.path.getsize(README_LOG % "scheduler") > 0


# ===================================================================== against the original

PRODUCER = """
import sys
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
import uuid
import wakaq
from wakaq import Queue, WakaQ
assert "site-packages" in wakaq.__file__, wakaq.__file__   # the original, not our file
host, port, db, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
app = WakaQ(queues=[(0, "high"), ("default", 5), Queue("other", priority=3, prefix="legacy")],
            host=host, port=port, db=db)


@app.task(queue="high")
def check(tag, *args, **kwargs):
    pass


@app.task(queue="other")
def other(tag):
    pass


@app.task
def ghost():
    pass


VALUES = [Decimal("1.50"), datetime(2024, 2, 29, 23, 59, 58, 123456), date(2024, 2, 29),
          timedelta(days=-1, seconds=5, microseconds=7), b"\\x00\\xffwakaq", {3, 1, 2},
          datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=2))),
          uuid.UUID("12345678-1234-5678-1234-567812345678"),
          [Decimal("2"), {"d": date(2000, 1, 1)}]]
if mode == "values":
    check.delay("plain", *VALUES, when=VALUES[1], money=Decimal("-0.001"), blob=b"")
    check.delay("soon", *VALUES, eta=timedelta(seconds=1))
    check.delay("at", *VALUES, eta=datetime.utcnow() + timedelta(seconds=2))
    check.delay("later", eta=timedelta(hours=1))
    check.delay("on-default", queue="default")
    other.delay("on-legacy", queue=app.queues_by_name["other"])  # by name: under "wakaq:"
    ghost.delay()
else:                                  # flood N: plain and delayed, each tag once
    for i in range(int(mode.split()[1])):
        check.delay(f"f{i}", Decimal(i), eta=timedelta(hours=1) if i % 3 == 0 else None)
"""
# What our tasks must receive for the original's VALUES (sets were lists; aware datetimes
# became naive UTC; anything else its str()).
EXPECTED = (
    Decimal("1.50"),
    datetime(2024, 2, 29, 23, 59, 58, 123456),
    date(2024, 2, 29),
    timedelta(days=-1, seconds=5, microseconds=7),
    b"\x00\xffwakaq",
    [1, 2, 3],
    datetime(2024, 1, 1, 10, 0),
    str(uuid.UUID("12345678-1234-5678-1234-567812345678")),
    [Decimal("2"), {"d": date(2000, 1, 1)}],
)


@pytest.fixture(scope="session")
def original(tmp_path_factory):
    """A function running PRODUCER with the original WakaQ 3.0.7 (a venv made once)."""
    folder = tmp_path_factory.mktemp("original")
    venv = folder / "venv"
    python = str(venv / "bin" / "python")
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120
        )
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "wakaq==3.0.7"],
            check=True,
            capture_output=True,
            timeout=300,
            cwd=str(folder),
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        out = getattr(e, "stderr", b"") or b""
        if os.environ.get("CI"):
            pytest.fail(f"cannot install wakaq==3.0.7: {out.decode()[-500:]}")
        pytest.skip(f"cannot install wakaq==3.0.7: {out.decode()[-300:]}")
    work = folder / "producer"  # holds only the script: no wakaq.py on sys.path
    work.mkdir()
    (work / "producer.py").write_text(PRODUCER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    def run(mode, wait=True):
        args = [python, "producer.py", HOST, str(PORT), str(DB), mode]
        if not wait:
            return subprocess.Popen(
                args,
                cwd=str(work),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        done = subprocess.run(
            args, cwd=str(work), env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr

    return run


def migrate():
    done = cli("migrate", "tests.test_migrate:app")
    assert done.returncode == 0, done.stderr
    return int(re.search(r"moved (\d+)", done.stdout).group(1))


def ours(r, queue="high"):
    """Our pending and delayed payloads of a queue, as (msg, due or None)."""
    return [(json.loads(p), None) for p in r.lrange(f"{{wakaq}}:q:{queue}", 0, -1)] + [
        (json.loads(p), due)
        for p, due in r.zrange(f"{{wakaq}}:eta:{queue}", 0, -1, withscores=True)
    ]


@slow
def test_migrate_moves_the_originals_tasks_and_our_worker_runs_each_once(r, spawn, original):
    original("values")
    r.rpush(
        "wakaq:high",
        json.dumps({"name": "check", "args": ["retried"], "kwargs": {}, "retry": 2}),
        "not json",
    )
    assert [
        r.llen("wakaq:high"),
        r.zcard("wakaq:eta:high"),
        r.llen("wakaq:default"),
        r.llen("legacy:other"),
    ] == [3, 3, 2, 1]
    later_due = r.zrange("wakaq:eta:high", -1, -1, withscores=True)[0][1]
    assert migrate() == 9
    assert not [k for k in r.keys("*") if not k.startswith(b"{wakaq}:")], r.keys("*")
    later = [due for msg, due in ours(r) if msg["args"] == ["later"]]
    assert later == [later_due]  # due time kept
    assert migrate() == 0

    spawn("worker", "tests.test_migrate:app")
    tags = ("plain", "soon", "at", "on-default", "on-legacy", "retried")
    wait_for(
        lambda: (
            {x[0] for x in runs(r, "check")} >= set(tags)
            and len([d for d in map(json.loads, r.lrange("{wakaq}:dead", 0, -1))]) >= 2
        ),
        "the migrated tasks to run",
        15,
        diag=lambda: f"{runs(r, 'check')}\n{r.lrange('{wakaq}:dead', 0, -1)}\n{spawn.tails()}",
    )
    got = {x[0]: x[1:] for x in runs(r, "check")}
    assert sorted(x[0] for x in runs(r, "check")) == sorted(tags)  # each exactly once
    assert got["plain"] == [
        repr(EXPECTED),
        repr(sorted({"when": EXPECTED[1], "money": Decimal("-0.001"), "blob": b""}.items())),
        "high",
        1,
    ]
    assert got["soon"][:3] == got["at"][:3] == [repr(EXPECTED), "[]", "high"]
    assert got["on-default"][2:] == ["default", 1] and got["on-legacy"][2:] == ["other", 1]
    assert got["retried"][2:] == ["high", 3]  # the original's retry count
    reasons = {e["name"]: e["reason"] for e in map(json.loads, r.lrange("{wakaq}:dead", 0, -1))}
    assert "unknown task" in reasons["ghost"], reasons
    assert "bad payload" in reasons[None], reasons
    assert "later" not in got and migrate() == 0


@slow
def test_migrate_while_the_originals_producer_runs_moves_each_task_once(r, original):
    n = 1500
    producer = original(f"flood {n}", wait=False)
    moved = 0
    try:
        while producer.poll() is None:
            moved += migrate()
    finally:
        out = producer.communicate(timeout=60)[0]
    assert producer.returncode == 0, out
    moved += migrate()
    assert moved == n and migrate() == 0
    got = ours(r)
    assert sorted(m["args"][0] for m, _ in got) == sorted(f"f{i}" for i in range(n))
    assert sorted(int(m["args"][0][1:]) for m, due in got if due) == list(range(0, n, 3))
    assert not r.exists("wakaq:high", "wakaq:eta:high")


@slow
def test_migrate_killed_midway_loses_and_doubles_nothing(r, tmp_path):
    n = 60000
    payload = (
        '{"name": "check", "args": ["k%d", {"__class__": "Decimal", "value": "%d"}], "kwargs": {}}'
    )
    pipe = r.pipeline(transaction=False)
    for start in range(0, n, 5000):
        pipe.rpush("wakaq:high", *(payload % (i, i) for i in range(start, start + 5000)))
    pipe.execute()
    proc = Proc(["migrate", "tests.test_migrate:app"], str(tmp_path))
    try:
        wait_for(
            lambda: r.llen("{wakaq}:q:high") > 1000 or not proc.alive(),
            "migrate to move some",
            30,
            diag=proc.log,
        )
    finally:
        proc.kill()
    left, moved = r.llen("wakaq:high"), r.llen("{wakaq}:q:high")
    assert left > 0, "migrate finished before the kill: make n bigger"
    assert left + moved == n
    assert migrate() == left and migrate() == 0
    got = sorted(int(json.loads(p)["args"][0][1:]) for p in r.lrange("{wakaq}:q:high", 0, -1))
    assert got == list(range(n))
