"""Variant registry: every variant builds and runs at 64/112/227 px; input transform; init."""

from __future__ import annotations

import copy
import importlib.util
import pickle

import bounds
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from pipeline.errors import CheckpointError, ConfigError, InputError
from pipeline.models import (
    INPUT_MEAN,
    INPUT_STD,
    VARIANTS,
    build_model,
    model_input_params,
    sky_level,
    to_model_input,
)

HAS_TIMM = importlib.util.find_spec("timm") is not None
SIZES = (64, 112, 227)
FEATURE_DIM = {"resnet18": 512, "inception-v4": 1536}
RUNNABLE = [v for v in VARIANTS if v != "inception-v4" or HAS_TIMM]

_CACHE: dict[str, torch.nn.Module] = {}


def _model(variant: str) -> torch.nn.Module:
    """One eval-mode model per variant for the whole module (VGG16 takes a second to build)."""
    if variant not in _CACHE:
        torch.manual_seed(0)
        _CACHE[variant] = build_model(variant).eval()
    return _CACHE[variant]


def test_registry_names():
    assert VARIANTS == (
        "alexnet",
        "stn-alexnet",
        "lsoftmax-alexnet",
        "stn-lsoftmax-alexnet",
        "vgg16",
        "inception-v4",
        "resnet18",
    )


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", RUNNABLE)
def test_variant_forward_and_features(variant, size):
    model = _model(variant)
    batch = 1 if variant in ("vgg16", "inception-v4") else 2
    x = to_model_input(np.random.default_rng(0).random((batch, 96, 96), dtype=np.float32), size)
    assert x.shape == (batch, 1, size, size)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    dim = FEATURE_DIM.get(variant, 4096)
    assert model.feature_dim == dim
    assert feats.shape == (batch, dim)
    assert logits.shape == (batch, 4)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed")
def test_inception_without_timm_says_how_to_install():
    with pytest.raises(ConfigError, match=r"pip install 'aurora-pipeline\[baselines\]'"):
        build_model("inception-v4")


def test_lsoftmax_variants_use_margin_only_when_training():
    torch.manual_seed(0)
    model = build_model("stn-lsoftmax-alexnet", lambda_schedule={"base": 0.0, "floor": 0.0})
    assert model.lsoftmax is not None and model.lsoftmax.margin == 3
    assert _model("alexnet").lsoftmax is None
    x = torch.randn(4, 1, 64, 64)
    y = torch.tensor([0, 1, 2, 3])
    model.train()
    torch.manual_seed(1)
    margin = model(x, y)
    torch.manual_seed(1)  # same dropout mask
    plain = model(x)
    torch.manual_seed(1)
    f = model.features(x).detach()  # what the head saw in both
    assert not torch.allclose(margin, plain)
    # the target logit is only ever lowered (psi <= cos), up to the rounding of both logits:
    # the margin logit's (bounds.lsoftmax_target_error) and the plain dot's gamma_D |w|.|f|
    w = model.head.weight.detach()[y]
    tol = bounds.lsoftmax_target_error(f, w, 3) + bounds.gamma(f.shape[1]) * (
        f.abs() * w.abs()
    ).sum(1)
    lowered = plain.gather(1, y[:, None])[:, 0] - margin.gather(1, y[:, None])[:, 0]
    assert (lowered.detach().double() >= -tol).all()
    model.eval()
    assert torch.equal(model(x, y), model(x))
    # the plain variants accept (and ignore) a target, so training code needs no special case
    plain_model = _model("alexnet")
    assert torch.equal(plain_model(x, y), plain_model(x))


def test_models_pickle_and_deepcopy():
    # Dask or DataLoader workers may pickle a model: no lambdas or unpicklable state inside.
    model = _model("stn-lsoftmax-alexnet")
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    assert copy.deepcopy(model).lsoftmax.margin == 3


def test_build_arguments_are_recorded_and_checked():
    model = build_model(
        "lsoftmax-alexnet", input_size=112, lsoftmax_m=2, lambda_schedule={"base": 5}
    )
    assert model.build_kwargs["input_size"] == 112
    assert model.build_kwargs["lsoftmax_m"] == 2
    assert model.build_kwargs["lambda_schedule"]["base"] == 5.0
    assert model.lsoftmax.lam == 15.0  # base 5 below the default floor 15
    with pytest.raises(ConfigError, match="allowed: alexnet, stn-alexnet"):
        build_model("lenet")
    with pytest.raises(ConfigError, match=">= 64"):
        build_model("alexnet", input_size=32)
    with pytest.raises(ConfigError, match="unknown lambda schedule key 'decay'"):
        build_model("lsoftmax-alexnet", lambda_schedule={"decay": 1})
    with pytest.raises(ConfigError, match="lsoftmax_m"):
        build_model("lsoftmax-alexnet", lsoftmax_m=0)


def test_to_model_input():
    rng = np.random.default_rng(0)
    frames = rng.random((3, 80, 80), dtype=np.float32)
    x = to_model_input(frames, 64)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 64, 64)
    expected = F.interpolate(
        torch.from_numpy(frames)[:, None], size=(64, 64), mode="bilinear", align_corners=False
    )
    # A bilinear resize (4 positive weights summing to 1: gamma_4 of values <= 1) and the
    # normalisation (one rounding, then exact / 0.25) per path: gamma_5 (|z| + 2) each.
    want = (expected - INPUT_MEAN) / INPUT_STD
    assert ((x - want).abs() <= 2 * bounds.gamma(5) * (want.abs() + 2)).all()
    # no resize at the model size; constant mid-grey maps to 0 (0.5 - 0.5: exact)
    same = to_model_input(np.full((1, 64, 64), INPUT_MEAN, np.float32), 64)
    assert torch.equal(same, torch.zeros_like(same))
    # uint8 frames are scaled by 255; tensors and (B, 1, H, W) give the same result. u8 / 255 in
    # float32, or in float64 then rounded to float32: 1 ulp apart at most, then resized alike.
    u8 = (frames * 255).round().astype(np.uint8)
    a, b = to_model_input(u8, 64), to_model_input(u8 / 255.0, 64)
    assert ((a - b).abs() <= 2 * bounds.gamma(5) * (a.abs() + 2)).all()
    assert torch.equal(to_model_input(torch.from_numpy(frames)[:, None], 64), x)
    assert to_model_input(frames, 64, in_chans=3).shape == (3, 3, 64, 64)
    with pytest.raises(InputError, match="got shape"):
        to_model_input(frames[0], 64)
    with pytest.raises(ConfigError):
        to_model_input(frames, 16)
    params = model_input_params(227)
    assert (
        params["mean"] == INPUT_MEAN and params["std"] == INPUT_STD and params["input_size"] == 227
    )


def test_sky_level_is_the_mean_frame_brightness_the_model_sees():
    """sky_level undoes the input normalisation of the frame's mean: a uniform frame gives its
    own brightness at any input size and channel count; masked (black) corners count."""
    for c in (0.0, 0.1, 0.37, 1.0):
        for size, chans in ((64, 1), (96, 3)):
            x = to_model_input(np.full((2, 80, 80), c, np.float32), size, in_chans=chans)
            # the float32 mean of S*S inputs |x| <= 2 is off by 2 gamma_{S*S}, scaled by 0.25;
            # the normalisation and the way back round a few times more
            tol = bounds.gamma(size * size) / 2 + 4 * bounds.gamma(1)
            np.testing.assert_allclose(sky_level(x).numpy(), c, atol=tol)
    half = np.zeros((1, 64, 64), np.float32)
    half[:, :, :32] = 0.8  # half the frame black: the level halves
    tol = bounds.gamma(64 * 64) / 2 + 4 * bounds.gamma(1)
    np.testing.assert_allclose(sky_level(to_model_input(half, 64)).numpy(), 0.4, atol=tol)


def _tv_features(tv: torch.nn.Module, x3: torch.Tensor) -> torch.Tensor:
    """FC7 (after ReLU) of a torchvision AlexNet."""
    h = torch.flatten(tv.avgpool(tv.features(x3)), 1)
    return tv.classifier[:6](h)


def test_init_weights_from_local_torchvision_alexnet(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.alexnet(weights=None).eval()  # random "ImageNet" weights
    path = tmp_path / "alexnet-imagenet.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("alexnet", init_weights=path).eval()
    sd = model.state_dict()
    # the same sum of the same three tensors: bit for bit
    assert torch.equal(sd["trunk.0.weight"], tv.features[0].weight.sum(1, keepdim=True))
    assert torch.equal(sd["neck.4.weight"], tv.classifier[4].weight)
    assert sd["head.weight"].shape == (4, 4096)  # the 1000-class FC8 is not loaded
    # The grey model answers a grey image as the RGB network answers it replicated on 3
    # channels. Compared in float64, where bounds.forward_error_bound is sharp (u = 2^-53), along
    # 4 random directions of the 4096-d feature (a bound per element would take 4096 passes).
    x = torch.rand(2, 1, 112, 112)
    r = torch.from_numpy(np.random.default_rng(3).standard_normal((4, 4096)))

    def ours(m, t):
        return m.features(t) @ r.T

    def theirs(m, t):
        return _tv_features(m, t.expand(-1, 3, -1, -1)) @ r.T

    f64 = torch.float64
    tol = bounds.forward_error_bound(model, x, ours, dtype=f64)[0]
    tol = tol + bounds.forward_error_bound(tv, x, theirs, dtype=f64)[0]
    m64, tv64 = copy.deepcopy(model).double(), copy.deepcopy(tv).double()
    with torch.no_grad():
        got = ours(m64, x.double())
        # The grey kernel is the float32 sum (checked bit for bit above); its float32 rounding
        # is no mapping error, so compare with the exact sum (3 float32 terms: exact in float64).
        exact = copy.deepcopy(m64)
        exact.trunk[0].weight.copy_(tv64.features[0].weight.sum(1, keepdim=True))
        assert ((ours(exact, x.double()) - theirs(tv64, x.double())).abs() <= tol).all()
    assert tol.max() < 1e-6 * got.abs().max()  # sharp: any real mapping error shows
    # the STN variant loads the same backbone weights and keeps its identity transform: its
    # resampling (bounds.resample_error) is an input error of the same backbone.
    stn = build_model("stn-lsoftmax-alexnet", init_weights=path).eval()
    e_stn = bounds.resample_error(x, stn.stn.fill, f64)
    tol_stn = tol + bounds.forward_error_bound(model, x, ours, e_stn, dtype=f64)[0]
    with torch.no_grad():
        got_stn = ours(copy.deepcopy(stn).double(), x.double())
    assert ((got_stn - got).abs() <= tol_stn).all()


def test_init_weights_resnet18_and_mismatches(tmp_path):
    torch.manual_seed(4)
    tv = torchvision.models.resnet18(weights=None)
    rpath = tmp_path / "resnet18.pth"
    torch.save({"state_dict": tv.state_dict()}, rpath)  # a wrapped state dict is accepted too
    model = build_model("resnet18", init_weights=rpath)
    assert torch.equal(  # the same sum of the same tensors: bit for bit
        model.state_dict()["trunk.conv1.weight"], tv.conv1.weight.sum(1, keepdim=True)
    )
    assert torch.equal(
        model.state_dict()["trunk.layer4.1.bn2.running_var"], tv.layer4[1].bn2.running_var
    )
    with pytest.raises(CheckpointError, match="not torchvision alexnet weights"):
        build_model("alexnet", init_weights=rpath)
    with pytest.raises(CheckpointError, match="not found"):
        build_model("alexnet", init_weights=tmp_path / "missing.pth")


class _Payload:
    """Unpickling this would run code: loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_init_weights_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects") as err:
        build_model("alexnet", init_weights=path)
    assert not marker.exists()
    assert "weights_only` set to `False`" not in str(err.value)  # torch's advice must not leak
    config = tmp_path / "train.yaml"  # the wrong file given
    config.write_text("variant: alexnet\n")
    with pytest.raises(CheckpointError, match="not a \\(complete\\) PyTorch weights file"):
        build_model("alexnet", init_weights=config)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["stn-lsoftmax-alexnet", "vgg16", "resnet18"])
def test_train_step_on_cuda_with_autocast(variant):
    model = build_model(variant).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(4, 1, 227, 227, device="cuda")
    y = torch.tensor([0, 1, 2, 3], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x, y).float(), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_frame_stretch_makes_the_model_blind_to_overall_brightness(tmp_path):
    from pipeline.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.models.build import FrameStretch

    torch.manual_seed(0)
    frame = torch.rand(2, 1, 64, 64) * 0.4  # a dim frame in [0, 1]
    frame[:, :, :8] = 0.0  # a black (masked) band
    x = to_model_input(frame, 64)
    out = FrameStretch()(x) * INPUT_STD + INPUT_MEAN
    top = torch.quantile(frame.flatten(1), 0.99, dim=1)
    # float32 division and the (x - m) / s round trip: a few ulps of values <= 1
    # the same roundings as below, against the exact stretch of the float32 frame
    u = 2.0**-24
    ref = (frame / top.view(-1, 1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(out, ref, atol=8 * u * float(1 / top.min()), rtol=0)
    assert (out[:, :, :8] == 0).all()  # black stays black
    # Doubling the brightness is undone: the quantile doubles exactly, and the two paths
    # differ only by the roundings of (x - m) / s, its inverse and the division (<= 8 float32
    # roundings of values <= 1 / top, in [0, 1] units, then / INPUT_STD).
    bright = FrameStretch()(to_model_input(frame * 2, 64))
    bound = 8 * u * float(1 / top.min()) / INPUT_STD
    torch.testing.assert_close(FrameStretch()(x), bright, atol=bound, rtol=0)
    model = build_model("alexnet", input_size=64, input_norm="frame").eval()
    save_checkpoint(tmp_path / "ck", model)
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta["build"]["input_norm"] == "frame" and loaded.input_norm is not None
    with pytest.raises(ConfigError, match="input_norm"):
        build_model("alexnet", input_norm="per-pixel")
