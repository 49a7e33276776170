"""One served model: request validation, tokenisation, and the batch function its batcher runs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrl.runtime import Embedder
from mrl.runtime.backends import capabilities, resolve_backend
from mrl.runtime.errors import ArtifactError, InvalidInputError, shorten
from mrl.runtime.manifest import Profile, load_manifest
from mrl.runtime.plan import EmbedOptions, Plan
from mrl.runtime.tokenize import Encoded
from mrl.serving.batcher import Batcher, Job, JobResult
from mrl.serving.config import BatcherConfig, ModelSpec
from mrl.serving.errors import NotReadyError
from mrl.serving.process import cpu_cores, lower_thread_priority
from mrl.serving.verify import check_acceptance

log = logging.getLogger(__name__)

INLINE_TOKENIZE_CHARS = 2048
"""Requests of more characters than this are tokenised in a worker thread (tokenizers releases the GIL), so
none stalls the event loop by more than about a millisecond; smaller ones are tokenised inline, where the
thread hop would cost more than the tokenising."""
CHARS_PER_TOKEN_ESTIMATE = 6
"""For refusing a request at once when the queue has no room for it: a text counts as one token per this
many ASCII characters and one per other character (CJK, emoji), at most max length, times what this model's
recent texts held against that (`ServedModel._learn`), until it is tokenised and counted exactly."""
SCALE_DECAY = 0.5
"""Per tokenised request, the share of the estimate's excess scale kept (it rises at once, falls fast)."""
MAX_SCALE = 3.0
"""The most the scale reaches: one odd request (a byte-fallback emoji text) must not make the queue refuse
every later request that would fit."""


@dataclass(frozen=True, kw_only=True)
class EmbedResult:
    """A request's embeddings, one array per output of its plan, with its usage and timing."""

    plan: Plan
    vectors: tuple[np.ndarray, ...]
    """Per output of `plan.outputs`: `[n, width]` values of its encoding (width: dims, or ceil(dims / 8) for the
    binary encodings)."""
    input_tokens: int
    queue_seconds: float
    inference_seconds: float


@dataclass(frozen=True, kw_only=True)
class ProfileInfo:
    """One profile as callers see it."""

    name: str
    dims: int
    precision: str
    layers: int | None
    """The encoder layers it runs (None: full depth, not recorded by older artifacts)."""


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What a served model offers, for every front end's model listing."""

    name: str
    full_dims: int
    default_dims: int
    trained_dims: tuple[int, ...]
    layers: tuple[int, ...]
    """Depths served, shallowest first (full depth as the model's total); empty where the artifact does not
    record its depth (it serves full depth only)."""
    default_layers: int | None
    total_layers: int | None
    trained_layers: tuple[int, ...]
    profiles: tuple[ProfileInfo, ...]
    max_input_tokens: int
    prompts: dict[str, str]
    default_prompt: str | None
    precision: str
    ready: bool
    encodings: tuple[str, ...]


def backend_options(spec: ModelSpec, backend: str) -> dict[str, Any]:
    """The thread settings of `spec` that `backend` takes."""
    can = capabilities(backend)
    options: dict[str, Any] = {}
    if spec.intra_op_threads and can.threads:
        options["intra_op_threads"] = spec.intra_op_threads
    if can.spinning:
        options["spinning"] = spec.spinning
    return options


def _other_chars(text: str, longest: int) -> int:
    """About how many of `text`'s characters are not ASCII (0 where the text is too long to matter)."""
    if text.isascii() or len(text) >= longest * CHARS_PER_TOKEN_ESTIMATE:
        return 0
    # Such a character takes 2-4 bytes in UTF-8: CJK 3, so its 2 extra bytes count it once.
    return (len(text.encode("utf-8", "surrogatepass")) - len(text)) // 2


def estimate_tokens(texts: Sequence[str], prefix_chars: int, longest: int, scale: float = 1.0) -> int:
    """Tokens `texts` hold by their characters (one per `CHARS_PER_TOKEN_ESTIMATE` ASCII ones, one per other
    one, times `scale`), at most `longest` a text."""
    per_char = 1 / CHARS_PER_TOKEN_ESTIMATE
    total = 0
    for t in texts:
        other = _other_chars(t, longest)
        chars = prefix_chars + len(t) - other
        total += min(longest, math.ceil(scale * (1 + chars * per_char + other)))
    return total


def check_texts(texts: Sequence[str]) -> None:
    """Refuse a request with no texts, or an empty one (it would embed to nothing meaningful)."""
    if not texts:
        raise InvalidInputError("inputs is empty: send at least one text", "inputs")
    for i, text in enumerate(texts):
        if not text:
            raise InvalidInputError(f"input {i} is an empty string: send non-empty texts", "inputs")


class ServedModel:
    """An Embedder with its own batcher and inference threads, addressed by `name`.

    `lone`, when given, is the same artifact opened with more threads: a batch that has the machine to itself
    runs on it (one session per depth), while batches side by side run on `embedder`.
    """

    def __init__(
        self,
        name: str,
        embedder: Embedder,
        config: BatcherConfig,
        lone: Embedder | None = None,
        *,
        serve_unverified: bool = False,
    ) -> None:
        self.name = name
        self.embedder = embedder
        self.config = config
        self.ready = False
        self.serve_unverified = serve_unverified
        """Serve even where the artifact's acceptance test fails on this machine (logged as a warning)."""
        self.verified = False
        """Whether the acceptance test ran at warm-up and every served profile passed it."""
        self._closed = False
        self._tokens_per_estimate = 1.0
        """How many times `CHARS_PER_TOKEN_ESTIMATE`'s count recent texts held (never below 1): an estimate
        below the exact count let requests through the queue's check, paid their tokenising on the event
        loop, and refused them after it; under a storm of refusals that was 40% of the loop."""
        self._warming: Future[None] | None = None
        """The warm-up's run in an inference thread (None before `warmup`)."""
        self.lone = lone
        """The same artifact opened with every core, for a batch that has the machine to itself (None: none)."""
        # Inference threads of this model only: a slow model never holds up another's batches.
        # Niced: ONNX Runtime's own threads, created from these during warm-up, inherit the nice value.
        self._executor = ThreadPoolExecutor(
            max_workers=config.workers,
            thread_name_prefix=f"mrl-{name}",
            initializer=lower_thread_priority,
            initargs=(config.worker_niceness,),
        )
        # A job is one tokenised text; its group is the graph it runs, so texts of one batch share a forward pass.
        self.batcher: Batcher[Profile, Encoded, np.ndarray] = Batcher(
            self.run_batch,
            config,
            self._executor,
            fn_alone=None if lone is None else self.run_lone_batch,
            name=f"model {name!r}",
        )

    @classmethod
    def load(cls, spec: ModelSpec, config: BatcherConfig) -> ServedModel:
        """Open an artifact as described by `spec` (blocking: reads and verifies files)."""
        spec = spec.with_defaults(config.workers, cpu_cores())
        manifest = load_manifest(spec.artifact_dir, verify=False)  # to resolve "auto"; verified when loaded
        backend = resolve_backend(spec.backend, Path(spec.artifact_dir), manifest, spec.precision)
        embedder = Embedder.load(  # its acceptance test runs at warm-up, in the niced inference thread
            spec.artifact_dir,
            backend,
            precision=spec.precision,
            verify=spec.verify,
            acceptance=False,
            **backend_options(spec, backend),
        )
        lone = None
        if spec.lone_batch_threads and capabilities(backend).lone_sessions and config.workers > 1:
            wide = dataclasses.replace(spec, intra_op_threads=spec.lone_batch_threads, spinning=True)
            # Its threads stop spinning when a run returns: left spinning, they took the cores from the next
            # request's handling and from a lone batch of another depth (another session) that came next.
            options = {**backend_options(wide, backend), "stop_spinning": True}
            lone = Embedder.load(  # already verified above; the same graphs and kernels, on more threads
                spec.artifact_dir, backend, precision=spec.precision, verify=False, acceptance=False, **options
            )
        name = spec.name or embedder.manifest.name
        log.info(
            "model %s: up to %d batches at once, %s threads each%s",
            name,
            config.workers,
            spec.intra_op_threads or "ONNX Runtime's default",
            f"; a batch alone runs on {spec.lone_batch_threads}" if lone is not None else "",
        )
        return cls(name, embedder, config, lone, serve_unverified=spec.serve_unverified)

    def info(self) -> ModelInfo:
        """What this model offers: dims, profiles, prompts, limits, readiness."""
        embedder, manifest = self.embedder, self.embedder.manifest
        default = embedder.plan()
        return ModelInfo(
            name=self.name,
            full_dims=manifest.full_dims,
            default_dims=default.outputs[0].dims,
            trained_dims=tuple(manifest.trained_dims or ()),
            layers=tuple(n for n in embedder.layers_served if n is not None),
            default_layers=default.layers,
            total_layers=manifest.total_layers,
            trained_layers=tuple(manifest.trained_layers or ()),
            profiles=tuple(
                ProfileInfo(name=p.name, dims=p.dims, precision=p.precision, layers=manifest.depth(p))
                for p in embedder.profiles
            ),
            max_input_tokens=embedder.tokenizer.max_length,
            prompts=dict(manifest.prompts),
            default_prompt=manifest.default_prompt,
            precision=embedder.precision,
            ready=self.ready,
            encodings=tuple(embedder.encodings),
        )

    def run_batch(self, graph: Profile, encoded: list[Encoded]) -> np.ndarray:
        """The batcher's function (in an inference thread): one forward pass of `graph` over the batch's texts."""
        return self.embedder.run(graph, encoded)

    def run_lone_batch(self, graph: Profile, encoded: list[Encoded]) -> np.ndarray:
        """The batcher's function for a batch that has the machine to itself: every core, one session per graph."""
        assert self.lone is not None
        return self.lone.run(graph, encoded)

    def start(self) -> None:
        """Start the batcher (from the event loop); requests are refused until `warmup` finishes."""
        self.batcher.start()

    async def warmup(self) -> None:
        """Load every depth's graph and run a full-size batch and a max-length text once, off the event loop;
        then mark ready."""
        self._warming = self._executor.submit(self._warmup)
        await asyncio.wrap_future(self._warming)
        self.ready = True
        log.info("model %s is warm (%s, %s)", self.name, self.embedder.precision, ", ".join(self.embedder.providers))

    def _warmup(self) -> None:
        self._check_max_length()  # first: the acceptance test's longest texts would fail in the graph otherwise
        self.verified = check_acceptance(self.name, self.embedder, self.serve_unverified)
        self.embedder.warmup()
        texts = ["warm-up text of a typical length for this model's tokenizer " * 2] * self.config.max_batch_size
        encoded = self.embedder.tokenizer.encode(texts, truncate=True)
        for graph in self.embedder.graphs.values():
            self.embedder.run(graph, encoded)
            if self.lone is not None:
                self.lone.run(graph, encoded)

    def _check_max_length(self) -> None:
        """Run one text of the manifest's max length through each graph: a longer max length than the graph's
        positions would otherwise fail every long request with INTERNAL."""
        longest = self.embedder.tokenizer.max_length
        encoded = self.embedder.tokenizer.encode(["warm-up " * longest], truncate=True)
        for graph in self.embedder.graphs.values():
            try:
                self.embedder.run(graph, encoded)
            except Exception as e:
                raise ArtifactError(
                    f"model {self.name}: manifest.json's tokenizer.max_length ({longest}) is more than graph "
                    f"{graph.file} takes: a text of that many tokens fails in it ({shorten(str(e), 200)}); "
                    "set max_length to what the model was trained for"
                ) from None

    def hurry(self) -> None:
        """Run queued texts at once from now on, without waiting for fuller batches (the server is draining)."""
        self.batcher.hurry()

    async def close(self) -> None:
        """Finish queued work, stop the batcher and release the model; a warm-up still running is left behind."""
        self.ready, self._closed = False, True
        await self.batcher.close()
        if self._warming is not None and not self._warming.done():
            # Its thread cannot be stopped, and waiting for it here would block the event loop, signals included.
            log.warning("model %s: its warm-up is still running; not waiting for it", self.name)
            self._executor.shutdown(wait=False, cancel_futures=True)
            return
        self._executor.shutdown(wait=True)
        self.embedder.close()
        if self.lone is not None:
            self.lone.close()

    def check_ready(self) -> None:
        """Raise NotReadyError unless the model takes requests."""
        if not self.ready:
            state = "shutting down" if self._closed else "warming up"
            raise NotReadyError(f"model {self.name!r} is {state}: retry shortly, or wait for its health SERVING")

    def plan(self, texts: Sequence[str], options: EmbedOptions) -> Plan:
        """The request's plan, after every check that needs no tokenising; the queue's room last."""
        check_texts(texts)
        plan = self.embedder.plan(options)
        longest, prefix = self.embedder.tokenizer.max_length, len(plan.prompt)
        # QueueFullError before any tokenising: too large ever by the plain estimate, full now by the scaled one.
        self.batcher.check_room(
            estimate_tokens(texts, prefix, longest),
            likely=estimate_tokens(texts, prefix, longest, self._tokens_per_estimate),
        )
        return plan

    def _learn(self, plan: Plan, texts: Sequence[str], tokens: int) -> None:
        """Raise the estimate's scale at once to what `texts` held against it (at most `MAX_SCALE`); let it fall
        back by half its excess per request."""
        seen = tokens / max(1, estimate_tokens(texts, len(plan.prompt), self.embedder.tokenizer.max_length))
        self._tokens_per_estimate = min(MAX_SCALE, max(seen, 1 + (self._tokens_per_estimate - 1) * SCALE_DECAY, 1.0))

    async def tokenize(self, plan: Plan, texts: Sequence[str]) -> list[Encoded]:
        """The plan's prompt applied and the texts tokenised (raises InputTooLongError), off the event loop when
        large."""
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            return self.embedder.tokenize(plan, texts)
        return await asyncio.to_thread(self.embedder.tokenize, plan, texts)

    async def embed(self, texts: Sequence[str], options: EmbedOptions, deadline: float | None = None) -> EmbedResult:
        """Plan, tokenise, batch with others' texts that run the same graph; this request's outputs."""
        self.check_ready()
        plan = self.plan(texts, options)
        encoded = await self.tokenize(plan, texts)
        jobs = [Job(payload=e, tokens=e.n_tokens, group=plan.graph) for e in encoded]
        self._learn(plan, texts, sum(j.tokens for j in jobs))
        futures = self.batcher.submit(jobs, deadline=deadline)
        try:
            results: list[JobResult[np.ndarray]] = await asyncio.gather(*futures)
        finally:
            # If this caller goes (cancelled) or one job failed, its other jobs must not run for nobody,
            # and their errors are this request's, already answered: mark them seen.
            for f in futures:
                if not f.cancel() and not f.cancelled():
                    f.exception()
        return EmbedResult(
            plan=plan,
            vectors=plan.finish(np.stack([r.value for r in results])),
            input_tokens=sum(j.tokens for j in jobs),
            queue_seconds=max(r.queue_seconds for r in results),
            inference_seconds=sum({r.batch: r.run_seconds for r in results}.values()),
        )
