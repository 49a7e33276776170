"""A model whose card names a default prompt exports with validation, and serves it by default."""

from __future__ import annotations

import json

import numpy as np
from sentence_transformers import SentenceTransformer
from tinymodels import export, save_sentence_transformer

from mrl.runtime import Embedder, load_manifest

TEXTS = ["how do I reset my password?", "the weather is lovely in spring"]


def test_a_default_prompt_neither_breaks_parity_nor_goes_missing_when_serving(tmp_path):
    model = save_sentence_transformer(tmp_path / "st", prompts={"query": "query: ", "document": "passage: "})
    config = model / "config_sentence_transformers.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "default_prompt_name": "query"}))
    artifact = export(model, tmp_path / "artifact", (8, 32))  # parity compares graph runs without a prompt
    assert load_manifest(artifact).default_prompt == "query"
    st = SentenceTransformer(str(model), device="cpu")
    want = st.encode(TEXTS, normalize_embeddings=True)  # sentence-transformers applies its default prompt
    got = Embedder.load(artifact).embed(TEXTS)  # and so does the runtime, unasked
    assert np.sum(got * want, axis=1).min() >= 0.9999
