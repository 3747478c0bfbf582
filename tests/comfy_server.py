"""Start and drive a real ComfyUI server (`main.py --cpu`) with the pack installed, for tests and scripts.

The server runs from the ComfyUI tree under test (comfy_env.comfy_root()) with its own base directory, so
models, custom_nodes, user settings and outputs are all in a temp dir and nothing in the tree is touched.
The pack is installed the way a user's git clone is: a directory in <base>/custom_nodes (here a symlink to
the repo). The server gets its own process group and is stopped by its own PID.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import comfy_env

PACK_DIR_NAME = "comfyui-dopsd"
TEST_SUPPORT = comfy_env.REPO / "tests" / "comfy_test_support"


def wait_for(pred, timeout=90.0, what=""):
    """Poll `pred` (e.g. a GET on the server) every 50 ms until it returns something truthy, and return that."""
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base, test_support: bool = True) -> Path:
    """<base>/custom_nodes with the pack (and the test-only loader patch), plus empty models/ and user/."""
    base = Path(base)
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir(parents=True, exist_ok=True)
    for name, target in [(PACK_DIR_NAME, comfy_env.REPO)] + ([("comfy_test_support", TEST_SUPPORT)] if test_support else []):
        link = nodes_dir / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    for sub in ("models/diffusion_models", "models/text_encoders", "models/vae", "models/loras", "input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


def comfy_command(base, *extra) -> list:
    return [sys.executable, "main.py", "--cpu", "--base-directory", str(base),
            "--database-url", "sqlite:///:memory:", *extra]


def server_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


class ComfyServer:
    def __init__(self, base_dir, port=None, extra_args=(), startup_timeout: float = 60.0):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        self.client_id = uuid.uuid4().hex
        cmd = comfy_command(self.base_dir, "--listen", "127.0.0.1", "--port", str(self.port), *extra_args)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=comfy_env.comfy_root(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=server_env(), start_new_session=True)
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    # -- lifecycle -------------------------------------------------------------------------------------
    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during startup\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"ComfyUI did not answer /object_info within {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, grace: float = 10.0):
        """SIGTERM to the server's PID, SIGKILL to its process group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(grace)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        return "---- server log (tail) ----\n" + self.log()[-chars:]

    # -- HTTP ------------------------------------------------------------------------------------------
    def request(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw

    def get_json(self, path):
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path} -> {status}: {body!r}\n{self.log_tail()}"
        return body

    def post_prompt(self, prompt: dict) -> str:
        """Queue an API-format prompt; returns its prompt_id (fails with ComfyUI's validation errors)."""
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise AssertionError(f"POST /prompt -> {status}: {json.dumps(body, indent=1)[:4000]}")
        return body["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 60.0, on_poll=None) -> dict:
        """The prompt's /history entry once it has finished; raises with the messages if it failed.
        `on_poll()`, when given, is called at every poll (e.g. to report a training job's progress)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if on_poll is not None:
                on_poll()
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") != "success":
                    raise AssertionError(f"prompt {prompt_id} failed: {json.dumps(entry['status'], indent=1)[:4000]}"
                                         f"\n{self.log_tail()}")
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not finished within {timeout:.0f} s\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 60.0) -> dict:
        return self.wait_history(self.post_prompt(prompt), timeout)

    def set_setting(self, key: str, value):
        """POST /settings/<key> (e.g. Comfy.TutorialCompleted=True so the browser opens on the graph)."""
        status, body = self.request("POST", f"/settings/{key}", value)
        assert status == 200, f"POST /settings/{key} -> {status}: {body!r}"


def quick_test_for_ci(base_dir, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """`main.py --quick-test-for-ci`: full startup with custom nodes, then exit. Output is in .stdout."""
    return subprocess.run(comfy_command(base_dir, "--quick-test-for-ci"), cwd=comfy_env.comfy_root(),
                          env=server_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def pack_import_problems(log: str, pack_dir_name: str = PACK_DIR_NAME) -> list:
    """Lines in a ComfyUI log saying the pack failed to import (other packs' failures are not ours)."""
    bad = []
    for line in log.splitlines():
        failed = "IMPORT FAILED" in line or "Cannot import" in line or "PRESTARTUP FAILED" in line
        if failed and pack_dir_name in line:
            bad.append(line)
    return bad
