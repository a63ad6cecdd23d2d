"""Checksums and downloads.

A checksum is written ``"ALGO:HEX"`` with ALGO ``md5`` or ``sha256``; a file may carry
several accepted checksums (e.g. the canonical archive and a distribution's repack of it)
and passes when any one matches.

A download goes to a temporary file of its own beside the target, ``.FILE.<random>.part``,
is checked, and only then renamed over ``FILE`` (`os.replace` is atomic), so a killed
download never leaves a file that looks complete and no process ever reads or renames
another's half-written bytes. Processes fetching the same file take turns on an exclusive
lock (``.FILE.lock``, see `_parts`): the second finds the first's verified file and uses
it. Temporary files left by a crashed process are removed by the next download of that
file.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from sensgen.data import _parts
from sensgen.errors import UserError

log = logging.getLogger(__name__)

ALGORITHMS = ("md5", "sha256")
TIMEOUT_S = 60.0  # per socket operation, not for the whole file
CHUNK = 1 << 20

# What a bad network, server or proxy raises: refused or reset connections and timeouts
# (OSError, URLError), malformed or cut-off HTTP (BadStatusLine, IncompleteRead), and an
# unknown URL scheme (ValueError).
NETWORK_ERRORS = (OSError, http.client.HTTPException, ValueError)


def split_checksum(checksum: str) -> tuple[str, str]:
    """Split ``"md5:abc…"`` into ``("md5", "abc…")``, rejecting unknown algorithms."""
    algo, _, hexdigest = checksum.partition(":")
    if algo not in ALGORITHMS or not hexdigest:
        raise ValueError(f"checksum {checksum!r} is not 'md5:HEX' or 'sha256:HEX'")
    return algo, hexdigest.lower()


def digests(path: Path, algorithms: Sequence[str] = ALGORITHMS) -> dict[str, str]:
    """Hex digests of a file, one pass; memoised within the process on the file's identity
    (path, inode, size, mtime), so a replaced or rewritten file is hashed again."""
    st = path.stat()
    identity = (st.st_ino, st.st_size, st.st_mtime_ns)
    return dict(_digests(str(path.resolve()), identity, tuple(algorithms)))


@functools.lru_cache(maxsize=256)
def _digests(path: str, identity: tuple[int, int, int], algorithms: tuple[str, ...]):
    del identity  # part of the cache key only
    hashes = {a: hashlib.new(a, usedforsecurity=False) for a in algorithms}
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            for h in hashes.values():
                h.update(block)
    return tuple((a, h.hexdigest()) for a, h in hashes.items())


def checksum_problem(path: Path, accepted: Sequence[str]) -> str | None:
    """None if `path` matches one of the `accepted` checksums, else "expected …, got …"."""
    wanted = [split_checksum(c) for c in accepted]
    got = digests(path, sorted({a for a, _ in wanted}))
    if any(got[a] == h for a, h in wanted):
        return None
    expected = " or ".join(f"{a}:{h}" for a, h in wanted)
    actual = ", ".join(f"{a}:{h}" for a, h in got.items())
    return f"checksum mismatch: expected {expected}, got {actual}"


def mismatch_error(name: str, path: Path, problem: str) -> UserError:
    """The one-paragraph error for a file whose checksum is wrong."""
    return UserError(
        f"Dataset {name!r}: file {path} failed verification ({problem}); the file is damaged, "
        f"incomplete or a different version. Fix: delete {path} and run "
        f"`sensgen datasets fetch {name}`."
    )


class DownloadError(UserError):
    """No URL gave the file. `tried` names each URL and why it failed; `fix` is the
    sentence after "Fix:", so that `fetch` can put what else it knows in front of it."""

    def __init__(self, name: str, dest: Path, tried: str) -> None:
        self.name, self.dest, self.tried = name, dest, tried
        self.fix = (
            f"check the network, or place the files in {dest.parent} (or in "
            f"$SENSGEN_DATA/{name}/ after setting SENSGEN_DATA), or set SENSGEN_MIRROR to a "
            f"base URL that serves them"
        )
        super().__init__(
            f"Dataset {name!r}: could not download {dest.name}: tried {tried}. Fix: {self.fix}."
        )

    def __reduce__(self):
        # A worker process (`--workers`, Ray) sends its errors back pickled, and unpickling
        # calls the class with `args` (the message): come back as a plain UserError.
        return UserError, self.args

    def with_context(self, lead: str, fixes: Sequence[str]) -> UserError:
        """This error with `lead` (what else is wrong, ending ", and ") before it and
        `fixes` before its own."""
        return UserError(
            f"Dataset {self.name!r}: {lead}could not download {self.dest.name}: tried "
            f"{self.tried}. Fix: {'; or '.join([*fixes, self.fix])}."
        )


def download(urls: Sequence[str], dest: Path, accepted: Sequence[str], *, name: str) -> None:
    """Download the first reachable URL to `dest` and verify it against `accepted`.

    Holds `dest`'s download lock throughout, so that a process that waited for another
    one downloading the same file finds it there, verified, and downloads nothing.

    Raises:
        DownloadError: every URL failed (each URL and reason named).
        UserError: the downloaded bytes have the wrong checksum (they are discarded), a
            file that appeared at `dest` meanwhile is damaged, or the folder cannot be
            written (a permission problem or a full disk, named as such).
    """
    _parts.make_folder(dest.parent, name)
    with _parts.download_lock(dest, name) as locked:
        if _already_there(dest, accepted, name):
            return
        _parts.remove_stale(dest, everything=locked)
        failures = []
        for url in urls:
            reason = _try_url(url, dest, accepted, name)
            if reason is None:
                return
            failures.append(f"{url} ({reason})")
    raise DownloadError(name, dest, "; ".join(failures) or "no URL (no mirror is configured)")


def _already_there(dest: Path, accepted: Sequence[str], name: str) -> bool:
    """True if `dest` exists and verifies (another process downloaded it meanwhile); a
    damaged file there is never overwritten: it is the user's to look at and delete."""
    try:
        if not dest.is_file():
            return False
        problem = checksum_problem(dest, accepted)
    except OSError as e:
        raise _parts.local_error(name, dest, e, doing="read") from None
    if problem is not None:
        raise mismatch_error(name, dest, problem)
    log.info("%s appeared while waiting to download it; using it", dest)
    return True


def _try_url(url: str, dest: Path, accepted: Sequence[str], name: str) -> str | None:
    """Download `url` into a new temporary file, verify it and rename it to `dest`.

    Returns None on success, else why the network failed. The temporary file is removed
    whatever happens (Ctrl-C included).
    """
    part = _parts.new_part(dest, name)
    try:
        try:
            _fetch_url(url, part)
        except _parts.LocalFileError as e:
            raise _parts.local_error(name, part.parent, e.error, doing="write in") from None
        except NETWORK_ERRORS as e:
            return _reason(e)
        try:
            problem = checksum_problem(part, accepted)
            if problem is None:
                os.replace(part, dest)
        except OSError as e:
            raise _parts.local_error(name, part, e, doing="verify and rename") from None
        if problem is not None:
            raise UserError(
                f"Dataset {name!r}: the file downloaded from {url} for {dest} failed "
                f"verification ({problem}), so it was discarded. Fix: retry later, point "
                f"SENSGEN_MIRROR at a mirror with the original files, or place a verified "
                f"copy at {dest}."
            )
    finally:
        part.unlink(missing_ok=True)
    return None


def _fetch_url(url: str, part: Path) -> None:
    """Stream `url` into `part`; errors of `part` itself come as `LocalFileError`."""
    log.info("downloading %s -> %s", url, part)
    request = urllib.request.Request(url, headers={"User-Agent": "sensgen"})
    with (
        urllib.request.urlopen(request, timeout=TIMEOUT_S) as response,
        _parts.local_file(part) as out,
    ):
        while block := response.read(CHUNK):
            out.write(block)


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        error.close()  # it holds the response body; closing avoids a ResourceWarning
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, http.client.HTTPException):
        what = "a cut-off" if isinstance(error, http.client.IncompleteRead) else "a malformed"
        text, kind = " ".join(str(error).split())[:120], type(error).__name__
        return f"{what} HTTP response: {text if text.startswith(kind) else f'{kind}: {text}'}"
    return str(error) or type(error).__name__
