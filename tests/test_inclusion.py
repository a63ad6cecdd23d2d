"""The paper's inclusion rule (100% train accuracy; 99.9% for CIFAR-100) in the analysis."""

import numpy as np
import pandas as pd

from sensgen.analysis import write_report
from sensgen.analysis.inclusion import analysed_runs, mark_included
from test_report import parse


def _runs():
    return pd.DataFrame(
        {
            "run_id": [f"r{i}" for i in range(6)],
            "status": ["done", "done", "done", "done", "failed", "pending"],
            "dataset": ["mnist", "mnist", "cifar100", "cifar100", "mnist", "mnist"],
            "train_acc": [1.0, 0.9995, 0.9995, 0.998, np.nan, np.nan],
            "test_acc": [0.98, 0.97, 0.30, 0.31, np.nan, np.nan],
            "gap": [0.02, 0.0295, 0.6995, 0.688, np.nan, np.nan],
            "jacobian_norm": [0.1, 0.2, 2.0, 3.0, np.nan, np.nan],
            "n_params": [1000, 2000, 3000, 4000, 5000, 6000],
            "train_loss": [1e-4, 1e-3, 1e-2, 1e-2, np.nan, np.nan],
            "random_labels": 0.0,
        }
    )


def test_paper_thresholds_per_dataset():
    marked = mark_included(_runs(), apply=True)
    assert marked["included"].tolist() == [True, False, True, False, False, False]


def test_min_train_acc_overrides_and_apply_false_keeps_every_done_model():
    assert mark_included(_runs(), apply=True, min_train_acc=0.998)["included"].sum() == 4
    assert mark_included(_runs(), apply=False)["included"].tolist() == [True] * 4 + [False] * 2


def test_analysed_runs_drop_only_failing_done_models():
    kept = analysed_runs(_runs(), apply=True)
    assert kept["run_id"].tolist() == ["r0", "r2", "r4", "r5"]  # unfinished runs stay


def test_analysed_runs_without_a_status_column_treat_every_row_as_finished():
    runs = _runs().drop(columns="status").iloc[:4]
    kept = analysed_runs(runs, apply=True)
    assert kept["run_id"].tolist() == ["r0", "r2"]


def test_report_applies_the_rule_and_says_so(tmp_path):
    runs = _runs()
    index = write_report(tmp_path, runs=runs, inclusion={"apply": True, "min_train_acc": None})
    page = parse(index)
    assert page.rows["models"] == 2  # r0 and r2
    text = index.read_text(encoding="utf-8")
    assert "<strong>2 of 4</strong> finished models qualify" in text
    models = pd.read_csv(tmp_path / "report" / "models.csv")
    assert sorted(models["run_id"]) == ["r0", "r2"]
    every = write_report(tmp_path, runs=runs, inclusion={"apply": False})
    assert parse(every).rows["models"] == 4
    assert "every finished model is analysed (4)" in every.read_text(encoding="utf-8")
