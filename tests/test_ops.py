"""Operator experience: the command line, logs, settings checks, README examples.

    python -m pytest -q tests/test_ops.py

Real processes against the session's private server (conftest.py). Apps that must
be importable by a worker are at module level here; apps with broken code or other URLs
are written to files in the test's temp dir and loaded from there.
"""

import json
import logging.config
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import signal
import textwrap
import time

import pytest
import redis

import wakaq
from wakaq import Queue, WakaQ
from conftest import (
    blocked_in_blpop,
    ENV,
    HERE,
    REDIS_SERVER,
    URL,
    Proc,
    Procs,
    RedisServer,
    Server,
    _free_port,
    children,
    cli,
    need_binaries,
    needs_private,
    rec,
    redis_argv,
    runs,
    slow,
    wait_for,
)

logging.config.dictConfig(
    {  # the Django way, at import: disables existing loggers
        "version": 1,
        "handlers": {"h": {"class": "logging.StreamHandler"}},
        "root": {"handlers": ["h"], "level": "WARNING"},
    }
)

app = WakaQ(queues=[(0, "high"), "default"], url=URL, concurrency=1, heartbeat_timeout=15)
excluding = WakaQ(
    queues=[(0, "high"), "default"], url=URL, concurrency=1, exclude_queues=["default", "default"]
)


@app.task
def nap(seconds):
    time.sleep(seconds)


@app.task
def fails():
    raise RuntimeError("the app's own error")


@app.task
def prints_unicode():
    print("日本語 ✓")
    rec("printed", "returned")


def write(folder, name, text):
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def one_line(out):
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def dead_entry(r, args=(1, 2), queue="default", reason="soft timeout", retry=2, at=None):
    task_id = nap.delay(*args, queue=queue)
    raw = r.lpop(f"{{wakaq}}:q:{queue}")
    msg = json.loads(raw)
    msg["retry"] = retry
    entry = json.loads(wakaq._dead_entry(json.dumps(msg), msg, reason))
    entry["at"] = at or entry["at"]
    r.rpush("{wakaq}:dead", json.dumps(entry))
    r.delete(f"{{wakaq}}:wake:{queue}", "{wakaq}:ready")
    return task_id


# ===================================================================== command line


def test_version_and_a_bare_call_lists_the_commands():
    out = cli("--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"wakaq {wakaq.__version__}")
    out = cli()
    assert out.returncode == 2
    for name in wakaq._COMMANDS:
        assert re.search(rf"^\s+{name}\b", out.stderr, re.M), (name, out.stderr)


def test_a_typo_after_the_app_prints_the_subcommands_error_not_the_top_level_usage():
    out = cli("info", "tests.test_ops:app", "--jsn")
    assert out.returncode == 2
    assert "usage: wakaq info" in out.stderr and "--jsn" in out.stderr, out.stderr


def test_main_runs_any_command_in_COMMANDS_generically(redis_server):
    seen = []
    wakaq._COMMANDS["probe"] = (lambda a, args: seen.append((a, args.app)) or 0, "a probe")
    try:
        assert wakaq.main(["probe", "tests.test_ops:app"]) == 0
        assert wakaq.main(["probe", "--app=tests.test_ops:app"]) == 0
    finally:
        del wakaq._COMMANDS["probe"]
    assert seen == [(app, "tests.test_ops:app")] * 2


def test_app_option_works_wherever_app_is_positional(r, tmp_path):
    nap.delay(1)
    nap.delay(2, queue="high")
    assert (
        json.loads(cli("info", "--app=tests.test_ops:app", "--json").stdout)["queues"]["default"][
            "pending"
        ]
        == 1
    )
    assert cli("purge", "--app=tests.test_ops:app", "default").stdout.strip() == "1"
    assert cli("purge", "--app", "tests.test_ops:app", "--queue=high").stdout.strip() == "1"
    assert cli("dead", "--app=tests.test_ops:app").stdout.strip() == "no dead tasks"
    out = cli("info", "tests.test_ops:app", "--app=tests.test_ops:excluding")
    assert out.returncode == 2 and "once" in out.stderr
    worker = Procs(str(tmp_path))
    try:
        w = Proc(
            ["worker", "--app=tests.test_ops:app", "--concurrency=1", "--foreground"], str(tmp_path)
        )
        worker.append(w)
        wait_for(lambda: "started" in w.log(), "the worker's start line", diag=w.log)
    finally:
        for p in worker:
            p.stop()


@slow
def test_worker_exclude_queues_naming_every_queue_exits_2_with_one_line(r, spawn):
    w = spawn("worker", "tests.test_ops:app", "--exclude-queues", "high,default")
    assert w.wait_exit(15, diag=lambda: w.log()[-1500:]) == 2, w.log()[-1500:]
    lines = w.log().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in w.log(), w.log()
    assert re.search(r"(?i)exclude", lines[0]) and "high" in lines[0] and "default" in lines[0]


@slow
def test_worker_concurrency_below_1_is_a_usage_error(r, spawn):
    w = spawn("worker", "tests.test_ops:app", "--concurrency", "-1")
    assert w.wait_exit(15, diag=lambda: w.log()[-1500:]) == 2, w.log()[-1500:]
    out = w.log()
    assert "--concurrency" in out and "-1" in out, out
    assert "Traceback" not in out, out


@slow
def test_console_scripts_after_pip_install_run_the_same_code(r, tmp_path):
    """The original WakaQ's console scripts, installed by pip from setup.cfg."""
    venv = str(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True)
    site = subprocess.run(
        [f"{venv}/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    ).stdout
    with open(os.path.join(site.strip(), "deps.pth"), "w") as f:  # redis, croniter, pytest
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run(
        [f"{venv}/bin/python", "-m", "pip", "install", "-q", "--no-deps", HERE],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    nap.delay(1)
    nap.delay(2, eta=60)

    def run(*args):
        return subprocess.run(
            [f"{venv}/bin/{args[0]}", *args[1:]],
            cwd=HERE,
            text=True,
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )

    info = run("wakaq-info", "--app=tests.test_ops:app")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["queues"]["default"] == {
        "priority": 1,
        "pending": 1,
        "delayed": 1,
    }
    assert run("wakaq", "--version").stdout.strip() == f"wakaq {wakaq.__version__}"
    assert run("wakaq-purge", "--app=tests.test_ops:app", "--queue=default").stdout.strip() == "2"
    for script in ("wakaq-worker", "wakaq-scheduler"):
        out = run(script, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout, out.stderr
    w = subprocess.Popen(
        [f"{venv}/bin/wakaq-worker", "--app=tests.test_ops:app"],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        nap.delay(0)
        wait_for(lambda: r.llen("{wakaq}:q:default") == 0, "the installed worker to run it")
    finally:
        os.killpg(w.pid, 15)
        assert w.wait(20) == 0


@slow
def test_info_lists_the_tasks_running_now(r, spawn):
    worker = spawn("worker", "tests.test_ops:app")
    task_id = nap.delay(30)
    info = wait_for(
        lambda: (lambda i: i["running"] and i)(
            json.loads(cli("info", "tests.test_ops:app", "--json").stdout)
        ),
        "info to list the running task",
        diag=spawn.tails,
    )
    [t] = info["running"]
    assert (t["id"], t["name"], t["queue"]) == (task_id, "nap", "default")
    assert t["worker"].split(".")[1] == str(worker.pid)
    assert isinstance(t["seconds"], (int, float)) and 0 <= t["seconds"] < 30
    text = cli("info", "tests.test_ops:app").stdout
    assert re.search(rf"{task_id}.*nap.*default.*{re.escape(t['worker'])}", text), text


@slow
def test_info_lists_a_running_task_beside_one_claimed_ahead_with_its_real_start(r, spawn):
    """The child claims the 2nd long nap ahead while the 1st runs: two in flight, one running,
    started seconds ago (not at the epoch), and the one claimed ahead not started at all. A
    short nap wakes the idle child first (a task that wakes it has no claim ahead). The worker
    parent is stopped meanwhile, so that it does not give the claim ahead back (HOLD_AHEAD)."""
    worker = spawn("worker", "tests.test_ops:app")
    wait_for(
        lambda: children(worker.pid) and wakaq._snapshot(app)[0]["workers"],
        "the worker's child and heartbeat",
        diag=spawn.tails,
    )
    wait_for(lambda: blocked_in_blpop(r), "the idle child's BLPOP", diag=spawn.tails)
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        _, first, _ = nap.delay_many([(0,), (30,), (30,)])
        info = wait_for(
            lambda: (lambda i: i["inflight"] == 2 and i)(wakaq._snapshot(app)[0]),
            "the 2nd nap to be claimed ahead",
            diag=spawn.tails,
        )
        [(key, fields)] = [(k, r.hgetall(k)) for k in r.scan_iter("{wakaq}:inflight:*")]
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    [t] = info["running"]
    assert t["id"] == first and 0 <= t["seconds"] < 30, info["running"]
    starts = sorted(v for f, v in fields.items() if f.endswith(b":s"))
    assert starts[0] == b"" and float(starts[1]) > time.time() - 60, fields


def test_info_reads_running_tasks_from_the_inflight_layout_with_redis_time(r):
    now = float(r.time()[0])
    payload = json.dumps(
        {"id": "abc", "name": "nap", "queue": "high", "retry": 0, "args": [1], "kwargs": {}}
    )
    r.zadd("{wakaq}:workers", {"h.1.x": now, "h.2.y": now - 100})
    r.hset("{wakaq}:inflight:h.1.x", mapping={"0.0": payload, "0.0:t": "tok", "0.0:s": now - 12})
    r.hset("{wakaq}:inflight:h.2.y", mapping={"adopted:h.9.z:1.0": payload})
    info = json.loads(cli("info", "tests.test_ops:app", "--json").stdout)
    assert info["workers"] == 1 and info["inflight"] == 2
    one, adopted = sorted(info["running"], key=lambda t: t["worker"])
    assert {
        "id": "abc",
        "name": "nap",
        "queue": "high",
        "worker": "h.1.x",
    }.items() <= one.items() and 11 <= one["seconds"] < 20
    assert (adopted["id"], adopted["worker"], adopted["seconds"]) == ("abc", "h.2.y", None)


def test_info_counts_a_task_claimed_ahead_in_flight_and_not_as_running(r):
    now = float(r.time()[0])
    payload = json.dumps(
        {"id": "abc", "name": "nap", "queue": "high", "retry": 0, "args": [1], "kwargs": {}}
    )
    ahead = payload.replace("abc", "def")
    r.zadd("{wakaq}:workers", {"h.1.x": now})
    fields = {"0.0": payload, "0.0:t": "1-1", "0.0:s": now - 3, "0.1": ahead, "0.1:t": "1-2"}
    r.hset("{wakaq}:inflight:h.1.x", mapping={**fields, "0.1:s": ""})
    info = json.loads(cli("info", "tests.test_ops:app", "--json").stdout)
    assert info["inflight"] == 2 and [t["id"] for t in info["running"]] == ["abc"]
    assert info["workers_list"][0]["running"] == 1
    metrics = wakaq._prometheus(app)
    assert re.search(r"^wakaq_running 1$", metrics, re.M), metrics


def test_dead_lists_id_task_queue_attempts_reason_when_and_shortened_arguments(r):
    assert cli("dead", "tests.test_ops:app").stdout.strip() == "no dead tasks"
    short = dead_entry(r, args=(7, "x"), at=1_800_000_000)
    long = dead_entry(r, args=("y" * 500,), queue="high", reason="hard timeout")
    out = cli("dead", "tests.test_ops:app")
    assert out.returncode == 0
    first, second = out.stdout.strip().splitlines()
    assert re.search(
        rf"{short}\b.*\bnap\b.*\bdefault\b.*\b3\b.*soft timeout.*"
        r"2027-01-15 08:00:00.*7, \"x\"",
        first,
    ), first
    assert long in second and "yyy" in second and len(second) < 250, second


def test_dead_requeue_all_or_some_ids_in_one_script_per_batch(r):
    ids = [dead_entry(r) for _ in range(5)] + [dead_entry(r, queue="high")]
    out = cli("dead", "tests.test_ops:app", "--requeue", ids[1], ids[3], "nope")
    assert out.returncode == 1 and "requeued 2" in out.stdout and "nope" in out.stdout
    queued = [json.loads(x) for x in r.lrange("{wakaq}:q:default", 0, -1)]
    assert [(m["id"], m["retry"]) for m in queued] == [(ids[1], 0), (ids[3], 0)]
    assert r.zscore("{wakaq}:ready", "default") == 1 and r.llen("{wakaq}:wake:default") == 2
    r.config_resetstat()
    out = cli("dead", "tests.test_ops:app", "--requeue")
    assert (out.returncode, out.stdout.strip()) == (0, "requeued 4 dead task(s)")
    calls = sum(
        v["calls"]
        for k, v in r.info("commandstats").items()
        if k in ("cmdstat_evalsha", "cmdstat_eval")
    )
    assert calls <= 2, calls  # one per queue in the batch, not one per entry
    assert r.llen("{wakaq}:dead") == 0 and r.zscore("{wakaq}:ready", "high") == 0
    assert [json.loads(x)["id"] for x in r.lrange("{wakaq}:q:default", 0, -1)] == [
        ids[1],
        ids[3],
        ids[0],
        ids[2],
        ids[4],
    ]


def test_purge_prints_one_number_says_what_on_stderr_and_leaves_the_ready_set(r):
    nap.delay_many([(1,), (2,)])
    nap.delay(3, eta=60)
    r.zadd("{wakaq}:ready", {"default": 1, "high": 0})
    out = cli("purge", "tests.test_ops:app", "default")
    assert (out.returncode, out.stdout.strip()) == (0, "3")
    assert "2 pending" in out.stderr and "1 delayed" in out.stderr
    assert r.zrange("{wakaq}:ready", 0, -1) == [b"high"]


def test_health_checks_for_a_fresh_heartbeat_of_a_worker_on_this_host(r, tmp_path):
    def health():
        out = cli("health", "tests.test_ops:app")
        assert len(out.stdout.strip().splitlines()) == 1, out.stdout
        return out.returncode

    assert health() == 1
    now = float(r.time()[0])
    r.zadd("{wakaq}:workers", {"elsewhere.1.a": now, f"{socket.gethostname()}.2.b": now - 60})
    assert health() == 1  # another host's, and a stale one of ours
    procs = Procs(str(tmp_path))
    try:
        procs.append(Proc(["worker", "tests.test_ops:app"], str(tmp_path)))
        wait_for(lambda: health() == 0, "health to pass with a live worker", diag=procs.tails)
    finally:
        procs[0].stop()


# ===================================================================== errors, passwords, config


def test_urls_are_masked_in_every_error(tmp_path, redis_server):
    write(
        str(tmp_path),
        "pwapp.py",
        """
        from wakaq import WakaQ
        app = WakaQ(url="redis://user:s3cret@127.0.0.1:1/0")
    """,
    )
    for args in (
        ["info", "pwapp:app"],
        ["purge", "pwapp:app", "default"],
        ["dead", "pwapp:app"],
        ["dead", "pwapp:app", "--requeue"],
    ):
        out = cli(*args, cwd=str(tmp_path))
        line = one_line(out)
        assert out.returncode == 1 and "s3cret" not in line and "user:***@127.0.0.1:1" in line
    assert (
        wakaq._mask("rediss://u:p@ss@h:1/0?password=x&db=2")
        == "rediss://u:***@h:1/0?password=***&db=2"
    )


@needs_private
@slow
def test_a_configuration_error_stops_the_command_but_an_outage_does_not(tmp_path, redis_server):
    port = _free_port()
    server = RedisServer(port, str(tmp_path))
    server.start()
    try:
        redis.Redis(port=port).config_set("requirepass", "sekret")
        write(
            str(tmp_path),
            "cfg.py",
            f"""
            from wakaq import WakaQ
            badpw = WakaQ(url="redis://:wrong@127.0.0.1:{port}/0")
            baddb = WakaQ(url="redis://:sekret@127.0.0.1:{port}/99")
        """,
        )
        for command in ("worker", "scheduler", "info", "dead"):
            for name in ("badpw", "baddb"):
                out = cli(command, f"cfg:{name}", cwd=str(tmp_path), timeout=20)
                line = one_line(out)
                assert out.returncode == 2 and "sekret" not in line and "wrong" not in line, line
                assert re.search("password|DB index", line), line
    finally:
        server.stop()


def test_a_refused_connection_at_start_is_an_outage_the_worker_rides_out(tmp_path, redis_server):
    write(
        str(tmp_path),
        "down.py",
        f"""
        from wakaq import WakaQ
        app = WakaQ(url="redis://:pw@127.0.0.1:{_free_port()}/0", concurrency=1)
    """,
    )
    proc = Proc(["worker", "down:app"], str(tmp_path), cwd=str(tmp_path))
    try:
        time.sleep(3)  # nothing to wait on: the point is that it does not exit
        assert proc.alive()
    finally:
        proc.kill()
        out = proc.log()
    assert "pw@" not in out


def test_a_password_given_beside_the_url_is_used(tmp_path):
    need_binaries(("redis-server", REDIS_SERVER))
    port, folder = _free_port(), str(tmp_path)
    argv = redis_argv(port, folder, "--requirepass", "x")
    server = Server(argv, port, folder, password="x").start()
    try:
        server.wait_up()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()  # the server does ask for it
        other = WakaQ(url=f"redis://127.0.0.1:{port}/0", password="x")
        task_id = other.task(nap.fn, name="nap").delay(1)
        admin = server.client()
        assert [json.loads(p)["id"] for p in admin.lrange(other.default_queue.key, 0, -1)] == [
            task_id
        ]
        assert other.redis.ping()
        admin.close()
    finally:
        server.stop()


ONE_CORE = """
import os, sys
from wakaq import WakaQ
print(os.cpu_count(), len(os.sched_getaffinity(0)))
print(WakaQ(url=sys.argv[1], concurrency="cores - 1").concurrency)
"""


def test_cores_minus_1_on_a_one_core_host_is_one_child(tmp_path):
    """A process that sees one core: os.cpu_count() (sysconf) ignores CPU affinity, so it runs
    in a mount namespace whose /sys/devices/system/cpu/online says "0", under taskset -c 0."""
    unshare, taskset = shutil.which("unshare"), shutil.which("taskset")
    if not (unshare and taskset and os.geteuid() == 0):
        pytest.skip("needs root, unshare and taskset to show a process one core")
    online = tmp_path / "online"
    online.write_text("0\n")
    script = tmp_path / "one_core.py"
    script.write_text(ONE_CORE)
    out = subprocess.run(
        [
            unshare,
            "-m",
            "sh",
            "-c",
            'mount --bind "$0" /sys/devices/system/cpu/online && exec "$1" -c 0 "$2" "$3" "$4"',
            str(online),
            taskset,
            sys.executable,
            str(script),
            URL,
        ],
        cwd=HERE,
        env={**ENV, "PYTHONPATH": HERE},
        capture_output=True,
        text=True,
        timeout=30,
    )
    first = out.stdout.splitlines()[:1]
    if first != ["1 1"]:
        pytest.skip(f"cannot show a process one core here: {out.stdout!r} {out.stderr[-300:]!r}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == "1", out.stdout


@pytest.mark.parametrize(
    "body, expect",
    [
        ("x = (1,\n", r"SyntaxError.*broken\.py, line 1"),
        (
            "from wakaq import WakaQ\n\napp = WakaQ(url=URL_UNDEFINED)\n",
            r"NameError.*URL_UNDEFINED.*broken\.py, line 3",
        ),
    ],
)
def test_app_code_errors_name_the_file_and_line(tmp_path, body, expect):
    write(str(tmp_path), "broken.py", body)
    out = cli("info", "broken:app", cwd=str(tmp_path))
    assert out.returncode == 2 and re.search(expect, one_line(out)), out.stderr


def test_a_module_without_the_attribute_suggests_module_colon_app():
    out = cli("worker", "examples.tasks")
    assert out.returncode == 2 and "examples.tasks:wakaq" in one_line(out)


def test_an_app_built_by_another_copy_of_wakaq_says_so(tmp_path):
    folder = str(tmp_path)
    with open(os.path.join(HERE, "wakaq.py")) as f:
        write(folder, "myapp/vendor/wakaq.py", f.read())
    for init in ("myapp/__init__.py", "myapp/vendor/__init__.py"):
        write(folder, init, "")
    write(folder, "myapp/tasks.py", "from myapp.vendor.wakaq import WakaQ\nwakaq = WakaQ()\n")
    out = subprocess.run(
        [sys.executable, "myapp/vendor/wakaq.py", "info", "myapp.tasks:wakaq"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=30,
        env={**ENV, "PYTHONPATH": HERE},
    )
    line = one_line(out)
    assert out.returncode == 2 and "another copy of wakaq" in line, line
    assert "python -m myapp.vendor.wakaq" in line


@slow
def test_the_logger_survives_dictconfig_at_app_import(r, spawn):
    # this module called logging.config.dictConfig at import (see the top)
    worker = spawn("worker", "tests.test_ops:app")
    fails.delay()
    wait_for(
        lambda: "RuntimeError: the app's own error" in worker.log(),
        "the task's traceback in the worker's log",
        diag=worker.log,
    )
    log = worker.log()
    assert "started" in log and "Traceback" in log


@slow
def test_a_task_printing_non_latin_text_under_a_latin_1_locale_returns(r, spawn):
    env = {k: v for k, v in ENV.items() if not k.startswith("LC_")}
    env.update(PYTHONIOENCODING="latin-1", LANG="C")
    w = Proc(["worker", "tests.test_ops:app"], spawn.folder, env)
    spawn.append(w)
    prints_unicode.delay()
    wait_for(
        lambda: runs(r, "printed") or re.search(r"prints_unicode.*(raised|done)", w.log()),
        "the task to end",
        diag=w.log,
    )
    log = w.log()
    assert "UnicodeEncodeError" not in log, log[-3000:]
    assert runs(r, "printed") == [["returned"]], log[-3000:]
    wait_for(
        lambda: "日本語 ✓" in w.log() or "\\u65e5\\u672c\\u8a9e \\u2713" in w.log(),
        "the printed line in the log (escaped or not)",
        5,
        diag=w.log,
    )


# ===================================================================== settings


def test_settings_that_used_to_be_accepted_now_raise_naming_the_value():
    with pytest.raises(ValueError, match=r"'jobs\\n'"):
        WakaQ(queues=["jobs\n"])
    with pytest.raises(ValueError, match=r"'jobs\\n'"):
        Queue("jobs\n")
    with pytest.raises(TypeError, match=r"url=.*host.*'other'"):
        WakaQ(url="redis://h:1/0", host="other")
    with pytest.raises(TypeError, match=r"url=.*db.*\b3\b"):
        WakaQ(url="redis://:pw@h:1/0", db=3)
    with pytest.raises(TypeError, match="'yes'"):
        WakaQ(eager="yes")
    with pytest.raises(ValueError, match=r"http://x:\*\*\*@h"):
        WakaQ(url="http://x:pw@h/0")
    assert excluding.exclude_queues == ["default"]
    assert WakaQ(host="h", port=1, db=2).url == "redis://h:1/2"


@slow
def test_a_worker_whose_default_queue_is_excluded_warns_at_start(r, spawn):
    worker = spawn("worker", "tests.test_ops:excluding")
    wait_for(
        lambda: "default queue 'default' is excluded" in worker.log(),
        "the warning",
        diag=worker.log,
    )


# ===================================================================== README and examples


def readme_blocks():
    """(line, needs, code) of every ```python block in README.md; `<!-- test: needs MOD -->`
    on the line before a block names a module it needs (the block is skipped without it)."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    return [
        (text[: m.start()].count("\n") + 2, m[1], m[2])
        for m in re.finditer(r"(?:<!-- test: needs (\w+) -->\n)?```python\n(.*?)```", text, re.S)
    ]


RUN_BLOCKS = """
import importlib.util, json, sys
ns = {"__name__": "readme"}
for line, needs, code in json.load(open(sys.argv[1])):
    if needs and importlib.util.find_spec(needs) is None:
        print("skipped block at line", line, "needs", needs)
        continue
    if needs == "django":
        from django.conf import settings
        settings.configure()
    exec(compile(code, f"README.md, block at line {line}", "exec"), ns)
print("ran", len(sys.argv))
"""


def test_every_python_block_in_the_readme_runs(r, tmp_path):
    blocks = [
        (line, needs, code.replace("redis://localhost:6379/0", URL))
        for line, needs, code in readme_blocks()
    ]
    assert len(blocks) >= 8
    path = write(str(tmp_path), "blocks.json", json.dumps(blocks))
    write(str(tmp_path), "run_blocks.py", RUN_BLOCKS)
    out = subprocess.run(
        [sys.executable, "run_blocks.py", path],
        cwd=str(tmp_path),
        text=True,
        capture_output=True,
        timeout=60,
        env={**ENV, "PYTHONPATH": HERE},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert r.llen("{wakaq}:q:default") >= 3  # the Tasks block's .delay() calls


def run_with_worker(spec, cwd, setup, until, what, folder):
    """Start a worker on spec from `cwd`, run the `setup` code in another process, wait for
    until(log); the worker then stops on SIGTERM with exit code 0. Returns its log."""
    env = {**ENV, "PYTHONPATH": HERE, "WAKAQ_URL": URL}
    worker = Proc(["worker", spec], folder, env, cwd=cwd)
    try:
        subprocess.run([sys.executable, "-c", setup], cwd=cwd, env=env, check=True, timeout=60)
        wait_for(lambda: until(worker.log()), what, 30, diag=worker.log)
        worker.signal_group(signal.SIGTERM)
        assert worker.wait_exit(20) == 0, worker.log()
    finally:
        worker.kill()
    return worker.log()


@slow
def test_the_readme_app_runs_a_plain_task(r, tmp_path):
    line, _, code = readme_blocks()[0]
    assert "wakaq = WakaQ(" in code
    write(
        str(tmp_path),
        "readme_app.py",
        code.replace("redis://localhost:6379/0", URL)
        + "\n@wakaq.task\ndef plain():\n    print('plain task ran')\n",
    )
    log = run_with_worker(
        "readme_app:wakaq",
        str(tmp_path),
        "from readme_app import plain; plain.delay()",
        lambda log: "plain task ran" in log,
        "the task",
        str(tmp_path),
    )
    assert "excluded" not in log


@slow
def test_the_example_app_runs_a_plain_task_and_retries_from_task_code(r, tmp_path):
    log = run_with_worker(
        "examples.tasks:wakaq",
        HERE,
        "from examples.tasks import charge, heartbeat; heartbeat.delay(); charge.delay(7)",
        lambda log: "charged order 7 after 2 retries" in log,
        "charge()",
        str(tmp_path),
    )
    assert "still alive, attempt 1" in log and "excluded" not in log


@slow
@pytest.mark.parametrize(
    "module, setup, expect",
    [
        (
            "flask",
            "from examples.flask_app import flask_app; "
            "print(flask_app.test_client().post('/greet/bob').json)",
            "hello bob",
        ),
        ("django", "from examples.django_app import count_tables; count_tables.delay()", "tables:"),
    ],
)
def test_the_flask_and_django_examples_run_their_tasks(r, tmp_path, module, setup, expect):
    pytest.importorskip(module)
    log = run_with_worker(
        f"examples.{module}_app:wakaq",
        HERE,
        setup,
        lambda log: expect in log,
        expect,
        str(tmp_path),
    )
    assert "Traceback" not in log and "started" in log, log
