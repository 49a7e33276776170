"""`mrl-bench`: engine, serve and trade-off benchmarks; JSON out, Markdown on stdout, progress on stderr."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mrl.bench.targets import HTTP_ENCODING_FORMATS
from mrl.cli import OneLineParser, progress_printer
from mrl.runtime.errors import MrlError

EXAMPLES = """\
examples:
  mrl-bench engine artifacts/minilm --batch-sizes 1,32 --seq-lens 16,64,128
  mrl-bench engine artifacts/minilm --precision fp32,int8 --dims 384 --texts texts.txt --out engine.json
  mrl-bench engine artifacts/minilm --baseline cuda          # on a GPU: PyTorch fp32 and fp16 too
  mrl-bench serve --target 127.0.0.1:50051 --concurrency 1,8,32,128 --requests 2000
  mrl-bench serve --target 127.0.0.1:50051 --texts texts.txt --dims-mix 128 --dims-mix 64,128,256 \\
      --offline-baseline artifacts/minilm
  mrl-bench serve --target mrl=127.0.0.1:50051 --target triton=127.0.0.1:8001 --triton-model minilm \\
      --client-python .venv-triton/bin/python --concurrency 1,64   # mrl-serve and Triton, same run
  mrl-bench serve --target mrl=127.0.0.1:50051 --target http=127.0.0.1:8080 --concurrency 1,64   # gRPC and HTTP
  mrl-bench serve --target 127.0.0.1:50051 --target '127.0.0.1:50051;outputs=64:ubinary,:int8'  # two outputs' cost
  mrl-bench tradeoff artifacts/minilm --corpus corpus.txt --pairs pairs.jsonl --target-recall 0.95
  mrl-bench engine artifacts/minilm-2d --layers 3,6 --dims 256 --batch-sizes 1,32   # layer-cut profiles' speed
  mrl-bench memory artifacts/minilm --precision fp32,int8   # RSS as 1, 2, 3, ... dims profiles are served
  mrl-bench serve --target 127.0.0.1:50051 --layers-mix 3 --layers-mix 6 --layers-mix 3,6   # depths alone and mixed
  mrl-bench corpus chatterbot --out data/chatterbot   # real offline texts: corpus, pairs, request texts
  mrl-bench --compare before.json after.json

Every command writes one JSON report (schema mrl-bench/1, with the environment), prints a
Markdown table on stdout and progress on stderr.
"""


def _ints(text: str) -> tuple[int, ...]:
    values = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected whole numbers separated by commas, got {part.strip()!r}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"values must be at least 1, got {value}")
        values.append(value)
    return tuple(values)


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _variant(text: str) -> Any:
    from mrl.bench.runners import parse_variant

    try:
        return parse_variant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", type=Path, default=Path(default_out), help="JSON report path (default %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="library warnings and tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `mrl-bench`."""
    parser = OneLineParser(
        prog="mrl-bench",
        description="Benchmark Matryoshka artifacts: engines against PyTorch, the gRPC server under load, "
        "and retrieval quality against dims.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="print two JSON reports side by side")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    _add_engine(sub)
    _add_serve(sub)
    _add_tradeoff(sub)
    _add_memory(sub)
    _add_corpus(sub)
    return parser


def _add_engine(sub: argparse._SubParsersAction) -> None:
    """The `mrl-bench engine` flags."""
    e = sub.add_parser(
        "engine",
        help="latency and throughput per backend x profile x batch x length",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("artifact", type=Path, metavar="ARTIFACT")
    e.add_argument(
        "--also",
        action="append",
        type=Path,
        metavar="ARTIFACT",
        help="another export of the same model to time in the same run (rows tagged with its folder name)",
    )
    e.add_argument("--backends", type=_names, default=("onnxruntime",), help="runtime backends (default onnxruntime)")
    e.add_argument(
        "--variant",
        action="append",
        type=_variant,
        metavar="NAME:KEY=VALUE,...",
        help="run each backend x precision once per variant, with these backend options (onnxruntime: graph=auto|"
        "optimized|portable, disabled_optimizers=A+B or empty; torch: dtype=fp32|fp16|bf16); repeatable, "
        "e.g. --variant fused:graph=optimized",
    )
    e.add_argument("--precision", type=_names, help="precisions to run (default: all the artifact has)")
    e.add_argument("--dims", type=_ints, help="dims to run (default: all served)")
    e.add_argument("--layers", type=_ints, help="depths to run, 3,6 (default: all served; the model's total is full)")
    e.add_argument("--batch-sizes", type=_ints, default=(1, 32), help="default 1,32")
    e.add_argument("--seq-lens", type=_ints, default=(32,), help="synthetic texts of exactly N tokens (default 32)")
    e.add_argument("--texts", type=Path, help="real texts, one a line, instead of --seq-lens")
    e.add_argument(
        "--length-sorted", action="store_true", help="with --texts: batch similar lengths, as Embedder.embed"
    )
    e.add_argument("--warmup", type=int, default=5, help="untimed calls per runner and cell (default 5)")
    e.add_argument("--repeats", type=int, default=50, help="timed calls per runner and cell (default 50)")
    e.add_argument(
        "--baseline",
        choices=["auto", "none", "cpu", "cuda"],
        default="auto",
        help="PyTorch baseline (default auto: when torch is installed; on CUDA where torch sees a GPU)",
    )
    e.add_argument("--block", type=int, default=5, help="timed calls in a row per runner (default 5)")
    e.add_argument(
        "--settle-ms",
        type=float,
        default=100.0,
        help="pause between blocks, so the previous runner's threads stop spinning (default 100)",
    )
    e.add_argument("--no-ceiling", action="store_true", help="skip the GEMM peak measurement")
    _common(e, "mrl-bench-engine.json")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """The `mrl-bench serve` flags."""
    s = sub.add_parser(
        "serve",
        help="closed-loop load on mrl-serve and Triton servers",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--target",
        action="append",
        required=True,
        help="[KIND=]HOST:PORT[;outputs=DIMS:ENCODING,...], KIND mrl (mrl-serve's gRPC, the default), http (an "
        "OpenAI-compatible /v1/embeddings, such as mrl-serve --http-port) or triton; with outputs (mrl, http), each "
        "request asks for those outputs of one forward pass; repeatable: levels alternate between them. "
        "Nothing else is contacted",
    )
    s.add_argument(
        "--http-encoding-format",
        choices=HTTP_ENCODING_FORMATS,
        default=HTTP_ENCODING_FORMATS[0],
        help="what http targets ask the embeddings as: base64 (the openai SDK's default) or float (JSON numbers)",
    )
    s.add_argument("--triton-model", help="triton targets: the model name prefix (requests go to NAME_dDIMS)")
    s.add_argument(
        "--client-python",
        action="append",
        metavar="[KIND=]PYTHON",
        help="run KIND's client (default triton) in a worker under this Python, such as one with tritonclient[grpc] "
        "(.venv-triton/bin/python from scripts/setup_triton.sh); repeatable",
    )
    s.add_argument("--concurrency", type=_ints, default=(1, 8, 32, 128), help="levels (default 1,8,32,128)")
    amount = s.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="measured requests per level (default 1000)")
    amount.add_argument("--duration", type=_positive_float, help="seconds per level instead of a request count")
    s.add_argument("--rounds", type=int, default=1, help="repeat each level and mix, ABBA order, pooled (default 1)")
    s.add_argument("--warmup-requests", type=int, help="unmeasured requests per level (default: 2 x concurrency)")
    s.add_argument("--texts", type=Path, help="request texts, one a line (default: built-in sentences)")
    s.add_argument("--texts-per-request", type=int, default=1, help="default 1")
    s.add_argument("--dims-mix", action="append", type=_ints, help="dims sent round-robin; repeatable (64,128,256)")
    s.add_argument(
        "--layers-mix",
        action="append",
        type=_ints,
        help="layers sent round-robin, each depth reported apart too; repeatable (3, then 6, then 3,6)",
    )
    s.add_argument("--offline-baseline", type=Path, metavar="ARTIFACT", help="also time Embedder at batch 32")
    s.add_argument("--offline-seconds", type=_positive_float, default=3.0, help="each offline pass (default 3)")
    s.add_argument("--offline-precision", help="precision of the offline baseline (default: the manifest's first)")
    s.add_argument(
        "--server-pid", type=int, action="append", help="a local server's pid (repeatable): not counted as other load"
    )
    s.add_argument("--timeout", type=_positive_float, default=60.0, help="per-request deadline in seconds (default 60)")
    s.add_argument("--token-file", type=Path, help="file holding the server's bearer token (mrl and http targets)")
    s.add_argument("--tls-ca", type=Path, help="PEM root certificates: connect with TLS (mrl and http targets)")
    _common(s, "mrl-bench-serve.json")


def _add_tradeoff(sub: argparse._SubParsersAction) -> None:
    """The `mrl-bench tradeoff` flags."""
    t = sub.add_parser(
        "tradeoff",
        help="recall@10, bytes and encode time for every dims and encoding",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("artifact", type=Path, metavar="ARTIFACT")
    t.add_argument("--corpus", type=Path, required=True, help="documents, one a line")
    t.add_argument("--pairs", type=Path, help='JSONL of {"query": ..., "positive": ...} for labelled recall and MRR')
    t.add_argument("--precision", type=_names, help="precisions (default: all the artifact has)")
    t.add_argument("--layers", type=_ints, help="depths, 3,6 (default: all the artifact serves)")
    t.add_argument(
        "--encodings",
        type=_names,
        default=("float32", "int8", "ubinary"),
        help="of float32, float16, int8, uint8, binary, ubinary (default %(default)s)",
    )
    t.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to keep (default 0.95)")
    t.add_argument(
        "--max-queries", type=int, default=1000, help="corpus documents used as label-free queries (default 1000)"
    )
    t.add_argument("--batch-size", type=int, default=32, help="default 32")
    t.add_argument(
        "--shortlist-encodings",
        type=_names,
        default=("ubinary", "int8"),
        help="funnels: encodings of the shortlist index kept in RAM (default %(default)s)",
    )
    t.add_argument(
        "--shortlist-sizes", type=_ints, default=(50, 100, 200), help="funnels: shortlist sizes k (default 50,100,200)"
    )
    t.add_argument(
        "--rescore-encodings",
        type=_names,
        default=("float32", "int8", "ubinary"),
        help="funnels: encodings of the vectors that re-score the shortlist (default %(default)s)",
    )
    t.add_argument("--no-funnels", action="store_true", help="single-stage designs only")
    t.add_argument(
        "--cost-vectors",
        type=int,
        default=1_000_000,
        help="synthetic codes each design's ms/query is measured on (default 1000000; 0: not measured)",
    )
    t.add_argument("--plot", type=Path, help="PNG path (default: the --out path with .png)")
    t.add_argument("--no-plot", action="store_true", help="write no plot")
    _common(t, "mrl-bench-tradeoff.json")


def _add_memory(sub: argparse._SubParsersAction) -> None:
    """The `mrl-bench memory` flags."""
    m = sub.add_parser(
        "memory",
        help="resident memory per added dims profile, per way of holding the weights",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("artifact", type=Path, metavar="ARTIFACT")
    m.add_argument("--precision", type=_names, help="precisions (default: all the artifact has)")
    m.add_argument(
        "--strategies",
        type=_names,
        default=("embedder", "sessions", "shared"),
        help="embedder (the runtime), sessions (one per profile), shared (one per profile, shared initializers)",
    )
    m.add_argument("--batch-size", type=int, default=32, help="texts per batch (default 32)")
    m.add_argument("--repeats", type=int, default=10, help="timed batches per profile (default 10)")
    _common(m, "mrl-bench-memory.json")


def _add_corpus(sub: argparse._SubParsersAction) -> None:
    """The `mrl-bench corpus` flags."""
    c = sub.add_parser("corpus", help="write real offline benchmark texts (chatterbot-corpus)")
    c.add_argument("source", choices=["chatterbot"])
    c.add_argument("--out", type=Path, required=True, help="directory for corpus.txt, pairs.jsonl, texts-MIN-MAX.txt")
    c.add_argument("--min-words", type=int, default=10)
    c.add_argument("--max-words", type=int, default=40)


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(format="mrl-bench: %(levelname)s: %(message)s", level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the baseline loads a local model; never download
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("onnxruntime", "transformers", "sentence_transformers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _run_engine(args: argparse.Namespace, progress: Callable[[str], None]) -> tuple[dict[str, Any], str]:
    from mrl.bench.engine import EngineConfig, engine_table, run_engine
    from mrl.bench.texts import read_lines

    config = EngineConfig(
        artifact=args.artifact,
        also=tuple(args.also or ()),
        backends=args.backends,
        variants=tuple(args.variant or ()),
        precisions=args.precision,
        dims=args.dims,
        layers=args.layers,
        batch_sizes=args.batch_sizes,
        seq_lens=args.seq_lens,
        texts=None if args.texts is None else tuple(read_lines(args.texts)),
        length_sorted=args.length_sorted,
        warmup=args.warmup,
        repeats=args.repeats,
        block=args.block,
        settle_ms=args.settle_ms,
        baseline=args.baseline,
        threads=args.threads,
        ceiling=not args.no_ceiling,
    )
    rows, extra = run_engine(config, progress)
    settings = {
        **vars(args),
        "texts": None if args.texts is None else str(args.texts),
        "variant": [{"name": v.name, "options": v.options} for v in args.variant or ()],
        "also": [str(a) for a in args.also or ()],
    }
    peaks = "; ".join(
        f"{p['device']} {p['dtype']} {p['flops_per_s'] / 1e9:,.0f} GFLOP/s ({p['via']})" for p in extra.get("peaks", [])
    )
    notes = f"\nbaseline: {extra['baseline']['reason']}\nGEMM peaks: {peaks or 'not measured'}"
    return {"config": settings, "rows": rows, "extra": extra, "artifact": args.artifact}, engine_table(rows) + notes


def _run_serve(args: argparse.Namespace, progress: Callable[[str], None]) -> tuple[dict[str, Any], str]:
    from mrl.bench.load import ServeConfig
    from mrl.bench.serve import offline_throughput, sweep_with_offline
    from mrl.bench.serve_report import offline_note, serve_table
    from mrl.bench.targets import client_pythons, target_specs
    from mrl.bench.texts import passage_sentences, read_lines

    texts = tuple(read_lines(args.texts)) if args.texts else tuple(passage_sentences())
    token = args.token_file.read_text().strip() if args.token_file else None
    roots = args.tls_ca.read_bytes() if args.tls_ca else None
    config = ServeConfig(
        targets=target_specs(
            args.target,
            triton_model=args.triton_model,
            token=token,
            root_certificates=roots,
            http_encoding_format=args.http_encoding_format,
        ),
        texts=texts,
        concurrency=args.concurrency,
        requests=None if args.duration else (args.requests or 1000),
        duration_s=args.duration,
        warmup_requests=args.warmup_requests,
        texts_per_request=args.texts_per_request,
        dims_mixes=tuple(args.dims_mix) if args.dims_mix else (None,),
        layers_mixes=tuple(args.layers_mix) if args.layers_mix else (None,),
        request_timeout_s=args.timeout,
        server_pids=tuple(args.server_pid or ()),
        rounds=args.rounds,
        client_python=client_pythons(args.client_python or ()),
    )
    measure = None
    if args.offline_baseline:

        def measure() -> dict[str, Any]:
            return offline_throughput(
                args.offline_baseline,
                texts,
                precision=args.offline_precision,
                threads=args.threads,
                min_seconds=args.offline_seconds,
            )

    rows, offline = sweep_with_offline(config, progress, measure)
    extra: dict[str, Any] = {"offline": offline}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "token_file"}
    return {"config": settings, "rows": rows, "extra": extra, "artifact": args.offline_baseline}, serve_table(
        rows
    ) + offline_note(offline)


def _run_tradeoff(args: argparse.Namespace, progress: Callable[[str], None]) -> tuple[dict[str, Any], str]:
    from mrl.bench.texts import read_lines, read_pairs
    from mrl.bench.tradeoff import TradeoffConfig, run_tradeoff
    from mrl.bench.tradeoff_report import tradeoff_text

    config = TradeoffConfig(
        artifact=args.artifact,
        corpus=tuple(read_lines(args.corpus, what="corpus")),
        pairs=tuple(read_pairs(args.pairs)) if args.pairs else (),
        precisions=args.precision,
        layers=args.layers,
        encodings=args.encodings,
        max_queries=args.max_queries,
        target_recall=args.target_recall,
        batch_size=args.batch_size,
        threads=args.threads,
        shortlist_encodings=args.shortlist_encodings,
        shortlist_sizes=() if args.no_funnels else args.shortlist_sizes,
        rescore_encodings=args.rescore_encodings,
        cost_vectors=args.cost_vectors,
    )
    rows, extra = run_tradeoff(config, progress)
    if not args.no_plot:
        from mrl.bench.plot import plot_designs, plot_quality_speed, plot_tradeoff

        path = args.plot or args.out.with_suffix(".png")
        title = f"{args.artifact.name}: {extra['n_documents']} documents from {args.corpus.name}"
        extra["plot"] = str(plot_tradeoff(rows, path, target=args.target_recall, title=title))
        speed = path.with_name(f"{path.stem}-speed{path.suffix}")
        extra["plot_speed"] = str(plot_quality_speed(rows, speed, title=f"{title}: quality against speed"))
        designs = path.with_name(f"{path.stem}-designs{path.suffix}")
        extra["plot_designs"] = str(
            plot_designs([*rows, *extra["funnels"]], extra["design_recommendation"], designs, title=title)
        )
        progress(f"plots written to {path}, {speed} and {designs}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"config": settings, "rows": rows, "extra": extra, "artifact": args.artifact}, tradeoff_text(rows, extra)


def _run_memory(args: argparse.Namespace, progress: Callable[[str], None]) -> tuple[dict[str, Any], str]:
    from mrl.bench.footprint import MemoryConfig, memory_table, run_memory

    config = MemoryConfig(
        artifact=args.artifact,
        precisions=args.precision,
        strategies=args.strategies,
        batch_size=args.batch_size,
        repeats=args.repeats,
        threads=args.threads,
    )
    rows, extra = run_memory(config, progress)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"config": settings, "rows": rows, "extra": extra, "artifact": args.artifact}, memory_table(rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mrl-bench`."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        return _compare(*args.compare)
    if args.command is None:
        parser.error("name a command (engine, serve, tradeoff, memory, corpus) or use --compare A.json B.json")
    _quiet_libraries(args.verbose if hasattr(args, "verbose") else False)
    progress = progress_printer(getattr(args, "quiet", False))

    runners = {"engine": _run_engine, "serve": _run_serve, "tradeoff": _run_tradeoff, "memory": _run_memory}
    try:
        if args.command == "corpus":
            return _corpus(args)
        from mrl.bench import env
        from mrl.bench.report import make_report, write_report

        load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        result, table = runners[args.command](args, progress)
        result["extra"]["load_average_at_start"] = load_at_start
        report = make_report(
            args.command,
            command=["mrl-bench", *argv],
            environment=env.collect(result["artifact"]),  # after the run: torch's CUDA facts exist now
            config={k: (str(v) if isinstance(v, Path) else v) for k, v in result["config"].items()},
            results=result["rows"],
            extra=result["extra"],
        )
        write_report(report, args.out)
    except (MrlError, OSError) as e:
        print(f"mrl-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mrl-bench: interrupted; no report written", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "verbose", False):
            raise
        print(f"mrl-bench: internal error: {type(e).__name__}: {e} (rerun with --verbose for details)", file=sys.stderr)
        return 1
    progress(f"report written to {args.out}")
    _emit(table)
    return 0


def _emit(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `mrl-bench ... | head` closed stdout early: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _compare(a: Path, b: Path) -> int:
    from mrl.bench.report import compare_reports, load_report

    try:
        _emit(compare_reports(load_report(a), load_report(b)))
    except MrlError as e:
        print(f"mrl-bench: error: {e}", file=sys.stderr)
        return 2
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from mrl.bench.corpora import write_chatterbot

    files = write_chatterbot(args.out, min_words=args.min_words, max_words=args.max_words)
    print(f"{files.corpus}: {files.n_corpus} documents")
    print(f"{files.pairs}: {files.n_pairs} query/positive pairs")
    print(f"{files.texts}: {files.n_texts} texts of {args.min_words}-{args.max_words} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
