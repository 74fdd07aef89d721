"""Reliability tests for wakaq: chaos, deploys and bad input, against real processes.

    .venv/bin/python -m pytest -q -s test_chaos.py

Each test runs against a private `redis-server` (a free port, a temporary directory,
`appendonly yes` and `appendfsync always`, so that a restart keeps every acknowledged
write). Without a redis-server binary the tests skip, or fail when CI is set. Workers are
real `python wakaq.py worker test_chaos:APP` processes, each in its own process group so
that teardown can SIGKILL a parent and its children together, even after a failure.

Tasks record each finished run at the END of their body: SADD chaos:done MYID,
HINCRBY chaos:runs MYID 1 and a JSON line in chaos:log with wakaq's task id and attempt,
where MYID is an argument the test passed. An interrupted attempt records nothing.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

import wakaq
from wakaq import WakaQ

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.splitext(os.path.basename(__file__))[0]    # workers import MODULE:APP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The pytest process picks the port at import; the workers it starts inherit it.
PORT = int(os.environ.setdefault("WAKAQ_CHAOS_PORT", str(_free_port())))
URL = f"redis://127.0.0.1:{PORT}/0"
DONE, RUNS, LOG, LENS = "chaos:done", "chaos:runs", "chaos:log", "chaos:len"
STARTED = "chaos:started"
KILL_REASONS = {"worker died", "hard timeout"}
CHAOS_RETRIES = 5


# ===================================================================== test apps and tasks

chaos_app = WakaQ(queues=[(0, "high"), (1, "default"), (2, "low")], url=URL, concurrency=2,
                  heartbeat_timeout=3, max_retries=CHAOS_RETRIES, soft_timeout=20,
                  hard_timeout=25)
deploy_app = WakaQ(queues=["default"], url=URL, concurrency=2, heartbeat_timeout=15)
bad_app = WakaQ(queues=["default"], url=URL, concurrency=1, heartbeat_timeout=15)

_clients = {}


def _rc():
    """The task side's own client (one per process); _record() does the retrying."""
    c = _clients.get(os.getpid())
    if c is None:
        c = _clients[os.getpid()] = redis.Redis.from_url(
            URL, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    return c


# Record a run once even if a lost reply makes _record() send it again: KEYS = the run
# tokens set, done set, runs hash, log list; ARGV = run token, myid, log line.
_RECORD_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
redis.call('RPUSH', KEYS[4], ARGV[3])
return 1
"""


def _record(myid, **extra):
    """Record one finished run; survives connection kills and a Redis restart."""
    cur = wakaq.current_task()
    token = os.urandom(8).hex()
    line = json.dumps({"myid": myid, "id": cur["id"], "attempt": cur["attempt"],
                       "pid": os.getpid(), **extra})
    deadline = time.monotonic() + 15
    while True:
        try:
            _rc().eval(_RECORD_LUA, 4, "chaos:tokens", DONE, RUNS, LOG, token, myid, line)
            return
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@chaos_app.task
def chaos_job(myid, ms):
    time.sleep(ms / 1000)
    _record(myid)


@deploy_app.task
def deploy_job(myid, ms):
    _rc().incr(STARTED)                 # no chaos here: a plain command is enough
    time.sleep(ms / 1000)
    _record(myid)


@bad_app.task
def note(myid):
    _record(myid)


@bad_app.task
def measure(myid, data):
    _rc().hset(LENS, myid, len(data))
    _record(myid)


@bad_app.task
def two_args(myid, b):
    _record(myid)


# ===================================================================== harness

def wait_for(pred, timeout, what, diag=None):
    """Poll pred() until it is true; fail with `what` (and diag()) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{diag()}" if diag else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(0.05)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class RedisServer:
    """A private redis-server that keeps its data across restart() (AOF, fsync always)."""

    def __init__(self, binary, port, workdir):
        self.binary, self.port, self.dir = binary, port, workdir
        self.proc = None
        self.log = os.path.join(workdir, "redis.log")

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "no", "--logfile", self.log],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        probe = redis.Redis(port=self.port, socket_timeout=1, retry=Retry(NoBackoff(), 0))

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}; "
                                     f"see {self.log}")
            try:
                return probe.ping()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                return False
        wait_for(up, 20, f"redis-server on port {self.port}")
        probe.close()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self):
        """SIGKILL (a crash, not a shutdown), then start again on the same port and dir."""
        self.kill()
        self.start()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        message = "no redis-server binary on PATH"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(binary, PORT, str(tmp_path_factory.mktemp("redis")))
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def r(redis_server):
    client = redis.Redis(port=PORT, socket_timeout=10, retry=Retry(
        ExponentialBackoff(cap=0.5, base=0.05), 40))
    client.flushall()
    yield client
    try:
        client.flushall()
    except redis.RedisError:
        pass
    client.close()


class Workers:
    """Starts `python wakaq.py worker test_chaos:APP` processes; kills them all at teardown."""

    def __init__(self, logdir):
        self.logdir, self.procs, self.logs = logdir, [], {}

    def start(self, app_name):
        path = os.path.join(self.logdir, f"worker-{len(self.procs)}.log")
        with open(path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "wakaq.py", "worker", f"{MODULE}:{app_name}"], cwd=HERE,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=dict(os.environ, WAKAQ_CHAOS_PORT=str(PORT)))
        self.procs.append(proc)
        self.logs[proc.pid] = path
        return proc

    def log(self, proc):
        with open(self.logs[proc.pid], errors="replace") as f:
            return f.read()

    def tails(self, lines=15):
        out = []
        for proc in self.procs:
            text = self.log(proc).splitlines()[-lines:]
            out.append(f"--- worker pid {proc.pid} (exit {proc.poll()}) "
                       f"{self.logs[proc.pid]}\n" + "\n".join(text))
        return "\n".join(out)

    def kill_all(self):
        for proc in self.procs:
            _kill_group(proc)


@pytest.fixture
def workers(r, tmp_path):
    w = Workers(str(tmp_path))
    try:
        yield w
    finally:
        w.kill_all()


def children(pid):
    """Live (non-zombie) child pids of `pid`."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    live = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    live.append(p)
        except (OSError, IndexError):
            pass
    return live


def registered_pids(r, max_age):
    """Pids of the workers whose heartbeat in wakaq:workers is at most max_age old
    (a worker id is HOST.PID.RANDOM)."""
    now = time.time()
    return {int(w.decode().rsplit(".", 2)[1])
            for w, beat in r.zrange("wakaq:workers", 0, -1, withscores=True)
            if now - beat <= max_age}


def inflight(r):
    return {k.decode(): r.hgetall(k) for k in r.scan_iter("wakaq:inflight:*")}


def leftovers(r, app):
    """Everything still queued, delayed or in flight (empty when all is settled)."""
    left = {}
    for q in app.queues:
        for key, n in ((q.key, r.llen(q.key)), (q.eta_key, r.zcard(q.eta_key))):
            if n:
                left[key] = n
    for key, fields in inflight(r).items():
        if fields:
            left[key] = len(fields)
    return left


def settled(r, app, workers_, timeout=10):
    """Wait until nothing is queued, delayed or in flight. A child acks a finished task in
    its next claim, so the last one leaves the in-flight hash just after it records."""
    wait_for(lambda: not leftovers(r, app), timeout, "nothing queued or in flight",
             lambda: f"{leftovers(r, app)}\n{workers_.tails()}")


def dead_entries(r):
    return [json.loads(x) for x in r.lrange("wakaq:dead", 0, -1)]


def done_ids(r):
    return {x.decode() for x in r.smembers(DONE)}


def run_log(r):
    return [json.loads(x) for x in r.lrange(LOG, 0, -1)]


def duplicates(r):
    runs = {k.decode(): int(v) for k, v in r.hgetall(RUNS).items()}
    return sum(runs.values()) - len(runs), runs


def wait_registered(r, app, procs, workers_, timeout=20):
    """Wait until each worker heartbeats and has forked all its children."""
    pids = {p.pid for p in procs}
    wait_for(lambda: pids <= registered_pids(r, 60) and
             all(len(children(p)) == app.concurrency for p in pids),
             timeout, f"workers {sorted(pids)} to heartbeat and fork", workers_.tails)


def dead_myid(entry):
    """The MYID argument of a dead-lettered test task, or None."""
    try:
        return json.loads(entry["payload"])["args"][0]
    except (ValueError, TypeError, KeyError, IndexError):
        return None


# ===================================================================== chaos

def test_chaos_kills_restarts_and_disconnects_lose_nothing(r, redis_server, workers):
    started = time.monotonic()
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    print(f"\nchaos seed {seed}")
    survivor_candidates = [workers.start("chaos_app") for _ in range(2)]
    wait_registered(r, chaos_app, survivor_candidates, workers)

    # 2,000 tasks: three priorities, a quarter of them delayed by 0.5-12 s.
    expected = {}                                   # myid -> wakaq task id
    plan = {}                                       # (queue, eta bucket) -> [(myid, ms)]
    for i in range(2000):
        queue = rng.choice(["high", "default", "low"])
        eta = rng.choice(range(1, 25)) / 2 if rng.random() < 0.25 else None
        plan.setdefault((queue, eta), []).append((f"t{i}", rng.randint(5, 30)))
    for (queue, eta), calls in plan.items():
        ids = chaos_job.delay_many([(myid, ms) for myid, ms in calls], queue=queue, eta=eta)
        expected.update(zip((myid for myid, _ in calls), ids))
    r.set("chaos:sentinel", "kept")
    print(f"enqueued {len(expected)} tasks in {time.monotonic() - started:.1f}s")

    actions = ["child"] * 12 + ["client_kill"] * 3 + ["redis_restart", "worker_kill"]
    rng.shuffle(actions)
    live = list(survivor_candidates)
    counts = dict.fromkeys(["child", "client_kill", "redis_restart", "worker_kill"], 0)
    victim = replacement = None
    chaos_start = time.monotonic()
    for action in actions:
        time.sleep(rng.uniform(0.15, 0.6))          # a bounded random pause between actions
        if action == "child":
            for _ in range(50):                     # a child may be between fork and exec
                kids = [(p, k) for p in live for k in children(p.pid)]
                if kids:
                    break
                time.sleep(0.05)
            assert kids, "no worker children to kill\n" + workers.tails()
            _, kid = rng.choice(kids)
            os.kill(kid, signal.SIGKILL)
        elif action == "client_kill":
            r.execute_command("CLIENT", "KILL", "TYPE", "normal")   # SKIPME yes: not us
        elif action == "redis_restart":
            redis_server.restart()
            assert r.get("chaos:sentinel") == b"kept", "redis-server lost its data on restart"
        elif action == "worker_kill":
            victim = rng.choice(live)
            _kill_group(victim)                     # parent and children at once
            live.remove(victim)
            replacement = workers.start("chaos_app")
            live.append(replacement)
        counts[action] += 1
    left_at_end = len(expected) - r.scard(DONE)
    print(f"chaos actions {counts} in {time.monotonic() - chaos_start:.1f}s; "
          f"{left_at_end} tasks were not done yet when the chaos ended")
    assert counts["child"] >= 10 and counts["worker_kill"] == 1

    survivor = next(p for p in survivor_candidates if p is not victim)
    deadline_left = max(10.0, 105 - (time.monotonic() - started))

    def diag():
        missing = sorted(set(expected) - done_ids(r))
        return (f"missing {len(missing)}: {missing[:20]}\nleft: {leftovers(r, chaos_app)}\n"
                f"dead: {r.llen('wakaq:dead')}\nworkers: "
                f"{r.zrange('wakaq:workers', 0, -1, withscores=True)}\n{workers.tails()}")

    dead, quiet_since = [], None

    def finished():
        nonlocal dead, quiet_since
        dead = dead_entries(r)
        dead_myids = {dead_myid(e) for e in dead if e.get("reason") in KILL_REASONS}
        complete = (done_ids(r) | dead_myids) >= set(expected)
        left = leftovers(r, chaos_app)
        long_dead = {w.decode() for w in r.zrangebyscore(
            "wakaq:workers", "-inf", time.time() - 3 * chaos_app.heartbeat_timeout - 5)}
        if any(k.rpartition(":")[2] in long_dead for k in left):
            raise AssertionError("a dead worker's in-flight tasks were not taken back\n"
                                 + diag())
        if left:
            quiet_since = None
        elif not complete:          # nothing queued, delayed or in flight, yet tasks missing
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 5:
                raise AssertionError("tasks lost: nothing is left to run them\n" + diag())
        return complete and not left

    wait_for(finished, deadline_left, "every task done and nothing queued or in flight", diag)

    done = done_ids(r)
    dup, runs = duplicates(r)
    lost = set(expected) - done
    print(f"chaos: {len(done)} done, {len(lost)} lost, {dup} duplicates, {len(dead)} dead, "
          f"{time.monotonic() - started:.1f}s in all")

    for e in dead:                                 # only tasks whose retries kills used up
        assert e["reason"] in KILL_REASONS, f"dead for a reason other than a kill: {e}"
        assert e["attempts"] == CHAOS_RETRIES + 1, f"dead before its retries ran out: {e}"
    assert not lost - {dead_myid(e) for e in dead}, \
        f"lost tasks: {sorted(lost)[:20]}"

    # Each recorded run carries the id .delay() returned and a plausible attempt number;
    # the kills hit running tasks, so some ran again as a later attempt.
    lines = run_log(r)
    for line in lines:
        assert line["id"] == expected[line["myid"]], line
        assert 1 <= line["attempt"] <= CHAOS_RETRIES + 1, line
    retried = sum(line["attempt"] > 1 for line in lines)
    twice = {}
    for line in lines:
        if runs.get(line["myid"], 0) > 1:
            twice.setdefault(line["myid"], []).append(line["attempt"])
    print(f"{retried} runs were retries (attempt > 1); attempts of the duplicated: {twice}")
    # A task runs again only after a failed attempt was counted (kills, adoption; no stop
    # here), so the runs of one task never share an attempt number.
    assert all(len(set(a)) == len(a) for a in twice.values()), \
        f"a task ran twice as the same attempt: {twice}"
    assert retried, "no kill hit a running task: the chaos did not test anything"

    # The survivor and the replacement still run and heartbeat; the victim was taken back.
    assert survivor.poll() is None, "the surviving worker exited\n" + workers.tails()
    assert replacement.poll() is None, "the replacement worker exited\n" + workers.tails()
    wait_for(lambda: registered_pids(r, float("inf")) ==
             registered_pids(r, chaos_app.heartbeat_timeout) == {survivor.pid, replacement.pid},
             15, "wakaq:workers to list exactly the survivor and the replacement, "
             "the killed worker taken back", diag)
    logs = "".join(workers.log(p) for p in workers.procs)
    print(f"worker logs: {logs.count('task released (worker died)')} tasks released after "
          f"a kill, {logs.count('taking back')} dead worker(s) taken back, "
          f"{logs.count('lost Redis')} outages logged, {logs.count('Traceback')} tracebacks")
    assert "Traceback" not in logs, "a worker process crashed or a task failed\n" + logs[
        logs.index("Traceback") - 300:][:3000]
    wait_for(lambda: all(len(children(p.pid)) == chaos_app.concurrency
                         for p in (survivor, replacement)), 10,
             "both workers to have their children", diag)
    assert not leftovers(r, chaos_app)


# ===================================================================== deploy

def test_deploy_sigterm_while_tasks_run_loses_and_repeats_nothing(r, workers):
    started = time.monotonic()
    rng = random.Random()
    old = [workers.start("deploy_app") for _ in range(2)]
    wait_registered(r, deploy_app, old, workers)
    calls = [(f"d{i}", rng.randint(50, 200)) for i in range(240)]
    expected = {myid for myid, _ in calls}
    deploy_job.delay_many(calls[:200])
    deploy_job.delay_many(calls[200:], eta=1.5)

    for generation in range(2):                     # two deploys in a row
        target = len(done_ids(r)) + 20
        wait_for(lambda: len(done_ids(r)) >= target and
                 sum(len(v) for v in inflight(r).values()) >= 2, 30,
                 "tasks running before the deploy", workers.tails)
        for p in old:
            os.kill(p.pid, signal.SIGTERM)
        new = [workers.start("deploy_app") for _ in range(2)]     # a rolling deploy
        for p in old:
            try:
                code = p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                raise AssertionError("a worker did not stop within 15s of SIGTERM\n"
                                     + workers.tails())
            assert code == 0, f"worker exited {code} after SIGTERM\n" + workers.tails()
        assert not registered_pids(r, float("inf")) & {p.pid for p in old}, \
            "a stopped worker left its heartbeat entry behind"
        old = new

    def diag():
        return (f"missing {sorted(expected - done_ids(r))[:20]}\n"
                f"left {leftovers(r, deploy_app)}\n{workers.tails()}")
    wait_for(lambda: done_ids(r) >= expected and not leftovers(r, deploy_app), 60,
             "every deployed-over task done", diag)
    dup, runs = duplicates(r)
    print(f"\ndeploy: {len(done_ids(r))} done, {dup} duplicates, "
          f"{r.llen('wakaq:dead')} dead, {time.monotonic() - started:.1f}s")
    assert done_ids(r) == expected
    assert dup == 0, f"run twice: {sorted(k for k, v in runs.items() if v > 1)}"
    assert int(r.get(STARTED)) == len(run_log(r)), "a stop interrupted a running task"
    assert dead_entries(r) == []
    assert all(line["attempt"] == 1 for line in run_log(r)), "a stop used up a retry"
    assert all(p.poll() is None for p in old)
    assert "Traceback" not in "".join(workers.log(p) for p in workers.procs), workers.tails(40)


# ===================================================================== bad input

def _valid_payload(name="note", myid="x", **over):
    msg = {"id": "bad1", "name": name, "queue": "default", "retry": 0, "args": [myid],
           "kwargs": {}}
    msg.update(over)
    return json.dumps(msg)


BAD_PAYLOADS = {
    "not-json": (b"this is not json {", "bad payload"),
    "json-list": (b"[1, 2, 3]", "bad payload"),
    "json-object-wrong-keys": (b'{"hello": "world"}', "bad payload"),
    "json-wrong-types": (_valid_payload(args={"a": 1}, kwargs=[]).encode(), "bad payload"),
    "unknown-task": (_valid_payload(name="no_such_task").encode(), "unknown task"),
    "not-utf8": (_valid_payload(myid="XX").encode().replace(b"XX", b"\xff\xfe"),
                 "bad payload"),
    "not-utf8-bare": (b"\xff\xfe\xfd\xc3\x28", "bad payload"),
    "unknown-queue": (_valid_payload(queue="nowhere").encode(), "unknown queue"),
    "tag-unknown": (_valid_payload(myid={"__wakaq__": "pickle", "v": "x"}).encode(),
                    "bad payload"),
    "tag-overflow": (_valid_payload(myid={"__wakaq__": "timedelta", "v": [1e300]}).encode(),
                     "bad payload"),
    "nested-100k": (b"[" * 100_000, "bad payload"),
    "nested-100k-closed": (b"[" * 100_000 + b"]" * 100_000, "bad payload"),
}


@pytest.fixture
def bad_worker(r, workers):
    proc = workers.start("bad_app")
    wait_registered(r, bad_app, [proc], workers)
    note.delay("before")
    wait_for(lambda: "before" in done_ids(r), 15, "the first good task", workers.tails)
    (line,) = run_log(r)
    return proc, line["pid"]


@pytest.mark.parametrize("kind", list(BAD_PAYLOADS))
def test_bad_payload_is_dead_lettered_and_worker_carries_on(r, workers, bad_worker, kind):
    proc, child_pid = bad_worker
    raw, reason = BAD_PAYLOADS[kind]
    r.rpush("wakaq:q:default", raw)                 # straight onto the list, no wake-up token
    wait_for(lambda: r.llen("wakaq:dead") >= 1, 15, f"the {kind} payload dead-lettered",
             workers.tails)
    note.delay("after")
    wait_for(lambda: "after" in done_ids(r), 15, "the next good task", workers.tails)

    (entry,) = dead_entries(r)
    assert set(entry) >= {"id", "name", "queue", "attempts", "reason", "at", "payload"}
    assert entry["reason"].startswith(reason), entry["reason"]
    assert isinstance(entry["payload"], str) and entry["payload"]
    print(f"\n{kind}: dead-lettered with reason {entry['reason']!r}")
    if kind == "unknown-task":
        assert entry["name"] == "no_such_task" and entry["queue"] == "default"
    elif raw.isascii():
        assert entry["payload"] == raw.decode()
    assert proc.poll() is None
    assert [line["pid"] for line in run_log(r)] == [child_pid, child_pid], \
        "the child was replaced: it crashed on the bad payload\n" + workers.tails()
    assert done_ids(r) == {"before", "after"}
    settled(r, bad_app, workers)


def test_20_mib_argument_runs_normally(r, workers, bad_worker):
    proc, child_pid = bad_worker
    data = "0123456789abcdef" * (20 * 1024 * 1024 // 16)
    started = time.monotonic()
    measure.delay("big", data)
    wait_for(lambda: "big" in done_ids(r), 30, "the 20 MiB task", workers.tails)
    print(f"\n20 MiB argument: enqueued and run in {time.monotonic() - started:.2f}s")
    assert int(r.hget(LENS, "big")) == len(data) == 20 * 1024 * 1024
    assert dead_entries(r) == []
    assert run_log(r)[-1]["pid"] == child_pid
    settled(r, bad_app, workers)


def test_delay_with_redis_unreachable_raises_connection_error_quickly():
    closed = _free_port()                           # nothing listens there
    app = WakaQ(queues=["default"], url=f"redis://127.0.0.1:{closed}/0")

    @app.task
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


def test_arguments_not_matching_the_signature_are_an_ordinary_task_error(r, workers,
                                                                          bad_worker):
    proc, child_pid = bad_worker
    two_args.delay("missing-b")                     # too few
    two_args.delay("extra", 2, 3)                   # too many
    two_args.delay("kw", b=2, c=3)                  # an unexpected keyword
    note.delay("after")
    wait_for(lambda: "after" in done_ids(r), 15, "the task after the bad calls", workers.tails)
    wait_for(lambda: workers.log(proc).count("TypeError") >= 3, 10,
             "three TypeErrors in the worker's log", workers.tails)
    log = workers.log(proc)
    assert "Traceback" in log and "two_args" in log
    assert done_ids(r) == {"before", "after"}
    assert [line["pid"] for line in run_log(r)] == [child_pid, child_pid], \
        "the child was replaced after a signature mismatch\n" + workers.tails()
    assert children(proc.pid) == [child_pid]
    assert dead_entries(r) == [], "a task error is not a dead letter"
    settled(r, bad_app, workers)
    assert proc.poll() is None
