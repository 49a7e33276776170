"""The artifact format: `manifest.json`, its schema version, and integrity checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrl.runtime.errors import ArtifactError, IntegrityError, SchemaVersionError, shorten
from mrl.runtime.machine import Machine
from mrl.runtime.manifest_checks import PRECISIONS as PRECISIONS  # re-exported: where callers look for it
from mrl.runtime.manifest_checks import check_sense

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
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
    machine: Machine | None = None
    """Where the candidate ran (None in artifacts written before machines were recorded)."""


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
    """One deployment target: a graph with truncation to `dims` and L2 normalisation baked in.

    `layers`: how many encoder layers the graph runs; None means all of them (full depth).
    """

    name: str
    dims: int
    precision: str
    file: str
    sha256: str
    weights: str | None = None
    parity: Parity | None = None
    layers: int | None = None
    ort_cpu: OrtCpuGraph | None = None
    """The ONNX Runtime CPU graph of this profile; None: the portable graph runs there too."""


@dataclass(frozen=True, kw_only=True)
class OrtCpuChoice:
    """Which graph one precision runs on ONNX Runtime's CPU provider, and why.

    `graph` is "optimized" (every profile of the precision has `ort_cpu`) or "portable" (some or all have
    none: `reason` says why; the runtime runs each profile's own `ort_cpu` where it has one);
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
    """How the int8 graphs were quantised, and which matrix products were kept in fp32 and why.

    `method` says it in words. `reduce_range`: weights in -64..64, so that no x86 int8 kernel can
    saturate (False in artifacts written before it, whose weights use -127..127). `smoothed`: how
    many matrix-product inputs had their outlier channels moved into the weights, `smoothing_muls`
    how many of those needed a Mul node of their own (the rest were folded into a norm's scale).
    """

    method: str
    kept_fp32: tuple[str, ...] = ()
    reason: str = ""
    reduce_range: bool = False
    smoothed: int = 0
    smoothing_muls: int = 0


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
    sha256: str | None = None
    """Of `file`; None only in artifacts written before the tokenizer was hashed (then it is not verified)."""
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

    Never called a profile here: in this project a profile is dims x precision (x layers kept).
    """

    batch: Span
    seq: Span

    def __str__(self) -> str:
        return f"batch {self.batch} x seq {self.seq}"


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
class Range:
    """Per-dimension minimum and maximum of one profile's embeddings over the calibration texts."""

    min: tuple[float, ...]
    max: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.min or len(self.min) != len(self.max):
            raise ValueError(f"a range needs as many maxima as minima, got {len(self.min)} and {len(self.max)}")


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """What int8/uint8 outputs quantise with: each profile's value ranges over a corpus of typical texts."""

    texts: str
    """Where the texts came from: "validation texts" (export's own) or the file given."""
    n_texts: int
    texts_sha256: str
    ranges: dict[str, Range]
    """Profile name -> its range."""


@dataclass(frozen=True, kw_only=True)
class AcceptanceFile:
    """The artifact's acceptance test: validation texts, the source model's vectors and the thresholds
    (`mrl.runtime.acceptance`), which every load runs on the machine that serves."""

    file: str
    sha256: str


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
    calibration: Calibration | None = None
    total_layers: int | None = None  # the encoder's layers (None: not recorded, as in older artifacts)
    trained_layers: tuple[int, ...] | None = None  # depths the model was trained to be cut at
    ort_cpu: tuple[OrtCpuChoice, ...] = ()
    quantization: Quantization | None = None
    acceptance: AcceptanceFile | None = None  # None: exported without validation, or before acceptance tests
    toolkit_version: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def dims(self) -> list[int]:
        """The distinct dims of all profiles, ascending."""
        return sorted({p.dims for p in self.profiles})

    def depth(self, profile: Profile) -> int | None:
        """The layers a profile runs: its own `layers`, else the model's total (None where not recorded)."""
        return profile.layers if profile.layers is not None else self.total_layers

    @property
    def layers(self) -> list[int | None]:
        """The distinct depths of all profiles, shallowest first; None (full depth, total not recorded) last."""
        return sorted({self.depth(p) for p in self.profiles}, key=lambda n: float("inf") if n is None else n)

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


def _describe(tp: Any) -> str:
    """A type as a manifest reader would say it: "a whole number", "a list of ...", ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        plural = {int: "whole numbers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], 'objects')}"
    if origin is dict:
        return "an object"
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(tp, "an object")


def read_typed(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as type `tp`: dataclasses from objects, tuples from lists, each field checked.

    Raises ArtifactError naming the field (`where`) and what it should be, so a hand-edited or tampered
    manifest fails when loaded, not with a TypeError in the middle of a request.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return read_typed(inner, value, where)
    if origin is tuple and isinstance(value, list):
        return tuple(read_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict and isinstance(value, dict):
        if args and args[1] is not Any:
            return {str(k): read_typed(args[1], v, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _read_dataclass(tp, value, where)
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if tp is int and value != int(value):
            raise ArtifactError(f"manifest.json: {where} must be a whole number, not {shorten(value)}")
        return tp(value)
    if tp is str and isinstance(value, str):
        return value
    if tp is Any:
        return value
    raise ArtifactError(f"manifest.json: {where} must be {_describe(tp)}, not {shorten(value)}")


def _read_dataclass(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ArtifactError(
            f"manifest.json: {where} has fields this toolkit does not know ({', '.join(unknown)}): it was "
            "written by a newer mrl-toolkit; upgrade"
        )
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = read_typed(hints[name], data[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ArtifactError(f"manifest.json: {where or 'the manifest'} lacks the field {name!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # a value each field accepts, which together make no sense
        raise ArtifactError(f"manifest.json: {where or 'the manifest'} is invalid: {e}") from None


def manifest_from_dict(data: dict[str, Any]) -> Manifest:
    """Build a Manifest from parsed JSON, refusing newer schemas and malformed or inconsistent entries."""
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError("manifest.json has no integer schema_version: not an mrl-toolkit artifact")
    if version < 1:
        raise ArtifactError(f"manifest.json: schema_version must be at least 1, not {version}")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"manifest schema version {version} is newer than this toolkit reads ({SCHEMA_VERSION}): "
            "upgrade mrl-toolkit"
        )
    manifest = read_typed(Manifest, data, "")
    check_sense(manifest)
    return manifest


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
    """Raise IntegrityError unless every file the manifest lists (tokenizer, graphs, weights, engines, acceptance
    test) matches its recorded sha256."""
    listed = [(manifest.tokenizer.file, manifest.tokenizer.sha256)] if manifest.tokenizer.sha256 else []
    if not manifest.tokenizer.sha256:
        log.warning(
            "%s predates hashing the tokenizer: %s is not verified (export it again)",
            directory,
            manifest.tokenizer.file,
        )
    listed += [(p.file, p.sha256) for p in manifest.profiles]
    listed += [(p.ort_cpu.file, p.ort_cpu.sha256) for p in manifest.profiles if p.ort_cpu is not None]
    listed += [(w.file, w.sha256) for w in manifest.weights]
    listed += [(e.file, e.sha256) for e in manifest.engines]
    listed += [(manifest.acceptance.file, manifest.acceptance.sha256)] if manifest.acceptance else []
    for name, expected in listed:
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{path} is listed in the manifest but missing")
        if sha256_file(path) != expected:
            raise IntegrityError(
                f"{path} does not match its sha256 in the manifest: the artifact is corrupt or was "
                "modified; export it again"
            )
