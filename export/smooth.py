"""SmoothQuant-style smoothing: move matrix-product inputs' outlier channels into the weights before int8.

Dynamic int8 quantises an activation with one scale for the whole tensor, so a few input channels
far larger than the rest (Gemma-like models' huge activation channels, a norm's gamma with a few
large entries) leave the typical channel a handful of integer steps, while per-channel weights have
room to spare. For a product X @ W, X @ W = (X / s) @ (diag(s) W) for any positive per-channel s;
with s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (Xiao et al., SmoothQuant, 2022) the channels of
X / s have comparable ranges and W's rows take up the difference.

alpha is chosen per input: each candidate is tried on rows of X sampled from the validation texts,
quantised as ONNX Runtime would, and the one whose product errs least is kept (`choose_alpha`).
X / s costs nothing where whatever makes X scales its channels linearly and only these products
read X (fold.py: a norm's gamma, a gated MLP's up projection, ...): s is folded in there. Elsewhere
a Mul by 1/s is inserted, a pass over X, so only where it cuts the product's error by a quarter.
The smoothed fp32 graph is checked to compute what the original does on one batch.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from mrl.export import fold, sensitivity

log = logging.getLogger(__name__)

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
    dropped: bool = False  # smoothed, but the smoothed fp32 graph computed otherwise, so left unsmoothed

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
    smoothed = copy.deepcopy(model)
    index = fold.GraphIndex(smoothed.graph)
    groups: dict[str, list[int]] = defaultdict(list)  # activation -> indices of the products that read it
    for i, node in enumerate(smoothed.graph.node):
        if node.op_type in op_types and sensitivity.is_candidate(node, index.inits):
            groups[node.input[0]].append(i)
    stats = sensitivity.activation_stats(smoothed, list(groups), feeds, workdir)
    folded, inserts = 0, []
    for x, products in groups.items():
        weights = [smoothed.graph.node[i].input[1] for i in products]
        # A weight read by anything else (tied embeddings) cannot be rescaled for these products alone.
        if any(len(index.users[w]) != 1 for w in weights):
            continue
        arrays = [numpy_helper.to_array(index.inits[w]) for w in weights]
        if any(a.ndim != 2 for a in arrays):  # a batched (rank-3) weight has no single row per input channel
            continue
        w = np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)
        alpha, error, plain = choose_alpha(stats[x], w)
        targets = fold.plan(index, x, products, w.shape[0])
        if alpha is None or (targets is None and error > INSERT_GAIN * plain):
            continue
        s = smoothing_scale(stats[x].channel_max, np.max(np.abs(w), axis=1), alpha)
        for name, array in zip(weights, arrays, strict=True):
            index.inits[name].CopyFrom(numpy_helper.from_array((array * s[:, None]).astype(array.dtype), name))
        if targets is not None:
            fold.apply(index, targets, s)
            folded += 1
        else:
            inserts.append((x, products, s))
    # Last, so that the node indices above stay valid while the graph is read.
    _insert_muls(smoothed.graph, inserts)
    result = Smoothed(model=smoothed, inputs=len(groups), folded=folded, inserted=len(inserts))
    if result.smoothed and not _same_function(model, smoothed, feeds[0], workdir):
        # A fold that was wrong for this graph: better unsmoothed (and said so) than a model that computes otherwise.
        log.warning("smoothing changed what the fp32 graph computes; int8 goes unsmoothed")
        return Smoothed(model=model, inputs=len(groups), folded=0, inserted=0, dropped=True)
    return result


def _same_function(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict[str, np.ndarray], workdir: Path) -> bool:
    """Whether two fp32 graphs give the same outputs for one batch, to float rounding."""
    outputs = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i, model in enumerate((a, b)):
            path = f"{tmp}/{i}.onnx"
            onnx.save_model(copy.deepcopy(model), path, save_as_external_data=True, location=f"{i}.data")
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            outputs.append(session.run(None, {k.name: feed[k.name] for k in session.get_inputs()}))
    for want, got in zip(*outputs, strict=True):
        want, got = np.asarray(want, dtype=np.float64), np.asarray(got, dtype=np.float64)
        if np.abs(got - want).max() > 1e-3 * max(1.0, float(np.abs(want).max())):
            return False
    return True


def _insert_muls(graph: onnx.GraphProto, inserts: Sequence[tuple[str, list[int], np.ndarray]]) -> None:
    """Put X * (1/s) between each `x` and the nodes at its `products`, just before the first of them."""
    before: dict[int, onnx.NodeProto] = {}
    # Every product is rewired by its index first, while the indices still hold: inserting as we went would
    # shift the nodes after each insertion and rewire another group's products (their indices interleave).
    for x, products, s in inserts:
        scaled, inverse = f"{x}_smoothed", f"{x}_smoothing_scale"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
        for i in products:
            graph.node[i].input[0] = scaled
        before[min(products)] = onnx.helper.make_node("Mul", [x, inverse], [scaled], name=f"{x}_smooth")
    nodes = []
    for i, node in enumerate(graph.node):
        nodes += [before[i], node] if i in before else [node]
    rebuilt = [copy.deepcopy(node) for node in nodes]  # copies: the originals go with the field they belong to
    del graph.node[:]
    graph.node.extend(rebuilt)
