"""The dynamic batcher over plain functions: batches, groups, errors, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_helpers import wait_until

from mrl.serving.batcher import Batcher, BatchStats, Job
from mrl.serving.config import BatcherConfig
from mrl.serving.errors import NotReadyError, QueueFullError, RequestExpiredError, RequestTooLargeError


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


class Recorder:
    """A batch function that doubles numbers, records its batches, can be held at a gate, and fails on -1."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.groups: list[object] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, group: object, payloads: list[int]) -> list[int]:
        self.groups.append(group)
        self.batches.append(list(payloads))
        assert self.gate.wait(timeout=60)
        if -1 in payloads:
            raise ValueError("cannot double -1")
        return [2 * p for p in payloads]


def make(fn, **config) -> tuple[Batcher, ThreadPoolExecutor, list[BatchStats]]:
    stats: list[BatchStats] = []
    cfg = BatcherConfig(**{"max_queue_delay_ms": 1.0, "workers": 1, **config})
    executor = ThreadPoolExecutor(max_workers=cfg.workers)
    return Batcher(fn, cfg, executor, on_batch=stats.append), executor, stats


def jobs(*values: int, tokens: int = 4) -> list[Job[None, int]]:
    return [Job(payload=v, tokens=tokens) for v in values]


def test_batches_form_while_the_worker_is_busy_and_each_caller_gets_its_own_results():
    fn = Recorder()

    async def scenario():
        batcher, executor, stats = make(fn, max_batch_size=16)
        batcher.start()
        fn.gate.clear()
        first = batcher.submit(jobs(100))
        await wait_until(lambda: fn.batches, "the first batch to start")
        callers = [batcher.submit(jobs(i, i + 1000)) for i in range(6)]
        await wait_until(lambda: batcher.queued_jobs == 12, "12 queued jobs")
        fn.gate.set()
        results = [[r.value for r in await asyncio.gather(*c)] for c in callers]
        assert (await first[0]).value == 200
        await batcher.close()
        executor.shutdown()
        return results, stats

    results, stats = run(scenario())
    assert results == [[2 * i, 2 * (i + 1000)] for i in range(6)]
    assert [s.size for s in stats] == [1, 12]
    assert sorted(fn.batches[1]) == sorted([*range(6), *range(1000, 1006)])


def test_a_failing_job_fails_only_its_caller_and_a_failing_function_fails_every_caller():
    fn = Recorder()

    async def scenario():
        batcher, executor, stats = make(fn)
        batcher.start()
        fn.gate.clear()
        blocker = batcher.submit(jobs(7))
        await wait_until(lambda: fn.batches, "the first batch to start")
        good = [batcher.submit(jobs(i)) for i in range(3)]
        bad = batcher.submit(jobs(-1))
        await wait_until(lambda: batcher.queued_jobs == 4, "4 queued jobs")
        fn.gate.set()
        assert [(await g[0]).value for g in good] == [0, 2, 4]
        with pytest.raises(ValueError, match="cannot double -1"):
            await bad[0]
        await blocker[0]
        await batcher.close()
        executor.shutdown()
        return stats

    stats = run(scenario())
    assert stats[-1].size == 4 and stats[-1].failed == 1

    def broken(group, payloads):
        raise RuntimeError("model crashed")

    async def all_fail():
        batcher, executor, _ = make(broken)
        batcher.start()
        futures = batcher.submit(jobs(1, 2, 3))
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        executor.shutdown()
        return outcomes

    assert all(isinstance(o, RuntimeError) and "crashed" in str(o) for o in run(all_fail()))


def test_expired_and_cancelled_jobs_are_dropped_before_compute():
    fn = Recorder()

    async def scenario():
        batcher, executor, _ = make(fn)
        batcher.start()
        loop = asyncio.get_running_loop()
        fn.gate.clear()
        blocker = batcher.submit(jobs(0))
        await wait_until(lambda: fn.batches, "the first batch to start")
        expiring = batcher.submit(jobs(11), deadline=loop.time() + 0.05)
        cancelled = batcher.submit(jobs(22, 23))
        kept = batcher.submit(jobs(33))
        for f in cancelled:
            f.cancel()
        await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
        assert batcher.queued_jobs == 2  # a cancelled caller frees its place at once
        await asyncio.sleep(0.1)  # let the deadline pass while the worker is busy
        fn.gate.set()
        with pytest.raises(RequestExpiredError):
            await expiring[0]
        assert (await kept[0]).value == 66
        await blocker[0]
        await batcher.close()
        executor.shutdown()

    run(scenario())
    computed = [p for batch in fn.batches for p in batch]
    assert 33 in computed
    assert not {11, 22, 23} & set(computed)


def test_a_full_queue_refuses_at_once_and_close_runs_what_was_queued():
    fn = Recorder()

    async def scenario():
        batcher, executor, _ = make(fn, max_queue_tokens=20, max_batch_tokens=8, max_batch_size=2)
        batcher.start()
        fn.gate.clear()
        blocker = batcher.submit(jobs(1))
        await wait_until(lambda: fn.batches, "the first batch to start")
        queued = batcher.submit(jobs(2, 3, 4))  # 12 of 20 tokens
        with pytest.raises(QueueFullError, match="queue is full"):
            batcher.submit(jobs(5, 6, 7))  # 12 more do not fit
        one = batcher.submit(jobs(8, tokens=8))  # one text that fits is still taken
        with pytest.raises(RequestTooLargeError, match="split it"):
            batcher.submit(jobs(9, tokens=21))
        fn.gate.set()
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(NotReadyError):
            batcher.submit(jobs(10))
        await closing
        executor.shutdown()
        return [(await f).value for f in [*blocker, *queued, *one]]

    assert run(scenario()) == [2, 4, 6, 8, 16]


def test_stopping_the_loop_fails_queued_jobs_instead_of_leaving_them_waiting():
    fn = Recorder()

    async def scenario():
        batcher, executor, _ = make(fn, max_queue_delay_ms=60_000, max_batch_size=64, workers=2)
        batcher.start()
        fn.gate.clear()
        running = batcher.submit(jobs(0))
        await wait_until(lambda: fn.batches, "the first batch to start")
        futures = batcher.submit(jobs(1, 2))  # a batch runs: these wait a minute for a fuller batch
        await asyncio.sleep(0.05)
        batcher._task.cancel()
        outcomes = await asyncio.gather(*running, *futures, return_exceptions=True)
        fn.gate.set()
        executor.shutdown()
        return outcomes

    assert all(isinstance(o, NotReadyError) for o in run(scenario()))
    assert fn.batches == [[0]]


def test_an_idle_batcher_runs_a_lone_job_at_once_and_a_busy_one_waits_for_company():
    fn = Recorder()

    async def scenario():
        batcher, executor, stats = make(fn, max_queue_delay_ms=60_000, max_batch_size=4, workers=2)
        batcher.start()
        fn.gate.clear()
        lone = batcher.submit(jobs(1))  # nothing runs: no waiting for company, despite a minute's delay
        await wait_until(lambda: len(fn.batches) == 1, "the lone job to start at once")
        waiting = batcher.submit(jobs(2, 3))  # a batch runs and a worker is free: wait for a fuller batch
        await asyncio.sleep(0.1)
        assert len(fn.batches) == 1 and batcher.queued_jobs == 2
        filling = batcher.submit(jobs(4, 5))  # now the batch is full (4): it goes
        await wait_until(lambda: len(fn.batches) == 2, "the full batch to start")
        last = batcher.submit(jobs(6))
        fn.gate.set()  # once the machine is idle again the last job goes without waiting
        values = [(await f).value for f in [*lone, *waiting, *filling, *last]]
        await batcher.close()
        executor.shutdown()
        return values, stats

    values, stats = run(scenario())
    assert values == [2, 4, 6, 8, 10, 12]
    assert sorted(s.size for s in stats) == [1, 1, 4]  # the first two batches may finish in either order


def test_a_job_whose_deadline_passes_while_it_runs_is_expired_and_counted_abandoned():
    fn = Recorder()

    async def scenario():
        batcher, executor, stats = make(fn)
        batcher.start()
        loop = asyncio.get_running_loop()
        fn.gate.clear()
        late = batcher.submit(jobs(1), deadline=loop.time() + 0.05)
        on_time = batcher.submit(jobs(2), deadline=loop.time() + 60)
        await wait_until(lambda: fn.batches, "the batch to start")
        await asyncio.sleep(0.1)  # the first deadline passes while the batch runs
        fn.gate.set()
        outcomes = await asyncio.gather(*late, *on_time, return_exceptions=True)
        await batcher.close()
        executor.shutdown()
        return outcomes, stats

    (late, on_time), stats = run(scenario())
    assert isinstance(late, RequestExpiredError) and on_time.value == 4
    assert [(s.size, s.abandoned) for s in stats] == [(2, 1)]


def test_hurry_runs_a_batch_waiting_for_company_at_once():
    fn = Recorder()

    async def scenario():
        batcher, executor, _ = make(fn, max_queue_delay_ms=60_000, max_batch_size=64, workers=2)
        batcher.start()
        fn.gate.clear()
        running = batcher.submit(jobs(1))
        await wait_until(lambda: fn.batches, "the first batch to start")
        waiting = batcher.submit(jobs(2))  # a batch runs: this one would wait a minute for company
        await asyncio.sleep(0.05)
        assert batcher.queued_jobs == 1
        batcher.hurry()
        await wait_until(lambda: len(fn.batches) == 2, "the hurried batch to start")
        fn.gate.set()
        values = [(await f).value for f in [*running, *waiting]]
        await batcher.close()
        executor.shutdown()
        return values

    assert run(scenario()) == [2, 4]


def grouped(group: str, *values: int, tokens: int = 4) -> list[Job[str, int]]:
    return [Job(payload=v, tokens=tokens, group=group) for v in values]


def test_jobs_of_different_groups_never_share_a_batch_and_the_oldest_group_goes_first():
    fn = Recorder()

    async def scenario():
        batcher, executor, stats = make(fn, max_batch_size=16)
        batcher.start()
        fn.gate.clear()
        first = batcher.submit(grouped("a", 0))
        await wait_until(lambda: fn.batches, "the first batch to start")
        # Interleaved, same lengths: without groups these would make one batch of 8.
        callers = [batcher.submit(grouped("b" if i % 2 else "a", 10 + i, 20 + i)) for i in range(4)]
        await wait_until(lambda: batcher.queued_jobs == 8, "8 queued jobs")
        assert batcher.queued_tokens == 32
        fn.gate.set()
        results = [[r.value for r in await asyncio.gather(*c)] for c in callers]
        await first[0]
        await batcher.close()
        executor.shutdown()
        return results, stats

    results, stats = run(scenario())
    assert results == [[2 * (10 + i), 2 * (20 + i)] for i in range(4)]
    assert [sorted(b) for b in fn.batches[1:]] == [[10, 12, 20, 22], [11, 13, 21, 23]]  # a (oldest), then b
    assert fn.groups == ["a", "a", "b"]  # each batch's function is told the group it runs
    assert [s.size for s in stats] == [1, 4, 4]


def test_cancelling_every_job_of_a_group_frees_its_place_and_the_other_group_still_runs():
    fn = Recorder()

    async def scenario():
        batcher, executor, _ = make(fn, max_batch_size=16)
        batcher.start()
        fn.gate.clear()
        first = batcher.submit(grouped("a", 0))
        await wait_until(lambda: fn.batches, "the first batch to start")
        gone = batcher.submit(grouped("b", 1, 2, tokens=7))
        kept = batcher.submit(grouped("c", 3))
        for future in gone:
            future.cancel()
        await asyncio.sleep(0)  # done callbacks run on the next turn of the loop
        assert batcher.queued_jobs == 1 and batcher.queued_tokens == 4
        fn.gate.set()
        values = [(await f).value for f in [*first, *kept]]
        await batcher.close()
        executor.shutdown()
        return values

    assert run(scenario()) == [0, 6]
    assert fn.batches == [[0], [3]]
