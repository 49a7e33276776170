"""Tokenisation with the `tokenizers` library, reproducing the source model's ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from mrl.runtime.errors import ArtifactError, InputTooLongError, InvalidInputError
from mrl.runtime.manifest import TokenizerSettings


@dataclass(frozen=True, kw_only=True)
class Encoded:
    """One tokenised text: its ids (already cut to max length) and whether it was cut."""

    ids: list[int]
    type_ids: list[int]
    truncated: bool

    @property
    def n_tokens(self) -> int:
        """Tokens the model will see, special tokens included."""
        return len(self.ids)


class TextTokenizer:
    """Turns texts into padded model inputs exactly as the exported model expects."""

    def __init__(self, tokenizer: Tokenizer, settings: TokenizerSettings) -> None:
        self.settings = settings
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=settings.max_length)

    @classmethod
    def load(cls, directory: Path, settings: TokenizerSettings) -> TextTokenizer:
        """Load `tokenizer.json` from an artifact directory."""
        path = Path(directory) / settings.file
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise ArtifactError(f"cannot load tokenizer {path}: {e}") from None
        return cls(tok, settings)

    @property
    def max_length(self) -> int:
        """The model's max input length in tokens."""
        return self.settings.max_length

    def encode(self, texts: Sequence[str], *, truncate: bool = False) -> list[Encoded]:
        """Tokenise texts; one longer than max length raises InputTooLongError unless `truncate` cuts it."""
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"input {i} is {type(t).__name__}, not a string")
        encodings = self._tok.encode_batch(list(texts))
        out = []
        for i, enc in enumerate(encodings):
            cut = bool(enc.overflowing)
            if cut and not truncate:
                full = len(enc.ids) + sum(len(o.ids) for o in enc.overflowing)
                raise InputTooLongError(
                    f"input {i} has about {full} tokens, more than the model's max of "
                    f"{self.max_length}: shorten it or ask for truncation (truncate=true)"
                )
            out.append(Encoded(ids=enc.ids, type_ids=enc.type_ids, truncated=cut))
        return out

    def pad(self, encoded: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """Pad to the longest in the batch and build the feed the graph's inputs ask for."""
        n = len(encoded)
        width = max((e.n_tokens for e in encoded), default=0)
        ids = np.full((n, width), self.settings.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        left = self.settings.padding_side == "left"
        for row, e in enumerate(encoded):
            k = e.n_tokens
            span = slice(width - k, width) if left else slice(0, k)
            ids[row, span] = e.ids
            mask[row, span] = 1
            types[row, span] = e.type_ids
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: feed[name] for name in self.settings.inputs}
