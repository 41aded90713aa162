"""The occurrence figure (paper Fig. 7): five panels, regions, low-count bins, bands."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from pipeline.classes import CLASSES
from pipeline.errors import ConfigError
from pipeline.occurrence import occurrence_table
from pipeline.plots import (
    LOW_COUNT_COLOUR,
    Region,
    RegionsConfig,
    load_regions,
    plot_occurrence,
    save_figure,
)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 4000
    mlt = np.concatenate([rng.uniform(6, 17.5, n), [17.6]])  # 17.55-17.60 holds one frame
    df = pd.DataFrame({"mlt": mlt, "label": rng.choice(CLASSES, n + 1)})
    conf = np.eye(4) * 90 + 10 / 3
    return occurrence_table(df, bins="3min", ci=True, confusion=conf)


def test_figure_has_five_panels_and_is_written(tmp_path, table):
    fig = plot_occurrence(table, min_frames=5)
    assert len(fig.axes) == 5
    ax = fig.axes[-1]
    assert ax.get_xlim() == (6.0, 18.0)
    assert [t for t in ax.get_xticks() if 6 <= t <= 18] == list(np.arange(6.0, 19.0))
    for ext in ("png", "pdf"):
        out = save_figure(fig, tmp_path / f"occ.{ext}")
        assert out.stat().st_size > 1000
    assert not list(tmp_path.glob("*.part"))


def test_low_count_bins_are_grey(table):
    fig = plot_occurrence(table, min_frames=5)
    low = np.flatnonzero(table["n_frames"].to_numpy() < 5)
    assert len(low) > 0
    bars = fig.axes[1].patches
    assert to_hex(bars[low[0]].get_facecolor()) == LOW_COUNT_COLOUR
    full = np.flatnonzero(table["n_frames"].to_numpy() >= 5)[0]
    assert to_hex(bars[full].get_facecolor()) != LOW_COUNT_COLOUR


def test_regions_are_drawn_as_dashed_lines_with_names(table):
    regions = RegionsConfig(
        regions=(Region("X", "one", 8.0, 10.0), Region("Y", "two", 10.0, 13.0)),
        minor_boundaries=(11.5,),
    )
    fig = plot_occurrence(table, regions)
    xs = sorted(
        round(line.get_xdata()[0], 3) for line in fig.axes[2].lines if line.get_linestyle() == "--"
    )
    assert xs == [8.0, 10.0, 11.5, 13.0]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "X" in texts and "Y" in texts


def test_default_regions_file_loads_and_is_marked_approximate():
    regions = load_regions()
    assert len(regions.regions) == 4 and not regions.verified
    assert all(6 <= r.start < r.end <= 18 for r in regions.regions)


def test_bad_regions_file_is_a_config_error(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("regions:\n  - {label: G, name: x, start: 12, end: 9}\n")
    with pytest.raises(ConfigError, match="start < end"):
        load_regions(bad)


def test_grouped_table_is_refused(table):
    with pytest.raises(ValueError, match="ungrouped"):
        plot_occurrence(table.assign(winter=2003))


def test_a_range_across_midnight_is_drawn_on_one_axis():
    """22-26 MLT: bars continue past 24 (ticks 22 ... 00 ... 02) and regions repeat after 24."""
    rng = np.random.default_rng(1)
    mlt = np.concatenate([rng.uniform(22, 24, 200), rng.uniform(0, 2, 200)])
    df = pd.DataFrame({"mlt": mlt, "label": np.where(mlt < 12, "hotspot", "arc")})
    table = occurrence_table(df, bins="0.5h", mlt_range=(22, 26))
    regions = RegionsConfig(regions=(Region("M", "midnight", 0.0, 1.5),), minor_boundaries=(23.0,))
    fig = plot_occurrence(table, regions)
    ax = fig.axes[-1]
    assert ax.get_xlim() == (22.0, 26.0)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if 22 <= t.get_position()[0] <= 26]
    assert labels == ["22", "23", "00", "01", "02"]
    xs = [bar.get_x() for bar in fig.axes[0].patches]
    assert xs == [22.0, 22.5, 23.0, 23.5, 24.0, 24.5, 25.0, 25.5]
    hot = fig.axes[4].patches  # hotspot after midnight, arc before
    assert [b.get_height() for b in hot] == [0.0] * 4 + [1.0] * 4
    dashed = sorted(
        line.get_xdata()[0] for line in fig.axes[2].lines if line.get_linestyle() == "--"
    )
    assert dashed == [23.0, 24.0, 25.5]
    assert [t.get_position()[0] for t in fig.axes[0].texts if t.get_text() == "M"] == [24.75]
