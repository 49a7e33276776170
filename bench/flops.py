"""The ceiling: a model's FLOPs per token from its config, and a GEMM peak measured on this device."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Families whose MLP is gated (gate, up and down projections: three matrices instead of two).
GATED_MLP = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3")


def find_model_config(path: Path | str | None) -> dict[str, Any] | None:
    """The transformers `config.json` of a model directory (or its sentence-transformers module dir)."""
    if not path:
        return None
    root = Path(path)
    candidates = [root / "config.json"]
    modules = root / "modules.json"
    if modules.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            candidates += [root / m.get("path", "") / "config.json" for m in json.loads(modules.read_text())]
    for candidate in candidates:
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "hidden_size" in data:
                return data
    return None


def flops_per_token(config: dict[str, Any], seq_len: float, layers: int | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) per token of one forward pass through the encoder layers.

    Counts the Q, K, V and output projections, the MLP, and attention's QK^T and AV products at
    sequence length `seq_len`; leaves out embeddings, norms, softmax and pooling (a few percent).
    `layers`: a profile that keeps only the first layers (None: all of them).
    """
    cfg = config.get("text_config", config)  # multimodal configs nest the text tower
    h = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"]) if layers is None else layers
    inter = int(cfg.get("intermediate_size") or 4 * h)
    heads = int(cfg.get("num_attention_heads") or 1)
    head_dim = int(cfg.get("head_dim") or h // heads)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    projections = 2 * h * (q_width + 2 * kv_width) + 2 * q_width * h
    mlp_matrices = 3 if cfg.get("model_type") in GATED_MLP else 2
    mlp = 2 * mlp_matrices * h * inter
    attention = 2 * 2 * seq_len * q_width
    return float(layers * (projections + mlp + attention))


@dataclass(frozen=True, kw_only=True)
class Peak:
    """The best GEMM rate one library reached on this device, in FLOP/s (or int ops/s)."""

    dtype: str
    flops_per_s: float
    via: str
    size: int


def _best_rate(run, flops: float, repeats: int, clock=time.perf_counter) -> float:
    run()  # warm-up: first calls pay for allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run()
        best = min(best, clock() - start)
    return flops / best


def numpy_fp32_peak(size: int = 2048, repeats: int = 5) -> Peak:
    """fp32 GEMM rate through numpy's BLAS."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    rate = _best_rate(lambda: a @ b, 2.0 * size**3, repeats)
    return Peak(dtype="fp32", flops_per_s=rate, via="numpy matmul", size=size)


def onnxruntime_peaks(size: int = 2048, repeats: int = 5, threads: int = 0) -> list[Peak]:
    """fp32 MatMul and uint8 x int8 MatMulInteger (the op dynamic int8 graphs use) through onnxruntime."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return []  # needs onnx to build the one-node graphs; the export extra has it
    rng = np.random.default_rng(0)
    cases = [
        ("fp32", "MatMul", TensorProto.FLOAT, TensorProto.FLOAT, rng.standard_normal((size, size), dtype=np.float32)),
        ("int8", "MatMulInteger", TensorProto.UINT8, TensorProto.INT32, rng.integers(0, 255, (size, size), np.uint8)),
    ]
    weights = {
        "fp32": rng.standard_normal((size, size), dtype=np.float32),
        "int8": rng.integers(-127, 127, (size, size), dtype=np.int8),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    peaks = []
    for dtype, op, in_type, out_type, a in cases:
        graph = helper.make_graph(
            [helper.make_node(op, ["A", "B"], ["Y"])],
            "gemm",
            [helper.make_tensor_value_info("A", in_type, [size, size])],
            [helper.make_tensor_value_info("Y", out_type, [size, size])],
            initializer=[numpy_helper.from_array(weights[dtype], "B")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rate = _best_rate(lambda s=session, a=a: s.run(None, {"A": a}), 2.0 * size**3, repeats)
        peaks.append(Peak(dtype=dtype, flops_per_s=rate, via=f"onnxruntime {op} (CPU)", size=size))
    return peaks


def torch_peaks(device: str, repeats: int = 10) -> list[Peak]:
    """fp32 (and on CUDA fp16) GEMM rates through torch.matmul, timed with the device's clock."""
    import torch

    peaks = []
    dtypes = [("fp32", torch.float32)] + ([("fp16", torch.float16)] if device.startswith("cuda") else [])
    size = 8192 if device.startswith("cuda") else 2048
    for name, dtype in dtypes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        if device.startswith("cuda"):
            rate = _cuda_rate(torch, lambda a=a, b=b: torch.matmul(a, b), 2.0 * size**3, repeats)
        else:
            with torch.inference_mode():
                rate = _best_rate(lambda a=a, b=b: torch.matmul(a, b), 2.0 * size**3, repeats)
        peaks.append(Peak(dtype=name, flops_per_s=rate, via=f"torch.matmul on {device}", size=size))
    return peaks


def _cuda_rate(torch, run, flops: float, repeats: int) -> float:
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return flops / best


def best_peaks(peaks: list[Peak]) -> dict[str, Peak]:
    """The highest measured rate per dtype."""
    best: dict[str, Peak] = {}
    for p in peaks:
        if p.dtype not in best or p.flops_per_s > best[p.dtype].flops_per_s:
            best[p.dtype] = p
    return best


def peak_for(precision: str, peaks: dict[str, Peak]) -> Peak | None:
    """The peak a run of `precision` is held against: its own dtype's, else fp32's (the reader sees which)."""
    return peaks.get(precision) or peaks.get("fp32")
