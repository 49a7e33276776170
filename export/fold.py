"""Where a per-channel 1/s can go for free: the initializers that scale an activation's channels where it is made.

Smoothing (smooth.py) divides a product's input X by s channel by channel. That costs nothing
where X is made by something linear per channel that only these products read:
- a norm's gamma and beta (LayerNormalization and ONNX Runtime's fused norms),
- the Mul by a norm's weight vector (RMSNorm as exporters write it),
- the projection behind one side of a gated MLP's Mul (X = act(gate) * up: up's weight columns
  and bias),
- the value projection of ONNX Runtime's fused Attention (its output's channels are those of V,
  head by head: the V third of its weight's columns and of its bias).
Anything else (a GELU's output, an input also read by a residual connection) gets a Mul node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

# Ops that read only a tensor's shape, which scaling its values leaves alone.
SHAPE_OPS = ("Shape", "Size")
# Per norm op: the inputs that scale (and shift) its first output per channel.
NORM_SCALES = {
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2,),
}


@dataclass(frozen=True, kw_only=True)
class Target:
    """Channels [start, start + width) of the last axis of initializer `init`, as read by node `node` (an index)."""

    node: int
    init: str
    start: int = 0


class GraphIndex:
    """Who makes and who reads each tensor of a graph, by node index, and its initializers by name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.users: dict[str, list[int]] = {}
        self.producers: dict[str, int] = {}
        for i, node in enumerate(graph.node):
            for name in node.input:
                self.users.setdefault(name, []).append(i)
            self.producers.update(dict.fromkeys(node.output, i))

    def readers(self, tensor: str) -> list[int]:
        """The nodes that read `tensor`'s values (not only its shape), sorted."""
        return sorted(i for i in self.users.get(tensor, []) if self.graph.node[i].op_type not in SHAPE_OPS)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of initializer `name`."""
        return tuple(self.inits[name].dims)


def plan(index: GraphIndex, x: str, products: Sequence[int], width: int) -> list[Target] | None:
    """The initializers to divide by s so that `x` comes out divided by s, or None where there are none."""
    if index.readers(x) != sorted(products) or x not in index.producers or x in index.outputs:
        return None  # something else reads x (a residual connection, the caller), which must keep seeing x itself
    at = index.producers[x]
    node = index.graph.node[at]
    if node.op_type in NORM_SCALES and node.output[0] == x:
        names = [node.input[i] for i in NORM_SCALES[node.op_type] if i < len(node.input) and node.input[i]]
        targets = [Target(node=at, init=name) for name in names]
    elif node.op_type == "Mul" and sum(name in index.inits for name in node.input) == 1:
        targets = [Target(node=at, init=next(name for name in node.input if name in index.inits))]
    elif node.op_type == "Mul":
        targets = next((t for t in (_projection(index, name, at) for name in node.input) if t), [])
    elif node.op_type == "Attention" and node.domain == "com.microsoft" and node.output[0] == x:
        targets = _attention_values(index, at, width)
    else:
        targets = []
    return targets if targets and all(_fits(index, t, width) for t in targets) else None


def _projection(index: GraphIndex, tensor: str, reader: int) -> list[Target]:
    """The weight columns (and bias) of the MatMul (+ Add) that makes `tensor`, read only by node `reader`."""
    if index.readers(tensor) != [reader] or tensor not in index.producers:
        return []
    at = index.producers[tensor]
    node = index.graph.node[at]
    if node.op_type == "MatMul" and node.input[1] in index.inits:
        return [Target(node=at, init=node.input[1])]
    if node.op_type == "Add" and sum(name in index.inits for name in node.input) == 1:
        bias = next(name for name in node.input if name in index.inits)
        other = next(name for name in node.input if name not in index.inits)
        inner = _projection(index, other, at)
        return [*inner, Target(node=at, init=bias)] if inner else []
    return []


def _attention_values(index: GraphIndex, at: int, width: int) -> list[Target]:
    """The V third of a fused Attention's packed weight columns and bias, where Q, K and V are equally wide."""
    node = index.graph.node[at]
    if any(a.name == "qkv_hidden_sizes" for a in node.attribute) or len(node.input) < 3:
        return []
    weight, bias = node.input[1], node.input[2]
    if weight not in index.inits or bias not in index.inits or index.shape(weight)[-1:] != (3 * width,):
        return []
    return [Target(node=at, init=weight, start=2 * width), Target(node=at, init=bias, start=2 * width)]


FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _fits(index: GraphIndex, target: Target, width: int) -> bool:
    """Whether the target is a float initializer whose last axis holds the channels: a vector (one value per
    channel) or, read as a product's weight, a matrix (one column per channel)."""
    if target.init not in index.inits or index.inits[target.init].data_type not in FLOATS:
        return False
    shape = index.shape(target.init)
    node = index.graph.node[target.node]
    matrix = node.op_type in ("MatMul", "Attention") and node.input[1] == target.init
    wide_enough = bool(shape) and (shape[-1] == width or (target.start > 0 and shape[-1] >= target.start + width))
    return wide_enough and (matrix or all(d == 1 for d in shape[:-1]))


def apply(index: GraphIndex, targets: Sequence[Target], s: np.ndarray) -> None:
    """Divide each target's channels by s; an initializer other nodes read too is copied for this node first."""
    width = len(s)
    for target in targets:
        array = numpy_helper.to_array(index.inits[target.init]).copy()
        array[..., target.start : target.start + width] /= s.astype(array.dtype)
        scaled = numpy_helper.from_array(array, target.init)
        if len(index.users[target.init]) == 1:
            index.inits[target.init].CopyFrom(scaled)
            continue
        # Shared (exporters merge equal constants, such as norms' untrained weights): this node gets its own copy.
        scaled.name = f"{target.init}_smoothed_{target.node}"
        index.graph.initializer.append(scaled)
        index.inits[scaled.name] = index.graph.initializer[-1]
        node = index.graph.node[target.node]
        for i, name in enumerate(node.input):
            if name == target.init:
                node.input[i] = scaled.name
                index.users[target.init].remove(target.node)
                index.users.setdefault(scaled.name, []).append(target.node)
