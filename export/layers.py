"""Layer-truncated encoders: the first L layers of a model, as AdaptiveLayerLoss / Matryoshka2dLoss train them.

sentence-transformers' AdaptiveLayerLoss (and Matryoshka2dLoss, built on it) evaluates depth L by
running the transformer with `output_hidden_states`, taking `hidden_states[L]` (the output of
layer L: no final norm, which transformers applies only to the last entry) as the token
embeddings, and passing them through the rest of the pipeline unchanged: Pooling with the same
attention mask, then any Dense layers. `reference_embeddings` reproduces that call exactly;
`first_layers` builds the cheaper module the graph is exported from, which really runs only L
layers; parity holds the one against the other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrl.export.errors import ExportError

LAYER_LOSSES = ("Matryoshka2dLoss", "AdaptiveLayerLoss")
# sentence-transformers' model card: "* Loss: [<code>Name</code>](...) with these parameters:" and a JSON block.
_CARD_LOSS = re.compile(r"<code>(?:[\w.]*\.)?(" + "|".join(LAYER_LOSSES) + r")</code>")
_CARD_JSON = re.compile(r"```json\s*(\{.*?\})\s*```", re.S)


def total_layers(st_model: Any) -> int | None:
    """The number of layers of the pipeline's transformer, from its config (None where it does not say)."""
    config = st_model[0].auto_model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def layer_stack(auto_model: Any, total: int) -> Any:
    """The ModuleList holding the model's `total` layers (the first of that length, as transformers nests them)."""
    import torch

    for _, module in auto_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == total:
            return module
    raise ExportError(
        f"cannot find the {total} layers of this {type(auto_model).__name__} as one module list, so it cannot be "
        "cut to its first layers; export it without --layers"
    )


@dataclass
class LayerOutput:
    """The last kept layer's output of the current forward pass (what `hidden_states[L]` records)."""

    value: Any = None


@contextmanager
def first_layers(st_model: Any, layers: int) -> Iterator[LayerOutput]:
    """While open, the pipeline's transformer runs only its first `layers` layers; yields their output.

    The layers after L are removed from their module list (and put back on exit), so an export
    traced inside holds only L layers. The model's own final norm still runs on layer L's output
    but nothing reads it, so the exporter drops it: the yielded output is what training used.
    """
    auto_model = st_model[0].auto_model
    stack = layer_stack(auto_model, total_layers(st_model) or 0)
    out = LayerOutput()

    def keep(_module: Any, _args: Any, output: Any) -> None:
        # transformers records hidden states from the same place: a layer's first output.
        out.value = output[0] if isinstance(output, tuple) else output

    removed = list(stack[layers:])
    del stack[layers:]
    handle = stack[layers - 1].register_forward_hook(keep)
    try:
        yield out
    finally:
        handle.remove()
        stack.extend(removed)


def reference_embeddings(st_model: Any, texts: list[str], layers: int, batch_size: int = 8) -> np.ndarray:
    """The pipeline's output at depth `layers`, computed the way AdaptiveLayerLoss computes it in training."""
    transformer = st_model[0]
    config = transformer.auto_model.config
    original, had_hidden = transformer.forward, config.output_hidden_states

    def at_depth(features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        features = original(features, **kwargs)
        return {**features, "token_embeddings": features["all_layer_embeddings"][layers]}

    config.output_hidden_states = True
    transformer.forward = at_depth
    try:
        # prompt="": as the graph runs it is compared with, whatever default prompt the model names.
        return st_model.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False, prompt=""
        )
    finally:
        del transformer.forward  # the instance attribute; the class's forward shows through again
        config.output_hidden_states = had_hidden


def trained_layers_from_card(path: Path, total: int | None) -> tuple[int, ...] | None:
    """The depths a model card says the model was trained at: every one of 1..total under a layer loss.

    AdaptiveLayerLoss draws its prior layers from all of them each step (`n_layers_per_step`), so
    every depth is trained, unless its card shows the prior layers weighted zero.
    """
    card = path / "README.md"
    if total is None or not card.is_file():
        return None
    text = card.read_text(errors="replace")
    match = _CARD_LOSS.search(text)
    if match is None:
        return None
    args = _card_arguments(text[match.end() :])
    distilled = args.get("kl_div_weight", 1) and args.get("kl_temperature", 1)
    if not args.get("prior_layers_weight", 1) and not distilled:
        return (total,)
    return tuple(range(1, total + 1))


def _card_arguments(after: str) -> dict[str, Any]:
    """The JSON parameters printed right after a loss's name on the card, if any."""
    match = _CARD_JSON.match(after[after.find("```") :]) if "```" in after[:300] else None
    if match is None:
        return {}
    try:
        value = json.loads(match.group(1))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
