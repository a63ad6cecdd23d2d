"""Ranking metrics (sensgen.analysis.ranking) on small hand-computed examples."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sensgen.analysis.ranking import (
    cmi_jiang,
    cmi_pgdl,
    granulated_psi,
    kendall_tau,
    psi_by_axis,
    sign_error,
    spearman,
)


def h2(p: float) -> float:
    """Binary entropy in bits."""
    return float(-p * np.log2(p) - (1 - p) * np.log2(1 - p))


def grid(axes: dict[str, list], gap_fn, mu_fn) -> pd.DataFrame:
    rows = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    frame = pd.DataFrame(rows)
    frame["gap"] = [gap_fn(r) for r in rows]
    frame["mu"] = [mu_fn(r, g) for r, g in zip(rows, frame["gap"], strict=True)]
    return frame


# ---------------------------------------------------------------- τ-b and Spearman


def test_tau_perfect_and_reversed():
    g = np.array([0.05, 0.1, 0.3, 0.2, 0.7])
    assert kendall_tau(np.log(g), g) == pytest.approx(1.0)
    assert kendall_tau(-g, g) == pytest.approx(-1.0)
    assert spearman(np.log(g), g) == pytest.approx(1.0)
    assert spearman(-g, g) == pytest.approx(-1.0)


def test_tau_b_with_ties_by_hand():
    # Unordered pairs of (μ, g) = (1,1), (2,2), (2,3), (3,3):
    # (0,1) (0,2) (0,3) (1,3) concordant: P = 4, Q = 0;
    # (1,2) tied in μ only: T_μ = 1; (2,3) tied in g only: T_g = 1.
    # τ-b = (P − Q) / sqrt((P+Q+T_μ)(P+Q+T_g)) = 4 / sqrt(5·5) = 0.8.
    mu, g = [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 3.0]
    assert kendall_tau(mu, g) == pytest.approx(0.8)
    assert kendall_tau(mu, g) == pytest.approx(stats.kendalltau(mu, g).statistic)
    # τ-a would be 4/6; τ-b is not.
    assert kendall_tau(mu, g) != pytest.approx(4 / 6)


def test_nan_pairs_dropped_and_undefined_is_nan():
    mu = np.array([1.0, np.nan, 2.0, 3.0, np.inf, 4.0])
    g = np.array([0.1, 0.5, 0.2, np.nan, 0.3, 0.4])
    # finite pairs: (1, .1), (2, .2), (4, .4)
    assert kendall_tau(mu, g) == pytest.approx(1.0)
    assert spearman(mu, g) == pytest.approx(1.0)
    # Undefined cases give NaN without warnings (pytest turns warnings into errors).
    assert np.isnan(kendall_tau([1.0], [2.0]))
    assert np.isnan(kendall_tau([np.nan, 1.0], [1.0, np.nan]))
    assert np.isnan(kendall_tau([], []))
    assert np.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert np.isnan(kendall_tau([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    assert np.isnan(spearman([1.0, 1.0], [1.0, 2.0]))
    with pytest.raises(ValueError):
        kendall_tau([1.0, 2.0], [1.0])


# ---------------------------------------------------------------- 2 × 2 grid by hand

# Models on a 2 × 2 grid (lr, width) with gap g and measure μ:
#   lr=0,w=0: g=.1 μ=1    lr=0,w=1: g=.2 μ=2
#   lr=1,w=0: g=.3 μ=4    lr=1,w=1: g=.4 μ=3
GRID_2X2 = pd.DataFrame(
    {
        "lr": [0, 0, 1, 1],
        "width": [0, 1, 0, 1],
        "gap": [0.1, 0.2, 0.3, 0.4],
        "mu": [1.0, 2.0, 4.0, 3.0],
    }
)


def test_psi_on_2x2_grid_by_hand():
    # ψ_lr: cells fix width. w=0: (.1,1) vs (.3,4) → τ = 1; w=1: (.2,2) vs (.4,3) → τ = 1.
    # ψ_width: cells fix lr. lr=0: (.1,1) vs (.2,2) → 1; lr=1: (.3,4) vs (.4,3) → −1 → ψ = 0.
    # Ψ = (1 + 0)/2 = 0.5; the plain τ is (5 − 1)/6 = 2/3.
    psi, per_axis = granulated_psi(GRID_2X2, "mu", "gap", ["lr", "width"])
    assert per_axis == pytest.approx({"lr": 1.0, "width": 0.0})
    assert psi == pytest.approx(0.5)
    assert kendall_tau(GRID_2X2["mu"], GRID_2X2["gap"]) == pytest.approx(2 / 3)


def test_cmi_pgdl_on_2x2_grid_is_undefined():
    # Only one (h1, h2) = (lr, width). A bin fixes (lr(A), lr(B), w(A), w(B)), i.e. both
    # models: 16 bins of one ordered pair each (4 of them self-pairs). A single pair has
    # H(V_g) = 0 in every bin, so mean I / mean H = 0/0: the score is undefined (NaN).
    assert np.isnan(cmi_pgdl(GRID_2X2, "mu", "gap", ["lr", "width"]))


def test_cmi_jiang_on_2x2_grid_by_hand():
    # 12 ordered pairs, no self-pairs, no ties, so V = ±1.
    # S = ∅: V_μ = V_g for 10 pairs, opposite for the 2 ordered pairs of the lr=1 models.
    #   H(V_g) = 1 bit, I = 1 − H₂(1/6) ≈ 0.350 → ratio 0.350.
    # S = {lr}: cells (lr(A), lr(B)). (0,0): 2 concordant pairs → I = H = 1;
    #   (1,1): 2 discordant pairs → I = H = 1 (sign-symmetric); (0,1), (1,0): 4 pairs
    #   each, g(A) < g(B) always (resp. >) → H = I = 0. Ratio (2 + 2)/(2 + 2) = 1.
    # S = {width}: (0,0), (1,1): 2 concordant pairs each → I = H = 1. (0,1): pairs
    #   (V_g, V_μ) = (−,−), (−,−), (+,+), (−,+) → H(V_g) = H₂(1/4), H(V_μ) = 1,
    #   H(joint) = 1.5, I = H₂(1/4) − 0.5; (1,0) mirrors it. Weighted by 2, 2, 4, 4 pairs:
    #   ratio (4 + 8(H₂(1/4) − .5)) / (4 + 8 H₂(1/4)) ≈ 0.619.
    # S = {lr, width}: every cell is one pair, H = 0 → skipped.
    # K = min(0.350, 1, 0.619) = 1 − H₂(1/6).
    assert cmi_jiang(GRID_2X2, "mu", "gap", ["lr", "width"]) == pytest.approx(1 - h2(1 / 6))
    one_axis = cmi_jiang(GRID_2X2, "mu", "gap", ["width"])
    assert one_axis == pytest.approx(1 - h2(1 / 6))  # ∅ is still the minimum


# ---------------------------------------------------------------- 2 × 2 × 2 grid


def gap_binary(r):
    # g = 4a + 2b + c: distinct, with a the most and c the least significant axis.
    return 4 * r["a"] + 2 * r["b"] + r["c"] + 0.5


AXES3 = {"a": [0, 1], "b": [0, 1], "c": [0, 1]}


def test_perfect_measure_scores_top_everywhere():
    frame = grid(AXES3, gap_binary, lambda r, g: np.exp(g))
    psi, per_axis = granulated_psi(frame, "mu", "gap", list(AXES3))
    assert psi == pytest.approx(1.0)
    assert per_axis == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    assert kendall_tau(frame["mu"], frame["gap"]) == pytest.approx(1.0)
    # V_μ = V_g for every pair, so I = H(V_g) in every bin: 100 (information is left since
    # with 3 axes a bin of (h1, h2) leaves the third axis free).
    assert cmi_pgdl(frame, "mu", "gap", list(AXES3)) == pytest.approx(100.0)
    assert cmi_jiang(frame, "mu", "gap", list(AXES3)) == pytest.approx(1.0)


def test_reversed_measure():
    frame = grid(AXES3, gap_binary, lambda r, g: -g)
    psi, _ = granulated_psi(frame, "mu", "gap", list(AXES3))
    assert psi == pytest.approx(-1.0)
    assert kendall_tau(frame["mu"], frame["gap"]) == pytest.approx(-1.0)
    # cmi_jiang: no self-pairs, no ties, V_μ = −V_g: a relabelling, so I = H → 1.
    assert cmi_jiang(frame, "mu", "gap", list(AXES3)) == pytest.approx(1.0)
    # cmi_pgdl is NOT sign-symmetric, because self-pairs give V_g = V_μ = 0.
    # (h1, h2) = (a, b): 16 bins. 4 diagonal bins (same a, b for A and B; c free) hold
    #   2 self-pairs (0, 0) and the two orders of the c-pair: (V_g, V_μ) = (1, 0), (0, 1):
    #   H(V_g) = H₂(1/4), I = 2 H₂(1/4) − 1.5. 12 off-diagonal bins: a or b differs, which
    #   decides g whatever c is, so V_g is constant: H = I = 0.
    #   Score (a, b) = (2 H₂(1/4) − 1.5) / H₂(1/4) ≈ 0.151.
    # (a, c): 4 diagonal bins as above; off-diagonal bins with a(A) = a(B), c(A) ≠ c(B)
    #   (4 bins): b decides unless b(A) = b(B), so V_g has three of one value → I = H =
    #   H₂(1/4); the other 8 have V_g constant. Score = (I_d + H₁)/(2 H₁) ≈ 0.576.
    # (b, c): all 12 off-diagonal bins have I = H = H₂(1/4): score (I_d + 3H₁)/(4H₁) ≈ 0.788.
    # Task score = min = (a, b).
    h1 = h2(1 / 4)
    expected = 100 * (2 * h1 - 1.5) / h1
    assert expected == pytest.approx(15.1, abs=0.05)
    assert cmi_pgdl(frame, "mu", "gap", list(AXES3)) == pytest.approx(expected)
    # Only (a, c) or (b, c) available → those scores.
    assert cmi_pgdl(frame, "mu", "gap", ["a", "c"]) == pytest.approx(
        100 * (2 * h1 - 1.5 + h1) / (2 * h1)
    )
    assert cmi_pgdl(frame, "mu", "gap", ["b", "c"]) == pytest.approx(
        100 * (2 * h1 - 1.5 + 3 * h1) / (4 * h1)
    )


def test_cmi_pgdl_leaves_out_pairs_of_axes_without_a_complete_grid():
    # A random-search lr (a new value per model) makes every pair with lr incomplete: the
    # score comes from the complete pairs only, and is NaN when none is complete.
    frame = grid(AXES3, gap_binary, lambda r, g: -g)
    with_lr = frame.assign(lr=np.linspace(1e-3, 1e-2, len(frame)))
    assert cmi_pgdl(with_lr, "mu", "gap", [*AXES3, "lr"]) == pytest.approx(
        cmi_pgdl(frame, "mu", "gap", list(AXES3))
    )
    assert np.isnan(cmi_pgdl(with_lr, "mu", "gap", ["a", "lr"]))
    # One missing corner of the (a, b) grid: (a, b) is left out, (a, c) and (b, c) stay.
    holed = frame.loc[~((frame["a"] == 1) & (frame["b"] == 1))]
    ac, bc = (cmi_pgdl(holed, "mu", "gap", pair) for pair in (["a", "c"], ["b", "c"]))
    assert cmi_pgdl(holed, "mu", "gap", list(AXES3)) == pytest.approx(min(ac, bc))
    assert np.isnan(cmi_pgdl(holed, "mu", "gap", ["a", "b"]))


def test_ranking_frames_drop_nan_models():
    frame = grid(AXES3, gap_binary, lambda r, g: np.exp(g))
    with_nan = pd.concat(
        [frame, pd.DataFrame({"a": [0, 1], "b": [0, 0], "c": [1, 1], "gap": [np.nan, 3.0]})]
    )
    axes = list(AXES3)
    assert granulated_psi(with_nan, "mu", "gap", axes) == granulated_psi(frame, "mu", "gap", axes)
    assert cmi_pgdl(with_nan, "mu", "gap", axes) == pytest.approx(
        cmi_pgdl(frame, "mu", "gap", axes)
    )
    assert cmi_jiang(with_nan, "mu", "gap", axes) == pytest.approx(
        cmi_jiang(frame, "mu", "gap", axes)
    )


def test_psi_skips_cells_without_a_tau():
    # Cell width=1 holds one model only, and cell width=2 has constant g: ψ_lr uses width=0.
    frame = pd.DataFrame(
        {
            "lr": [0, 1, 0, 0, 1],
            "width": [0, 0, 1, 2, 2],
            "gap": [0.1, 0.2, 0.3, 0.5, 0.5],
            "mu": [2.0, 1.0, 0.0, 1.0, 2.0],
        }
    )
    psi, per_axis = granulated_psi(frame, "mu", "gap", ["lr", "width"])
    assert per_axis["lr"] == pytest.approx(-1.0)
    # ψ_width: lr=0 cell (.1,2), (.3,0), (.5,1): P=1 ((.3,0)-(.5,1)), Q=2 → τ = −1/3;
    # lr=1 cell (.2,1), (.5,2): τ = 1. ψ_width = 1/3.
    assert per_axis["width"] == pytest.approx(1 / 3)
    assert psi == pytest.approx((-1 + 1 / 3) / 2)


def test_psi_counts_a_measure_blind_to_an_axis_as_zero_there():
    # A width × lr grid; μ = the width (a parameter count), the gap rises with both axes.
    # ψ_width: cells fix lr, μ and g both rise with width → τ = 1 in each.
    # ψ_lr: cells fix width, μ is constant while g varies: no pair is ordered, τ = 0 in
    # JNMKB's Eq. 2 (τ-b would be 0/0), so ψ_lr = 0 and Ψ = (1 + 0)/2, not 1.
    frame = pd.DataFrame(
        {
            "width": [1, 1, 2, 2, 3, 3],
            "lr": [1, 2, 1, 2, 1, 2],
            "gap": [0.1, 0.15, 0.2, 0.3, 0.35, 0.5],
        }
    ).assign(mu=lambda f: f["width"].astype(float))
    psi, per_axis = granulated_psi(frame, "mu", "gap", ["width", "lr"])
    assert per_axis == {"width": 1.0, "lr": 0.0}
    assert psi == 0.5
    # A cell whose gap is constant too has nothing to order: still left out.
    flat = frame.assign(gap=[0.1, 0.1, 0.2, 0.3, 0.35, 0.5])
    assert psi_by_axis(flat, "mu", "gap", ["width", "lr"])["lr"] == (0.0, 2)


# ---------------------------------------------------------------- against the PGDL scorer


def pgdl_reference(frame: pd.DataFrame, axes: list[str]) -> float:
    """Loop port of the public PGDL scoring program's conditional_mutual_information."""
    models = frame.to_dict("records")
    values = {h: sorted(frame[h].unique()) for h in axes}
    best = np.inf
    for h1 in axes:
        for h2_ in axes:
            if h1 == h2_:
                continue
            combos = list(itertools.product(values[h1], values[h1], values[h2_], values[h2_]))
            table = np.zeros((2, 2, len(combos)))
            index = {c: i for i, c in enumerate(combos)}
            for m1 in models:
                for m2 in models:
                    k0 = 0 if m1["gap"] > m2["gap"] else 1
                    k1 = 0 if m1["mu"] > m2["mu"] else 1
                    table[k0, k1, index[(m1[h1], m2[h1], m1[h2_], m2[h2_])]] += 1
            mis, hs = [], []
            for k in range(table.shape[-1]):
                t = table[:, :, k]
                n = t.sum()
                pg, pm = t.sum(axis=1) / n, t.sum(axis=0) / n
                hs.append(-np.sum(pg * np.log2(pg + 1e-12)))
                mis.append(
                    sum(
                        t[i, j] / n * np.log2(t[i, j] / n / (pg[i] * pm[j]))
                        for i in range(2)
                        for j in range(2)
                        if t[i, j] > 0
                    )
                )
            best = min(best, np.mean(mis) / np.mean(hs))
    return 100 * best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmi_pgdl_matches_scorer_port(seed):
    rng = np.random.default_rng(seed)
    axes = {"a": [0, 1, 2], "b": [0, 1], "c": [0, 1]}
    frame = grid(axes, lambda r: rng.normal(), lambda r, g: g + rng.normal(scale=0.7))
    frame["mu"] = frame["mu"].round(1)  # some ties in μ
    ours = cmi_pgdl(frame, "mu", "gap", list(axes))
    assert 0 < ours < 100
    assert ours == pytest.approx(pgdl_reference(frame, list(axes)), rel=1e-6)


# ---------------------------------------------------------------- sign-error


def test_sign_error_on_2x2_grid_by_hand():
    # n_test = 1e6: ε ≈ 0.0015, every pair kept.
    # lr environments (width fixed): (.1,1)-(.3,4) and (.2,2)-(.4,3) concordant → loss 0.
    # width environments (lr fixed): lr=0 (.1,1)-(.2,2) → 0; lr=1 (.3,4)-(.4,3) → 1.
    envs = sign_error(GRID_2X2, "mu", "gap", ["lr", "width"], n_test=1e6)
    by_axis = envs.groupby("axis")["loss"]
    assert by_axis.mean().to_dict() == pytest.approx({"lr": 0.0, "width": 0.5})
    assert by_axis.max().to_dict() == pytest.approx({"lr": 0.0, "width": 1.0})
    assert envs["n_pairs"].tolist() == [1, 1, 1, 1]
    width = envs[envs["axis"] == "width"].set_index("environment")["loss"]
    assert width.to_dict() == {(0,): 0.0, (1,): 1.0}
    # n_test = 400: ε = sqrt(log(80)/800) ≈ 0.074; lr pairs (|Δg| = .2 > 2ε) are kept,
    # width pairs (|Δg| = .1 < 2ε) are dropped, and so are their environments.
    envs = sign_error(GRID_2X2, "mu", "gap", ["lr", "width"], n_test=400)
    assert envs["axis"].tolist() == ["lr", "lr"]
    # a per-model column works too; a tie in μ costs ½.
    tied = GRID_2X2.assign(mu=[1.0, 2.0, 1.0, 2.0], n=1e6)
    envs = sign_error(tied, "mu", "gap", ["lr", "width"], n_test="n")
    assert envs.groupby("axis")["loss"].mean().to_dict() == pytest.approx({"lr": 0.5, "width": 0.0})
