"""The batcher's pure decisions: which jobs form the next batch (within one group), and admission."""

from __future__ import annotations

import random

import pytest

from mrl.serving.selection import admits, plan_batch, select_batch


def test_select_batch_groups_similar_lengths_around_the_anchor():
    lengths = [2, 3, 3, 4, 20, 21, 22, 90]
    sel = select_batch(lengths, 5, max_tokens=66, max_size=8)
    assert (sel.start, sel.stop) == (4, 7)  # the three texts of ~20 tokens, not the short ones
    assert sel.full
    sel = select_batch(lengths, 1, max_tokens=1000, max_size=4)
    assert (sel.start, sel.stop) == (0, 4) and sel.full


def test_select_batch_respects_budget_and_size_and_always_takes_the_anchor():
    lengths = [5, 5, 5, 5, 500]
    assert select_batch(lengths, 4, max_tokens=100, max_size=8).stop == 5  # alone, over budget, still runs
    assert select_batch(lengths, 4, max_tokens=100, max_size=8).start == 4
    sel = select_batch(lengths, 0, max_tokens=100, max_size=2)
    assert sel.stop - sel.start == 2 and sel.full
    sel = select_batch([5, 5], 0, max_tokens=100, max_size=8)
    assert (sel.start, sel.stop, sel.full) == (0, 2, False)  # the queue ran out, not a limit
    with pytest.raises(IndexError):
        select_batch([1], 3, max_tokens=10, max_size=2)


def test_select_batch_keeps_padding_under_its_share():
    lengths = [10, 10, 11, 12, 20, 30]
    sel = select_batch(lengths, 0, max_tokens=1000, max_size=8, max_padding=0.1)
    assert (sel.start, sel.stop, sel.full) == (0, 3, True)  # 2 of 33 padded tokens; with 12: 5 of 48, over 10%
    sel = select_batch(lengths, 5, max_tokens=1000, max_size=8, max_padding=0.0)
    assert (sel.start, sel.stop, sel.full) == (5, 6, True)  # alone: any neighbour would add padding
    sel = select_batch(lengths, 5, max_tokens=1000, max_size=8, max_padding=1.0)
    assert (sel.start, sel.stop) == (0, 6)


def test_select_batch_never_breaks_its_limits_on_random_queues():
    rng = random.Random(0)
    for _ in range(500):
        lengths = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 40)))
        anchor = rng.randrange(len(lengths))
        max_tokens, max_size, max_padding = rng.randint(1, 400), rng.randint(1, 16), rng.choice([0, 0.1, 0.5, 1])
        sel = select_batch(lengths, anchor, max_tokens=max_tokens, max_size=max_size, max_padding=max_padding)
        size, padded = sel.stop - sel.start, (sel.stop - sel.start) * lengths[sel.stop - 1]
        assert sel.start <= anchor < sel.stop
        assert size <= max_size
        assert size == 1 or padded <= max_tokens
        assert size == 1 or padded - sum(lengths[sel.start : sel.stop]) <= max_padding * padded


def test_admission_is_monotone_so_one_text_passes_wherever_a_larger_request_holding_it_passes():
    rng = random.Random(1)
    for _ in range(2000):
        capacity, queued = rng.randint(1, 500), rng.randint(0, 500)
        texts = [rng.randint(1, 60) for _ in range(rng.randint(1, 8))]
        if admits(queued, sum(texts), capacity):
            assert all(admits(queued, t, capacity) for t in texts)


def _lanes(jobs: list[tuple[str, int, int]]) -> dict[str, list[tuple[int, int]]]:
    """(group, tokens, seq) jobs as each group's sorted (tokens, seq) keys, as the batcher keeps them."""
    lanes: dict[str, list[tuple[int, int]]] = {}
    for group, tokens, seq in jobs:
        lanes.setdefault(group, []).append((tokens, seq))
    return {group: sorted(keys) for group, keys in lanes.items()}


def test_plan_batch_anchors_on_the_oldest_job_of_any_group_and_stays_in_its_group():
    lanes = _lanes([("l3", 10, 1), ("l6", 10, 0), ("l3", 11, 2), ("l6", 12, 3), ("l3", 12, 4)])
    plan = plan_batch(lanes, max_tokens=1000, max_size=8)
    assert plan.group == "l6" and (plan.selection.start, plan.selection.stop) == (0, 2)
    del lanes["l6"]
    plan = plan_batch(lanes, max_tokens=1000, max_size=8)
    assert plan.group == "l3" and (plan.selection.start, plan.selection.stop) == (0, 3)
    with pytest.raises(IndexError):
        plan_batch({}, max_tokens=1000, max_size=8)


def test_plan_batch_batches_a_group_whose_lengths_interleave_with_another_groups():
    # Sorted together, the other group's texts would sit between these; apart, the three batch as one.
    lanes = _lanes([("a", 10, 0), ("b", 10, 1), ("a", 11, 2), ("b", 11, 3), ("a", 11, 4), ("b", 12, 5)])
    plan = plan_batch(lanes, max_tokens=1000, max_size=3, max_padding=0.1)
    assert plan.group == "a" and (plan.selection.start, plan.selection.stop) == (0, 3)


def test_plan_batch_never_mixes_groups_and_keeps_select_batch_limits_on_random_queues():
    rng = random.Random(2)
    for _ in range(500):
        jobs = [(rng.choice("xyz"), rng.randint(1, 60), seq) for seq in range(rng.randint(1, 40))]
        rng.shuffle(jobs)
        lanes = _lanes(jobs)
        max_tokens, max_size, max_padding = rng.randint(1, 400), rng.randint(1, 16), rng.choice([0, 0.1, 0.5, 1])
        plan = plan_batch(lanes, max_tokens=max_tokens, max_size=max_size, max_padding=max_padding)
        oldest = min(jobs, key=lambda j: j[2])
        lane = lanes[plan.group]
        assert plan.group == oldest[0]
        taken = lane[plan.selection.start : plan.selection.stop]
        assert (oldest[1], oldest[2]) in taken
        anchor = lane.index((oldest[1], oldest[2]))
        alone = select_batch([k[0] for k in lane], anchor, max_tokens=max_tokens, max_size=max_size,
                             max_padding=max_padding)  # fmt: skip
        assert plan.selection == alone  # the other groups change nothing about this group's batch


def test_a_busy_group_never_starves_a_quiet_one():
    # Each step a busy group gets new jobs and one batch runs; the quiet group's one job still goes soon.
    seq = iter(range(10**6))
    jobs = [("busy", 5, next(seq)) for _ in range(6)] + [("quiet", 5, next(seq))]
    quiet_ran = None
    for step in range(20):
        jobs += [("busy", 5, next(seq)) for _ in range(4)]
        lanes = _lanes(jobs)
        plan = plan_batch(lanes, max_tokens=1000, max_size=4)
        taken = set(lanes[plan.group][plan.selection.start : plan.selection.stop])
        jobs = [j for j in jobs if not (j[0] == plan.group and (j[1], j[2]) in taken)]
        if plan.group == "quiet":
            quiet_ran = step
            break
    assert quiet_ran is not None and quiet_ran <= 2  # behind the two batches of busy jobs older than it
