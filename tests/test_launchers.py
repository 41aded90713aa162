"""The cluster launch examples of workflows/ are code that runs: test what can run here."""

import importlib.util
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _load(relpath: str):
    spec = importlib.util.spec_from_file_location(relpath.replace("/", "_"), REPO / relpath)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slurm_job_script_renders_with_gpu_workers():
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is in the test extras")
    launch = _load("workflows/slurm/launch.py")
    cluster = launch.make_cluster(queue="gpu", account="proj", gpus_per_job=2, cores=8)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script
    assert "#SBATCH -A proj" in script
    assert "#SBATCH --gres=gpu:2" in script
    assert "--resources GPU=1" in script
    assert "--lifetime 110m" in script
    assert "--nworkers 4" in script  # 8 cores, 2 GPUs: two processes per GPU


def test_slurm_cpu_jobs_get_one_process_per_two_cores():
    pytest.importorskip("dask_jobqueue")
    launch = _load("workflows/slurm/launch.py")
    kwargs = launch.cluster_kwargs(queue="cpu", gpus_per_job=0, cores=16)
    assert kwargs["processes"] == 8
    assert "GPU=1" not in kwargs["worker_extra_args"]
    assert kwargs["job_extra_directives"] == []


def test_slurm_launcher_prints_job_script(capsys):
    pytest.importorskip("dask_jobqueue")
    launch = _load("workflows/slurm/launch.py")
    assert launch.main(["workflows/nightly.yaml", "--print-job-script", "--gpus-per-job", "1"]) == 0
    assert "--gres=gpu:1" in capsys.readouterr().out


def test_slurm_launcher_lifetime_and_log_directory_reach_the_job_script(capsys, tmp_path):
    pytest.importorskip("dask_jobqueue")
    launch = _load("workflows/slurm/launch.py")
    argv = ["workflows/nightly.yaml", "--print-job-script", "--lifetime", "50m"]
    argv += ["--lifetime-stagger", "1m", "--log-directory", str(tmp_path)]
    assert launch.main(argv) == 0
    script = capsys.readouterr().out
    assert "--lifetime 50m --lifetime-stagger 1m" in script
    assert f"#SBATCH -o {tmp_path}/" in script


def test_kubernetes_spec_declares_gpus(capsys):
    launch = _load("workflows/kubernetes/launch.py")
    spec = launch.cluster_spec(image="img:1", workers=3, gpus_per_worker=1, archive_pvc="yrs")
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 3
    container = worker["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = container["args"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert args[args.index("--nworkers") + 1] == "4"  # 8 cores, 1 GPU: two cores per process
    assert worker["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "yrs"
    assert launch.main(["w.yaml", "--image", "img:1", "--print-spec"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["kind"] == "DaskCluster"


def test_cron_script_never_overlaps(tmp_path):
    """A second nightly run while the first holds the lock exits at once with code 75."""
    fake = tmp_path / ".venv" / "bin" / "aurora-pipeline"
    fake.parent.mkdir(parents=True)
    # The first run holds the lock until the test releases it:
    # no sleep to outlast, whatever the load.
    fake.write_text(
        '#!/bin/bash\necho ran >> "$AURORA_REPO/ran.txt"\n'
        'while [ ! -e "$AURORA_REPO/release" ]; do sleep 0.05; done\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "AURORA_REPO": str(tmp_path), "AURORA_LOCK": str(tmp_path / "lock")}
    script = str(REPO / "workflows/cron/nightly.sh")
    first = subprocess.Popen([script], env=env)
    try:
        deadline = time.monotonic() + 60  # a generous wait until the first run holds the lock
        while not (tmp_path / "ran.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "ran.txt").exists(), "the first run never started"
        second = subprocess.run([script], env=env, timeout=60)
    finally:
        (tmp_path / "release").touch()
    assert first.wait(timeout=60) == 0
    assert second.returncode == 75
    assert (tmp_path / "ran.txt").read_text() == "ran\n"
