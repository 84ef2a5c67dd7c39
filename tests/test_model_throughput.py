"""Issue 16 (throughput): the device-side standardization, the resident cohort's bookkeeping and
the reduced-precision bundle, checked on the CPU (CI has no GPU; the CUDA paths run the same
functions on another device)."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from bids_siamfuse.model.data import (
    RegionDataset,
    Standardizer,
    device_rows,
    layout_from_labels,
)


def _cohort(n=9, seed=0):
    labels_img = np.zeros((6, 7, 5), dtype=np.int32)
    labels_img[:3, :4, :] = 1
    labels_img[3:, 2:, 1:4] = 2
    labels_img[1:5, 5:, 4] = 3
    layout = layout_from_labels(labels_img, ("a", "b", "c"), {"atlas": "toy"})
    rng = np.random.default_rng(seed)
    v = layout.n_voxels
    # a large mean and small SD per region: the case where E[x^2] - mean^2 loses digits
    gm = (rng.normal(0, 0.1, (n, v)) + 50.0).astype(np.float32)
    pet = rng.gamma(2.0, 1.0, (n, v)).astype(np.float32)
    return RegionDataset(
        gm=gm,
        pet=pet,
        labels=np.arange(n) % 2,
        classes=("CN", "AD"),
        subjects=np.array([f"s{i}" for i in range(n)]),
        sessions=np.array([""] * n),
        layout=layout,
    )


def test_standardizer_on_tensors_matches_numpy():
    data = _cohort()
    ref = Standardizer().fit({"gm": data.gm, "pet": data.pet}, data.layout)
    got = Standardizer().fit_tensors(
        {"gm": torch.from_numpy(data.gm), "pet": torch.from_numpy(data.pet)},
        data.layout,
        chunk=4,  # several chunks
    )
    for mod in ("gm", "pet"):
        np.testing.assert_allclose(got.mean[mod], ref.mean[mod], rtol=1e-6)
        np.testing.assert_allclose(got.std[mod], ref.std[mod], rtol=1e-4)
        values = getattr(data, mod)
        z_ref = ref.transform(mod, values, data.layout)
        z = ref.transform_tensor(mod, torch.from_numpy(values), data.layout).numpy()
        # the same float32 operations: the same bits
        np.testing.assert_array_equal(z, z_ref)
        assert abs(float(z_ref.mean())) < 0.2  # standardized indeed


def test_subset_origin_composes_and_device_rows():
    data = _cohort()
    first = data.subset(np.array([8, 1, 3, 5, 0]))
    second = first.subset(np.array([4, 2]))
    root_gm, root_pet, index = second._root()
    assert root_gm is data.gm and root_pet is data.pet
    np.testing.assert_array_equal(index, [0, 3])
    rows = device_rows(second, "cpu")
    np.testing.assert_array_equal(rows["gm"].numpy(), data.gm[[0, 3]])
    np.testing.assert_array_equal(rows["pet"].numpy(), data.pet[[0, 3]])
    # a copy with other arrays: its recorded origin no longer describes it
    changed = dataclasses.replace(second, gm=second.gm + 1)
    assert changed._root()[2] is None
    np.testing.assert_array_equal(device_rows(changed, "cpu")["gm"].numpy(), changed.gm)
    # relabelled (permutation tests): the same rows, so the origin still holds
    relabelled = dataclasses.replace(second, labels=second.labels[::-1].copy())
    assert relabelled._root()[2] is not None
    # pickled (to a worker): the rows travel, not the root cohort
    back = pickle.loads(pickle.dumps(second))
    assert back.origin is None
    np.testing.assert_array_equal(back.gm, second.gm)


@pytest.mark.parametrize("factor", [2, 3])
def test_coarsen_on_tensors_matches_matrix(factor):
    from bids_siamfuse.model.geometry import RegionGrid, coarsen, coarsen_tensor

    data = _cohort()
    fine = RegionGrid.from_layout(data.layout)
    _, matrix = coarsen(fine, factor)
    ref = np.asarray((matrix.T @ data.gm.T).T, dtype=np.float32)
    got = coarsen_tensor(torch.from_numpy(data.gm), matrix).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)


def test_batched_linear_matches_autograd_and_keeps_the_weight_layout():
    from bids_siamfuse.model.ops import batched_linear

    g = torch.Generator().manual_seed(0)
    # x as the engine passes it: a transposed view (S, R, F) -> (R, S, F)
    x = torch.randn(5, 3, 7, generator=g, dtype=torch.float64).transpose(0, 1)
    w = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    b = torch.randn(3, 4, generator=g, dtype=torch.float64)
    grads = []
    for fn in (
        lambda x, w, b: torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)),
        batched_linear,
    ):
        xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        out = fn(xs, ws, bs)
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), xs.grad, ws.grad, bs.grad))
    for ref, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref)
    assert grads[1][2].is_contiguous()  # the weight gradient in the weight's own layout


@pytest.mark.parametrize("sloppy", [pytest.param(False, marks=pytest.mark.slow), True])
def test_fit_and_predict_through_the_device_input_path(monkeypatch, sloppy):
    """The CUDA input path (rows from the resident cohort, standardizer fit and applied on the
    device, coarsening by gather) run on the CPU: the same model as the host path up to the
    order of float additions in the standardizer's sums."""
    from bids_siamfuse.model import numerics
    from bids_siamfuse.model.train import TrainConfig, fit

    data = _cohort(n=12)
    train, test = data.subset(np.arange(8)), data.subset(np.arange(8, 12))
    cfg = TrainConfig(epochs=2, batch_size=4, seed=3, sloppy=sloppy)
    host = fit(train, cfg)
    p_host = host.predict_proba(test)
    monkeypatch.setattr(numerics, "device_inputs", lambda device: True)
    seen = []
    real = numerics._Inputs._device_tensors

    def spy(self, *a, **k):
        seen.append(a[0] is not None and len(a[0]))
        return real(self, *a, **k)

    monkeypatch.setattr(numerics._Inputs, "_device_tensors", spy)
    dev = fit(train, cfg)
    p_dev = dev.predict_proba(test)
    assert seen  # the device path ran (fit and prediction)
    for mod in ("gm", "pet"):
        np.testing.assert_allclose(dev.standardizer.mean[mod], host.standardizer.mean[mod],
                                   rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(p_dev, p_host, atol=1e-4)


def test_float16_bundle_storage(tmp_path):
    """``weights_dtype="float16"``: the first linear layers stored in half precision (half the
    file), everything else float32; a value beyond float16's range keeps float32; the bundle
    loads and its weights are the rounded values."""
    from bids_siamfuse.model import bundle as bundles

    rng = np.random.default_rng(0)
    tensors = {
        "siamese.fc1.weight": rng.uniform(-0.03, 0.03, (3, 64, 32)).astype(np.float32),
        "siamese.conv1.weight": rng.normal(size=(3, 8, 1, 3, 3, 3)).astype(np.float32),
        "attention.classifier.weight": rng.normal(size=(2, 10)).astype(np.float32),
    }
    out = bundles.storage_tensors(tensors, "float16")
    assert out["siamese.fc1.weight"].dtype == np.float16
    assert out["siamese.conv1.weight"].dtype == np.float32
    assert out["attention.classifier.weight"].dtype == np.float32
    err = np.abs(out["siamese.fc1.weight"].astype(np.float32) - tensors["siamese.fc1.weight"])
    assert 0 < err.max() <= 0.03 * 2**-11  # rounded, to half precision
    huge = {"siamese.fc1.weight": np.array([1e5], dtype=np.float32)}
    assert bundles.storage_tensors(huge, "float16")["siamese.fc1.weight"].dtype == np.float32
    assert bundles.storage_tensors(tensors)["siamese.fc1.weight"].dtype == np.float32
    with pytest.raises(ValueError, match="weights_dtype"):
        bundles.storage_tensors(tensors, "bfloat16")
    layout = _cohort().layout
    sizes = {}
    for dt in ("float32", "float16"):
        bundles.save_bundle(
            tmp_path / dt,
            tensors=tensors,
            model_meta={"format": "test"},
            layout=layout,
            classes=("CN", "AD"),
            standardization={},
            weights_dtype=dt,
        )
        sizes[dt] = (tmp_path / dt / bundles.WEIGHTS_NAME).stat().st_size
        loaded = bundles.load_bundle(tmp_path / dt)
        np.testing.assert_array_equal(
            loaded.tensors["siamese.fc1.weight"], out["siamese.fc1.weight"]
            if dt == "float16" else tensors["siamese.fc1.weight"]
        )  # fmt: skip
    assert sizes["float16"] < 0.75 * sizes["float32"]
