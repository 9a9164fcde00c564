"""A real `ember serve` process on a free loopback port, over a tiny model."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    model: str
    log: Path

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, tmp: Path, *extra: str) -> Server:
    port = free_port()
    log = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "ember.cli", "serve", str(model), "--port", str(port),
           "--kv-cache-memory", "0.02", "--max-model-len", "512", *extra]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return Server(url, proc, model.name, log)
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not come up:\n{log.read_text()}")


def stop_server(server: Server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    return server.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tiny_llama3, tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)
