"""The acceptance test export stores in an artifact: what parity checked, for every later load to check again."""

from __future__ import annotations

import numpy as np

from mrl.export.parity import THRESHOLDS
from mrl.export.profiles import ref_name
from mrl.export.source_model import SourceModel
from mrl.runtime.acceptance import AcceptanceTest


def acceptance_test(
    source: SourceModel, texts: list[str], references: dict[int | None, np.ndarray], precisions: list[str]
) -> AcceptanceTest:
    """The validation texts, the source model's full-width vectors of them per depth and parity's thresholds."""
    return AcceptanceTest(
        texts=tuple(texts),
        prompt="",  # parity embeds the validation texts as they are (parity.batches)
        references={depth: np.asarray(vectors, dtype=np.float32) for depth, vectors in references.items()},
        sources={depth: ref_name(source, depth) for depth in references},
        thresholds={precision: dict(THRESHOLDS[precision]) for precision in precisions},
    )
