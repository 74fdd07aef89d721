"""An example app: `python wakaq.py worker examples.tasks:wakaq` from the repo root.

Then, in another shell:  python -c "from examples.tasks import add; print(add.delay(1, 2))"
"""
import logging
import os
from datetime import timedelta

from wakaq import CronTask, Queue, WakaQ

wakaq = WakaQ(
    queues=[(0, "high"), Queue("default", priority=1), Queue("slow", priority=2, max_retries=2,
                                                          soft_timeout=30, hard_timeout=40)],
    url=os.environ.get("WAKAQ_URL", "redis://127.0.0.1:6379/0"),
    concurrency="cores",
    soft_timeout=10, hard_timeout=timedelta(seconds=15),
    schedules=[CronTask("* * * * *", "heartbeat")],
)
log = logging.getLogger(__name__)


@wakaq.task(queue="high")
def add(a, b):
    log.info("%s + %s = %s", a, b, a + b)
    return a + b


@wakaq.task
def heartbeat():
    print("still alive")


@wakaq.task(queue="slow")
async def fetch(url):
    import asyncio
    await asyncio.sleep(0.1)
    log.info("fetched %s", url)
