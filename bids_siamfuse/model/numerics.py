"""Numerics and inputs of a fit or prediction: CUDA settings (:func:`_tf32`), compute dtype,
the turning of a RegionDataset into engine inputs (:class:`_Inputs`), batched embedding.

Precision, devices, speed
    ``device`` is whatever the caller passes (``"cpu"``, ``"cuda"``, ``"cuda:1"``). ``amp=None``
    runs the convolutions in bfloat16 on CUDA (fused Triton kernels, :mod:`.kernels`, when
    Triton imports) and the linear layers in float32 with TF32 products, with float32 master
    weights and optimizer state; float32 throughout on the CPU. On CUDA each full training
    batch replays a captured CUDA graph of the whole step (:class:`SiameseStep`). Seeds:
    ``seed`` drives the weight initialisation (drawn on the CPU, so identical on every
    device), the validation split and the batch order; nothing reads or sets global RNGs. On the
    CPU, the same seed and thread count give the same model. On CUDA too, by default
    (``deterministic=True``): fixed-order reductions in the fused kernels and torch's
    deterministic mode (:func:`_tf32`) give the same bits on every run, process and GPU of one
    model; ``deterministic=False`` is the opt-in atomic path (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch

from .data import RegionDataset, RegionLayout, Standardizer, device_rows, signature_text
from .geometry import RegionGrid, coarsen, coarsen_tensor
from .siamese import SiameseArch, extend

#: cuBLAS workspace setting that makes its GEMMs reproducible (NVIDIA's cuBLAS docs, "Results
#: reproducibility"); torch refuses cuBLAS calls in deterministic mode without it. Read when a
#: process first uses cuBLAS: ``cv`` sets it in every worker before CUDA starts, ``fit`` (for
#: this process) before its first CUDA call.
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def _tf32(enabled: bool, deterministic: bool = True):
    """The numerics of a CUDA fit or prediction (``enabled``; on the CPU nothing changes).

    Every setting that decides which kernels run is set here to the same value in every process
    (so that a task's result does not depend on the process or GPU that ran it) and restored on
    exit: TF32 products for the float32 linear layers, reduced-precision bf16/fp16 GEMM
    reductions as torch's default, no cuDNN autotuning. ``deterministic`` (the default; see
    ``TrainConfig.deterministic``) also turns on ``torch.use_deterministic_algorithms`` (warn
    only: an op without a deterministic kernel warns instead of stopping a run;
    ``tests/test_determinism.py`` requires no such warning) with the fixed cuBLAS workspace.
    Uninitialised-memory filling, which deterministic mode adds to every ``torch.empty``, is
    switched off: the fused kernels write every element of their buffers, and the fill would
    add ~1 GB of memsets per training step of 16 subjects (the layer-2 patch gradient alone is
    0.7 GB; sizes, not a timing).
    """
    if not enabled:
        yield
        return
    import torch.utils.deterministic as tud

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    # (owner, flag, value inside the block); restored in the same order on the way out
    flags = (
        (mm, "allow_tf32", True),
        (cudnn, "allow_tf32", True),
        (mm, "allow_bf16_reduced_precision_reduction", True),
        (mm, "allow_fp16_reduced_precision_reduction", True),
        (cudnn, "deterministic", bool(deterministic)),
        (cudnn, "benchmark", False),
        (tud, "fill_uninitialized_memory", False),
    )
    old = [getattr(owner, name) for owner, name, _ in flags]
    algorithms = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    for owner, name, value in flags:
        setattr(owner, name, value)
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, old, strict=True):
            setattr(owner, name, value)
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])


def _compute_dtype(device: torch.device, amp: bool | None) -> torch.dtype:
    if amp is None:
        amp = device.type == "cuda"
    return torch.bfloat16 if amp else torch.float32


def _layout_key(layout: RegionLayout) -> str:
    return signature_text(layout.signature)


#: Issue 16: standardize (and coarsen) on the GPU from the cohort kept there
#: (:func:`~.data.device_rows`) instead of NumPy on the host then a copy (1.1 s standardizer fit
#: + 1.2-1.6 s per 200-subject fit, 4.3-5 ms per applied subject, H200). ``False``: the previous
#: path (the benchmarks' baseline).
DEVICE_INPUTS = True


def device_inputs(device: torch.device) -> bool:
    """Whether inputs for ``device`` take the device path (CUDA, unless switched off)."""
    return DEVICE_INPUTS and torch.device(device).type == "cuda"


class _Inputs:
    """Turns a RegionDataset into engine inputs: standardize, coarsen, extend, move."""

    def __init__(self, layout: RegionLayout, arch: SiameseArch, standardizer: Standardizer):
        self.layout = layout
        self.standardizer = standardizer
        self.fine = RegionGrid.from_layout(layout)
        self.grid, self.matrix = coarsen(self.fine, arch.downsample)
        self.downsample = arch.downsample

    def tensors(self, data: RegionDataset, device, dtype, chunk: int = 32, rows=None):
        """Engine inputs (N, V + 2) of ``data`` per modality on ``device`` in ``dtype``.

        CUDA (``DEVICE_INPUTS``): from the raw rows on the device (``rows``, else
        :func:`~.data.device_rows`: the process's resident copy of the cohort), standardized
        (and coarsened) there; elsewhere NumPy on the host, then a copy. The same float32
        operations either way (coarsening: the same sums in another order).
        """
        if _layout_key(data.layout) != _layout_key(self.layout) or (
            data.layout.n_voxels != self.layout.n_voxels
        ):
            raise ValueError(
                "the data were made with another atlas or grid than the model "
                "(layout signature mismatch)"
            )
        device = torch.device(device)
        if device_inputs(device):
            return self._device_tensors(data, device, dtype, rows)
        out = []
        for mod in ("gm", "pet"):
            values = getattr(data, mod)
            parts = []
            for start in range(0, len(data), chunk):
                z = self.standardizer.transform(mod, values[start : start + chunk], self.layout)
                if self.downsample > 1:
                    z = np.asarray((self.matrix.T @ z.T).T, dtype=np.float32)
                t = extend(torch.from_numpy(np.ascontiguousarray(z)))
                parts.append(t.to(device=device, dtype=dtype))
            out.append(
                torch.cat(parts)
                if parts
                else torch.empty((0, self.grid.n_voxels + 2), device=device, dtype=dtype)
            )
        return out[0], out[1]

    def _device_tensors(self, data, device, dtype, rows, chunk: int = 64):
        raw = rows if rows is not None else device_rows(data, device)
        out = []
        for mod in ("gm", "pet"):
            x = raw[mod]
            n = int(x.shape[0])
            res = torch.empty((n, self.grid.n_voxels + 2), device=device, dtype=dtype)
            res[:, -2] = 0.0  # extend(): the engine's two constant columns
            res[:, -1] = 1.0
            for start in range(0, n, chunk):
                z = self.standardizer.transform_tensor(mod, x[start : start + chunk], self.layout)
                if self.downsample > 1:
                    z = coarsen_tensor(z, self.matrix)
                res[start : start + chunk, :-2] = z
            out.append(res)
        return out[0], out[1]


def _batch(xm: torch.Tensor, xp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.cat([xm.index_select(0, idx), xp.index_select(0, idx)])


@torch.no_grad()
def _embed(bank, xm, xp, dtype, chunk) -> torch.Tensor:
    """(N, R, 2 * embed) float32: MRI then PET branch output per region."""
    outs = []
    n = xm.shape[0]
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(n, start + chunk), device=xm.device)
        out = bank(_batch(xm, xp, idx), dtype).float()  # (R, 2b, E)
        b = idx.numel()
        outs.append(torch.cat([out[:, :b], out[:, b:]], dim=-1).transpose(0, 1))
    if not outs:
        return torch.empty(0, bank.n_regions, 2 * bank.arch.embed, device=xm.device)
    return torch.cat(outs)


@torch.no_grad()
def _seeded_init(module: torch.nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear init, drawn from ``generator`` (CPU) instead of the global RNG."""
    for mod in module.modules():
        if isinstance(mod, torch.nn.Linear):
            bound = 1.0 / math.sqrt(mod.weight.shape[1])
            for p in (mod.weight, mod.bias):
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
