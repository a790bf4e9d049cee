"""How many cores this process may use: the count behind `gateway serve --workers auto`.

Imports: nothing of the gateway.

As nginx's `worker_processes auto`, one worker per core, where "core" is what the process
can really run on: the CPUs its affinity mask allows (taskset, cpusets), and under a
cgroup v2 CPU quota (a Kubernetes `limits.cpu`, `docker run --cpus`) no more workers than
the quota's whole cores, rounded up. A container on a 64-core node limited to 2 CPUs
gets 2 workers, not 64 that the quota would throttle.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use (at least 1): its affinity, capped by its cgroup's quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota(cpu_max)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def cgroup_quota(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """Whole cores of a cgroup v2 `cpu.max` quota ("200000 100000" → 2), rounded up; None
    when there is no quota ("max"), no file (cgroup v1, not Linux) or it cannot be read."""
    try:
        fields = cpu_max.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))
