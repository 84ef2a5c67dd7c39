"""T1w numerics with known answers: N4 on a known bias, partial volumes, head finding, grid."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest
from phantoms import affine, world

from bids_siamfuse.errors import DataError
from bids_siamfuse.preproc import anat, pvmodel
from bids_siamfuse.preproc import registration as reg


def _head(shape=(60, 70, 80), voxel=3.0):
    """A 'head': brain ellipsoid (GM shell, WM core), dark skull, bright scalp, a neck."""
    aff = affine(voxel, shape, centre=(0.0, -10.0, -15.0))
    x, y, z = world(shape, aff)
    r = np.sqrt((x / 65.0) ** 2 + ((y + 18) / 80.0) ** 2 + ((z - 12) / 60.0) ** 2)
    data = np.zeros(shape, np.float32)
    data[r < 1.25] = 650.0  # scalp
    data[r < 1.15] = 60.0  # skull
    data[r < 1.05] = 180.0  # CSF
    data[r < 1.0] = 550.0  # GM
    data[r < 0.8] = 900.0  # WM
    neck = ((x / 40.0) ** 2 + ((y + 20) / 45.0) ** 2 < 1) & (z < -45)
    data[neck & (data == 0)] = 420.0
    return nb.Nifti1Image(data, aff), r


def test_bias_correction_removes_a_known_field():
    img, r = _head()
    x, y, z = world(img.shape, img.affine)
    field = np.exp(0.25 * x / 90.0 - 0.2 * z / 100.0 + 0.15 * (y / 100.0) ** 2)
    biased = reg.to_ants(nb.Nifti1Image(img.get_fdata().astype(np.float32) * field, img.affine))
    mask = reg.image_like(biased, (r < 1.0).astype(np.float32))
    corrected, estimate = anat.bias_correct(biased, mask, iterations=(50, 50, 50))
    wm = r < 0.7
    cv = lambda a: float(np.std(a[wm]) / np.mean(a[wm]))  # noqa: E731
    before, after = cv(biased.numpy()), cv(corrected.numpy())
    assert before > 0.05
    assert after < before / 3
    # the estimated field is the true one up to a constant factor
    ratio = estimate.numpy()[wm] / field[wm]
    assert np.std(ratio) / np.mean(ratio) < 0.03


def test_partial_volume_unmixes_known_mixtures():
    mu = (180.0, 550.0, 900.0)
    fractions = np.linspace(0, 1, 11, dtype=np.float32)
    csf_gm = mu[0] * (1 - fractions) + mu[1] * fractions  # GM share = fractions
    gm_wm = mu[1] * (1 - fractions) + mu[2] * fractions  # WM share = fractions
    image = np.concatenate([csf_gm, gm_wm, [100.0, 1000.0]]).astype(np.float32)
    wm_side = np.concatenate([np.zeros(11, bool), np.ones(11, bool), [False, True]])
    gm, wm, csf = pvmodel.partial_volume(image, *mu, wm_side)
    assert np.allclose(gm[:11], fractions, atol=1e-5)
    assert np.allclose(csf[:11], 1 - fractions, atol=1e-5)
    assert np.allclose(wm[11:22], fractions, atol=1e-5)
    assert np.allclose(gm[11:22], 1 - fractions, atol=1e-5)
    assert csf[22] == 1 and wm[23] == 1  # beyond the pure means: pure tissue
    assert np.allclose(gm + wm + csf, 1.0)


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 2, 5000), rng.normal(100, 10, 5000)])
    assert 25 < anat.otsu_threshold(values) < 80


def test_head_mask_finds_brain_below_the_vertex():
    """The brain centre estimate ignores the neck: within 15 mm of the true centre."""
    img, _ = _head()
    info = anat.head_mask(reg.to_ants(img))
    assert np.linalg.norm(info.brain_centre[:2] - [0.0, -18.0]) < 8.0
    # the model puts the brain centre 84.5 mm under the vertex; this head's scalp top is at
    # z = 12 + 1.25 * 60 = 87 and its brain centre at 12
    assert abs(info.brain_centre[2] - 12.0) < 15.0
    assert info.mask.numpy().sum() > 0


def test_load_t1w_refuses_bad_images(tmp_path):
    path = tmp_path / "t1.nii.gz"
    nb.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)).to_filename(path)
    with pytest.raises(DataError, match="zero"):
        anat.load_t1w(path)
    nb.Nifti1Image(np.ones((20, 20, 20, 2), np.float32), np.eye(4)).to_filename(path)
    with pytest.raises(DataError):
        anat.load_t1w(path)


def test_normalize_to_grid_preserves_volume():
    """A uniform 10 % enlargement: the modulated map keeps the GM volume, wc1 does not."""
    from bids_siamfuse.data.templates import GRID_AFFINE, GRID_SHAPE

    shape = (160, 190, 160)
    aff = affine(1.2, shape, centre=(0.0, -18.0, 18.0))
    x, y, z = world(shape, aff)
    gm = np.clip(1.2 - np.sqrt((x / 60) ** 2 + ((y + 18) / 75) ** 2 + ((z - 18) / 55) ** 2), 0, 1)
    gm_img = nb.Nifti1Image(gm.astype(np.float32), aff)
    scale = np.diag([1.1, 1.1, 1.1, 1.0])
    pos = world(GRID_SHAPE, GRID_AFFINE).reshape(3, -1)
    pos = (scale[:3, :3] @ pos).reshape(3, *GRID_SHAPE).astype(np.float32)
    wc1, mwc1 = anat.normalize_to_grid(gm_img, pos)
    native = gm.sum() * 1.2**3
    assert abs(mwc1.sum() * 1.5**3 / native - 1) < 0.01
    assert abs(wc1.sum() * 1.5**3 / native - 1 / 1.331) < 0.01


def test_pv_fractions_ignore_intensity_outliers():
    """One huge value in the image (e.g. an edge voxel divided by a ~0 bias estimate) must
    not flatten the intensity table: regression test of the GM Dice 0.49 / WM = 0 failure."""
    model = pvmodel.PVModel(
        means=np.array([400.0, 1060.0, 1730.0]),
        sigma=60.0,
        weights=np.array([0.02, 0.18, 0.12, 0.23, 0.45]),
    )
    image = np.array([400.0, 1060.0, 1730.0, 1060.0, 1395.0, 2.0e12], dtype=np.float32)
    wm_side = np.array([False, False, True, True, True, True])
    gm, wm, csf = pvmodel.pv_fractions(image, model, wm_side)
    assert csf[0] > 0.95 and gm[1] > 0.95 and gm[3] > 0.95  # pure CSF, GM
    assert wm[2] > 0.95  # pure WM: was 0 when the outlier set the table's range
    assert 0.3 < wm[4] < 0.7 and abs(gm[4] + wm[4] - 1) < 1e-3  # a GM/WM mixture
    assert wm[5] > 0.95  # far beyond the WM mean: WM
    assert np.allclose((gm + wm + csf)[:5], 1.0, atol=1e-3)


def test_pv_fractions_csf_wm_pair_gives_no_gm():
    """A half-CSF, half-WM voxel (a ventricle wall) has the intensity of GM: the CSF/GM and
    GM/WM pairs call it GM (the thin GM rim of issue 17), the CSF/WM pair must not."""
    from bids_siamfuse.preproc import pvmodel

    model = pvmodel.PVModel(
        means=np.array([250.0, 600.0, 1000.0]),
        sigma=25.0,
        weights=np.array([0.1, 0.3, 0.3, 0.1, 0.2]),
    )
    image = np.full(3, 625.0, dtype=np.float32)  # 0.5 x 250 + 0.5 x 1000
    pair = np.array([pvmodel.CSF_GM, pvmodel.GM_WM, pvmodel.CSF_WM])
    gm, wm, csf = pvmodel.pv_fractions(image, model, pair)
    assert gm[0] > 0.9 and gm[1] > 0.9  # the two GM pairs: (wrongly, here) GM
    assert gm[2] == 0.0 and abs(wm[2] - 0.5) < 0.02 and abs(csf[2] - 0.5) < 0.02
    pure = pvmodel.pv_fractions(np.array([250.0, 1000.0], np.float32), model, np.full(2, 2))
    assert pure[2][0] > 0.9 and pure[1][1] > 0.9  # pure CSF, pure WM stay pure


def test_tissue_pairs_find_ventricle_walls_not_sulci():
    """CSF/WM mixing is allowed only deep in the brain (a ventricle), not at a sulcus near the
    surface, and not where the template says GM (the caudate)."""
    from bids_siamfuse.preproc import pvmodel, segmentation

    shape = (60, 60, 60)
    x, y, z = np.indices(shape) - 30.0
    r = np.sqrt(x**2 + y**2 + z**2)
    brain = r < 28  # a 56 mm 'brain'
    p_csf = ((r < 6) | (brain & (r > 25))).astype(np.float32)  # ventricle; surface CSF
    p_wm = (brain & (r >= 6) & (r < 22)).astype(np.float32)
    prior_gm = np.where(x > 3, 0.8, 0.1).astype(np.float32)  # 'caudate' on one side
    wm_side = p_wm >= p_csf
    pair = segmentation.tissue_pairs(wm_side, brain, p_csf, p_wm, prior_gm, (1.0, 1.0, 1.0))
    wall = (np.abs(r - 6) < 1) & (x < -3)
    assert (pair[wall] == pvmodel.CSF_WM).mean() > 0.9
    assert not (pair[(np.abs(r - 6) < 1) & (x > 5)] == pvmodel.CSF_WM).any()  # the 'caudate'
    assert not (pair[r > 15] == pvmodel.CSF_WM).any()  # near the surface: no CSF/WM pair


def test_anchor_csf_mean_uses_confident_csf():
    from bids_siamfuse.preproc import segmentation

    model = pvmodel.PVModel(np.array([300.0, 800.0, 1300.0]), 35.0, np.full(5, 0.2))
    rng = np.random.default_rng(0)
    image = (333.0 + 35.0 * rng.standard_normal(5000)).astype(np.float32)
    sure = np.ones(5000, dtype=bool)
    out = segmentation.anchor_csf_mean(model, image, sure)
    assert abs(out.means[0] - 333.0) < 3 and np.array_equal(out.means[1:], model.means[1:])
    assert segmentation.anchor_csf_mean(model, image, sure & (np.arange(5000) < 100)) is model
    assert segmentation.anchor_csf_mean(model, image + 600.0, sure) is model  # above GM: kept


def _head_phantom(angle_deg: float, res: float = 3.0, seed: int = 0):
    """A head: the ICBM152 brain at ``res`` mm with CSF, dark skull and bright scalp shells,
    another contrast (gamma 1.4) and heavy noise, turned ``angle_deg`` about the L-R axis.

    Upright, its affine correlation with the template (~0.55-0.6) sits where real upright
    heads do (0.54-0.59, issue 17), not at the template's own ~0.97.
    """
    import ants
    import nibabel as nb
    import phantoms
    from scipy import ndimage

    from bids_siamfuse.data.templates import load_template
    from bids_siamfuse.preproc import registration as reg

    brain = ants.resample_image(reg.to_ants(load_template("T1w")), (res,) * 3)
    mask = (
        ants.resample_image_to_target(
            reg.to_ants(load_template("mask")), brain, interp_type="linear"
        ).numpy()
        > 0.5
    )
    data = brain.numpy()
    top = float(np.percentile(data[mask], 99))

    def shell(inner_mm, outer_mm):
        grow = lambda mm: ndimage.binary_dilation(mask, iterations=max(1, int(mm / res)))  # noqa: E731
        return grow(outer_mm) & ~(grow(inner_mm) if inner_mm else mask)

    out = np.where(mask, data, 0.0)
    out[shell(0, 3)] = 0.15 * top
    out[shell(3, 9)] = 0.05 * top
    out[shell(9, 15)] = 0.9 * top
    out = top * (out / top) ** 1.4
    rng = np.random.default_rng(seed)
    out = ndimage.gaussian_filter(out, 0.6) + rng.normal(0, 0.35 * top, out.shape)
    out = np.pad(np.clip(out, 0, None).astype(np.float32), 20)
    aff = reg.ants_affine(brain)
    aff[:3, 3] -= aff[:3, :3] @ np.full(3, 20.0)
    return reg.to_ants(nb.Nifti1Image(out, phantoms.rigid((angle_deg, 0, 0), (0, 0, 0)) @ aff))


@pytest.mark.parametrize("angle, warns", [(0.0, False), (90.0, True)])
def test_affine_warning_only_for_a_head_far_from_upright(angle, warns, tmp_path, caplog):
    """Issue 17: 'affine fit is poor' fired on every upright real head (r 0.54-0.59 under the
    old 0.6 threshold). An upright head with real-like contrast stays silent; the same head
    turned 90 degrees, where the affine gets stuck, still warns. (The rotation search itself
    is stubbed here: minutes on 2 cores.)"""
    import logging

    from bids_siamfuse.preproc import anat
    from bids_siamfuse.preproc import registration as reg

    t1 = _head_phantom(angle)
    head = anat.head_mask(t1)
    caplog.set_level(logging.WARNING, logger="bids_siamfuse.anat")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(anat, "_rotation_search", lambda *a: (a[6], a[7]))
        mp.setattr(anat, "START_SCALES", ())  # tested below
        _, corr, _ = anat.affine_to_template(t1, head, reg.registration_settings(True), tmp_path)
    fired = any("affine fit to the template" in r.message for r in caplog.records)
    assert fired == warns, corr
    if warns:
        assert corr < anat.AFFINE_SEARCH_BELOW
    else:
        assert anat.AFFINE_SEARCH_BELOW < corr < 0.75  # in the range of real upright heads
        assert corr < 0.6  # the old threshold would have fired


def test_affine_start_for_a_brain_smaller_than_the_template(tmp_path, caplog):
    """Issue 17: the conformed-like phantom failed the affine (r 0.26-0.35). The mechanism: the
    default start is the template brain at its own size, a rigid stage cannot shrink it, and
    on a brain smaller than the template the affine can end with the template grown over the
    skull and scalp (r < 0.45, Jacobian determinant near 1) instead of inside the skull. On the
    1 mm phantom (0.9x the template) rounding decided it; on this 2 mm one with a 0.8x brain it
    happens every time. Starts sized for smaller brains (``START_SCALES``) find the fit."""
    import logging

    from bids_siamfuse import phantom

    ph = phantom.make_phantom((2.0, 2.0, 2.0), fine_mm=2.0, seed=1, scale=0.8)
    t1 = reg.to_ants(ph.image)
    head = anat.head_mask(t1)
    settings = reg.registration_settings(True)
    caplog.set_level(logging.WARNING, logger="bids_siamfuse.anat")
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()

    def det(lin):
        return float(np.linalg.det(reg.read_matrix(lin["affine"])[:3, :3]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(anat, "_rotation_search", lambda *a: (a[6], a[7]))
        mp.setattr(anat, "START_SCALES", ())  # the default start alone: the failure
        lin, corr, _ = anat.affine_to_template(t1, head, settings, tmp_path / "a")
        assert corr < anat.AFFINE_SEARCH_BELOW and det(lin) > 0.8, (corr, det(lin))
        mp.setattr(anat, "START_SCALES", (0.9, 0.8))
        caplog.clear()
        lin, corr, _ = anat.affine_to_template(t1, head, settings, tmp_path / "b")
    assert corr > 0.8
    assert det(lin) == pytest.approx(0.8**3, abs=0.03)  # template -> brain: 0.8 linear
    assert any("a start for a brain" in r.message for r in caplog.records)
