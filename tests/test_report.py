"""sensgen.analysis.write_report: the files it writes, the HTML page, and a real store."""

from __future__ import annotations

import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chromium import Browser
from sensgen.analysis import write_report
from sensgen.analysis.html import format_cell
from test_analysis import synthetic_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURE_NAMES = ("gap_vs_jacobian", "gap_vs_params", "gap_vs_train_loss")
POINT_FIGURES = ("per_point_hexbin", "per_point_auroc")


class PageParser(HTMLParser):
    """Collects tags, image sources, links and the row count of each table by id."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.script_sources: list[str] = []
        self.rows: dict[str, int] = {}
        self._table: str | None = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "script" and "src" in attrs:
            self.script_sources.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "table":
            self._table = attrs.get("id")
            self.rows[self._table] = 0
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows[self._table] += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def synthetic_points(runs: pd.DataFrame, n: int = 20, seed: int = 0) -> pd.DataFrame:
    """Per-test-point rows for the done runs: norm rises with loss; high-loss points wrong."""
    rng = np.random.default_rng(seed)
    frames = []
    for run_id in runs.loc[runs["status"] == "done", "run_id"]:
        loss = np.sort(rng.exponential(0.5, n))
        frames.append(
            pd.DataFrame(
                {
                    "run_id": run_id,
                    "split": "test",
                    "index": np.arange(n),
                    "label": rng.integers(0, 10, n),
                    "loss": loss,
                    "correct": loss < np.log(2),
                    "p_y": np.exp(-loss),
                    "margin": 1.0 - loss,
                    "jacobian_norm": 0.1 * loss + 1e-4,
                    "jacobian_norm_logits": loss + 1.0,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def check_report(index: Path, n_done: int, extra: tuple[str, ...] = ()) -> PageParser:
    """Asserts the report folder is complete and consistent with ``n_done`` models and
    holds exactly the scatter figures plus ``extra``."""
    report = index.parent
    assert index.name == "index.html" and report.name == "report"
    for name in (*FIGURE_NAMES, *extra):
        assert (report / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
        assert b"<svg" in (report / f"{name}.svg").read_bytes()[:1000]
    assert len(pd.read_csv(report / "models.csv")) == n_done
    assert not list(report.glob(".*")), "temporary files left behind"
    page = parse(index)
    assert sorted(page.images) == sorted(f"{name}.png" for name in (*FIGURE_NAMES, *extra))
    assert sorted(p.name for p in report.glob("*.png")) == sorted(page.images)
    for target in [*page.images, *page.links]:
        assert (report / target).is_file(), target
    assert page.rows["models"] == n_done
    assert not {"link", "iframe"} & set(page.tags), "page must be self-contained"
    assert page.tags.count("script") == 1 and not page.script_sources, "one inline script"
    return page


def test_write_report_writes_every_file_and_a_consistent_page(tmp_path):
    runs = synthetic_runs(10, datasets=("digits", "mnist"))
    runs.loc[[0, 11], "status"] = ["failed", "diverged"]
    index = write_report(tmp_path, runs=runs, points=synthetic_points(runs))
    page = check_report(index, n_done=18, extra=POINT_FIGURES)
    assert page.rows["correlations"] == 6
    assert page.rows["per-point"] == 3  # ρ, AUROC of ‖J‖, AUROC of the confidence baseline
    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["status_counts"]["done"] == 18
    assert summary["status_counts"]["failed"] == summary["status_counts"]["diverged"] == 1
    jacobian = [r for r in summary["correlations"] if r["predictor"] == "jacobian_norm"]
    assert [r["spearman_rho"] for r in jacobian] == pytest.approx([1.0, 1.0])
    auroc = {r["metric"]: r for r in summary["per_point"]}["auroc_error"]
    assert auroc["median"] == pytest.approx(1.0) and auroc["models"] == 18
    text = index.read_text()
    assert "Fig. 5" in text and "softmax" in text and "standardised" in text


def test_write_report_escapes_strings(tmp_path):
    evil = "<script>alert(1)</script>"
    runs = synthetic_runs(4).assign(dataset=evil, nonlinearity='relu" onload="x')
    index = write_report(tmp_path, runs=runs)
    text = index.read_text()
    assert "<script>alert(1)" not in text and text.count("<script>") == 1  # the sort script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert 'onload="x"' not in text
    check_report(index, n_done=4)


def test_write_report_twice_overwrites_cleanly(tmp_path):
    write_report(tmp_path, runs=synthetic_runs(6), points=pd.DataFrame())
    index = write_report(tmp_path, runs=synthetic_runs(3, seed=1))
    check_report(index, n_done=3)
    assert "per-point" not in parse(index).rows


def test_write_report_without_done_runs_writes_a_page_and_removes_old_figures(tmp_path):
    write_report(tmp_path, runs=synthetic_runs(4))
    runs = synthetic_runs(4).assign(status="pending")
    index = write_report(tmp_path, runs=runs)
    page = parse(index)
    assert page.images == []
    assert "No finished models to analyse yet" in index.read_text()
    assert not list(index.parent.glob("*.png")) and not list(index.parent.glob("*.svg"))
    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["status_counts"]["pending"] == 4 and summary["correlations"] == []
    assert pd.read_csv(index.parent / "models.csv").empty


def test_a_report_where_no_finished_model_meets_the_inclusion_rule_says_so(tmp_path):
    runs = synthetic_runs(4).assign(train_acc=0.5)
    index = write_report(tmp_path, runs=runs, inclusion={"apply": True, "min_train_acc": 0.99})
    text = " ".join(index.read_text().split())
    assert "0 of 4" in text and "No finished model meets the inclusion rule" in text
    assert "No finished models to analyse yet" not in text


def test_write_report_reads_a_real_store(tmp_path):
    store_module = pytest.importorskip("sensgen.store")
    runs = synthetic_runs(5, datasets=("digits",))
    points = synthetic_points(runs, n=8)
    spec_fields = ["dataset", "width", "depth", "nonlinearity", "optimizer", "lr"]
    spec_fields += ["batch_size", "init_scale", "random_labels", "seed"]
    metrics = ["steps", "n_params", "train_loss", "train_acc", "test_acc", "gap"]
    metrics += ["jacobian_norm"]
    planned = [
        store_module.PlannedRun(
            row.run_id, "pack0", json.dumps(_plain(row[spec_fields]), sort_keys=True)
        )
        for _, row in runs.iterrows()
    ]
    planned.append(store_module.PlannedRun("broken", "pack0", '{"dataset": "digits"}'))
    results = [
        store_module.RunResult(row.run_id, "done", _plain(row[metrics]))
        for _, row in runs.iterrows()
    ]
    results.append(store_module.RunResult("broken", "failed", error="boom"))
    with store_module.Store.open(tmp_path) as store:
        store.add_runs(planned)
        store.finish_pack("pack0", results, points=points)

    index = write_report(tmp_path)
    page = check_report(index, n_done=5, extra=POINT_FIGURES)
    assert page.rows["per-point"] == 3
    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["status_counts"] == {
        "pending": 0,
        "running": 0,
        "done": 5,
        "failed": 1,
        "diverged": 0,
    }
    (jacobian,) = [r for r in summary["correlations"] if r["predictor"] == "jacobian_norm"]
    assert jacobian["n"] == 5 and jacobian["spearman_rho"] == pytest.approx(1.0)


def _plain(row: pd.Series) -> dict:
    """A row as JSON-ready Python values (NaN dropped: a missing batch size is full batch)."""
    values = {key: value.item() if hasattr(value, "item") else value for key, value in row.items()}
    return {key: value for key, value in values.items() if value == value}


CHROMIUM = shutil.which("chromium")

# The models table's cells by column name, in row order: data-v of numbers, text otherwise.
READ_COLUMN = """(() => {
  const table = document.getElementById("models");
  const col = [...table.tHead.rows[0].cells].findIndex(th => th.textContent.trim() === %s);
  if (col < 0) throw new Error("no such column");
  return [...table.tBodies[0].rows].map(row => {
    const cell = row.cells[col];
    return cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent;
  });
})()"""
CLICK_HEADER = """(() => {
  const th = [...document.querySelectorAll("#models thead th")]
    .find(th => th.textContent.trim() === %s);
  th.click();
  return th.getAttribute("aria-sort");
})()"""
IMAGES = """[...document.images].map(img => ({
  src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth
}))"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH")
def test_report_renders_in_headless_chromium(tmp_path):
    """Offline in headless Chromium: no console errors or uncaught exceptions, every image
    loads, a click on a numeric header of the models table sorts it (again: reversed),
    and the page screenshots."""
    runs = synthetic_runs(6)
    index = write_report(tmp_path / "study", runs=runs, points=synthetic_points(runs))
    expected_images = check_report(index, n_done=6, extra=POINT_FIGURES).images
    with Browser(CHROMIUM, tmp_path / "profile", timeout=60) as browser:
        page = browser.open_page()
        page.navigate(index.resolve().as_uri())
        assert not page.errors(), "errors while loading:\n" + "\n".join(page.errors())

        images = page.evaluate(IMAGES)
        assert sorted(image["src"] for image in images) == sorted(expected_images)
        broken = [image for image in images if not (image["complete"] and image["width"] > 0)]
        assert not broken, f"images that did not load: {broken}"

        def column(name: str) -> list[str]:
            return page.evaluate(READ_COLUMN % json.dumps(name))

        def click(name: str) -> str:
            return page.evaluate(CLICK_HEADER % json.dumps(name))

        run_ids = column("run_id")
        before = [float(v) for v in column("n_params")]
        assert len(before) == 6
        # The page's own order (by gap) must not already be sorted either way, or a
        # script that does nothing would pass.
        assert before not in (sorted(before), sorted(before, reverse=True))
        assert click("n_params") == "ascending"
        ascending = [float(v) for v in column("n_params")]
        assert ascending == sorted(before)
        assert click("n_params") == "descending"
        assert [float(v) for v in column("n_params")] == sorted(before, reverse=True)
        assert sorted(column("run_id")) == sorted(run_ids), "rows lost or duplicated"
        by_run = dict(zip(run_ids, before, strict=True))  # rows move whole, not cells
        assert [by_run[r] for r in column("run_id")] == sorted(before, reverse=True)

        screenshot = page.screenshot(tmp_path / "page.png")
        errors = page.errors()
    assert not errors, "errors in the page:\n" + "\n".join(errors)
    assert screenshot.read_bytes().startswith(PNG_MAGIC)
    assert browser.process.returncode is not None


def page_text(index: Path) -> str:
    """The page's text without tags, entities resolved and whitespace collapsed."""
    text = re.sub(r"<[^>]+>", " ", index.read_text(encoding="utf-8"))
    return " ".join(html.unescape(text).split())


def test_a_report_on_an_unfinished_study_warns_above_the_claims(tmp_path):
    runs = synthetic_runs(8)
    runs.loc[[0, 1, 2, 3], "status"] = ["pending", "running", "failed", "diverged"]
    out = tmp_path / "study"
    index = write_report(out, runs=runs, n_boot=50)
    text = page_text(index)
    banner = "Study incomplete: 5 of 8 runs finished (1 pending, 1 running, 1 failed)."
    assert banner in text and "verdicts, figures and tables below are provisional" in text
    assert f"Resume with sensgen run {out / 'study.toml'} --out {out}" in text
    assert text.index(banner) < text.index("Which of the paper's claims hold here")
    page = index.read_text(encoding="utf-8")
    assert page.index('class="banner"') < page.index('<table id="claims"')  # the verdicts
    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["complete"] is False
    assert (summary["runs"], summary["runs_finished"]) == (8, 5)
    assert summary["unfinished"] == {"pending": 1, "running": 1, "failed": 1}

    runs.loc[[0, 1, 2], "status"] = "done"  # diverged runs are final: the study is complete
    index = write_report(out, runs=runs, n_boot=50)
    assert "Study incomplete" not in page_text(index)
    assert json.loads((index.parent / "summary.json").read_text())["complete"] is True


def _cli(*args: str) -> int:
    """Run the CLI in-process; return its exit code."""
    from sensgen.cli import main

    with pytest.raises(SystemExit) as info:
        main([*args])
        raise SystemExit(0)
    return info.value.code


@pytest.mark.parametrize(
    ("pairs", "names"),
    [
        ('[pairs]\nfactor = "random_labels"\nvalues = ["abc", 1.0]', ["pairs.values[0]", "'abc'"]),
        ('[pairs]\nfactor = "random_labels"\nvalues = 1.0', ["pairs.values", "valid list"]),
        ('[pairs]\nfactor = "depth"\nvalues = [0.0, 1.0]', ["pairs.factor 'depth'", "augment"]),
        ('[pairs]\nfactor = "random_labels"\nvalues = [0, 0.0]', ["values", "more than once"]),
        ('[pairs]\nfactor = "augment"\nvalues = [true, false]\nx = 1', ["pairs.x", "overrides"]),
        ("[pairs]\nvalues = [true, false]", ["pairs.factor", "Field required"]),
        ("pairs = 3", ["[pairs] must be a table"]),
    ],
)
def test_an_invalid_pairs_table_in_study_toml_is_a_user_error_for_report(
    tmp_path, capsys, pairs, names
):
    from sensgen.store import Store

    with Store.open(tmp_path):
        pass
    path = tmp_path / "study.toml"
    path.write_text(f'name = "edited"\n{pairs}\n', encoding="utf-8")
    assert _cli("report", str(tmp_path)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}:" in err and all(name in err for name in names), err
    assert "Traceback" not in err and f"sensgen run STUDY --out {tmp_path}" in err


def test_cells_never_round_a_fraction_onto_a_whole_number():
    assert format_cell(0.99996) == "0.99996" and format_cell(59999 / 60000) == "0.99998"
    assert format_cell(np.float64(1 - 1e-12)) == "0.999999999999"
    assert format_cell(2.00001) == "2.00001" and format_cell(-0.99999) == "-0.99999"
    # Short forms that say they are rounded, and exact values, stay as they were.
    assert format_cell(1.0) == "1" and format_cell(0.0) == "0" and format_cell(0.123456) == "0.1235"
    assert format_cell(12345.678) == "1.235e+04" and format_cell(float("nan")) == ""


def test_a_train_accuracy_short_of_1_never_shows_as_1_or_100_percent(tmp_path):
    runs = synthetic_runs(4).assign(train_acc=[1.0, 0.99996, 1.0, 59999 / 60000])
    rule = {"apply": True, "min_train_acc": 0.9999}
    index = write_report(tmp_path, runs=runs, inclusion=rule, n_boot=50)
    page = index.read_text(encoding="utf-8")
    assert '<td data-v="0.99996">0.99996</td>' in page
    assert f'<td data-v="{59999 / 60000!r}">0.99998</td>' in page
    assert '<td data-v="1">1</td>' in page  # exactly 1 stays 1
    assert "training accuracy ≥ 99.99%" in page_text(index)


def test_models_csv_tells_apart_models_that_differ_in_any_run_field(tmp_path):
    runs = synthetic_runs(6).assign(train_subset=[1000, 4000] * 3, augment=False)
    runs["pair_id"] = pd.Series(["p0", "p0", "p1", "p1", None, None], dtype="str")
    runs["pair_role"] = pd.Series(["0.0", "1.0"] * 2 + [None, None], dtype="str")
    runs["transitions"] = 100.0 * runs["jacobian_norm"]
    index = write_report(tmp_path, runs=runs, n_boot=50)
    models = pd.read_csv(index.parent / "models.csv")
    expected = {"train_subset", "pair_id", "pair_role", "train_loss", "transitions"}
    assert expected <= set(models.columns) and "augment" not in models.columns
    assert len(models.drop_duplicates(["train_subset", "seed", "width", "depth"])) == 6
