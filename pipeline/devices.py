"""Which torch device a stage runs on: the one place that turns ``--device`` into a device."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from pipeline.errors import InputError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None -> CUDA where visible, else CPU; an absent CUDA device is an InputError."""
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


def device_name(device: str | torch.device) -> str:
    """A human name of a device (for the timings taken on it)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} torch threads"
