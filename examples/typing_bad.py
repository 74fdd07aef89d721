"""A type checker must reject this file: `python -m mypy examples/typing_bad.py` reports

    error: Argument 1 to "delay" of "Task" has incompatible type "str"; expected "int"  [arg-type]
    error: Missing positional argument "b" in call to "delay" of "Task"  [call-arg]

(the class name and the exact wording are mypy's and may differ). The file is fine at
import time: building a `WakaQ` does not connect to Redis, and nothing below is called.
"""

from wakaq import WakaQ

wakaq = WakaQ(url="redis://localhost:6379/0")


@wakaq.task
def add(a: int, b: int) -> int:
    return a + b


def enqueue() -> str:
    return add.delay("x")  # wrong type and a missing argument: both reported
