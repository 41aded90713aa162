"""pipeline/cluster.py: processes per GPU, which GPU a worker uses, Ctrl-C and local workers."""

import os
from collections import Counter

import pytest

from pipeline.cluster import MAX_WORKERS_PER_GPU, dask_client, worker_gpu_index, workers_per_gpu


@pytest.mark.parametrize(
    ("cores", "gpus", "expected"),
    [(16, 1, 8), (64, 1, MAX_WORKERS_PER_GPU), (16, 4, 2), (8, 4, 1), (2, 1, 1), (1, 2, 1)],
)
def test_workers_per_gpu_gives_each_worker_two_cores(cores, gpus, expected):
    assert workers_per_gpu(cores, gpus) == expected


@pytest.mark.parametrize(
    ("name", "gpus", "expected"),
    [
        (0, 2, 0),  # LocalCluster names workers 0..n-1
        (5, 2, 1),
        ("3", 4, 3),
        ("SLURMCluster-12-3", 2, 1),  # dask worker --nworkers k appends -0..-(k-1)
        ("aurora-worker-7f9c-1", 4, 1),
        ("gpu-node", 4, 0),
        (None, 4, 0),
        (7, 1, 0),
    ],
)
def test_worker_gpu_index_from_name(name, gpus, expected):
    assert worker_gpu_index(name, gpus) == expected


def test_workers_of_one_host_spread_evenly_over_its_gpus():
    gpus = 4
    n = gpus * workers_per_gpu(32, gpus)
    names = [f"SLURMCluster-0-{i}" for i in range(n)]
    use = Counter(worker_gpu_index(nm, gpus) for nm in names)
    assert sorted(use) == list(range(gpus))
    assert set(use.values()) == {n // gpus}


def _sigint_handler_name() -> str:
    import signal

    h = signal.getsignal(signal.SIGINT)
    return "ignored" if h == signal.SIG_IGN else getattr(h, "__name__", str(h))


def test_local_workers_leave_ctrl_c_to_the_client():
    """A terminal's Ctrl-C reaches every process of the group: local worker processes ignore it,
    restarted ones too (the client closes them), and the client's own handler is untouched."""
    import signal

    from pipeline.cluster import dask_client

    before = signal.getsignal(signal.SIGINT)
    with dask_client(workers=1) as client:
        assert signal.getsignal(signal.SIGINT) is before
        assert client.submit(_sigint_handler_name, pure=False).result() == "ignored"
        client.restart()  # a worker process started again by its nanny: the same
        assert client.submit(_sigint_handler_name, pure=False).result() == "ignored"
    assert signal.getsignal(signal.SIGINT) is before


def test_distributed_sync_cancel_race_is_not_logged_as_a_traceback():
    """Ctrl-C can land before distributed's sync() has its future: its cancel callback then
    raises NameError, which tornado would log with a traceback under the user's 'aborted'."""
    import logging
    import sys

    from pipeline.cluster import dask_client

    def record(msg: str, exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except type(exc):
            info = sys.exc_info()
        return logging.LogRecord("tornado.application", logging.ERROR, __file__, 1, msg, (), info)

    logger = logging.getLogger("tornado.application")
    with dask_client(workers=1):
        pass
    race = record(
        "Exception in callback functools.partial(<function sync.<locals>.cancel at 0x7f>)",
        NameError("cannot access free variable 'future'"),
    )
    assert not logger.filter(race)
    assert logger.filter(record("Exception in callback something_else", NameError("x")))
    assert logger.filter(record("Exception in callback sync.<locals>.cancel", ValueError("x")))


def _thread_env() -> tuple[str | None, str | None]:
    return os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS")


def test_local_cluster_leaves_this_process_environment_alone(monkeypatch):
    """Workers get distributed's OMP_NUM_THREADS=1, but this process keeps its own: a torch
    imported after the cluster started (a workflow's train stage) would otherwise use one core."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with dask_client(workers=1) as client:
        assert _thread_env() == (None, None)
        assert list(client.run(_thread_env).values()) == [("1", "1")]
