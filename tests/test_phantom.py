"""The physical phantom (bids_siamfuse.phantom): its truth is a true partial-volume truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bids_siamfuse import phantom


@pytest.fixture(scope="module")
def small_phantom():
    # 2 mm voxels over a 1 mm tissue model (the real one: 1 mm over 0.5 mm), no bias, no noise
    return phantom.make_phantom((2.0, 2.0, 2.0), fine_mm=1.0, seed=3, bias=0.0, noise=0.0)


def test_phantom_intensities_mix_the_fractions_linearly(small_phantom):
    ph = small_phantom
    data = np.asarray(ph.image.dataobj, dtype=np.float64)
    tissue = ph.gm + ph.wm + ph.csf
    assert tissue.max() <= 1.0 + 1e-5 and min(ph.gm.min(), ph.wm.min(), ph.csf.min()) >= 0
    inside = tissue > 1 - 1e-5  # voxels wholly inside the brain
    lut = phantom.LABEL_INTENSITY
    expected = lut[1] * ph.csf + lut[2] * ph.gm + lut[3] * ph.wm
    assert np.allclose(data[inside], expected[inside], rtol=1e-4, atol=1e-2)
    # partial volume is physical: many voxels mix two tissues, as a sharp model gives
    mixed = inside & (ph.gm > 0.05) & (ph.gm < 0.95)
    assert mixed.sum() > 0.15 * inside.sum()


def test_phantom_tissue_shares_are_adult_like(small_phantom):
    ph = small_phantom
    tiv = float((ph.gm + ph.wm + ph.csf).sum())
    shares = [float(a.sum()) / tiv for a in (ph.gm, ph.wm, ph.csf)]
    assert 0.40 < shares[0] < 0.56 and 0.28 < shares[1] < 0.42 and 0.10 < shares[2] < 0.25
    assert 1100 < tiv * ph.voxel_ml < 1700  # a 0.9-scaled ICBM152 brain
    # the AAL labels reach the cortex: most GM lies in a labelled region
    assert ph.gm[ph.aal > 0].sum() > 0.6 * ph.gm.sum()


def test_score_reports_known_errors(small_phantom):
    ph = small_phantom
    exact = phantom.score(ph, ph.gm, ph.wm, ph.csf)
    assert abs(exact["GM"]["error_pct"]) < 1e-6 and exact["aal_gm"]["max_abs_pct"] < 1e-6
    # 10 % of the CSF counted as GM: GM up by exactly that volume
    moved = 0.1 * ph.csf
    s = phantom.score(ph, ph.gm + moved, ph.wm, ph.csf - moved)
    expected = 100 * float(moved.sum()) / float(ph.gm.sum())
    assert s["GM"]["error_pct"] == pytest.approx(expected, rel=1e-3)
    assert s["CSF"]["error_pct"] == pytest.approx(-10.0, rel=1e-3)


def test_thick_slices_keep_the_tissue_volumes(small_phantom, tmp_path):
    """The same tissue model scanned at 2x2x6 mm: the same volumes in fewer, thicker voxels."""
    thin = small_phantom
    thick = phantom.make_phantom((2.0, 2.0, 6.0), fine_mm=1.0, seed=3, bias=0.0, noise=0.0)
    for a, b in ((thin.gm, thick.gm), (thin.csf, thick.csf)):
        assert float(a.sum()) * thin.voxel_ml == pytest.approx(float(b.sum()) * thick.voxel_ml)
    assert thick.image.shape[2] * 3 == thin.image.shape[2]
    phantom.save(thick, tmp_path / "ph")
    back = phantom.load(tmp_path / "ph")
    assert back.voxel == (2.0, 2.0, 6.0) and np.array_equal(back.aal, thick.aal)


@pytest.mark.slow
@pytest.mark.parametrize("voxel", [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0)], ids=["1mm", "1x1x3mm"])
def test_pipeline_tissue_volumes_on_the_phantom(voxel, tmp_path):
    """The volume target on a physical truth: the anatomical steps at their default settings
    (``benchmarks/bench_phantom.py``) give total GM, WM and CSF within 5 % of the phantom's,
    and brain-mask Dice >= 0.98. Seed 1 measured +3.3/-1.9/+0.8 % at 1 mm and +3.5/-3.1/-3.1 %
    at 1x1x3 mm (docs/preprocessing.md). The synthetic cohort of test_preproc_accuracy has
    no physical partial volume (its fractions are the ICBM152 probabilities), so its volume
    check moved here (docs/preprocessing.md, "slow accuracy test")."""
    import sys

    from bids_siamfuse.preproc import registration as reg

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_phantom import run

    reg.set_threads(1)
    ph = phantom.make_phantom(voxel, seed=1)
    with reg.node_tmp(tmp_path / "tmp"):
        out, _ = run(ph, tmp_path, sloppy=False)
    for tissue in ("GM", "WM", "CSF"):
        assert abs(out[tissue]["error_pct"]) <= 5.0, (tissue, out[tissue])
    assert out["brain_mask"]["dice"] >= 0.98, out["brain_mask"]
