"""Headless Chromium driven over the DevTools protocol: Debian's `chromium` and a websocket, no driver and no
browser download. Waits are on the page's own events (a promise the page resolves), bounded by a deadline."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.request


class Browser:
    """One headless Chromium with one page; `evaluate` runs JavaScript there and returns its (awaited) value."""

    def __init__(self, chromium: str, profile: str, width: int = 1280, height: int = 900):
        from websockets.sync.client import connect

        os.makedirs(profile, exist_ok=True)
        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(profile, "DevToolsActivePort")  # Chromium writes its port here once it listens
        deadline = time.monotonic() + 60
        while not (os.path.exists(port_file) and open(port_file).read().count("\n") >= 1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Chromium did not start (exit {self.process.returncode})")
            time.sleep(0.05)
        port = int(open(port_file).read().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
            pages = [t for t in json.load(response) if t["type"] == "page"]
        self.socket = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.next_id = 0
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method: str, wait: float = 60, **params) -> dict:
        """Send one DevTools command and return its result within `wait` seconds (events in between are passed
        over)."""
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + wait
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str, timeout: float = 60):
        """The value of a JavaScript expression in the page, a promise awaited (up to `timeout` seconds)."""
        result = self.call("Runtime.evaluate", wait=timeout + 5, expression=expression, awaitPromise=True,
                           returnByValue=True, timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, timeout: float = 60) -> None:
        """Navigate and wait for the page's load event."""
        self.call("Page.navigate", url=url)
        self.evaluate("document.readyState === 'complete' || new Promise(r => addEventListener('load', () => r(true)))",
                      timeout)

    def when(self, condition: str, timeout: float = 240):
        """Wait until a JavaScript condition holds: checked on every change of the page's DOM (a MutationObserver),
        not on a clock; returns its value."""
        return self.evaluate(
            "new Promise(resolve => { const check = () => { const v = (" + condition + "); if (v) { observer.disconnect();"
            " resolve(v); } }; const observer = new MutationObserver(check); observer.observe(document.documentElement,"
            " {subtree: true, childList: true, attributes: true, characterData: true}); check(); })", timeout)

    def screenshot(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.kill()
        self.process.wait(30)
