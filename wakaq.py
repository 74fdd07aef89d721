"""wakaq.py - a Redis-backed background task queue in one file.

    python wakaq.py worker myapp:wakaq       # a parent that forks `concurrency` children
    python wakaq.py scheduler myapp:wakaq    # enqueues the app's CronTasks on time
    python wakaq.py info myapp:wakaq         # queues, in-flight, dead letters, workers

Quick start:

    wakaq = WakaQ(queues=["default"], url="redis://localhost:6379/0")
    @wakaq.task
    def send_email(to): ...
    send_email.delay("bob@example.com", eta=60)        # returns the task id; eta: in a minute
    send_email.delay_many([("a@x.io",), ("b@x.io",)])  # bulk: one round trip per 1,000

Delivery is at least once: a task leaves Redis only after its attempt ends. A failed
attempt (soft timeout, hard timeout, the child or the whole worker dying) is retried
at the end of its queue while it has retries left, then dead-lettered with the reason.
Any other exception is logged with its traceback and the task is done.

Redis keys ({p} = "wakaq"):
    {p}:q:{queue}       LIST  ready payloads. Children LPOP from the left. Pushed to the
                              right (end): new (.delay), retried, due delayed, cron ticks,
                              requeued dead letters. Pushed to the left (front): tasks that
                              a stop interrupted (they keep their retry count).
    {p}:eta:{queue}     ZSET  delayed payloads, score = due time (unix seconds, float).
                              Worker parents move due ones to {p}:q:{queue} in batches.
    {p}:wake:{queue}    LIST  wake-up tokens (at most 1,000): every push to {p}:q:{queue}
                              adds one; idle children BLPOP them; a claim that finds all
                              its queues empty deletes them.
    {p}:inflight:{wid}  HASH  child slot -> the payload it is running (set in the same
                              script that pops it). Worker {wid}'s parent releases a dead
                              child's entry; a live worker adopts a dead worker's hash.
    {p}:workers         ZSET  worker id -> last heartbeat (unix seconds).
    {p}:bcast:{wid}     LIST  broadcast payloads for one worker; claimed before queues.
    {p}:wake:{wid}      LIST  wake-up tokens for that worker's broadcasts.
    {p}:dead            LIST  dead letters: JSON {id, name, queue, attempts, reason, at,
                              payload}, payload = the original payload as a string.
    {p}:cron:{digest}:{tick}  STRING  SET NX by the scheduler that enqueues that tick.

Payload: JSON {"id", "name", "queue", "retry", "args", "kwargs"} (+ "bcast": 1);
retry = failed attempts so far. Values beyond JSON travel as {"__wakaq__": TYPE, "v": ...}.
"""
import argparse
import ast
import asyncio
import base64
import collections
import contextvars
import decimal
import gc
import hashlib
import itertools
import json
import logging
import mmap
import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import redis
from croniter import croniter

__version__ = "1.0.0"
__all__ = ["WakaQ", "Queue", "CronTask", "Task", "SoftTimeout", "current_task", "WakaQError"]

log = logging.getLogger("wakaq")

WAKE_TOKENS = 1000        # wake-up tokens kept per queue at most
DUE_BATCH = 1000          # delayed payloads moved per script call (bounded command time)
BULK_CHUNK = 1000         # payloads per command in delay_many()
TICK = 0.1                # worker parent loop period, seconds
IDLE_WAIT = 1             # a child's BLPOP timeout, seconds (it re-checks its flags after)
CRON_CATCH_UP = 1800      # a missed cron tick older than this is skipped; its lock lasts 2x


# ===================================================================== errors and helpers

class WakaQError(Exception):
    """Base class for the errors wakaq raises at runtime."""


class SoftTimeout(WakaQError):
    """Raised inside a running task at its soft timeout (SIGALRM). An Exception, as in the
    original WakaQ and Celery: a broad `except Exception` can swallow it (hard_timeout remains)."""


class _Stop(BaseException):
    """Raised by a child's SIGTERM handler while it waits idle, to leave the wait."""


def _seconds(value, name):
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be seconds or a timedelta, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return float(value)


def _count(value, name, minimum=0):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return value


_Limits = collections.namedtuple("_Limits", "soft hard retries")


def _limits_for(app, task, queue):
    """Per-setting precedence: task decorator, then queue, then app."""
    layers = [x for x in (task, queue, app) if x is not None]

    def first(attr):
        return next((getattr(x, attr) for x in layers if getattr(x, attr) is not None), None)
    return _Limits(first("soft_timeout"), first("hard_timeout"), first("max_retries") or 0)


def _check_timeouts(limits, where):
    if limits.soft is not None and limits.hard is not None and limits.hard <= limits.soft:
        raise ValueError(f"{where}: hard_timeout ({limits.hard:g}s) must be greater than "
                         f"soft_timeout ({limits.soft:g}s)")


_ALLOWED_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
                ast.FloorDiv: lambda a, b: a // b}


def _concurrency(value, cores=None):
    """An int, or arithmetic of `cores` such as "cores*2" or "cores - 1" (at least 1)."""
    cores = cores or os.cpu_count() or 1

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.Name) and node.id == "cores":
            return cores
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ALLOWED_OPS:
            return _ALLOWED_OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("only numbers, `cores` and + - * / // are allowed")

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"concurrency must be an int or an expression of cores, got {value!r}")
    try:
        n = value if isinstance(value, int) else int(ev(ast.parse(value, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"bad concurrency expression {value!r}: {e}") from None
    if n < 1:
        raise ValueError(f"concurrency must come to at least 1, got {value!r} = {n}")
    return n


def _import_app(spec):
    """Load a WakaQ from "module:attribute" or "module.attribute"."""
    import importlib
    module, sep, attr = spec.partition(":")
    if not sep:
        module, _, attr = spec.rpartition(".")
    if not module or not attr:
        raise ValueError(f"APP must look like module:attribute, got {spec!r}")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        if sep:
            raise
        obj = importlib.import_module(spec)
    if type(obj) is type(sys):                       # "examples.tasks": forgot ":wakaq"
        names = [k for k, v in vars(obj).items() if type(v).__name__ == "WakaQ"] or ["APP"]
        raise ValueError(f"{spec} is a module; name its WakaQ: {obj.__name__}:{names[0]}")
    if type(obj).__name__ == "WakaQ" and not isinstance(obj, WakaQ):
        other = sys.modules[type(obj).__module__]
        raise TypeError(f"{spec} is a WakaQ of another copy of wakaq ({other.__name__} from "
                        f"{other.__file__}), not of this one ({__name__} from {__file__}): "
                        f"run the app's copy, python -m {other.__name__}")
    if not isinstance(obj, WakaQ):
        raise TypeError(f"{spec} is a {type(obj).__name__}, not a WakaQ")
    return obj


# ===================================================================== serializer

_TAG = "__wakaq__"


def _encode(o):
    """json.dumps default=: the types we carry beyond JSON; anything else is a TypeError."""
    if isinstance(o, datetime):          # aware -> naive UTC; naive is taken as UTC
        if o.tzinfo is not None:
            o = o.astimezone(timezone.utc).replace(tzinfo=None)
        return {_TAG: "datetime", "v": o.isoformat()}
    if isinstance(o, date):
        return {_TAG: "date", "v": o.isoformat()}
    if isinstance(o, timedelta):
        return {_TAG: "timedelta", "v": [o.days, o.seconds, o.microseconds]}
    if isinstance(o, decimal.Decimal):
        return {_TAG: "decimal", "v": str(o)}
    if isinstance(o, (bytes, bytearray)):
        return {_TAG: "bytes", "v": base64.b64encode(o).decode()}
    if isinstance(o, (set, frozenset)):
        return list(o)
    raise TypeError(f"wakaq cannot serialize {type(o).__name__} value {o!r:.80}; "
                    "pass JSON types, datetime, date, timedelta, Decimal, bytes, set or tuple")


_DECODERS = {"datetime": datetime.fromisoformat, "date": date.fromisoformat,
             "timedelta": lambda v: timedelta(*v), "decimal": decimal.Decimal,
             "bytes": base64.b64decode}


def _decode(d):
    if _TAG not in d:
        return d
    if d[_TAG] not in _DECODERS:
        raise ValueError(f"unknown type tag {d[_TAG]!r}")
    return _DECODERS[d[_TAG]](d["v"])


def _make_dumps():
    """Compact JSON with our default=, its C encoder built once (JSONEncoder.encode builds it
    per call, twice the cost of a small payload). No circular check: RecursionError instead."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:                    # no C accelerator (e.g. PyPy)
        return json.JSONEncoder(separators=(",", ":"), default=_encode).encode
    enc = c_make_encoder(None, _encode, json.encoder.encode_basestring_ascii, None,
                         ":", ",", False, False, True)
    return lambda o: "".join(enc(o, 0))


_dumps = _make_dumps()
_TAG_BYTES = _TAG.encode()


def _loads(raw):
    """Decode a payload; object_hook only when a tag is present (it slows every dict)."""
    if _TAG_BYTES in raw if isinstance(raw, bytes) else _TAG in raw:
        return json.loads(raw, object_hook=_decode)
    return json.loads(raw)


# What decoding hostile bytes may raise (UnicodeDecodeError and binascii.Error are
# ValueErrors, decimal.InvalidOperation and OverflowError ArithmeticErrors).
_BAD_PAYLOAD = (ValueError, TypeError, KeyError, RecursionError, ArithmeticError)


def _loads_msg(raw, decode=True):
    """A task payload, checked for shape; raises one of _BAD_PAYLOAD. With decode=False
    tagged values stay as they are (to move a payload on without re-encoding them)."""
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
    """Per process: the id prefix and counter, and the producer connections (per thread)."""
    global _ids, _local
    _ids, _local = (os.urandom(8).hex(), itertools.count()), threading.local()


_after_fork()
os.register_at_fork(after_in_child=_after_fork)


def _new_id():
    """Unique task ids without a syscall per call: a random prefix per process + a counter."""
    return f"{_ids[0]}{next(_ids[1]):x}"


# ===================================================================== Queue and CronTask

_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")   # \Z: "$" would let "q\n" through


class Queue:
    """A named list of tasks. Lower priority number = served first."""

    __slots__ = ("name", "priority", "max_retries", "soft_timeout", "hard_timeout",
                 "key", "eta_key", "wake_key")

    def __init__(self, name, priority=None, max_retries=None, soft_timeout=None,
                 hard_timeout=None):
        if not isinstance(name, str) or not _QUEUE_NAME.match(name):
            raise ValueError(f"queue name must be letters, digits, _ . or -, got {name!r}")
        self.name = name
        self.priority = _count(priority, f"priority of queue {name!r}", minimum=-2**31)
        self.max_retries = _count(max_retries, f"max_retries of queue {name!r}")
        self.soft_timeout = _seconds(soft_timeout, f"soft_timeout of queue {name!r}")
        self.hard_timeout = _seconds(hard_timeout, f"hard_timeout of queue {name!r}")
        self.key = self.eta_key = self.wake_key = None      # set by the app (its prefix)


def _coerce_queue(q):
    if isinstance(q, Queue):
        return q
    if isinstance(q, str):
        return Queue(q)
    if isinstance(q, (tuple, list)) and len(q) == 2:
        return Queue(q[1], priority=q[0])
    raise TypeError(f"a queue is a Queue, a (priority, name) tuple or a name, got {q!r}")


class CronTask:
    """Enqueue `task_name` on `queue` whenever `schedule` matches (croniter: 5 or 6 fields)."""

    __slots__ = ("schedule", "task_name", "queue", "args", "kwargs")

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


# ===================================================================== Task

class Task:
    """A registered task: call it to run here and now, .delay() to enqueue it."""

    def __init__(self, app, fn, name, queue, max_retries, soft_timeout, hard_timeout):
        self.app, self.fn, self.name = app, fn, name
        self.queue = app._queue(queue) if queue is not None else None
        self.max_retries = _count(max_retries, f"max_retries of task {name!r}")
        self.soft_timeout = _seconds(soft_timeout, f"soft_timeout of task {name!r}")
        self.hard_timeout = _seconds(hard_timeout, f"hard_timeout of task {name!r}")
        _check_timeouts(_limits_for(app, self, self.queue or app.default_queue), f"task {name!r}")
        self.__doc__, self.__wrapped__ = fn.__doc__, fn
        self._json_name = json.dumps(name)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def delay(self, *args, queue=None, eta=None, **kwargs):
        """Enqueue one call; returns its id. `queue` and `eta` are reserved keywords:
        eta = seconds or timedelta from now, or a datetime (naive = UTC)."""
        return self.app._enqueue(self, [(args, kwargs)], queue, eta)[0]

    def delay_many(self, calls, queue=None, eta=None):
        """Enqueue many calls in bulk, one round trip per 1,000; each item is a tuple of
        positional args, or a dict {"args": [...], "kwargs": {...}}. Returns the ids."""
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
        self.default_queue = self.queues[-1]
        if isinstance(exclude_queues, str):
            raise TypeError(f"exclude_queues must be a list of names, got {exclude_queues!r}")
        for name in exclude_queues:
            self._queue(name)
        self.exclude_queues = list(dict.fromkeys(exclude_queues))
        if len(self.exclude_queues) == len(self.queues):
            raise ValueError(f"exclude_queues {self.exclude_queues!r} leaves no queue to serve")

        self.concurrency = _concurrency(concurrency)
        self.soft_timeout = _seconds(soft_timeout, "soft_timeout")
        self.hard_timeout = _seconds(hard_timeout, "hard_timeout")
        self.max_retries = _count(max_retries, "max_retries")
        for q in [None] + self.queues:
            _check_timeouts(_limits_for(self, None, q), f"queue {q.name!r}" if q else "WakaQ")
        if max_mem_percent is not None and (isinstance(max_mem_percent, bool) or not isinstance(
                max_mem_percent, (int, float)) or not 1 <= max_mem_percent <= 99):
            raise ValueError(
                f"max_mem_percent must be a number from 1 to 99, got {max_mem_percent!r}")
        self.max_mem_percent = max_mem_percent
        self.max_tasks_per_worker = _count(max_tasks_per_worker, "max_tasks_per_worker", 1)
        self.heartbeat_timeout = _seconds(heartbeat_timeout, "heartbeat_timeout")
        if not self.heartbeat_timeout:
            raise ValueError(f"heartbeat_timeout must be above 0, got {heartbeat_timeout!r}")

        if timezone is not None and not isinstance(timezone, str):
            raise TypeError(f"timezone must be an IANA name such as 'UTC', got {timezone!r}")
        try:
            self.tz = ZoneInfo(timezone or "UTC")
        except (ValueError, KeyError, OSError) as e:   # ZoneInfoNotFoundError is a KeyError
            raise ValueError(f"unknown timezone {timezone!r}: {e}") from None
        self.schedules = list(schedules)
        for cron in self.schedules:
            if not isinstance(cron, CronTask):
                raise TypeError(f"schedules holds CronTask objects, got {cron!r}")
            if cron.queue is not None:
                self._queue(cron.queue)
        if not isinstance(eager, bool):
            raise TypeError(f"eager must be True or False, got {eager!r}")
        self.eager = eager
        self.worker_log_file, self.scheduler_log_file = worker_log_file, scheduler_log_file
        self.worker_log_level = _level(worker_log_level, "worker_log_level")
        self.scheduler_log_level = _level(scheduler_log_level, "scheduler_log_level")

        if url and (host, port, db) != (None,) * 3:
            raise TypeError(f"give url={_mask(url)!r} or host/port/db={(host, port, db)!r}")
        if url and not re.match(r"(redis|rediss|unix|redis\+sentinel)://", str(url)):
            raise ValueError(f"url {_mask(url)!r}: use redis, rediss, unix or redis+sentinel")
        host, port, db = host or "localhost", port or 6379, db or 0
        self._redis_args = dict(url=url) if url else dict(
            host=host, port=port, db=db, username=username, password=password)
        self.url = url or f"redis://{host}:{port}/{db}"
        self.tasks = {}
        self._hooks = {"after_worker_started": [], "before_task_started": [],
                       "after_task_finished": [], "wrap_tasks_with": []}
        if not isinstance(prefix, str) or not _QUEUE_NAME.match(prefix):
            raise ValueError(f"prefix must be letters, digits, _ . or -, got {prefix!r}")
        self.prefix = prefix
        for q in self.queues:
            q.key, q.eta_key, q.wake_key = (self._k(k, q.name) for k in ("q", "eta", "wake"))
        self.dead_key, self.workers_key = self._k("dead"), self._k("workers")
        self._redis, self._redis_pid = None, None

    def task(self, fn=None, *, name=None, queue=None, max_retries=None, soft_timeout=None,
             hard_timeout=None):
        """Register a task: @wakaq.task or @wakaq.task(queue=..., max_retries=...)."""
        def register(fn):
            task_name = name or fn.__name__
            if task_name in self.tasks:
                raise ValueError(f"a task named {task_name!r} is already registered")
            t = Task(self, fn, task_name, queue, max_retries, soft_timeout, hard_timeout)
            self.tasks[task_name] = t
            return t
        return register(fn) if fn is not None else register

    def _hook(kind):
        def decorator(self, fn):
            if kind == "wrap_tasks_with" and self._hooks[kind]:
                raise ValueError(f"wrap_tasks_with is already {self._hooks[kind][0]!r}; "
                                 "compose your wrappers in one function")
            self._hooks[kind].append(fn)
            return fn
        decorator.__name__ = kind
        decorator.__doc__ = f"Decorator: register a function called {kind.replace('_', ' ')}."
        return decorator

    after_worker_started = _hook("after_worker_started")     # in each child, after fork
    before_task_started = _hook("before_task_started")
    after_task_finished = _hook("after_task_finished")
    wrap_tasks_with = _hook("wrap_tasks_with")                 # wrapper(fn, args, kwargs)
    del _hook

    def _k(self, *parts):
        """A Redis key of this app: "{prefix}:part:part". The hash tag {prefix} puts every
        key of the app in one Redis Cluster slot, so each script's keys share a node."""
        return "{%s}:%s" % (self.prefix, ":".join(parts))

    def _queue(self, name):
        if isinstance(name, Queue):
            name = name.name
        if name not in self._queues:
            raise ValueError(f"unknown queue {name!r}; the app has {list(self._queues)!r}")
        return self._queues[name]

    def _client(self, retries=2):
        """A new client: producers retry twice, workers (retries=0) handle outages themselves."""
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry
        kw = dict(self._redis_args, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
                  socket_timeout=max(10.0, IDLE_WAIT * 5), socket_connect_timeout=5)
        url = kw.pop("url", None)
        return redis.Redis.from_url(url, **kw) if url else redis.Redis(**kw)

    @property
    def _conn(self):
        """This thread's own connection for enqueueing (see _Conn)."""
        conns = _local.__dict__.setdefault("conns", {})
        if self not in conns:
            conns[self] = _Conn(self._client(), retries=1)
        return conns[self]

    @property
    def redis(self):
        """This process's client (a new one after fork)."""
        if self._redis is None or self._redis_pid != os.getpid():
            self._redis, self._redis_pid = self._client(), os.getpid()
        return self._redis

    def _payload(self, task, args, kwargs, queue, bcast=False):
        """(id, payload). Formatted by hand: the same JSON as dumping a dict, twice as fast.
        Queue names need no escaping (see Queue); the task's name is escaped once."""
        try:
            _check_keys([args, kwargs])
            args, kwargs = _dumps(args), _dumps(kwargs) if kwargs else "{}"
        except RecursionError:
            raise TypeError(f"the arguments of {task.name} are circular or nested too deeply")
        msg_id, tail = _new_id(), ',"bcast":1}' if bcast else "}"
        return msg_id, (f'{{"id":"{msg_id}","name":{task._json_name},"queue":"{queue.name}",'
                        f'"retry":0,"args":{args},"kwargs":{kwargs}{tail}')

    def _enqueue(self, task, calls, queue, eta):
        q = self._queue(queue) if queue is not None else task.queue or self.default_queue
        built = [self._payload(task, a, k, q) for a, k in calls]   # TypeError before any push
        if self.eager:
            for msg in (_loads(raw) for _, raw in built):
                self._run_task(task, msg["args"], msg["kwargs"])
            return [i for i, _ in built]
        due = _due_time(eta)
        payloads = [raw for _, raw in built]
        r = self._conn
        for start in range(0, len(payloads), BULK_CHUNK):
            chunk = payloads[start:start + BULK_CHUNK]
            if due is None:
                _ENQUEUE(r, [q.key, q.wake_key], chunk)
            else:
                r.execute_command("ZADD", q.eta_key, *itertools.chain.from_iterable(
                    (due, p) for p in chunk))
        return [i for i, _ in built]

    def _broadcast(self, task, args, kwargs):
        _, raw = self._payload(task, args, kwargs, task.queue or self.default_queue, bcast=True)
        if self.eager:
            self._run_task(task, list(args), kwargs)
            return 1
        return _BROADCAST(self._conn, [self.workers_key],
                          [time.time() - self.heartbeat_timeout, raw, "{%s}" % self.prefix])

    def _run_task(self, task, args, kwargs, soft_deadline=None):
        """Run a task with the hooks. `async def` tasks run to completion here, with the
        soft timeout kept by asyncio (a SIGALRM could land inside asyncio's own callbacks)."""
        try:
            for hook in self._hooks["before_task_started"]:
                hook()
            if self._hooks["wrap_tasks_with"]:
                result = self._hooks["wrap_tasks_with"][0](task.fn, args, kwargs)
            else:
                result = task.fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                if soft_deadline:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    result = _within(result, soft_deadline)
                result = asyncio.run(result)
            return result
        finally:
            for hook in self._hooks["after_task_finished"]:
                hook()

    def _outcome(self, raw, reason, bcast_key=None):
        """The retry rule for every attempt that ends early: (list key, wake key or None, value).
        "interrupted by stop" keeps the retry count. bcast_key is the worker's own broadcast
        list; None means the broadcast's worker is gone, so it cannot be retried."""
        try:
            msg = _loads_msg(raw, decode=False)      # tagged values are not re-encoded
        except _BAD_PAYLOAD as e:
            return self.dead_key, None, _dead_entry(raw, None, f"{reason}; bad payload: {e}")
        task, queue = self.tasks.get(msg["name"]), self._queues.get(msg["queue"])
        if msg.get("bcast") and bcast_key is None or queue is None:
            return self.dead_key, None, _dead_entry(raw, msg, reason)
        if reason != "interrupted by stop":
            if msg["retry"] >= _limits_for(self, task, queue).retries:
                return self.dead_key, None, _dead_entry(raw, msg, reason)
            msg["retry"] += 1
            raw = json.dumps(msg)
        return (bcast_key, None, raw) if msg.get("bcast") else (queue.key, queue.wake_key, raw)


async def _within(coro, deadline):
    """Await coro until the monotonic deadline, then raise SoftTimeout inside it."""
    try:
        return await asyncio.wait_for(coro, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        if time.monotonic() < deadline:
            raise               # the task's own TimeoutError
        raise SoftTimeout("soft timeout") from None


def _level(value, name):
    if isinstance(value, str) and isinstance(logging.getLevelName(value.upper()), int):
        return logging.getLevelName(value.upper())
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be a logging level such as 'INFO', got {value!r}")


def _due_time(eta):
    """eta -> unix time, or None for now. Numbers and timedeltas are from now."""
    if eta is None:
        return None
    if isinstance(eta, datetime):
        return (eta.replace(tzinfo=timezone.utc) if eta.tzinfo is None else eta).timestamp()
    if isinstance(eta, timedelta):
        eta = eta.total_seconds()
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be seconds, a timedelta or a datetime, got {eta!r}")
    return time.time() + max(0.0, eta)


def _dead_entry(raw, msg, reason):
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    msg = msg or {}
    return json.dumps({"id": msg.get("id"), "name": msg.get("name"), "queue": msg.get("queue"),
                       "attempts": msg.get("retry", 0) + 1, "reason": reason, "at": time.time(),
                       "payload": text})


# ===================================================================== Redis scripts

class _Script:
    """A Lua script called by EVALSHA, loaded again if Redis lost it (after a restart)."""

    def __init__(self, source):
        self.source = _LUA_WAKE + source
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def __call__(self, r, keys, args):
        try:
            return r.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return r.execute_command("EVAL", self.source, len(keys), *keys, *args)


# Push up to n wake-up tokens, keeping at most WAKE_TOKENS in the list.
_LUA_WAKE = f"""
local function wake(key, n)
  n = math.min(n, {WAKE_TOKENS} - redis.call('LLEN', key))
  if n > 0 then
    local t = {{}}
    for i = 1, n do t[i] = '1' end
    redis.call('RPUSH', key, unpack(t))
  end
end
"""

# Append payloads ARGV to queue KEYS[1] and wake as many idle children (tokens KEYS[2]).
_ENQUEUE = _Script("""
redis.call('RPUSH', KEYS[1], unpack(ARGV))
wake(KEYS[2], #ARGV)
return #ARGV
""")

# A child's claim. KEYS: in-flight hash, workers zset, n sources by priority (broadcasts
# first), their wake lists. ARGV: slot, finished payload (acked by the overwrite), n, worker id.
# Slot holds another payload: a lost reply, resend it. Worker unlisted: nothing. Empty: clear wakes.
_CLAIM = _Script("""
local n = tonumber(ARGV[3])
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and cur ~= ARGV[2] then return {0, cur} end
if redis.call('ZSCORE', KEYS[2], ARGV[4]) then
  for i = 3, n + 2 do
    local p = redis.call('LPOP', KEYS[i])
    if p then
      redis.call('HSET', KEYS[1], ARGV[1], p)
      return {i - 2, p}
    end
  end
end
if cur then redis.call('HDEL', KEYS[1], ARGV[1]) end
redis.call('DEL', unpack(KEYS, n + 3))
return false
""")

# Release in-flight field ARGV[1] of KEYS[1] if it still holds ARGV[2] (once, even if adopted):
# push ARGV[3] onto KEYS[2] (front if ARGV[4] == 'front'; no KEYS[2]: an ack), wake KEYS[3].
_RELEASE = _Script("""
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if KEYS[2] then redis.call(ARGV[4] == 'front' and 'LPUSH' or 'RPUSH', KEYS[2], ARGV[3]) end
if KEYS[3] then wake(KEYS[3], 1) end
return 1
""")

# Move up to ARGV[2] payloads due by ARGV[1] from each (eta zset, queue, wake) triple in
# KEYS to the end of the queue. Returns {moved, earliest remaining due time or ''}.
_MOVE_DUE = _Script("""
local moved, nextdue = 0, nil
for i = 1, #KEYS, 3 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
  if #due > 0 then
    redis.call('RPUSH', KEYS[i + 1], unpack(due))
    redis.call('ZREM', KEYS[i], unpack(due))
    wake(KEYS[i + 2], #due)
    moved = moved + #due
  end
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if first[2] and (nextdue == nil or tonumber(first[2]) < nextdue) then
    nextdue = tonumber(first[2])
  end
end
return {moved, nextdue and tostring(nextdue) or ''}
""")

# Push payload ARGV[2] to the broadcast list of every worker whose heartbeat (zset KEYS[1])
# is newer than ARGV[1]. Keys are built from prefix ARGV[3]: the set of workers is data.
_BROADCAST = _Script("""
local ws = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
for _, w in ipairs(ws) do
  redis.call('RPUSH', ARGV[3] .. ':bcast:' .. w, ARGV[2])
  wake(ARGV[3] .. ':wake:' .. w, 1)
end
return #ws
""")

# Adopt worker ARGV[1] if its heartbeat (KEYS[1]) is older than ARGV[2]: move its hash KEYS[2] and
# broadcasts KEYS[3] into ours (KEYS[5]) as adopted:* fields, delete KEYS[2..4]; nil if taken.
_ADOPT = _Script("""
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) > tonumber(ARGV[2]) then return false end  -- alive, or taken
redis.call('ZREM', KEYS[1], ARGV[1])
local h, n = redis.call('HGETALL', KEYS[2]), 0
for i = 1, #h, 2 do redis.call('HSET', KEYS[5], 'adopted:' .. ARGV[1] .. ':' .. h[i], h[i + 1]) end
for i, p in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
  redis.call('HSET', KEYS[5], 'adopted:' .. ARGV[1] .. ':b' .. i, p)
  n = n + 1
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return #h / 2 + n
""")

# Enqueue one cron tick once: SET NX lock KEYS[1] (expires ARGV[2] s), then append payload
# ARGV[1] to queue KEYS[2] and wake KEYS[3]. Several schedulers may race; one wins.
_CRON = _Script("""
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
wake(KEYS[3], 1)
return 1
""")


# ===================================================================== logging

_current = contextvars.ContextVar("wakaq_current_task", default=None)


def current_task():
    """Inside a running task: {"id", "name", "queue", "attempt"} (1 = first run), else None."""
    msg = _current.get()
    return None if msg is None else {"id": msg.get("id"), "name": msg["name"],
                                     "queue": msg["queue"], "attempt": msg["retry"] + 1}


def _task_filter(record):
    """Adds %(task)s to every record: ' task=NAME' inside a task, '' elsewhere."""
    msg = _current.get()
    record.task = f" task={msg['name']}" if msg else ""
    return True


def _mask(url):
    """The URL with its password (user:PASSWORD@ or ?password=) replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^/]*@|(password=)[^&]*",
                  lambda m: f"{m[1]}***@" if m[1] else "password=***", str(url))


def _setup_logging(path, level):
    """Send this process's (and its children's) logs, stdout and stderr to `path` or
    stderr, line-buffered, so that a task's print() and log lines reach the same place."""
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    os.dup2(2, 1)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_task_filter)
    handler.setFormatter(logging.Formatter(
        "[%(asctime)s] %(levelname)s %(name)s pid=%(process)d%(task)s: %(message)s"))
    logging.basicConfig(handlers=[handler], level=level, force=True)  # replaces root's handlers
    log.disabled = False     # an app's dictConfig() at import (disable_existing_loggers)


class _Outage:
    """Log once per Redis outage, and back off from 0.1 s to 5 s between tries."""

    def __init__(self, who):
        self.who, self.delay = who, 0.0

    def failed(self, e):
        if not self.delay:
            log.warning("%s lost Redis (%s); retrying with backoff", self.who, e)
        self.delay = min(max(self.delay * 2, 0.1), 5.0)
        return self.delay

    def ok(self, r=None):
        """After a success; or, with a client r after an outage, once a ping of r succeeds."""
        if self.delay:
            if r is not None:
                r.ping()
            log.info("%s reconnected to Redis", self.who)
        self.delay = 0.0


# Blocked around fork() so that a stop signal reaches the child's handlers, not ours.
_PARENT_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


class _Conn:
    """One bare connection for the hot paths (claims, enqueues): redis-py's pool and command
    layers cost more than the round trip. Reconnects at once `retries` times, else on next use."""

    def __init__(self, client, retries=0):
        self.conn, self.retries = client.connection_pool.make_connection(), retries

    def execute_command(self, *args):
        for attempt in range(self.retries + 1):
            try:
                self.conn.send_command(*args)
                return self.conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                self.conn.disconnect()
                if attempt == self.retries:
                    raise


# ===================================================================== OS helpers

def _parse_meminfo(text):
    """Percent of memory in use from /proc/meminfo text."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    total, available = (int(fields[k].split()[0]) for k in ("MemTotal", "MemAvailable"))
    return 100.0 * (total - available) / total


def _parse_cgroup(max_text, current_text, stat_text=""):
    """Percent of a cgroup's memory limit in use, or None without a limit. Inactive page
    cache (memory.stat) is left out: the kernel reclaims it before it would kill anything."""
    stat = dict(line.split() for line in stat_text.splitlines() if len(line.split()) == 2)
    cache = int(stat.get("inactive_file", stat.get("total_inactive_file", 0)))
    limit = None if max_text.strip() == "max" else int(max_text)
    if limit is None or limit >= 2 ** 62:          # cgroup v1 says "no limit" with a huge number
        return None
    return 100.0 * max(0, int(current_text) - cache) / limit


def _read(path):
    with open(path) as f:
        return f.read()


def _mem_percent():
    """The container's use of its limit (cgroup v2, else v1) if it has one, else the machine's."""
    for d, limit, usage in (("/sys/fs/cgroup", "memory.max", "memory.current"),
                            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes",
                             "memory.usage_in_bytes")):
        try:
            pct = _parse_cgroup(_read(f"{d}/{limit}"), _read(f"{d}/{usage}"),
                                _read(f"{d}/memory.stat"))
        except (OSError, ValueError):
            continue       # no such memory controller here
        if pct is not None:
            return pct
    return _parse_meminfo(_read("/proc/meminfo"))


def _rss(pid):
    """Resident set size of `pid` in bytes from /proc/<pid>/statm (0 if it is gone)."""
    try:
        return int(_read(f"/proc/{pid}/statm").split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ===================================================================== worker parent

class _Child:
    """The parent's record of one slot's child process."""

    __slots__ = ("pid", "killed_for", "term_sent", "born")

    def __init__(self, pid):
        self.pid, self.killed_for, self.term_sent, self.born = pid, None, False, time.monotonic()


class _Worker:
    """The parent; it never runs task code. Each child owns a slot: its field in the in-flight
    hash and 8 bytes of shared memory holding its task's hard deadline (monotonic; 0 = idle),
    so hard timeouts need no message per task. Signal handlers only count; a pipe wakes select()."""

    def __init__(self, app):
        self.app = app
        self.wid = f"{socket.gethostname()}.{os.getpid()}.{os.urandom(3).hex()}"
        self.inflight_key = app._k("inflight", self.wid)
        self.bcast_key, self.wake_key = app._k("bcast", self.wid), app._k("wake", self.wid)
        n = app.concurrency
        self.slots = [None] * n           # slot -> _Child, or None
        self.unreleased = {}              # slot -> reason: a dead child's task to release
        self.not_before = [0.0] * n       # slot -> when it may fork again (monotonic)
        self.shm = mmap.mmap(-1, 8 * n)
        self.signals, self.outage = 0, _Outage("worker")
        self.next_beat = self.next_mem = self.next_due = 0.0
        self.mem_high = self.stop_logged = False

    def run(self):
        app = self.app
        self.r = app._client(retries=0)
        self.pipe = wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda s, f: None)   # only to wake select()
        served = [q.name for q in app.queues if q.name not in app.exclude_queues]
        log.info("worker %s started: concurrency=%d queues=%s", self.wid, app.concurrency,
                 ",".join(served))
        while True:
            now = time.time()
            self._reap()
            if self.signals >= 2:
                self._stop_now()
                break
            if self.signals == 1:
                self._begin_stop()
                if not any(self.slots) and (not self.unreleased or self.outage.delay):
                    break
            self._enforce_hard_timeouts()
            self._redis_duties(now)
            if not self.signals:
                self._check_memory(now)
                self._fork_missing()
            timeout = max(0.0, min(TICK, self.next_due - time.time()))
            if select.select([wake_r], [], [], timeout)[0]:
                os.read(wake_r, 4096)         # signal numbers: we only needed the wake-up
        self._leave()
        log.info("worker %s stopped", self.wid)
        return 0

    def _on_stop_signal(self, signum, frame):
        self.signals += 1

    def _begin_stop(self):
        for child in self.slots:
            if child and not child.term_sent:
                child.term_sent = True
                _kill(child.pid, signal.SIGTERM)
        if not self.stop_logged:
            self.stop_logged = True
            log.info("worker %s stopping: letting running tasks finish", self.wid)

    def _fork_missing(self):
        for slot, child in enumerate(self.slots):
            if child is None and slot not in self.unreleased and not self.mem_high \
                    and time.monotonic() >= self.not_before[slot]:
                self._spawn(slot)

    def _spawn(self, slot):
        struct.pack_into("d", self.shm, slot * 8, 0.0)
        signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)  # until the child has its own
        try:
            pid = os.fork()
        except OSError as e:
            log.error("cannot fork a child (%s); trying again in a second", e)
            self.not_before[slot], pid = time.monotonic() + 1, None
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
            self.slots[slot] = _Child(pid)

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for slot, child in enumerate(self.slots):
                if child and child.pid == pid:
                    self.slots[slot] = None
                    self.unreleased[slot] = child.killed_for or (
                        "interrupted by stop" if self.signals else "worker died")
                    code = os.waitstatus_to_exitcode(status)
                    if child.killed_for or code != 0:
                        log.warning("child %d exited with %s (%s)", pid, code,
                                    child.killed_for or "died")
                    if code != 0 and time.monotonic() - child.born < 1.0:
                        self.not_before[slot] = time.monotonic() + 1.0   # no crash loop

    def _enforce_hard_timeouts(self):
        now = time.monotonic()
        for slot, child in enumerate(self.slots):
            if child and not child.killed_for:
                deadline = struct.unpack_from("d", self.shm, slot * 8)[0]
                if deadline and now > deadline:
                    child.killed_for = "hard timeout"
                    _kill(child.pid, signal.SIGKILL)

    def _check_memory(self, now):
        if not self.app.max_mem_percent or now < self.next_mem:
            return
        self.next_mem = now + 1.0
        try:
            pct = _mem_percent()
        except (OSError, ValueError, KeyError, ZeroDivisionError) as e:
            log.warning("cannot read memory use (%s); checking again in a minute", e)
            self.next_mem = now + 60.0
            return
        was_high, self.mem_high = self.mem_high, pct >= self.app.max_mem_percent
        if self.mem_high != was_high:
            log.warning("memory use %.0f%% is %s max_mem_percent=%s: forking %s", pct,
                        *(("over", self.app.max_mem_percent, "paused") if self.mem_high
                          else ("under", self.app.max_mem_percent, "resumed")))
        live = [c for c in self.slots if c and not c.term_sent]
        if self.mem_high and live:
            biggest = max(live, key=lambda c: _rss(c.pid))
            log.warning("memory at %.0f%% (max_mem_percent=%s): stopping child %d",
                        pct, self.app.max_mem_percent, biggest.pid)
            biggest.term_sent = True
            _kill(biggest.pid, signal.SIGTERM)

    def _redis_duties(self, now):
        """Release dead children's tasks, heartbeat, adopt dead workers, move due tasks."""
        if self.outage.delay and now < self.next_due:
            return                    # backing off
        try:
            self.outage.ok(self.r)
            self._release_unreleased()
            if now >= self.next_beat:
                self.r.zadd(self.app.workers_key, {self.wid: now})
                self._adopt(now)
                self.next_beat = now + min(self.app.heartbeat_timeout / 4, 5.0)
            if now >= self.next_due:
                self._move_due(now)
        except redis.RedisError as e:
            self.next_due = time.time() + self.outage.failed(e)

    def _release_unreleased(self):
        for slot, reason in list(self.unreleased.items()):
            self._release(str(slot), reason)
            del self.unreleased[slot]

    def _release(self, field, reason):
        """Give back the task in our in-flight `field` by the retry rule (a stop's: in front)."""
        raw = self.r.hget(self.inflight_key, field)
        if raw is None:
            return
        own = None if field.startswith("adopted:") else self.bcast_key
        key, wake, value = self.app._outcome(raw, reason, own)
        keys = [self.inflight_key, key] + ([wake] if wake else [])
        front = "front" if reason == "interrupted by stop" else "back"
        if _RELEASE(self.r, keys, [field, raw, value, front]):
            log.warning("task released (%s) to %s", reason, key)

    def _adopt(self, now):
        """Take back the tasks of workers silent for heartbeat_timeout. They land in our own
        hash as adopted:* fields first, so a failure halfway is finished on the next pass."""
        cutoff = now - self.app.heartbeat_timeout
        for wid in self.r.zrangebyscore(self.app.workers_key, "-inf", cutoff, start=0, num=10):
            wid = wid.decode()
            if wid == self.wid:       # we were cut off from Redis for a while: still alive
                continue
            keys = [self.app.workers_key] + [self.app._k(k, wid) for k in
                                             ("inflight", "bcast", "wake")] + [self.inflight_key]
            count = _ADOPT(self.r, keys, [wid, cutoff])
            if count is not None:
                log.warning("worker %s is silent for over %ss: taking back its %d task(s)",
                            wid, self.app.heartbeat_timeout, count)
        for field in self.r.hkeys(self.inflight_key):
            if field.startswith(b"adopted:"):
                self._release(field.decode(), "worker died")

    def _move_due(self, now):
        keys = [k for q in self.app.queues for k in (q.eta_key, q.key, q.wake_key)]
        for _ in range(20):           # then the loop's other duties get their turn
            moved, nextdue = _MOVE_DUE(self.r, keys, [now, DUE_BATCH])
            if moved < DUE_BATCH:
                break
        self.next_due = min(float(nextdue), now + TICK) if nextdue else now + TICK

    def _stop_now(self):
        log.warning("worker %s: second stop signal, stopping now", self.wid)
        for child in self.slots:
            if child:
                _kill(child.pid, signal.SIGKILL)
        for slot, child in enumerate(self.slots):
            if child:
                os.waitpid(child.pid, 0)
                self.slots[slot] = None
                self.unreleased[slot] = child.killed_for or "interrupted by stop"
        try:
            self._release_unreleased()
        except redis.RedisError as e:
            log.error("cannot put interrupted tasks back (%s); a live worker will take them "
                      "back after heartbeat_timeout", e)

    def _leave(self):
        """Deregister; broadcasts still waiting for us go to the dead-letter list. With a task
        still in our in-flight hash (Redis was down), stay listed so a live worker adopts it."""
        try:
            if self.unreleased or self.r.hlen(self.inflight_key):
                return
            self.r.zrem(self.app.workers_key, self.wid)    # first: no new broadcasts for us
            for raw in self.r.lrange(self.bcast_key, 0, -1):
                self.r.rpush(self.app.dead_key, _dead_entry(raw, None, "worker stopped"))
            self.r.delete(self.bcast_key, self.wake_key)
        except redis.RedisError as e:
            log.error("could not deregister worker %s (%s)", self.wid, e)


# ===================================================================== worker child

class _ChildProcess:
    """A forked child: claim a task (in-flight, atomically), run it, ack it in the next claim."""

    def __init__(self, worker, slot):
        self.worker, self.app, self.slot = worker, worker.app, slot
        self.ppid = os.getppid()
        self.stopping = self.idle = self.in_task = False
        self.prev = b""         # payload finished and not acked yet (b'' = none)
        self.outage = _Outage(f"child {slot}")
        app = self.app
        served = [q for q in app.queues if q.name not in app.exclude_queues]
        self.sources = [worker.bcast_key] + [q.key for q in served]
        self.wakes = [worker.wake_key] + [q.wake_key for q in served]
        self.limits = {}        # (task, queue) -> _Limits
        keys = [worker.inflight_key, app.workers_key] + self.sources + self.wakes
        head = ["EVALSHA", _CLAIM.sha, len(keys)] + keys + [slot]
        tail = [len(self.sources), worker.wid]
        bulk = [b"$%d\r\n%s\r\n" % (len(b), b) for b in (str(x).encode() for x in head + tail)]
        self.claim_head = b"*%d\r\n" % (len(bulk) + 1) + b"".join(bulk[:len(head)])
        self.claim_tail = b"".join(bulk[len(head):])

    def run(self):
        signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent decides on Ctrl-C
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)  # blocked by _spawn
        self.r = _Conn(self.app._client(retries=0))
        for hook in self.app._hooks["after_worker_started"]:
            hook()
        limit, done = self.app.max_tasks_per_worker or float("inf"), 0
        while not self.stopping and done < limit:
            item = self._call(self._claim)
            if item is None:
                self.prev = b""          # the claim acked it
                if os.getppid() != self.ppid:
                    break                # orphaned (checked when idle: no syscall per task)
                self._call(self._wait)
                continue
            if self.stopping:            # SIGTERM came while claiming: give it back untouched
                self._release(item[1], *self.app._outcome(
                    item[1], "interrupted by stop", self.worker.bcast_key), "front")
                break
            self.prev = self._run(item[1])
            done += 1
        if self.prev:
            self._release(self.prev, None, None, "")        # ack
        return 0

    def _on_term(self, signum, frame):
        self.stopping = True
        if self.idle:
            raise _Stop()

    def _on_alarm(self, signum, frame):
        if self.in_task:
            raise SoftTimeout(f"soft timeout after {self.soft:g}s")

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
            if self.stopping or os.getppid() != self.ppid:
                raise _Stop()
            time.sleep(delay)

    def _claim(self):
        """The hot path: the claim's command bytes are packed once, all but `prev`."""
        try:
            self.r.conn.send_packed_command(
                [self.claim_head + b"$%d\r\n%s\r\n" % (len(self.prev), self.prev) + self.claim_tail])
            return self.r.conn.read_response()
        except redis.exceptions.NoScriptError:
            self.r.execute_command("SCRIPT", "LOAD", _CLAIM.source)
            return self._claim()

    def _wait(self):
        self.idle = True
        try:
            if not self.stopping:
                self.r.execute_command("BLPOP", *self.wakes, IDLE_WAIT)
        finally:
            self.idle = False

    def _release(self, raw, key, wake, value, where="back"):
        keys = [self.worker.inflight_key] + [k for k in (key, wake) if k]
        self._call(lambda: _RELEASE(self.r, keys, [self.slot, raw, value, where]))

    def _run(self, raw):
        """Run one claimed payload; returns it if done (to ack in the next claim), else ''."""
        app = self.app
        try:
            msg = _loads_msg(raw)
        except _BAD_PAYLOAD as e:
            log.error("bad payload dead-lettered: %s", e)
            self._release(raw, app.dead_key, None, _dead_entry(raw, None, f"bad payload: {e}"))
            return b""
        task, queue = app.tasks.get(msg["name"]), app._queues.get(msg["queue"])
        if task is None or queue is None:
            what = "unknown task" if task is None else "unknown queue"
            log.error("%s %r dead-lettered", what, msg["name"] if task is None else msg["queue"])
            self._release(raw, app.dead_key, None, _dead_entry(raw, msg, what))
            return b""
        limits = self.limits.get((task, queue)) or self.limits.setdefault(
            (task, queue), _limits_for(app, task, queue))
        start = time.monotonic()
        struct.pack_into("d", self.worker.shm, self.slot * 8,
                         start + limits.hard if limits.hard else 0.0)
        token = _current.set(msg)
        failed = None
        try:  # SoftTimeout is raised only while in_task is set, so only inside this try
            if limits.soft:
                self.soft = limits.soft
                self.in_task = True
                signal.setitimer(signal.ITIMER_REAL, limits.soft)
            app._run_task(task, msg["args"], msg["kwargs"], limits.soft and start + limits.soft)
        except SoftTimeout:
            failed = "soft timeout"
        except Exception:
            log.exception("task %s raised", task.name)
        finally:
            if self.in_task:
                self.in_task = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            struct.pack_into("d", self.worker.shm, self.slot * 8, 0.0)
            _current.reset(token)
        if failed:
            log.warning("task %s: %s after %.1fs", task.name, failed, time.monotonic() - start)
            self._release(raw, *app._outcome(raw, failed, self.worker.bcast_key))
            return b""
        return raw


# ===================================================================== scheduler

def _due(schedules, last, now):
    """(CronTask, fire time) for each schedule with a fire time in (last, now]; a schedule
    that missed several ticks fires once, for the latest, unless that is over CRON_CATCH_UP
    seconds old. Times compare as timestamps: wall clocks repeat when DST ends."""
    due, end = [], now.timestamp()
    for cron in schedules:
        it, fire = croniter(cron.schedule, last), None
        while (nxt := it.get_next(datetime)).timestamp() <= end:
            fire = nxt
        if fire and end - fire.timestamp() <= CRON_CATCH_UP:
            due.append((cron, fire))
    return due


def _run_scheduler(app, stop):
    """Enqueue each tick exactly once across schedulers; re-read the clock every pass."""
    for cron in app.schedules:
        if cron.task_name not in app.tasks:
            raise ValueError(f"schedule {cron.schedule!r} names unknown task {cron.task_name!r}")
    if not app.schedules:
        log.warning("the app has no schedules; the scheduler has nothing to do")
    r, outage = app._client(retries=0), _Outage("scheduler")
    last = datetime.now(app.tz)
    log.info("scheduler started with %d schedule(s)", len(app.schedules))
    while not stop():
        now = datetime.now(app.tz)
        try:
            outage.ok(r)
            for cron, fire in _due(app.schedules, last, now):
                task = app.tasks[cron.task_name]
                q = app._queue(cron.queue) if cron.queue else task.queue or app.default_queue
                _, raw = app._payload(task, cron.args, cron.kwargs, q)
                digest = hashlib.sha1(json.dumps([cron.schedule, cron.task_name, q.name,
                                                  cron.args, cron.kwargs], sort_keys=True,
                                                 default=str).encode()).hexdigest()[:16]
                lock = app._k("cron", digest, str(int(fire.timestamp())))
                if _CRON(r, [lock, q.key, q.wake_key], [raw, 2 * CRON_CATCH_UP]):
                    log.info("enqueued %s for %s", cron.task_name, fire.isoformat())
            last = now
            fires = [croniter(c.schedule, now).get_next(datetime) for c in app.schedules]
            pause = (min(fires) - datetime.now(app.tz)).total_seconds() if fires else 1.0
        except redis.RedisError as e:
            pause = outage.failed(e)
        deadline = time.monotonic() + min(max(pause, 0.01), 1.0)
        while not stop() and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


# ===================================================================== command line

def _cmd_worker(app, args):
    app.concurrency = args.concurrency or app.concurrency    # the original's options
    app.exclude_queues = [app._queue(q.strip()).name for q in args.exclude.split(",")] \
        if args.exclude else app.exclude_queues
    _setup_logging(app.worker_log_file, app.worker_log_level)
    if app.default_queue.name in app.exclude_queues:
        log.warning("the default queue %r is excluded: tasks without a queue= wait for "
                    "another app's workers", app.default_queue.name)
    return _Worker(app).run()


def _cmd_scheduler(app, args):
    _setup_logging(app.scheduler_log_file, app.scheduler_log_level)
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stopped.append(s))
    _run_scheduler(app, lambda: bool(stopped))
    return 0


def _msg(raw):
    try:
        return dict(json.loads(raw))
    except (ValueError, TypeError):
        return {}


def _cmd_info(app, args):
    r = app.redis
    pipe = r.pipeline(transaction=False)
    for q in app.queues:
        pipe.llen(q.key).zcard(q.eta_key)
    *counts, dead, workers, (sec, usec) = pipe.llen(app.dead_key).zrange(
        app.workers_key, 0, -1, withscores=True).time().execute()
    now, pipe, running = sec + usec / 1e6, r.pipeline(transaction=False), []
    for wid, _ in workers:                        # live, and dead not yet adopted
        pipe.hgetall(app._k("inflight", wid.decode()))
    for (wid, _), fields in zip(workers, pipe.execute()):
        for field, raw in fields.items():         # "S.K" -> payload, "S.K:s" -> start
            if not field.endswith((b":s", b":t")):
                msg, start = _msg(raw), fields.get(field + b":s")
                running.append({"id": msg.get("id"), "name": msg.get("name"),
                                "queue": msg.get("queue"), "worker": wid.decode(),
                                "seconds": round(now - float(start), 1) if start else None})
    info = {"queues": {q.name: {"priority": app._priority[q.name], "pending": counts[2 * i],
                                "delayed": counts[2 * i + 1]} for i, q in enumerate(app.queues)},
            "inflight": len(running), "dead": dead, "running": running,
            "workers": sum(beat >= now - app.heartbeat_timeout for _, beat in workers)}
    if args.json:
        return print(json.dumps(info))
    row = "{:<20} {:>8} {:>10} {:>10}".format     # priority, pending, delayed
    print(row("queue", "priority", "pending", "delayed"), *(row(n, *q.values()) for n, q in info[
        "queues"].items()), f"in-flight: {len(running)}  dead: {dead}  workers: {info['workers']}",
          *("running {id} {name} queue={queue} worker={worker} {seconds}s".format(**t)
            for t in running), sep="\n")


def _cmd_purge(app, args):
    q = app._queue(args.queue)
    pending, delayed, *_ = (app.redis.pipeline(transaction=True).llen(q.key).zcard(q.eta_key)
                            .unlink(q.key, q.eta_key, q.wake_key).zrem(app._k("ready"), q.name)
                            .execute())                      # freed in the background
    print(pending + delayed)                                 # the contract: one number
    print(f"wakaq: purged {pending} pending and {delayed} delayed task(s) from queue {q.name!r}",
          file=sys.stderr)


# Requeue dead letters ARGV[3], ARGV[5], ... (each removed from KEYS[1] unless another requeue
# took it) as payloads ARGV[4], ARGV[6], ... onto queue KEYS[2] (named ARGV[1], rank ARGV[2]).
_REQUEUE = _Script("""
local n = 0
for i = 3, #ARGV, 2 do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i + 1]); n = n + 1
  end
end
if n > 0 then redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1]); wake(KEYS[3], n) end
return n
""")


def _cmd_dead(app, args):
    r, key = app.redis, app.dead_key
    if args.purge:
        return print(f"deleted {r.pipeline().llen(key).unlink(key).execute()[0]} dead task(s)")
    total, start, moved, ids = r.llen(key), 0, 0, set(args.requeue or ())
    for seen in range(0, total, 1000):       # pages of 1,000: no single slow command
        page, batches = r.lrange(key, start, start + min(999, total - seen - 1)), {}
        for raw in page:
            e = _msg(raw)
            msg, get = _msg(e.get("payload")), e.get
            if args.requeue is None:
                at = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(get("at") or 0))
                call = json.dumps([msg.get("args"), msg.get("kwargs")])[1:-1]
                print(f"{get('id')} {get('name')} queue={get('queue')} attempts={get('attempts')}"
                      f" reason={get('reason')!r} at={at} args=" + (call if len(call) < 80 else
                                                                    call[:76] + " ..."))
            elif not ids or ids.intersection([get("id")]) and not ids.discard(get("id")):
                q = app._queues.get(get("queue")) or app.default_queue   # bad payloads go as
                payload = json.dumps({**msg, "retry": 0}) if msg else get("payload", "")  # were
                batches.setdefault(q, []).extend((raw, payload))
        n = sum(_REQUEUE(r, [key, q.key, q.wake_key, app._k("ready")],
                         [q.name, app.queues.index(q), *b]) for q, b in batches.items())
        moved, start = moved + n, start + len(page) - n
    if args.requeue is None:
        return print("no dead tasks") if not total else 0
    print(f"requeued {moved} dead task(s)" + (f"; not found: {' '.join(ids)}" if ids else ""))
    return 1 if ids else 0


def _cmd_health(app, args):
    (sec, usec), host = app.redis.time(), socket.gethostname()
    age = min((sec + usec / 1e6 - b for w, b in app.redis.zrange(app.workers_key, 0, -1,
               withscores=True) if w.decode().rsplit(".", 2)[0] == host), default=None)
    ok, limit = age is not None and age <= app.heartbeat_timeout, app.heartbeat_timeout
    print(("ok: " if ok else "unhealthy: ") + (f"no worker of this app on {host}" if age is None
          else f"a worker on {host} heartbeated {age:.1f}s ago (limit {limit:g}s)"))
    return 0 if ok else 1


_COMMANDS = {"worker": (_cmd_worker, "run a worker: a parent that forks `concurrency` children"),
             "scheduler": (_cmd_scheduler, "enqueue the app's CronTasks on time"),
             "info": (_cmd_info, "show queues, running, in-flight and dead tasks, live workers"),
             "purge": (_cmd_purge, "delete a queue's pending and delayed tasks"),
             "dead": (_cmd_dead, "list, requeue or delete dead-lettered tasks"),
             "health": (_cmd_health, "exit 0 if a worker on this host heartbeats, else 1")}
# What Redis reports for a bad password, an ACL, "DB index is out of range": not an outage.
_CONFIG_ERRORS = (redis.AuthenticationError, redis.exceptions.AuthorizationError,
                  redis.ResponseError)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="wakaq", description="wakaq: a Redis task queue.")
    parser.add_argument("--version", action="version", version=f"wakaq {__version__}")
    sub, cmd = parser.add_subparsers(dest="command", metavar="COMMAND"), {}
    hide = argparse.SUPPRESS
    for name, (_, text) in _COMMANDS.items():
        cmd[name] = sub.add_parser(name, help=text, description=text)
        cmd[name].add_argument("app", metavar="APP", nargs="?",
                               help="your WakaQ, as module:attribute (or --app=APP)")
        cmd[name].add_argument("--app", dest="app_option", help=hide)
        cmd[name].add_argument("--queue", dest="queue_option", help=hide)   # purge: the original's
        cmd[name].add_argument("--foreground", action="store_true", help=hide)  # worker, scheduler
    cmd["worker"].add_argument("--concurrency", type=int, help="override the app's concurrency")
    cmd["worker"].add_argument("--exclude-queues", dest="exclude", metavar="A,B",
                               help="override the app's exclude_queues")
    cmd["info"].add_argument("--json", action="store_true", help="print one JSON object")
    cmd["purge"].add_argument("queue", metavar="QUEUE", nargs="?")
    group = cmd["dead"].add_mutually_exclusive_group()
    group.add_argument("--requeue", nargs="*", metavar="ID",
                       help="put them (all, or these ids) back on their queues, retries reset")
    group.add_argument("--purge", action="store_true", help="delete them")
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        return parser.print_help(sys.stderr) or 2
    sub = cmd[args.command]
    if extra:
        sub.error(f"unrecognized arguments: {' '.join(extra)}")     # exits 2
    if args.app_option and args.app and getattr(args, "queue", 1) is None:
        args.queue, args.app = args.app, None        # purge --app=APP QUEUE
    if args.app and args.app_option and args.app != args.app_option:
        sub.error("give APP once: as APP or as --app=APP")
    args.app = args.app or args.app_option or sub.error("APP is required (module:attribute)")
    if args.command == "purge":
        args.queue = args.queue or args.queue_option or sub.error("QUEUE is required")
    sys.path.insert(0, os.getcwd())       # a script's sys.path[0] is its own folder
    try:
        app = _import_app(args.app)
    except Exception as e:                # any import-time error: one line, no traceback
        where = [(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)
                 if not f.filename.startswith("<") and f.filename != __file__]
        where = [(e.filename, e.lineno)] if isinstance(e, SyntaxError) else where
        line = traceback.format_exception_only(type(e), e)[-1].strip().splitlines()[0]
        at = " (%s, line %s)" % where[-1] if where and where[-1][0] else ""
        print(f"wakaq: cannot load app {args.app!r}: {line}{at}", file=sys.stderr)
        return 2
    try:
        try:
            app.redis.ping()     # a configuration error stops every command at once
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if isinstance(e, _CONFIG_ERRORS) or args.command not in ("worker", "scheduler"):
                raise            # an outage is for the worker and the scheduler to ride out
        return _COMMANDS[args.command][0](app, args) or 0
    except ValueError as e:               # e.g. an unknown queue or cron task name
        print(f"wakaq: {e}", file=sys.stderr)
        return 2
    except redis.RedisError as e:
        print(f"wakaq: Redis at {_mask(app.url)}: {e}", file=sys.stderr)
        return 2 if isinstance(e, _CONFIG_ERRORS) else 1


_worker_script, _scheduler_script, _info_script, _purge_script = (   # the original's commands
    lambda c=c: main([*c, *sys.argv[1:]]) for c in (["worker"], ["scheduler"], ["info", "--json"],
                                                      ["purge"]))

if __name__ == "__main__":
    # Let `import wakaq` in the app find this module instead of loading a second copy.
    sys.modules.setdefault(__spec__.name if __spec__ else "wakaq", sys.modules[__name__])
    sys.exit(main())
