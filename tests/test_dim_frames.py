"""scripts/dim_frames.py: archive frames dimmer than every labelled frame, and --min-prob."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.classes import CLASSES
from pipeline.predictions import shard_path
from pipeline.storage import PREDICTIONS_SCHEMA, write_table

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dim_frames.py"


def _frame(path: Path, level: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((44, 44), level, np.uint8)).save(path)
    return path.name


def _predictions(out: Path, rows: list[tuple[str, str, float]]) -> None:
    df = pd.DataFrame({"path": [r[0] for r in rows], "frame": 0, "mlt": 9.0, "model_id": "m"})
    df["time_utc"] = pd.Timestamp("2003-12-21 03:00")
    df["label"] = pd.Categorical([r[1] for r in rows], categories=list(CLASSES))
    for c in CLASSES:  # the named class gets p, the others share the rest
        df[f"p_{c}"] = [np.float32(p if lab == c else (1 - p) / 3) for _, lab, p in rows]
    write_table(df, shard_path(out, 0), PREDICTIONS_SCHEMA)


def test_dim_frames_are_counted_with_their_class_and_confidence(tmp_path):
    lab = tmp_path / "labelled"
    names = [_frame(lab / f"{i}.png", level) for i, level in enumerate((80, 100))]
    pd.DataFrame({"path": names, "label": ["arc", "radial"]}).to_parquet(lab / "labels.parquet")
    arch = tmp_path / "archive"
    rows = [
        (_frame(arch / "empty.png", 10), "radial", 0.9),  # dimmer than both labelled frames
        (_frame(arch / "faint.png", 79), "arc", 0.5),  # dimmer, and not sure
        (_frame(arch / "bright.png", 120), "drapery", 0.7),
    ]
    _predictions(tmp_path / "pred", rows)
    args = [sys.executable, str(SCRIPT), str(tmp_path / "pred"), str(arch), str(lab)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert "dimmest labelled frame: sky mean 80.0; archive frames dimmer: 2" in out
    assert "| dimmer than every labelled frame | 2 | 1 | 0 | 1 | 0 |" in out
    assert "| ... of those, p >= 0.6 | 1 | 0 | 0 | 1 | 0 |" in out
    assert "| p >= 0.6 | 2 | 0 | 1 | 1 | 0 |" in out
    assert "| p >= 0.6, not dimmer | 1 | 0 | 1 | 0 | 0 |" in out


def test_a_wrong_folder_is_one_line_naming_it(tmp_path):
    lab = tmp_path / "labelled"
    pd.DataFrame({"path": [_frame(lab / "0.png", 80)], "label": ["arc"]}).to_parquet(
        lab / "labels.parquet"
    )
    empty = tmp_path / "not_predictions"
    empty.mkdir()
    for pred, labelled, named in [(empty, lab, empty), (empty, tmp_path / "nowhere", "nowhere")]:
        args = [sys.executable, str(SCRIPT), str(pred), str(tmp_path), str(labelled)]
        run = subprocess.run(args, capture_output=True, text=True)
        assert run.returncode == 1 and "Traceback" not in run.stderr
        assert run.stderr.startswith("dim_frames: ") and str(named) in run.stderr
