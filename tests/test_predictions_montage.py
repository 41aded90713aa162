"""scripts/predictions_montage.py: the confidence montage and the frames below the sky floor."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.classes import CLASSES
from pipeline.predictions import shard_path
from pipeline.storage import PREDICTIONS_SCHEMA, write_table

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "predictions_montage.py"


def _script():
    spec = importlib.util.spec_from_file_location("predictions_montage", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _folder(tmp_path: Path, sky: np.ndarray, record: dict | None) -> tuple[Path, Path]:
    """An archive of uniform frames and a predictions folder with their sky levels."""
    root = tmp_path / "archive"
    root.mkdir()
    n = len(sky)
    names = [f"f{i:02d}.png" for i in range(n)]
    for name, level in zip(names, sky):
        Image.fromarray(np.full((40, 40), int(level * 255), np.uint8)).save(root / name)
    times = pd.Timestamp("2003-12-21 03:00", tz="UTC") + pd.to_timedelta(
        np.random.default_rng(0).permutation(n) * 10, unit="s"
    )
    df = pd.DataFrame({"path": names, "frame": 0, "time_utc": times, "mlt": 9.0})
    df["label"] = pd.Categorical(["radial"] * n, categories=list(CLASSES))
    for c in CLASSES:
        df[f"p_{c}"] = np.float32(0.7 if c == "radial" else 0.1)
    df["sky_level"] = np.asarray(sky, np.float32)
    df["model_id"] = "m"
    pred = tmp_path / "pred"
    write_table(df, shard_path(pred, 0), PREDICTIONS_SCHEMA)
    (pred / "_run.json").write_text(json.dumps({"shards": {"0": {}}, **(record or {})}))
    return pred, root


def test_below_sky_samples_only_frames_under_the_floor_in_time_order(tmp_path):
    sky = np.linspace(0.0, 0.5, 50)
    pred, root = _folder(tmp_path, sky, {"train_sky_level": {"min": 0.2}})
    mod = _script()
    frames = pd.read_parquet(shard_path(pred, 0))
    frames["pmax"] = 0.7
    rows, title = mod.below_sky(frames, 0.2, per_row=4)
    shown = pd.concat(rows)
    below = int((frames["sky_level"] < 0.2).sum())
    assert len(shown) == min(below, 4 * len(mod.QUANTILES)) and (shown["sky_level"] < 0.2).all()
    assert shown["time_utc"].is_monotonic_increasing and f"{below} of 50 frames" in title
    again = pd.concat(mod.below_sky(frames, 0.2, per_row=4)[0])
    assert again["path"].tolist() == shown["path"].tolist()  # seeded
    out = tmp_path / "m.png"
    args = [sys.executable, str(SCRIPT), str(pred), str(root), str(out), "--below-sky"]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 1000


def test_below_sky_without_the_models_range_is_one_line(tmp_path):
    pred, root = _folder(tmp_path, np.linspace(0.0, 0.5, 8), None)
    args = [sys.executable, str(SCRIPT), str(pred), str(root), str(tmp_path / "m.png")]
    run = subprocess.run([*args, "--below-sky"], capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("predictions_montage: ") and "--min-sky" in run.stderr
    assert not (tmp_path / "m.png").exists()
    # the confidence montage needs no sky record
    assert subprocess.run(args, capture_output=True, text=True).returncode == 0


def test_no_sky_levels_or_a_missing_frame_is_one_line(tmp_path):
    pred, root = _folder(tmp_path, np.linspace(0.0, 0.5, 8), {"train_sky_level": {"min": 0.2}})
    shard = shard_path(pred, 0)
    write_table(pd.read_parquet(shard).drop(columns="sky_level"), shard, PREDICTIONS_SCHEMA)
    args = [sys.executable, str(SCRIPT), str(pred), str(root), str(tmp_path / "m.png")]
    run = subprocess.run([*args, "--below-sky"], capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "no sky_level" in run.stderr and "classify again" in run.stderr
    (root / "f03.png").unlink()  # the confidence montage shows every frame of 8 at per-row 8
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("predictions_montage: ") and "f03.png" in run.stderr
    assert not (tmp_path / "m.png").exists()
