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


# What int8 means here: dynamic quantisation (activations uint8 per tensor, computed per batch;
# weights int8 per output channel, full range). u8 x s8 is the fast pair on VNNI/AMX: measured
# 1.6x faster than u8 x u8 at batch 32 on AVX512-VNNI (BENCHMARKS.md).
INT8_METHOD = "dynamic: activations uint8 per tensor, weights int8 per channel"


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
    """Dynamic int8 quantisation of the weights of `op_types` nodes, per channel, except `keep_fp32`."""
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
                weight_type=QuantType.QInt8,
                use_external_data_format=True,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        except Exception as e:  # the quantiser raises untyped errors on graphs it cannot handle
            raise ExportError(f"int8 quantisation failed: {e}") from None
        return onnx.load(str(dst))


def convert(model: onnx.ModelProto, precision: str, workdir: Path) -> onnx.ModelProto:
    """The pooled fp32 graph converted to `precision`."""
    if precision == "fp32":
        return model
    if precision == "fp16":
        return to_fp16(model)
    if precision == "int8":
        return to_int8(model, workdir)
    raise ExportError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
