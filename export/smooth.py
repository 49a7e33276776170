"""SmoothQuant-style smoothing: move matrix-product inputs' outlier channels into the weights before int8.

Dynamic int8 quantises an activation with one scale for the whole tensor, so a few input channels
far larger than the rest (Gemma-like models' huge activation channels, a norm's gamma with a few
large entries) leave the typical channel a handful of integer steps, while per-channel weights have
room to spare. For a product X @ W, X @ W = (X / s) @ (diag(s) W) for any positive per-channel s;
with s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (Xiao et al., SmoothQuant, 2022) the channels of
X / s have comparable ranges and W's rows take up the difference.

alpha is chosen per input: each candidate is tried on rows of X sampled from the validation texts,
quantised as ONNX Runtime would, and the one whose product errs least is kept (`choose_alpha`).
X / s costs nothing where X is made by a per-channel scale read by these products only (a
LayerNormalization's gamma and beta, the Mul by an RMSNorm's weight): s is folded into it. Elsewhere
a Mul by 1/s is inserted, a pass over X, so only where it cuts the product's error by a quarter.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from mrl.export import sensitivity

# The migration strengths tried per input; the one whose emulated int8 product errs least is kept.
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# A Mul node costs a pass over the activation: inserted only where smoothing cuts the product's error
# (relative squared error per token, see product_error) to this fraction or less.
INSERT_GAIN = 0.75
# Weights are int8 per output channel in -64..64 (reduce_range, see precision.py).
WEIGHT_QMAX = 64


@dataclass(frozen=True, kw_only=True)
class Smoothed:
    """A smoothed graph and what was done to it."""

    model: onnx.ModelProto
    inputs: int  # activations read by quantisable products
    folded: int  # activations whose 1/s went into the norm or scale that makes them
    inserted: int  # activations given a Mul node by 1/s

    @property
    def smoothed(self) -> int:
        """How many activations (each feeding one or more products) were smoothed."""
        return self.folded + self.inserted


def smoothing_scale(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (1 where a channel is all zero), scaled to a geometric mean of 1."""
    live = (x_max > 0) & (w_max > 0)
    s = np.ones_like(x_max, dtype=np.float64)
    s[live] = np.power(x_max[live], alpha) / np.power(w_max[live], 1.0 - alpha)
    # A common factor changes nothing after quantisation; centring keeps s near 1 for float32.
    return (s / np.exp(np.mean(np.log(s)))).astype(np.float32)


def product_error(stats: sensitivity.ActivationStats, w: np.ndarray, s: np.ndarray, exact: list[np.ndarray]) -> float:
    """Relative squared error per token of int8 (X / s) @ int8 (diag(s) W) against `exact` (X @ W per sample).

    X / s is quantised per tensor and batch as DynamicQuantizeLinear does (each batch's whole range,
    not only the sampled rows'), diag(s) W per output channel, symmetric, in -64..64.
    """
    ws = w * s[:, None]
    step = np.max(np.abs(ws), axis=0) / WEIGHT_QMAX
    step[step == 0] = 1.0
    wq = (np.clip(np.round(ws / step), -WEIGHT_QMAX, WEIGHT_QMAX) * step).astype(np.float32)
    errors = []
    for batch, want in zip(stats.samples, exact, strict=True):
        low, high = float(np.min(batch.low / s)), float(np.max(batch.high / s))
        xq = sensitivity.quantise_dequantise(batch.rows / s, low, high).astype(np.float32)
        # Per token: each token is normalised on its own downstream, so a few huge tokens must not hide the rest.
        errors.append(np.sum((xq @ wq - want) ** 2, axis=1) / np.maximum(np.sum(want**2, axis=1), 1e-30))
    return float(np.mean(np.concatenate(errors)))


def choose_alpha(stats: sensitivity.ActivationStats, w: np.ndarray) -> tuple[float | None, float, float]:
    """(alpha whose smoothed product errs least, or None where none helps; its error; the error unsmoothed)."""
    w = w.astype(np.float32)
    w_max = np.max(np.abs(w), axis=1)
    exact = [batch.rows @ w for batch in stats.samples]
    plain = product_error(stats, w, np.ones(w.shape[0], dtype=np.float32), exact)
    errors = {a: product_error(stats, w, smoothing_scale(stats.channel_max, w_max, a), exact) for a in ALPHAS}
    best = min(errors, key=errors.__getitem__)
    return (best, errors[best], plain) if errors[best] < plain else (None, plain, plain)


def smooth(
    model: onnx.ModelProto,
    feeds: Sequence[dict[str, np.ndarray]],
    workdir: Path,
    *,
    op_types: tuple[str, ...] = sensitivity.QUANTISED_OPS,
) -> Smoothed:
    """A copy of `model` (which holds its weights) in which every `op_types` input that smoothing helps is smoothed."""
    model = copy.deepcopy(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[int]] = defaultdict(list)  # tensor name -> indices of the nodes that read it
    producers: dict[str, int] = {}
    groups: dict[str, list[int]] = defaultdict(list)  # activation -> indices of the products that read it
    for i, node in enumerate(graph.node):
        for name in node.input:
            users[name].append(i)
        producers.update(dict.fromkeys(node.output, i))
        if node.op_type in op_types and sensitivity.is_candidate(node, inits):
            groups[node.input[0]].append(i)
    stats = sensitivity.activation_stats(model, list(groups), feeds, workdir)
    folded, inserts = 0, []
    for x, products in groups.items():
        weights = [graph.node[i].input[1] for i in products]
        # A weight read by anything else (tied embeddings) cannot be rescaled for these products alone.
        if any(len(users[w]) != 1 for w in weights):
            continue
        arrays = [numpy_helper.to_array(inits[w]) for w in weights]
        w = np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)
        alpha, error, plain = choose_alpha(stats[x], w)
        readers = sorted(i for i in users[x] if graph.node[i].op_type not in SHAPE_OPS)
        foldable = readers == sorted(products) and x in producers
        if alpha is None or (not foldable and error > INSERT_GAIN * plain):
            continue
        s = smoothing_scale(stats[x].channel_max, np.max(np.abs(w), axis=1), alpha)
        for name, array in zip(weights, arrays, strict=True):
            inits[name].CopyFrom(numpy_helper.from_array((array * s[:, None]).astype(array.dtype), name))
        if foldable and _fold(graph, producers[x], x, users, s):
            folded += 1
        else:
            inserts.append((x, products, s))
    # Last, so that the node indices above stay valid while the graph is read.
    for x, products, s in sorted(inserts, key=lambda item: min(item[1]), reverse=True):
        _insert_mul(graph, x, products, s)
    return Smoothed(model=model, inputs=len(groups), folded=folded, inserted=len(inserts))


# Ops that read only a tensor's shape, which smoothing leaves alone.
SHAPE_OPS = ("Shape", "Size")
# Per norm op: the inputs that scale (and shift) its first output per channel.
NORM_SCALES = {
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2,),
}


def _fold(graph: onnx.GraphProto, at: int, x: str, users: dict[str, list[int]], s: np.ndarray) -> bool:
    """Divide the per-channel scale (and shift) of node `at`, which makes `x`, by s; False where it has none."""
    producer = graph.node[at]
    inits = {t.name: t for t in graph.initializer}
    if producer.op_type in NORM_SCALES and producer.output[0] == x:
        scales = [producer.input[i] for i in NORM_SCALES[producer.op_type] if i < len(producer.input)]
        scales = [name for name in scales if name]
    elif producer.op_type == "Mul" and len([name for name in producer.input if name in inits]) == 1:
        scales = [name for name in producer.input if name in inits]
    else:
        return False
    if not scales or any(name not in inits for name in scales):
        return False
    arrays = [numpy_helper.to_array(inits[name]) for name in scales]
    if any(a.size != len(s) or a.shape[-1:] != s.shape or a.dtype.kind != "f" for a in arrays):
        return False  # a scalar or a whole tensor, not one value per channel
    for name, array in zip(scales, arrays, strict=True):
        scaled = numpy_helper.from_array((array / s.reshape(array.shape)).astype(array.dtype), name)
        if len(users[name]) == 1:
            inits[name].CopyFrom(scaled)
        else:  # shared with other nodes (exporters merge equal constants): this node gets its own copy
            scaled.name = f"{name}_smoothed_{at}"
            graph.initializer.append(scaled)
            for i, used in enumerate(producer.input):
                if used == name:
                    producer.input[i] = scaled.name
    return True


def _insert_mul(graph: onnx.GraphProto, x: str, products: list[int], s: np.ndarray) -> None:
    """Put X * (1/s) between `x` and the nodes at `products`, just before the first of them."""
    scaled, inverse = f"{x}_smoothed", f"{x}_smoothing_scale"
    graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
    for i in products:
        node = graph.node[i]
        node.input[0] = scaled
    mul = onnx.helper.make_node("Mul", [x, inverse], [scaled], name=f"{x}_smooth")
    graph.node.insert(min(products), mul)
