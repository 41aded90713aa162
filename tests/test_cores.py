"""usable_cores: the process's CPU affinity (a SLURM or cgroup cpuset), not the host's cores."""

from __future__ import annotations

import os

import pytest

from pipeline import cluster, cores


def test_a_cpuset_of_three_cores_on_a_large_host_counts_three(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 9}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    assert cores.usable_cores() == 3
    assert cluster.default_workers() == 1  # one worker per two usable cores


def test_without_an_affinity_call_the_host_count_is_used(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cores.usable_cores() == 6
    assert cluster.default_workers() == 3


@pytest.mark.parametrize("unknown", [None, 0])
def test_an_unknown_count_is_one_core(monkeypatch, unknown):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: unknown)
    assert cores.usable_cores() == 1
