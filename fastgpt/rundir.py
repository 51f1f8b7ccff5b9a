"""A run directory (runs_dir/name/): its files, what marks it as a run, the lock a live run
holds on it, and the temporary files a killed run leaves behind.

- Any of last.pt, best.pt, metrics.jsonl makes a directory a run: a new run refuses it.
- A training run (new or resumed) holds an exclusive lock on `.lock` for its lifetime
  (flock: the OS releases it when the process ends, however it ends); a second run on the
  same directory fails at once, naming the holder's PID. Reading (sample, info) needs none.
  The CLI asks `check_not_in_use` first, before it imports torch (seconds), so that a second
  run fails at once; the lock itself is taken later, by train.
- Files are written through fileio.atomic_open, as `.NAME.XXXXXXXX.tmp` beside NAME; a
  kill -9 mid-write leaves that temporary behind. The next run that takes the lock
  removes those of this directory's own files (no live process can be writing them).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastgpt import FastGPTError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go unlocked there
    fcntl = None

# The files that make a directory a run, and every file fastgpt writes atomically in one.
RUN_MARKERS = ("last.pt", "best.pt", "metrics.jsonl")
WRITTEN_FILES = RUN_MARKERS + ("config.json", "loss.png")
LOCK_FILE = ".lock"


class RunInUse(FastGPTError):
    """Another live process holds the run directory's lock."""


class RunDir:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.last = self.directory / "last.pt"
        self.best = self.directory / "best.pt"
        self.metrics = self.directory / "metrics.jsonl"
        self.config = self.directory / "config.json"
        self.plot = self.directory / "loss.png"
        self._lock_fd: int | None = None

    def markers(self) -> list[str]:
        """The files present that make this directory a run."""
        return [name for name in RUN_MARKERS if (self.directory / name).exists()]

    def lock(self) -> None:
        """Take the directory's exclusive lock (creating the directory), or raise RunInUse."""
        if fcntl is None or self._lock_fd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = self._in_use(fd)
            os.close(fd)
            raise error from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def check_not_in_use(self) -> None:
        """Raise RunInUse if a live run holds the lock, as lock() would, creating nothing (no
        directory, no .lock) and holding nothing: a quick check; lock() is what decides."""
        if fcntl is None:
            return
        try:
            fd = os.open(self.directory / LOCK_FILE, os.O_RDONLY)
        except OSError:  # no .lock, so no run holds it (or unreadable: lock() will say)
            return
        try:  # shared: checks never block each other, and an exclusive holder blocks all
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(fd) from None
        finally:
            os.close(fd)  # releases the shared lock at once

    def _in_use(self, fd: int) -> RunInUse:
        """The error naming the holder: the PID it wrote into the lock file `fd`."""
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        return RunInUse(f"{self.directory} is in use by another fastgpt run (PID {holder}); "
                        f"wait for it to end, or use another --name")

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    def remove_stale_temporaries(self) -> tuple[int, int]:
        """Remove the temporaries of this directory's own files that a killed writer left
        (call with the lock held). Returns (files removed, bytes freed)."""
        count = freed = 0
        for name in WRITTEN_FILES:
            for path in self.directory.glob(f".{name}.*.tmp"):
                try:
                    size = path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
                count, freed = count + 1, freed + size
        return count, freed
