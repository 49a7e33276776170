"""ONNX Runtime backend: CPU by default, CUDA or TensorRT providers where onnxruntime-gpu has them.

GPU providers are configured explicitly, never left to defaults:
- TensorRT provider: an engine cache and a timing cache keyed like our own engines (GPU, TensorRT,
  graph, shape ranges), and min/opt/max shapes pinned to the artifact's shape ranges, so it builds
  once and never rebuilds when a batch of a new shape arrives. ONNX Runtime parses several shape
  ranges but runs only the first (onnxruntime PR #31624 is still open), so it gets one range
  covering all of them. `trt_fp16_enable` stays off: with it off, ONNX Runtime builds a strongly
  typed network (since onnxruntime PR #24298), so the precision is the one written in the graph,
  and the LayerNorm, Softmax and normalisation the fp16 graph keeps in fp32 stay in fp32. It has no
  option to turn TF32 off; NVIDIA_TF32_OVERRIDE=0 in the environment does.
- CUDA provider: TF32 off for fp32 graphs (fp32 means fp32: parity is checked against it) and an
  arena that grows by what is asked, not in powers of two, for batches of changing shape.
Every option can be overridden with `cuda_options=` / `trt_options=`.

Where a GPU provider fails to start, ONNX Runtime retries on its own (CUDA and CPU, without our
options) and only prints a banner. So the session's providers and provider options are checked
against what was asked: a named GPU backend refuses to run otherwise, `auto` warns. The libraries
the GPU providers open by name (CUDA, cuDNN, TensorRT from NVIDIA's pip wheels) are loaded first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mrl.runtime.backends.gpu import ORT_GPU_INSTALL, GpuInfo, detect_gpu
from mrl.runtime.engines import cache_key, default_shape_ranges, envelope, weights_sha256
from mrl.runtime.errors import ArtifactError, BackendUnavailableError, InvalidInputError
from mrl.runtime.manifest import OUTPUT_NAME, Manifest, Profile, ShapeRange

log = logging.getLogger(__name__)

TRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_PROVIDERS = (TRT_EP, CUDA_EP)
DEVICES = ("auto", "cpu", "cuda", "tensorrt")
GRAPHS = ("auto", "optimized", "portable")
Provider = str | tuple[str, dict[str, Any]]


def default_providers() -> list[str]:
    """The providers to ask for: every GPU one this onnxruntime build lists, then the CPU."""
    available = ort.get_available_providers()
    return [p for p in GPU_PROVIDERS if p in available] + [CPU_EP]


@dataclass(frozen=True, kw_only=True)
class OrtOptions:
    """The options `Embedder.load(..., backend="onnxruntime", **options)` passes to this backend."""

    providers: Sequence[Provider] | None = None  # an explicit list wins over everything below
    device: str = "auto"  # auto: GPU providers this build has and this machine can use, then CPU
    device_id: int = 0
    cuda_options: dict[str, Any] = field(default_factory=dict)
    trt_options: dict[str, Any] = field(default_factory=dict)
    trt_cache_dir: str | Path | None = None  # default: ARTIFACT/engines/ort-tensorrt
    intra_op_threads: int = 0
    spinning: bool = True
    """Whether idle intra-op threads spin waiting for work: faster for one caller at a time, slower when
    several batches share the cores (spinning threads take the CPU the others need)."""
    graph: str = "auto"
    """On the CPU provider: the profile's ONNX Runtime CPU graph where it has one (auto), always, or never."""
    disabled_optimizers: Sequence[str] | None = None
    """Session fusions to skip; None: `cpu_disabled_optimizers`."""
    stop_spinning: bool = False
    """Whether spinning threads stop as soon as a run returns (they spin again in the next run), so a session
    that runs now and then leaves the cores to others between its runs."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise InvalidInputError(f"unknown onnxruntime device {self.device!r}; choose from {', '.join(DEVICES)}")
        if self.graph not in GRAPHS:
            raise InvalidInputError(f"unknown onnxruntime graph {self.graph!r}; choose from {', '.join(GRAPHS)}")

    @classmethod
    def parse(cls, options: dict[str, Any]) -> OrtOptions:
        """Options from keyword arguments, refusing unknown ones by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            known_list = ", ".join(sorted(known))
            raise InvalidInputError(f"unknown onnxruntime backend option {unknown[0]!r}; known: {known_list}")
        return cls(**options)


def shape_string(inputs: Sequence[str], batch: int, seq: int) -> str:
    """ONNX Runtime's shape syntax for every input: `input_ids:32x128,attention_mask:32x128`."""
    return ",".join(f"{name}:{batch}x{seq}" for name in inputs)


def tensorrt_provider_options(
    inputs: Sequence[str], shape_range: ShapeRange, cache_dir: Path, device_id: int, overrides: dict[str, Any]
) -> dict[str, Any]:
    """TensorRT provider options: caches on, shapes pinned to `shape_range`, precision from the graph."""
    b, s = shape_range.batch, shape_range.seq
    return {
        "device_id": device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": False,  # strongly typed: the graph's own casts decide (module docstring)
        "trt_profile_min_shapes": shape_string(inputs, b.min, s.min),
        "trt_profile_opt_shapes": shape_string(inputs, b.opt, s.opt),
        "trt_profile_max_shapes": shape_string(inputs, b.max, s.max),
        **overrides,
    }


def cuda_provider_options(precision: str, device_id: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """CUDA provider options: TF32 only where the graph is not fp32, a shape-friendly arena."""
    return {
        "device_id": device_id,
        "use_tf32": 0 if precision == "fp32" else 1,
        "arena_extend_strategy": "kSameAsRequested",
        **overrides,
    }


def installed_tensorrt_version() -> str | None:
    """The version of the pip-installed TensorRT, read from package metadata (libnvinfer is not loaded)."""
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_libs"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def shape_ranges_for(manifest: Manifest, profile: Profile) -> tuple[ShapeRange, ...]:
    """The ranges built engines of this profile use, else the defaults for the model's max length."""
    built = next((e.shape_ranges for e in manifest.engines if e.profile == profile.name), None)
    return built or default_shape_ranges(manifest.tokenizer.max_length)


def tensorrt_cache_dir(
    root: Path, manifest: Manifest, profile: Profile, shape_range: ShapeRange, gpu: GpuInfo | None
) -> Path:
    """Where ONNX Runtime keeps this profile's TensorRT engine: one folder per GPU, TensorRT, graph and range."""
    version = f"{installed_tensorrt_version() or 'unknown'}+onnxruntime-{ort.__version__}"
    gpu = gpu or GpuInfo(name="unknown-gpu", compute_capability="0.0")
    key = cache_key(gpu, version, profile.sha256, weights_sha256(manifest, profile), [shape_range])
    return root / gpu.slug / f"{profile.name}-{key[:16]}"


def plan_providers(directory: Path, manifest: Manifest, profile: Profile, options: OrtOptions) -> list[Provider]:
    """The providers, each with explicit options, for `options.device` on this machine."""
    if options.providers:
        return list(options.providers)
    if options.device == "cpu":
        return [CPU_EP]
    available = ort.get_available_providers()
    if options.device == "auto" and not any(p in available for p in GPU_PROVIDERS):
        return [CPU_EP]
    gpu, how = detect_gpu(options.device_id)
    wanted = {"cuda": [CUDA_EP], "tensorrt": [TRT_EP, CUDA_EP]}.get(options.device, list(GPU_PROVIDERS))
    if options.device == "auto":
        # onnxruntime-gpu lists its GPU providers even where no GPU or TensorRT is present.
        if gpu is None:
            log.info("onnxruntime: no GPU here (%s): CPU provider", how)
            return [CPU_EP]
        wanted = [p for p in wanted if p in available and (p != TRT_EP or installed_tensorrt_version())]
    providers: list[Provider] = []
    for name in wanted:
        if name == TRT_EP:
            shape_range = envelope(shape_ranges_for(manifest, profile))
            root = Path(options.trt_cache_dir or Path(directory) / "engines" / "ort-tensorrt")
            cache = tensorrt_cache_dir(root, manifest, profile, shape_range, gpu)
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ArtifactError(
                    f"cannot create the TensorRT cache {cache} ({e.strerror}): pass trt_cache_dir="
                ) from None
            inputs = manifest.tokenizer.inputs
            trt = tensorrt_provider_options(inputs, shape_range, cache, options.device_id, options.trt_options)
            providers.append((TRT_EP, trt))
        else:
            cuda = cuda_provider_options(profile.precision, options.device_id, options.cuda_options)
            providers.append((CUDA_EP, cuda))
    return [*providers, CPU_EP]


def choose_graph(profile: Profile, providers: Sequence[Provider], want: str) -> tuple[str, str]:
    """The graph file to run and why: the ONNX Runtime CPU graph on the CPU provider alone, else the portable one."""
    if want == "portable":
        return profile.file, "the portable graph, as asked"
    if profile.ort_cpu is None:
        if want == "optimized":
            raise ArtifactError(
                f"profile {profile.name} has no ONNX Runtime CPU graph (mrl-export --ort-cpu optimized writes "
                "one); use graph='auto' or 'portable'"
            )
        return profile.file, "the portable graph: the artifact has no ONNX Runtime CPU graph for it"
    if [_provider_name(p) for p in providers] != [CPU_EP]:
        if want == "optimized":
            raise InvalidInputError(f"the ONNX Runtime CPU graph of {profile.name} runs on the CPU provider only")
        return profile.file, "the portable graph: the ONNX Runtime CPU graph is for the CPU provider only"
    return profile.ort_cpu.file, "the fused ONNX Runtime CPU graph, on the CPU provider"


def cpu_disabled_optimizers(providers: Sequence[Provider]) -> list[str]:
    """Session-level fusions to leave out on the CPU provider: SkipLayerNormalization is slower there.

    Measured with onnxruntime 1.32 (BENCHMARKS.md): its CPU SkipLayerNormalization took 650 us on a
    [32, 21, 384] input where Add + LayerNormalization took 180-300 us.
    """
    return ["SkipLayerNormFusion"] if [_provider_name(p) for p in providers] == [CPU_EP] else []


class OnnxRuntimeBackend:
    """One InferenceSession over one profile graph."""

    name = "onnxruntime"

    def __init__(
        self,
        graph: Path,
        providers: Sequence[Provider] | None = None,
        intra_op_threads: int = 0,
        strict: bool = False,
        spinning: bool = True,
        disabled_optimizers: Sequence[str] | None = None,
        stop_spinning: bool = False,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.add_session_config_entry("session.force_spinning_stop", "1" if stop_spinning else "0")
        requested = list(providers) if providers else default_providers()
        unknown = [p for p in requested if _provider_name(p) not in ort.get_available_providers()]
        if unknown:
            raise BackendUnavailableError(
                f"onnxruntime here has no {', '.join(map(_provider_name, unknown))}; it has "
                f"{', '.join(ort.get_available_providers())}{wheels_note()}. For GPUs: {ORT_GPU_INSTALL}"
            )
        wanted = [_provider_name(p) for p in requested]
        if any(p in GPU_PROVIDERS for p in wanted):
            preload_gpu_libraries(TRT_EP in wanted)
        if disabled_optimizers is None:
            disabled_optimizers = cpu_disabled_optimizers(requested)
        self._session = open_session(graph, options, requested, strict, disabled_optimizers)
        self.session_options = options
        """The options the session was opened with (threads, spinning, ...)."""
        self.providers = self._session.get_providers()
        self.graph = Path(graph)
        self.device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        problems = fallback_problems(requested, self.providers, self._session.get_provider_options())
        if problems:
            message = f"onnxruntime did not start the providers as asked ({'; '.join(problems)}){wheels_note()}"
            if strict:  # an explicit device was asked for: running elsewhere or otherwise would hide it
                raise BackendUnavailableError(
                    f"{message}. Check the GPU and driver; for the GPU runtime: {ORT_GPU_INSTALL}"
                )
            log.warning("%s; running on %s", message, ", ".join(self.providers))
        self._inputs = [i.name for i in self._session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Embed one padded batch."""
        (out,) = self._session.run([OUTPUT_NAME], {k: feed[k] for k in self._inputs})
        return np.asarray(out, dtype=np.float32)

    def warmup(self) -> None:
        """One tiny batch so allocators and kernels are ready."""
        feed = {k: np.ones((1, 4), dtype=np.int64) for k in self._inputs}
        if "token_type_ids" in feed:
            feed["token_type_ids"][:] = 0
        self.run(feed)

    def close(self) -> None:
        """Drop the session."""
        self._session = None


def open_session(
    graph: Path, options: Any, providers: list[Provider], strict: bool, disabled_optimizers: Sequence[str] = ()
) -> Any:
    """An InferenceSession whose providers never change behind our back once it exists.

    `strict`: no retry on other providers at creation either (ONNX Runtime's `enable_fallback`),
    so the provider's own error is what the caller sees.
    """
    retry = {"enable_fallback": 0} if strict else {}
    skip = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    try:
        session = ort.InferenceSession(str(graph), options, providers=providers, **retry, **skip)
    except Exception as e:  # onnxruntime raises its own untyped errors for unreadable graphs and failed providers
        names = [_provider_name(p) for p in providers]
        if strict and any(p in GPU_PROVIDERS for p in names):
            raise BackendUnavailableError(f"onnxruntime cannot start {', '.join(names)} for {graph}: {e}") from None
        raise ArtifactError(f"onnxruntime cannot load {graph}: {e}") from None
    # At run time ONNX Runtime would re-create the session on other providers after a provider error.
    session.disable_fallback()
    return session


def _option_text(value: Any) -> str:
    """An option value as ONNX Runtime reports it back: strings, with booleans as 0/1."""
    if isinstance(value, bool):
        return "1" if value else "0"
    text = str(value)
    return {"true": "1", "false": "0"}.get(text.lower(), text)


def fallback_problems(
    requested: Sequence[Provider], running: Sequence[str], applied: dict[str, dict[str, Any]]
) -> list[str]:
    """How the session differs from what was asked: another first provider, or provider options not applied.

    ONNX Runtime's retry after a provider error keeps CUDA first but drops every option, so the
    first provider alone says nothing; `applied` is `session.get_provider_options()`. Keys a provider
    does not report are not judged.
    """
    problems = []
    first = _provider_name(requested[0]) if requested else None
    if first is not None and (not running or running[0] != first):
        problems.append(f"asked for {first} first, runs on {running[0] if running else 'nothing'}")
    for provider in requested:
        if isinstance(provider, str) or provider[0] not in running:
            continue
        name, asked = provider
        got = applied.get(name, {})
        for key, value in asked.items():
            if key in got and _option_text(got[key]) != _option_text(value):
                problems.append(f"{name} {key} is {got[key]!r}, asked {value!r}")
    return problems


@functools.cache
def preload_gpu_libraries(tensorrt: bool) -> tuple[str, ...]:
    """Load the libraries ONNX Runtime's GPU providers open by name; returns what could not be loaded.

    `onnxruntime.preload_dlls()` loads CUDA and cuDNN from NVIDIA's pip wheels (the plain
    onnxruntime-gpu wheel does not find them on its own), and `import tensorrt` loads libnvinfer
    from the tensorrt wheel, where the TensorRT provider's `dlopen("libnvinfer.so.10")` then finds
    it. Done once per process, before the first GPU session, by every path that makes one.
    """
    notes = []
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):  # it prints, rather than raises, what it cannot load
                preload()
        except Exception as e:
            notes.append(f"onnxruntime.preload_dlls failed: {e}")
        notes += [line for line in printed.getvalue().splitlines() if line.strip()]
    if tensorrt:
        try:
            import tensorrt
        except (ImportError, OSError) as e:
            notes.append(f"tensorrt does not import ({e}): the TensorRT provider will not find libnvinfer")
    for note in notes:
        log.warning("GPU libraries: %s", note)
    return tuple(notes)


def installed_onnxruntime_wheels() -> list[str]:
    """The ONNX Runtime distributions installed here; two of them overwrite each other's files."""
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{dist} {importlib.metadata.version(dist)}")
    return found


def wheels_note() -> str:
    """What to append to a provider error when both onnxruntime wheels are installed ("" when one is)."""
    wheels = installed_onnxruntime_wheels()
    if len(wheels) < 2:
        return ""
    return f" (both {' and '.join(wheels)} are installed and overwrite each other: keep one)"


def _provider_name(p: Provider) -> str:
    return p if isinstance(p, str) else p[0]


def create(directory: Path, manifest: Manifest, profile: Profile, **options: Any) -> OnnxRuntimeBackend:
    """Registry factory: a session over the profile's graph with explicitly configured providers."""
    parsed = OrtOptions.parse(options)
    providers = plan_providers(Path(directory), manifest, profile, parsed)
    strict = parsed.device in ("cuda", "tensorrt") and not parsed.providers
    file, why = choose_graph(profile, providers, parsed.graph)
    log.info("onnxruntime: %s runs %s: %s", profile.name, file, why)
    return OnnxRuntimeBackend(
        directory / file,
        providers,
        parsed.intra_op_threads,
        strict,
        spinning=parsed.spinning,
        disabled_optimizers=parsed.disabled_optimizers,
        stop_spinning=parsed.stop_spinning,
    )


def create_cpu(directory: Path, manifest: Manifest, profile: Profile, **options: Any) -> OnnxRuntimeBackend:
    """Registry factory for "onnxruntime-cpu"."""
    return create(directory, manifest, profile, **{**options, "device": "cpu"})


def create_cuda(directory: Path, manifest: Manifest, profile: Profile, **options: Any) -> OnnxRuntimeBackend:
    """Registry factory for "onnxruntime-cuda": the CUDA provider or an error, never a silent CPU fallback."""
    return create(directory, manifest, profile, **{**options, "device": "cuda"})


def create_tensorrt(directory: Path, manifest: Manifest, profile: Profile, **options: Any) -> OnnxRuntimeBackend:
    """Registry factory for "onnxruntime-tensorrt": ONNX Runtime's TensorRT provider, CUDA for the rest."""
    return create(directory, manifest, profile, **{**options, "device": "tensorrt"})
