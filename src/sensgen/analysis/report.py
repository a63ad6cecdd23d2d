"""The study report: figures, tables and a static HTML page under ``DIR/report/``.

This is the only module of ``sensgen.analysis`` that writes files. From whatever the study
directory holds it writes:

    DIR/report/index.html        one self-contained page (inline CSS and script, images
                                 beside it): a summary of which paper claims hold here,
                                 then each figure with a caption stating the paper's claim,
                                 the measured figure and the verdict, then a sortable table
    DIR/report/<figure>.png|svg  Figs. 5 and 1 always; transitions (Fig. 5 companion),
                                 Fig. 4 pairs, Figs. 2 and 3, Study 6 when measured
    DIR/report/models.csv        one row per analysed model (`models_table.model_table`)
    DIR/report/summary.json      status counts and whether the study is complete,
                                 correlations with 95% intervals, claims, pair outcomes
                                 and counts (planned, compared, dropped and why),
                                 per-point distributions

The study's ``[inclusion]`` rule (paper §4) decides which finished models are analysed.
A study with runs not yet finished (pending, running, failed) gets a banner above the
claims: its verdicts are provisional.
Every file is written under a temporary name and renamed into place; figures an earlier
report drew and this one does not are removed, so the folder matches the page.

Example:
    >>> from sensgen.analysis import write_report
    >>> index = write_report("runs/quickstart")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from sensgen.analysis import tables
from sensgen.analysis.html import document, esc, html_table
from sensgen.analysis.inclusion import analysed_runs, mark_included
from sensgen.analysis.models_table import model_table
from sensgen.analysis.numbers import percent
from sensgen.analysis.report_config import study_inclusion, study_pairs, study_tables
from sensgen.analysis.report_geometry import geometry_section
from sensgen.analysis.report_sections import (
    Section,
    claims_html,
    correlation_section,
    measures_section,
    pairs_section,
    per_point_section,
)
from sensgen.artifacts import DamagedFileError
from sensgen.errors import UserError
from sensgen.schema import STUDY_FILE

REPORT_DIR = "report"
_PNG_DPI = 150
_MAX_REGION_RUNS = 50  # region maps read for the boundary-density summary
_FIGURE_SUFFIXES = (".png", ".svg")
UNFINISHED = ("pending", "running", "failed")  # statuses the next `sensgen run` trains

_EXPLANATION = """\
Each point of the first figure is one trained network. Its x value is the mean test-point
input sensitivity, Jbar: the Frobenius norm of the Jacobian of the <em>softmax output</em>
with respect to the <em>standardised</em> (preprocessed, flattened) input, ‖∂p(x)/∂x‖_F,
averaged over the test set (log scale): how much the predicted class probabilities move
under a small perturbation of an input near the data. Its y value is the generalization gap,
train accuracy minus test accuracy. Novak et al. (ICLR 2018) find that the gap rises with
this sensitivity across models (Fig. 5) while the number of weights and the final train loss
do not explain it (Fig. 1); that pairs of models differing in one factor (random labels,
augmentation, nonlinearity, full batch) move both together (Fig. 4); that sensitivity is far
higher off the data manifold than on it (Figs. 2, 3); and that per test point, ‖J(x)‖ tracks
the loss (Study 6). The table below says which of these the study can check and whether each
holds here."""


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    runs: pd.DataFrame | None = None,
    points: pd.DataFrame | None = None,
    inclusion: Mapping[str, Any] | None = None,
    pairs: Mapping[str, Any] | None = None,
    n_boot: int = 1000,
) -> Path:
    """Writes the study report (figures, CSV, JSON, HTML) to ``out_dir/report/``.

    Args:
        out_dir: the study directory.
        runs: the runs frame; read with ``sensgen.store.open_results(out_dir)`` if None
            (with the points, profiles and region maps, and the study's ``[inclusion]``
            and ``[pairs]`` tables from ``out_dir/study.toml``).
        points: the per-point frame; read from the store if None and ``runs`` is None too.
        inclusion: ``{"apply": bool, "min_train_acc": float | None}``; None with given
            ``runs``: every finished model is analysed.
        pairs: ``{"factor": str, "values": list}`` of a paired study, or None.
        n_boot: bootstrap resamples for the correlation intervals.

    Returns:
        Path of ``out_dir/report/index.html``.
    """
    out_dir = Path(out_dir)
    profiles, maps, measures = pd.DataFrame(), {}, pd.DataFrame({"run_id": []})
    from_store = runs is None
    if from_store:
        table = study_tables(out_dir)
        if inclusion is None:
            inclusion = study_inclusion(table.get("inclusion", {}), out_dir)
        if pairs is None:
            pairs = study_pairs(table.get("pairs"), table, out_dir)
    rule = dict(inclusion or {"apply": False})
    if from_store:
        runs, points, profiles, maps, measures = _read_store(out_dir, points, rule)
    report = out_dir / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    counts = tables.status_counts(runs)
    n_done = len(tables.done_runs(runs))
    runs_all = runs
    marked = mark_included(runs, **rule)  # every run: the pairs' and models' accounting
    runs = analysed_runs(runs, **rule)
    kept = set(runs["run_id"]) if "run_id" in runs.columns else set()
    points = _only(points if points is not None else pd.DataFrame(), kept)
    profiles, maps = _only(profiles, kept), {k: v for k, v in maps.items() if k in kept}
    measures = _only(measures, kept)
    models = model_table(marked)
    drawn: list[str] = []

    def save(name: str, fig: Figure) -> None:
        for suffix in _FIGURE_SUFFIXES:
            _write_bytes(report / f"{name}{suffix}", _render(fig, suffix[1:]))
        drawn.append(name)

    # Open runs an earlier version of the study planned and this one does not: no
    # `sensgen run` of this study trains them, so they do not make it unfinished.
    left_behind = _unplanned_open_runs(out_dir, runs_all) if from_store else set()
    planned = runs_all[~runs_all["run_id"].isin(left_behind)] if left_behind else runs_all
    progress = completeness(tables.status_counts(planned))
    parts, claims = [], []
    summary = {
        "status_counts": _counts(counts),
        **progress,
        "unplanned_open_runs": len(left_behind),
    }
    if len(models):
        sections = [
            correlation_section(runs, save, n_boot=n_boot),
            pairs_section(marked, pairs, save),
            Section(*geometry_section(profiles, maps, save)),
            per_point_section(points, runs, save),
            measures_section(runs, measures),
        ]
        for section in sections:
            parts += section.html
            claims += section.claims
            summary |= {k: _json_ready(v) for k, v in section.summary.items()}
    _remove_stale_figures(report, drawn)
    summary["claims"] = [asdict(c) | {"verdict": c.verdict} for c in claims]
    summary.setdefault("correlations", [])
    _write_text(report / "models.csv", models.to_csv(index=False))
    _write_text(report / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    note = _inclusion_note(rule, len(models), n_done)
    banner = incomplete_banner(progress, out_dir)
    page = _page(out_dir.resolve().name, counts, models, claims, [note, *parts], n_done, banner)
    index = report / "index.html"
    _write_text(index, page)
    return index


def _unplanned_open_runs(out_dir: Path, runs: pd.DataFrame) -> set[str]:
    """Open runs of the store that DIR/study.toml does not plan
    (`study_dir.unplanned_open_runs`); none when the study file cannot be read."""
    from sensgen.study_dir import stored_study, unplanned_open_runs  # deferred, as the store

    study = stored_study(out_dir)
    if study is None or runs.empty:
        return set()
    return unplanned_open_runs(runs, {p.spec.run_id for p in study.planned()})


def _read_store(
    out_dir: Path, points: pd.DataFrame | None, rule: Mapping[str, Any]
) -> tuple[Any, ...]:
    """Reads the runs, points (unless given), profiles, region maps (of the first models
    the inclusion `rule` keeps) and measures of a study."""
    from sensgen.store import open_results  # deferred: analysis works without a store

    with open_results(out_dir) as results:
        runs = results.runs()
        points = results.points() if points is None else points
        profiles = results.profiles()
        maps = {}
        if (out_dir / "regions").is_dir() and any((out_dir / "regions").iterdir()):
            kept = analysed_runs(tables.done_runs(runs), **rule)
            for run_id in kept["run_id"][:_MAX_REGION_RUNS]:
                try:
                    maps[run_id] = results.region_maps(run_id)
                except DamagedFileError:
                    raise
                except UserError:  # a run measured without maps
                    pass
        return runs, points, profiles, maps, results.measures()


def _only(frame: pd.DataFrame, run_ids: set[str]) -> pd.DataFrame:
    """Rows of the analysed runs (a frame without run_id passes through)."""
    if "run_id" not in frame.columns:
        return frame
    return frame[frame["run_id"].isin(run_ids)].reset_index(drop=True)


def _inclusion_note(rule: Mapping[str, Any], n_included: int, n_done: int) -> str:
    if not rule.get("apply"):
        return f"<p>Inclusion: every finished model is analysed ({n_done}).</p>"
    threshold = rule.get("min_train_acc")
    what = percent(threshold, 1) if threshold is not None else "100% (99.9% for CIFAR-100)"
    return (
        f"<p>Inclusion (paper §4): models with training accuracy ≥ {what}. "
        f"<strong>{n_included} of {n_done}</strong> finished models qualify; the figures, "
        "statistics and the table below use only those.</p>"
    )


def _page(
    study: str,
    counts: pd.DataFrame,
    models: pd.DataFrame,
    claims: list,
    parts: list[str],
    n_done: int,
    banner: str = "",
) -> str:
    """The whole index.html as a string. ``parts[0]`` is the inclusion note; ``banner``
    (an unfinished study's warning) goes right above the claims it qualifies."""
    title = f"sensgen report: {study}"
    provisional = " (provisional: the study is incomplete)" if banner else ""
    body = [
        f"<h1>{esc(title)}</h1>",
        '<p class="muted">Sensitivity and generalization in neural networks '
        "(Novak et al., ICLR 2018).</p>",
        f'<p class="lead">{_EXPLANATION}</p>',
        banner,
        f"<h2>Which of the paper's claims hold here{provisional}</h2>",
        claims_html(claims),
        "<h2>Models by status</h2>",
        html_table(counts, ["status", "count"], {"count": "models"}, "status"),
        parts[0],
    ]
    if models.empty and n_done:  # finished models, none kept by the inclusion rule
        body.append(
            "<h2>Figures</h2><p><strong>No finished model meets the inclusion rule</strong>: "
            "nothing to plot. Train longer (max_steps) or relax [inclusion] in the study "
            "file, run it again, then build the report again.</p>"
        )
    elif models.empty and _only_diverged(counts):  # final: resuming trains nothing
        n = int(counts.loc[counts["status"] == "diverged", "count"].sum())
        body.append(
            f"<h2>Figures</h2><p><strong>Every run diverged ({n})</strong>: no finished "
            "model to plot, and running the study again will not change that (diverged runs "
            "are final). Lower the learning rates (or the init scale) in the study file and "
            "train it into a new directory, then build the report again.</p>"
        )
    elif models.empty:
        body.append(
            "<h2>Figures</h2><p><strong>No finished models to analyse yet</strong>: nothing "
            "to plot. Run or resume the study, then build the report again.</p>"
        )
    else:
        body += parts[1:]
        body += [
            f"<h2>Analysed models ({len(models)})</h2>",
            '<p>Click a column to sort. Also as <a href="models.csv">models.csv</a>. Beside the '
            "columns every study shows, it has each run field that varies in this study, "
            "each model's pair in a paired study and each figure's x value. An empty batch "
            "size means full batch, an empty train_subset the whole training set; init_scale "
            "is σ_w²; random_labels is the fraction of shuffled labels; pair_role is the "
            "member's value of the paired factor.</p>",
            '<div class="scroll">',
            html_table(models, list(models.columns), {}, "models", sortable=True),
            "</div>",
        ]
    return document(title, "\n".join(body))


def _only_diverged(counts: pd.DataFrame) -> bool:
    """True when the study has runs and every one of them diverged."""
    by = dict(zip(counts["status"].astype(str), counts["count"].astype(int), strict=True))
    return by.get("diverged", 0) > 0 and sum(by.values()) == by["diverged"]


def completeness(counts: pd.DataFrame) -> dict[str, Any]:
    """Whether every run of the study is finished, for summary.json and the banner.

    Pending and running runs are not trained yet (or were interrupted); failed runs are
    trained again by the next ``sensgen run``. Done and diverged runs are final.

    Returns:
        ``{"complete": bool, "runs": N, "runs_finished": n, "unfinished": {"pending": .,
        "running": ., "failed": .}}``.
    """
    by = {str(row.status): int(row.count) for row in counts.itertuples()}
    unfinished = {status: by.get(status, 0) for status in UNFINISHED}
    total, left = sum(by.values()), sum(unfinished.values())
    return {
        "complete": left == 0,
        "runs": total,
        "runs_finished": total - left,
        "unfinished": unfinished,
    }


def incomplete_banner(progress: Mapping[str, Any], out_dir: Path) -> str:
    """A warning above the claims of an unfinished study ("" when complete): its verdicts
    rest on the packs that finished first, which are not a random sample of the study."""
    if progress["complete"]:
        return ""
    left = ", ".join(f"{n} {status}" for status, n in progress["unfinished"].items() if n)
    # Quoted for a POSIX shell: a directory name with a space or a quote still pastes whole.
    study_file, directory = shlex.quote(str(out_dir / STUDY_FILE)), shlex.quote(str(out_dir))
    command = f"sensgen run {study_file} --out {directory}"
    unfinished = progress["unfinished"]
    retry = " (it trains the failed packs again)" if unfinished["failed"] else ""
    running = (
        " Runs shown as running are either training in another <code>sensgen run</code> "
        "(wait for it) or were left by an interrupted one (resuming trains them again)."
        if unfinished["running"]
        else ""
    )
    return (
        f'<p class="banner"><strong>Study incomplete: {progress["runs_finished"]} of '
        f"{progress['runs']} runs finished ({esc(left)}).</strong> The verdicts, figures and "
        "tables below are provisional: they use only the runs finished so far, and the packs "
        "that finish first are not a random sample of the study. Resume with "
        f"<code>{esc(command)}</code>{retry}; it builds this report again when it is done."
        f"{running}</p>"
    )


def _remove_stale_figures(report: Path, drawn: list[str]) -> None:
    """Deletes figures an earlier report drew and this one did not."""
    for path in report.iterdir():
        if path.suffix in _FIGURE_SUFFIXES and path.stem not in drawn:
            path.unlink(missing_ok=True)


def _render(fig: Figure, fmt: str) -> bytes:
    """Renders a figure to bytes; SVG without a date so reruns are byte-identical."""
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else None
    fig.savefig(buffer, format=fmt, dpi=_PNG_DPI, metadata=metadata, facecolor="white")
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    """Writes UTF-8 text atomically."""
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    """Writes to a temporary file in the same folder, then renames it over ``path``."""
    # open(..., "xb") rather than mkstemp: mkstemp's 0600 mode would ignore the umask.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _counts(counts: pd.DataFrame) -> dict[str, int]:
    return {row.status: int(row.count) for row in counts.itertuples()}


def _json_ready(value: Any) -> Any:
    """Frames as lists of records, numpy scalars as Python, NaN / NA as None."""
    if isinstance(value, pd.DataFrame):
        return [{k: _json_ready(v) for k, v in row.items()} for row in value.to_dict("records")]
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
