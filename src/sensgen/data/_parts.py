"""A download's temporary files and lock, and errors of the local disk.

Each download writes a temporary file of its own, ``.FILE.<pid>-<random>.part`` beside
``FILE``: with one shared ``FILE.part``, two processes fetching the same dataset truncated
and renamed each other's bytes (a raw FileNotFoundError, a false checksum failure, or a
half-written file read as data). The name is hidden and ends in ``.part``, so it is never
read as data: readers open only the registered file names.

Processes fetching the same file also take turns on an exclusive ``flock`` of
``.FILE.lock``. The holder removes that file before it lets go (a waiter then finds that
the file it locked is gone and takes a new one), so nothing stays behind. A lock is
released when its holder exits, however it dies, so the holder removes the other
temporary files of ``FILE`` that nothing has written to for `LOCKED_STALE_S` (not all of
them: where locks do not hold across machines, another machine may be writing one). Where
the file system has no locks, downloads run side by side (each in its own file, still
safe), the lock file stays, and only temporary files untouched for `STALE_S` are removed.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sensgen.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, unique temporary files only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# A live download writes its file every megabyte; one untouched for a day is a dead one's.
STALE_S = 24 * 3600.0
LOCKED_STALE_S = 600.0  # (`remove_stale`) ten network read timeouts
LOCK_TRIES = 100  # lock files removed under a waiter before it gives up on locking


class LocalFileError(Exception):
    """An OSError of the file a download writes, kept apart from the network's OSErrors
    (which the URL loop catches), so that a full disk or a permission problem is never
    reported as a network failure."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def permission_fix(path: Path) -> str:
    """The fix for a file or folder this user may not read or write (one clause)."""
    return (
        f"give this user access to it (`chmod`/`chown` {path}), or set SENSGEN_DATA to a "
        f"folder you can read and write"
    )


def local_error(name: str, path: Path, error: OSError, *, doing: str) -> UserError:
    """The error for a local file or folder that the machine refuses, named as such: a
    permission problem is neither a network failure nor a damaged file, and its fix is
    the file's permissions, not deleting it or checking the network."""
    why = error.strerror or str(error)
    if isinstance(error, PermissionError):
        what, fix = "a permission problem, not the network or a damaged file", permission_fix(path)
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        what, fix = "the disk is full", "free some space, or set SENSGEN_DATA to another disk"
    else:
        what = "a problem of the local file system, not the network"
        fix = f"check {path}, or set SENSGEN_DATA to another folder, and run the command again"
    return UserError(f"Dataset {name!r}: cannot {doing} {path} ({why}): {what}. Fix: {fix}.")


def make_folder(folder: Path, name: str) -> None:
    """Create the download folder, reporting a refusal as a local problem."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # The fix concerns the folder that refused: the deepest one that exists.
        refused = next((p for p in folder.parents if os.path.isdir(p)), folder)
        raise local_error(name, refused, e, doing=f"create {folder} in") from None


@contextlib.contextmanager
def download_lock(dest: Path, name: str) -> Iterator[bool]:
    """Hold the exclusive lock on downloading `dest`, waiting for another holder; yields
    whether the lock is held (False where the file system has no locks)."""
    path = dest.with_name(f".{dest.name}.lock")
    for _ in range(LOCK_TRIES):
        try:
            handle = open(path, "a+b")  # noqa: SIM115 (closed below)
        except OSError as e:
            raise local_error(name, dest.parent, e, doing="write in") from None
        locked = _lock(handle, dest)
        if not locked or _same_file(handle, path):
            break
        handle.close()  # the holder we waited for removed this lock file: take a new one
    else:  # a file system whose inodes do not stay put: go on as if it had no locks
        locked = False
    try:
        yield locked
    finally:
        if locked:  # while held, so no later process waits on a stale file; never a lock
            path.unlink(missing_ok=True)  # file that another process holds
        handle.close()  # releases the lock


def _same_file(handle: BinaryIO, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except OSError:
        return False


def _lock(handle: BinaryIO, dest: Path) -> bool:
    if fcntl is None:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    except OSError:  # ENOLCK, EOPNOTSUPP: this file system has no locks
        return False
    log.warning("waiting for another process that is downloading %s", dest)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:  # (EDEADLK, ENOLCK) go on without: the temporary file is still our own
        return False
    return True


def part_files(dest: Path) -> list[Path]:
    """Temporary files of downloads of `dest` now in its folder (with the fixed
    ``FILE.part`` of sensgen versions before per-process names)."""
    pattern = f".{glob.escape(dest.name)}.*.part"
    legacy = dest.with_name(dest.name + ".part")
    try:
        return [*dest.parent.glob(pattern), *([legacy] if legacy.exists() else [])]
    except OSError:
        return []


def remove_stale(dest: Path, *, everything: bool) -> None:
    """Remove temporary files of `dest` that no live process writes: while holding the
    download lock (`everything`), those untouched for LOCKED_STALE_S, else for STALE_S.

    Not every file while locked: a file system whose locks do not hold across machines
    (NFS mounted ``nolock`` or ``local_lock``, Ray workers sharing a cache) would let two
    holders delete each other's live downloads. A live download writes at least once per
    network read timeout (60 s), so a file untouched for minutes is a dead one's."""
    now = time.time()
    limit = LOCKED_STALE_S if everything else STALE_S
    for part in part_files(dest):
        try:
            if now - part.stat().st_mtime > limit:
                part.unlink()
                log.info("removed %s, left by an interrupted download", part)
        except OSError:
            continue  # gone already, or not ours to remove


def new_part(dest: Path, name: str) -> Path:
    """Create this download's own empty temporary file beside `dest` (mode 0666 less the
    umask, like any file the user writes, so a shared cache stays shared)."""
    part = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as e:
        raise local_error(name, dest.parent, e, doing="write in") from None
    return part


class _Writer:
    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def write(self, block: bytes) -> None:
        try:
            self._f.write(block)
        except OSError as e:
            raise LocalFileError(e) from e


@contextlib.contextmanager
def local_file(path: Path) -> Iterator[_Writer]:
    """`path` opened for writing; every OSError of the file itself (open, write, close)
    is raised as `LocalFileError`."""
    try:
        f = open(path, "wb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise LocalFileError(e) from e
    try:
        yield _Writer(f)
    finally:
        try:
            f.close()
        except OSError as e:
            raise LocalFileError(e) from e  # a failed close may lose the last bytes
