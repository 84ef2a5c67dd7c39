"""Thread counts of this process: the one setter, for both levels (standard library only, so
that ``model/`` may import it).

- Preprocessing (the participant runner before nipype starts, every ANTs node):
  :func:`set_threads` exports the OpenMP/BLAS variables and ITK's, which the libraries read
  when they start, and sets torch directly when it is already imported.
- Training (a cross-validation worker, or the in-process run): ``set_threads(n,
  environment=False)`` sets torch only (importing it) and returns the previous count, so that
  the in-process run can put it back; the environment of the group run is left alone.

ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` the first time a filter runs in a process,
torch/OpenMP read ``OMP_NUM_THREADS`` at import: set them before either is used.
"""

from __future__ import annotations

import os
import sys

THREAD_VARIABLES = (
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)


#: Environment variable that lets ITK/ANTs use more than one thread (see :func:`itk_threads`).
ITK_THREADS_VARIABLE = "BIDS_SIAMFUSE_ITK_THREADS"


def itk_threads(n: int) -> int:
    """ITK/ANTs threads for ``--omp-nthreads n``: 1 unless ``BIDS_SIAMFUSE_ITK_THREADS`` is set.

    Reproducible by default: ITK's multi-threaded metrics, N4 and Atropos sum in
    per-thread pieces, so another thread count gives other float sums and the registration
    drifts (brain masks 25 782 voxels and GM 0.6-2.3 % apart between runs). Single-threaded
    ITK makes every derivative independent of ``--omp-nthreads`` (bitwise; measured in
    docs/preprocessing.md, "Reproducibility", with the cost); nipype still runs several nodes
    and subjects at once (``--nprocs``). ``BIDS_SIAMFUSE_ITK_THREADS=k`` (or ``omp``: follow
    ``--omp-nthreads``) trades that for speed.
    """
    value = os.environ.get(ITK_THREADS_VARIABLE, "").strip().lower()
    if value == "omp":
        return int(n)
    if value.isdigit() and int(value) > 0:
        return int(value)
    return 1


def set_threads(n: int | None, *, environment: bool = True) -> int | None:
    """Threads for this process (0 or None: leave everything as is).

    ``environment``: OpenMP/MKL/OpenBLAS get ``n`` through their variables, ITK/ANTs
    :func:`itk_threads` (1 by default: reproducible), torch ``n`` when it is already imported
    (``participant/run.py`` calls this before nipype starts its workers, which inherit the
    environment). Without ``environment``: torch only, imported here (a training worker).

    Returns torch's thread count before the call, or None when torch was not set.
    """
    if not n or n <= 0:
        return None
    n = int(n)
    if environment:
        for var in THREAD_VARIABLES:
            os.environ[var] = str(n)
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(itk_threads(n))
        torch = sys.modules.get("torch")
        if torch is None:
            return None
    else:
        import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before
