"""Instructions per task in a worker child, counted by callgrind (deterministic, unlike time).

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/child_cost.py N

runs one child's claim/run/ack loop in this process (no fork) over N no-op tasks on a private
redis-server, with the worker's log set-up (to /dev/null, at LEVEL: WARNING, or INFO for the
per-attempt line), and prints the instruction total callgrind reports for the run; the per-task
figure is (total(3000) - total(1000)) / 2000, which cancels the start-up. WAKAQ_PY names
another wakaq.py to measure (an old one); NO_HIREDIS=1 hides hiredis from redis-py.
"""

import gc
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
REPORT = os.fdopen(os.dup(2), "w")  # stderr as it was before the worker's log set-up
if os.environ.get("NO_HIREDIS"):  # measure redis-py's own reply parser
    sys.modules["hiredis"] = None
path = os.environ.get("WAKAQ_PY", os.path.join(os.path.dirname(__file__), "..", "wakaq.py"))
spec = importlib.util.spec_from_file_location("wakaq", path)
wakaq = importlib.util.module_from_spec(spec)
sys.modules["wakaq"] = wakaq
spec.loader.exec_module(wakaq)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    port, folder = free_port(), tempfile.mkdtemp()
    server = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--save", "", "--dir", folder],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        run(port)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder)


def run(port):
    app = wakaq.WakaQ(url=f"redis://127.0.0.1:{port}/0", concurrency=1, max_tasks_per_worker=N)
    app.task(lambda: None, name="noop")
    level = os.environ.get("LEVEL", "WARNING")
    if hasattr(wakaq, "_setup_logging"):  # the worker's own: its INFO line's fast path
        wakaq._setup_logging(os.devnull, level)  # (stdout and stderr go there too)
    else:
        logging.basicConfig(level=level, stream=open(os.devnull, "w"))
    app.tasks["noop"].delay_many([()] * N)
    worker = wakaq._Worker(app)
    app.redis.zadd(app.workers_key, {worker.wid: time.time() + 3600})
    app.redis.sadd(worker.served_key, *worker.served)
    child = (getattr(wakaq, "_Child", None) or wakaq._ChildProcess)(worker, 0)
    gc.freeze()  # as _child_main does after fork: the collector skips what is there now
    child.run()
    left = app.redis.llen(app.default_queue.key)
    print(f"ran {N - left} tasks", file=REPORT, flush=True)


if __name__ == "__main__":
    main()
