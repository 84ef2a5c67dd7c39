"""The batched siamese engine against the per-region reference loop, geometry, atlas shapes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bids_siamfuse.model.data import RegionLayout, layout_from_labels
from bids_siamfuse.model.geometry import (
    RegionGrid,
    adaptive_pool_matrix,
    build_geometry,
    coarsen,
    conv_out,
    make_buckets,
)
from bids_siamfuse.model.siamese import PARAM_NAMES, SiameseArch, SiameseBank, extend


def toy_layout():
    """Five regions of awkward shapes, one of them a single voxel, one with holes."""
    rng = np.random.default_rng(0)
    labels = np.zeros((22, 24, 20), dtype=np.int16)
    labels[1:10, 2:19, 1:8] = 1
    labels[labels == 1] *= (rng.random((labels == 1).sum()) > 0.3).astype(np.int16)
    labels[11:21, 0:5, 4:19] = 2
    labels[12, 20, 2] = 3
    labels[14:17, 10:14, 9:12] = 4
    labels[3, 21, 15] = 5
    labels[4, 22, 16] = 5
    return layout_from_labels(labels, ("a", "b", "c", "d", "e"), {"atlas": "toy"})


def crops(grid: RegionGrid, x: torch.Tensor) -> list[torch.Tensor]:
    return [torch.as_tensor(grid.to_box(x.numpy(), r)).unsqueeze(1) for r in range(grid.n_regions)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_conv_out_and_pool_matrix_match_torch():
    assert list(conv_out(np.array([1, 2, 7, 8, 41]), 3, 2, 1)) == [1, 1, 4, 4, 21]
    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 1), (2, 3, 5), (4, 4, 4), (11, 10, 12), (3, 9, 2)]:
        x = torch.randn(2, 3, *shape, generator=gen, dtype=torch.float64)
        ref = F.adaptive_avg_pool3d(x, 4).reshape(2, 3, 64)
        mat = torch.as_tensor(adaptive_pool_matrix(shape, 4))
        assert torch.allclose(x.reshape(2, 3, -1) @ mat, ref, atol=1e-12)


def test_buckets_partition_and_cover():
    sizes = np.random.default_rng(1).integers(1, 5000, 116)
    groups = make_buckets(sizes, max_buckets=9)
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(116))
    assert len(groups) <= 9
    # sorted by size, descending: every region of a bucket is no larger than its first
    for g in groups:
        assert sizes[g].max() == sizes[g[0]]


def test_coarsen_is_the_block_mean_of_the_zero_filled_crop():
    layout = toy_layout()
    grid = RegionGrid.from_layout(layout)
    coarse, matrix = coarsen(grid, 2)
    x = np.random.default_rng(2).normal(size=(3, grid.n_voxels)).astype(np.float32)
    xc = np.asarray((matrix.T @ x.T).T)
    for r in range(grid.n_regions):
        box = torch.as_tensor(grid.to_box(x, r))
        pad = [(0, (-s) % 2) for s in box.shape[1:]]
        box = F.pad(box, [p for d in reversed(pad) for p in d])
        ref = F.avg_pool3d(box.unsqueeze(1), 2).squeeze(1).numpy()
        got = coarse.to_box(xc, r)
        assert got.shape == ref.shape
        assert np.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("scatter", ["gather", "index_add"])
@pytest.mark.parametrize("arch", [SiameseArch(), SiameseArch(pool=2, hidden=64)])
def test_batched_equals_loop_forward_and_gradients(scatter, arch):
    grid = RegionGrid.from_layout(toy_layout())
    bank = SiameseBank(grid, arch, generator=torch.Generator().manual_seed(3), scatter=scatter)
    bank.fused = False
    loop = bank.to_loop()
    x = torch.randn(5, grid.n_voxels, generator=torch.Generator().manual_seed(4))
    out = bank(extend(x))
    ref = loop(crops(grid, x))
    assert out.shape == (grid.n_regions, 5, arch.embed)
    assert rel(out, ref) < 1e-5
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for name in PARAM_NAMES:
        got = bank.param(name).grad[bank.inverse]
        want = torch.stack([net.get_parameter(name).grad for net in loop.nets])
        assert rel(got, want) < 1e-4, name


@pytest.mark.parametrize("arch", [SiameseArch(), SiameseArch(pool=2, hidden=64)])
@pytest.mark.parametrize("n", [1, 3])
def test_inference_layout_equals_the_loop(arch, n):
    """Without autograd the portable engine gathers samples-last (``_pooled_inference``): the
    same embeddings as the per-region loop, for one subject and several, and the same as the
    training layout."""
    grid = RegionGrid.from_layout(toy_layout())
    bank = SiameseBank(grid, arch, generator=torch.Generator().manual_seed(3))
    bank.fused = False
    assert len(bank.bucket_slices) > 1  # several buckets, each with its own tables
    x = torch.randn(2 * n, grid.n_voxels, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = bank(extend(x))
        ref = bank.to_loop()(crops(grid, x))
    train_layout = bank(extend(x))  # autograd on: the training layout
    assert rel(out, ref) < 1e-5 and rel(out, train_layout) < 1e-5


def test_state_round_trip_between_engine_and_loop():
    grid = RegionGrid.from_layout(toy_layout())
    bank = SiameseBank(grid, generator=torch.Generator().manual_seed(6))
    state = bank.region_state()
    assert state["fc1.weight"].shape == (grid.n_regions, 1024, 1024)
    other = SiameseBank(grid, generator=torch.Generator().manual_seed(7))
    other.load_region_state(state)
    for name in PARAM_NAMES:
        assert torch.equal(other.region_state()[name], state[name])
    back = SiameseBank.from_loop(bank.to_loop(), grid)
    x = extend(torch.randn(2, grid.n_voxels))
    assert torch.equal(back(x), bank(x))


def test_same_seed_same_network_different_seed_not():
    grid = RegionGrid.from_layout(toy_layout())
    a = SiameseBank(grid, generator=torch.Generator().manual_seed(8)).region_state()
    b = SiameseBank(grid, generator=torch.Generator().manual_seed(8)).region_state()
    c = SiameseBank(grid, generator=torch.Generator().manual_seed(9)).region_state()
    assert all(torch.equal(a[n], b[n]) for n in PARAM_NAMES)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_real_atlas_shapes(atlas_grid):
    grid = atlas_grid
    assert grid.n_regions == 116
    geom = build_geometry(grid)
    t1, p1, t2, p2 = geom.padded_rows()
    assert p1 < 1.25 * t1 and p2 < 1.35 * t2  # buckets stay tight
    assert len(geom.buckets) <= 12
    arch = SiameseArch()
    # the first linear layer sees 16 x 4^3 = 1024 features on every region, large or small
    assert arch.features == 1024
    assert geom.shapes2.max(0).tolist() == [11, 19, 14]  # largest layer-2 grid (41x73x56 box)
    bank = SiameseBank(grid, arch, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, grid.n_voxels, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = bank(extend(x))
    assert out.shape == (116, 2, 20)
    # the same weights through the reference loop, on the three largest and three smallest
    loop = bank.to_loop()
    sizes = np.prod(grid.shapes, axis=1)
    for r in np.r_[np.argsort(sizes)[:3], np.argsort(sizes)[-3:]]:
        box = torch.as_tensor(grid.to_box(x.numpy(), int(r))).unsqueeze(1)
        with torch.no_grad():
            assert rel(out[r], loop.nets[int(r)](box)) < 1e-5


def test_real_atlas_sloppy_geometry(atlas_grid):
    coarse, matrix = coarsen(atlas_grid, 2)
    assert coarse.n_voxels < atlas_grid.n_voxels / 4
    assert matrix.shape == (atlas_grid.n_voxels, coarse.n_voxels)
    bank = SiameseBank(coarse, SiameseArch(pool=2, downsample=2))
    x = torch.randn(2, coarse.n_voxels)
    with torch.no_grad():
        assert bank(extend(x)).shape == (116, 2, 20)


@pytest.fixture(scope="module")
def atlas_grid():
    try:
        from bids_siamfuse.preproc.regions import atlas_layout

        return RegionGrid.from_layout(atlas_layout())
    except ImportError:  # a GPU machine without nilearn: a saved layout (bench_train.py)
        path = os.environ.get("BIDS_SIAMFUSE_LAYOUT")
        if not path:
            pytest.skip("no atlas (nilearn) and no BIDS_SIAMFUSE_LAYOUT")
        with np.load(path) as f:
            return RegionGrid.from_layout(RegionLayout.from_arrays(f))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["toy", "atlas"])
def test_fused_kernels_match_portable_engine(which, request):
    """Triton kernels (bf16) against the portable engine in bf16 and float32."""
    grid = (
        RegionGrid.from_layout(toy_layout())
        if which == "toy"
        else request.getfixturevalue("atlas_grid")
    )
    dev = torch.device("cuda")
    bank = SiameseBank(grid, generator=torch.Generator().manual_seed(10)).to(dev)
    x = extend(torch.randn(6, grid.n_voxels, generator=torch.Generator().manual_seed(11)))
    x = x.to(dev)
    results = {}
    for label, fused, dt in (("ref", False, torch.float32), ("bf16", False, torch.bfloat16),
                             ("fused", True, torch.bfloat16)):  # fmt: skip
        bank.fused = fused
        bank.zero_grad(set_to_none=True)
        y = bank(x.to(dt), dt).float()
        w = torch.linspace(-1, 1, y.numel(), device=dev).view_as(y)
        (y * w).sum().backward()
        results[label] = (y.detach(), {n: bank.param(n).grad.float() for n in PARAM_NAMES})
    assert bank.use_fused(x.to(torch.bfloat16), torch.bfloat16)
    ref_y, ref_g = results["ref"]
    errors = {}
    for label in ("bf16", "fused"):
        y, g = results[label]
        errors[label] = {n: float((g[n] - ref_g[n]).norm() / ref_g[n].norm()) for n in PARAM_NAMES}
        errors[label]["out"] = float((y - ref_y).norm() / ref_y.norm())
    # bf16 convolutions: outputs within ~1e-2, conv-weight gradients within ~1e-1 of float32
    # (sums over ~10^5 rows of bf16 products); the fused kernels no worse than autograd's bf16
    for key, bf16_err in errors["bf16"].items():
        limit = 2e-2 if key == "out" else 1.5e-1
        assert bf16_err < limit, ("bf16", key, bf16_err)
        assert errors["fused"][key] < max(limit, 1.5 * bf16_err + 1e-2), ("fused", key, errors)
