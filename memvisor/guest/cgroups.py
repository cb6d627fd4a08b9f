"""The guest's cgroup v2 tree: PID 1 in memvisor-init (entered by stage 0 on a shared root, memory.swap.max 0) or
the root cgroup (an initramfs root), and every command in a cgroup of its own under one parent:
memvisor-workloads/exec-<exec id>.

A command's own cgroup is what lets the agent say how it ended: its memory.events counts the processes the
guest's OOM killer ended in it (the exit status alone, 137, cannot tell that from a `kill -9`), and memctl
freezes a caller's whole command through it. The parent's memory.pressure is the workload's memory stall
alone: the system-wide figure also counts the balloon driver's own reclaim, which is the squeeze at work, not
harm to anyone. Guest only, stdlib only, cheap to import at boot.
"""

from __future__ import annotations

import os

from memvisor import contract
from memvisor.guest import linux

ROOT = "/sys/fs/cgroup"
WORKLOADS = "memvisor-workloads"
EXEC_PREFIX = "exec-"


def mount() -> bool:
    """Mount cgroup2 at ROOT (once) and create the workloads' parent, with the memory controller on for the
    cgroups under both; True if PID 1 runs in contract.INIT_CGROUP (stage 0 put it there)."""
    if not os.path.exists(f"{ROOT}/cgroup.procs"):
        linux.mount("cgroup2", ROOT, "cgroup2", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    os.makedirs(f"{ROOT}/{WORKLOADS}", exist_ok=True)
    for parent in (ROOT, f"{ROOT}/{WORKLOADS}"):
        with open(f"{parent}/cgroup.subtree_control") as f:
            enabled = f.read().split()
        if "memory" not in enabled:
            with open(f"{parent}/cgroup.subtree_control", "w") as f:
                f.write("+memory")
    with open("/proc/self/cgroup") as f:
        return f.read().strip() == f"0::/{contract.INIT_CGROUP}"


def for_exec(exec_id: int) -> str:
    """The cgroup command `exec_id` runs in (created if needed; spawn moves the child there before exec)."""
    path = f"{ROOT}/{WORKLOADS}/{EXEC_PREFIX}{exec_id}"
    os.makedirs(path, exist_ok=True)
    return path


def pressure_file() -> str | None:
    """The workloads' memory.pressure (None before mount())."""
    path = f"{ROOT}/{WORKLOADS}/memory.pressure"
    return path if os.path.exists(path) else None


def is_exec(path: str) -> bool:
    """Whether `path` (as /proc/PID/cgroup names it: "/memvisor-workloads/exec-7") is a command's own cgroup."""
    prefix = f"/{WORKLOADS}/{EXEC_PREFIX}"
    return path.startswith(prefix) and path[len(prefix):].isdigit()


def oom_kills(path: str) -> int:
    """How many processes the OOM killer has ended in this cgroup and below (memory.events oom_kill; 0 if the
    cgroup or the figure is gone)."""
    try:
        with open(f"{path}/memory.events") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def drop(path: str) -> None:
    """Remove a command's cgroup once it has ended (kept while orphans of the command still live in it)."""
    try:
        os.rmdir(path)
    except OSError:
        pass
