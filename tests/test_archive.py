"""Timestamp parsing, the archive scan (folders, path lists, PGM headers) and manifest files."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import archive as archive_mod
from pipeline.archive import (
    ROOT_KEY,
    load_manifest,
    parse_time,
    parse_times,
    scan,
    scan_to_files,
    write_manifest,
)
from pipeline.cli import main
from pipeline.config import load_station
from pipeline.errors import ConfigError, InputError
from pipeline.imageio import read_frame, write_frame
from pipeline.storage import ERRORS_SCHEMA, MANIFEST_SCHEMA

YRS = "N%Y%m%dG%H%M%S"


@pytest.fixture(scope="module")
def yrs():
    return load_station("yrs")


@pytest.fixture
def archive(tmp_path):
    """A small YRS-layout tree: frames out of order, a nameless file, a corrupt PNG, calib/."""
    root = tmp_path / "arch"
    frame = np.full((8, 8), 1000, np.uint16)
    names = [
        "2004/20041224/N20041224G100000.png",
        "2004/20041224/N20041224G090000.png",
        "2004/20041223/N20041223G150010.PNG",  # upper-case suffix still counts
        "2005/20050101/N20050101G030000.tif",
    ]
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        write_frame(root / n, frame) if n.endswith(".png") else (root / n).write_bytes(b"II*\0")
    (root / "2004/20041224/N20041224G093000.png").write_bytes(b"corrupt, not a PNG")
    (root / "2004/20041224/sky_overview.png").write_bytes(b"x")  # no time in the name
    (root / "2004/20041224/N20041224G093010.txt").write_text("not a frame")  # other extension
    (root / "2004/20041224/.N20041224G093020.png.part").write_bytes(b"")  # interrupted write
    (root / "calib").mkdir()
    write_frame(root / "calib/N20041201G000000.png", frame)
    (root / "2004/calib").mkdir()
    write_frame(root / "2004/calib/N20041202G000000.png", frame)
    return root


# ----------------------------------------------------------------------------- names


def test_parse_time_yrs_name():
    assert parse_time("N20031221G030001", YRS) == pd.Timestamp("2003-12-21 03:00:01", tz="UTC")
    assert parse_time("2003/20031221/N20031221G030001.png", YRS) == pd.Timestamp(
        "2003-12-21 03:00:01", tz="UTC"
    )


@pytest.mark.parametrize(
    "name", ["sky.png", "N20031321G030001.png", "N20031221G030001234.png", "X20031221G030001"]
)
def test_parse_time_none_when_absent_or_invalid(name):
    assert parse_time(name, YRS) is None


def test_parse_time_multi_suffix_and_prefix_pattern():
    name = "20140310_0600_gill_themis19_full.pgm.gz"
    assert parse_time(name, "%Y%m%d_%H%M") == pd.Timestamp("2014-03-10 06:00", tz="UTC")
    assert parse_time("img_2004_366_235959_25.png", "img_%Y_%j_%H%M%S_%f") == pd.Timestamp(
        "2004-12-31 23:59:59.25", tz="UTC"
    )


@pytest.mark.parametrize(
    "pattern, names",
    [
        (
            YRS,
            [
                "N20031221G030001.png",
                "bad.png",
                "2004/20040229/N20040229G235959.jpg",  # leap day
                "N20030229G000000.png",  # no 29 February in 2003
                "N20031221G240000.png",  # hour 24
                "N20031221G035960.png",  # second 60
                "N00001221G030001.png",  # year 0
                "N20031221G0300012.png",  # runs into more digits
                "N20031221G030001.pgm.gz",
                "N20031221G030001_b.png",
                "xN20031221G030001.png",  # the pattern must start the name
            ],
        ),
        (
            "img_%y_%j_%H%M%S_%f",
            ["img_04_366_235959_25.png", "img_03_366_000000_1.png", "img_70_001_000000_000001"],
        ),
    ],
)
def test_parse_times_vectorised_matches_scalar(pattern, names):
    got = parse_times(names, pattern)
    assert str(got.dtype) == "datetime64[ns, UTC]" and len(got) == len(names)
    want = [parse_time(n, pattern) for n in names]
    assert [None if pd.isna(t) else t for t in got] == want
    assert 0 < sum(w is not None for w in want) < len(names)  # both outcomes are exercised


def test_bad_pattern_is_a_config_error():
    with pytest.raises(ConfigError, match="unsupported directive %b"):
        parse_time("x", "N%Y%b%d")
    with pytest.raises(ConfigError, match="must hold a date"):
        parse_time("x", "%H%M%S")


# ----------------------------------------------------------------------------- scan


def test_scan_tree(archive, yrs):
    manifest, errors = scan(archive, yrs)
    assert list(manifest["path"]) == [
        "2004/20041223/N20041223G150010.PNG",
        "2004/20041224/N20041224G090000.png",
        "2004/20041224/N20041224G093000.png",  # corrupt, but scan never decodes
        "2004/20041224/N20041224G100000.png",
        "2005/20050101/N20050101G030000.tif",
    ]
    assert manifest["time_utc"].is_monotonic_increasing
    assert manifest["time_utc"].iloc[0] == pd.Timestamp("2004-12-23 15:00:10", tz="UTC")
    assert (manifest["station"] == "yrs").all() and (manifest["frame"] == 0).all()
    assert manifest["bytes"].iloc[2] == len(b"corrupt, not a PNG")
    assert not manifest["path"].str.contains("calib").any()
    assert manifest.attrs["root"] == os.path.abspath(archive)
    # the frame without a time goes to errors, not the manifest
    assert list(errors["path"]) == ["2004/20041224/sky_overview.png"]
    assert list(errors["stage"]) == ["scan"] and errors["error"].iloc[0] == "NoTimestamp"
    # dtypes are those of the schemas
    pa.Table.from_pandas(manifest, schema=MANIFEST_SCHEMA, preserve_index=False)
    pa.Table.from_pandas(errors, schema=ERRORS_SCHEMA, preserve_index=False)
    assert str(manifest["time_utc"].dtype) == "datetime64[ns, UTC]"
    assert str(manifest["mtime"].dtype) == "datetime64[ns, UTC]"
    assert manifest["frame"].dtype == np.int16 and manifest["bytes"].dtype == np.int64


def test_scan_exclude_none_includes_calib(archive, yrs):
    manifest, _ = scan(archive, yrs, exclude=())
    assert manifest["path"].str.contains("calib").sum() == 2
    manifest, _ = scan(archive, yrs, exclude=("2005/*",))
    assert manifest["path"].str.contains("calib").sum() == 2
    assert not manifest["path"].str.startswith("2005").any()


def test_scan_empty_and_missing(tmp_path, yrs):
    manifest, errors = scan(tmp_path, yrs)
    assert len(manifest) == 0 and len(errors) == 0
    assert list(manifest.columns) == MANIFEST_SCHEMA.names
    with pytest.raises(InputError, match="not found"):
        scan(tmp_path / "nowhere", yrs)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not an archive folder"):
        scan(tmp_path / "notes.txt", yrs)


def test_scan_csv_path_list(archive, yrs, tmp_path):
    listing = tmp_path / "lists" / "frames.csv"
    listing.parent.mkdir()
    (listing.parent / "a").mkdir()
    (listing.parent / "a" / "sky.png").write_bytes(b"x")
    rel = os.path.relpath(archive / "2004/20041224/N20041224G100000.png", listing.parent)
    absolute = str(archive / "2004/20041224/N20041224G090000.png")
    pd.DataFrame({"path": [rel, absolute, "gone/N20041224G110000.png", "a/sky.png"]}).to_csv(
        listing, index=False
    )
    manifest, errors = scan(listing, yrs)
    assert manifest.attrs["root"] == str(listing.parent)
    assert [t.hour for t in manifest["time_utc"]] == [9, 10]
    for p in manifest["path"]:
        assert read_frame(os.path.join(manifest.attrs["root"], p)).shape == (8, 8)
    assert sorted(errors["error"]) == ["FileNotFoundError", "NoTimestamp"]


def test_scan_list_without_path_column(tmp_path, yrs):
    listing = tmp_path / "frames.csv"
    pd.DataFrame({"file": ["a.png"]}).to_csv(listing, index=False)
    with pytest.raises(InputError, match="'path' column"):
        scan(listing, yrs)


def test_scan_themis_pgm_headers(shared_data):
    station = load_station("themis_gill")
    manifest, errors = scan(shared_data / "themis", station)
    assert len(errors) == 0 and len(manifest) == 40
    assert manifest["time_utc"].is_monotonic_increasing
    assert list(manifest["frame"].iloc[:3]) == [0, 1, 2]
    first = manifest["time_utc"].iloc[0]
    assert first.floor("s") == pd.Timestamp("2014-03-10 06:00:00", tz="UTC")
    assert first != first.floor("s")  # the header's sub-second time, not the file name's minute
    assert manifest["time_utc"].diff().dropna().dt.total_seconds().between(2, 4).sum() == 38
    assert set(manifest["station"]) == {"gill"}


def test_scan_pgm_without_header_time_and_corrupt_stack(tmp_path, shared_data):
    station = load_station("themis_gill")
    shutil.copy(shared_data / "themis" / "20140310_0605_gill_themis19_full.pgm", tmp_path)
    (tmp_path / "20140310_0610_gill_themis19_full.pgm.gz").write_bytes(b"not gzip")
    arr = np.zeros((4, 4), ">u2").tobytes()
    (tmp_path / "20140310_0615_gill_x.pgm").write_bytes(b"P5\n4 4\n65535\n" + arr)
    manifest, errors = scan(tmp_path, station)
    assert len(manifest) == 20
    assert sorted(errors["error"]) == ["FrameReadError", "NoTimestamp"]


def test_time_source_filename_for_pgm(tmp_path):
    station = dataclasses.replace(load_station("themis_gill"), time_source="filename")
    arr = np.zeros((4, 4), ">u2").tobytes()
    (tmp_path / "20140310_0615_gill_x.pgm").write_bytes(b"P5\n4 4\n65535\n" + arr)
    manifest, errors = scan(tmp_path, station)
    assert len(errors) == 0
    assert manifest["time_utc"].iloc[0] == pd.Timestamp("2014-03-10 06:15", tz="UTC")


# ----------------------------------------------------------------------------- manifest files


def test_manifest_round_trip_resolves_abspath(archive, yrs, tmp_path):
    manifest, _ = scan(archive, yrs)
    out = tmp_path / "out" / "manifest.parquet"
    write_manifest(manifest, out, archive)
    assert pq.read_schema(out).metadata[ROOT_KEY] == str(archive).encode()
    assert pq.read_schema(out).remove_metadata().equals(MANIFEST_SCHEMA)
    loaded = load_manifest(out, yrs)
    pd.testing.assert_frame_equal(loaded.drop(columns="abspath"), manifest)
    assert loaded.attrs["root"] == str(archive)
    for p, a in zip(loaded["path"], loaded["abspath"]):
        assert a == os.path.join(archive, p) and os.path.isfile(a)


def test_load_manifest_falls_back_to_its_folder(archive, yrs, tmp_path):
    manifest, _ = scan(archive, yrs)
    write_manifest(manifest, archive / "manifest.parquet", tmp_path / "moved_away")
    loaded = load_manifest(archive / "manifest.parquet", yrs)
    assert loaded.attrs["root"] == str(archive)
    assert all(os.path.isfile(a) for a in loaded["abspath"])


def test_load_manifest_from_folder_and_list(archive, yrs, tmp_path):
    from_dir = load_manifest(archive, yrs)
    assert len(from_dir) == 5 and from_dir["abspath"].map(os.path.isabs).all()
    listing = tmp_path / "list.parquet"
    pd.DataFrame({"path": list(from_dir["abspath"])}).to_parquet(listing)
    from_list = load_manifest(listing, yrs)
    assert list(from_list["abspath"]) == list(from_dir["abspath"])


def test_load_manifest_rejects_other_inputs(tmp_path, yrs, archive):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(InputError, match="expected an archive folder"):
        load_manifest(tmp_path / "x.txt", yrs)
    with pytest.raises(InputError, match="not found"):
        load_manifest(tmp_path / "nothing.parquet", yrs)
    manifest, _ = scan(archive, yrs)
    write_manifest(manifest, tmp_path / "m.parquet", archive)
    with pytest.raises(InputError, match="station yrs"):
        load_manifest(tmp_path / "m.parquet", load_station("themis_gill"))


# ----------------------------------------------------------------------------- the command


def test_cli_scan_writes_manifest_and_errors(archive, tmp_path, capsys):
    out = tmp_path / "res" / "manifest.parquet"
    (out.parent).mkdir()
    # an errors table of another stage is kept; stale scan rows are replaced
    other = pd.DataFrame(
        {"path": ["x.png", "old.png"], "frame": [0, 0], "stage": ["classify", "scan"]}
    ).assign(error="E", message="m")
    other.to_parquet(out.parent / "errors.parquet")
    main(["scan", str(archive), "-o", str(out)])
    line = capsys.readouterr().out.strip()
    assert line.startswith("scanned 5 frame(s) in 5 file(s), 2004-12-23 15:00:10 to 2005-01-01")
    assert "1 error(s)" in line and str(out) in line
    loaded = load_manifest(out, load_station("yrs"))
    assert len(loaded) == 5 and loaded.attrs["root"] == str(archive)
    errors = pd.read_parquet(out.parent / "errors.parquet")
    assert sorted(zip(errors["path"], errors["stage"])) == [
        ("2004/20041224/sky_overview.png", "scan"),
        ("x.png", "classify"),
    ]


def test_cli_scan_without_errors_writes_no_errors_table(shared_data, tmp_path, capsys):
    out = tmp_path / "manifest.parquet"
    main(["scan", str(shared_data / "themis"), "--station", "themis_gill", "-o", str(out)])
    assert "scanned 40 frame(s) in 2 file(s)" in capsys.readouterr().out
    assert out.exists() and not (tmp_path / "errors.parquet").exists()


def test_scan_synthetic_archive_matches_its_truth(tiny_archive, tiny_station_path):
    manifest, errors = scan(tiny_archive, load_station(tiny_station_path))
    truth = pd.read_parquet(tiny_archive / "truth.parquet").sort_values(["time_utc", "path"])
    assert len(errors) == 0 and len(manifest) == len(truth) == 60
    assert list(manifest["path"]) == list(truth["path"])  # calib/ dark frames skipped
    assert (manifest["time_utc"].to_numpy() == truth["time_utc"].to_numpy()).all()
    assert (manifest["bytes"] > 0).all()
    # a table with a `path` column that is not a manifest (truth.parquet) is a list of paths
    listed = load_manifest(tiny_archive / "truth.parquet", load_station(tiny_station_path))
    assert list(listed["path"]) == list(manifest["path"])
    assert listed["abspath"].map(os.path.isfile).all()


def test_two_manifests_in_one_folder_keep_their_own_scan_errors(archive, tmp_path, capsys):
    main(["scan", str(archive), "-o", str(tmp_path / "a.parquet")])
    main(["scan", str(archive), "-o", str(tmp_path / "b.parquet")])
    capsys.readouterr()
    for name in ("a", "b"):
        errors = pd.read_parquet(tmp_path / f"{name}.errors.parquet")
        assert errors["path"].tolist() == ["2004/20041224/sky_overview.png"]
    assert not (tmp_path / "errors.parquet").exists()


def test_scan_records_every_entry_named_like_a_frame(archive, yrs):
    day = archive / "2004/20041224"
    (day / "N20041224G110000.png").symlink_to(day / "missing.png")  # broken link
    (day / "N20041224G120000.png").mkdir()  # a folder named like a frame
    write_frame(day / "N20041224G120000.png" / "N20041224G120010.png", np.zeros((8, 8), np.uint16))
    (day / "N20041224G126000.png").write_bytes(b"x")  # minute 60: no valid time
    manifest, errors = scan(archive, yrs)
    reasons = dict(zip(errors["path"], errors["error"]))
    assert reasons["2004/20041224/N20041224G110000.png"] == "BrokenLink"
    assert reasons["2004/20041224/N20041224G120000.png"] == "IsADirectoryError"
    assert reasons["2004/20041224/N20041224G126000.png"] == "NoTimestamp"
    assert set(errors["stage"]) == {"scan"}
    # A frame inside the odd folder is still found.
    assert "2004/20041224/N20041224G120000.png/N20041224G120010.png" in set(manifest["path"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file; needs an ordinary user")
def test_scan_records_an_unreadable_file(archive, yrs):
    p = archive / "2004/20041224/N20041224G110000.png"
    write_frame(p, np.zeros((8, 8), np.uint16))
    p.chmod(0)
    _, errors = scan(archive, yrs)
    assert dict(zip(errors["path"], errors["error"]))[p.relative_to(archive).as_posix()] == (
        "PermissionError"
    )


# ----------------------------------------------------------------------------- the output file


@pytest.mark.parametrize(
    "plant, named",
    [
        (
            lambda d: (d / "_run.json").write_text('{"command": "train", "finished": true}'),
            "_run.json",
        ),
        (lambda d: (d / "model.safetensors").write_bytes(b"weights"), "model.safetensors"),
        (lambda d: (d / "manifest.parquet").mkdir(), "is a folder"),
    ],
)
def test_scan_refuses_an_out_in_another_stages_folder(archive, yrs, tmp_path, capsys, plant, named):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    plant(folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    out = folder / "manifest.parquet"
    with pytest.raises(InputError, match=named) as err:
        scan_to_files(archive, yrs, out)
    assert str(folder) in str(err.value)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    with pytest.raises(SystemExit) as exc:  # one line on the command line, no traceback
        main(["scan", str(archive), "-o", str(out)])
    assert exc.value.code == 1
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1 and named in msg


def test_scan_into_a_workflow_folder_is_fine(archive, yrs, tmp_path):
    (tmp_path / "_run.json").write_text('{"command": "run", "finished": false}')
    scan_to_files(archive, yrs, tmp_path / "manifest.parquet")
    assert len(pd.read_parquet(tmp_path / "manifest.parquet")) == 5


def test_an_interrupted_scan_writes_no_manifest(archive, yrs, tmp_path, monkeypatch):
    """The manifest goes last: an interruption before it leaves none (and no partial file)."""
    out = tmp_path / "res" / "manifest.parquet"
    written = []

    def interrupted(df, path, root=None):
        written.append((tmp_path / "res" / "errors.parquet").is_file())  # the errors came first
        raise KeyboardInterrupt

    monkeypatch.setattr(archive_mod, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scan_to_files(archive, yrs, out)
    assert written == [True]
    assert sorted(p.name for p in out.parent.iterdir()) == ["errors.parquet"]
