"""What the acceptance test adds to loading an artifact: `Embedder.load` with and without it, in one run.

For each precision, alternates (so drift hits both alike) a load without the test followed by the
warm-up every server runs anyway (`Embedder.warmup`: a session per served depth, one run) with a load
that runs the test and then warms up; prints the medians, the test alone, and the ratio.

    python scripts/acceptance_cost.py artifacts/minilm --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from mrl.runtime import Embedder, load_manifest
from mrl.runtime.acceptance import check
from mrl.runtime.machine import this_machine


def _timed(artifact: Path, precision: str, acceptance: bool) -> tuple[float, float]:
    """(seconds to a warm Embedder, seconds of that in the acceptance test)."""
    start = time.perf_counter()
    embedder = Embedder.load(artifact, precision=precision, acceptance=False)
    test = 0.0
    if acceptance:
        verdict = check(embedder)
        assert verdict.passed, verdict.refusal()
        test = verdict.seconds
    embedder.warmup()
    total = time.perf_counter() - start
    embedder.close()
    return total, test


def main() -> None:
    """Print one row per precision: medians of both loads, the test alone, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    manifest = load_manifest(args.artifact)
    print(f"{args.artifact}: dims {manifest.dims}, {', '.join(manifest.precisions)}; {this_machine()}")
    print("| precision | profiles | load + warm-up s | load + test + warm-up s | test alone s | ratio |")
    print("|---|---|---|---|---|---|")
    for precision in manifest.precisions:
        _timed(args.artifact, precision, True)  # first touch: files into the page cache, imports
        plain, tested, alone = [], [], []
        for _ in range(args.repeats):
            plain.append(_timed(args.artifact, precision, False)[0])
            total, test = _timed(args.artifact, precision, True)
            tested.append(total)
            alone.append(test)
        n = sum(p.precision == precision for p in manifest.profiles)
        a, b, c = statistics.median(plain), statistics.median(tested), statistics.median(alone)
        print(f"| {precision} | {n} | {a:.2f} | {b:.2f} | {c:.2f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
