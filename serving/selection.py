"""Which queued jobs form the next batch, and whether a request is admitted: the batcher's decisions, as pure
functions tested directly."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Selection:
    """A run `[start, stop)` of the length-sorted queue, and whether a limit (not the queue's end) stopped it."""

    start: int
    stop: int
    full: bool


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The next batch: a run of one group's length-sorted queue."""

    group: Hashable
    selection: Selection


def admits(queued_tokens: int, request_tokens: int, capacity: int) -> bool:
    """Whether a request of `request_tokens` fits a queue holding `queued_tokens` of `capacity`.

    Monotone in `request_tokens`: a request that fits still fits with fewer texts, so one text is never
    refused where a larger request holding it would pass.
    """
    return queued_tokens + request_tokens <= capacity


def select_batch(
    lengths: Sequence[int], anchor: int, *, max_tokens: int, max_size: int, max_padding: float = 1.0
) -> Selection:
    """Grow a run of ascending `lengths` around `anchor`, adding whichever neighbour adds the least padding.

    A batch costs its padded size, `count * longest`, which must stay within `max_tokens`; at most a
    `max_padding` share of it may be padding. `anchor` is always in it (even alone over `max_tokens`),
    so the oldest text never starves behind others.
    """
    if not 0 <= anchor < len(lengths):
        raise IndexError(f"anchor {anchor} is outside the queue of {len(lengths)}")

    def fits(count: int, longest: int, real: int) -> bool:
        padded = count * longest
        return padded <= max_tokens and padded - real <= max_padding * padded

    lo, hi = anchor, anchor + 1
    real = lengths[anchor]
    while hi - lo < max_size:
        count, longest = hi - lo + 1, lengths[hi - 1]
        down = lo > 0 and fits(count, longest, real + lengths[lo - 1])
        up = hi < len(lengths) and fits(count, lengths[hi], real + lengths[hi])
        if not (down or up):
            return Selection(start=lo, stop=hi, full=lo > 0 or hi < len(lengths))
        # Padding added: a shorter text pads itself up to the longest; a longer one pads everyone up to it.
        waste_down = longest - lengths[lo - 1] if down else None
        waste_up = (hi - lo) * (lengths[hi] - longest) if up else None
        if waste_up is None or (waste_down is not None and waste_down <= waste_up):
            lo -= 1
            real += lengths[lo]
        else:
            real += lengths[hi]
            hi += 1
    return Selection(start=lo, stop=hi, full=True)


def plan_batch(
    lanes: Mapping[Hashable, Sequence[tuple[int, int]]],
    *,
    max_tokens: int,
    max_size: int,
    max_padding: float = 1.0,
) -> Plan:
    """The next batch: around the oldest job of all groups, grown (as `select_batch` does) within its group only.

    `lanes` maps each group to its jobs' `(tokens, seq)` keys, sorted; the smallest `seq` is the oldest job.
    Anchoring on the oldest of all groups means no group starves another: each batch serves whichever group
    has waited longest.
    """
    queued = [(keys[i][1], group, i) for group, keys in lanes.items() for i in range(len(keys))]
    if not queued:
        raise IndexError("no jobs to plan a batch from")
    _, group, anchor = min(queued, key=lambda q: q[0])
    lengths = [k[0] for k in lanes[group]]
    selection = select_batch(lengths, anchor, max_tokens=max_tokens, max_size=max_size, max_padding=max_padding)
    return Plan(group=group, selection=selection)
