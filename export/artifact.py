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
from mrl.export import graph, parity, precision
from mrl.export.calibrate import CalibrationTexts, calibrate
from mrl.export.errors import ExportError, ParityError
from mrl.export.source import SourceModel
from mrl.runtime.errors import DimsError
from mrl.runtime.manifest import (
    PRECISIONS,
    Manifest,
    Parity,
    Profile,
    TokenizerSettings,
    WeightsFile,
    sha256_file,
)
from mrl.runtime.tokenize import TextTokenizer

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """What to export: the dims and precisions of the profiles, and how."""

    dims: tuple[int, ...]
    precisions: tuple[str, ...] = ("fp32",)
    exporter: str = "auto"
    validate: bool = True
    force: bool = False
    calibration: CalibrationTexts | None = None
    """Texts whose value ranges int8/uint8 outputs use (None: the validation texts)."""

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
        if self.exporter not in graph.EXPORTERS:
            raise ExportError(f"unknown exporter {self.exporter!r}; choose from {', '.join(graph.EXPORTERS)}")


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


def _prepare_output(out: Path, force: bool) -> Path:
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


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished artifact into place, replacing an old one only once the new one is whole."""
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp made the directory private; an artifact is read by other users (a serving account).
    tmp.chmod(0o777 & ~umask)
    for f in tmp.iterdir():
        f.chmod(0o666 & ~umask)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.replace(old / "artifact")
        tmp.replace(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.replace(out)


def _pooled_fp32(
    source: SourceModel,
    exporter: str,
    tokenizer: TextTokenizer,
    reference: np.ndarray | None,
    texts: list[str],
    workdir: Path,
    progress: Progress,
) -> tuple[onnx.ModelProto, str]:
    """The fp32 pooled graph; with exporter "auto", the first exporter whose graph passes parity."""
    if source.kind == "onnx":
        from mrl.export.onnx_source import pooled_graph

        return pooled_graph(source), "onnx-graph-edit"
    candidates = ["legacy", "dynamo"] if exporter == "auto" else [exporter]
    failures = []
    for name in candidates:
        progress(f"exporting with the {name} exporter")
        try:
            model = graph.export_pooled_encoder(source.st_model, source.inputs, name, workdir)
        except Exception as e:  # exporters fail in many untyped ways; the next one may succeed
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if reference is None:
            return model, name
        probe = workdir / f"probe-{name}.onnx"
        onnx.save_model(graph.append_mrl_head(model, source.full_dims), str(probe), save_as_external_data=True)
        result = parity.compare(
            parity.embed_graph(probe, tokenizer, texts), reference, source.full_dims, "fp32", "probe"
        )
        if result.passed:
            return model, name
        failures.append(f"{name}: parity min cosine {result.min_cosine:.6f}")
    raise ExportError("no exporter produced a matching graph: " + "; ".join(failures))


def export_artifact(
    source: SourceModel, out: Path, options: ExportOptions, progress: Progress = lambda _: None
) -> Manifest:
    """Export `source` to the artifact directory `out` and return its manifest."""
    check_dims(source, options.dims)
    out = Path(out).absolute()
    tmp = _prepare_output(out, options.force)
    try:
        manifest = _write_artifact(source, tmp, options, progress)
        _publish(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_artifact(source: SourceModel, tmp: Path, options: ExportOptions, progress: Progress) -> Manifest:
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
    tokenizer = TextTokenizer.load(tmp, settings)
    texts = parity.validation_texts()
    reference = None
    if options.validate:
        progress(f"computing reference embeddings for {len(texts)} validation texts")
        reference = _reference(source, texts)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=tmp))
    fp32, exporter = _pooled_fp32(source, options.exporter, tokenizer, reference, texts, work, progress)
    profiles, weights = [], []
    dims = sorted(set(options.dims), reverse=True)
    for prec in dict.fromkeys(options.precisions):
        progress(f"converting to {prec}")
        base = graph.save_shared_weights(precision.convert(fp32, prec, work), tmp, f"weights-{prec}.bin")
        weights.append(_weights_entry(tmp, f"weights-{prec}.bin", prec))
        for d in dims:
            name = f"d{d}-{prec}"
            path = tmp / f"{name}.onnx"
            graph.save_graph(graph.append_mrl_head(base, d), path)
            result = None
            if reference is not None:
                progress(f"checking parity of {name}")
                result = parity.compare(
                    parity.embed_graph(path, tokenizer, texts), reference, d, prec, _ref_name(source)
                )
                if not result.passed:
                    raise ParityError(_parity_message(name, prec, result))
            profiles.append(
                Profile(
                    name=name,
                    dims=d,
                    precision=prec,
                    file=path.name,
                    sha256=sha256_file(path),
                    weights=f"weights-{prec}.bin",
                    parity=result,
                )
            )
    shutil.rmtree(work)
    manifest = Manifest(
        name=source.name,
        source={
            **source.manifest_source(),
            "exporter": exporter,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        tokenizer=settings,
        full_dims=source.full_dims,
        pooling=source.pooling,
        profiles=tuple(profiles),
        weights=tuple(weights),
        trained_dims=source.trained_dims,
        prompts=source.prompts,
        default_prompt=source.default_prompt,
        toolkit_version=mrl.__version__,
    )
    progress("calibrating int8/uint8 output ranges")
    texts = options.calibration or CalibrationTexts.validation()
    manifest = dataclasses.replace(manifest, calibration=calibrate(tmp, manifest, texts))
    manifest.save(tmp)
    return manifest


def _weights_entry(directory: Path, name: str, prec: str) -> WeightsFile:
    path = directory / name
    return WeightsFile(file=name, precision=prec, sha256=sha256_file(path), bytes=path.stat().st_size)


def _reference(source: SourceModel, texts: list[str]) -> np.ndarray:
    if source.kind == "onnx":
        from mrl.export.onnx_source import reference_embeddings

        return reference_embeddings(source, texts)
    return source.st_model.encode(texts, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)


def _ref_name(source: SourceModel) -> str:
    return "onnx-source-graph" if source.kind == "onnx" else "pytorch-sentence-transformers"


def _parity_message(name: str, prec: str, result: Parity) -> str:
    hint = {
        "fp16": " fp16 overflows in some models (activations above 65504); use fp32 or int8 for this model.",
        "int8": " int8 loses too much for this model; use fp32 or fp16.",
        "fp32": " the exported graph does not reproduce the model; try --exporter dynamo.",
    }[prec]
    return (
        f"profile {name} failed parity: min cosine {result.min_cosine:.6f}, mean {result.mean_cosine:.6f} "
        f"(needs {result.threshold}).{hint} --no-validate skips this check."
    )
