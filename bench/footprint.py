"""`mrl-bench memory`: resident memory as one process serves 1, 2, ... dims profiles of one precision.

Each strategy runs in a fresh Python process (RSS is per process and never shrinks back), which
embeds one batch at each profile's dims in turn, widest first, and records its RSS after each:

- `embedder`: the runtime as shipped (`Embedder.embed`).
- `sessions`: one ONNX Runtime session per profile graph, each holding its own copy of the weights
  it prepacks (what the runtime did before it ran the widest graph for every dims).
- `shared`: one session per profile, the weights handed to every session once as shared
  initializers (`SessionOptions.add_initializer`), with prepacking off: prepacked copies are per
  session, and this onnxruntime's Python API offers no shared prepacked-weights container.

The seconds per batch of the last profile opened are recorded too, as a check that a strategy
does not buy its memory with speed (a rough one: `mrl-bench engine` is the speed benchmark).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrl.bench import memory
from mrl.bench.texts import passage_sentences
from mrl.runtime.errors import InvalidInputError
from mrl.runtime.manifest import Manifest, Profile, load_manifest
from mrl.runtime.tokenize import TextTokenizer

STRATEGIES = ("embedder", "sessions", "shared")


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """What `mrl-bench memory` measures."""

    artifact: Path
    precisions: tuple[str, ...] | None = None  # None: every precision the artifact has
    strategies: tuple[str, ...] = STRATEGIES
    batch_size: int = 32
    repeats: int = 10
    threads: int = 1

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise InvalidInputError(f"unknown strategy {unknown[0] if unknown else ''!r}; choose from {STRATEGIES}")
        if self.batch_size < 1 or self.repeats < 1:
            raise InvalidInputError("batch size and repeats must be at least 1")


def run_memory(config: MemoryConfig, progress: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every strategy x precision in its own process; rows per number of profiles served."""
    manifest = load_manifest(config.artifact)
    precisions = config.precisions or tuple(manifest.precisions)
    rows = []
    for precision in precisions:
        weights = _weights_bytes(manifest, precision)
        for strategy in config.strategies:
            progress(f"{strategy} {precision}: a fresh process serves each dims in turn")
            for step in _child(config, strategy, precision):
                rows.append({"strategy": strategy, "precision": precision, "weights_mib": weights / 2**20, **step})
    add_growth(rows)
    return rows, {"note": "rss_mib is the process's RSS after loading and running, minus its RSS before loading"}


def add_growth(rows: list[dict[str, Any]]) -> None:
    """Fill `added_mib` (RSS added by this profile) and `added_vs_weights` (that over one profile's weights)."""
    previous: dict[tuple[str, str], float] = {}
    for row in rows:
        key = (row["strategy"], row["precision"])
        row["added_mib"] = None if key not in previous else row["rss_mib"] - previous[key]
        row["added_vs_weights"] = None if row["added_mib"] is None else row["added_mib"] / row["weights_mib"]
        previous[key] = row["rss_mib"]


def _weights_bytes(manifest: Manifest, precision: str) -> int:
    """The bytes of the weights file one profile of `precision` points into."""
    profile = next(p for p in manifest.profiles if p.precision == precision)
    return next((w.bytes for w in manifest.weights if w.file == profile.weights), 0)


def _child(config: MemoryConfig, strategy: str, precision: str) -> list[dict[str, Any]]:
    args = [str(config.artifact), strategy, precision, str(config.batch_size), str(config.repeats), str(config.threads)]
    done = subprocess.run(
        [sys.executable, "-m", "mrl.bench.footprint", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise InvalidInputError(f"the {strategy} {precision} measurement failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _profiles(manifest: Manifest, precision: str) -> list[Profile]:
    return sorted((p for p in manifest.profiles if p.precision == precision), key=lambda p: -p.dims)


def _timed(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _measure(artifact: Path, strategy: str, precision: str, batch: int, repeats: int, threads: int) -> list[dict]:
    """In the child process: serve each dims in turn; RSS and seconds per batch after each."""
    manifest = load_manifest(artifact, verify=False)
    texts = (passage_sentences() * batch)[:batch]
    base = memory.rss_mib() or 0.0
    steps = []
    if strategy == "embedder":
        from mrl.runtime import Embedder

        embedder = Embedder.load(artifact, "onnxruntime", precision=precision, intra_op_threads=threads)
        for i, p in enumerate(_profiles(manifest, precision), 1):
            seconds = _timed(lambda p=p: embedder.embed(texts, dims=p.dims), repeats)
            steps.append({"profiles": i, "dims": p.dims, "rss_mib": (memory.rss_mib() or 0.0) - base, "s": seconds})
        return steps
    import onnxruntime as ort

    tokenizer = TextTokenizer.load(artifact, manifest.tokenizer)
    feed = tokenizer.pad(tokenizer.encode(texts, truncate=True))
    shared = _shared_initializers(artifact, _profiles(manifest, precision)[0]) if strategy == "shared" else {}
    sessions = []
    for i, p in enumerate(_profiles(manifest, precision), 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        for name, value in shared.items():
            options.add_initializer(name, value)
        if shared:
            options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(str(artifact / p.file), options, providers=["CPUExecutionProvider"])
        sessions.append(session)
        inputs = {i.name: feed[i.name] for i in session.get_inputs()}
        seconds = _timed(lambda s=session, f=inputs: s.run(None, f), repeats)
        steps.append({"profiles": i, "dims": p.dims, "rss_mib": (memory.rss_mib() or 0.0) - base, "s": seconds})
    return steps


def _shared_initializers(artifact: Path, profile: Profile) -> dict[str, Any]:
    """Every external tensor of a profile's graph as an OrtValue over one read-only map of its weights file."""
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import uses_external_data

    graph = onnx.load(str(artifact / profile.file), load_external_data=False)
    blobs: dict[str, np.memmap] = {}
    values = {}
    for tensor in graph.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info["location"]
        blob = blobs.setdefault(location, np.memmap(artifact / location, dtype=np.uint8, mode="r"))
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        count = int(info["length"]) // dtype.itemsize
        array = np.frombuffer(blob, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
        values[tensor.name] = ort.OrtValue.ortvalue_from_numpy(array.reshape(tuple(tensor.dims)))
    return values


def memory_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table `mrl-bench memory` prints."""
    from mrl.bench.report import markdown_table

    headers = ["strategy", "precision", "profiles", "dims", "RSS MiB", "added MiB", "added / weights", "ms per batch"]
    body = [
        [
            r["strategy"],
            r["precision"],
            r["profiles"],
            r["dims"],
            r["rss_mib"],
            r["added_mib"],
            None if r["added_vs_weights"] is None else f"{100 * r['added_vs_weights']:.1f} %",
            1000 * r["s"],
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


if __name__ == "__main__":  # the child process of `_child`
    a = sys.argv[1:]
    print(json.dumps(_measure(Path(a[0]), a[1], a[2], int(a[3]), int(a[4]), int(a[5]))))
