"""Triton Python-backend model `NAME_tokenize`, written by `mrl-export triton` as `1/model.py`.

Texts (`TEXT`, BYTES, `[n, 1]` per request) in; `input_ids`, `attention_mask` (and
`token_type_ids` where the model takes them) out, padded to the longest text of everything this
call runs, so the encoder's batcher can merge the requests. It reproduces the artifact's tokenizer
(`1/tokenizer.json` through the `tokenizers` library) and needs nothing else in Triton's Python
than numpy and `tokenizers`.

Settings are the `parameters` of config.pbtxt (max_length, pad_token_id, padding_side, outputs,
ids_dtype, prompts, default_prompt_name, truncate). A request may override two of them with KServe
v2 request parameters: `prompt_name` (a name from `prompts`, or "" for none) and `truncate` (bool).
A text longer than max_length fails its request unless truncation is on: never cut silently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

try:  # present inside Triton's Python backend; absent where tests import this file directly
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None


CHARS_PER_TOKEN = 8  # a long text is first cut to this many characters per token of max length, as mrl.runtime does


def cut_prefix(text: str, chars: int) -> str:
    """The first `chars` characters of `text`, ended before a space so every kept word stays whole."""
    if len(text) <= chars:
        return text
    if text[chars] == " ":
        return text[:chars]
    boundary = text.rfind(" ", chars // 2, chars)
    return text[: boundary if boundary > 0 else chars]


class RequestError(ValueError):
    """A request this model cannot serve; the message goes back to the caller."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The tokenizer settings config.pbtxt records, read once at load time."""

    max_length: int
    pad_token_id: int = 0
    padding_side: str = "right"
    outputs: tuple[str, ...] = ("input_ids", "attention_mask")
    ids_dtype: str = "int64"
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str = ""
    truncate: bool = False

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> Settings:
        """Settings from config.pbtxt's `parameters` (every value a string there)."""
        return cls(
            max_length=int(parameters["max_length"]),
            pad_token_id=int(parameters.get("pad_token_id", "0")),
            padding_side=parameters.get("padding_side", "right"),
            outputs=tuple(parameters.get("outputs", "input_ids,attention_mask").split(",")),
            ids_dtype=parameters.get("ids_dtype", "int64"),
            prompts=json.loads(parameters.get("prompts", "{}")),
            default_prompt_name=parameters.get("default_prompt_name", ""),
            truncate=parameters.get("truncate", "false").lower() == "true",
        )


class TextEncoder:
    """Prompt, tokenise and pad texts exactly as the artifact's runtime does."""

    def __init__(self, tokenizer: Tokenizer, settings: Settings) -> None:
        self.settings = settings
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=settings.max_length)

    def request_options(self, parameters: dict[str, Any]) -> tuple[str, bool]:
        """The prompt name and truncation a request asks for, defaults filled in."""
        prompt = parameters.get("prompt_name", self.settings.default_prompt_name)
        truncate = parameters.get("truncate", self.settings.truncate)
        if not isinstance(prompt, str):
            raise RequestError(f"parameter prompt_name must be a string, not {prompt!r}")
        if not isinstance(truncate, bool):
            raise RequestError(f"parameter truncate must be true or false, not {truncate!r}")
        if prompt and prompt not in self.settings.prompts:
            known = ", ".join(sorted(self.settings.prompts)) or "none"
            raise RequestError(f"unknown prompt_name {prompt!r}; this model's prompts: {known}")
        return prompt, truncate

    def encode(self, texts: Sequence[str], prompt_name: str, truncate: bool) -> list[Encoding]:
        """Tokenise one request's texts; an empty or over-long text (without truncation) fails the request."""
        for i, text in enumerate(texts):
            if not text:
                raise RequestError(f"text {i} is empty")
        prefix = self.settings.prompts.get(prompt_name, "") if prompt_name else ""
        # However long a text, only about what the model can read is tokenised: the same tokens, bounded cost.
        limit = self.settings.max_length * CHARS_PER_TOKEN
        prompted = [prefix + t for t in texts]
        short = [i for i, t in enumerate(prompted) if len(t) <= limit]
        encodings = dict(zip(short, self._tok.encode_batch([prompted[i] for i in short]), strict=True))
        out = []
        for i, text in enumerate(prompted):
            enc = encodings[i] if i in encodings else self._encode_long(text, limit)
            if enc.overflowing and not truncate:
                raise RequestError(
                    f"text {i} is longer than the model's max of {self.settings.max_length} tokens: shorten it "
                    "or send the request parameter truncate=true"
                )
            out.append(enc)
        return out

    def _encode_long(self, text: str, chars: int) -> Encoding:
        """Tokenise growing prefixes of `text` until one overflows max length (or the whole text fits)."""
        while True:
            prefix = cut_prefix(text, chars)
            enc = self._tok.encode(prefix)
            if enc.overflowing or len(prefix) == len(text):
                return enc
            chars *= 4

    def pad(self, encodings: Sequence[Encoding], width: int) -> dict[str, np.ndarray]:
        """The model inputs for one request, padded to `width` tokens."""
        n = len(encodings)
        dtype = np.dtype(self.settings.ids_dtype)
        ids = np.full((n, width), self.settings.pad_token_id, dtype=dtype)
        mask = np.zeros((n, width), dtype=dtype)
        types = np.zeros((n, width), dtype=dtype)
        left = self.settings.padding_side == "left"
        for row, enc in enumerate(encodings):
            k = len(enc.ids)
            span = slice(width - k, width) if left else slice(0, k)
            ids[row, span] = enc.ids
            mask[row, span] = 1
            types[row, span] = enc.type_ids
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: feed[name] for name in self.settings.outputs}


def decode_texts(array: np.ndarray) -> list[str]:
    """UTF-8 texts from a BYTES tensor of shape [n, 1] (or [n])."""
    texts = []
    for i, item in enumerate(array.reshape(-1)):
        raw = item if isinstance(item, bytes) else str(item).encode()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(f"text {i} is not valid UTF-8") from None
    return texts


def request_parameters(request: Any) -> dict[str, Any]:
    """A request's KServe v2 parameters as a dict ({} where the backend passes none)."""
    getter = getattr(request, "parameters", None)
    raw = getter() if callable(getter) else ""
    return json.loads(raw) if raw else {}


class TritonPythonModel:
    """The Python-backend entry points."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load tokenizer.json from this version directory and the settings from config.pbtxt."""
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        settings = Settings.from_parameters(parameters)
        path = Path(args["model_repository"]) / args["model_version"] / "tokenizer.json"
        self.encoder = TextEncoder(Tokenizer.from_file(str(path)), settings)

    def execute(self, requests: list[Any]) -> list[Any]:
        """Tokenise every request; pad all that succeed to one width; a bad request fails alone."""
        encoded: list[list[Encoding] | str] = []
        for request in requests:
            try:
                texts = decode_texts(pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy())
                prompt, truncate = self.encoder.request_options(request_parameters(request))
                encoded.append(self.encoder.encode(texts, prompt, truncate))
            except (RequestError, json.JSONDecodeError) as e:
                encoded.append(str(e))
        width = max((len(enc.ids) for item in encoded if not isinstance(item, str) for enc in item), default=1)
        responses = []
        for item in encoded:
            if isinstance(item, str):  # the caller's mistake: INVALID_ARGUMENT over gRPC, 400 over HTTP
                error = pb_utils.TritonError(item, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            feed = self.encoder.pad(item, width)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in feed.items()]))
        return responses
