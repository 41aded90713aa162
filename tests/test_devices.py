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
    from pipeline import classify, evaluate, retrieval

    if not torch.cuda.is_available():
        for fn in (classify.resolve_device, evaluate.resolve_device, retrieval.resolve_device):
            with pytest.raises(InputError):
                fn("cuda")
    assert classify.resolve_device("cpu") == "cpu"


def test_a_cuda_index_beyond_the_machine_is_one_error(monkeypatch):
    import torch

    from pipeline.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InputError, match=r"cuda:2: this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
