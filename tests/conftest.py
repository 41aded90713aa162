"""Shared test hygiene: Agg backend, closed figures, the real-data fixture, tiny synthetic data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
#: Tiny frames keep every test in seconds; geometry scales with the size (StationConfig.scaled).
TINY = 64


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests where CUDA is absent (CI has none)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(autouse=True)
def _keep_sigint_handler():
    """Each test starts with Ctrl-C as Python handles it: importing dask_jobqueue (the SLURM
    launcher tests) installs a process-wide handler that exits instead."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before and before is not None:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    """Two cores are shared by dask workers and torch: keep torch from oversubscribing them.

    AURORA_TEST_TORCH_THREADS sets the count instead (``make test-matrix`` runs 1 and 2): no
    tolerance may depend on how a reduction is split between threads.
    """
    try:
        import torch

        n = os.environ.get("AURORA_TEST_TORCH_THREADS")
        torch.set_num_threads(int(n) if n else min(2, torch.get_num_threads()))
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (AURORA_SHARED_DATA, default ../shared/data); skip where absent."""
    p = Path(os.environ.get("AURORA_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not p.is_dir():
        pytest.skip(
            f"real data not found at {p} (set AURORA_SHARED_DATA to the shared/data folder)"
        )
    return p


@pytest.fixture(scope="session")
def tiny_station_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The YRS station config scaled to TINY-pixel frames, as a YAML file."""
    from pipeline.config import dump_yaml, load_station

    path = tmp_path_factory.mktemp("station") / "yrs_tiny.yaml"
    dump_yaml(load_station("yrs").scaled(TINY), path)
    return path


@pytest.fixture(scope="session")
def tiny_labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled set of raw TINY-pixel frames (80 frames, all four classes)."""
    from pipeline import synth

    out = tmp_path_factory.mktemp("labelled")
    synth.make_labelled(out, n=80, seed=1, winter=2003, balanced=True, size=TINY)
    return out


@pytest.fixture(scope="session")
def episodes_set(tiny_labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny labelled set with an episode column: runs of 4 frames of one class (read-only)."""
    root = tmp_path_factory.mktemp("episodes") / "set"
    shutil.copytree(tiny_labelled, root)
    labels = pd.read_parquet(root / "labels.parquet").sort_values(["label", "path"])
    labels["episode"] = [
        f"{c}-{i // 4}" for c, i in zip(labels["label"], labels.groupby("label").cumcount())
    ]
    labels.to_parquet(root / "labels.parquet", index=False)
    return root


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small unlabelled archive of raw TINY-pixel frames in the YRS layout (60 frames)."""
    from pipeline import synth

    out = tmp_path_factory.mktemp("archive")
    synth.make_archive(out, n=60, seed=2, winters=(2004,), size=TINY)
    return out


@pytest.fixture(scope="session")
def cf_problems():
    """A function: NetCDF path -> the compliance checker's CF-1.8 errors and warnings."""
    return _cf_problems


def _cf_problems(path: str | os.PathLike) -> list[str]:
    """The IOOS compliance checker's CF-1.8 errors and warnings (and exceptions) for a NetCDF file.

    Offline: without a ``standard_name_vocabulary`` attribute the checker uses the standard-name
    table it ships. Info-level suggestions are not counted (the CLI's default criteria).
    """
    from compliance_checker.runner import CheckSuite

    suite = CheckSuite()
    suite.load_all_available_checkers()
    ds = suite.load_dataset(str(path))
    try:
        groups, raised = suite.run_all(ds, ["cf:1.8"], skip_checks=[])["cf:1.8"]
    finally:
        ds.close()
    report = suite.build_structure("cf:1.8", groups, str(path), limit=2)
    found = [
        f"{level}: {r.name}: {msg}"
        for level in ("high_priorities", "medium_priorities")
        for r in report[level]
        for msg in r.msgs
    ]
    return found + [f"checker raised in {name}: {exc}" for name, (exc, _) in raised.items()]
