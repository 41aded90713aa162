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
