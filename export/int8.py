"""int8 graphs that hold parity: smooth, quantise, check, and as a last resort keep the worst products in fp32."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from mrl.export import precision, sensitivity, smooth
from mrl.export.errors import ParityError
from mrl.runtime.manifest import Parity

Check = Callable[[onnx.ModelProto], Parity]


@dataclass(frozen=True, kw_only=True)
class Int8Graph:
    """A quantised graph, its parity at full width (None when not validated), how it was smoothed, the nodes kept
    in fp32."""

    model: onnx.ModelProto
    parity: Parity | None
    smoothing: smooth.Smoothed
    kept_fp32: tuple[str, ...] = ()
    reason: str = ""

    @property
    def method(self) -> str:
        """What was done, in words, for the manifest."""
        s = self.smoothing
        if s.dropped:
            return f"{precision.INT8_METHOD}; unsmoothed (smoothing changed what the fp32 graph computes)"
        if not s.smoothed:
            return f"{precision.INT8_METHOD}; no product input needed smoothing"
        return (
            f"{precision.INT8_METHOD}; smoothed (SmoothQuant, alpha chosen per input): {s.smoothed} of {s.inputs} "
            f"product inputs, {s.folded} folded into the norm or scale before them, {s.inserted} by a Mul node"
        )


@dataclass(frozen=True, kw_only=True)
class Int8Failure:
    """Why int8 cannot hold parity for a model: the plain result, the best with nodes kept in fp32, the worst nodes."""

    plain: Parity
    best: Parity
    tried: int  # the most nodes kept in fp32 in any attempt
    ranked: tuple[sensitivity.NodeError, ...]

    def summary(self) -> str:
        """One sentence for the error message."""
        worst = ", ".join(f"{e.node} ({e.score:.2f})" for e in self.ranked[:3])
        return (
            f"int8 (smoothed) mean cosine {self.plain.mean_cosine:.4f}, min {self.plain.min_cosine:.4f}; keeping up "
            f"to {self.tried} of {len(self.ranked)} matrix products in fp32 (those whose inputs lose most first; "
            f"worst: {worst}) reached at best mean {self.best.mean_cosine:.4f}, min {self.best.min_cosine:.4f}"
        )


class Int8ParityError(ParityError):
    """Raised by `quantise` when no allowed set of fp32 nodes brings int8 to parity."""

    def __init__(self, failure: Int8Failure) -> None:
        super().__init__(failure.summary())
        self.failure = failure


def quantise(
    fp32: onnx.ModelProto,
    workdir: Path,
    *,
    check: Check | None,
    feeds: Sequence[dict[str, np.ndarray]],
    op_types: tuple[str, ...] = ("MatMul",),
) -> Int8Graph:
    """int8 of `fp32` that passes `check`: smoothed on `feeds`, then all of it quantised if that passes, else
    with the worst nodes kept in fp32.

    The last resort ranks the nodes once by `sensitivity.node_errors` on `feeds`, then keeps 1, 2,
    4, ... of the worst in fp32 (at most half of them: beyond that int8 no longer pays) until
    `check` passes; Int8ParityError when none does.
    """
    smoothed = smooth.smooth(fp32, feeds, workdir, op_types=op_types)
    plain = precision.to_int8(smoothed.model, workdir, op_types=op_types)
    if check is None:
        return Int8Graph(model=plain, parity=None, smoothing=smoothed)
    first = check(plain)
    if first.passed:
        return Int8Graph(model=plain, parity=first, smoothing=smoothed)
    ranked = [e for e in sensitivity.node_errors(smoothed.model, feeds, workdir) if e.op_type in op_types]
    best, steps = first, sensitivity.exclusion_steps(ranked)
    for keep in steps:
        model = precision.to_int8(smoothed.model, workdir, keep_fp32=tuple(keep), op_types=op_types)
        result = check(model)
        if result.passed:
            reason = (
                f"all quantised: mean cosine {first.mean_cosine:.4f}, min {first.min_cosine:.4f} (fails); "
                f"the {len(keep)} of {len(ranked)} matrix products whose quantised inputs lose most "
                f"(median channel error {ranked[len(keep) - 1].score:.2f} or more) kept in fp32"
            )
            return Int8Graph(model=model, parity=result, smoothing=smoothed, kept_fp32=tuple(keep), reason=reason)
        if result.mean_cosine > best.mean_cosine:
            best = result
    tried = len(steps[-1]) if steps else 0
    raise Int8ParityError(Int8Failure(plain=first, best=best, tried=tried, ranked=tuple(ranked)))
