"""Fixtures for the server tests: the tiny model with random adapters, served for real on 127.0.0.1.

A server runs either in a thread of the test process (uvicorn.Server, fast to start, and
its engine is reachable for checks) or as a ``matlora serve`` subprocess (for signals,
several workers and the command line). Both use one CPU thread: with two threads on
this shared 2-core machine, PyTorch's thread pool spins against other processes and a
step can take 100 times longer.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client import REGISTRY

from matlora import AdapterConfig, inject_adapter, save_adapter
from matlora.base_model import load_base
from matlora.model import iter_adapter_weights

STARTUP_TIMEOUT_S = 120.0
TINY_ADAPTER = "tiny"
TINY_MAX_RANK = 8
OTHER_ADAPTER = "other"
OTHER_MAX_RANK = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_random_adapter(
    base_dir: Path, out_dir: Path, name: str, rank: int, targets: list[str], seed: int, scale: float = 0.3
) -> Path:
    """Save an adapter for ``base_dir`` with random ``lora_B`` (it starts at zero, which would be the base model)."""
    model, _ = load_base(str(base_dir), dtype="float32", device="cpu")
    inject_adapter(model, AdapterConfig(r=rank, target_modules=targets, lora_alpha=float(rank)), name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, weights in iter_adapter_weights(model, name):
            weights.lora_B.copy_(torch.randn(weights.lora_B.shape, generator=generator) * scale)
    return save_adapter(model, out_dir, name)


def matlora_samples() -> dict[tuple, float]:
    """Return every sample of the server's metrics in this process, by name and labels."""
    import server.metrics  # noqa: F401  (registers the metrics, so a first call sees them too)

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name.startswith("matlora_")
    }


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random adapters for the tiny model: ``tiny`` (rank 8, q/v) and ``other`` (rank 4, q and down_proj)."""
    work = tmp_path_factory.mktemp("adapters")
    return {
        TINY_ADAPTER: build_random_adapter(
            tiny_model_dir, work / TINY_ADAPTER, TINY_ADAPTER, TINY_MAX_RANK, ["q_proj", "v_proj"], seed=1
        ),
        OTHER_ADAPTER: build_random_adapter(
            tiny_model_dir, work / OTHER_ADAPTER, OTHER_ADAPTER, OTHER_MAX_RANK, ["q_proj", "down_proj"], seed=2
        ),
    }


class ThreadServer:
    """``create_app(settings)`` under uvicorn in a background thread of the test process."""

    def __init__(self, **settings) -> None:
        import uvicorn

        from server.app import create_app
        from server.settings import Settings

        self.port = free_port()
        self.settings = Settings(host="127.0.0.1", port=self.port, threads=1, **settings)
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def engine(self):
        return self.app.state.engine

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        torch.set_num_threads(self._threads)


class ProcessServer:
    """``matlora serve`` as a subprocess; its output goes to ``log_path``."""

    def __init__(self, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [
            sys.executable, "-m", "matlora", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--threads", "1", *args,
        ]  # fmt: skip
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ProcessServer:
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"matlora serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"matlora serve did not become ready:\n{self.log()}")

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> Iterator[ThreadServer]:
    """A server with the tiny model and both random adapters, max rank policy, small limits."""
    with ThreadServer(
        base=str(tiny_model_dir),
        adapter=[f"{name}={path}" for name, path in tiny_adapters.items()],
        dtype="bfloat16",
        rank_policy="max",
        max_new_tokens_limit=64,
        max_body_bytes=4096,
        max_batch_size=8,
    ) as server:
        yield server


@pytest.fixture
def client(tiny_server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=60.0) as http:
        yield http
