"""Run an aurora-pipeline workflow on a SLURM cluster through dask-jobqueue.

Interactive/adaptive mode (the default): this script runs on a login node, starts a Dask
scheduler there, and SLURM jobs join as GPU workers while there is work:

    python workflows/slurm/launch.py workflows/nightly.yaml --queue gpu --account myproj \
        --gpus-per-job 1 --max-jobs 8

Batch mode: submit ``workflows/slurm/job.sh`` with sbatch; inside the allocation
``--runner`` uses dask-jobqueue's SLURMRunner (rank 0 scheduler, rank 1 this client, the
other ranks workers).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cluster_kwargs(
    queue: str,
    account: str | None = None,
    cores: int = 8,
    memory: str = "64GB",
    gpus_per_job: int = 1,
    walltime: str = "02:00:00",
    lifetime: str = "110m",
    lifetime_stagger: str = "4m",
    local_directory: str = "$TMPDIR",
    log_directory: str | None = None,
    python: str | None = None,
) -> dict[str, Any]:
    """SLURMCluster arguments: several worker processes per GPU, each declaring resource GPU=1.

    One process cannot decode frames fast enough for a GPU (the GIL): each GPU gets one worker
    per two of the job's cores, as a local run does (pipeline.cluster.workers_per_gpu).
    """
    from pipeline.cluster import workers_per_gpu

    if gpus_per_job:
        workers_per_job = gpus_per_job * workers_per_gpu(cores, gpus_per_job)
    else:
        workers_per_job = max(1, cores // 2)
    extra = ["--resources", "GPU=1"] if gpus_per_job else []
    # --lifetime lets a worker retire gracefully before the SLURM wall time kills it: the shard
    # it is running goes back to the scheduler and another worker classifies it whole (shard
    # files are written atomically); the adaptive cluster then submits a fresh job.
    extra += ["--lifetime", lifetime, "--lifetime-stagger", lifetime_stagger]
    directives = [f"--gres=gpu:{gpus_per_job}"] if gpus_per_job else []
    return {
        "queue": queue,
        "account": account,
        "cores": cores,
        "processes": workers_per_job,
        "memory": memory,
        "walltime": walltime,
        "job_extra_directives": directives,
        "worker_extra_args": extra,
        "local_directory": local_directory,
        "log_directory": log_directory,
        "python": python or sys.executable,
    }


def make_cluster(**kwargs: Any) -> Any:
    """A dask_jobqueue.SLURMCluster with GPU workers.

    Needs `pip install aurora-pipeline[cluster]`.
    """
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(**cluster_kwargs(**kwargs))


def main(argv: list[str] | None = None) -> int:
    """Start (or join) the cluster and run the workflow against it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workflow")
    ap.add_argument("--queue", default="gpu")
    ap.add_argument("--account", default=None)
    ap.add_argument("--cores", type=int, default=8)
    ap.add_argument("--memory", default="64GB")
    ap.add_argument("--gpus-per-job", type=int, default=1)
    ap.add_argument("--walltime", default="02:00:00")
    ap.add_argument(
        "--lifetime",
        default="110m",
        help="workers retire gracefully after this long (keep it under --walltime)",
    )
    ap.add_argument("--lifetime-stagger", default="4m", help="spread of the workers' lifetimes")
    ap.add_argument("--log-directory", default=None, help="the worker jobs' logs (default: here)")
    ap.add_argument("--min-jobs", type=int, default=0)
    ap.add_argument("--max-jobs", type=int, default=4)
    ap.add_argument("--runner", action="store_true", help="batch mode inside an sbatch allocation")
    ap.add_argument("--print-job-script", action="store_true", help="show the job script and exit")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)

    from pipeline.cli import cli
    from pipeline.workflow import parse_overrides, run_workflow

    overrides = parse_overrides(args.overrides)
    if args.runner:
        from dask_jobqueue.slurm import SLURMRunner
        from distributed import Client

        with SLURMRunner() as runner, Client(runner) as client:
            client.wait_for_workers(1)
            run_workflow(
                args.workflow, cli, scheduler=runner.scheduler_address, overrides=overrides
            )
        return 0
    cluster = make_cluster(
        queue=args.queue,
        account=args.account,
        cores=args.cores,
        memory=args.memory,
        gpus_per_job=args.gpus_per_job,
        walltime=args.walltime,
        lifetime=args.lifetime,
        lifetime_stagger=args.lifetime_stagger,
        log_directory=args.log_directory,
    )
    try:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        cluster.adapt(minimum_jobs=args.min_jobs, maximum_jobs=args.max_jobs)
        print(f"dask dashboard: {cluster.dashboard_link}", file=sys.stderr)
        run_workflow(args.workflow, cli, scheduler=cluster.scheduler_address, overrides=overrides)
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
