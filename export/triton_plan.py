"""What a Triton model repository will hold, decided (and every refusal raised) before anything is written:
`mrl-export triton`'s options, the models and their names, the tokenizer's parameters."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mrl.export.errors import ExportError
from mrl.export.triton_config import ENCODERS, Batching
from mrl.runtime.manifest import Engine, Manifest, Profile

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, kw_only=True)
class TritonOptions:
    """What repository to write: which profiles, which encoder, how Triton batches and places them."""

    name: str | None = None  # default: the manifest's name with anything but [A-Za-z0-9_.-] made "_"
    dims: tuple[int, ...] = ()  # default: every dims the precision has
    layers: tuple[int, ...] = ()  # depths (2D Matryoshka); default: every depth the precision has
    precision: str | None = None  # default: the manifest's first
    encoder: str = "onnxruntime"
    batching: Batching = field(default_factory=Batching)
    prompt_name: str | None = None  # the prompt a request that names none gets (default: the manifest's)
    truncate: bool = False  # what a request that does not say gets: over-long texts refused
    force: bool = False

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ExportError(f"unknown encoder {self.encoder!r}; choose from {', '.join(ENCODERS)}")
        if self.name is not None and not _NAME.match(self.name):
            raise ExportError(f"model name {self.name!r} must be letters, digits, '_', '.' or '-', such as minilm")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The repository to write, decided (and every refusal raised) before anything is written."""

    manifest: Manifest
    name: str
    precision: str
    profiles: tuple[Profile, ...]
    engines: dict[str, tuple[Engine, ...]]  # profile name -> engines (TensorRT only)
    tokenize_parameters: dict[str, str]
    options: TritonOptions

    @property
    def tokenize_name(self) -> str:
        """The tokenizer model's name."""
        return f"{self.name}_tokenize"

    def encode_name(self, profile: Profile) -> str:
        """The encoder model's name for one profile."""
        return f"{self.name}_encode_{_shape_tag(profile)}"

    def ensemble_name(self, profile: Profile) -> str:
        """The ensemble's name for one profile: what clients call (NAME_d256; NAME_l3_d256 for 3 layers)."""
        return f"{self.name}_{_shape_tag(profile)}"

    @property
    def model_names(self) -> list[str]:
        """Every model the repository holds."""
        per_profile = [n for p in self.profiles for n in (self.encode_name(p), self.ensemble_name(p))]
        return [self.tokenize_name, *per_profile]


def _shape_tag(profile: Profile) -> str:
    """`d256` at full depth (as before layers existed), `l3_d256` for a profile that keeps 3 layers."""
    return f"d{profile.dims}" if profile.layers is None else f"l{profile.layers}_d{profile.dims}"


def default_name(manifest_name: str) -> str:
    """A Triton-safe model name from the manifest's name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", manifest_name).lstrip("_.-")
    return name or "model"


def _profiles(
    manifest: Manifest, precision: str, dims: Sequence[int], layers: Sequence[int] = ()
) -> tuple[Profile, ...]:
    """The artifact's profile for each (depth, dims) asked for; a missing one is refused, naming what exists."""
    have = {(p.layers, p.dims): p for p in manifest.profiles if p.precision == precision}
    if not have:
        raise ExportError(f"the artifact has no {precision} profiles; it has: {', '.join(manifest.precisions)}")
    # A depth equal to the encoder's total is full depth, which profiles record as None.
    depths = sorted({None if n == manifest.total_layers else n for n in layers}, key=_depth_order)
    depths = depths or sorted({d for d, _ in have}, key=_depth_order)
    names = ", ".join(p.name for p in manifest.profiles)
    absent = [str(d) for d in depths if d not in {e for e, _ in have}]
    if absent:
        raise ExportError(
            f"the artifact has no {precision} profiles at layers {','.join(absent)} (it has {names}): "
            f"export them with mrl-export --layers, or choose from the depths it has"
        )
    wanted = [(d, n) for d in depths for n in (sorted(set(dims)) if dims else sorted({n for e, n in have if e == d}))]
    missing = [key for key in wanted if key not in have]
    if missing:
        asked = ", ".join(f"dims {n}" + (f" at layers {d}" if d is not None else "") for d, n in missing)
        raise ExportError(
            f"the artifact has no {precision} profile for {asked} (it has {names}): "
            f"export one with mrl-export --dims, or choose from the dims it has"
        )
    return tuple(have[key] for key in wanted)


def _depth_order(layers: int | None) -> float:
    return float("inf") if layers is None else layers


def _engines(manifest: Manifest, profiles: Sequence[Profile]) -> dict[str, tuple[Engine, ...]]:
    """The newest engine per compute capability for each profile; a profile without any is refused."""
    chosen: dict[str, tuple[Engine, ...]] = {}
    for p in profiles:
        newest: dict[str, Engine] = {}
        for e in sorted((e for e in manifest.engines if e.profile == p.name), key=lambda e: e.built_at):
            newest[e.compute_capability] = e
        if not newest:
            raise ExportError(
                f"--encoder tensorrt needs TensorRT engines, and the artifact has none for {p.name}: run "
                "`mrl-export build-engine ARTIFACT` on the serving GPU (same TensorRT as the Triton image) first, "
                "or use --encoder onnxruntime"
            )
        chosen[p.name] = tuple(newest[cc] for cc in sorted(newest))
    dtypes = {e.input_dtype for engines in chosen.values() for e in engines}
    if len(dtypes) > 1:
        raise ExportError(f"the engines take different token types ({', '.join(sorted(dtypes))}): rebuild them alike")
    return chosen


def _engine_limits(engines: Sequence[Engine]) -> tuple[int, int]:
    """The largest batch and sequence length every engine accepts."""
    batch = min(max(r.batch.max for r in e.shape_ranges) for e in engines)
    seq = min(max(r.seq.max for r in e.shape_ranges) for e in engines)
    return batch, seq


def plan_repository(manifest: Manifest, options: TritonOptions) -> Plan:
    """Decide every model and setting of the repository, refusing what cannot be served."""
    precision = options.precision or manifest.precisions[0]
    if precision not in manifest.precisions:
        raise ExportError(f"the artifact has no {precision} profiles; it has: {', '.join(manifest.precisions)}")
    profiles = _profiles(manifest, precision, options.dims, options.layers)
    prompt = options.prompt_name if options.prompt_name is not None else (manifest.default_prompt or "")
    if prompt and prompt not in manifest.prompts:
        known = ", ".join(sorted(manifest.prompts)) or "none"
        raise ExportError(f"unknown prompt name {prompt!r}; this model's prompts: {known}")
    max_length, ids_dtype, engines = manifest.tokenizer.max_length, "int64", {}
    if options.encoder == "tensorrt":
        engines = _engines(manifest, profiles)
        every = [e for group in engines.values() for e in group]
        batch, seq = _engine_limits(every)
        if options.batching.max_batch_size > batch:
            raise ExportError(
                f"--max-batch-size {options.batching.max_batch_size} is above what the engines take ({batch}): "
                f"use --max-batch-size {batch}, or rebuild the engines with a larger --batch"
            )
        max_length, ids_dtype = min(max_length, seq), every[0].input_dtype
    parameters = {
        "max_length": str(max_length),
        "pad_token_id": str(manifest.tokenizer.pad_token_id),
        "padding_side": manifest.tokenizer.padding_side,
        "outputs": ",".join(manifest.tokenizer.inputs),
        "ids_dtype": ids_dtype,
        "prompts": json.dumps(manifest.prompts, sort_keys=True),
        "default_prompt_name": prompt,
        "truncate": "true" if options.truncate else "false",
    }
    return Plan(
        manifest=manifest,
        name=options.name or default_name(manifest.name),
        precision=precision,
        profiles=profiles,
        engines=engines,
        tokenize_parameters=parameters,
        options=options,
    )
