"""What every `mrl-*` command shares: usage errors as one readable line with exit code 2."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (`PROG: error: ... (see --help)`), exit code 2."""

    def error(self, message: str) -> None:
        """Print the error as one line and exit 2 (argparse prints the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
