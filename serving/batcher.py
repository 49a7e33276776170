"""A dynamic batcher over a plain function: token-budget batches of similar length, run off the event loop.

It knows nothing of models: it queues payloads with a token count and a group, calls
`fn(group, payloads) -> results` in an executor and hands each caller its own result (or error). Jobs of
different groups never share a batch (a model groups its jobs by the graph they run).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mrl.serving.config import BatcherConfig
from mrl.serving.errors import NotReadyError, QueueFullError, RequestExpiredError, RequestTooLargeError
from mrl.serving.selection import Plan, admits, plan_batch

log = logging.getLogger(__name__)

G = TypeVar("G", bound=Hashable)
P = TypeVar("P")
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class Job(Generic[G, P]):
    """One unit of work to batch: a payload, what it costs in tokens, and the group whose batches it may join."""

    payload: P
    tokens: int
    group: G = None  # type: ignore[assignment]  # one group for all, unless the caller sorts jobs into groups
    """Jobs of different groups never share a batch; the batch function is told the group it runs."""


@dataclass(frozen=True, kw_only=True)
class JobResult(Generic[R]):
    """What one job's caller gets back."""

    value: R
    queue_seconds: float
    run_seconds: float
    batch_size: int
    batch: int
    """Number of the batch that ran this job (jobs of one request may span batches)."""


@dataclass(frozen=True, kw_only=True)
class BatchStats:
    """What happened to one batch (for metrics)."""

    size: int
    tokens: int
    padded_tokens: int
    queue_seconds: tuple[float, ...]
    run_seconds: float
    failed: int
    abandoned: int = 0
    """Texts computed whose caller had gone (cancelled, or past its deadline) by the time they were done."""


@dataclass(eq=False, kw_only=True)
class _Item:
    job: Job[Any, Any]
    seq: int
    enqueued: float
    deadline: float | None
    future: asyncio.Future[JobResult[Any]]
    started: float = 0.0

    @property
    def key(self) -> tuple[int, int]:
        return (self.job.tokens, self.seq)


@dataclass(eq=False)
class _Lane:
    """The queued items of one group, sorted by (tokens, seq), with their keys for bisecting."""

    items: list[_Item] = field(default_factory=list)
    keys: list[tuple[int, int]] = field(default_factory=list)


@dataclass(eq=False, kw_only=True)
class _Outcome:
    """Per-item result of running a batch in the executor: a value or an error, and the run time."""

    values: list[Any] = field(default_factory=list)
    errors: list[BaseException | None] = field(default_factory=list)
    run_seconds: float = 0.0


class Batcher(Generic[G, P, R]):
    """Queues jobs and runs them in batches through `fn` in `executor`, up to `config.workers` batches at once.

    A batch holds jobs of one group only (`Job.group`), formed around the oldest job of any group.

    With `fn_alone`, a lone batch (the machine idle, the queue empty behind it) runs through `fn_alone` and
    holds every worker: one text alone gets the whole machine, while load still runs batches side by side.
    """

    def __init__(
        self,
        fn: Callable[[G, list[P]], Sequence[R]],
        config: BatcherConfig,
        executor: Executor,
        *,
        fn_alone: Callable[[G, list[P]], Sequence[R]] | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "batcher",
    ) -> None:
        self._fn = fn
        self._fn_alone = fn_alone
        """Runs a batch that has the machine to itself: nothing else runs and nothing waits. It holds every
        worker's slot while it runs, so it may use all their cores (None: every batch runs through `fn`)."""
        self._config = config
        self._executor = executor
        self.on_batch = on_batch
        """Called on the event loop after each batch (for metrics); set it before `start`."""
        self._name = name
        self._lanes: dict[Hashable, _Lane] = {}  # one per group with jobs queued
        self._queued_jobs = 0
        self._queued_tokens = 0
        self._seq = itertools.count()
        self._batches = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._hurry = False
        self._running: set[asyncio.Task[None]] = set()  # batches dispatched and not yet done

    @property
    def queued_jobs(self) -> int:
        """Jobs waiting for a batch."""
        return self._queued_jobs

    @property
    def queued_tokens(self) -> int:
        """Tokens waiting for a batch."""
        return self._queued_tokens

    def start(self) -> None:
        """Start the task that forms and runs batches (call from the event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"{self._name}-loop")

    def check_room(self, tokens: int) -> None:
        """Raise unless the queue has room for a request of `tokens` (too large ever, or full now)."""
        capacity = self._config.max_queue_tokens
        if tokens > capacity:
            raise RequestTooLargeError(
                f"the request holds {tokens} tokens, more than the queue ever takes ({capacity}): "
                "split it into smaller requests"
            )
        if not admits(self._queued_tokens, tokens, capacity):
            raise QueueFullError(
                f"the queue is full ({self._queued_tokens} of {capacity} tokens waiting): retry with backoff"
            )

    def submit(self, jobs: Sequence[Job[G, P]], *, deadline: float | None = None) -> list[asyncio.Future[JobResult[R]]]:
        """Queue all of `jobs` or none: one future per job. `deadline` is in `loop.time()` seconds."""
        if self._closing or self._task is None:
            raise NotReadyError(f"{self._name} is not running (starting up or shutting down): retry shortly")
        self.check_room(sum(j.tokens for j in jobs))
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for job in jobs:
            item = _Item(job=job, seq=next(self._seq), enqueued=now, deadline=deadline, future=loop.create_future())
            lane = self._lanes.setdefault(job.group, _Lane())
            index = bisect.bisect(lane.keys, item.key)
            lane.keys.insert(index, item.key)
            lane.items.insert(index, item)
            self._queued_jobs += 1
            self._queued_tokens += job.tokens
            # A caller that goes away (cancelled, deadline) frees its place at once, before any compute.
            item.future.add_done_callback(lambda f, it=item: self._forget(it) if f.cancelled() else None)
            futures.append(item.future)
        self._wake.set()
        return futures

    def hurry(self) -> None:
        """From now on run batches at once instead of waiting for them to fill (on shutdown)."""
        self._hurry = True
        self._wake.set()

    async def close(self) -> None:
        """Refuse new jobs, run what is queued, and stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    def _queued(self) -> Iterator[_Item]:
        for lane in list(self._lanes.values()):
            yield from list(lane.items)

    def _take(self, group: Hashable, start: int, stop: int) -> list[_Item]:
        """Remove and return items `[start, stop)` of a group's lane."""
        lane = self._lanes[group]
        items = lane.items[start:stop]
        del lane.items[start:stop]
        del lane.keys[start:stop]
        if not lane.items:
            del self._lanes[group]
        self._queued_jobs -= len(items)
        self._queued_tokens -= sum(i.job.tokens for i in items)
        return items

    def _forget(self, item: _Item) -> None:
        lane = self._lanes.get(item.job.group)
        if lane is None:
            return
        index = bisect.bisect_left(lane.keys, item.key)
        if index < len(lane.items) and lane.items[index] is item:
            self._take(item.job.group, index, index + 1)

    def _drop_expired(self, now: float) -> None:
        for item in [i for i in self._queued() if i.deadline is not None and i.deadline <= now]:
            self._forget(item)
            if not item.future.done():
                item.future.set_exception(RequestExpiredError("the deadline passed while the request was queued"))

    def _select(self) -> tuple[Plan, float]:
        """The next batch around the oldest item, and when that item's delay runs out."""
        plan = plan_batch(
            {group: lane.keys for group, lane in self._lanes.items()},
            max_tokens=self._config.max_batch_tokens,
            max_size=self._config.max_batch_size,
            max_padding=self._config.max_padding,
        )
        oldest = min(self._lanes[plan.group].items, key=lambda i: i.seq)
        return plan, oldest.enqueued + self._config.max_queue_delay_ms / 1000

    async def _next_batch(self) -> list[_Item] | None:
        """The next batch to run; None once closed and empty.

        With no batch running the queue's best batch goes at once: waiting for company would only add
        latency while the machine idles. With one running, a batch waits until it is full or its oldest
        text has waited `max_queue_delay_ms`, so load makes batches fuller instead of more numerous.
        """
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            self._drop_expired(loop.time())
            if not self._lanes:
                if self._closing:
                    return None
                await self._wake.wait()
                continue
            plan, due = self._select()
            selection = plan.selection
            wait = due - loop.time()
            if selection.full or wait <= 0 or not self._running or self._closing or self._hurry:
                return self._take(plan.group, selection.start, selection.stop)
            # asyncio.TimeoutError: not the builtin one before Python 3.11.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self._config.workers)

        def done(task: asyncio.Task[None], held: int) -> None:
            self._running.discard(task)
            for _ in range(held):
                slots.release()
            self._wake.set()  # a batch waiting for company may go now that the machine is idle

        try:
            while True:
                await slots.acquire()
                items = await self._next_batch()
                if items is None:
                    break
                alone = self._fn_alone is not None and not self._running and not self._lanes
                held = self._config.workers if alone else 1
                for _ in range(held - 1):  # nothing runs, so every slot is free: these never wait
                    await slots.acquire()
                task = asyncio.ensure_future(self._run_guarded(items, alone))
                self._running.add(task)
                task.add_done_callback(functools.partial(done, held=held))
            await asyncio.gather(*self._running)
        finally:
            # Whatever ended the loop, no caller is left waiting forever.
            self._closing = True
            for task in self._running:
                task.cancel()
            self._fail(list(self._queued()), NotReadyError("the server stopped before this request ran"))

    async def _run_guarded(self, items: list[_Item], alone: bool) -> None:
        try:
            await self._run(items, alone)
        except Exception as e:
            log.exception("%s: batch failed outside the batch function", self._name)
            self._fail(items, e)
        except BaseException:
            self._fail(items, NotReadyError("the server stopped while this request was running"))
            raise

    def _fail(self, items: list[_Item], error: Exception) -> None:
        for item in items:
            self._forget(item)
            if not item.future.done():
                item.future.set_exception(error)

    async def _run(self, items: list[_Item], alone: bool) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Late check: callers may have gone between selection and now.
        live = [i for i in items if not i.future.done()]
        if not live:
            return
        for item in live:
            item.started = now
        fn = self._fn_alone if alone and self._fn_alone is not None else self._fn
        group = live[0].job.group
        outcome = await loop.run_in_executor(self._executor, self._execute, fn, group, [i.job.payload for i in live])
        longest = max(i.job.tokens for i in live)
        batch = next(self._batches)
        failed = abandoned = 0
        done_at = loop.time()
        for item, value, error in zip(live, outcome.values, outcome.errors, strict=True):
            if item.future.done():  # the caller went while its text ran
                abandoned += 1
                continue
            if item.deadline is not None and item.deadline <= done_at:
                # Its caller has stopped waiting, whether or not the transport told us: say so, count it.
                abandoned += 1
                item.future.set_exception(RequestExpiredError("the deadline passed while the request was computed"))
                continue
            if error is not None:
                failed += 1
                item.future.set_exception(error)
            else:
                item.future.set_result(
                    JobResult(
                        value=value,
                        queue_seconds=item.started - item.enqueued,
                        run_seconds=outcome.run_seconds,
                        batch_size=len(live),
                        batch=batch,
                    )
                )
        if self.on_batch is not None:
            self.on_batch(
                BatchStats(
                    size=len(live),
                    tokens=sum(i.job.tokens for i in live),
                    padded_tokens=len(live) * longest,
                    queue_seconds=tuple(i.started - i.enqueued for i in live),
                    run_seconds=outcome.run_seconds,
                    failed=failed,
                    abandoned=abandoned,
                )
            )

    def _execute(self, fn: Callable[[G, list[P]], Sequence[R]], group: G, payloads: list[P]) -> _Outcome:
        """Runs in the executor: the whole batch, or on failure each job alone so one bad job fails only itself."""
        start = time.perf_counter()
        try:
            values = list(fn(group, payloads))
            if len(values) != len(payloads):
                raise RuntimeError(f"batch function returned {len(values)} results for {len(payloads)} jobs")
            return _Outcome(values=values, errors=[None] * len(values), run_seconds=time.perf_counter() - start)
        except Exception as e:
            if len(payloads) == 1:
                log.warning("%s: job failed: %s", self._name, e)
                return _Outcome(values=[None], errors=[e], run_seconds=time.perf_counter() - start)
            log.warning("%s: batch of %d failed (%s); running each job alone", self._name, len(payloads), e)
        outcome = _Outcome()
        for payload in payloads:
            try:
                (value,) = fn(group, [payload])
                outcome.values.append(value)
                outcome.errors.append(None)
            except Exception as e:
                outcome.values.append(None)
                outcome.errors.append(e)
        outcome.run_seconds = time.perf_counter() - start
        return outcome
