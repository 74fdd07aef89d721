"""wakaq.py - a Redis-backed background task queue in one file.

    python wakaq.py worker myapp:wakaq       # a parent that forks `concurrency` children
    python wakaq.py scheduler myapp:wakaq    # enqueues the app's CronTasks on time
    python wakaq.py info myapp:wakaq         # queues, running, dead letters, workers

    wakaq = WakaQ(queues=["default"], url="redis://localhost:6379/0")
    @wakaq.task
    def send_email(to): ...
    send_email.delay("bob@example.com", eta=60)        # returns the task id; eta: in a minute

Delivery is at least once: a task leaves Redis only after its attempt ends. A failed attempt
(soft or hard timeout, the child or the whole worker dying) is retried while it has retries
left, then dead-lettered with the reason. Any other exception is logged; the task is done.

Redis keys, all "{p}:..." with {p} = "{PREFIX}" (default "{wakaq}"): a hash tag, so all of an
app's keys are in one Redis Cluster slot and every script runs on one node. Times: Redis's TIME.
  {p}:q:{queue}      LIST  ready payloads, claimed from the left; pushed to the end, or to the
                           front if a stop (or another's hard timeout) interrupted them.
  {p}:ready          ZSET  the non-empty queues, name -> rank (0 first).
  {p}:eta:{queue}    ZSET  delayed payloads (eta, retry_backoff, migrated), score = due time.
  {p}:due            ZSET  "RANK:NAME" -> the queue's earliest due time; claims move due tasks.
  {p}:wake:{queue}   LIST  wake-up tokens (<= 1,000) idle children BLPOP; pushes add them.
  {p}:inflight:{wid} HASH  "S.K" -> the payload child slot S runs in sub-slot K, "S.K:t" -> its
                           claim token, "S.K:s" -> its start time; "adopted:{wid}:..." fields.
  {p}:workers        ZSET  worker id (HOST.PID.RANDOM) -> last heartbeat.
  {p}:serve:{digest} SET   the queue names a worker serves (claims take only those).
  {p}:bcast:{wid}    LIST  broadcasts for one worker: taken first every 50 ms, or when idle.
  {p}:dead           LIST  dead letters: JSON {id, name, queue, attempts, reason, at, payload}.
  {p}:cron:{digest}  STRING the last tick enqueued for one schedule (unix seconds).

Soft timeouts: SIGALRM, armed (setitimer) with `in_task` set while a sync task runs (up to its
after_task_finished hooks), raises SoftTimeout in the task's own code only: landing in logging,
asyncio or wakaq, it traces the outermost such frame and raises as that returns. Async: wait_for.

Payload: JSON {"id", "name", "queue", "retry", "args", "kwargs"} (+ "bcast": 1);
retry = failed attempts so far. Values beyond JSON travel as {"__wakaq__": TYPE, "v": ...}.
"""
import argparse, asyncio, base64, collections, contextlib, contextvars, decimal, functools, gc
import hashlib, inspect, itertools, json, logging, mmap, os, random, re, select, signal, socket
import importlib, struct, sys, threading, time, traceback, types
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import redis
from croniter import croniter

__version__ = "2.0.0"
__all__ = ["WakaQ", "Queue", "CronTask", "Task", "SoftTimeout", "current_task", "WakaQError"]

log = logging.getLogger("wakaq")

WAKE_TOKENS = 1000        # wake-up tokens kept per queue at most
DUE_BATCH = 1000          # delayed payloads moved per script call (bounded command time)
BULK_CHUNK = 1000         # payloads per command in delay_many()
TICK = 0.1                # worker parent loop period, seconds
IDLE_WAIT = 5             # default wait_timeout: an idle child's longest BLPOP, seconds
MAX_BACKOFF = 3600        # retry_backoff waits at most this, seconds
PROMOTE = 0.05            # a busy child moves due delayed tasks at most this often, seconds
CRON_CATCH_UP = 1800      # seconds: a missed cron tick older than this is not enqueued


# ===================================================================== errors and helpers

class WakaQError(Exception):
    """Base class for the errors wakaq raises at runtime."""


class SoftTimeout(WakaQError):
    """Raised in a task at its soft timeout; an Exception (as in the original and Celery)."""


def _seconds(value, name):
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"{name} must be seconds or a timedelta, got {value!r}")
    if value is not None and not 0 <= value < float("inf"):        # also refuses nan
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return value if value is None else float(value)


def _count(value, name, minimum=0):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return value


_Stop = type("_Stop", (BaseException,), {})    # a child's SIGTERM handler leaves an idle wait
_Limits = collections.namedtuple("_Limits", "soft hard retries backoff")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")   # \Z: "$" would let "q\n" through


def _limits_for(app, task, queue):
    """Per setting, the first one set of the task's, the queue's and the app's."""
    soft, hard, retries, backoff = (
        next((getattr(x, a) for x in (task, queue, app) if getattr(x, a, None) is not None), None)
        for a in ("soft_timeout", "hard_timeout", "max_retries", "retry_backoff"))
    return _Limits(soft, hard, retries or 0, backoff or 0.0)


def _check_timeouts(limits, where):
    if limits.soft is not None and limits.hard is not None and limits.hard <= limits.soft:
        raise ValueError(f"{where}: hard_timeout ({limits.hard:g}s) must be greater than "
                         f"soft_timeout ({limits.soft:g}s)")


def _set_limits(obj, where, max_retries, *seconds):      # soft, hard timeout, retry_backoff
    obj.max_retries = _count(max_retries, f"max_retries of {where}")
    for name, value in zip(("soft_timeout", "hard_timeout", "retry_backoff"), seconds):
        setattr(obj, name, _seconds(value, f"{name} of {where}"))


def _concurrency(value, cores=None, name="concurrency"):
    """An int, or arithmetic of `cores` such as "cores*2" or "cores - 1" (at least 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be an int or an expression of cores, got {value!r}")
    try:        # eval of this alphabet (no names but cores, no "**") is safe
        if not re.fullmatch(r"(cores\b|[\d.]+|[-+*/ ()])+", str(value)) or "**" in str(value):
            raise ValueError("only numbers, `cores`, parentheses and + - * / // are allowed")
        n = int(eval(str(value), {"__builtins__": {}}, {"cores": cores or os.cpu_count() or 1}))
    except Exception as e:        # SyntaxError, ArithmeticError, TypeError ("2(3)"), ...
        raise ValueError(f"bad {name} expression {value!r}: {e}") from None
    if n < 1:
        raise ValueError(f"{name} must come to at least 1, got {value!r} = {n}")
    return n


def _import_app(spec):
    """Load a WakaQ from "module:attribute" or "module.attribute"."""
    module, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module or not attr:
        raise ValueError(f"APP must look like module:attribute, got {spec!r}")
    try:
        obj = functools.reduce(getattr, attr.split("."), importlib.import_module(module))
    except AttributeError:
        if ":" in spec:
            raise
        obj = importlib.import_module(spec)          # "examples.tasks": a module
    if type(obj) is type(sys):                       # "examples.tasks": forgot ":wakaq"
        names = [k for k, v in vars(obj).items() if type(v).__name__ == "WakaQ"] or ["APP"]
        raise ValueError(f"{spec} is a module; name its WakaQ: {obj.__name__}:{names[0]}")
    if not isinstance(obj, WakaQ):
        kind, other = type(obj).__name__, sys.modules.get(type(obj).__module__, sys)
        raise TypeError(f"{spec} is a {kind}, not a WakaQ" if kind != "WakaQ" else
                        f"{spec} is a WakaQ of another copy of wakaq ({other.__file__}), not "
                        f"of this one ({__file__}): run python -m {other.__name__}")
    return obj


# ===================================================================== serializer

_TAG = "__wakaq__"
_TYPES = {  # TYPE: (Python types, encode, decode); datetime first (a datetime is a date)
    "datetime": (datetime, lambda o: (o if o.tzinfo is None else o.astimezone(  # naive: UTC
        timezone.utc).replace(tzinfo=None)).isoformat(), datetime.fromisoformat),
    "date": (date, date.isoformat, date.fromisoformat),
    "timedelta": (timedelta, lambda o: [o.days, o.seconds, o.microseconds],
                  lambda v: timedelta(*v)),
    "decimal": (decimal.Decimal, str, decimal.Decimal),
    "bytes": ((bytes, bytearray), lambda o: base64.b64encode(o).decode(), base64.b64decode)}
# What decoding hostile bytes may raise (e.g. binascii.Error, decimal.InvalidOperation).
_BAD_PAYLOAD = (ValueError, TypeError, KeyError, RecursionError, ArithmeticError)


def _encode(o):
    """json.dumps default=: the types we carry beyond JSON; anything else is a TypeError."""
    for tag, (kind, encode, _) in _TYPES.items():
        if isinstance(o, kind):
            return {_TAG: tag, "v": encode(o)}
    if isinstance(o, (set, frozenset)):
        return list(o)
    raise TypeError(f"wakaq cannot serialize {type(o).__name__} value {o!r:.80}; "
                    "pass JSON types, datetime, date, timedelta, Decimal, bytes, set or tuple")


def _decode(d):
    """object_hook for {"__wakaq__": TYPE, "v": ...}; an unknown TYPE raises KeyError."""
    return _TYPES[d[_TAG]][2](d["v"]) if _TAG in d else d


# Compact JSON; the C encoder built once (JSONEncoder.encode builds it per call: twice the cost
# of a small payload). Circular values raise RecursionError.
_encoder = json.encoder.c_make_encoder(None, _encode, json.encoder.encode_basestring_ascii,
                                       None, ":", ",", False, False, True)     # CPython's C one
_dumps = lambda o: "".join(_encoder(o, 0))


def _loads(raw):
    """Decode a payload; object_hook only when a tag is present (it slows every dict)."""
    raw = raw.decode() if isinstance(raw, bytes) else raw      # UTF-8, as _dumps writes it
    return json.loads(raw, object_hook=_decode if _TAG in raw else None)


def _loads_msg(raw, decode=True):
    """A task payload, checked for shape, or one of _BAD_PAYLOAD; decode=False: keep tags."""
    msg = _loads(raw) if decode else json.loads(raw)
    if not (isinstance(msg, dict) and isinstance(msg.get("id"), str)
            and isinstance(msg.get("name"), str) and isinstance(msg.get("queue"), str)
            and type(msg.get("retry")) is int and isinstance(msg.get("args"), list)
            and isinstance(msg.get("kwargs"), dict)):
        raise ValueError("not a wakaq payload (need id, name, queue, retry, args, kwargs)")
    return msg


def _check_keys(o):
    """JSON would turn non-str dict keys into strings, silently; refuse them (and our tag)."""
    if isinstance(o, dict):
        for k, v in o.items():
            if not isinstance(k, str) or k == _TAG:
                raise TypeError(f"wakaq cannot serialize the dict key {k!r}: use str keys")
            _check_keys(v)
    elif isinstance(o, (list, tuple)):
        for v in o:
            _check_keys(v)


def _after_fork():
    """Per process: _new_id() (a random prefix + a counter: no syscall) and _local (per thread)."""
    global _new_id, _local
    prefix, counter, _local = os.urandom(8).hex(), itertools.count(), threading.local()
    _new_id = lambda: f"{prefix}{next(counter):x}"


_after_fork()
os.register_at_fork(after_in_child=_after_fork)


# ===================================================================== Queue, CronTask, Task

class Queue:
    """A named list of tasks. Lower priority number = served first."""

    def __init__(self, name, priority=None, max_retries=None, soft_timeout=None,
                 hard_timeout=None, retry_backoff=None, prefix="wakaq"):
        if not isinstance(name, str) or not _QUEUE_NAME.match(name):
            raise ValueError(f"queue name must be letters, digits, _ . or -, got {name!r}")
        self.prefix = re.sub(r"[^A-Za-z0-9_.\-]", "", prefix or "wakaq")  # the original's, migrate
        self.name, self.priority = name, _count(priority, f"priority of queue {name!r}", -2**31)
        _set_limits(self, f"queue {name!r}", max_retries, soft_timeout, hard_timeout, retry_backoff)


def _coerce_queue(q):
    if isinstance(q, (tuple, list)) and len(q) == 2:    # the original's (name, priority) too
        return Queue(*q) if isinstance(q[0], str) else Queue(q[1], priority=q[0])
    if not isinstance(q, (Queue, str)):
        raise TypeError(f"a queue is a Queue, a (priority, name) tuple or a name, got {q!r}")
    return Queue(q) if isinstance(q, str) else q


class CronTask:
    """Enqueue `task_name` on `queue` when `schedule` matches (in the app's timezone): 5 fields,
    or 6 with seconds LAST ("* * * * * */10": every 10 s). Time zones, missed ticks: _due."""

    def __init__(self, schedule, task_name, queue=None, args=None, kwargs=None):
        if not isinstance(schedule, str) or len(schedule.split()) not in (5, 6) \
                or not croniter.is_valid(schedule):
            raise ValueError(f"bad cron expression {schedule!r} (5 fields, or 6 with seconds)")
        if not isinstance(task_name, str):
            raise TypeError(f"CronTask task_name must be a str, got {task_name!r}")
        self.schedule, self.task_name, self.queue = schedule, task_name, queue
        self.args, self.kwargs = list(args or ()), dict(kwargs or {})
        _check_keys([self.args, self.kwargs])
        _dumps([self.args, self.kwargs])          # TypeError now, not at the first tick


class Task:
    """A registered task: call it to run here and now, .delay() to enqueue it."""

    def __init__(self, app, fn, name, queue, *limits):
        functools.update_wrapper(self, fn)      # __name__, __qualname__, __module__, __doc__
        self.app, self.fn, self.name, self._json_name = app, fn, name, json.dumps(name)
        self.queue = app._queue(queue) if queue is not None else None
        _set_limits(self, f"task {name!r}", *limits)   # max_retries, soft, hard, retry_backoff
        _check_timeouts(_limits_for(app, self, self.queue or app.default_queue), f"task {name!r}")
        self.is_async = inspect.iscoroutinefunction(fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def delay(self, *args, queue=None, eta=None, **kwargs):
        """Enqueue one call; returns its id. eta: seconds, a timedelta or a datetime (naive UTC)."""
        return self.app._enqueue(self, [(args, kwargs)], queue, eta)[0]

    def delay_many(self, calls, queue=None, eta=None):
        """Enqueue calls (tuples of args, or {"args": [...], "kwargs": {...}}); returns the ids."""
        items = [(c.get("args", ()), c.get("kwargs", {})) if isinstance(c, dict) else (c, {})
                 for c in calls]
        bad = [a for a, _ in items if not isinstance(a, (tuple, list))]
        if bad:
            raise TypeError(f"delay_many() items are tuples of args, got {bad[0]!r}")
        return self.app._enqueue(self, items, queue, eta)

    def broadcast(self, *args, **kwargs):
        """Run once on every live worker (in one of its children); returns how many."""
        return self.app._broadcast(self, args, kwargs)


# ===================================================================== WakaQ (the app)

class WakaQ:
    """The app: queues, settings, the task registry and the Redis connection."""

    def __init__(self, queues=("default",), url=None, host=None, port=None, db=None,
                 username=None, password=None, concurrency="cores", exclude_queues=(),
                 soft_timeout=None, hard_timeout=None, max_retries=None, max_mem_percent=None,
                 max_tasks_per_worker=None, heartbeat_timeout=60, schedules=(), timezone=None,
                 eager=False, worker_log_file=None, scheduler_log_file=None,
                 worker_log_level=logging.INFO, scheduler_log_level=logging.INFO,
                 prefix="wakaq", async_concurrency=0, retry_backoff=None, wait_timeout=None,
                 socket_timeout=None, socket_connect_timeout=None, health_check_interval=0):
        if isinstance(queues, (str, Queue)) or not queues:
            raise TypeError(f"queues must be a non-empty list, got {queues!r}")
        qs = [_coerce_queue(q) for q in queues]
        self._queues = {q.name: q for q in qs}
        if len(self._queues) != len(qs):
            raise ValueError(f"duplicate queue names in {[q.name for q in qs]!r}")
        ranked = sorted((q for q in qs if q.priority is not None), key=lambda q: q.priority)
        plain = [q for q in qs if q.priority is None]   # rank below all others, in order
        self.queues, lowest = ranked + plain, ranked[-1].priority if ranked else -1
        self._priority = {q.name: q.priority for q in ranked}
        self._priority.update((q.name, lowest + 1 + i) for i, q in enumerate(plain))
        self._rank = {q: i for i, q in enumerate(self.queues)}.__getitem__   # 0 served first
        self.default_queue = self.queues[-1]
        ex = [exclude_queues] if isinstance(exclude_queues, str) else exclude_queues  # or one name
        self.exclude_queues = list(dict.fromkeys(self._queue(n).name for n in ex))
        if len(self.exclude_queues) == len(self.queues):
            raise ValueError(f"exclude_queues {self.exclude_queues!r} leaves no queue to serve")
        self.concurrency = _concurrency(concurrency)
        self.async_concurrency = _concurrency(async_concurrency or 10, name="async_concurrency")
        self.max_retries = _count(max_retries, "max_retries")
        self.max_tasks_per_worker = _count(max_tasks_per_worker, "max_tasks_per_worker", 1)
        given, defaults = locals(), dict(wait_timeout=IDLE_WAIT, socket_timeout=10.0,
                                         socket_connect_timeout=5.0)
        for name in ("soft_timeout", "hard_timeout", "retry_backoff", "heartbeat_timeout",
                     "health_check_interval", *defaults):       # 0 or None: the default, if any
            value = _seconds(given[name], name)
            setattr(self, name, value or defaults[name] if name in defaults else value)
        if not self.heartbeat_timeout:
            raise ValueError(f"heartbeat_timeout must be above 0, got {heartbeat_timeout!r}")
        for q in [None] + self.queues:
            _check_timeouts(_limits_for(self, None, q), f"queue {q.name!r}" if q else "WakaQ")
        self.max_mem_percent = m = max_mem_percent
        if m is not None and (type(m) not in (int, float) or not 1 <= m <= 99):
            raise ValueError(f"max_mem_percent must be from 1 to 99, got {m!r}")
        try:
            self.tz = ZoneInfo(timezone or "UTC")
        except (ValueError, KeyError, OSError, TypeError) as e:   # not found: a KeyError
            raise ValueError(f"unknown timezone {timezone!r} (an IANA name): {e}") from None
        self.schedules = [CronTask(*c[:2], None, *c[2:]) if isinstance(c, (tuple, list))
                          and len(c) in (2, 4) else c for c in schedules]  # the original's tuples
        for cron in self.schedules:
            if not isinstance(cron, CronTask):
                raise TypeError(f"schedules holds CronTask objects or tuples, got {cron!r}")
            self._queue(self.default_queue if cron.queue is None else cron.queue)
        if not isinstance(eager, bool):
            raise TypeError(f"eager must be True or False, got {eager!r}")
        self.eager = eager
        self.worker_log_file, self.scheduler_log_file = worker_log_file, scheduler_log_file
        for name in ("worker_log_level", "scheduler_log_level"):
            level = logging.getLevelName(v.upper()) if isinstance(v := given[name], str) else v
            if not isinstance(level, int) or isinstance(level, bool):
                raise ValueError(f"{name} must be a logging level such as 'INFO', got {v!r}")
            setattr(self, name, level)
        if url and (host, port, db) != (None,) * 3:
            raise TypeError(f"give url={_mask(url)!r} or host/port/db={(host, port, db)!r}")
        if url and not re.match(r"(redis|rediss|unix|redis\+sentinel)://", str(url)):
            raise ValueError(f"url {_mask(url)!r}: use redis, rediss, unix or redis+sentinel")
        host, port, db = host or "localhost", port or 6379, db or 0
        self._redis_args = dict(url=url) if url else dict(
            host=host, port=port, db=db, username=username, password=password)
        self.url = url or f"redis://{host}:{port}/{db}"
        self.tasks, self._hooks = {}, collections.defaultdict(list)
        if not isinstance(prefix, str) or not _QUEUE_NAME.match(prefix):
            raise ValueError(f"prefix must be letters, digits, _ . or -, got {prefix!r}")
        self.prefix = prefix
        for q in self.queues:
            q.key, q.eta_key, q.wake_key = (self._k(k, q.name) for k in ("q", "eta", "wake"))
        self.dead_key, self.workers_key = self._k("dead"), self._k("workers")
        self._redis, self._redis_pid, self._cluster, self._nodes = None, None, None, []

    def task(self, fn=None, *, name=None, queue=None, max_retries=None, soft_timeout=None,
             hard_timeout=None, retry_backoff=None):
        """Register a task: @wakaq.task or @wakaq.task(queue=..., max_retries=...)."""
        def register(fn):
            t = Task(self, fn, name or fn.__name__, queue, max_retries, soft_timeout,
                     hard_timeout, retry_backoff)
            if self.tasks.setdefault(t.name, t) is not t:
                raise ValueError(f"a task named {t.name!r} is already registered")
            return t
        return register(fn) if fn is not None else register

    def _hook(self, kind, fn=None):
        if fn is None:
            return functools.partial(self._hook, kind)
        if kind == "wrap_tasks_with" and self._hooks[kind]:
            raise ValueError(f"wrap_tasks_with is already {self._hooks[kind][0]!r}: merge them")
        self._hooks[kind].append(fn)
        return fn

    after_worker_started = functools.partialmethod(_hook, "after_worker_started")  # per child
    before_task_started = functools.partialmethod(_hook, "before_task_started")
    after_task_finished = functools.partialmethod(_hook, "after_task_finished")
    wrap_tasks_with = functools.partialmethod(_hook, "wrap_tasks_with")  # wrapper(fn, args, kwargs)

    def _k(self, *parts):       # "{prefix}:a:b": the hash tag puts all the app's keys in one slot
        return "{%s}:%s" % (self.prefix, ":".join(parts))

    def _queue(self, name):
        name = name.name if isinstance(name, Queue) else name
        if name not in self._queues:
            raise ValueError(f"unknown queue {name!r}; the app has {list(self._queues)!r}")
        return self._queues[name]

    def _client(self, retries=2, blocking=True):
        """A new client on the node with the app's keys (a blocking one outlasts an idle BLPOP)."""
        kw = dict(self._redis_args, socket_connect_timeout=self.socket_connect_timeout,
                  retry=redis.retry.Retry(redis.backoff.ExponentialBackoff(0.5, 0.05), retries),
                  socket_timeout=max(self.socket_timeout, self.wait_timeout + 5) if blocking
                  else self.socket_timeout, health_check_interval=self.health_check_interval)
        url = kw.pop("url", None)
        if url and url.startswith("redis+sentinel://"):
            return _sentinel_master(url, kw)
        client = redis.Redis.from_url(url, **kw) if url else redis.Redis(**kw)
        if self._cluster is None:
            self._cluster = client.info("cluster").get("cluster_enabled") == 1
        if self._cluster:
            if kw.pop("db", 0):
                raise ValueError("a Redis Cluster has only db 0")
            kw.pop("health_check_interval")
            kw["startup_nodes"] = [redis.cluster.ClusterNode(*n) for n in self._nodes]
            cluster = redis.RedisCluster.from_url(url, **kw) if url else redis.RedisCluster(**kw)
            client.close()
            self._nodes = [(n.host, n.port) for n in cluster.get_nodes()]
            client = cluster.get_node_from_key(self._k("q")).redis_connection
        return client

    @property
    def _conn(self):
        conns = _local.__dict__.setdefault("conns", {})
        return conns.get(self) or conns.setdefault(self, _Conn(self, retries=1))

    @property
    def redis(self):
        """This process's client (a new one after fork) on the node that holds the app's keys."""
        if self._redis is None or self._redis_pid != os.getpid():
            self._redis, self._redis_pid = self._client(), os.getpid()
        return self._redis

    def _payload(self, task, args, kwargs, queue, bcast=False):
        """(id, payload): JSON formatted by hand (twice as fast)."""
        try:
            _check_keys([args, kwargs])
            args, kwargs = _dumps(args), _dumps(kwargs) if kwargs else "{}"
        except RecursionError:
            raise TypeError(f"the arguments of {task.name} are circular or nested too deeply")
        msg_id, tail = _new_id(), ',"bcast":1}' if bcast else "}"
        return msg_id, (f'{{"id":"{msg_id}","name":{task._json_name},"queue":"{queue.name}",'
                        f'"retry":0,"args":{args},"kwargs":{kwargs}{tail}')

    def _enqueue(self, task, calls, queue, eta):
        q = (task.queue or self.default_queue) if queue is None else self._queue(queue)
        if queue is not None:
            _check_timeouts(_limits_for(self, task, q), f"task {task.name!r} on queue {q.name!r}")
        built = [self._payload(task, a, k, q) for a, k in calls]   # TypeError before any push
        if self.eager:      # the same serializer round trip and current_task() as in a worker
            for msg in (_loads(raw) for _, raw in built):
                token = _current.set(msg)
                try:
                    self._run_task(task, msg["args"], msg["kwargs"])
                finally:
                    _current.reset(token)
        else:
            keys = [q.key, q.wake_key, self._k("ready"), q.eta_key, self._k("due")]
            head = [self._rank(q), q.name, *_eta(eta)]
            for start in range(0, len(built), BULK_CHUNK):      # one round trip per 1,000
                _ENQUEUE(self._conn, keys, head + [r for _, r in built[start:start + BULK_CHUNK]])
        return [i for i, _ in built]

    def _broadcast(self, task, args, kwargs):
        if self.eager:
            return len(self._enqueue(task, [(args, kwargs)], None, None))
        _, raw = self._payload(task, args, kwargs, task.queue or self.default_queue, bcast=True)
        return _BROADCAST(self._conn, [self.workers_key],
                          [self.heartbeat_timeout, raw, "{%s}" % self.prefix])

    def _run_task(self, task, args, kwargs, soft_deadline=None, run=asyncio.run, ended=None):
        """Hooks and task; `run` runs coroutines (soft timeout by asyncio, not by SIGALRM)."""
        def wait(x):
            return run(x) if x is not None and inspect.isawaitable(x) else x
        try:
            for hook in self._hooks["before_task_started"]:
                wait(hook())
            fn = (lambda *a, **k: run(_maybe(task.fn(*a, **k), soft_deadline))) \
                if task.is_async else task.fn
            wrap = self._hooks["wrap_tasks_with"]
            return wait(wrap[0](fn, args, kwargs) if wrap else fn(*args, **kwargs))
        finally:
            if ended:
                ended()
            for hook in self._hooks["after_task_finished"]:
                wait(hook())

    def _outcome(self, raw, reason, bcast_key=None):
        """By the retry rule: (key, front|back|delay|dead, value, queue, delay); bcast_key: ours."""
        try:
            msg = _loads_msg(raw, decode=False)      # tagged values are not re-encoded
        except _BAD_PAYLOAD as e:
            msg, reason = None, f"{reason}; bad payload: {e}"
        queue = msg and self._queues.get(msg["queue"])
        if queue and (bcast_key or not msg.get("bcast")):
            key = bcast_key if msg.get("bcast") else queue.key
            if reason.startswith("interrupted"):
                return key, "front", raw, queue, 0
            limits = _limits_for(self, self.tasks.get(msg["name"]), queue)
            if msg["retry"] < limits.retries:
                msg["retry"] += 1
                delay = min(MAX_BACKOFF, limits.backoff * 2 ** (msg["retry"] - 1) * random.uniform(
                    0.75, 1.25)) if limits.backoff and not msg.get("bcast") else 0
                key, where = (queue.eta_key, "delay") if delay else (key, "back")
                return key, where, json.dumps(msg), queue, delay
        return self._dead(raw, msg, reason)

    def _dead(self, raw, msg, reason):         # the dead-letter outcome (see _outcome), logged
        log.warning("task %s id=%s dead-lettered after %d attempt(s): %s",
                    msg and msg["name"], msg and msg["id"], (msg or {}).get("retry", 0) + 1, reason)
        return self.dead_key, "dead", _dead_entry(raw, msg, reason), None, 0


async def _maybe(x, deadline=None):     # x, or awaited until deadline (monotonic): SoftTimeout
    if not inspect.isawaitable(x):
        return x
    try:
        timeout = max(0.0, deadline - time.monotonic()) if deadline else None
        return await asyncio.wait_for(x, timeout)
    except asyncio.TimeoutError:
        if not deadline or time.monotonic() < deadline:
            raise               # the task's own TimeoutError
        raise SoftTimeout("soft timeout") from None


def _eta(eta):
    """-> ("", 0): now, ("in", seconds from now by Redis's clock), ("at", unix time; naive UTC)."""
    if isinstance(eta, datetime):
        return "at", (eta.replace(tzinfo=timezone.utc) if eta.tzinfo is None else eta).timestamp()
    eta = max(eta, 0) if type(eta) in (int, float) else eta      # in the past: now
    return ("", 0) if eta is None else ("in", _seconds(eta, "eta or a datetime"))


def _dead_entry(raw, msg, reason):
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    return json.dumps({**{k: (msg or {}).get(k) for k in ("id", "name", "queue")}, "attempts": (
        msg or {}).get("retry", 0) + 1, "reason": reason, "at": time.time(), "payload": text})


def _sentinel_master(url, kw):
    """redis+sentinel://[user:pass@]host:port[,...]/SERVICE[/DB]: SERVICE's master, now or later."""
    from urllib.parse import unquote, urlsplit
    parts = urlsplit(url)
    service, _, db = parts.path.strip("/").partition("/")
    if not service or "/" in db:
        raise ValueError(f"want redis+sentinel://host:port[,...]/SERVICE[/DB], got {_mask(url)!r}")
    hosts = [(h.partition(":")[0], int(h.partition(":")[2] or 26379))
             for h in parts.netloc.rpartition("@")[2].split(",")]
    del kw["retry"]
    return redis.Sentinel(hosts, sentinel_kwargs={"socket_timeout": kw["socket_connect_timeout"]},
                          **kw).master_for(service, db=int(db or 0), username=unquote(
                              parts.username or ""), password=unquote(parts.password or ""))


def _mask(url):                    # the password (user:PASSWORD@, ?password=) as ***
    return re.sub(r"(://[^:/@]*:)[^/]*@|(password=)[^&]*",
                  lambda m: f"{m[1]}***@" if m[1] else "password=***", str(url))


# ===================================================================== Redis scripts

class _Script:
    """EVALSHA, or EVAL if Redis lost it. allow_oom: it may write when Redis is full (Redis 7)."""

    def __init__(self, source, allow_oom=False):
        self.source = ("#!lua flags=allow-oom\n" if allow_oom else "") + _LUA_LIB + source
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def __call__(self, r, keys, args, **kw):        # kw: for a _Conn
        try:
            return r.execute_command("EVALSHA", self.sha, len(keys), *keys, *args, **kw)
        except redis.exceptions.NoScriptError:
            return r.execute_command("EVAL", self.source, len(keys), *keys, *args, **kw)


# In every script. wake: n wake-up tokens (WAKE_TOKENS at most). now: Redis's clock. later: p into
# delayed set ek; due zset dk keeps m = "RANK:NAME" at its earliest due time (if new: wake up).
_LUA_LIB = f"""
local function wake(key, n)
  local t = {{}}
  for i = 1, math.min(n, {WAKE_TOKENS} - redis.call('LLEN', key)) do t[i] = '1' end
  if #t > 0 then redis.call('RPUSH', key, unpack(t)) end
end
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function later(ek, dk, m, due, p, wk)
  redis.call('ZADD', ek, due, p)
  if redis.call('ZADD', dk, 'LT', 'CH', due, m) == 1 then wake(wk, 3) end
end
"""

# KEYS: queue, its wake list, ready, its delayed set, due[, cron record]. ARGV: rank, name, mode
# ("" now, "in" seconds, "at" unix time, "cron": now, once per tick), when (cron: the tick),
# payloads (due at once: 1e-6 s apart, in order). A cron tick the record holds (or a later one)
# is not enqueued again: -> 0.
_ENQUEUE = _Script("""
if ARGV[3] == 'cron' then
  if tonumber(redis.call('GET', KEYS[6]) or 0) >= tonumber(ARGV[4]) then return 0 end
  redis.call('SET', KEYS[6], ARGV[4])
end
if ARGV[3] == '' or ARGV[3] == 'cron' then
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 5))
  redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2])
  wake(KEYS[2], #ARGV - 4)
else
  local due, m = tonumber(ARGV[4]) + (ARGV[3] == 'in' and now() or 0), ARGV[1] .. ':' .. ARGV[2]
  for i = 5, #ARGV do later(KEYS[4], KEYS[5], m, due + (i - 5) / 1e6, ARGV[i], KEYS[2]) end
end
return #ARGV - 4
""")

# KEYS: in-flight hash "{p}:inflight:{wid}" (the other keys follow from it), served set. ARGV:
# field, token to ack, new token, "p" (promote up to 10 queues' due tasks, take a broadcast
# first), a served queue to try first ("" none). Hands out again, under the new token, what the
# field holds if that is not the acked attempt (a lost reply; a dead child's late claim). Claims
# only while listed; the new attempt replaces the acked one. -> the payload; or, the ack done
# and stale wake-ups dropped, milliseconds to the next due task (-1: none): an integer.
_CLAIM = _Script(f"""
local f, t, p, qs = ARGV[1], now(), false, false
local P, w = string.match(KEYS[1], '^(.-):inflight:(.*)$')
local cur = redis.call('HGET', KEYS[1], f .. ':t')
if cur and cur ~= ARGV[2] then p = redis.call('HGET', KEYS[1], f)   -- again, newly tokened
elseif redis.call('ZRANK', P .. ':workers', w) then
  qs = ARGV[4] == 'p' and redis.call('ZRANGEBYSCORE', P .. ':due', '-inf', t, 'LIMIT', 0, 10)
  for _, m in ipairs(qs or {{}}) do
    local rank, name = string.match(m, '^(%d+):(.*)$')
    local ek = P .. ':eta:' .. name
    local due = redis.call('ZRANGEBYSCORE', ek, '-inf', t, 'LIMIT', 0, {DUE_BATCH})
    if #due > 0 then
      redis.call('RPUSH', P .. ':q:' .. name, unpack(due))
      redis.call('ZREM', ek, unpack(due))
      redis.call('ZADD', P .. ':ready', rank, name)
      wake(P .. ':wake:' .. name, #due)
    end
    local nx, dk = redis.call('ZRANGE', ek, 0, 0, 'WITHSCORES'), P .. ':due'
    if nx[2] then redis.call('ZADD', dk, nx[2], m) else redis.call('ZREM', dk, m) end
  end
  if qs then p = redis.call('LPOP', P .. ':bcast:' .. w) end
  p = p or ARGV[5] ~= '' and redis.call('LPOP', P .. ':q:' .. ARGV[5])
  local i, n = 0, 16
  while not p and n == 16 do
    local names = redis.call('ZRANGE', P .. ':ready', i, i + 15)
    n, i = #names, i + 16
    for _, name in ipairs(names) do
      if redis.call('SISMEMBER', KEYS[2], name) == 1 then
        p = redis.call('LPOP', P .. ':q:' .. name)
        if p then break end
        redis.call('ZREM', P .. ':ready', name)
        i = i - 1
      end
    end
  end
  p = p or redis.call('LPOP', P .. ':bcast:' .. w)
end
if not p then
  redis.call('HDEL', KEYS[1], f, f .. ':t', f .. ':s')
  local ws = {{P .. ':wake:' .. w}}
  for _, q in ipairs(redis.call('SMEMBERS', KEYS[2])) do ws[#ws + 1] = P .. ':wake:' .. q end
  redis.call('DEL', unpack(ws))
  local first = redis.call('ZRANGE', P .. ':due', 0, 0, 'WITHSCORES')
  return first[2] and math.max(0, (tonumber(first[2]) - t) * 1000) or -1
end
redis.call('HSET', KEYS[1], f, p, f .. ':t', ARGV[3], f .. ':s', t)
return p
""", allow_oom=True)

# KEYS: in-flight hash, target, wake list, ready, due. ARGV: field, token ("" any), value, where
# ("" ack, front, back, delay, dead), rank, queue ("" none), delay. Only while the token holds.
_RELEASE = _Script("""
local f, w = ARGV[1], ARGV[4]
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], f .. ':t') ~= ARGV[2] then return 0 end
if redis.call('HDEL', KEYS[1], f, f .. ':t', f .. ':s') == 0 then return 0 end
if w == 'delay' then
  later(KEYS[2], KEYS[5], ARGV[5] .. ':' .. ARGV[6], now() + tonumber(ARGV[7]), ARGV[3], KEYS[3])
elseif w ~= '' then
  redis.call(w == 'front' and 'LPUSH' or 'RPUSH', KEYS[2], ARGV[3])
  if ARGV[6] ~= '' then redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6]) end
  if w ~= 'dead' then wake(KEYS[3], 1) end
end
return 1
""", allow_oom=True)

# KEYS: workers, our in-flight hash, served set. ARGV: worker id, heartbeat_timeout, may adopt,
# "{prefix}", served names. Heartbeats; adopts workers silent that long: their in-flight fields and
# broadcasts become our adopted:* fields (the parent releases them). -> {worker, count, ...}.
_BEAT = _Script("""
local t, out, p = now(), {}, ARGV[4]
redis.call('ZADD', KEYS[1], t, ARGV[1])
redis.call('SADD', KEYS[3], unpack(ARGV, 5))
if ARGV[3] ~= '1' then return out end
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t - ARGV[2], 'LIMIT', 0, 10)) do
  local hk, bk, n = p .. ':inflight:' .. w, p .. ':bcast:' .. w, 0
  local h = redis.call('HGETALL', hk)
  for i, b in ipairs(redis.call('LRANGE', bk, 0, -1)) do h[#h + 1], h[#h + 2] = 'b' .. i, b end
  for i = 1, #h, 2 do
    redis.call('HSET', KEYS[2], 'adopted:' .. w .. ':' .. h[i], h[i + 1])
    if not string.find(h[i], ':') then n = n + 1 end
  end
  redis.call('ZREM', KEYS[1], w)
  redis.call('DEL', hk, bk, p .. ':wake:' .. w)
  out[#out + 1], out[#out + 2] = w, n
end
return out
""", allow_oom=True)

# KEYS: workers. ARGV: seconds, payload, "{prefix}". To every worker heard from in those seconds.
_BROADCAST = _Script("""
local ws = redis.call('ZRANGEBYSCORE', KEYS[1], now() - tonumber(ARGV[1]), '+inf')
for _, w in ipairs(ws) do
  redis.call('RPUSH', ARGV[3] .. ':bcast:' .. w, ARGV[2])
  wake(ARGV[3] .. ':wake:' .. w, 1)
end
return #ws
""")

# ===================================================================== logging

_current = contextvars.ContextVar("wakaq_current_task", default=None)


def current_task():
    """Inside a running task: {"id", "name", "queue", "attempt"} (1 = first run), else None."""
    return None if (m := _current.get()) is None else {
        "id": m.get("id"), "name": m["name"], "queue": m["queue"], "attempt": m["retry"] + 1}


def _setup_logging(path, level):
    """Logs, stdout and stderr (inherited by children) to `path` or stderr, line-buffered."""
    def task_filter(record):        # %(task)s: " task=NAME" inside a task, else ""
        record.task = f" task={msg['name']}" if (msg := _current.get()) else ""
        return True
    if path:
        with open(path, "a") as f:
            os.dup2(f.fileno(), 2)
    os.dup2(2, 1)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    logging.basicConfig(format="[%(asctime)s] %(levelname)s %(name)s pid=%(process)d%(task)s: "
                        "%(message)s", level=level, force=True)   # replaces root's handlers
    logging.root.handlers[0].addFilter(task_filter)
    log.disabled = False     # an app's dictConfig() at import (disable_existing_loggers)


class _Outage:
    """Log once per Redis outage, and back off from 0.1 s to `cap` seconds between tries."""

    def __init__(self, who, cap=5.0):
        self.who, self.delay, self.cap = who, 0.0, cap

    def failed(self, e):
        if not self.delay:
            log.warning("%s lost Redis (%s); retrying with backoff", self.who, e)
        self.delay = min(max(self.delay * 2, 0.1), self.cap)
        return self.delay

    def ok(self, r=None):          # with r after an outage: only once a ping of r succeeds
        if self.delay and (r is None or r.ping()):
            log.info("%s reconnected to Redis", self.who)
        self.delay = 0.0


# Blocked around fork() so that a stop signal reaches the child's handlers, not ours.
_PARENT_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_REFUSED = (redis.exceptions.ReadOnlyError, redis.exceptions.MovedError)  # not applied: resend


def _pack(args):            # RESP bulk strings, as redis-py's packer writes them, in 1/3 the time
    args = [a if type(a) is bytes else str(a).encode() for a in args]
    return b"".join([b"$%d\r\n%s\r\n" % (len(a), a) for a in args])


class _Conn:
    """A bare connection (no pool; replies read here, 1/3 of redis-py's cost); no blind resend."""

    def __init__(self, app, retries=0):
        self.app, self.retries, self.conn, self.heads = app, retries, None, {}

    def execute_command(self, *args, meanwhile=None):      # meanwhile(): while Redis works
        n = 3 + args[2] if args[0] == "EVALSHA" else 0      # a script's name and keys: packed once
        head = self.heads.get(args[:n]) or self.heads.setdefault(args[:n], _pack(args[:n]))
        data = b"*%d\r\n%s%s" % (len(args), head, _pack(args[n:]))
        for attempt in range(self.retries + 1):
            sent = False
            try:
                if self.conn is None:
                    conn = self.app._client(0, not self.retries).connection_pool.make_connection()
                    conn.connect()            # a Sentinel's connection asks for the master
                    self.conn, self.file = conn, conn._sock.makefile("rb")
                elif self.retries and self.conn.can_read(timeout=0):    # closed meanwhile
                    raise redis.ConnectionError("the connection was closed")
                self.conn.check_health()      # a PING first, as health_check_interval asks
                self.conn._sock.sendall(data)
                sent = True
                meanwhile and meanwhile()
                return self._read()
            except BaseException as e:
                if isinstance(e, redis.ResponseError) and not isinstance(e, _REFUSED):
                    raise                       # an error reply, read whole: still in step
                self.reset()                    # cut off midway (KeyboardInterrupt too), or lost
                if attempt == self.retries or sent and not isinstance(e, _REFUSED) or not \
                        isinstance(e, (redis.RedisError, OSError)):    # a lost reply: not resent
                    raise e if not isinstance(e, OSError) else (redis.TimeoutError if isinstance(
                        e, socket.timeout) else redis.ConnectionError)(
                        f"Redis at {_mask(self.app.url)}: {e!r}")

    def _read(self):           # one reply: bulk, array, error, nil, integer, RESP3 boolean
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"$" and rest != b"-1":
            if len(data := self.file.read(int(rest) + 2)) == int(rest) + 2:
                return data[:-2]
        elif kind in (b"*", b">") and rest != b"-1":     # ">": a RESP3 push (a notice): skipped
            items = [self._read() for _ in range(int(rest))]
            return items if kind == b"*" else self._read()
        elif line[-2:] == b"\r\n" and kind in b"$*_:#":     # as RESP2 gives them: nil, integer
            return int(rest) if kind == b":" else 1 if rest == b"t" else None
        raise self.conn._parser.parse_error(rest.decode(errors="replace")) if kind == b"-" else \
            redis.ConnectionError(f"Redis closed the connection, or sent {line[:40]!r}")

    def reset(self):                 # dropping the file closes the socket
        self.conn, self.file = self.conn and self.conn.disconnect(), None
        self.app._redis = None if self.app._cluster else self.app._redis   # the slot may move


# ===================================================================== OS helpers

def _parse_cgroup(max_text, current_text, stat_text="", cache_key="inactive_file"):
    """Percent of a cgroup's limit in use (None: no limit), less reclaimable inactive cache."""
    if max_text.strip() == "max" or int(max_text) >= 2 ** 62:   # v1's "no limit": a huge number
        return None
    cache = re.search(rf"^{cache_key} (\d+)$", stat_text, re.M)
    return 100.0 * max(0, int(current_text) - int(cache[1] if cache else 0)) / int(max_text)


def _mem_percent(root="/sys/fs/cgroup", proc="/proc/self"):
    """Percent used of the limit of our cgroup or nearest limited ancestor (v2/v1), else RAM."""
    for line in Path(f"{proc}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        v1 = "memory" in controllers.split(",")
        if controllers and not v1:
            continue
        *files, cache = ("limit_in_bytes usage_in_bytes stat total_inactive_file" if v1 else
                         "max current stat inactive_file").split()
        parts = [root + "/memory" * v1] + [p for p in path.strip().split("/") if p]
        for n in range(len(parts), 0, -1):
            try:
                base = "/".join(parts[:n])
                pct = _parse_cgroup(*(Path(f"{base}/memory.{f}").read_text() for f in files), cache)
            except (OSError, ValueError):
                continue       # not mounted here, or no such file at this level
            if pct is not None:
                return pct
    kb = {k: int(v) for k, v in re.findall(r"(\w+):\s*(\d+)", Path("/proc/meminfo").read_text())}
    return 100.0 * (kb["MemTotal"] - kb["MemAvailable"]) / kb["MemTotal"]      # of RAM


def _rss(pid):                     # resident set size in bytes (0 if the process is gone)
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def _kill(pid, sig, group=False):      # and, with group, its process group; gone: fine
    for p in (-pid, pid) if group else (pid,):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


# ===================================================================== worker parent

class _Worker:
    """The parent (no task code). Child slot S runs up to K tasks (K = 1, or async_concurrency),
    each in in-flight field "S.k", with 16 bytes of shared memory: its hard deadline (monotonic)
    and the claim it finished last (a dead child's finished task is acked, not run again). Others
    are presumed dead by Redis's clock, and only once we were connected heartbeat_timeout."""

    def __init__(self, app):
        self.app, self.wid = app, f"{socket.gethostname()}.{os.getpid()}.{os.urandom(3).hex()}"
        self.inflight_key = app._k("inflight", self.wid)
        self.served = [q.name for q in app.queues if q.name not in app.exclude_queues]
        self.served_key = app._k("serve", hashlib.sha1(" ".join(self.served).encode()).hexdigest())
        self.bcast_key, self.wake_key = app._k("bcast", self.wid), app._k("wake", self.wid)
        self.k = app.async_concurrency if any(t.is_async for t in app.tasks.values()) else 1
        self.slots, self.fork_at = [None] * (n := app.concurrency), [0.0] * n  # when it may fork
        self.unreleased = {}              # slot -> {k: (reason, finished token)} of a dead child
        self.shm, self.fmt = mmap.mmap(-1, 16 * n * self.k), struct.Struct(f"{2 * self.k}d")
        self.signals, self.outage = [], _Outage("worker", min(5.0, app.heartbeat_timeout / 4))
        self.next_beat = self.connected_since = self.retry_at = self.next_mem = 0.0
        self.mem_high, self.full, self.seen, self.r = False, False, 0, None   # seen: stop signals

    def run(self):
        app = self.app
        self.pipe = wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in _PARENT_SIGNALS:                # SIGCHLD only wakes select()
            signal.signal(sig, lambda s, f: s == signal.SIGCHLD or self.signals.append(s))
        log.info("worker %s started: concurrency=%d%s queues=%s redis=%s", self.wid,
                 app.concurrency, f" async_concurrency={self.k}" if self.k > 1 else "",
                 ",".join(self.served), _mask(app.url))
        while True:
            self._reap()
            if self.signals and self._stop():
                break
            now = time.monotonic()
            for slot, child in enumerate(self.slots):      # hard timeouts
                deadlines = self.fmt.unpack_from(self.shm, 16 * self.k * slot)[::2]
                late = [k for k, d in enumerate(deadlines) if 0 < d < now]
                if child and late and not child.killed_for:
                    child.killed_for, child.over = "hard timeout", late[0]
                    _kill(child.pid, signal.SIGKILL, group=True)    # with its subprocesses
            self._redis_duties(now)
            if not self.signals:
                self._check_memory(now)
                for slot, child in enumerate(self.slots):
                    if child is None and slot not in self.unreleased and not self.mem_high \
                            and now >= self.fork_at[slot]:
                        self._spawn(slot)
            if select.select([wake_r], [], [], TICK)[0]:
                os.read(wake_r, 4096)         # signal numbers: we only needed the wake-up
        try:    # deregister, unless a task is still in flight: a live worker adopts it then
            r = self.r or app._client(retries=0)
            if not self.unreleased and not r.hlen(self.inflight_key):
                r.zrem(app.workers_key, self.wid)    # first: no new broadcasts for us
                for raw in r.lrange(self.bcast_key, 0, -1):    # broadcasts waiting for us
                    r.rpush(app.dead_key, _dead_entry(raw, None, "worker stopped"))
                r.delete(self.bcast_key, self.wake_key)
        except redis.RedisError as e:
            log.error("could not deregister worker %s (%s)", self.wid, e)
        log.info("worker %s stopped", self.wid)
        return 0

    def _stop(self):
        """On a stop signal; True once the worker may leave. 1: SIGTERM the children (they finish
        their tasks); 2: SIGKILL them (tasks go to the front); 3: leave what Redis (down) kept."""
        n = len(self.signals)
        if n > self.seen:
            self.seen = n
            log.log(logging.INFO if n == 1 else logging.WARNING, "worker %s stopping on %s: %s",
                    self.wid, signal.Signals(self.signals[-1]).name, "letting running tasks "
                    "finish" if n == 1 else "now" if n == 2 else "leaving tasks Redis kept")
            for child in filter(None, self.slots):
                if n > 1:
                    child.killed_for = child.killed_for or "interrupted by stop"
                    _kill(child.pid, signal.SIGKILL, group=True)
                elif not child.term_sent:
                    child.term_sent = True
                    _kill(child.pid, signal.SIGTERM)
        return not any(self.slots) and (not self.unreleased or n > 2)

    def _spawn(self, slot):
        self.shm[16 * self.k * slot:16 * self.k * (slot + 1)] = bytes(16 * self.k)
        signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)  # until the child has its own
        try:
            pid = os.fork()
        except OSError as e:
            log.error("cannot fork a child (%s); trying again in a second", e)
            self.fork_at[slot], pid = time.monotonic() + 1, None
        if pid == 0:                                    # child: this branch never returns
            code = 1
            gc.freeze()      # the collector skips what the child inherits: shorter pauses
            try:
                signal.set_wakeup_fd(-1)
                os.close(self.pipe[0])
                os.close(self.pipe[1])
                code = _ChildProcess(self, slot).run()
            except _Stop:
                code = 0
            except BaseException:
                log.exception("worker child crashed")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)
        if pid:
            self.slots[slot] = types.SimpleNamespace(   # over: the field over its hard timeout
                pid=pid, born=time.monotonic(), killed_for=None, over=None, term_sent=None)

    def _reap(self):
        """Dead children's fields -> unreleased {k: (reason, token finished)}; a crash fails."""
        for slot, child in enumerate(self.slots):
            pid, status = os.waitpid(child.pid, os.WNOHANG) if child else (0, 0)
            if pid:
                self.slots[slot], code = None, os.waitstatus_to_exitcode(status)
                why = child.killed_for or ("interrupted by stop" if code == 0 else "worker died")
                self.unreleased[slot] = {k: (
                    why if child.over in (None, k) else "interrupted by another hard timeout",
                    b"%d-%d" % (pid, n) if n else b"") for k, n in enumerate(
                        self.fmt.unpack_from(self.shm, 16 * self.k * slot)[1::2])}
                if child.killed_for or code != 0:
                    log.warning("child %d exited with %s (%s)", pid, code, why)
                self.fork_at[slot] = child.born + (1.0 if code else 0.0)   # no crash loop

    def _check_memory(self, now):
        """Once a second: over max_mem_percent, fork nothing and stop the biggest child."""
        limit = self.app.max_mem_percent
        if not limit or now < self.next_mem:
            return
        try:
            pct, self.next_mem = _mem_percent(), now + 1.0
        except (OSError, ValueError, KeyError, ZeroDivisionError) as e:
            log.warning("cannot read memory use (%s); checking again in a minute", e)
            self.next_mem = now + 60.0
            return
        if self.mem_high != (pct >= limit):
            self.mem_high = high = pct >= limit
            log.warning("memory use %.0f%% is %s max_mem_percent=%s: forking %s", pct,
                        "over" if high else "under", limit, "paused" if high else "resumed")
        live = [c for c in self.slots if c and not c.term_sent]
        if self.mem_high and live:
            c = max(live, key=lambda x: _rss(x.pid))
            log.warning("memory at %.0f%% (max_mem_percent=%s): stopping child %d", pct, limit,
                        c.pid)
            c.term_sent = True
            _kill(c.pid, signal.SIGTERM)

    def _redis_duties(self, now):
        """Release dead children's tasks; heartbeat; adopt; log Redis's eviction policy and fill."""
        if self.outage.delay and now < self.retry_at:
            return                    # backing off
        app, hb = self.app, self.app.heartbeat_timeout
        try:
            self.r = self.r or app._client(retries=0)
            self.outage.ok(self.r)
            self.connected_since = self.connected_since or now
            for slot, ends in list(self.unreleased.items()):
                for k, (reason, finished) in ends.items():
                    self._release(f"{slot}.{k}", reason, finished)
                del self.unreleased[slot]
            if now < self.next_beat:
                return
            adopted = _BEAT(self.r, [app.workers_key, self.inflight_key, self.served_key], [
                self.wid, hb, int(now - self.connected_since >= hb), "{%s}" % app.prefix,
                *self.served])
            for wid, count in zip(adopted[::2], adopted[1::2]):
                log.warning("worker %s is silent for over %ss: taking back its %d task(s)",
                            wid.decode(), hb, count)
            for field in self.r.hkeys(self.inflight_key):
                if field.startswith(b"adopted:") and not field.endswith((b":t", b":s")):
                    self._release(field.decode(), "worker died")
            try:
                mem = self.r.info("memory")
            except redis.ResponseError:
                mem = {}                  # INFO not allowed for this ACL user
            if not self.next_beat and mem.get("maxmemory_policy", "").startswith("allkeys"):
                log.warning("Redis maxmemory-policy is %s: it may evict queued tasks; use "
                            "noeviction", mem["maxmemory_policy"])
            if self.full != (0 < mem.get("maxmemory", 0) <= mem.get("used_memory", 0)):
                self.full = not self.full
                log.warning("Redis is full (used_memory %s, maxmemory %s): new tasks are refused; "
                            "workers keep draining" if self.full else "Redis has room again (%s of "
                            "%s)", mem.get("used_memory"), mem.get("maxmemory"))
            self.next_beat = now + min(hb / 4, 5.0)
        except redis.RedisError as e:
            self.connected_since, self.r = 0.0, None      # and ask the topology anew
            self.retry_at = now + self.outage.failed(e)

    def _release(self, field, reason, finished=b""):
        """End our in-flight `field`'s attempt: acked if its token is `finished`, else retried."""
        raw, token = self.r.hmget(self.inflight_key, field, field + ":t")   # None: a broadcast
        own = None if field.startswith("adopted:") else self.bcast_key
        outcome = raw and token != finished and self.app._outcome(raw, reason, own)
        if raw and _release(self.app, self.r, self.inflight_key, field, token or "",
                            outcome or _ACK) and outcome and outcome[3]:
            msg = json.loads(raw)      # a dead letter is logged by WakaQ._dead
            log.warning("task %s id=%s attempt=%s: %s; requeued (%s)", msg["name"], msg["id"],
                        msg["retry"] + 1, reason, outcome[1])


_ACK = (None, "", "", None, 0)           # an outcome that only acks
_ATTEMPT = "task %s id=%s attempt=%d %s in %.3fs"      # one INFO line per finished attempt


def _release(app, r, inflight_key, field, token, outcome):
    """Run _RELEASE for an outcome of WakaQ._outcome (None key: an ack)."""
    key, where, value, queue, delay = outcome
    in_queue = queue and key in (queue.key, queue.eta_key)     # else a broadcast list, or none
    wake = queue.wake_key if in_queue else key.replace(":bcast:", ":wake:") if queue else key
    keys = [inflight_key, key or inflight_key, wake or inflight_key, app._k("ready"), app._k("due")]
    return _RELEASE(r, keys, [field, token, value, where, app._rank(queue) if queue else 0,
                              queue.name if in_queue else "", delay])


# ===================================================================== worker child

class _ChildProcess:
    """A forked child: claim a task (in flight), run it (K async ones at once), ack it next."""
    RUN_TASK = WakaQ._run_task.__code__

    def __init__(self, worker, slot):
        self.worker, self.app, self.slot, app = worker, worker.app, slot, worker.app
        self.ppid, self.pid, self.claims = os.getppid(), os.getpid(), itertools.count(1)
        self.stopping = self.idle = self.in_task = False
        self.fields = [f"{slot}.{k}" for k in range(worker.k)]
        self.prev, self.running = dict.fromkeys(self.fields, ""), {}  # field -> finished token
        self.limits = functools.lru_cache(None)(functools.partial(_limits_for, app))
        self.r, self.outage = _Conn(app), _Outage(f"child {slot}", worker.outage.cap)
        self.wakes = [app._k("wake", q) for q in (worker.wid, *worker.served)]   # BLPOPed idle
        self.loop, self.next_promote, self.top, self.lines = asyncio.new_event_loop(), 0.0, "", []
        self.claim_keys = [worker.inflight_key, worker.served_key]

    def run(self):
        for sig, how in ((signal.SIGINT, signal.SIG_IGN), (signal.SIGHUP, signal.SIG_IGN),
                         (signal.SIGTERM, self._on_term), (signal.SIGCHLD, signal.SIG_DFL),
                         (signal.SIGALRM, self._on_alarm)):    # the parent decides on a stop
            signal.signal(sig, how)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)  # blocked by _spawn
        os.setpgid(0, 0)           # its own process group: a hard timeout kills it all
        asyncio.set_event_loop(self.loop)
        for hook in self.app._hooks["after_worker_started"]:
            self.loop.run_until_complete(_maybe(hook()))
        limit, done = self.app.max_tasks_per_worker or float("inf"), 0
        while not self.stopping and done < limit and os.getppid() == self.ppid:
            free = next((f for f in self.fields if f not in self.running), None) \
                if self.running else self.fields[0]
            if free is None:
                self._drive(None)
                continue
            raw, token = self._call(lambda: self._claim(free))
            self.prev[free] = ""                         # the claim acked it
            if type(raw) is int:           # nothing (ms to a due task): run async tasks, or wait
                self._drive(PROMOTE) if self.running else self._call(lambda: self._wait(raw))
                continue
            if self.stopping:            # SIGTERM came while claiming: give it back untouched
                self._end(free, token, self.app._outcome(
                    raw, "interrupted by stop", self.worker.bcast_key))
                break
            self._start(free, raw, token)
            done += 1
        while self.running:
            self._drive(None)
        self._call(self._ack_finished)
        return 0

    def _log_attempts(self):     # as logging.info in the task, less the caller lookup (1/4)
        while self.lines:
            msg, args = self.lines.pop(0)
            ctx = _current.set(msg)
            log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, _ATTEMPT, args, None))
            _current.reset(ctx)

    def _ack_finished(self):
        self._log_attempts()
        for field, token in self.prev.items():
            if token:
                _release(self.app, self.r, self.worker.inflight_key, field, token, _ACK)
                self.prev[field] = ""

    def _on_term(self, signum, frame):
        self.stopping = True
        if self.idle:
            raise _Stop()

    def _on_alarm(self, signum, frame):
        if not self.in_task:
            return                       # the task has ended: drop it
        f, guard, user = frame, None, None   # guard: the outermost guarded frame below user code
        while f is not None and f.f_code is not self.RUN_TASK:
            if user is None and (f.f_globals is globals() or f.f_globals.get(
                    "__name__", "").partition(".")[0] in ("logging", "asyncio")):
                guard = f
            else:
                user = user or f
            f = f.f_back
        if f is None or f is frame:      # not in the task yet, or between its hooks
            signal.setitimer(signal.ITIMER_REAL, 0.001)
        elif guard is None:
            raise SoftTimeout(f"soft timeout after {self.soft:g}s")
        else:                            # in logging, asyncio or wakaq: raise it as that returns
            guard.f_trace = self._on_return
            sys.settrace(lambda *a: None)   # and trace no new frame meanwhile

    def _on_return(self, frame, event, arg):
        if event != "return":
            return self._on_return
        sys.settrace(None)
        if self.in_task:
            raise SoftTimeout(f"soft timeout after {self.soft:g}s")

    def _ended(self):            # before the after_task_finished hooks: disarm the soft timeout
        if self.in_task:
            self.in_task = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.settrace(None)

    def _call(self, fn):
        """Run a Redis step until it succeeds; outages are logged once, with backoff."""
        while True:
            try:
                result = fn()
                if self.outage.delay:
                    self.outage.ok()
                return result
            except redis.RedisError as e:
                delay = self.outage.failed(e)
                self.r.reset()
            self._log_attempts()
            if self.stopping or os.getppid() != self.ppid:
                raise _Stop()
            time.sleep(delay)

    def _claim(self, field):
        """The hot path: "p" (promote due tasks) every PROMOTE s; attempt lines logged meanwhile."""
        now, promote = time.monotonic(), ""
        if now >= self.next_promote:
            self.next_promote, promote = now + PROMOTE, "p"
        token = f"{self.pid}-{next(self.claims)}"
        return _CLAIM(self.r, self.claim_keys, (field, self.prev[field], token, promote, self.top),
                      meanwhile=self.lines and self._log_attempts), token

    def _wait(self, due):
        """Ack what is finished; BLPOP the wake-up lists until a push, due time or wait_timeout."""
        self._ack_finished()
        timeout = min(self.app.wait_timeout, max(0.01, due / 1e3 if due >= 0 else float("inf")))
        self.idle = True
        try:
            if not self.stopping:
                self.r.execute_command("BLPOP", *self.wakes, f"{timeout:.3f}")
        finally:
            self.idle, self.next_promote = False, 0.0

    def _drive(self, timeout):
        """Run the event loop until an async task ends (or `timeout` seconds pass)."""
        self._log_attempts()
        self.loop.run_until_complete(asyncio.wait(
            list(self.running.values()), timeout=timeout, return_when=asyncio.FIRST_COMPLETED))

    def _end(self, field, token, outcome):
        self._call(lambda: _release(self.app, self.r, self.worker.inflight_key, field, token,
                                    outcome))

    def _start(self, field, raw, token):
        """Run one claimed payload, or start it on the event loop if it is async and K > 1."""
        app = self.app
        try:
            msg = _loads_msg(raw)
            task, queue = app.tasks.get(msg["name"]), app._queues.get(msg["queue"])
            self.top = msg["queue"] if msg["queue"] == self.worker.served[0] else ""
            what = None if task and queue else "unknown queue" if task else "unknown task"
        except _BAD_PAYLOAD as e:
            msg, what = None, f"bad payload: {e}"
        if what:
            log.error("%s: %s", what, raw[:200])
            return self._end(field, token, app._dead(raw, msg, what))
        limits = self.limits(task, queue)
        start, at = time.monotonic(), 16 * (self.worker.k * self.slot + self.fields.index(field))
        struct.pack_into("d", self.worker.shm, at, start + limits.hard if limits.hard else 0.0)
        soft = limits.soft and start + limits.soft
        wrap = app._hooks["wrap_tasks_with"][:1]
        if self.worker.k > 1 and task.is_async and all(map(inspect.iscoroutinefunction, wrap)):
            self.running[field] = self.loop.create_task(
                self._run_async(field, raw, token, msg, task, soft, start, at))
            return
        ctx, error = _current.set(msg), None
        try:
            if limits.soft and not task.is_async:
                self.soft, self.in_task = limits.soft, True
                signal.setitimer(signal.ITIMER_REAL, limits.soft)
            app._run_task(task, msg["args"], msg["kwargs"], soft, self.loop.run_until_complete,
                          self._ended)
        except Exception as e:
            error = e
        self._finish(field, raw, token, msg, start, at, error)
        _current.reset(ctx)

    async def _run_async(self, field, raw, token, msg, task, soft, start, at):
        _current.set(msg)          # this asyncio task's own context
        error, hooks, wrap = None, self.app._hooks, self.app._hooks["wrap_tasks_with"]
        try:                       # as WakaQ._run_task, awaited on the running event loop
            for hook in hooks["before_task_started"]:
                await _maybe(hook())
            await _maybe(wrap[0](task.fn, msg["args"], msg["kwargs"]) if wrap else task.fn(
                *msg["args"], **msg["kwargs"]), soft)
        except Exception as e:
            error = e
        finally:
            for hook in hooks["after_task_finished"]:
                await _maybe(hook())
        del self.running[field]
        self._finish(field, raw, token, msg, start, at, error)

    def _finish(self, field, raw, token, msg, start, at, error):
        """Log the attempt; retry a soft timeout, else ack it next claim (or the parent acks)."""
        soft = isinstance(error, SoftTimeout)
        struct.pack_into("dd", self.worker.shm, at, 0.0, 0 if soft else float(token.split("-")[1]))
        if error and not soft:
            log.error("task %s raised (id=%s)", msg["name"], msg["id"], exc_info=error)
        if log.isEnabledFor(logging.INFO):
            self.lines.append((msg, (msg["name"], msg["id"], msg["retry"] + 1, "soft timeout" if
                                soft else error and "raised" or "done", time.monotonic() - start)))
        if soft:
            self._log_attempts()
            self._end(field, token, self.app._outcome(raw, "soft timeout", self.worker.bcast_key))
        else:
            self.prev[field] = token


# ===================================================================== scheduler

def _due(cron, tz, last, now):
    """(the latest tick in (last, now] at most CRON_CATCH_UP (+1) s old, or None; the next tick),
    unix seconds, in zone tz. Cron's rule (cronie): a fixed hour fires a repeated wall time once,
    a missing one just after the gap; `*` or a step fires each real hour, a missing one never."""
    star, fire = cron.schedule.split()[1].startswith("*"), None
    it = croniter(cron.schedule, datetime.fromtimestamp(max(last, now - CRON_CATCH_UP - 1), tz))
    while (t := it.get_next(datetime)).timestamp() <= now:
        wall, ts = t.replace(tzinfo=None), t.timestamp()
        if not star and t.replace(fold=0).timestamp() != ts:
            continue
        if star and datetime.fromtimestamp(ts - 1, tz).utcoffset() != t.utcoffset() and \
                croniter(cron.schedule, wall - timedelta(seconds=1)).get_next(datetime) != wall:
            continue
        fire = int(ts)
    return fire, t.timestamp()


def _cmd_scheduler(app, args):
    """Each tick once, across schedulers and restarts ({p}:cron:{digest}); now: Redis TIME."""
    _setup_logging(app.scheduler_log_file, app.scheduler_log_level)
    crons, stopped = [], []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stopped.append(s))
    for cron in app.schedules:
        if cron.task_name not in app.tasks:
            raise ValueError(f"schedule {cron.schedule!r} names unknown task {cron.task_name!r}")
        task = app.tasks[cron.task_name]
        q = app._queue(cron.queue) if cron.queue else task.queue or app.default_queue
        ident = json.dumps([cron.schedule, cron.task_name, q.name, cron.args, cron.kwargs],
                           sort_keys=True, default=str)
        crons.append((cron, task, q, [q.key, q.wake_key, app._k("ready"), q.eta_key, app._k(
            "due"), app._k("cron", hashlib.sha1(ident.encode()).hexdigest())]))   # _ENQUEUE's
    if not crons:
        return log.warning("the app has no schedules; the scheduler exits")
    r, outage = app._client(retries=0), _Outage("scheduler")
    log.info("scheduler started with %d schedule(s)", len(crons))
    while not stopped:
        try:
            outage.ok(r)
            (sec, usec), pause = r.time(), 1.0
            now = sec + usec / 1e6              # Redis's clock
            for (cron, task, q, keys), last in zip(crons, r.mget([c[3][5] for c in crons])):
                if last is None:            # a new schedule starts from now
                    r.set(keys[5], int(now), nx=True)
                    continue
                fire, nxt = _due(cron, app.tz, float(last), now)
                pause = min(pause, nxt - now)
                if fire and _ENQUEUE(r, keys, [app._rank(q), q.name, "cron", fire, app._payload(
                        task, cron.args, cron.kwargs, q)[1]]):
                    log.info("enqueued %s for %s", cron.task_name,
                             datetime.fromtimestamp(fire, app.tz).isoformat())
        except redis.RedisError as e:
            pause = outage.failed(e)
        end = time.monotonic() + max(pause, 0.01)
        while not stopped and time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
    log.info("scheduler stopped")


# ===================================================================== command line

def _cmd_worker(app, args):
    app.concurrency = args.concurrency or app.concurrency    # the original's options
    if args.exclude_queues:
        app.exclude_queues = [app._queue(q.strip()).name for q in args.exclude_queues.split(",")]
    _setup_logging(app.worker_log_file, app.worker_log_level)
    if app.default_queue.name in app.exclude_queues:
        log.warning("the default queue %r is excluded: tasks without a queue= wait for "
                    "another app's workers", app.default_queue.name)
    return _Worker(app).run()


def _msg(raw):       # a JSON object (payload, dead entry); missing keys are None
    with contextlib.suppress(ValueError, TypeError):
        return collections.defaultdict(lambda: None, json.loads(raw))
    return collections.defaultdict(lambda: None)


def _cmd_info(app, args):
    pipe = app.redis.pipeline(transaction=False)
    for q in app.queues:
        pipe.llen(q.key).zcard(q.eta_key)
    *counts, dead, workers, (sec, usec) = pipe.llen(app.dead_key).zrange(
        app.workers_key, 0, -1, withscores=True).time().execute()
    now = sec + usec / 1e6
    for wid, _ in workers:                        # live, and dead not yet adopted
        pipe.hgetall(app._k("inflight", wid.decode()))
    running = [{**{k: _msg(raw)[k] for k in ("id", "name", "queue")}, "worker": wid.decode(),
                "seconds": (s := fields.get(f + b":s")) and round(now - float(s), 1)}
               for (wid, _), fields in zip(workers, pipe.execute())
               for f, raw in fields.items() if not f.endswith((b":s", b":t"))]  # f: "S.K"
    info = {"queues": {q.name: {"priority": app._priority[q.name], "pending": counts[2 * i],
                                "delayed": counts[2 * i + 1]} for i, q in enumerate(app.queues)},
            "inflight": len(running), "dead": dead, "running": running,
            "workers": sum(beat >= now - app.heartbeat_timeout for _, beat in workers)}
    row = "{:<20} {:>8} {:>10} {:>10}".format
    print(json.dumps(info) if args.json else "\n".join([
        row("queue", "priority", "pending", "delayed"),
        *(row(name, *q.values()) for name, q in info["queues"].items()),
        "in-flight: {inflight}  dead: {dead}  workers: {workers}".format_map(info),
        *("running {id} {name} queue={queue} worker={worker} {seconds}s".format_map(t)
          for t in running)]))


def _cmd_purge(app, args):
    q = app._queue(args.queue)
    pipe = app.redis.pipeline().llen(q.key).zcard(q.eta_key).unlink(q.key, q.eta_key, q.wake_key)
    pending, delayed, *_ = pipe.zrem(app._k("ready"), q.name).execute()  # UNLINK: freed later
    print(pending + delayed)                                 # the contract: one number
    print(f"wakaq: purged {pending} pending and {delayed} delayed task(s) from queue {q.name!r}",
          file=sys.stderr)


def _cmd_dead(app, args):
    key, ids, listing = app.dead_key, set(args.requeue or ()), args.requeue is None
    if args.purge:
        return print(f"deleted {app.redis.pipeline().llen(key).unlink(key).execute()[0]} "
                     "dead task(s)")
    if listing and not app.redis.llen(key):
        return print("no dead tasks")
    def visit(raw, _):                       # list it, or pick it to requeue
        msg = _msg((e := _msg(raw))["payload"])
        call = json.dumps([msg["args"], msg["kwargs"]])[1:-1]
        e.update(at=time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(e["at"] or 0)),
                 args=call if len(call) < 80 else call[:76] + " ...")
        if listing:
            print("{id} {name} queue={queue} attempts={attempts} reason={reason!r} at={at} "
                  "args={args}".format_map(e))
        elif not args.requeue or e["id"] in ids:
            ids.discard(e["id"])             # a bad payload goes back as it was
            return (app._queues.get(e["queue"]) or app.default_queue, "",
                    json.dumps({**msg, "retry": 0}) if msg else e["payload"] or "")
    moved = _move(app, key, "list", visit)
    if not listing:
        print(f"requeued {moved} dead task(s)" + (f"; not found: {' '.join(ids)}" if ids else ""))
        return 1 if ids else 0


def _cmd_health(app, args):
    (sec, usec), host, limit = app.redis.time(), socket.gethostname(), app.heartbeat_timeout
    age = min((sec + usec / 1e6 - b for w, b in app.redis.zrange(app.workers_key, 0, -1,
               withscores=True) if w.decode().rsplit(".", 2)[0] == host), default=float("inf"))
    print(("ok: " if age <= limit else "unhealthy: ") + (f"no worker of this app on {host}" if age
          == float("inf") else f"a worker on {host} heartbeated {age:.1f}s ago (limit {limit:g}s)"))
    return 0 if age <= limit else 1


# KEYS: the source (a list if ARGV[1] is 'list', else a zset), queue, wake, ready, eta, due (as
# _ENQUEUE), dead. Per (raw, due, payload) in ARGV[4..]: if raw is still in the source, remove it
# and push payload: due '' to the queue (rank ARGV[2], name ARGV[3]), 'dead' to dead, else delayed.
_MOVE = _Script("""
local n, ready = 0, 0
for i = 4, #ARGV, 3 do
  if (ARGV[1] == 'list' and redis.call('LREM', KEYS[1], 1, ARGV[i])
      or redis.call('ZREM', KEYS[1], ARGV[i])) == 1 then
    n = n + 1
    if ARGV[i + 1] == '' then redis.call('RPUSH', KEYS[2], ARGV[i + 2]); ready = ready + 1
    elseif ARGV[i + 1] == 'dead' then redis.call('RPUSH', KEYS[7], ARGV[i + 2])
    else later(KEYS[5], KEYS[6], ARGV[2] .. ':' .. ARGV[3], tonumber(ARGV[i + 1]),
               ARGV[i + 2], KEYS[3]) end
  end
end
if ready > 0 then redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3]); wake(KEYS[3], ready) end
return n
""")


def _move(app, key, kind, pick):
    """_MOVE, 1,000 a page, what pick(raw, score or "") maps to (queue, due, payload); -> count."""
    r, start, moved = app.redis, 0, 0
    for _ in range(0, r.llen(key) if kind == "list" else r.zcard(key), 1000):
        page, batches = (r.zrange(key, start, start + 999, withscores=True) if kind == "zset"
                         else [(raw, "") for raw in r.lrange(key, start, start + 999)]), {}
        for raw, score in page:
            q, *item = pick(raw, score) or [None]
            if q:
                batches.setdefault(q, []).extend([raw, *item])
        n = sum(_MOVE(r, [key, q.key, q.wake_key, app._k("ready"), q.eta_key, app._k("due"),
                          app._k("dead")], [kind, app._rank(q), q.name, *items])
                for q, items in batches.items())
        moved, start = moved + n, start + len(page) - n
    return moved


def _cmd_migrate(app, args):
    """The original's tasks (lists PREFIX:Q, zsets PREFIX:eta:Q) to ours; bad ones dead."""
    classes = {"Decimal": lambda d: decimal.Decimal(d["value"]), "date": lambda d: date(
        d["year"], d["month"], d["day"]), "bytes": lambda d: base64.b64decode(d["value"]),
        "timedelta": lambda d: timedelta(**d["kwargs"]),
        "datetime": lambda d: datetime(**{k: v for k, v in d.items() if k != "__class__"})}
    def convert(queue, raw, due):            # due: "" or unix time
        try:
            msg = json.loads(raw, object_hook=lambda d: classes.get(d.get("__class__"), dict)(d))
            name, a, kw, retry = msg["name"], msg["args"], msg["kwargs"], msg.get("retry") or 0
            if (type(name), type(a), type(kw), type(retry)) != (str, list, dict, int):
                raise ValueError("need name, args, kwargs")
            task = app.tasks.get(name) or type("", (), dict(name=name, _json_name=json.dumps(name)))
            payload = app._payload(task, a, kw, queue)[1]
            return queue, due and repr(due), payload.replace('"retry":0,', f'"retry":{retry},', 1)
        except _BAD_PAYLOAD as e:
            return queue, "dead", _dead_entry(raw, {"id": _new_id(), "queue": queue.name},
                                              f"bad payload from the original WakaQ: {e}")
    moved = sum(_move(app, f"{q.prefix}:{eta}{q.name}", "zset" if eta else "list",
                      functools.partial(convert, q)) for q in app.queues for eta in ("", "eta:"))
    print(f"moved {moved} task(s) from the original WakaQ")


_HIDE = argparse.SUPPRESS
_COMMANDS = {  # name: (function, help, (argument, add_argument's options) ...)
    "worker": (_cmd_worker, "run a worker: a parent that forks `concurrency` children",
               ("--concurrency", dict(type=int, help="override the app's concurrency")),
               ("--exclude-queues", dict(metavar="A,B"))),
    "scheduler": (_cmd_scheduler, "enqueue the app's CronTasks on time"),
    "info": (_cmd_info, "show queues, running, in-flight and dead tasks, live workers",
             ("--json", dict(action="store_true", help="print one JSON object"))),
    "purge": (_cmd_purge, "delete a queue's pending and delayed tasks", ("queue", dict(
        metavar="QUEUE", nargs="?")), ("--queue", dict(dest="queue_option", help=_HIDE))),
    "dead": (_cmd_dead, "list, requeue or delete dead-lettered tasks", ("--requeue", dict(
        nargs="*", metavar="ID", help="all, or these; retries reset")),
             ("--purge", dict(action="store_true", help="delete them"))),
    "health": (_cmd_health, "exit 0 if a worker on this host heartbeats, else 1"),
    "migrate": (_cmd_migrate, "move the original WakaQ's tasks into our queues")}
_CONFIG_ERRORS = (redis.AuthenticationError, redis.exceptions.AuthorizationError,
                  redis.ResponseError)    # a bad password, an ACL, a bad DB index: not an outage


def main(argv=None):
    parser = argparse.ArgumentParser(prog="wakaq", description="wakaq: a Redis task queue.")
    parser.add_argument("--version", action="version", version=f"wakaq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text, *options) in _COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("app", metavar="APP", nargs="?", help="module:attribute")
        p.add_argument("--app", dest="app_option", help=_HIDE)            # the original's
        p.add_argument("--foreground", action="store_true", help=_HIDE)   # the original's
        group = p.add_mutually_exclusive_group() if name == "dead" else p  # --requeue | --purge
        for arg, kw in options:
            group.add_argument(arg, **kw)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        return parser.print_help(sys.stderr) or 2
    names = ["APP", "QUEUE"][:1 + (args.command == "purge")]
    given = [v for v in (args.app_option, args.app, vars(args).get("queue"),
                         vars(args).get("queue_option")) if v]     # purge --app=APP QUEUE
    if extra or len(given) != len(names):                          # exits 2
        sub.choices[args.command].error(
            f"unrecognized arguments: {' '.join(extra)}" if extra else
            f"give {' and '.join(names)} once each (APP as module:attribute or --app=APP)")
    args.app, args.queue = [*given, None][:2]
    sys.path.insert(0, os.getcwd())       # a script's sys.path[0] is its own folder
    try:
        app = _import_app(args.app)
    except Exception as e:                # any import-time error: one line, no traceback
        where = [] if isinstance(e, SyntaxError) else [      # str(a SyntaxError) has its line
            f" ({f.filename}, line {f.lineno})" for f in traceback.extract_tb(e.__traceback__)
            if f.filename and not f.filename.startswith("<") and f.filename != __file__]
        line = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        print(f"wakaq: cannot load app {args.app!r}: {line}{''.join(where[-1:])}", file=sys.stderr)
        return 2
    try:
        try:
            app.redis.ping()     # a configuration error stops every command at once
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if isinstance(e, _CONFIG_ERRORS) or args.command not in ("worker", "scheduler"):
                raise            # an outage is for the worker and the scheduler to ride out
        return _COMMANDS[args.command][0](app, args) or 0
    except (ValueError, redis.RedisError) as e:     # ValueError: e.g. an unknown queue name
        redis_at = f"Redis at {_mask(app.url)}: " if isinstance(e, redis.RedisError) else ""
        print(f"wakaq: {redis_at}{e}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, *_CONFIG_ERRORS)) else 1


_worker_script, _scheduler_script, _info_script, _purge_script = (   # the original's commands
    lambda c=c: main([*c, *sys.argv[1:]]) for c in (["worker"], ["scheduler"], ["info", "--json"],
                                                      ["purge"]))

if __name__ == "__main__":       # `import wakaq` in the app finds this module, not a 2nd copy
    sys.modules.setdefault(__spec__.name if __spec__ else "wakaq", sys.modules[__name__])
    sys.exit(main())
