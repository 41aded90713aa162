"""SimCLR pre-training: the loss, a few steps on tiny frames, and --init-from its checkpoint."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.checkpoint import init_from_checkpoint, read_meta, save_checkpoint
from pipeline.errors import CheckpointError, InputError
from pipeline.models import build_model
from pipeline.pretrain import PretrainConfig, nt_xent, pretrain
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
