"""Evaluation: metrics from hand-made predictions, the on-disk outputs, the figure."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.classes import CLASSES
from pipeline.errors import InputError
from pipeline.evaluate import (
    confusion_table,
    metrics_from_predictions,
    metrics_table,
    read_confusion,
    write_evaluation,
)

# 10 frames: arc 4 (3 right, 1 -> drapery), drapery 3 (all right), radial 2 (1 right, 1 ->
# hotspot), hotspot 1 (-> radial).
Y_TRUE = ["arc"] * 4 + ["drapery"] * 3 + ["radial"] * 2 + ["hotspot"]
Y_PRED = ["arc", "arc", "arc", "drapery", "drapery", "drapery", "drapery", "radial", "hotspot"]
Y_PRED = Y_PRED + ["radial"]


def test_metrics_match_hand_counts():
    m = metrics_from_predictions(Y_TRUE, Y_PRED)
    assert m["n"] == 10 and m["correct"] == 7
    assert m["average_accuracy"] == pytest.approx(0.7)
    assert m["per_class_accuracy"] == pytest.approx(
        {"arc": 0.75, "drapery": 1.0, "radial": 0.5, "hotspot": 0.0}
    )
    assert m["per_class_n"] == {"arc": 4, "drapery": 3, "radial": 2, "hotspot": 1}
    expected = np.array([[3, 1, 0, 0], [0, 3, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]])
    np.testing.assert_array_equal(m["confusion"].to_numpy(), expected)
    assert list(m["confusion"].index) == list(CLASSES)
    assert list(m["confusion"].columns) == list(CLASSES)
    np.testing.assert_allclose(m["confusion_normalised"].sum(axis=1), 1.0)
    assert m["confusion_normalised"].loc["arc", "drapery"] == pytest.approx(0.25)
    assert m["mean_class_accuracy"] == pytest.approx((0.75 + 1 + 0.5 + 0) / 4)


def test_indices_and_names_agree():
    idx_t = [CLASSES.index(c) for c in Y_TRUE]
    idx_p = np.array([CLASSES.index(c) for c in Y_PRED])
    a = metrics_from_predictions(Y_TRUE, Y_PRED)
    b = metrics_from_predictions(idx_t, idx_p)
    pd.testing.assert_frame_equal(a["confusion"], b["confusion"])


def test_absent_class_is_nan_not_zero():
    m = metrics_from_predictions(["arc", "arc", "radial"], ["arc", "radial", "radial"])
    assert math.isnan(m["per_class_accuracy"]["drapery"])
    assert m["per_class_n"]["drapery"] == 0
    assert m["mean_class_accuracy"] == pytest.approx(0.75)
    assert m["confusion_normalised"].loc["drapery"].isna().all()


def test_bad_inputs_are_clear():
    with pytest.raises(InputError, match="unknown class 'aurora'.*allowed classes: arc"):
        metrics_from_predictions(["arc", "aurora"], ["arc", "arc"])
    with pytest.raises(InputError, match="outside 0..3"):
        metrics_from_predictions([0, 4], [0, 0])
    with pytest.raises(InputError, match="2 entries but y_pred has 1"):
        metrics_from_predictions(["arc", "arc"], ["arc"])


def test_confusion_table_layout_round_trips(tmp_path):
    m = metrics_from_predictions(Y_TRUE, Y_PRED)
    tab = confusion_table(m["confusion"])
    assert list(tab.columns) == ["true", *CLASSES]
    assert tab["true"].tolist() == list(CLASSES)
    tab.to_parquet(tmp_path / "c.parquet")
    back = read_confusion(tmp_path / "c.parquet")
    pd.testing.assert_frame_equal(back, m["confusion"], check_names=False)


def test_write_evaluation_outputs(tmp_path):
    m = metrics_from_predictions(Y_TRUE, Y_PRED)
    result = {
        "variant": "alexnet",
        **m,
        "timing": {
            "device": "cpu: test",
            "what": "forward",
            "input_size": 64,
            "batch_size": 8,
            "ms_per_image_batch1": 2.5,
            "ms_per_image_batch": 1.25,
        },
    }
    write_evaluation(result, tmp_path / "ev")
    js = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert js["average_accuracy"] == pytest.approx(0.7)
    assert js["confusion"][0] == [3, 1, 0, 0]
    assert js["timing"]["ms_per_image_batch1"] == 2.5
    md = (tmp_path / "ev" / "metrics.md").read_text()
    assert "| arc accuracy | 0.750 |" in md
    assert "| **Average accuracy** | 0.700 |" in md
    assert "2.50" in md
    conf = pd.read_parquet(tmp_path / "ev" / "confusion.parquet")
    assert conf.loc[conf["true"] == "radial", "hotspot"].item() == 1
    png = (tmp_path / "ev" / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_table_has_one_column_per_method():
    a = metrics_from_predictions(Y_TRUE, Y_PRED)
    b = metrics_from_predictions(Y_TRUE, Y_TRUE)
    md = metrics_table({"AlexNet": a, "STN-AlexNet": b})
    assert md.splitlines()[0] == "| Method | AlexNet | STN-AlexNet |"
    assert "| hotspot corona accuracy | 0.000 | 1.000 |" in md


@pytest.mark.parametrize(
    ("progress", "warned"),
    [
        ({"epochs_done": 4, "epochs_planned": 40, "finished": False}, True),
        ({"epochs_done": 40, "epochs_planned": 40, "finished": True}, False),
        ({}, False),  # written before meta.json recorded training progress
    ],
)
def test_evaluate_warns_once_about_an_unfinished_checkpoint(
    tmp_path, tiny_labelled, caplog, progress, warned
):
    import logging

    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.evaluate import evaluate_checkpoint
    from pipeline.models import build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, build_model("resnet18", input_size=64), {**progress})
    with caplog.at_level(logging.WARNING):
        evaluate_checkpoint(ckpt, tiny_labelled, tmp_path / "ev", device="cpu", timing=False)
    notes = [r.getMessage() for r in caplog.records if "unfinished training run" in r.getMessage()]
    if warned:
        assert notes == [
            f"{ckpt} is from an unfinished training run (epoch 4 of 40): "
            "resume it with train --resume"
        ]
    else:
        assert notes == []
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 80


def test_unreadable_frames_are_recorded_and_left_out(tmp_path, tiny_labelled, caplog):
    """One truncated and one wrong-size frame: evaluated on the other 78, both in errors."""
    import shutil

    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.cli import main
    from pipeline.models import build_model

    data = tmp_path / "set"
    shutil.copytree(tiny_labelled, data)
    paths = pd.read_parquet(data / "labels.parquet")["path"].tolist()
    broken, small = data / paths[3], data / paths[40]
    broken.write_bytes(broken.read_bytes()[:100])
    from pipeline.imageio import write_frame

    write_frame(small, np.zeros((20, 20), np.uint16))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", build_model("alexnet", input_size=64), {})
    main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--out",
          str(tmp_path / "ev"), "--device", "cpu"])  # fmt: skip
    assert "2 of 80 frames could not be read" in caplog.text
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 78 and metrics["n_unreadable"] == 2
    errors = pd.read_parquet(tmp_path / "ev" / "errors.parquet")
    assert sorted(errors["error"]) == ["FrameGeometryError", "FrameReadError"]
    assert all(m.startswith(f"{p}: ") for p, m in zip(errors["path"], errors["message"]))
    assert set(errors["stage"]) == {"evaluate"}
    pred = pd.read_parquet(tmp_path / "ev" / "predictions.parquet")
    assert len(pred) == 78 and not set(pred["path"]) & set(errors["path"])
    assert "2 unreadable frames left out" in (tmp_path / "ev" / "metrics.md").read_text()


# ----------------------------------------------------------------------------- --out folder


def _tiny_checkpoint(path):
    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.models import build_model

    torch.manual_seed(0)
    save_checkpoint(path, build_model("alexnet", input_size=64), {})
    return path


@pytest.mark.parametrize(
    "plant",
    [
        lambda d: (d / "_run.json").write_text(json.dumps({"command": "train"})),
        lambda d: (d / "model.safetensors").write_bytes(b"x"),
    ],
)
def test_evaluate_refuses_another_stages_out_and_leaves_it(tmp_path, tiny_labelled, plant):
    from pipeline.evaluate import evaluate_checkpoint

    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "other"
    out.mkdir()
    plant(out)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(InputError, match=str(out)):
        evaluate_checkpoint(ckpt, tiny_labelled, out, device="cpu", timing=False)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_an_interrupted_evaluate_leaves_no_finished_record(tmp_path, tiny_labelled, monkeypatch):
    """Ctrl-C before the outputs are in: no folder at all when it was new; over an earlier
    run, that run's outputs and record as they were (never a record without its results)."""
    import pipeline.evaluate as ev
    from pipeline.output_folder import is_finished, read_run_record

    ckpt = _tiny_checkpoint(tmp_path / "ckpt")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "ev"
    with monkeypatch.context() as m:
        m.setattr(ev, "write_evaluation", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate_checkpoint(ckpt, tiny_labelled, out, device="cpu", timing=False)
    assert not out.exists()
    ev.evaluate_checkpoint(ckpt, tiny_labelled, out, device="cpu", timing=False)
    record = read_run_record(out)
    assert is_finished(out, "evaluate") and record["n"] == 80
    assert record["checkpoint"] == str(ckpt.resolve())
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with monkeypatch.context() as m:
        m.setattr(ev, "metrics_from_predictions", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate_checkpoint(ckpt, tiny_labelled, out, device="cpu", timing=False)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
