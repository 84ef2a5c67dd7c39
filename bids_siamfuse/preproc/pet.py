"""PET processing: frame realignment, reference image, coregistration to the T1w, MNI grid.

Frames (:func:`load_pet`)
    A 3-D PET is one frame. A 4-D PET is a series of frames weighted by ``FrameDuration``
    (BIDS PET sidecar); when the sidecar lacks it or lists another number of frames, frames
    are weighted equally and the log says so.

Realignment (:func:`realign`)
    Rigid, frame to frame: every frame is registered (Mattes MI, which tolerates the tracer's
    changing distribution) to the duration-weighted mean of the frames; the mean is rebuilt
    from the realigned frames and the frames registered to it again (two passes, as SPM's
    "register to mean"). Each frame's motion is the 4x4 RAS matrix mapping its world
    coordinates to the reference's. The reference image (``petref``) is the duration-weighted
    mean of the realigned frames.

Coregistration (:func:`coregister`)
    Rigid PET->T1w, Mattes mutual information, fixed image the bias-corrected T1w brain (mask
    dilated 6 mm) at 2 mm, initialized by matching the centres of mass of the PET's bright
    voxels and of the T1w brain mask.

To the grid (:func:`to_grid`)
    Every grid voxel is followed through the T1w->MNI map (its T1w position), the PET->T1w
    rigid transform and each frame's motion into the raw frames, and the frames are sampled
    there and averaged: one interpolation from the data as acquired.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import registration as reg

LOGGER = logging.getLogger("bids_siamfuse.pet")


@dataclass
class PETFrames:
    data: np.ndarray  # (X, Y, Z, T) float32
    affine: np.ndarray
    durations: np.ndarray  # (T,) seconds (or ones)
    starts: np.ndarray  # (T,) seconds (or NaN)
    notes: list

    @property
    def n_frames(self) -> int:
        return int(self.data.shape[3])

    @property
    def weights(self) -> np.ndarray:
        return self.durations / self.durations.sum()

    def frame_nifti(self, index: int):
        import nibabel as nb

        return nb.Nifti1Image(self.data[..., index], self.affine)


def load_pet(path: Path, meta: dict | None = None) -> PETFrames:
    """Read a 3-D or 4-D PET and its frame timing; DataError when it cannot be used."""
    from ..checks import check_data

    meta = meta or {}
    # corrupt data, too many NaNs (a few are set to 0), empty or constant images: DataError
    data, img = check_data(Path(path), "PET")
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim != 4:
        raise DataError(f"{path}: a PET must be 3-D or 4-D, this image has shape {data.shape}")
    if min(data.shape[:3]) < 8:
        raise DataError(f"{path}: image of shape {data.shape} is too small for a PET")
    if np.linalg.matrix_rank(img.affine[:3, :3]) < 3:
        raise DataError(f"{path}: the PET header has a singular affine")
    n = data.shape[3]
    notes = []
    durations = np.asarray(meta.get("FrameDuration", []) or [], dtype=float).ravel()
    starts = np.asarray(meta.get("FrameTimesStart", []) or [], dtype=float).ravel()
    if n == 1:
        durations = durations[:1] if durations.size == 1 else np.ones(1)
        starts = starts[:1] if starts.size == 1 else np.full(1, np.nan)
    else:
        if durations.size != n or not np.all(durations > 0):
            notes.append(
                f"FrameDuration lists {durations.size} value(s) for {n} frames: "
                "frames weighted equally"
            )
            durations = np.ones(n)
        if starts.size != n:
            starts = np.full(n, np.nan)
    signal = [float(data[..., t].max()) for t in range(n)]
    if max(signal) <= 0:
        raise DataError(f"{path}: the PET image is empty (no positive voxel)")
    for t, peak in enumerate(signal):
        if peak <= 0:
            notes.append(f"frame {t} holds no signal: weight 0")
            durations[t] = 0.0
    return PETFrames(data, img.affine.copy(), durations, starts, notes)


# ----------------------------------------------------------------------------------------------
# Realignment
# ----------------------------------------------------------------------------------------------


def _head_mask(image, fraction: float = 0.15):
    """Voxels above ``fraction`` of the 99.5th percentile, slightly dilated."""
    from scipy import ndimage

    data = image.numpy()
    mask = data > fraction * np.percentile(data[data > 0], 99.5)
    mask = ndimage.binary_dilation(mask, iterations=2)
    return reg.image_like(image, mask.astype(np.float32))


def weighted_mean(frames: PETFrames, motions: list[np.ndarray] | None = None) -> np.ndarray:
    """Duration-weighted mean of the frames resampled into frame 0's space (world aligned)."""
    out = np.zeros(frames.data.shape[:3], dtype=np.float64)
    shape = frames.data.shape[:3]
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = reg.apply_matrix(frames.affine, idx)
    for t, w in enumerate(frames.weights):
        if w == 0:
            continue
        if motions is None or np.allclose(motions[t], np.eye(4), atol=1e-6):
            out += w * frames.data[..., t]
        else:
            # reference point p shows what frame t shows at inv(M_t) p
            pts = reg.apply_matrix(np.linalg.inv(motions[t]), world).reshape(3, *shape)
            out += w * reg.sample_at(frames.data[..., t], frames.affine, pts)
    return out.astype(np.float32)


def realign(
    frames: PETFrames,
    settings: reg.RegistrationSettings,
    work_dir: Path,
    *,
    passes: int = 2,
    seed: int = 42,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(reference image data, per-frame motion matrices): see the module docstring."""
    import nibabel as nb

    n = frames.n_frames
    motions = [np.eye(4) for _ in range(n)]
    if n == 1:
        return frames.data[..., 0].copy(), motions
    work_dir = Path(work_dir)
    for p in range(passes):
        ref = reg.to_ants(nb.Nifti1Image(weighted_mean(frames, motions), frames.affine))
        mask = _head_mask(ref)
        for t in range(n):
            if frames.weights[t] == 0:
                continue
            moving = reg.to_ants(frames.frame_nifti(t))
            out = reg.antsreg(
                ref,
                moving,
                list(settings.realign_stages),
                out_prefix=str(work_dir / f"realign_p{p}_f{t:03d}_"),
                initial=None,
                fixed_mask=mask,
                seed=seed,
            )
            # the transform maps reference points to frame points: the motion is its inverse
            motions[t] = np.linalg.inv(reg.read_matrix(out["affine"]))
    return weighted_mean(frames, motions), motions


def motion_table(frames: PETFrames, motions: list[np.ndarray], centre: np.ndarray):
    """Per-frame motion parameters (fMRIPrep's column names), as a DataFrame.

    ``trans_*``: displacement (mm) of ``centre`` (the reference's centre of mass); ``rot_*``:
    rotation angles (radians, R = Rz Ry Rx) of the frame relative to the reference;
    ``framewise_displacement``: Power's FD (rotations on a 50 mm sphere).
    """
    import pandas as pd

    rows = []
    previous = None
    for t, m in enumerate(motions):
        rot = m[:3, :3]
        trans = m[:3, :3] @ centre + m[:3, 3] - centre
        ry = float(np.arcsin(-np.clip(rot[2, 0], -1, 1)))
        rx = float(np.arctan2(rot[2, 1], rot[2, 2]))
        rz = float(np.arctan2(rot[1, 0], rot[0, 0]))
        params = np.array([*trans, rx, ry, rz])
        if previous is None:
            fd = 0.0
        else:
            delta = np.abs(params - previous)
            fd = float(delta[:3].sum() + 50.0 * delta[3:].sum())
        previous = params
        rows.append(
            {
                "frame": t,
                "frame_start": frames.starts[t],
                "frame_duration": frames.durations[t],
                "weight": frames.weights[t],
                "trans_x": params[0],
                "trans_y": params[1],
                "trans_z": params[2],
                "rot_x": params[3],
                "rot_y": params[4],
                "rot_z": params[5],
                "framewise_displacement": fd,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Coregistration
# ----------------------------------------------------------------------------------------------


def _centre_of_mass(data: np.ndarray, affine: np.ndarray, weights: bool = True) -> np.ndarray:
    idx = np.array(np.nonzero(data), dtype=np.float64)
    if idx.shape[1] == 0:
        raise DataError("cannot find the centre of an empty image")
    world = reg.apply_matrix(affine, idx)
    if weights:
        w = data[tuple(idx.astype(int))].astype(np.float64)
        return (world * w).sum(axis=1) / w.sum()
    return world.mean(axis=1)


def coregister(
    pet_ref,
    t1w,
    brain_mask,
    settings: reg.RegistrationSettings,
    work_dir: Path,
    *,
    seed: int = 42,
) -> tuple[np.ndarray, str]:
    """Rigid PET->T1w: (4x4 RAS matrix PET world -> T1w world, ITK transform file).

    The ITK file maps T1w points to PET points, so antsApplyTransforms with it resamples the
    PET into the T1w (BIDS/NiPreps ``from-petref_to-T1w_mode-image``).
    """
    import ants
    from scipy import ndimage

    work_dir = Path(work_dir)
    t1 = reg.to_ants(t1w)
    mask_data = np.asanyarray(brain_mask.dataobj) > 0
    if mask_data.sum() == 0:
        raise DataError("PET coregistration: the T1w brain mask is empty")
    spacing = float(np.mean(t1.spacing))
    dilated = ndimage.binary_dilation(mask_data, iterations=max(1, round(6.0 / spacing)))
    fixed_full = reg.image_like(t1, t1.numpy() * dilated)
    fixed_mask_full = reg.image_like(t1, dilated.astype(np.float32))
    fixed = ants.crop_image(fixed_full, fixed_mask_full)
    fixed = ants.resample_image(ants.smooth_image(fixed, 0.85), (2.0, 2.0, 2.0), False, 0)
    fixed_mask = ants.resample_image_to_target(
        ants.crop_image(fixed_mask_full, fixed_mask_full), fixed, interp_type="nearestNeighbor"
    )
    moving = reg.to_ants(pet_ref)
    pet = np.asanyarray(pet_ref.dataobj, dtype=np.float32)
    bright = np.where(pet > 0.3 * np.percentile(pet[pet > 0], 99.5), pet, 0.0)
    pet_centre = _centre_of_mass(bright, pet_ref.affine)
    t1_centre = _centre_of_mass(mask_data.astype(np.float32), t1w.affine, weights=False)
    init = np.eye(4)
    init[:3, 3] = pet_centre - t1_centre  # T1w point -> PET point
    init_path = reg.write_matrix(init, work_dir / "coreg_init.mat")
    out = reg.antsreg(
        fixed,
        moving,
        list(settings.pet_stages),
        out_prefix=str(work_dir / "coreg_"),
        initial=str(init_path),
        fixed_mask=fixed_mask,
        seed=seed,
    )
    t1_to_pet = reg.read_matrix(out["affine"])
    itk_path = reg.write_matrix(t1_to_pet, work_dir / "pet2t1w_xfm.txt")
    return np.linalg.inv(t1_to_pet), str(itk_path)


# ----------------------------------------------------------------------------------------------
# To the grid
# ----------------------------------------------------------------------------------------------


def to_grid(
    frames: PETFrames,
    motions: list[np.ndarray],
    pet_to_t1w: np.ndarray,
    positions: np.ndarray,
) -> np.ndarray:
    """The PET (duration-weighted mean of the frames) on the grid, one interpolation.

    ``positions``: T1w world position of each grid voxel, (3, *grid shape).
    """
    shape = positions.shape[1:]
    x = positions.reshape(3, -1).astype(np.float64)
    p = reg.apply_matrix(np.linalg.inv(pet_to_t1w), x)  # reference (petref) world
    out = np.zeros(int(np.prod(shape)), dtype=np.float64)
    for t, w in enumerate(frames.weights):
        if w == 0:
            continue
        q = reg.apply_matrix(np.linalg.inv(motions[t]), p).reshape(3, *shape)
        out += w * reg.sample_at(frames.data[..., t], frames.affine, q).reshape(-1)
    return out.reshape(shape).astype(np.float32)


def fov_coverage(
    frames: PETFrames,
    motions: list[np.ndarray],
    pet_to_t1w: np.ndarray,
    positions: np.ndarray,
) -> np.ndarray:
    """Share of the frames' weight whose field of view holds each grid voxel (0..1).

    The same mapping as :func:`to_grid`, applied to an image of ones: 1 where every frame saw
    the voxel, less where a frame's field of view (after its motion) ends before it.
    """
    shape = positions.shape[1:]
    x = positions.reshape(3, -1).astype(np.float64)
    p = reg.apply_matrix(np.linalg.inv(pet_to_t1w), x)
    ones = np.ones(frames.data.shape[:3], dtype=np.float32)
    out = np.zeros(int(np.prod(shape)), dtype=np.float64)
    for t, w in enumerate(frames.weights):
        if w == 0:
            continue
        q = reg.apply_matrix(np.linalg.inv(motions[t]), p).reshape(3, *shape)
        out += w * reg.sample_at(ones, frames.affine, q).reshape(-1)
    return out.reshape(shape).astype(np.float32)


def cerebellum_mask() -> np.ndarray:
    """AAL cerebellar grey matter on the grid.

    The AAL cerebellar regions (``Cerebelum_*`` and ``Vermis_*``) also cover the cerebellar
    white matter; the reference keeps their voxels where the template's GM probability is at
    least 0.5 (and inside the template brain mask).
    """
    from ..data.atlas import load_atlas
    from ..data.templates import grid_brain_mask, load_template

    atlas = load_atlas()
    wanted = [
        i
        for i, name in enumerate(atlas.names, start=1)
        if name.startswith(("Cerebelum", "Cerebellum", "Vermis"))
    ]
    if not wanted:
        raise DataError("the atlas has no cerebellar regions (Cerebelum_*/Vermis_*)")
    gm = load_template("GM")
    gm_grid = reg.resample_to_grid(np.asanyarray(gm.dataobj, np.float32), gm.affine)
    return np.isin(atlas.labels, wanted) & (gm_grid >= 0.5) & grid_brain_mask()


def normalize(data: np.ndarray, ref_region: str = "none") -> tuple[np.ndarray, float, str]:
    """Intensity normalization on the grid; (image, value, description)."""
    from ..data.templates import grid_brain_mask
    from .intensity import (
        BACKGROUND_FRACTION,
        TOP_FRACTION,
        normalize_reference,
        normalize_top_mean,
    )

    if ref_region == "cerebellum":
        out, value = normalize_reference(data, cerebellum_mask())
        return (
            out,
            value,
            "SUVR: divided by the mean of the AAL cerebellar regions' grey matter (template GM "
            "probability >= 0.5); voxels under 10% of the top-0.1% mean set to 0",
        )
    if ref_region != "none":
        raise DataError(f"unknown PET reference region {ref_region!r}")
    out, value = normalize_top_mean(data, grid_brain_mask())
    return (
        out,
        value,
        f"divided by the mean of the top {100 * TOP_FRACTION:g}% voxels inside the template "
        f"brain mask; voxels under {100 * BACKGROUND_FRACTION:g}% of it set to 0",
    )
