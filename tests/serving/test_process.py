"""Process and thread settings of a server: memory comes back after huge requests, inference yields the CPU."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from serving_helpers import running

from mrl.serving.client import AsyncEmbedClient
from mrl.serving.config import BatcherConfig, ModelSpec
from mrl.serving.model import ServedModel
from mrl.serving.process import return_freed_memory_to_the_os

SOAK = Path(__file__).parents[2] / "scripts" / "soak_memory.py"


@pytest.mark.skipif(platform.system() != "Linux", reason="reads RSS from /proc")
def test_rss_returns_to_its_steady_level_after_huge_requests(tiny_artifact):
    result = subprocess.run(
        [sys.executable, str(SOAK), str(tiny_artifact), "--rounds", "1", "--slack-mb", "48"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Before texts were cut ahead of tokenising, one 15 MiB text alone kept about 1 GB.
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "PASS" in result.stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_allocations_are_set_to_go_back_to_the_os_on_glibc():
    assert return_freed_memory_to_the_os()


class NiceRecorder(ServedModel):
    """A ServedModel that records the nice value of the thread each batch runs in."""

    def run_batch(self, graph, encoded):
        self.nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return super().run_batch(graph, encoded)


@pytest.mark.skipif(platform.system() != "Linux", reason="per-thread nice values are Linux's")
def test_inference_threads_yield_the_cpu_to_the_event_loop(tiny_artifact):
    spec = ModelSpec(artifact_dir=tiny_artifact, lone_batch_threads=0)
    model = NiceRecorder.load(spec, BatcherConfig(worker_niceness=7))

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            await client.embed(["a text"])

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert model.nice == os.getpriority(os.PRIO_PROCESS, 0) + 7 or model.nice == 19  # nice values stop at 19
