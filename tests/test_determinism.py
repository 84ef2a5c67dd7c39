"""Deterministic training (issue 18): the same seed gives bit-identical results on every run,
process and number of GPUs.

GPU tests (``-m gpu``) run the fused Triton kernels and a small full-resolution CV on CUDA; the
CPU tests hold the pieces that do not need a GPU (settings restored, the flag reaching the
workers). 1 vs 2 CPU worker processes with the real network:
``tests/test_cv.py::test_two_worker_processes_real_network``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_siamfuse.model import cv
from bids_siamfuse.model.siamese import PARAM_NAMES, SiameseBank, extend

HERE = Path(__file__).resolve().parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _grid():
    from test_model_siamese import toy_layout

    from bids_siamfuse.model.geometry import RegionGrid

    return RegionGrid.from_layout(toy_layout())


# ----------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------


def test_cuda_numerics_are_restored_and_cpu_untouched():
    """``numerics._tf32`` sets torch's global numerics for a CUDA fit and restores them after;
    on the CPU it changes nothing."""
    from bids_siamfuse.model.numerics import _tf32

    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn

    def flags():
        return (
            mm.allow_tf32,
            cudnn.allow_tf32,
            cudnn.deterministic,
            cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled(),
        )

    before = flags()
    with _tf32(False):
        assert flags() == before
    with _tf32(True, deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert cudnn.deterministic and not cudnn.benchmark and mm.allow_tf32
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    assert flags() == before
    with _tf32(True, deterministic=False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert flags() == before


def test_deterministic_flag_reaches_the_fit():
    from bids_siamfuse.model.train import TrainConfig

    assert "deterministic" in TrainConfig().run_settings()  # a run setting, not per task
    assert TrainConfig().deterministic is True
    assert SiameseBank(_grid()).deterministic is True


def test_opt_in_nondeterministic_gpu_is_stated_in_settings_and_methods():
    from bids_siamfuse.cli.parser import build_parser
    from bids_siamfuse.config import Settings
    from bids_siamfuse.reports.boilerplate import group_text

    assert Settings().model.nondeterministic_gpu is False
    ns = build_parser().parse_args(["/ds", "/out", "group", "--nondeterministic-gpu"])
    assert Settings.from_sources({}, vars(ns)).model.nondeterministic_gpu is True
    summary = {"classes": ["CN", "AD"], "devices": ["cuda:0"], "training": {"epochs": 5}}
    assert "atomic" not in group_text({**summary, "training": {"deterministic": True}})
    assert "atomic" in group_text({**summary, "training": {"deterministic": False}})
    assert "atomic" not in group_text(
        {**summary, "devices": ["cpu"], "training": {"deterministic": False}}
    )


def test_geometry_is_built_once_per_grid_and_equals_a_fresh_build():
    """Issue 16: banks of one grid share one cached geometry, the same tables as a fresh
    build; another grid or architecture gets its own."""
    from bids_siamfuse.model.geometry import build_geometry, coarsen
    from bids_siamfuse.model.siamese import SiameseArch

    grid = _grid()
    a, b = SiameseBank(grid), SiameseBank(grid)
    assert a.geometry is b.geometry
    fresh = build_geometry(grid)
    assert np.array_equal(a.geometry.order, fresh.order)
    for x, y in zip(a.geometry.buckets, fresh.buckets, strict=True):
        for name in ("gather1", "gather2", "scatter2", "pool"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), name
    assert SiameseBank(grid, SiameseArch(pool=2)).geometry is not a.geometry
    assert SiameseBank(coarsen(grid, 2)[0]).geometry is not a.geometry
    x = extend(torch.randn(3, grid.n_voxels, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("triton") is None, reason="needs triton"
)
def test_fused_kernels_in_the_triton_interpreter():
    """The fused kernels' index and reduction logic, on the CPU (``TRITON_INTERPRET=1``,
    float32): both reduction paths equal the portable engine's outputs and gradients."""
    code = f"""
import sys; sys.path.insert(0, {str(HERE)!r})
import torch
from test_model_siamese import toy_layout
from bids_siamfuse.model.geometry import RegionGrid
from bids_siamfuse.model.siamese import SiameseBank, extend, PARAM_NAMES
grid = RegionGrid.from_layout(toy_layout())
bank = SiameseBank(grid, generator=torch.Generator().manual_seed(10))
x = extend(torch.randn(11, grid.n_voxels, generator=torch.Generator().manual_seed(11)))
res = {{}}
for label, fused, det in (("ref", False, True), ("det", True, True), ("atomic", True, False)):
    bank.fused, bank.deterministic = fused, det
    bank.zero_grad(set_to_none=True)
    y = bank(x, torch.float32)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    res[label] = (y.detach(), {{n: bank.param(n).grad.clone() for n in PARAM_NAMES}})
ry, rg = res["ref"]
for label in ("det", "atomic"):
    y, g = res[label]
    assert float((y - ry).abs().max() / ry.abs().max()) < 1e-5, label
    for n in PARAM_NAMES:
        assert float((g[n] - rg[n]).abs().max() / rg[n].abs().max()) < 1e-5, (label, n)
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("triton") is None, reason="needs triton"
)
def test_regions_that_stopped_are_not_computed():
    """``SiameseBank.set_active`` (per-region early stopping): the regions still training get
    bit for bit the outputs and gradients they get with every region active; the stopped
    ones get pooled features and convolution gradients of 0 (Triton interpreter, both
    reduction paths); ``None`` brings every region back."""
    code = f"""
import sys; sys.path.insert(0, {str(HERE)!r})
import torch
from test_model_siamese import toy_layout
from bids_siamfuse.model.geometry import RegionGrid
from bids_siamfuse.model.siamese import SiameseBank, extend
grid = RegionGrid.from_layout(toy_layout())
bank = SiameseBank(grid, generator=torch.Generator().manual_seed(10))
bank.fused = True
x = extend(torch.randn(11, grid.n_voxels, generator=torch.Generator().manual_seed(11)))
conv = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
def run():
    bank.zero_grad(set_to_none=True)
    p = bank.pooled(x, torch.float32)  # (S, R, F) engine order
    (p * torch.linspace(-1, 1, p.numel()).view_as(p)).sum().backward()
    return p.detach(), {{n: bank.param(n).grad.clone() for n in conv}}
on = torch.tensor([True, False, True, False, True])  # engine order
for det in (True, False):
    bank.deterministic = det
    p_all, g_all = run()
    bank.set_active(on)
    p, g = run()
    bank.set_active(None)
    p_back, _ = run()
    assert torch.equal(p_back, p_all), det
    assert torch.equal(p[:, on], p_all[:, on]) and not p[:, ~on].any(), det
    assert p_all[:, ~on].abs().sum() > 0, det
    for n in conv:
        assert torch.equal(g[n][on], g_all[n][on]), (det, n)
        assert not g[n][~on].any() and g_all[n][~on].abs().sum() > 0, (det, n)
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_fused_kernels_are_bitwise_reproducible():
    """Deterministic kernels: three forward/backward passes give identical bits; the atomic
    path agrees with them to rounding."""
    dev = torch.device("cuda")
    grid = _grid()
    bank = SiameseBank(grid, generator=torch.Generator().manual_seed(1)).to(dev)
    x = extend(torch.randn(37, grid.n_voxels, generator=torch.Generator().manual_seed(2)))
    x = x.to(dev, torch.bfloat16)
    assert bank.use_fused(x, torch.bfloat16)

    def run(det):
        bank.deterministic = det
        bank.zero_grad(set_to_none=True)
        y = bank(x, torch.bfloat16)
        (y * torch.linspace(-1, 1, y.numel(), device=dev).view_as(y)).sum().backward()
        return y.detach().clone(), [bank.param(n).grad.clone() for n in PARAM_NAMES]

    ref = run(True)
    for _ in range(2):
        y, grads = run(True)
        assert torch.equal(y, ref[0])
        assert all(torch.equal(a, b) for a, b in zip(grads, ref[1], strict=True))
    y, grads = run(False)
    assert float((y - ref[0]).norm() / ref[0].norm()) < 1e-5
    for a, b in zip(grads, ref[1], strict=True):
        assert float((a - b).norm() / b.norm().clamp(min=1e-12)) < 1e-4


def _cv(devices, **kw):
    from test_model_train import toy_cohort

    data = toy_cohort(16)
    from bids_siamfuse.model.train import TrainConfig

    config = TrainConfig(epochs=12, patience=6, batch_size=4, sloppy=False, **kw)
    return cv.cross_validate(
        data,
        folds=2,
        seed=5,
        config=config,
        devices=devices,
        baselines=False,
    )


def _same(a, b) -> None:
    assert a.predictions == b.predictions
    assert a.metrics == b.metrics
    assert a.history == b.history
    for k in a.relevance:
        assert np.array_equal(a.relevance[k], b.relevance[k])
    for k in a.final["tensors"]:
        assert np.array_equal(a.final["tensors"][k], b.final["tensors"][k]), k


@pytest.mark.gpu
@needs_cuda
def test_cv_on_cuda_is_reproducible_across_runs_processes_and_gpus():
    """The same full-resolution CV (fused kernels, CUDA graphs, 2 folds + final model) twice in
    this process, in two worker processes sharing GPU 0, and on two GPUs when there are two:
    bit-identical predictions, metrics, histories, relevance and final weights; no torch
    operation warns that it is not deterministic."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _cv(["cuda:0"])
        again = _cv(["cuda:0"])
    bad = [str(w.message) for w in caught if "determinis" in str(w.message).lower()]
    assert not bad, bad
    _same(first, again)
    _same(first, _cv(["cuda:0", "cuda:0"]))
    if torch.cuda.device_count() >= 2:
        _same(first, _cv(["cuda:0", "cuda:1"]))
    assert len({p["prob_AD"] for p in first.predictions}) > len(first.predictions) // 2
