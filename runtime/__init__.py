"""Run exported Matryoshka artifacts: manifest, tokenisation, backends and the `Embedder` API.

Never imports torch or transformers: a serving image needs numpy, tokenizers and onnxruntime only.
"""

from mrl.runtime.embedder import Embedder
from mrl.runtime.errors import (
    AcceptanceError,
    ArtifactError,
    BackendUnavailableError,
    DimsError,
    EncodingError,
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
from mrl.runtime.plan import EmbedOptions, Output, OutputSpec, Plan, truncate_normalize

__all__ = [
    "AcceptanceError",
    "ArtifactError",
    "BackendUnavailableError",
    "DimsError",
    "EmbedOptions",
    "Embedder",
    "EncodingError",
    "InputTooLongError",
    "IntegrityError",
    "InvalidInputError",
    "LayersError",
    "Manifest",
    "MrlError",
    "NotFoundError",
    "Output",
    "OutputSpec",
    "Plan",
    "Profile",
    "SchemaVersionError",
    "UnknownPromptError",
    "load_manifest",
    "truncate_normalize",
]
