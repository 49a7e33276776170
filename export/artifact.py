"""Write an artifact: tokenizer, one graph per profile over shared weights, parity, manifest; atomically."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import mrl
from mrl.export import graph, ortopt, parity, precision
from mrl.export.acceptance import acceptance_test
from mrl.export.calibrate import CalibrationTexts, calibrate
from mrl.export.errors import ExportError
from mrl.export.layers import LAYER_LOSSES, reference_embeddings
from mrl.export.profiles import Builder
from mrl.export.source_model import SourceModel
from mrl.runtime.errors import DimsError, LayersError
from mrl.runtime.manifest import (
    PRECISIONS,
    Manifest,
    TokenizerSettings,
    WeightsFile,
    sha256_file,
)
from mrl.runtime.tokenize import TextTokenizer

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
# Precisions ONNX Runtime runs on a CPU; fp16 is for GPUs.
CPU_PRECISIONS = ("fp32", "int8")
# Where the fused graph was measured to pay on ONNX Runtime's CPU provider (BENCHMARKS.md): at
# batch 1 and in padded batch-32 batches, and within noise (-4 % to +3.5 % over four runs for
# int8) at length-sorted batch 32.
AUTO_ORT_CPU = ("fp32", "int8")
ORT_CPU_MODES = ("auto", "optimized", "portable")


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """What to export: the dims and precisions of the profiles, and how."""

    dims: tuple[int, ...]
    precisions: tuple[str, ...] = ("fp32",)
    layers: tuple[int, ...] | None = None  # depths to export (None: the full depth only)
    exporter: str = "auto"
    validate: bool = True
    force: bool = False
    calibration: CalibrationTexts | None = None
    """Texts whose value ranges int8/uint8 outputs use (None: the validation texts)."""
    ort_cpu: str = "auto"
    """ONNX Runtime CPU graphs beside the portable ones: "auto" for the precisions where they were
    measured to pay (AUTO_ORT_CPU), "optimized" for every CPU precision, "portable" for none."""

    def __post_init__(self) -> None:
        if not self.dims:
            raise DimsError("give at least one dims value, e.g. --dims 256")
        for d in self.dims:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise DimsError(f"dims must be positive integers, not {d!r}")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise ExportError(
                f"unknown precision {unknown[0] if unknown else ''!r}; choose from {', '.join(PRECISIONS)}"
            )
        for n in self.layers or ():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise LayersError(f"layers must be positive integers, not {n!r}")
        if self.layers is not None and not self.layers:
            raise LayersError("give at least one layers value, e.g. --layers 3,6")
        if self.exporter not in graph.EXPORTERS:
            raise ExportError(f"unknown exporter {self.exporter!r}; choose from {', '.join(graph.EXPORTERS)}")
        if self.ort_cpu not in ORT_CPU_MODES:
            raise ExportError(f"unknown --ort-cpu {self.ort_cpu!r}; choose from {', '.join(ORT_CPU_MODES)}")

    def ort_cpu_precisions(self) -> tuple[str, ...]:
        """The precisions that get an ONNX Runtime CPU graph beside the portable one."""
        wanted = {"auto": AUTO_ORT_CPU, "optimized": CPU_PRECISIONS, "portable": ()}[self.ort_cpu]
        return tuple(p for p in self.precisions if p in wanted)


def check_dims(source: SourceModel, dims: tuple[int, ...]) -> None:
    """Refuse dims above the model's width; warn on dims it was not trained for."""
    for d in dims:
        if d > source.full_dims:
            raise DimsError(f"dims {d} is above the model's output width {source.full_dims}")
    if source.trained_dims:
        untrained = [d for d in dims if d not in source.trained_dims]
        if untrained:
            log.warning(
                "dims %s not among the dims the model was trained for (%s): quality may drop sharply",
                ",".join(map(str, untrained)),
                ",".join(map(str, source.trained_dims)),
            )


def plan_depths(source: SourceModel, layers: tuple[int, ...] | None) -> list[int | None]:
    """The depths to export, deepest first (None: full depth); refuse depths the model lacks, warn on untrained ones."""
    total = source.total_layers
    if layers is None or set(layers) == {total}:
        return [None]
    if source.kind == "onnx":
        raise LayersError(
            "--layers cannot cut an existing ONNX encoder: its graph marks no layer boundaries that could be cut "
            "soundly (exporters name and fuse nodes differently); export the PyTorch model (its "
            "sentence-transformers or transformers directory) instead"
        )
    if total is None:
        raise LayersError("the model's config does not say how many layers it has, so --layers cannot cut it")
    above = [n for n in layers if n > total]
    if above:
        raise LayersError(f"layers {above[0]} is above the model's {total} layers")
    cut = sorted({n for n in layers if n < total}, reverse=True)
    if source.trained_layers is None:
        log.warning(
            "the model card records no %s, so layers %s were probably never trained to be used alone: quality may "
            "drop sharply (--trained-layers says which depths the model was trained for)",
            " or ".join(LAYER_LOSSES),
            ",".join(map(str, cut)),
        )
    elif untrained := [n for n in cut if n not in source.trained_layers]:
        log.warning(
            "layers %s not among the depths the model was trained for (%s): quality may drop sharply",
            ",".join(map(str, untrained)),
            ",".join(map(str, source.trained_layers)),
        )
    return ([None] if total in layers else []) + cut


def prepare_output(out: Path, force: bool) -> Path:
    """Check the output path and create a temporary sibling directory to write into."""
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write to {parent}: {e.strerror}") from None


def user_modes() -> tuple[int, int]:
    """(directory mode, file mode) that this process's umask gives new directories and files."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask, 0o666 & ~umask


def readable_by_others(root: Path) -> None:
    """Give `root` and everything under it the modes the umask gives, as if a user had made them.

    mkdtemp made the directory private, and files placed by copy or link keep their source's mode; an output
    is read by other users (a serving account, a Triton image running as uid 65534), and a directory they
    cannot search hides its files from them whatever those files' modes.
    """
    directory_mode, file_mode = user_modes()
    root.chmod(directory_mode)
    for parent, directories, files in os.walk(root):
        for name in directories:
            Path(parent, name).chmod(directory_mode)
        for name in files:
            Path(parent, name).chmod(file_mode)


def publish(tmp: Path, out: Path) -> None:
    """Move a finished output directory into place, replacing an old one only once the new one is whole."""
    readable_by_others(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.replace(old / "artifact")
        tmp.replace(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.replace(out)


@dataclass(frozen=True, kw_only=True)
class _Job:
    """What every step of one export shares."""

    source: SourceModel
    tokenizer: TextTokenizer
    texts: list[str]
    workdir: Path
    progress: Progress


def _pooled_fp32(
    job: _Job, exporter: str, reference: np.ndarray | None, layers: int | None
) -> tuple[onnx.ModelProto, str]:
    """The fp32 pooled graph at a depth; with exporter "auto", the first exporter whose graph passes parity."""
    source = job.source
    if source.kind == "onnx":
        from mrl.export.onnx_source import pooled_graph

        return pooled_graph(source), "onnx-graph-edit"
    candidates = ["legacy", "dynamo"] if exporter == "auto" else [exporter]
    failures = []
    for name in candidates:
        job.progress(f"exporting {_depth_text(layers)} with the {name} exporter")
        try:
            model = graph.export_pooled_encoder(source.st_model, source.inputs, name, job.workdir, layers)
        except Exception as e:  # exporters fail in many untyped ways; the next one may succeed
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if reference is None:
            return model, name
        probe = job.workdir / f"probe-{name}-{layers}.onnx"
        onnx.save_model(graph.append_mrl_head(model, source.full_dims), str(probe), save_as_external_data=True)
        result = parity.compare(
            parity.embed_graph(probe, job.tokenizer, job.texts), reference, source.full_dims, "fp32", "probe"
        )
        if result.passed:
            return model, name
        failures.append(f"{name}: parity min cosine {result.min_cosine:.6f}")
    raise ExportError(f"no exporter produced a matching graph at {_depth_text(layers)}: " + "; ".join(failures))


def _depth_text(layers: int | None) -> str:
    return "full depth" if layers is None else f"{layers} layers"


def export_artifact(
    source: SourceModel, out: Path, options: ExportOptions, progress: Progress = lambda _: None
) -> Manifest:
    """Export `source` to the artifact directory `out` and return its manifest."""
    check_dims(source, options.dims)
    depths = plan_depths(source, options.layers)  # refuse bad layers before any work
    out = Path(out).absolute()
    tmp = prepare_output(out, options.force)
    try:
        manifest = _write_artifact(source, tmp, options, depths, progress)
        publish(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_artifact(
    source: SourceModel, tmp: Path, options: ExportOptions, depths: list[int | None], progress: Progress
) -> Manifest:
    tokenizer_file = tmp / TokenizerSettings.file
    tokenizer_file.write_text(source.tokenizer_json)
    settings = TokenizerSettings(
        sha256=sha256_file(tokenizer_file),
        max_length=source.max_length,
        padding_side=source.padding_side,
        pad_token_id=source.pad_token_id,
        pad_token=source.pad_token,
        inputs=source.inputs,
    )
    job = _Job(
        source=source,
        tokenizer=TextTokenizer.load(tmp, settings),
        texts=parity.validation_texts(),
        workdir=Path(tempfile.mkdtemp(prefix="work-", dir=tmp)),
        progress=progress,
    )
    precisions = list(dict.fromkeys(options.precisions))
    dims = sorted(set(options.dims), reverse=True)
    shared: dict[str, graph.SharedWeights] = {}  # one weights file per precision and graph kind, all depths

    def externalise(model: onnx.ModelProto, prec: str, suffix: str) -> onnx.ModelProto:
        name = f"weights-{prec}{suffix}.bin"
        if name not in shared:
            shared[name] = graph.SharedWeights(tmp / name)
        return shared[name].externalise(model)

    profiles, exporters, choices, quantization = [], [], {}, None
    references = {}  # depth -> the source model's vectors of the validation texts, for the acceptance test
    for depth in depths:
        reference = None
        if options.validate:
            progress(f"computing reference embeddings at {_depth_text(depth)} for {len(job.texts)} validation texts")
            reference = references[depth] = _reference(source, job.texts, depth)
        fp32, exporter = _pooled_fp32(job, options.exporter, reference, depth)
        exporters.append(exporter)
        fp32 = precision.name_nodes(fp32)
        build = Builder(tmp, job.workdir, job.tokenizer, job.texts, reference, source, progress, layers=depth)
        optimized: ortopt.Optimized | None = None
        for prec in precisions:
            progress(f"converting {_depth_text(depth)} to {prec}")
            portable, quant = build.portable(fp32, prec)
            quantization = quantization or quant  # the deepest graph's: depths come deepest first
            bases = {"": externalise(portable, prec, "")}
            if prec in options.ort_cpu_precisions():
                optimized = optimized or build.optimize(fp32, strict=options.ort_cpu == "optimized")
                cpu_graph, choice = build.ort_cpu(optimized, prec)
                # One choice per precision: "optimized" only where every depth's fused graph held parity.
                if prec not in choices or choice.graph == "portable":
                    choices[prec] = choice
                if cpu_graph is not None:
                    bases[".ort-cpu"] = externalise(cpu_graph, prec, ".ort-cpu")
            profiles += [build.profile(bases, d, prec) for d in dims]
    shutil.rmtree(job.workdir)
    order = {prec: i for i, prec in enumerate(precisions)}
    profiles.sort(key=lambda p: (order[p.precision], -(p.layers or 1_000_000), -p.dims))
    manifest = Manifest(
        name=source.name,
        source={
            **source.manifest_source(),
            "exporter": ", ".join(dict.fromkeys(exporters)),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        tokenizer=settings,
        full_dims=source.full_dims,
        pooling=source.pooling,
        profiles=tuple(profiles),
        weights=tuple(_weights_entry(tmp, name, prec) for name, prec in _weights_files(shared, precisions)),
        trained_dims=source.trained_dims,
        prompts=source.prompts,
        default_prompt=source.default_prompt,
        total_layers=source.total_layers,
        trained_layers=source.trained_layers,
        ort_cpu=tuple(choices.values()),
        quantization=quantization,
        acceptance=acceptance_test(source, job.texts, references, precisions).save(tmp) if references else None,
        toolkit_version=mrl.__version__,
    )
    progress("calibrating int8/uint8 output ranges")
    texts = options.calibration or CalibrationTexts.validation()
    manifest = dataclasses.replace(manifest, calibration=calibrate(tmp, manifest, texts))
    manifest.save(tmp)
    return manifest


def _weights_files(shared: dict[str, graph.SharedWeights], precisions: list[str]) -> list[tuple[str, str]]:
    """(file name, precision) of each weights file written, portable before ONNX Runtime CPU per precision."""
    return [(name, prec) for prec in precisions for name in sorted(shared) if name.startswith(f"weights-{prec}.")]


def _weights_entry(directory: Path, name: str, prec: str) -> WeightsFile:
    path = directory / name
    return WeightsFile(file=name, precision=prec, sha256=sha256_file(path), bytes=path.stat().st_size)


def _reference(source: SourceModel, texts: list[str], layers: int | None) -> np.ndarray:
    if source.kind == "onnx":
        from mrl.export.onnx_source import reference_embeddings as onnx_reference

        return onnx_reference(source, texts)
    if layers is not None:
        return reference_embeddings(source.st_model, texts, layers)
    # prompt="": the graph runs see the texts as they are, so the reference must too (sentence-transformers would
    # prepend a model's default prompt; the runtime prepends prompts itself, outside the graph).
    return source.st_model.encode(texts, batch_size=8, convert_to_numpy=True, normalize_embeddings=False, prompt="")
