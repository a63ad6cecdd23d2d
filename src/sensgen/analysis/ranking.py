"""Ranking metrics: how well a measure μ orders models by their generalization gap g.

Pure functions, arrays or a frame (one row per model) in, a float out (paper notes §6,
"Ranking metrics"). Every function first drops models whose μ or g is not finite.

* ``kendall_tau``, ``spearman``: rank correlations over all models.
* ``granulated_psi``: Jiang et al. 2020's granulated Kendall coefficient Ψ (Eq. 4);
  ``psi_by_axis`` its per-axis terms ψ_i (Eq. 3) with their cell counts.
* ``cmi_pgdl``: the PGDL 2020 competition scorer (Jiang et al. 2020, "NeurIPS 2020
  Competition: Predicting Generalization in Deep Learning", scoring program by Y. Jiang).
* ``cmi_jiang``: the conditional-mutual-information criterion of Jiang et al. 2020,
  "Fantastic Generalization Measures and Where to Find Them", §6 (Eq. 5-6).
* ``sign_error``: per-environment sign-error of Dziugaite et al. 2020 ("In Search of Robust
  Measures of Generalization"), for its mean, max (robust) and CDF per hyper-parameter.

Mutual information and entropy are in bits (log₂, as the PGDL scorer); the CMI scores are
ratios and so do not depend on the unit.

Example:
    >>> import numpy as np
    >>> g = np.array([0.1, 0.2, 0.3, 0.4])
    >>> kendall_tau(g**2, g), kendall_tau(-g, g), spearman(np.exp(g), g)
    (1.0, -1.0, 1.0)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats


def _finite_pairs(mu, gap) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=float).ravel()
    gap = np.asarray(gap, dtype=float).ravel()
    if mu.shape != gap.shape:
        raise ValueError(f"mu and gap differ in length: {mu.size} vs {gap.size}")
    keep = np.isfinite(mu) & np.isfinite(gap)
    return mu[keep], gap[keep]


def _undefined(mu: np.ndarray, gap: np.ndarray) -> bool:
    return mu.size < 2 or np.ptp(mu) == 0 or np.ptp(gap) == 0


def kendall_tau(mu, gap) -> float:
    """Kendall's τ-b of μ against g (``scipy.stats.kendalltau``, variant "b").

    τ-b = (P − Q) / sqrt((P + Q + T_μ)(P + Q + T_g)) over the unordered pairs of models, with
    P concordant pairs, Q discordant pairs, T_μ pairs tied in μ only and T_g tied in g only
    (pairs tied in both count nowhere). Models whose μ or g is not finite are dropped.

    Returns:
        τ-b in [−1, 1]; NaN (without a warning) when fewer than 2 models remain or either
        variable is constant, as the denominator is then 0.
    """
    mu, gap = _finite_pairs(mu, gap)
    if _undefined(mu, gap):
        return float("nan")
    return float(stats.kendalltau(mu, gap, variant="b").statistic)


def spearman(mu, gap) -> float:
    """Spearman's ρ of μ against g: Pearson's r of the average ranks (ties share a rank).

    Models whose μ or g is not finite are dropped. NaN (without a warning) when fewer than 2
    models remain or either variable is constant.
    """
    mu, gap = _finite_pairs(mu, gap)
    if _undefined(mu, gap):
        return float("nan")
    return float(stats.spearmanr(mu, gap).statistic)


def _finite_frame(frame: pd.DataFrame, measure: str, gap: str, axes: Sequence[str]):
    axes = list(axes)
    missing = [c for c in (measure, gap, *axes) if c not in frame.columns]
    if missing:
        raise KeyError(f"columns not in frame: {missing}")
    values = frame[[measure, gap]].to_numpy(dtype=float)
    return frame.loc[np.isfinite(values).all(axis=1)], axes


def _complete_grid(data: pd.DataFrame, h1: str, h2: str) -> bool:
    """Whether every combination of an h1 value and an h2 value has a model."""
    combinations = len(data[[h1, h2]].drop_duplicates())
    return combinations == data[h1].nunique(dropna=False) * data[h2].nunique(dropna=False)


def granulated_psi(
    frame: pd.DataFrame, measure: str, gap: str, axes: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """Granulated Kendall coefficient Ψ (Jiang et al. 2020, "Fantastic Generalization
    Measures", §5, Eq. 4).

    For axis i, a cell is one combination of values of all the *other* axes; within a cell
    only axis i varies. ψ_i = mean, over cells with ≥ 2 models and a varying g, of the
    within-cell τ-b of μ against g; cells are weighted equally. A cell where μ is constant
    (a measure blind to axis i, such as the parameter count along the learning rate) scores
    0, as in JNMKB's Eq. 2-3, whose τ counts a tied pair as 0: τ-b is undefined there, and
    leaving such cells out gave blind measures the ψ of the axes they do see. Cells with a
    constant g (nothing to order) are left out. Ψ = mean of ψ_i over the axes with a defined
    ψ_i (Jiang et al. average over all axes; on a complete grid with varying g both agree).
    Rows whose μ or g is not finite are dropped first; a missing axis value is a value of
    its own. (Within a cell with some, not all, μ tied, τ-b is not JNMKB's τ-a.)

    Args:
        frame: one row per model.
        measure, gap: columns of μ and g.
        axes: hyper-parameter columns (the grid's axes).

    Returns:
        (Ψ, {axis: ψ_axis}); NaN where no cell gives a τ.
    """
    psis = {axis: psi for axis, (psi, _) in psi_by_axis(frame, measure, gap, axes).items()}
    defined = [p for p in psis.values() if np.isfinite(p)]
    return (float(np.mean(defined)) if defined else float("nan")), psis


def psi_by_axis(
    frame: pd.DataFrame, measure: str, gap: str, axes: Sequence[str]
) -> dict[str, tuple[float, int]]:
    """Per axis i: (ψ_i, the number of cells averaged) — see `granulated_psi`.

    Example:
        >>> frame = pd.DataFrame({"w": [1, 2, 1, 2], "d": [1, 1, 2, 2],
        ...                       "mu": [1.0, 2, 4, 3], "g": [0.1, 0.2, 0.3, 0.4]})
        >>> psi_by_axis(frame, "mu", "g", ["w", "d"])
        {'w': (0.0, 2), 'd': (1.0, 2)}
    """
    data, axes = _finite_frame(frame, measure, gap, axes)
    if not axes:
        raise ValueError("granulated_psi needs at least one axis")
    out: dict[str, tuple[float, int]] = {}
    for axis in axes:
        others = [a for a in axes if a != axis]
        cells = data.groupby(others, dropna=False, sort=False) if others else [(None, data)]
        taus = [_cell_tau(cell[measure], cell[gap]) for _, cell in cells]
        taus = [t for t in taus if np.isfinite(t)]
        out[axis] = (float(np.mean(taus)) if taus else float("nan"), len(taus))
    return out


def _cell_tau(mu: pd.Series, gap: pd.Series) -> float:
    """τ-b of one ψ cell; 0 where μ is constant but g is not (JNMKB's τ of all-tied pairs)."""
    if len(mu) >= 2 and np.ptp(mu.to_numpy(float)) == 0 and np.ptp(gap.to_numpy(float)) > 0:
        return 0.0
    return kendall_tau(mu, gap)


def _pairs(data: pd.DataFrame, measure: str, gap: str, axes: list[str], self_pairs: bool):
    """Ordered pairs (A, B) as index arrays, with each axis's integer codes per model."""
    n = len(data)
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    a, b = a.ravel(), b.ravel()
    if not self_pairs:
        a, b = a[a != b], b[a != b]
    codes = {h: pd.factorize(data[h], use_na_sentinel=False)[0] for h in axes}
    return a, b, data[measure].to_numpy(float), data[gap].to_numpy(float), codes


def _entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Row-wise Shannon entropy (bits) of a (bins, k) array of counts; 0 log 0 = 0."""
    total = counts.sum(axis=1, keepdims=True)
    q = counts / np.where(total > 0, total, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, -q * np.log2(q), 0.0)
    return terms.sum(axis=1)


def _binned_information(v_g, v_mu, keys: list[np.ndarray]):
    """Per observed bin: pair count, I(V_μ; V_g) and H(V_g), in bits.

    v_g, v_mu take values in {−1, 0, 1}; a bin is one value of the tuple ``keys``.
    """
    if keys:
        stacked = np.stack(keys, axis=1)
        _, inverse = np.unique(stacked, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
    else:
        inverse = np.zeros(len(v_g), dtype=int)
    n_bins = int(inverse.max()) + 1 if inverse.size else 0
    table = np.zeros((n_bins, 3, 3))
    np.add.at(table, (inverse, v_g + 1, v_mu + 1), 1.0)
    h_g = _entropy_bits(table.sum(axis=2))
    h_mu = _entropy_bits(table.sum(axis=1))
    h_joint = _entropy_bits(table.reshape(n_bins, 9))
    mi = np.maximum(h_g + h_mu - h_joint, 0.0)
    return table.sum(axis=(1, 2)), mi, h_g


def cmi_pgdl(frame: pd.DataFrame, measure: str, gap: str, axes: Sequence[str]) -> float:
    """PGDL 2020 competition score of one task (the public scoring program's
    ``conditional_mutual_information``), × 100.

    * Pairs: all n² *ordered* pairs (A, B) of the models with finite μ and g, self-pairs
      (A, A) included.
    * V_g = 1[g(A) > g(B)], V_μ = 1[μ(A) > μ(B)], both strict: a tie (and every self-pair)
      gives 0, the same symbol as "<".
    * For each pair of distinct hyper-parameters {h1, h2} ⊂ axes, the pairs are binned by
      U = (h1(A), h1(B), h2(A), h2(B)) (a missing value is a value). The scorer loops over
      ordered (h1, h2), h1 ≠ h2; (h2, h1) gives the same bins, so each unordered pair is
      scored once here. Other axes are *not* conditioned on: they vary inside a bin.
    * Per bin, I(V_μ; V_g) and H(V_g) (bits) from the bin's empirical 2 × 2 table. Score of
      {h1, h2} = (equal-weight mean over bins of I) / (equal-weight mean over bins of H(V_g))
      — bins are *not* weighted by their pair counts. Only observed bins enter; on the
      complete grid the scorer assumes (every value combination present) these are all
      (value count of h1)² × (value count of h2)² bins, as in the scorer.
    * Task score = min over {h1, h2} with a defined score (mean H(V_g) > 0); NaN when none
      is defined, e.g. with exactly 2 axes and one model per grid cell, where every bin
      holds a single ordered pair and so H(V_g) = 0.
    * The scorer is defined on a complete grid. A pair {h1, h2} whose value combinations
      are not all present among the models (a random-search axis such as a continuous lr)
      is left out, so a design without any complete pair of axes scores NaN.

    Because self-pairs and ties give V = 0 for both variables, the score is not symmetric
    in the sign of μ: a perfectly reversed μ does not score 100 (unlike ``cmi_jiang``).

    Returns:
        100 × task score, in [0, 100] (NaN as above).
    """
    data, axes = _finite_frame(frame, measure, gap, axes)
    if len(axes) < 2:
        raise ValueError("cmi_pgdl needs at least two hyper-parameter axes")
    a, b, mu, g, codes = _pairs(data, measure, gap, axes, self_pairs=True)
    v_g = (g[a] > g[b]).astype(int)
    v_mu = (mu[a] > mu[b]).astype(int)
    scores = []
    for h1, h2 in itertools.combinations(axes, 2):
        if not _complete_grid(data, h1, h2):
            continue
        keys = [codes[h1][a], codes[h1][b], codes[h2][a], codes[h2][b]]
        _, mi, h_g = _binned_information(v_g, v_mu, keys)
        if h_g.size and h_g.mean() > 0:
            scores.append(mi.mean() / h_g.mean())
    return 100.0 * float(min(scores)) if scores else float("nan")


def cmi_jiang(frame: pd.DataFrame, measure: str, gap: str, axes: Sequence[str]) -> float:
    """Conditional-mutual-information criterion K(μ) of Jiang et al. 2020 ("Fantastic
    Generalization Measures and Where to Find Them", §6, Eq. 5-6).

    * Pairs: all n(n − 1) ordered pairs (A, B), A ≠ B, of the models with finite μ and g,
      each equally likely.
    * V_g = sign(g(A) − g(B)), V_μ = sign(μ(A) − μ(B)) in {−1, 0, +1}: a tie is its own
      symbol (without ties this is the paper's ±1).
    * For S ⊂ axes with |S| ≤ 2 (∅ included), U_S = (h(A), h(B)) for h ∈ S, and
      Î(V_μ; V_g | U_S) = I(V_μ; V_g | U_S) / H(V_g | U_S) with
      I(·|U_S) = Σ_u p(u) I(V_μ; V_g | U_S = u) and H(V_g | U_S) = Σ_u p(u) H(V_g | U_S = u),
      p(u) = share of pairs in cell u (probability-weighted cells, unlike ``cmi_pgdl``).
    * K(μ) = min over S with H(V_g | U_S) > 0 of Î; NaN when no S qualifies.

    Sign-symmetric: V_μ ↦ −V_μ is a relabelling, so a reversed μ also scores 1.

    Returns:
        K(μ) in [0, 1] (not × 100).
    """
    data, axes = _finite_frame(frame, measure, gap, axes)
    a, b, mu, g, codes = _pairs(data, measure, gap, axes, self_pairs=False)
    if a.size == 0:
        return float("nan")
    v_g = np.sign(g[a] - g[b]).astype(int)
    v_mu = np.sign(mu[a] - mu[b]).astype(int)
    subsets = [()] + [(h,) for h in axes] + list(itertools.combinations(axes, 2))
    scores = []
    for subset in subsets:
        keys = [k for h in subset for k in (codes[h][a], codes[h][b])]
        counts, mi, h_g = _binned_information(v_g, v_mu, keys)
        p = counts / counts.sum()
        cond_h = float(p @ h_g)
        if cond_h > 0:
            scores.append(float(p @ mi) / cond_h)
    return float(min(scores)) if scores else float("nan")


def sign_error(
    frame: pd.DataFrame,
    measure: str,
    gap: str,
    axes: Sequence[str],
    n_test: float | str,
    delta: float = 0.05,
) -> pd.DataFrame:
    """Per-environment sign-error of μ (Dziugaite et al. 2020, "In Search of Robust Measures
    of Generalization", single-hyper-parameter environments; unweighted variant).

    For axis h, an environment is one cell of all *other* axes (as in ``granulated_psi``);
    its pairs are the unordered pairs {A, B} in the cell with h(A) ≠ h(B). A pair is kept
    only if the gaps' Hoeffding intervals g ± ε, ε = sqrt(log(4/δ) / (2 n_test)), do not
    overlap: |g(A) − g(B)| > ε_A + ε_B. Pair loss = ½(1 − sign(μ(A) − μ(B))·sign(g(A) − g(B))),
    so a tie in μ costs ½. Environment loss = mean pair loss over its kept pairs; environments
    with no kept pair are left out. Per h, the paper's summaries are the mean and the max
    (robust score) of ``loss`` over the rows of that axis, and its empirical CDF.

    Args:
        n_test: test-set size, a number or the name of a per-model column.
        delta: confidence parameter δ of the Hoeffding interval.

    Returns:
        One row per environment: ``axis``, ``environment`` (tuple of the other axes' values),
        ``n_pairs`` (kept) and ``loss``.
    """
    data, axes = _finite_frame(frame, measure, gap, axes)
    n = data[n_test].to_numpy(float) if isinstance(n_test, str) else np.full(len(data), n_test)
    eps = np.sqrt(np.log(4 / delta) / (2 * n))
    mu, g = data[measure].to_numpy(float), data[gap].to_numpy(float)
    rows = []
    for axis in axes:
        others = [a for a in axes if a != axis]
        cells = (
            data.groupby(others, dropna=False, sort=True).indices
            if others
            else {(): np.arange(len(data))}
        )
        h = data[axis].to_numpy()
        for key, idx in cells.items():
            losses = [
                0.5 * (1 - np.sign(mu[i] - mu[j]) * np.sign(g[i] - g[j]))
                for i, j in itertools.combinations(idx, 2)
                if h[i] != h[j] and abs(g[i] - g[j]) > eps[i] + eps[j]
            ]
            if losses:
                env = key if isinstance(key, tuple) else (key,)
                rows.append((axis, env, len(losses), float(np.mean(losses))))
    return pd.DataFrame(rows, columns=["axis", "environment", "n_pairs", "loss"])
