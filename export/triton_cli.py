"""`mrl-export triton ARTIFACT --out REPO`: an artifact as a Triton Inference Server model repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrl.cli import OneLineParser, interrupted_exit_code, progress_printer
from mrl.export.triton import write_repository
from mrl.export.triton_config import ENCODERS, Batching
from mrl.export.triton_plan import TritonOptions
from mrl.runtime.errors import MrlError
from mrl.runtime.manifest import PRECISIONS

EXAMPLES = """\
examples:
  mrl-export triton artifacts/minilm --out triton/minilm
  mrl-export triton artifacts/minilm --out triton/minilm --dims 64,256 --encoder python --instances 1
  mrl-export triton artifacts/minilm --out triton/minilm --encoder tensorrt --max-batch-size 128
  mrl-export triton artifacts/minilm-2d --out triton/minilm-2d --layers 3 --dims 256   # a 2D model's 3-layer profile

Per dims: NAME_dDIMS (the ensemble clients call: TEXT in, EMBEDDING out) over NAME_tokenize and
NAME_encode_dDIMS; a profile that keeps L layers is NAME_lL_dDIMS. The repository's README.md says how
to serve it and call it.
"""
_DEFAULTS = Batching()


def _whole(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def _counts(text: str) -> tuple[int, ...]:
    parse = _whole(1)
    return tuple(parse(part.strip()) for part in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `mrl-export triton ...`."""
    parser = OneLineParser(
        prog="mrl-export triton",
        description="Write an artifact as a Triton model repository: a Python-backend tokenizer, one encoder "
        "and one ensemble per dims, with dynamic batching and instance groups.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("artifact", metavar="ARTIFACT", type=Path, help="artifact directory written by mrl-export")
    parser.add_argument("--out", type=Path, required=True, help="repository directory to write")
    parser.add_argument("--name", help="model name prefix (default: the artifact's model name)")
    parser.add_argument("--dims", type=_counts, default=(), help="dims to serve, comma-separated (default: all)")
    parser.add_argument(
        "--layers",
        type=_counts,
        default=(),
        help="depths to serve (2D Matryoshka artifacts), comma-separated (default: every depth exported)",
    )
    parser.add_argument("--precision", choices=PRECISIONS, help="precision of the profiles (default: the first)")
    parser.add_argument(
        "--encoder",
        choices=ENCODERS,
        default="onnxruntime",
        help="Triton's ONNX Runtime backend, TensorRT engines, or mrl.runtime in the Python backend (%(default)s)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=_whole(1),
        default=_DEFAULTS.max_batch_size,
        help="texts per request and per batch at most (%(default)s)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=_whole(0),
        default=_DEFAULTS.max_queue_delay_us,
        help="how long the dynamic batcher waits to fill a batch (%(default)s)",
    )
    parser.add_argument(
        "--instances", type=_whole(1), default=_DEFAULTS.instances, help="instances per model (%(default)s)"
    )
    parser.add_argument("--prompt-name", help="prompt for requests that name none (default: the model's, if any)")
    parser.add_argument("--truncate", action="store_true", help="cut over-long texts unless a request says not to")
    parser.add_argument("--force", action="store_true", help="replace an existing --out directory")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of internal errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mrl-export triton` (dispatched from `mrl-export`)."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return int(e.code or 0)
    progress = progress_printer(args.quiet)

    try:
        options = TritonOptions(
            name=args.name,
            dims=args.dims,
            layers=args.layers,
            precision=args.precision,
            encoder=args.encoder,
            batching=Batching(
                max_batch_size=args.max_batch_size,
                max_queue_delay_us=args.max_queue_delay_us,
                instances=args.instances,
            ),
            prompt_name=args.prompt_name,
            truncate=args.truncate,
            force=args.force,
        )
        plan = write_repository(args.artifact, args.out, options, progress)
    except MrlError as e:
        print(f"mrl-export triton: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through mrl-export's handler
        print("mrl-export triton: interrupted; nothing was written", file=sys.stderr)
        return interrupted_exit_code(e)
    except Exception as e:
        if args.verbose:
            raise
        print(
            f"mrl-export triton: internal error: {type(e).__name__}: {e} (rerun with --verbose for details)",
            file=sys.stderr,
        )
        return 1
    progress("done")
    print(f"{args.out}: {', '.join(plan.model_names)}")
    print(f"call {', '.join(plan.ensemble_name(p) for p in plan.profiles)}; see {args.out / 'README.md'}")
    return 0
