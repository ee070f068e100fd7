"""A small Chrome DevTools Protocol client: open a local HTML file in headless Chromium and record
what happened (console errors, exceptions, dialogs, every request, load time, a screenshot).

Used by tests/test_report.py. Run as a script to save a screenshot of a report::

    .venv/bin/python tests/browser.py REPORT.html OUT.png [WIDTH HEIGHT]
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--remote-debugging-port=0",
)


def chromium_path() -> str | None:
    """Debian's chromium (or $RAYLEAD_CHROMIUM); None when absent."""
    path = os.environ.get("RAYLEAD_CHROMIUM") or CHROMIUM
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


@dataclass
class PageRecord:
    url: str
    load_seconds: float  # navigation start → load event (Performance timing of the page)
    wall_seconds: float  # Page.navigate sent → Page.loadEventFired received
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return self.console_errors + self.exceptions + self.log_errors + self.dialogs

    def foreign_requests(self) -> list[str]:
        """Requests that leave the file: anything but the page itself and data: URIs."""
        return [u for u in self.requests if u != self.url and not u.startswith("data:")]


class Browser:
    """One headless Chromium with one page, driven over CDP (websocket-client)."""

    def __init__(self, width: int = 1280, height: int = 1000, timeout: float = 60.0) -> None:
        path = chromium_path()
        if path is None:
            raise FileNotFoundError(f"chromium not found at {CHROMIUM}")
        self.timeout = timeout
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="raylead-chromium-")
        self.proc = subprocess.Popen(
            [path, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port = self._port()
            self.ws = self._connect(port)
        except BaseException:
            self.close()
            raise
        self._id = 0
        self._events: list[dict[str, Any]] = []

    def _port(self) -> int:
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.proc.returncode} before it listened")
            if marker.exists():
                text = marker.read_text().split()
                if text:
                    return int(text[0])
            time.sleep(0.05)
        raise TimeoutError("chromium did not write DevToolsActivePort")

    def _connect(self, port: int) -> Any:
        import websocket

        deadline = time.monotonic() + self.timeout
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
                targets = json.load(resp)
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("chromium has no page target")
            time.sleep(0.05)
        return websocket.create_connection(
            pages[0]["webSocketDebuggerUrl"], timeout=self.timeout, suppress_origin=True, enable_multithread=False
        )

    # -- protocol -----------------------------------------------------------------------------
    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        mid = self._id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))
            if "method" in msg:
                self._on_event(msg)
        raise TimeoutError(f"no answer to {method}")

    def _on_event(self, msg: dict[str, Any]) -> None:
        self._events.append(msg)
        if msg["method"] == "Page.javascriptDialogOpening":  # never leave a dialog blocking the page
            self._id += 1
            self.ws.send(
                json.dumps({"id": self._id, "method": "Page.handleJavaScriptDialog", "params": {"accept": True}})
            )

    def wait_event(self, method: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        for ev in self._events:
            if ev["method"] == method:
                return ev
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self._on_event(msg)
                if msg["method"] == method:
                    return msg
        raise TimeoutError(f"no {method} event")

    def evaluate(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"evaluation failed: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def settle(self, seconds: float = 0.3) -> None:
        """Collect the events that arrive within ``seconds``."""
        end = time.monotonic() + seconds
        self.ws.settimeout(0.05)
        try:
            while time.monotonic() < end:
                try:
                    msg = json.loads(self.ws.recv())
                except Exception:  # websocket timeout
                    continue
                if "method" in msg:
                    self._on_event(msg)
        finally:
            self.ws.settimeout(self.timeout)

    # -- high level ---------------------------------------------------------------------------
    def open(self, html_file: str | Path) -> PageRecord:
        """Navigate to a local file and wait for its load event; returns what happened so far."""
        url = Path(html_file).resolve().as_uri()
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self._events = []
        t0 = time.monotonic()
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")
        wall = time.monotonic() - t0
        timing = self.evaluate(
            "(function(){var n=performance.getEntriesByType('navigation')[0];"
            "return n ? n.loadEventStart : (performance.timing.loadEventStart-performance.timing.navigationStart);})()"
        )
        self.settle()
        rec = PageRecord(url=url, load_seconds=float(timing) / 1000.0, wall_seconds=wall)
        self.collect(rec)
        return rec

    def collect(self, rec: PageRecord) -> PageRecord:
        """Fold the events received so far into ``rec`` (call again after interacting)."""
        self.settle(0.2)
        rec.console_errors, rec.exceptions, rec.log_errors, rec.dialogs, rec.requests = [], [], [], [], []
        for ev in self._events:
            method, params = ev["method"], ev.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                rec.console_errors.append(json.dumps(params.get("args", []))[:500])
            elif method == "Runtime.exceptionThrown":
                rec.exceptions.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                rec.log_errors.append(str(params["entry"].get("text", ""))[:500])
            elif method == "Page.javascriptDialogOpening":
                rec.dialogs.append(f"{params.get('type')}: {params.get('message')}")
            elif method == "Network.requestWillBeSent":
                rec.requests.append(str(params.get("request", {}).get("url", "")))
        return rec

    def screenshot(self, full_page: bool = False) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            params["captureBeyondViewport"] = True
        return base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def png_stats(png: bytes) -> tuple[int, float]:
    """(distinct colours, fraction of pixels that are not near-white) of a PNG."""
    import io

    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    flat = arr.reshape(-1, 3)
    colours = len(np.unique(flat[:: max(1, flat.shape[0] // 200_000)], axis=0))
    non_white = float((flat.min(axis=1) < 235).mean())
    return colours, non_white


if __name__ == "__main__":  # save a screenshot of a report: browser.py REPORT.html OUT.png [W H]
    report, target = sys.argv[1], sys.argv[2]
    w, h = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (1280, 1400)
    with Browser(w, h) as b:
        record = b.open(report)
        Path(target).write_bytes(b.screenshot())
    print(f"{target}: load {record.load_seconds:.2f}s, errors {record.errors}, foreign {record.foreign_requests()}")
