"""T1w processing with ANTs (antspyx): bias correction, template registration, segmentation.

The steps, for a head image with skull, scalp and neck in any orientation:

1. :func:`load_t1w` reads and checks the image (3-D, finite, not empty).
2. :func:`head_mask` finds the head (Otsu threshold at 4 mm, at most 20 % of the bright end,
   largest component, holes filled) and estimates where the brain is: the top of the head
   along the world S axis and the centroid of the head between 20 and 90 mm below it (so the
   neck and face do not pull the estimate down).
3. :func:`bias_correct` runs N4 at 2 mm inside a mask and divides the full-resolution image by
   the smooth field, upsampled (the field has no detail finer than its B-spline mesh).
4. :func:`register_to_template` initializes a translation that puts the estimated brain centre
   on the template's, runs rigid then affine registration (Mattes MI) to the brain-only
   ICBM152 template with a metric mask of the template brain dilated by 6 mm (the dark skull
   of the head image faces the template's empty background, the bright scalp stays outside),
   extracts the brain with the template mask mapped back through that affine (dilated 4 mm),
   and runs SyN between the extracted brain and the template at 2 mm. A poor affine fit is
   retried from starts sized for smaller brains, then with a rotation search
   (:func:`affine_to_template`).
5. :func:`segment` maps the template's brain mask and tissue priors into the T1w through the
   inverse transform, refines the bias correction inside the brain (second N4), runs Atropos
   (3 classes, priors weighted 0.5, MRF) at 2 mm, and turns its classes into *partial-volume*
   fractions at full resolution: each voxel's intensity is unmixed between the two adjacent
   tissue means (CSF-GM or GM-WM, the pair chosen by the posteriors), with tissue means
   estimated locally (20 mm Gaussian windows) from confidently classified voxels, which
   absorbs residual bias. Partial-volume fractions estimate tissue *volume*; posteriors
   (probabilities) overstate GM by 17-27 % on the synthetic cohort (docs/preprocessing.md).
6. :func:`normalize_to_grid` evaluates the composed T1w->template transform on the
   121x145x121 grid, samples the GM map there (SPM's ``wc1``) and multiplies by the
   Jacobian determinant of the map (SPM's modulated ``mwc1``, which preserves GM volume).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import DataError
from . import registration as reg

LOGGER = logging.getLogger("bids_siamfuse.anat")

#: Distance from the template brain's centre of mass down from the top of the head (mm):
#: 72.5 mm from the brain's top to its centre (ICBM152 mask) plus ~12 mm of skull and scalp.
BRAIN_CENTRE_BELOW_VERTEX = 84.5
#: the first of those two terms (the template brain's top to its centre of mass, mm)
TEMPLATE_TOP_TO_CENTRE = 72.5
TISSUE_LABELS = {"GM": 1, "WM": 2, "CSF": 3}


def load_t1w(path: Path):
    """The T1w as a float32 3-D nibabel image; DataError when it cannot be used.

    The voxels are checked by :func:`bids_siamfuse.checks.check_data` (corrupt data, NaN,
    empty or constant images) so a bad scan fails its subject with a one-line reason.
    """
    import nibabel as nb

    from ..checks import check_data

    data, img = check_data(Path(path), "T1w")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: a T1w must be 3-D, this image has shape {data.shape}")
    if min(data.shape) < 16:
        raise DataError(f"{path}: image of shape {data.shape} is too small for a T1w")
    if not np.any(data > 0):
        raise DataError(f"{path}: the T1w image has no positive voxel")
    out = nb.Nifti1Image(np.maximum(data, 0.0).astype(np.float32), img.affine)
    out.header.set_xyzt_units("mm")
    return out


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    # well separated modes give a plateau of equal maxima: take its middle, not its edge
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(centres[best].mean())


@dataclass
class HeadInfo:
    mask: object  # ANTsImage (4 mm)
    brain_centre: np.ndarray  # RAS mm
    vertex_z: float


def head_mask(t1, resolution: float = 4.0) -> HeadInfo:
    """The head at ``resolution`` mm and an estimate of the brain centre (see module doc)."""
    import ants

    small = ants.resample_image(ants.smooth_image(t1, resolution / 2.0), (resolution,) * 3)
    data = small.numpy()
    top = float(np.percentile(data, 99.5))
    if top <= 0 or np.count_nonzero(data) < 100:
        raise DataError("the T1w has too few non-zero voxels to find the head")
    # Otsu over every voxel (background included) separates air from head; capped at 20 % of
    # the bright end so dark tissue is kept when the background was zeroed by the scanner
    head = data > min(otsu_threshold(data.ravel()), 0.2 * top)
    labels, n = ndimage.label(head)
    if n == 0:
        raise DataError("no head found in the T1w (Otsu threshold selects nothing)")
    sizes = ndimage.sum(head, labels, range(1, n + 1))
    head = labels == (int(np.argmax(sizes)) + 1)
    head = ndimage.binary_closing(head, iterations=2)
    head = ndimage.binary_fill_holes(head)
    aff = reg.ants_affine(small)
    xyz = reg.apply_matrix(aff, np.array(np.nonzero(head), dtype=np.float64))
    vertex = float(np.percentile(xyz[2], 99.5))
    slab = (xyz[2] > vertex - 90.0) & (xyz[2] < vertex - 20.0)
    if slab.sum() < 10:
        slab = np.ones(xyz.shape[1], dtype=bool)
    centre = np.array(
        [xyz[0, slab].mean(), xyz[1, slab].mean(), vertex - BRAIN_CENTRE_BELOW_VERTEX]
    )
    # the bias field matters around the brain: keep the head within 100 mm of its centre
    # (drops the neck and shoulders, which N4 would otherwise spend most of its time on)
    all_xyz = reg.apply_matrix(aff, np.indices(head.shape, dtype=np.float64).reshape(3, -1))
    near = np.linalg.norm(all_xyz - centre[:, None], axis=0).reshape(head.shape) < 100.0
    mask = reg.image_like(small, (head & near).astype(np.float32))
    return HeadInfo(mask=mask, brain_centre=centre, vertex_z=vertex)


def bias_correct(
    image,
    mask,
    *,
    iterations=(50, 50, 50),
    resolution: float = 4.0,
    spline_distance: float = 100.0,
):
    """N4 at ``resolution`` mm inside ``mask``; returns (corrected image, field), full res."""
    import ants

    low = ants.resample_image(image, (resolution,) * 3, False, 0)
    low_mask = ants.resample_image_to_target(mask, low, interp_type="nearestNeighbor")
    low_mask = reg.image_like(low, (low_mask.numpy() > 0.5).astype(np.float32))
    if low_mask.numpy().sum() < 100:
        raise DataError("bias correction: the mask holds too few voxels")
    field = ants.n4_bias_field_correction(
        low,
        mask=low_mask,
        shrink_factor=1,
        convergence={"iters": list(iterations), "tol": 1e-7},
        spline_param=spline_distance,
        return_bias_field=True,
    )
    # the field is defined everywhere (B-spline); resample it to the full grid
    full = ants.resample_image_to_target(field, image, interp_type="linear")
    values = full.numpy()
    inside = values[values > 0]
    fill = float(np.median(inside)) if inside.size else 1.0
    values = np.where(values > 1e-3, values, fill)
    corrected = reg.image_like(image, image.numpy() / values)
    return corrected, reg.image_like(image, values)


# ----------------------------------------------------------------------------------------------
# Template
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateSet:
    t1: object  # brain-only T1w, cropped to the brain + margin, at `resolution`
    mask: object
    box_mask: object  # dilated mask used by the affine stage
    syn_mask: object
    resolution: float
    centre: np.ndarray  # RAS centre of mass of the brain mask


@functools.lru_cache(maxsize=2)
def template_set(resolution: float = 2.0) -> TemplateSet:
    import ants

    from ..data.templates import load_template

    t1 = reg.to_ants(load_template("T1w"))
    mask = reg.to_ants(load_template("mask"))
    t1 = ants.resample_image(ants.smooth_image(t1, resolution / 2.0), (resolution,) * 3)
    mask = ants.resample_image_to_target(mask, t1, interp_type="linear")
    mask = reg.image_like(t1, (mask.numpy() >= 0.5).astype(np.float32))
    margin = int(round(10.0 / resolution))
    box = reg.image_like(mask, ndimage.binary_dilation(mask.numpy() > 0, iterations=margin))
    t1 = ants.crop_image(t1, box)
    mask = ants.crop_image(mask, box)
    dilated = lambda mm: reg.image_like(  # noqa: E731
        mask, ndimage.binary_dilation(mask.numpy() > 0, iterations=int(round(mm / resolution)))
    )
    aff = reg.ants_affine(mask)
    idx = np.array(np.nonzero(mask.numpy() > 0), dtype=np.float64)
    centre = reg.apply_matrix(aff, idx).mean(axis=1)
    return TemplateSet(
        t1=t1,
        mask=mask,
        box_mask=dilated(6.0),
        syn_mask=dilated(4.0),
        resolution=resolution,
        centre=centre,
    )


def template_at(kind: str):
    """The 1 mm template map ``kind`` as an ANTsImage (for mapping priors into the T1w)."""
    from ..data.templates import load_template

    return reg.to_ants(load_template(kind))


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


@dataclass
class TemplateRegistration:
    composite: str  # T1w -> template (antsApplyTransforms to a T1w image gives it in MNI)
    inverse_composite: str  # template -> T1w
    affine: str
    initial: str
    brain_mask_affine: object  # ANTsImage on the T1w grid
    affine_correlation: float


def _initial_translation(head: HeadInfo, template: TemplateSet, path: Path) -> str:
    """Translation mapping the template brain centre onto the estimated T1w brain centre."""
    shift = np.eye(4)
    shift[:3, 3] = head.brain_centre - template.centre
    reg.write_matrix(shift, path)
    return str(path)


def _masked_correlation(fixed, moved, mask) -> float:
    f, m, k = fixed.numpy(), moved.numpy(), mask.numpy() > 0
    if k.sum() < 10:
        return 0.0
    return float(np.corrcoef(f[k], m[k])[0, 1])


#: Below this correlation (template vs affinely moved head, in the template brain mask) the
#: affine is taken as stuck in a wrong orientation and a rotation search runs. Real upright
#: heads with skull give 0.54-0.59 (the old threshold of 0.6 fired on every one);
#: the upright phantom of tests/test_preproc_anat.py 0.7, the same head turned 90 degrees
#: well under 0.45 when the affine is stuck (docs/preprocessing.md, "Quality control").
AFFINE_SEARCH_BELOW = 0.45


def affine_to_template(
    t1_n4, head: HeadInfo, settings: reg.RegistrationSettings, work_dir: Path, seed: int = 42
) -> tuple[dict, float, str]:
    """Rigid + affine of the head image to the template: (transforms, correlation, initial).

    Only when the fit is poor (:data:`AFFINE_SEARCH_BELOW`): the affine reruns from starts
    sized for smaller brains (:func:`_size_starts`), then, if still poor, a rotation search
    runs; the log warns and says which helped.
    """
    import ants

    work_dir = Path(work_dir)
    tpl = template_set(settings.template_resolution)
    initial = _initial_translation(head, tpl, work_dir / "init_translation.mat")
    lin = reg.antsreg(
        tpl.t1,
        t1_n4,
        list(settings.affine_stages),
        out_prefix=str(work_dir / "affine_"),
        initial=initial,
        fixed_mask=tpl.box_mask,
        seed=seed,
    )
    moved = ants.apply_transforms(tpl.t1, t1_n4, [lin["affine"]])
    corr = _masked_correlation(tpl.t1, moved, tpl.mask)
    if corr < AFFINE_SEARCH_BELOW:
        first = corr
        lin, corr, scale = _size_starts(t1_n4, head, tpl, settings, work_dir, seed, lin, corr)
        if corr >= AFFINE_SEARCH_BELOW:
            LOGGER.warning(
                "affine fit to the template was poor (r=%.2f) from the start for a "
                "template-sized brain; a start for a brain %.0f%% of the template's size "
                "found r=%.2f",
                first,
                100 * scale,
                corr,
            )
            return lin, corr, initial
        lin, corr = _rotation_search(t1_n4, tpl, settings, work_dir, seed, initial, lin, corr)
        if corr > first:
            LOGGER.warning(
                "affine fit to the template was poor (r=%.2f): the head is far from upright; "
                "a rotation search found a better start (r=%.2f)",
                first,
                corr,
            )
        else:
            LOGGER.warning(
                "affine fit to the template is poor (r=%.2f) and a rotation search did not "
                "improve it: check the T1w's orientation (header) and content",
                corr,
            )
    return lin, corr, initial


def register_to_template(
    t1_n4, head: HeadInfo, settings: reg.RegistrationSettings, work_dir: Path, seed: int = 42
) -> TemplateRegistration:
    """Affine (head image, masked) then SyN (extracted brain) to the ICBM152 template."""
    import ants

    work_dir = Path(work_dir)
    tpl = template_set(settings.template_resolution)
    lin, corr, initial = affine_to_template(t1_n4, head, settings, work_dir, seed)
    # brain extraction through the affine: the template mask mapped back, dilated 4 mm
    tpl_mask_1mm = template_at("mask")
    prob = ants.apply_transforms(t1_n4, tpl_mask_1mm, [lin["affine"]], whichtoinvert=[True])
    spacing = float(np.mean(t1_n4.spacing))
    mask = ndimage.binary_dilation(prob.numpy() >= 0.5, iterations=max(1, round(4.0 / spacing)))
    brain_mask = reg.image_like(t1_n4, mask.astype(np.float32))
    if mask.sum() * np.prod(t1_n4.spacing) < 5e5:
        raise DataError("brain extraction failed: the brain mask is implausibly small")
    # moving image for SyN: extracted brain, cropped, smoothed to and resampled at the
    # template resolution (the finest SyN level runs there)
    brain = ants.crop_image(t1_n4 * brain_mask, brain_mask)
    res = settings.template_resolution
    brain = ants.resample_image(ants.smooth_image(brain, res / 2.0 * 0.85), (res,) * 3)
    syn = reg.antsreg(
        tpl.t1,
        brain,
        list(settings.syn_stages),
        out_prefix=str(work_dir / "syn_"),
        initial=lin["affine"],
        fixed_mask=tpl.syn_mask,
        composite=True,
        seed=seed,
    )
    return TemplateRegistration(
        composite=syn["composite"],
        inverse_composite=syn["inverse_composite"],
        affine=lin["affine"],
        initial=initial,
        brain_mask_affine=brain_mask,
        affine_correlation=corr,
    )


#: Brain sizes tried as starts (linear scale of the template brain) when the fit from the
#: default start is poor: 0.9 and 0.8 are brains of ~0.73 and ~0.51 times the template
#: brain's volume (adult brains are mostly smaller than the ICBM152 average brain).
START_SCALES = (0.9, 0.8)


def _sized_start(head: HeadInfo, template: TemplateSet, scale: float, path: Path) -> str:
    """Initial map for a brain ``scale`` times the template's (linear size).

    The template brain, scaled about its centre, is put where a brain of that size sits:
    its centre ``TEMPLATE_TOP_TO_CENTRE * scale`` mm under the brain's top, which lies where
    the template-sized estimate (:data:`BRAIN_CENTRE_BELOW_VERTEX`) puts it. ``scale`` 1 is
    the default start (:func:`_initial_translation`).
    """
    centre = np.asarray(head.brain_centre, dtype=float).copy()
    centre[2] += TEMPLATE_TOP_TO_CENTRE * (1.0 - scale)
    start = np.eye(4)
    start[:3, :3] *= scale
    start[:3, 3] = centre - scale * template.centre
    reg.write_matrix(start, path)
    return str(path)


def _size_starts(t1_n4, head, tpl, settings, work_dir, seed, lin, corr):
    """The affine again from starts for smaller brains (:data:`START_SCALES`); the best fit.

    Why: the default start assumes a template-sized brain. A rigid stage cannot shrink the
    template, and from that start the affine can settle with the template brain grown over
    the skull and scalp (determinant > 1, r 0.26-0.37 on the seed-1 phantom, whose brain is
    0.9 times the template's) instead of inside the skull (determinant 0.74, r 0.885).
    Which of the two it reaches from the default start is decided by rounding (the same
    phantom stored as 0-255 integers *and* LIA failed, either change alone did not:
    docs/preprocessing.md, "Other contrasts and inputs"); from a start of the right size it
    reached the right fit every time. Returns (transforms, correlation, scale of the start).
    """
    import ants

    best = (lin, corr, 1.0)
    for scale in START_SCALES:
        tag = f"{int(round(100 * scale))}"
        start = _sized_start(head, tpl, scale, Path(work_dir) / f"init_scale{tag}.mat")
        alt = reg.antsreg(
            tpl.t1,
            t1_n4,
            list(settings.affine_stages),
            out_prefix=str(Path(work_dir) / f"affine_scale{tag}_"),
            initial=start,
            fixed_mask=tpl.box_mask,
            seed=seed,
        )
        moved = ants.apply_transforms(tpl.t1, t1_n4, [alt["affine"]])
        alt_corr = _masked_correlation(tpl.t1, moved, tpl.mask)
        if alt_corr > best[1]:
            best = (alt, alt_corr, scale)
    return best


def _rotation_search(t1_n4, tpl, settings, work_dir, seed, initial, lin, corr):
    """Fallback for heads far from upright: antsAI rotation search, keep the better fit."""
    import ants

    low = ants.resample_image(t1_n4, (4.0, 4.0, 4.0))
    path = str(Path(work_dir) / "init_search.mat")
    ants.affine_initializer(
        tpl.t1, low, search_factor=20, radian_fraction=0.2, use_principal_axis=False, txfn=path
    )
    alt = reg.antsreg(
        tpl.t1,
        t1_n4,
        list(settings.affine_stages),
        out_prefix=str(Path(work_dir) / "affine2_"),
        initial=path,
        fixed_mask=tpl.box_mask,
        seed=seed,
    )
    moved = ants.apply_transforms(tpl.t1, t1_n4, [alt["affine"]])
    alt_corr = _masked_correlation(tpl.t1, moved, tpl.mask)
    if alt_corr > corr:
        return alt, alt_corr
    return lin, corr


# ----------------------------------------------------------------------------------------------
# To the output grid
# ----------------------------------------------------------------------------------------------


def grid_positions(composite: str, work_dir: Path) -> np.ndarray:
    """T1w position (RAS mm) of every voxel of the 121x145x121 grid, (3, 121, 145, 121)."""
    from ..data.templates import GRID_AFFINE, GRID_SHAPE

    return reg.compose_to_grid([composite], GRID_SHAPE, GRID_AFFINE, work_dir)


def normalize_to_grid(gm_native, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(wc1, mwc1): GM sampled on the grid, and times the Jacobian determinant."""
    from ..data.templates import GRID_AFFINE

    data = np.asanyarray(gm_native.dataobj, dtype=np.float32)
    wc1 = reg.sample_at(data, gm_native.affine, positions)
    jac = reg.jacobian_determinant(positions, GRID_AFFINE)
    mwc1 = (wc1 * jac).astype(np.float32)
    return np.clip(wc1, 0.0, 1.0), mwc1
