"""Run an artifact's int8 graphs on this CPU and on ONNX Runtime's AVX2 kernel path (under QEMU), and compare.

    python scripts/int8_avx2_check.py ARTIFACT [--qemu-cpu Haswell] [--full-range]

QEMU 7.2's TCG emulates AVX2 but not AVX-512 or VNNI, so under `qemu-x86_64 -cpu Haswell` ONNX
Runtime picks its AVX2 u8 x s8 kernel (vpmaddubsw, which saturates int16 pair sums). Every graph
embeds export's validation texts at the artifact's full width, here and there; each row gives its
cosine to the fp32 graph (mean / min, as parity has them) and how far the two machines' vectors are
apart. --full-range adds the graph int8 used to be (weights in -127..127, nothing smoothed),
quantised here from the fp32 graph, to show what saturation does to it. Needs qemu-user
(apt-get install qemu-user) and an artifact with fp32 and int8 profiles; slow under emulation.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def graphs(artifact: Path, extra: Path | None) -> dict[str, Path]:
    """The full-width fp32 graph and every int8 graph of the artifact (and `extra`), by name."""
    from mrl.runtime import load_manifest

    manifest = load_manifest(artifact)
    widest = {p.precision: p for p in manifest.profiles if p.dims == manifest.full_dims and p.layers is None}
    found = {"fp32": artifact / widest["fp32"].file, "int8 portable": artifact / widest["int8"].file}
    if widest["int8"].ort_cpu is not None:
        found["int8 ort-cpu"] = artifact / widest["int8"].ort_cpu.file
    if extra is not None:
        found["int8 full range, unsmoothed (before)"] = extra
    return found


def embed_all(artifact: Path, named: dict[str, Path]) -> dict[str, np.ndarray]:
    """Each graph's vectors for the validation texts, on whatever CPU this process runs on."""
    from mrl.export import parity
    from mrl.runtime import load_manifest
    from mrl.runtime.tokenize import TextTokenizer

    tokenizer = TextTokenizer.load(artifact, load_manifest(artifact).tokenizer)
    return {name: parity.embed_graph(path, tokenizer, parity.validation_texts()) for name, path in named.items()}


def full_range_graph(artifact: Path, fp32: Path, workdir: Path) -> Path:
    """The artifact's fp32 graph quantised as int8 was before: weights in -127..127, nothing smoothed."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = workdir / "fp32.onnx", workdir / "full-range.onnx"
    onnx.save_model(copy.deepcopy(onnx.load(str(fp32))), str(src), save_as_external_data=True, location="fp32.data")
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return dst


def main() -> int:
    """Compare native and emulated vectors; one Markdown row per graph."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--qemu-cpu", default="Haswell", help="a CPU model without AVX-512 (default Haswell)")
    parser.add_argument("--full-range", action="store_true", help="also the int8 of before (see above)")
    parser.add_argument("--emit", type=Path, help=argparse.SUPPRESS)  # the emulated child writes its vectors here
    parser.add_argument("--extra", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emit:
        np.savez(args.emit, **embed_all(args.artifact, graphs(args.artifact, args.extra)))
        return 0
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        print("int8_avx2_check: error: qemu-x86_64 not found: apt-get install qemu-user", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        extra = (
            full_range_graph(args.artifact, graphs(args.artifact, None)["fp32"], Path(tmp)) if args.full_range else None
        )
        native = embed_all(args.artifact, graphs(args.artifact, extra))
        emitted = Path(tmp) / "emulated.npz"
        cmd = [qemu, "-cpu", args.qemu_cpu, sys.executable, __file__, str(args.artifact), "--emit", str(emitted)]
        subprocess.run(cmd + (["--extra", str(extra)] if extra else []), check=True, stderr=subprocess.DEVNULL)
        emulated = dict(np.load(emitted))
    cpu = f"{args.qemu_cpu} (AVX2)"
    print(f"| graph | this CPU: mean / min cosine to fp32 | {cpu}: mean / min | max abs difference |")
    print("|---|---|---|---|")
    for name, here in native.items():
        there = emulated[name]
        cells = [np.sum(v * ref, axis=1) for v, ref in ((here, native["fp32"]), (there, emulated["fp32"]))]
        stats = [f"{c.mean():.4f} / {c.min():.4f}" for c in cells]
        print(f"| {name} | {stats[0]} | {stats[1]} | {np.abs(here - there).max():.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
