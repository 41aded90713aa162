"""Training: config validation, the split, augmentation, the CLI end to end, resume, determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import bounds
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.classes import CLASSES
from pipeline.cli import main
from pipeline.config import CONFIG_DIR
from pipeline.errors import ConfigError
from pipeline.folds import group_split
from pipeline.output_folder import is_finished, read_run_record
from pipeline.train import (
    AugmentConfig,
    TrainConfig,
    augment_batch,
    balanced_sampler,
    load_train_config,
    lr_at,
    split_for_config,
    stratified_split,
)

#: Small and quick: the CLI tests train for seconds on 64 px frames.
TINY_CFG = {
    "variant": "stn-lsoftmax-alexnet",
    "input_size": 64,
    "epochs": 1,
    "batch_size": 8,
    "val_batch_size": 8,
    "lr": 0.002,
    "warmup_epochs": 0,
    "scratch_init": "kaiming",
    "stn_loc_size": 32,
    "cache_frames": True,
    "patience": 0,
    "lsoftmax": {"m": 2, "schedule": {"base": 100.0, "gamma": 1.0, "power": 1.0, "floor": 5.0}},
}


def write_cfg(path: Path, **over) -> Path:
    cfg = {**TINY_CFG, **over}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def mini_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 raw 64 px synthetic frames (4 per class): enough for the mechanics, not for learning."""
    from pipeline import synth

    out = tmp_path_factory.mktemp("mini")
    synth.make_labelled(out, n=16, seed=3, winter=2003, balanced=True, size=64)
    return out


# ----------------------------------------------------------------------------- config


def test_shipped_configs_load():
    paper = load_train_config(CONFIG_DIR / "train" / "paper.yaml")
    assert paper.variant == "stn-lsoftmax-alexnet" and paper.input_size == 227
    assert paper.lr == pytest.approx(3e-5) and paper.lsoftmax.m == 3
    assert (paper.batch_size, paper.val_batch_size) == (64, 16)
    assert paper.lsoftmax.schedule.base == 10000 and paper.lsoftmax.schedule.floor == 15
    demo = load_train_config(CONFIG_DIR / "train" / "demo.yaml")
    assert demo.input_size <= 128 and demo.epochs <= 30  # the demo stays small and fast


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"variant": "googlenet"}, r"variant 'googlenet' is not allowed; allowed values: alexnet"),
        ({"lr": -1.0}, r"lr must be > 0"),
        ({"lr": "fast"}, r"lr: expected a number"),
        ({"val_fraction": 1.5}, r"val_fraction must be within"),
        ({"lr_schedule": "step"}, r"lr_schedule: 'step' is not allowed; allowed values"),
        ({"augment": {"rotate": True, "shear": 3}}, r"augment: unknown key 'shear'; allowed keys"),
        ({"lsoftmax": {"m": 0}}, r"lsoftmax.m must be a positive integer"),
        ({"input_size": 32}, r"input_size must be >= 64"),
        ({"split_by": "week"}, r"split_by: 'week' is not allowed; allowed values: 'frame', 'day'"),
        ({"seed": -5}, r"seed must be a non-negative integer, got -5"),
        ({"stn_lr_scale": 0}, r"stn_lr_scale must be > 0, got 0"),
        ({"station": "nosuch"}, r"station: unknown station 'nosuch'; known stations"),
    ],
)
def test_config_errors_name_file_key_and_allowed(tmp_path, over, match):
    p = write_cfg(tmp_path / "bad.yaml", **over)
    with pytest.raises(ConfigError, match=match) as err:
        load_train_config(p)
    assert str(p) in str(err.value)


def test_cli_config_error_is_one_line(tmp_path, mini_set, capsys):
    p = write_cfg(tmp_path / "bad.yaml", epochs=0)
    with pytest.raises(SystemExit) as ex:
        main(["train", "--config", str(p), "--data", str(mini_set), "--out", str(tmp_path / "o")])
    assert ex.value.code == 1
    err = capsys.readouterr().err
    assert "epochs must be >= 1" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- pure pieces


def test_stratified_split_is_4_to_1_per_class_and_seeded():
    labels = np.array(["arc"] * 50 + ["drapery"] * 20 + ["radial"] * 15 + ["hotspot"] * 10)
    tr, va = stratified_split(labels, 0.2, seed=7)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == len(labels)
    for c, n in zip(CLASSES, (50, 20, 15, 10)):
        assert (labels[va] == c).sum() == round(n * 0.2)
    tr2, va2 = stratified_split(labels, 0.2, seed=7)
    np.testing.assert_array_equal(va, va2)
    _, va3 = stratified_split(labels, 0.2, seed=8)
    assert not np.array_equal(va, va3)


def _check_day_split(labels, days, frac=0.2, seed=0, tol=0.05):
    train, val = group_split(labels, days, frac, seed, balance="shares")
    labels, days = np.asarray(labels), np.asarray(days)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert not set(days[train]) & set(days[val]), "a day on both sides"
    for c in set(labels.tolist()):
        share = (labels[val] == c).sum() / (labels == c).sum()
        assert abs(share - frac) <= tol, f"{c}: {share:.3f} of its frames in val"
    return train, val


def test_day_split_keeps_days_whole_and_classes_near_the_fraction():
    """60 days of 10-s frames whose class mix changes from day to day, as real ones do."""
    rng = np.random.default_rng(1)
    labels, days = [], []
    for d in range(60):
        n = int(rng.integers(50, 400))
        mix = rng.dirichlet(np.ones(len(CLASSES)) * 0.7)
        labels += rng.choice(CLASSES, size=n, p=mix).tolist()
        days += [f"2003-12-{d:02d}"] * n
    train, val = _check_day_split(labels, days)
    again, _ = group_split(labels, days, 0.2, 0, balance="shares")
    other, _ = group_split(labels, days, 0.2, 1, balance="shares")
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_day_split_on_the_real_yrs_timeline(shared_data):
    """The 38,044 expert labels of winter 2003/04 (19 days): each class within 5 points of 20%."""
    import pandas as pd

    path = shared_data / "yrs_labels" / "Alllabel2003_38044.txt"
    rows = pd.read_csv(path, sep=r"\s+", header=None, names=["name", "label"])
    days = rows["name"].str.slice(1, 9).to_numpy()
    _check_day_split(rows["label"].astype(str).to_numpy(), days)


def test_lr_warmup_and_cosine():
    cfg = TrainConfig(variant="alexnet", lr=0.1, epochs=10, warmup_epochs=1, lr_schedule="cosine")
    assert lr_at(cfg, 0.25) == pytest.approx(0.025)  # ramps over the steps of the first epoch
    assert lr_at(cfg, 1.0) == pytest.approx(0.1)
    assert lr_at(cfg, 5.5) == pytest.approx(0.05)
    assert lr_at(cfg, 10.0) == pytest.approx(0.0, abs=1e-12)
    flat = TrainConfig(variant="alexnet", lr=0.1)
    assert lr_at(flat, 0.0) == lr_at(flat, 7.3) == 0.1


def test_augment_off_is_identity_and_rotation_keeps_a_centred_disc():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32)
    off = AugmentConfig(rotate=False, flip=False, scale_jitter=0.0)
    assert torch.equal(augment_batch(x, off, g), x)
    yy, xx = torch.meshgrid(torch.arange(64) - 31.5, torch.arange(64) - 31.5, indexing="ij")
    r = torch.hypot(yy, xx)
    disc = torch.exp(-((r / 12) ** 2))[None, None].repeat(4, 1, 1, 1)
    out = augment_batch(disc, AugmentConfig(rotate=True, flip=True, scale_jitter=0.0), g, fill=0)
    assert torch.allclose(out, disc, atol=0.03)  # radially symmetric: only interpolation error
    # An off-centre spot moves: the augmentation is not a no-op.
    spot = torch.zeros(4, 1, 64, 64)
    spot[:, :, 10:14, 40:44] = 1
    moved = augment_batch(spot, AugmentConfig(rotate=True, flip=False, scale_jitter=0.0), g)
    assert not torch.allclose(moved, spot, atol=0.1)
    # Corners brought in from outside the frame get the fill value.
    corner = augment_batch(torch.zeros(8, 1, 32, 32), AugmentConfig(True, True, 0.0), g, fill=-2.0)
    # bilinear weights in [0, 1] mix 0 and -2: the sampler's rounding (bounds.sample_error)
    tol = float(bounds.sample_error(torch.zeros(1, 1, 32, 32), 0.0, fill=-2.0))
    assert corner.min() >= -2.0 - tol and corner.max() <= tol
    assert (corner[:, :, 0, 0] < -0.5).any()


# ----------------------------------------------------------------------------- CLI end to end


def _train(cfg: Path, data: Path, out: Path, *extra: str) -> None:
    args = ["train", "--config", str(cfg), "--data", str(data), "--out", str(out)]
    main([*args, "--device", "cpu", *extra])


def test_train_learns_better_than_chance_through_cli(tmp_path):
    """80 raw 64 px frames of four plainly different patterns: validation beats chance clearly.

    The synthetic sky (pipeline.synth) needs minutes of training to separate its classes (see
    results/ablation.md); this set checks in seconds that the loop learns at all (labels,
    gradients, optimiser, schedule, best-epoch selection) through the real CLI.
    """
    from test_labelled import write_pattern_set

    data = write_pattern_set(tmp_path / "set", per_class=20, seed=2)
    cfg = write_cfg(
        tmp_path / "c.yaml",
        variant="alexnet",
        epochs=8,
        batch_size=16,
        lr=0.003,
        scratch_init="kaiming",
    )
    out = tmp_path / "ckpt"
    _train(cfg, data, out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["variant"] == "alexnet" and meta["classes"] == list(CLASSES)
    assert meta["train_config"]["epochs"] == 8
    assert meta["preprocess"]["calibration"]["crop_size"] == 55  # 440 px scaled to 64 px frames
    best = meta["metrics"]["average_accuracy"]
    assert best >= 0.5, f"validation accuracy {best} does not beat chance (0.25) clearly"
    assert (out / "config.yaml").is_file() and (out / "last.pt").is_file()
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 8 and max(h["val_acc"] for h in history) == pytest.approx(best)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.fixture
def one_thread():
    """One intra-op thread: multi-threaded BLAS may pick its thread count by the machine's load
    (float rounding then differs between runs), which bit-for-bit comparisons cannot allow."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resume_continues_and_seed_makes_it_deterministic(tmp_path, mini_set, one_thread):
    """1 epoch + --resume to 2 epochs == 2 epochs straight, bit for bit (RNG state included)."""
    one = write_cfg(tmp_path / "one.yaml", epochs=1)
    two = write_cfg(tmp_path / "two.yaml", epochs=2)
    _train(two, mini_set, tmp_path / "straight")
    _train(one, mini_set, tmp_path / "a")
    _train(one, mini_set, tmp_path / "b")
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"same seed, different {k}"
    _train(two, mini_set, tmp_path / "a", "--resume")
    resumed = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2 and len(json.loads(resumed["history"])) == 2
    for k in straight["model"]:
        assert torch.equal(resumed["model"][k], straight["model"][k]), f"resume differs in {k}"
    # The L-Softmax schedule advanced through both epochs (12 train frames / batch 8 = 2 steps).
    assert int(resumed["model"]["head.schedule.iteration"]) == 4
    # The checkpoint on disk loads safely and matches the best epoch.
    w = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert "head.weight" in w


def test_resume_refuses_another_config_or_nothing(tmp_path, mini_set, capsys):
    cfg = write_cfg(tmp_path / "c.yaml")
    with pytest.raises(SystemExit) as ex:
        _train(cfg, mini_set, tmp_path / "none", "--resume")
    assert ex.value.code == 1 and "nothing to resume" in capsys.readouterr().err
    _train(cfg, mini_set, tmp_path / "o")
    other = write_cfg(tmp_path / "d.yaml", lr=0.5)
    with pytest.raises(SystemExit):
        _train(other, mini_set, tmp_path / "o", "--resume")
    assert "another training config" in capsys.readouterr().err


def test_evaluate_cli_on_a_trained_checkpoint(tmp_path, mini_set, caplog, capsys):
    cfg = write_cfg(tmp_path / "c.yaml", variant="alexnet")
    _train(cfg, mini_set, tmp_path / "ck")
    main(
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "ck"),
            "--data",
            str(mini_set),
            "--out",
            str(tmp_path / "ev"),
            "--device",
            "cpu",
            "--batch-size",
            "4",
        ]
    )
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 16 and sum(m["per_class_n"].values()) == 16
    assert sum(map(sum, m["confusion"])) == 16
    assert math.isclose(m["average_accuracy"], m["correct"] / 16)
    assert m["timing"]["ms_per_image_batch1"] > 0 and m["timing"]["device"].startswith("cpu")
    import pandas as pd

    pred = pd.read_parquet(tmp_path / "ev" / "predictions.parquet")
    from pipeline.evaluate import metrics_from_predictions

    again = metrics_from_predictions(pred["label"], pred["predicted"])
    assert again["correct"] == m["correct"]
    assert (tmp_path / "ev" / "confusion.png").stat().st_size > 1000
    assert "is the labelled set" in caplog.text and "was trained on" in caplog.text
    # Into the checkpoint's own folder: refused before anything is written.
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    ev = ["evaluate", "--checkpoint", str(tmp_path / "ck"), "--data", str(mini_set)]
    with pytest.raises(SystemExit) as ex:
        main([*ev, "--out", str(tmp_path / "ck"), "--device", "cpu"])
    assert ex.value.code == 1 and "holds a checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before


def test_divergence_is_a_clear_config_error(tmp_path, mini_set, capsys):
    cfg = write_cfg(tmp_path / "c.yaml", variant="alexnet", lr=1e30, epochs=2)
    with pytest.raises(SystemExit) as ex:
        _train(cfg, mini_set, tmp_path / "o")
    assert ex.value.code == 1
    assert "training diverged" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --out folder


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_train_refuses_an_out_holding_another_run(tmp_path, mini_set, capsys):
    """A trained checkpoint of another variant/config is never silently replaced."""
    out = tmp_path / "ck_alex"
    _train(write_cfg(tmp_path / "alex.yaml", variant="alexnet"), mini_set, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()  # the progress bars of that run
    for name, over in (("stn.yaml", {}), ("lr.yaml", {"variant": "alexnet", "lr": 0.5})):
        with pytest.raises(SystemExit) as ex:
            _train(write_cfg(tmp_path / name, **over), mini_set, out)
        assert ex.value.code == 1
        err = _one_line_error(capsys)
        assert str(out) in err
        assert "pass --resume to continue it, --overwrite to replace it" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite (what a workflow stage rerun passes) replaces it
    _train(write_cfg(tmp_path / "stn.yaml"), mini_set, out, "--overwrite")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["variant"] == "stn-lsoftmax-alexnet"


def test_train_refuses_an_out_with_other_files(tmp_path, mini_set, capsys):
    """A raw archive folder (or any folder of other files) gets no model files written into it."""
    arch = tmp_path / "archive"
    (arch / "2004" / "20041221").mkdir(parents=True)
    (arch / "2004" / "20041221" / "N20041221G030001.png").write_bytes(b"x")
    (arch / "truth.parquet").write_bytes(b"x")
    with pytest.raises(SystemExit) as ex:
        _train(write_cfg(tmp_path / "c.yaml", variant="alexnet"), mini_set, arch)
    assert ex.value.code == 1
    err = _one_line_error(capsys)
    assert str(arch) in err and "choose another --out" in err
    assert sorted(p.name for p in arch.iterdir()) == ["2004", "truth.parquet"]
    with pytest.raises(SystemExit):  # --overwrite replaces a training run, never other files
        _train(write_cfg(tmp_path / "c.yaml", variant="alexnet"), mini_set, arch, "--overwrite")
    assert sorted(p.name for p in arch.iterdir()) == ["2004", "truth.parquet"]


def test_train_refuses_the_same_config_on_another_set(tmp_path, mini_set, capsys):
    from pipeline import synth

    cfg = write_cfg(tmp_path / "c.yaml", variant="alexnet")
    _train(cfg, mini_set, tmp_path / "ck")
    other = tmp_path / "other"
    synth.make_labelled(other, n=12, seed=9, winter=2003, balanced=True, size=64)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _train(cfg, other, tmp_path / "ck")
    assert "pass --resume to continue it" in _one_line_error(capsys)


def test_train_reruns_into_its_own_unfinished_or_finished_run(tmp_path, mini_set, monkeypatch):
    """The same config on the same set may write into its own folder again (a workflow rerun
    after a failed train stage), whether the earlier run finished or stopped before epoch 1."""
    import pipeline.train as train_mod

    cfg = write_cfg(tmp_path / "c.yaml", variant="alexnet", epochs=2)
    out = tmp_path / "ck"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # Ctrl-C in epoch 1: config.yaml and split.parquet only
        m.setattr(train_mod, "_train_one_epoch", interrupted)
        with pytest.raises(SystemExit):  # the CLI's "aborted", exit 130
            _train(cfg, mini_set, out)
    assert sorted(p.name for p in out.iterdir()) == ["_run.json", "config.yaml", "split.parquet"]
    assert read_run_record(out)["finished"] is False
    _train(cfg, mini_set, out)  # the same run, started again
    assert json.loads((out / "meta.json").read_text())["finished"] is True
    assert is_finished(out, "train")
    # epochs is a setting --resume may change: still the same run, trained afresh
    _train(write_cfg(tmp_path / "c1.yaml", variant="alexnet", epochs=1), mini_set, out)
    assert len(json.loads((out / "history.json").read_text())) == 1


def test_train_out_refusal_is_an_input_error_before_anything_is_written(tmp_path, mini_set):
    from pipeline.errors import InputError
    from pipeline.train import train

    out = tmp_path / "notes"
    out.mkdir()
    (out / "readme.txt").write_text("mine")
    with pytest.raises(InputError, match=r"notes is not empty .*readme\.txt"):
        train(load_train_config(write_cfg(tmp_path / "c.yaml")), mini_set, out, device="cpu")
    assert [p.name for p in out.iterdir()] == ["readme.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        train(load_train_config(write_cfg(tmp_path / "c.yaml")), mini_set, afile, device="cpu")


@pytest.mark.parametrize(
    "plant, named",
    [
        (lambda d: (d / "_run.json").write_text(json.dumps({"command": "evaluate"})), "evaluate"),
        (lambda d: (d / "labels.parquet").write_bytes(b"x"), "a labelled set"),
    ],
)
def test_train_refuses_another_stages_out_and_leaves_it(tmp_path, mini_set, plant, named):
    from pipeline.errors import InputError
    from pipeline.train import train

    out = tmp_path / "other"
    out.mkdir()
    plant(out)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    cfg = load_train_config(write_cfg(tmp_path / "c.yaml", variant="alexnet"))
    for overwrite in (False, True):
        with pytest.raises(InputError, match=named) as err:
            train(cfg, mini_set, out, device="cpu", overwrite=overwrite)
        assert str(out) in str(err.value)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_an_interrupted_train_leaves_no_finished_record(tmp_path, mini_set, monkeypatch):
    """Ctrl-C before the first epoch of a new folder: no record claims a run; over a finished
    run, its record says unfinished until a run ends again."""
    import pipeline.train as train_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    cfg = load_train_config(write_cfg(tmp_path / "c.yaml", variant="alexnet"))
    out = tmp_path / "ck"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "_readable_frames", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(cfg, mini_set, out, device="cpu")
    assert not out.exists()
    train_mod.train(cfg, mini_set, out, device="cpu")
    record = read_run_record(out)
    assert (
        is_finished(out, "train") and record["epochs_run"] == 1 and record["variant"] == "alexnet"
    )
    with monkeypatch.context() as m:
        m.setattr(train_mod, "_train_one_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(cfg, mini_set, out, device="cpu")
    assert read_run_record(out)["finished"] is False


# ----------------------------------------------------------------------------- progress in meta


def test_meta_records_an_interrupted_run_until_it_is_resumed(tmp_path, mini_set, monkeypatch):
    """Ctrl-C in epoch 2 of 3: meta.json says 1 of 3, unfinished; --resume finishes it."""
    import pipeline.train as train_mod

    cfg = write_cfg(tmp_path / "c.yaml", variant="alexnet", epochs=3)
    out = tmp_path / "ck"
    real = train_mod._train_one_epoch
    calls = []

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    def ctrl_c_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "_train_one_epoch", ctrl_c_in_epoch_2)
        with pytest.raises(SystemExit):
            _train(cfg, mini_set, out)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["epochs_done"], meta["epochs_planned"], meta["finished"]) == (1, 3, False)
    assert meta["variant"] == "alexnet" and meta["metrics"]["epoch"] == 1  # old keys kept
    _train(cfg, mini_set, out, "--resume")
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["epochs_done"], meta["epochs_planned"], meta["finished"]) == (3, 3, True)
    # Resumed with more epochs: unfinished again until they are run.
    with monkeypatch.context() as m:
        m.setattr(train_mod, "_train_one_epoch", interrupted)
        with pytest.raises(SystemExit):
            _train(write_cfg(tmp_path / "c5.yaml", variant="alexnet", epochs=5), mini_set, out,
                   "--resume")  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["epochs_done"], meta["epochs_planned"], meta["finished"]) == (3, 5, False)


def test_meta_says_finished_after_an_early_stop(tmp_path, mini_set, monkeypatch):
    import pipeline.train as train_mod

    real = train_mod._validate

    def flat(*a, **k):  # validation never improves after epoch 1
        loss, val = real(*a, **k)
        return loss, {**val, "average_accuracy": 0.5}

    monkeypatch.setattr(train_mod, "_validate", flat)
    cfg = write_cfg(tmp_path / "c.yaml", variant="alexnet", epochs=6, patience=1)
    _train(cfg, mini_set, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    assert (meta["epochs_done"], meta["epochs_planned"], meta["finished"]) == (2, 6, True)


def test_unreadable_frames_are_recorded_and_left_out_of_training(
    tmp_path, mini_set, caplog, capsys
):
    """A truncated frame does not stop training: it is listed in errors.parquet, marked in
    split.parquet, and the same run can be rerun and resumed."""
    import shutil

    import pandas as pd

    data = tmp_path / "set"
    shutil.copytree(mini_set, data)
    labels = pd.read_parquet(data / "labels.parquet")
    broken = data / labels["path"].iloc[5]
    broken.write_bytes(broken.read_bytes()[:100])
    cfg = write_cfg(tmp_path / "c.yaml", variant="alexnet", epochs=1)
    out = tmp_path / "ck"
    _train(cfg, data, out)
    assert "1 of 16 frames could not be read and are left out of training" in caplog.text
    errors = pd.read_parquet(out / "errors.parquet")
    assert len(errors) == 1 and errors["stage"].iloc[0] == "train"
    assert errors["error"].iloc[0] == "FrameReadError"
    assert Path(errors["path"].iloc[0]).name == broken.name
    split = pd.read_parquet(out / "split.parquet")
    assert len(split) == 16 and (split["split"] == "unreadable").sum() == 1
    assert split.loc[split["split"] == "unreadable", "path"].iloc[0].endswith(broken.name)
    assert set(split["split"]) == {"train", "val", "unreadable"}
    assert (out / "meta.json").is_file()
    # The same run again (no --overwrite needed), then resumed to a second epoch.
    _train(cfg, data, out)
    _train(write_cfg(tmp_path / "c2.yaml", variant="alexnet", epochs=2), data, out, "--resume")
    assert len(json.loads((out / "history.json").read_text())) == 2
    # Once the file is repaired, the errors table no longer lists it.
    shutil.copy(mini_set / labels["path"].iloc[5], broken)
    _train(cfg, data, out)
    assert not (out / "errors.parquet").exists()
    assert set(pd.read_parquet(out / "split.parquet")["split"]) == {"train", "val"}
    # Nothing readable at all: one clear line, exit 1.
    for p in labels["path"]:
        (data / p).write_bytes(b"not an image")
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        _train(cfg, data, tmp_path / "none")
    err = capsys.readouterr().err
    assert ex.value.code == 1 and "none of its 16 frames could be read" in err
    assert "Traceback" not in err and not (tmp_path / "none" / "errors.parquet").exists()
    # --overwrite removes the earlier run only once the new one can start.
    with pytest.raises(SystemExit):
        _train(cfg, data, out, "--overwrite")
    assert (out / "model.safetensors").is_file() and (out / "last.pt").is_file()


def test_train_split_by_day(tmp_path, mini_set, capsys):
    """split_by: day writes a split where no UT day is on both sides (where the frame split of
    the same seed puts days on both); without times it is a one-line error naming the fix."""
    import shutil

    import pandas as pd

    data = tmp_path / "days"
    shutil.copytree(mini_set, data)
    labels = pd.read_parquet(data / "labels.parquet")
    # 16 frames on 4 days, each day with several classes, as real days are.
    base = pd.Timestamp("2003-12-21 06:00", tz="UTC")
    labels["time_utc"] = [base + pd.Timedelta(days=i % 4, minutes=i) for i in range(len(labels))]
    labels.to_parquet(data / "labels.parquet")
    day = np.array([i % 4 for i in range(len(labels))])
    _, frame_val = stratified_split(labels["label"].to_numpy(), 0.2, 0)
    frame_train = np.setdiff1d(np.arange(len(labels)), frame_val)
    assert set(day[frame_val]) & set(day[frame_train]), "the frame split must mix days here"
    cfg = write_cfg(tmp_path / "c.yaml", variant="alexnet", split_by="day", val_fraction=0.25)
    _train(cfg, data, tmp_path / "ck")
    split = pd.read_parquet(tmp_path / "ck" / "split.parquet")
    by_day = dict(zip(labels["path"], day))
    split_day = split["path"].map(by_day)
    val_days = set(split_day[split["split"] == "val"])
    assert val_days and not val_days & set(split_day[split["split"] == "train"])
    untimed = tmp_path / "untimed"
    shutil.copytree(mini_set, untimed)
    labels.drop(columns=["time_utc"]).to_parquet(untimed / "labels.parquet")
    with pytest.raises(SystemExit) as ex:
        _train(cfg, untimed, tmp_path / "ck2")
    err = capsys.readouterr().err
    assert ex.value.code == 1 and "split_by: day needs the time of every frame" in err
    assert not (tmp_path / "ck2").exists()


def test_resume_keeps_the_recorded_split_when_readability_changes(tmp_path, mini_set, caplog):
    """A file broken or repaired between runs must not move frames between train and val."""
    import shutil

    import pandas as pd

    data = tmp_path / "set"
    shutil.copytree(mini_set, data)
    out = tmp_path / "ck"
    _train(write_cfg(tmp_path / "e1.yaml", variant="alexnet", epochs=1), data, out)
    first = pd.read_parquet(out / "split.parquet").set_index("path")["split"]
    assert set(first) == {"train", "val"}
    victim = first.index[first == "train"][0]
    original = (data / victim).read_bytes()
    (data / victim).write_bytes(original[:100])
    _train(write_cfg(tmp_path / "e2.yaml", variant="alexnet", epochs=2), data, out, "--resume")
    second = pd.read_parquet(out / "split.parquet").set_index("path")["split"]
    assert second[victim] == "unreadable"
    assert second.drop(victim).equals(first.drop(victim)), "other frames changed sides"
    assert pd.read_parquet(out / "errors.parquet")["path"].str.endswith(victim).all()
    (data / victim).write_bytes(original)  # repaired: stays out of this run
    caplog.clear()
    _train(write_cfg(tmp_path / "e3.yaml", variant="alexnet", epochs=3), data, out, "--resume")
    third = pd.read_parquet(out / "split.parquet").set_index("path")["split"]
    assert third.equals(second) and "1 frames that were unreadable" in caplog.text
    assert not (out / "errors.parquet").exists()
    assert len(json.loads((out / "history.json").read_text())) == 3
    (out / "split.parquet").unlink()
    with pytest.raises(SystemExit):
        _train(write_cfg(tmp_path / "e4.yaml", variant="alexnet", epochs=4), data, out, "--resume")


def test_empty_config_file_is_refused(tmp_path):
    """All defaults is never what an empty file meant (a wrong or unsaved file)."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="empty.yaml: the file holds no settings"):
        load_train_config(empty)


def test_a_class_without_readable_frames_is_warned(tmp_path, mini_set, caplog):
    import shutil

    import pandas as pd

    data = tmp_path / "set"
    shutil.copytree(mini_set, data)
    labels = pd.read_parquet(data / "labels.parquet")
    for rel in labels.loc[labels["label"] == "hotspot", "path"]:
        (data / rel).write_bytes(b"broken")
    _train(write_cfg(tmp_path / "c.yaml", variant="alexnet"), data, tmp_path / "ck")
    assert "no readable frame of class(es) hotspot" in caplog.text


def test_a_station_that_does_not_fit_the_set_names_the_dark_frame_and_the_fix(
    tmp_path, mini_set, capsys
):
    """--station yrs (512 px) on a 64 px set with its own calib/station.yaml."""
    with pytest.raises(SystemExit) as ex:
        _train(write_cfg(tmp_path / "c.yaml"), mini_set, tmp_path / "ck", "--station", "yrs")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ex.value.code == 1 and "calib/dark_" in err and "leave out --station" in err


# ----------------------------------------------------------------------------- real-frame recipe


def testbalanced_sampler_draws_every_class_about_equally():
    labels = np.array(["arc"] * 300 + ["hotspot"] * 10 + ["radial"] * 90)
    sampler = balanced_sampler(labels, torch.Generator().manual_seed(0), "sampler")
    draws = labels[np.concatenate([list(sampler) for _ in range(10)])]  # 10 epochs, 4000 draws
    counts = np.array([np.sum(draws == c) for c in ("arc", "hotspot", "radial")])
    # Each count ~ Binomial(4000, 1/3): mean 1333, sd 30, so > 1000 holds by > 10 sd; a plain
    # shuffle would give 3000:100:900.
    assert len(sampler) == 400 and counts.min() > 1000
    assert balanced_sampler(labels, torch.Generator(), "none") is None


def test_photometric_jitter_keeps_the_mask_black_and_is_seeded():
    from pipeline.models.build import INPUT_BLACK

    aug = AugmentConfig(flip=False, scale_jitter=0, gain=0.5, gamma=0.3, glow=0.05, noise=0.02,
                        blur=0.5)  # fmt: skip
    x = torch.full((4, 1, 32, 32), 0.5)
    x[:, :, :, :4] = INPUT_BLACK  # masked sky
    a = augment_batch(x, aug, torch.Generator().manual_seed(1), INPUT_BLACK)
    b = augment_batch(x, aug, torch.Generator().manual_seed(1), INPUT_BLACK)
    assert torch.equal(a, b)
    assert (a[:, :, :, :4] == INPUT_BLACK).all()
    assert not torch.equal(a[:, :, :, 8:], x[:, :, :, 8:])  # the sky was jittered
    assert a.std(dim=(1, 2, 3)).unique().numel() == 4  # each frame its own draw


def test_episode_split_and_no_validation(tmp_path):
    labels = np.array(["arc"] * 40 + ["radial"] * 40)
    groups = np.repeat([f"e{i}" for i in range(16)], 5)
    cfg = TrainConfig(split_by="episode", val_fraction=0.25)
    train_idx, val_idx = split_for_config(cfg, labels, groups)
    assert not set(groups[train_idx]) & set(groups[val_idx]) and len(val_idx)
    none = TrainConfig(val_fraction=0.0)
    train_idx, val_idx = split_for_config(none, labels, None)
    assert len(train_idx) == 80 and len(val_idx) == 0


def test_meta_records_the_sky_levels_of_the_training_frames(tmp_path, mini_set):
    """meta.json's sky_level summarises the training frames' mean model input in [0, 1] units
    (what occurrence --min-sky model screens against), not the validation frames'."""
    import pandas as pd

    from pipeline.config import resolve_station
    from pipeline.labelled import LabelledSet, load_labelled
    from pipeline.models import resize_frames
    from pipeline.preprocess import find_dark_dir

    out = tmp_path / "ck"
    _train(write_cfg(tmp_path / "c.yaml", variant="alexnet"), mini_set, out)
    got = json.loads((out / "meta.json").read_text())["sky_level"]
    split = pd.read_parquet(out / "split.parquet")
    ds = LabelledSet(load_labelled(mini_set), resolve_station(None, mini_set, None),
                     dark_dir=find_dark_dir(mini_set))  # fmt: skip
    levels = {}
    for i, p in enumerate(ds.df["path"]):
        x = torch.from_numpy(ds.frame(i).astype(np.float64))[None, None]
        levels[str(Path(p).relative_to(mini_set))] = float(resize_frames(x, 64).mean())
    role = dict(zip(split["path"], split["split"]))
    train = np.array([v for k, v in levels.items() if role[k] == "train"])
    val = np.array([v for k, v in levels.items() if role[k] == "val"])
    assert len(train) == 12 and len(val) == 4 and np.ptp(train) > 0.01
    # The float32 mean of 64*64 normalised inputs (|x| <= 2) is off by at most 2 gamma_4096,
    # INPUT_STD = 0.25 scales that to gamma_4096 / 2; the normalisation's own rounding (a few
    # u) and the record's 6 decimals add less than 1e-6.
    want = np.percentile(train, [0, 1, 50, 99, 100])
    np.testing.assert_allclose([got[k] for k in ("min", "p01", "p50", "p99", "max")], want,
                               atol=bounds.gamma(64 * 64) / 2 + 1e-6)  # fmt: skip


def test_stn_lr_scale_puts_the_stn_in_its_own_group():
    from pipeline.models import build_model
    from pipeline.train import param_groups

    model = build_model("stn-alexnet", input_size=64, stn_loc_size=32)
    groups = param_groups(model, 0.1)
    stn = {id(p) for p in model.stn.parameters()}
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    assert {id(p) for p in groups[1]["params"]} == stn
    assert not stn & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # no STN, or the full rate: one group, as before the option existed
    assert len(param_groups(build_model("alexnet", input_size=64), 0.1)) == 1
    assert len(param_groups(model, 1.0)) == 1


def test_stn_lr_scale_scales_the_stn_step_only(tmp_path, mini_set, one_thread):
    """One SGD step (12 training frames, batch 12) from the same seeded start at STN rates
    1, 1/2 and 1/4: the STN moves by s * D, everything else by the same step bit for bit."""
    w = {}
    for s in (1.0, 0.5, 0.25):
        cfg = write_cfg(tmp_path / f"{s}.yaml", variant="stn-alexnet", batch_size=12,
                        stn_lr_scale=s)  # fmt: skip
        _train(cfg, mini_set, tmp_path / str(s))
        w[s] = torch.load(tmp_path / str(s) / "last.pt", weights_only=True)["model"]
    stn_keys = [k for k in w[1.0] if k.startswith("stn.")]
    assert stn_keys and any(not torch.equal(w[1.0][k], w[0.5][k]) for k in stn_keys)
    eps = float(torch.finfo(torch.float32).eps)
    for k, v in w[1.0].items():
        if not k.startswith("stn."):
            assert torch.equal(v, w[0.5][k]) and torch.equal(v, w[0.25][k]), k
            continue
        d1 = (v - w[0.5][k]).double()  # = D / 2
        d2 = (w[0.5][k] - w[0.25][k]).double()  # = D / 4
        # each stored weight is rounded to half an ulp of its size: 3 ulps over the two differences
        tol = 4 * eps * float(v.abs().max()) + 1e-12
        np.testing.assert_allclose(d1.numpy(), 2 * d2.numpy(), rtol=0, atol=tol, err_msg=k)
