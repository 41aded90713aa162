"""Synthetic YRS archive: determinism, geometry, class balance, timelines, layout, realism."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import terminal_popen
from PIL import Image

from pipeline import synth
from pipeline.classes import ASI8K_COUNTS, CLASSES
from pipeline.cli import main
from pipeline.config import load_station
from pipeline.errors import InputError
from pipeline.synth import geometry, render, timeline, writer

SIZE = 64


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_labelled")
    synth.make_labelled(out, n=24, seed=3, winter=2003, size=SIZE, workers=1)
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_archive")
    synth.make_archive(out, n=30, seed=4, winters=(2004, 2005), size=SIZE, workers=1)
    return out


# ------------------------------------------------------------------ determinism
def test_render_is_deterministic_per_seed():
    a = synth.render_frame("drapery", synth.frame_rng(1, 5), SIZE)
    b = synth.render_frame("drapery", synth.frame_rng(1, 5), SIZE)
    c = synth.render_frame("drapery", synth.frame_rng(2, 5), SIZE)
    assert a.dtype == np.uint16 and a.shape == (SIZE, SIZE)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_worker_count_does_not_change_bytes(labelled, tmp_path):
    synth.make_labelled(tmp_path, n=24, seed=3, winter=2003, size=SIZE, workers=2)
    one = sorted(p.relative_to(labelled) for p in labelled.rglob("*.png"))
    two = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert one == two and len(one) == 24 + 1  # frames + the season's dark frame
    for rel in one:
        assert (labelled / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    pd.testing.assert_frame_equal(
        pd.read_parquet(labelled / "labels.parquet"), pd.read_parquet(tmp_path / "labels.parquet")
    )


# ------------------------------------------------------------------ geometry and camera
def test_outside_fov_is_dark_and_dark_frame_subtracts_to_zero(labelled):
    st = load_station("yrs").scaled(SIZE)
    radius = synth.FOV_RADIUS_512 * SIZE / 512
    yy, xx = np.mgrid[:SIZE, :SIZE]
    r = np.hypot(yy - st.optical_centre[0], xx - st.optical_centre[1])
    outside, inside = r > radius + 1.5, r < 0.8 * radius
    assert outside.sum() > 200
    dark = _read(labelled / "calib" / "dark_20031101.png")
    assert np.array_equal(dark, synth.dark_frame(2003, SIZE))
    assert 200 < np.median(dark) < 600  # bias level of a few hundred counts
    season = synth.season_for(2003)
    for p in sorted(labelled.glob("*/N*.png"))[:6]:
        d = _read(p) - dark
        assert abs(d[outside].mean()) < 2.0
        assert d[outside].std() < 3 * season.read_noise
        assert d[inside].mean() > 200  # sky: airglow + aurora above the dark level


def test_ring_features_stay_outside_the_crop():
    g = geometry._geometry(SIZE)
    ring = render._ring(g, np.random.default_rng(0), synth.season_for(2004))
    assert np.all(ring[g.ring_rho < g.crop_rho + 0.01] == 0)
    assert ring.max() > 100


def test_seasons_drift_but_are_reproducible():
    a, b = synth.season_for(2004), synth.season_for(2007)
    assert a == synth.season_for(2004)
    assert a.gain != b.gain and a.read_noise != b.read_noise
    assert not np.array_equal(synth.dark_frame(2004, SIZE), synth.dark_frame(2007, SIZE))
    assert a.dark_name == "dark_20041101.png"


# ------------------------------------------------------------------ class balance
@pytest.mark.parametrize("n", [7, 80, 1001])
def test_class_counts_follow_asi8k_or_are_equal(n):
    counts = synth.class_counts(n)
    total = sum(ASI8K_COUNTS.values())
    assert sum(counts.values()) == n
    for c in CLASSES:
        assert abs(counts[c] - n * ASI8K_COUNTS[c] / total) < 1
    bal = synth.class_counts(n, balanced=True)
    assert sum(bal.values()) == n and max(bal.values()) - min(bal.values()) <= 1


def test_labelled_set_layout(labelled):
    labels = pd.read_parquet(labelled / "labels.parquet")
    assert list(labels.columns) == ["path", "label", "time_utc", "winter"]
    assert str(labels["time_utc"].dt.tz) == "UTC"
    assert labels["path"].is_unique
    counts = labels["label"].value_counts().to_dict()
    assert counts == {c: k for c, k in synth.class_counts(24).items() if k}
    for rel, lab, t in zip(labels["path"], labels["label"], labels["time_utc"]):
        p = labelled / rel
        assert p.parent.name == lab and p.is_file()
        name_time = datetime.strptime(p.stem, "N%Y%m%dG%H%M%S").replace(tzinfo=timezone.utc)
        assert name_time == t.to_pydatetime()
        assert 3 <= t.hour < 15 and t.month in (12, 1, 2)
        assert synth.winter_of(t) == 2003
    assert (labelled / "calib" / "station.yaml").is_file()
    assert load_station(labelled / "calib" / "station.yaml").raw_size == SIZE


# ------------------------------------------------------------------ archives
def test_archive_layout_and_names(archive):
    truth = pd.read_parquet(archive / "truth.parquet")
    assert list(truth.columns) == ["path", "time_utc", "label"]
    assert len(truth) == 30 and truth["path"].is_unique
    assert truth["time_utc"].is_monotonic_increasing
    pattern = load_station("yrs").filename_pattern
    for rel, t in zip(truth["path"], truth["time_utc"]):
        assert re.fullmatch(r"\d{4}/\d{8}/N\d{8}G\d{6}\.png", rel), rel
        stem = Path(rel).stem
        assert datetime.strptime(stem, pattern).replace(tzinfo=timezone.utc) == t
        assert rel.startswith(f"{t:%Y}/{t:%Y%m%d}/")
        assert (archive / rel).is_file()
        assert _read(archive / rel).shape == (SIZE, SIZE)
    darks = sorted(p.name for p in (archive / "calib").glob("dark_*.png"))
    assert darks == ["dark_20041101.png", "dark_20051101.png"]


def test_archive_follows_the_real_timeline(shared_data, tmp_path):
    path = shared_data / "yrs_labels" / "Alllabel2003_38044.txt"
    tl = synth.read_timeline(path)
    assert len(tl) == 38044
    plan = synth.archive_plan(500, timeline=tl, winters=(2003, 2005))
    assert len(plan) == 500 and plan["path"].is_unique
    # every frame is a real labelled frame (shifted by whole years) and keeps its label
    lookup = dict(zip(tl["time_utc"], tl["label"]))
    for t, lab, w in zip(plan["time_utc"], plan["label"], plan["winter"]):
        assert lookup[t - pd.DateOffset(years=w - 2003)] == lab
    # evenly strided in time order: both winters, the real day structure, real class shares
    assert plan["winter"].value_counts().to_dict() == {2003: 250, 2005: 250}
    assert plan["time_utc"].dt.hour.between(3, 14).all()
    real = tl["label"].value_counts(normalize=True)
    got = plan["label"].value_counts(normalize=True)
    for c in CLASSES:
        assert abs(real[c] - got[c]) < 0.05
    # and the rendered archive's truth is that plan
    truth = synth.make_archive(tmp_path, n=12, seed=0, timeline=path, winters=(2004,), size=32)
    plan12 = synth.archive_plan(12, timeline=tl, winters=(2004,))
    assert truth["label"].tolist() == plan12["label"].tolist()
    assert truth["path"].tolist() == plan12["path"].tolist()


def test_archive_larger_than_the_timeline_uses_day_shifted_copies(shared_data):
    tl = synth.read_timeline(shared_data / "yrs_labels" / "Alllabel2003_38044.txt")
    plan = synth.archive_plan(60000, timeline=tl, winters=(2004,))
    assert len(plan) == 60000 and plan["path"].is_unique
    assert plan["time_utc"].dt.month.isin([11, 12, 1, 2]).all()
    # a copy shifted by whole 29-day blocks keeps the real class sequence
    lookup = dict(zip(tl["time_utc"], tl["label"]))
    for t, lab in zip(plan["time_utc"][::997], plan["label"][::997]):
        t0 = t - pd.DateOffset(years=1)
        hits = [lookup.get(t0 - pd.Timedelta(days=k * 29)) for k in (0, 1, -1)]
        assert lab in hits
    with pytest.raises(InputError, match="exceeds"):
        synth.archive_plan(4 * len(tl), timeline=tl, winters=(2004,))


def test_archive_without_timeline_follows_the_occurrence_model():
    model = synth.load_occurrence_model()
    plan = synth.archive_plan(20000, seed=1, winters=(2004, 2005))
    assert len(plan) == 20000 and plan["path"].is_unique
    mlt = (plan["time_utc"].dt.hour + 3) % 24
    counts = mlt.value_counts(normalize=True)
    expected = model.set_index("mlt_hour")["n_frames"]
    expected = expected / expected.sum()
    for h, share in expected.items():
        assert abs(counts.get(h, 0.0) - share) < 0.03, h
        sel = plan["label"][mlt == h].value_counts(normalize=True)
        for c in CLASSES:
            assert abs(sel.get(c, 0.0) - model.set_index("mlt_hour").loc[h, f"share_{c}"]) < 0.12


def test_occurrence_model_is_derived_from_the_labels(shared_data):
    derived = synth.derive_occurrence_model(shared_data / "yrs_labels" / "Alllabel2003_38044.txt")
    committed = synth.load_occurrence_model()
    pd.testing.assert_frame_equal(derived, committed, check_dtype=False)
    assert committed["n_frames"].sum() == 38044


def test_too_many_frames_for_the_timeline_is_a_clear_error():
    tl = pd.DataFrame(
        {"time_utc": pd.to_datetime(["2003-12-21 03:00:01"], utc=True), "label": ["arc"]}
    )
    with pytest.raises(InputError, match="exceeds"):
        synth.archive_plan(5, timeline=tl, winters=(2004,))


def test_same_second_frames_get_unique_names():
    t = pd.Series(pd.to_datetime(["2004-01-01 03:00:01"] * 3 + ["2004-01-01 03:00:02"], utc=True))
    out = timeline._dedupe_seconds(t)
    assert out.is_unique
    assert (out - t).max() <= pd.Timedelta(seconds=3)


def test_frames_at_class_changes_know_the_neighbouring_class():
    t = pd.Series(
        pd.to_datetime(
            [
                "2004-01-01 03:00:01",
                "2004-01-01 03:00:11",
                "2004-01-01 03:00:21",
                "2004-01-01 09:00:01",
                "2004-01-01 09:00:11",
            ],
            utc=True,
        )
    )
    lab = pd.Series(["arc", "arc", "drapery", "radial", "radial"])
    assert timeline._transitions(t, lab).tolist() == ["", "drapery", "arc", "", ""]


def test_bad_timeline_names_the_line(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("N20031221G030001  1\nN2003122XG030011  2\n")
    with pytest.raises(InputError, match="line 2"):
        synth.read_timeline(p)


# ------------------------------------------------------------------ CLI
def test_parse_winters():
    assert synth.parse_winters("2004-2009") == (2004, 2005, 2006, 2007, 2008, 2009)
    assert synth.parse_winters("2004,2006") == (2004, 2006)
    for bad in ("20x4", "2009-2004", "", "3000"):
        with pytest.raises(InputError):
            synth.parse_winters(bad)


def test_cli_archive_and_bad_winters(tmp_path, capsys):
    main(["synth", "archive", str(tmp_path / "a"), "--n", "4", "--size", "32", "--winters", "2006"])
    assert str(tmp_path / "a") in capsys.readouterr().out
    assert len(list((tmp_path / "a").rglob("N*.png"))) == 4
    with pytest.raises(SystemExit) as exc:
        main(["synth", "archive", str(tmp_path / "b"), "--n", "4", "--winters", "20x4"])
    assert exc.value.code == 2
    assert "--winters" in capsys.readouterr().err


# ------------------------------------------------------------------ realism
def _shape_features(a: np.ndarray, crop: np.ndarray, er: tuple[np.ndarray, np.ndarray]) -> list:
    """Four brightness-free texture/shape numbers: gradient coherence, share of gradients across
    the radial direction (rays), energy concentration, curvature per gradient."""
    a = np.where(crop, a, 0.0)
    gy, gx = np.gradient(a)
    gr = (gx * er[1] + gy * er[0])[crop]
    gt = (-gx * er[0] + gy * er[1])[crop]
    jxx, jyy, jxy = (gx * gx)[crop].mean(), (gy * gy)[crop].mean(), (gx * gy)[crop].mean()
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy)
    across = (gt**2).mean() / ((gr**2).mean() + (gt**2).mean())
    v = a[crop] - np.median(a[crop])
    conc = np.sort(v)[::-1][: v.size // 20].sum() / np.abs(v).sum()
    curv = np.abs(np.diff(a, 2, 0))[crop[1:-1]].mean() / np.abs(gy[crop]).mean()
    return [coherence, across, conc, curv]


def _nearest_class_mean(x: np.ndarray, y: np.ndarray) -> float:
    train = (np.arange(len(y)) // 4) % 2 == 0  # half of every class
    mu, sd = x[train].mean(0), x[train].std(0)
    z = (x - mu) / sd
    centres = np.array([z[train & (y == k)].mean(0) for k in range(4)])
    pred = ((z[~train, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    return float((pred == y[~train]).mean())


def test_brightness_alone_does_not_separate_the_classes():
    """Nearest class mean on [mean, std] inside the crop stays far from perfect; the same
    classifier on four crude brightness-free shape features does clearly better."""
    season = synth.season_for(2003)
    g = geometry._geometry(SIZE)
    dark = synth.dark_frame(2003, SIZE).astype(np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    dy, dx = yy - g.centre[0], xx - g.centre[1]
    r = np.maximum(np.hypot(dy, dx), 1e-6)
    crop = r < g.radius * g.crop_rho
    stats, shape, ys = [], [], []
    for i in range(200):
        k = i % 4
        raw = synth.render_frame(CLASSES[k], synth.frame_rng(11, i), SIZE, season)
        a = raw.astype(np.float32) - dark
        stats.append([a[crop].mean(), a[crop].std()])
        shape.append(_shape_features(a, crop, (dy / r, dx / r)))
        ys.append(k)
    y = np.array(ys)
    acc_stats = _nearest_class_mean(np.array(stats), y)
    acc_shape = _nearest_class_mean(np.array(shape), y)
    assert 0.15 < acc_stats < 0.6, acc_stats
    assert acc_shape > acc_stats + 0.08, (acc_shape, acc_stats)


@pytest.fixture(scope="module")
def crop_counts() -> list[np.ndarray]:
    """Counts above the dark frame inside the crop of 48 frames rendered once: each class at
    every hour 03:30-14:30 UT of 2003-12-21, the day of the real frames (the sky's levels
    follow the hour: diffuse aurora, twilight)."""
    season = synth.season_for(2003)
    dark = synth.dark_frame(2003, SIZE).astype(np.float32)
    g = geometry._geometry(SIZE)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    crop = np.hypot(yy - g.centre[0], xx - g.centre[1]) < g.radius * g.crop_rho
    t0 = pd.Timestamp("2003-12-21 03:30", tz="UTC")
    frames = (
        synth.render_frame(
            CLASSES[i % 4],
            synth.frame_rng(12, i),
            SIZE,
            season,
            time=t0 + pd.Timedelta(hours=i // 4),
        )
        for i in range(48)
    )
    return [(raw - dark)[crop] for raw in frames]


def test_signal_levels_suit_the_4000_count_stretch(crop_counts):
    p99 = np.array([np.percentile(c, 99) for c in crop_counts])
    assert 1000 < np.median(p99) < 5000
    assert np.mean(p99 > 4000) < 0.3  # only a minority saturates the stretch


def test_sky_background_is_as_dark_as_the_real_frames_under_the_pipeline_stretch(crop_counts):
    """Real YRS frames of 2003-12-21 put their 10th-percentile pixel at 17-27 of 255 under the
    archive's stretch; the renderer before the calibration of issue #15 put it near 35 here."""
    p10 = np.array([np.percentile(c, 10) for c in crop_counts]) * 255 / 4000  # 0..4000 stretch
    assert 15 < np.median(p10) < 31, np.median(p10)


def _sky_p10(hour_utc: int, n: int = 8) -> float:
    """Median 10th-percentile counts above the dark frame inside the crop of ``n`` arc frames
    rendered on 2003-12-21 at ``hour_utc``:30 (the dark sky between the forms)."""
    season = synth.season_for(2003)
    dark = synth.dark_frame(2003, SIZE).astype(np.float32)
    g = geometry._geometry(SIZE)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    crop = np.hypot(yy - g.centre[0], xx - g.centre[1]) < g.radius * g.crop_rho
    t = pd.Timestamp(f"2003-12-21 {hour_utc:02d}:30", tz="UTC")
    frames = (
        synth.render_frame("arc", synth.frame_rng(13, i), SIZE, season, time=t, secondary=False)
        for i in range(n)
    )
    return float(np.median([np.percentile((raw - dark)[crop], 10) for raw in frames]))


def test_diffuse_glow_dims_around_magnetic_noon():
    """The real frames of 2003-12-21 (labelled and unlabelled) are darkest between the forms
    at 08-10 UT (MLT 11-13), at half the level of the morning and the afternoon: the dayside
    diffuse aurora's midday gap. The renderer's diffuse glow follows it."""
    noon = _sky_p10(9)
    assert noon < 0.7 * _sky_p10(3), noon
    assert noon < 0.7 * _sky_p10(14), noon


def test_sun_elevation_at_yrs_follows_the_solstice_geometry():
    """At the December solstice the sun at YRS (78.92 N) peaks at 90 - 78.92 - 23.44 = -12.36
    deg near 11:10 UT and bottoms out at 78.92 - 23.44 - 90 = -34.52 deg (the low-precision
    ephemeris is good to about 0.02 deg; refraction is ignored)."""
    day = pd.date_range("2003-12-22 00:00", periods=24 * 60, freq="min", tz="UTC")
    el = geometry.sun_elevation_deg(day.as_unit("ns").asi8)
    assert el.max() == pytest.approx(-12.36, abs=0.1)
    assert el.min() == pytest.approx(-34.52, abs=0.1)
    assert day[int(el.argmax())].hour == 11


def test_labelled_sets_hold_no_frames_washed_out_by_twilight():
    """Experts label frames they can read: no labelled frame is drawn while the sun is above
    LABELLED_SUN_MAX_DEG (late February's noon is near 0 deg at YRS), yet noon hours are still
    sampled (on darker days) and every month of the season appears."""
    plan = timeline.labelled_plan(2000, seed=3)
    t = plan["time_utc"]
    el = geometry.sun_elevation_deg(t.dt.as_unit("ns").astype("int64").to_numpy())
    assert el.max() <= timeline.LABELLED_SUN_MAX_DEG
    assert t.dt.hour.between(9, 11).sum() > 100
    assert set(t.dt.month) == {12, 1, 2}


def test_camera_grain_is_spread_by_the_intensifier_at_the_photon_noise_level():
    """On a flat sky the noise keeps its per-pixel sd, sqrt(gain * signal + read_noise^2), but
    neighbouring pixels share it as in the real frames (an intensifier's phosphor spreads each
    photo-electron): the lag-1 correlation of n binomial passes, sum c_i c_(i+1) / sum c_i^2
    over the binomial(2n) coefficients (0.8 for two passes; 0 for white noise). 120^2 pixels
    hold ~1,500 independent grains: sd and correlation are good to a few %."""
    season = synth.season_for(2003)
    flat = np.full((128, 128), 1000.0, dtype=np.float32)
    raw = render._expose(flat.copy(), synth.frame_rng(21, 0), season).astype(np.float32)
    noise = (raw - flat - render._dark_f32(2003, 128))[4:-4, 4:-4]
    expected = np.sqrt(season.gain * 1000.0 + season.read_noise**2)
    assert noise.std() == pytest.approx(expected, rel=0.06)
    n = render.INTENSIFIER_BLUR_PASSES
    c = np.array([math.comb(2 * n, i) for i in range(2 * n + 1)], dtype=float)
    shot_share = season.gain * 1000.0 / expected**2  # read noise is white
    r1_expected = shot_share * (c[1:] * c[:-1]).sum() / (c * c).sum()
    r1 = np.corrcoef(noise[:, 1:].ravel(), noise[:, :-1].ravel())[0, 1]
    assert n >= 1 and r1 == pytest.approx(r1_expected, abs=0.06), (r1, r1_expected)


def _orientation_coherence(a: np.ndarray) -> float:
    """Structure-tensor coherence (0 no preferred direction, 1 all edges parallel)."""
    gy, gx = np.gradient(a)
    jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
    return float(np.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy))


def test_non_arc_frames_carry_faint_east_west_bands(monkeypatch):
    """Real frames of every class show faint bands behind the main form: with them on, the
    continuous emission of a radial corona (otherwise a round glow) gains a preferred
    direction; an arc frame draws no extra bands."""
    g = geometry._geometry(128)

    def coherence(label: str, share: float) -> list[float]:
        monkeypatch.setattr(render, "BACKGROUND_BANDS_SHARE", share)
        skies = [render._sky(g, label, synth.frame_rng(5, i), False, None) for i in range(8)]
        return [_orientation_coherence(s.sheet.reshape(g.nf, g.nf)) for s in skies]

    assert min(coherence("radial", 1.0)) > max(coherence("radial", 0.0)) + 0.1
    assert coherence("arc", 1.0) == coherence("arc", 0.0)


# ------------------------------------------------------------------ output folder
def _frames(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("N*.png") if "calib" not in p.parts)


def test_synth_refuses_a_folder_of_another_synth_run(tmp_path, capsys):
    """--n 10 on an 80-frame set would leave 91 PNGs and a 10-row table: refused, untouched."""
    out = tmp_path / "train"
    synth.make_labelled(out, n=8, seed=0, size=32)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(InputError) as err:
        synth.make_labelled(out, n=4, seed=0, size=32)
    assert str(err.value) == (
        f"{out} is not empty (8 frames and labels.parquet from an earlier synth with n=8 "
        "(now 4)); choose another folder, --overwrite to replace it or delete it"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    arch = tmp_path / "arch"
    main(["synth", "archive", str(arch), "--n", "6", "--size", "32"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["synth", "archive", str(arch), "--n", "3", "--size", "32"])
    assert exc.value.code == 1
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1 and "Traceback" not in msg
    assert f"{arch} is not empty (6 frames and truth.parquet" in msg
    assert msg.endswith("choose another folder, --overwrite to replace it or delete it")
    assert len(_frames(arch)) == 6 and len(pd.read_parquet(arch / "truth.parquet")) == 6
    main(["synth", "archive", str(arch), "--n", "3", "--size", "32", "--overwrite"])
    assert len(_frames(arch)) == 3 and len(pd.read_parquet(arch / "truth.parquet")) == 3


def test_synth_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"is not empty \(1 entry: notes\.txt; no _run\.json\)"):
        synth.make_archive(tmp_path, n=2, size=32)
    with pytest.raises(InputError, match="no _run.json"):  # --overwrite never deletes these
        synth.make_archive(tmp_path, n=2, size=32, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_identical_rerun_keeps_the_set_and_an_interrupted_one_is_finished(tmp_path, monkeypatch):
    """What `aurora-pipeline run workflows/demo.yaml` relies on after a failed synth stage."""
    out = tmp_path / "set"
    first = synth.make_labelled(out, n=6, seed=2, size=32)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = synth.make_labelled(out, n=6, seed=2, size=32, workers=2)  # workers: same output
    pd.testing.assert_frame_equal(again, first)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp

    # Killed while rendering: _run.json already says what the folder is, and "not finished".
    arch = tmp_path / "arch"

    def killed(out_, plan, *a, **k):
        first = (0, plan["label"][0], plan["path"][0], plan["time_utc"][0].value, "")
        writer._render_chunk(str(out_), 32, 4, [first])  # one frame written, then Ctrl-C
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(writer, "_render_all", killed)
        with pytest.raises(KeyboardInterrupt):
            synth.make_archive(arch, n=5, seed=4, size=32)
    assert json.loads((arch / "_run.json").read_text())["finished"] is False
    assert not (arch / "truth.parquet").exists()
    (kept,) = _frames(arch)
    kept_stamp = kept.stat().st_mtime_ns
    truth = synth.make_archive(arch, n=5, seed=4, size=32)
    assert len(_frames(arch)) == 5 and len(truth) == 5
    assert kept.stat().st_mtime_ns == kept_stamp, "the frame already rendered was rendered again"
    assert json.loads((arch / "_run.json").read_text())["finished"] is True
    fresh = tmp_path / "fresh"
    synth.make_archive(fresh, n=5, seed=4, size=32)
    for rel in truth["path"]:
        assert (arch / rel).read_bytes() == (fresh / rel).read_bytes()


@pytest.mark.parametrize(
    "plant",
    [
        lambda d: (d / "_run.json").write_text(json.dumps({"command": "train", "finished": True})),
        lambda d: (d / "model.safetensors").write_bytes(b"weights"),
    ],
)
def test_synth_refuses_a_folder_of_another_stage(tmp_path, plant):
    out = tmp_path / "ckpt"
    out.mkdir()
    plant(out)
    before = {p: p.read_bytes() for p in out.iterdir()}
    for overwrite in (False, True):  # --overwrite never deletes another stage's output
        with pytest.raises(InputError, match=re.escape(str(out))):
            synth.make_archive(out, n=2, size=32, overwrite=overwrite)
        with pytest.raises(InputError, match=re.escape(str(out))):
            synth.make_labelled(out, n=2, size=32, overwrite=overwrite)
    assert {p: p.read_bytes() for p in out.iterdir()} == before


def test_the_run_record_says_what_made_the_folder(labelled):
    record = json.loads((labelled / "_run.json").read_text())
    assert record["command"] == "synth" and record["finished"] is True
    assert (record["kind"], record["n"], record["seed"], record["winter"]) == (
        "labelled",
        24,
        3,
        2003,
    )
    assert record["seasons"]["2003"]["gain"] == synth.season_for(2003).gain
    assert not (labelled / "synth.json").exists()


def test_an_interrupted_synth_never_claims_to_have_finished(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    fresh = tmp_path / "fresh"
    with monkeypatch.context() as m:
        m.setattr(writer, "_write_calib", interrupted)
        with pytest.raises(KeyboardInterrupt):
            synth.make_archive(fresh, n=3, seed=1, size=32)
    assert not fresh.exists()  # nothing written: the folder it created is gone
    done = tmp_path / "done"
    synth.make_archive(done, n=3, seed=1, size=32)
    with monkeypatch.context() as m:
        m.setattr(writer, "_render_all", interrupted)
        with pytest.raises(KeyboardInterrupt):
            synth.make_archive(done, n=4, seed=1, size=32, overwrite=True)
    assert json.loads((done / "_run.json").read_text())["finished"] is False
    assert not (done / "truth.parquet").exists()


@pytest.mark.parametrize("size", [100000, 8192, 16])
def test_size_out_of_range_is_a_clear_error(tmp_path, size):
    with pytest.raises(InputError, match=rf"--size must be within 32\.\.4096 pixels.*got {size}"):
        synth.make_archive(tmp_path / "x", n=1, size=size)
    assert not (tmp_path / "x").exists()


def test_ctrl_c_stops_a_parallel_synth_promptly(tmp_path):
    """Ctrl-C drops the queued chunks: no waiting for thousands of frames, no worker tracebacks."""
    out = tmp_path / "arch"
    cmd = [sys.executable, "-m", "pipeline", "synth", "archive", str(out), "--n", "20000",
           "--size", "64", "--workers", "2"]  # fmt: skip
    proc = terminal_popen(cmd)
    deadline = time.monotonic() + 60
    while not list(out.rglob("N*.png")) and time.monotonic() < deadline:
        time.sleep(0.2)  # rendering has started
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    _, err = proc.communicate(timeout=120)  # a generous wait, not a timing assertion
    assert proc.returncode == 130
    # Promptly = without draining the queue: the count of frames says so, not the (load-
    # dependent) clock; only the few chunks in flight (4 x 32 frames) finish after Ctrl-C.
    assert b"Traceback" not in err and len(list(out.rglob("N*.png"))) < 20000
