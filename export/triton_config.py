"""The `config.pbtxt` text of each model in a Triton repository (protobuf text format of Triton's ModelConfig)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from mrl.export.errors import ExportError
from mrl.runtime.manifest import OUTPUT_NAME

ENCODERS = ("onnxruntime", "tensorrt", "python")
TEXT = "TEXT"
EMBEDDING = "EMBEDDING"
_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32"}


@dataclass(frozen=True, kw_only=True)
class Batching:
    """How Triton batches and places one model: its largest batch, the batcher's wait, its instances."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    instances: int = 2

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_delay_us", "instances"):
            value = getattr(self, name)
            least = 0 if name == "max_queue_delay_us" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ExportError(f"{name} must be a whole number of at least {least}, not {value!r}")

    def preferred(self) -> list[int]:
        """Preferred batch sizes: the powers of two from 8 up to the largest batch, and the largest."""
        sizes = [s for s in (8, 16, 32, 64, 128, 256, 512) if s < self.max_batch_size]
        return [*sizes, self.max_batch_size]


def _quote(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid protobuf text-format string


def _parameters(values: dict[str, str]) -> list[str]:
    return [f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}" for k, v in values.items()]


def _tensor(name: str, dtype: str, dims: Sequence[int], ragged: bool = False) -> str:
    extra = " allow_ragged_batch: true" if ragged else ""
    return f"  {{ name: {_quote(name)} data_type: {dtype} dims: [ {', '.join(map(str, dims))} ]{extra} }}"


def _block(kind: str, tensors: Sequence[str]) -> list[str]:
    return [f"{kind} [", ",\n".join(tensors), "]"]


def _batching(batching: Batching, kind: str, preferred: Sequence[int] | None = None) -> list[str]:
    sizes = ", ".join(map(str, preferred if preferred is not None else batching.preferred()))
    return [
        "dynamic_batching {",
        f"  preferred_batch_size: [ {sizes} ]",
        f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {batching.instances} kind: {kind} }} ]",
    ]


def tokenize_config(name: str, batching: Batching, parameters: dict[str, str], inputs: Sequence[str]) -> str:
    """The Python-backend tokenizer: TEXT in, the encoder's token inputs out."""
    dtype = _TYPES[parameters["ids_dtype"]]
    lines = [
        f"name: {_quote(name)}",
        'backend: "python"',
        f"max_batch_size: {batching.max_batch_size}",
        *_block("input", [_tensor(TEXT, "TYPE_STRING", [1])]),
        *_block("output", [_tensor(i, dtype, [-1]) for i in inputs]),
        *_batching(batching, "KIND_CPU"),
        *_parameters(parameters),
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, kw_only=True)
class EncoderSpec:
    """One profile's encoder as Triton sees it: platform or backend, token inputs, output width."""

    encoder: str
    dims: int
    inputs: tuple[str, ...]
    ids_dtype: str = "int64"
    plan_files: tuple[tuple[str, str], ...] = ()  # TensorRT: (compute capability, file) pairs
    preferred: tuple[int, ...] | None = None  # None: the powers of two up to the largest batch
    parameters: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ExportError(f"unknown encoder {self.encoder!r}; choose from {', '.join(ENCODERS)}")


def encoder_config(name: str, spec: EncoderSpec, batching: Batching) -> str:
    """The profile's graph as a Triton model: ONNX Runtime, TensorRT plan, or the Python backend."""
    head = {
        "onnxruntime": ['platform: "onnxruntime_onnx"', 'default_model_filename: "model.onnx"'],
        "tensorrt": ['platform: "tensorrt_plan"'],
        "python": ['backend: "python"'],
    }[spec.encoder]
    if spec.encoder == "tensorrt":
        pairs = ", ".join(f"{{ key: {_quote(cc)} value: {_quote(f)} }}" for cc, f in spec.plan_files)
        head.append(f"cc_model_filenames [ {pairs} ]")
    # ONNX Runtime and the Python encoder take a GPU where one is and the CPU otherwise; TensorRT needs one.
    kind = {"onnxruntime": "KIND_AUTO", "tensorrt": "KIND_GPU", "python": "KIND_CPU"}[spec.encoder]
    lines = [
        f"name: {_quote(name)}",
        *head,
        f"max_batch_size: {batching.max_batch_size}",
        # Only the Python encoder takes requests of different widths in one batch (it pads them itself).
        *_block("input", [_tensor(i, _TYPES[spec.ids_dtype], [-1], spec.encoder == "python") for i in spec.inputs]),
        *_block("output", [_tensor(OUTPUT_NAME, "TYPE_FP32", [spec.dims])]),
        *_batching(batching, kind, spec.preferred),
        *_parameters(dict(spec.parameters)),
    ]
    return "\n".join(lines) + "\n"


def ensemble_config(name: str, tokenize: str, encode: str, dims: int, inputs: Sequence[str], max_batch: int) -> str:
    """TEXT (BYTES, [n, 1]) -> EMBEDDING (FP32, [n, dims]) through the tokenizer and one encoder."""
    token_map = ", ".join(f"{{ key: {_quote(i)} value: {_quote(i)} }}" for i in inputs)
    steps = [
        "  {",
        f"    model_name: {_quote(tokenize)}",
        "    model_version: -1",
        f'    input_map {{ key: "{TEXT}" value: "{TEXT}" }}',
        f"    output_map [ {token_map} ]",
        "  },",
        "  {",
        f"    model_name: {_quote(encode)}",
        "    model_version: -1",
        f"    input_map [ {token_map} ]",
        f"    output_map {{ key: {_quote(OUTPUT_NAME)} value: {_quote(EMBEDDING)} }}",
        "  }",
    ]
    lines = [
        f"name: {_quote(name)}",
        'platform: "ensemble"',
        f"max_batch_size: {max_batch}",
        *_block("input", [_tensor(TEXT, "TYPE_STRING", [1])]),
        *_block("output", [_tensor(EMBEDDING, "TYPE_FP32", [dims])]),
        "ensemble_scheduling {",
        "  step [",
        *("  " + s for s in steps),
        "  ]",
        "}",
    ]
    return "\n".join(lines) + "\n"
