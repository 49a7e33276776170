"""Process memory from /proc: current and peak resident set, with the peak reset between cells."""

from __future__ import annotations

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
