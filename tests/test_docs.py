"""docs/analysis.md: every Python block runs as written on a real (small) study."""

import re
from pathlib import Path

import pytest

from sensgen import study as study_module
from sensgen.runner import run

DOC = Path(__file__).resolve().parents[1] / "docs" / "analysis.md"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "study"
    s = study_module.Study(
        name="docs",
        base=dict(dataset="digits", width=64, depth=1, lr=0.003, max_steps=2000, eval_every=50),
        grid={"seed": [0, 1, 2], "random_labels": [0.0, 1.0]},
        measure={"jacobian_train_points": 50},
    )
    run(s, out, progress=False, report=False)
    return out


def _run_blocks(page, expected: int, study_literal: str, study_dir) -> dict:
    """Run a page's ```python blocks in order in one namespace, with its study path
    (``study_literal``, as written in the page) pointing at ``study_dir``."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == expected
    namespace: dict = {}
    for block in blocks:
        exec(block.replace(study_literal, repr(str(study_dir))), namespace)
    return namespace


def test_every_block_of_the_analysis_page_runs(study_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _run_blocks(DOC, 4, '"runs/quickstart"', study_dir)
    runs, kept, ci = namespace["runs"], namespace["kept"], namespace["ci"]
    assert len(runs) == 6 and set(runs["status"]) == {"done"}
    n_fit = int((runs["train_acc"] == 1.0).sum())
    assert len(kept) == n_fit >= 3  # the true-label models fit; random labels do not
    assert ci.n == len(kept)
    assert len(namespace["summary"]) == 6
    assert (tmp_path / "gap_vs_jacobian.png").stat().st_size > 10_000


MEASURES_DOC = DOC.parent / "measures.md"


def test_every_block_of_the_measures_page_runs(tmp_path, monkeypatch):
    out = tmp_path / "study"
    s = study_module.Study(
        name="measures-doc",
        base=dict(dataset="digits", depth=1, lr=0.01, max_steps=1500, eval_every=50),
        grid={"width": [32, 128], "seed": [0, 1]},
        measure={
            "jacobian_train_points": 50,
            "generalization_measures": True,
            "measure_points": 100,
        },
    )
    run(s, out, progress=False, report=False)
    monkeypatch.chdir(tmp_path)
    namespace = _run_blocks(MEASURES_DOC, 2, '"runs/fig5"', out)
    assert len(namespace["runs"]) == 4  # every model fits, so the inclusion rule keeps all
    scores, factors = namespace["scores"], namespace["factors"]
    assert {"jacobian_norm", "sharpness_mag", "pacbayes_mag_flatness"} <= set(scores["measure"])
    assert set(factors["factor"]) == {"width", "seed"}  # cells never pool the seeds
    values = namespace["values"]
    assert values["distance_l2"] == 0.0  # the block measures the model before training
    assert values["margin"] < 0 < values["spectral_product"]
