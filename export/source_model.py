"""A model ready to export, whichever route loaded it (`source.py` for PyTorch models, `onnx_source.py` for
ONNX encoders), and what both routes read off a model directory."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".data")


@dataclass(kw_only=True)
class SourceModel:
    """A model ready to export: where it came from, and either a torch pipeline or an ONNX encoder."""

    kind: str  # "sentence-transformers", "transformers" or "onnx"
    name: str
    path: Path
    sha256: str
    pooling: str
    max_length: int
    full_dims: int
    inputs: tuple[str, ...]
    tokenizer_json: str  # the tokenizers library's serialised tokenizer
    padding_side: str
    pad_token_id: int
    pad_token: str
    trained_dims: tuple[int, ...] | None = None
    total_layers: int | None = None  # the encoder's layers, where its config says
    trained_layers: tuple[int, ...] | None = None  # depths it was trained to be cut at (AdaptiveLayerLoss)
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str | None = None
    st_model: Any = None  # the SentenceTransformer (torch routes)
    onnx_file: Path | None = None  # the encoder graph (onnx route)

    def manifest_source(self) -> dict[str, Any]:
        """The `source` entry of the manifest."""
        return {"kind": self.kind, "name": self.name, "path": str(self.path), "sha256": self.sha256}


def hash_model_dir(path: Path) -> str:
    """sha256 over the weight and config files of a model directory, in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.suffix == ".json"))
    for p in files:
        digest.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def trained_dims_from_card(path: Path) -> tuple[int, ...] | None:
    """The Matryoshka dims a sentence-transformers model card records (`"matryoshka_dims": [...]`)."""
    card = path / "README.md"
    if not card.is_file():
        return None
    match = re.search(r'"matryoshka_dims"\s*:\s*\[([\d,\s]+)\]', card.read_text(errors="replace"))
    if not match:
        return None
    return tuple(sorted({int(d) for d in match.group(1).split(",") if d.strip()}, reverse=True))
