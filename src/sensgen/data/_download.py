"""Checksums and downloads.

A checksum is written ``"ALGO:HEX"`` with ALGO ``md5`` or ``sha256``; a file may carry
several accepted checksums (e.g. the canonical archive and a distribution's repack of it)
and passes when any one matches. Downloads go to ``FILE.part``, are checked, and only
then renamed over ``FILE`` (`os.replace` is atomic), so a killed download never leaves a
file that looks complete.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from sensgen.errors import UserError

log = logging.getLogger(__name__)

ALGORITHMS = ("md5", "sha256")
TIMEOUT_S = 60.0  # per socket operation, not for the whole file


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
        while block := f.read(1 << 20):
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


def download(urls: Sequence[str], dest: Path, accepted: Sequence[str], *, name: str) -> None:
    """Download the first reachable URL to `dest` and verify it against `accepted`.

    Raises:
        UserError: every URL failed (each URL and reason named), or the downloaded bytes
            have the wrong checksum (the partial file is removed either way).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    for url in urls:
        try:
            _fetch_url(url, part)
        except (urllib.error.URLError, OSError, ValueError) as e:
            part.unlink(missing_ok=True)
            failures.append(f"{url} ({_reason(e)})")
            continue
        problem = checksum_problem(part, accepted)
        if problem is not None:
            part.unlink(missing_ok=True)
            raise UserError(
                f"Dataset {name!r}: the file downloaded from {url} for {dest} failed "
                f"verification ({problem}), so it was discarded. Fix: retry later, point "
                f"SENSGEN_MIRROR at a mirror with the original files, or place a verified "
                f"copy at {dest}."
            )
        os.replace(part, dest)
        return
    raise UserError(
        f"Dataset {name!r}: could not download {dest.name}: tried "
        f"{'; '.join(failures) or 'no URL (no mirror is configured)'}. Fix: check the "
        f"network, or place the files in {dest.parent} (or in $SENSGEN_DATA/{name}/ after "
        f"setting SENSGEN_DATA), or set SENSGEN_MIRROR to a base URL that serves them."
    )


def _fetch_url(url: str, part: Path) -> None:
    log.info("downloading %s -> %s", url, part)
    request = urllib.request.Request(url, headers={"User-Agent": "sensgen"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(part, "wb") as f:
        shutil.copyfileobj(response, f, 1 << 20)


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        error.close()  # it holds the response body; closing avoids a ResourceWarning
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__
