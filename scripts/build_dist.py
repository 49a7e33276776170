"""Build this tree's distributions: `mrl-toolkit` (CPU onnxruntime) and `mrl-toolkit-gpu` (onnxruntime-gpu).

    python scripts/build_dist.py cpu gpu --out dist     # both wheels into dist/
    pip install 'dist/mrl_toolkit_gpu-0.1.0-py3-none-any.whl[tensorrt]'

The two are alternatives, never installed together: the onnxruntime and onnxruntime-gpu wheels
both install the `onnxruntime` package and overwrite each other's files. pip cannot declare that
two requirements conflict, so the choice is made by which distribution you install, as onnxruntime
itself does (onnxruntime / onnxruntime-gpu) and fastembed after it (fastembed / fastembed-gpu).
Both are built from pyproject.toml: the gpu one from a copy in which only the name and the
onnxruntime line are swapped (`gpu_pyproject`), so they cannot drift apart in anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_NAME, GPU_NAME = "mrl-toolkit", "mrl-toolkit-gpu"
# CUDA 13 and cuDNN 9 come from NVIDIA's pip wheels through onnxruntime-gpu's own [cuda,cudnn] extras;
# 1.27 is the first onnxruntime-gpu built for CUDA 13, and 1.27.0 to 1.31.1 were checked (their
# metadata, and `readelf -d` of their TensorRT provider: libnvinfer.so.10). Widen the upper bound
# only after the same check of the new release (docs/gpu.md).
GPU_RUNTIME = "onnxruntime-gpu[cuda,cudnn]>=1.27,<1.32"
_NAME = re.compile(r'^name = "mrl-toolkit"$', re.M)
_RUNTIME = re.compile(r'^(\s*)"onnxruntime[<>=~!][^"]*",$', re.M)
_SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "artifacts")


def gpu_pyproject(text: str) -> str:
    """pyproject.toml's text for mrl-toolkit-gpu: the name and the onnxruntime requirement swapped."""
    for pattern, what in ((_NAME, f'name = "{CPU_NAME}"'), (_RUNTIME, '"onnxruntime>=..." in dependencies')):
        found = len(pattern.findall(text))
        if found != 1:
            raise SystemExit(f"build_dist.py: expected one {what} line in pyproject.toml, found {found}")
    text = _NAME.sub(f'name = "{GPU_NAME}"', text)
    return _RUNTIME.sub(lambda m: f'{m.group(1)}"{GPU_RUNTIME}",', text)


def build(variant: str, out: Path) -> Path:
    """Build one distribution's wheel into `out`; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    with tempfile.TemporaryDirectory(prefix=f"mrl-{variant}-") as tmp:
        source = REPO
        if variant == "gpu":
            source = Path(tmp) / "src"
            shutil.copytree(REPO, source, ignore=_SKIP)
            pyproject = source / "pyproject.toml"
            pyproject.write_text(gpu_pyproject(pyproject.read_text()))
        wheels = Path(tmp) / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(wheels), str(source)],
            check=True,
        )
        (wheel,) = wheels.glob("*.whl")
        return Path(shutil.copy2(wheel, out / wheel.name))


def main(argv: list[str] | None = None) -> int:
    """Build the distributions named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", choices=("cpu", "gpu"), help="cpu: mrl-toolkit, gpu: mrl-toolkit-gpu")
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="where the wheels go (default dist/)")
    args = parser.parse_args(argv)
    for variant in dict.fromkeys(args.variants):
        print(build(variant, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
