"""The occurrence stage and CLI: predictions dirs, Parquet, label text files, outputs, errors."""

from __future__ import annotations

import json
import re

import bounds
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import xarray as xr

from pipeline.classes import CLASSES, LABEL_CODES
from pipeline.cli import main
from pipeline.config import load_station
from pipeline.errors import InputError
from pipeline.occurrence import occurrence_schema, wilson_interval
from pipeline.occurrence_stage import read_confusion, read_label_file, run_occurrence
from pipeline.output_folder import RUN_RECORD
from pipeline.predictions import shard_path
from pipeline.storage import PREDICTIONS_SCHEMA, read_contract, write_table


def _predictions(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = pd.Timestamp("2004-01-01 03:00", tz="UTC") + pd.to_timedelta(
        rng.integers(0, 12 * 3600, n) + 86400 * rng.integers(0, 40, n), unit="s"
    )
    df = pd.DataFrame(
        {
            "path": [f"f{i}.png" for i in range(n)],
            "frame": 0,
            "time_utc": t,
            "mlt": -1.0,  # deliberately wrong: the stage recomputes MLT from time_utc
            "label": rng.choice(CLASSES, n),
            "model_id": "m",
        }
    )
    for c in CLASSES:
        df[f"p_{c}"] = np.float32(0.25)
    return df


@pytest.fixture()
def pred_dir(tmp_path):
    """A predictions folder as classify-archive lays it out: its shards in shards/."""
    d = tmp_path / "predictions"
    df = _predictions(300)
    for i, part in enumerate(np.array_split(np.arange(len(df)), 3)):
        write_table(df.iloc[part], shard_path(d, i), PREDICTIONS_SCHEMA)
    return d, df


def test_cli_on_a_predictions_directory_writes_every_output(tmp_path, pred_dir, capsys):
    d, df = pred_dir
    out = tmp_path / "occ"
    main(["occurrence", str(d), "--bins", "0.5h", "--ci", "--by", "winter", "--out", str(out)])
    said = capsys.readouterr().out
    assert "binned 300 frames into 24 bins" in said
    for name in ("occurrence.parquet", "occurrence.nc", "occurrence.png", "occurrence.pdf"):
        assert (out / name).stat().st_size > 0
    schema = pq.read_schema(out / "occurrence.parquet")
    assert schema.remove_metadata() == occurrence_schema("winter", ci=True)
    tab = pd.read_parquet(out / "occurrence.parquet")
    assert tab["winter"].unique().tolist() == [2003]
    assert tab["n_frames"].sum() == 300  # 03-15 UT is 06-18 MLT: nothing dropped
    with xr.open_dataset(out / "occurrence.nc", engine="netcdf4") as ds:
        assert ds["ratio"].dims == ("mlt_bin", "class", "winter")
        assert int(ds["n_frames"].sum()) == 300
    info = json.loads((out / RUN_RECORD).read_text())
    assert info["command"] == "occurrence" and info["finished"] is True
    assert info["mlt_method"] == "offset" and info["n_dropped"] == 0
    assert "--by winter" in (out / "occurrence.md").read_text()


def test_out_into_the_predictions_folder_is_refused(tmp_path, pred_dir, capsys):
    d, _ = pred_dir
    (d / "_run.json").write_text(json.dumps({"command": "classify-archive"}))
    with pytest.raises(SystemExit) as ex:
        main(["occurrence", str(d), "--bins", "1h", "--out", str(d)])
    assert ex.value.code == 1 and "holds classify-archive predictions" in capsys.readouterr().err
    assert not (d / "occurrence.parquet").exists()


def test_min_prob_leaves_out_uncertain_frames(tmp_path, capsys):
    """Frames whose best class is below --min-prob are counted as uncertain, not binned."""
    df = _predictions(200, seed=2)
    sure = np.arange(200) < 150
    for c in CLASSES:  # the first 150 frames are sure of their label, the rest undecided
        df[f"p_{c}"] = np.where(sure, np.where(df["label"] == c, 0.85, 0.05), 0.25).astype("f4")
    d = tmp_path / "pred"
    for i, part in enumerate(np.array_split(np.arange(200), 2)):
        write_table(df.iloc[part], d / f"shard-{i:06d}.parquet", PREDICTIONS_SCHEMA)
    out = tmp_path / "occ"
    main(["occurrence", str(d), "--bins", "1h", "--min-prob", "0.6", "--out", str(out)])
    assert "50 below --min-prob 0.6" in capsys.readouterr().out
    tab = pd.read_parquet(out / "occurrence.parquet")
    assert tab["n_frames"].sum() == 150
    for c in CLASSES:
        assert tab[f"n_{c}"].sum() == (df.loc[sure, "label"] == c).sum()
    info = json.loads((out / RUN_RECORD).read_text())
    assert info["n_uncertain"] == 50 and info["min_prob"] == 0.6
    md = (out / "occurrence.md").read_text()
    assert "--min-prob 0.6" in md and "left out as uncertain" in md
    # a table without probabilities cannot be screened: one clear error
    labels = tmp_path / "labels.parquet"
    df[["time_utc", "label"]].to_parquet(labels)
    with pytest.raises(InputError, match="no class probabilities.*--min-prob"):
        run_occurrence(labels, tmp_path / "x", min_prob=0.6)


def test_parquet_file_and_aacgm_method(tmp_path):
    df = _predictions(200, seed=1)
    src = tmp_path / "pred.parquet"
    write_table(df, src, PREDICTIONS_SCHEMA)
    a = run_occurrence(src, tmp_path / "off", bins="1h")
    b = run_occurrence(src, tmp_path / "aacgm", bins="1h", mlt_method="aacgm")
    assert a["n_binned"] == 200 and b["mlt_method"] == "aacgm"
    # aacgm MLT runs ~0.1-0.9 h behind UT + 3 h at YRS: frames shift towards earlier bins.
    assert b["n_dropped"] > 0
    ta = pd.read_parquet(tmp_path / "off" / "occurrence.parquet")
    tb = pd.read_parquet(tmp_path / "aacgm" / "occurrence.parquet")
    mean_a = np.average(ta["mlt_start"], weights=ta["n_frames"])
    mean_b = np.average(tb["mlt_start"], weights=tb["n_frames"])
    assert mean_b < mean_a


def test_confusion_parquet_gives_corrected_ratios(tmp_path):
    src = tmp_path / "pred.parquet"
    write_table(_predictions(200, seed=2), src, PREDICTIONS_SCHEMA)
    conf = pd.DataFrame({"true": list(CLASSES)})
    for j, c in enumerate(CLASSES):
        conf[f"pred_{c}"] = [90 if i == j else 10 for i in range(4)]
    conf = conf.iloc[[2, 0, 3, 1]]  # any row order
    conf.to_parquet(tmp_path / "confusion.parquet")
    m = read_confusion(tmp_path / "confusion.parquet")
    assert m[0, 0] == 90 and m[2, 1] == 10
    run_occurrence(src, tmp_path / "out", bins="1h", correct=tmp_path / "confusion.parquet")
    tab = pd.read_parquet(tmp_path / "out" / "occurrence.parquet")
    corr = tab[[f"ratio_{c}_corrected" for c in CLASSES]].to_numpy()
    full = tab["n_frames"].to_numpy() > 0
    np.testing.assert_allclose(corr[full].sum(axis=1), 1.0)


def test_netcdf_of_ci_correct_by_winter_passes_the_cf_checker(
    tmp_path, pred_dir, cf_problems, capsys
):
    """The issue's run: `compliance-checker --test=cf:1.8` found 3 errors and 3 warnings."""
    d, _ = pred_dir
    conf = pd.DataFrame({"true": list(CLASSES)})
    for j, c in enumerate(CLASSES):
        conf[c] = [80 if i == j else 7 for i in range(4)]
    conf.to_parquet(tmp_path / "confusion.parquet")
    out = tmp_path / "occ"
    main(["occurrence", str(d), "--ci", "--correct", str(tmp_path / "confusion.parquet"),
          "--by", "winter", "--bins", "0.5h", "--out", str(out)])  # fmt: skip
    capsys.readouterr()
    assert cf_problems(out / "occurrence.nc") == []
    contract = read_contract(out / "occurrence.parquet")
    assert contract["table"] == "occurrence" and contract["classes"] == list(CLASSES)
    assert (contract["station"], contract["mlt_method"], contract["by"]) == (
        "yrs",
        "offset",
        "winter",
    )
    assert contract["bins"] == "0.5h" and contract["mlt_range"] == [6, 18]
    assert contract["corrected"] is True and contract["ci_method"] == "wilson-days"
    assert (
        contract["units"]["ratio_arc_corrected"] == "1" and contract["units"]["mlt_end"] == "hours"
    )
    assert contract["long_names"]["n_drapery"] == "frames of class drapery in bin"
    assert "winter" not in contract["units"] and "--by winter" in contract["command"]
    assert "model_id" not in contract  # no _run.json: the model is not known
    with xr.open_dataset(out / "occurrence.nc", engine="netcdf4") as ds:
        assert ds["count"].dtype == np.int32 and ds["n_frames"].dtype == np.int32
        assert "ratio_corrected" in ds and "ci_low" in ds
        history = ds.attrs["history"]
    assert history.endswith(f"aurora-pipeline occurrence {d} --bins 0.5h --mlt-range 6 18 "
                            f"--by winter --ci --correct {tmp_path / 'confusion.parquet'} "
                            f"--out {out}")  # fmt: skip
    assert pd.Timestamp(history.split(": ", 1)[0]).tzinfo is not None  # when, in UTC


@pytest.mark.parametrize(
    "frame, match",
    [
        (pd.DataFrame({"arc": [1]}), "'true' column"),
        (pd.DataFrame({"true": list(CLASSES), "arc": 1, "drapery": 1, "radial": 1}), "hotspot"),
        (
            pd.DataFrame({"true": ["arc"] * 4, **{c: [1] * 4 for c in CLASSES}}),
            "each of",
        ),
    ],
)
def test_bad_confusion_files_are_clear_errors(tmp_path, frame, match):
    path = tmp_path / "confusion.parquet"
    frame.to_parquet(path)
    with pytest.raises(InputError, match=match):
        read_confusion(path)


def test_label_text_file_is_parsed(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("N20031221G030001  1\nN20031221G030011  4\nN20040110G145959  2\n")
    df = read_label_file(p, load_station("yrs"))
    assert df["label"].tolist() == ["arc", "hotspot", "drapery"]
    assert df["time_utc"].iloc[2] == pd.Timestamp("2004-01-10 14:59:59", tz="UTC")


@pytest.mark.parametrize(
    "text, match",
    [
        ("N20031221G030001  7\n", "line 1: unknown label '7'"),
        ("N20031221G030001  1\nX20031221  1\n", "line 2.*filename pattern"),
        ("N20031221G030001\n", "line 1 has no label"),
    ],
)
def test_bad_label_files_are_clear_errors(tmp_path, text, match):
    p = tmp_path / "labels.txt"
    p.write_text(text)
    with pytest.raises(InputError, match=match):
        read_label_file(p, load_station("yrs"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    p = tmp_path / "labels.txt"
    p.write_text("N20031221G030001  1\n")
    with pytest.raises(SystemExit) as exc:
        main(["occurrence", str(p), "--bins", "7min", "--out", str(tmp_path / "o")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "whole bins" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main(["occurrence", str(empty), "--out", str(tmp_path / "o")])
    assert "shard-*.parquet" in capsys.readouterr().err


def test_real_labels_total_and_hourly_shares(shared_data, tmp_path):
    """The 38,044 expert labels: total, and per-hour class shares counted independently."""
    src = shared_data / "yrs_labels" / "Alllabel2003_38044.txt"
    out = tmp_path / "real"
    main(["occurrence", str(src), "--bins", "3min", "--out", str(out)])
    tab = pd.read_parquet(out / "occurrence.parquet")
    assert len(tab) == 240
    assert tab["n_frames"].sum() == 38044
    for code, cls in LABEL_CODES.items():
        want = {1: 18417, 2: 8167, 3: 7646, 4: 3814}[code]
        assert tab[f"n_{cls}"].sum() == want
    # Independent count: the hour of UT + 3 straight from the file names.
    raw = pd.read_csv(src, sep=r"\s+", header=None, names=["name", "code"])
    hour = raw["name"].str[10:12].astype(int) + 3
    shares = pd.crosstab(hour, raw["code"], normalize="index")
    tab["hour"] = np.floor(tab["mlt_start"] + 1e-9).astype(int)
    hourly = tab.groupby("hour")[[f"n_{c}" for c in CLASSES]].sum()
    mine = hourly.div(hourly.sum(axis=1), axis=0)
    # integer counts (exact) divided once or twice per side: shares <= 1 off by <= gamma_2 each
    tol = 2 * bounds.gamma(2, np.float64)
    np.testing.assert_allclose(mine.to_numpy(), shares.loc[mine.index].to_numpy(), atol=tol)
    # The known physics: drapery prenoon, radial at noon, hotspot early afternoon, arcs on flanks.
    assert mine["n_drapery"].idxmax() in (9, 10, 11)
    assert mine["n_radial"].idxmax() == 12
    assert mine["n_hotspot"].idxmax() == 13
    assert mine.loc[6, "n_arc"] > 0.7 and mine.loc[16, "n_arc"] > 0.9
    md = (out / "occurrence.md").read_text()
    assert "| all | 38,044 | 48.4 | 21.5 | 20.1 | 10.0 |" in md


def test_real_label_intervals_match_a_day_bootstrap(shared_data):
    """On the real labels (19 days, 10-s frames) the day-clustered intervals are as wide as a
    bootstrap over whole days; intervals of independent frames would be ~4x too narrow."""
    from pipeline.occurrence import add_mlt, bin_index, make_bins, occurrence_table
    from pipeline.occurrence_stage import read_predictions

    st = load_station("yrs")
    frames = add_mlt(
        read_predictions(shared_data / "yrs_labels" / "Alllabel2003_38044.txt", st), st
    )
    tab = occurrence_table(frames, bins="3min", ci=True)
    spec = make_bins("3min")
    b = bin_index(frames["mlt"].to_numpy(float), spec)
    days, d = np.unique(pd.to_datetime(frames["time_utc"]).dt.floor("D"), return_inverse=True)
    c = pd.Categorical(frames["label"].astype(str), categories=list(CLASSES)).codes
    cube = np.zeros((len(days), spec.nbins, len(CLASSES)))
    np.add.at(cube, (d.reshape(-1), b, c), 1)
    boot = cube[np.random.default_rng(0).integers(0, len(days), (400, len(days)))].sum(axis=1)
    with np.errstate(invalid="ignore"):
        lo, hi = np.nanpercentile(boot / boot.sum(-1, keepdims=True), [2.5, 97.5], axis=0)
    n_days = (cube.sum(-1) > 0).sum(0)
    for i, cls in enumerate(CLASSES):
        p = tab[f"ratio_{cls}"].to_numpy()
        ok = (n_days >= 8) & (p > 0.1) & (p < 0.9)
        width = (tab[f"ci_high_{cls}"] - tab[f"ci_low_{cls}"]).to_numpy()[ok]
        ratio = np.median(width / (hi - lo)[ok, i])
        assert 0.75 < ratio < 1.3, f"{cls}: clustered / bootstrap width {ratio:.2f}"
        k, n = tab[f"n_{cls}"].to_numpy()[ok], tab["n_frames"].to_numpy()[ok]
        flo, fhi = wilson_interval(k, n)
        assert np.median((fhi - flo) / (hi - lo)[ok, i]) < 0.5


def test_table_with_stored_mlt_and_no_times_is_binned_on_its_mlt(tmp_path):
    src = tmp_path / "mlt_only.parquet"
    pd.DataFrame(
        {"mlt": [6.01, 6.06, 12.5, 19.0], "label": ["arc", "radial", "hotspot", "arc"]}
    ).to_parquet(src)
    info = run_occurrence(src, tmp_path / "out", bins="3min")
    assert info["mlt_method"] == "stored"
    assert (info["n_binned"], info["n_dropped"]) == (3, 1)
    tab = pd.read_parquet(tmp_path / "out" / "occurrence.parquet")
    assert tab.loc[0, "n_arc"] == 1 and tab.loc[1, "n_radial"] == 1
    with pytest.raises(InputError, match="time_utc"):
        run_occurrence(src, tmp_path / "out2", by="winter")


def test_a_crashed_runs_stray_shard_is_not_counted(tmp_path, pred_dir, capsys):
    """Only the shards _run.json lists as done are predictions (pipeline.predictions)."""
    import json

    d, df = pred_dir
    (d / "_run.json").write_text(json.dumps({"shards": {"0": 100, "1": 100, "2": 100}}))
    write_table(df.iloc[:50], shard_path(d, 3), PREDICTIONS_SCHEMA)  # not done
    main(["occurrence", str(d), "--bins", "0.5h", "--out", str(tmp_path / "occ")])
    assert "binned 300 frames" in capsys.readouterr().out


def test_predictions_use_the_station_classify_archive_recorded(tmp_path, pred_dir):
    """THEMIS Gillam predictions must get Gillam's MLT, not YRS's UT + 3 h by default."""
    from pipeline.config import to_dict

    d, df = pred_dir
    gill = load_station("themis_gill")
    (d / "_run.json").write_text(
        json.dumps(
            {
                "station": gill.code,
                "station_config": to_dict(gill),
                "shards": {f"{i:06d}": {} for i in range(3)},
            }
        )  # fmt: skip
    )
    info = run_occurrence(d, tmp_path / "o", bins="1h", mlt_range=(0, 24))
    assert info["station"] == gill.code
    with pytest.raises(InputError, match="predictions are of station gill, not yrs"):
        run_occurrence(d, tmp_path / "o2", station="yrs")
    tab = pd.read_parquet(tmp_path / "o" / "occurrence.parquet")
    # 03-15 UT at Gillam (~-6.5 h from UT) is night and morning MLT, not 06-18
    day = (tab["mlt_start"] >= 10) & (tab["mlt_start"] < 18)
    assert tab.loc[day, "n_frames"].sum() == 0 and tab["n_frames"].sum() == 300


# ----------------------------------------------------------------------------- audit fixes


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_run_leaves_the_earlier_outputs_as_they_were(tmp_path, pred_dir, monkeypatch):
    """A bad regions file, or a failure while writing, must not leave a mix of two runs."""
    import pipeline.plots
    from pipeline.errors import ConfigError
    from pipeline.occurrence_stage import OUTPUT_NAMES

    d, _ = pred_dir
    out = tmp_path / "occ"
    run_occurrence(d, out, bins="1h")
    before = _snapshot(out)
    assert sorted(before) == sorted(OUTPUT_NAMES)
    bad = tmp_path / "bad.yaml"
    bad.write_text("regions: []\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'bogus'"):
        run_occurrence(d, out, bins="30min", regions=bad)
    assert _snapshot(out) == before
    with pytest.raises(ConfigError):  # into a new folder: nothing at all
        run_occurrence(d, tmp_path / "new", bins="30min", regions=bad)
    assert not (tmp_path / "new").exists()

    real_save = pipeline.plots.save_figure

    def save_fails_for_pdf(fig, path, dpi=300):
        if str(path).endswith(".pdf"):
            raise OSError("disk full")
        return real_save(fig, path, dpi=dpi)

    monkeypatch.setattr(pipeline.plots, "save_figure", save_fails_for_pdf)
    with pytest.raises(OSError, match="disk full"):
        run_occurrence(d, out, bins="30min")
    assert _snapshot(out) == before  # the parquet and nc of the failed run did not land
    monkeypatch.undo()


def test_outputs_are_replaced_together_with_the_run_record_last(tmp_path, pred_dir, monkeypatch):
    import os

    d, _ = pred_dir
    out = tmp_path / "occ"
    run_occurrence(d, out, bins="1h")
    moved, real_replace = [], os.replace

    def replace(src, dst):
        if os.path.dirname(os.fspath(dst)) == os.fspath(out):
            moved.append((os.path.basename(dst), (out / RUN_RECORD).exists()))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    run_occurrence(d, out, bins="30min")
    monkeypatch.undo()
    assert [name for name, _ in moved][-1] == RUN_RECORD and len(moved) == 6
    assert not any(record for _, record in moved)  # no old run record beside new outputs
    assert json.loads((out / RUN_RECORD).read_text())["bins"] == "30min"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def _run_json(
    d, done: int, planned: int, finished: bool = False, frames_failed: int | None = None
) -> None:
    run = {
        "command": "classify-archive",
        "station": "yrs",
        "shards": {f"{s:06d}": {"frames": 100, "predicted": 100, "errors": 0} for s in range(done)},
        "manifest_frames": planned,
        "runs": [
            {
                "manifest_frames": planned,
                "frames_considered": planned,
                "since": None,
                "frames_planned": planned,
                "shards_planned": list(range(planned // 100)),
            }
        ],
    }
    if finished:
        run["runs"][-1]["finished"] = "2024-01-01T00:00:00+00:00"
    if frames_failed is not None:
        run["runs"][-1]["frames_failed"] = frames_failed
    (d / "_run.json").write_text(json.dumps(run))


def test_an_unfinished_classify_archive_run_is_warned_about(tmp_path, pred_dir, caplog, capsys):
    """Ctrl-C of classify-archive: occurrence says how many frames are missing and the fix."""
    d, _ = pred_dir
    _run_json(d, done=3, planned=500)  # shards 3 and 4 never ran
    main(["occurrence", str(d), "--bins", "1h", "--out", str(tmp_path / "o")])
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1
    assert "200 of the 500 manifest frames" in warning[0]
    assert "rerun classify-archive with the same arguments" in warning[0]
    assert "200 frames not classified yet" in capsys.readouterr().out
    info = json.loads((tmp_path / "o" / RUN_RECORD).read_text())
    assert info["n_unclassified"] == 200
    assert "incomplete predictions" in (tmp_path / "o" / "occurrence.md").read_text()
    # shard 3 failed (its 100 frames are in _errors.parquet): only shard 4's frames are missing
    _run_json(d, done=3, planned=500, frames_failed=100)
    caplog.clear()
    assert run_occurrence(d, tmp_path / "o2", bins="1h")["n_unclassified"] == 100
    assert "100 of the 500" in caplog.text
    _run_json(d, done=3, planned=500, frames_failed=0)
    assert run_occurrence(d, tmp_path / "o2b", bins="1h")["n_unclassified"] == 200
    # a finished run: no warning
    _run_json(d, done=3, planned=300, finished=True)
    caplog.clear()
    assert run_occurrence(d, tmp_path / "o3", bins="1h")["n_unclassified"] == 0
    assert "WARNING" not in [r.levelname for r in caplog.records]


def test_the_shards_folder_alone_is_a_predictions_folder(tmp_path, pred_dir):
    """A folder of shard files without _run.json (shards/ itself, or made elsewhere)."""
    d, _ = pred_dir
    assert run_occurrence(d / "shards", tmp_path / "o", bins="1h")["n_binned"] == 300


def test_unknown_labels_name_their_file(tmp_path, pred_dir):
    d, df = pred_dir
    bad = df.iloc[100:200].assign(label=["cloud"] + ["arc"] * 99)
    write_table(bad, shard_path(d, 1), PREDICTIONS_SCHEMA)
    with pytest.raises(InputError, match=r"shard-000001\.parquet: unknown labels cloud"):
        run_occurrence(d, tmp_path / "o")
    single = tmp_path / "labels.parquet"
    bad[["time_utc", "label"]].to_parquet(single)
    with pytest.raises(InputError, match=r"labels\.parquet: unknown labels cloud"):
        run_occurrence(single, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_csv_file_is_named_as_none_of_the_accepted_inputs(tmp_path, capsys):
    src = tmp_path / "pred.csv"
    _predictions(5)[["time_utc", "label"]].to_csv(src, index=False)
    with pytest.raises(SystemExit):
        main(["occurrence", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no label" not in err
    assert "predictions folder, a Parquet file" in err and "none of them" in err
    assert "convert a CSV table to Parquet" in err
    # a Parquet file under another name is still read as Parquet
    other = tmp_path / "pred.data"
    write_table(_predictions(20), other, PREDICTIONS_SCHEMA)
    assert run_occurrence(other, tmp_path / "o2", bins="1h")["n_binned"] == 20


def test_a_range_across_midnight_runs_end_to_end(tmp_path, capsys):
    """--mlt-range 22 26 bins 22-02 MLT (19-23 UT at YRS) on the nightside."""
    t = pd.Timestamp("2004-01-01 19:10", tz="UTC") + pd.to_timedelta(np.arange(24) * 600, "s")
    src = tmp_path / "night.parquet"
    pd.DataFrame({"time_utc": t, "label": "arc"}).to_parquet(src)  # the last one is 02:00 MLT
    out = tmp_path / "o"
    main(["occurrence", str(src), "--bins", "1h", "--mlt-range", "22", "26", "--out", str(out)])
    said = capsys.readouterr().out
    assert "binned 23 frames into 4 bins of 1h (22-2 MLT across midnight" in said
    assert "dropped 1 outside" in said
    tab = pd.read_parquet(out / "occurrence.parquet")
    assert tab["mlt_start"].tolist() == [22, 23, 0, 1] and tab["n_frames"].tolist() == [5, 6, 6, 6]
    assert "| 00.00-01.00 | 6 |" in (out / "occurrence.md").read_text()
    assert "--mlt-range 22 26" in json.loads((out / RUN_RECORD).read_text())["command_line"]


# ----------------------------------------------------------------------------- the output folder


@pytest.mark.parametrize(
    "plant, named",
    [
        (lambda d: (d / RUN_RECORD).write_text(json.dumps({"command": "train"})), "a checkpoint"),
        (lambda d: (d / "model.safetensors").write_bytes(b"x"), "a checkpoint"),
    ],
)
def test_an_out_holding_another_stages_output_is_refused_as_it_was(
    tmp_path, pred_dir, plant, named
):
    d, _ = pred_dir
    out = tmp_path / "other"
    out.mkdir()
    plant(out)
    before = _snapshot(out)
    with pytest.raises(InputError, match=str(out)) as err:
        run_occurrence(d, out, bins="1h")
    assert named in str(err.value) and "`occurrence`" in str(err.value)
    assert _snapshot(out) == before


def test_an_interrupted_run_leaves_no_finished_record(tmp_path, pred_dir, monkeypatch):
    """Ctrl-C while the outputs are written: a new folder is not left behind, and an earlier
    run's folder keeps that run's outputs and record."""
    import pipeline.plots

    d, _ = pred_dir

    def interrupted(fig, path, dpi=300):
        raise KeyboardInterrupt

    out = tmp_path / "occ"
    run_occurrence(d, out, bins="1h")
    before = _snapshot(out)
    monkeypatch.setattr(pipeline.plots, "save_figure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_occurrence(d, tmp_path / "new", bins="30min")
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt):
        run_occurrence(d, out, bins="30min")
    assert _snapshot(out) == before
    assert json.loads((out / RUN_RECORD).read_text())["bins"] == "1h"


def _sky_folder(tmp_path, sky: np.ndarray, train_sky: dict | None) -> tuple:
    """A predictions folder of two done shards whose frames have the given sky levels."""
    d = tmp_path / "pred"
    df = _predictions(len(sky), seed=4)
    df["sky_level"] = np.asarray(sky, np.float32)
    halves = np.array_split(np.arange(len(df)), 2)
    for i, part in enumerate(halves):
        write_table(df.iloc[part], shard_path(d, i), PREDICTIONS_SCHEMA)
    record = {"shards": {"0": {}, "1": {}}, "train_sky_level": train_sky}
    (d / "_run.json").write_text(json.dumps(record))
    return d, df


def test_min_sky_leaves_out_frames_darker_than_the_models_training_frames(tmp_path, capsys):
    """--min-sky model: frames below the dimmest training frame (recorded by train, carried by
    classify-archive) are not binned and are counted as too dim; a number works the same."""
    sky = np.linspace(0.0, 0.4, 300)
    d, df = _sky_folder(
        tmp_path, sky, {"min": 0.1, "p01": 0.11, "p50": 0.2, "p99": 0.3, "max": 0.4}
    )
    main(["occurrence", str(d), "--bins", "1h", "--min-sky", "model", "--out", str(tmp_path / "m")])
    said = capsys.readouterr().out
    bright = df[df["sky_level"] >= np.float32(0.1)]
    n_dim = len(df) - len(bright)
    assert 60 < n_dim < 80 and f"{n_dim:,} below --min-sky 0.1" in said
    tab = pd.read_parquet(tmp_path / "m" / "occurrence.parquet")
    for c in CLASSES:
        assert tab[f"n_{c}"].sum() == (bright["label"] == c).sum()
    info = json.loads((tmp_path / "m" / RUN_RECORD).read_text())
    assert info["n_dim"] == n_dim and info["min_sky_level"] == 0.1 and info["min_sky"] == "model"
    md = (tmp_path / "m" / "occurrence.md").read_text()
    assert "--min-sky model" in md and "left out as too dim" in md
    # a number instead of the model's floor; with --min-prob the two screens add up
    info = run_occurrence(d, tmp_path / "n", bins="1h", min_sky="0.2", min_prob=0.2)
    assert info["n_dim"] == int((df["sky_level"] < np.float32(0.2)).sum())
    assert info["n_uncertain"] == 0 and info["n_binned"] + info["n_dim"] == len(df)


@pytest.mark.parametrize(
    ("setup", "value", "match"),
    [
        ("no record", "model", r"pred: no sky level of the model's training frames on record"),
        ("recorded", "bright", r"--min-sky 'bright': give 'model' or a sky level within 0\.\.1"),
        ("recorded", "1.5", r"--min-sky must be 'model' or within 0\.\.1"),
        ("old shards", "0.1", r"shard-000000\.parquet: no sky_level column .*classify again"),
        ("nulls", "0.1", r"pred: 150 frames have no sky_level"),
    ],
)
def test_min_sky_errors_are_one_line_naming_the_fix(tmp_path, setup, value, match, capsys):
    """Predictions without sky levels (or a model without a recorded range) and bad values are
    one clear line, exit 1, nothing written."""
    train_sky = None if setup == "no record" else {"min": 0.1}
    d, df = _sky_folder(tmp_path, np.full(300, 0.2), train_sky)
    if setup == "old shards":  # classified before sky levels: the column is absent
        pq.write_table(pq.read_table(shard_path(d, 0)).drop(["sky_level"]), shard_path(d, 0))
    if setup == "nulls":
        write_table(df.iloc[:150].assign(sky_level=np.nan), shard_path(d, 0), PREDICTIONS_SCHEMA)
    with pytest.raises(SystemExit) as ex:
        main(["occurrence", str(d), "--min-sky", value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert ex.value.code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()
