"""What every `mrl-*` command shares: usage errors as one readable line with exit code 2; SIGINT and SIGTERM as
Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so the same clean-up runs for both."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within, SIGINT and SIGTERM interrupt the main thread as Ctrl-C does, whatever the process inherited.

    SIGTERM by default ends the process uncleaned. SIGINT is set too: a process that starts with it
    ignored, as every background job of a non-interactive shell does (POSIX), gets no Ctrl-C handler
    from Python, so `kill -INT` would be lost and the command would run on to the end.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupted_exit_code(error: KeyboardInterrupt) -> int:
    """128 + the signal that interrupted: 143 for SIGTERM, 130 for Ctrl-C."""
    return error.exit_code if isinstance(error, Terminated) else 128 + signal.SIGINT


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (`PROG: error: ... (see --help)`), exit code 2."""

    def error(self, message: str) -> None:
        """Print the error as one line and exit 2 (argparse prints the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def progress_printer(quiet: bool) -> Callable[[str], None]:
    """A progress callback printing `[  12.3s] message` lines to stderr, timed from now; silent when quiet."""
    start = time.monotonic()

    def progress(message: str) -> None:
        if not quiet:
            print(f"[{time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return progress
