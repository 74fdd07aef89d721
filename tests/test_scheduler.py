"""The scheduler: real `python wakaq.py scheduler` processes and real redis-servers.

    python -m pytest -q tests/test_scheduler.py

The restart tests run on the session's private Redis, in real time. The time-zone nights
run a second redis-server under libfaketime, its clock started on the night and running
600 times as fast: the scheduler reads "now" from Redis (TIME), so the scheduler process
keeps its real clock, which also shows that its host's clock does not matter. Pure tests
of _due at the top need no Redis.
"""

import glob
import json
import os
import re
import signal
import time
from datetime import datetime
from unittest import mock
from zoneinfo import ZoneInfo

import pytest
import redis

import wakaq
from conftest import ENV, REDIS_SERVER, URL, RedisServer, _free_port, cli, slow, wait_for
from wakaq import CronTask, WakaQ

BERLIN, UTC = ZoneInfo("Europe/Berlin"), ZoneInfo("UTC")
QUEUE = "{wakaq}:q:default"
LIBFAKETIME = next(iter(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")), None)


def _noop():
    pass


every10 = WakaQ(url=URL, schedules=[CronTask("* * * * * */10", "every10")])
every10.task(_noop, name="every10")
nothing = WakaQ(url=URL)
# The night's Redis is a second server: its URL reaches the scheduler in its environment.
night = WakaQ(
    url=os.environ.get("WAKAQ_TEST_NIGHT_URL", URL),
    timezone="Europe/Berlin",
    schedules=[CronTask("30 2 * * *", "daily"), CronTask("0 * * * *", "hourly")],
)
night.task(_noop, name="daily")
night.task(_noop, name="hourly")


def at(text, tz=BERLIN):
    """Unix seconds of a wall time in tz; "+02:00" style offsets pick the fold."""
    d = datetime.fromisoformat(text)
    return (d if d.tzinfo else d.replace(tzinfo=tz)).timestamp()


def fires(schedule, start, end, step=60, tz=BERLIN):
    """Every tick a scheduler that passes each `step` s from `start` to `end` would enqueue,
    as ISO wall times in tz."""
    cron, last, now, out = CronTask(schedule, "x"), at(start), at(start), []
    while now < at(end):
        now += step
        fire, nxt = wakaq._due(cron, tz, last, now)
        assert nxt > now
        if fire:
            out.append(datetime.fromtimestamp(fire, tz).isoformat())
            last = fire
    return out


def enqueued(*procs):
    """(task, tick) for every "enqueued TASK for TICK" line the processes logged."""
    return [m for p in procs for m in re.findall(r"enqueued (\w+) for (\S+)", p.log())]


# ===================================================================== _due, no Redis


def test_due_fires_a_missed_schedule_once_for_its_latest_tick():
    every5 = CronTask("*/5 * * * *", "x")
    last = at("2026-01-05 10:00")
    assert wakaq._due(every5, BERLIN, last, at("2026-01-05 10:17")) == (
        at("2026-01-05 10:15"),
        at("2026-01-05 10:20"),
    )
    assert wakaq._due(every5, BERLIN, last, at("2026-01-05 10:04:59"))[0] is None
    assert wakaq._due(every5, BERLIN, last, at("2026-01-05 10:05"))[0] == at("2026-01-05 10:05")


def test_due_skips_a_tick_over_thirty_minutes_old():
    daily = CronTask("0 9 * * *", "x")
    last = at("2026-01-04 09:00")
    assert wakaq._due(daily, BERLIN, last, at("2026-01-05 09:30"))[0] == at("2026-01-05 09:00")
    assert wakaq._due(daily, BERLIN, last, at("2026-01-05 09:30:02"))[0] is None


def test_due_reads_the_sixth_field_as_seconds():
    assert fires("* * * * * */10", "2026-01-05 10:00:00", "2026-01-05 10:00:35", step=1) == [
        "2026-01-05T10:00:10+01:00",
        "2026-01-05T10:00:20+01:00",
        "2026-01-05T10:00:30+01:00",
    ]
    # "*/10 * * * * *" is every second of every tenth minute, not every 10 s
    assert len(fires("*/10 * * * * *", "2026-01-05 10:00:00", "2026-01-05 10:00:05", 1)) == 5


def test_due_follows_cron_when_the_clocks_go_back():
    night = ("2026-10-25 00:00+02:00", "2026-10-25 04:00+01:00")
    assert fires("30 2 * * *", *night) == ["2026-10-25T02:30:00+02:00"]
    assert fires("0 * * * *", *night) == [
        "2026-10-25T01:00:00+02:00",
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T03:00:00+01:00",
        "2026-10-25T04:00:00+01:00",
    ]
    assert fires("*/30 2 * * *", *night) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
    ]


def test_due_follows_cron_when_the_clocks_go_forward():
    night = ("2026-03-29 00:00", "2026-03-29 05:00")
    assert fires("30 2 * * *", *night) == ["2026-03-29T03:00:00+02:00"]  # just after the gap
    assert fires("0 * * * *", *night) == [
        "2026-03-29T01:00:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T04:00:00+02:00",
        "2026-03-29T05:00:00+02:00",
    ]
    # an hour step: 02:15 does not exist and is no tick (croniter alone would add 03:00)
    assert fires("15 */2 * * *", *night) == [
        "2026-03-29T00:15:00+01:00",
        "2026-03-29T04:15:00+02:00",
    ]
    ny = ZoneInfo("America/New_York")  # 09:00 local: 13:00 UTC after the change
    assert wakaq._due(
        CronTask("0 9 * * *", "x"), ny, at("2024-03-09 09:30", ny), at("2024-03-10 09:00:01", ny)
    )[0] == at("2024-03-10 13:00+00:00")


# ===================================================================== processes


def redis_now(client):
    sec, usec = client.time()
    return sec + usec / 1e6


@slow
@pytest.mark.parametrize("schedulers", [1, 2])
def test_a_tick_missed_across_a_restart_is_enqueued_once(r, spawn, schedulers):
    first = [spawn("scheduler", "tests.test_scheduler:every10") for _ in range(schedulers)]
    wait_for(lambda: r.keys("{wakaq}:cron:*"), "the schedule's record in Redis", diag=spawn.tails)
    wait_for(lambda: 6.8 <= redis_now(r) % 10 < 7.2, "3 s before a tick", 12, interval=0.01)
    for p in first:
        os.kill(p.pid, signal.SIGTERM)
    for p in first:
        assert p.wait_exit(5) == 0
    missed = (int(redis_now(r)) // 10 + 1) * 10
    assert missed - redis_now(r) > 2, "the schedulers took too long to stop"
    before = r.llen(QUEUE)
    wait_for(lambda: redis_now(r) >= missed + 3, "3 s after the tick", 10)
    second = [spawn("scheduler", "tests.test_scheduler:every10") for _ in range(schedulers)]
    wait_for(lambda: r.llen(QUEUE) > before, "the missed tick", diag=spawn.tails)
    missed_iso, next_iso = (
        datetime.fromtimestamp(t, UTC).isoformat() for t in (missed, missed + 10)
    )
    wait_for(
        lambda: next_iso in [t for _, t in enqueued(*second)], "the next tick", 15, diag=spawn.tails
    )
    ticks = [t for _, t in enqueued(*first, *second)]
    assert ticks.count(missed_iso) == 1 and missed_iso in [t for _, t in enqueued(*second)], (
        spawn.tails()
    )
    assert len(ticks) == len(set(ticks)) == r.llen(QUEUE)  # one payload per tick
    stamps = sorted(datetime.fromisoformat(t).timestamp() for t in ticks)
    assert all(b - a == 10 for a, b in zip(stamps, stamps[1:]))  # none lost, none twice
    assert r.zscore("{wakaq}:ready", "default") == 0 and r.llen("{wakaq}:wake:default") > 0


@slow
def test_scheduler_stops_within_half_a_second_of_sigterm_and_logs_it(r, spawn):
    s = spawn("scheduler", "tests.test_scheduler:every10")
    wait_for(lambda: "scheduler started" in s.log(), "the scheduler to start", diag=spawn.tails)
    started = time.monotonic()
    os.kill(s.pid, signal.SIGTERM)
    assert s.wait_exit(5) == 0
    assert time.monotonic() - started < 0.5
    assert "scheduler stopped" in s.log()


def test_scheduler_with_no_schedules_says_so_and_exits():
    out = cli("scheduler", "tests.test_scheduler:nothing", timeout=10)
    assert out.returncode == 0, out.stderr
    assert "no schedules" in out.stderr


# ===================================================================== time-zone nights


class FakedRedis(RedisServer):
    """A redis-server whose clock (TIME) starts at `start` (UTC) and runs `rate` times as fast,
    through libfaketime. glibc is preloaded after it: Debian's redis-server allocates with
    jemalloc, whose start-up calls clock_gettime back into half-initialised libfaketime and
    hangs; with glibc first in the symbol search order the server allocates with glibc."""

    def __init__(self, folder, start, rate):
        super().__init__(_free_port(), folder)
        self.env = dict(
            TZ="UTC",
            LD_PRELOAD=f"{LIBFAKETIME}:libc.so.6",
            FAKETIME=f"@{start} x{rate}",
            FAKETIME_DONT_FAKE_MONOTONIC="1",
        )

    def start(self):
        with mock.patch.dict(os.environ, self.env):  # the server's environment only
            super().start()


NIGHTS = {  # first, the fake clock's start (UTC), its end, and what is enqueued in Berlin
    "clocks go back": (
        "2026-10-24 23:40:00",
        "2026-10-25T02:20:00+00:00",
        [
            ("hourly", "2026-10-25T02:00:00+02:00"),
            ("daily", "2026-10-25T02:30:00+02:00"),
            ("hourly", "2026-10-25T02:00:00+01:00"),
            ("hourly", "2026-10-25T03:00:00+01:00"),
        ],
    ),
    "clocks go forward": (
        "2026-03-29 00:30:00",
        "2026-03-29T01:20:00+00:00",
        [("daily", "2026-03-29T03:00:00+02:00"), ("hourly", "2026-03-29T03:00:00+02:00")],
    ),
}


@slow
@pytest.mark.skipif(
    not (REDIS_SERVER and (LIBFAKETIME or os.environ.get("CI"))),
    reason="needs redis-server and libfaketime (Debian package faketime)",
)
@pytest.mark.parametrize("name", list(NIGHTS))
def test_a_daylight_saving_night_enqueues_what_cron_would(tmp_path, spawn, name):
    assert LIBFAKETIME, "libfaketime is not installed (Debian package faketime)"
    start, end, expected = NIGHTS[name]
    server = FakedRedis(str(tmp_path), start, 600)
    server.start()
    client = redis.Redis(port=server.port)
    try:
        with mock.patch.dict(ENV, WAKAQ_TEST_NIGHT_URL=f"redis://127.0.0.1:{server.port}/0"):
            s = spawn("scheduler", "tests.test_scheduler:night")
        wait_for(lambda: "scheduler started" in s.log(), "the scheduler to start", diag=spawn.tails)
        first = datetime.fromisoformat(expected[0][1]).timestamp()
        assert redis_now(client) < first, "the scheduler started after the night's first tick"
        wait_for(lambda: redis_now(client) >= at(end), "the end of the night", 30)
        os.kill(s.pid, signal.SIGTERM)
        assert s.wait_exit(5) == 0
        got = sorted(enqueued(s), key=lambda e: (datetime.fromisoformat(e[1]), e[0]))
        assert got == expected, s.log()
        names = sorted(json.loads(p)["name"] for p in client.lrange(QUEUE, 0, -1))
        assert names == sorted(task for task, _ in expected)
    finally:
        client.close()
        server.stop()
