"""How many CPU cores this process may use: the one count every stage sizes its pools by."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a SLURM or cgroup cpuset, not the host)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux: no affinity call
        return os.cpu_count() or 1
