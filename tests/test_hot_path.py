"""The hot path's shortcuts, where they must not show: claims made ahead in an async app's
child (its tasks are listed as running and taken back as died like any other), and the
attempt line a worker writes straight to its own log handler (not when the app swapped the
handler or patched logging's dispatch). Real worker processes."""

import asyncio
import functools
import logging
import os
import re
import signal
import time

import pytest

import wakaq
from conftest import ENV, URL, Proc, attempt, children, dead, kill_pids, rec, runs, slow, wait_for
from wakaq import WakaQ

# ------------------------------------------------------------------ async claims ahead

async_app = WakaQ(
    queues=["default"], url=URL, concurrency=1, async_concurrency=2, heartbeat_timeout=2
)


@async_app.task
async def nap(tag, seconds):
    rec("nap", tag, attempt(), os.getpid())
    await asyncio.sleep(seconds)


@slow
def test_every_async_task_a_full_child_runs_is_listed_as_running(r, spawn):
    """The child's 2nd field is filled by a claim made ahead; an async app's claim ahead
    begins at once, so it has its start time from the claim (no later claim marks it)."""
    nap.delay("a", 6)
    nap.delay("b", 6)
    spawn("worker", "tests.test_hot_path:async_app")
    wait_for(lambda: len(runs(r, "nap")) == 2, "both to start", diag=spawn.tails)
    time.sleep(0.5)
    info, _ = wakaq._snapshot(async_app)
    hashes = {k: r.hgetall(k) for k in r.scan_iter("{wakaq}:inflight:*")}
    assert info["inflight"] == 2, hashes
    assert len(info["running"]) == 2, (info["running"], hashes)
    assert all(0 <= t["seconds"] < 6 for t in info["running"]), info["running"]


@slow
def test_a_lost_workers_running_async_tasks_are_taken_back_as_died(r, spawn):
    """max_retries=0: both running tasks of a worker that vanished are dead-lettered as
    "worker died" by the worker that adopts them; none runs again as never begun."""
    nap.delay("a", 60)
    nap.delay("b", 60)
    a = spawn("worker", "tests.test_hot_path:async_app")
    wait_for(lambda: len(runs(r, "nap")) == 2, "both to start", diag=spawn.tails)
    time.sleep(0.5)
    kids = children(a.pid)
    a.kill()  # the whole worker: parent and child (in its own process group)
    kill_pids(kids)
    spawn("worker", "tests.test_hot_path:async_app")
    wait_for(
        lambda: len(dead(r)) + len(runs(r, "nap")) >= 4,
        "the 2nd worker to take both back",
        25,
        diag=spawn.tails,
    )
    assert len(runs(r, "nap")) == 2, f"ran again: {runs(r, 'nap')} dead: {dead(r)}"
    assert [d["reason"] for d in dead(r)] == ["worker died", "worker died"], dead(r)


# ------------------------------------------------------------------ the INFO line fast path

file_app = WakaQ(queues=["default"], url=URL, concurrency=1)


@file_app.after_worker_started
def log_to_a_file():
    """Keep wakaq's line format, but in our own file (a FileHandler: block-buffered)."""
    root = logging.getLogger()
    handler = logging.FileHandler(os.environ["APP_LOG"])
    handler.setFormatter(root.handlers[0].formatter)
    root.handlers = [handler]


@file_app.task
def hello(tag):
    rec("hello", tag)


def text_of(path):
    return open(path).read() if os.path.exists(path) else ""


@slow
def test_an_attempt_line_reaches_a_file_handler_the_app_swapped_in(r, spawn):
    app_log = os.path.join(spawn.folder, "app.log")
    w = Proc(["worker", "tests.test_hot_path:file_app"], spawn.folder, {**ENV, "APP_LOG": app_log})
    spawn.append(w)
    task_id = hello.delay("x")
    wait_for(lambda: runs(r, "hello"), "the task to run", diag=w.log)
    line = rf"task hello id={task_id} attempt=1 done in \d+\.\d+s$"

    def app_lines():
        return text_of(app_log)

    deadline = time.monotonic() + 3
    while not re.search(line, app_lines(), re.M) and time.monotonic() < deadline:
        time.sleep(0.05)
    seen_running = bool(re.search(line, app_lines(), re.M))
    os.kill(w.pid, signal.SIGTERM)  # a graceful stop: the child exits 0
    w.popen.wait(10)
    assert re.search(line, app_lines(), re.M), f"file: {app_lines()!r}\nlog: {w.log()}"
    assert seen_running, "the line came only at exit"


# Patches of logging's dispatch that every line must go through: a plain function (what
# sentry_sdk's LoggingIntegration does: every record also becomes a breadcrumb), made after
# the worker sets its logging up; a functools.wraps wrapper (it copies __module__) made
# before; a proxy object (as wrapt's FunctionWrapper, which New Relic's agent uses) made after.


def crumb(record):
    if record.name == "wakaq":
        with open(os.environ["APP_LOG"], "a") as f:
            f.write(record.getMessage() + "\n")


def wrap_call_handlers(original):
    @functools.wraps(original)
    def call_handlers(self, record):
        try:
            return original(self, record)
        finally:
            crumb(record)

    return call_handlers


class CallHandlersProxy:
    def __init__(self, wrapped):
        functools.update_wrapper(self, wrapped)

    def __get__(self, logger, owner=None):
        return self if logger is None else functools.partial(self, logger)

    def __call__(self, logger, record):
        try:
            return self.__wrapped__(logger, record)
        finally:
            crumb(record)


if os.environ.get("PATCH_LOGGING_AT_IMPORT"):  # in the worker only, as it imports the app
    logging.Logger.callHandlers = wrap_call_handlers(logging.Logger.callHandlers)

patched_app = WakaQ(queues=["default"], url=URL, concurrency=1)
wrapped_app = WakaQ(queues=["default"], url=URL, concurrency=1)
proxied_app = WakaQ(queues=["default"], url=URL, concurrency=1)


@patched_app.after_worker_started
def patch_call_handlers():
    original = logging.Logger.callHandlers

    def call_handlers(self, record):
        try:
            return original(self, record)
        finally:
            crumb(record)

    logging.Logger.callHandlers = call_handlers


@proxied_app.after_worker_started
def proxy_call_handlers():
    logging.Logger.callHandlers = CallHandlersProxy(logging.Logger.callHandlers)


@patched_app.task
def hello2(tag):
    rec("hello2", tag)


@wrapped_app.task
def hello3(tag):
    rec("hello3", tag)


@proxied_app.task
def hello4(tag):
    rec("hello4", tag)


@slow
@pytest.mark.parametrize(
    "app, task",
    [("patched_app", hello2), ("wrapped_app", hello3), ("proxied_app", hello4)],
    ids=["plain", "wraps", "proxy"],
)
def test_an_attempt_line_reaches_a_patched_logger_dispatch(r, spawn, app, task):
    app_log = os.path.join(spawn.folder, "crumbs.log")
    env = {
        **ENV,
        "APP_LOG": app_log,
        "PATCH_LOGGING_AT_IMPORT": "1" if app == "wrapped_app" else "",
    }
    w = Proc(["worker", f"tests.test_hot_path:{app}"], spawn.folder, env)
    spawn.append(w)
    task_id = task.delay("x")
    wait_for(lambda: runs(r, task.name), "the task to run", diag=w.log)
    line = rf"task {task.name} id={task_id} attempt=1 done in \d+\.\d+s$"
    wait_for(lambda: re.search(line, text_of(app_log), re.M), "the breadcrumb", 3, diag=w.log)
