"""A non-editable install works away from the repository: the built-in configs are package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_plain_install_makes_scans_and_bins_a_synthetic_archive(tmp_path):
    # Built from a copy, so that setuptools' build/ folder does not land in the checkout.
    src = tmp_path / "src"
    shutil.copytree(
        REPO / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    site = tmp_path / "site"
    _run(
        [
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(src),
        ],
        cwd=tmp_path,
        env=dict(os.environ),
    )
    assert not (site / "pipeline" / "configs").is_symlink()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("AURORA_CONFIG_DIR", None)
    run = tmp_path / "elsewhere"
    run.mkdir()
    where = _run(["-c", "import pipeline; print(pipeline.__file__)"], run, env)
    assert Path(where.strip()).is_relative_to(site)  # the installed copy, not the checkout
    cli = ["-m", "pipeline.cli"]
    _run(
        [*cli, "synth", "archive", "arch", "--n", "40", "--size", "32", "--winters", "2004"],
        run,
        env,
    )
    _run(
        [*cli, "scan", "arch", "--station", "arch/calib/station.yaml", "--out", "m.parquet"],
        run,
        env,
    )
    assert len(pd.read_parquet(run / "m.parquet")) == 40
    _run([*cli, "occurrence", "arch/truth.parquet", "--out", "occ"], run, env)
    table = pd.read_parquet(run / "occ" / "occurrence.parquet")
    assert table["n_frames"].sum() == 40
