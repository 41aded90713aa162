"""SimCLR pre-training: the loss, a few steps on tiny frames, and --init-from its checkpoint."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.checkpoint import init_from_checkpoint, read_meta, save_checkpoint
from pipeline.errors import CheckpointError, ConfigError, InputError
from pipeline.models import build_model
from pipeline.pretrain import PretrainConfig, nt_xent, pretrain, stuck_at_chance
from pipeline.train import TrainConfig, train

TINY = PretrainConfig(variant="alexnet", input_size=64, epochs=1, batch_size=8, max_frames=24)


def test_nt_xent_is_low_for_matching_views_and_high_for_shuffled():
    torch.manual_seed(0)
    z = torch.randn(16, 8)
    same = float(nt_xent(z, z + 0.01 * torch.randn(16, 8), 0.1))
    shuffled = float(nt_xent(z, z[torch.randperm(16)], 0.1))
    assert same < 0.1 < shuffled
    # 2B - 1 candidates, none preferred: log(2B - 1)
    flat = float(nt_xent(torch.ones(4, 3), torch.ones(4, 3), 1.0))
    assert flat == pytest.approx(math.log(7.0), rel=1e-6)


def test_pretrain_checkpoint_starts_a_classifier(tiny_labelled, tmp_path):
    out = tmp_path / "pre"
    res = pretrain(TINY, [tiny_labelled], out)
    assert res["frames"] == 24 and (out / "model.safetensors").is_file()
    meta = read_meta(out)
    assert meta["variant"] == "alexnet" and meta["pretrain"]["method"] == "simclr"
    assert not (out / "pretrain_last.pt").exists()
    # The STN + L-Softmax variant takes the trunk and neck; the STN and head stay its own.
    model = build_model("stn-lsoftmax-alexnet", input_size=64, stn_loc_size=32)
    parts = init_from_checkpoint(model, out)
    assert parts == ["neck", "trunk"]
    pre = build_model("alexnet", input_size=64)
    init_from_checkpoint(pre, out)
    for k, v in pre.state_dict().items():
        if k.startswith("trunk."):
            assert torch.equal(model.state_dict()[k], v)
    # And through train --init-from (one epoch).
    cfg = TrainConfig(variant="stn-lsoftmax-alexnet", input_size=64, epochs=1, batch_size=8,
                      lr=0.001, stn_loc_size=32, val_fraction=0.0, patience=0)  # fmt: skip
    res = train(cfg, tiny_labelled, tmp_path / "ckpt", init_from=out)
    assert read_meta(tmp_path / "ckpt")["init_from"] == str(out.resolve())
    assert res["n_val"] == 0 and res["selected_on"].startswith("last epoch")


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(tmp_path):
    save_checkpoint(tmp_path / "r18", build_model("resnet18", input_size=64))
    model = build_model("stn-lsoftmax-alexnet", input_size=64)
    with pytest.raises(CheckpointError) as exc:
        init_from_checkpoint(model, tmp_path / "r18")
    msg = str(exc.value)
    assert "resnet18" in msg and "stn-lsoftmax-alexnet" in msg and "\n" not in msg


def test_pretrain_refuses_another_config_in_the_same_folder(tiny_labelled, tmp_path):
    out = tmp_path / "pre"
    pretrain(TINY, [tiny_labelled], out)
    with pytest.raises(InputError, match="another config"):
        pretrain(dataclasses.replace(TINY, seed=3), [tiny_labelled], out)


def test_pretrain_refuses_another_stages_out_and_leaves_it(tiny_labelled, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "_run.json").write_text('{"command": "train", "finished": true}')
    (out / "model.safetensors").write_bytes(b"weights")
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(InputError, match="a checkpoint") as err:
        pretrain(TINY, [tiny_labelled], out)
    assert str(out) in str(err.value)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_an_interrupted_pretrain_leaves_no_finished_record(tiny_labelled, tmp_path, monkeypatch):
    import pipeline.pretrain as pre
    from pipeline.output_folder import is_finished, read_run_record

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "pre"
    with monkeypatch.context() as m:
        m.setattr(pre, "load_frames", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pretrain(TINY, [tiny_labelled], out)
    assert not out.exists()
    pretrain(TINY, [tiny_labelled], out)
    assert is_finished(out, "pretrain") and len(read_run_record(out)["history"]) == 1
    with monkeypatch.context() as m:
        m.setattr(pre, "save_checkpoint", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pretrain(TINY, [tiny_labelled], out)
    assert read_run_record(out)["finished"] is False


def test_pretrain_config_refuses_a_head_variant():
    with pytest.raises(ValueError, match="plain backbone"):
        PretrainConfig(variant="stn-lsoftmax-alexnet").validate()


def test_stuck_at_chance_is_the_loss_of_no_preference():
    assert stuck_at_chance(math.log(127), 64) and stuck_at_chance(4.81, 64)
    assert not stuck_at_chance(4.5, 64) and not stuck_at_chance(2.6, 8)


def test_a_run_whose_loss_stays_at_chance_stops_in_one_line(tiny_labelled, tmp_path, monkeypatch):
    import pipeline.pretrain as pre

    # every pair alike, as with a blown-up or collapsed backbone: the loss is ln(2B - 1)
    monkeypatch.setattr(pre, "nt_xent", lambda z1, z2, t: z1.sum() * 0 + math.log(2 * len(z1) - 1))
    cfg = dataclasses.replace(TINY, epochs=5)
    with pytest.raises(ConfigError) as exc:
        pretrain(cfg, [tiny_labelled], tmp_path / "pre")
    msg = str(exc.value)
    assert "learnt nothing in 3 epochs" in msg and "lower lr" in msg and "\n" not in msg
    assert not (tmp_path / "pre" / "model.safetensors").exists()


def test_the_head_centres_features_and_dropout_is_off_while_pretraining(tiny_labelled, tmp_path):
    import pipeline.pretrain as pre

    head = pre.projection_head(16, 4)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())
    run = pre._Pretraining(TINY, torch.device("cpu"))
    x8 = torch.randint(0, 255, (8, 1, 64, 64), dtype=torch.uint8)
    run.epoch(x8, 0)
    drops = [m for m in run.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and not any(m.training for m in drops)
