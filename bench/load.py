"""Closed-loop load at one concurrency level: C workers each send a request, wait for its answer and send
the next, so C requests are always in flight; each request's outcome is kept. `mrl-bench serve` sweeps levels
with it (`serve.py`), in this process or in worker processes (`drivers.py`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from mrl.bench.targets import Target, TargetError, TargetSpec
from mrl.bench.texts import cycle
from mrl.runtime.errors import InvalidInputError

MAX_REQUESTS = 1_000_000  # per level: a typo in --requests must not run for days
MAX_DURATION_S = 3600.0


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """One concurrency sweep against one or more servers."""

    targets: tuple[TargetSpec, ...]
    texts: tuple[str, ...]
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    requests: int | None = 1000  # measured requests per level (None: run for `duration_s`)
    duration_s: float | None = None
    warmup_requests: int | None = None  # per level; None: twice the concurrency
    texts_per_request: int = 1
    dims_mixes: tuple[tuple[int, ...] | None, ...] = (None,)  # None: the server's default dims
    layers_mixes: tuple[tuple[int, ...] | None, ...] = (None,)  # None: the server's default depth
    request_timeout_s: float = 60.0
    server_pids: tuple[int, ...] = ()  # local servers: their CPU (and their children's) is not other load
    rounds: int = 1  # each (level, target, mix) this many times, in ABBA order; results pooled
    client_python: tuple[tuple[str, str], ...] = ()  # (kind, Python): run that kind's clients in a worker there

    def __post_init__(self) -> None:
        labels = [t.label for t in self.targets]
        if not labels or len(set(labels)) != len(labels):
            raise InvalidInputError(f"give one or more different targets, not {labels}")
        if not self.texts:
            raise InvalidInputError("no texts to send")
        if not self.concurrency or min(self.concurrency) < 1 or max(self.concurrency) > 4096:
            raise InvalidInputError("concurrency levels must be within 1..4096")
        if (self.requests is None) == (self.duration_s is None):
            raise InvalidInputError("give either a request count or a duration per level, not both")
        if self.requests is not None and not 2 <= self.requests <= MAX_REQUESTS:
            raise InvalidInputError(f"requests per level must be within 2..{MAX_REQUESTS:,}")
        if self.duration_s is not None and not 0 < self.duration_s <= MAX_DURATION_S:
            raise InvalidInputError(f"duration per level must be within 0..{MAX_DURATION_S:.0f} s")
        if not 1 <= self.rounds <= 100:
            raise InvalidInputError("rounds must be within 1..100")
        if self.texts_per_request < 1:
            raise InvalidInputError("texts per request must be at least 1")
        if any(m is not None for m in self.dims_mixes) and any(t.outputs for t in self.targets):
            raise InvalidInputError("a target asked for outputs sets each output's dims: leave out --dims-mix")
        if any(m is not None for m in self.layers_mixes) and any(t.kind == "triton" for t in self.targets):
            raise InvalidInputError(
                "layers mixes are for mrl-serve targets: Triton serves each depth as models of its own; "
                "bench one with --triton-model NAME_lLAYERS"
            )


def mix_label(mix: tuple[int, ...] | None) -> str:
    """How a dims mix is named in tables and JSON."""
    return "default" if mix is None else ",".join(map(str, mix))


def dims_for(mix: tuple[int, ...] | None, index: int) -> int | None:
    """The dims of request `index`: round-robin over the mix, so the split is exactly even."""
    return None if mix is None else mix[index % len(mix)]


def layers_for(mix: tuple[int, ...] | None, index: int, dims_mix: tuple[int, ...] | None = None) -> int | None:
    """The layers of request `index`: round-robin over the mix, one step per full turn of the dims mix, so
    every (dims, layers) pair gets an even share."""
    return None if mix is None else mix[index // len(dims_mix or (None,)) % len(mix)]


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One request's result, with when it was sent and answered (perf_counter seconds)."""

    index: int
    sent_at: float
    done_at: float
    code: str  # "OK" or the protocol's status name
    texts: int
    layers: int | None = None  # as asked (None: the server's default depth)
    tokens: int | None = None  # None: the server does not report it (Triton)
    queue_ms: float | None = None
    inference_ms: float | None = None

    @property
    def seconds(self) -> float:
        """Latency as the client saw it."""
        return self.done_at - self.sent_at


async def _one(
    target: Target, index: int, texts: list[str], shape: tuple[int | None, int | None], timeout: float
) -> Outcome:
    dims, layers = shape
    sent = time.perf_counter()
    try:
        reply = await target.embed(texts, dims, timeout, layers=layers)
    except TargetError as e:
        return Outcome(index=index, sent_at=sent, done_at=time.perf_counter(), code=e.code, texts=0, layers=layers)
    done = time.perf_counter()
    wrong_depth = layers is not None and reply.layers is not None and reply.layers != layers
    if reply.texts != len(texts) or (dims is not None and reply.dims != dims) or wrong_depth:
        return Outcome(index=index, sent_at=sent, done_at=done, code="BAD_RESPONSE", texts=0, layers=layers)
    return Outcome(
        index=index,
        sent_at=sent,
        done_at=done,
        code="OK",
        texts=len(texts),
        layers=layers,
        tokens=reply.tokens,
        queue_ms=reply.queue_ms,
        inference_ms=reply.inference_ms,
    )


async def run_level(
    target: Target,
    config: ServeConfig,
    concurrency: int,
    mix: tuple[int, ...] | None,
    layers_mix: tuple[int, ...] | None = None,
) -> list[Outcome]:
    """Drive one concurrency level once: warm-up requests, then the measured ones; returns every outcome.
    Requests cycle through the dims `mix` and the `layers_mix`."""
    warmup = warmup_count(config, concurrency)
    last = warmup + (config.requests if config.requests is not None else MAX_REQUESTS)
    limit = (config.duration_s or MAX_DURATION_S) + config.request_timeout_s + 60
    hard_stop = time.perf_counter() + limit  # bounds the level even if the server stalls
    deadline = [hard_stop]
    issued = [0]
    outcomes: list[Outcome] = []
    n = config.texts_per_request

    async def worker() -> None:
        # One event loop runs every worker: reading and bumping `issued` between awaits is atomic.
        while issued[0] < last and time.perf_counter() < deadline[0]:
            index = issued[0]
            issued[0] += 1
            if index == warmup and config.duration_s is not None:
                deadline[0] = min(hard_stop, time.perf_counter() + config.duration_s)
            texts = cycle(config.texts, n, index * n)
            shape = (dims_for(mix, index), layers_for(layers_mix, index, mix))
            outcomes.append(await _one(target, index, texts, shape, config.request_timeout_s))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def warmup_count(config: ServeConfig, concurrency: int) -> int:
    """Unmeasured requests at the start of each level: the configured count, else twice the concurrency."""
    return 2 * concurrency if config.warmup_requests is None else config.warmup_requests
