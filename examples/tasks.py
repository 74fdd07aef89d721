"""An example app: `python wakaq.py worker examples.tasks:wakaq` from the repo root.

Then, in another shell:  python -c "from examples.tasks import add; print(add.delay(1, 2))"
Redis: $WAKAQ_URL, else $REDIS_URL, else redis://127.0.0.1:6379/0.
No Redis at hand? `python -m examples.dev` runs a throwaway server (see examples/dev.py).
"""

import logging
import os
from datetime import timedelta

from wakaq import CronTask, Queue, WakaQ, current_task

wakaq = WakaQ(
    # The lowest-priority queue is the default one: here "default" (a plain name ranks last),
    # which this app's workers serve, so a task without queue= runs.
    queues=[
        (0, "high"),
        Queue("slow", priority=1, max_retries=2, soft_timeout=30, hard_timeout=40),
        "default",
    ],
    url=os.environ.get("WAKAQ_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
    concurrency="cores",
    soft_timeout=10,
    hard_timeout=timedelta(seconds=15),
    schedules=[CronTask("* * * * *", "heartbeat")],
)
log = logging.getLogger(__name__)


@wakaq.task(queue="high")
def add(a, b):
    log.info("%s + %s = %s", a, b, a + b)
    return a + b


@wakaq.task
def heartbeat():
    print("still alive, attempt", current_task()["attempt"])


@wakaq.task(queue="slow")
async def fetch(url):
    import asyncio

    await asyncio.sleep(0.1)
    log.info("fetched %s", url)


class Unavailable(Exception):
    pass


@wakaq.task
def charge(order_id, tries=0):
    """Retry from task code: enqueue yourself again, later, and give up after a while."""
    try:
        if tries < 2:
            raise Unavailable("the payment service is busy")  # stands in for the real call
        log.info("charged order %s after %d retries", order_id, tries)
    except Unavailable:
        if tries >= 5:
            raise  # logged with its traceback; the app decides what next
        charge.delay(order_id, tries=tries + 1, eta=0.1 * 2**tries)
