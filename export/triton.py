"""Write an artifact as a Triton Inference Server model repository: tokenizer, one encoder and one ensemble per dims."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from mrl.export.artifact import prepare_output, publish, user_modes
from mrl.export.triton_config import (
    EncoderSpec,
    encoder_config,
    ensemble_config,
    tokenize_config,
)
from mrl.export.triton_plan import Plan, TritonOptions, plan_repository
from mrl.export.triton_readme import repository_readme
from mrl.runtime.manifest import Engine, Manifest, Profile, load_manifest

Progress = Callable[[str], None]
VERSION = "1"  # Triton serves the newest numbered version directory of each model
# The Python encoder's defaults, written out so they can be seen and edited: mrl-serve's batching policy.
PYTHON_ENCODER_PARAMETERS = (("backend", "auto"), ("max_rows", "32"), ("max_padding", "0.1"))


def _place(src: Path, dst: Path) -> None:
    """Hard-link a file where the filesystem allows (weights can be large) and its mode is already what the
    repository's files get (a link shares it), else copy it."""
    if stat.S_IMODE(src.stat().st_mode) == user_modes()[1]:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def _model_dir(root: Path, name: str, config: str) -> Path:
    """Create `name/config.pbtxt` and the version directory; return the version directory."""
    version = root / name / VERSION
    version.mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(config)
    return version


def _write_encoder(plan: Plan, artifact: Path, root: Path, profile: Profile) -> None:
    """One profile's encoder model in the chosen form."""
    encoder, batching, inputs = plan.options.encoder, plan.options.batching, plan.manifest.tokenizer.inputs
    plan_files: tuple[tuple[str, str], ...] = ()
    preferred = None
    if encoder == "tensorrt":
        engines = plan.engines[profile.name]
        plan_files = tuple((e.compute_capability, _plan_file(e)) for e in engines)
        opts = {r.batch.opt for e in engines for r in e.shape_ranges if r.batch.opt < batching.max_batch_size}
        preferred = (*sorted(opts), batching.max_batch_size)
    spec = EncoderSpec(
        encoder=encoder,
        dims=profile.dims,
        inputs=inputs,
        ids_dtype=plan.tokenize_parameters["ids_dtype"],
        plan_files=plan_files,
        preferred=preferred,
        parameters=PYTHON_ENCODER_PARAMETERS if encoder == "python" else (),
    )
    name = plan.encode_name(profile)
    version = _model_dir(root, name, encoder_config(name, spec, batching))
    weights = [w for w in plan.manifest.weights if w.file == profile.weights]
    if encoder == "onnxruntime":
        _place(artifact / profile.file, version / "model.onnx")
        for w in weights:  # the graph names its external weights file relative to itself
            _place(artifact / w.file, version / w.file)
    elif encoder == "tensorrt":
        for engine, (_, filename) in zip(plan.engines[profile.name], plan_files, strict=True):
            _place(artifact / engine.file, version / filename)
    else:
        (version / "model.py").write_text(_model_source("encode_model.py"))
        sub = version / "artifact"
        sub.mkdir()
        cpu = [profile.ort_cpu.file, profile.ort_cpu.weights] if profile.ort_cpu else []  # the fused CPU graph
        test = [plan.manifest.acceptance.file] if plan.manifest.acceptance else []  # run when the model loads
        files = [plan.manifest.tokenizer.file, profile.file, *(w.file for w in weights), *cpu, *test]
        for name in dict.fromkeys(files):
            if name:
                _place(artifact / name, sub / name)  # the tokenizer too: the manifest verifies it
        _one_profile(plan.manifest, profile).save(sub)


def _one_profile(manifest: Manifest, profile: Profile) -> Manifest:
    """The manifest of an artifact holding only `profile` (its graph, weights, tokenizer and calibration)."""
    calibration = manifest.calibration
    if calibration is not None:
        ranges = {k: v for k, v in calibration.ranges.items() if k == profile.name}
        calibration = dataclasses.replace(calibration, ranges=ranges)
    files = {profile.weights, profile.ort_cpu.weights if profile.ort_cpu else None}
    weights = tuple(w for w in manifest.weights if w.file in files)
    ort_cpu = tuple(c for c in manifest.ort_cpu if c.precision == profile.precision)
    return dataclasses.replace(
        manifest, profiles=(profile,), weights=weights, engines=(), calibration=calibration, ort_cpu=ort_cpu
    )


def _plan_file(engine: Engine) -> str:
    """The engine's file name in the version directory, by compute capability (model-sm90.plan)."""
    return f"model-sm{engine.compute_capability.replace('.', '')}.plan"


def _model_source(filename: str) -> str:
    return resources.files("mrl.export").joinpath("triton_models", filename).read_text(encoding="utf-8")


def write_repository(artifact: Path, out: Path, options: TritonOptions, progress: Progress = lambda _: None) -> Plan:
    """Write the Triton model repository for `artifact` to `out`, atomically; return what was written."""
    artifact = Path(artifact)
    progress(f"checking {artifact}")
    plan = plan_repository(load_manifest(artifact), options)
    out = Path(out).absolute()
    tmp = prepare_output(out, options.force)
    try:
        _write(plan, artifact, tmp, progress)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan


def _write(plan: Plan, artifact: Path, root: Path, progress: Progress) -> None:
    batching, inputs = plan.options.batching, plan.manifest.tokenizer.inputs
    progress(f"writing {plan.tokenize_name}")
    config = tokenize_config(plan.tokenize_name, batching, plan.tokenize_parameters, inputs)
    version = _model_dir(root, plan.tokenize_name, config)
    (version / "model.py").write_text(_model_source("tokenize_model.py"))
    _place(artifact / plan.manifest.tokenizer.file, version / "tokenizer.json")
    for profile in plan.profiles:
        progress(f"writing {plan.encode_name(profile)} and {plan.ensemble_name(profile)}")
        _write_encoder(plan, artifact, root, profile)
        ensemble = ensemble_config(
            plan.ensemble_name(profile),
            plan.tokenize_name,
            plan.encode_name(profile),
            profile.dims,
            inputs,
            batching.max_batch_size,
        )
        _model_dir(root, plan.ensemble_name(profile), ensemble)
    (root / "README.md").write_text(repository_readme(plan))
