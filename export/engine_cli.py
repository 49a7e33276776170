"""`mrl-export build-engine ARTIFACT`: TensorRT engines for an artifact's profiles, built on the deployment GPU."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mrl.cli import OneLineParser, interrupted_exit_code, progress_printer
from mrl.export.engine import (
    BuildResult,
    EngineBuildOptions,
    build_engines,
    buildable_profiles,
    parse_span,
    plan_for,
)
from mrl.runtime.errors import MrlError
from mrl.runtime.manifest import Manifest, Profile, ShapeRange, Span, load_manifest, verify_files

EXAMPLES = """\
examples:
  mrl-export build-engine artifacts/minilm
  mrl-export build-engine artifacts/minilm --batch 1:32:128 --seq 8:128:512
  mrl-export build-engine artifacts/minilm --seq 1:32:64 --seq 65:256:512 --profiles d256-fp16
  mrl-export build-engine artifacts/minilm --dry-run      # show the shape ranges; needs no GPU

Shape ranges (TensorRT optimization profiles) cover batch size and sequence length as MIN:OPT:MAX.
One --seq whose max is more than twice its opt is split into a short and a long range (--no-split
keeps one). Engines are per GPU and TensorRT version: build them on the machine that serves.
"""


def _span(what: str) -> Callable[[str], Span]:
    """An argparse type that reads MIN:OPT:MAX for the flag `what`."""

    def parse(text: str) -> Span:
        try:
            return parse_span(text, what)
        except MrlError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `mrl-export build-engine ...`."""
    parser = OneLineParser(
        prog="mrl-export build-engine",
        description="Build a TensorRT engine per profile of an artifact on this GPU, check each against "
        "ONNX Runtime CPU and list them in the manifest.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("artifact", metavar="ARTIFACT", type=Path, help="artifact directory written by mrl-export")
    parser.add_argument("--batch", type=_span("--batch"), help="batch size MIN:OPT:MAX (default 1:32:128)")
    parser.add_argument(
        "--seq",
        type=_span("--seq"),
        action="append",
        help="sequence length MIN:OPT:MAX, repeatable for several ranges (default 1:128:max length)",
    )
    parser.add_argument("--no-split", action="store_true", help="keep one --seq as one shape range")
    parser.add_argument("--profiles", help="comma-separated profile names (default: every fp32 and fp16 profile)")
    parser.add_argument("--force", action="store_true", help="rebuild even where an engine with the same key exists")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    parser.add_argument(
        "--workspace-gib", type=float, help="TensorRT builder workspace limit in GiB (default: its own)"
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the parity check against ONNX Runtime CPU")
    parser.add_argument("--dry-run", action="store_true", help="print the profiles and shape ranges, build nothing")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of internal errors")
    return parser


def options_from_args(args: argparse.Namespace) -> EngineBuildOptions:
    """Build options from parsed flags."""
    defaults = EngineBuildOptions()
    names = tuple(n.strip() for n in args.profiles.split(",") if n.strip()) if args.profiles else ()
    return EngineBuildOptions(
        batch=args.batch or defaults.batch,
        seqs=tuple(args.seq or ()),
        split=not args.no_split,
        profiles=names,
        force=args.force,
        validate=not args.no_validate,
        device_id=args.device,
        workspace_gib=args.workspace_gib,
    )


def plan_text(manifest: Manifest, profiles: Sequence[Profile], ranges: Sequence[ShapeRange]) -> str:
    """What a build would do, for --dry-run."""
    lines = [f"model {manifest.name}, max length {manifest.tokenizer.max_length} tokens", "shape ranges:"]
    lines += [f"  {i}: {r}" for i, r in enumerate(ranges)]
    lines.append("profiles: " + ", ".join(f"{p.name} ({p.precision})" for p in profiles))
    skipped = [p.name for p in manifest.profiles if p not in profiles]
    if skipped:
        lines.append("not built: " + ", ".join(skipped))
    lines.append("engines go to ARTIFACT/engines/<profile>-<key>.engine, keyed by this GPU and TensorRT version")
    return "\n".join(lines)


def results_table(directory: Path, results: Sequence[BuildResult]) -> str:
    """A Markdown table of what each profile's engine is, with its parity."""
    lines = [
        "| profile | status | engine | MB | build s | min cosine | mean cosine | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r.engine
        path = directory / e.file
        size = f"{path.stat().st_size / 1e6:.1f}" if path.is_file() else "-"
        par = e.parity
        stats = f"{par.min_cosine:.6f} | {par.mean_cosine:.6f} | {par.max_abs_diff:.2e}" if par else "not checked | | "
        lines.append(f"| {r.profile} | {r.status} | {e.file} | {size} | {e.build_seconds:.1f} | {stats} |")
    return "\n".join(lines)


def _load(directory: Path) -> Manifest:
    # Graphs and weights must be intact; listed engines are checked (and replaced) per profile.
    manifest = load_manifest(directory, verify=False)
    verify_files(directory, dataclasses.replace(manifest, engines=()))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mrl-export build-engine` (dispatched from `mrl-export`)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="mrl-export: %(levelname)s: %(message)s", level=logging.WARNING)
    progress = progress_printer(args.quiet)

    try:
        options = options_from_args(args)
        manifest = _load(args.artifact)
        if args.dry_run:
            print(plan_text(manifest, buildable_profiles(manifest, options.profiles), plan_for(manifest, options)))
            return 0
        manifest, results = build_engines(args.artifact, manifest, options, progress)
    except MrlError as e:
        print(f"mrl-export build-engine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("mrl-export build-engine: interrupted; engines already listed are kept", file=sys.stderr)
        return interrupted_exit_code(e)
    except Exception as e:
        if args.verbose:
            raise
        print(
            f"mrl-export build-engine: internal error: {type(e).__name__}: {e} (rerun with --verbose for details)",
            file=sys.stderr,
        )
        return 1
    progress("done")
    print(results_table(args.artifact.absolute(), results))
    return 0
