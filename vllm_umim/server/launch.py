"""Start ``vllm serve`` as a child process on 127.0.0.1 and wait until it answers ``/health``.

Used by the server tests and the load test; handy by hand too::

    with VllmServer(model, ["--umim-rules", "rules.bin"]) as server:
        requests.post(server.url + "/v1/completions", json={...})
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """``vllm serve MODEL *args`` on a free local port; its log goes to ``self.log_path``."""

    def __init__(self, model: str, args: list[str], env: dict | None = None, start_timeout: float = 600, cwd: str | None = None):
        self.model, self.args, self.start_timeout, self.cwd = model, list(args), start_timeout, cwd
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])

    def command(self) -> list[str]:
        vllm_cli = Path(sys.executable).with_name("vllm")
        return [str(vllm_cli), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def start(self) -> "VllmServer":
        log = self.log_path.open("wb")
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, cwd=self.cwd
        )
        deadline = started + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        self.startup_s = time.monotonic() - started
                        return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve did not answer /health in {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> None:
        """SIGINT (vLLM's clean shutdown) to the server's process group, SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {series (with labels): value}."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                values[series] = float(value)
        return values

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
