"""A TCP proxy on loopback for fault tests: a real network path that a test can cut or slow.

:class:`FlakyProxy` listens on a free port and forwards each connection to ``target``
with two threads (one per direction). It counts the bytes each way, and on request

- **cuts** every connection once it has carried ``cut_after`` bytes towards the client
  (mid-packet: the last chunk is forwarded only up to the limit), as a flapping radio
  link does; the client reconnects through the proxy and the next connection is cut
  after as many bytes again;
- **slows** the way towards the client to ``rate`` bytes per second, so a transfer
  takes long enough for a test to act in its middle.

Both can change while connections run. Only sockets and threads: nothing is faked.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

_CHUNK = 4096


class FlakyProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.cut_after: int | None = None
        self.rate: float | None = None
        self.downstream_bytes = 0
        self.upstream_bytes = 0
        self.connections = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        self.url = f"mqtt://{self.host}:{self.port}"
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="flaky-proxy", daemon=True)

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut_all()
        self._thread.join(5)

    def cut_all(self) -> None:
        """Drop every open connection now (both sides see it end)."""
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            self._drop(sock)

    # ------------------------------------------------------------------ internals

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._drop(client)
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._open.update((client, upstream))
            pair = (client, upstream)
            threading.Thread(
                target=self._pump, args=(upstream, client, pair, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(client, upstream, pair, False), daemon=True
            ).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        pair: tuple[socket.socket, socket.socket],
        downstream: bool,
    ) -> None:
        carried = 0
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    break
                if downstream:
                    limit = self.cut_after
                    if limit is not None and carried + len(data) >= limit:
                        data = data[: max(0, limit - carried)]
                        if data:
                            sink.sendall(data)
                            self._count(len(data), downstream)
                        with self._lock:
                            self.cuts += 1
                        break
                    if self.rate:
                        time.sleep(len(data) / self.rate)
                sink.sendall(data)
                carried += len(data)
                self._count(len(data), downstream)
        except OSError:
            pass
        for sock in pair:
            self._drop(sock)

    def _count(self, size: int, downstream: bool) -> None:
        with self._lock:
            if downstream:
                self.downstream_bytes += size
            else:
                self.upstream_bytes += size

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
