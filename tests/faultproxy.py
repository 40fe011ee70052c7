"""A fault-injecting HTTP proxy for an S3 server: it forwards each request to the server and,
for a share of them, answers 500 or 503 (S3's InternalError and SlowDown bodies) or resets
the connection, before the request reaches the server or after (the server applied it, the
client never hears). Tests and benchmarks start it on 127.0.0.1 and point
``AWS_ENDPOINT_URL`` at it.

    python tests/faultproxy.py --upstream http://127.0.0.1:9000 --error-rate 0.1

``error_rate`` is the share of requests that fail, in one of those three ways; 1.0 is a
storage that stays down. It can be changed while the proxy runs (:meth:`FaultProxy.set`).
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import random
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
ERROR_BODIES = {
    500: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
         b"<Message>injected by faultproxy</Message></Error>",
    503: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
         b"<Message>injected by faultproxy</Message></Error>",
}
FAULTS = ("500", "503", "reset before", "reset after")


class FaultProxy:
    """Forward HTTP to ``upstream``; fail ``error_rate`` of the requests, a quarter each as a
    500, a 503, a reset before forwarding and a reset after. Seeded, so a run's share of
    faults is what was asked (their order across threads is not fixed)."""

    def __init__(self, upstream: str, error_rate: float = 0.1, seed: int = 0, port: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.error_rate = error_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(("requests", *FAULTS), 0)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def set(self, error_rate: float) -> None:
        with self._lock:
            self.error_rate = error_rate

    def stats(self) -> dict:
        """Requests seen and faults injected, by kind; ``injected`` is their sum."""
        with self._lock:
            out = dict(self.counts)
        out["injected"] = sum(out[f] for f in FAULTS)
        return out

    def _draw(self) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self._rng.random() >= self.error_rate:
                return None
            fault = self._rng.choice(FAULTS)
            self.counts[fault] += 1
            return fault

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler(proxy: FaultProxy):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args):  # one line per request would drown a test's output
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            # SO_LINGER with a zero timeout: close() sends a TCP RST, as a dropped connection.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                return response.status, response.getheaders(), data
            finally:
                conn.close()

        def _handle(self) -> None:
            body = self._body()
            fault = proxy._draw()
            if fault == "reset before":
                return self._reset()
            if fault in ("500", "503"):
                data = ERROR_BODIES[int(fault)]
                self.send_response(int(fault))
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return None
            try:
                status, headers, data = self._forward(body)
            except OSError:
                return self._reset()  # the server itself is gone: the client sees a dropped connection
            if fault == "reset after":
                return self._reset()
            self.send_response(status)
            for key, value in headers:
                if key.lower() in HOP_BY_HOP or (key.lower() == "content-length" and self.command != "HEAD"):
                    continue
                self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return None

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the S3 server, e.g. http://127.0.0.1:9000")
    parser.add_argument("--error-rate", type=float, default=0.1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with FaultProxy(args.upstream, args.error_rate, args.seed, args.port) as proxy:
        print(f"proxy: {proxy.url} -> {args.upstream}, error rate {args.error_rate}", flush=True)
        try:
            while True:
                time.sleep(60)
                print(proxy.stats(), flush=True)
        except KeyboardInterrupt:
            print(proxy.stats(), flush=True)


if __name__ == "__main__":
    main()
