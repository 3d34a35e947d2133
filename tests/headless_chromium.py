"""Headless Chromium driven over the DevTools protocol, enough for the UI tests.

Prefect's and MLflow's UIs are single-page apps that render after several API calls, and
some content sits behind a tab, so a one-shot `--dump-dom` is not enough: this opens a
page, waits for text to appear, clicks by visible label and takes screenshots.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from websockets.sync.client import connect

FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-extensions",
    "--no-first-run",
    "--mute-audio",
    "--remote-debugging-port=0",
]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise AssertionError("no Chromium on PATH: `make chromium` installs Debian's chromium package")


class Browser:
    def __init__(self, width: int = 1440, height: int = 900):
        self.profile = Path(tempfile.mkdtemp(prefix="tunefactory-chromium-"))
        self.process = subprocess.Popen(
            [chromium_binary(), *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or self.process.poll() is not None:
                raise AssertionError("Chromium did not start its DevTools endpoint")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        page = httpx.put(f"http://127.0.0.1:{port}/json/new?about:blank", timeout=10).json()
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20)
        self.next_id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        """The page's visible text once it holds every needle."""
        return self.wait_until(lambda text: all(needle in text for needle in needles), f"{needles}", timeout)

    def wait_until(self, ready: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        """The page's visible text once `ready(text)` holds (single-page apps fill in late)."""
        deadline = time.time() + timeout
        while True:
            text = self.text()
            if ready(text):
                return text
            if time.time() > deadline:
                raise AssertionError(f"the page never showed {what}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def wait_for_script(self, expression: str, what: str, timeout: float = 60):
        """The value of a script once it is truthy: for an element the page draws after its text."""
        deadline = time.time() + timeout
        while not (value := self.evaluate(expression)):
            if time.time() > deadline:
                raise AssertionError(f"the page never had {what}; it shows:\n{self.text()[:3000]}")
            time.sleep(0.5)
        return value

    def click(self, label: str) -> None:
        """Click the innermost visible element whose text is exactly `label`."""
        clicked = self.evaluate(
            f"""(() => {{
                const label = {json.dumps(label)};
                const hits = [...document.querySelectorAll('body *')].filter(
                    e => e.offsetParent !== null && e.innerText && e.innerText.trim() === label);
                const innermost = hits.filter(e => !hits.some(o => o !== e && e.contains(o)));
                if (!innermost.length) return false;
                (innermost[0].closest('button,a,[role=tab]') || innermost[0]).click();
                return true;
            }})()"""
        )
        assert clicked, f"nothing labelled {label!r} to click; the page shows:\n{self.text()[:2000]}"

    def screenshot(self, path: Path) -> Path:
        time.sleep(1)  # let the last render and transitions settle
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
