"""Typed use of wakaq: a type checker accepts this file.

    python -m mypy examples/typing_ok.py        # Success: no issues found
    python -m mypy examples/typing_bad.py       # fails: the arguments of .delay() are checked

`@wakaq.task` keeps the function's signature (a ParamSpec), so `.delay()` takes exactly the
function's arguments and returns the task's id, a `str`. Importing this file does not touch
Redis: building a `WakaQ` does not connect (the first `.delay()` does).
"""

from wakaq import WakaQ

wakaq = WakaQ(url="redis://localhost:6379/0")


@wakaq.task
def add(a: int, b: int) -> int:
    return a + b


@wakaq.task(max_retries=2)
async def fetch(url: str, timeout: float = 10.0) -> None:
    print("fetching", url, "within", timeout, "s")


def enqueue() -> list[str]:
    task_id: str = add.delay(1, 2)
    other: str = add.delay(1, b=2)
    page = fetch.delay("https://example.com/", timeout=5.0)
    total: int = add(3, 4)  # a plain call runs the function here and returns its result
    print(total)
    return [task_id, other, page]
