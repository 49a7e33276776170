"""int8 computes the same on every x86 kernel path: weights in -64..64 cannot saturate ONNX Runtime's u8 x s8 GEMM.

ONNX Runtime (MLAS, core/mlas/lib/platform.cpp) picks its u8 x s8 kernel by CPU flag: AVX2 and
AVX-512 without VNNI multiply with vpmaddubsw, which adds each pair of u8 * s8 products in int16
with saturation; AVX-VNNI, AVX-512 VNNI and AMX accumulate in int32. Which kernel a machine runs is
read from its flags, and the AVX2 path is checked under QEMU (which emulates AVX2 but not AVX-512 or
VNNI) where qemu-x86_64 is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from tinymodels import export, save_sentence_transformer

from mrl.runtime import Embedder, load_manifest

PROBE = """
import sys
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
for weight in sys.argv[1:]:
    b = numpy_helper.from_array(np.full((64, 16), int(weight), np.int8), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 16])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    print(int(session.run(None, {"a": np.full((8, 64), 255, np.uint8)})[0].min()))
"""
QEMU = shutil.which("qemu-x86_64")
NO_QEMU = "qemu-x86_64 not installed (apt-get install qemu-user): the AVX2 kernel path is not checked here"


def cpu_flags() -> set[str]:
    """This machine's CPU flags as Linux reports them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def u8s8_kernel(flags: set[str]) -> str:
    """The u8 x s8 GEMM kernel ONNX Runtime picks for these CPU flags (MLAS platform.cpp, in its order)."""
    if {"amx_tile", "amx_int8"} <= flags:
        return "amx"
    if "avx2" not in flags:
        return "sse"  # widens to int16 and multiplies with pmaddwd: exact
    kernel = "avx-vnni" if "avx_vnni" in flags else "avx2"
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        kernel = "avx512-vnni" if "avx512_vnni" in flags else "avx512-core"
    return kernel


SATURATING = {"avx2", "avx512-core"}  # vpmaddubsw
KERNEL = u8s8_kernel(cpu_flags())


def probe(*weights: int, qemu_cpu: str | None = None) -> list[int]:
    """MatMulInteger of 64 u8 255s with 64 s8 weights of each value, on this CPU or under QEMU emulating `qemu_cpu`."""
    cmd = [sys.executable, "-c", PROBE, *map(str, weights)]
    if qemu_cpu:
        cmd = [QEMU, "-cpu", qemu_cpu, *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [int(v) for v in done.stdout.split()[-len(weights) :]]


def test_the_kernel_is_known():
    assert KERNEL in {"amx", "sse", "avx2", "avx-vnni", "avx512-core", "avx512-vnni"}
    assert u8s8_kernel({"avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl"}) == "avx512-core"
    assert u8s8_kernel({"avx2", "avx_vnni"}) == "avx-vnni"


def test_seven_bit_weights_sum_exactly_on_this_cpu():
    """255 * 64 * 2 = 32640 fits int16, so even a saturating kernel sums exactly."""
    assert probe(64, -64) == [255 * 64 * 64, -255 * 64 * 64]


@pytest.mark.skipif(KERNEL in SATURATING, reason=f"this CPU's u8 x s8 kernel is {KERNEL} (vpmaddubsw): it saturates")
def test_full_range_weights_sum_exactly_where_the_kernel_accumulates_in_int32():
    assert probe(127) == [255 * 127 * 64]


@pytest.mark.skipif(
    KERNEL not in SATURATING, reason=f"this CPU's u8 x s8 kernel is {KERNEL} (VNNI, AMX or SSE): it does not saturate"
)
def test_full_range_weights_saturate_on_avx2_and_avx512_without_vnni():
    assert probe(127) == [32767 * 32]  # every pair clipped to int16


@pytest.mark.skipif(QEMU is None, reason=NO_QEMU)
def test_under_qemu_haswell_full_range_saturates_and_seven_bits_do_not():
    """Proof that the emulation takes the AVX2 path, and that our weight range is safe on it."""
    assert probe(127, 64, qemu_cpu="Haswell") == [32767 * 32, 255 * 64 * 64]


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    """A 3-layer tiny BERT whose full-range int8 saturated on the AVX2 path (mean cosine 0.956 there)."""
    root = tmp_path_factory.mktemp("int8-kernels")
    model = save_sentence_transformer(root / "model", layers=3, init_std=0.2, dense=24)
    return export(model, root / "artifact", (24,), ("fp32", "int8"), ort_cpu="optimized")


def test_exported_int8_weights_stay_within_seven_bits(int8_artifact):
    for name in ("d24-int8.onnx", "d24-int8.ort-cpu.onnx"):
        graph = onnx.load(str(int8_artifact / name))
        weights = [numpy_helper.to_array(t) for t in graph.graph.initializer if t.data_type == TensorProto.INT8]
        assert weights and all(int(np.abs(w.astype(np.int32)).max()) <= 64 for w in weights), name
    assert load_manifest(int8_artifact).quantization.reduce_range


EMBED = """
import sys, numpy as np
from mrl.runtime import Embedder
for graph in ("portable", "optimized"):
    vectors = Embedder.load(sys.argv[1], "onnxruntime-cpu", precision="int8", graph=graph).embed(sys.argv[2:])
    np.save(f"{sys.argv[1]}-{graph}.npy", vectors)
"""


@pytest.mark.skipif(QEMU is None, reason=NO_QEMU)
def test_an_int8_artifact_gives_the_same_vectors_on_the_avx2_path(int8_artifact, tmp_path):
    """Both int8 graphs (portable, and the fused one with QAttention) under QEMU's AVX2 against this CPU."""
    texts = ["a first text", "a second, longer text about something else entirely", "short"]
    copy = tmp_path / "artifact"
    shutil.copytree(int8_artifact, copy)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [QEMU, "-cpu", "Haswell", sys.executable, "-c", EMBED, str(copy), *texts],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    for graph in ("portable", "optimized"):
        native = Embedder.load(copy, "onnxruntime-cpu", precision="int8", graph=graph).embed(texts)
        emulated = np.load(f"{copy}-{graph}.npy")
        assert np.abs(native - emulated).max() < 1e-5, graph
