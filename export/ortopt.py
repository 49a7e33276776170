"""ONNX Runtime's transformer optimizer as part of export: fused CPU graphs beside the portable ones.

The fused graph uses ONNX Runtime contrib ops (Attention, EmbedLayerNormalization, BiasGelu, and
QAttention once quantised), so it is for ONNX Runtime's CPU provider only; TensorRT and other
runtimes keep the portable graph. Attention is fused with the raw 2-D attention mask
(`use_raw_attention_mask`): the default mask-index form assumes right padding and gives wrong
vectors for left-padded models. SkipLayerNormalization is left unfused (see `fusion_options`).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from mrl.export.errors import ExportError

log = logging.getLogger(__name__)

# onnxruntime 1.30 and older match no attention in graphs that transformers 5 and torch's legacy
# exporter write (checked: they fuse nothing, silently); 1.31 fuses every layer.
MIN_VERSION = (1, 31)
CONTRIB = "com.microsoft"


@dataclass(frozen=True, kw_only=True)
class Optimized:
    """The optimizer's result: the graph when attention fused in every layer, else why not."""

    model: onnx.ModelProto | None
    fusions: dict[str, int] = field(default_factory=dict)
    reason: str = ""


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "1.32.0" or "1.31.0.dev2025"."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


def check_fusing_support(version: str | None = None) -> str:
    """The installed onnxruntime's version, or ExportError when it is too old to fuse attention."""
    if version is None:
        import onnxruntime

        version = onnxruntime.__version__
    if version_tuple(version) < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise ExportError(
            f"onnxruntime {version} is too old to fuse attention in graphs exported from transformers 5 "
            f"(its optimizer matches nothing and would write an unfused 'optimised' graph): "
            f"pip install 'onnxruntime>={need}', or export with --ort-cpu portable"
        )
    return version


def attention_shape(config: Mapping[str, Any] | None) -> tuple[int, int]:
    """(num_heads, hidden_size) from a transformers config; (0, 0) lets the optimizer guess."""
    if not config:
        return 0, 0
    config = config.get("text_config", config)
    return int(config.get("num_attention_heads") or 0), int(config.get("hidden_size") or 0)


def fusion_options() -> Any:
    """BERT fusions with the raw attention mask, and no SkipLayerNormalization.

    Measured on ONNX Runtime 1.32's CPU provider (BENCHMARKS.md): its SkipLayerNormalization kernel
    took 650 us on a [32, 21, 384] input where Add + LayerNormalization took 180 us.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    return options


def optimize(model: onnx.ModelProto, config: Mapping[str, Any] | None) -> Optimized:
    """Run ONNX Runtime's BERT optimizer over a pooled fp32 graph; keep it only if every layer's attention fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = attention_shape(config)
    # One Softmax per attention layer in the eager-attention graphs the exporters write.
    layers = sum(1 for n in model.graph.node if n.op_type == "Softmax")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pooled.onnx"
        # a copy: saving with external data rewrites the proto it is given
        onnx.save_model(copy.deepcopy(model), str(path), save_as_external_data=True, location="pooled.data")
        try:
            optimized = optimize_model(
                str(path),
                model_type="bert",
                num_heads=heads,
                hidden_size=hidden,
                optimization_options=fusion_options(),
                opt_level=0,  # the optimizer's own fusions only; the session applies its generic ones at load
            )
        except Exception as e:  # the optimizer raises untyped errors on graphs it cannot read
            return Optimized(model=None, reason=f"the optimizer failed: {type(e).__name__}: {e}")
        fusions = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
        graph = optimized.model
        if not any(o.domain == CONTRIB for o in graph.opset_import):
            graph.opset_import.append(onnx.helper.make_opsetid(CONTRIB, 1))
        onnx.load_external_data_for_model(graph, tmp)  # keep the tensors once the folder is gone
    attention = fusions.get("Attention", 0)
    model_type = (config or {}).get("model_type", "this")
    if attention == 0:
        return Optimized(model=None, fusions=fusions, reason=f"the optimizer fuses no attention in {model_type} graphs")
    if layers and attention != layers:
        return Optimized(model=None, fusions=fusions, reason=f"attention fused in {attention} of {layers} layers only")
    return Optimized(model=graph, fusions=fusions, reason=f"attention fused in all {attention} layers")
