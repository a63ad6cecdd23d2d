"""One driver per study directory: the lock file, its pid, and temporaries of dead writers.

The driver (`sensgen run`) holds an exclusive lock on DIR/.lock while it writes, so a second
`sensgen run` on the same DIR is refused (exit 2) instead of re-queueing and retraining the
first one's packs. The operating system drops the lock when the driver dies, even by
SIGKILL. The lock file holds the driver's pid and --workers, so `sensgen status` can tell
`running` rows of a live driver from those a killed one left behind.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sensgen.errors import UserError

LOCK_FILE = ".lock"


@contextmanager
def driver_lock(out: Path, workers: int = 1) -> Iterator[Callable[[int], None]]:
    """Hold an exclusive, non-blocking lock on DIR/.lock: one driver per study directory.

    Without it a second driver's `Store.reset_stale` would re-queue (and both would then
    train) the packs the first one is running. flock locks die with their process. Yields a
    function that records another worker count (Ray learns its own once it is up).
    """
    if sys.platform == "win32":  # no flock; one driver per directory is then up to the user
        yield lambda _: None
        return
    import fcntl

    with open(out / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{out} is in use by another `sensgen run` (it holds {out / LOCK_FILE}). Wait "
                f"for it to finish (`sensgen status {out}` shows its progress), or choose "
                "another --out directory."
            ) from None
        _write_driver(handle, f"{os.getpid()} {workers}\n")
        try:
            yield lambda n: _write_driver(handle, f"{os.getpid()} {n}\n")
        finally:
            _write_driver(handle, "")
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_driver(handle, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()


def live_driver_workers(out: Path) -> int | None:
    """--workers of the live driver named in DIR/.lock; None if none is alive.

    A driver killed by -9 leaves its pid in the file, so liveness is checked by pid.
    """
    try:
        pid, workers = map(int, (out / LOCK_FILE).read_text(encoding="utf-8").split())
    except (OSError, ValueError):
        return None
    return workers if _pid_alive(pid) else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user's process
        return True
    return True


# Temporary files carry their writer's pid: `.study.toml.tmp-PID` (here), `NAME.tmp-PID`
# (the store's points/ and weights/), `.NAME.PID.HEX.tmp` (the report's files).
_TEMPORARY = re.compile(r".+\.tmp-(\d+)|\..+\.(\d+)\.[0-9a-f]+\.tmp")


def remove_dead_temporaries(out: Path) -> None:
    """Remove temporary files whose writer died before renaming them (kill -9)."""
    for folder in (out, out / "points", out / "weights", out / "report"):
        for path in folder.glob("*tmp*") if folder.is_dir() else ():
            match = _TEMPORARY.fullmatch(path.name)
            if match and not _pid_alive(int(match.group(1) or match.group(2))):
                path.unlink(missing_ok=True)
