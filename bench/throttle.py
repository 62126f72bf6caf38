"""A throttling TCP proxy on loopback: what a link of a given rate does to the bytes between a client and a server
(bench/fetch_ttft.py puts it between a replica and the shared chunk-cache tier's Redis; the adaptation tests too).

    proxy = ThrottlingProxy(redis_port, rate=125e6)  # 1 Gbit/s each way
    url = f"redis://127.0.0.1:{proxy.port}/0"

Python threads pump the bytes, so the highest rate it can pass is the host's (a few Gbit/s on loopback): the
benchmark measures what got through and reports it beside the rate asked for.
"""

from __future__ import annotations

import socket
import threading
import time


class ThrottlingProxy:
    """A TCP proxy on loopback forwarding to `port`, each direction of each connection at most `rate` bytes per
    second (None: as fast as it goes). Threads: one accepting, two per connection."""

    def __init__(self, port: int, rate: float | None) -> None:
        self.upstream = port
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        started, sent = time.monotonic(), 0
        try:
            while data := source.recv(1 << 20):
                if self.rate is not None:  # idle time earns no credit: the clock restarts after a pause
                    started = max(started, time.monotonic() - sent / self.rate)
                    sent += len(data)
                    time.sleep(max(0.0, started + sent / self.rate - time.monotonic()))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for end in self.sockets:
            end.close()
