"""Parity: every profile run through the real runtime path against the reference model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from mrl.export.errors import ExportError
from mrl.runtime.acceptance import measure
from mrl.runtime.backends.onnxruntime import OnnxRuntimeBackend
from mrl.runtime.manifest import Parity
from mrl.runtime.tokenize import TextTokenizer

# The minimum of each statistic per precision: fp32 and fp16 must match every text closely; int8
# on average, and no text may move far.
THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"min_cosine": 0.9999},
    "fp16": {"min_cosine": 0.999},
    "int8": {"mean_cosine": 0.99, "min_cosine": 0.97},
}


def validation_texts() -> list[str]:
    """The fixed real sentences of varied length (one longer than 256 tokens) parity runs on."""
    text = resources.files("mrl.export").joinpath("data/validation.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def batches(tokenizer: TextTokenizer, texts: list[str], batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """The padded batches parity runs: texts in file order, so batches mix lengths and padding is checked."""
    encoded = tokenizer.encode(texts, truncate=True)  # as sentence-transformers does
    return [tokenizer.pad(encoded[i : i + batch_size]) for i in range(0, len(texts), batch_size)]


def embed_graph(graph: Path, tokenizer: TextTokenizer, texts: list[str], batch_size: int = 8) -> np.ndarray:
    """Embed texts with one profile graph through the runtime's tokenizer and ONNX Runtime CPU."""
    backend = OnnxRuntimeBackend(graph, providers=["CPUExecutionProvider"])
    out = [backend.run(feed) for feed in batches(tokenizer, texts, batch_size)]
    backend.close()
    return np.concatenate(out)


def compare(candidate: np.ndarray, reference_full: np.ndarray, dims: int, precision: str, reference: str) -> Parity:
    """Parity of unit vectors `candidate` against the reference truncated and re-normalised to dims, on this machine."""
    try:
        return measure(candidate, reference_full, dims, THRESHOLDS[precision], reference)
    except ValueError as e:  # a graph of the wrong width
        raise ExportError(str(e)) from None
