"""`mrl-export verify ARTIFACT`: the artifact's acceptance test on this machine's backend, one row per profile."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mrl.cli import OneLineParser
from mrl.export.cli import precision_list
from mrl.runtime.acceptance import ProfileCheck, Verdict, check
from mrl.runtime.backends import backend_names
from mrl.runtime.embedder import Embedder
from mrl.runtime.errors import BackendUnavailableError, MrlError
from mrl.runtime.machine import this_machine
from mrl.runtime.manifest import load_manifest

PROG = "mrl-export verify"
EXAMPLES = """\
examples:
  mrl-export verify artifacts/minilm                       # every precision, on the backend auto picks here
  mrl-export verify artifacts/minilm --precision int8      # after moving to another CPU kind
  mrl-export verify artifacts/minilm --backend onnxruntime-cuda --precision fp32,fp16
  mrl-export verify artifacts/minilm --backend tensorrt    # after build-engine, on the GPU that serves

The artifact's acceptance test (its validation texts, the source model's vectors of them, parity's
thresholds; written by mrl-export) runs through the graph each depth serves on this machine, and every
served dims is compared with the source model's vectors cut to it. Exit 0: every profile holds its
thresholds; 2: one does not (one line each on stderr), or nothing can be checked.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `mrl-export verify ...`."""
    parser = OneLineParser(
        prog=PROG,
        description="Run an artifact's acceptance test on this machine: each profile's vectors against the source "
        "model's, with the thresholds its export held them to.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("artifact", metavar="ARTIFACT", type=Path, help="artifact directory written by mrl-export")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *backend_names()],
        help="runtime backend to check (default auto: what Embedder.load and mrl-serve pick here)",
    )
    parser.add_argument(
        "--precision", type=precision_list, help="precisions to check, comma-separated (default: all the artifact has)"
    )
    return parser


def results_table(verdicts: Sequence[Verdict]) -> str:
    """A Markdown table: one row per profile checked, with the backend it ran on."""
    lines = [
        "| profile | layers | dims | precision | runs on | mean cosine | min cosine | needs | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for verdict in verdicts:
        lines += [_row(c, verdict.runs_on) for c in verdict.checks]
    return "\n".join(lines)


def _row(c: ProfileCheck, runs_on: str) -> str:
    p = c.parity
    result = "pass" if p.passed else "FAIL"
    layers = c.layers if c.layers is not None else "all"
    return (
        f"| {c.profile} | {layers} | {c.dims} | {c.precision} | {runs_on} | {p.mean_cosine:.6f} | "
        f"{p.min_cosine:.6f} | {p.threshold} | {result} |"
    )


def verify(artifact: Path, backend: str, precisions: Sequence[str] | None) -> tuple[list[Verdict], list[str]]:
    """Each precision's verdict, and one line per failure (a profile below its thresholds, a backend missing)."""
    manifest = load_manifest(artifact)  # every file against its sha256, the acceptance test's too
    if manifest.acceptance is None:
        raise MrlError(
            f"{artifact} carries no acceptance test (exported with --no-validate, or by an mrl-toolkit without "
            "them): nothing to verify; export it again to add one"
        )
    unknown = [p for p in precisions or () if p not in manifest.precisions]
    if unknown:
        raise MrlError(f"{artifact} has no {unknown[0]} profiles; it has: {', '.join(manifest.precisions)}")
    verdicts, failures = [], []
    for precision in precisions or manifest.precisions:
        try:
            embedder = Embedder.load(artifact, backend, precision=precision, verify=False, acceptance=False)
            try:
                verdict = check(embedder)
            finally:
                embedder.close()
        except BackendUnavailableError as e:  # no engine, no GPU for this precision: say so, check the others
            failures.append(f"{precision}: cannot run here: {e}")
            continue
        verdicts.append(verdict)
        failures += [f"{c.summary}; on {verdict.runs_on}" for c in verdict.failures]
    return verdicts, failures


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Within, the toolkit's warnings print as `mrl-export verify: WARNING: ...` lines, and nothing less."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    ours = logging.getLogger("mrl")
    saved = ours.handlers[:], ours.propagate, ours.level
    ours.handlers[:], ours.propagate = [handler], False
    ours.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ours.handlers[:], ours.propagate = saved[0], saved[1]
        ours.setLevel(saved[2])


def main(argv: Sequence[str]) -> int:
    """Entry point of `mrl-export verify`; returns the exit code (0 all pass, 2 a failure)."""
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as e:
        return int(e.code or 0)
    start = time.perf_counter()
    try:
        with _warnings_as_lines():
            verdicts, failures = verify(args.artifact, args.backend, args.precision)
    except MrlError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"artifact: {args.artifact}")
    print(f"machine: {this_machine()}")
    checked = sum(len(v.checks) for v in verdicts)
    if checked:
        print(results_table(verdicts))
    outcome = f"{len(failures)} failed" if failures else "all pass"
    print(f"\n{checked} profiles checked in {time.perf_counter() - start:.1f} s: {outcome}")
    for line in failures:
        print(f"{PROG}: FAIL {line}", file=sys.stderr)
    return 2 if failures else 0
