"""A real `mlflow server` on 127.0.0.1 for tests: SQLite backend and local artifacts in a tmp dir.

It can be stopped and started again on the same port and database, to play an outage. Test
modules use the fixtures below (``from mlflow_server import mlflow_server, server``): one server
for the session, since one takes several seconds to start, restarted for a test if an earlier one
stopped it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: Optional[int] = None) -> None:
        self.root, self.port = Path(root), port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> "MlflowServer":
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        # The job runner spawns a pool of worker processes the tracking API does not need.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "server.log", "ab")
        # Own process group, so that stop() ends the server and the uvicorn worker it spawns.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        self._wait_healthy(timeout_s)
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        tail = (self.root / "server.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not become healthy:\n{tail}")

    def stop(self) -> None:
        """End the server as a crash would (SIGKILL to its process group): the harder outage, and
        no wait for uvicorn's graceful shutdown, which waits for idle keep-alive clients."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None


_SHARED: dict[str, MlflowServer] = {}


@pytest.fixture(scope="module")
def mlflow_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MlflowServer:
    """One server for the whole session, shared by every module that imports these fixtures."""
    if "server" not in _SHARED:
        s = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
        request.config.add_cleanup(s.stop)
        _SHARED["server"] = s
    return _SHARED["server"]


@pytest.fixture
def server(mlflow_server: MlflowServer) -> MlflowServer:
    """The module's server, running (a test may stop it to play an outage)."""
    if not mlflow_server.running:
        mlflow_server.start()
    return mlflow_server
