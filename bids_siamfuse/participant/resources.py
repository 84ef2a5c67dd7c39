"""How much of a node the participant level takes: processes, a memory budget, cores per step.

The participant workflow of every selected subject is one nipype graph, run by MultiProc
(``engine.GuardedMultiProc``). MultiProc starts a ready step when the step's declared cores
(``n_procs``) and memory (``mem_gb``) fit in what is free of ``--nprocs`` and of the memory
budget, so subjects and the independent T1w/PET branches of a subject run side by side as far
as the node allows. Four decisions make that fill a node (``docs/hpc.md``, "Filling a node",
has the measured figures):

* **cores per step**: an ANTs/ITK step declares the ITK threads it really runs
  (:func:`step_cores`: 1 by default, because ITK runs single-threaded for reproducibility,
  ``preproc.registration.itk_threads``); declaring ``--omp-nthreads`` cores (up to 8) for a
  single-threaded step let only two steps run at once on a 16-core node;
* **memory budget** (:func:`memory_budget_gb`): ``--mem-mb`` when given, else
  :data:`MEMORY_SHARE` of the memory this process can still use (the smaller of the kernel's
  ``MemAvailable`` and what the cgroup's limit leaves: a SLURM job or a container sees its
  own limit, not the machine's);
* **where the data sinks run** (:func:`submit_sinks`): in the workers, so the scheduler's
  process never stalls writing derivatives;
* **processes** (:func:`default_nprocs`): without ``--nprocs``, the CPUs this process may run
  on (affinity mask and cgroup CPU quota), but no more worker processes than the budget holds
  at :data:`WORKER_PEAK_GB` each (the heaviest step's peak, worker included, measured).

``BIDS_SIAMFUSE_LEGACY_SCHEDULING=1`` restores the previous scheduling (steps declare
``--omp-nthreads`` cores, sinks in the scheduler's process, nipype's memory default of 90 % of
the machine, every CPU of the machine): the baseline of ``benchmarks/bench_participant_node.py``.

Nothing here changes what a step computes: the threads of ITK, BLAS and torch inside a step
stay as they were (``--omp-nthreads``, ``itk_threads``), so outputs do not depend on
``--nprocs`` or on the order in which the scheduler starts steps.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

LOGGER = logging.getLogger("bids_siamfuse.participant")

#: share of the available memory the scheduler plans with (the rest: the main process, the
#: page cache of the images, and estimates that run over)
MEMORY_SHARE = 0.9
#: memory to plan per worker process, GB: 32 subjects on 16 workers peaked at 16.8 GB summed
#: RSS over 17 processes (~1.0 GB each; 12.8 GB PSS) with the 1.11 mm synthetic T1w (7.4 M
#: voxels); a real 1 mm T1w has up to ~1.6x the voxels (docs/hpc.md, "Filling a node")
WORKER_PEAK_GB = 2.0

#: set to 1: the previous scheduling (see the module docstring)
LEGACY_VARIABLE = "BIDS_SIAMFUSE_LEGACY_SCHEDULING"

_GB = 1024.0**3
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


# ----------------------------------------------------------------------------------------------
# what this process may use
# ----------------------------------------------------------------------------------------------


def meminfo_available_gb(path: str | Path = "/proc/meminfo") -> float | None:
    """The kernel's ``MemAvailable`` (memory that can be given out without swapping), GB."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / _GB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text.split()[0])
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _inactive_file(stat: Path, key: str) -> int:
    """Reclaimable page cache of a cgroup (counted in its usage, given back under pressure)."""
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass  # no readable memory.stat (no cgroup, another layout): nothing to add back
    return 0


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """``{controller: path}`` from ``/proc/self/cgroup`` (``""`` is cgroup v2's)."""
    out = {}
    try:
        for line in proc_cgroup.read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                for controller in parts[1].split(",") if parts[1] else [""]:
                    out[controller] = parts[2]
    except OSError:
        pass  # no /proc/self/cgroup (not Linux, or hidden): no cgroup limits apply
    return out


def _candidates(mount: Path, path: str) -> list[Path]:
    """The cgroup's folder and its parents up to the mount (inside a container the mount is
    often the cgroup itself, whatever ``/proc/self/cgroup`` says)."""
    folders = []
    relative = Path(path.lstrip("/")) if path else Path()
    for folder in (mount / relative, *(mount / p for p in relative.parents)):
        if folder.is_dir() and folder not in folders:
            folders.append(folder)
    if mount.is_dir() and mount not in folders:
        folders.append(mount)
    return folders


def cgroup_memory_gb(
    root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup"
) -> float | None:
    """What the tightest memory limit of this process's cgroups (v2 or v1) still leaves, GB:
    limit minus usage (reclaimable page cache not counted as used); None without a limit."""
    root, paths = Path(root), _cgroup_paths(Path(proc_cgroup))
    # (hierarchy key, mount, limit file, usage file, inactive page-cache key): v2, then v1
    layouts = []
    if "" in paths and (root / "cgroup.controllers").exists():  # v2, unified hierarchy
        layouts.append(("", root, "memory.max", "memory.current", "inactive_file"))
    if "memory" in paths:  # v1
        layouts.append(
            (
                "memory",
                root / "memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        )
    left = []
    for key, mount, limit_file, usage_file, inactive_key in layouts:
        for folder in _candidates(mount, paths[key]):
            limit = _read_int(folder / limit_file)
            if limit is None:
                continue
            used = _read_int(folder / usage_file) or 0
            used -= _inactive_file(folder / "memory.stat", inactive_key)
            left.append(limit - max(used, 0))
    return max(min(left), 0) / _GB if left else None


def available_memory_gb(**paths) -> float | None:
    """The smaller of ``MemAvailable`` and the cgroup's headroom (GB); None when neither is
    known (then nipype's default, 90 % of the machine's memory, applies)."""
    known = [
        v
        for v in (
            meminfo_available_gb(paths.get("meminfo", "/proc/meminfo")),
            cgroup_memory_gb(
                paths.get("cgroup_root", "/sys/fs/cgroup"),
                paths.get("proc_cgroup", "/proc/self/cgroup"),
            ),
        )
        if v is not None
    ]
    return min(known) if known else None


def available_cpus(
    root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup"
) -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, SLURM's cpuset), capped
    by a cgroup CPU quota (``docker --cpus``, v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    root, paths = Path(root), _cgroup_paths(Path(proc_cgroup))
    quotas = []
    if "" in paths and (root / "cgroup.controllers").exists():
        for folder in _candidates(root, paths[""]):
            try:
                quota, period = (folder / "cpu.max").read_text().split()[:2]
            except (OSError, ValueError):
                continue
            if quota != "max" and int(period) > 0:
                quotas.append(int(quota) / int(period))
    for key in ("cpu", "cpu,cpuacct"):
        if key not in paths:
            continue
        for folder in _candidates(root / key, paths[key]):
            quota = _read_int(folder / "cpu.cfs_quota_us")
            period = _read_int(folder / "cpu.cfs_period_us")
            if quota and quota > 0 and period:
                quotas.append(quota / period)
    if quotas:
        cpus = min(cpus, max(1, math.ceil(min(quotas))))
    return max(1, cpus)


# ----------------------------------------------------------------------------------------------
# the decisions
# ----------------------------------------------------------------------------------------------


def legacy() -> bool:
    """``BIDS_SIAMFUSE_LEGACY_SCHEDULING=1``: the previous scheduling."""
    return os.environ.get(LEGACY_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def memory_budget_gb(mem_mb: int = 0, available_gb: float | None = None) -> float | None:
    """The memory MultiProc plans with: ``--mem-mb`` when given, else :data:`MEMORY_SHARE` of
    ``available_gb`` (default: :func:`available_memory_gb`); None when nothing is known."""
    if mem_mb:
        return mem_mb / 1024.0
    if legacy():
        return None
    if available_gb is None:
        available_gb = available_memory_gb()
    if available_gb is None:
        return None
    return round(MEMORY_SHARE * available_gb, 2)


def default_nprocs(cpus: int, budget_gb: float | None) -> int:
    """Processes without ``--nprocs``: every CPU, but no more workers than ``budget_gb`` holds
    at :data:`WORKER_PEAK_GB` each (at least one)."""
    cpus = max(1, int(cpus))
    if budget_gb is None:
        return cpus
    return max(1, min(cpus, int(budget_gb // WORKER_PEAK_GB)))


def participant_nprocs(nprocs: int = 0, mem_mb: int = 0) -> tuple[int, float | None]:
    """``(processes, memory budget GB)`` of a participant run (``config.resolve``)."""
    budget = memory_budget_gb(mem_mb)
    if nprocs:
        return int(nprocs), budget
    if legacy():
        return int(os.cpu_count() or 1), budget
    cpus = available_cpus()
    chosen = default_nprocs(cpus, budget)
    if chosen < cpus:
        LOGGER.info(
            "%d of %d CPUs used: %.1f GB of memory hold %d worker(s) at %.1f GB each "
            "(--nprocs/--mem-mb to change)",
            chosen,
            cpus,
            budget,
            chosen,
            WORKER_PEAK_GB,
        )
    return chosen, budget


def step_cores(omp_nthreads: int) -> int:
    """Cores an ANTs/ITK step keeps busy: its ITK threads (1 unless
    ``BIDS_SIAMFUSE_ITK_THREADS`` asks for more; ``preproc.registration.itk_threads``)."""
    from ..preproc.registration import itk_threads

    return max(1, int(itk_threads(max(1, int(omp_nthreads or 1)))))


def annotate_cores(workflow, omp_nthreads: int) -> int:
    """Declare on every ANTs/ITK step (the nodes with a ``num_threads`` input,
    ``interfaces/anat.py`` and ``pet.py``) the cores it uses, :func:`step_cores`, keeping the
    threads it runs with (nipype copies ``n_procs`` into ``num_threads``; it is put back).
    Returns the number of steps changed."""
    if legacy():
        return 0
    cores = step_cores(omp_nthreads)
    changed = 0
    for node in workflow._get_all_nodes():
        inputs = node.interface.inputs
        if not hasattr(inputs, "num_threads") or node.n_procs <= cores:
            continue
        threads = inputs.num_threads
        node.n_procs = cores
        inputs.num_threads = threads
        changed += 1
    return changed


def submit_sinks(workflow) -> int:
    """Run the data sinks (``DerivativesDataSink``: read, name and compress each derivative)
    in the worker processes, not in the scheduler's own process: there they ran one after the
    other while no new step could start (one subject's sinks: several seconds; 32 subjects:
    minutes of a stalled scheduler). Returns the number of sinks moved."""
    if legacy():
        return 0
    from ..interfaces.bids import DerivativesDataSink

    moved = 0
    for node in workflow._get_all_nodes():
        if node.run_without_submitting and isinstance(node.interface, DerivativesDataSink):
            node.run_without_submitting = False
            moved += 1
    return moved


def schedule_steps(workflow, omp_nthreads: int) -> dict:
    """Everything above for one participant workflow, before it runs."""
    return {
        "cores": annotate_cores(workflow, omp_nthreads),
        "sinks": submit_sinks(workflow),
    }


def plugin_args(nprocs: int, memory_gb: float | None, workflow=None) -> dict:
    """MultiProc's arguments: ``n_procs`` and ``memory_gb`` (never below the heaviest step's
    estimate when the budget was not given: a step bigger than the budget then runs alone
    instead of the run being refused)."""
    args = {"n_procs": int(nprocs), "raise_insufficient": False}
    if memory_gb is not None:
        if workflow is not None:
            heaviest = max((float(n.mem_gb) for n in workflow._get_all_nodes()), default=0.0)
            memory_gb = max(memory_gb, heaviest)
        args["memory_gb"] = float(memory_gb)
    return args
