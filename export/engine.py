"""TensorRT engine builds, run on the deployment GPU: one engine per profile, checked and listed.

The build reads as data flow, per profile:

    cache key (GPU, TensorRT, graph and weights sha256, shape ranges)
      -> an engine with that key already here? keep it
      -> parse the profile's ONNX graph (strongly typed: precision comes from the graph)
      -> builder config (shape ranges, timing cache, TF32 off for fp32)
      -> serialised engine -> engines/<profile>-<key>.engine
      -> parity against ONNX Runtime CPU on the validation texts, same thresholds as export
      -> manifest entry
    and once at the end: the manifest, saved atomically.

A timing cache per GPU and TensorRT version lives in `ARTIFACT/engines/`, beside a build log
holding what TensorRT said. TensorRT and cuda-python are imported only when a build starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from mrl.export import parity
from mrl.export.errors import ExportError, ParityError
from mrl.runtime.backends.gpu import GpuInfo, cuda_check, cuda_runtime, current_gpu
from mrl.runtime.backends.tensorrt import TensorRtBackend, import_tensorrt
from mrl.runtime.engines import DEFAULT_BATCH, cache_key, default_seq, plan_shape_ranges, weights_sha256
from mrl.runtime.errors import InvalidInputError, NotFoundError
from mrl.runtime.manifest import Engine, Manifest, Parity, Profile, ShapeRange, Span, sha256_file
from mrl.runtime.tokenize import TextTokenizer

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
ENGINE_DIR = "engines"
BUILDABLE = ("fp32", "fp16")
INT8_REASON = (
    "int8 profiles are ONNX Runtime dynamic quantisation (DynamicQuantizeLinear + MatMulInteger), which "
    "TensorRT does not take (its int8 is explicit Q/DQ): build the fp32 or fp16 profiles, serve int8 on a CPU"
)


@dataclass(frozen=True, kw_only=True)
class EngineBuildOptions:
    """What `mrl-export build-engine` builds: which profiles, for which shape ranges, how."""

    batch: Span = DEFAULT_BATCH
    seqs: tuple[Span, ...] = ()  # empty: any length up to the model's max, tuned at 128
    split: bool = True
    profiles: tuple[str, ...] = ()  # empty: every fp32 and fp16 profile
    force: bool = False
    validate: bool = True
    device_id: int = 0
    workspace_gib: float | None = None


@dataclass(frozen=True, kw_only=True)
class BuildResult:
    """What happened to one profile: "built", "up to date" or "failed parity", and its entry."""

    profile: str
    status: str
    engine: Engine | None
    seconds: float = 0.0


def parse_span(text: str, what: str) -> Span:
    """`MIN:OPT:MAX` (or a single N, meaning N:N:N) as a Span, with a message that says what is wrong."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise InvalidInputError(f"{what} must be MIN:OPT:MAX (e.g. 1:32:128), got {text!r}")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InvalidInputError(f"{what} must be whole numbers MIN:OPT:MAX, got {text!r}") from None
    try:
        return Span(*values)
    except ValueError as e:
        raise InvalidInputError(f"{what} {text!r}: {e}") from None


def plan_for(manifest: Manifest, options: EngineBuildOptions) -> tuple[ShapeRange, ...]:
    """The shape ranges for this artifact: the flags', else defaults from the model's max length."""
    max_length = manifest.tokenizer.max_length
    seqs = options.seqs or (default_seq(max_length),)
    return plan_shape_ranges(options.batch, seqs, max_length=max_length, split=options.split)


def buildable_profiles(manifest: Manifest, names: Sequence[str]) -> list[Profile]:
    """The profiles to build: the named ones (refusing int8 with the reason), else every fp32/fp16 one."""
    by_name = {p.name: p for p in manifest.profiles}
    if not names:
        chosen = [p for p in manifest.profiles if p.precision in BUILDABLE]
        if not chosen:
            raise ExportError(f"this artifact has no fp32 or fp16 profile to build: {INT8_REASON}")
        return chosen
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise NotFoundError(f"no profile {unknown[0]!r} in this artifact; it has: {', '.join(by_name)}")
    int8 = [n for n in names if by_name[n].precision not in BUILDABLE]
    if int8:
        raise ExportError(f"cannot build {', '.join(int8)}: {INT8_REASON}")
    return [by_name[n] for n in names]


def engine_name(profile: Profile, key: str) -> str:
    """The engine's path inside the artifact: one file per profile and key."""
    return f"{ENGINE_DIR}/{profile.name}-{key[:16]}.engine"


def timing_cache_path(directory: Path, gpu: GpuInfo, tensorrt_version: str) -> Path:
    """The timing cache for this GPU and TensorRT version (timings do not carry across either)."""
    return Path(directory) / ENGINE_DIR / f"timing-{gpu.slug}-trt{tensorrt_version}.cache"


def current_entry(directory: Path, manifest: Manifest, profile: Profile, key: str) -> Engine | None:
    """The listed engine with this key whose file is present and intact, if any."""
    for e in manifest.engines:
        if e.profile == profile.name and e.cache_key == key:
            path = Path(directory) / e.file
            if path.is_file() and sha256_file(path) == e.sha256:
                return e
    return None


def merge_engine(engines: Sequence[Engine], new: Engine) -> tuple[tuple[Engine, ...], list[str]]:
    """The manifest's engines with `new` replacing any for the same profile, GPU and TensorRT; and the files dropped."""
    same = (new.profile, new.gpu, new.compute_capability, new.tensorrt_version)
    kept = [e for e in engines if (e.profile, e.gpu, e.compute_capability, e.tensorrt_version) != same]
    dropped = [e.file for e in engines if e not in kept and e.file != new.file]
    return (*kept, new), dropped


def _file_logger(trt: ModuleType, log_path: Path) -> Any:
    """A TensorRT logger writing everything at INFO and above to the build log, warnings also to ours."""

    class BuildLog(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the build

        def log(self, severity: Any, msg: str) -> None:
            # Lower is more severe: INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4.
            if int(severity) <= int(trt.ILogger.Severity.INFO):
                self.file.write(f"{time.strftime('%H:%M:%S')} {getattr(severity, 'name', severity)} {msg}\n")
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)

    return BuildLog()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def serialize_engine(
    trt: ModuleType,
    logger: Any,
    graph: Path,
    ranges: Sequence[ShapeRange],
    precision: str,
    timing: Path,
    workspace_gib: float | None = None,
) -> tuple[bytes, str]:
    """Parse `graph`, build an engine for `ranges`, update the timing cache; the bytes and the input type."""
    builder = trt.Builder(logger)
    # Required for strong typing on TensorRT 10; accepted and ignored by 11, where it is always on.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):  # from the file, so external weights resolve beside it
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {graph.name}: {errors}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    config = builder.create_builder_config()
    for r in ranges:
        shape_range = builder.create_optimization_profile()
        for tensor in inputs:
            shape_range.set_shape(
                tensor.name, (r.batch.min, r.seq.min), (r.batch.opt, r.seq.opt), (r.batch.max, r.seq.max)
            )
        config.add_optimization_profile(shape_range)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: parity holds it to 0.9999
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    use_timing_cache(config, timing)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {graph.name}: see {ENGINE_DIR}/build.log")
    _atomic_write(timing, bytes(config.get_timing_cache().serialize()))
    input_dtype = str(inputs[0].dtype).rsplit(".", 1)[-1].lower() if inputs else "int64"
    return bytes(serialized), input_dtype


def use_timing_cache(config: Any, path: Path) -> bool:
    """Give the builder config the timing cache at `path`; an empty one where it is missing, unreadable or foreign.

    Returns whether the saved cache was used. TensorRT returns None for bytes it cannot parse (and
    `set_timing_cache(None)` is then a TypeError) or refuses a cache from another GPU or version:
    either way the build goes on with an empty cache, which only costs time.
    """
    try:
        data = path.read_bytes() if path.is_file() else b""
        cache = config.create_timing_cache(data) if data else None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return True
        if data:
            log.warning("the timing cache %s is unreadable or for another GPU or TensorRT; starting an empty one", path)
    except (OSError, TypeError, RuntimeError, ValueError) as e:
        log.warning("the timing cache %s cannot be used (%s); starting an empty one", path, e)
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return False


def _embed(backend: Any, tokenizer: TextTokenizer, texts: list[str], batch_size: int = 8) -> np.ndarray:
    encoded = tokenizer.encode(texts, truncate=True)
    parts = [backend.run(tokenizer.pad(encoded[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts)


@dataclass(frozen=True, kw_only=True)
class _Build:
    """What every profile's build shares: TensorRT, the GPU, the shape ranges, caches and log."""

    trt: ModuleType
    gpu: GpuInfo
    ranges: tuple[ShapeRange, ...]
    timing: Path
    logger: Any


def engine_parity(
    directory: Path, manifest: Manifest, profile: Profile, engine: Engine, path: Path, device_id: int
) -> Parity:
    """The engine at `path` against ONNX Runtime CPU on the validation texts, cut to what the engine takes."""
    longest = max(r.seq.max for r in engine.shape_ranges)
    settings = dataclasses.replace(manifest.tokenizer, max_length=min(manifest.tokenizer.max_length, longest))
    tokenizer = TextTokenizer.load(directory, settings)
    texts = parity.validation_texts()
    reference = parity.embed_graph(directory / profile.file, tokenizer, texts)
    backend = TensorRtBackend(path, engine, manifest.tokenizer, device_id)
    try:
        candidate = _embed(backend, tokenizer, texts)
    finally:
        backend.close()
    return parity.compare(candidate, reference, profile.dims, profile.precision, "onnxruntime-cpu")


def _build_profile(
    directory: Path, manifest: Manifest, profile: Profile, build: _Build, options: EngineBuildOptions
) -> BuildResult:
    weights = weights_sha256(manifest, profile)
    key = cache_key(build.gpu, build.trt.__version__, profile.sha256, weights, build.ranges)
    kept = None if options.force else current_entry(directory, manifest, profile, key)
    if kept is not None:
        return BuildResult(profile=profile.name, status="up to date", engine=kept)
    start = time.monotonic()
    graph = directory / profile.file
    data, input_dtype = serialize_engine(
        build.trt, build.logger, graph, build.ranges, profile.precision, build.timing, options.workspace_gib
    )
    name = engine_name(profile, key)
    # Written beside its final name and moved there only once it passes: a listed engine is never replaced by a bad one.
    staged = directory / f"{name}.new"
    _atomic_write(staged, data)
    engine = Engine(
        profile=profile.name,
        file=name,
        sha256=sha256_file(staged),
        cache_key=key,
        gpu=build.gpu.name,
        compute_capability=build.gpu.compute_capability,
        tensorrt_version=build.trt.__version__,
        onnx_sha256=profile.sha256,
        weights_sha256=weights,
        shape_ranges=build.ranges,
        input_dtype=input_dtype,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(time.monotonic() - start, 2),
    )
    if options.validate:
        result = engine_parity(directory, manifest, profile, engine, staged, options.device_id)
        engine = dataclasses.replace(engine, parity=result)
    if engine.parity is not None and not engine.parity.passed:
        staged.unlink(missing_ok=True)
        return BuildResult(profile=profile.name, status="failed parity", engine=engine, seconds=engine.build_seconds)
    os.replace(staged, directory / name)
    return BuildResult(profile=profile.name, status="built", engine=engine, seconds=engine.build_seconds)


def build_engines(
    directory: Path, manifest: Manifest, options: EngineBuildOptions, progress: Progress = lambda _: None
) -> tuple[Manifest, list[BuildResult]]:
    """Build (or keep) an engine per profile on this GPU, list them in the manifest, and save it."""
    directory = Path(directory)
    profiles = buildable_profiles(manifest, options.profiles)
    ranges = plan_for(manifest, options)
    trt = import_tensorrt()
    gpu = current_gpu(options.device_id)
    cudart = cuda_runtime()
    cuda_check(cudart, cudart.cudaSetDevice(options.device_id), "cudaSetDevice")
    (directory / ENGINE_DIR).mkdir(exist_ok=True)
    log_path = directory / ENGINE_DIR / "build.log"
    summary = f"{gpu}, TensorRT {trt.__version__}; shape ranges: {'; '.join(map(str, ranges))}"
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(
            f"\n== {time.strftime('%Y-%m-%dT%H:%M:%S')} {summary}; profiles {', '.join(p.name for p in profiles)}\n"
        )
    progress(summary)
    build = _Build(
        trt=trt,
        gpu=gpu,
        ranges=ranges,
        timing=timing_cache_path(directory, gpu, trt.__version__),
        logger=_file_logger(trt, log_path),
    )
    results = []
    try:
        for profile in profiles:
            progress(f"engine for {profile.name}")
            result = _build_profile(directory, manifest, profile, build, options)
            results.append(result)
            progress(f"{profile.name}: {result.status}")
            if result.status == "failed parity":
                continue  # never listed, so never loaded
            engines, dropped = merge_engine(manifest.engines, result.engine)
            manifest = dataclasses.replace(manifest, engines=engines)
            for name in dropped:
                (directory / name).unlink(missing_ok=True)
    finally:
        build.logger.file.close()
        manifest.save(directory)  # whatever was built before a failure stays listed
    failed = [r for r in results if r.status == "failed parity"]
    if failed:
        raise ParityError("; ".join(_failure(r.engine) for r in failed) + " (the other engines were kept)")
    return manifest, results


def _failure(engine: Engine) -> str:
    par = engine.parity
    return (
        f"engine for {engine.profile} failed parity against ONNX Runtime CPU: min cosine {par.min_cosine:.6f}, "
        f"mean {par.mean_cosine:.6f} (needs {par.threshold})"
    )
