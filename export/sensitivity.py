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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

# Ops the int8 quantiser rewrites whose input 0 is an activation and input 1 a weight matrix.
QUANTISED_OPS = ("MatMul", "Attention")


@dataclass(frozen=True, kw_only=True)
class NodeError:
    """One quantisable node: its score (median per-channel relative error of its quantised input)."""

    node: str
    op_type: str
    score: float
    input_max: float  # the largest |activation| it saw


def candidates(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes the quantiser would quantise: MatMul / Attention whose weight is an initializer."""
    weights = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in QUANTISED_OPS and len(n.input) > 1 and n.input[1] in weights]


def quantise_dequantise(x: np.ndarray) -> np.ndarray:
    """x through uint8 asymmetric quantisation with one scale for the whole tensor (DynamicQuantizeLinear)."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255.0
    if scale == 0.0:
        return x.copy()
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def node_errors(
    model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], workdir: Path, group: int = 32
) -> list[NodeError]:
    """Every candidate node's score on `feeds` (padded batches), worst first. `model` holds its weights.

    The inputs are exposed `group` at a time, each group in its own run over the feeds, so that a
    large model's activations never all sit in memory at once.
    """
    nodes = candidates(model)
    exposed = list(dict.fromkeys(n.input[0] for n in nodes))
    # The weights are written once; each group's graph is a small file pointing into them.
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        onnx.save_model(copy.deepcopy(model), f"{tmp}/base.onnx", save_as_external_data=True, location="base.data")
        skeleton = onnx.load(f"{tmp}/base.onnx", load_external_data=False)
        stats: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        for start in range(0, len(exposed), group):
            probe = copy.deepcopy(skeleton)
            del probe.graph.output[:]
            for name in exposed[start : start + group]:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            onnx.save_model(probe, f"{tmp}/probe.onnx")
            stats.update(_input_stats(f"{tmp}/probe.onnx", feeds))
    result = []
    for n in nodes:
        lost, energy, peak = stats[n.input[0]]
        score = float(np.median(np.sqrt(lost / np.maximum(energy, 1e-30))))
        result.append(NodeError(node=n.name, op_type=n.op_type, score=score, input_max=peak))
    return sorted(result, key=lambda e: e.score, reverse=True)


def _input_stats(graph: str, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per exposed tensor: squared error lost to quantisation and energy per channel, and its largest |value|."""
    options = ort.SessionOptions()
    # Fusions would hide the exposed tensors or change where they are computed.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    lost: dict[str, Any] = dict.fromkeys(names, 0.0)
    energy: dict[str, Any] = dict.fromkeys(names, 0.0)
    peak = dict.fromkeys(names, 0.0)
    for feed in feeds:
        for name, value in zip(names, session.run(None, {k: feed[k] for k in inputs}), strict=True):
            x = np.asarray(value, dtype=np.float32)
            axes = tuple(range(x.ndim - 1))  # per input channel (the last axis)
            lost[name] = lost[name] + np.sum((quantise_dequantise(x) - x).astype(np.float64) ** 2, axis=axes)
            energy[name] = energy[name] + np.sum(x.astype(np.float64) ** 2, axis=axes)
            peak[name] = max(peak[name], float(np.abs(x).max()))
    return {name: (lost[name], energy[name], peak[name]) for name in names}


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
