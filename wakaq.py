"""wakaq.py - a Redis-backed background task queue in one file.

    python wakaq.py worker myapp:wakaq       # a parent that forks `concurrency` children
    python wakaq.py scheduler myapp:wakaq    # enqueues the app's CronTasks on time
    python wakaq.py info myapp:wakaq         # queues, workers, running, dead letters
    python wakaq.py metrics myapp:wakaq      # Prometheus text at :9808/metrics

    wakaq = WakaQ(queues=["default"], url="redis://localhost:6379/0")

    @wakaq.task
    def send_email(to): ...

    send_email.delay("bob@example.com", eta=60)   # returns the task id; runs in a minute
    wakaq.cancel(task_id)                          # "pending", "delayed", "running", "dead"

Delivery is at least once: a task leaves Redis only after its attempt ends. A failed attempt
(soft or hard timeout, the child or the whole worker dying, an exception in `retry_on`) is
retried while it has retries left, then dead-lettered with its reason. Any other exception
is dead-lettered at once ("raised TYPE: message"), so `dead` shows it and can requeue it.

REDIS KEYS. Every key is "{p}:..." with {p} = "{PREFIX}" (default "{wakaq}"): a hash tag, so
all of an app's keys share one Redis Cluster slot and every script runs on one node. Key names
are built by WakaQ._k in Python and from the prefix P in the scripts.
  {p}:q:{queue}        LIST  ready payloads, claimed from the left. New, retried, due and cron
                             tasks are pushed to the end; interrupted ones to the front.
  {p}:eta:{queue}      ZSET  delayed payloads (eta, retry_backoff), score = due time.
  {p}:ids:{queue}      HASH  id -> when it is (or becomes) ready, for every queued or delayed
                             task: cancel's index and the latency gauge.
  {p}:ready            ZSET  non-empty queues, name -> rank (0 is served first).
  {p}:due              ZSET  "RANK:NAME" -> the queue's earliest due time; claims move due tasks.
  {p}:wake:{queue}     LIST  wake-up tokens (at most 1,000) that idle children BLPOP; every
  {p}:wake:{wid}       LIST  push adds some; a worker's own list wakes it for broadcasts.
  {p}:inflight:{wid}   HASH  "S.K" -> the payload child slot S runs in field K, "S.K:t" ->
                             its claim token "PID-N", "S.K:s" -> its start (Redis time; ""
                             claimed ahead, not begun);
                             "adopted:{wid}:S.K" -> a dead worker's payloads, until released.
  {p}:cancelled        HASH  id -> its queue ("" if in flight): cancelled, dropped when next
                             claimed or released, or when `purge` empties its queue.
  {p}:cancel:{wid}     SET   "S.K TOKEN": a worker's running attempts to cancel (each beat).
  {p}:workers          ZSET  worker id (HOST.PID.RANDOM) -> last heartbeat.
  {p}:served           HASH  worker id -> the queue names it serves, comma-separated.
  {p}:serve:{digest}   SET   the queue names one set of workers serves (claims take only those).
  {p}:bcast:{wid}      LIST  broadcasts for one worker, claimed before its queues.
  {p}:dead             LIST  dead letters, oldest first (max_dead): JSON {id, name, queue,
                             attempts, reason, at, payload}.
  {p}:stats            HASH  counters for `metrics`: "b OUTCOME BUCKET QUEUE TASK" (attempts
                             with a duration), "n OUTCOME QUEUE TASK" (without), "u QUEUE
                             TASK" (microseconds run), "e QUEUE" (enqueued).
  {p}:cron:{digest}    STRING the last tick enqueued for one schedule (unix seconds).
Payload: JSON {"id", "name", "queue", "retry", "args", "kwargs"} (+ "bcast": 1), "id" first;
retry = failed attempts so far. Values beyond JSON travel as {"__wakaq__": TYPE, "v": ...}.

THE WORKER. A parent runs no task code; it forks `concurrency` children and watches them:
  parent  loop every 0.1 s (or sooner, at a deadline): reap children, enforce deadlines,
          Redis duties (release a dead child's tasks, pass cancels on, heartbeat and adopt;
          each call at most 1 s, so a Redis that does not answer holds no deadline up),
          check memory, fork missing children, touch its health file.
          SIGTERM/SIGINT/SIGHUP: stop (1st: children finish their tasks; 2nd: kill them,
          their tasks go back to the front; 3rd: leave what Redis could not take back yet).
  child   claim -> run -> ack with the field's next claim. With a field free besides (a
          sync-only app's child has two fields; an async app's, async_concurrency), it claims
          "ahead": the claim of its next task is sent before a task begins and read after
          it, so it costs no round trip of its own; the parent gives a claim held ahead back
          to the front after HOLD_AHEAD s. Idle: the claim goes behind a BLPOP of the
          wake-up lists on the same connection, so Redis runs it as soon as a push wakes it;
          the task that wakes it begins at once, with no claim ahead (after a lone push that
          claim finds nothing). SIGTERM: finish the running tasks and exit 0 (at once if
          idle). SIGUSR1: a soft timeout or a cancel is due. A child whose parent is gone
          claims nothing more.
Shared memory (mmap before fork; _Table): per field eight doubles: soft and hard deadline
(monotonic; 0 none), "held" (the claim number N of token "PID-N" the field may hold in
Redis; 0 empty), "running" (N of the attempt started last), "finished" (N of a done attempt
whose ack waits for the next claim), "cancel" (N the parent asks to cancel), "give_back"
(held ahead: when the parent gives it back), "given_back" (N the parent gave back; only it
writes it). A lock per record (lockf on a temp file) makes the child's look at a claim and
its start one step against the parent's give-back and cancel; the other writes need none (a
stale read only releases a token Redis no longer holds). The parent SIGKILLs the child's
process group at the hard deadline, sends SIGUSR1 every tick past the soft one (or a cancel)
until the child clears it, and is woken by the child through a pipe when a soft deadline is
nearer than a tick. A dead child's fields are released by that record: token N == finished:
ack; == running: died (killed by us past its hard deadline: hard timeout; cut by another's
hard timeout or a 2nd stop, or exit 0 after our SIGTERM: interrupted; a child that ends
itself past a deadline: died); else it never started (held ahead, or the reply was lost):
interrupted. "held" is set before a claim is sent and cleared once the claim is known not to
have reached Redis; a field of ours still filled when the worker deregisters (all children
gone and released) never started, and goes back to the front; so does an adopted field whose
start time is "" (claimed ahead).

CLOCKS. Anything compared across processes or hosts (heartbeats, due times, start times) uses
Redis's TIME; deadlines inside one worker use time.monotonic(). The one exception: an eta
given as a datetime is an absolute instant.

LIFE OF AN ATTEMPT. enqueue (_ENQUEUE: RPUSH, or ZADD if delayed; indexed in ids) -> claim
(_CLAIM: LPOP into the in-flight hash under a new token; a cancelled one is dropped there)
-> run (_run_attempt: hooks, wrapper, task) -> one _Outcome -> one release (_next_step, then
_RELEASE, or the field's next _CLAIM for a "done"): ack; back to the front ("interrupted":
never started, or cut by a stop or another task's hard timeout; no retry spent); to the end,
or delayed by retry_backoff (a failed attempt with retries left: soft or hard timeout,
worker died, an exception in retry_on); a dead letter (no retries left, or any other
exception: "raised TYPE: message"); or dropped (cancelled). A silent worker's in-flight
hash is adopted by a live worker (_BEAT) and released the same way, as "worker died".

SOFT TIMEOUTS AND CANCELS are raised only in the task's own code: the child's SIGUSR1
handler raises SoftTimeout or Cancelled at once when every frame between it and _call_task
(the frame that calls the task's function) is the task's; when a logging, asyncio or wakaq
frame sits between, as the outermost of those returns (a frame trace); outside the task
(hooks, wakaq) not at all: the parent signals again next tick. An async task's asyncio task
is cancelled instead. Nothing is delivered once the attempt has ended (its record cleared).

THE SCRIPTS (section "Redis scripts"; each one atomic, on the node that holds {p}) and who
runs them: _ENQUEUE .delay(), .delay_many(), the scheduler's ticks; _CLAIM a child, for each
task (it also acks the field's last one); _RELEASE a child for any other outcome and for acks
when it idles or exits, the parent for a dead child's, an adopted worker's or a leftover
field and for a claim held ahead too long; _BEAT the parent's heartbeat and adoption;
_BROADCAST .broadcast(); _CANCEL wakaq.cancel(); _MOVE `dead --requeue` and `migrate`.

Sections: errors and settings - serializer - Redis scripts - Redis connections - Queue,
CronTask, Task - the app - attempts - logging - OS helpers - worker parent - worker child -
scheduler - command line - compatibility with the original WakaQ.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import contextvars
import decimal
import fcntl
import functools
import gc
import glob
import hashlib
import importlib
import inspect
import itertools
import json
import logging
import mmap
import os
import random
import re
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import types
from datetime import date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, NamedTuple, Optional, TypeVar, overload
from zoneinfo import ZoneInfo

import redis
from croniter import croniter

if TYPE_CHECKING or sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # Python 3.9 at run time: generic over a plain TypeVar
    ParamSpec = TypeVar

__version__ = "3.0.0"
# Defining an app, then what a task may use.
__all__ = [
    "WakaQ",
    "Queue",
    "CronTask",
    "Task",
    "current_task",
    "SoftTimeout",
    "Cancelled",
    "WakaQError",
]

log = logging.getLogger("wakaq")
P = ParamSpec("P")
R = TypeVar("R")

TICK = 0.1  # seconds: the worker parent's loop period
PARENT_TIMEOUT = 1.0  # seconds: a parent's Redis call at most (its loop enforces deadlines)
IDLE_WAIT = 5.0  # seconds: default wait_timeout, an idle child's longest BLPOP
PROMOTE = 0.05  # seconds: a busy child moves due delayed tasks at most this often
HOLD_AHEAD = 0.2  # seconds: a task claimed ahead waits at most this (+ a tick) behind another
BEAT = 5.0  # seconds: heartbeat period at most
CANCEL_POLL = 1.0  # seconds: how often a worker looks for cancels of its running tasks
WAKE_TOKENS = 1000  # wake-up tokens kept per list at most
DUE_BATCH = 1000  # delayed payloads moved per queue per claim
ADOPT_BATCH = 500  # silent workers looked at per heartbeat, newest first
BULK_CHUNK = 1000  # payloads per script call in delay_many()
MAX_BACKOFF = 3600.0  # seconds: retry_backoff waits at most this
CRON_CATCH_UP = 1800  # seconds: a missed cron tick older than this is not enqueued
MAX_DEAD = 10_000  # default max_dead
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


# ============================================================================ errors and settings


class WakaQError(Exception):
    """Raised when wakaq cannot do what was asked at run time (e.g. too few replicas)."""


class SoftTimeout(WakaQError):
    """Raised in a task at its soft timeout. An Exception, as in the original and Celery: a
    task's own `except Exception` can swallow it; the hard timeout is then the backstop."""


class Cancelled(WakaQError):
    """Raised in a running task that wakaq.cancel(id) cancelled; it is not retried."""


class _Stop(BaseException):
    """Raised by a child's SIGTERM handler to leave a wait (an idle BLPOP, a backoff)."""


_Limits = collections.namedtuple("_Limits", "soft hard retries backoff retry_on")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")  # \Z: "$" would let "q\n" through


def _seconds(value, name, minimum=0, kind=float):
    """A duration as float seconds (int, float or timedelta), or with kind=int a count; None
    stays None (unset)."""
    if isinstance(value, timedelta) and kind is float:
        value = value.total_seconds()
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (kind, int)):
        what = "seconds or a timedelta" if kind is float else "an int"
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if not minimum <= value < float("inf"):  # also refuses nan
        raise ValueError(f"{name} must be finite and at least {minimum}, got {value!r}")
    return kind(value)


_count = functools.partial(_seconds, kind=int)


def _exceptions(value, name):
    """retry_on: a tuple of exception classes (one class is fine); None stays None."""
    if value is None:
        return None
    value = (value,) if isinstance(value, type) else tuple(value)
    for cls in value:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"{name} must be exception classes, got {cls!r}")
    return value


_LIMITS = {  # what a task, a queue and the app each may set: its check, in _Limits' order
    "soft_timeout": _seconds,
    "hard_timeout": _seconds,
    "max_retries": _count,
    "retry_backoff": _seconds,
    "retry_on": _exceptions,
}


def _set_limits(obj, where, limits):
    """Check and set obj's limits, taken by name from limits (its locals())."""
    for name, check in _LIMITS.items():
        setattr(obj, name, check(limits.get(name), f"{name} of {where}"))


def _limits_for(app, task, queue, where=None):
    """Per setting, the first one set of the task's, the queue's and the app's. where: check
    that the hard timeout comes after the soft one, naming where."""

    def first(name):
        return next(
            (getattr(x, name) for x in (task, queue, app) if getattr(x, name, None) is not None),
            None,
        )

    soft, hard, retries, backoff, retry_on = map(first, _LIMITS)
    if where and soft is not None and hard is not None and hard <= soft:
        raise ValueError(
            f"{where}: hard_timeout ({hard:g}s) must be greater than soft_timeout ({soft:g}s)"
        )
    return _Limits(soft, hard, retries or 0, backoff or 0.0, retry_on or ())


def _concurrency(value, cores=None, name="concurrency"):
    """An int (at least 1), or arithmetic of `cores` such as "cores*2" or "cores - 1" (then at
    least 1, so that "cores - 1" on a one-core host is one child, not an error)."""
    if value is None:
        raise TypeError(f"{name} must be an int or an expression of cores, got None")
    if not isinstance(value, str):
        return _count(value, name, 1)
    try:  # eval of this alphabet (no names but cores, no "**") is safe
        if not re.fullmatch(r"(cores\b|[\d.]+|[-+*/ ()])+", value) or "**" in value:
            raise ValueError("only numbers, `cores`, parentheses and + - * / // are allowed")
        n = int(eval(value, {"__builtins__": {}}, {"cores": cores or os.cpu_count() or 1}))
    except Exception as e:  # SyntaxError, ArithmeticError, TypeError ("2(3)"), ...
        raise ValueError(f"bad {name} expression {value!r}: {e}") from None
    return max(n, 1)


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
        obj = importlib.import_module(spec)  # "examples.tasks": a module
    if isinstance(obj, types.ModuleType):  # "examples.tasks": forgot ":wakaq"
        names = [k for k, v in vars(obj).items() if type(v).__name__ == "WakaQ"] or ["APP"]
        raise ValueError(f"{spec} is a module; name its WakaQ: {obj.__name__}:{names[0]}")
    if isinstance(obj, WakaQ):
        return obj
    if type(obj).__name__ != "WakaQ":
        raise TypeError(f"{spec} is a {type(obj).__name__}, not a WakaQ")
    other = sys.modules.get(type(obj).__module__, sys)
    raise TypeError(
        f"{spec} is a WakaQ of another copy of wakaq ({other.__file__}), not of this one "
        f"({__file__}): run python -m {other.__name__}"
    )


# ============================================================================ serializer

_TAG = "__wakaq__"


def _naive_utc(o):
    return o if o.tzinfo is None else o.astimezone(timezone.utc).replace(tzinfo=None)


_TYPES = {  # TYPE: (Python types, encode, decode); datetime first (a datetime is a date)
    "datetime": (datetime, lambda o: _naive_utc(o).isoformat(), datetime.fromisoformat),
    "date": (date, date.isoformat, date.fromisoformat),
    "timedelta": (
        timedelta,
        lambda o: [o.days, o.seconds, o.microseconds],
        lambda v: timedelta(*v),
    ),
    "decimal": (decimal.Decimal, str, decimal.Decimal),
    "bytes": ((bytes, bytearray), lambda o: base64.b64encode(o).decode(), base64.b64decode),
}
# What decoding hostile bytes may raise (e.g. binascii.Error, decimal.InvalidOperation).
_BAD_PAYLOAD = (ValueError, TypeError, KeyError, RecursionError, ArithmeticError)


def _encode(o):
    """json default=: the types we carry beyond JSON; anything else is a TypeError."""
    for tag, (kind, encode, _) in _TYPES.items():
        if isinstance(o, kind):
            return {_TAG: tag, "v": encode(o)}
    if isinstance(o, (set, frozenset)):
        return list(o)
    raise TypeError(
        f"wakaq cannot serialize {type(o).__name__} value {o!r:.80}; pass JSON types, "
        "datetime, date, timedelta, Decimal, bytes, set or tuple"
    )


def _decode(d):
    """object_hook for {"__wakaq__": TYPE, "v": ...}; an unknown TYPE raises KeyError."""
    return _TYPES[d[_TAG]][2](d["v"]) if _TAG in d else d


# Compact JSON through CPython's C encoder, built once (json.dumps builds one per call, twice
# the cost of a small payload). Circular values raise RecursionError.
_encoder = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, _encode, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
)


def _dumps(o):
    return "".join(_encoder(o, 0))


def _loads(raw):
    """Decode a payload; object_hook only when a tag is present (it slows every dict)."""
    raw = raw.decode() if isinstance(raw, bytes) else raw
    return json.loads(raw, object_hook=_decode if _TAG in raw else None)


def _loads_msg(raw, decode=True):
    """A task payload, checked for shape, or one of _BAD_PAYLOAD; decode=False: keep tags. The
    checks are written out: a loop over a table of them costs a child a tenth more per task."""
    msg = _loads(raw) if decode else json.loads(raw)
    if not (
        type(msg) is dict
        and type(msg.get("id")) is str
        and type(msg.get("name")) is str
        and type(msg.get("queue")) is str
        and type(msg.get("retry")) is int
        and type(msg.get("args")) is list
        and type(msg.get("kwargs")) is dict
    ):
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


# ============================================================================ Redis scripts

# Shared by every script. P is the app's key prefix "{prefix}"; every key is P .. ':...'.
_LUA_LIB = """
local BUCKETS = {%(buckets)s}

-- Redis's clock, in seconds.
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

-- Add up to n wake-up tokens to the wake list `key` (at most %(wake)d there).
local function wake(key, n)
  local tokens = {}
  for i = 1, math.min(n, %(wake)d - redis.call('LLEN', key)) do tokens[i] = '1' end
  if #tokens > 0 then redis.call('RPUSH', key, unpack(tokens)) end
end

-- The id that starts every payload: {"id":"ID",...; its task's name.
local function id_of(payload)
  return string.match(payload, '^{"id":"([^"]*)"') or ''
end
local function name_of(payload)
  return string.match(payload, '"name":"([^"]*)"') or '?'
end

-- Queue `payload` on `queue` (of rank `rank`): at the 'back' or 'front' of its list, or
-- 'delay'ed until `due`. The id index records when it is (or becomes) ready.
local function push(P, queue, rank, payload, where, due)
  if where == 'delay' then
    redis.call('ZADD', P .. ':eta:' .. queue, due, payload)
    -- A new earliest due time: wake idle children, so that they wait until then.
    if redis.call('ZADD', P .. ':due', 'LT', 'CH', due, rank .. ':' .. queue) == 1 then
      wake(P .. ':wake:' .. queue, 3)
    end
  else
    redis.call(where == 'front' and 'LPUSH' or 'RPUSH', P .. ':q:' .. queue, payload)
    redis.call('ZADD', P .. ':ready', rank, queue)
    wake(P .. ':wake:' .. queue, 1)
  end
  redis.call('HSET', P .. ':ids:' .. queue, id_of(payload), due)
end

-- Was task `id` cancelled? Then forget the cancel (it is carried out now).
local any_cancelled = nil  -- whether any task is cancelled at all: asked once per call
local function cancelled(P, id)
  if any_cancelled == nil then any_cancelled = redis.call('EXISTS', P .. ':cancelled') == 1 end
  return any_cancelled and redis.call('HDEL', P .. ':cancelled', id) == 1
end

-- Count an outcome for `metrics`: with a duration, in its histogram bucket (1 = the first
-- of BUCKETS, #BUCKETS + 1 = +Inf), which counts the outcome too; else on its own.
local function count(P, outcome, queue, task, seconds)
  local stats, names = P .. ':stats', ' ' .. queue .. ' ' .. task
  if seconds == '' then
    redis.call('HINCRBY', stats, 'n ' .. outcome .. names, 1)
    return
  end
  local s, bucket = tonumber(seconds), #BUCKETS + 1
  for i, le in ipairs(BUCKETS) do
    if s <= le then bucket = i; break end
  end
  redis.call('HINCRBY', stats, 'b ' .. outcome .. ' ' .. bucket .. names, 1)
  redis.call('HINCRBY', stats, 'u' .. names, math.floor(s * 1e6))
end

-- Append a dead letter, keeping at most max_dead (0: no limit). -> how many were dropped.
local function bury(P, entry, max_dead)
  local n = redis.call('RPUSH', P .. ':dead', entry)
  if max_dead == 0 or n <= max_dead then return 0 end
  redis.call('LTRIM', P .. ':dead', n - max_dead, -1)
  return n - max_dead
end

-- The one release: end the attempt in `field` of in-flight hash `inflight` if it still holds
-- `token` (a late or repeated release changes nothing), then by `where`: '' ack, 'front',
-- 'back' or 'delay' queue `value` again (a broadcast goes back to worker `bcast`'s list),
-- 'dead' append the dead letter `value`, 'drop' nothing. A task cancelled meanwhile is
-- dropped, whatever `where` says. ARGV[i...] as named below; an ack stops after `seconds`.
-- -> {released, dead letters dropped}.
local function release(P, inflight, i, t)
  local field, token, id, outcome = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local queue, task, seconds = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local where, value, rank = ARGV[i + 7] or '', ARGV[i + 8], ARGV[i + 9]
  local delay, bcast = tonumber(ARGV[i + 10] or 0), ARGV[i + 11] or ''
  local max_dead = tonumber(ARGV[i + 12] or 0)
  -- Still ours? Then forget it, and count how it ended.
  if token ~= '' and redis.call('HGET', inflight, field .. ':t') ~= token then return {0, 0} end
  if redis.call('HDEL', inflight, field, field .. ':t', field .. ':s') == 0 then return {0, 0} end
  if outcome ~= '' then count(P, outcome, queue, task, seconds) end
  -- Cancelled while in flight: nothing more runs.
  if cancelled(P, id) and where ~= '' then
    if outcome ~= 'cancelled' then count(P, 'cancelled', queue, task, '') end
    return {1, 0}
  end
  if where == 'dead' then
    count(P, 'dead', queue, task, '')
    return {1, bury(P, value, max_dead)}
  elseif where == 'front' or where == 'back' or where == 'delay' then
    if outcome ~= '' then count(P, 'retried', queue, task, '') end
    if bcast ~= '' then
      redis.call(where == 'front' and 'LPUSH' or 'RPUSH', P .. ':bcast:' .. bcast, value)
      wake(P .. ':wake:' .. bcast, 1)
    else
      push(P, queue, rank, value, where, t + delay)
    end
  end
  return {1, 0}
end
""" % {"buckets": ", ".join(map(str, BUCKETS)), "wake": WAKE_TOKENS}


class _Script:
    """A Lua script: EVALSHA, or EVAL if Redis lost it. allow_oom: it may write when Redis is
    full (Redis 7), so that workers drain a full Redis."""

    def __init__(self, source, allow_oom=False):
        self.source = ("#!lua flags=allow-oom\n" if allow_oom else "") + _LUA_LIB + source
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def __call__(self, r, keys, args, **kw):  # kw: a _Conn's meanwhile=, after=
        try:
            return r.execute_command("EVALSHA", self.sha, len(keys), *keys, *args, **kw)
        except redis.exceptions.NoScriptError:  # meanwhile ran and after returned: not again
            return r.execute_command("EVAL", self.source, len(keys), *keys, *args)


# New tasks, and cron ticks (once per tick across schedulers).
# KEYS: the queue's list[, the schedule's cron record]. ARGV: rank, queue, mode ("" now, "in"
# seconds from now, "at" unix time, "cron" now), when (seconds, unix time, or the tick),
# payloads... -> how many were queued (0: the tick was enqueued already).
_ENQUEUE = _Script("""
local P = string.match(KEYS[1], '^(.-):q:')
local rank, queue, mode, when = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local first, n, t = 5, #ARGV - 4, now()
-- A cron tick: only if no scheduler enqueued it (or a later one) yet.
if mode == 'cron' then
  if tonumber(redis.call('GET', KEYS[2]) or 0) >= when then return 0 end
  redis.call('SET', KEYS[2], when)
end
local due = mode == 'in' and t + when or mode == 'at' and when or t
if due > t then
  -- Delayed: 1 microsecond apart, so that they come due in order.
  for i = first, #ARGV do push(P, queue, rank, ARGV[i], 'delay', due + (i - first) / 1e6) end
else
  -- Ready now: one push for all, indexed by id, with a wake-up token each.
  redis.call('RPUSH', P .. ':q:' .. queue, unpack(ARGV, first))
  redis.call('ZADD', P .. ':ready', rank, queue)
  wake(P .. ':wake:' .. queue, n)
  local index = {}
  for i = first, #ARGV do index[#index + 1] = id_of(ARGV[i]); index[#index + 1] = t end
  redis.call('HSET', P .. ':ids:' .. queue, unpack(index))
end
redis.call('HINCRBY', P .. ':stats', 'e ' .. queue, n)
return n
""")

# The hot path: ack the field's previous attempt, then claim the next task for it.
# KEYS: our in-flight hash, the served set. ARGV: new token, promote ('p': move due delayed
# tasks and look at broadcasts first), a queue to try first ('' none), ahead ('' or "FIELD
# TOKEN": a sync-only app's claim made ahead, as the task claimed in FIELD begins), then the
# field and the ack of its attempt that ended done (7 values, as release's; or field, '', '').
# -> the payload; or, nothing to claim, ms to the next due task (-1: none).
_CLAIM = _Script(
    """
local inflight, served = KEYS[1], KEYS[2]
local P, wid = string.match(inflight, '^(.-):inflight:(.*)$')
local new_token, promote, top, ahead = ARGV[1], ARGV[2] == 'p', ARGV[3], ARGV[4]
local field, done_token, done_id = ARGV[5], ARGV[6], ARGV[7]
local t = now()
local payload = false
local start = ahead == '' and t or ''  -- a claim made ahead has begun when the next one says

-- 0. Made ahead: it is sent as the task in field `begins` begins (or is released, unbegun:
--    then its fields go). Its start time says so: a task claimed ahead has none ('') until
--    then, and `info` does not list it as running.
if ahead ~= '' then
  local begins, token = string.match(ahead, '^(%%S+) (.*)$')
  if redis.call('HGET', inflight, begins .. ':t') == token then
    redis.call('HSET', inflight, begins .. ':s', t)
  end
end

-- 1. The field holds a claim that is not the one the child finished (its reply was lost,
--    or a dead child claimed late): hand it out again under the new token, unless cancelled.
local held = redis.call('HGET', inflight, field .. ':t')
if held and held ~= done_token then
  payload = redis.call('HGET', inflight, field)
  if not cancelled(P, id_of(payload)) then
    redis.call('HSET', inflight, field .. ':t', new_token, field .. ':s', start)
    return payload
  end
  redis.call('HDEL', inflight, field, field .. ':t', field .. ':s')
  count(P, 'cancelled', string.match(payload, '"queue":"([^"]*)"') or '?', name_of(payload), '')
  payload = false
elseif held then
  -- 2. The previous attempt ended done: count it (in the same script as its ack, so that
  --    no count is lost or made twice), and forget a cancel that came too late for it; its
  --    fields are overwritten by the next claim, or deleted at 6.
  count(P, 'done', ARGV[9], ARGV[10], ARGV[11])
  cancelled(P, done_id)
end

-- 3. An adopted (unregistered) worker claims nothing: a live worker took its in-flight hash
--    over, so a task claimed into it now would be nobody's.
if not redis.call('ZSCORE', P .. ':workers', wid) then
  if held then redis.call('HDEL', inflight, field, field .. ':t', field .. ':s') end
  return -1
end

-- 4. Every PROMOTE seconds: move due delayed tasks of up to 10 queues to their lists (so a
--    claim stays short however many queues are due; later claims move the rest).
if promote then
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', P .. ':due', '-inf', t, 'LIMIT', 0, 10)) do
    local rank, queue = string.match(member, '^(%%d+):(.*)$')
    local delayed = P .. ':eta:' .. queue
    local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', t, 'LIMIT', 0, %(batch)d)
    if #due > 0 then
      redis.call('RPUSH', P .. ':q:' .. queue, unpack(due))
      redis.call('ZREM', delayed, unpack(due))
      redis.call('ZADD', P .. ':ready', rank, queue)
      wake(P .. ':wake:' .. queue, #due)
    end
    local next_due = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')[2]
    if next_due then
      redis.call('ZADD', P .. ':due', next_due, member)
    else
      redis.call('ZREM', P .. ':due', member)
    end
  end
  payload = redis.call('LPOP', P .. ':bcast:' .. wid)
end

-- 5. The first task of the best-ranked served queue; cancelled ones are dropped here.
local function pop(queue)
  while true do
    local p = redis.call('LPOP', P .. ':q:' .. queue)
    if not p then return false end
    local id = id_of(p)
    redis.call('HDEL', P .. ':ids:' .. queue, id)
    if not cancelled(P, id) then return p end
    count(P, 'cancelled', queue, name_of(p), '')
  end
end
-- `top`: the child's last task came from the best-ranked queue it serves. Trying that queue
-- first skips the scan below while a backlog drains, and no served queue ranks above it.
if not payload and top ~= '' then payload = pop(top) end
-- Non-empty queues in rank order, 16 at a time. A served one found empty leaves the ready
-- set (the next push puts it back), so that later claims do not look at it again.
local offset = 0
while not payload do
  local names = redis.call('ZRANGE', P .. ':ready', offset, offset + 15)
  if #names == 0 then break end
  for _, queue in ipairs(names) do
    if redis.call('SISMEMBER', served, queue) == 1 then
      payload = pop(queue)
      if payload then break end
      redis.call('ZREM', P .. ':ready', queue)
      offset = offset - 1
    end
  end
  offset = offset + #names
end
payload = payload or redis.call('LPOP', P .. ':bcast:' .. wid)

-- 6. Nothing: empty the field, drop stale wake-ups, say when the next delayed task is due.
if not payload then
  if held then redis.call('HDEL', inflight, field, field .. ':t', field .. ':s') end
  local lists = {P .. ':wake:' .. wid}
  for _, queue in ipairs(redis.call('SMEMBERS', served)) do
    lists[#lists + 1] = P .. ':wake:' .. queue
  end
  redis.call('DEL', unpack(lists))
  local first_due = redis.call('ZRANGE', P .. ':due', 0, 0, 'WITHSCORES')[2]
  return first_due and math.max(0, (tonumber(first_due) - t) * 1000) or -1
end

-- 7. In flight under the new token, begun now (or, claimed ahead, not yet: '').
redis.call('HSET', inflight, field, payload, field .. ':t', new_token, field .. ':s', start)
return payload
"""
    % {"batch": DUE_BATCH},
    allow_oom=True,
)

# An attempt's release outside a claim. KEYS: our in-flight hash. ARGV: the release (7 or 13).
_RELEASE = _Script(
    """
local P = string.match(KEYS[1], '^(.-):inflight:')
return release(P, KEYS[1], 1, now())
""",
    allow_oom=True,
)

# The heartbeat. KEYS: workers, our in-flight hash, our served set. ARGV: our worker id,
# heartbeat_timeout, may adopt ('1': we were connected that long), served names...
# -> {{worker, tasks taken, ...}, silent workers cleared, adopted fields}
_BEAT = _Script(
    """
local workers, inflight, served = KEYS[1], KEYS[2], KEYS[3]
local wid, timeout, may_adopt = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local P = string.match(inflight, '^(.-):inflight:')
local t = now()
-- 1. We are alive, and serve these queues.
redis.call('ZADD', workers, t, wid)
redis.call('SADD', served, unpack(ARGV, 4))
redis.call('HSET', P .. ':served', wid, table.concat(ARGV, ',', 4))
-- 2. Silent workers, newest first: take their tasks and broadcasts as our "adopted:" fields
--    (the parent releases them as died); a silent worker without any is just cleared.
local adopted, cleared = {}, 0
if may_adopt then
  local silent = redis.call('ZREVRANGEBYSCORE', workers, t - timeout, '-inf', 'LIMIT', 0, %(batch)d)
  for _, w in ipairs(silent) do
    local held = redis.call('HGETALL', P .. ':inflight:' .. w)
    for i, payload in ipairs(redis.call('LRANGE', P .. ':bcast:' .. w, 0, -1)) do
      held[#held + 1], held[#held + 2] = 'b' .. i, payload
    end
    local n = 0
    for i = 1, #held, 2 do
      redis.call('HSET', inflight, 'adopted:' .. w .. ':' .. held[i], held[i + 1])
      if not string.find(held[i], ':') then n = n + 1 end
    end
    if n > 0 then
      adopted[#adopted + 1], adopted[#adopted + 2] = w, n
    else
      cleared = cleared + 1
    end
    redis.call('ZREM', workers, w)
    redis.call('HDEL', P .. ':served', w)
    local keys = {'inflight', 'bcast', 'wake', 'cancel'}
    for i, kind in ipairs(keys) do keys[i] = P .. ':' .. kind .. ':' .. w end
    redis.call('DEL', unpack(keys))
  end
end
-- 3. Adopted fields still waiting for their release.
local waiting = {}
for _, f in ipairs(redis.call('HKEYS', inflight)) do
  if string.sub(f, 1, 8) == 'adopted:' and not string.find(f, ':[ts]$') then
    waiting[#waiting + 1] = f
  end
end
return {adopted, cleared, waiting}
"""
    % {"batch": ADOPT_BATCH},
    allow_oom=True,
)

# KEYS: workers. ARGV: seconds, payload. To every worker heard from in those seconds.
_BROADCAST = _Script("""
local P = string.match(KEYS[1], '^(.-):workers$')
local recent = redis.call('ZRANGEBYSCORE', KEYS[1], now() - tonumber(ARGV[1]), '+inf')
for _, w in ipairs(recent) do
  redis.call('RPUSH', P .. ':bcast:' .. w, ARGV[2])
  wake(P .. ':wake:' .. w, 1)
end
return #recent
""")

# KEYS: workers. ARGV: id, the app's queue names... -> 'running', 'delayed', 'pending',
# 'dead' or false. A queued task is dropped when claimed; a running one is interrupted by its worker
# (which polls its cancel set) and dropped at its release.
_CANCEL = _Script("""
local P = string.match(KEYS[1], '^(.-):workers$')
local id, t = ARGV[1], now()
-- Running (or held) by a worker: tell that worker which field and token.
for _, w in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local held = redis.call('HGETALL', P .. ':inflight:' .. w)
  for i = 1, #held, 2 do
    if id_of(held[i + 1]) == id and not string.find(held[i], ':') then
      local token = redis.call('HGET', P .. ':inflight:' .. w, held[i] .. ':t') or ''
      redis.call('HSET', P .. ':cancelled', id, '')
      redis.call('SADD', P .. ':cancel:' .. w, held[i] .. ' ' .. token)
      return 'running'
    end
  end
end
-- Queued or delayed: dropped when claimed.
for i = 2, #ARGV do
  local ready_at = redis.call('HGET', P .. ':ids:' .. ARGV[i], id)
  if ready_at then
    redis.call('HDEL', P .. ':ids:' .. ARGV[i], id)
    redis.call('HSET', P .. ':cancelled', id, ARGV[i])
    return tonumber(ready_at) > t and 'delayed' or 'pending'
  end
end
-- A dead letter (there are at most max_dead): removed.
local prefix = '{"id": "' .. id .. '"'
for _, entry in ipairs(redis.call('LRANGE', P .. ':dead', 0, -1)) do
  if string.sub(entry, 1, #prefix) == prefix then
    redis.call('LREM', P .. ':dead', 1, entry)
    return 'dead'
  end
end
return false
""")

# Moves payloads from a list or zset to a queue, delayed set or the dead letters (dead
# --requeue, migrate). KEYS: the source. ARGV: 'list' or 'zset', rank, queue, then triples
# (raw, due, payload): if raw is still in the source, remove it and push payload: due '' to
# the queue, 'dead' to the dead letters, else delayed until due. -> how many moved.
_MOVE = _Script("""
local P = string.match(KEYS[2], '^(.-):')
local kind, rank, queue, t = ARGV[1], ARGV[2], ARGV[3], now()
local n = 0
for i = 4, #ARGV, 3 do
  local raw, due, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local removed
  if kind == 'list' then
    removed = redis.call('LREM', KEYS[1], 1, raw)
  else
    removed = redis.call('ZREM', KEYS[1], raw)
  end
  if removed == 1 then
    n = n + 1
    if due == 'dead' then
      bury(P, payload, 0)
    elseif due == '' then
      push(P, queue, rank, payload, 'back', t)
    else
      push(P, queue, rank, payload, 'delay', tonumber(due))
    end
  end
end
return n
""")


# ============================================================================ Redis connections

# Errors after which a connection is dropped and made anew: an outage, or a topology change
# (a failover demoted the master: READONLY; a Cluster slot moved: MOVED), which Redis refused
# before applying the command.
_REFUSED = (redis.exceptions.ReadOnlyError, redis.exceptions.MovedError)
_RECONNECT = (redis.ConnectionError, redis.TimeoutError, *_REFUSED)


def _pack(args):
    """RESP bulk strings, as redis-py's packer writes them, at a third of its cost."""
    args = [a if type(a) is bytes else str(a).encode() for a in args]
    return b"".join([b"$%d\r\n%s\r\n" % (len(a), a) for a in args])


class _Conn:
    """One connection outside redis-py's pool, for the child's claims and for .delay():
    commands are packed here (a script's name and keys once per connection), replies are
    read by redis-py's parser (hiredis when installed). `resend`: a command Redis refused
    (READONLY, MOVED) or that could not be sent goes once more on a new connection; one
    whose reply was lost is never resent, so a write is not applied twice."""

    def __init__(self, app, resend=False):
        self.app = app
        self.resend = resend
        self.conn = None  # made on first use, and again after a reset()
        self.heads = {}  # a script's packed name and keys, per (EVALSHA, sha, n, *keys)
        self.sent = False  # did the last command reach Redis whole?

    def execute_command(self, *args, meanwhile=None, after=()):
        """Send, run meanwhile() while Redis works, read the reply. after: a command sent
        first, whose reply is read and dropped: Redis runs ours once it returns (a BLPOP)."""
        n = 3 + args[2] if args[0] == "EVALSHA" else 0
        head = self.heads.get(args[:n])
        if head is None:
            head = self.heads[args[:n]] = _pack(args[:n])
        data = b"*%d\r\n%s%s" % (len(args), head, _pack(args[n:]))
        if after:
            data = b"*%d\r\n%s%s" % (len(after), _pack(after), data)
        try:
            return self._round_trip(data, meanwhile, after)
        except (redis.ConnectionError, *_REFUSED) as e:  # not a timeout: it may have waited long
            if not self.resend or (self.sent and not isinstance(e, _REFUSED)):
                raise
        return self._round_trip(data, meanwhile, after)

    def _round_trip(self, data, meanwhile, after):
        self.sent = False
        try:
            if self.conn is None:
                blocking = max(self.app.socket_timeout, self.app.wait_timeout + 5)  # BLPOP
                client = self.app._client(retries=0, timeout=None if self.resend else blocking)
                self.conn = client.connection_pool.make_connection()
                self.conn.connect()  # a Sentinel's connection asks for the master here
            elif self.resend and self.conn.can_read(timeout=0):  # closed by Redis meanwhile
                raise redis.ConnectionError("the connection was closed")
            self.conn.send_packed_command([data])
            self.sent = True
            if after:
                with contextlib.suppress(redis.ResponseError):  # refused: ours ran at once
                    self.conn.read_response()  # (and its own reply says if it was refused)
            if meanwhile:
                meanwhile()
            return self.conn.read_response()
        except _REFUSED:
            self.reset()
            raise
        except redis.ResponseError:
            raise  # any other error reply was read whole: the connection is still in step
        except BaseException:
            self.reset()  # cut off midway, or lost: never read a stale reply later
            raise

    def reset(self):
        if self.conn is not None:
            self.conn.disconnect()
        self.conn = None
        if self.app._cluster:  # a slot may have moved: ask the topology anew
            self.app._redis = None


class _Outage:
    """The one outage rule, for every process: an episode begins with the first Redis step
    that fails and ends with the next one that succeeds (a real command, not a PING). Each
    kind of failure is logged once per episode: a lost connection as "lost Redis", an error
    reply as that error. Retries back off from 0.1 s to `cap` seconds."""

    def __init__(self, who, cap=5.0):
        self.who, self.cap, self.delay, self.seen = who, cap, 0.0, set()

    def failed(self, e):
        """Log e once per kind per episode; -> seconds to wait before the next try."""
        lost = isinstance(e, (redis.ConnectionError, redis.TimeoutError))
        kind = "lost" if lost else type(e).__name__
        if kind not in self.seen:
            self.seen.add(kind)
            text = "%s lost Redis (%s)" if lost else f"%s: Redis refused ({kind}: %s)"
            log.warning(text + "; retrying with backoff", self.who, e)
        self.delay = min(max(self.delay * 2, 0.1), self.cap)
        return self.delay

    def ok(self):
        if self.seen:
            log.info("%s: Redis answers again", self.who)
        self.seen.clear()
        self.delay = 0.0


def _sentinel_master(url, kw):
    """redis+sentinel://[user:pass@]host:port[,...]/SERVICE[/DB]: SERVICE's master, now or later."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    service, _, db = parts.path.strip("/").partition("/")
    if not service or "/" in db:
        raise ValueError(f"want redis+sentinel://host:port[,...]/SERVICE[/DB], got {_mask(url)!r}")
    hosts = [
        (h.partition(":")[0], int(h.partition(":")[2] or 26379))
        for h in parts.netloc.rpartition("@")[2].split(",")
    ]
    del kw["retry"]
    sentinel = redis.Sentinel(
        hosts, sentinel_kwargs={"socket_timeout": kw["socket_connect_timeout"]}, **kw
    )
    auth = {
        k: unquote(v) for k, v in (("username", parts.username), ("password", parts.password)) if v
    }
    return sentinel.master_for(service, db=int(db or 0), **auth)  # else WakaQ's own, if any


def _mask(url):
    """The URL with its password (user:PASSWORD@, ?password=) as ***."""
    return re.sub(
        r"(://[^:/@]*:)[^/]*@|(password=)[^&]*",
        lambda m: f"{m[1]}***@" if m[1] else "password=***",
        str(url),
    )


# ============================================================================ Queue, CronTask, Task


class Queue:
    """A named list of tasks. Lower priority number = served first."""

    def __init__(
        self,
        name: str,
        priority: Optional[int] = None,
        max_retries: Optional[int] = None,
        soft_timeout: Any = None,
        hard_timeout: Any = None,
        retry_backoff: Any = None,
        retry_on: Any = None,
        prefix: str = "wakaq",
    ):
        if not isinstance(name, str) or not _QUEUE_NAME.match(name):
            raise ValueError(f"queue name must be letters, digits, _ . or -, got {name!r}")
        self.name, self.priority = (name, _count(priority, f"priority of queue {name!r}", -(2**31)))
        # The original WakaQ's key prefix of this queue: where `migrate` looks.
        self.prefix = re.sub(r"[^A-Za-z0-9_.\-]", "", prefix or "wakaq")
        _set_limits(self, f"queue {name!r}", locals())


def _coerce_queue(q):
    if isinstance(q, (tuple, list)) and len(q) == 2:  # the original's (name, priority) too
        return Queue(*q) if isinstance(q[0], str) else Queue(q[1], priority=q[0])
    if isinstance(q, str):
        return Queue(q)
    if not isinstance(q, Queue):
        raise TypeError(f"a queue is a Queue, a (priority, name) tuple or a name, got {q!r}")
    return q


class CronTask:
    """Enqueue `task_name` on `queue` when `schedule` matches (in the app's timezone): 5 fields,
    or 6 with seconds LAST ("* * * * * */10": every 10 s). Time zones, missed ticks: _due."""

    def __init__(self, schedule, task_name, queue=None, args=None, kwargs=None):
        fields = len(schedule.split()) if isinstance(schedule, str) else 0
        if fields not in (5, 6) or not croniter.is_valid(schedule):
            raise ValueError(f"bad cron expression {schedule!r} (5 fields, or 6 with seconds)")
        if not isinstance(task_name, str):
            raise TypeError(f"CronTask task_name must be a str, got {task_name!r}")
        self.schedule, self.task_name, self.queue = schedule, task_name, queue
        self.args, self.kwargs = list(args or ()), dict(kwargs or {})
        _check_keys([self.args, self.kwargs])
        _dumps([self.args, self.kwargs])  # TypeError now, not at the first tick


class Task(Generic[P, R]):
    """A registered task: call it to run here and now, .delay() to enqueue it."""

    def __init__(self, app: WakaQ, fn: Callable[P, R], name: str, queue, **limits):
        functools.update_wrapper(self, fn)  # __name__, __qualname__, __module__, __doc__
        self.app, self.fn, self.name, self._json_name = app, fn, name, json.dumps(name)
        self.queue = app._queue(queue) if queue is not None else None
        _set_limits(self, f"task {name!r}", limits)
        _limits_for(app, self, self.queue or app.default_queue, f"task {name!r}")
        self.is_async = inspect.iscoroutinefunction(fn)
        #: What wakaq (or a wrapper) calls: fn under the _call_task frame, fn's name and doc.
        # (an async one as it is: its soft timeout cancels its asyncio task instead).
        marked = functools.update_wrapper(functools.partial(_call_task, fn), fn)
        self.call = fn if self.is_async else marked

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Enqueue one call; returns its id. Also takes queue= (a queue name) and eta= (seconds,
        a timedelta or a datetime; naive = UTC), which are not passed to the task."""
        queue, eta = kwargs.pop("queue", None), kwargs.pop("eta", None)
        return self.app._enqueue(self, [(args, kwargs)], queue, eta)[0]

    def delay_many(self, calls, queue=None, eta=None) -> list[str]:
        """Enqueue calls (tuples of args, or {"args": [...], "kwargs": {...}}); returns the ids."""
        items = [
            (c.get("args", ()), c.get("kwargs", {})) if isinstance(c, dict) else (c, {})
            for c in calls
        ]
        return self.app._enqueue(self, items, queue, eta)

    def broadcast(self, *args: P.args, **kwargs: P.kwargs) -> int:
        """Run once on every live worker (in one of its children); returns how many."""
        return self.app._broadcast(self, args, kwargs)


# ============================================================================ the app


class WakaQ:
    """The app: queues, settings, the task registry and the Redis connection."""

    def __init__(
        self,
        queues=("default",),
        url=None,
        host=None,
        port=None,
        db=None,
        username=None,
        password=None,
        concurrency="cores",
        exclude_queues=(),
        soft_timeout=None,
        hard_timeout=None,
        max_retries=None,
        max_mem_percent=None,
        max_tasks_per_worker=None,
        heartbeat_timeout=60,
        schedules=(),
        timezone=None,
        eager=False,
        worker_log_file=None,
        scheduler_log_file=None,
        worker_log_level=logging.INFO,
        scheduler_log_level=logging.INFO,
        prefix="wakaq",
        async_concurrency=0,
        retry_backoff=None,
        retry_on=None,
        max_dead=MAX_DEAD,
        wait_replicas=0,
        wait_timeout=None,
        socket_timeout=None,
        socket_connect_timeout=None,
        health_check_interval=0,
    ):
        self._set_queues(queues, exclude_queues)
        self.concurrency = _concurrency(concurrency)
        # async_concurrency 0 (the original's "no limit"): 10, so one child cannot hoard a queue.
        self.async_concurrency = _concurrency(async_concurrency or 10, name="async_concurrency")
        _set_limits(self, "WakaQ", locals())
        for q in [None, *self.queues]:
            _limits_for(self, None, q, f"queue {q.name!r}" if q else "WakaQ")
        self.max_tasks_per_worker = _count(max_tasks_per_worker, "max_tasks_per_worker", 1)
        self.max_dead = _count(max_dead, "max_dead", 1)
        self.wait_replicas = _count(wait_replicas, "wait_replicas")
        self.heartbeat_timeout = _seconds(heartbeat_timeout, "heartbeat_timeout")
        if not self.heartbeat_timeout:
            raise ValueError(f"heartbeat_timeout must be above 0, got {heartbeat_timeout!r}")
        self.wait_timeout = _seconds(wait_timeout, "wait_timeout") or IDLE_WAIT
        self.socket_timeout = _seconds(socket_timeout, "socket_timeout") or 10.0
        self.socket_connect_timeout = (
            _seconds(socket_connect_timeout, "socket_connect_timeout") or 5.0
        )
        self.health_check_interval = _seconds(health_check_interval, "health_check_interval") or 0
        m = self.max_mem_percent = max_mem_percent
        if m is not None and (type(m) not in (int, float) or not 1 <= m <= 99):
            raise ValueError(f"max_mem_percent must be from 1 to 99, got {m!r}")
        try:
            self.tz = ZoneInfo(timezone or "UTC")
        except (ValueError, KeyError, OSError, TypeError) as e:  # not found: a KeyError
            raise ValueError(f"unknown timezone {timezone!r} (an IANA name): {e}") from None
        self._set_schedules(schedules)
        if not isinstance(eager, bool):
            raise TypeError(f"eager must be True or False, got {eager!r}")
        self.eager = eager
        self.worker_log_file, self.scheduler_log_file = (worker_log_file, scheduler_log_file)
        self.worker_log_level = _log_level(worker_log_level, "worker_log_level")
        self.scheduler_log_level = _log_level(scheduler_log_level, "scheduler_log_level")
        self._set_redis(url, host, port, db, username, password)
        if not isinstance(prefix, str) or not _QUEUE_NAME.match(prefix):
            raise ValueError(f"prefix must be letters, digits, _ . or -, got {prefix!r}")
        self.prefix = prefix
        for q in self.queues:
            q.key, q.eta_key, q.wake_key = (self._k(k, q.name) for k in ("q", "eta", "wake"))
        self.dead_key, self.workers_key = self._k("dead"), self._k("workers")
        self.tasks: dict[str, Task] = {}
        self._hooks: dict[str, list] = collections.defaultdict(list)
        self._redis = self._redis_pid = self._cluster = None
        self._nodes: list = []

    def _set_queues(self, queues, exclude_queues):
        if isinstance(queues, (str, Queue)) or not queues:
            raise TypeError(f"queues must be a non-empty list, got {queues!r}")
        qs = [_coerce_queue(q) for q in queues]
        self._queues = {q.name: q for q in qs}
        if len(self._queues) != len(qs):
            raise ValueError(f"duplicate queue names in {[q.name for q in qs]!r}")
        # Plain names rank below all numbered queues, in their order (the sort is stable).
        self.queues = sorted(qs, key=lambda q: (q.priority is None, q.priority or 0))
        self._priority, last = {}, -1
        for q in self.queues:  # a plain name's priority: one more than the one before it
            last = last + 1 if q.priority is None else q.priority
            self._priority[q.name] = last
        self._rank = {q: i for i, q in enumerate(self.queues)}  # 0 is served first
        self.default_queue = self.queues[-1]
        excluded = [exclude_queues] if isinstance(exclude_queues, str) else exclude_queues
        self.exclude_queues = self._served_names(excluded)[1]

    def _served_names(self, excluded):
        """(served, excluded) queue names; at least one queue must be served."""
        excluded = list(dict.fromkeys(self._queue(n).name for n in excluded))
        served = [q.name for q in self.queues if q.name not in excluded]
        if not served:
            raise ValueError(f"exclude_queues {excluded!r} leaves no queue to serve")
        return served, excluded

    def _set_schedules(self, schedules):
        self.schedules = []
        for cron in schedules:
            if isinstance(cron, (tuple, list)) and len(cron) in (2, 4):  # the original's tuples
                cron = CronTask(*cron[:2], None, *cron[2:])
            if not isinstance(cron, CronTask):
                raise TypeError(f"schedules holds CronTask objects or tuples, got {cron!r}")
            self._queue(self.default_queue if cron.queue is None else cron.queue)
            self.schedules.append(cron)

    def _set_redis(self, url, host, port, db, username, password):
        if url and (host, port, db) != (None, None, None):
            raise TypeError(f"give url={_mask(url)!r} or host/port/db={(host, port, db)!r}")
        if url and not re.match(r"(redis|rediss|unix|redis\+sentinel)://", str(url)):
            raise ValueError(f"url {_mask(url)!r}: use redis, rediss, unix or redis+sentinel")
        host = f"[{host}]" if host and ":" in host else host or "localhost"  # IPv6
        self.url = url or f"redis://{host}:{port or 6379}/{db or 0}"
        # username=/password=: used unless the URL has its own.
        self._auth = {k: v for k, v in (("username", username), ("password", password)) if v}

    @overload
    def task(self, fn: Callable[P, R]) -> Task[P, R]: ...

    @overload
    def task(
        self, fn: None = None, *, name: Optional[str] = None, queue: Optional[str] = None, **limits
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, fn=None, *, name=None, queue=None, **limits):
        """Register a task: @wakaq.task, or @wakaq.task(queue=..., max_retries=...,
        soft_timeout=..., hard_timeout=..., retry_backoff=..., retry_on=...)."""
        unknown = set(limits) - set(_LIMITS)
        if unknown:
            raise TypeError(f"unknown task option(s) {sorted(unknown)}; options: {list(_LIMITS)}")

        def register(fn):
            task = Task(self, fn, name or fn.__name__, queue, **limits)
            if self.tasks.setdefault(task.name, task) is not task:
                raise ValueError(f"a task named {task.name!r} is already registered")
            return task

        return register(fn) if fn is not None else register

    def _hook(self, kind, fn=None):
        if fn is None:
            return functools.partial(self._hook, kind)
        if kind == "wrap_tasks_with" and self._hooks[kind]:
            raise ValueError(f"wrap_tasks_with is already {self._hooks[kind][0]!r}: merge them")
        self._hooks[kind].append(fn)
        return fn

    # Each a decorator, with or without parentheses. async def hooks are awaited.
    after_worker_started = functools.partialmethod(_hook, "after_worker_started")  # each child
    before_task_started = functools.partialmethod(_hook, "before_task_started")
    after_task_finished = functools.partialmethod(_hook, "after_task_finished")
    wrap_tasks_with = functools.partialmethod(_hook, "wrap_tasks_with")  # wrapper(fn, args, kwargs)

    def _k(self, *parts):
        """A key name: "{prefix}:a:b" (the hash tag puts all of the app's keys in one slot)."""
        return "{%s}:%s" % (self.prefix, ":".join(parts))

    def _queue(self, name):
        name = name.name if isinstance(name, Queue) else name
        if name not in self._queues:
            raise ValueError(f"unknown queue {name!r}; the app has {list(self._queues)!r}")
        return self._queues[name]

    def _client(self, retries=2, timeout=None):
        """A new client on the node with the app's keys; timeout: its socket timeout (default:
        socket_timeout)."""
        kw = dict(
            self._auth,
            socket_connect_timeout=self.socket_connect_timeout,
            retry=redis.retry.Retry(redis.backoff.ExponentialBackoff(0.5, 0.05), retries),
            socket_timeout=timeout or self.socket_timeout,
            health_check_interval=self.health_check_interval,
        )
        if self.url.startswith("redis+sentinel://"):
            return _sentinel_master(self.url, kw)
        client = redis.Redis.from_url(self.url, **kw)
        if self._cluster is None:
            self._cluster = client.info("cluster").get("cluster_enabled") == 1
        if self._cluster:
            client.close()
            client = self._cluster_node(kw)
        return client

    def _cluster_node(self, kw):
        if redis.connection.parse_url(self.url).get("db"):
            raise ValueError(f"a Redis Cluster has only db 0, not that of {_mask(self.url)}")
        kw.pop("health_check_interval")
        kw["startup_nodes"] = [redis.cluster.ClusterNode(*n) for n in self._nodes]
        cluster = redis.RedisCluster.from_url(self.url, **kw)
        self._nodes = [(n.host, n.port) for n in cluster.get_nodes()]
        return cluster.get_node_from_key(self._k("q")).redis_connection

    @property
    def _conn(self):
        """This thread's bare connection for enqueues (one per app, per thread, per process)."""
        conns = _local.__dict__.setdefault("conns", {})
        key = (self, os.getpid())
        return conns.get(key) or conns.setdefault(key, _Conn(self, resend=True))

    @property
    def redis(self) -> redis.Redis:
        """This process's client (a new one after fork) on the node that holds the app's keys."""
        if self._redis is None or self._redis_pid != os.getpid():
            self._redis, self._redis_pid = self._client(), os.getpid()
        return self._redis

    broker = redis  # the original WakaQ's name for the app's Redis client

    def _payload(self, task, args, kwargs, queue, bcast=False):
        """(id, payload): the JSON built by hand around the arguments (twice as fast)."""
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
            raise TypeError(f"{task.name}: want args a list, kwargs a dict: {args!r}, {kwargs!r}")
        try:
            _check_keys([args, kwargs])
            args, kwargs = _dumps(args), _dumps(kwargs) if kwargs else "{}"
        except RecursionError:
            raise TypeError(f"{task.name}: its arguments are circular or too deep") from None
        msg_id, tail = os.urandom(12).hex(), ',"bcast":1}' if bcast else "}"  # 96 random bits
        return msg_id, (
            f'{{"id":"{msg_id}","name":{task._json_name},"queue":"{queue.name}",'
            f'"retry":0,"args":{args},"kwargs":{kwargs}{tail}'
        )

    def _enqueue(self, task, calls, queue, eta):
        q = (task.queue or self.default_queue) if queue is None else self._queue(queue)
        if queue is not None:
            _limits_for(self, task, q, f"task {task.name!r} on queue {q.name!r}")
        built = [self._payload(task, a, k, q) for a, k in calls]  # TypeError before any push
        ids = [i for i, _ in built]
        if self.eager:  # the same serializer round trip and current_task() as in a worker
            for _, raw in built:
                _run_eagerly(self, task, _loads(raw))
            return ids
        head = [self._rank[q], q.name, *_eta(eta)]
        for start in range(0, len(built), BULK_CHUNK):  # one round trip per 1,000
            chunk = [raw for _, raw in built[start : start + BULK_CHUNK]]
            _ENQUEUE(self._conn, [q.key], head + chunk)
        self._wait_replicas(ids)
        return ids

    def _wait_replicas(self, ids):
        """wait_replicas: return only once that many replicas have the writes (Redis WAIT)."""
        if not self.wait_replicas:
            return
        timeout_ms = int(self.socket_timeout * 900)  # within the socket's timeout
        acked = self._conn.execute_command("WAIT", self.wait_replicas, timeout_ms)
        if acked < self.wait_replicas:
            raise WakaQError(
                f"only {acked} of wait_replicas={self.wait_replicas} replicas acknowledged "
                f"task(s) {', '.join(ids)} (they may still be queued on the master)"
            )

    def _broadcast(self, task, args, kwargs):
        if self.eager:
            return len(self._enqueue(task, [(args, kwargs)], None, None))
        msg_id, raw = self._payload(task, args, kwargs, task.queue or self.default_queue, True)
        n = _BROADCAST(self._conn, [self.workers_key], [self.heartbeat_timeout, raw])
        self._wait_replicas([msg_id])
        return n

    def cancel(self, task_id: str) -> Optional[str]:
        """Cancel a task by id: a pending or delayed one never runs, a running one gets
        Cancelled raised in its code, a dead letter is removed. -> "pending", "delayed",
        "running", "dead", or None if no task has that id."""
        if not isinstance(task_id, str) or not task_id:
            raise TypeError(f"a task id is a non-empty str, got {task_id!r}")
        found = _CANCEL(self.redis, [self.workers_key], [task_id, *self._queues])
        return found.decode() if found else None


def _eta(eta):
    """-> ("", 0): now, ("in", seconds from now by Redis's clock), ("at", unix time; naive UTC)."""
    if isinstance(eta, datetime):
        return "at", _naive_utc(eta).replace(tzinfo=timezone.utc).timestamp()
    if eta is None:
        return "", 0
    seconds = _seconds(eta, "eta (seconds, timedelta, datetime)", -float("inf"))
    return "in", max(seconds, 0.0)  # in the past: now


def _log_level(value, name):
    level = logging.getLevelName(value.upper()) if isinstance(value, str) else value
    if not isinstance(level, int) or isinstance(level, bool):
        raise ValueError(f"{name} must be a logging level such as 'INFO', got {value!r}")
    return level


def _dead_entry(raw, msg, reason):
    """A dead letter: JSON {id, name, queue, attempts, reason, at, payload}."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    msg = msg or {}
    entry = {k: msg.get(k) for k in ("id", "name", "queue")}
    entry.update(attempts=msg.get("retry", 0) + 1, reason=reason, at=time.time(), payload=text)
    return json.dumps(entry)


def _run_eagerly(app, task, msg):
    """eager=True: run the task here and now, hooks included; its exception propagates."""
    attempt = _Attempt(task=task, msg=msg, field="", token="", raw="", queue=None)
    coro = _run_attempt(app, attempt, None)
    if not (task.is_async or _async_hooks(app)):
        outcome = _by_hand(coro)
    elif not _loop_running():
        outcome = asyncio.run(coro)
    else:  # called from async code: run it on a loop of its own, in a thread
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            outcome = pool.submit(asyncio.run, coro).result()
    if outcome.error is not None:
        raise outcome.error


def _loop_running():
    try:
        return bool(asyncio.get_running_loop())
    except RuntimeError:
        return False


def _async_hooks(app):
    """Does any hook or the wrapper await? Then a sync task's attempt needs an event loop."""
    hooks = ("before_task_started", "after_task_finished", "wrap_tasks_with")
    return any(inspect.iscoroutinefunction(h) for kind in hooks for h in app._hooks[kind])


def _by_hand(coro):
    """Run a sync task's attempt without an event loop: its hooks and wrapper await nothing."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    try:  # a plain function returned an awaitable after all: end the attempt with that error
        coro.throw(WakaQError("a hook that is not `async def` returned an awaitable"))
    except StopIteration as e:
        return e.value
    raise WakaQError("the attempt did not end")


# ============================================================================ attempts


class _Outcome(NamedTuple):
    """How an attempt ended. kind: done, raised, soft_timeout, hard_timeout, worker_died,
    cancelled (the outcomes `metrics` counts), or "interrupted" (it never started, or a
    stop or another task's hard timeout cut it: it goes back to the front, no retry spent)."""

    kind: str
    reason: str = ""  # for the log line and the dead letter: "soft timeout", "raised X: y"
    retry: bool = False  # a failed attempt that may be retried (by max_retries)
    error: Optional[BaseException] = None  # the exception, when the task raised one


_DONE = _Outcome("done")


class _Attempt:
    """One claimed payload on its way through _run_attempt; `future` for an async one."""

    def __init__(self, task, msg, field, token, raw, queue, limits=None, index=0, claim=0):
        self.task, self.msg, self.field, self.token, self.raw = task, msg, field, token, raw
        self.queue, self.limits, self.index, self.claim = queue, limits, index, claim
        self.start, self.future, self.interrupt, self.ended = time.monotonic(), None, None, False


def _call_task(fn, *args, **kwargs):
    """The frame right above a task's code (Task.call): soft timeouts and cancels are raised
    only in frames called from here, whoever calls it (wakaq, or a wrap_tasks_with wrapper)."""
    return fn(*args, **kwargs)


def _landing(frame):
    """Where a soft timeout or cancel signalled in `frame` may be raised: "now" if `frame`
    and every frame out to _call_task are the task's own; the outermost logging, asyncio or
    wakaq frame below the task's code if one sits between (raise as it returns: inside it
    the exception would be swallowed or land in the wrong place); None outside the task."""
    f, guard = frame, None
    while f is not None and f.f_code is not _call_task.__code__:
        module = f.f_globals.get("__name__", "")
        if f.f_globals is globals() or module.partition(".")[0] in ("logging", "asyncio"):
            guard = f
        f = f.f_back
    if f is None or f is frame:
        return None
    return guard or "now"


def _no_trace(frame, event, arg):
    return None


async def _settle(value):
    return await value if inspect.isawaitable(value) else value


async def _run_attempt(app, attempt, child):
    """The one attempt runner, for sync and async tasks alike: the before hooks, the wrapper
    and the task, then the after hooks; one exception rule (_outcome_of). `child` (None when
    eager) clears the deadlines before the after hooks and frees the field in `finally`."""
    task, msg, hooks = attempt.task, attempt.msg, app._hooks
    context, outcome = _current.set(msg), None
    try:
        for hook in hooks["before_task_started"]:
            await _settle(hook())
        if hooks["wrap_tasks_with"]:
            result = hooks["wrap_tasks_with"][0](task.call, msg["args"], msg["kwargs"])
        else:
            result = task.call(*msg["args"], **msg["kwargs"])
        if inspect.isawaitable(result):
            await result
        outcome = _DONE
    except (Exception, asyncio.CancelledError) as e:
        outcome = _outcome_of(e, attempt)
        if child and outcome.kind == "raised":
            log.error("task %s raised (id=%s)", msg["name"], msg["id"], exc_info=e)
    finally:
        if child:
            child.attempt_ended(attempt, outcome is _DONE)
        if hooks["after_task_finished"]:
            await _after_hooks(app)
        if child:
            del child.attempts[attempt.field]
        _current.reset(context)
    return outcome


def _outcome_of(error, attempt):
    """The one exception rule: how an attempt whose task raised `error` ended."""
    if isinstance(error, asyncio.CancelledError) and attempt.interrupt:
        error = attempt.interrupt  # we cancelled an async task: a soft timeout, or a cancel
    if isinstance(error, SoftTimeout):
        return _Outcome("soft_timeout", "soft timeout", True, error)
    if isinstance(error, Cancelled):
        return _Outcome("cancelled", "cancelled", False, error)
    first_line = (str(error).strip().splitlines() or [""])[0]
    reason = f"raised {type(error).__name__}: {first_line}".rstrip(": ")
    retry = attempt.limits is not None and isinstance(error, attempt.limits.retry_on)
    return _Outcome("raised", reason, retry, error)


async def _after_hooks(app):
    for hook in app._hooks["after_task_finished"]:
        try:
            await _settle(hook())
        except (Exception, asyncio.CancelledError):  # (a cancel that came as the task ended)
            log.exception("after_task_finished hook %r raised", hook)


def _next_step(app, raw, msg, outcome, own_bcast):
    """The retry rule: (where, value, delay, queue) for a payload whose attempt ended so.
    where: "" ack, "front", "back", "delay", "dead" or "drop". own_bcast: our worker id, so a
    broadcast of ours is retried in our list (an adopted one is dead-lettered)."""
    queue = msg and app._queues.get(msg["queue"])
    if outcome.kind == "done":
        return "", "", 0.0, queue
    if outcome.kind == "cancelled":
        return "drop", "", 0.0, queue
    retry = outcome.retry or outcome.kind == "interrupted"
    if queue is None or (msg.get("bcast") and not own_bcast) or not retry:
        return "dead", _dead_entry(raw, msg, outcome.reason), 0.0, queue
    if outcome.kind == "interrupted":
        return "front", raw, 0.0, queue
    limits = _limits_for(app, app.tasks.get(msg["name"]), queue)
    if msg["retry"] >= limits.retries:
        return "dead", _dead_entry(raw, msg, outcome.reason), 0.0, queue
    retried = json.dumps({**msg, "retry": msg["retry"] + 1}, separators=(",", ":"))
    if not limits.backoff or msg.get("bcast"):
        return "back", retried, 0.0, queue
    jitter = random.uniform(0.75, 1.25)
    delay = min(MAX_BACKOFF, limits.backoff * 2 ** min(msg["retry"], 32) * jitter)
    return "delay", retried, delay, queue


def _release_args(app, field, token, raw, outcome, seconds, own_bcast):
    """The release of one attempt as _RELEASE's arguments: 7 for an ack, 13 otherwise (see
    release in _LUA_LIB). raw is read again, its tagged values kept as they are."""
    try:
        msg = _loads_msg(raw, decode=False)
    except _BAD_PAYLOAD as e:
        msg, outcome = None, outcome._replace(reason=f"{outcome.reason}; bad payload: {e}")
    where, value, delay, queue = _next_step(app, raw, msg, outcome, own_bcast)
    kind = "" if outcome.kind == "interrupted" else outcome.kind
    args = [field, token, msg["id"] if msg else "", kind, queue.name if queue else "?"]
    args += [msg["name"] if msg else "?", "" if seconds is None else f"{seconds:.6f}"]
    if where:
        bcast = own_bcast if msg and msg.get("bcast") else ""
        rank = app._rank[queue] if queue else 0
        args += [where, value, rank, delay, bcast, app.max_dead or 0]
        _log_release(msg, outcome, where, delay)
    return args


def _log_release(msg, outcome, where, delay):
    """What happens next to a failed attempt's task, said once (dead letters at WARNING)."""
    if where in ("drop", "front"):
        return
    task_id, attempt = (msg["id"], msg["retry"] + 1) if msg else (None, 1)
    name = msg["name"] if msg else None
    if where == "dead":
        text = "task %s id=%s dead-lettered after %d attempt(s): %s"
        log.warning(text, name, task_id, attempt, outcome.reason)
    else:
        later = f" in {delay:.1f}s" if delay else ""
        text = "task %s id=%s attempt %d: %s; requeued%s"
        log.warning(text, name, task_id, attempt, outcome.reason, later)


def _release(app, r, inflight_key, args):
    """Run _RELEASE; log dead letters dropped by max_dead. -> True if it was still ours."""
    released, dropped = _RELEASE(r, [inflight_key], args)
    if dropped:
        log.warning("max_dead=%d: dropped the %d oldest dead letter(s)", app.max_dead, dropped)
    return bool(released)


# ============================================================================ logging

_current: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar(
    "wakaq_task", default=None
)
_local = threading.local()  # per thread: the apps' bare connections
_ATTEMPT = "task %s id=%s attempt=%d %s in %.3fs"  # one INFO line per finished attempt


def current_task() -> Optional[dict]:
    """Inside a running task: {"id", "name", "queue", "attempt"} (1 = first run), else None."""
    m = _current.get()
    if m is None:
        return None
    return {"id": m.get("id"), "name": m["name"], "queue": m["queue"], "attempt": m["retry"] + 1}


class _Formatter(logging.Formatter):
    """The log line: "[TIME] LEVEL LOGGER pid=PID[ task=NAME]: TEXT", the task's name inside a
    task. Written out here, and the date part of TIME made once a second: at INFO every attempt
    writes a line, and logging's %-format and strftime were two fifths of its cost."""

    second, date = -1, ""

    def formatMessage(self, record):
        msg, r = _current.get(), record
        task = msg["name"] if msg else None
        return self.line(r.created, r.msecs, r.levelname, r.name, r.process, task, r.message)

    def line(self, created, msecs, level, name, pid, task, text):
        if int(created) != self.second:
            self.second = int(created)
            self.date = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(self.second))
        head = f"[{self.date},{int(msecs):03d}] {level} {name} pid={pid}"
        return f"{head} task={task}: {text}" if task else f"{head}: {text}"


def _own_handler():
    """The handler _setup_logging installed, if a line of wakaq's logger reaches it alone,
    unfiltered and through logging's own dispatch (no app handler, filter or patch on the
    way, its stream and formatter unchanged): a worker child may then write its attempts'
    lines to that stream as the handler would. Else None."""
    handler, stream, dispatch = _handler
    root = logging.root
    if not dispatch or root.handlers != [handler] or handler.stream is not stream:
        return None
    if log.disabled or not log.propagate or handler.level > logging.INFO:
        return None
    if handler.filters or log.handlers or log.filters or root.filters:
        return None
    if type(handler.formatter) is not _Formatter:
        return None
    handle, call_handlers, emit = dispatch  # the same objects: none patched since
    if logging.Logger.handle is not handle or logging.Logger.callHandlers is not call_handlers:
        return None
    return handler if type(handler).emit is emit else None


#: The handler _setup_logging made, its stream, and logging's dispatch functions then: ()
#: if an app had patched them already (as Sentry's and New Relic's integrations do).
_handler: list = [None, None, ()]


def _setup_logging(path, level):
    """Logs, stdout and stderr (inherited by children) to `path` or stderr, line-buffered; an
    unencodable character is escaped, never an error in the task that printed it."""
    if path:
        with open(path, "a") as f:
            os.dup2(f.fileno(), 2)
    os.dup2(2, 1)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, errors="backslashreplace")
    logging.basicConfig(level=level, force=True)  # force: replaces root's handlers
    handler = logging.root.handlers[0]
    handler.setFormatter(_Formatter())
    dispatch = (logging.Logger.handle, logging.Logger.callHandlers, type(handler).emit)
    # Plain functions of logging's file: a wrapper may copy __module__ (functools.wraps), a
    # proxy even __code__ (wrapt), but neither is a function compiled from logging's source.
    own = all(
        type(f) is types.FunctionType and f.__code__.co_filename == logging.__file__
        for f in dispatch
    )
    _handler[:] = [handler, handler.stream, dispatch if own else ()]
    log.disabled = False  # an app's dictConfig() at import (disable_existing_loggers)
    logging.getLogger("wakaq.print").setLevel(logging.INFO)


class _PrintToLog:
    """A child's sys.stdout: each line a task print()s becomes an INFO line of the logger
    "wakaq.print", with the time, pid and task like every log line."""

    encoding, errors = "utf-8", "backslashreplace"

    def __init__(self):  # (not at import: an app's dictConfig() would disable the logger)
        self.partial, self.logger = "", logging.getLogger("wakaq.print")

    def write(self, text):
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self.logger.info("%s", line)
        return len(text)

    def flush(self):
        if self.partial:
            self.write("\n")

    def isatty(self):
        return False

    def fileno(self):
        return 1


# ============================================================================ OS helpers


def _parse_cgroup(max_text, current_text, stat_text="", cache_key="inactive_file"):
    """Percent of a cgroup's limit in use (None: no limit), less reclaimable inactive cache."""
    if max_text.strip() == "max" or int(max_text) >= 2**62:  # v1's "no limit": a huge number
        return None
    cache = re.search(rf"^{cache_key} (\d+)$", stat_text, re.M)
    return 100.0 * max(0, int(current_text) - int(cache[1] if cache else 0)) / int(max_text)


def _mem_percent(root="/sys/fs/cgroup", proc="/proc/self"):
    """Percent in use of our cgroup's memory limit, or of its nearest limited ancestor's (v2,
    or v1's memory controller); with no limit anywhere, of the machine's RAM."""
    for line in Path(f"{proc}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        v1 = "memory" in controllers.split(",")
        if controllers and not v1:
            continue  # a v1 hierarchy without the memory controller
        names = "limit_in_bytes usage_in_bytes stat" if v1 else "max current stat"
        cache = "total_inactive_file" if v1 else "inactive_file"
        parts = [root + "/memory" * v1, *filter(None, path.strip().split("/"))]
        for n in range(len(parts), 0, -1):
            base = "/".join(parts[:n])
            try:
                texts = [Path(f"{base}/memory.{name}").read_text() for name in names.split()]
                pct = _parse_cgroup(*texts, cache)
            except (OSError, ValueError):
                continue  # not mounted here, or no such file at this level
            if pct is not None:
                return pct
    kb = {k: int(v) for k, v in re.findall(r"(\w+):\s*(\d+)", Path("/proc/meminfo").read_text())}
    return 100.0 * (kb["MemTotal"] - kb["MemAvailable"]) / kb["MemTotal"]


def _rss(pid):
    """Resident set size in bytes (0 if the process is gone)."""
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def _kill(pid, sig, group=False):
    """Signal a process and, with group, its process group; gone already is fine."""
    for target in (-pid, pid) if group else (pid,):
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)


def _log_exit(pid, code, killed_for=None):
    """One line: how a child ended (a signal by its name), and what for if we killed it."""
    how = f"exited with status {code}"
    if code < 0:
        with contextlib.suppress(ValueError):  # (a real-time signal has no name)
            how = f"killed by {signal.Signals(-code).name}"
    log.warning("child %d %s%s", pid, how, f" for {killed_for}" if killed_for else "")


def _health_glob(app):
    """Where a worker of this app on this host says it is alive: one file per worker parent,
    touched every loop turn (`health` reads them, Redis reachable or not)."""
    digest = hashlib.sha1(f"{app.prefix} {_mask(app.url)}".encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"wakaq-{digest}.*.alive")


class _Slot(NamedTuple):
    """One sub-slot's record in the parent/child shared memory (see the module docstring)."""

    soft: float  # monotonic soft deadline of the running attempt (0: none, or delivered)
    hard: float  # monotonic hard deadline (0: none)
    held: float  # claim number N (token "PID-N") the field may hold in Redis (0: empty)
    give_back: float  # the claim held is held ahead: the parent gives it back from then (0: no)
    running: float  # claim number of the attempt started last
    finished: float  # claim number of the last attempt done, acked with the next claim
    cancel: float  # claim number the parent asks to cancel (0: none)
    given_back: float  # claim number the parent gave back (only the parent writes it)


class _Table:
    """The shared memory between a worker parent and its children, made before fork(); a
    record's lock (a byte-range lock on a file: the kernel drops it with a killed holder)
    makes the child's start of a claim and the parent's give-back or cancel of it exclude
    each other. Other writes are unlocked: a stale read makes the parent give back or
    release a claim whose token has changed in Redis, which changes nothing there."""

    RECORD = struct.Struct("8d")
    ATTEMPT = struct.Struct("7d")  # soft ... cancel: all the child writes at once
    CLAIM = struct.Struct("2d")  # held, give_back
    ASKED = struct.Struct("2d")  # cancel, given_back: what the parent asks of a claim
    #: Byte offset of each field in a record (set() runs on every claim: no search there).
    OFFSET = {name: 8 * i for i, name in enumerate(_Slot._fields)}

    def __init__(self, n):
        self.mem = mmap.mmap(-1, self.RECORD.size * n)
        self.locks = tempfile.TemporaryFile()

    def read(self, i):
        return _Slot._make(self.RECORD.unpack_from(self.mem, i * self.RECORD.size))

    def write(self, i, soft, hard, held, running, finished, cancel=0.0):
        """An attempt's numbers (give_back 0: not held ahead); given_back is the parent's."""
        offset = i * self.RECORD.size
        self.ATTEMPT.pack_into(self.mem, offset, soft, hard, held, 0.0, running, finished, cancel)

    def asked(self, i):
        return self.ASKED.unpack_from(self.mem, i * self.RECORD.size + 48)

    def claim(self, i, held, give_back=0.0):
        self.CLAIM.pack_into(self.mem, i * self.RECORD.size + 16, held, give_back)

    def set(self, i, name, value):
        struct.pack_into("d", self.mem, i * self.RECORD.size + self.OFFSET[name], value)

    def clear(self, i):
        self.RECORD.pack_into(self.mem, i * self.RECORD.size, *[0.0] * len(_Slot._fields))

    def lock(self, i, wait=True):
        """Lock record i until unlock(i); -> False if not wait and another process holds it."""
        how = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fcntl.lockf(self.locks, how, self.RECORD.size, i * self.RECORD.size)
        except BlockingIOError:
            return False
        return True

    def unlock(self, i):
        fcntl.lockf(self.locks, fcntl.LOCK_UN, self.RECORD.size, i * self.RECORD.size)


# ============================================================================ worker parent

# Blocked around fork() so that a stop signal reaches the child's handlers, not ours.
_PARENT_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


class _Worker:
    """The parent: runs no task code. It forks `concurrency` children, enforces their
    deadlines from the shared table, releases a dead child's tasks, heartbeats, adopts
    silent workers' tasks and passes cancels on. Others are presumed dead by Redis's clock,
    and only once we have been connected for heartbeat_timeout ourselves."""

    def __init__(self, app):
        self.app = app
        #: This worker's id in Redis: host, pid and a random part.
        self.wid = f"{socket.gethostname()}.{os.getpid()}.{os.urandom(3).hex()}"
        self.inflight_key = app._k("inflight", self.wid)
        self.served = app._served_names(app.exclude_queues)[0]
        self.served_key = app._k("serve", hashlib.sha1(" ".join(self.served).encode()).hexdigest())
        #: Fields per child: an async app's child runs up to async_concurrency tasks at once;
        #: a sync-only app's one task, and claims the next into its second field meanwhile.
        self.sync_only = not any(t.is_async for t in app.tasks.values())
        self.k = 2 if self.sync_only else app.async_concurrency
        self.table = _Table(app.concurrency * self.k)
        #: Child slot -> its pid, or 0 while the slot waits to fork.
        self.children = [0] * app.concurrency
        #: Child slot -> monotonic time it may fork again (a crash loop forks once a second).
        self.fork_at = [0.0] * app.concurrency
        #: Child pid -> what we signalled it for: "stop" (SIGTERM: a stop or the memory
        #: guard; exit status 0 is leaving on it), "the second stop" or "hard timeout"
        #: (SIGKILL: how reap_children tells our kill from the child's own death).
        self.signalled: dict = {}
        #: Child slot -> its dead child's fields to release (release's arguments each).
        self.unreleased: dict = {}
        #: (field, token) of claims held ahead too long, to give back (take_back).
        self.give_backs: list = []
        self.cancels: list = []  # "S.K PID-N" members polled from our cancel set
        self.signals: list = []  # stop signals, appended by the handler
        self.stops = 0  # stop signals acted on
        self.outage = _Outage("worker", min(5.0, app.heartbeat_timeout / 4))
        self.r = None  # our client, None after a lost connection
        self.connected_since = self.retry_at = 0.0
        #: Monotonic times the periodic duties are due next.
        self.next_beat = self.next_cancels = self.next_mem = 0.0
        self.mem_high = self.full = self.busy = self.in_redis = False
        self.next_deadline = float("inf")  # the earliest soft or hard deadline ahead
        self.health = _health_glob(app).replace("*", str(os.getpid()))
        self.health_failed = False

    def run(self):
        self.install_signals()
        text = "worker %s started: concurrency=%d (%d task(s) at once per child) queues=%s redis=%s"
        app = self.app
        at_once = 1 if self.sync_only else self.k
        log.info(text, self.wid, app.concurrency, at_once, ",".join(self.served), _mask(app.url))
        try:
            while not self.leaving():
                self.reap_children()
                self.enforce_deadlines()
                self.redis_duties()
                if not self.stops:
                    self.check_memory()
                    self.fork_missing_children()
                try:
                    Path(self.health).touch()  # the local evidence `health` reads
                except OSError as e:  # `health` then finds no worker; said once
                    if not self.health_failed:
                        log.warning("cannot touch the health file %s (%s)", self.health, e)
                    self.health_failed = True
                self.sleep()
        finally:
            with contextlib.suppress(OSError):
                os.remove(self.health)
        # Half a second at most: a Redis that does not answer must not hold the stop up.
        leaving = threading.Thread(target=self.deregister, daemon=True)
        leaving.start()
        leaving.join(0.5)
        log.info("worker %s stopped", self.wid)
        return 0

    def install_signals(self):
        """Handlers only record the signal; the loop acts on it (leaving). Every signal,
        SIGCHLD too, also wakes the loop's select() through the wake-up pipe."""
        self.pipe = os.pipe()
        os.set_blocking(self.pipe[1], False)
        signal.set_wakeup_fd(self.pipe[1], warn_on_full_buffer=False)
        for sig in _PARENT_SIGNALS:
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame):
        if signum == signal.SIGCHLD:
            return
        self.signals.append(signum)
        if self.in_redis:  # a stop must not wait for a Redis that does not answer
            raise _Stop()

    def sleep(self):
        """Until the next tick or deadline, a signal, or a child's new short soft deadline."""
        timeout = min(TICK, max(0.0, self.next_deadline - time.monotonic()))
        if select.select([self.pipe[0]], [], [], timeout)[0]:
            os.read(self.pipe[0], 4096)  # signal numbers and children's bytes: just a wake-up

    def leaving(self):
        """On each stop signal: the 1st lets children finish their tasks (SIGTERM), the 2nd
        kills them (their tasks go back to the front, once Redis takes them), the 3rd leaves
        what is still unreleased to be adopted. Leave once no child is left and nothing is
        unreleased (an idle worker leaves at once, Redis reachable or not)."""
        for signum in self.signals[self.stops :]:
            self.stops += 1
            kill = self.stops > 1
            how = "now" if kill else "letting running tasks finish"
            level, name = logging.WARNING if kill else logging.INFO, signal.Signals(signum).name
            log.log(level, "worker %s stopping on %s: %s", self.wid, name, how)
            for pid in filter(None, self.children):
                if self.signalled.get(pid) != "hard timeout":  # (dying already, for that)
                    _kill(pid, signal.SIGKILL if kill else signal.SIGTERM, group=kill)
                    self.signalled[pid] = "the second stop" if kill else "stop"
        if not self.stops or any(self.children):
            return False
        if self.unreleased and self.stops > 2:
            text = "worker %s leaves %d child slot(s) for adoption"
            log.warning(text, self.wid, len(self.unreleased))
        return not self.unreleased or self.stops > 2

    def fork_missing_children(self):
        now = time.monotonic()
        for slot, pid in enumerate(self.children):
            if not (pid or slot in self.unreleased or self.mem_high or now < self.fork_at[slot]):
                self.spawn(slot)

    def spawn(self, slot):
        for k in range(self.k):
            self.table.clear(slot * self.k + k)
        self.fork_at[slot] = time.monotonic() + 1.0  # one that exits 0 may fork again at once
        signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)  # until the child has its own
        try:
            self.children[slot] = os.fork()
            if not self.children[slot]:
                _child_main(self, slot)  # never returns
        except OSError as e:
            log.error("cannot fork a child (%s); trying again in a second", e)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)

    def reap_children(self):
        """A dead child's sub-slots that may hold a claim -> unreleased, each with how its
        running attempt ended. Killed by us at a hard deadline: a hard timeout for the
        sub-slots past it (its other attempts were cut: interrupted); killed by our second
        stop, or left with exit status 0 on our SIGTERM: interrupted; else the child died,
        even past a deadline (it ended before we killed it). Its end is logged here, or
        (our hard timeout) with the task's name at the release."""
        now = time.monotonic()
        for slot, pid in enumerate(self.children):
            done, status = os.waitpid(pid, os.WNOHANG) if pid else (0, 0)
            if not done:
                continue
            self.children[slot], code = 0, os.waitstatus_to_exitcode(status)
            sent = self.signalled.pop(pid, None)
            # Our SIGKILL ("the second stop", "hard timeout"), not the child's own end:
            killed = sent if code == -signal.SIGKILL and sent != "stop" else None
            if code == 0:
                self.fork_at[slot] = 0.0
            elif killed != "hard timeout":  # (that one is logged at the release: its task)
                _log_exit(pid, code, killed)
            hard = killed == "hard timeout"
            cut = (code == 0 and sent) or self.stops > 1 or hard
            ends = []
            for k in range(self.k):
                rec = self.table.read(slot * self.k + k)
                if hard and 0 < rec.hard <= now:
                    outcome = _Outcome("hard_timeout", "hard timeout", True)
                elif cut:
                    outcome = _Outcome("interrupted", "interrupted")
                else:
                    outcome = _Outcome("worker_died", "worker died", True)
                # A child that left on our stop: a claim it never began (its idle claim or
                # one held ahead) waits for deregister(), so no Redis is needed to leave.
                unbegun = rec.held not in (rec.running, rec.finished)
                if rec.held and not (code == 0 and sent and unbegun):
                    ends.append((f"{slot}.{k}", outcome, pid, rec.finished, rec.running))
            if ends:
                self.unreleased[slot] = ends

    def enforce_deadlines(self):
        """Kill a child (and its process group) past a hard deadline; signal one past a soft
        deadline or asked to cancel, every tick until it delivers (it clears the record).
        Sets next_deadline (the loop sleeps till it) and busy (a child runs a task)."""
        now, self.next_deadline, self.busy = time.monotonic(), float("inf"), False
        for slot, pid in enumerate(self.children):
            if not pid:
                continue
            due = False  # a soft deadline passed, or a cancel of a running attempt came
            for k in range(self.k):
                rec = self.table.read(slot * self.k + k)
                runs = rec.held and rec.held == rec.running != rec.finished
                self.busy = self.busy or bool(runs)
                if rec.hard and now >= rec.hard:
                    _kill(pid, signal.SIGKILL, group=True)
                    self.signalled[pid] = "hard timeout"
                    break
                due = due or (rec.soft and now >= rec.soft) or (runs and rec.cancel == rec.running)
                if 0 < rec.give_back <= now and rec.given_back != rec.held != rec.running:
                    self.take_back(slot * self.k + k, pid, now)  # held ahead too long
                ahead = [
                    d for d in (rec.soft, rec.hard, rec.give_back) if d > now
                ]  # (passed: done)
                self.next_deadline = min([self.next_deadline, *ahead])
            else:
                if due:
                    _kill(pid, signal.SIGUSR1)

    def take_back(self, i, pid, now):
        """Give back the claim record i holds ahead, unless its child began it meanwhile (a
        child in begin() holds the lock: next tick)."""
        if not self.table.lock(i, wait=False):
            return
        try:
            rec = self.table.read(i)
            if not rec.held or rec.held == rec.running or not 0 < rec.give_back <= now:
                return
            self.table.set(i, "given_back", rec.held)
        finally:
            self.table.unlock(i)
        self.give_backs.append((f"{i // self.k}.{i % self.k}", b"%d-%d" % (pid, rec.held)))

    def redis_duties(self):
        """Release dead children's tasks, pass cancels on, heartbeat: each when due; an
        outage follows the one rule (it ends when one of these succeeds)."""
        now = time.monotonic()
        if now < self.retry_at or (self.stops and not self.busy and not self.unreleased):
            return  # backing off, or leaving: an idle worker's stop needs no Redis
        try:
            try:  # only while in here may a stop signal raise _Stop (on_signal)
                self.in_redis = True
                if self.r is None:
                    timeout = min(self.app.socket_timeout, PARENT_TIMEOUT)
                    self.r, self.connected_since = self.app._client(0, timeout), now
                done = self.release_dead_children() | self.give_back() | self.poll_cancels(now)
                done = self.beat(now) | done
            finally:
                self.in_redis = False
                self.apply_cancels()
        except _Stop:  # a stop cut a call short, maybe midway: no Redis for a second
            self.r, self.retry_at = None, now + 1.0
        except redis.RedisError as e:
            if isinstance(e, _RECONNECT):
                self.r = None
            self.retry_at = now + self.outage.failed(e)
        else:
            if done:
                self.outage.ok()

    def release_dead_children(self):
        released = bool(self.unreleased)
        for slot, ends in list(self.unreleased.items()):
            for end in ends:
                self.release(*end)
            del self.unreleased[slot]
        return released

    def give_back(self):
        """Claims held ahead too long (take_back) go back to the front, if still held so."""
        given = bool(self.give_backs)
        while self.give_backs:
            field, token = self.give_backs[0]
            self.release(field, _Outcome("interrupted", "interrupted"), only=token)
            del self.give_backs[0]
        return given

    def release(self, field, outcome, pid=0, finished=0.0, running=0.0, only=None):
        """Release one field of ours as `outcome` (only if it holds token `only`, if given);
        a dead child's (pid) by its record: its token "PID-N" with N == finished is an ack;
        N == running, `outcome`; else the attempt never started (interrupted)."""
        raw, token, start = self.r.hmget(self.inflight_key, field, field + ":t", field + ":s")
        if raw is None or (only and token != only):
            return
        if pid and token == b"%d-%d" % (pid, finished):
            outcome = _DONE  # its ack was waiting for the next claim
        elif (pid and token != b"%d-%d" % (pid, running)) or (not pid and start == b""):
            outcome = _Outcome("interrupted", "interrupted")  # never began (held ahead)
        elif outcome.kind == "hard_timeout":  # it started: its payload decoded in the child
            msg = json.loads(raw)
            _log_exit(
                pid, -signal.SIGKILL, f"the hard timeout of task {msg['name']} id={msg['id']}"
            )
        own = "" if field.startswith("adopted:") else self.wid
        args = _release_args(self.app, field, token or "", raw, outcome, None, own)
        _release(self.app, self.r, self.inflight_key, args)

    def beat(self, now):
        """Heartbeat; adopt silent workers' tasks and release them as died; watch Redis."""
        if now < self.next_beat:
            return False
        app, hb = self.app, self.app.heartbeat_timeout
        may_adopt = int(now - self.connected_since >= hb)
        keys = [app.workers_key, self.inflight_key, self.served_key]
        adopted, cleared, waiting = _BEAT(self.r, keys, [self.wid, hb, may_adopt, *self.served])
        for wid, count in zip(adopted[::2], adopted[1::2]):
            text = "worker %s is silent for over %ss: taking back its %d task(s)"
            log.warning(text, wid.decode(), hb, count)
        if cleared:
            log.info("cleared %d silent worker registration(s) that held no task", cleared)
        for field in waiting:
            self.release(field.decode(), _Outcome("worker_died", "worker died", True))
        self.check_redis_memory()
        self.next_beat = now + min(hb / 4, BEAT)
        return True

    def poll_cancels(self, now):
        """Running attempts of ours that wakaq.cancel() asked to stop: tell their children.
        Only while a child holds a task (an idle worker costs Redis nothing for this)."""
        if not self.busy or now < self.next_cancels:
            return False
        self.cancels += self.r.spop(self.app._k("cancel", self.wid), 100) or ()
        self.next_cancels = now + CANCEL_POLL
        return True

    def apply_cancels(self):
        """The polled cancels, each to the claim its field holds now (running, or not begun:
        begin() looks), in the child that holds it; a member for an older claim (or a child
        since gone) would overwrite a live cancel: dropped. A child in begin() holds the
        record's lock: that member waits for the next tick."""
        for member in list(self.cancels):
            slot, k, pid, claim = map(int, re.split(r"[. -]", member.decode()))  # "S.K PID-N"
            i = slot * self.k + k
            if not self.table.lock(i, wait=False):
                continue
            if self.table.read(i).held == claim and self.children[slot] == pid:
                self.table.set(i, "cancel", claim)
            self.table.unlock(i)
            self.cancels.remove(member)

    def check_redis_memory(self):
        try:
            mem = self.r.info("memory")
        except redis.ResponseError:
            return  # INFO not allowed for this ACL user
        policy = mem.get("maxmemory_policy", "")
        if not self.next_beat and policy.startswith("allkeys"):
            log.warning(
                "Redis maxmemory-policy is %s: it may evict queued tasks; use noeviction", policy
            )
        used, limit = mem.get("used_memory", 0), mem.get("maxmemory", 0)
        if self.full != (0 < limit <= used):
            self.full = not self.full
            state = "is full: new tasks are refused" if self.full else "has room again"
            log.warning("Redis %s (used_memory %s, maxmemory %s)", state, used, limit)

    def check_memory(self):
        """Once a second: over max_mem_percent, fork nothing and stop the biggest child (one
        per episode: one at a time); forking resumes once memory is under the limit again."""
        limit, now = self.app.max_mem_percent, time.monotonic()
        if not limit or now < self.next_mem:
            return
        try:
            pct, self.next_mem = _mem_percent(), now + 1.0
        except (OSError, ValueError, KeyError, ZeroDivisionError) as e:
            self.next_mem = now + 60.0
            return log.warning("cannot read memory use (%s); checking again in a minute", e)
        if self.mem_high == (pct >= limit):
            return
        self.mem_high = pct >= limit
        live = [pid for pid in self.children if pid and pid not in self.signalled]
        what = "forking paused" if self.mem_high else "forking resumed"
        if self.mem_high and live:
            biggest = max(live, key=_rss)
            _kill(biggest, signal.SIGTERM)
            self.signalled[biggest] = "stop"
            what = f"stopping child {biggest}; {what}"
        log.warning("memory at %.0f%% (max_mem_percent=%s): %s", pct, limit, what)

    def deregister(self):
        """Leave the registry once nothing is in flight. With every child gone and released,
        a field of ours still filled holds a claim that Redis ran after its child had
        stopped waiting for the reply: it never started, so it goes back to the front. If
        something is left (Redis away, a third stop), a live worker adopts it and the
        registration ages out. Broadcasts that waited for us: dead letters."""
        app, r = self.app, self.r
        try:
            if r is None or self.unreleased:
                return
            for field in r.hkeys(self.inflight_key):
                if b":" not in field:  # "S.K", not "S.K:t", "S.K:s" or "adopted:..."
                    self.release(field.decode(), _Outcome("interrupted", "interrupted"))
            if r.hlen(self.inflight_key):
                return
            r.zrem(app.workers_key, self.wid)  # first: no new broadcasts for us
            r.hdel(app._k("served"), self.wid)
            bcast_key = app._k("bcast", self.wid)
            for raw in r.lrange(bcast_key, 0, -1):
                r.rpush(app.dead_key, _dead_entry(raw, None, "worker stopped"))
            r.delete(bcast_key, app._k("wake", self.wid), app._k("cancel", self.wid))
        except redis.RedisError as e:
            log.error("could not deregister worker %s (%s)", self.wid, e)


# ============================================================================ worker child


def _child_main(worker, slot):
    """The forked child's whole life; it never returns."""
    code = 1
    gc.freeze()  # the collector skips what the child inherits: shorter pauses
    try:
        signal.set_wakeup_fd(-1)
        os.close(worker.pipe[0])  # the write end stays: begin() wakes the parent with it
        code = _Child(worker, slot).run()
    except _Stop:
        code = 0
    except BaseException:
        log.exception("worker child crashed")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class _Child:
    """A forked child: claim a task into a field ("S.K"), run it, ack it with the field's
    next claim. Sync tasks run one at a time; async ones up to K at once on one event loop
    that lives as long as the child."""

    def __init__(self, worker, slot):
        app = self.app = worker.app
        self.worker, self.k, self.table = worker, worker.k, worker.table
        self.ppid, self.pid, self.claims = os.getppid(), os.getpid(), itertools.count(1)
        self.r = _Conn(app)
        self.outage = _Outage(f"child {slot}", worker.outage.cap)
        self.fields = [f"{slot}.{k}" for k in range(self.k)]
        self.others = {f: [g for g in self.fields if g != f] for f in self.fields}
        #: Field -> its running attempt.
        self.attempts: dict = {}
        #: Field -> the ack of its attempt that ended done (release's arguments), sent with
        #: the field's next claim.
        self.acks: dict = {}
        #: Field -> its record in the shared table.
        self.index = {f: slot * self.k + k for k, f in enumerate(self.fields)}
        self.lines: list = []  # INFO lines of finished attempts, written while Redis works
        #: (field, release's arguments) of attempts that did not end done, sent by the loop:
        #: never while the reply of a claim made ahead is on its way.
        self.releases: list = []
        self.limit = app.max_tasks_per_worker or float("inf")
        self.stopping = self.waiting = False
        self.done, self.next_promote, self.top = 0, 0.0, ""
        self.reached = 0  # the last claim number that reached Redis without its reply
        self.wakes = [app._k("wake", q) for q in (worker.wid, *worker.served)]
        self.claim_keys = [worker.inflight_key, worker.served_key]
        self.limits = functools.lru_cache(None)(functools.partial(_limits_for, app))
        self.async_hooks = _async_hooks(app)
        self.loop = asyncio.new_event_loop()

    def run(self):
        self.install_signals()
        os.setpgid(0, 0)  # its own process group: a hard timeout kills it all
        sys.stdout = _PrintToLog()
        asyncio.set_event_loop(self.loop)
        for hook in self.app._hooks["after_worker_started"]:
            self.loop.run_until_complete(_settle(hook()))
        # (field, claim, payload, ahead: may claim ahead of it) to begin; the next claim's wait
        claimed, wait = None, None
        while not self.stopping and self.done < self.limit and os.getppid() == self.ppid:
            if self.releases:
                self.redis_step(self.flush_releases)
            if claimed:
                claimed = self.run_claimed(*claimed)
                continue
            field = self.free_field()
            if field is None:
                self.drive(None)
                continue
            claim = next(self.claims)
            payload = self.redis_step(self.claim, field, claim, wait)
            if type(payload) is int:  # nothing to claim: ms to the next due task
                wait = self.idle(payload)
            else:
                claimed = (field, claim, payload, wait is None)  # (woke by it: not ahead)
                wait = None
        if claimed:  # claimed and not begun (held ahead, or a stop came): back to the front
            field, claim, raw, _ = claimed
            self.release(field, f"{self.pid}-{claim}", raw, _Outcome("interrupted"), None)
        while self.attempts:
            self.drive(None)
        self.redis_step(self.flush_acks)
        return 0

    def install_signals(self):
        handlers = {
            signal.SIGTERM: self.on_term,  # the parent stops us: finish, then exit
            signal.SIGUSR1: self.on_interrupt,  # the parent: a soft timeout or a cancel is due
            signal.SIGINT: signal.SIG_IGN,  # a terminal's Ctrl-C is the parent's to handle
            signal.SIGHUP: signal.SIG_IGN,
            signal.SIGCHLD: signal.SIG_DFL,
        }
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)  # blocked by spawn()

    def on_term(self, signum, frame):
        self.stopping = True
        if self.waiting:
            raise _Stop()

    def on_interrupt(self, signum, frame):
        """Deliver a due soft timeout or cancel: into a sync task's own code only (else the
        parent signals again next tick), or by cancelling an async task's asyncio task."""
        now = time.monotonic()
        for attempt in list(self.attempts.values()):
            rec = self.table.read(attempt.index)
            if rec.running != attempt.claim:
                continue
            if rec.cancel == attempt.claim:
                error: Exception = Cancelled(f"cancelled (id={attempt.msg['id']})")
            elif rec.soft and now >= rec.soft:
                error = SoftTimeout(f"soft timeout after {attempt.limits.soft:g}s")
            else:
                continue
            landing = "async" if attempt.future else _landing(frame)
            if landing is None:
                continue  # not in the task's code: the parent signals again next tick
            self.table.write(attempt.index, 0.0, rec.hard, rec.held, rec.running, rec.finished)
            if landing == "now":
                raise error
            attempt.interrupt = error
            if landing == "async":
                self.loop.call_soon_threadsafe(self.cancel_async, attempt)
            else:
                landing.f_trace = functools.partial(self.raise_on_return, attempt)
                sys.settrace(_no_trace)  # frame traces run only while tracing is on

    def cancel_async(self, attempt):
        """On the event loop: cancel an async task, unless it has ended meanwhile."""
        if not attempt.ended:
            attempt.future.cancel()

    def raise_on_return(self, attempt, frame, event, arg):
        """The f_trace of a guard frame: as it returns into the task, raise the held error."""
        if event != "return":
            return functools.partial(self.raise_on_return, attempt)
        sys.settrace(None)
        if self.attempts.get(attempt.field) is attempt and attempt.interrupt:
            raise attempt.interrupt

    def free_field(self):
        if not self.attempts:
            return self.fields[0]
        return next((f for f in self.fields if f not in self.attempts), None)

    def redis_step(self, step, *args):
        """Run a Redis step until it succeeds; failures follow the outage rule."""
        while True:
            try:
                result = step(*args)
                self.outage.ok()
                return result
            except redis.RedisError as e:
                if isinstance(e, _RECONNECT):
                    self.r.reset()
                delay = self.outage.failed(e)
            self.write_lines()
            if self.stopping or os.getppid() != self.ppid:
                raise _Stop()
            self.wait(time.sleep, delay)

    def wait(self, fn, *args, **kw):
        """fn(*args, **kw), during which a SIGTERM leaves at once (_Stop)."""
        self.waiting = True
        try:
            if self.stopping:
                raise _Stop()
            return fn(*args, **kw)
        finally:
            self.waiting = False

    def run_claimed(self, field, claim, raw, ahead):
        """Begin a claimed payload. With a field free besides, the child sends its next claim
        (into that field) before the task runs and reads it after: the claim costs no round
        trip of its own, and is held ahead (the parent gives it back if the task runs long).
        Not `ahead` (the task woke an idle child): it begins at once. Building and sending a
        claim first delays the task (more so when the child shares Redis's CPU), and after a
        lone push that claim finds nothing; a wake-up that brings several tasks costs one
        round trip not overlapped instead.
        -> that claim (field, claim, payload, True), or None."""
        for other in self.others[field]:
            if other not in self.attempts:
                break
        else:
            other = None
        if other is None or not ahead or self.stopping:  # (stopping: it would be given back)
            return self.begin(field, claim, raw)
        began = False

        def run():
            nonlocal began
            began = True
            self.begin(field, claim, raw)
            self.write_lines()

        claim_ahead, ahead = next(self.claims), None
        try:
            # Marked begun by the claim after it: a sync-only app's (its other field is free
            # again by then); an async app's claim ahead begins at once, and is begun already.
            begins = f"{field} {self.pid}-{claim}" if self.worker.sync_only else ""
            payload = self.claim(other, claim_ahead, begins=begins, meanwhile=run)
            if self.outage.seen:
                self.outage.ok()
            if type(payload) is not int:
                ahead = (other, claim_ahead, payload, True)
        except redis.RedisError as e:  # the loop's next claim retries, by the outage rule
            if isinstance(e, _RECONNECT):
                self.r.reset()
            self.outage.failed(e)
        if not began:
            run()
        return ahead

    def claim(self, field, claim, wait=None, begins="", meanwhile=None):
        """The hot path: release the field's last attempt and claim the next under token
        "PID-claim"; "p" (move due tasks, broadcasts first) every PROMOTE seconds. wait: an
        idle child's BLPOP of the wake-up lists, sent first: the claim runs once a push wakes
        it. meanwhile: the task that begins while Redis works (this claim is made ahead:
        run_claimed; begins: "FIELD TOKEN" of it, for a sync-only app); else the INFO lines
        are written meanwhile."""
        now, promote = time.monotonic(), ""
        if now >= self.next_promote or wait:
            self.next_promote, promote = now + PROMOTE, "p"
        index = self.index[field]
        self.table.claim(index, claim, now + HOLD_AHEAD if meanwhile else 0.0)  # may hold it now
        ack = self.acks.get(field) or (field, "", "")
        args = (f"{self.pid}-{claim}", promote, self.top, begins, *ack)
        try:
            if wait and self.reached != claim:  # (once it reached Redis, its wake-up is spent)
                after = ("BLPOP", *self.wakes, f"{wait:.3f}")
                payload = self.wait(_CLAIM, self.r, self.claim_keys, args, after=after)
            else:
                meanwhile = meanwhile or (self.lines and self.write_lines)
                payload = _CLAIM(self.r, self.claim_keys, args, meanwhile=meanwhile)
        except redis.RedisError:
            if self.r.sent:
                self.reached = claim
            elif self.reached != claim:  # it never reached Redis: the field holds what it held
                finished = self.table.read(index).finished
                self.table.set(index, "held", finished if ack[1] else 0.0)
            raise
        self.acks.pop(field, None)
        if type(payload) is int:
            self.table.claim(index, 0.0)
        return payload

    def idle(self, due_ms):
        """Nothing to claim: ack what is finished; run async tasks a while, or -> how long
        the next claim waits for a push first (until the next due task, or wait_timeout)."""
        self.redis_step(self.flush_acks)
        if self.attempts:
            return self.drive(PROMOTE)
        due = max(0.01, due_ms / 1e3) if due_ms >= 0 else float("inf")
        return max(0.001, min(self.app.wait_timeout, due))  # (BLPOP 0 would wait for ever)

    def flush_releases(self):
        self.write_lines()
        while self.releases:
            field, args = self.releases[0]
            _release(self.app, self.r, self.worker.inflight_key, args)
            del self.releases[0]
            self.table.set(self.index[field], "held", 0.0)

    def flush_acks(self):
        self.flush_releases()
        for field, ack in list(self.acks.items()):
            _release(self.app, self.r, self.worker.inflight_key, list(ack))
            del self.acks[field]
            self.table.set(self.index[field], "held", 0.0)

    def drive(self, timeout):
        """Run the event loop until an async task ends (or `timeout` seconds pass)."""
        self.write_lines()
        futures = [a.future for a in self.attempts.values()]
        self.loop.run_until_complete(
            asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        )

    def begin(self, field, claim, raw):
        """Start one claimed payload: sync tasks to their end, async ones on the event loop.
        The look at its record and the start are one step under the record's lock: until
        then the parent may give a claim held ahead back (take_back) or cancel it."""
        index, token = self.index[field], f"{self.pid}-{claim}"
        attempt, unbegun = self.attempt(field, claim, raw), None
        if isinstance(attempt, _Outcome):
            attempt, unbegun = None, attempt
        else:
            self.table.lock(index)
            try:
                cancel, given_back = self.table.asked(index)
                if given_back == claim:  # (released here too: the parent's release
                    unbegun = _Outcome("interrupted")  # may have come before the claim)
                elif cancel == claim:
                    unbegun = _Outcome("cancelled", "cancelled")
                else:
                    limits, start = attempt.limits, attempt.start
                    soft = start + limits.soft if limits.soft else 0.0
                    hard = start + limits.hard if limits.hard else 0.0
                    self.table.write(index, soft, hard, claim, claim, 0.0)
            finally:
                self.table.unlock(index)
        if unbegun:
            if unbegun.kind == "cancelled":
                msg = attempt.msg
                log.info("task %s id=%s cancelled before it began", msg["name"], msg["id"])
            return self.release(field, token, raw, unbegun, None)
        self.done += 1
        self.top = attempt.queue.name if attempt.queue.name == self.worker.served[0] else ""
        if attempt.limits.soft is not None and attempt.limits.soft < TICK:  # sooner than a tick
            with contextlib.suppress(OSError):
                os.write(self.worker.pipe[1], b"d")
        self.attempts[field] = attempt
        coro = _run_attempt(self.app, attempt, self)
        if attempt.task.is_async:
            attempt.future = self.loop.create_task(self.run_async(coro, attempt))
        else:
            # By hand (no event-loop turn per task) unless a hook or the wrapper awaits.
            run = self.loop.run_until_complete if self.async_hooks else _by_hand
            self.ended(attempt, run(coro))

    def attempt(self, field, claim, raw):
        """The attempt of a claimed payload, or the _Outcome it ends with, unbegun: a bad
        payload, or a stop that came while claiming (given back untouched)."""
        app = self.app
        try:
            msg = _loads_msg(raw)
            task, queue = app.tasks.get(msg["name"]), app._queues.get(msg["queue"])
            problem = None if task and queue else "unknown queue" if task else "unknown task"
        except _BAD_PAYLOAD as e:
            msg, problem = None, f"bad payload: {e}"
        if problem:
            log.error("%s: %.200r", problem, raw)
            return _Outcome("raised", problem)
        if self.stopping:
            return _Outcome("interrupted")
        token, limits = f"{self.pid}-{claim}", self.limits(task, queue)
        return _Attempt(task, msg, field, token, raw, queue, limits, self.index[field], claim)

    async def run_async(self, coro, attempt):
        self.ended(attempt, await coro)

    def attempt_ended(self, attempt, done):
        """Before the after hooks: no soft timeout, hard timeout or cancel from now on; a done
        attempt is "finished" (its ack waits for the field's next claim)."""
        attempt.ended = True
        finished = attempt.claim if done else 0.0
        self.table.write(attempt.index, 0.0, 0.0, attempt.claim, attempt.claim, finished)

    def ended(self, attempt, outcome):
        """Log the attempt; release it now, or (done) with the field's next claim."""
        seconds, msg = time.monotonic() - attempt.start, attempt.msg
        if log.isEnabledFor(logging.INFO):
            what = outcome.kind.replace("_", " ")
            self.lines.append((msg, (msg["name"], msg["id"], msg["retry"] + 1, what, seconds)))
        if outcome.kind != "done":
            return self.release(attempt.field, attempt.token, attempt.raw, outcome, seconds)
        done = ("done", msg["queue"], msg["name"], f"{seconds:.6f}")  # counted with the ack
        self.acks[attempt.field] = (attempt.field, attempt.token, msg["id"], *done)

    def release(self, field, token, raw, outcome, seconds):
        """An attempt that did not end done: its release waits for flush_releases."""
        args = _release_args(self.app, field, token, raw, outcome, seconds, self.worker.wid)
        self.write_lines()
        self.releases.append((field, args))

    def write_lines(self):
        """The attempts' INFO lines, as logging.info in the task would write them, less the
        caller lookup. With the worker's own log set-up alone (_own_handler), straight to its
        stream: logging's record and dispatch were half of a line's cost."""
        if not self.lines:  # (called at every step: most often with nothing to write)
            return
        handler = _own_handler()
        while self.lines:
            msg, args = self.lines.pop(0)
            if handler:
                now, level = time.time(), logging.getLevelName(logging.INFO)
                parts = (now, (now - int(now)) * 1000, level, log.name, self.pid, msg["name"])
                line = handler.formatter.line(*parts, _ATTEMPT % args)
                with handler.lock:  # (a task's own threads may log meanwhile)
                    try:
                        handler.stream.write(line + "\n")  # (line-buffered: flushed)
                    except Exception:  # as the handler's emit(): handleError() says why
                        record = log.makeRecord(log.name, logging.INFO, "", 0, line, (), None)
                        handler.handleError(record)
            else:  # the task's name comes from _current, as for a line the task logs
                context = _current.set(msg)
                record = log.makeRecord(log.name, logging.INFO, __file__, 0, _ATTEMPT, args, None)
                log.handle(record)
                _current.reset(context)


# ============================================================================ scheduler


def _due(cron, tz, last, now):
    """(the latest tick in (last, now] at most CRON_CATCH_UP (+1) s old, or None; the next tick),
    unix seconds, in zone tz. Cron's rule (cronie): a fixed hour fires a repeated wall time once,
    a missing one just after the gap; `*` or a step fires each real hour, a missing one never."""
    star, fire = cron.schedule.split()[1].startswith("*"), None
    it = croniter(cron.schedule, datetime.fromtimestamp(max(last, now - CRON_CATCH_UP - 1), tz))
    while (t := it.get_next(datetime)).timestamp() <= now:
        wall, ts = t.replace(tzinfo=None), t.timestamp()
        if not star and t.replace(fold=0).timestamp() != ts:
            continue  # the second of a repeated wall time
        if star and datetime.fromtimestamp(ts - 1, tz).utcoffset() != t.utcoffset():
            if croniter(cron.schedule, wall - timedelta(seconds=1)).get_next(datetime) != wall:
                continue  # a wall time the gap skipped
        fire = int(ts)
    return fire, t.timestamp()


def _schedules(app):
    """{p}:cron:{digest} (the last tick enqueued) -> (CronTask, Task, Queue), per schedule."""
    out = {}
    for cron in app.schedules:
        if cron.task_name not in app.tasks:
            raise ValueError(f"schedule {cron.schedule!r} names unknown task {cron.task_name!r}")
        task = app.tasks[cron.task_name]
        q = app._queue(cron.queue) if cron.queue else task.queue or app.default_queue
        ident = [cron.schedule, cron.task_name, q.name, cron.args, cron.kwargs]
        digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
        out[app._k("cron", digest)] = cron, task, q
    return out


def _cmd_scheduler(app, args):
    """Each tick once, across schedulers and restarts; now: Redis TIME. SIGTERM stops it as
    Ctrl-C does, at once (one script writes a tick's task and its record)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _setup_logging(app.scheduler_log_file, args.loglevel or app.scheduler_log_level)
    schedules = _schedules(app)
    if not schedules:
        return log.warning("the app has no schedules; the scheduler exits")
    r, outage = None, _Outage("scheduler")
    log.info("scheduler started with %d schedule(s)", len(schedules))
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            try:
                r = r or app._client(retries=0)  # (it asks Redis whether it is a Cluster)
                pause = _tick(app, r, schedules)
                outage.ok()
            except redis.RedisError as e:
                if isinstance(e, _RECONNECT):  # (READONLY: a failover demoted the master)
                    r = None
                pause = outage.failed(e)
            time.sleep(pause)
    log.info("scheduler stopped")


def _tick(app, r, schedules):
    """Enqueue each schedule's due tick; -> seconds until the next tick (at most 1)."""
    sec, usec = r.time()
    now, pause = sec + usec / 1e6, 1.0  # Redis's clock
    for (record, (cron, task, q)), last in zip(schedules.items(), r.mget(list(schedules))):
        if last is None:  # a new schedule starts from now
            r.set(record, int(now), nx=True)
            continue
        fire, next_tick = _due(cron, app.tz, float(last), now)
        pause = min(pause, next_tick - now)
        payload = app._payload(task, cron.args, cron.kwargs, q)[1]
        if fire and _ENQUEUE(r, [q.key, record], [app._rank[q], q.name, "cron", fire, payload]):
            when = datetime.fromtimestamp(fire, app.tz).isoformat()
            log.info("enqueued %s for %s", cron.task_name, when)
    return pause


# ============================================================================ command line


def _cmd_worker(app, args):
    if args.concurrency is not None:
        app.concurrency = _concurrency(args.concurrency, name="--concurrency")
    if args.exclude_queues is not None:
        app.exclude_queues = app._served_names(args.exclude_queues.split(","))[1]
    _setup_logging(app.worker_log_file, args.loglevel or app.worker_log_level)
    if app.default_queue.name in app.exclude_queues:
        log.warning(
            "the default queue %r is excluded: tasks without queue= wait for other workers",
            app.default_queue.name,
        )
    return _Worker(app).run()


def _json_object(raw):
    """A payload or dead letter as a dict whose missing keys are None (all, if it is bad)."""
    with contextlib.suppress(ValueError, TypeError):
        obj = json.loads(raw)
        if isinstance(obj, dict):
            return collections.defaultdict(lambda: None, obj)
    return collections.defaultdict(lambda: None)


def _snapshot(app):
    """-> (the object `info --json` prints, the stats hash), read in two round trips."""
    pipe = app.redis.pipeline(transaction=False)
    for q in app.queues:
        pipe.llen(q.key).zcard(q.eta_key).lindex(q.key, 0)
    pipe.llen(app.dead_key).zrange(app.workers_key, 0, -1, withscores=True)
    pipe.hgetall(app._k("served")).hgetall(app._k("stats")).time()
    *per_queue, dead, workers, served, stats, (sec, usec) = pipe.execute()
    for wid, _ in workers:  # live, and dead not yet adopted
        pipe.hgetall(app._k("inflight", wid.decode()))
    for q, first in zip(app.queues, per_queue[2::3]):  # when the oldest pending became ready
        pipe.hget(app._k("ids", q.name), _json_object(first)["id"] or "")
    replies, now = pipe.execute(), sec + usec / 1e6
    info = dict(queues={}, latency={}, dead=dead, inflight=0, running=[], workers_list=[])
    counts = zip(app.queues, per_queue[::3], per_queue[1::3], replies[len(workers) :])
    for q, pending, delayed, ready in counts:
        priority = app._priority[q.name]
        info["queues"][q.name] = {"priority": priority, "pending": pending, "delayed": delayed}
        info["latency"][q.name] = round(max(0.0, now - float(ready or now)), 3)
    for (wid, beat), fields in zip(workers, replies):
        wid = wid.decode()
        # "S.K" or "adopted:...", not "S.K:t" or "S.K:s"; running once begun (a task
        # claimed ahead has the start time "" until then)
        claimed = [f for f in fields if not f.endswith((b":s", b":t"))]
        tasks = [f for f in claimed if fields.get(f + b":s") != b""]
        info["inflight"] += len(claimed)
        for f in tasks:
            msg, started = _json_object(fields[f]), fields.get(f + b":s")
            seconds = round(now - float(started), 1) if started else None
            task = {k: msg[k] for k in ("id", "name", "queue")}
            info["running"].append({**task, "worker": wid, "seconds": seconds})
        worker = {
            "id": wid,
            "host": wid.rsplit(".", 2)[0],
            "queues": list(filter(None, served.get(wid.encode(), b"").decode().split(","))),
            "running": len(tasks),
            "seconds_since_heartbeat": round(now - beat, 1),
            "alive": beat >= now - app.heartbeat_timeout,
        }
        info["workers_list"].append(worker)
    alive = [w for w in info["workers_list"] if w["alive"]]
    served = {name for w in alive for name in w["queues"]}
    unserved = [name for name, q in info["queues"].items() if q["pending"] and name not in served]
    info.update(workers=len(alive), unserved_queues=unserved)
    return info, stats


def _info_text(info, rates):
    """`info` for people; rates: {queue: (enqueued/s, done/s)} (`info --watch`), or None."""
    row = "{:<20} {:>8} {:>10} {:>10} {:>10}".format
    lines = [row("queue", "priority", "pending", "delayed", "latency")]
    for name, q in info["queues"].items():
        latency = f"{info['latency'][name]:.1f}s"
        lines.append(row(name, q["priority"], q["pending"], q["delayed"], latency))
        if rates:
            lines[-1] += "  enqueued {:.1f}/s  done {:.1f}/s".format(*rates[name])
    lines.append("in-flight: {inflight}  dead: {dead}  workers: {workers}".format_map(info))
    for w in info["workers_list"]:
        silent = "" if w["alive"] else " (silent)"
        lines.append(
            f"worker {w['id']} host={w['host']} queues={','.join(w['queues'])} "
            f"running={w['running']} heartbeat={w['seconds_since_heartbeat']}s ago{silent}"
        )
    for t in info["running"]:
        lines.append("running {id} {name} queue={queue} worker={worker} {seconds}s".format_map(t))
    for name in info["unserved_queues"]:
        lines.append(f"warning: queue {name} has pending tasks and no live worker serves it")
    return "\n".join(lines)


def _cmd_info(app, args):
    """Once, or with --watch every SECONDS until Ctrl-C, with each queue's rates since the
    last redraw from the stats hash's counters "e QUEUE" and "b done BUCKET QUEUE TASK"."""
    before = rates = None
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            info, stats = _snapshot(app)
            counts, now = collections.Counter(), time.monotonic()
            for field, n in stats.items():
                if m := re.match(rb"(e|b done \d+) (\S+)", field):
                    counts[m[2].decode(), m[1][:1]] += int(n)
            if before:  # (a counter that went down, e.g. deleted, shows 0)
                seconds, diff = now - before[1], counts - before[0]
                rates = {q: [diff[q, k] / seconds for k in (b"e", b"b")] for q in info["queues"]}
            before = counts, now
            text = json.dumps(info) if args.json else _info_text(info, rates)
            if args.watch is None:
                return print(text)
            print(("\x1b[H\x1b[J" if sys.stdout.isatty() else "") + text, flush=True)
            time.sleep(args.watch)


def _cmd_purge(app, args):
    q = app._queue(args.queue)
    pipe = app.redis.pipeline().llen(q.key).zcard(q.eta_key).hgetall(app._k("cancelled"))
    pipe.unlink(q.key, q.eta_key, q.wake_key, app._k("ids", q.name))  # UNLINK: freed later
    pending, delayed, tombstones, *_ = pipe.zrem(app._k("ready"), q.name).execute()
    # The cancel tombstones of purged tasks: no claim will meet (and drop) them now.
    stale = [i for i, queue in tombstones.items() if queue == q.name.encode()]
    if stale:
        app.redis.hdel(app._k("cancelled"), *stale)
    print(pending + delayed)  # the contract: one number
    what = f"{pending} pending and {delayed} delayed task(s) from queue {q.name!r}"
    print(f"wakaq: purged {what}", file=sys.stderr)


def _cmd_dead(app, args):
    if args.purge:
        n = app.redis.pipeline().llen(app.dead_key).unlink(app.dead_key).execute()[0]
        return print(f"deleted {n} dead task(s)")
    if args.requeue is not None:
        return _requeue_dead(app, set(args.requeue))
    entries = [_json_object(raw) for raw in app.redis.lrange(app.dead_key, 0, -1)]
    for e in entries:  # the payload gives way to its arguments, shortened
        msg = _json_object(e.pop("payload", None))
        call = json.dumps([msg["args"], msg["kwargs"]])[1:-1]
        e["when"] = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(e["at"]))
        e["args"] = call if len(call) < 80 else call[:76] + " ..."
    if args.json:
        return print(json.dumps(entries))
    line = "{id} {name} queue={queue} attempts={attempts} reason={reason!r} at={when} args={args}"
    print("\n".join(line.format_map(e) for e in entries) or "no dead tasks")


def _requeue_dead(app, ids):
    """dead --requeue [ID ...]: all, or those ids, back on their queues with retries reset."""
    wanted = set(ids)

    def pick(raw, _):
        e = _json_object(raw)
        if ids and e["id"] not in ids:
            return None
        wanted.discard(e["id"])
        msg = _json_object(e["payload"])  # a bad payload goes back as it was
        payload = json.dumps({**msg, "retry": 0}, separators=(",", ":")) if msg else e["payload"]
        return app._queues.get(e["queue"]) or app.default_queue, "", payload

    moved = _move(app, app.dead_key, "list", pick)
    missing = f"; not found: {' '.join(sorted(wanted))}" if wanted else ""
    print(f"requeued {moved} dead task(s){missing}")
    return 1 if wanted else 0


def _cmd_cancel(app, args):
    found = [app.cancel(task_id) for task_id in args.ids]
    for task_id, where in zip(args.ids, found):
        print(task_id, where or "not found")
    return 1 if None in found else 0


def _cmd_health(app, args):
    """0 while a worker of this app on this host runs and its loop turned within
    heartbeat_timeout (its file's time; no Redis needed), else 1; one line either way."""
    limit, host, ages = app.heartbeat_timeout, socket.gethostname(), []
    for path in glob.glob(_health_glob(app)):
        with contextlib.suppress(OSError):  # its worker is gone (killed), or so is the file
            os.kill(int(path.split(".")[-2]), 0)
            ages.append(time.time() - os.stat(path).st_mtime)
    if not ages:
        print(f"unhealthy: no worker of this app runs on {host}")
        return 1
    ok = min(ages) <= limit
    state = f"a worker on {host} turned its loop {min(ages):.1f}s ago (limit {limit:g}s)"
    print(f"{'ok' if ok else 'unhealthy'}: {state}")
    return 0 if ok else 1


_METRICS = (  # what `metrics` serves: name, type, help
    ("wakaq_tasks_total", "counter", "Attempts by outcome, and tasks retried or dead-lettered."),
    ("wakaq_task_duration_seconds", "histogram", "How long attempts ran."),
    ("wakaq_queue_pending", "gauge", "Tasks ready to run."),
    ("wakaq_queue_delayed", "gauge", "Tasks waiting for their eta or backoff."),
    ("wakaq_queue_latency_seconds", "gauge", "How long the oldest pending task has waited."),
    ("wakaq_running", "gauge", "Tasks running (begun, not claimed ahead)."),
    ("wakaq_dead", "gauge", "Dead letters."),
    ("wakaq_workers", "gauge", "Live workers."),
)
_ESCAPE = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})  # in a label's value


def _counters(stats):
    """The stats hash as (attempts per (queue, task, outcome), bucket counts per (queue,
    task), seconds run per (queue, task))."""
    buckets = collections.defaultdict(lambda: [0] * (len(BUCKETS) + 1))
    totals: collections.Counter = collections.Counter()
    sums = {}
    for field, value in stats.items():
        kind, rest = field.decode().split(" ", 1)
        if kind in "bn":  # "b OUTCOME BUCKET QUEUE TASK", "n OUTCOME QUEUE TASK"
            outcome, *bucket, queue, task = rest.split(" ", 3 if kind == "b" else 2)
            totals[queue, task, outcome] += int(value)
            if bucket:
                buckets[queue, task][int(bucket[0]) - 1] += int(value)
        elif kind == "u":
            sums[tuple(rest.split(" ", 1))] = int(value) / 1e6
    return totals, buckets, sums


def _prometheus(app):
    """The fleet's metrics in Prometheus text format (version 0.0.4), from `info` and the
    stats hash's counters (see the key map): "b OUTCOME BUCKET QUEUE TASK" counts attempts
    by outcome and duration, "n OUTCOME QUEUE TASK" those without a duration."""
    info, stats = _snapshot(app)
    samples = collections.defaultdict(list)  # name: its lines

    def sample(name, value, suffix="", **labels):
        pairs = ",".join(f'{k}="{str(v).translate(_ESCAPE)}"' for k, v in labels.items())
        samples[name].append(f"{name}{suffix}{{{pairs}}} {value}" if pairs else f"{name} {value}")

    totals, buckets, sums = _counters(stats)
    for (queue, task, outcome), n in sorted(totals.items()):
        sample("wakaq_tasks_total", n, queue=queue, task=task, outcome=outcome)
    for (queue, task), counts in sorted(buckets.items()):
        labels = {"queue": queue, "task": task}
        for le, n in zip([*BUCKETS, "+Inf"], itertools.accumulate(counts)):
            sample("wakaq_task_duration_seconds", n, "_bucket", **labels, le=le)
        sample("wakaq_task_duration_seconds", sums.get((queue, task), 0.0), "_sum", **labels)
        sample("wakaq_task_duration_seconds", n, "_count", **labels)
    for queue, q in info["queues"].items():
        sample("wakaq_queue_pending", q["pending"], queue=queue)
        sample("wakaq_queue_delayed", q["delayed"], queue=queue)
        sample("wakaq_queue_latency_seconds", info["latency"][queue], queue=queue)
    sample("wakaq_running", len(info["running"]))
    sample("wakaq_dead", info["dead"])
    sample("wakaq_workers", info["workers"])
    lines = []
    for name, kind, text in _METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n"


def _cmd_metrics(app, args):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] != "/metrics":
                return self.send_error(404, "the metrics are at /metrics")
            try:
                body = _prometheus(app).encode()
            except redis.RedisError as e:
                return self.send_error(503, f"Redis at {_mask(app.url)}: {e}")
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            log.debug("metrics: " + fmt, *args)

    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    url = f"http://{args.bind}:{server.server_port}/metrics"
    print(f"wakaq: serving metrics at {url}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops it as Ctrl-C does
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


_COMMANDS = {  # name: (function, help); their options are in _parse()
    "worker": (_cmd_worker, "run a worker: a parent that forks `concurrency` children"),
    "scheduler": (_cmd_scheduler, "enqueue the app's CronTasks on time"),
    "info": (_cmd_info, "show queues, workers, running, in-flight and dead tasks"),
    "purge": (_cmd_purge, "delete a queue's pending and delayed tasks"),
    "dead": (_cmd_dead, "list, requeue or delete dead-lettered tasks"),
    "cancel": (_cmd_cancel, "cancel tasks by id (pending, delayed, running or dead)"),
    "health": (_cmd_health, "exit 0 if a worker of this app on this host is alive, else 1"),
    "metrics": (_cmd_metrics, "serve Prometheus metrics at /metrics"),
}
# A bad password, an ACL, a bad DB index: a configuration error, not an outage.
_BAD_CONFIG = (redis.AuthenticationError, redis.exceptions.AuthorizationError, redis.ResponseError)
# These ride an outage out (health answers without Redis); the others stop.
_RIDE_OUT = ("worker", "scheduler", "health", "metrics")


def _parse(argv):
    """The arguments, with APP (and purge's QUEUE) given positionally or as --app (--queue) as
    in the original; None if no command is given."""
    parser = argparse.ArgumentParser(prog="wakaq", description="wakaq: a Redis task queue.")
    parser.add_argument("--version", action="version", version=f"wakaq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in _COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("app", metavar="APP", nargs="?", help="module:attribute")
        cmd.add_argument("--app", dest="app_option", help=argparse.SUPPRESS)  # the original's
        cmd.add_argument("--foreground", action="store_true", help=argparse.SUPPRESS)  # ditto
    p = sub.choices  # name: its parser
    for name in ("worker", "scheduler"):
        p[name].add_argument("--loglevel", metavar="LEVEL", help="override the app's log level")
    p["worker"].add_argument("--concurrency", type=int, help="override the app's concurrency")
    p["worker"].add_argument("--exclude-queues", metavar="A,B", help="do not serve these queues")
    p["info"].add_argument("--json", action="store_true", help="print one JSON object")
    p["info"].add_argument(
        "--watch", type=float, nargs="?", const=2, metavar="SECONDS", help="redraw each SECONDS (2)"
    )
    p["purge"].add_argument("queue", metavar="QUEUE", nargs="?")
    p["purge"].add_argument("--queue", dest="queue_option", help=argparse.SUPPRESS)  # ditto
    dead = p["dead"].add_mutually_exclusive_group()
    dead.add_argument("--requeue", nargs="*", metavar="ID", help="all, or these; retries reset")
    dead.add_argument("--purge", action="store_true", help="delete them")
    dead.add_argument("--json", action="store_true", help="list them as one JSON array")
    p["cancel"].add_argument("ids", metavar="ID", nargs="+")
    p["metrics"].add_argument("--port", type=int, default=9808)
    p["metrics"].add_argument("--bind", default="127.0.0.1")
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        return parser.print_help(sys.stderr)
    given = list(filter(None, map(vars(args).get, ("app_option", "app", "queue", "queue_option"))))
    if extra:  # the command's usage and this, exit 2
        p[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if len(given) != 1 + (args.command == "purge"):  # APP, and purge's QUEUE
        p[args.command].error("give APP (module:attribute) and purge's QUEUE once each")
    args.app, args.queue = [*given, None][:2]
    return args


def _load_app(spec):
    """The app, or one line on stderr (no traceback) and None."""
    sys.path.insert(0, os.getcwd())  # a script's sys.path[0] is its own folder
    try:
        return _import_app(spec)
    except Exception as e:  # any import-time error: one line, no traceback
        line = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__]
        frames = [f for f in frames if not f.filename.startswith("<")]
        if frames and not isinstance(e, SyntaxError):  # its str() has its line
            line += f" ({frames[-1].filename}, line {frames[-1].lineno})"
        print(f"wakaq: cannot load app {spec!r}: {line}", file=sys.stderr)
        return None


def main(argv=None):
    """The command line; -> the exit status."""
    args = _parse(argv)
    app = _load_app(args.app) if args else None
    if app is None:
        return 2
    try:
        if getattr(args, "loglevel", None):
            args.loglevel = _log_level(args.loglevel, "--loglevel")
        try:
            app.redis.ping()  # a configuration error stops every command at once
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if isinstance(e, _BAD_CONFIG) or args.command not in _RIDE_OUT:
                raise
        return _COMMANDS[args.command][0](app, args) or 0
    except (ValueError, redis.RedisError) as e:  # ValueError: e.g. an unknown queue name
        redis_at = f"Redis at {_mask(app.url)}: " if isinstance(e, redis.RedisError) else ""
        print(f"wakaq: {redis_at}{e}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, *_BAD_CONFIG)) else 1


# ============================================================ compatibility with the original WakaQ


def _move(app, key, kind, pick):
    """_MOVE, 1,000 a page, what pick(raw, score or "") maps to (queue, due, payload); -> count."""
    r, start, moved = app.redis, 0, 0
    for _ in range(0, r.llen(key) if kind == "list" else r.zcard(key), 1000):
        if kind == "zset":
            page = r.zrange(key, start, start + 999, withscores=True)
        else:
            page = [(raw, "") for raw in r.lrange(key, start, start + 999)]
        batches = collections.defaultdict(list)
        for raw, score in page:
            picked = pick(raw, score)
            if picked:
                batches[picked[0]] += [raw, *picked[1:]]
        n = sum(
            _MOVE(r, [key, q.key], [kind, app._rank[q], q.name, *items])
            for q, items in batches.items()
        )
        moved, start = moved + n, start + len(page) - n
    return moved


_ORIGINAL_TYPES = {  # the original's {"__class__": ...} values
    "Decimal": lambda d: decimal.Decimal(d["value"]),
    "date": lambda d: date(d["year"], d["month"], d["day"]),
    "bytes": lambda d: base64.b64decode(d["value"]),
    "timedelta": lambda d: timedelta(**d["kwargs"]),
    "datetime": lambda d: datetime(**{k: v for k, v in d.items() if k != "__class__"}),
}


def _convert_original(app, queue, raw, due):
    """One of the original's payloads as (queue, due, our payload), or a dead letter."""
    try:
        msg = json.loads(
            raw, object_hook=lambda d: _ORIGINAL_TYPES.get(d.get("__class__"), dict)(d)
        )
        name, a, kw, retry = msg["name"], msg["args"], msg["kwargs"], msg.get("retry") or 0
        if (type(name), type(a), type(kw), type(retry)) != (str, list, dict, int):
            raise ValueError("need name, args, kwargs")
        task = app.tasks.get(name) or types.SimpleNamespace(name=name, _json_name=json.dumps(name))
        payload = app._payload(task, a, kw, queue)[1]
        return queue, due and repr(due), payload.replace('"retry":0,', f'"retry":{retry},', 1)
    except _BAD_PAYLOAD as e:
        msg = {"id": os.urandom(12).hex(), "queue": queue.name}
        return queue, "dead", _dead_entry(raw, msg, f"bad payload from the original WakaQ: {e}")


def _cmd_migrate(app, args):
    """The original's tasks (lists PREFIX:Q, zsets PREFIX:eta:Q) to ours; bad ones dead."""
    moved = 0
    for q in app.queues:
        convert = functools.partial(_convert_original, app, q)
        moved += _move(app, f"{q.prefix}:{q.name}", "list", convert)
        moved += _move(app, f"{q.prefix}:eta:{q.name}", "zset", convert)
    print(f"moved {moved} task(s) from the original WakaQ")


_COMMANDS["migrate"] = (_cmd_migrate, "move the original WakaQ's tasks into our queues")


def _original_script(command):
    """The original's console scripts: wakaq-worker --app=APP, wakaq-info, ..."""
    return lambda: main([*command, *sys.argv[1:]])


_worker_script = _original_script(["worker"])
_scheduler_script = _original_script(["scheduler"])
_info_script = _original_script(["info", "--json"])
_purge_script = _original_script(["purge"])

# `from wakaq.exceptions import SoftTimeout`, as with the original package; also when this
# file is vendored as pkg.wakaq (pkg.wakaq.exceptions).
exceptions = types.ModuleType(f"{__name__}.exceptions", "The exceptions, as in the original WakaQ.")
vars(exceptions).update(SoftTimeout=SoftTimeout, WakaQError=WakaQError, Cancelled=Cancelled)
sys.modules.setdefault(exceptions.__name__, exceptions)

if __name__ == "__main__":  # `import wakaq` in the app finds this module, not a 2nd copy
    sys.modules.setdefault(__spec__.name if __spec__ else "wakaq", sys.modules[__name__])
    sys.modules.setdefault("wakaq.exceptions", exceptions)
    sys.exit(main())
