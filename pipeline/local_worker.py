"""Dask preload of the local cluster's worker processes (``LocalCluster(preload=[__name__])``)."""

from __future__ import annotations

import gc
import signal
import threading
from typing import Any


def dask_setup(worker: Any) -> None:
    """Ignore Ctrl-C in the worker: the terminal sends it to the whole process group, and the
    client, which gets it too, closes the workers.

    A preload runs in every worker process the nanny starts, restarts included.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def dask_teardown(worker: Any) -> None:
    """Spare the closing worker process its final garbage collection.

    With a model loaded, the collection at interpreter exit took seconds, on a
    busy machine past the nanny's 4 s limit, which then kills the worker with a warning; the
    process is ending anyway and the OS frees its memory.
    """
    gc.freeze()
