"""The `Embedder` API: texts in, unit-norm Matryoshka embeddings of the requested dims out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrl.runtime import encodings
from mrl.runtime.backends import Backend, create_backend, resolve_backend
from mrl.runtime.errors import (
    BackendUnavailableError,
    DimsError,
    EncodingError,
    InvalidInputError,
    LayersError,
    NotFoundError,
    UnknownPromptError,
    shorten,
)
from mrl.runtime.manifest import Manifest, Profile, load_manifest
from mrl.runtime.tokenize import Encoded, TextTokenizer

log = logging.getLogger(__name__)


def choose_profile(profiles: Sequence[Profile], dims: int, layers: int | None = None) -> Profile:
    """The profile running `layers` (None: full depth) with exactly `dims`, else the smallest larger one."""
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)):
        raise DimsError(f"dims must be an integer, not {shorten(dims)}")
    if dims < 1:
        raise DimsError(f"dims must be at least 1, not {dims}")
    at_depth = [p for p in profiles if p.layers == layers]
    if not at_depth:
        raise LayersError(f"no profile runs {'all' if layers is None else layers} layers")
    larger = sorted((p for p in at_depth if p.dims >= dims), key=lambda p: p.dims)
    if not larger:
        served = sorted({p.dims for p in at_depth})
        raise DimsError(f"dims {dims} is above the largest profile ({max(served)}); served dims: {served}")
    return larger[0]


def truncate_normalize(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Keep the first `dims` components and scale each row to unit L2 norm."""
    cut = np.ascontiguousarray(vectors[:, :dims], dtype=np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


@dataclass(frozen=True, kw_only=True)
class PreparedBatch:
    """Tokenised texts ready to run, with the token count for usage reporting."""

    encoded: list[Encoded]

    @property
    def n_tokens(self) -> int:
        """Tokens in the batch before padding."""
        return sum(e.n_tokens for e in self.encoded)


class Embedder:
    """Embeds texts with one artifact's profiles of one precision."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        tokenizer: TextTokenizer,
        *,
        backend: str,
        precision: str,
        backend_options: dict[str, Any],
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.backend_name = backend
        self.precision = precision
        self.profiles = [p for p in manifest.profiles if p.precision == precision]
        if backend == "torch":  # it runs the source model, which cannot stop early: full-depth profiles only
            self.profiles = [p for p in self.profiles if p.layers is None]
            if not self.profiles:
                raise BackendUnavailableError(
                    f"every {precision} profile of {directory} keeps fewer layers than the model has, and the torch "
                    "backend runs the source model at full depth only: use an onnxruntime or tensorrt backend"
                )
        self._backend_options = backend_options
        self._backends: dict[str, Backend] = {}
        self._ranges: dict[str, np.ndarray] = {}

    @classmethod
    def load(
        cls,
        artifact_dir: Path | str,
        backend: str = "auto",
        *,
        precision: str | None = None,
        verify: bool = True,
        **backend_options: Any,
    ) -> Embedder:
        """Open an artifact directory; `precision` defaults to the first the manifest lists."""
        directory = Path(artifact_dir)
        manifest = load_manifest(directory, verify=verify)
        if not manifest.profiles:
            raise NotFoundError(f"{directory} lists no profiles")
        precision = precision or manifest.precisions[0]
        if precision not in manifest.precisions:
            raise NotFoundError(f"{directory} has no {precision} profiles; it has: {', '.join(manifest.precisions)}")
        tokenizer = TextTokenizer.load(directory, manifest.tokenizer)
        name = resolve_backend(backend, directory, manifest)
        log.info("backend %s for %s (asked for %s)", name, directory, backend)
        return cls(
            directory,
            manifest,
            tokenizer,
            backend=name,
            precision=precision,
            backend_options=backend_options,
        )

    @property
    def default_layers(self) -> int | None:
        """The depth a request that names no layers gets: full depth (None) where served, else the deepest."""
        depths = {p.layers for p in self.profiles}
        return None if None in depths else max(depths)

    @property
    def layers_served(self) -> list[int | None]:
        """The depths this precision's profiles run, shallowest first (full depth as the model's total)."""
        return sorted({self.manifest.depth(p) for p in self.profiles}, key=lambda n: float("inf") if n is None else n)

    @property
    def default_dims(self) -> int:
        """The largest dims at the default depth: what a request that names neither dims nor layers gets."""
        return self.resolve_dims(None)

    @property
    def providers(self) -> list[str]:
        """What the loaded backends really run on (e.g. onnxruntime's providers)."""
        return sorted({p for b in self._backends.values() for p in b.providers})

    def resolve_layers(self, layers: int | None) -> int | None:
        """The `Profile.layers` a request runs (None: full depth); `layers` None means the default; else LayersError."""
        if layers is None:
            return self.default_layers
        if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or layers < 1:
            raise LayersError(f"layers must be a whole number of at least 1, not {shorten(layers)}")
        depth = None if layers == self.manifest.total_layers else int(layers)
        if depth not in {p.layers for p in self.profiles}:
            raise LayersError(f"layers {layers} is not served; {self._served_text()}")
        return depth

    def _served_text(self) -> str:
        total = self.manifest.total_layers
        if total is None:
            return "this artifact runs its full depth only (export with --layers for profiles that keep fewer)"
        served = ", ".join(str(n) for n in self.layers_served)
        torch = " (the torch backend runs full depth only)" if self.backend_name == "torch" else ""
        return f"served layers: {served} (the model has {total}){torch}"

    def resolve_dims(self, dims: int | None, layers: int | None = None) -> int:
        """The dims a request gets at its depth: `dims` if a profile covers it, None the largest; else DimsError."""
        depth = self.resolve_layers(layers)
        if dims is None:
            return max(p.dims for p in self.profiles if p.layers == depth)
        choose_profile(self.profiles, dims, depth)
        return int(dims)

    @property
    def encodings(self) -> list[str]:
        """The output encodings this artifact can produce (int8 and uint8 only where calibrated)."""
        calibration = self.manifest.calibration
        calibrated = calibration is not None and any(p.name in calibration.ranges for p in self.profiles)
        return [e for e in encodings.ENCODINGS if calibrated or e not in encodings.CALIBRATED]

    def ranges_for(self, encoding: str, dims: int, layers: int | None = None) -> np.ndarray | None:
        """The per-dimension ranges `encoding` needs at `dims` and depth `layers` (None: it needs none);
        EncodingError if the artifact has none."""
        if encodings.check_encoding(encoding) not in encodings.CALIBRATED:
            return None
        calibration = self.manifest.calibration
        ranges = {} if calibration is None else calibration.ranges
        depth = self.resolve_layers(layers)
        profile = next((p for p in self.profiles if p.dims == dims and p.layers == depth), None)
        calibrated = sorted(p.dims for p in self.profiles if p.name in ranges and p.layers == depth)
        if not calibrated:
            raise EncodingError(
                f"{encoding} needs per-dimension value ranges and this model's artifact has none: add them "
                "with `mrl-export calibrate ARTIFACT --texts FILE` (typical texts, one a line)"
            )
        if profile is None or profile.name not in ranges:
            raise EncodingError(
                f"{encoding} ranges are calibrated per profile and dims {dims} has none: ask for dims "
                f"{', '.join(map(str, calibrated))}"
            )
        if profile.name not in self._ranges:
            found = ranges[profile.name]
            self._ranges[profile.name] = np.array([found.min, found.max], dtype=np.float32)
        return self._ranges[profile.name]

    def profile_for(self, dims: int, layers: int | None = None) -> Profile:
        """The profile whose graph computes `dims` at that depth: the widest there, for every dims it covers.

        Running one graph per precision and depth keeps one copy of the weights in memory; narrower dims
        are sliced from it and re-normalised, which matches their own graphs (BENCHMARKS.md: weights
        shared across sessions still cost more RAM per added profile, or speed).
        """
        depth = self.resolve_layers(layers)
        choose_profile(self.profiles, dims, depth)  # refuses dims no profile covers at this depth
        return max((p for p in self.profiles if p.layers == depth), key=lambda p: p.dims)

    def backend_for(self, profile: Profile) -> Backend:
        """The backend for a profile, created on first use."""
        if profile.name not in self._backends:
            backend = create_backend(self.backend_name, self.directory, self.manifest, profile, **self._backend_options)
            log.info("profile %s runs on %s %s", profile.name, backend.name, backend.providers)
            self._backends[profile.name] = backend
        return self._backends[profile.name]

    def prompt_text(self, prompt_name: str | None) -> str:
        """The text a prompt name prepends (None: the model's default prompt; no prompt: "")."""
        name = prompt_name if prompt_name is not None else self.manifest.default_prompt
        if name is None:
            return ""
        if name not in self.manifest.prompts:
            known = ", ".join(sorted(self.manifest.prompts)) or "none"
            raise UnknownPromptError(f"unknown prompt name {shorten(name)}; this model's prompts: {known}")
        return self.manifest.prompts[name]

    def apply_prompt(self, texts: Sequence[str], prompt_name: str | None) -> list[str]:
        """Prepend the named prompt's text (None: the model's default prompt, if any)."""
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        prefix = self.prompt_text(prompt_name)
        return [prefix + t for t in texts] if prefix else list(texts)

    def prepare(self, texts: Sequence[str], prompt_name: str | None = None, *, truncate: bool = False) -> PreparedBatch:
        """Apply the prompt and tokenise, raising on inputs the model cannot take."""
        return PreparedBatch(encoded=self.tokenizer.encode(self.apply_prompt(texts, prompt_name), truncate=truncate))

    def run_encoded(
        self,
        encoded: Sequence[Encoded],
        dims: Sequence[int],
        layers: int | None = None,
        *,
        profile: Profile | None = None,
    ) -> list[np.ndarray]:
        """Run tokenised texts as one forward pass at one depth; row i comes back as a unit vector of `dims[i]`.

        Texts that want different dims share the pass: `profile` (default: the smallest covering the widest
        dims asked for, at depth `layers`) runs, and the rest are sliced from it and re-normalised (a
        truncated unit vector is not a unit vector). Texts that want different depths cannot share one.
        """
        if len(dims) != len(encoded):
            raise ValueError(f"{len(encoded)} texts but {len(dims)} dims")
        profile = profile or self.profile_for(max(dims), layers)
        if profile.dims < max(dims):
            raise DimsError(f"profile {profile.name} has {profile.dims} dims, fewer than the {max(dims)} asked for")
        out = self.backend_for(profile).run(self.tokenizer.pad(encoded))
        rows: list[np.ndarray] = list(out)
        for want in set(dims) - {profile.dims}:
            index = [i for i, d in enumerate(dims) if d == want]
            for i, row in zip(index, truncate_normalize(out[index], want), strict=True):
                rows[i] = row
        return rows

    def embed(
        self,
        texts: Sequence[str],
        dims: int | None = None,
        prompt_name: str | None = None,
        *,
        layers: int | None = None,
        batch_size: int = 32,
        truncate: bool = False,
        encoding: str = "float32",
    ) -> np.ndarray:
        """Embed texts; returns `[len(texts), dims]` unit-norm rows in input order, float32 unless `encoding` says.

        `layers` runs a profile that keeps only the model's first layers (None: the deepest served).
        Texts longer than the model's max length raise InputTooLongError unless `truncate` cuts them.
        `encoding` is one of `mrl.runtime.encodings.ENCODINGS` (binary ones hold ceil(dims / 8) bytes a row).
        """
        depth = self.resolve_layers(layers)  # before any work
        want = self.resolve_dims(dims, depth)
        ranges = self.ranges_for(encoding, want, depth)
        encoded = self.prepare(texts, prompt_name, truncate=truncate).encoded
        result = np.empty((len(encoded), want), dtype=np.float32)
        # Sorting by length before cutting into batches keeps padding, and so wasted compute, small.
        order = sorted(range(len(encoded)), key=lambda i: encoded[i].n_tokens)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            result[rows] = self.run_encoded([encoded[i] for i in rows], [want] * len(rows), depth)
        return encodings.encode(result, encoding, ranges)

    def warmup(self) -> None:
        """Load and run the graph every dims runs on, once per depth."""
        for depth in dict.fromkeys(p.layers for p in self.profiles):
            widest = max((p for p in self.profiles if p.layers == depth), key=lambda p: p.dims)
            self.run_encoded(self.tokenizer.encode(["warm-up"]), [widest.dims], profile=widest)

    def close(self) -> None:
        """Release every backend."""
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()
