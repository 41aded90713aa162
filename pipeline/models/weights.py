"""Safe reading of weights files: safetensors, or torch files loaded with ``weights_only=True``.

Nothing here ever unpickles arbitrary Python objects; a file that would need it is refused with
one line that says how to save a plain state dict instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.errors import CheckpointError


def weights_refusal(path: str | os.PathLike, exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in one line.

    torch's own message advises loading with ``weights_only=False``, i.e. unpickling a file
    someone handed over: that advice must not reach the user.
    """
    if "Unsupported global" in str(exc):
        return (
            f"{path}: refused: it holds pickled Python objects besides tensors, which are never "
            "unpickled here; save a plain state dict (torch.save(model.state_dict(), ...)) or "
            "use safetensors"
        )
    return (
        f"{path}: not a (complete) PyTorch weights file; give a .pt/.pth state dict saved "
        "with torch.save, or a .safetensors file"
    )


def read_state_dict(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """The state dict (name -> tensor, on the CPU) of a ``.safetensors`` or torch weights file.

    A torch file is loaded with ``weights_only=True`` (tensors and plain containers only); a
    ``{"state_dict": ...}`` wrapper is unwrapped. Any failure is one CheckpointError naming
    ``path``; ``what`` names the file in the not-found message.
    """
    weights = Path(path)
    if not weights.is_file():
        raise CheckpointError(f"{path}: {what} file not found")
    if weights.suffix == ".safetensors":
        try:
            return load_file(str(weights), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, the file is refused
        raise CheckpointError(weights_refusal(path, exc)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: expected a state dict mapping names to tensors")
    return state
