"""A study directory's own files and checks, and where it stands.

DIR/study.toml is the study as last run (`write_study_file`); a directory holds one study
(`check_same_study`) whose runs were all planned under this sensgen's run-spec schema
(`check_spec_schema`). `study_status` summarises DIR/results.db for `sensgen status`,
read-only, while a run may be writing.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape

from sensgen import artifacts
from sensgen import study as study_module
from sensgen.driver import live_driver_workers
from sensgen.errors import UserError
from sensgen.schema import STUDY_FILE
from sensgen.store import FINAL, Status, Store, open_results
from sensgen.study import SPEC_SCHEMA, Study


def stored_study(out: Path) -> Study | None:
    """DIR/study.toml, the last study run into ``out``; None if missing or unreadable."""
    path = out / STUDY_FILE
    if not path.exists():
        return None
    try:
        return study_module.load(path)
    except UserError:
        return None  # an unreadable copy is rewritten by the run; results.db is authoritative


def check_same_study(out: Path, study: Study) -> Study | None:
    """Refuse to mix two different studies in one directory (extending one is fine).
    Returns the study stored there (`stored_study`), if any."""
    previous = stored_study(out)
    if previous is None:
        return None
    if previous.name != study.name:
        raise UserError(
            f"{out} already holds study {previous.name!r}, not {study.name!r}. Choose another "
            "--out directory, or run the same study to resume it."
        )
    _check_same_pairing(out, previous, study)
    before, now = (s.pairs.overrides if s.pairs else None for s in (previous, study))
    if previous.pairs and study.pairs and _effective(before) != _effective(now):
        raise UserError(
            f"{out} holds pairs planned with pairs.overrides = {before}; this study has "
            f"{now}. A run keeps the pair it was planned in, so the new members would join "
            "(or miss) the old pairs. Run it into a new --out directory."
        )
    return previous


def _check_same_pairing(out: Path, previous: Study, study: Study) -> None:
    """Refuse pairs by another factor, or pairs where the runs were planned without them.

    A run keeps the pair (or no pair) it was first planned in: the member the two plans
    share (random_labels = 0 is also augment = false) would stay in its old pair or in
    none, and its new partner would end up in a pair of its own, with nothing said.
    """
    if study.pairs is None:
        return  # (pairs dropped: the runs keep theirs, and the report reads none)
    fix = "Run this study into a new --out directory."
    if previous.pairs is None:
        raise UserError(
            f"{out} holds runs planned without [pairs]; this study pairs them by "
            f"{study.pairs.factor!r}. A run keeps the pair it was planned in (here none), so "
            f"the runs already there would pair with nothing. {fix}"
        )
    if previous.pairs.factor != study.pairs.factor:
        raise UserError(
            f"{out} holds pairs of pairs.factor = {previous.pairs.factor!r}; this study "
            f"pairs by {study.pairs.factor!r}. A run keeps the pair it was planned in, so a "
            f"run the two share would stay in its old pair and its new partner alone. {fix}"
        )


def _effective(overrides: list[dict] | None) -> list[dict] | None:
    """Pair overrides as they act: none at all when absent or every table is empty."""
    return overrides if overrides and any(overrides) else None


def report_outdated(index: Path, store: Store) -> bool:
    """Whether DIR/report/index.html is missing, or older than the last finished run or
    than DIR/study.toml.

    A driver killed while writing the report of newly finished runs leaves the previous
    report in place; the next `run` must rewrite it even though it trains nothing. A study
    file written since the report (`write_study_file` writes it only when it changes) may
    have another [inclusion] or [pairs], which the report reads: `--set inclusion.apply=
    false` on a finished study left a report of the old rule. (A study file of the same
    time counts as newer: a file system that keeps whole seconds would otherwise miss one
    written in the report's last second.)
    """
    if not index.exists():
        return True
    study_file = store.root / STUDY_FILE
    if study_file.exists() and study_file.stat().st_mtime_ns >= index.stat().st_mtime_ns:
        return True
    finished = store.runs()["finished_at"]
    latest = finished.max() if finished.notna().any() else None
    return latest is not None and latest.timestamp() > index.stat().st_mtime


def check_spec_schema(runs: pd.DataFrame, out: Path) -> None:
    """Refuse a directory whose runs (the store's `runs` table) were planned under another
    run-spec schema.

    Their run ids were hashed differently, so resuming would train every model again next
    to the old rows instead of recognising them.
    """
    if runs.empty:
        return
    schemas = {json.loads(text).get("schema") for text in runs["spec"]}
    if schemas != {SPEC_SCHEMA}:
        found = ", ".join(str(s) for s in sorted(schemas, key=str))
        raise UserError(
            f"{out} holds runs planned under run-spec schema {found}; this sensgen plans "
            f"schema {SPEC_SCHEMA}, whose run ids differ. Run the study into a new --out "
            "directory (the old one stays readable with `sensgen report`)."
        )


def finished_ids(runs: pd.DataFrame) -> set[str]:
    """Run ids in a final status (done, failed, diverged) in the store's `runs` table."""
    return set(runs.loc[runs["status"].isin(list(FINAL)), "run_id"]) if len(runs) else set()


def note_unplanned_runs(unplanned: set[str], out: Path, console: Console) -> None:
    """Say so when the directory holds finished runs (`unplanned`) this study does not plan.

    They stay, and the report shows them beside this study's: right for a study run on
    several datasets into one directory or shrunk, a surprise for a study that changed
    (or that an older sensgen planned: since each `[sample]` draw has a seed of its own,
    sampled studies plan other runs, and resuming one trains them all again).
    """
    if unplanned:
        console.print(
            f"[yellow]note:[/] {escape(str(out))} holds {len(unplanned)} finished runs that this "
            "study does not plan (the study changed since they ran, or another sensgen "
            "version planned it). They stay, and the report shows them too; to keep studies "
            "apart, run into a new --out directory."
        )


def unplanned_open_runs(runs: pd.DataFrame, run_ids: set[str]) -> set[str]:
    """Open (pending or running) runs that no run of ``run_ids`` shares a pack with: an
    earlier version of the study planned them, and a run of this one leaves them open. (A
    pack is trained whole, so an open run beside a planned one is trained too.)"""
    if runs.empty:
        return set()
    planned_packs = set(runs.loc[runs["run_id"].isin(run_ids), "pack_id"])
    is_open = runs["status"].isin([Status.PENDING.value, Status.RUNNING.value])
    return set(runs.loc[is_open & ~runs["pack_id"].isin(planned_packs), "run_id"])


def note_unplanned_open_runs(
    runs: pd.DataFrame, run_ids: set[str], out: Path, console: Console
) -> None:
    """Say so when the directory holds unfinished runs this study will not train
    (`unplanned_open_runs`); `sensgen status` counts them as open."""
    if n := len(unplanned_open_runs(runs, run_ids)):
        console.print(
            f"[yellow]note:[/] {escape(str(out))} holds {n} unfinished runs that this study "
            "does not plan (an earlier version of it planned them). They stay open; run the "
            "study that planned them to finish them."
        )


def write_study_file(out: Path, study: Study) -> bool:
    """Write DIR/study.toml (atomically) unless it already holds this study's text.
    Returns whether it was written.

    Left alone when unchanged, its time says when the study last changed: a report older
    than it may show other settings (`report_outdated`).
    """
    path, text = out / STUDY_FILE, study.to_toml()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if path.read_text(encoding="utf-8") == text:
            return False
    tmp = out / f".{STUDY_FILE}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


@dataclass(frozen=True)
class StatusSummary:
    """Where a study directory stands: one row per pack and the totals."""

    study_name: str
    packs: list[tuple]  # (pack_id, runs, done, failed, diverged, running, pending, status)
    counts: dict[str, int]
    eta_s: float | None  # mean wall time of finished packs × open packs / workers
    workers: int | None = None  # --workers of the live `sensgen run`; None: no run is alive
    # finished packs with a damaged file: pack id -> (file, why) (`artifacts.damaged_files`)
    damaged: dict[str, tuple[Path, str]] = field(default_factory=dict)
    # open (pending or running) runs that DIR/study.toml does not plan: an earlier version
    # of the study planned them, and `sensgen run` of this one will not train them
    unplanned_open: int = 0

    def damage_note(self) -> str | None:
        """What a damaged file means and the fix, or None when every file is whole."""
        if not self.damaged:
            return None
        (path, why), more = next(iter(self.damaged.values())), len(self.damaged) - 1
        others = f" (and {more} more pack(s))" if more else ""
        return (
            f"{path} is damaged ({why}){others}. Running again the study that trained them "
            "into this directory (`sensgen run STUDY --out DIR`) trains such packs again, "
            "and only them."
        )

    def headline(self) -> str:
        total = sum(self.counts.values())
        parts = ", ".join(f"{self.counts.get(s, 0)} {s}" for s in Status)
        open_runs = self.counts.get(Status.PENDING, 0) + self.counts.get(Status.RUNNING, 0)
        if self.workers is not None:
            eta = "" if self.eta_s is None else f"; ETA {self.eta_s / 60:.1f} min"
            return f"{total} runs: {parts}{eta}."
        if not open_runs:
            return f"{total} runs: {parts}."
        stale = self.counts.get(Status.RUNNING, 0)
        left = f" ({stale} `running` were left by an interrupted one)" if stale else ""
        cost = ""
        if self.eta_s is not None:
            cost = f", about {self.eta_s / 60:.1f} min at one pack at a time"
        if self.unplanned_open == open_runs:
            return (
                f"{total} runs: {parts}. The {open_runs} open runs are not planned by "
                f"{STUDY_FILE} (an earlier version of the study planned them): `sensgen run` "
                "of this study will not train them; run the study that planned them to "
                "finish them."
            )
        elsewhere = ""
        if self.unplanned_open:
            elsewhere = (
                f" ({self.unplanned_open} of the open runs are not planned by {STUDY_FILE}, "
                "an earlier version of the study planned them, and stay open)"
            )
        return (
            f"{total} runs: {parts}. No `sensgen run` is working on this directory{left}; "
            f"run it again to finish the rest{cost}{elsewhere}."
        )


def study_status(out_dir: str | Path) -> StatusSummary:
    """Summarise DIR/results.db (read-only; safe while a run is writing)."""
    out = Path(out_dir)
    before = live_driver_workers(out)
    with open_results(out) as results:
        packs, runs = results.pack_status(), results.runs()
    finished_packs = packs.loc[packs["n_pending"] + packs["n_running"] == 0, "pack_id"]
    damaged = artifacts.damaged_files(out, finished_packs)
    # Alive before or after the read: the `running` rows read are (or were just) its own.
    workers = before or live_driver_workers(out)
    stored = stored_study(out)
    unplanned_open = 0
    if stored is not None:
        name = stored.name
        unplanned_open = len(unplanned_open_runs(runs, {s.run_id for s in stored.specs()}))
    else:
        name = "unreadable study.toml" if (out / STUDY_FILE).exists() else "?"
    columns = ("n_done", "n_failed", "n_diverged", "n_running", "n_pending")
    rows = [
        (r.pack_id, r.n_runs, *(int(getattr(r, c)) for c in columns), r.status)
        for r in packs.itertuples()
    ]
    counts = {str(s): int(packs[f"n_{s}"].sum()) for s in Status} if len(packs) else {}
    finished = packs[packs["n_pending"] + packs["n_running"] == 0]
    open_packs = len(packs) - len(finished)
    timed = finished.loc[finished["wall_s"] > 0, "wall_s"]  # failed packs have no wall time
    eta = None
    if open_packs and len(timed):
        # (no more packs run at once than are open: --workers 1000000 divided the ETA by it)
        eta = open_packs * float(timed.mean()) / min(workers or 1, open_packs)
    return StatusSummary(name, rows, counts, eta, workers, damaged, unplanned_open)
