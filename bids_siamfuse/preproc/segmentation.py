"""T1w segmentation: Atropos with template priors, then partial-volume fractions.

See :func:`segment` and the module doc of :mod:`bids_siamfuse.preproc.anat` (step 5), which
holds the steps before and after it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import DataError
from . import pvmodel
from . import registration as reg
from .anat import bias_correct, template_at
from .pvmodel import PVModel, fit_pv_model, partial_volume, pv_fractions  # noqa: F401


@dataclass
class Segmentation:
    t1_corrected: object  # nibabel, full T1w grid
    brain_mask: object
    gm: object
    wm: object
    csf: object
    dseg: object
    means: dict  # global tissue means (for the log)


def _crop_slices(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(
        slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + margin + 1))
        for i, n in zip(idx, mask.shape)
    )


def _write_atropos_inputs(work_dir: Path, image, mask, priors) -> tuple[str, str, str]:
    import ants

    img_path = str(work_dir / "atropos_input.nii.gz")
    mask_path = str(work_dir / "atropos_mask.nii.gz")
    ants.image_write(image, img_path)
    ants.image_write(mask, mask_path)
    pattern = str(work_dir / "atropos_prior%02d.nii.gz")
    for i, prior in enumerate(priors, start=1):
        ants.image_write(prior, pattern % i)
    return img_path, mask_path, pattern


def atropos(image, mask, priors, work_dir: Path, *, iterations=5, prior_weight=0.5, mrf=0.1):
    """Atropos with prior probability images; returns the posteriors (list of arrays)."""
    import ants

    work_dir = Path(work_dir)
    img_path, mask_path, pattern = _write_atropos_inputs(work_dir, image, mask, priors)
    out_seg = str(work_dir / "atropos_seg.nii.gz")
    out_post = str(work_dir / "atropos_post%02d.nii.gz")
    args = [
        "-d",
        "3",
        "-a",
        img_path,
        "-x",
        mask_path,
        "-i",
        f"PriorProbabilityImages[{len(priors)},{pattern},{prior_weight}]",
        "-m",
        f"[{mrf},1x1x1]",
        "-c",
        f"[{iterations},0.0]",
        "-k",
        "Gaussian",
        "-o",
        f"[{out_seg},{out_post}]",
        "-v",
        "0",
        "-r",  # a fixed seed: Atropos seeds itself from the clock by default
        "0",
    ]
    code = ants.internal.get_lib_fn("Atropos")(args)
    if code != 0:
        raise reg.RegistrationError(f"Atropos failed (exit {code})")
    return [ants.image_read(out_post % i).numpy() for i in range(1, len(priors) + 1)]


def _local_means(image, posteriors, mask, voxel_mm: float, sigma_mm: float = 20.0):
    """Tissue means as smooth maps: Gaussian-weighted means of confidently classified voxels."""
    sigma = sigma_mm / voxel_mm
    means, global_means = [], []
    for post in posteriors:
        sure = (post > 0.95) & mask
        if sure.sum() < 20:
            sure = (post > 0.5) & mask
        if sure.sum() < 20:
            raise DataError("segmentation failed: a tissue class is (nearly) empty")
        g = float(np.median(image[sure]))
        num = ndimage.gaussian_filter(np.where(sure, image, 0.0).astype(np.float32), sigma)
        den = ndimage.gaussian_filter(sure.astype(np.float32), sigma)
        weight = np.clip(den / 0.05, 0.0, 1.0)  # little support: fall back to the global mean
        local = np.where(den > 1e-6, num / np.maximum(den, 1e-6), g)
        means.append((weight * local + (1 - weight) * g).astype(np.float32))
        global_means.append(g)
    return means, global_means


#: Set to 1 to get the partial-volume step as it was before the CSF fixes (no CSF
#: anchoring, no CSF/WM pair): for comparisons only (docs/preprocessing.md, "Phantom").
LEGACY_PV_VARIABLE = "BIDS_SIAMFUSE_LEGACY_PV"
#: CSF/WM mixtures (ventricle walls) are looked for this deep in the brain mask (mm): the
#: lateral ventricles lie > 15 mm under the brain's surface; sulcal CSF (shallower) always has
#: GM between it and the WM
VENTRICLE_DEPTH_MM = 15.0


def anchor_csf_mean(model: PVModel, image: np.ndarray, sure_csf: np.ndarray) -> PVModel:
    """The model with its pure-CSF mean set to the median of confidently CSF voxels.

    Why: pure CSF is a small share of the brain (6 % of the histogram on the phantom) next to
    a large CSF/GM mixture, and the maximum-likelihood fit pulls the CSF mean down into the
    noise (304 where the phantom's pure CSF sits at 333; GM and WM means within 0.3 of the
    truth), so every pure-CSF voxel counted ~7 % GM (+6.8 mL on the phantom). The median of
    voxels with Atropos CSF posterior > 0.95 measured 333.2. Kept as fitted when fewer than
    200 such voxels exist or the median is not between the fitted CSF - 3 sigma and GM means.
    """
    if sure_csf.sum() < 200:
        return model
    mu = float(np.median(image[sure_csf]))
    c, g, _ = model.means
    if not (c - 3.0 * model.sigma < mu < g):
        return model
    return PVModel(np.array([mu, *model.means[1:]]), model.sigma, model.weights)


def tissue_pairs(wm_side, brain, p_csf, p_wm, prior_gm, spacing) -> np.ndarray:
    """Which two tissues each voxel can mix (:data:`pvmodel.CSF_GM`, ``GM_WM``, ``CSF_WM``).

    ``wm_side`` (posteriors: WM likelier than CSF) chooses GM/WM over CSF/GM, as before; a
    voxel is a CSF/WM mixture instead where it lies deeper than :data:`VENTRICLE_DEPTH_MM` in
    the brain mask, has a CSF voxel (posterior > 0.5) and a WM voxel (> 0.5) within 2 mm, and
    the template's GM prior is < 0.5 (the caudate and thalamus, GM that does touch the
    ventricles, keep CSF/GM). Without it, a ventricle wall voxel (half CSF, half WM: the
    intensity of GM) was counted as GM: the GM rim along the ventricles of real scans; on the
    phantom the central regions' GM was +11 % and their CSF -12 %.
    """
    sp = np.asarray(spacing, dtype=float)
    pair = np.where(wm_side, pvmodel.GM_WM, pvmodel.CSF_GM).astype(np.int8)
    depth = ndimage.distance_transform_edt(brain, sampling=sp)
    size = tuple(int(x) for x in np.maximum(1, 2 * np.round(2.0 / sp) + 1))
    near_csf = ndimage.maximum_filter(p_csf, size) > 0.5
    near_wm = ndimage.maximum_filter(p_wm, size) > 0.5
    walls = (depth > VENTRICLE_DEPTH_MM) & near_csf & near_wm & (prior_gm < 0.5)
    pair[walls] = pvmodel.CSF_WM
    return pair


def segment(
    t1,
    t1_n4,
    inverse_composite: str,
    rough_mask,
    settings: reg.RegistrationSettings,
    work_dir,
) -> Segmentation:
    """Brain mask, bias correction in the brain, Atropos, partial-volume tissue maps.

    ``t1``/``t1_n4``: the T1w as read and after the first N4 (ANTsImages); ``rough_mask``: the
    generous brain mask of the affine stage (ANTsImage), which bounds the work.
    """
    import ants

    work_dir = Path(work_dir)
    inverse = [inverse_composite]
    # work on the box around the (generous) affine brain mask
    rough = rough_mask.numpy() > 0
    spacing = float(np.mean(t1.spacing))
    box = _crop_slices(rough, int(round(6.0 / spacing)))
    full_shape = t1.shape
    crop_raw = ants.crop_indices(t1, [s.start for s in box], [s.stop for s in box])
    crop_n4 = ants.crop_indices(t1_n4, [s.start for s in box], [s.stop for s in box])
    crop_n4 = reg.image_like(crop_raw, crop_n4.numpy())
    prob = ants.apply_transforms(crop_raw, template_at("mask"), inverse)
    brain = prob.numpy() >= 0.5
    brain = ndimage.binary_fill_holes(brain)
    if brain.sum() * np.prod(t1.spacing) < 5e5:
        raise DataError("brain extraction failed: the brain mask is implausibly small")
    # second N4 inside the brain (dilated 3 mm: keeps the outer CSF)
    n4_mask = ndimage.binary_dilation(brain, iterations=max(1, round(3.0 / spacing)))
    corrected, _ = bias_correct(
        crop_raw,
        reg.image_like(crop_raw, n4_mask.astype(np.float32)),
        iterations=settings.n4_iterations,
        spline_distance=100.0,
    )
    # Atropos at the segmentation resolution
    res = settings.segmentation_resolution
    low = ants.resample_image(ants.smooth_image(corrected, res / 2.0 * 0.85), (res,) * 3)
    ants.image_write(low, str(work_dir / "seg_grid.nii.gz"))
    low = ants.image_read(str(work_dir / "seg_grid.nii.gz"))  # geometry as files store it
    low_brain = ants.apply_transforms(low, template_at("mask"), inverse).numpy() >= 0.5
    priors = [
        reg.image_like(low, ants.apply_transforms(low, template_at(k), inverse).numpy())
        for k in ("CSF", "GM", "WM")
    ]
    post_csf, post_gm, post_wm = atropos(
        low,
        reg.image_like(low, low_brain.astype(np.float32)),
        priors,
        work_dir,
        iterations=settings.atropos_iterations,
        prior_weight=settings.atropos_prior_weight,
        mrf=settings.atropos_mrf,
    )
    low_img = low.numpy()
    (mu_csf, mu_gm, mu_wm), globals_ = _local_means(
        low_img, [post_csf, post_gm, post_wm], low_brain, res
    )
    if not globals_[0] < globals_[1] < globals_[2]:
        raise DataError(
            "segmentation failed: tissue means are not ordered CSF < GM < WM "
            f"({globals_[0]:.3g}, {globals_[1]:.3g}, {globals_[2]:.3g}); is this a T1w?"
        )

    def up(arr):
        return ants.resample_image_to_target(
            reg.image_like(low, arr), crop_raw, interp_type="linear"
        ).numpy()

    # residual bias: divide by the local WM mean (relative to the global one), then fit the
    # partial-volume model to the brain's histogram and take expected fractions
    # (the 2 mm grid does not reach the corners of the crop, where the upsampled mean is 0:
    # leave those voxels as they are instead of dividing by ~0)
    local_wm = up(mu_wm)
    gain = np.where(local_wm > 0.1 * globals_[2], globals_[2] / np.maximum(local_wm, 1e-6), 1.0)
    image = corrected.numpy() * gain.astype(np.float32)
    wm_side = up(post_wm) >= up(post_csf)
    model = fit_pv_model(image[brain], globals_)
    if os.environ.get(LEGACY_PV_VARIABLE):
        pair = wm_side
    else:
        p_csf, p_wm = up(post_csf), up(post_wm)
        model = anchor_csf_mean(model, image, (p_csf > 0.95) & brain)
        pair = tissue_pairs(wm_side, brain, p_csf, p_wm, up(priors[1].numpy()), t1.spacing)
    gm, wm, csf = pv_fractions(image, model, pair)
    for arr in (gm, wm, csf):
        arr[~brain] = 0.0

    def pad(arr, dtype=np.float32):
        out = np.zeros(full_shape, dtype=dtype)
        out[box] = arr
        return out

    aff = reg.ants_affine(t1)
    import nibabel as nb

    def nii(arr, dtype=np.float32):
        img = nb.Nifti1Image(pad(arr, dtype), aff)
        img.header.set_xyzt_units("mm")
        return img

    tissues = np.stack([gm, wm, csf])
    dseg = np.where(brain, np.argmax(tissues, axis=0) + 1, 0).astype(np.uint8)
    return Segmentation(
        t1_corrected=reg.to_nibabel(t1_n4),
        brain_mask=nii(brain.astype(np.uint8), np.uint8),
        gm=nii(gm),
        wm=nii(wm),
        csf=nii(csf),
        dseg=nii(dseg, np.uint8),
        means={
            **{f"atropos_{k}": v for k, v in zip(("CSF", "GM", "WM"), globals_)},
            **{f"model_{k}": float(v) for k, v in zip(("CSF", "GM", "WM"), model.means)},
            "model_sigma": model.sigma,
            **{
                f"weight_{k}": float(v)
                for k, v in zip(("CSF", "GM", "WM", "CSF_GM", "GM_WM"), model.weights)
            },
        },
    )
