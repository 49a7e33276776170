"""Precision transforms of the pooled fp32 graph: fp16 with numerically fragile ops kept fp32, int8 dynamic."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import onnx

from mrl.export.errors import ExportError

# Ops whose fp16 versions overflow or lose too much (TensorRT 11 is strongly typed, so this must be
# decided in the graph): statistics over the hidden dim, exponentials, and reductions.
FP16_KEEP_FP32 = [
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "Pow",
    "Sqrt",
    "Erf",
    "Exp",
    "ArgMax",
    "CumSum",
]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations, fp32 inputs/outputs, fragile ops in fp32 behind casts."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32))
    # The converter appends its casts at the end; ONNX (and TensorRT's parser) want nodes in order.
    converted.topological_sort()
    return converted.model


# What int8 means here (docs/int8.md): dynamic quantisation, activations uint8 per tensor (computed
# per batch), weights int8 per output channel, symmetric, in -64..64 (reduce_range). u8 x s8 is the
# fast pair on VNNI/AMX (1.6x u8 x u8 at batch 32 on AVX512-VNNI, BENCHMARKS.md), but ONNX Runtime's
# u8 x s8 kernel for AVX2 and for AVX-512 without VNNI (vpmaddubsw) adds pairs of products in int16
# with saturation: 255 * 127 * 2 overflows, 255 * 64 * 2 = 32640 does not. With 7-bit weights every
# x86 kernel path computes the same exact int32 sums, so parity checked on one CPU holds on all.
INT8_METHOD = "dynamic: activations uint8 per tensor, weights int8 per channel in -64..64 (reduce_range)"
REDUCE_RANGE = True
"""7-bit weights (see above); recorded in the manifest's `quantization.reduce_range`."""


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name, so that nodes can be kept out of quantisation by name."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"mrl_node_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return model


def to_int8(
    model: onnx.ModelProto,
    workdir: Path,
    *,
    keep_fp32: tuple[str, ...] = (),
    op_types: tuple[str, ...] = ("MatMul",),
) -> onnx.ModelProto:
    """Dynamic int8 quantisation of the weights of `op_types` nodes, per channel in -64..64, except `keep_fp32`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        # copy: saving with external data rewrites the proto it is given
        onnx.save_model(copy.deepcopy(model), str(src), save_as_external_data=True, location="fp32.data")
        try:
            quantize_dynamic(
                src,
                dst,
                op_types_to_quantize=list(op_types),
                nodes_to_exclude=list(keep_fp32),
                per_channel=True,
                reduce_range=REDUCE_RANGE,  # exact on every x86 kernel (see INT8_METHOD)
                weight_type=QuantType.QInt8,
                use_external_data_format=True,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        except Exception as e:  # the quantiser raises untyped errors on graphs it cannot handle
            raise ExportError(f"int8 quantisation failed: {e}") from None
        return onnx.load(str(dst))


def convert(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """The pooled fp32 graph converted to fp32 or fp16."""
    if precision == "fp32":
        return model
    if precision == "fp16":
        return to_fp16(model)
    # int8 is not a plain conversion: it is smoothed and checked (mrl.export.int8.quantise).
    raise ExportError(f"unknown precision {precision!r} for a plain conversion; choose fp32 or fp16")
