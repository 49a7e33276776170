"""Tokenisation with the `tokenizers` library, reproducing the source model's ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from mrl.runtime.errors import ArtifactError, InputTooLongError, InvalidInputError
from mrl.runtime.manifest import TokenizerSettings

CHARS_PER_TOKEN = 8
"""A long text is first cut to this many characters per token of max length: English runs 4-5 per token."""
DIRECTIONS = ("right", "left")
"""Which end of a long text truncation cuts: "right" keeps its start (the default everywhere), "left" its end."""


def cut_prefix(text: str, chars: int) -> str:
    """The first `chars` characters of `text`, ended before the space that starts the word cut in two.

    Ending before a space keeps every kept word whole, so the tokens of the prefix are the tokens the whole
    text starts with (a cut word could tokenise differently: WordPiece maps a word over 100 characters to
    one unknown token). Only a plain space is a word boundary for every tokenizer: SentencePiece's
    Metaspace keeps tabs and newlines inside words. With no space in its second half, the prefix is cut as is.
    """
    if len(text) <= chars:
        return text
    if text[chars] == " ":
        return text[:chars]
    boundary = text.rfind(" ", chars // 2, chars)
    return text[: boundary if boundary > 0 else chars]


def cut_suffix(text: str, chars: int) -> str:
    """The last `chars` characters of `text`, started after the space that ends the word cut in two (as
    `cut_prefix`, from the other end: its tokens are the tokens the whole text ends with)."""
    if len(text) <= chars:
        return text
    start = len(text) - chars
    if text[start - 1] == " ":
        return text[start:]
    boundary = text.find(" ", start, start + chars // 2)
    return text[boundary + 1 if boundary >= 0 else start :]


def check_settings(tokenizer: Tokenizer, settings: TokenizerSettings) -> None:
    """Refuse settings this tokenizer cannot honour, naming the manifest field: a max length that leaves no
    room for text (tokenizers then silently stops cutting), a pad id outside the vocabulary or not its pad token's."""
    special = tokenizer.num_special_tokens_to_add(False)
    if settings.max_length <= special:
        raise ArtifactError(
            f"manifest.json: tokenizer.max_length {settings.max_length} leaves no room for text: {settings.file} "
            f"adds {special} special tokens to every text"
        )
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if settings.pad_token_id >= vocab:
        raise ArtifactError(
            f"manifest.json: tokenizer.pad_token_id {settings.pad_token_id} is outside the vocabulary of "
            f"{settings.file} ({vocab} tokens)"
        )
    pad = tokenizer.token_to_id(settings.pad_token)
    if pad is not None and pad != settings.pad_token_id:
        raise ArtifactError(
            f"manifest.json: tokenizer.pad_token_id {settings.pad_token_id} is not the id of its pad_token "
            f"{settings.pad_token!r} ({pad} in {settings.file})"
        )


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
        check_settings(tokenizer, settings)
        self.settings = settings
        # One tokenizer per truncation direction: the direction is the tokenizer's own setting, and tokenizers
        # are shared between threads, so it is never switched on one.
        self._tok: dict[str, Tokenizer] = {}
        for direction in DIRECTIONS:
            tok = tokenizer if direction == "right" else Tokenizer.from_str(tokenizer.to_str())
            tok.no_padding()
            tok.enable_truncation(max_length=settings.max_length, direction=direction)
            self._tok[direction] = tok

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

    def check_prompts(self, prompts: Mapping[str, str]) -> None:
        """Refuse a prompt that fills the max length by itself, naming it: every text it is prepended to would
        be refused, or, truncated, cut away whole (the model would embed the prompt alone)."""
        for name, prompt in prompts.items():
            (encoded,) = self.encode([prompt], truncate=True)
            if encoded.truncated or encoded.n_tokens >= self.max_length:
                raise ArtifactError(
                    f"manifest.json: prompts.{name} fills tokenizer.max_length ({self.max_length} tokens) by itself, "
                    "leaving no room for text: shorten the prompt"
                )

    @property
    def first_cut_chars(self) -> int:
        """Characters of a long text tokenised first (more only when they hold fewer than max length tokens)."""
        return self.max_length * CHARS_PER_TOKEN

    def encode(self, texts: Sequence[str], *, truncate: bool = False, direction: str = "right") -> list[Encoded]:
        """Tokenise texts; one longer than max length raises InputTooLongError unless `truncate` cuts it, at its
        end ("right") or its start ("left").

        However long a text, only the part of about what the model can read is tokenised (`cut_prefix`,
        `cut_suffix`), so a 15 MB text costs about what a max-length one costs, and gives the same tokens.
        """
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        if direction not in DIRECTIONS:
            raise InvalidInputError(f"unknown truncation direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"input {i} is {type(t).__name__}, not a string")
        tok, limit = self._tok[direction], self.first_cut_chars
        encodings = dict(
            zip(
                (i for i, t in enumerate(texts) if len(t) <= limit),
                tok.encode_batch([t for t in texts if len(t) <= limit]),
                strict=True,
            )
        )
        out = []
        for i, text in enumerate(texts):
            enc = encodings[i] if i in encodings else self._encode_long(text, direction)
            cut = bool(enc.overflowing)
            if cut and not truncate:
                raise InputTooLongError(
                    f"input {i} is longer than the model's max of {self.max_length} tokens: shorten it or ask "
                    "for truncation (truncate=true)"
                )
            out.append(Encoded(ids=enc.ids, type_ids=enc.type_ids, truncated=cut))
        return out

    def _encode_long(self, text: str, direction: str) -> Any:
        """Tokenise growing parts of `text` (its start, or its end for "left") until one overflows max length (or
        the whole text fits)."""
        cut = cut_prefix if direction == "right" else cut_suffix
        chars = self.first_cut_chars
        while True:
            part = cut(text, chars)
            (enc,) = self._tok[direction].encode_batch([part])  # unlike encode, it lets go of the GIL while it works
            if enc.overflowing or len(part) == len(text):
                return enc
            chars *= 4

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
