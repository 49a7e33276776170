"""The second route in: an existing ONNX encoder directory (e.g. written by Optimum's exporter)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from mrl.export.errors import ExportError
from mrl.export.graph import pool_token_states, use_as_pooled
from mrl.export.source_model import SourceModel, hash_model_dir, trained_dims_from_card
from mrl.runtime.manifest import TokenizerSettings
from mrl.runtime.tokenize import TextTokenizer

POOLED_OUTPUTS = ("sentence_embedding", "pooler_output_mean")
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None


def _graph_file(path: Path) -> Path:
    graphs = sorted(path.glob("*.onnx"))
    named = [g for g in graphs if g.name == "model.onnx"]
    if len(named) == 1 or len(graphs) == 1:
        return (named or graphs)[0]
    raise ExportError(f"{path} holds several ONNX graphs ({', '.join(g.name for g in graphs)}); keep one")


def _pooling_from_dir(path: Path) -> str | None:
    config = _read_json(path / "1_Pooling" / "config.json")
    if "pooling_mode" in config:
        return config["pooling_mode"]
    modes = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }
    return next((m for m, key in modes.items() if config.get(key)), None)


def load_onnx_source(path: Path, *, pooling: str | None, max_length: int | None) -> SourceModel:
    """Describe an ONNX encoder directory: graph, tokenizer, pooling and max length."""
    graph_file = _graph_file(path)
    try:
        model = onnx.load(str(graph_file), load_external_data=False)
    except Exception as e:
        raise ExportError(f"cannot read {graph_file}: {e}") from None
    inputs = tuple(i.name for i in model.graph.input)
    if "input_ids" not in inputs or "attention_mask" not in inputs:
        raise ExportError(f"{graph_file} is not a text encoder: its inputs are {', '.join(inputs)}")
    outputs = [o.name for o in model.graph.output]
    if not any(o in outputs for o in POOLED_OUTPUTS + TOKEN_OUTPUTS):
        raise ExportError(f"{graph_file} has no last_hidden_state or sentence_embedding output: {outputs}")
    if not (path / "tokenizer.json").is_file():
        raise ExportError(f"{path} has no tokenizer.json, which the runtime needs")
    tok_config = _read_json(path / "tokenizer_config.json")
    st_config = _read_json(path / "sentence_bert_config.json")
    model_config = _read_json(path / "config.json")
    length = max_length or st_config.get("max_seq_length") or tok_config.get("model_max_length")
    if not length or length > 1_000_000:
        length = model_config.get("max_position_embeddings")
    if not length:
        raise ExportError(f"{path} does not say its max sequence length: pass --max-length")
    pooled_output = next((o for o in POOLED_OUTPUTS if o in outputs), None)
    mode = "model" if pooled_output else (pooling or _pooling_from_dir(path) or "mean")
    tokenizer_json = (path / "tokenizer.json").read_text()
    pad_token = tok_config.get("pad_token") or "[PAD]"
    pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
    from tokenizers import Tokenizer

    pad_id = Tokenizer.from_str(tokenizer_json).token_to_id(pad_token)
    width = _output_width(model, pooled_output or next(o for o in TOKEN_OUTPUTS if o in outputs))
    return SourceModel(
        kind="onnx",
        name=path.name,
        path=path,
        sha256=hash_model_dir(path),
        pooling=mode,
        max_length=int(length),
        full_dims=width or int(model_config.get("hidden_size", 0)),
        inputs=tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in inputs),
        tokenizer_json=tokenizer_json,
        padding_side=tok_config.get("padding_side", "right"),
        pad_token_id=0 if pad_id is None else pad_id,
        pad_token=pad_token,
        trained_dims=trained_dims_from_card(path),
        total_layers=model_config.get("num_hidden_layers"),
        onnx_file=graph_file,
    )


def _output_width(model: onnx.ModelProto, name: str) -> int:
    out = next(o for o in model.graph.output if o.name == name)
    dim = out.type.tensor_type.shape.dim[-1]
    return dim.dim_value if dim.HasField("dim_value") else 0


def pooled_graph(source: SourceModel) -> onnx.ModelProto:
    """The source encoder with pooling appended (or its pooled output kept): output POOLED."""
    model = onnx.load(str(source.onnx_file))
    outputs = [o.name for o in model.graph.output]
    if source.pooling == "model":
        return use_as_pooled(model, next(o for o in POOLED_OUTPUTS if o in outputs))
    return pool_token_states(model, next(o for o in TOKEN_OUTPUTS if o in outputs), source.pooling)


def reference_embeddings(source: SourceModel, texts: list[str]) -> np.ndarray:
    """The source graph's own output, pooled in numpy: what the exported profiles must match."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    session = ort.InferenceSession(str(source.onnx_file), providers=["CPUExecutionProvider"])
    settings = TokenizerSettings(
        max_length=source.max_length,
        padding_side=source.padding_side,
        pad_token_id=source.pad_token_id,
        pad_token=source.pad_token,
        inputs=source.inputs,
    )
    tokenizer = TextTokenizer(Tokenizer.from_str(source.tokenizer_json), settings)
    names = [o.name for o in session.get_outputs()]
    rows = []
    for text in texts:  # one at a time: no padding, so the reference cannot be skewed by it
        feed = tokenizer.pad(tokenizer.encode([text], truncate=True))
        if source.pooling == "model":
            rows.append(session.run([next(o for o in POOLED_OUTPUTS if o in names)], feed)[0][0])
            continue
        hidden = session.run([next(o for o in TOKEN_OUTPUTS if o in names)], feed)[0][0]
        rows.append(_pool(hidden, source.pooling))
    return np.stack(rows).astype(np.float32)


def _pool(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """Pool one unpadded sequence [seq, width]."""
    if pooling == "mean":
        return hidden.mean(axis=0)
    if pooling == "cls":
        return hidden[0]
    if pooling == "max":
        return hidden.max(axis=0)
    if pooling == "lasttoken":
        return hidden[-1]
    raise ExportError(f"pooling {pooling!r} is not supported for ONNX encoders")
