"""Headless Chromium driven over the DevTools protocol: load a page, hover every element, and
record every JavaScript dialog (alert, confirm, prompt) the page opens."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Browser:
    def __init__(self):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="replica-chromium-")
        self.proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0
        self.dialogs: list[str] = []
        self.events: list[dict] = []
        self.send("Page.enable")
        self.send("Runtime.enable")

    def _handle(self, message: dict) -> None:
        if message.get("method") == "Page.javascriptDialogOpening":
            self.dialogs.append(message["params"].get("message", ""))
            self._post("Page.handleJavaScriptDialog", {"accept": True})
        elif "method" in message:
            self.events.append(message)

    def _post(self, method: str, params: dict | None = None) -> int:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params or {}}))
        return self.next_id

    def send(self, method: str, params: dict | None = None) -> dict:
        want = self._post(method, params)
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == want:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._handle(message)

    def pump(self, seconds: float) -> None:
        """Handle events (dialogs) for a while."""
        end = time.time() + seconds
        self.ws.settimeout(0.2)
        try:
            while time.time() < end:
                try:
                    self._handle(json.loads(self.ws.recv()))
                except Exception:  # noqa: BLE001 - a receive timeout: nothing arrived
                    pass
        finally:
            self.ws.settimeout(30)

    def open(self, url: str) -> None:
        self.events.clear()
        self.send("Page.navigate", {"url": url})
        deadline = time.time() + 60
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            if time.time() > deadline:
                raise RuntimeError(f"{url} did not load")
            self.pump(0.2)
        self.pump(0.5)

    def hover_everything(self) -> int:
        """Move the mouse over the centre of every element of the page; returns how many."""
        count = self.evaluate("document.querySelectorAll('body *').length")
        for i in range(count):
            x, y = self.evaluate(f"""(() => {{
                const e = document.querySelectorAll('body *')[{i}];
                e.scrollIntoView({{block: 'center', inline: 'center'}});
                const r = e.getBoundingClientRect();
                return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
            self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": max(0, x), "y": max(0, y)})
        self.pump(0.5)
        return count

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
