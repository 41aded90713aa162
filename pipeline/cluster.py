"""Dask plumbing shared by the parallel stages: one client, windowed submission, a progress bar."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from distributed import Client, LocalCluster, as_completed
from tqdm.auto import tqdm

from pipeline.cores import usable_cores
from pipeline.errors import InputError

log = logging.getLogger(__name__)


def default_workers() -> int:
    """One worker process per two cores (at least one): decoding and numpy share the cores."""
    return max(1, usable_cores() // 2)


#: Most worker processes one GPU is shared by (each holds a CUDA context and a model copy).
MAX_WORKERS_PER_GPU = 8


def workers_per_gpu(host_cores: int, gpus: int) -> int:
    """Worker processes per GPU: one per two host cores, 1..MAX_WORKERS_PER_GPU.

    Frame decoding runs on the host and holds the GIL for part of every frame (Pillow's chunk
    loop, numpy dispatch): threads of one process stop scaling long before 16 cores, while
    processes decode independently. A GPU therefore gets several workers, each with two cores.
    """
    return max(1, min(MAX_WORKERS_PER_GPU, host_cores // (2 * max(1, gpus))))


def worker_gpu_index(name: object, gpus: int) -> int:
    """The GPU (0..gpus-1) a worker process uses: the number its name ends with, modulo ``gpus``.

    LocalCluster names workers 0..n-1, ``dask worker --nworkers k`` (dask-jobqueue, the
    Kubernetes operator) appends -0..-(k-1) and SLURMRunner uses the MPI rank, so the workers
    of one host spread over its GPUs; a name without a number uses GPU 0.
    """
    m = re.search(r"(\d+)$", str(name))
    return int(m.group(1)) % max(1, gpus) if m else 0


class _SyncCancelRace(logging.Filter):
    """Drop distributed's NameError from ``sync.<locals>.cancel`` on Ctrl-C.

    distributed (2026.8) annotates ``future`` in ``utils.sync`` without assigning it, so a
    Ctrl-C that lands before the coroutine starts makes its ``cancel`` callback raise
    NameError, which tornado logs with a traceback; the interrupt itself is handled.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NameError) and "sync.<locals>.cancel" in record.getMessage())


_SYNC_CANCEL_FILTER = _SyncCancelRace()


@contextlib.contextmanager
def dask_client(
    workers: int | None = None,
    threads_per_worker: int = 1,
    scheduler: str | None = None,
    resources: dict[str, float] | None = None,
    processes: bool = True,
) -> Iterator[Any]:
    """A ``distributed.Client`` on the running cluster at ``scheduler`` or on a new LocalCluster."""
    logging.getLogger("tornado.application").addFilter(_SYNC_CANCEL_FILTER)  # once: a set

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, ValueError, TimeoutError) as exc:
            raise InputError(
                f"--scheduler {scheduler}: cannot reach a Dask scheduler there "
                f"({str(exc).splitlines()[0] or type(exc).__name__}); give its address as "
                "tcp://HOST:PORT (the dashboard prints it) and check it is running"
            ) from None
        log.info("connected to scheduler %s", scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    with _environment_kept():
        cluster = LocalCluster(
            n_workers=workers or default_workers(),
            threads_per_worker=threads_per_worker,
            processes=processes,
            resources=resources,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
            # worker processes leave Ctrl-C to this one, which closes them (local_worker.py)
            preload=["pipeline.local_worker"] if processes else [],
        )
    client = Client(cluster)
    print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
    try:
        yield client
    finally:
        client.close()
        _close_workers(cluster, WORKER_STOP_S)
        cluster.close()


@contextlib.contextmanager
def _environment_kept() -> Iterator[None]:
    """Undo what a nanny writes into this process's environment to spawn its worker.

    distributed sets ``distributed.nanny.pre-spawn-environ`` (OMP_NUM_THREADS=1 and the like) in
    the parent's ``os.environ`` before spawning; a library this process loads later (torch's
    OpenMP for a workflow's in-process train stage) then ran on one core of all it has.
    """
    before = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


#: How long a local worker may take to finish its task and stop when the run ends or is
#: interrupted, before its nanny kills it (distributed's default, 4 s, is shorter than one
#: shard on a loaded machine).
WORKER_STOP_S = 60.0


def _close_workers(cluster: LocalCluster, timeout: float) -> None:
    """Stop the cluster's worker processes gracefully, each given ``timeout`` seconds."""

    async def close_all() -> None:
        await asyncio.gather(
            *(
                w.close(timeout=timeout)
                for w in list(cluster.workers.values())
                if hasattr(w, "close")
            ),
            return_exceptions=True,
        )

    try:
        cluster.sync(close_all)
    except Exception as exc:  # noqa: BLE001 - cluster.close() below still stops what is left
        log.debug("graceful worker stop failed: %s", exc)


def run_windowed(
    client: Any,
    fn: Callable[..., Any],
    tasks: Iterable[tuple[Hashable, tuple, int]],
    *,
    on_result: Callable[[Hashable, Any], None],
    on_error: Callable[[Hashable, BaseException], None],
    window: int,
    total: int,
    desc: str,
    unit: str = "frame",
    retries: int = 1,
    resources: dict[str, float] | None = None,
) -> None:
    """Run ``fn(*args)`` for every (key, args, weight) with at most ``window`` tasks in flight.

    The scheduler never holds more than ``window`` tasks, whatever the number of tasks; the
    progress bar advances by each task's weight (frames). A task that still fails after its
    retries (or whose workers keep dying) goes to ``on_error``; nothing is silently dropped.
    """
    it = iter(tasks)
    pending = as_completed(loop=client.loop)
    weights: dict[Any, tuple[Hashable, int]] = {}

    def submit_next() -> bool:
        try:
            key, args, weight = next(it)
        except StopIteration:
            return False
        fut = client.submit(fn, *args, pure=False, retries=retries, resources=resources)
        weights[fut.key] = (key, weight)
        pending.add(fut)
        return True

    with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True) as bar:
        for _ in range(max(1, window)):
            if not submit_next():
                break
        for fut in pending:
            key, weight = weights.pop(fut.key)
            try:
                result = fut.result()
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, never dropped
                on_error(key, exc)
            else:
                on_result(key, result)
            finally:
                fut.release()
            bar.update(weight)
            submit_next()
