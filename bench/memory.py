"""Process memory and machine CPU use from /proc: peak resident set per cell, and how busy other jobs kept the CPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def parse_status_kib(text: str, field: str) -> int | None:
    """A `kB` field (VmRSS, VmHWM, ...) of /proc/<pid>/status text, in KiB."""
    for line in text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def _field_mib(field: str) -> float | None:
    try:
        kib = parse_status_kib(STATUS.read_text(), field)
    except OSError:
        return None
    return None if kib is None else kib / 1024


def rss_mib() -> float | None:
    """Resident memory of this process now, in MiB (None off Linux)."""
    return _field_mib("VmRSS")


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process since start or the last `reset_peak_rss`, in MiB."""
    return _field_mib("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux 4.0+); False where not possible."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass(frozen=True, kw_only=True)
class CpuSnapshot:
    """Machine-wide busy and total CPU time (from /proc/stat) and this process's own CPU time, in seconds."""

    busy_s: float
    total_s: float
    own_s: float


def parse_proc_stat(text: str, ticks_per_s: float) -> tuple[float, float]:
    """(busy, total) seconds of all CPUs together from /proc/stat's first line."""
    fields = [int(x) for x in text.splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / ticks_per_s, (busy + idle + iowait) / ticks_per_s


def parse_pid_cpu_s(text: str, ticks_per_s: float) -> float:
    """User + system CPU seconds of a process from its /proc/<pid>/stat text."""
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def cpu_snapshot(also_ours: tuple[int, ...] = ()) -> CpuSnapshot | None:
    """Now's CPU counters (None off Linux); `also_ours` are pids whose CPU counts as ours (a local server)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        busy, total = parse_proc_stat(Path("/proc/stat").read_text(), ticks)
        partners = sum(parse_pid_cpu_s(Path(f"/proc/{pid}/stat").read_text(), ticks) for pid in also_ours)
    except (OSError, ValueError, IndexError):
        return None
    t = os.times()
    return CpuSnapshot(busy_s=busy, total_s=total, own_s=t.user + t.system + partners)


def other_load(before: CpuSnapshot | None, after: CpuSnapshot | None, cores: int) -> float | None:
    """Cores' worth of CPU that other processes used between two snapshots (0: we had the machine to ourselves).

    Our own CPU time (every thread of this process) is subtracted from the machine's busy time; what
    remains is other jobs, whose competition for the cores skews any timing taken meanwhile.
    """
    if before is None or after is None or after.total_s <= before.total_s:
        return None
    wall = (after.total_s - before.total_s) / cores
    others = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return max(0.0, others / wall)
