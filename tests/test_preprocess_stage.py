"""The preprocess stage: one output per frame, errors recorded, reruns idempotent, crash-safe."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import bounds
import numpy as np
import pandas as pd
import pytest
from builders import local_cluster

from pipeline import preprocess_stage
from pipeline.archive import load_manifest, scan, write_manifest
from pipeline.cli import main
from pipeline.config import dump_yaml, load_station
from pipeline.errors import ConfigError, InputError
from pipeline.imageio import read_frame, read_pgm_stack, write_frame
from pipeline.labelled import open_labelled
from pipeline.preprocess import calibration_from_station, preprocess
from pipeline.preprocess_stage import DarkSource, run_preprocess

TINY = load_station("yrs").scaled(64)
REPO = Path(__file__).resolve().parents[1]
#: (date of the dark frame, its bias): one per camera season, as the synthetic archive writes.
SEASONS = (("20031201", 400.0), ("20041201", 650.0))


def _dark(bias: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = TINY.raw_size
    dark = bias + rng.normal(0, 15.0, (1, n)) + (rng.random((n, n)) < 0.01) * 2000.0
    return np.rint(dark).astype(np.uint16)


def make_archive(root: Path, n: int = 12, seed: int = 0) -> list[Path]:
    """A tiny raw archive in the YRS layout with calib/ darks and station.yaml; returns frames."""
    rng = np.random.default_rng(seed)
    calib = root / "calib"
    calib.mkdir(parents=True)
    dump_yaml(TINY, calib / "station.yaml")
    darks = {}
    for i, (day, bias) in enumerate(SEASONS):
        darks[day] = _dark(bias, i).astype(np.float64)
        write_frame(calib / f"dark_{day}.png", darks[day].astype(np.uint16))
    size = TINY.raw_size
    yy, xx = np.mgrid[0:size, 0:size]
    cr, cc = TINY.optical_centre
    fov = np.hypot(yy - cr, xx - cc) <= 0.49 * size
    paths = []
    for k in range(n):
        winter = 2003 + k % 2
        t = pd.Timestamp(f"{winter}-12-21 03:00:00") + pd.Timedelta(seconds=10 * k)
        day = SEASONS[k % 2][0]
        sig = fov * rng.uniform(100, 3000) * np.exp(-((yy - cr - rng.uniform(-20, 20)) ** 2) / 40)
        frame = darks[day] + sig + rng.normal(0, 3.0, (size, size))
        p = root / f"{t:%Y}" / f"{t:%Y%m%d}" / f"N{t:%Y%m%d}G{t:%H%M%S}.png"
        write_frame(p, np.clip(np.rint(frame), 0, 65535).astype(np.uint16))
        paths.append(p)
    return paths


def expected(path: Path, root: Path, dtype: str = "uint8") -> np.ndarray:
    """What the stage must write for ``path``: the pure function with the date-chosen dark."""
    name = path.stem
    day = name[1:9]
    dark_day = max((d for d, _ in SEASONS if d <= day), default=SEASONS[0][0])
    dark = read_frame(root / "calib" / f"dark_{dark_day}.png")
    calib = calibration_from_station(TINY, dark=dark, dtype=dtype)
    return preprocess(read_frame(path), calib)


def outputs(out: Path, pattern: str = "*.png") -> dict[str, np.ndarray]:
    return {
        p.relative_to(out).as_posix(): read_frame(p)
        for p in sorted(out.rglob(pattern))
        if "calib" not in p.parts
    }


def mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*")}


@pytest.fixture(scope="module")
def scheduler():
    """One small cluster for the module: tests connect to it instead of starting their own."""
    with local_cluster(n_workers=1) as (cluster, _):
        yield cluster.scheduler_address


@pytest.fixture()
def archive(tmp_path: Path) -> tuple[Path, list[Path]]:
    root = tmp_path / "archive"
    return root, make_archive(root)


def test_one_output_per_frame_with_darks_by_date(archive, tmp_path, scheduler):
    root, frames = archive
    out = tmp_path / "out"
    s = run_preprocess(root, out, scheduler=scheduler)
    assert (s.total, s.written, s.failed, s.up_to_date) == (12, 12, 0, 0)
    got = outputs(out)
    assert sorted(got) == sorted(p.relative_to(root).as_posix() for p in frames)
    for p in frames:
        img = got[p.relative_to(root).as_posix()]
        assert img.dtype == np.uint8 and img.shape == (TINY.crop_size, TINY.crop_size)
        np.testing.assert_array_equal(img, expected(p, root))
    params = json.loads((out / "_run.json").read_text())
    assert params["command"] == "preprocess" and params["finished"] is True
    assert params["settings"]["dark"] == {"mode": "dir", "path": str((root / "calib").resolve())}
    assert params["settings"]["calibration"]["crop_size"] == TINY.crop_size
    assert params["station"]["raw_size"] == 64  # taken from ARCHIVE/calib/station.yaml
    assert load_station(out / "calib" / "station.yaml") == TINY  # for the readers of OUT
    assert len(pd.read_parquet(out / "errors.parquet")) == 0
    assert "12 written" in s.line() and "0 failed" in s.line()


def test_corrupt_frames_are_recorded_and_the_run_goes_on(archive, tmp_path, scheduler):
    root, frames = archive
    day = frames[0].parent
    (day / "N20031221G040000.png").write_bytes(b"")  # zero bytes
    good = frames[2].read_bytes()
    (day / "N20031221G040010.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    write_frame(day / "N20031221G040020.png", np.zeros((50, 50), np.uint16))  # wrong geometry
    out = tmp_path / "out"
    s = run_preprocess(root, out, scheduler=scheduler)
    assert (s.total, s.written, s.failed) == (15, 12, 3)
    err = pd.read_parquet(out / "errors.parquet").set_index("path")
    assert set(err["stage"]) == {"preprocess"}
    rel = day.relative_to(root).as_posix()
    assert err.loc[f"{rel}/N20031221G040000.png", "error"] == "FrameReadError"
    assert err.loc[f"{rel}/N20031221G040010.png", "error"] == "FrameReadError"
    assert err.loc[f"{rel}/N20031221G040020.png", "error"] == "FrameGeometryError"
    assert "50x50" in err.loc[f"{rel}/N20031221G040020.png", "message"]
    assert len(outputs(out)) == 12

    # A rerun does no work and changes nothing, not even the errors table.
    before = mtimes(out)
    again = run_preprocess(root, out, scheduler="tcp://127.0.0.1:1")  # never contacted
    assert (again.written, again.up_to_date, again.known_errors) == (0, 12, 3)
    assert mtimes(out) == before

    # A repaired file is retried, and leaves the errors table. Its mtime is set past the errors
    # table's explicitly: a sleep would depend on the filesystem's timestamp granularity.
    repaired = day / "N20031221G040000.png"
    repaired.write_bytes(frames[3].read_bytes())
    t = (out / "errors.parquet").stat().st_mtime_ns + 1_000_000_000
    os.utime(repaired, ns=(t, t))
    fixed = run_preprocess(root, out, scheduler=scheduler)
    assert (fixed.written, fixed.up_to_date, fixed.known_errors) == (1, 12, 2)
    err = pd.read_parquet(out / "errors.parquet")
    assert f"{rel}/N20031221G040000.png" not in set(err["path"]) and len(err) == 2


def test_scan_errors_of_the_archive_are_recorded_and_replaced(archive, tmp_path, scheduler):
    root, frames = archive
    day = frames[0].parent
    (day / "N20031221G046001.png").write_bytes(frames[1].read_bytes())  # minute 60
    (day / "N20031221G050000.png").symlink_to(day / "gone.png")
    out = tmp_path / "out"
    s = run_preprocess(root, out, scheduler=scheduler)
    assert s.scan_errors == 2 and "2 files named like frames are not frames" in s.line()
    err = pd.read_parquet(out / "errors.parquet").set_index("path")
    rel = day.relative_to(root).as_posix()
    assert err.loc[f"{rel}/N20031221G046001.png", "error"] == "NoTimestamp"
    assert err.loc[f"{rel}/N20031221G050000.png", "error"] == "BrokenLink"
    assert set(err["stage"]) == {"scan"}
    # The link repaired: its row leaves the table on the next run, the other stays.
    (day / "N20031221G050000.png").unlink()
    again = run_preprocess(root, out, scheduler=scheduler)
    assert again.scan_errors == 1
    assert list(pd.read_parquet(out / "errors.parquet")["path"]) == [f"{rel}/N20031221G046001.png"]


def test_a_newer_input_is_redone(archive, tmp_path, scheduler):
    root, frames = archive
    out = tmp_path / "out"
    run_preprocess(root, out, scheduler=scheduler)
    target = out / frames[5].relative_to(root)
    stamp = target.stat().st_mtime_ns
    os.utime(frames[5], ns=(stamp + 10**9, stamp + 10**9))
    s = run_preprocess(root, out, scheduler=scheduler)
    assert (s.written, s.up_to_date) == (1, 11)
    assert target.stat().st_mtime_ns > stamp


def test_manifest_input_and_npy_format(archive, tmp_path, scheduler):
    root, frames = archive
    manifest, _ = scan(root, TINY)
    write_manifest(manifest, tmp_path / "manifest.parquet")
    out = tmp_path / "npy"
    s = run_preprocess(tmp_path / "manifest.parquet", out, fmt="npy", scheduler=scheduler)
    assert s.written == 12
    for p in frames:
        arr = np.load(out / p.relative_to(root).with_suffix(".npy"))
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, expected(p, root, dtype="float32"))


def test_explicit_dark_and_bias_fallback(archive, tmp_path, scheduler):
    root, frames = archive
    dark = root / "calib" / "dark_20041201.png"
    out = tmp_path / "one-dark"
    run_preprocess(root, out, dark=dark, scheduler=scheduler)
    calib = calibration_from_station(TINY, dark=read_frame(dark), dtype="uint8")
    got = read_frame(out / frames[0].relative_to(root))
    np.testing.assert_array_equal(got, preprocess(read_frame(frames[0]), calib))
    # without any dark frame the bias comes from the corners
    (root / "calib" / "dark_20031201.png").unlink()
    (root / "calib" / "dark_20041201.png").unlink()
    s = run_preprocess(root, tmp_path / "bias", scheduler=scheduler)
    assert "bias from the unlit corners" in s.line()
    params = json.loads((tmp_path / "bias" / "_run.json").read_text())
    assert params["settings"]["dark"]["mode"] == "none"


def test_user_mistakes_are_clear_errors(archive, tmp_path):
    root, _ = archive
    dark = root / "calib" / "dark_20031201.png"
    with pytest.raises(InputError, match="not both"):
        run_preprocess(root, tmp_path / "o", dark=dark, dark_dir=root / "calib")
    with pytest.raises(InputError, match="must not be the input"):
        run_preprocess(root, root / "pre")
    with pytest.raises(ConfigError, match="dark frame is 64x64"):
        run_preprocess(root, tmp_path / "o", station="yrs", dark=dark)
    # other settings into a folder that holds outputs of different ones
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "_run.json").write_text(
        json.dumps(
            {
                "command": "preprocess",
                "settings": {"calibration": {"crop_size": 1}, "dark": {}, "format": "png"},
                "finished": True,
            }
        )
    )
    with pytest.raises(InputError, match="other settings"):
        run_preprocess(root, tmp_path / "o2")
    # two runs into one folder at once: the second refuses instead of racing the first

    (tmp_path / "o3").mkdir()
    with open(tmp_path / "o3" / ".preprocess.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another preprocess run"):
            run_preprocess(root, tmp_path / "o3")


def test_dark_source_by_date(archive):
    root, _ = archive
    d = DarkSource("dir", str(root / "calib"))
    assert Path(d.path_for(pd.Timestamp("2004-01-10", tz="UTC"))).name == "dark_20031201.png"
    assert Path(d.path_for(pd.Timestamp("2005-01-10", tz="UTC"))).name == "dark_20041201.png"
    assert DarkSource().path_for(pd.Timestamp("2005-01-10", tz="UTC")) is None


def test_labelled_set_is_carried_over(tmp_path, scheduler):
    root, frames = tmp_path / "set", []
    arch = make_archive(tmp_path / "raw", n=8)
    (root / "calib").mkdir(parents=True)
    for f in (tmp_path / "raw" / "calib").iterdir():
        (root / "calib" / f.name).write_bytes(f.read_bytes())
    rows = []
    for k, src in enumerate(arch):
        label = ("arc", "drapery", "radial", "hotspot")[k % 4]
        dst = root / label / src.name
        dst.parent.mkdir(exist_ok=True)
        dst.write_bytes(src.read_bytes())
        frames.append(dst)
        t = pd.to_datetime(src.stem, format="N%Y%m%dG%H%M%S", utc=True)
        rows.append({"path": f"{label}/{src.name}", "label": label, "time_utc": t, "winter": 0})
    pd.DataFrame(rows).to_parquet(root / "labels.parquet")
    out = tmp_path / "pre"
    s = run_preprocess(root, out, scheduler=scheduler)
    assert s.written == 8
    labels = pd.read_parquet(out / "labels.parquet")
    assert list(labels.columns) == ["path", "label", "time_utc", "winter"]
    assert list(labels["path"]) == [r["path"] for r in rows]
    for rel, src in zip(labels["path"], frames):
        np.testing.assert_array_equal(read_frame(out / rel), expected(src, root))
    assert (out / "calib" / "station.yaml").is_file()
    assert not list((out / "calib").glob("dark_*"))
    # The output is a labelled set the training code reads; its frames pass through unchanged.

    ds = open_labelled(out)
    img, target = ds[1]
    np.testing.assert_array_equal(img, read_frame(out / labels["path"][1]) / np.float32(255))
    assert target == 1
    before = mtimes(out)
    run_preprocess(root, out, scheduler=scheduler)
    assert mtimes(out) == before


def test_real_preprocessed_frames_pass_through(shared_data, tmp_path, scheduler):
    yrs = shared_data / "yrs"
    files = sorted(yrs.glob("N*.jpg"))
    pd.DataFrame({"path": [str(f) for f in files]}).to_csv(tmp_path / "list.csv", index=False)
    s = run_preprocess(tmp_path / "list.csv", tmp_path / "out", station="yrs", scheduler=scheduler)
    assert s.passed_through == 5 and s.failed == 0
    assert "passed through" in s.line()
    for f in files:
        (got,) = [p for p in (tmp_path / "out").rglob(f.stem + ".png")]
        np.testing.assert_array_equal(read_frame(got), read_frame(f))


def test_killed_run_resumes_to_the_full_correct_set(tmp_path, scheduler):
    root = tmp_path / "archive"
    frames = make_archive(root, n=100, seed=5)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "preprocess", str(root), "--out", str(out)]
    cmd += ["--workers", "1", "--chunk-size", "1"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the dask workers too
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.rglob("N*.png"))) >= 10:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    # Count once every process of the group (the dask workers too) is gone, not after a fixed
    # sleep: a killed worker mid-rename could otherwise still add a frame, however loaded.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    n_before = len(list(out.rglob("N*.png")))
    assert 10 <= n_before < 100, "the run was not killed halfway"
    # What a kill in the middle of a write leaves behind: a temporary file beside the outputs.
    stale = frames[-1].relative_to(root).parent
    (out / stale).mkdir(parents=True, exist_ok=True)
    (out / stale / f".{frames[-1].name}.x1y2.part").write_bytes(b"\x89PNG half")

    s = run_preprocess(root, out, scheduler=scheduler)
    assert s.written == 100 - n_before and s.up_to_date == n_before and s.failed == 0
    assert not list(out.rglob("*.part"))

    clean = tmp_path / "clean"
    run_preprocess(root, clean, scheduler=scheduler)
    a, b = outputs(out), outputs(clean)
    assert sorted(a) == sorted(b) and len(a) == 100
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_cli_runs_the_stage(archive, tmp_path, scheduler, capsys):
    root, _ = archive
    main(["preprocess", str(root), "--out", str(tmp_path / "cli"), "--scheduler", scheduler])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("preprocess: 12 frames, 12 written")
    with pytest.raises(SystemExit) as exc:
        main(["preprocess", str(root), "--out", str(root)])
    assert exc.value.code == 1
    assert "Traceback" not in capsys.readouterr().err


def test_synthetic_archive_and_labelled_set(tiny_archive, tiny_labelled, tmp_path, scheduler):
    station = load_station(tiny_archive / "calib" / "station.yaml")
    manifest = load_manifest(tiny_archive, station)
    s = run_preprocess(tiny_archive, tmp_path / "a", scheduler=scheduler)
    assert s.written == len(manifest) == 60 and s.failed == 0
    assert "dark frames by date" in s.line()
    for rel in manifest["path"]:
        img = read_frame(tmp_path / "a" / rel)
        assert img.shape == (station.crop_size,) * 2 and img.dtype == np.uint8

    s = run_preprocess(tiny_labelled, tmp_path / "l", scheduler=scheduler)
    assert s.written == 80
    raw, pre = open_labelled(tiny_labelled), open_labelled(tmp_path / "l")
    assert len(pre) == 80 and list(pre.targets) == list(raw.targets)
    # training on the written 8-bit set sees the same frames as preprocessing on the fly: the
    # 8-bit rounding (0.5/255) plus float32 roundings of values <= 1 (v*255, q/255: <= 3u)
    for i in (0, 41, 79):
        np.testing.assert_allclose(pre.frame(i), raw.frame(i), atol=0.5 / 255 + bounds.gamma(3))


def test_multi_frame_pgm_stacks_get_one_output_per_frame(shared_data, tmp_path, scheduler):
    src = shared_data / "themis" / "20140310_0605_gill_themis19_full.pgm"
    pd.DataFrame({"path": [str(src)]}).to_csv(tmp_path / "list.csv", index=False)
    out = tmp_path / "out"
    s = run_preprocess(tmp_path / "list.csv", out, station="themis_gill", scheduler=scheduler)
    assert s.written == 20 and s.failed == 0
    got = sorted(p.name for p in out.rglob("*.png"))
    assert got == [f"20140310_0605_gill_themis19_full_f{i:03d}.png" for i in range(20)]
    stack, _ = read_pgm_stack(src)
    calib = calibration_from_station(load_station("themis_gill"), dtype="uint8")
    (f7,) = out.rglob("*_f007.png")
    np.testing.assert_array_equal(read_frame(f7), preprocess(stack[7], calib))


@pytest.mark.parametrize(
    "plant",
    [
        lambda d: (d / "_run.json").write_text(json.dumps({"command": "train", "finished": True})),
        lambda d: (d / "model.safetensors").write_bytes(b"weights"),
    ],
)
@pytest.mark.parametrize("fmt", ["png", "zarr"])
def test_preprocess_refuses_an_out_of_another_stage(archive, tmp_path, plant, fmt):
    """`preprocess X --out CKPT_DIR` would write frames among a checkpoint's files: refused."""
    root, _ = archive
    out = tmp_path / "ckpt"
    out.mkdir()
    plant(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InputError, match=str(out)):
        run_preprocess(root, out, fmt=fmt, scheduler="tcp://127.0.0.1:1")  # never contacted
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_an_interrupted_preprocess_never_claims_to_have_finished(
    archive, tmp_path, scheduler, monkeypatch
):
    root, _ = archive
    out = tmp_path / "out"
    run_preprocess(root, out, scheduler=scheduler)
    assert json.loads((out / "_run.json").read_text())["finished"] is True
    newer = root / "2003" / "20031221" / "N20031221G030000.png"
    os.utime(newer, ns=(2**62, 2**62))  # newer than its output: redone
    with monkeypatch.context() as m:
        m.setattr(preprocess_stage, "run_chunks", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_preprocess(root, out, scheduler=scheduler)
    assert json.loads((out / "_run.json").read_text())["finished"] is False
    s = run_preprocess(root, out, scheduler=scheduler)  # the rerun finishes it
    assert s.written == 1 and json.loads((out / "_run.json").read_text())["finished"] is True
    fresh = tmp_path / "fresh"
    with monkeypatch.context() as m:
        m.setattr(preprocess_stage, "_clean_partials", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_preprocess(root, fresh, scheduler=scheduler)
    assert (
        not (fresh / "_run.json").exists()
        or not json.loads((fresh / "_run.json").read_text())["finished"]
    )
