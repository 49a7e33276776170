"""`mrl-serve` runs each artifact's acceptance test before it reports SERVING: refuses a machine that disagrees,
or with --serve-unverified serves it loudly (a WARNING, mrl_model_verified 0)."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import pytest
from acceptance_helpers import copy_artifact, disagree
from serving_helpers import SERVE, Served

from mrl.runtime.machine import this_machine
from mrl.serving.client import AsyncEmbedClient


@pytest.fixture(scope="module")
def disagreeing(tiny_artifact, tmp_path_factory):
    artifact = copy_artifact(tiny_artifact, tmp_path_factory.mktemp("serve-verified") / "tiny")
    disagree(artifact)
    return artifact


def _embed(port: int) -> list:
    async def scenario():
        async with AsyncEmbedClient(f"127.0.0.1:{port}") as client:
            return await client.embed(["served anyway"], dims=8, timeout=30)

    return asyncio.run(scenario())


def _serve(*args: str) -> Served:
    served = Served(*args, "--port", "0", "--metrics-port", "0", "--metrics-host", "127.0.0.1")
    assert served.ready.wait(timeout=120) and served.proc.poll() is None, "".join(served.lines)
    return served


def test_a_machine_that_disagrees_is_refused_before_serving(disagreeing):
    done = subprocess.run([*SERVE, f"tiny={disagreeing}", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert " serving tiny" not in done.stderr  # never reported SERVING
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mrl-serve: error: model 'tiny': refusing "), last
    machine = this_machine()
    for words in ("d32-fp32: mean cosine 0.9", "min 0.9", "(needs min_cosine >= 0.9999); on ", "d8-fp32"):
        assert words in last, last
    for words in ("onnxruntime-cpu [CPUExecutionProvider]", f"CPU {machine.cpu} (", "--serve-unverified"):
        assert words in last, last


def test_serve_unverified_serves_it_with_a_warning_and_the_gauge_at_0(disagreeing):
    served = _serve(f"tiny={disagreeing}", "--serve-unverified")
    try:
        warnings = [line for line in served.lines if " WARNING " in line and "UNVERIFIED" in line]
        assert len(warnings) == 1, "".join(served.lines)
        assert "model tiny is served UNVERIFIED (--serve-unverified)" in warnings[0]
        assert "d32-fp32: mean cosine 0.9" in warnings[0] and "CPUExecutionProvider" in warnings[0]
        assert served.metric('mrl_model_verified{model="tiny"}') == 0.0
        assert served.metric('mrl_model_ready{model="tiny"}') == 1.0
        (vector,) = _embed(served.port)
        assert len(vector) == 8
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(timeout=60) == 0
    finally:
        served.stop()


def test_an_artifact_that_passes_reads_verified_1(tiny_artifact):
    served = _serve(f"tiny={tiny_artifact}")
    try:
        assert served.metric('mrl_model_verified{model="tiny"}') == 1.0
        assert not [line for line in served.lines if "UNVERIFIED" in line]
    finally:
        served.stop()
