"""Backends run one profile's graph: `run(feed) -> [batch, dims] float32`. Chosen by name, imported lazily."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mrl.runtime.errors import BackendUnavailableError, NotFoundError
from mrl.runtime.manifest import Manifest, Profile


class Backend(Protocol):
    """What the Embedder needs of a backend: run a padded batch, warm up, release resources."""

    name: str
    providers: list[str]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Embed one padded batch; returns float32 `[batch, dims]`."""
        ...

    def warmup(self) -> None:
        """Run once on a small input so the first real call pays no set-up cost."""
        ...

    def close(self) -> None:
        """Release sessions and device memory."""
        ...


# name -> (module, factory function, pip extra that provides it)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("mrl.runtime.backends.onnxruntime", "create", "mrl-toolkit"),
}


def backend_names() -> list[str]:
    """Names that `create_backend` accepts, besides "auto"."""
    return list(_REGISTRY)


def resolve_backend(name: str, directory: Path, manifest: Manifest) -> str:
    """The concrete backend for `name`; "auto" picks the best one present here."""
    return "onnxruntime" if name == "auto" else name


def create_backend(name: str, directory: Path, manifest: Manifest, profile: Profile, **options: Any) -> Backend:
    """Create the backend called `name` for one profile of the artifact in `directory`."""
    if name not in _REGISTRY:
        raise NotFoundError(f"unknown backend {name!r}; choose one of: auto, {', '.join(_REGISTRY)}")
    module_name, factory, extra = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend {name!r} needs a package that is not installed ({e.name}): pip install '{extra}'"
        ) from None
    return getattr(module, factory)(directory, manifest, profile, **options)
