"""Real OpenAI-compatible servers on loopback for the HTTP tests: start, wait, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
COMMON_ARGS = ["--max-model-len", "4096", "--enforce-eager", "--gpu-memory-utilization", "0.3",
               "--no-enable-prefix-caching", "--max-logprobs", "5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process; ``start()`` blocks until ``/health`` answers."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.port = free_port()
        self.argv = [*argv, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log
        self.env = {**os.environ, **SERVER_ENV, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> "Server":
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}\n"
                                   + self.log_path.read_text()[-4000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server did not come up in {timeout}s; log: {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()


def vllm_server(model: Path, log: Path) -> Server:
    """Plain vLLM, no connector: the reference."""
    return Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--enable-prompt-tokens-details", *COMMON_ARGS], log)


def kvcdn_server(model: Path, store: Path, key: str, log: Path) -> Server:
    kvcdn = Path(sys.executable).with_name("kvcdn")
    return Server([str(kvcdn), "serve", str(model), "--kvcdn-store", f"file://{store}", *COMMON_ARGS], log,
                  env={"KVCDN_PUBLISHER_KEY": key})
