"""Labelled sets: reading labels.parquet, clear errors, the Dataset and its preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.classes import CLASSES
from pipeline.config import dump_yaml, load_station
from pipeline.errors import InputError
from pipeline.imageio import write_frame
from pipeline.labelled import LabelledSet, ToModelInput, load_labelled, open_labelled

SIZE = 64


def pattern_frame(label: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A raw 16-bit frame whose class is an obvious, rotation-invariant brightness pattern.

    Not the synthetic sky (pipeline.synth) but a set any working training loop separates within
    a few optimiser steps: a ring, a bright disc, spokes, a dark sky.
    """
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    r = np.hypot(yy, xx)
    img = rng.normal(300, 20, (size, size))
    shape = {
        "arc": np.abs(r - 0.3) < 0.04,
        "drapery": r < 0.4,
        "radial": np.cos(8 * np.arctan2(yy, xx) + rng.uniform(0, 6.3)) > 0.6,
        "hotspot": np.zeros_like(r, dtype=bool),
    }[label]
    img = img + shape * rng.uniform(2000, 3000)
    return np.clip(img, 0, 65535).astype(np.uint16)


def write_pattern_set(root: Path, per_class: int, seed: int = 0, size: int = SIZE) -> Path:
    """ROOT/<class>/<name>.png + labels.parquet + calib/ (station scaled to SIZE, two darks)."""
    rng = np.random.default_rng(seed)
    rows = []
    t0 = pd.Timestamp("2003-12-01T06:00:00Z")
    for c in CLASSES:
        for i in range(per_class):
            t = t0 + pd.Timedelta(days=int(rng.integers(0, 40)), seconds=10 * i)
            rel = f"{c}/N{t:%Y%m%dG%H%M%S}_{i}.png"
            (root / c).mkdir(parents=True, exist_ok=True)
            write_frame(root / rel, pattern_frame(c, rng, size))
            rows.append({"path": rel, "label": c, "time_utc": t, "winter": 2003})
    pd.DataFrame(rows).to_parquet(root / "labels.parquet")
    (root / "calib").mkdir(exist_ok=True)
    dump_yaml(load_station("yrs").scaled(size), root / "calib" / "station.yaml")
    write_frame(root / "calib" / "dark_20031201.png", np.full((size, size), 100, np.uint16))
    write_frame(root / "calib" / "dark_20031220.png", np.full((size, size), 200, np.uint16))
    return root


@pytest.fixture(scope="module")
def pattern_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pattern_set(tmp_path_factory.mktemp("pattern"), per_class=4)


def test_load_labelled_columns_and_absolute_paths(pattern_set):
    df = load_labelled(pattern_set)
    assert list(df.columns) == ["path", "label", "time_utc", "winter", "frame"]
    assert len(df) == 16
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert set(df["label"]) == set(CLASSES)
    assert str(df["time_utc"].dt.tz) == "UTC"
    assert (df["winter"] == 2003).all()


def test_unknown_class_names_file_and_allowed(tmp_path, pattern_set):
    df = pd.read_parquet(pattern_set / "labels.parquet")
    df.loc[3, "label"] = "corona"
    bad = tmp_path / "bad"
    bad.mkdir()
    df.to_parquet(bad / "labels.parquet")
    with pytest.raises(InputError) as err:
        load_labelled(bad)
    msg = str(err.value)
    assert str(bad / "labels.parquet") in msg
    assert "'corona'" in msg and "allowed classes: arc, drapery, radial, hotspot" in msg


def test_missing_table_column_and_frames(tmp_path, pattern_set):
    with pytest.raises(InputError, match="labels.parquet not found"):
        load_labelled(tmp_path)
    pd.DataFrame({"path": ["a.png"]}).to_parquet(tmp_path / "labels.parquet")
    with pytest.raises(InputError, match="missing column 'label'"):
        load_labelled(tmp_path)
    pd.DataFrame({"path": ["arc/nope.png"], "label": ["arc"]}).to_parquet(
        tmp_path / "labels.parquet"
    )
    with pytest.raises(InputError, match="1 listed frames do not exist.*nope.png"):
        load_labelled(tmp_path)


def test_frames_listed_twice_are_refused(tmp_path, pattern_set):
    """A repeated row would count twice (and could be in train and val); two labels clash."""
    import shutil

    df = pd.read_parquet(pattern_set / "labels.parquet")
    twice = tmp_path / "twice"
    shutil.copytree(pattern_set, twice)
    pd.concat([df, df.iloc[:2]]).to_parquet(twice / "labels.parquet")
    with pytest.raises(InputError, match=r"2 frames are listed more than once \(first"):
        load_labelled(twice)
    other = df.iloc[:1].copy()
    other["label"] = "radial" if other["label"].iloc[0] != "radial" else "arc"
    pd.concat([df, other]).to_parquet(twice / "labels.parquet")
    with pytest.raises(InputError, match="1 frames are listed more than once, 1 of them with"):
        load_labelled(twice)


def test_winter_derived_when_absent(tmp_path, pattern_set):
    df = pd.read_parquet(pattern_set / "labels.parquet").drop(columns=["winter"])
    df["path"] = [str(pattern_set / p) for p in df["path"]]  # absolute paths are kept
    df.loc[0, "time_utc"] = pd.Timestamp("2004-01-15T08:00:00Z")
    df.to_parquet(tmp_path / "labels.parquet")
    out = load_labelled(tmp_path)
    assert (out["winter"] == 2003).all()


def test_dataset_preprocesses_raw_frames_with_dated_darks(pattern_set):
    ds = open_labelled(pattern_set)
    st = ds.pre.station
    assert st.raw_size == SIZE  # the set's own calib/station.yaml, not the 512 px yrs
    img, y = ds[0]
    assert img.shape == (st.crop_size, st.crop_size) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert y == CLASSES.index(ds.df.loc[0, "label"])
    # the dark frame is the latest one dated on or before the frame's date
    early = ds.pre.calibration(pd.Timestamp("2003-12-10T00:00:00Z"))
    late = ds.pre.calibration(pd.Timestamp("2004-01-02T00:00:00Z"))
    assert early.dark is not None and late.dark is not None
    assert early.dark.max() == 100 and late.dark.max() == 200


def test_preprocessed_frames_pass_through(tmp_path, pattern_set):
    ds = open_labelled(pattern_set)
    crop = ds.pre.station.crop_size
    (tmp_path / "arc").mkdir()
    pre = (np.linspace(0, 1, crop * crop).reshape(crop, crop) * 255).astype(np.uint8)
    write_frame(tmp_path / "arc" / "a.png", pre)
    pd.DataFrame({"path": ["arc/a.png"], "label": ["arc"]}).to_parquet(tmp_path / "labels.parquet")
    pset = LabelledSet(load_labelled(tmp_path), ds.pre.station)
    img, _ = pset[0]
    assert img.shape == (crop, crop)
    assert img.max() == pytest.approx(1.0, abs=1e-6)  # 255 / 255: 1 exactly in any float


def test_collate_gives_model_input(pattern_set):
    ds = open_labelled(pattern_set, cache=True)
    x, y = ToModelInput(64)([ds[0], ds[5], ds[9]])
    assert tuple(x.shape) == (3, 1, 64, 64) and x.dtype.is_floating_point
    assert y.tolist() == [int(ds.targets[i]) for i in (0, 5, 9)]
    assert 0 in ds._cache  # cached for the next epoch


def test_station_of_a_set_given_then_its_own_then_the_fallback(
    tmp_path, pattern_set, tiny_station_path
):
    from pipeline.config import resolve_station

    assert resolve_station(None, pattern_set, "yrs").raw_size == SIZE  # calib/station.yaml
    assert resolve_station("yrs", pattern_set).raw_size == 512  # an explicit --station wins
    assert resolve_station(None, tmp_path).raw_size == 512  # default: yrs
    assert resolve_station(None, tmp_path, tiny_station_path).raw_size == 64  # config's station
    assert resolve_station(tiny_station_path, tmp_path).raw_size == 64  # --station as a path


def test_read_labels_table_is_the_raw_table(tmp_path):
    from pipeline.labelled import read_labels_table

    table = pd.DataFrame({"path": ["b.png", "a.png"], "extra": [1, 2]}, index=[5, 9])
    table.to_parquet(tmp_path / "labels.parquet")
    got = read_labels_table(tmp_path)
    assert list(got.index) == [0, 1] and list(got["path"]) == ["b.png", "a.png"]
    with pytest.raises(InputError, match="missing column 'label'"):
        read_labels_table(tmp_path, required=("path", "label"))
    (tmp_path / "labels.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot read as Parquet"):
        read_labels_table(tmp_path)


def test_winter_of_a_time_and_of_a_series():
    from pipeline.winter import winter_of

    assert winter_of("2003-12-21T06:00") == 2003 and winter_of("2004-01-05") == 2003
    assert winter_of(pd.Timestamp("2004-07-01", tz="UTC")) == 2004
    times = pd.Series(pd.to_datetime(["2003-12-21", "2004-02-01", "2004-09-01"], utc=True))
    got = winter_of(times)
    assert str(got.dtype) == "Int64" and got.tolist() == [2003, 2003, 2004]
