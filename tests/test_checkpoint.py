"""Checkpoints: round trip, refusal of other classes/variants, corrupt files, pickle safety."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import shutil

import bounds
import pytest
import torch

from pipeline.checkpoint import (
    LEGACY_WEIGHTS_NAME,
    META_NAME,
    WEIGHTS_NAME,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from pipeline.classes import CLASSES
from pipeline.errors import CheckpointError
from pipeline.models import build_model


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A ResNet-18 checkpoint (45 MB: the cheapest variant to write) and its model."""
    torch.manual_seed(0)
    model = build_model("resnet18", input_size=64).eval()
    out = tmp_path_factory.mktemp("ckpt") / "resnet"
    save_checkpoint(out, model, {"preprocess": {"crop_size": 440}, "metrics": {"val_acc": 0.7}})
    return out, model


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_round_trip_same_outputs_and_schedule_state(tmp_path):
    torch.manual_seed(1)
    model = build_model("stn-lsoftmax-alexnet", input_size=64, lsoftmax_m=4)
    for _ in range(7):
        model.lsoftmax.step()
    model.eval()
    model_id = save_checkpoint(tmp_path / "ck", model, {"train_config": {"lr": 0.01}})
    weights = tmp_path / "ck" / WEIGHTS_NAME
    assert model_id == hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.endswith(".part")]
    loaded, meta = load_checkpoint(tmp_path / "ck", variant="stn-lsoftmax-alexnet")
    assert not loaded.training
    assert meta["model_id"] == model_id and meta["variant"] == "stn-lsoftmax-alexnet"
    assert meta["classes"] == list(CLASSES) and meta["input_size"] == 64 and meta["in_chans"] == 1
    assert meta["train_config"] == {"lr": 0.01} and meta["torch_version"] == torch.__version__
    assert meta["backbone"] == "alexnet" and meta["model_input"]["std"] == 0.25
    assert loaded.lsoftmax.margin == 4 and int(loaded.lsoftmax.schedule.iteration) == 7
    assert loaded.lsoftmax.schedule.count == 7 and loaded.lsoftmax.lam == model.lsoftmax.lam
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.features(x), model.features(x))


def test_meta_is_kept_and_readable(small_ckpt):
    path, _ = small_ckpt
    meta = read_meta(path)
    assert meta == read_meta(path / WEIGHTS_NAME)
    assert meta["preprocess"] == {"crop_size": 440} and meta["metrics"] == {"val_acc": 0.7}
    assert meta["feature_dim"] == 512  # ResNet-18's pooled feature, not FC7
    model, meta2 = load_checkpoint(path / WEIGHTS_NAME)  # the weights file itself can be named
    assert meta2 == meta and model.variant == "resnet18"
    assert set(meta) >= {"variant", "backbone", "classes", "input_size", "preprocess", "model_id"}


def test_refuses_other_variant_or_classes(small_ckpt):
    path, _ = small_ckpt
    with pytest.raises(CheckpointError, match=r"variant 'resnet18', not the 'alexnet' asked for"):
        load_checkpoint(path, variant="alexnet")
    other = ("arc", "drapery", "hotspot", "radial")
    with pytest.raises(CheckpointError, match=r"classes .* differ from the expected") as info:
        load_checkpoint(path, classes=other)
    assert str(path) in str(info.value) and "hotspot" in str(info.value)
    model, _ = load_checkpoint(path, classes=None)  # None skips the check
    assert model.variant == "resnet18"


def test_refuses_missing_or_corrupt_meta(small_ckpt, tmp_path):
    path, _ = small_ckpt
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_checkpoint(tmp_path / "nothing")
    d = _copy(path, tmp_path)
    (d / META_NAME).write_text("{ not json")
    with pytest.raises(CheckpointError, match="unreadable meta.json"):
        load_checkpoint(d)
    (d / META_NAME).write_text(json.dumps({"variant": "alexnet"}))
    with pytest.raises(CheckpointError, match="lacks backbone, classes"):
        read_meta(d)
    (d / META_NAME).unlink()
    with pytest.raises(CheckpointError, match="meta.json missing"):
        load_checkpoint(d)


def test_refuses_weights_that_do_not_fit(small_ckpt, tmp_path):
    path, _ = small_ckpt
    d = _copy(path, tmp_path)
    meta = json.loads((d / META_NAME).read_text())
    meta["variant"] = "alexnet"  # same weights, wrong architecture
    (d / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"weights do not fit variant 'alexnet'.*missing"):
        load_checkpoint(d)
    # replaced weights no longer match model_id
    meta["variant"] = "resnet18"
    (d / META_NAME).write_text(json.dumps(meta))
    (d / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="does not match meta.json model_id"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(d, verify=False)


def _legacy_dir(src, tmp_path, payload) -> tuple:
    d = tmp_path / "legacy"
    d.mkdir()
    meta = json.loads((src / META_NAME).read_text())
    torch.save(payload, d / LEGACY_WEIGHTS_NAME)
    meta["model_id"] = hashlib.sha256((d / LEGACY_WEIGHTS_NAME).read_bytes()).hexdigest()[:16]
    (d / META_NAME).write_text(json.dumps(meta))
    return d


def test_legacy_pt_state_dict_loads(small_ckpt, tmp_path):
    path, model = small_ckpt
    d = _legacy_dir(path, tmp_path, model.state_dict())
    loaded, _ = load_checkpoint(d)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class _Marker:
    """Unpickling this calls open(marker, 'w'): creating the file proves code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _Custom:
    def __init__(self):
        self.value = 1


def test_pickled_objects_are_refused_without_running_them(small_ckpt, tmp_path):
    path, model = small_ckpt
    marker = tmp_path / "code-ran"
    state = dict(model.state_dict())
    state["evil"] = _Marker(marker)
    d = _legacy_dir(path, tmp_path, state)
    with pytest.raises(CheckpointError, match="refused: it holds pickled Python objects") as err:
        load_checkpoint(d)
    assert "weights_only=False" not in str(err.value) and "weights_only` set" not in str(err.value)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it (so the check above can fail)
    live = tmp_path / "live"
    live_file = tmp_path / "live.pkl"
    live_file.write_bytes(pickle.dumps(_Marker(live)))
    pickle.loads(live_file.read_bytes()).close()
    assert live.exists()
    # a custom class instance is refused as well
    shutil.rmtree(d)
    d = _legacy_dir(path, tmp_path, {"weights": torch.zeros(1), "obj": _Custom()})
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(d)


def test_wrapped_models_save_plain_keys(small_ckpt, tmp_path):
    _, model = small_ckpt
    compiled = torch.compile(model)  # not run: only the wrapper and its "_orig_mod." keys
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save_checkpoint(tmp_path / "c", torch.nn.DataParallel(compiled), {})
    loaded, meta = load_checkpoint(tmp_path / "c")
    assert meta["variant"] == "resnet18"
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_save_checks_its_inputs(small_ckpt, tmp_path):
    _, model = small_ckpt
    with pytest.raises(CheckpointError, match="build_model"):
        save_checkpoint(tmp_path / "x", torch.nn.Linear(2, 2), {})
    with pytest.raises(CheckpointError, match="do not match the model's 4 outputs"):
        save_checkpoint(tmp_path / "x", model, {"classes": ["a", "b"]})


@pytest.mark.gpu
def test_load_onto_cuda(small_ckpt):
    path, model = small_ckpt
    loaded, _ = load_checkpoint(path, map_location="cuda")
    assert next(loaded.parameters()).is_cuda
    x = torch.randn(2, 1, 64, 64)
    # Both float32 runs against the float64 model: cuDNN's TF32 (on by default for convolutions,
    # 2^-11 unit roundoff) is switched off so that the float32 bounds apply on the GPU too.
    worst, prob = bounds.forward_error_bound(model, x)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        exact = copy.deepcopy(model).double()(x.double())
        for out in (loaded(x.cuda()).cpu(), model(x)):
            err = (out.double() - exact).abs()
            assert (err <= worst).all()  # ~0.16 on logits of ~0.5: far too loose alone ...
            assert (err <= prob).all()  # ... the probabilistic one (~3e-4) is not


def test_preprocess_mismatch_names_what_changed_since_training():
    import dataclasses

    from pipeline.checkpoint import preprocess_mismatch
    from pipeline.config import load_station
    from pipeline.preprocess import calibration_from_station

    yrs = load_station("yrs")
    meta = {"preprocess": {"calibration": calibration_from_station(yrs.scaled(64)).params()}}
    # the same camera at another frame size: crop and centre differ, nothing that matters
    assert preprocess_mismatch(meta, calibration_from_station(yrs).params()) == []
    rotated = dataclasses.replace(
        yrs, preprocess=dataclasses.replace(yrs.preprocess, rotate=True, stretch_high=3000.0)
    )
    diff = preprocess_mismatch(meta, calibration_from_station(rotated).params())
    assert diff == [
        "stretch_high: trained 4000.0, now 3000.0",
        "rotate_deg: trained None, now 61.11",
    ]
    assert preprocess_mismatch({}, calibration_from_station(rotated).params()) == []


def test_unfinished_checkpoints_are_warned_about_once(caplog):
    import logging

    from pipeline.checkpoint import unfinished_note, warn_if_unfinished

    half = {"epochs_done": 4, "epochs_planned": 40, "finished": False}
    note = (
        "ck/alex is from an unfinished training run (epoch 4 of 40): resume it with train --resume"
    )
    assert unfinished_note(half, "ck/alex") == note
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert warn_if_unfinished(half, "ck/alex") is True
        # finished (all epochs or an early stop) and old checkpoints without the keys: silent
        assert warn_if_unfinished({**half, "epochs_done": 40, "finished": True}, "x") is False
        assert warn_if_unfinished({"epochs_done": 4, "epochs_planned": 40}, "x") is False
        assert warn_if_unfinished({}, "x") is False
    assert [r.getMessage() for r in caplog.records] == [note]
    assert caplog.records[0].levelno == logging.WARNING


def test_stn_padding_is_recorded_and_older_checkpoints_keep_theirs(tmp_path):
    from pipeline.models.build import INPUT_BLACK

    save_checkpoint(tmp_path / "new", build_model("stn-alexnet", input_size=64), {})
    loaded, meta = load_checkpoint(tmp_path / "new")
    assert meta["build"]["stn_fill"] == INPUT_BLACK and loaded.stn.fill == INPUT_BLACK
    # a checkpoint written before stn_fill was recorded: its STN padded with 0 (mid-grey)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    m = json.loads((old / "meta.json").read_text())
    del m["build"]["stn_fill"]
    (old / "meta.json").write_text(json.dumps(m))
    loaded, _ = load_checkpoint(old)
    assert loaded.stn.fill == 0.0


def test_checkpoint_and_models_build_do_not_import_each_other():
    """Both read weights through pipeline.models.weights: no import cycle between them."""
    import ast
    from pathlib import Path

    import pipeline

    root = Path(pipeline.__file__).parent

    def imported(rel: str) -> set[str]:
        tree = ast.parse((root / rel).read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                names |= {a.name for a in n.names}
        return names

    assert "pipeline.checkpoint" not in imported("models/build.py")
    assert "pipeline.checkpoint" not in imported("models/weights.py")
    assert "pipeline.models.weights" in imported("checkpoint.py")


def test_read_state_dict_refuses_pickled_objects_and_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    from pipeline.models.weights import read_state_dict

    save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["w"], torch.ones(2))
    torch.save({"w": torch.ones(2), "note": copy.copy}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match="never unpickled here"):
        read_state_dict(tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match="init weights file not found"):
        read_state_dict(tmp_path / "none.pt", what="init weights")
