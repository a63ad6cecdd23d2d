"""The report's sections for Studies 2 and 3: profiles along ellipses and region maps.

`geometry_sections` draws the figures (through the report's ``save`` callback, which writes
PNG and SVG) and returns HTML fragments whose captions state the paper's claim next to the
measured figure. Its measured summaries (`manifold_contrasts`, `boundary_contrast`) are pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pandas as pd
import torch
from matplotlib.figure import Figure

from sensgen.analysis.geometry_figures import (
    boundary_table,
    manifold_profiles,
    profile_summary,
    region_maps_figure,
)
from sensgen.analysis.html import figure_html

# Bins of the default 60-bin profile: anchors at centres 10, 30, 50; midway at 0, 20, 40.
_ANCHOR_FRACTIONS = (1 / 6, 1 / 2, 5 / 6)
_MIDWAY_FRACTIONS = (0.0, 1 / 3, 2 / 3)


def manifold_contrasts(profiles: pd.DataFrame) -> dict[str, float]:
    """Mean ‖J‖ and density at the anchor bins and midway bins, per path kind.

    Returns:
        {"<path>_jacobian_anchors", "<path>_jacobian_midway", "<path>_density_anchors",
        "<path>_density_midway"} for each path kind present (means over models).
    """
    summary = profile_summary(profiles)
    n_bins = int(summary["bin"].max()) + 1
    out: dict[str, float] = {}
    for path, rows in summary.groupby("path"):
        by_bin = rows.set_index("bin")
        for where, fractions in (("anchors", _ANCHOR_FRACTIONS), ("midway", _MIDWAY_FRACTIONS)):
            bins = [round(f * n_bins) % n_bins for f in fractions]
            out[f"{path}_jacobian_{where}"] = float(by_bin.loc[bins, "jacobian_mean"].mean())
            out[f"{path}_density_{where}"] = float(by_bin.loc[bins, "density_mean"].mean())
    return out


def boundary_contrast(table: pd.DataFrame) -> dict[str, float]:
    """Median over (run, plane) of near-points / elsewhere boundary density, per stage."""
    return {
        stage: float(rows["ratio"].median()) for stage, rows in table.groupby("stage", sort=True)
    }


def geometry_sections(
    profiles: pd.DataFrame,
    maps_by_run: Mapping[str, Mapping[str, torch.Tensor]],
    save: Callable[[str, Figure], None],
) -> list[str]:
    """HTML for the Fig. 2 and Fig. 3 sections (empty when the study measured neither)."""
    parts: list[str] = []
    if len(profiles):
        save("manifold_profiles", manifold_profiles(profiles))
        parts += [
            "<h2>On and off the data manifold (Study 2)</h2>",
            figure_html("manifold_profiles", _manifold_caption(profiles)),
        ]
    if maps_by_run:
        table = boundary_table(maps_by_run)
        first = next(iter(maps_by_run))
        save("region_maps", region_maps_figure(maps_by_run[first], f"Linear regions, {first}"))
        parts += [
            "<h2>Linear regions around training points (Study 3)</h2>",
            figure_html("region_maps", _regions_caption(table, len(maps_by_run))),
        ]
    return parts


def _manifold_caption(profiles: pd.DataFrame) -> str:
    c = manifold_contrasts(profiles)
    text = (
        "Paper Fig. 2: sensitivity is orders of magnitude higher off the data (random "
        "ellipse) than on it, and dips at the training points. "
    )
    if "random_jacobian_midway" in c and "different_class_jacobian_anchors" in c:
        off = c["random_jacobian_midway"] / c["different_class_jacobian_anchors"]
        dip = c["different_class_jacobian_midway"] / c["different_class_jacobian_anchors"]
        holds = off > 10 and dip > 1
        text += (
            f"Measured: random-ellipse ‖J‖ is {off:.3g}× the ‖J‖ at the training points; on "
            f"the different-class ellipse, midway ‖J‖ is {dip:.3g}× that at the points"
        )
        density = c.get("different_class_density_midway", float("nan"))
        anchors = c.get("different_class_density_anchors", float("nan"))
        if density == density and anchors > 0:
            text += f"; transition density midway / at points = {density / anchors:.3g}"
        text += f". {'Holds' if holds else 'Does not hold'} here."
    return text


def _regions_caption(table: pd.DataFrame, n_runs: int) -> str:
    ratio = boundary_contrast(table)
    return (
        "Paper Fig. 3: after training, the training points sit in regions of low boundary "
        "density. Shown: the first model's planes. Measured over "
        f"{n_runs} model(s): boundary density near the points / elsewhere, median "
        f"{ratio.get('init', float('nan')):.3g} at initialisation and "
        f"{ratio.get('trained', float('nan')):.3g} after training "
        f"({'holds' if ratio.get('trained', 1.0) < 1.0 else 'does not hold'} here)."
    )
