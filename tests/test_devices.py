import pytest
import torch

from pipeline.devices import resolve_device
from pipeline.errors import InputError


def test_auto_and_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device(None).type == want
    assert resolve_device("cpu") == torch.device("cpu")


def test_bad_devices_are_one_line_errors():
    with pytest.raises(InputError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device is visible here"):
            resolve_device("cuda")


def test_every_stage_uses_it():
    from pipeline import devices, evaluate, pretrain, retrieval, retrieval_features, train

    for mod in (evaluate, pretrain, train, retrieval, retrieval_features):
        assert mod.resolve_device is devices.resolve_device
    # classify's workers name their device as text (it travels in the task settings)
    import pipeline.classify as classify

    assert not hasattr(classify, "resolve_device")
    assert classify.devices.resolve_device is devices.resolve_device


def test_device_name_says_what_ran():
    from pipeline.devices import device_name

    assert device_name("cpu").startswith("cpu: ") and "torch threads" in device_name("cpu")


def test_a_cuda_index_beyond_the_machine_is_one_error(monkeypatch):
    import torch

    from pipeline.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InputError, match=r"cuda:2: this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
