"""A real HTTP server on 127.0.0.1 that serves what the web serves a LAION crawl (tests and benchmarks only).

Paths (``{i}`` picks the image, a procedural scene of seed ``i``):

| path | answer |
| --- | --- |
| ``/img/{i}.jpg`` | 200, a JPEG (640x480 unless ``?w=..&h=..``) |
| ``/slowok/{i}.jpg`` | the JPEG after ``ok_delay_s`` (under the client's timeout) |
| ``/slow/{i}.jpg`` | nothing for ``slow_delay_s`` (over the client's timeout), then the JPEG |
| ``/redirect/{i}.jpg`` | 302 to ``/img/{i}.jpg`` |
| ``/loop/{i}.jpg`` | 302 to itself, forever |
| ``/missing/{i}.jpg`` | 404 |
| ``/error/{i}.jpg`` | 500 |
| ``/html/{i}.jpg`` | 200, an HTML page (a body that is not an image) |
| ``/truncated/{i}.jpg`` | 200, the first 300 bytes of the JPEG, honestly sized: a broken file |
| ``/cut/{i}.jpg`` | 200 announcing the whole JPEG, then the connection closes half way |
| ``/noai/{i}.jpg`` | 200, the JPEG with ``X-Robots-Tag: noai`` |

Every request is counted by path (``server.hits``), so a test can tell what was fetched.
"""
from __future__ import annotations

import collections
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from pipeline.synthetic_images import scene

KINDS = ("img", "slowok", "slow", "redirect", "loop", "missing", "error", "html", "truncated", "cut", "noai")


def jpeg(i: int, w: int = 640, h: int = 480) -> bytes:
    buf = io.BytesIO()
    scene(i, (w, h)).convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


class ImageServer:
    def __init__(self, ok_delay_s: float = 0.3, slow_delay_s: float = 4.0):
        self.ok_delay_s, self.slow_delay_s = ok_delay_s, slow_delay_s
        self.hits: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, int, int], bytes] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                try:
                    server.answer(self)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout): fine
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, kind: str, i: int, **query: int) -> str:
        q = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
        return f"{self.base}/{kind}/{i}.jpg{q}"

    def image(self, i: int, w: int = 640, h: int = 480) -> bytes:
        with self._lock:
            if (i, w, h) not in self._cache:
                self._cache[(i, w, h)] = jpeg(i, w, h)
            return self._cache[(i, w, h)]

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        parsed = urlparse(h.path)
        parts = parsed.path.strip("/").split("/")
        with self._lock:
            self.hits[parsed.path] += 1
        if len(parts) != 2 or parts[0] not in KINDS:
            return self.send(h, 404, b"not here", "text/plain")
        kind, i = parts[0], int(parts[1].split(".")[0])
        q = {k: int(v[0]) for k, v in parse_qs(parsed.query).items()}
        body = self.image(i, q.get("w", 640), q.get("h", 480))
        if kind in ("img", "noai"):
            return self.send(h, 200, body, "image/jpeg", {"X-Robots-Tag": "noai"} if kind == "noai" else None)
        if kind in ("slowok", "slow"):
            time.sleep(self.ok_delay_s if kind == "slowok" else self.slow_delay_s)
            return self.send(h, 200, body, "image/jpeg")
        if kind in ("redirect", "loop"):
            target = f"/img/{i}.jpg" if kind == "redirect" else parsed.path
            return self.send(h, 302, b"", "text/plain", {"Location": self.base + target})
        if kind == "missing":
            return self.send(h, 404, b"<h1>404</h1>", "text/html")
        if kind == "error":
            return self.send(h, 500, b"<h1>500</h1>", "text/html")
        if kind == "html":
            return self.send(h, 200, b"<!doctype html><html><body>an ad, not an image</body></html>", "image/jpeg")
        if kind == "truncated":
            return self.send(h, 200, body[:300], "image/jpeg")
        # "cut": the length of the whole image is announced, half of it is sent, the connection closes
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body[: len(body) // 2])
        h.wfile.flush()
        h.close_connection = True

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
