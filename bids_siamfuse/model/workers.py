"""Devices and workers of the cross-validation: which devices run the tasks, with how many
torch threads, in this process or in spawned worker processes.

Devices
    :func:`resolve_devices` turns ``--device`` / ``--gpus`` / ``--cpu-workers`` into a list of
    worker devices. One entry: everything runs in this process. Several: one spawned process per
    entry (``torch.multiprocessing``, start method ``spawn``), each pulling tasks (folds,
    permutation repeats, the final model) from a shared queue; the cohort reaches them as
    memory-mapped ``.npy`` files, results come back to this process and are ordered by task,
    never by arrival. A GPU worker sees only its own GPU (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SiamFuseError, UsageError
from ..threads import set_threads
from .data import RegionDataset, RegionLayout
from .tasks import Fit, Task, default_config, default_fit, run_task, task_config

if TYPE_CHECKING:
    from .options import TrainConfig

LOGGER = logging.getLogger("bids_siamfuse.cv")


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a visible
    GPU or an unknown name: UsageError (exit 64)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is visible (use --device cpu)")
        return device
    if device != "cpu":
        raise UsageError(f"unknown device {device!r}")
    return device


def resolve_devices(
    device: str = "auto", gpus: int = 0, cpu_workers: int = 1, per_gpu: int = 1
) -> list[str]:
    """Worker devices: every visible GPU (at most ``gpus`` when > 0), else CPU.

    On CPU one worker runs in this process, or ``cpu_workers`` worker processes when > 1. On
    GPUs ``per_gpu`` worker processes share each card (``--workers-per-gpu``): each fit leaves
    the GPU idle while its CPU side runs (standardizer, baselines, graph capture), and 4
    workers on one H200 ran 26 fits 1.27x faster than one (docs/benchmarks.md, issue 16).
    Results do not depend on it (every fit is seeded from its task).
    """
    device = resolve_device(device)
    if device.startswith("cuda"):
        import torch

        if ":" in device:
            return [device] * max(1, per_gpu)
        n = torch.cuda.device_count()
        if gpus:
            n = min(n, gpus)
        # one worker per card first, so that fewer tasks than workers still spread over cards
        return [f"cuda:{i}" for _ in range(max(1, per_gpu)) for i in range(n)]
    return ["cpu"] * max(1, int(cpu_workers or 1))


def _save_shared(data: RegionDataset, folder: Path) -> str:
    """Write the cohort for the workers (big arrays as .npy, memory-mapped there).

    Only the folder's name goes to the workers: large process arguments can deadlock
    ``spawn`` when a child dies before reading them.
    """
    folder = Path(folder)
    np.save(folder / "gm.npy", np.ascontiguousarray(data.gm))
    np.save(folder / "pet.npy", np.ascontiguousarray(data.pet))
    np.savez(
        folder / "meta.npz",
        labels=np.asarray(data.labels),
        classes=np.array(data.classes),
        subjects=np.asarray(data.subjects).astype(str),
        sessions=np.asarray(data.sessions).astype(str),
        **data.layout.to_arrays(),
    )
    return str(folder)


def _load_shared(folder: str) -> RegionDataset:
    folder = Path(folder)
    with np.load(folder / "meta.npz", allow_pickle=False) as f:
        return RegionDataset(
            gm=np.load(folder / "gm.npy", mmap_mode="r"),
            pet=np.load(folder / "pet.npy", mmap_mode="r"),
            labels=f["labels"],
            classes=tuple(str(c) for c in f["classes"]),
            subjects=f["subjects"],
            sessions=f["sessions"],
            layout=RegionLayout.from_arrays(f),
        )


def _physical_gpu(device: str) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry of ``cuda:i`` as this process sees it."""
    if not device.startswith("cuda"):
        return None
    index = int(device.split(":")[1]) if ":" in device else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return ids[index] if index < len(ids) else str(index)
    return str(index)


def _worker_main(rank, device, threads, spec, fit, config, tasks, results):
    """One worker process: pull tasks until the sentinel, push results (or the error).

    A GPU worker sees only its own GPU (``CUDA_VISIBLE_DEVICES`` set before CUDA starts), so
    no worker opens a context on another worker's GPU.
    """
    key = None
    try:
        physical = _physical_gpu(device)
        local = device
        if physical is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = physical
            # before CUDA starts: the fixed cuBLAS workspace of deterministic GPU training
            # (``numerics.CUBLAS_WORKSPACE``; a value inherited from the parent wins, so that
            # every worker and the parent's own fits use one setting)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            local = "cuda:0"
        if threads:
            set_threads(threads, environment=False)
        if physical is not None:
            import torch

            torch.cuda.set_device(0)
        data = _load_shared(spec)
        while True:
            task = tasks.get()
            if task is None:
                break
            key = task.key

            def progress(info, _key=key):
                results.put(("progress", rank, _key, dict(info)))

            out = run_task(
                data,
                task,
                fit=fit,
                config=config,
                device=local,
                progress=progress,
                state_dir=spec,
            )
            results.put(("done", rank, key, out))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        kind = type(exc).__name__ if isinstance(exc, SiamFuseError) else None
        results.put(("error", rank, key, (kind, str(exc), traceback.format_exc())))


class WorkerError(RuntimeError):
    """A worker failed on a task; the message holds the worker's traceback."""


def _raise_remote(device: str, task_name: str, payload) -> None:
    kind, message, text = payload
    from .. import errors

    klass = getattr(errors, kind, None) if kind else None
    if isinstance(klass, type) and issubclass(klass, SiamFuseError):
        raise klass(message)
    raise WorkerError(
        f"{task_name} on {device} failed: {message}\n--- worker traceback ---\n{text}"
    )


def _run_workers(data, tasks, devices, *, fit, config, threads, progress, work_dir):
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    by_key = {t.key: t for t in tasks}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="siamfuse-cv-", dir=work_dir) as folder:
        spec = _save_shared(data, Path(folder))
        task_q, result_q = ctx.Queue(), ctx.Queue()
        for task in tasks:
            task_q.put(task)
        for _ in devices:
            task_q.put(None)
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, dev, threads, spec, fit, config, task_q, result_q),
                name=f"siamfuse-worker-{rank}",
            )
            for rank, dev in enumerate(devices)
        ]
        for p in procs:
            p.start()
        try:
            while len(results) < len(tasks):
                try:
                    kind, rank, key, payload = result_q.get(timeout=1.0)
                except queue.Empty:
                    dead = [
                        (r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                    ]
                    if dead or all(p.exitcode is not None for p in procs):
                        r, code = dead[0] if dead else (0, 0)
                        raise WorkerError(
                            f"worker {r} ({devices[r]}) ended (exit code {code}) with "
                            f"{len(tasks) - len(results)} task(s) unfinished"
                        ) from None
                    continue
                if kind == "progress":
                    if progress is not None:
                        progress(by_key[key], payload)
                elif kind == "done":
                    if "tensors_file" in payload:
                        with np.load(payload.pop("tensors_file"), allow_pickle=False) as f:
                            payload["tensors"] = {k: f[k] for k in f.files}
                    results[key] = payload
                    if progress is not None:
                        progress(by_key[key], None)
                else:
                    name = by_key[key].describe() if key in by_key else "start-up"
                    _raise_remote(devices[rank], name, payload)
        finally:
            if len(results) < len(tasks):  # failed: do not wait to flush unread tasks
                task_q.cancel_join_thread()
            for p in procs:
                p.join(timeout=5 if len(results) == len(tasks) else 0.1)
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
            task_q.close()
            result_q.close()
    return results


def run_tasks(
    data: RegionDataset,
    tasks: list[Task],
    devices: list[str],
    *,
    fit: Fit | None = None,
    config: TrainConfig | None = None,
    threads: int | None = None,
    progress: Callable | None = None,
    work_dir: Path | None = None,
) -> dict:
    """Run every task on the devices; ``{task.key: result}``.

    ``fit`` defaults to :func:`bids_siamfuse.model.train.fit` (any :class:`~.tasks.Fit`; in
    worker processes it must be importable by name), ``config`` to a default ``TrainConfig``
    (the task's seed, device, progress and ablations are filled in per task).
    ``progress(task, info)`` is called (in this process) with each training progress dict,
    and with ``info=None`` when the task is done.
    """
    fit = fit or default_fit()
    config = config or default_config()
    if len(devices) <= 1:
        device = devices[0] if devices else "cpu"
        before = set_threads(threads, environment=False)
        try:
            results = {}
            ahead = getattr(fit, "prefetch", None)
            for i, task in enumerate(tasks):
                if ahead is not None and i + 1 < len(tasks):
                    # the next fit's initial weights are drawn on a host thread meanwhile
                    ahead(data.layout, task_config(config, tasks[i + 1], device))
                cb = None if progress is None else (lambda info, _t=task: progress(_t, info))
                results[task.key] = run_task(
                    data,
                    task,
                    fit=fit,
                    config=config,
                    device=device,
                    progress=cb,
                )
                if progress is not None:
                    progress(task, None)
            return results
        finally:
            if before is not None:
                set_threads(before, environment=False)
    return _run_workers(
        data,
        tasks,
        devices,
        fit=fit,
        config=config,
        threads=threads,
        progress=progress,
        work_dir=work_dir,
    )


def default_threads(devices: list[str], omp_nthreads: int = 0, nprocs: int = 0) -> int | None:
    """Threads per worker (the one decision, for both levels; the participant level is one CPU
    worker): ``--omp-nthreads`` when given (at most ``--nprocs``); else on CPU the CPUs
    (``--nprocs``, default all) shared out between the workers, at most 8 each (the
    ``--omp-nthreads`` default); on GPUs torch's default.

    Explicit on CPU, because containers and batch systems often export ``OMP_NUM_THREADS=1``,
    which would otherwise leave a single-process CPU training on one core.
    """
    if omp_nthreads:
        if nprocs and omp_nthreads > nprocs:
            LOGGER.warning(
                "--omp-nthreads %d exceeds --nprocs %d; using %d", omp_nthreads, nprocs, nprocs
            )
            return int(nprocs)
        return int(omp_nthreads)
    if devices and devices[0] == "cpu":
        cpus = int(nprocs or os.cpu_count() or 1)
        return max(1, min(8, cpus // len(devices)))
    return None
