"""Helpers for the serving tests: a model with a gate, a real server on 127.0.0.1, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from mrl.runtime.manifest import Profile
from mrl.runtime.tokenize import Encoded
from mrl.serving.config import BatcherConfig, ModelSpec, ServerConfig
from mrl.serving.metrics import ServerMetrics
from mrl.serving.model import ServedModel
from mrl.serving.server import EmbedServer

TEXT = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge every boxing match "
    "embedding models map sentences to vectors so that similar meanings land close together in space"
)
WORDS = TEXT.split(" ")
SERVE = [sys.executable, "-m", "mrl.serving.cli"]


def sentences(n: int, seed: int = 0, low: int = 1, high: int = 30) -> list[str]:
    """`n` reproducible texts of `low`..`high` words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


class GatedModel(ServedModel):
    """A ServedModel that records every batch it runs, can hold batches at a gate, and fails on a poison text."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[Encoded]] = []
        self.graphs: list[Profile] = []
        """The graph each of `batches` ran."""
        self.poison: tuple[int, ...] | None = None
        self.warm_gate: asyncio.Event | None = None

    @classmethod
    def open(cls, artifact: Path, config: BatcherConfig | None = None, name: str | None = None) -> GatedModel:
        """Load an artifact under this class; by default one batch runs at a time, so the gate holds them all."""
        spec = ModelSpec(artifact_dir=artifact, name=name, lone_batch_threads=0)  # every batch passes the gate
        return cls.load(spec, config or BatcherConfig(workers=1))

    def ids(self, text: str) -> tuple[int, ...]:
        """The token ids this model gives `text` (no prompt)."""
        return tuple(self.embedder.tokenizer.encode([text])[0].ids)

    def ran(self, text: str) -> bool:
        """Whether any batch held `text`."""
        ids = self.ids(text)
        return any(tuple(e.ids) == ids for batch in self.batches for e in batch)

    def run_batch(self, graph: Profile, encoded: list[Encoded]) -> np.ndarray:
        """Record the batch, wait at the gate, fail if it holds the poison text."""
        self.batches.append(list(encoded))
        self.graphs.append(graph)
        if not self.gate.wait(timeout=120):
            raise RuntimeError("test gate never opened")
        if self.poison is not None and any(tuple(e.ids) == self.poison for e in encoded):
            raise RuntimeError("poisoned batch")
        return super().run_batch(graph, encoded)

    def dims_mixed(self, dims_of: dict[tuple[int, ...], int]) -> list[int]:
        """Indexes of the batches holding texts that their callers wanted at different dims (`dims_of`: by ids)."""
        return [
            i
            for i, batch in enumerate(self.batches)
            if len({dims_of[tuple(e.ids)] for e in batch if tuple(e.ids) in dims_of}) > 1
        ]

    async def warmup(self) -> None:
        """Wait for `warm_gate` (when set) before warming up."""
        if self.warm_gate is not None:
            await self.warm_gate.wait()
        await super().warmup()


async def wait_until(condition: Callable[[], bool], what: str, tries: int = 2000) -> None:
    """Poll `condition` (every 10 ms, at most `tries` times); fail naming `what`."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


@contextlib.asynccontextmanager
async def running(models: Sequence[ServedModel], *, warm: bool = True, **config: object) -> AsyncIterator[EmbedServer]:
    """A real server on 127.0.0.1 (free port) over `models`, stopped on exit."""
    server = EmbedServer(list(models), ServerConfig(host="127.0.0.1", port=0, **config), ServerMetrics())
    await server.start()
    try:
        if warm:
            await server.warmup()
        yield server
    finally:
        for model in models:
            if isinstance(model, GatedModel):
                model.gate.set()
        await server.stop(grace=5)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """mrl-serve exited 2 with one readable line (no traceback) holding every one of `words`."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mrl-serve: error: "), result.stderr
    for word in words:
        assert word in last, last


def sample(server: EmbedServer, name: str, labels: dict[str, str]) -> float:
    """A metric's value (0 when never recorded)."""
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class Served:
    """An `mrl-serve` subprocess; its stderr is collected by a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*SERVE, *args], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.port = self.metrics_port = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                self.port = int(m.group(1))
            if m := re.search(r"metrics on http://127\.0\.0\.1:(\d+)", line):
                self.metrics_port = int(m.group(1))
            if " serving " in line:
                self.ready.set()
        self.ready.set()

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).read().decode()
        for line in text.splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def self_signed(directory: Path) -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM), made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert.read_bytes(), key.read_bytes()
