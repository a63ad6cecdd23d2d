"""A study directory whose catalogue (DIR/results.db) is damaged or gone: the user error,
and a way back that works.

The catalogue is the only record of which models a directory holds, their statuses and
their scalar results; the per-pack files cannot rebuild it. So the fix is a copy of the
database from before the damage or, without one, the study trained again into a fresh
directory of the same name, the old one moved aside whole (`fix`): nothing is deleted or
overwritten, and the damaged database stays beside its files for whoever wants to try
recovering it. (`sensgen run` refuses a DIR that holds a study's files without a
catalogue: it cannot tell which of the files are whose, and would overwrite them.)
"""

from __future__ import annotations

import os
import shlex
import sqlite3
from pathlib import Path

from sensgen.artifacts import FOLDERS
from sensgen.errors import UserError
from sensgen.schema import DB_NAME, STUDY_FILE

_DAMAGE_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")  # (and their extended codes)


class Foreign(Exception):
    """Raised while `sensgen.results.Results.open` prepares a database that is not
    sensgen's; it becomes the user error (`foreign`) once the connection is closed."""


def is_damage(exc: BaseException) -> bool:
    """Whether a SQLite error says the catalogue's file is damaged ("database disk image is
    malformed", "file is not a database"). Python's sqlite3 raises those as a plain
    `sqlite3.DatabaseError`; its subclasses are a machine that refuses (busy, read-only,
    full, I/O: `sensgen.cli.environment_problem`) or a bug of sensgen's (a constraint)."""
    code = getattr(exc, "sqlite_errorname", "")
    return type(exc) is sqlite3.DatabaseError or code.startswith(_DAMAGE_CODES)


def damaged(root: Path, why: object, *, at_open: bool = True) -> UserError:
    """The user error for a damaged DIR/results.db: what, that nothing was changed (found
    when it was opened, before any write), and `fix`."""
    changed = " Nothing was changed." if at_open else ""
    return UserError(
        f"{root / DB_NAME} is damaged ({why}): sensgen cannot read the catalogue of the "
        f"models this study directory holds.{changed} {fix(root)}"
    )


def foreign(root: Path, what: str) -> UserError:
    """The user error for a DIR/results.db that is a database, but not a sensgen one."""
    return UserError(f"{root / DB_NAME} is not a sensgen results database ({what}). {fix(root)}")


def missing(root: Path) -> UserError:
    """The user error for a directory holding a study's files but no DIR/results.db."""
    return UserError(
        f"{root} holds a study's files but no study ({DB_NAME} is missing: moved away or "
        f"lost), so sensgen cannot tell which models they are. If you moved a whole "
        f"{DB_NAME} away, put it back. {fix(root, restore=False)}"
    )


def holds_study_files(root: Path) -> bool:
    """Whether a folder holds what a study wrote beside its catalogue: files in sensgen's
    pack folders or, where DIR/results.db is missing, the catalogue moved aside
    (``results.db.damaged``) or its write-ahead log left behind (``results.db-wal``)."""
    if not (root / DB_NAME).exists() and any(root.glob(f"{DB_NAME}?*")):
        return True
    return any(any((root / kind).iterdir()) for kind in FOLDERS if (root / kind).is_dir())


def fix(root: Path, *, restore: bool = True) -> str:
    """The way back, as shell commands for this directory: a copy of the catalogue put in
    place (``restore``), else the directory moved aside and the study trained again."""
    here = _absolute_if_bare(root)
    aside = _unused(here.with_name(f"{here.name}.damaged"))
    study = shlex.quote(str(aside / STUDY_FILE)) if (root / STUDY_FILE).is_file() else "STUDY"
    run = f"sensgen run {study} --out {shlex.quote(str(here))}"
    which = "" if study != "STUDY" else " (STUDY: the study file that trained it)"
    copy = ""
    if restore:
        copy = (
            f"If you have a copy of {root / DB_NAME} from before the damage, put it in the "
            f"damaged file's place{_sidecars(root)}: the runs' files are all still here. "
            "Otherwise"
        )
    kept = ", the damaged database included" if restore else ""
    return (
        f"{copy or 'Otherwise'} move the directory aside and train the study again into "
        f"{here}{which}: `mv {shlex.quote(str(here))} {shlex.quote(str(aside))} && {run}`. "
        f"Every model is trained again; {aside} keeps all the old files{kept}."
    )


def _sidecars(root: Path) -> str:
    """A note for SQLite's files that belong to the damaged database and would be read
    with a restored copy (its write-ahead log and shared-memory index)."""
    left = [root / f"{DB_NAME}{s}" for s in ("-wal", "-shm", "-journal")]
    left = [p for p in left if p.exists()]
    if not left:
        return ""
    names = " and ".join(p.name for p in left)
    return f", and move {names} aside first (they belong to the damaged file)"


def _absolute_if_bare(root: Path) -> Path:
    """``root``, or its absolute path when it has no name of its own (``.``, ``..``),
    which neither ``mv`` nor a sibling's name could use."""
    return Path(os.path.abspath(root)) if root.name in ("", "..") else root


def _unused(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... the first that does not exist: ``mv`` into an
    existing directory would move the study inside it."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
