"""Which torch device a stage runs on: the one place that turns ``--device`` into a device."""

from __future__ import annotations

import torch

from pipeline.errors import InputError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None -> CUDA where visible, else CPU; a CUDA device that is absent is an InputError."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {device}: no CUDA device is visible here; use --device cpu or auto"
        )
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"numbered from 0; use cuda:0..cuda:{torch.cuda.device_count() - 1} or cuda"
        )
    return dev
