"""An HTTP proxy of our own between s3fs and the local S3 server: it records every request, and
can answer with faults (5xx, throttling, resets, delays, cut bodies) to test what replica does
with an unreliable object store. 127.0.0.1 only.

    proxy = S3Proxy(upstream="http://127.0.0.1:PORT").start()
    storage = Storage(endpoint_url=proxy.url, region=...)
    proxy.requests            # [(method, path, range header or None), ...]
    proxy.fault = lambda req: Fault(status=503) if ... else None
"""
from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


@dataclass(frozen=True)
class Fault:
    """What to do instead of (or to) the upstream answer."""

    #: answer with this status (and an S3-style XML error body) instead of forwarding
    status: int | None = None
    #: S3 error code in the body (e.g. SlowDown, InternalError, AccessDenied)
    code: str = "InternalError"
    #: wait this long before answering
    delay_s: float = 0.0
    #: forward, but close the connection after this many bytes of the body (a reset mid-body)
    cut_after: int | None = None


class S3Proxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.requests: list[Request] = []
        self.fault: Callable[[Request], Fault | None] | None = None
        self.faults_injected = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "S3Proxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = Request(self.command, self.path, self.headers.get("Range"))
                with proxy._lock:
                    proxy.requests.append(req)
                fault = proxy.fault(req) if proxy.fault else None
                if fault is not None:
                    with proxy._lock:
                        proxy.faults_injected += 1
                    if fault.delay_s:
                        time.sleep(fault.delay_s)
                    if fault.status is not None:
                        xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                               f"<Message>injected by the test proxy</Message></Error>").encode()
                        self.send_response(fault.status)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(xml)))
                        self.end_headers()
                        if self.command != "HEAD":  # a body after a HEAD answer would be read as the next answer
                            self.wfile.write(xml)
                        return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    # a HEAD answer keeps the object's length; other answers carry their body's
                    if k.lower() not in ("transfer-encoding", "connection") and \
                            (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault is not None and fault.cut_after is not None and len(data) > fault.cut_after:
                    self.wfile.write(data[: fault.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults_injected = 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
