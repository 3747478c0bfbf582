"""Headless Chromium driven over the DevTools protocol (CDP), for the browser tests. No extra packages.

Chromium comes from the system (`apt-get install chromium`; .ci/run installs it). The CDP websocket client is
aiohttp's, which ComfyUI already depends on. Chromium runs in its own process group with a fresh profile
directory and is stopped by its own PID.

    with Browser.launch(tmp_path / "chromium") as page:
        page.navigate(server.url)
        page.wait_for("!!window.app?.graph")
        page.eval("app.graph.nodes.length")
        page.click(".dopsd-btn-stop")          # a real mouse click at the element's centre
        page.screenshot(tmp_path / "shot.png")

Everything is synchronous for pytest: an asyncio loop runs in a helper thread and each call waits for its result.
"""
import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

# Without the background-networking flags Chromium keeps trying to reach Google services and floods the log
# with refused connections on a machine that only reaches package registries.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                  "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


def find_chromium():
    """The Chromium binary: $DOPSD_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("DOPSD_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class JSError(AssertionError):
    """A JavaScript exception raised by Page.eval."""


class Page:
    """One page target. Collects console messages and uncaught exceptions for the test to inspect."""

    def __init__(self, loop, ws):
        self._loop, self._ws = loop, ws
        self._ids = itertools.count(1)
        self._pending = {}
        self._waiters = []  # (method, future)
        self.console = []   # (type, text)
        self.exceptions = []  # text
        self.dialogs = []  # messages of JavaScript dialogs (accepted automatically)
        self._reader = asyncio.run_coroutine_threadsafe(self._read(), loop)

    # -- plumbing ---------------------------------------------------------------------------------
    async def _read(self):
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(CDPError(f"{data['error']}"))
                    else:
                        fut.set_result(data.get("result", {}))
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                self.console.append((params.get("type"), text))
            elif method == "Page.javascriptDialogOpening":
                # e.g. ComfyUI's "leave with unsaved changes?" on reload: accept, as a user clicking through would
                self.dialogs.append(params.get("message", ""))
                asyncio.ensure_future(self._send("Page.handleJavaScriptDialog", {"accept": True}))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                exc = details.get("exception", {})
                self.exceptions.append(exc.get("description") or details.get("text", ""))
            for waiter in list(self._waiters):
                if waiter[0] == method and not waiter[1].done():
                    waiter[1].set_result(params)
                    self._waiters.remove(waiter)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("DevTools connection closed"))

    async def _send(self, method, params):
        msg_id = next(self._ids)
        fut = self._loop.create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        return await fut

    def _run(self, coro, timeout):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def send(self, method, params=None, timeout=60.0):
        """A raw CDP command; returns its result dict."""
        return self._run(asyncio.wait_for(self._send(method, params), timeout), timeout + 5)

    def _expect(self, method):
        """A future for the next `method` event (register before triggering it)."""
        fut = asyncio.run_coroutine_threadsafe(self._make_waiter(method), self._loop).result(5)
        return fut

    async def _make_waiter(self, method):
        fut = self._loop.create_future()
        self._waiters.append((method, fut))
        return fut

    def _wait_future(self, fut, timeout):
        async def waiter():
            return await asyncio.wait_for(fut, timeout)
        return self._run(waiter(), timeout + 5)

    # -- page API ---------------------------------------------------------------------------------
    def enable(self):
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable")

    def set_viewport(self, width, height):
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def navigate(self, url, timeout=60.0):
        loaded = self._expect("Page.loadEventFired")
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {result['errorText']}")
        self._wait_future(loaded, timeout)

    def reload(self, timeout=60.0):
        loaded = self._expect("Page.loadEventFired")
        self.send("Page.reload", {"ignoreCache": True})
        self._wait_future(loaded, timeout)

    def eval(self, expression, timeout=60.0):
        """Evaluates a JS expression (promises are awaited) and returns its JSON value."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise JSError(f"{text}\n  in: {expression[:300]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression, timeout=60.0, interval=0.25, message=""):
        """Polls a JS expression until it is truthy; returns its value. Raises TimeoutError with the last value."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = self.eval(expression)
            except JSError as e:
                last = f"JS error: {e}"
            else:
                if last:
                    return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"{message or 'condition'} not met within {timeout:.0f} s: {expression[:200]}"
                                   f" (last value: {str(last)[:500]})")
            time.sleep(interval)

    def center_of(self, selector):
        rect = self.eval(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            if (!el) return null;
            el.scrollIntoView({{block: "nearest", inline: "nearest"}});
            const r = el.getBoundingClientRect();
            return {{x: r.left + r.width / 2, y: r.top + r.height / 2, w: r.width, h: r.height}};
        }})()""")
        if rect is None:
            raise AssertionError(f"no element matches {selector!r}")
        if rect["w"] <= 0 or rect["h"] <= 0:
            raise AssertionError(f"element {selector!r} is not visible ({rect})")
        return rect["x"], rect["y"]

    def element_at(self, x, y):
        """A short description of the topmost element at a viewport point (to check nothing covers a button)."""
        return self.eval(f"""(() => {{ const el = document.elementFromPoint({x}, {y});
            return el ? el.tagName.toLowerCase() + '.' + [...el.classList].join('.') : null; }})()""")

    def click(self, selector):
        """A real left click (mouse events through the input pipeline) at the centre of the element."""
        x, y = self.center_of(selector)
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})
        return x, y

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def errors(self):
        """Console errors and uncaught exceptions seen so far."""
        return [t for kind, t in self.console if kind == "error"] + list(self.exceptions)


class Browser:
    """A headless Chromium process plus one page target."""

    def __init__(self, profile_dir, width=1400, height=900, binary=None):
        binary = binary or find_chromium()
        if not binary:
            raise FileNotFoundError("no Chromium found: apt-get install chromium, or set DOPSD_CHROMIUM")
        self.profile_dir = Path(profile_dir or tempfile.mkdtemp(prefix="dopsd-chromium-"))
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.profile_dir.parent / (self.profile_dir.name + ".log")
        self._log = open(self.log_path, "wb")
        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile_dir}", f"--window-size={width},{height}",
               "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.width, self.height = width, height
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cdp-loop", daemon=True)
        self._thread.start()
        self._session = None
        self.page = None
        try:
            self.page = self._connect()
        except BaseException:
            self.close()
            raise

    @classmethod
    def launch(cls, profile_dir=None, width=1400, height=900):
        return cls(profile_dir, width, height)

    def __enter__(self):
        return self.page

    def __exit__(self, *exc):
        self.close()

    def _devtools_port(self, timeout=30.0):
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Chromium exited with {self.proc.returncode}: {self.log_tail()}")
            if port_file.is_file():
                lines = port_file.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.1)
        raise TimeoutError(f"Chromium wrote no DevToolsActivePort within {timeout:.0f} s: {self.log_tail()}")

    def _connect(self):
        port = self._devtools_port()

        async def connect():
            self._session = aiohttp.ClientSession()
            targets = []
            for _ in range(100):
                async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:
                    targets = [t for t in await r.json() if t.get("type") == "page"]
                if targets:
                    break
                await asyncio.sleep(0.1)
            if not targets:
                raise RuntimeError("Chromium has no page target")
            return await self._session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0)

        ws = asyncio.run_coroutine_threadsafe(connect(), self._loop).result(60)
        page = Page(self._loop, ws)
        page.enable()
        page.set_viewport(self.width, self.height)
        return page

    def log_tail(self, chars=3000):
        try:
            self._log.flush()
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self):
        async def shutdown():
            if self._session is not None:
                await self._session.close()
        try:
            if self._loop.is_running():
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:  # Chromium's own helper processes (renderer, utility): its process group, which we created
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._log.close()
        shutil.rmtree(self.profile_dir, ignore_errors=True)
