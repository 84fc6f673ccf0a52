"""A small fault-injecting TCP proxy on 127.0.0.1, put in front of SeaweedFS's S3 port.

It forwards bytes both ways, and on command it:
- answers a fraction of new connections with ``503 Service Unavailable`` (an S3 XML error) and closes;
- resets a fraction of connections (RST) in the middle of the traffic;
- takes the endpoint down for N seconds: every connection, new or open, is answered 503 or reset.

Working at the TCP level keeps it independent of how botocore frames a request (keep-alive,
chunked uploads): a fault always reaches the client as a real HTTP error or a real reset.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time

_503 = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nConnection: close\r\n"
        b"Content-Length: 120\r\n\r\n"
        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>ServiceUnavailable</Code>"
        b"<Message>injected</Message></Error>   ")


class FaultProxy:
    def __init__(self, upstream_port: int, seed: int = 0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.rng = random.Random(seed)
        self.fail_fraction = 0.0  # new connections answered 503
        self.reset_fraction = 0.0  # connections reset mid-traffic (decided per forwarded chunk)
        self.down_until = 0.0
        self.injected = {"503": 0, "reset": 0, "connections": 0}
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down_for(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    # -- internals ---------------------------------------------------------------------------------
    def _roll(self, p: float) -> bool:
        with self._lock:
            return p > 0 and self.rng.random() < p

    def _down(self) -> bool:
        return time.monotonic() < self.down_until

    def _count(self, what: str) -> None:
        with self._lock:
            self.injected[what] += 1

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self._count("connections")
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _answer_503(self, client: socket.socket) -> None:
        self._count("503")
        try:
            client.settimeout(2)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
            client.sendall(_503)
        except OSError:
            pass
        finally:
            client.close()

    def _reset(self, *socks: socket.socket) -> None:
        self._count("reset")
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close -> RST
                s.close()
            except OSError:
                pass

    def _serve(self, client: socket.socket) -> None:
        if self._down() or self._roll(self.fail_fraction):
            if self._down() and self._roll(0.5):
                self._reset(client)
            else:
                self._answer_503(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            self._reset(client)
            return
        upstream.settimeout(None)
        client.settimeout(None)
        socks = [client, upstream]
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select(socks, [], [], 0.5)
                if self._down():
                    self._reset(client, upstream)
                    return
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    if self._roll(self.reset_fraction):
                        self._reset(client, upstream)
                        return
                    (upstream if s is client else client).sendall(data)
        except OSError:
            pass
        finally:
            for s in socks:
                try:
                    s.close()
                except OSError:
                    pass
