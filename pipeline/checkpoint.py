"""Checkpoints (docs/design.md, "Checkpoints"): ``model.safetensors`` + ``meta.json`` in a folder.

Weights are written with safetensors (no pickle) and a legacy ``.pt`` state dict is read only with
``torch.load(weights_only=True)``.  ``meta.json`` carries what is needed to rebuild the model
(variant and build arguments) and to check it is the model asked for (classes, variant), plus the
caller's provenance (preprocessing, training config, metrics).  ``model_id`` is the first 16 hex
digits of the sha256 of the weights file, so it names the exact weights that made a prediction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.classes import CLASSES
from pipeline.errors import CheckpointError
from pipeline.models.build import VARIANTS, build_model, model_input_params
from pipeline.models.weights import read_state_dict
from pipeline.storage import atomic_path

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "model.pt"
META_NAME = "meta.json"
#: Keys every meta.json has (others, e.g. train_config and metrics, may be empty).
REQUIRED_META = ("variant", "backbone", "classes", "input_size", "in_chans", "build", "model_id")


def file_model_id(path: str | os.PathLike) -> str:
    """First 16 hex digits of the sha256 of a weights file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DataParallel / DDP wrappers (their keys carry prefixes)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(
            model, nn.DataParallel | nn.parallel.DistributedDataParallel
        ):
            inner = model.module
        if inner is None:
            return model
        model = inner


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared tensors: what safetensors accepts."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()  # safetensors refuses tensors sharing memory (tied weights)
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_checkpoint(out_dir: str | os.PathLike, model: nn.Module, meta: dict | None = None) -> str:
    """Write ``out_dir/model.safetensors`` and ``out_dir/meta.json`` atomically; return model_id.

    ``meta`` is the caller's part (classes, preprocess, train_config, metrics, ...); the model's own
    (variant, backbone, build arguments, input transform, torch version, model_id) is added here.
    """
    meta = dict(meta or {})
    model = unwrap_model(model)
    variant = getattr(model, "variant", None)
    build = getattr(model, "build_kwargs", None)
    if variant not in VARIANTS or not build:
        raise CheckpointError("save_checkpoint needs a model made by pipeline.models.build_model")
    classes = list(meta.get("classes", CLASSES))
    if len(classes) != build["num_classes"]:
        raise CheckpointError(
            f"meta classes {classes} do not match the model's {build['num_classes']} outputs"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file(_plain_state_dict(model), str(tmp), metadata={"variant": variant})
        model_id = file_model_id(tmp)
    meta.update(
        {
            "variant": variant,
            "backbone": model.backbone_name,
            "classes": classes,
            "input_size": build["input_size"],
            "in_chans": build["in_chans"],
            "feature_dim": int(model.feature_dim),
            "build": build,
            "model_input": model_input_params(build["input_size"]),
            "torch_version": torch.__version__,
            "model_id": model_id,
        }
    )
    meta.setdefault("preprocess", {})
    meta.setdefault("train_config", {})
    meta.setdefault("metrics", {})
    with atomic_path(out / META_NAME) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return model_id


def _locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights file, meta.json) of a checkpoint directory or of one of its weights files."""
    p = Path(path)
    if p.is_dir():
        weights = p / WEIGHTS_NAME
        if not weights.exists() and (p / LEGACY_WEIGHTS_NAME).exists():
            weights = p / LEGACY_WEIGHTS_NAME
        meta = p / META_NAME
    else:
        weights, meta = p, p.parent / META_NAME
    if not weights.exists():
        raise CheckpointError(
            f"{path}: no checkpoint here (expected a directory with {WEIGHTS_NAME} and {META_NAME})"
        )
    if not meta.exists():
        raise CheckpointError(f"{path}: {META_NAME} missing beside {weights.name}")
    return weights, meta


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint (directory or weights file), validated."""
    _, meta_path = _locate(path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable meta.json ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: meta.json must hold a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: meta.json lacks {', '.join(missing)}")
    if meta["variant"] not in VARIANTS:
        raise CheckpointError(
            f"{meta_path}: unknown variant {meta['variant']!r}; known: {', '.join(VARIANTS)}"
        )
    return meta


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(ours[k].shape)}"
        for k in ours
        if k in state and state[k].shape != ours[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
    if shapes:
        parts.append(f"shape mismatch {len(shapes)} (e.g. {shapes[:3]})")
    return "; ".join(parts) or None


def load_checkpoint(
    path: str | os.PathLike,
    variant: str | None = None,
    classes: Sequence[str] | None = CLASSES,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a checkpoint's model and load its weights strictly; returns (model.eval(), meta).

    Refuses (CheckpointError) a checkpoint of another ``variant`` or other ``classes`` (None skips
    the check), a missing or corrupt meta.json, weights that do not fit the architecture, weights
    that are not the ones meta.json names (``verify``), and anything that would need unpickling.
    """
    weights, _ = _locate(path)
    meta = read_meta(path)
    if variant is not None and meta["variant"] != variant:
        raise CheckpointError(
            f"{path}: checkpoint is variant {meta['variant']!r}, not the {variant!r} asked for"
        )
    if classes is not None and list(meta["classes"]) != list(classes):
        raise CheckpointError(
            f"{path}: checkpoint classes {list(meta['classes'])} differ from the expected "
            f"{list(classes)} (order matters)"
        )
    if verify and file_model_id(weights) != meta["model_id"]:
        raise CheckpointError(
            f"{path}: {weights.name} does not match meta.json model_id {meta['model_id']} "
            "(weights replaced or partly written)"
        )
    build = dict(meta["build"])
    build.pop("init_weights", None)
    # Checkpoints from before the STN padding was recorded padded with 0 (mid-grey).
    build.setdefault("stn_fill", 0.0)
    try:
        model = build_model(meta["variant"], **build)
    except TypeError as exc:
        raise CheckpointError(f"{path}: meta.json build arguments are invalid ({exc})") from None
    state = read_state_dict(weights)
    problem = _mismatch(model, state)
    if problem:
        raise CheckpointError(f"{path}: weights do not fit variant {meta['variant']!r}: {problem}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), meta


#: Calibration settings that change what the model sees whatever the frame size (crop size,
#: centre and mask radius scale with the camera and may legitimately differ).
_COMPARED = ("stretch_low", "stretch_high", "rotate_deg", "mask")


def preprocess_mismatch(meta: dict[str, Any], calibration: dict[str, Any]) -> list[str]:
    """``key: trained A, now B`` for each scale-free preprocessing setting that differs between a
    checkpoint's training data and the calibration about to feed it (empty: they agree)."""
    trained = (meta.get("preprocess") or {}).get("calibration") or {}
    out = []
    for key in _COMPARED:
        if key in trained and key in calibration and trained[key] != calibration[key]:
            out.append(f"{key}: trained {trained[key]}, now {calibration[key]}")
    return out


def unfinished_note(meta: dict[str, Any], path: str | os.PathLike) -> str | None:
    """The warning for a checkpoint whose meta.json says its training run did not finish
    (interrupted, or resumed with more epochs and not yet through them); None otherwise,
    including for checkpoints written before meta.json recorded it."""
    if meta.get("finished", True) is not False:
        return None
    done, planned = meta.get("epochs_done", "?"), meta.get("epochs_planned", "?")
    return (
        f"{path} is from an unfinished training run (epoch {done} of {planned}): "
        "resume it with train --resume"
    )


def warn_if_unfinished(meta: dict[str, Any], path: str | os.PathLike) -> bool:
    """Log one warning if the checkpoint ``meta`` belongs to an unfinished training run."""
    note = unfinished_note(meta, path)
    if note is not None:
        log.warning(note)
    return note is not None


#: parts of a model that ``init_from_checkpoint`` copies when both models have them.
_INIT_PARTS = ("trunk.", "neck.", "stn.", "head.")


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Start ``model`` from the weights of a checkpoint of this project; the parts copied.

    The backbone (trunk and neck) must be the same architecture, or one CheckpointError names
    both; the STN and the classifier head are copied where both models have them with the same
    shapes (e.g. a plain alexnet pre-training starts an stn-lsoftmax-alexnet's trunk and neck).
    """
    weights, _ = _locate(path)
    meta = read_meta(path)
    theirs = str(meta["backbone"])
    ours = getattr(model, "backbone_name", "?")
    if theirs != ours:
        raise CheckpointError(
            f"{path}: a {meta['variant']} checkpoint ({theirs} backbone) cannot initialise "
            f"{getattr(model, 'variant', '?')} ({ours} backbone); give a {ours} checkpoint"
        )
    state = read_state_dict(weights)
    own = model.state_dict()
    bad = [
        k
        for k in own
        if k.startswith(("trunk.", "neck.")) and (k not in state or state[k].shape != own[k].shape)
    ]
    if bad:
        raise CheckpointError(
            f"{path}: its {theirs} backbone does not fit {getattr(model, 'variant', '?')} "
            f"(e.g. {bad[0]}: other input channels or size); give a matching checkpoint"
        )
    # A pre-training's head never saw a label, and another class list's head means other things.
    skip = ("head.",) if meta.get("pretrain") or list(meta["classes"]) != list(CLASSES) else ()
    copied = {
        k: v
        for k, v in state.items()
        if k in own and v.shape == own[k].shape and not (skip and k.startswith(skip))
    }
    model.load_state_dict(copied, strict=False)
    return sorted({p.rstrip(".") for p in _INIT_PARTS for k in copied if k.startswith(p)})
