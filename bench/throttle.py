"""A throttling TCP proxy on loopback: what a link of a given rate does to the bytes between a client and a server
(bench/fetch_ttft.py puts it between a replica and the shared chunk-cache tier's Redis; the adaptation tests too).

    proxy = ThrottlingProxy(redis_port, rate=125e6)  # 1 Gbit/s each way
    url = f"redis://127.0.0.1:{proxy.port}/0"
    ...
    proxy.close()

The proxy runs in a process of its own (`python bench/throttle.py --upstream PORT [--rate BYTES_PER_S]`), so the
benchmark's threads never share an interpreter lock with it, and moves the bytes with splice(2) through a pipe
(Linux), so they never enter Python: one pump thread per direction and connection, a millisecond's worth of
bytes at a time (4 KiB to SPLICE_BYTES), each step held back until sending it keeps the direction to `rate`
(idle time earns no credit). The rate is the link's, shared by all its connections, as a network link's is: a
client reading over several connections at once gets `rate` in all, not `rate` each (a pacer a connection let
the benchmark's replicas measure 169-353 MB/s through a "1 Gbit/s" link, 2026-12-01). Elsewhere it falls back
to recv/sendall of the same size.
The highest rate it passes is still the host's; the benchmark measures what got through and reports it beside
the rate asked for.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SPLICE_BYTES = 1 << 20  # moved per step; also the pipe's size where the kernel allows it
_F_SETPIPE_SZ = 1031  # fcntl's F_SETPIPE_SZ on Linux
# Lag a direction may make up: a pump a little late on its schedule (its own time between steps) sends the next
# step at once, so the rate got does not fall short of the rate asked (87 MB/s at 125 asked on a busy 2-core
# host without it). Later than this, the direction was idle, and idle time earns no credit: a read after a pause
# gets the link's rate from its first byte (a 10 ms credit let a half-megabyte entry through at 228 MB/s on a
# "1 Gbit/s" link, and the fetch policy believed it).
CREDIT_S = 0.002


class ThrottlingProxy:
    """A TCP proxy on loopback forwarding to `port`, each direction at most `rate` bytes per second, all
    connections together (None: as fast as it goes), in a child process. `port`: where clients connect.
    Raises RuntimeError if the child does not start."""

    def __init__(self, port: int, rate: float | None) -> None:
        self.upstream = port
        self.rate = rate
        command = [sys.executable, str(Path(__file__).resolve()), "--upstream", str(port)]
        if rate is not None:
            command += ["--rate", repr(float(rate))]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.process.kill()
            raise RuntimeError(f"the throttling proxy did not start (it said {line!r})")
        self.port = int(line)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


class _Pacer:
    """One direction of the link's pace, shared by the pumps of all its connections: `step` bytes moved at a
    time (a millisecond's worth at `rate`, between 4 KiB and SPLICE_BYTES), and `wait(moved)` before sending
    them. Thread-safe: each step takes its place in the direction's schedule under a lock, then sleeps."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.step = SPLICE_BYTES if rate is None else int(min(SPLICE_BYTES, max(4096, rate / 1000)))
        self.started = time.monotonic()
        self.sent = 0.0
        self._lock = threading.Lock()

    def wait(self, moved: int) -> None:
        """Sleep until the bytes sent in this direction since `started`, these `moved` included, keep to `rate`
        (a lag of up to CREDIT_S is made up; idle time earns no credit)."""
        if self.rate is None:
            return
        with self._lock:
            now = time.monotonic()
            if now - (self.started + self.sent / self.rate) > CREDIT_S:  # idle: the schedule starts again now
                self.started = now - self.sent / self.rate
            self.sent += moved
            due = self.started + self.sent / self.rate
        time.sleep(max(0.0, due - now))


def _pump_splice(source: socket.socket, sink: socket.socket, pacer: _Pacer) -> None:
    read_end, write_end = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(write_end, _F_SETPIPE_SZ, SPLICE_BYTES)
    except OSError:  # the kernel's limit on pipe sizes: the default size works too, in smaller steps
        pass
    try:
        while moved := os.splice(source.fileno(), write_end, pacer.step):
            pacer.wait(moved)
            left = moved
            while left:
                left -= os.splice(read_end, sink.fileno(), left)
    finally:
        os.close(read_end)
        os.close(write_end)


def _pump_copy(source: socket.socket, sink: socket.socket, pacer: _Pacer) -> None:
    while data := source.recv(pacer.step):
        pacer.wait(len(data))
        sink.sendall(data)


def _pump(source: socket.socket, sink: socket.socket, pacer: _Pacer) -> None:
    try:
        (_pump_splice if hasattr(os, "splice") else _pump_copy)(source, sink, pacer)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(upstream: int, rate: float | None) -> None:
    """The child process: listen on a free loopback port, print it, forward every connection to `upstream`, all
    connections sharing the link's `rate` each way."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    to_server, to_client = _Pacer(rate), _Pacer(rate)
    while True:
        client, _ = listener.accept()
        server = socket.create_connection(("127.0.0.1", upstream))
        for source, sink, pacer in ((client, server, to_server), (server, client, to_client)):
            threading.Thread(target=_pump, args=(source, sink, pacer), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=int, required=True, help="the server's port on 127.0.0.1")
    parser.add_argument("--rate", type=float, default=None,
                        help="bytes per second each way, all connections together [unthrottled]")
    args = parser.parse_args()
    serve(args.upstream, args.rate)


if __name__ == "__main__":
    main()
