"""Builders the tests share: a random-weight checkpoint, a local cluster like production's, and
a command started as from a terminal."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from distributed import Client, LocalCluster

from pipeline.checkpoint import save_checkpoint
from pipeline.classes import CLASSES
from pipeline.models import build_model


def random_checkpoint(
    out: Path,
    *,
    seed: int = 0,
    input_size: int = 64,
    variant: str = "alexnet",
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """A checkpoint folder of an untrained ``variant`` (weights fixed by ``seed``)."""
    torch.manual_seed(seed)
    model = build_model(variant, input_size=input_size)
    save_checkpoint(out, model, {"classes": list(CLASSES), **(meta or {})})
    return out


@contextlib.contextmanager
def local_cluster(n_workers: int = 1) -> Iterator[tuple[LocalCluster, Client]]:
    """A process-based LocalCluster with the workers' production preload, and a client on it."""
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
            preload=["pipeline.local_worker"],
        ) as lc,
        Client(lc) as client,
    ):
        yield lc, client


def _as_from_a_terminal() -> None:
    """Ctrl-C at its default in the child: a suite started in the background (``make test &``
    in a script) runs with SIGINT ignored, which a child would inherit and keep ignoring."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def terminal_popen(cmd: list[str]) -> subprocess.Popen:
    """Start ``cmd`` in a process group of its own, as a terminal would (stderr piped)."""
    return subprocess.Popen(
        cmd, stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_as_from_a_terminal
    )
