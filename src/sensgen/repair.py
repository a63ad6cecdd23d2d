"""What a new `sensgen run` does with what it finds in the study directory (issue 8's
repairs): finished packs with a damaged file or that failed are trained again, another
`[measure]` over finished runs is refused, and failures are named.

Every check runs before anything is changed; re-queueing happens after every other check
of the run (`sensgen.runner.run`), so a user error leaves the directory as it was.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape

from sensgen.artifacts import damaged_files
from sensgen.errors import UserError
from sensgen.store import FINAL, Status, Store
from sensgen.study import Study
from sensgen.study_dir import STUDY_FILE


def damaged_packs(
    store: Store,
    runs: pd.DataFrame,
    run_ids: set[str],
    console: Console,
) -> dict[str, tuple[Path, str]]:
    """The finished packs of this study's runs (``run_ids``) with a damaged file
    (`artifacts.damaged_files`) to train again: pack id -> (file, why). What the file held
    is lost, and the pack's seeded runs give it back, measured as before: another
    ``[measure]`` was refused first (`check_same_measurements`), since training them so
    would lose their intact files of other kinds."""
    if runs.empty:
        return {}
    final = runs[runs["status"].isin(FINAL)]
    found = damaged_files(store.root, set(final["pack_id"]))
    mine = set(final.loc[final["run_id"].isin(run_ids), "pack_id"])
    for pack_id, (path, why) in sorted(found.items()):
        if pack_id not in mine:  # it would stay pending: this study does not train it
            warn(console, f"{path} is damaged ({why}), but this study does not plan pack "
                  f"{pack_id}'s runs: run the study that planned them into {store.root} to "
                  "train it again.")  # fmt: skip
    # (measured as before: `check_same_measurements` refused another [measure] already)
    return {k: v for k, v in found.items() if k in mine}


def check_same_measurements(
    runs: pd.DataFrame, study: Study, previous: Study | None, out: Path
) -> None:
    """Refuse another ``[measure]`` than the stored study's while the directory holds
    measured runs, this study's or not: a run is measured when it is trained, so they would
    keep what they were measured with beside new runs measured otherwise (the report shows
    them all), and DIR/study.toml, rewritten, would no longer describe them. Nothing is
    changed."""
    if previous is None or previous.measure == study.measure:
        return
    measured = runs["status"].isin([Status.DONE.value, Status.DIVERGED.value])
    done = int(measured.sum()) if len(runs) else 0
    if not done:
        return
    old, new = previous.measure.model_dump(), study.measure.model_dump()
    changed = ", ".join(f"{k} = {old[k]!r} → {new[k]!r}" for k in old if old[k] != new[k])
    stored = out / STUDY_FILE
    raise UserError(
        f"{out} holds {runs_of(done)} measured as {stored} says, and this study's "
        f"[measure] differs ({changed}). sensgen measures a run when it trains it, so they "
        f"would keep their old measurements beside new runs measured otherwise. Run it with "
        f"the stored [measure] (`sensgen run {stored} --out {out}`), or into a new --out "
        "directory. Nothing was changed."
    )


def failed_packs(runs: pd.DataFrame, run_ids: set[str]) -> dict[str, str]:
    """This study's packs that failed (an exception while training or measuring them: out
    of memory, a killed worker, ...), pack id -> the stored error. Each new `run` tries
    them again: what failed may have been the machine's, and a pack that fails again says
    why once more. (Diverged runs are results, not failures: they stay.)"""
    if runs.empty:
        return {}
    mine = runs[runs["run_id"].isin(run_ids)]
    by_pack = mine.groupby("pack_id")["status"].agg(lambda s: set(s) == {Status.FAILED.value})
    failed = set(by_pack[by_pack].index)
    rows = mine[mine["pack_id"].isin(failed)].drop_duplicates("pack_id")
    return {row.pack_id: str(row.error) for row in rows.itertuples()}


def say_why_failed(runs: pd.DataFrame, run_ids: set[str], console: Console) -> None:
    """Warn with each distinct error of this study's failed runs (it is stored, but only
    the database held it)."""
    failed = runs[runs["run_id"].isin(run_ids) & (runs["status"] == Status.FAILED.value)]
    for error, group in failed.groupby("error"):
        # (an error's own closing full stop is not doubled)
        warn(console, f"{runs_of(len(group))} failed: {error.rstrip('.')}. `sensgen run` again "
             "trains them again.")  # fmt: skip


def retry_failed(store: Store, failed: dict[str, str], console: Console) -> None:
    """Send the failed packs back to pending, saying why they failed."""
    reasons = {pack: f"failed in an earlier run ({error})" for pack, error in failed.items()}
    _requeue(store, reasons, console)


def requeue_damaged(store: Store, damaged: dict[str, tuple[Path, str]], console: Console) -> None:
    """Send the damaged packs back to pending, naming the damaged file."""
    reasons = {pack: f"has a damaged file, {path} ({why})" for pack, (path, why) in damaged.items()}
    _requeue(store, reasons, console)


def _requeue(store: Store, reasons: dict[str, str], console: Console) -> None:
    """`Store.requeue_pack` for each pack, with a warning: pack (n runs) reason; again."""
    for pack_id, reason in sorted(reasons.items()):
        n = store.requeue_pack(pack_id)
        warn(console, f"pack {pack_id} ({runs_of(n)}) {reason}: it is trained again.")


def runs_of(n: int) -> str:
    """ "1 run", "n runs"."""
    return "1 run" if n == 1 else f"{n} runs"


def warn(console: Console, text: str) -> None:
    # (soft_wrap: a path cut across lines could not be copied)
    console.print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)
