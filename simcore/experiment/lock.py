"""One ``simcore grow`` at a time per output folder.

Two runs writing into one folder would both exit 0 and leave only one's results (and could
interleave checkpoints of the same run). :class:`OutputLock` holds ``<out>/.simcore-grow.lock``
with an exclusive ``flock`` and writes the owner's process id into it. The kernel releases the
lock when its process ends in any way (a ``kill -9`` included), so a lock left behind is taken
over and a live one is refused with the owner named; there is no moment when a lock exists
without its holder (a file created first and its pid written after would be such a moment).

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> with OutputLock(folder):
...     try:
...         OutputLock(folder).__enter__()
...     except FolderInUse as err:
...         print(str(err).split(";")[0].endswith("is in use by another simcore grow (process "
...                                               f"{os.getpid()})"))
True
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["FolderInUse", "OutputLock"]

LOCK_NAME = ".simcore-grow.lock"


class FolderInUse(OSError):
    """Another live ``simcore grow`` holds the output folder."""


class OutputLock:
    """Exclusive use of an output folder for the duration of a ``with`` block (POSIX ``flock``)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "starting"
                os.close(fd)
                raise FolderInUse(
                    f"{self.path.parent} is in use by another simcore grow (process "
                    f"{owner}); wait for it, or choose another --out") from None
            if self._still_the_lock_file(fd):
                break
            os.close(fd)  # its holder removed it between our open and our lock: again
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def _still_the_lock_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: no one holds the old file
            os.close(self._fd)
            self._fd = None
