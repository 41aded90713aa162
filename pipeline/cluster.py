"""Dask plumbing shared by the parallel stages: one client, windowed submission, a progress bar."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def default_workers() -> int:
    """One worker process per two cores (at least one): decoding and numpy share the cores."""
    return max(1, (os.cpu_count() or 2) // 2)


@contextlib.contextmanager
def dask_client(
    workers: int | None = None,
    threads_per_worker: int = 1,
    scheduler: str | None = None,
    resources: dict[str, float] | None = None,
    processes: bool = True,
) -> Iterator[Any]:
    """A ``distributed.Client``: on the running cluster at ``scheduler``, or on a new LocalCluster."""
    from distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler, timeout="30s")
        log.info("connected to scheduler %s", scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=workers or default_workers(),
        threads_per_worker=threads_per_worker,
        processes=processes,
        resources=resources,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


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
    from distributed import as_completed

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
