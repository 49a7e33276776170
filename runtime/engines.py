"""TensorRT engine decisions as pure functions: shape-range planning, cache keys, range per batch.

Nothing here imports TensorRT or CUDA, so the engine build, the tensorrt backend, ONNX Runtime's
TensorRT provider and the tests share one definition of each decision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mrl.runtime.backends.gpu import GpuInfo
from mrl.runtime.errors import ArtifactError, InvalidInputError
from mrl.runtime.manifest import Engine, Manifest, Profile, ShapeRange, Span

# Bumped when what an engine file holds changes meaning (its inputs, its key's fields).
ENGINE_FORMAT = 1
DEFAULT_BATCH = Span(1, 32, 128)
DEFAULT_OPT_SEQ = 128
# TensorRT parses int64 graph inputs as INT64 from version 10 on; older versions cast to INT32.
_NUMPY_DTYPES = {"INT64": np.int64, "INT32": np.int32, "FLOAT": np.float32, "HALF": np.float16}


def default_seq(max_length: int) -> Span:
    """The sequence span when none is given: any length up to the model's max, tuned at 128."""
    return Span(1, min(DEFAULT_OPT_SEQ, max_length), max_length)


def plan_shape_ranges(
    batch: Span, seqs: Sequence[Span], *, max_length: int, split: bool = True
) -> tuple[ShapeRange, ...]:
    """The shape ranges to build: the given sequence spans, cut to max_length, a long tail split off.

    One sequence span whose max is more than twice its opt becomes two ranges, short (min..opt)
    and long (opt+1..max): TensorRT tunes kernels at each range's opt shape, so one range cannot
    be fast for both 20-token queries and 500-token documents. The long range keeps the token
    budget of the short one at its opt (fewer, longer rows), within the batch span.
    """
    if not seqs:
        raise InvalidInputError("give at least one sequence span, e.g. --seq 8:128:512")
    cut = []
    for seq in seqs:
        if seq.min > max_length:
            raise InvalidInputError(f"sequence span {seq} starts above the model's max length of {max_length} tokens")
        top = min(seq.max, max_length)
        cut.append(Span(seq.min, min(seq.opt, top), top))
    if len(cut) == 1 and split and cut[0].max > 2 * cut[0].opt:
        seq = cut[0]
        long_opt_batch = min(batch.max, max(batch.min, batch.opt * seq.opt // seq.max))
        return (
            ShapeRange(batch=batch, seq=Span(seq.min, seq.opt, seq.opt)),
            ShapeRange(batch=Span(batch.min, long_opt_batch, batch.max), seq=Span(seq.opt + 1, seq.max, seq.max)),
        )
    return tuple(ShapeRange(batch=batch, seq=s) for s in sorted(cut, key=lambda s: (s.min, s.max)))


def default_shape_ranges(max_length: int) -> tuple[ShapeRange, ...]:
    """The shape ranges used when no flags say otherwise."""
    return plan_shape_ranges(DEFAULT_BATCH, (default_seq(max_length),), max_length=max_length)


def envelope(ranges: Sequence[ShapeRange]) -> ShapeRange:
    """One range covering all of `ranges`, tuned at the first one's opt shape."""
    first = ranges[0]

    def span(spans: list[Span], opt: int) -> Span:
        low, high = min(s.min for s in spans), max(s.max for s in spans)
        return Span(low, min(max(opt, low), high), high)

    return ShapeRange(
        batch=span([r.batch for r in ranges], first.batch.opt),
        seq=span([r.seq for r in ranges], first.seq.opt),
    )


def weights_sha256(manifest: Manifest, profile: Profile) -> str | None:
    """The sha256 of the external-data file a profile's graph reads, if it has one."""
    return next((w.sha256 for w in manifest.weights if w.file == profile.weights), None)


def cache_key(
    gpu: GpuInfo, tensorrt_version: str, onnx_sha256: str, weights: str | None, ranges: Sequence[ShapeRange]
) -> str:
    """The sha256 naming one engine: anything that changes the engine changes the key."""
    payload = {
        "format": ENGINE_FORMAT,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt": tensorrt_version,
        "onnx_sha256": onnx_sha256,
        "weights_sha256": weights,
        "shape_ranges": [dataclasses.asdict(r) for r in ranges],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def expected_key(manifest: Manifest, profile: Profile, engine: Engine, gpu: GpuInfo, tensorrt_version: str) -> str:
    """The key `engine` must carry to be valid for `profile` on this GPU and TensorRT version."""
    return cache_key(gpu, tensorrt_version, profile.sha256, weights_sha256(manifest, profile), engine.shape_ranges)


def find_engine(manifest: Manifest, profile: Profile, gpu: GpuInfo, tensorrt_version: str) -> Engine | None:
    """The engine built for this profile on this GPU and TensorRT version from the current graph, if any."""
    for engine in manifest.engines:
        if engine.profile == profile.name and engine.cache_key == expected_key(
            manifest, profile, engine, gpu, tensorrt_version
        ):
            return engine
    return None


def explain_missing(manifest: Manifest, profile: Profile, gpu: GpuInfo, tensorrt_version: str) -> str:
    """Why no engine of the manifest serves this profile here, in one line."""
    here = f"{gpu}, TensorRT {tensorrt_version}"
    others = [e for e in manifest.engines if e.profile == profile.name]
    if not others:
        why = "none was built"
    else:
        reasons = []
        for e in others:
            built_for = GpuInfo(name=e.gpu, compute_capability=e.compute_capability)
            if (built_for, e.tensorrt_version) != (gpu, tensorrt_version):
                reasons.append(f"{e.file} is for {built_for}, TensorRT {e.tensorrt_version}")
            else:
                reasons.append(f"{e.file} is stale (built from another graph, weights or key format)")
        why = "; ".join(reasons)
    return (
        f"no TensorRT engine for profile {profile.name} on this GPU ({here}): {why}. "
        "Build one here with: mrl-export build-engine ARTIFACT"
    )


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """Rows [start, stop) of a batch, run in shape range `range_index`, padded to `seq` tokens."""

    start: int
    stop: int
    range_index: int
    seq: int


def _best_range(ranges: Sequence[ShapeRange], rows: int, seq: int) -> int | None:
    best, best_key = None, None
    for i, r in enumerate(ranges):
        if r.seq.max < seq or r.batch.min > rows:
            continue
        padded = max(seq, r.seq.min)
        # Prefer a range that takes every row, then the least padding, then the tightest range;
        # where none takes every row, the one taking the most rows at once.
        key = (0, padded, r.seq.max, r.batch.max) if rows <= r.batch.max else (1, padded, r.seq.max, -r.batch.max)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def plan_chunks(rows: int, seq: int, ranges: Sequence[ShapeRange]) -> list[Chunk]:
    """Cut a [rows, seq] batch into chunks that each fit one shape range, padding seq up where needed."""
    chunks, start = [], 0
    while start < rows:
        index = _best_range(ranges, rows - start, seq)
        if index is None:
            spans = "; ".join(str(r) for r in ranges)
            raise InvalidInputError(
                f"a batch of {rows - start} texts of {seq} tokens fits none of the engine's shape ranges ({spans}): "
                "rebuild the engine with mrl-export build-engine --batch/--seq covering it"
            )
        r = ranges[index]
        stop = min(rows, start + r.batch.max)
        chunks.append(Chunk(start=start, stop=stop, range_index=index, seq=max(seq, r.seq.min)))
        start = stop
    return chunks


def pad_feed(feed: dict[str, np.ndarray], seq: int, pad_token_id: int) -> dict[str, np.ndarray]:
    """The feed with masked pad tokens appended on the right up to `seq` tokens; the embeddings stay the same.

    Always on the right, whichever side the tokenizer pads: tokens appended after every real token
    move no real token's position (left padding would shift them, which changes the output of
    models with absolute position embeddings, and of cls pooling), and the graph's pooling reads the
    attention mask (last-token pooling takes the last attended position, wherever it is).
    """
    out = {}
    for name, array in feed.items():
        extra = seq - array.shape[1]
        if extra <= 0:
            out[name] = array
            continue
        value = pad_token_id if name == "input_ids" else 0
        out[name] = np.concatenate([array, np.full((array.shape[0], extra), value, dtype=array.dtype)], axis=1)
    return out


def numpy_dtype(trt_dtype: object) -> type[np.generic]:
    """The numpy type of a TensorRT DataType (`DataType.INT64` -> np.int64)."""
    name = str(trt_dtype).rsplit(".", 1)[-1].upper()
    if name not in _NUMPY_DTYPES:
        raise ArtifactError(f"engine tensor type {trt_dtype} is not one this backend feeds or reads")
    return _NUMPY_DTYPES[name]
