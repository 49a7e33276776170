"""The artifact format: `manifest.json`, its schema version, and integrity checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrl.runtime.errors import ArtifactError, IntegrityError, SchemaVersionError

# Rules: a reader loads every schema version up to its own and refuses newer ones ("upgrade
# mrl-toolkit"). Bump the version whenever a manifest written now holds something an older reader
# would reject or misread (a new key in a dataclass it builds with `**data`); give every new field
# a default, so that older manifests, which lack it, keep loading.
# 2: Profile.ort_cpu (ONNX Runtime CPU graphs), Manifest.ort_cpu and Manifest.quantization.
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
OUTPUT_NAME = "sentence_embedding"


@dataclass(frozen=True, kw_only=True)
class Parity:
    """How closely a profile matched its reference on the validation texts."""

    reference: str
    n_texts: int
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    threshold: str
    passed: bool


@dataclass(frozen=True, kw_only=True)
class OrtCpuGraph:
    """A profile's graph rewritten for ONNX Runtime's CPU provider: fused contrib ops, not portable.

    The portable graph (`Profile.file`) stays what TensorRT, other runtimes and GPUs run.
    """

    file: str
    sha256: str
    weights: str | None = None
    parity: Parity | None = None


@dataclass(frozen=True, kw_only=True)
class Profile:
    """One deployment target: a graph with truncation to `dims` and L2 normalisation baked in."""

    name: str
    dims: int
    precision: str
    file: str
    sha256: str
    weights: str | None = None
    parity: Parity | None = None
    ort_cpu: OrtCpuGraph | None = None


@dataclass(frozen=True, kw_only=True)
class OrtCpuChoice:
    """Which graph one precision runs on ONNX Runtime's CPU provider, and why.

    `graph` is "optimized" (every profile of the precision has `ort_cpu`) or "portable";
    `fusions` counts the fused operators the optimizer wrote (op type -> count).
    """

    precision: str
    graph: str
    reason: str
    fusions: dict[str, int] = field(default_factory=dict)
    onnxruntime: str = ""
    kept_fp32: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Quantization:
    """How the int8 graphs were quantised, and which matrix products were kept in fp32 and why."""

    method: str
    kept_fp32: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class WeightsFile:
    """An external-data file shared by every profile of one precision."""

    file: str
    precision: str
    sha256: str
    bytes: int


@dataclass(frozen=True, kw_only=True)
class TokenizerSettings:
    """What the runtime needs to tokenise exactly as the source model did."""

    file: str = "tokenizer.json"
    max_length: int
    padding_side: str = "right"
    pad_token_id: int = 0
    pad_token: str = "[PAD]"
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class Span:
    """The min/opt/max of one dimension (batch or sequence length) of a shape range."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        values = (self.min, self.opt, self.max)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise ValueError(f"a span needs whole numbers, got {values}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"a span needs 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class ShapeRange:
    """What TensorRT calls an optimization profile: the batch and sequence spans one engine serves.

    Never called a profile here: in this project a profile is dims x precision.
    """

    batch: Span
    seq: Span

    def fits(self, batch: int, seq: int) -> bool:
        """Whether a [batch, seq] input lies inside this range."""
        return self.batch.min <= batch <= self.batch.max and self.seq.min <= seq <= self.seq.max

    def __str__(self) -> str:
        return f"batch {self.batch} x seq {self.seq}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeRange:
        """Read the `{"batch": {...}, "seq": {...}}` form that `dataclasses.asdict` writes."""
        return cls(batch=Span(**data["batch"]), seq=Span(**data["seq"]))


@dataclass(frozen=True, kw_only=True)
class Engine:
    """A TensorRT engine for one profile on one GPU, written by `mrl-export build-engine`.

    `cache_key` hashes everything that makes an engine valid (GPU name and compute capability,
    TensorRT version, the graph's and weights' sha256, the shape ranges); the runtime recomputes it
    and loads nothing whose key differs.
    """

    profile: str
    file: str
    sha256: str
    cache_key: str
    gpu: str
    compute_capability: str
    tensorrt_version: str
    onnx_sha256: str
    weights_sha256: str | None
    shape_ranges: tuple[ShapeRange, ...]
    input_dtype: str = "int64"
    built_at: str = ""
    build_seconds: float = 0.0
    parity: Parity | None = None


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything `manifest.json` records about an artifact."""

    name: str
    source: dict[str, Any]
    tokenizer: TokenizerSettings
    full_dims: int
    pooling: str
    profiles: tuple[Profile, ...]
    weights: tuple[WeightsFile, ...] = ()
    trained_dims: tuple[int, ...] | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str | None = None
    engines: tuple[Engine, ...] = ()
    ort_cpu: tuple[OrtCpuChoice, ...] = ()
    quantization: Quantization | None = None
    toolkit_version: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def dims(self) -> list[int]:
        """The distinct dims of all profiles, ascending."""
        return sorted({p.dims for p in self.profiles})

    @property
    def precisions(self) -> list[str]:
        """The distinct precisions of all profiles, in the order first listed."""
        return list(dict.fromkeys(p.precision for p in self.profiles))

    def to_json(self) -> str:
        """The manifest as pretty-printed JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def save(self, directory: Path) -> Path:
        """Write `manifest.json` into `directory` (atomically) and return its path."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _parity(data: dict[str, Any] | None) -> Parity | None:
    return None if data is None else Parity(**data)


def _profile(data: dict[str, Any]) -> Profile:
    ort_cpu = data.get("ort_cpu")
    if ort_cpu is not None:
        ort_cpu = OrtCpuGraph(**{**ort_cpu, "parity": _parity(ort_cpu.get("parity"))})
    return Profile(**{**data, "parity": _parity(data.get("parity")), "ort_cpu": ort_cpu})


def _ort_cpu_choice(data: dict[str, Any]) -> OrtCpuChoice:
    return OrtCpuChoice(**{**data, "kept_fp32": tuple(data.get("kept_fp32", ()))})


def _quantization(data: dict[str, Any] | None) -> Quantization | None:
    return None if data is None else Quantization(**{**data, "kept_fp32": tuple(data.get("kept_fp32", ()))})


def engine_from_dict(data: dict[str, Any]) -> Engine:
    """One `engines` entry of manifest.json as an Engine (raises KeyError/TypeError/ValueError if malformed)."""
    ranges = tuple(ShapeRange.from_dict(r) for r in data["shape_ranges"])
    if not ranges:
        raise ValueError(f"engine {data.get('file')!r} lists no shape ranges")
    return Engine(**{**data, "shape_ranges": ranges, "parity": _parity(data.get("parity"))})


def manifest_from_dict(data: dict[str, Any]) -> Manifest:
    """Build a Manifest from parsed JSON, refusing newer schemas and malformed entries."""
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise ArtifactError("manifest.json has no integer schema_version: not an mrl-toolkit artifact")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"manifest schema version {version} is newer than this toolkit reads ({SCHEMA_VERSION}): "
            "upgrade mrl-toolkit"
        )
    try:
        tok = dict(data["tokenizer"])
        tok["inputs"] = tuple(tok.get("inputs", ("input_ids", "attention_mask")))
        profiles = tuple(_profile(p) for p in data["profiles"])
        engines = tuple(engine_from_dict(e) for e in data.get("engines", ()))
        trained = data.get("trained_dims")
        return Manifest(
            name=data["name"],
            source=dict(data["source"]),
            tokenizer=TokenizerSettings(**tok),
            full_dims=int(data["full_dims"]),
            pooling=data["pooling"],
            profiles=profiles,
            weights=tuple(WeightsFile(**w) for w in data.get("weights", ())),
            trained_dims=None if trained is None else tuple(int(d) for d in trained),
            prompts=dict(data.get("prompts") or {}),
            default_prompt=data.get("default_prompt"),
            engines=engines,
            ort_cpu=tuple(_ort_cpu_choice(c) for c in data.get("ort_cpu", ())),
            quantization=_quantization(data.get("quantization")),
            toolkit_version=data.get("toolkit_version", ""),
            schema_version=version,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"manifest.json is malformed ({type(e).__name__}: {e})") from None


def load_manifest(directory: Path | str, verify: bool = True) -> Manifest:
    """Read an artifact's manifest; with `verify`, check every listed file's sha256."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST_NAME}: not an mrl-toolkit artifact")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a JSON object")
    manifest = manifest_from_dict(data)
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Raise IntegrityError unless every graph and weights file matches its recorded sha256."""
    listed = [(p.file, p.sha256) for p in manifest.profiles]
    listed += [(p.ort_cpu.file, p.ort_cpu.sha256) for p in manifest.profiles if p.ort_cpu is not None]
    listed += [(w.file, w.sha256) for w in manifest.weights]
    listed += [(e.file, e.sha256) for e in manifest.engines]
    for name, expected in listed:
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{path} is listed in the manifest but missing")
        if sha256_file(path) != expected:
            raise IntegrityError(
                f"{path} does not match its sha256 in the manifest: the artifact is corrupt or was "
                "modified; export it again"
            )
