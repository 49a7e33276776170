"""Make a machine "disagree" with an artifact: perturb the source vectors its acceptance test stores.

The manifest is re-hashed, as an exporter on a machine whose kernels computed other vectors would have
written it; the artifact stays intact, so only the acceptance test can notice.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from mrl.runtime.acceptance import AcceptanceTest
from mrl.runtime.manifest import load_manifest


def copy_artifact(artifact: Path, to: Path) -> Path:
    """A writable copy of a (session-wide, read-only) artifact."""
    return Path(shutil.copytree(artifact, to))


def disagree(artifact: Path, noise: float = 0.3, depths: tuple[int | None, ...] | None = None) -> None:
    """Move each stored reference vector by `noise` times its norm in a random direction (at `depths`, or all).

    0.3 brings cosines to about 0.95: below every precision's thresholds.
    """
    manifest = load_manifest(artifact)
    assert manifest.acceptance is not None, f"{artifact} carries no acceptance test"
    test = AcceptanceTest.load(artifact, manifest.acceptance, manifest.full_dims)
    rng = np.random.default_rng(0)
    moved = {}
    for depth, vectors in test.references.items():
        if depths is None or depth in depths:
            step = rng.standard_normal(vectors.shape).astype(np.float32)
            step *= noise * np.linalg.norm(vectors, axis=1, keepdims=True) / np.linalg.norm(step, axis=1, keepdims=True)
            vectors = vectors + step
        moved[depth] = vectors
    entry = dataclasses.replace(test, references=moved).save(artifact)
    dataclasses.replace(manifest, acceptance=entry).save(artifact)
