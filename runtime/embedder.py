"""The `Embedder` API: texts in, unit-norm Matryoshka embeddings of the requested dims out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrl.runtime import encodings
from mrl.runtime.acceptance import require as require_acceptance
from mrl.runtime.backends import Backend, capabilities, create_backend, resolve_backend
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
from mrl.runtime.plan import MAX_OUTPUTS, EmbedOptions, Output, OutputSpec, Plan
from mrl.runtime.tokenize import DIRECTIONS, Encoded, TextTokenizer

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = EmbedOptions()


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
        if not capabilities(backend).cut_depths:
            self.profiles = [p for p in self.profiles if p.layers is None]
            if not self.profiles:
                raise BackendUnavailableError(
                    f"every {precision} profile of {directory} keeps fewer layers than the model has, and the "
                    f"{backend} backend runs the source model at full depth only: use an onnxruntime or tensorrt "
                    "backend"
                )
        self.graphs: dict[int | None, Profile] = {}
        """The graph each depth runs, by `Profile.layers` (None: full depth): its widest profile, which every
        dims at that depth is cut from (one copy of the weights in memory per depth)."""
        for p in sorted(self.profiles, key=lambda p: p.dims):
            self.graphs[p.layers] = p
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
        acceptance: bool = True,
        **backend_options: Any,
    ) -> Embedder:
        """Open an artifact directory; `precision` defaults to the first the manifest lists.

        `verify` checks every file's sha256; `acceptance` runs the artifact's acceptance test on this machine's
        backend and raises AcceptanceError where a served profile falls below its thresholds.
        """
        directory = Path(artifact_dir)
        manifest = load_manifest(directory, verify=verify)
        if not manifest.profiles:
            raise NotFoundError(f"{directory} lists no profiles")
        precision = precision or manifest.precisions[0]
        if precision not in manifest.precisions:
            raise NotFoundError(f"{directory} has no {precision} profiles; it has: {', '.join(manifest.precisions)}")
        tokenizer = TextTokenizer.load(directory, manifest.tokenizer)
        tokenizer.check_prompts(manifest.prompts)
        name = resolve_backend(backend, directory, manifest)
        log.info("backend %s for %s (asked for %s)", name, directory, backend)
        embedder = cls(
            directory,
            manifest,
            tokenizer,
            backend=name,
            precision=precision,
            backend_options=backend_options,
        )
        if acceptance:
            try:
                require_acceptance(embedder, anyway="Embedder.load(..., acceptance=False) loads it anyway")
            except BaseException:
                embedder.close()
                raise
        return embedder

    @property
    def layers_served(self) -> list[int | None]:
        """The encoder layers each served depth runs, fewest first (None: full depth, count not recorded)."""
        return sorted({self.manifest.depth(p) for p in self.graphs.values()}, key=_fewest_first)

    @property
    def providers(self) -> list[str]:
        """What the loaded backends really run on (e.g. onnxruntime's providers)."""
        return sorted({p for b in self._backends.values() for p in b.providers})

    def plan(self, options: EmbedOptions = DEFAULT_OPTIONS) -> Plan:
        """Decide everything about a request, or raise the caller's first mistake.

        Checked in this order: layers (LayersError), each output's dims (DimsError), the prompt
        (UnknownPromptError), the truncation direction, each output's encoding (EncodingError).
        """
        if not options.outputs or len(options.outputs) > MAX_OUTPUTS:
            raise InvalidInputError(f"ask for 1 to {MAX_OUTPUTS} outputs, not {len(options.outputs)}", "outputs")
        graph = self._graph(options.layers)
        dims = [self._dims(graph, spec.dims) for spec in options.outputs]
        prompt = self._prompt(options.prompt_name)
        if options.truncation_direction not in DIRECTIONS:
            raise InvalidInputError(
                f"unknown truncation direction {shorten(options.truncation_direction)}; choose from "
                f"{', '.join(DIRECTIONS)} (right keeps a text's start, left its end)",
                "truncation_direction",
            )
        outputs = tuple(
            Output(dims=d, encoding=spec.encoding, ranges=self._ranges_for(graph, spec.encoding, d))
            for d, spec in zip(dims, options.outputs, strict=True)
        )
        return Plan(
            graph=graph,
            layers=self.manifest.depth(graph),
            outputs=outputs,
            prompt=prompt,
            truncate=options.truncate,
            truncation_direction=options.truncation_direction,
        )

    def _graph(self, layers: int | None) -> Profile:
        """The graph a request for `layers` encoder layers runs (None: the default depth); else LayersError."""
        if layers is None:
            # Full depth where served, else the deepest: what a request that names no depth gets.
            return self.graphs[None] if None in self.graphs else self.graphs[max(self.graphs)]  # type: ignore[type-var]
        if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or layers < 1:
            raise LayersError(f"layers must be a whole number of at least 1, not {shorten(layers)}")
        # The one place a count of layers meets `Profile.layers`, where None spells the full depth.
        key = None if layers == self.manifest.total_layers else int(layers)
        if key not in self.graphs:
            raise LayersError(f"layers {layers} is not served; {self._served_text()}")
        return self.graphs[key]

    def _served_text(self) -> str:
        total = self.manifest.total_layers
        if total is None:
            return "this artifact runs its full depth only (export with --layers for profiles that keep fewer)"
        served = ", ".join(str(n) for n in self.layers_served)
        full_only = (
            ""
            if capabilities(self.backend_name).cut_depths
            else f" (the {self.backend_name} backend runs full depth only)"
        )
        return f"served layers: {served} (the model has {total}){full_only}"

    def _dims(self, graph: Profile, dims: int | None) -> int:
        """The dims an output gets from `graph` (None: all of them); else DimsError."""
        if dims is None:
            return graph.dims
        if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)):
            raise DimsError(f"dims must be an integer, not {shorten(dims)}")
        if dims < 1:
            raise DimsError(f"dims must be at least 1, not {dims}")
        if dims > graph.dims:
            served = sorted(p.dims for p in self.profiles if p.layers == graph.layers)
            raise DimsError(f"dims {dims} is above the largest profile ({graph.dims}); served dims: {served}")
        return int(dims)

    def _prompt(self, prompt_name: str | None) -> str:
        """The text a prompt name prepends (None: the model's default prompt; no prompt: "")."""
        name = prompt_name if prompt_name is not None else self.manifest.default_prompt
        if name is None:
            return ""
        if name not in self.manifest.prompts:
            known = ", ".join(sorted(self.manifest.prompts)) or "none"
            raise UnknownPromptError(f"unknown prompt name {shorten(name)}; this model's prompts: {known}")
        return self.manifest.prompts[name]

    @property
    def encodings(self) -> list[str]:
        """The output encodings this artifact can produce (int8 and uint8 only where calibrated)."""
        calibration = self.manifest.calibration
        calibrated = calibration is not None and any(p.name in calibration.ranges for p in self.profiles)
        return [e for e in encodings.ENCODINGS if calibrated or e not in encodings.CALIBRATED]

    def _ranges_for(self, graph: Profile, encoding: str, dims: int) -> np.ndarray | None:
        """The per-dimension ranges `encoding` needs at `dims` on `graph`'s depth (None: it needs none);
        EncodingError if the artifact has none."""
        if encodings.check_encoding(encoding) not in encodings.CALIBRATED:
            return None
        calibration = self.manifest.calibration
        ranges = {} if calibration is None else calibration.ranges
        at_depth = [p for p in self.profiles if p.layers == graph.layers]
        calibrated = sorted(p.dims for p in at_depth if p.name in ranges)
        if not calibrated:
            raise EncodingError(
                f"{encoding} needs per-dimension value ranges and this model's artifact has none: add them "
                "with `mrl-export calibrate ARTIFACT --texts FILE` (typical texts, one a line)"
            )
        profile = next((p for p in at_depth if p.dims == dims), None)
        if profile is None or profile.name not in ranges:
            raise EncodingError(
                f"{encoding} ranges are calibrated per profile and dims {dims} has none: ask for dims "
                f"{', '.join(map(str, calibrated))}"
            )
        if profile.name not in self._ranges:
            found = ranges[profile.name]
            self._ranges[profile.name] = np.array([found.min, found.max], dtype=np.float32)
        return self._ranges[profile.name]

    def backend_for(self, graph: Profile) -> Backend:
        """The backend that runs a profile's graph, created on first use."""
        if graph.name not in self._backends:
            backend = create_backend(self.backend_name, self.directory, self.manifest, graph, **self._backend_options)
            log.info("profile %s runs on %s %s", graph.name, backend.name, backend.providers)
            self._backends[graph.name] = backend
        return self._backends[graph.name]

    def tokenize(self, plan: Plan, texts: Sequence[str]) -> list[Encoded]:
        """Prepend the plan's prompt and tokenise, raising on inputs the model cannot take."""
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        prompted = [plan.prompt + t for t in texts] if plan.prompt else texts
        return self.tokenizer.encode(prompted, truncate=plan.truncate, direction=plan.truncation_direction)

    def run(self, graph: Profile, encoded: Sequence[Encoded]) -> np.ndarray:
        """One forward pass of `graph` over tokenised texts: `[n, graph.dims]` float32 unit rows."""
        return self.backend_for(graph).run(self.tokenizer.pad(encoded))

    def run_plan(self, plan: Plan, texts: Sequence[str], *, batch_size: int = 32) -> tuple[np.ndarray, ...]:
        """Embed texts as `plan` says: each output's `[len(texts), width]` rows in input order."""
        encoded = self.tokenize(plan, texts)
        rows = np.empty((len(encoded), plan.graph.dims), dtype=np.float32)
        # Sorting by length before cutting into batches keeps padding, and so wasted compute, small.
        order = sorted(range(len(encoded)), key=lambda i: encoded[i].n_tokens)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            rows[batch] = self.run(plan.graph, [encoded[i] for i in batch])
        return plan.finish(rows)

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
        options = EmbedOptions(
            outputs=(OutputSpec(dims=dims, encoding=encoding),),
            layers=layers,
            prompt_name=prompt_name,
            truncate=truncate,
        )
        (vectors,) = self.run_plan(self.plan(options), texts, batch_size=batch_size)
        return vectors

    def warmup(self) -> None:
        """Load and run once the graph each depth runs."""
        for graph in self.graphs.values():
            self.run(graph, self.tokenizer.encode(["warm-up"]))

    def close(self) -> None:
        """Release every backend."""
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()


def _fewest_first(layers: int | None) -> float:
    return float("inf") if layers is None else layers
