"""Resolve MODEL (a directory, an installed model package, a model id) and load it for export."""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

from mrl.export.errors import ExportError
from mrl.export.layers import total_layers, trained_layers_from_card
from mrl.export.onnx_source import load_onnx_source
from mrl.export.source_model import SourceModel, hash_model_dir, trained_dims_from_card

POOLINGS = ("mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens")


def resolve_model_path(model: str) -> Path:
    """A local directory for MODEL: a path, an installed model package, or a cached model id."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"{model} is a file; give the model's directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ExportError(f"{model} is not readable")
        return path.resolve()
    package = _installed_model_package(model)
    if package is not None:
        return package
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return _cached_model_id(model)
    raise ExportError(f"{model} is not a directory, an installed model package or a model id (owner/name)")


def _installed_model_package(name: str) -> Path | None:
    module_name = name.replace("-", "_")
    if not module_name.isidentifier():
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    getter = getattr(module, "get_model_path", None)
    if getter is None:
        raise ExportError(f"package {name} is installed but has no get_model_path(): not a model package")
    return Path(getter()).resolve()


def _cached_model_id(model_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:
        raise ExportError(
            f"model id {model_id} is not in the local Hugging Face cache and this machine does not "
            "download models: download it where a hub is reachable, or give a local directory"
        ) from None


def load_source(
    model: str,
    *,
    pooling: str | None = None,
    max_length: int | None = None,
    trained_dims: tuple[int, ...] | None = None,
    trained_layers: tuple[int, ...] | None = None,
) -> SourceModel:
    """Load MODEL for export, choosing the route by what its directory holds."""
    path = resolve_model_path(model)
    if pooling is not None and pooling not in POOLINGS:
        raise ExportError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    if any(path.glob("*.onnx")) and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        source = load_onnx_source(path, pooling=pooling, max_length=max_length)
    elif (path / "modules.json").is_file():
        source = _load_sentence_transformer(path, pooling=pooling, max_length=max_length)
    elif (path / "config.json").is_file():
        source = _load_transformers(path, pooling=pooling or "mean", max_length=max_length)
    else:
        raise ExportError(
            f"{path} holds no model: expected a sentence-transformers directory (modules.json), "
            "a transformers directory (config.json and weights) or an ONNX encoder (*.onnx)"
        )
    source.trained_dims = trained_dims or source.trained_dims or trained_dims_from_card(path)
    source.trained_layers = trained_layers or trained_layers_from_card(path, source.total_layers)
    if source.trained_layers and source.total_layers and max(source.trained_layers) > source.total_layers:
        raise ExportError(
            f"trained layers {max(source.trained_layers)} is above the model's {source.total_layers} layers"
        )
    if not Path(model).expanduser().exists():
        source.name = model.rsplit("/", 1)[-1]  # a package name or model id names it better than its folder
    return source


def _check_encoder_config(path: Path) -> None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path / 'config.json'}: {e}") from None
    if config.get("is_encoder_decoder"):
        raise ExportError(
            f"{path} is an encoder-decoder model ({config.get('model_type')}); "
            "export needs a text encoder whose hidden states are pooled"
        )
    if "vocab_size" not in config and "text_config" not in config:
        raise ExportError(f"{path} is not a text encoder (its config has no vocab_size)")


def _load_sentence_transformer(path: Path, *, pooling: str | None, max_length: int | None) -> SourceModel:
    from sentence_transformers import SentenceTransformer

    if (path / "config.json").is_file():
        _check_encoder_config(path)
    try:
        st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    except Exception as e:
        raise ExportError(f"cannot load {path} as a sentence-transformers model: {e}") from None
    if pooling is not None:
        raise ExportError("--pooling is for transformers directories; this model defines its own pooling")
    return _describe(st, path, kind="sentence-transformers", max_length=max_length)


def _load_transformers(path: Path, *, pooling: str, max_length: int | None) -> SourceModel:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    _check_encoder_config(path)
    try:
        transformer = Transformer(str(path), model_kwargs={"local_files_only": True})
        pool = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
        st = SentenceTransformer(modules=[transformer, pool], device="cpu")
    except Exception as e:
        raise ExportError(f"cannot load {path} as a transformers encoder: {e}") from None
    return _describe(st, path, kind="transformers", max_length=max_length)


def _describe(st: Any, path: Path, *, kind: str, max_length: int | None) -> SourceModel:
    from sentence_transformers.sentence_transformer.modules import Pooling

    supported = {"Transformer", "Pooling", "Dense", "Normalize", "LayerNorm", "Dropout"}
    names = [type(m).__name__ for m in st]
    if not names or names[0] != "Transformer" or not set(names) <= supported:
        raise ExportError(
            f"{path} is a {' -> '.join(names)} pipeline; export supports Transformer -> Pooling -> "
            "Dense/LayerNorm -> Normalize"
        )
    pools = [m for m in st if isinstance(m, Pooling)]
    if not pools:
        raise ExportError(f"{path} has no Pooling module: its output is per token, not one vector")
    pool = pools[0]
    mode = pool.pooling_mode if isinstance(pool.pooling_mode, str) else "+".join(pool.pooling_mode)
    if not pool.include_prompt and st.prompts and any(st.prompts.values()):
        raise ExportError(f"{path} pools without its prompt tokens (include_prompt=False): not supported")
    tok = st.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{path} has no fast tokenizer (tokenizer.json), which the runtime needs")
    length = max_length or st.max_seq_length or getattr(tok, "model_max_length", None)
    if not length or length > 1_000_000:
        raise ExportError(f"{path} does not say its max sequence length: pass --max-length")
    names_wanted = ("input_ids", "attention_mask", "token_type_ids")
    inputs = tuple(n for n in names_wanted if n in tok.model_input_names)
    if tok.pad_token_id is None:
        raise ExportError(f"{path}'s tokenizer has no pad token, so batches cannot be padded")
    st.max_seq_length = length
    return SourceModel(
        kind=kind,
        name=path.name,
        path=path,
        sha256=hash_model_dir(path),
        pooling=mode,
        max_length=int(length),
        full_dims=int(getattr(st, "get_embedding_dimension", st.get_sentence_embedding_dimension)()),
        inputs=inputs,
        tokenizer_json=backend.to_str(),
        padding_side=tok.padding_side,
        pad_token_id=int(tok.pad_token_id),
        pad_token=str(tok.pad_token),
        prompts={k: v for k, v in (st.prompts or {}).items()},
        default_prompt=st.default_prompt_name,
        total_layers=total_layers(st),
        st_model=st.eval(),
    )
