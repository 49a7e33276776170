"""The transport-neutral serving core: models by name, request limits, lifecycle, readiness, request metrics.

Front ends (gRPC in `grpc_service.py`, OpenAI-compatible HTTP in `http_service.py`) parse their wire
format into an `EmbedQuery` (with their protocol modules), await `EmbedCore.embed`, and translate the result,
or the error's `ErrorKind`, back into their own format. Requests from every front end share each model's batcher.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from mrl.runtime.errors import InvalidInputError, shorten
from mrl.runtime.plan import EmbedOptions
from mrl.serving.config import RequestLimits
from mrl.serving.errors import ErrorKind, UnknownModelError, classify
from mrl.serving.metrics import ServerMetrics
from mrl.serving.model import EmbedResult, ModelInfo, ServedModel

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "(unknown)"  # metrics label for names we do not serve: callers must not grow label sets
DEADLINE_SLACK_S = 0.1
"""A call cancelled this close to its deadline counts as expired: the caller's clock started before ours (it
sent the call earlier than we received it), so its deadline fires, and it cancels, a little before ours."""


class ServingState(enum.Enum):
    """Where the server is in its life; only SERVING takes requests."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True, kw_only=True)
class EmbedQuery:
    """One embed request as every front end hands it to the core (wire names already translated)."""

    texts: Sequence[str]
    model: str = ""
    """Empty: the only model, when one is served."""
    options: EmbedOptions = field(default_factory=EmbedOptions)
    """What to compute: outputs (dims, encoding), layers, prompt and truncation; the model plans it."""
    deadline: float | None = None
    """When the caller stops waiting, in the event loop's `time()` seconds; None: never."""


def deadline_after(seconds: float | None) -> float | None:
    """The event loop's time `seconds` from now (None: no deadline), as `EmbedQuery.deadline` takes it."""
    return None if seconds is None else asyncio.get_running_loop().time() + seconds


def too_many_inputs(count: int, limit: int | None) -> str | None:
    """What to say to a request of `count` texts when at most `limit` are taken (None: fine). Protocols count
    before reading each text: a 16 MiB body holds millions of tiny values, and reading each held the event loop."""
    if limit is None or count <= limit:
        return None
    return f"{count} inputs in one request; this server takes at most {limit}: split the request"


ReadinessListener = Callable[[str, bool], Awaitable[None]]
"""Called with ("", serving) for the whole server and (model name, serving) for each model."""


def check_names(models: Sequence[ServedModel]) -> dict[str, ServedModel]:
    """Models by name, refusing two models under one name."""
    by_name: dict[str, ServedModel] = {}
    for model in models:
        if model.name in by_name:
            raise ValueError(
                f"two artifacts are both named {model.name!r}: give one another name with NAME=ARTIFACT_DIR"
            )
        by_name[model.name] = model
    return by_name


def check_aliases(aliases: Mapping[str, str], models: Mapping[str, ServedModel]) -> dict[str, str]:
    """The aliases, refusing one that names no served model or hides a model's own name."""
    for alias, name in aliases.items():
        if name not in models:
            raise ValueError(f"alias {alias!r} names no served model {name!r}; served: {', '.join(models)}")
        if alias in models:
            raise ValueError(f"alias {alias!r} is already a served model's name: choose another alias")
    return dict(aliases)


class EmbedCore:
    """Serves a fixed set of models to any number of front ends."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        limits: RequestLimits,
        metrics: ServerMetrics,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self.models = check_names(models)
        self.aliases = check_aliases(aliases or {}, self.models)
        """Other names of served models: alias -> model name."""
        self.limits = limits
        self.metrics = metrics
        self.state = ServingState.STARTING
        self._listeners: list[ReadinessListener] = []
        self._in_flight = 0
        self._started = 0  # requests ever started: tells a quiet moment from a busy one

    @property
    def serving(self) -> bool:
        """Whether requests are taken now."""
        return self.state is ServingState.SERVING

    def add_listener(self, listener: ReadinessListener) -> None:
        """Be told whenever the server or a model starts or stops serving (add before `start`)."""
        self._listeners.append(listener)

    async def _announce(self, name: str, serving: bool) -> None:
        for listener in self._listeners:
            await listener(name, serving)

    def start(self) -> None:
        """Start every model's batcher (from the event loop); requests are refused until `warmup` ends."""
        for model in self.models.values():
            self.metrics.ready.labels(model.name).set(0)
            self.metrics.verified.labels(model.name).set_function(lambda m=model: float(m.verified))
            model.batcher.on_batch = self.metrics.batch_observer(model.name)
            self.metrics.track_queue(
                model.name, lambda m=model: m.batcher.queued_jobs, lambda m=model: m.batcher.queued_tokens
            )
            model.start()

    async def warmup(self) -> None:
        """Warm each model in turn, announcing each once warm, and the whole server once all are."""
        for model in self.models.values():
            await model.warmup()
            self.metrics.ready.labels(model.name).set(1)
            await self._announce(model.name, True)
        self.state = ServingState.SERVING
        await self._announce("", True)
        log.info("serving %s", ", ".join(self.models))

    async def drain(self) -> None:
        """Report not-ready everywhere and run queued work at once; requests that still come are served.

        Load balancers take a while to notice; a request that reaches a draining server is still answered,
        so no caller sees an error for being late (`wait_idle` tells when the traffic has stopped).
        """
        if self.state in (ServingState.DRAINING, ServingState.STOPPED):
            return
        self.state = ServingState.DRAINING
        for model in self.models.values():
            model.hurry()
            self.metrics.ready.labels(model.name).set(0)
        await self._announce("", False)
        for name in self.models:
            await self._announce(name, False)

    async def wait_idle(self, quiet: float, timeout: float) -> bool:
        """Wait until no request has been in flight for `quiet` seconds; False if `timeout` came first."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while loop.time() < give_up:
            started = self._started
            if self._in_flight == 0:
                await asyncio.sleep(min(quiet, max(0.0, give_up - loop.time())))
                if self._in_flight == 0 and self._started == started:
                    return True
            else:
                await asyncio.sleep(0.01)
        return self._in_flight == 0

    async def close(self) -> None:
        """Finish queued work and release every model."""
        await self.drain()
        await asyncio.gather(*(m.close() for m in self.models.values()))
        self.state = ServingState.STOPPED

    def resolve(self, name: str) -> ServedModel:
        """The model called `name`; an empty name means the only one, when one is served."""
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise InvalidInputError(f"this server serves several models ({', '.join(self.models)}): set model", "model")
        model = self.models.get(self.aliases.get(name, name))
        if model is None:
            served = [*self.models, *(f"{a} (alias of {n})" for a, n in self.aliases.items())]
            raise UnknownModelError(f"no model named {shorten(name)}; this server serves: {', '.join(served)}")
        return model

    def model_infos(self) -> list[ModelInfo]:
        """What every served model offers, in the order given."""
        return [m.info() for m in self.models.values()]

    def check_limits(self, query: EmbedQuery) -> None:
        """Refuse requests over the server's per-request limits."""
        if message := too_many_inputs(len(query.texts), self.limits.max_inputs_per_request):
            raise InvalidInputError(message, "inputs")

    async def embed(self, query: EmbedQuery, transport: str) -> tuple[ServedModel, EmbedResult]:
        """Run one request through its model's batcher; counts it in the metrics under `transport`."""
        start = time.perf_counter()
        label, kind = UNKNOWN_MODEL, ErrorKind.OK
        try:
            model = self.resolve(query.model)
            label = model.name
            self.check_limits(query)
            self.metrics.in_flight.labels(label).inc()
            self._in_flight += 1
            self._started += 1
            try:
                result = await model.embed(query.texts, query.options, query.deadline)
            finally:
                self._in_flight -= 1
                self.metrics.in_flight.labels(label).dec()
        except asyncio.CancelledError:
            # Front ends cancel the call when the caller goes away or its deadline passes.
            now = asyncio.get_running_loop().time()
            expired = query.deadline is not None and now >= query.deadline - DEADLINE_SLACK_S
            kind = ErrorKind.DEADLINE_EXCEEDED if expired else ErrorKind.CANCELLED
            raise
        except Exception as e:
            kind = classify(e)
            if kind is ErrorKind.INTERNAL:
                log.exception("embed on model %s failed", label)
            raise
        finally:
            self.metrics.requests.labels(label, transport, kind.value).inc()
            if kind is ErrorKind.OK:
                self.metrics.latency.labels(label).observe(time.perf_counter() - start)
        return model, result
