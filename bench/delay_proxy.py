#!/usr/bin/env python3
# Copied from the peer benchmark's shared/bench/rtt/delay_proxy.py (our own code), as is but
# for one addition (--ready prints one line on stdout once it listens) and ruff formatting.
# bench.py's rtt case puts it between the workers and redis-server and reads its counters
# with SIGUSR1 + --stats.
"""User-space delay proxy for TCP on loopback: every chunk read in either direction is written
to the other side DELAY/2 ms later, so a request/reply round trip grows by DELAY ms.

    python3 delay_proxy.py --listen 7001 --target 6390 --delay-ms 1.0

Standard library only. Design:
  * one asyncio loop, BufferedProtocol callbacks (no streams), one FIFO per direction per
    connection: a chunk is queued with due = now + DELAY/2 and a single call_at() timer
    flushes every chunk that is due, in arrival order (the due times of one FIFO never
    decrease, so order is kept; equal-time TimerHandles are not ordered by asyncio's heap,
    hence no per-chunk timers).
  * selectors.SelectSelector: select() takes a microsecond timeout, whereas epoll/poll round
    every timeout up to a whole millisecond, which would turn a 0.25 ms wait into 1 ms.
  * PR_SET_TIMERSLACK 1 us (Linux): the kernel may otherwise fire the select() timeout up to
    50 us late.
  * back-pressure: when one side's write buffer is over the high-water mark, the other side
    stops reading until it drains.
  * --delay-ms 0: chunks are forwarded at once (a control for the proxy's own cost).
  * SIGUSR1 appends counters (connections, chunks and bytes per direction) as a JSON line to
    --stats (and so does the exit).
"""

import argparse
import asyncio
import collections
import ctypes
import json
import selectors
import signal
import socket
import sys


class Pipe:
    """One direction: chunks received from `src` go to `dst` after `half` seconds."""

    __slots__ = ("loop", "half", "dst", "fifo", "timer", "closing", "stats", "key")

    def __init__(self, loop, half, stats, key):
        self.loop, self.half, self.dst, self.stats, self.key = loop, half, None, stats, key
        self.fifo, self.timer, self.closing = collections.deque(), None, False

    def push(self, data):
        st = self.stats
        st[self.key + "_chunks"] += 1
        st[self.key + "_bytes"] += len(data)
        if not self.half:
            if self.dst is not None:
                self.dst.write(data)
            else:
                self.fifo.append((0.0, data))
            return
        due = self.loop.time() + self.half
        self.fifo.append((due, data))
        if self.timer is None and self.dst is not None:
            self.timer = self.loop.call_at(due, self.flush)

    def attach(self, dst):  # the upstream connection is up: send what waited
        self.dst = dst
        if self.fifo:
            if self.half:
                self.timer = self.loop.call_at(self.fifo[0][0], self.flush)
            else:
                dst.write(b"".join(d for _, d in self.fifo))
                self.fifo.clear()

    def flush(self):
        self.timer = None
        fifo, now, out = self.fifo, self.loop.time(), []
        while fifo and fifo[0][0] <= now:
            out.append(fifo.popleft()[1])
        if out and not self.dst.is_closing():
            self.dst.write(out[0] if len(out) == 1 else b"".join(out))
        if fifo:
            self.timer = self.loop.call_at(fifo[0][0], self.flush)
        elif self.closing:
            self.dst.close()

    def close_after_flush(self):
        self.closing = True
        if self.dst is None:
            return
        if not self.fifo:
            self.dst.close()
        elif self.timer is None:
            self.timer = self.loop.call_at(self.fifo[0][0], self.flush)


class Side(asyncio.BufferedProtocol):
    """One socket; `out` is the Pipe its received chunks go into. BufferedProtocol: recv_into a
    reused 64 KiB buffer (a plain Protocol gets sock.recv(256 KiB), a large allocation per
    chunk: 77 -> 47 us of proxy CPU per chunk, PING round trip 0.25 -> 0.16 ms here)."""

    def __init__(self, out, peer_side=None):
        self.out, self.transport, self.peer = out, None, peer_side
        self.buf = bytearray(65536)
        self.view = memoryview(self.buf)

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        self.out.push(bytes(self.view[:nbytes]))

    def eof_received(self):
        self.out.close_after_flush()
        return False

    def connection_lost(self, exc):
        self.out.close_after_flush()

    def pause_writing(self):  # our write buffer is full: stop reading the other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Server:
    def __init__(self, loop, args):
        self.loop, self.args = loop, args
        self.half = args.delay_ms / 2e3
        self.stats = collections.Counter(connections=0)

    def accept(self):
        loop, half, st = self.loop, self.half, self.stats
        st["connections"] += 1
        up = Pipe(loop, half, st, "up")  # client -> redis
        down = Pipe(loop, half, st, "down")  # redis -> client
        client = Side(up)

        async def connect():
            try:
                _, server = await loop.create_connection(
                    lambda: Side(down, client), self.args.target_host, self.args.target_port
                )
            except OSError as e:
                print(f"delay_proxy: upstream connect failed: {e}", file=sys.stderr)
                if client.transport is not None:
                    client.transport.close()
                return
            client.peer = server
            up.attach(server.transport)
            down.attach(client.transport)
            if up.closing:
                up.close_after_flush()

        loop.create_task(connect())
        return client

    def dump(self):  # one JSON line appended per SIGUSR1, and one at exit
        if self.args.stats:
            with open(self.args.stats, "a") as f:
                f.write(json.dumps(dict(self.stats, t=self.loop.time())) + "\n")


def set_timerslack(ns):
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_TIMERSLACK = 29
        return libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=int, required=True, help="loopback port to listen on")
    ap.add_argument("--listen-host", default="127.0.0.1")
    ap.add_argument("--target", dest="target_port", type=int, required=True)
    ap.add_argument("--target-host", default="127.0.0.1")
    ap.add_argument(
        "--delay-ms",
        type=float,
        required=True,
        help="added round-trip time, ms (each direction gets half)",
    )
    ap.add_argument("--timerslack-ns", type=int, default=1000)
    ap.add_argument("--stats", help="file to append counters to on SIGUSR1 and at exit")
    ap.add_argument(
        "--ready",
        action="store_true",
        help="print 'ready PORT' on stdout once listening (for a driver to wait on)",
    )
    args = ap.parse_args()
    if args.timerslack_ns:
        set_timerslack(args.timerslack_ns)
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    asyncio.set_event_loop(loop)
    srv = Server(loop, args)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.listen_host, args.listen))
    server = loop.run_until_complete(loop.create_server(srv.accept, sock=sock, backlog=512))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, srv.dump)
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    print(
        f"delay_proxy: {args.listen_host}:{args.listen} -> {args.target_host}:"
        f"{args.target_port}, +{args.delay_ms:g} ms round trip",
        file=sys.stderr,
        flush=True,
    )
    if args.ready:
        print(f"ready {args.listen}", flush=True)
    try:
        loop.run_until_complete(stop.wait())
    finally:
        srv.dump()
        server.close()


if __name__ == "__main__":
    main()
