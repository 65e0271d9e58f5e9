"""One ``simcore grow`` at a time per output folder.

Two runs writing into one folder would both exit 0 and leave only one's results (and could
interleave checkpoints of the same run). :class:`OutputLock` holds ``<out>/.simcore-grow.lock``,
created atomically with the owner's process id; a lock whose process is gone (a ``kill -9``) is
taken over, a live one is refused with the owner named.

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

import os
from pathlib import Path

__all__ = ["FolderInUse", "OutputLock"]

LOCK_NAME = ".simcore-grow.lock"


class FolderInUse(OSError):
    """Another live ``simcore grow`` holds the output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """Exclusive use of an output folder for the duration of a ``with`` block."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._held = False

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise FolderInUse(
                        f"{self.path.parent} is in use by another simcore grow (process "
                        f"{owner}); wait for it, or choose another --out") from None
                self.path.unlink(missing_ok=True)  # its process is gone: a stale lock
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            self._held = True
            return self
        raise FolderInUse(f"could not lock {self.path.parent}: {self.path} keeps reappearing")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False
