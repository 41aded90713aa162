"""Run an aurora-pipeline workflow on Kubernetes with the dask-kubernetes operator.

    python workflows/kubernetes/launch.py workflows/nightly.yaml --image registry/aurora:0.1 \
        --gpu-workers 4 --archive-pvc yrs-archive

Needs the Dask operator installed in the cluster and `pip install dask-kubernetes` here.
The archive and the outputs live on a PersistentVolumeClaim mounted at /data in every pod.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cluster_spec(
    name: str = "aurora",
    image: str = "ghcr.io/example/aurora-pipeline:latest",
    workers: int = 2,
    gpus_per_worker: int = 1,
    cpu: str = "8",
    memory: str = "32Gi",
    archive_pvc: str = "aurora-data",
) -> dict[str, Any]:
    """A DaskCluster custom resource: GPU worker pods, data at /data.

    Each pod runs several worker processes per GPU (pipeline.cluster.workers_per_gpu: one per
    two cores; one process cannot decode fast enough for a GPU), each declaring resource GPU=1.
    """
    from pipeline.cluster import workers_per_gpu

    volume = {"name": "data", "persistentVolumeClaim": {"claimName": archive_pvc}}
    mount = {"name": "data", "mountPath": "/data"}
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    worker_args = ["dask-worker", "--name", "$(DASK_WORKER_NAME)", "--dashboard-address", "8788"]
    if gpus_per_worker:
        limits["nvidia.com/gpu"] = str(gpus_per_worker)
        cores = max(1, int(cpu[:-1]) // 1000 if cpu.endswith("m") else int(float(cpu)))
        procs = gpus_per_worker * workers_per_gpu(cores, gpus_per_worker)
        worker_args += ["--nworkers", str(procs), "--resources", "GPU=1"]
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": {"name": name},
        "spec": {
            "worker": {
                "replicas": workers,
                "spec": {
                    "containers": [
                        {
                            "name": "worker",
                            "image": image,
                            "args": worker_args,
                            "resources": {"limits": limits, "requests": dict(limits)},
                            "volumeMounts": [mount],
                        }
                    ],
                    "volumes": [volume],
                },
            },
            "scheduler": {
                "spec": {
                    "containers": [
                        {
                            "name": "scheduler",
                            "image": image,
                            "args": ["dask-scheduler"],
                            "ports": [
                                {"name": "tcp-comm", "containerPort": 8786},
                                {"name": "http-dashboard", "containerPort": 8787},
                            ],
                        }
                    ]
                },
                "service": {
                    "type": "ClusterIP",
                    "selector": {
                        "dask.org/cluster-name": name,
                        "dask.org/component": "scheduler",
                    },
                    "ports": [
                        {"name": "tcp-comm", "port": 8786, "targetPort": "tcp-comm"},
                        {"name": "http-dashboard", "port": 8787, "targetPort": "http-dashboard"},
                    ],
                },
            },
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Create the Dask cluster, run the workflow against it, and delete the cluster."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workflow")
    ap.add_argument("--image", required=True)
    ap.add_argument("--gpu-workers", type=int, default=2)
    ap.add_argument("--gpus-per-worker", type=int, default=1)
    ap.add_argument("--archive-pvc", default="aurora-data")
    ap.add_argument("--print-spec", action="store_true", help="print the DaskCluster YAML and exit")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    spec = cluster_spec(
        image=args.image,
        workers=args.gpu_workers,
        gpus_per_worker=args.gpus_per_worker,
        archive_pvc=args.archive_pvc,
    )
    if args.print_spec:
        import yaml

        print(yaml.safe_dump(spec, sort_keys=False))
        return 0
    from dask_kubernetes.operator import KubeCluster

    from pipeline.cli import cli
    from pipeline.workflow import parse_overrides, run_workflow

    with KubeCluster(custom_cluster_spec=spec) as cluster:
        run_workflow(
            args.workflow,
            cli,
            scheduler=cluster.scheduler_address,
            overrides=parse_overrides(args.overrides),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
