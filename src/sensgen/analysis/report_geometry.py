"""The report's sections for Studies 2 and 3: profiles along ellipses and region maps.

`geometry_section` draws the figures (through the report's ``save`` callback, which writes
PNG and SVG) and returns HTML fragments whose captions state the paper's claim next to the
measured figure, with the `Claim`s it checked. Its measured summaries (`manifold_contrasts`,
`boundary_contrast`, `geometry_claims`) are pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from sensgen.analysis.claims import Claim, sign_verdict
from sensgen.analysis.geometry_figures import (
    ANCHOR_ANGLES,
    boundary_table,
    manifold_profiles,
    profile_summary,
    region_maps_figure,
)
from sensgen.analysis.html import figure_html
from sensgen.analysis.pairs import sign_test

_MIDWAY_ANGLES = (0.0, 2 * math.pi / 3, 4 * math.pi / 3)  # between the anchors


def manifold_contrasts(profiles: pd.DataFrame) -> dict[str, float]:
    """Mean ‖J‖ and density at the anchor bins and midway bins, per path kind.

    Returns:
        {"<path>_jacobian_anchors", "<path>_jacobian_midway", "<path>_density_anchors",
        "<path>_density_midway"} for each path kind present (means over models).
    """
    summary = profile_summary(profiles)
    out: dict[str, float] = {}
    for path, rows in summary.groupby("path"):
        by_bin = rows.set_index("bin")
        for where, angles in (("anchors", ANCHOR_ANGLES), ("midway", _MIDWAY_ANGLES)):
            bins = [_nearest_bin(by_bin["angle"], angle) for angle in angles]
            out[f"{path}_jacobian_{where}"] = float(by_bin.loc[bins, "jacobian_mean"].mean())
            out[f"{path}_density_{where}"] = float(by_bin.loc[bins, "density_mean"].mean())
    return out


def _nearest_bin(centres: pd.Series, angle: float) -> int:
    """The bin whose centre angle is nearest ``angle`` around the circle. With B ≡ 3
    (mod 6) bins the centres are offset by half a bin (`metrics.angle_bins`), so an index
    computed as angle / width would miss the anchor at π."""
    distance = np.abs(np.angle(np.exp(1j * (centres.to_numpy(dtype=float) - angle))))
    return centres.index[int(np.argmin(distance))]


def boundary_contrast(table: pd.DataFrame) -> dict[str, float]:
    """Median over (run, plane) of near-points / elsewhere boundary density, per stage."""
    return {
        stage: float(rows["ratio"].median()) for stage, rows in table.groupby("stage", sort=True)
    }


def geometry_claims(
    profiles: pd.DataFrame, table: pd.DataFrame | None, n_region_runs: int
) -> list[Claim]:
    """Fig. 2 and Fig. 3 claims (paper §3 Studies 2 and 3).

    Fig. 2 holds when the random ellipse's ‖J‖ is more than 10× that at the training points
    and the different-class ellipse's midway ‖J‖ exceeds that at its anchors; the transition
    density claim holds when the density midway exceeds that at the anchors. Fig. 3 is
    judged over the (model, plane) maps, each plane through its own three training points:
    it holds when sign tests give p < 0.05 that most maps' near-points / elsewhere boundary
    density after training is below 1 and below the same map's at initialisation, does
    not hold when either test is significant the other way, else no verdict (5 maps or
    fewer can never reach one).
    """
    claims: list[Claim] = []
    c = manifold_contrasts(profiles) if len(profiles) else {}
    if "random_jacobian_midway" in c and "different_class_jacobian_anchors" in c:
        off = c["random_jacobian_midway"] / c["different_class_jacobian_anchors"]
        dip = c["different_class_jacobian_midway"] / c["different_class_jacobian_anchors"]
        claims.append(
            Claim(
                "Fig. 2",
                "sensitivity is far higher off the data than at training points, and dips there",
                f"random-ellipse ‖J‖ / ‖J‖ at the points = {off:.3g}; different-class "
                f"ellipse midway / at the points = {dip:.3g}",
                bool(off > 10 and dip > 1),
            )
        )
        midway, anchors = c["different_class_density_midway"], c["different_class_density_anchors"]
        if midway == midway and anchors > 0:
            claims.append(
                Claim(
                    "Fig. 2",
                    "transition density dips at the training points",
                    f"different-class ellipse: density midway / at the points = "
                    f"{midway / anchors:.3g}",
                    bool(midway > anchors),
                )
            )
    if table is not None and len(table):
        ratio = boundary_contrast(table)
        init, trained = ratio.get("init", math.nan), ratio.get("trained", math.nan)
        n_maps = len(table[["run_id", "plane"]].drop_duplicates())
        holds, tests = _low_density_tests(table)
        claims.append(
            Claim(
                "Fig. 3",
                "after training, training points sit in regions of low boundary density",
                f"boundary density near the points / elsewhere, median over {n_maps} "
                f"plane(s) of {n_region_runs} model(s): {init:.3g} at init, {trained:.3g} "
                f"after training; {tests}",
                holds,
            )
        )
    return claims


def _low_density_tests(table: pd.DataFrame) -> tuple[bool | None, str]:
    """Fig. 3's verdict: sign tests over the (model, plane) maps that the trained ratio is
    below 1 and below its ratio at init (`geometry_claims`), and their words."""
    wide = table.pivot_table(index=["run_id", "plane"], columns="stage", values="ratio")
    trained = wide["trained"].to_numpy(float) if "trained" in wide else np.array([])
    init = wide["init"].to_numpy(float) if "init" in wide else np.full(len(trained), np.nan)
    # (sign_test counts other > better: here 1 > trained, and init > trained)
    tests = [sign_test(trained, np.ones(len(trained))), sign_test(trained, init)]
    words = "; ".join(
        f"{t.n_expected} of {t.n} maps {what} (sign test p = {t.p_value:.2g})"
        for t, what in zip(tests, ("below 1", "below their init ratio"), strict=True)
        if t.n
    )
    verdicts = [sign_verdict(t.share, t.p_value) for t in tests]  # (n = 0: NaN, None)
    if False in verdicts:
        return False, words
    return (True if verdicts == [True, True] else None), words or "no map to test"


def geometry_section(
    profiles: pd.DataFrame,
    maps_by_run: Mapping[str, Mapping[str, torch.Tensor]],
    save: Callable[[str, Figure], None],
) -> tuple[list[str], list[Claim]]:
    """HTML and claims of the Fig. 2 and Fig. 3 sections (empty when neither was measured)."""
    table = boundary_table(maps_by_run) if maps_by_run else None
    claims = geometry_claims(profiles, table, len(maps_by_run))
    parts: list[str] = []
    if len(profiles):
        save("manifold_profiles", manifold_profiles(profiles))
        parts += [
            "<h2>On and off the data manifold (Fig. 2)</h2>",
            figure_html("manifold_profiles", _caption([c for c in claims if c.figure == "Fig. 2"])),
        ]
    if maps_by_run:
        first = next(iter(maps_by_run))
        save("region_maps", region_maps_figure(maps_by_run[first], f"Linear regions, {first}"))
        shown = [c for c in claims if c.figure == "Fig. 3"]
        parts += [
            "<h2>Linear regions around training points (Fig. 3)</h2>",
            figure_html("region_maps", _caption(shown) + " Shown: the first model's planes."),
        ]
    return parts, claims


def _caption(claims: list[Claim]) -> str:
    if not claims:
        return "No claim can be checked on these profiles."
    return " ".join(f"Paper: {c.paper}. Measured: {c.measured}: {c.verdict}." for c in claims)
