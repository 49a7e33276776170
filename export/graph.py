"""Build ONNX graphs: the pooled encoder from torch, and the MRL head (slice + L2 normalise) appended to it."""

from __future__ import annotations

import copy
import hashlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from mrl.export.errors import ExportError
from mrl.export.layers import LayerOutput, first_layers
from mrl.runtime.manifest import OUTPUT_NAME

POOLED = "mrl_pooled"  # the base graph's one output: [batch, full_dims], before truncation
EXPORTERS = ("auto", "legacy", "dynamo")
_AXES = {0: "batch", 1: "sequence"}


def _pooled_module(st_model: Any, layer_output: LayerOutput | None = None) -> Any:
    """The sentence-transformers pipeline minus Normalize, as a module taking positional tensors.

    With `layer_output`, the token embeddings the later stages see are that layer's output, not
    the transformer's last hidden state (see mrl.export.layers).
    """
    import torch
    from sentence_transformers.base.modules import Normalize

    class PooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Normalize is dropped: the head normalises after truncation, which is what matters.
            self.stages = torch.nn.ModuleList(m for m in st_model if not isinstance(m, Normalize))

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            features: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                features["token_type_ids"] = token_type_ids
            for i, stage in enumerate(self.stages):
                features = stage(features)
                if i == 0 and layer_output is not None:
                    features["token_embeddings"] = layer_output.value
            return features["sentence_embedding"]

    return PooledEncoder().eval()


def _sample_inputs(st_model: Any, inputs: tuple[str, ...]) -> tuple[Any, ...]:
    texts = ["a short one", "a somewhat longer sentence to trace with, so the batch needs padding"]
    features = st_model.tokenizer(texts, padding=True, return_tensors="pt")
    return tuple(features[name] for name in inputs)


def export_pooled_encoder(
    st_model: Any, inputs: tuple[str, ...], exporter: str, workdir: Path, layers: int | None = None
) -> onnx.ModelProto:
    """torch.onnx.export the pooled encoder (fp32) with dynamic batch and sequence axes.

    `layers`: keep only the model's first layers, as AdaptiveLayerLoss evaluates them (None: all).
    """
    transformer = st_model[0].auto_model
    if exporter == "legacy" and hasattr(transformer, "set_attn_implementation"):
        # Eager attention traces to plain MatMul/Softmax, which the legacy exporter handles and
        # ONNX Runtime fuses; measured faster on CPU than sdpa through the dynamo exporter.
        transformer.set_attn_implementation("eager")
    path = workdir / f"pooled-{exporter}-{'all' if layers is None else layers}.onnx"
    with nullcontext() if layers is None else first_layers(st_model, layers) as output:
        _trace(_pooled_module(st_model, output), _sample_inputs(st_model, inputs), inputs, exporter, path)
    return onnx.load(str(path))


def _trace(module: Any, args: tuple[Any, ...], inputs: tuple[str, ...], exporter: str, path: Path) -> None:
    import torch

    with torch.inference_mode(False), torch.no_grad():
        if exporter == "legacy":
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=list(inputs),
                output_names=[POOLED],
                dynamic_axes={**{n: _AXES for n in inputs}, POOLED: {0: "batch"}},
            )
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=18,
                input_names=list(inputs),
                output_names=[POOLED],
                dynamic_shapes={name: {0: batch, 1: seq} for name in inputs},
            )
            program.save(str(path), external_data=True)


def _const(name: str, values: Any, dtype: Any = np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _rename_output(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]
    for out in model.graph.output:
        if out.name == old:
            out.name = new


def pool_token_states(model: onnx.ModelProto, hidden: str, pooling: str) -> onnx.ModelProto:
    """Append pooling of `hidden` [batch, seq, width] by `attention_mask`; the one output is POOLED."""
    model = copy.deepcopy(model)
    g = model.graph
    p = "mrl_pool/"
    nodes = [
        helper.make_node("Cast", ["attention_mask"], [p + "mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [p + "mask", p + "axis2"], [p + "mask3"]),
    ]
    inits = [_const(p + "axis1", [1]), _const(p + "axis2", [2])]
    if pooling == "mean":
        inits.append(_const(p + "eps", 1e-9, np.float32))
        nodes += [
            helper.make_node("Mul", [hidden, p + "mask3"], [p + "masked"]),
            helper.make_node("ReduceSum", [p + "masked", p + "axis1"], [p + "sum"], keepdims=0),
            helper.make_node("ReduceSum", [p + "mask3", p + "axis1"], [p + "count"], keepdims=0),
            helper.make_node("Max", [p + "count", p + "eps"], [p + "count_safe"]),
            helper.make_node("Div", [p + "sum", p + "count_safe"], [POOLED]),
        ]
    elif pooling == "cls":
        inits.append(_const(p + "zero", 0))
        nodes = [helper.make_node("Gather", [hidden, p + "zero"], [POOLED], axis=1)]
    elif pooling == "lasttoken":
        # The last attended position, whichever side was padded: argmax of mask * (1..seq).
        nodes += [
            helper.make_node("Shape", ["attention_mask"], [p + "shape"]),
            helper.make_node("ConstantOfShape", [p + "shape"], [p + "ones"], value=_const("", [1])),
            helper.make_node("CumSum", [p + "ones", p + "axis1"], [p + "pos"]),
            helper.make_node("Mul", ["attention_mask", p + "pos"], [p + "weighted"]),
            helper.make_node("ArgMax", [p + "weighted"], [p + "last"], axis=1, keepdims=1),
            helper.make_node("Add", [p + "last", p + "one"], [p + "last1"]),
            helper.make_node("Equal", [p + "pos", p + "last1"], [p + "onehot_b"]),
            helper.make_node("Cast", [p + "onehot_b"], [p + "onehot"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [p + "onehot", p + "axis2"], [p + "onehot3"]),
            helper.make_node("Mul", [hidden, p + "onehot3"], [p + "picked"]),
            helper.make_node("ReduceSum", [p + "picked", p + "axis1"], [POOLED], keepdims=0),
        ]
        inits.append(_const(p + "one", [1]))
    elif pooling == "max":
        inits.append(_const(p + "big", 1e9, np.float32))
        inits.append(_const(p + "onef", 1.0, np.float32))
        nodes += [
            helper.make_node("Sub", [p + "onef", p + "mask3"], [p + "pad"]),
            helper.make_node("Mul", [p + "pad", p + "big"], [p + "penalty"]),
            helper.make_node("Sub", [hidden, p + "penalty"], [p + "masked"]),
            helper.make_node("ReduceMax", [p + "masked"], [POOLED], axes=[1], keepdims=0),
        ]
        if _opset(model) >= 18:
            nodes[-1] = helper.make_node("ReduceMax", [p + "masked", p + "axis1"], [POOLED], keepdims=0)
    else:
        raise ExportError(f"pooling {pooling!r} cannot be added to an ONNX encoder; use mean, cls, max or lasttoken")
    g.node.extend(nodes)
    g.initializer.extend(inits)
    width = _dim(g, hidden, 2)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(POOLED, TensorProto.FLOAT, ["batch", width]))
    return model


def use_as_pooled(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """Keep only `output` ([batch, width], already pooled) as the graph's output, named POOLED."""
    model = copy.deepcopy(model)
    width = _dim(model.graph, output, 1)
    _rename_output(model, output, POOLED)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(POOLED, TensorProto.FLOAT, ["batch", width]))
    return model


def _dim(graph: onnx.GraphProto, name: str, axis: int) -> int | str:
    for info in list(graph.output) + list(graph.value_info):
        if info.name == name:
            d = info.type.tensor_type.shape.dim[axis]
            return d.dim_value if d.HasField("dim_value") else (d.dim_param or "width")
    return "width"


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def append_mrl_head(base: onnx.ModelProto, dims: int) -> onnx.ModelProto:
    """Append Cast to fp32 -> slice [:, :dims] -> L2 normalise; the output is `sentence_embedding`."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    p = "mrl_head/"
    g.initializer.extend(
        [
            _const(p + "starts", [0]),
            _const(p + "ends", [dims]),
            _const(p + "axes", [1]),
            _const(p + "eps", 1e-12, np.float32),
        ]
    )
    # Truncate first, then normalise (a truncated unit vector is not a unit vector), all in fp32 so
    # that an fp16 graph's sum of squares cannot overflow.
    g.node.extend(
        [
            helper.make_node("Cast", [POOLED], [p + "pooled32"], to=TensorProto.FLOAT),
            helper.make_node("Slice", [p + "pooled32", p + "starts", p + "ends", p + "axes"], [p + "cut"]),
            helper.make_node("Mul", [p + "cut", p + "cut"], [p + "sq"]),
            helper.make_node("ReduceSum", [p + "sq", p + "axes"], [p + "sumsq"], keepdims=1),
            helper.make_node("Sqrt", [p + "sumsq"], [p + "norm"]),
            helper.make_node("Max", [p + "norm", p + "eps"], [p + "norm_safe"]),
            helper.make_node("Div", [p + "cut", p + "norm_safe"], [OUTPUT_NAME]),
        ]
    )
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", dims]))
    return model


class SharedWeights:
    """One external-data file for all graphs of one precision; a tensor several graphs hold is stored once.

    Profiles of different dims share every weight, and profiles that keep fewer layers share the
    layers they keep: deduplicating by content makes both cost (almost) no extra disk.
    """

    ALIGN = 4096  # page-aligned offsets, so a runtime may map tensors instead of copying them
    MIN_BYTES = 1024  # smaller tensors stay inside the graph

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stored: dict[bytes, tuple[int, int]] = {}
        path.write_bytes(b"")

    def externalise(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` whose large initializers point into this file, appending those it lacks."""
        model = copy.deepcopy(model)
        with open(self.path, "ab") as f:
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < self.MIN_BYTES:
                    continue
                data = tensor.raw_data
                key = hashlib.sha256(data).digest()
                if key not in self._stored:
                    f.write(b"\0" * (-f.tell() % self.ALIGN))
                    self._stored[key] = (f.tell(), len(data))
                    f.write(data)
                offset, length = self._stored[key]
                external_data_helper.set_external_data(tensor, self.path.name, offset=offset, length=length)
                tensor.ClearField("raw_data")
        return model


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Write a graph whose large tensors already point at a shared external-data file, and check it."""
    onnx.save_model(model, str(path))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph {path.name} is not valid ONNX: {e}") from None
