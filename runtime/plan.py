"""A request's decisions, made once: what the caller asks (`EmbedOptions`) and what will run (`Plan`).

`Embedder.plan` turns options into a plan, checking each against the artifact in one place; everything
after it (tokenising, batching, the forward pass, cutting and encoding the outputs) only reads the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mrl.runtime import encodings
from mrl.runtime.manifest import Profile

MAX_OUTPUTS = 8
"""Outputs one request may ask for: each costs a cut, a normalisation and an encoding of every row."""


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """One output a caller asks for: a width and an encoding."""

    dims: int | None = None
    """None: the widest the request's depth serves."""
    encoding: str = "float32"
    """One of `mrl.runtime.encodings.ENCODINGS`."""


@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    """What a caller asks of an embedding, before it is checked against the artifact."""

    outputs: tuple[OutputSpec, ...] = (OutputSpec(),)
    """Several outputs share one forward pass (e.g. a 64-d binary code to index and a 384-d vector to re-score)."""
    layers: int | None = None
    """Encoder layers to run; None: the default depth (the full depth where served)."""
    prompt_name: str | None = None
    """None: the model's default prompt, if it has one."""
    truncate: bool = False
    """Cut texts longer than the model's max length instead of refusing them."""
    truncation_direction: str = "right"
    """Which end truncation cuts: "right" keeps a text's start, "left" keeps its end."""


@dataclass(frozen=True, kw_only=True)
class Output:
    """One output as it will be made: its dims, encoding and, for int8/uint8, the calibrated ranges."""

    dims: int
    encoding: str
    ranges: np.ndarray | None = field(default=None, compare=False, repr=False)
    """`(2, dims)` per-dimension min and max (None for encodings that need none)."""

    @property
    def width(self) -> int:
        """Values per encoded vector (binary encodings pack 8 dims a byte)."""
        return encodings.width(self.encoding, self.dims)

    def make(self, rows: np.ndarray) -> np.ndarray:
        """This output from the graph's unit rows: cut to `dims`, re-normalised, encoded."""
        cut = rows if rows.shape[1] == self.dims else truncate_normalize(rows, self.dims)
        return encodings.encode(cut, self.encoding, self.ranges)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything decided about a request: the graph that runs, its outputs, its prompt and its truncation."""

    graph: Profile
    """The profile whose graph runs: the widest at the request's depth and precision; every output is cut from
    its rows (one copy of the weights in memory per depth, BENCHMARKS.md)."""
    layers: int | None
    """Encoder layers that run, as responses report it (None: an artifact that does not record its depth)."""
    outputs: tuple[Output, ...]
    prompt: str
    """Text prepended to every input ("" for none)."""
    truncate: bool
    truncation_direction: str = "right"

    def finish(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """Each output's vectors from the graph's `[n, graph.dims]` unit rows, in `outputs` order."""
        return tuple(output.make(rows) for output in self.outputs)


def truncate_normalize(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Keep the first `dims` components and scale each row to unit L2 norm (a cut unit vector is not one)."""
    cut = np.ascontiguousarray(vectors[:, :dims], dtype=np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)
