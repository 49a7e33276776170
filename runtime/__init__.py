"""Run exported Matryoshka artifacts: manifest, tokenisation, backends and the `Embedder` API.

Never imports torch or transformers: a serving image needs numpy, tokenizers and onnxruntime only.
"""

from mrl.runtime.embedder import Embedder, choose_profile, truncate_normalize
from mrl.runtime.errors import (
    ArtifactError,
    BackendUnavailableError,
    DimsError,
    InputTooLongError,
    IntegrityError,
    InvalidInputError,
    LayersError,
    MrlError,
    NotFoundError,
    SchemaVersionError,
    UnknownPromptError,
)
from mrl.runtime.manifest import Manifest, Profile, load_manifest

__all__ = [
    "ArtifactError",
    "BackendUnavailableError",
    "DimsError",
    "Embedder",
    "InputTooLongError",
    "IntegrityError",
    "InvalidInputError",
    "LayersError",
    "Manifest",
    "MrlError",
    "NotFoundError",
    "Profile",
    "SchemaVersionError",
    "UnknownPromptError",
    "choose_profile",
    "load_manifest",
    "truncate_normalize",
]
