"""Calibration: each profile's per-dimension value ranges over typical texts, kept in the manifest so the
runtime and server can hand out int8/uint8 embeddings; and `mrl-export calibrate ARTIFACT --texts FILE`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrl.cli import OneLineParser
from mrl.export.errors import ExportError
from mrl.export.parity import validation_texts
from mrl.runtime.embedder import Embedder
from mrl.runtime.encodings import calibration_ranges
from mrl.runtime.errors import MrlError
from mrl.runtime.manifest import Calibration, Manifest, Range, load_manifest
from mrl.runtime.tokenize import TextTokenizer

VALIDATION = "validation texts"

EXAMPLES = """\
examples:
  mrl-export calibrate artifacts/minilm --texts my-corpus.txt   # one typical text a line

int8 and uint8 outputs cut each dimension's [min, max] over these texts into 256 buckets; values outside
are clipped. Use a few hundred to a few thousand texts like those the model will embed. mrl-export
calibrates on its validation texts unless given --calibration-texts.
"""


@dataclass(frozen=True, kw_only=True)
class CalibrationTexts:
    """The texts to calibrate on and where they came from."""

    name: str
    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.texts:
            raise ExportError(f"{self.name} holds no texts: write one text a line")

    @classmethod
    def from_file(cls, path: Path) -> CalibrationTexts:
        """The non-empty lines of a UTF-8 file."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ExportError(f"cannot read calibration texts {path}: {getattr(e, 'strerror', None) or e}") from None
        return cls(name=Path(path).name, texts=tuple(line for line in lines if line.strip()))

    @classmethod
    def validation(cls) -> CalibrationTexts:
        """Export's own validation texts (real sentences of varied length)."""
        return cls(name=VALIDATION, texts=tuple(validation_texts()))


def _short(values: np.ndarray) -> tuple[float, ...]:
    # float32's shortest decimal form: the manifest stays small and loads back to the same float32 values.
    return tuple(float(str(v)) for v in values.astype(np.float32))


def calibrate(directory: Path, manifest: Manifest, texts: CalibrationTexts) -> Calibration:
    """Each profile's ranges over `texts` (default prompt applied, long texts cut), run on ONNX Runtime CPU."""
    tokenizer = TextTokenizer.load(directory, manifest.tokenizer)
    ranges: dict[str, Range] = {}
    for precision in manifest.precisions:
        embedder = Embedder(
            directory, manifest, tokenizer, backend="onnxruntime-cpu", precision=precision, backend_options={}
        )
        try:
            for profile in embedder.profiles:
                # Small length-sorted batches: little padding, so calibrating costs about one pass of the texts.
                vectors = embedder.embed(texts.texts, dims=profile.dims, batch_size=8, truncate=True)
                low, high = calibration_ranges(vectors)
                ranges[profile.name] = Range(min=_short(low), max=_short(high))
        finally:
            embedder.close()
    digest = hashlib.sha256("\n".join(texts.texts).encode()).hexdigest()
    return Calibration(texts=texts.name, n_texts=len(texts.texts), texts_sha256=digest, ranges=ranges)


def calibrate_artifact(directory: Path, texts: CalibrationTexts) -> Manifest:
    """Calibrate an existing artifact and rewrite its manifest atomically; returns the new manifest."""
    directory = Path(directory)
    manifest = load_manifest(directory, verify=True)
    updated = dataclasses.replace(manifest, calibration=calibrate(directory, manifest, texts))
    updated.save(directory)
    return updated


def main(argv: Sequence[str]) -> int:
    """Entry point of `mrl-export calibrate`; returns the exit code."""
    parser = OneLineParser(
        prog="mrl-export calibrate",
        description="Compute each profile's per-dimension value ranges over your texts and store them in the "
        "artifact's manifest, so int8 and uint8 outputs quantise with them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("artifact", metavar="ARTIFACT", type=Path, help="artifact directory written by mrl-export")
    parser.add_argument("--texts", type=Path, required=True, metavar="FILE", help="UTF-8 file, one text a line")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:
        return int(e.code or 0)
    try:
        manifest = calibrate_artifact(args.artifact, CalibrationTexts.from_file(args.texts))
    except MrlError as e:
        print(f"mrl-export calibrate: error: {e}", file=sys.stderr)
        return 2
    calibration = manifest.calibration
    assert calibration is not None
    print(
        f"calibrated {', '.join(calibration.ranges)} of {args.artifact} on {calibration.n_texts} texts "
        f"from {calibration.texts}"
    )
    return 0
