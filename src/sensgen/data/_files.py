"""Finding, verifying and fetching a dataset's files.

Search path, in order (the first folder holding every file with a valid checksum wins):

1. the ``root`` argument, if given;
2. for downloadable datasets, the cache: ``$SENSGEN_DATA/<name>/`` if ``SENSGEN_DATA`` is
   set, else ``~/.cache/sensgen/<name>/``;
3. the dataset's own local folders (Debian's ``/usr/share/datasets/fashion-mnist`` for
   ``fashion_mnist``; the installed package's data folder for embedded datasets).

A folder this user may not read is skipped, so a locked cache does not hide Debian's copy.

Downloads go to ``root`` if given, else to the cache folder. Base URLs come from, in order:
the ``mirror`` argument of `fetch`, the ``SENSGEN_MIRROR`` environment variable, the
registry's canonical mirrors; a file's URL is ``BASE + "/" + file name``.

A file that fails its checksum is never used: `fetch` raises for it rather than reading or
silently replacing it, and `verify` reports it. Each problem has its own fix: a damaged
file of the user's is deleted and fetched again, a package's file is reinstalled (deleting
it breaks the package), and a file this user may not read is a permission problem.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sensgen.data._download import DownloadError, checksum_problem, download
from sensgen.data._parts import permission_fix
from sensgen.data._registry import DatasetSpec, Source
from sensgen.errors import UserError

log = logging.getLogger(__name__)

DATA_ENV = "SENSGEN_DATA"
MIRROR_ENV = "SENSGEN_MIRROR"


class FileState(StrEnum):
    """What `verify` found for one file."""

    OK = "ok"
    MISSING = "missing"
    DAMAGED = "damaged"  # fails its checksum, or an I/O error reading it
    DENIED = "denied"  # this user may not read it (or search its folder): not damage


@dataclass(frozen=True)
class FileReport:
    """Verification result for one file: `problem` and `fix` are None when `ok`."""

    path: Path
    ok: bool
    problem: str | None = None
    fix: str | None = None  # what to do about the problem, one sentence
    state: FileState | None = None  # None: OK if `ok`, else DAMAGED

    def __post_init__(self) -> None:
        if self.state is None:
            object.__setattr__(self, "state", FileState.OK if self.ok else FileState.DAMAGED)

    @property
    def present(self) -> bool:
        """The file is there, or this user may not look (so it may be)."""
        return self.state is not FileState.MISSING


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
    package = folder in spec.local_dirs()
    files = tuple(_check_file(spec, f.name, f.checksums, folder, package) for f in spec.files)
    return VerifyReport(spec.name, folder, files)


def _check_file(
    spec: DatasetSpec, name: str, checksums: tuple[str, ...], folder: Path, package: bool
) -> FileReport:
    path = folder / name
    # os.stat, not Path.is_file: from Python 3.14 is_file answers False for a file it may
    # not look at, which would call a permission problem a missing file.
    problem = None
    try:
        mode = path.stat().st_mode
        present = True
        # A folder (or other non-file) under the file's name is in the way, not missing: a
        # download would fail renaming onto it, with an error naming only its temporary file.
        if not stat.S_ISREG(mode):
            problem = "a folder, not a file" if stat.S_ISDIR(mode) else "not a regular file"
    except (FileNotFoundError, NotADirectoryError):
        present = False
    except PermissionError:  # looking needs search permission on every folder above it
        return _denied(path, folder_unsearchable(folder))
    except OSError as e:
        present, problem = True, f"unreadable ({e})"
    if not present:
        return FileReport(path, False, "missing", _missing_fix(spec, package), FileState.MISSING)
    try:
        problem = problem or checksum_problem(path, checksums)
    except PermissionError:
        return _denied(path, None)
    except OSError as e:
        problem = f"unreadable ({e})"
    if problem is None:
        return FileReport(path, True, state=FileState.OK)
    return FileReport(path, False, problem, _damaged_fix(spec, path, package), FileState.DAMAGED)


def _denied(path: Path, folder: Path | None) -> FileReport:
    """The report for a file this user may not read, or whose `folder` may not be searched."""
    what = f"this user may not search {folder}" if folder else "this user may not read it"
    problem = f"permission denied: {what}; a permission problem, the file is not damaged"
    return FileReport(path, False, problem, permission_fix(folder or path), FileState.DENIED)


def folder_unsearchable(folder: Path) -> Path:
    """The folder that refused: the deepest one on `folder`'s path that can be seen
    (`os.path.exists` is False inside an unsearchable folder)."""
    while not os.path.exists(folder) and folder.parent != folder:
        folder = folder.parent
    return folder


def _package_fix(spec: DatasetSpec) -> str:
    """A package's file is fixed by reinstalling the package, never by deleting it."""
    fix = spec.reinstall_hint or "reinstall the package that installed it"
    if spec.source is Source.DOWNLOAD:
        fix += (
            f", or put verified copies of the files in {cache_dir(spec.name)} "
            f"(`sensgen datasets fetch {spec.name}` downloads them there)"
        )
    return fix


def _missing_fix(spec: DatasetSpec, package: bool) -> str:
    if package or spec.source is Source.EMBEDDED:
        return _package_fix(spec)
    return f"run `sensgen datasets fetch {spec.name}`"


def _damaged_fix(spec: DatasetSpec, path: Path, package: bool) -> str:
    if package:
        return _package_fix(spec)
    if spec.source is Source.EMBEDDED:  # a copy in `root`: the package's is used instead
        return f"delete {path} (the installed package's copy is then used)"
    return f"delete {path} and run `sensgen datasets fetch {spec.name}`"


_VERB = {
    FileState.MISSING: "is missing",
    FileState.DAMAGED: "failed verification",
    FileState.DENIED: "cannot be read",
}
_TAIL = {FileState.DAMAGED: "; the file is damaged, incomplete or a different version"}


def describe(report: FileReport) -> str:
    """A clause naming the file and its problem, e.g. "file F failed verification (…)"."""
    text = f"file {report.path} {_VERB[report.state]}"
    return text if report.state is FileState.MISSING else f"{text} ({report.problem})"


def report_error(name: str, report: FileReport) -> UserError:
    """The one-paragraph error for a file that cannot be used."""
    tail = _TAIL.get(report.state, "")
    return UserError(f"Dataset {name!r}: {describe(report)}{tail}. Fix: {report.fix}.")


def _complete(spec: DatasetSpec, folder: Path) -> bool:
    try:
        return all((folder / f.name).is_file() for f in spec.files)
    except OSError:  # a folder this user may not search: the search goes on
        return False


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
        report = check_folder(spec, folder)
        if any(f.present for f in report.files):
            return report
    if not dirs:  # an embedded dataset whose package is not installed
        problem, fix = "not found", spec.missing_hint
        return VerifyReport(
            spec.name,
            Path(),
            tuple(
                FileReport(Path(f.name), False, problem, fix, FileState.MISSING) for f in spec.files
            ),
        )
    return check_folder(spec, dirs[0])


def verify_all(spec: DatasetSpec, root: str | Path | None = None) -> list[VerifyReport]:
    """`verify`'s report, then one for every other folder on the search path that holds
    any of the files, listing only those (a damaged copy that another folder shadows is
    still damage; the files a partial copy lacks are not, another folder has them)."""
    first = verify(spec, root)
    others = _other_copies(spec, root, first.folder)
    held = (VerifyReport(r.name, r.folder, tuple(f for f in r.files if f.present)) for r in others)
    return [first, *held]


def _other_copies(spec: DatasetSpec, root: str | Path | None, skip: Path) -> list[VerifyReport]:
    reports = (check_folder(spec, d) for d in candidate_dirs(spec, root) if d != skip)
    return [r for r in reports if any(f.present for f in r.files)]


def mirrors(spec: DatasetSpec, mirror: str | None = None) -> tuple[str, ...]:
    """Base URLs to try: the argument, else $SENSGEN_MIRROR, else the registry's."""
    chosen = mirror or os.environ.get(MIRROR_ENV)
    return (chosen,) if chosen else spec.mirrors


def fetch(spec: DatasetSpec, root: str | Path | None = None, mirror: str | None = None) -> Path:
    """Return a folder holding all of `spec`'s files, verified, downloading what is missing.

    A damaged or unreadable file in the download folder stops it (never overwritten); one
    in another folder (Debian's) does not stop the download, but a failed download names
    it and its fix, since the user then has two ways out.
    """
    found = locate(spec, root)
    if found is not None:
        return found
    if spec.source is Source.EMBEDDED:
        raise _embedded_missing(spec, root)
    dest = Path(root).expanduser() if root is not None else cache_dir(spec.name)
    reports = check_folder(spec, dest).files
    for report in reports:  # a damaged file is the user's to delete, never overwritten
        if report.state in (FileState.DAMAGED, FileState.DENIED):
            raise report_error(spec.name, report)
    others = _other_copies(spec, root, dest)
    try:
        for f, report in zip(spec.files, reports, strict=True):
            if not report.ok:
                urls = [f"{base.rstrip('/')}/{f.name}" for base in mirrors(spec, mirror)]
                download(urls, report.path, f.checksums, name=spec.name)
    except DownloadError as e:
        raise _download_failed(spec, e, others, from_env=mirror is None) from None
    for bad in _bad_files(others):
        log.warning("%s, so a verified copy was downloaded to %s", describe(bad), dest)
    return dest


def _bad_files(reports: list[VerifyReport]) -> list[FileReport]:
    return [f for r in reports for f in r.files if not f.ok]


def _download_failed(
    spec: DatasetSpec, error: DownloadError, others: list[VerifyReport], *, from_env: bool
) -> UserError:
    """The download error, led by what is wrong with the other copies and their fixes:
    offline, those are the only fixes that work. URLs that $SENSGEN_MIRROR made are said to
    be its (a stale or scheme-less value read as "check the network")."""
    env = os.environ.get(MIRROR_ENV) if from_env else None
    fixes = [f"check {MIRROR_ENV} (set to {env!r}), which gave these URLs"] if env else []
    bad = _bad_files(others)
    if bad:
        lead = "; ".join(describe(f) for f in bad) + ", so that copy is not used, and sensgen "
        packaged = bad[0].path.parent in spec.local_dirs() and spec.reinstall_hint
        fixes.append(spec.reinstall_hint if packaged else bad[0].fix or "")
        return error.with_context(lead, fixes)
    packaged = any(r.folder in spec.local_dirs() for r in others)
    if spec.missing_hint and not packaged:
        fixes.append(spec.missing_hint)
    return error.with_context("", fixes) if fixes else error


def _embedded_missing(spec: DatasetSpec, root: str | Path | None) -> UserError:
    report = verify(spec, root)
    unusable = [f for f in report.files if f.present and not f.ok]
    if unusable:
        return report_error(spec.name, unusable[0])
    dirs = candidate_dirs(spec, root)
    searched = ", ".join(str(d) for d in dirs) or "nowhere"
    installed = bool(spec.local_dirs())  # the package is there but lacks the file
    fix = _package_fix(spec) if installed else spec.missing_hint
    return UserError(
        f"Dataset {spec.name!r}: file {', '.join(f.name for f in spec.files)} was not found "
        f"(searched: {searched}). Fix: {fix or 'pass root= to a folder with it'}."
    )
