"""workflows/slurm/ on a real SLURM: jobs go through sbatch, Dask workers run inside allocations.

The cluster is the one AURORA_SLURM_CONF names (`.ci/run` starts it with scripts/slurm-local.sh),
else one this module starts with scripts/slurm-local.sh and stops at its end; where neither
works every test here skips with the reason. Frames are tiny and the model untrained: these
tests check the plumbing (submission, workers joining, shards handed back), never speed, and
their timeouts only bound the waiting.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import random_checkpoint
from conftest import TINY
from test_classify import (
    _assert_exactly_once,
    _assert_probabilities,
    _exact,
    _reference,
)

from pipeline import synth
from pipeline.classes import PROB_COLUMNS
from pipeline.classify import classify_archive
from pipeline.config import load_station
from pipeline.predictions import read_predictions, read_run, shard_files

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "scripts" / "slurm-local.sh"
#: What each worker job asks for: one core, and memory enough for torch and the model (a worker
#: with 1 GB is restarted by its nanny before the first shard is done).
WORKER = {"cores": 1, "memory": "3GB", "gpus_per_job": 0, "walltime": "00:15:00"}
#: Longest wait for a job, a worker or a run: generous, as the machine may be shared.
WAIT_S = 300
#: tiny_archive's frames, each linked again on the following days (see linked_archive).
COPIES = 60
SACCT_FIELDS = "JobID,JobName,Partition,NCPUS,State,ExitCode,Start,End,Elapsed,NodeList"

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


# ------------------------------------------------------------------------------ the cluster


@dataclass(frozen=True)
class Slurm:
    """The SLURM cluster of this module's tests, used through its command-line clients."""

    conf: Path
    partition: str

    def run(self, *argv: str, cwd: Path | None = None) -> str:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=60, env=os.environ.copy()
        )
        assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr.strip()}"
        return proc.stdout

    def sbatch(self, *argv: str, cwd: Path) -> str:
        """Submit; the job id."""
        return self.run("sbatch", "--parsable", *argv, cwd=cwd).strip().split(";")[0]

    def wait(self, *jobs: str, timeout: float = WAIT_S) -> None:
        """Until squeue no longer lists the jobs."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i", "-j", ",".join(jobs)).strip():
            assert time.monotonic() < deadline, f"jobs {jobs} still queued after {timeout} s"
            time.sleep(0.5)

    def sacct(self, *jobs: str) -> list[dict[str, str]]:
        """The finished jobs' records (sacct --completion: this cluster has no slurmdbd)."""
        out = self.run("sacct", "-c", "-j", ",".join(jobs), "-n", "-P", f"--format={SACCT_FIELDS}")
        names = SACCT_FIELDS.split(",")
        return [dict(zip(names, line.split("|"))) for line in out.splitlines() if line]

    def sacct_table(self, *jobs: str) -> str:
        return self.run("sacct", "-c", "-j", ",".join(jobs), f"--format={SACCT_FIELDS}")

    def records(self, *jobs: str, timeout: float = 30) -> dict[str, dict[str, str]]:
        """The jobs' sacct records by id, once every one has been written."""
        deadline = time.monotonic() + timeout
        while True:
            rows = {r["JobID"]: r for r in self.sacct(*jobs)}
            if set(jobs) <= set(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.5)


def _up(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AURORA_SLURM_INSTALL": "0"}  # a test run installs nothing
    return subprocess.run(
        [str(LOCAL_SLURM), "up", str(path)], env=env, capture_output=True, text=True, timeout=240
    )


@pytest.fixture(scope="module")
def slurm() -> Iterator[Slurm]:
    """The cluster of AURORA_SLURM_CONF, or a one-node cluster started here; else skip."""
    conf = os.environ.get("AURORA_SLURM_CONF")
    started: Path | None = None
    if not conf and os.environ.get("AURORA_SLURM") == "0":
        pytest.skip(
            "AURORA_SLURM=0: no SLURM cluster for these tests (.ci/run sets it when "
            "scripts/slurm-local.sh up fails, and says why)"
        )
    if not conf:
        missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(c)]
        if missing:
            pytest.skip(
                f"SLURM is not installed ({', '.join(missing)} missing): as root, "
                "`scripts/slurm-local.sh up` installs and starts it (then export "
                "AURORA_SLURM_CONF=<dir>/slurm.conf), or point AURORA_SLURM_CONF at a cluster"
            )
        # Short: the munge socket lives in it, and Unix socket paths are short.
        started = Path(
            tempfile.mkdtemp(prefix="aurora-slurm-", dir="/tmp" if os.path.isdir("/tmp") else None)
        )
        proc = _up(started)
        if proc.returncode != 0:
            subprocess.run([str(LOCAL_SLURM), "down", str(started)], timeout=120)
            why = [ln for ln in proc.stderr.splitlines() if ln.startswith("slurm-local:")]
            pytest.skip(f"could not start SLURM here: {(why or ['(no reason given)'])[-1]}")
        conf = str(started / "slurm.conf")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PYTHONPATH")}
    os.environ["SLURM_CONF"] = conf
    # Jobs run this checkout's pipeline package (the venv may hold another one, editable).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"SLURM_CONF={conf}: sinfo fails: {proc.stderr.strip()}")
        parts = proc.stdout.split()
        default = [p.rstrip("*") for p in parts if p.endswith("*")] or parts
        if not default:
            pytest.skip(f"SLURM_CONF={conf}: the cluster has no partition")
        yield Slurm(Path(conf), default[0])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started is not None:
            subprocess.run([str(LOCAL_SLURM), "down", str(started)], timeout=120)


# ------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("slurm_ckpt"), input_size=64)


@pytest.fixture(scope="module")
def station(tiny_archive):
    return load_station(tiny_archive / "calib" / "station.yaml")


@pytest.fixture(scope="module")
def linked_archive(tiny_archive, tmp_path_factory) -> Path:
    """tiny_archive's frames, each hard-linked again on the next COPIES-1 days: 60x the frames
    (a run long enough to cancel or outlive a worker) at no cost in time or disk."""
    root = tmp_path_factory.mktemp("linked_archive")
    shutil.copytree(tiny_archive / "calib", root / "calib")
    for p in sorted(tiny_archive.rglob("N*.png")):
        t = pd.Timestamp(f"{p.stem[1:9]}T{p.stem[10:16]}")
        for k in range(COPIES):
            u = t + pd.Timedelta(days=k)
            q = root / f"{u:%Y}" / f"{u:%Y%m%d}" / f"N{u:%Y%m%d}G{u:%H%M%S}.png"
            q.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, q)
            except OSError:  # another filesystem
                shutil.copy2(p, q)
    return root


def _launch_module():
    spec = importlib.util.spec_from_file_location(
        "slurm_launch", REPO / "workflows/slurm/launch.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _launch(slurm: Slurm, logs: Path, overrides: dict[str, object]) -> str:
    """workflows/slurm/launch.py on the nightly workflow, as an operator runs it; its output."""
    argv = [
        sys.executable, "workflows/slurm/launch.py", "workflows/nightly.yaml",
        "--queue", slurm.partition, "--cores", str(WORKER["cores"]),
        "--memory", str(WORKER["memory"]), "--gpus-per-job", str(WORKER["gpus_per_job"]),
        "--walltime", str(WORKER["walltime"]), "--max-jobs", "2", "--log-directory", str(logs),
    ]  # fmt: skip
    for k, v in overrides.items():
        argv += ["--set", f"{k}={v}"]
    proc = subprocess.run(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=WAIT_S
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _worker_jobs(logs: Path) -> list[str]:
    """The ids of the worker jobs whose logs dask-jobqueue wrote to ``logs`` (NAME-ID.err)."""
    return sorted({p.stem.rsplit("-", 1)[1] for p in logs.glob("*.err")}, key=int)


# ------------------------------------------------------------------------------ tests


def test_nightly_twice_through_launch_py_classifies_only_new_frames(
    slurm, tiny_archive, station, ckpt, tmp_path, capsys
):
    """launch.py submits worker jobs, they join, classify-archive finishes with every frame
    once and the same predictions as a local run; the next night classifies only new frames."""
    archive = tmp_path / "archive"
    shutil.copytree(tiny_archive, archive)
    out, logs = tmp_path / "out", tmp_path / "logs"
    overrides = {
        "archive": archive,
        "out": out,
        "checkpoint": ckpt,
        "station": archive / "calib" / "station.yaml",
        "bins": "1h",
    }
    err = _launch(slurm, logs, overrides)
    assert "[classify] done" in err and "[occurrence] done" in err
    n_first = len(_assert_exactly_once(out / "predictions", archive, station))
    first_jobs = _worker_jobs(logs)
    assert first_jobs, "no worker job was submitted"

    # The next night: frames of a later winter arrive.
    later = tmp_path / "later"
    synth.make_archive(later, n=10, seed=4, winters=(2005,), size=TINY)
    new = [p for p in later.rglob("N*.png") if "calib" not in p.parts]
    for p in new:
        dst = archive / p.relative_to(later)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst)
        dst.touch()
    err = _launch(slurm, logs, overrides)
    assert "[scan] running" in err and "[classify] running" in err
    pred = _assert_exactly_once(out / "predictions", archive, station)
    assert len(pred) == n_first + len(new)
    runs = read_run(out / "predictions")["runs"]
    assert [r["frames_classified"] for r in runs] == [n_first, len(new)]
    jobs = _worker_jobs(logs)
    assert set(jobs) > set(first_jobs), "the second night submitted no worker job"

    # The same predictions as classify-archive on a local cluster (threads: no process start).
    from pipeline.cluster import dask_client

    local = tmp_path / "local"
    with dask_client(workers=1, processes=False) as client:
        classify_archive(archive, ckpt, local, station=station, device="cpu", client=client)
    ref = read_predictions(local)
    got = pred.merge(ref, on=["path", "frame"], suffixes=("", "_local"), validate="1:1")
    assert len(got) == len(ref) == len(pred)
    # Two float32 runs (other batches and threads): each against the float64 model within its
    # bound (test_classify._exact), labels equal where the float64 top-2 margin exceeds it.
    import torch

    from pipeline.checkpoint import load_checkpoint

    inputs = _reference(archive, station, ckpt)[["path", "frame", "x"]]
    got = got.merge(inputs, on=["path", "frame"], validate="1:1")
    assert len(got) == len(pred)
    exact = _exact(load_checkpoint(ckpt)[0], torch.stack(list(got["x"])))
    _assert_probabilities(got[list(PROB_COLUMNS)].to_numpy(), exact)
    _assert_probabilities(got[[f"{c}_local" for c in PROB_COLUMNS]].to_numpy(), exact)
    top2 = np.sort(exact["p"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * exact["p_prob"].max(axis=1)
    assert (got["label"].astype(str) == got["label_local"].astype(str))[clear].all()
    np.testing.assert_allclose(got["mlt"], got["mlt_local"])  # the same float64 formula

    rows = slurm.records(*jobs)
    assert set(rows) == set(jobs)
    assert {r["Partition"] for r in rows.values()} == {slurm.partition}
    assert {r["NCPUS"] for r in rows.values()} == {str(WORKER["cores"])}
    with capsys.disabled():
        print("\nworker jobs of the two nightly runs:\n" + slurm.sacct_table(*jobs))


def test_sbatch_job_sh_runs_the_workflow_with_rank_0_as_scheduler(
    slurm, tiny_archive, station, ckpt, tmp_path, capsys
):
    """Batch mode: `sbatch workflows/slurm/job.sh` as written, with only the site settings
    (partition, node and GPU counts) given on the sbatch command line."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"job.sh activates a venv; {venv} has no bin/activate")
    out = tmp_path / "out"
    sets = {
        "archive": tiny_archive,
        "out": out,
        "checkpoint": ckpt,
        "station": tiny_archive / "calib" / "station.yaml",
        "bins": "1h",
    }
    os.environ["AURORA_VENV"] = str(venv)
    try:
        job = slurm.sbatch(
            f"--partition={slurm.partition}", "--nodes=1", "--ntasks-per-node=3",
            "--cpus-per-task=1", "--gres=none", "--time=00:15:00",
            f"--output={tmp_path}/aurora-%j.log",
            "workflows/slurm/job.sh", "workflows/nightly.yaml",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
            cwd=REPO,
        )  # fmt: skip
    finally:
        os.environ.pop("AURORA_VENV", None)
    slurm.wait(job)
    log = (tmp_path / f"aurora-{job}.log").read_text()
    row = slurm.records(job)[job]
    assert (row["State"], row["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert row["NCPUS"] == "3" and row["JobName"] == "aurora-nightly"
    for stage in ("scan", "classify", "occurrence"):
        assert f"[{stage}] done" in log
    _assert_exactly_once(out / "predictions", tiny_archive, station)
    assert (out / "occurrence" / "occurrence.parquet").is_file()
    assert not (REPO / f"scheduler-{job}.json").exists(), "the scheduler file was left behind"
    with capsys.disabled():
        print("\nbatch job:\n" + slurm.sacct_table(job))


@contextlib.contextmanager
def _slurm_cluster(slurm: Slurm, logs: Path) -> Iterator:
    """launch.py's SLURMCluster, with lost workers replaced after 1 s instead of 15, and a
    scheduler that keeps every transition (distributed keeps the last 1,000 by default: a
    180-shard run makes more, and the early hand-backs the tests look for were dropped)."""
    import dask
    import dask_jobqueue  # noqa: F401 - before config.set: importing distributed adds its config

    launch = _launch_module()
    settings = {
        "distributed.deploy.lost-worker-timeout": "1s",
        "distributed.admin.low-level-log-length": 1_000_000,
    }
    with dask.config.set(settings):
        cluster = launch.make_cluster(queue=slurm.partition, log_directory=str(logs), **WORKER)
        try:
            yield cluster
        finally:
            cluster.close()


def _transitions(scheduler) -> list:
    """A copy of the scheduler's transition log (its loop runs in another thread and may append
    while we copy: deque then raises, and we copy again)."""
    for _ in range(100):
        try:
            return list(scheduler.transition_log)
        except RuntimeError:
            time.sleep(0.01)
    raise AssertionError("the scheduler's transition log never held still long enough to copy")


def _handed_back(transitions) -> set[str]:
    """The classify_shard tasks that went from a worker back to the scheduler (``processing`` to
    ``released``) among ``transitions``: shards their worker held when it left. Any stimulus: a
    worker retiring at its lifetime hands back on ``worker-close-gracefully`` when the retirement
    completes, or on ``handle-worker-cleanup`` when it could not (no other worker to take its
    data) and the worker closed anyway."""
    return {
        str(t.key)
        for t in transitions
        if str(t.key).startswith("classify_shard")
        and (t.start, t.finish) == ("processing", "released")
    }


def _first_outcomes(transitions, keys: set[str]) -> dict[str, str | None]:
    """For each key, what its first transition out of ``processing`` in ``transitions`` led to:
    ``memory`` (its worker finished it), ``released`` (handed back), or None (no such step)."""
    outcome: dict[str, str | None] = dict.fromkeys(keys)
    for t in transitions:
        key = str(t.key)
        if key in outcome and outcome[key] is None and t.start == "processing":
            outcome[key] = t.finish
    return outcome


def _until(cond, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.02)


def test_worker_jobs_leaving_mid_run_hand_their_shards_back(
    slurm, linked_archive, station, ckpt, tmp_path, capsys
):
    """One classify-archive run loses two worker jobs: one retires at its --lifetime, one is
    scancelled. Each shard they held goes back to the scheduler; every frame ends up once."""
    from dask_jobqueue.slurm import SLURMJob
    from distributed.metrics import time as scheduler_time  # its transition log's clock

    launch = _launch_module()
    out, logs = tmp_path / "pred", tmp_path / "logs"
    n_frames = len(list(linked_archive.glob("*/*/N*.png")))
    n_shards = -(-n_frames // 20)
    with _slurm_cluster(slurm, logs) as cluster:
        # A worker job whose lifetime ends long before the run can: the script dask-jobqueue
        # writes for launch.py's settings, with --lifetime 8s, joining the cluster's scheduler.
        kwargs = launch.cluster_kwargs(
            queue=slurm.partition, lifetime="8s", lifetime_stagger="0s",
            log_directory=str(logs), **WORKER,
        )  # fmt: skip
        script = SLURMJob(
            scheduler=cluster.scheduler_address, name="short", job_name="aurora-short", **kwargs
        ).job_script()
        assert "--lifetime 8s" in script
        (tmp_path / "short.sh").write_text(script)
        # INFO: the worker logs why it closes (a CLI call in this process may have exported
        # DASK_LOGGING__DISTRIBUTED=warning, which the job inherits).
        short = slurm.sbatch(
            "--export=ALL,DASK_LOGGING__DISTRIBUTED=info", str(tmp_path / "short.sh"), cwd=tmp_path
        )
        cluster.wait_for_workers(1, timeout=WAIT_S)
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(
                classify_archive, linked_archive, ckpt, out, station=station,
                scheduler=cluster.scheduler_address, shard_size=20, batch_size=20, device="cpu",
            )  # fmt: skip
            _until(lambda: not cluster.scheduler.workers or run.done(), "the lifetime to end")
            retired_at = None if run.done() else len(shard_files(out))
            lifetime_back = _handed_back(_transitions(cluster.scheduler))
            # The cluster's own worker jobs (lifetime 110 min) take over; cancel the first
            # once it has finished a shard; adapt() submits a job in its place.
            cluster.adapt(minimum_jobs=1, maximum_jobs=1)
            _until(lambda: cluster.workers and cluster.scheduler.workers, "a worker job")
            victim = next(iter(cluster.workers.values())).job_id
            before = len(shard_files(out))
            _until(lambda: len(shard_files(out)) > before or run.done(), "a shard")
            cancelled_at = None if run.done() else len(shard_files(out))
            # With one job left the victim is the only worker: the shards it holds right now,
            # and where the scheduler's log stands (under load the victim may still finish
            # them before the cancel lands, and then there is nothing to hand back).
            mark = scheduler_time()  # before the sample: a shard finished meanwhile is seen
            held = {
                str(ts.key) for ws in cluster.scheduler.workers.values() for ts in ws.processing
            }
            slurm.run("scancel", victim)
            summary = run.result(timeout=WAIT_S)
        after_cancel = [t for t in _transitions(cluster.scheduler) if t.timestamp >= mark]
        # Not less lifetime_back: a shard handed back at the lifetime can be the victim's next.
        cancel_back = _handed_back(after_cancel)
    print(f"lifetime: after {retired_at} of {n_shards} shards; scancel: after {cancelled_at}")
    assert retired_at is not None and retired_at < n_shards, "the run ended before the lifetime"
    assert cancelled_at is not None and cancelled_at < n_shards, "the run ended before scancel"
    assert summary.shards_failed == 0 and summary.frames_classified == n_frames
    _assert_exactly_once(out, linked_archive, station)
    assert not list(out.rglob("*.part")), "a cut shard left a partial file"
    assert lifetime_back, "the worker retiring at its lifetime held no shard"
    outcome = _first_outcomes(after_cancel, held)
    assert all(outcome[k] in ("released", "memory") for k in held), outcome
    # A shard the victim held and had not finished when it went is handed back, none lost.
    unfinished = {k for k in held if outcome[k] == "released"}
    assert unfinished <= cancel_back, "the cancelled worker's shard was not handed back"

    jobs = [short, *_worker_jobs(logs)]
    rows = slurm.records(*jobs)
    # The short-lived job ended by itself (no scancel): its worker retired, the script returned.
    assert (rows[short]["State"], rows[short]["ExitCode"]) == ("COMPLETED", "0:0")
    assert "worker-lifetime-reached" in (logs / f"aurora-short-{short}.err").read_text()
    assert rows[victim]["State"] == "CANCELLED"
    assert len(set(jobs)) >= 3, "no job replaced the cancelled one"
    with capsys.disabled():
        print("\nlifetime and scancel mid-run:\n" + slurm.sacct_table(*sorted(set(jobs), key=int)))
