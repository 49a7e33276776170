"""Which matrix products lose the most to int8: per-node error against fp32 on the validation texts.

Dynamic int8 quantises each activation tensor with one scale (its min..max over the whole batch).
A product whose input has a few channels hundreds of times larger than the rest (the "massive
activations" of Gemma-like models, typically the MLP's down projection) gets a step so coarse
that every other channel rounds to zero. So a node's error is measured where it arises: the fp32
graph runs the validation texts with every candidate's input exposed, each input is quantised as
DynamicQuantizeLinear would, and the node's score is the median over input channels of the
relative error in that channel (1.0: the typical channel is wiped out; all-MiniLM-L6-v2's worst
product scores 0.17). Weights are quantised per output channel and rarely matter; they are not scored.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

# Ops the int8 quantiser rewrites whose input 0 is an activation and input 1 a weight matrix.
QUANTISED_OPS = ("MatMul", "Attention")
# Rows (tokens) kept per batch and activation, to try quantisation choices on (smooth.py).
SAMPLE_ROWS = 64


@dataclass(frozen=True, kw_only=True)
class NodeError:
    """One quantisable node: its score (median per-channel relative error of its quantised input)."""

    node: str
    op_type: str
    score: float
    input_max: float  # the largest |activation| it saw


def is_candidate(node: onnx.NodeProto, weights: Container[str]) -> bool:
    """Whether the quantiser would quantise `node`: a MatMul / Attention whose weight is in `weights`."""
    return node.op_type in QUANTISED_OPS and len(node.input) > 1 and node.input[1] in weights


def candidates(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes the quantiser would quantise: MatMul / Attention whose weight is an initializer."""
    weights = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if is_candidate(n, weights)]


def quantise_dequantise(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """x through uint8 asymmetric quantisation with one scale for the whole tensor (DynamicQuantizeLinear).

    `lo` and `hi`: the tensor's range where `x` is only a sample of its rows (default: x's own).
    """
    lo = min(0.0, float(x.min()) if lo is None else lo)
    hi = max(0.0, float(x.max()) if hi is None else hi)
    scale = (hi - lo) / 255.0
    if scale == 0.0:
        return x.copy()
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


@dataclass(frozen=True, kw_only=True)
class BatchSample:
    """Some rows (tokens) of one activation tensor in one batch, and each channel's range over the whole batch."""

    rows: np.ndarray  # [rows, channels]
    low: np.ndarray  # per channel
    high: np.ndarray


@dataclass(frozen=True, kw_only=True)
class ActivationStats:
    """One activation tensor over the feeds, per input channel (its last axis), and a sample of it per batch."""

    lost: np.ndarray  # squared error that per-tensor uint8 quantisation adds
    energy: np.ndarray  # sum of squares
    channel_max: np.ndarray  # largest |value|
    peak: float  # largest |value| over all channels
    samples: tuple[BatchSample, ...]


def activation_stats(
    model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]], workdir: Path, group: int = 32
) -> dict[str, ActivationStats]:
    """Per-channel statistics of the float tensors `names` of `model` (which holds its weights) over `feeds`.

    The tensors are exposed `group` at a time, each group in its own run over the feeds, so that a
    large model's activations never all sit in memory at once.
    """
    exposed = list(dict.fromkeys(names))
    # The weights are written once; each group's graph is a small file pointing into them.
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        onnx.save_model(copy.deepcopy(model), f"{tmp}/base.onnx", save_as_external_data=True, location="base.data")
        skeleton = onnx.load(f"{tmp}/base.onnx", load_external_data=False)
        stats: dict[str, ActivationStats] = {}
        for start in range(0, len(exposed), group):
            probe = copy.deepcopy(skeleton)
            del probe.graph.output[:]
            for name in exposed[start : start + group]:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            onnx.save_model(probe, f"{tmp}/probe.onnx")
            stats.update(_input_stats(f"{tmp}/probe.onnx", feeds))
    return stats


def node_errors(
    model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], workdir: Path, group: int = 32
) -> list[NodeError]:
    """Every candidate node's score on `feeds` (padded batches), worst first. `model` holds its weights."""
    nodes = candidates(model)
    stats = activation_stats(model, [n.input[0] for n in nodes], feeds, workdir, group)
    result = []
    for n in nodes:
        s = stats[n.input[0]]
        score = float(np.median(np.sqrt(s.lost / np.maximum(s.energy, 1e-30))))
        result.append(NodeError(node=n.name, op_type=n.op_type, score=score, input_max=s.peak))
    return sorted(result, key=lambda e: e.score, reverse=True)


def _input_stats(graph: str, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, ActivationStats]:
    """Per exposed tensor: squared error lost to quantisation, energy and largest |value| per channel."""
    options = ort.SessionOptions()
    # Fusions would hide the exposed tensors or change where they are computed.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    lost: dict[str, Any] = dict.fromkeys(names, 0.0)
    energy: dict[str, Any] = dict.fromkeys(names, 0.0)
    top: dict[str, Any] = dict.fromkeys(names, 0.0)
    samples: dict[str, list[BatchSample]] = {name: [] for name in names}
    rng = np.random.default_rng(0)
    for feed in feeds:
        for name, value in zip(names, session.run(None, {k: feed[k] for k in inputs}), strict=True):
            x = np.asarray(value, dtype=np.float32)
            axes = tuple(range(x.ndim - 1))  # per input channel (the last axis)
            lost[name] = lost[name] + np.sum((quantise_dequantise(x) - x).astype(np.float64) ** 2, axis=axes)
            energy[name] = energy[name] + np.sum(x.astype(np.float64) ** 2, axis=axes)
            top[name] = np.maximum(top[name], np.max(np.abs(x), axis=axes))
            rows = x.reshape(-1, x.shape[-1])
            if len(rows) > SAMPLE_ROWS:
                rows = rows[np.sort(rng.choice(len(rows), SAMPLE_ROWS, replace=False))]
            samples[name].append(BatchSample(rows=rows.copy(), low=np.min(x, axis=axes), high=np.max(x, axis=axes)))
    return {
        name: ActivationStats(
            lost=lost[name],
            energy=energy[name],
            channel_max=np.asarray(top[name]),
            peak=float(np.max(top[name])),
            samples=tuple(samples[name]),
        )
        for name in names
    }


def exclusion_steps(ranked: list[NodeError], limit: float = 0.5) -> list[list[str]]:
    """The node sets to try keeping in fp32, worst first: 1, 2, 4, ... nodes, up to `limit` of all."""
    most = max(1, int(len(ranked) * limit))
    steps, k = [], 1
    while k <= most:
        steps.append([e.node for e in ranked[:k]])
        k *= 2
    if steps and len(steps[-1]) < most:
        steps.append([e.node for e in ranked[:most]])
    return steps
