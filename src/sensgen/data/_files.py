"""Finding, verifying and fetching a dataset's files.

Search path, in order (the first folder holding every file with a valid checksum wins):

1. the ``root`` argument, if given;
2. for downloadable datasets, the cache: ``$SENSGEN_DATA/<name>/`` if ``SENSGEN_DATA`` is
   set, else ``~/.cache/sensgen/<name>/``;
3. the dataset's own local folders (Debian's ``/usr/share/datasets/fashion-mnist`` for
   ``fashion_mnist``; the installed package's data folder for embedded datasets).

Downloads go to ``root`` if given, else to the cache folder. Base URLs come from, in order:
the ``mirror`` argument of `fetch`, the ``SENSGEN_MIRROR`` environment variable, the
registry's canonical mirrors; a file's URL is ``BASE + "/" + file name``.

A file that fails its checksum is never used: `fetch` raises for it rather than reading or
silently replacing it, and `verify` reports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sensgen.data._download import checksum_problem, download, mismatch_error
from sensgen.data._registry import DatasetSpec, Source
from sensgen.errors import UserError

DATA_ENV = "SENSGEN_DATA"
MIRROR_ENV = "SENSGEN_MIRROR"


@dataclass(frozen=True)
class FileReport:
    """Verification result for one file: `problem` and `fix` are None when `ok`."""

    path: Path
    ok: bool
    problem: str | None = None
    fix: str | None = None  # what to do about the problem, one sentence


@dataclass(frozen=True)
class VerifyReport:
    """Verification result for one dataset in one folder."""

    name: str
    folder: Path
    files: tuple[FileReport, ...]

    @property
    def ok(self) -> bool:
        """True when every file is present with a valid checksum."""
        return all(f.ok for f in self.files)


def cache_dir(name: str) -> Path:
    """``$SENSGEN_DATA/<name>`` if SENSGEN_DATA is set, else ``~/.cache/sensgen/<name>``."""
    base = os.environ.get(DATA_ENV)
    return Path(base).expanduser() / name if base else Path.home() / ".cache/sensgen" / name


def candidate_dirs(spec: DatasetSpec, root: str | Path | None) -> list[Path]:
    """The search path for `spec`, without duplicates, in priority order."""
    dirs = [Path(root).expanduser()] if root is not None else []
    if spec.source is Source.DOWNLOAD:
        dirs.append(cache_dir(spec.name))
    dirs.extend(spec.local_dirs())
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def check_folder(spec: DatasetSpec, folder: Path) -> VerifyReport:
    """Check every file of `spec` in `folder` (missing, unreadable, or checksum)."""
    reports = []
    for f in spec.files:
        path = folder / f.name
        if not path.is_file():
            reports.append(FileReport(path, False, "missing", _fix(spec, path, damaged=False)))
            continue
        try:
            problem = checksum_problem(path, f.checksums)
        except OSError as e:
            problem = f"unreadable ({e})"
        fix = None if problem is None else _fix(spec, path, damaged=True)
        reports.append(FileReport(path, problem is None, problem, fix))
    return VerifyReport(spec.name, folder, tuple(reports))


def _fix(spec: DatasetSpec, path: Path, *, damaged: bool) -> str:
    """What to do about a missing or damaged file of `spec` (as `fetch`'s errors say)."""
    if spec.source is Source.EMBEDDED:
        return f"reinstall the package that ships it ({spec.missing_hint}, with --force-reinstall)"
    fetch = f"run `sensgen datasets fetch {spec.name}`"
    return f"delete {path} and {fetch}" if damaged else fetch


def _complete(spec: DatasetSpec, folder: Path) -> bool:
    return all((folder / f.name).is_file() for f in spec.files)


def locate(spec: DatasetSpec, root: str | Path | None = None) -> Path | None:
    """The first folder on the search path holding all files, verified; else None."""
    for folder in candidate_dirs(spec, root):
        if _complete(spec, folder) and check_folder(spec, folder).ok:
            return folder
    return None


def verify(spec: DatasetSpec, root: str | Path | None = None) -> VerifyReport:
    """Report on the folder `locate` would use; failing that, the first folder holding any
    of the files (so a damaged copy is shown); failing that, the download folder."""
    found = locate(spec, root)
    if found is not None:
        return check_folder(spec, found)
    dirs = candidate_dirs(spec, root)
    for folder in dirs:
        if any((folder / f.name).is_file() for f in spec.files):
            return check_folder(spec, folder)
    if not dirs:  # an embedded dataset whose package is not installed
        problem, fix = "not found", spec.missing_hint
        return VerifyReport(
            spec.name,
            Path(),
            tuple(FileReport(Path(f.name), False, problem, fix) for f in spec.files),
        )
    return check_folder(spec, dirs[0])


def mirrors(spec: DatasetSpec, mirror: str | None = None) -> tuple[str, ...]:
    """Base URLs to try: the argument, else $SENSGEN_MIRROR, else the registry's."""
    chosen = mirror or os.environ.get(MIRROR_ENV)
    return (chosen,) if chosen else spec.mirrors


def fetch(spec: DatasetSpec, root: str | Path | None = None, mirror: str | None = None) -> Path:
    """Return a folder holding all of `spec`'s files, verified, downloading what is missing."""
    found = locate(spec, root)
    if found is not None:
        return found
    if spec.source is Source.EMBEDDED:
        raise _embedded_missing(spec, root)
    dest = Path(root).expanduser() if root is not None else cache_dir(spec.name)
    reports = check_folder(spec, dest).files
    for report in reports:  # a damaged file is the user's to delete, never overwritten
        if not report.ok and report.path.exists():
            raise mismatch_error(spec.name, report.path, report.problem or "unreadable")
    for f, report in zip(spec.files, reports, strict=True):
        if not report.ok:
            urls = [f"{base.rstrip('/')}/{f.name}" for base in mirrors(spec, mirror)]
            download(urls, report.path, f.checksums, name=spec.name)
    return dest


def _embedded_missing(spec: DatasetSpec, root: str | Path | None) -> UserError:
    damaged = [f for f in verify(spec, root).files if not f.ok and f.path.exists()]
    if damaged:
        f = damaged[0]
        return UserError(
            f"Dataset {spec.name!r}: file {f.path} failed verification ({f.problem}), so it "
            f"is not used. Fix: reinstall the package that ships it ({spec.missing_hint})."
        )
    searched = ", ".join(str(d) for d in candidate_dirs(spec, root)) or "nowhere"
    return UserError(
        f"Dataset {spec.name!r}: file {', '.join(f.name for f in spec.files)} was not found "
        f"(searched: {searched}). Fix: {spec.missing_hint or 'pass root= to a folder with it'}."
    )
