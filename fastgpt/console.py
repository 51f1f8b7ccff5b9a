"""What a run prints: a Console, made by train() and held by the run, prints lines above
the progress bar and flushes them at once. In a distributed run only rank 0's prints."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Console:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet  # the ranks other than 0 of a distributed run
        self._said: set[str] = set()

    def log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message)  # prints above the progress bar instead of through it
            sys.stdout.flush()  # a file is block-buffered: a kill -9 must not lose the lines

    def once(self, message: str) -> None:
        """log(message) the first time this console is given it; after that, nothing."""
        if message not in self._said:
            self._said.add(message)
            self.log(message)
