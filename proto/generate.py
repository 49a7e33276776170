"""Regenerate the Python stubs of `mrl/v1/*.proto`: `python -m mrl.proto.generate [OUT_DIR]`.

Needs grpcio-tools (the `dev` extra); the base install uses the committed stubs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE = "mrl.proto"

# protoc writes `from mrl.v1 import embedder_pb2 as ...`; the installed package is `mrl.proto.mrl.v1`.
_BARE_IMPORT = re.compile(r"^from (mrl\.v1) import (\w+_pb2)", re.MULTILINE)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files under `root`, relative to it."""
    return sorted(p.relative_to(root) for p in root.glob("mrl/**/*.proto"))


def fix_imports(source: str) -> str:
    """Rewrite protoc's bare `from mrl.v1 import x_pb2` into the installed package path."""
    return _BARE_IMPORT.sub(rf"from {PACKAGE}.\1 import \2", source)


def generate(out_dir: Path = PROTO_ROOT, root: Path = PROTO_ROOT) -> list[Path]:
    """Write `*_pb2.py` and `*_pb2_grpc.py` for every .proto under `root` into `out_dir`."""
    from grpc_tools import protoc  # dev-only dependency: imported here, not at module import

    out_dir = Path(out_dir)
    files = [str(p) for p in proto_files(root)]
    if not files:
        raise FileNotFoundError(f"no .proto files under {root / 'mrl'}")
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(files)}")
    written = sorted(out_dir.glob("mrl/**/*_pb2*.py"))
    for path in written:
        path.write_text(fix_imports(path.read_text()))
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: regenerate in place, or into the directory given."""
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else PROTO_ROOT
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
