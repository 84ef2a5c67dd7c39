"""Synthetic T1w + FDG-PET BIDS cohort with a known answer (the demo and the test data).

``bids_siamfuse-synth OUT --n-per-group 5 --groups CN MCIs MCIc AD --seed 0`` writes a valid
BIDS dataset built from the ICBM152 2009a templates (see :mod:`bids_siamfuse.data.templates`)
and the AAL atlas. Each subject is the template, changed and moved:

Anatomy (MNI space, 1 mm)
    GM is scaled per AAL region by (a) normal inter-subject variation (SD 7 %), (b) age
    (-0.3 %/year around 75) and (c) disease: atrophy in planted regions, scaled by the group's
    stage (CN 0 < MCIs < MCIc < AD), a subject severity, a per-subject split between atrophy
    and hypometabolism and ``--effect-size``. Lost GM becomes CSF. FDG uptake is
    3.5 x GM + 1 x WM (+ a little CSF and scalp), times the per-region metabolism factors.
    Planted regions (both hemispheres, see ``EFFECTS``): hippocampus, parahippocampal, inferior
    and middle temporal (atrophy and hypometabolism), precuneus, posterior cingulate, angular
    (hypometabolism without atrophy), amygdala, fusiform (atrophy without hypometabolism).

Native T1w
    Position x (scanner mm) maps to MNI as ``y = N(A x)``: ``A`` a random affine (rotation up to
    10 degrees, translation up to 10 mm, scaling up to 5 %, session-specific pose and
    subject-specific size) and ``N(z) = z + u(z)`` a smooth random displacement (up to ~5 mm)
    stored on a 5 mm grid and interpolated trilinearly. Voxels 1.0-1.2 mm, stored as RAS, LAS,
    LPS or PIR, some with an oblique (tilted) grid; intensities from the tissue mixture plus
    CSF rim, skull, scalp and a neck below the brain, a smooth bias field and Rician noise.

Native PET
    Its own scanner space, a rigid transform from the T1w (up to 10 degrees, 20 mm), 2-2.5 mm
    voxels, 6-8 mm FWHM, Bq/mL with Poisson-like noise; optionally dynamic (``--pet-frames``:
    frames of ``--frame-duration`` seconds with small inter-frame head motion). Sidecars hold
    every field the BIDS PET specification requires.

Ground truth (``OUT/derivatives/synth-truth``)
    Per session: ``desc-truth_xfm.json`` (the affine ``A``, the PET-to-T1w matrix, frame motions,
    GM volumes), the subject's displacement field ``desc-warp_xfm.nii.gz``, native GM/WM maps,
    and the true MNI-space GM (plain and modulated) on the 121x145x121 grid. Cohort tables:
    ``subjects.tsv`` (group, stage, severity, atrophy share), ``regions.tsv`` (planted weights),
    ``region_factors.tsv`` (per-subject, per-region GM and uptake factors). :func:`load_truth`
    rebuilds the exact native<->MNI mappings from these files.

``--preprocessed`` also writes, under ``OUT/derivatives/bids_siamfuse``, what a perfect
participant run would write (modulated GM and normalized PET on the grid, region files), with
the pipeline's own writers, so group-level work can be tested without registration.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import __version__
from .bids import atomic_path, ensure_dataset_description, save_image, save_json, save_output
from .data.templates import (
    GRID_AFFINE,
    GRID_SHAPE,
    SPACE,
    grid_image,
    load_template,
)
from .errors import CannotWriteError, SiamFuseError, UsageError

LOGGER = logging.getLogger("bids_siamfuse.synth")

#: Disease stage per group (fraction of the full AD effect).
STAGES = {"CN": 0.0, "MCIs": 0.2, "MCIc": 0.55, "AD": 1.0}
MMSE = {"CN": (29.0, 1.0), "MCIs": (27.2, 2.0), "MCIc": (26.0, 2.5), "AD": (22.5, 3.0)}
AGE = {"CN": (74.0, 5.0), "MCIs": (75.0, 6.0), "MCIc": (76.0, 6.0), "AD": (76.0, 7.0)}

#: Planted effects: AAL name stem -> (atrophy weight, hypometabolism weight), both hemispheres.
EFFECTS = {
    "Hippocampus": (1.0, 0.7),
    "ParaHippocampal": (0.8, 0.7),
    "Temporal_Inf": (0.5, 0.6),
    "Temporal_Mid": (0.4, 0.5),
    "Precuneus": (0.0, 1.0),
    "Cingulum_Post": (0.0, 1.0),
    "Angular": (0.0, 0.8),
    "Amygdala": (0.9, 0.0),
    "Fusiform": (0.6, 0.0),
}
MAX_ATROPHY = 0.30  # GM lost at weight 1, full AD stage, effect size 1
MAX_HYPOMETABOLISM = 0.30  # uptake lost likewise
REGION_SD = 0.07  # normal inter-subject variation of regional GM and uptake

# Tissue intensities (T1w, arbitrary units) and FDG uptake (relative to WM).
T1_TISSUE = {"GM": 550.0, "WM": 900.0, "CSF": 180.0}
T1_HEAD = {
    "rim": 180.0,
    "skull": 60.0,
    "scalp": 650.0,
    "muscle": 420.0,
    "fat": 760.0,
    "cord": 620.0,
    "bone": 280.0,
}
FDG_TISSUE = {"GM": 3.5, "WM": 1.0, "CSF": 0.05}
FDG_HEAD = {
    "rim": 0.05,
    "skull": 0.1,
    "scalp": 0.4,
    "muscle": 0.5,
    "fat": 0.2,
    "cord": 0.8,
    "bone": 0.3,
}

# The extended 1 mm grid that holds the whole head (template grid + room for skull and neck).
EXT_ORIGIN = np.array([-100.0, -140.0, -140.0])
EXT_SHAPE = (201, 251, 261)
WARP_SPACING = 5.0
WARP_SHAPE = (41, 51, 53)
T1_FOV = np.array([180.0, 236.0, 236.0])  # L-R, A-P, S-I extent in head-aligned mm
T1_FOV_CENTER_MNI = np.array([0.0, -14.0, -12.0])
PET_FOV = np.array([256.0, 256.0, 200.0])
BRAIN_CENTER_MNI = np.array([0.0, -18.0, 12.0])


def _affine(origin, spacing=1.0):
    aff = np.eye(4)
    aff[:3, :3] *= spacing
    aff[:3, 3] = origin
    return aff


EXT_AFFINE = _affine(EXT_ORIGIN)
WARP_AFFINE = _affine(EXT_ORIGIN, WARP_SPACING)


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------


def apply_affine(aff: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to float32 points of shape (3, N)."""
    aff = np.asarray(aff, dtype=np.float32)
    out = aff[:3, :3] @ np.asarray(pts, dtype=np.float32)
    out += aff[:3, 3:4]
    return out


def sample(volume, vol_affine, pts, order=1, cval=0.0, mode="constant"):
    """Values of ``volume`` at world points ``pts`` (3, N), trilinear by default."""
    vox = apply_affine(np.linalg.inv(vol_affine), pts)
    return ndimage.map_coordinates(
        volume, vox, order=order, mode=mode, cval=cval, prefilter=False, output=np.float32
    )


def grid_points(shape, affine) -> np.ndarray:
    """World coordinates (3, N) of every voxel centre of a grid, C order."""
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return apply_affine(affine, idx)


def rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(angles_deg, translation, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 rotation about ``center`` followed by a translation."""
    rot = rotation(angles_deg)
    center = np.asarray(center, dtype=float)
    aff = np.eye(4)
    aff[:3, :3] = rot
    aff[:3, 3] = center - rot @ center + np.asarray(translation, dtype=float)
    return aff


_AXES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def oriented_grid(axcodes: str, voxel, fov, center_world, tilt_deg=0.0):
    """Shape and affine of a grid whose axes point along ``axcodes`` (e.g. 'PIR')."""
    direction = np.zeros((3, 3))
    voxel = np.asarray(voxel, dtype=float)
    for col, code in enumerate(axcodes):
        world_axis, sign = _AXES[code]
        direction[world_axis, col] = sign
    extent = np.abs(direction.T) @ np.asarray(fov, dtype=float)  # FOV along each voxel axis
    shape = tuple(int(np.ceil(e / v)) for e, v in zip(extent, voxel))
    lin = rotation((tilt_deg, 0.0, 0.0)) @ direction @ np.diag(voxel)
    aff = np.eye(4)
    aff[:3, :3] = lin
    centre_vox = (np.array(shape) - 1) / 2.0
    aff[:3, 3] = np.asarray(center_world, dtype=float) - lin @ centre_vox
    return shape, aff


# ----------------------------------------------------------------------------------------------
# The template-derived head model (computed once per process)
# ----------------------------------------------------------------------------------------------


@dataclass
class HeadModel:
    gm: np.ndarray  # template grid (1 mm)
    wm: np.ndarray
    csf: np.ndarray
    template_affine: np.ndarray
    offset: tuple  # template index -> extended-grid index
    t1_head: np.ndarray  # extended grid: intensities outside the brain
    fdg_head: np.ndarray
    aal: np.ndarray  # AAL indices 0..116 on the template grid
    aal_names: tuple


_HEAD: HeadModel | None = None


def head_model() -> HeadModel:
    global _HEAD
    if _HEAD is None:
        _HEAD = _build_head_model()
    return _HEAD


def _build_head_model() -> HeadModel:
    import nibabel as nb

    from .data.atlas import fetch_aal_files

    gm_img = load_template("GM")
    aff = gm_img.affine
    gm = np.asanyarray(gm_img.dataobj, dtype=np.float32)
    wm = np.asanyarray(load_template("WM").dataobj, dtype=np.float32)
    csf = np.asanyarray(load_template("CSF").dataobj, dtype=np.float32)
    mask = np.asanyarray(load_template("mask").dataobj) > 0
    if not np.allclose(aff[:3, :3], np.eye(3)):
        raise SiamFuseError("the synthetic generator needs a 1 mm RAS template")
    offset = tuple(int(round(v)) for v in (aff[:3, 3] - EXT_ORIGIN))
    sl = tuple(slice(o, o + s) for o, s in zip(offset, gm.shape))

    brain = np.zeros(EXT_SHAPE, dtype=bool)
    brain[sl] = mask
    # distance outside the brain, computed at 2 mm (the layers are several mm thick)
    half = tuple(n // 2 for n in EXT_SHAPE)
    coarse = brain[: 2 * half[0], : 2 * half[1], : 2 * half[2]]
    coarse = coarse.reshape(half[0], 2, half[1], 2, half[2], 2).any(axis=(1, 3, 5))
    dist2 = ndimage.distance_transform_edt(~coarse, sampling=2.0).astype(np.float32)
    fine = (np.indices(EXT_SHAPE, dtype=np.float32).reshape(3, -1) - 0.5) / 2.0
    dist = ndimage.map_coordinates(
        dist2, fine, order=1, mode="nearest", prefilter=False, output=np.float32
    ).reshape(EXT_SHAPE)
    dist[brain] = 0.0
    del fine
    layer = np.zeros(EXT_SHAPE, dtype=np.uint8)  # 0 air, then the keys of T1_HEAD in order
    codes = {name: i + 1 for i, name in enumerate(T1_HEAD)}
    layer[(dist > 0) & (dist <= 3)] = codes["rim"]
    layer[(dist > 3) & (dist <= 8)] = codes["skull"]
    layer[(dist > 8) & (dist <= 14)] = codes["scalp"]
    del dist
    x = np.arange(EXT_SHAPE[0], dtype=np.float32)[:, None] + EXT_ORIGIN[0]
    y = np.arange(EXT_SHAPE[1], dtype=np.float32)[None, :] + EXT_ORIGIN[1]
    body = (x / 52.0) ** 2 + ((y + 20.0) / 58.0) ** 2
    neck = np.zeros(body.shape, dtype=np.uint8)  # one axial slice of the neck
    neck[body <= 1.0] = codes["fat"]
    neck[body <= 0.8] = codes["muscle"]
    neck[(x / 16.0) ** 2 + ((y + 18.0) / 13.0) ** 2 <= 1.0] = codes["bone"]
    neck[(x / 7.0) ** 2 + ((y + 38.0) / 8.0) ** 2 <= 1.0] = codes["cord"]
    below = int(round(-72 - EXT_ORIGIN[2]))
    layer[:, :, :below] = neck[:, :, None]

    def layered(values):
        lut = np.array([0.0] + [values[name] for name in T1_HEAD], dtype=np.float32)
        return ndimage.gaussian_filter(lut[layer], 0.7, truncate=3.0)

    t1_head = layered(T1_HEAD)
    fdg_head = layered(FDG_HEAD)

    path, names, codes = fetch_aal_files()
    aal_img = nb.load(str(path))
    raw = sample(
        np.asanyarray(aal_img.dataobj).astype(np.float32),
        aal_img.affine,
        grid_points(gm.shape, aff),
        order=0,
    ).astype(np.int32)
    lut = np.zeros(int(raw.max()) + 1, dtype=np.int16)
    for index, code in enumerate(codes, start=1):
        if code < lut.size:
            lut[code] = index
    aal = lut[raw].reshape(gm.shape)
    return HeadModel(gm, wm, csf, aff, offset, t1_head, fdg_head, aal, tuple(names))


# ----------------------------------------------------------------------------------------------
# Subject parameters and maps
# ----------------------------------------------------------------------------------------------


def effect_weights(names) -> tuple[np.ndarray, np.ndarray]:
    """Atrophy and hypometabolism weight per region (index 0 = background)."""
    atrophy = np.zeros(len(names) + 1)
    hypo = np.zeros(len(names) + 1)
    for index, name in enumerate(names, start=1):
        stem = name.rsplit("_", 1)[0] if name.endswith(("_L", "_R")) else name
        if stem in EFFECTS:
            atrophy[index], hypo[index] = EFFECTS[stem]
    return atrophy, hypo


@dataclass
class SubjectSpec:
    index: int
    label: str
    group: str
    sessions: list
    seed: int
    effect_size: float


def subject_parameters(spec: SubjectSpec, n_regions: int, names) -> dict:
    """Everything random about one subject, drawn from its own generator."""
    rng = np.random.default_rng([spec.seed, spec.index])
    stage = STAGES[spec.group]
    age = float(np.clip(rng.normal(*AGE[spec.group]), 55, 92))
    sex = str(rng.choice(["M", "F"]))
    mmse = int(np.clip(round(rng.normal(*MMSE[spec.group])), 10, 30))
    severity = stage * float(np.clip(rng.normal(1.0, 0.4), 0.1, 2.0)) if stage > 0 else 0.0
    atrophy_share = float(rng.uniform(0.2, 0.8))
    w_atr, w_hyp = effect_weights(names)
    jitter_a = np.clip(rng.normal(1.0, 0.25, n_regions + 1), 0.0, 2.0)
    jitter_h = np.clip(rng.normal(1.0, 0.25, n_regions + 1), 0.0, 2.0)
    normal_gm = rng.normal(1.0, REGION_SD, n_regions + 1)
    normal_pet = rng.normal(1.0, REGION_SD, n_regions + 1)
    age_factor = 1.0 - 0.003 * (age - 75.0)
    es = spec.effect_size
    gm = (
        normal_gm
        * age_factor
        * (1.0 - es * MAX_ATROPHY * severity * 2 * atrophy_share * w_atr * jitter_a)
    )
    pet = normal_pet * (
        1.0 - es * MAX_HYPOMETABOLISM * severity * 2 * (1 - atrophy_share) * w_hyp * jitter_h
    )
    gm, pet = np.clip(gm, 0.2, 1.3), np.clip(pet, 0.2, 1.3)
    gm[0], pet[0] = age_factor, 1.0
    sex_scale = 1.03 if sex == "M" else 0.97
    size = sex_scale * np.clip(rng.normal(1.0, 0.025, 3), 0.95, 1.05)
    warp_amp = float(rng.uniform(3.0, 5.0))
    noise = rng.standard_normal((*WARP_SHAPE, 3)).astype(np.float32)
    warp = np.stack(
        [ndimage.gaussian_filter(noise[..., i], 2.5, mode="nearest") for i in range(3)], -1
    )
    warp *= warp_amp / np.linalg.norm(warp, axis=-1).max()
    return {
        "rng": rng,
        "age": round(age, 1),
        "sex": sex,
        "mmse": mmse,
        "severity": severity,
        "atrophy_share": atrophy_share,
        "gm_factor": gm,
        "pet_factor": pet,
        "size": size,
        "warp": warp.astype(np.float32),
        "uptake_scale": float(rng.uniform(4000.0, 8000.0)),  # Bq/mL in WM
        "t1_gain": float(rng.uniform(0.6, 1.6)),
    }


def subject_maps(head: HeadModel, params: dict) -> dict:
    """The subject's MNI-space tissue maps (template grid) and head images (extended grid)."""
    gm_fac = ndimage.gaussian_filter(
        params["gm_factor"].astype(np.float32)[head.aal], 1.5, truncate=2.0
    )
    pet_fac = ndimage.gaussian_filter(
        params["pet_factor"].astype(np.float32)[head.aal], 1.5, truncate=2.0
    )
    room = head.gm + head.csf
    gm = np.minimum(head.gm * gm_fac, room)
    csf = room - gm
    wm = head.wm
    sl = tuple(slice(o, o + s) for o, s in zip(head.offset, gm.shape))
    tissue = gm + wm + csf
    t1 = head.t1_head.copy()
    t1[sl] = (
        gm * T1_TISSUE["GM"]
        + wm * T1_TISSUE["WM"]
        + csf * T1_TISSUE["CSF"]
        + np.clip(1.0 - tissue, 0.0, 1.0) * t1[sl]
    )
    fdg = head.fdg_head.copy()
    fdg[sl] = (
        gm * pet_fac * FDG_TISSUE["GM"]
        + wm * FDG_TISSUE["WM"]
        + csf * FDG_TISSUE["CSF"]
        + np.clip(1.0 - tissue, 0.0, 1.0) * fdg[sl]
    )
    return {"gm": gm, "wm": wm, "csf": csf, "t1": t1, "fdg": fdg}


def smoothed_uptake(fdg_ext: np.ndarray, fwhm_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Uptake averaged to 2 mm and smoothed to the scanner's resolution; (data, affine)."""
    nx, ny, nz = (n // 2 for n in fdg_ext.shape)
    trimmed = fdg_ext[: 2 * nx, : 2 * ny, : 2 * nz]
    coarse = trimmed.reshape(nx, 2, ny, 2, nz, 2).mean(axis=(1, 3, 5))
    sigma = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / 2.0
    aff = _affine(EXT_ORIGIN + 0.5, 2.0)
    return ndimage.gaussian_filter(coarse, sigma, mode="constant"), aff


# ----------------------------------------------------------------------------------------------
# The native <-> MNI mapping
# ----------------------------------------------------------------------------------------------


@dataclass
class Mapping:
    """``y = N(A x)``: scanner position x of the T1w to MNI position y (both RAS mm)."""

    A: np.ndarray  # 4x4
    warp: np.ndarray  # (41, 51, 53, 3) displacement in mm on the 5 mm grid
    warp_affine: np.ndarray = field(default_factory=lambda: WARP_AFFINE.copy())

    def displacement(self, z: np.ndarray) -> np.ndarray:
        vox = apply_affine(np.linalg.inv(self.warp_affine), z)
        return np.stack(
            [
                ndimage.map_coordinates(
                    self.warp[..., i],
                    vox,
                    order=1,
                    mode="nearest",
                    prefilter=False,
                    output=np.float32,
                )
                for i in range(3)
            ]
        )

    def native_to_mni(self, x: np.ndarray) -> np.ndarray:
        z = apply_affine(self.A, x)
        return z + self.displacement(z)

    def native_grid_to_mni(self, shape, affine, step: int = 3) -> np.ndarray:
        """MNI points (3, N) of every voxel of a native grid, fast.

        The mapping is evaluated exactly on every ``step``-th voxel and interpolated
        trilinearly in between: exact for the affine part, within ~0.05 mm for the smooth
        displacement (whose scale is ~12 mm).
        """
        import torch

        coarse_shape = tuple(int(np.ceil((n - 1) / step)) + 1 for n in shape)
        idx = np.indices(coarse_shape, dtype=np.float32).reshape(3, -1) * step
        coarse = self.native_to_mni(apply_affine(affine, idx)).reshape(3, *coarse_shape)
        size = tuple(step * (m - 1) + 1 for m in coarse_shape)
        with torch.no_grad():
            fine = torch.nn.functional.interpolate(
                torch.from_numpy(coarse)[None], size=size, mode="trilinear", align_corners=True
            )[0]
        fine = fine[:, : shape[0], : shape[1], : shape[2]]
        return np.ascontiguousarray(fine.numpy()).reshape(3, -1)

    def mni_to_native(self, y: np.ndarray, iterations: int = 6) -> np.ndarray:
        z = np.array(y, dtype=np.float32, copy=True)
        for _ in range(iterations):  # fixed point of z = y - u(z); |du/dz| << 1
            z = y - self.displacement(z)
        return apply_affine(np.linalg.inv(self.A), z)

    def inverse_jacobian(self, y: np.ndarray) -> np.ndarray:
        """|det d(native)/d(MNI)| at MNI points: the SPM modulation factor."""
        grads = [np.gradient(self.warp[..., i], WARP_SPACING) for i in range(3)]
        jac = np.empty((*self.warp.shape[:3], 3, 3), dtype=np.float32)
        for i in range(3):
            for j in range(3):
                jac[..., i, j] = grads[i][j] + (1.0 if i == j else 0.0)
        det_n = np.linalg.det(jac).astype(np.float32)
        z = np.array(y, dtype=np.float32, copy=True)
        for _ in range(3):  # the determinant varies slowly: 3 fixed-point steps suffice
            z = y - self.displacement(z)
        vox = apply_affine(np.linalg.inv(self.warp_affine), z)
        det_at = ndimage.map_coordinates(det_n, vox, order=1, mode="nearest", prefilter=False)
        return (1.0 / (abs(np.linalg.det(self.A[:3, :3])) * det_at)).astype(np.float32)


def _grid_inverse_jacobian(mapping: Mapping) -> np.ndarray:
    """The modulation factor on the output grid, computed at 3 mm and interpolated (smooth)."""
    coarse_shape = tuple((n + 1) // 2 for n in GRID_SHAPE)
    coarse_aff = GRID_AFFINE.copy()
    coarse_aff[:3, :3] *= 2.0
    jac = mapping.inverse_jacobian(grid_points(coarse_shape, coarse_aff)).reshape(coarse_shape)
    fine = np.indices(GRID_SHAPE, dtype=np.float32).reshape(3, -1) / 2.0
    return ndimage.map_coordinates(
        jac, fine, order=1, mode="nearest", prefilter=False, output=np.float32
    ).reshape(GRID_SHAPE)


# ----------------------------------------------------------------------------------------------
# Writing one subject
# ----------------------------------------------------------------------------------------------


def _bias_field(shape, rng) -> np.ndarray:
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    c = rng.normal(0.0, 0.08, 9)
    log_b = c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * y * y + c[5] * z * z
    log_b = log_b + c[6] * x * y + c[7] * y * z + c[8] * x * z
    return np.exp(log_b).astype(np.float32)


def pet_sidecar(frames: int, frame_duration: float, tracer: str, rng) -> dict:
    start = 1800.0 if frames > 1 else 1800.0
    duration = frame_duration if frames > 1 else 1800.0
    dose = float(rng.uniform(150.0, 250.0))
    return {
        "Manufacturer": "Synthetic",
        "ManufacturersModelName": "bids_siamfuse-synth",
        "Units": "Bq/mL",
        "TracerName": tracer,
        "TracerRadionuclide": "F18",
        "InjectedRadioactivity": round(dose, 2),
        "InjectedRadioactivityUnits": "MBq",
        "InjectedMass": "n/a",
        "InjectedMassUnits": "n/a",
        "SpecificRadioactivity": "n/a",
        "SpecificRadioactivityUnits": "n/a",
        "ModeOfAdministration": "bolus",
        "TimeZero": "10:00:00",
        "ScanStart": start,
        "InjectionStart": 0,
        "FrameTimesStart": [start + i * duration for i in range(frames)],
        "FrameDuration": [duration] * frames,
        "AcquisitionMode": "list mode",
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
        "ReconMethodName": "3D-OSEM",
        "ReconMethodParameterLabels": ["subsets", "iterations"],
        "ReconMethodParameterUnits": ["none", "none"],
        "ReconMethodParameterValues": [16, 4],
        "ReconFilterType": "Gaussian",
        "ReconFilterSize": 4,
        "AttenuationCorrection": "CT-based",
        "BodyPart": "Brain",
    }


T1W_SIDECAR = {
    "Manufacturer": "Synthetic",
    "ManufacturersModelName": "bids_siamfuse-synth",
    "MagneticFieldStrength": 3,
    "RepetitionTime": 2.3,
    "EchoTime": 0.00298,
    "InversionTime": 0.9,
    "FlipAngle": 9,
}


@dataclass
class CohortOptions:
    out: Path
    seed: int
    effect_size: float
    tracer: str
    pet_frames: int
    frame_duration: float
    sessions: bool
    preprocessed: bool
    raw: bool = True
    effect: object = None  # synth_effects.EffectSettings for --effect cohorts


def _session_dir(out: Path, label: str, session: str | None, datatype: str) -> Path:
    base = out / f"sub-{label}"
    if session:
        base = base / f"ses-{session}"
    return base / datatype


def _prefix(label: str, session: str | None) -> str:
    return f"sub-{label}" + (f"_ses-{session}" if session else "")


def make_subject(spec: SubjectSpec, opts: CohortOptions) -> dict:
    """Generate and write every session of one subject; return its table rows.

    All random choices come from the subject's generator in a fixed order, and image noise from
    generators of their own, so ``raw=False`` (derivatives only) gives the same subjects.
    ``--effect`` cohorts are made by :func:`bids_siamfuse.synth_effects.make_subject`.
    """
    if opts.effect is not None:
        from .synth_effects import make_subject as make_effect_subject

        return make_effect_subject(spec, opts)
    t0 = time.time()
    head = head_model()
    params = subject_parameters(spec, len(head.aal_names), head.aal_names)
    rng = params["rng"]
    maps = subject_maps(head, params)
    out = opts.out
    truth_root = out / "derivatives" / "synth-truth"
    warp_path = truth_root / f"sub-{spec.label}" / f"sub-{spec.label}_desc-warp_xfm.nii.gz"
    _save_warp(warp_path, params["warp"])
    grid_pts = grid_points(GRID_SHAPE, GRID_AFFINE)
    gm_mni = sample(maps["gm"], head.template_affine, grid_pts).reshape(GRID_SHAPE)
    rows = []
    for s_index, session in enumerate(spec.sessions):
        noise_rng = np.random.default_rng([spec.seed, spec.index, s_index, 7])
        # pose of this session: subject size is fixed, orientation and position vary
        angles = rng.uniform(-10.0, 10.0, 3)
        shift = rng.uniform(-10.0, 10.0, 3)
        A = np.eye(4)
        A[:3, :3] = rotation(angles) @ np.diag(1.0 / params["size"])
        A[:3, 3] = shift
        mapping = Mapping(A=A, warp=params["warp"])
        inv_A = np.linalg.inv(A)
        axcodes = str(rng.choice(["RAS", "LAS", "LPS", "PIR"]))
        voxel = np.round(rng.uniform(1.0, 1.2), 2) * np.ones(3)
        if rng.random() < 0.3:
            voxel[rng.integers(3)] = 1.2
        tilt = float(rng.uniform(-15.0, 15.0)) if rng.random() < 0.3 else 0.0
        center = apply_affine(inv_A, T1_FOV_CENTER_MNI[:, None])[:, 0] + rng.uniform(-5, 5, 3)
        shape, t1_aff = oriented_grid(axcodes, voxel, T1_FOV, center, tilt)
        fwhm = float(rng.uniform(6.0, 8.0))
        p_angles = rng.uniform(-10.0, 10.0, 3)
        p_shift = rng.uniform(-20.0, 20.0, 3)
        brain_native = apply_affine(inv_A, BRAIN_CENTER_MNI[:, None])[:, 0]
        pet_to_t1w = rigid(p_angles, p_shift, center=brain_native)
        pet_voxel = np.array([rng.uniform(2.0, 2.5)] * 2 + [rng.uniform(2.0, 2.5)]).round(3)
        pet_center = apply_affine(np.linalg.inv(pet_to_t1w), brain_native[:, None])[:, 0]
        pet_center = pet_center + rng.uniform(-8, 8, 3)
        pet_codes = str(rng.choice(["RAS", "LAS", "LPS"]))
        pet_shape, pet_aff = oriented_grid(pet_codes, pet_voxel, PET_FOV, pet_center)
        motions = [np.eye(4)] + [
            rigid(rng.uniform(-1.0, 1.0, 3), rng.uniform(-1.5, 1.5, 3), pet_center)
            for _ in range(opts.pet_frames - 1)
        ]
        sidecar = pet_sidecar(opts.pet_frames, opts.frame_duration, opts.tracer, rng)
        uptake, uptake_aff = smoothed_uptake(maps["fdg"], fwhm)
        uptake *= params["uptake_scale"]
        prefix = _prefix(spec.label, session)
        truth_anat = _session_dir(truth_root, spec.label, session, "anat")
        gm_volume_native = None
        if opts.raw:
            gm_volume_native = _write_raw_session(
                out,
                spec,
                session,
                opts,
                maps,
                mapping,
                params,
                noise_rng,
                t1=(shape, t1_aff),
                pet=(pet_shape, pet_aff),
                pet_to_t1w=pet_to_t1w,
                motions=motions,
                sidecar=sidecar,
                uptake=(uptake, uptake_aff),
                truth_anat=truth_anat,
            )

        jac = _grid_inverse_jacobian(mapping)
        mwc1 = gm_mni * jac
        mni_prefix = f"{prefix}_space-{SPACE}_res-1p5_label-GM"
        save_image(truth_anat / f"{mni_prefix}_probseg.nii.gz", grid_image(gm_mni), space_code=4)
        save_image(
            truth_anat / f"{mni_prefix}_desc-modulated_probseg.nii.gz",
            grid_image(mwc1),
            space_code=4,
        )
        truth = {
            "subject": spec.label,
            "session": session,
            "group": spec.group,
            "native_to_prewarp_affine": A.tolist(),
            "warp_file": os.path.relpath(warp_path, truth_anat),
            "warp_convention": (
                "MNI = z + u(z), z = A @ native (RAS mm); u trilinear on the warp file's grid "
                "(edge values extend outside it)"
            ),
            "pet_to_t1w_affine": pet_to_t1w.tolist(),
            "pet_frame_motion": [m.tolist() for m in motions],
            "pet_frame_motion_convention": "frame f shows the head at position motion_f @ q",
            "pet_fwhm_mm": fwhm,
            "t1w_axcodes": axcodes,
            "t1w_tilt_deg": tilt,
            "gm_volume_native_mm3": gm_volume_native,
            "gm_volume_modulated_mm3": float(mwc1.sum() * 1.5**3),
            "uptake_scale_bq_ml": params["uptake_scale"],
        }
        save_json(truth_anat / f"{prefix}_desc-truth_xfm.json", truth)
        if opts.preprocessed:
            _write_preprocessed(
                out, spec, session, opts, uptake, uptake_aff, gm_mni, mwc1, grid_pts
            )
        rows.append(
            {"session": session, "acq_time": f"{2020 + s_index}-03-0{1 + s_index}T09:00:00"}
        )
        LOGGER.info(
            "sub-%s%s: %.1f s", spec.label, f" ses-{session}" if session else "", time.time() - t0
        )
    return {
        "participant_id": f"sub-{spec.label}",
        "diagnosis": spec.group,
        "age": params["age"],
        "sex": params["sex"],
        "MMSE": params["mmse"],
        "severity": params["severity"],
        "atrophy_share": params["atrophy_share"],
        "gm_factor": params["gm_factor"][1:].tolist(),
        "pet_factor": params["pet_factor"][1:].tolist(),
        "sessions": rows,
    }


def _write_raw_session(
    out,
    spec,
    session,
    opts,
    maps,
    mapping,
    params,
    noise_rng,
    *,
    t1,
    pet,
    pet_to_t1w,
    motions,
    sidecar,
    uptake,
    truth_anat,
) -> float:
    """The native T1w and PET images of one session (and the native GM truth)."""
    head = head_model()
    prefix = _prefix(spec.label, session)
    shape, t1_aff = t1
    mni_pts = mapping.native_grid_to_mni(shape, t1_aff)
    image = sample(maps["t1"], EXT_AFFINE, mni_pts).reshape(shape)
    gm_native = sample(maps["gm"], head.template_affine, mni_pts).reshape(shape)
    del mni_pts
    image *= _bias_field(shape, noise_rng) * params["t1_gain"]
    sigma = 0.025 * T1_TISSUE["WM"] * params["t1_gain"]
    n1 = noise_rng.standard_normal(shape, dtype=np.float32) * sigma
    n2 = noise_rng.standard_normal(shape, dtype=np.float32) * sigma
    image = np.sqrt((image + n1) ** 2 + n2**2)
    del n1, n2
    anat = _session_dir(out, spec.label, session, "anat")
    _save_nifti(anat / f"{prefix}_T1w.nii.gz", np.round(image).astype(np.int16), t1_aff)
    save_json(anat / f"{prefix}_T1w.json", T1W_SIDECAR)
    del image
    voxel_volume = abs(np.linalg.det(t1_aff[:3, :3]))
    gm_volume_native = float(gm_native.sum() * voxel_volume)
    _save_nifti(truth_anat / f"{prefix}_label-GM_probseg.nii.gz", gm_native, t1_aff, as_uint8=True)
    del gm_native

    pet_shape, pet_aff = pet
    data, data_aff = uptake
    frames = []
    duration = opts.frame_duration if opts.pet_frames > 1 else 1800.0
    for f, motion in enumerate(motions):
        pts = mapping.native_grid_to_mni(pet_shape, pet_to_t1w @ motion @ pet_aff)
        frame = sample(data, data_aff, pts).reshape(pet_shape)
        if opts.pet_frames > 1:
            frame *= 0.97 + 0.01 * f  # FDG still accumulating slowly
        noise_sd = 0.06 * np.sqrt(np.maximum(frame, 0) * params["uptake_scale"])
        noise_sd *= np.sqrt(300.0 / duration)
        frame = frame + noise_rng.standard_normal(pet_shape, dtype=np.float32) * noise_sd
        frames.append(np.maximum(frame, 0).astype(np.float32))
    pet_data = frames[0] if len(frames) == 1 else np.stack(frames, axis=-1)
    pet_dir = _session_dir(out, spec.label, session, "pet")
    pet_name = f"{prefix}_trc-{opts.tracer}_pet"
    save_json(pet_dir / f"{pet_name}.json", sidecar)
    _save_nifti(
        pet_dir / f"{pet_name}.nii.gz",
        pet_data,
        pet_aff,
        frame_s=opts.frame_duration if opts.pet_frames > 1 else None,
    )
    return gm_volume_native


def _write_preprocessed(out, spec, session, opts, uptake, uptake_aff, gm_mni, mwc1, grid_pts):
    """What a perfect participant run writes, through the pipeline's own writers.

    The sidecars are those of the participant workflow (:mod:`bids_siamfuse.preproc.sidecars`),
    with ``Method`` saying they come from the ground truth.
    """
    from .preproc import sidecars
    from .preproc.pet import normalize

    deriv = out / "derivatives" / "bids_siamfuse"
    anat_src = {"subject": spec.label, "session": session}
    pet_src = {**anat_src, "tracer": opts.tracer}
    pet_mni = sample(uptake, uptake_aff, grid_pts).reshape(GRID_SHAPE)
    pet_norm, value, description = normalize(pet_mni, "none")
    prefix = _prefix(spec.label, session)
    if opts.raw:
        ses_dir = f"ses-{session}/" if session else ""
        t1w_uri = f"bids:raw:sub-{spec.label}/{ses_dir}anat/{prefix}_T1w.nii.gz"
        pet_uri = f"bids:raw:sub-{spec.label}/{ses_dir}pet/{prefix}_trc-{opts.tracer}_pet.nii.gz"
        anat_sources, pet_sources = [t1w_uri], [pet_uri, t1w_uri]
    else:
        anat_sources = pet_sources = ["synthetic ground truth"]
    method = "synthetic ground truth (bids_siamfuse-synth --preprocessed)"
    for key, data, modulated in (("gm_mni", gm_mni, False), ("gm_mni_modulated", mwc1, True)):
        meta = sidecars.gm_mni_meta(anat_sources, modulated=modulated, method=method)
        save_output(deriv, key, grid_image(data), source=anat_src, meta=meta)
    meta = sidecars.pet_mni_meta(
        pet_sources, normalization=description, value=value, ref_region="none", method=method
    )
    save_output(deriv, "pet_mni", grid_image(pet_norm), source=pet_src, meta=meta)
    from .preproc.regions import write_region_outputs

    write_region_outputs(
        deriv, mwc1, pet_norm, anat_source=anat_src, pet_source=pet_src, sources=pet_sources
    )


def _save_nifti(path: Path, data, affine, *, as_uint8=False, frame_s=None):
    import nibabel as nb

    if as_uint8:
        img = nb.Nifti1Image(np.clip(np.round(data * 255), 0, 255).astype(np.uint8), affine)
        img.header.set_slope_inter(1.0 / 255.0, 0.0)
    else:
        img = nb.Nifti1Image(data, affine)
    img.set_sform(affine, 1)
    img.set_qform(affine, 1)
    img.header.set_xyzt_units("mm", "sec")
    if frame_s is not None:
        img.header.set_zooms(img.header.get_zooms()[:3] + (float(frame_s),))
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))


def _save_warp(path: Path, warp):
    import nibabel as nb

    img = nb.Nifti1Image(warp[:, :, :, None, :].astype(np.float32), WARP_AFFINE)
    img.header.set_intent("vector", (), "displacement_mm")
    img.set_sform(WARP_AFFINE, 4)
    img.set_qform(WARP_AFFINE, 4)
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))


# ----------------------------------------------------------------------------------------------
# Reading the truth back
# ----------------------------------------------------------------------------------------------


@dataclass
class Truth:
    meta: dict
    mapping: Mapping
    folder: Path

    def pet_to_t1w(self) -> np.ndarray:
        return np.asarray(self.meta["pet_to_t1w_affine"])


def load_truth(dataset: Path, subject: str, session: str | None) -> Truth:
    """The ground truth of one session, with its exact native<->MNI mapping."""
    import nibabel as nb

    folder = _session_dir(Path(dataset) / "derivatives" / "synth-truth", subject, session, "anat")
    meta = json.loads((folder / f"{_prefix(subject, session)}_desc-truth_xfm.json").read_text())
    warp_img = nb.load(str(folder / meta["warp_file"]))
    warp = np.asanyarray(warp_img.dataobj, dtype=np.float32)[:, :, :, 0, :]
    mapping = Mapping(
        A=np.asarray(meta["native_to_prewarp_affine"]), warp=warp, warp_affine=warp_img.affine
    )
    return Truth(meta=meta, mapping=mapping, folder=folder)


# ----------------------------------------------------------------------------------------------
# The cohort
# ----------------------------------------------------------------------------------------------


def plan_cohort(
    n_per_group: int,
    groups,
    seed: int,
    two_session_fraction: float,
    sessions: bool,
    effect_size: float,
) -> list[SubjectSpec]:
    rng = np.random.default_rng(seed)
    labels = [g for g in groups for _ in range(n_per_group)]
    order = rng.permutation(len(labels))
    n_two = int(round(two_session_fraction * len(labels))) if sessions else 0
    if sessions and two_session_fraction > 0 and len(labels) >= 2:
        n_two = max(n_two, 1)
    two = set(rng.choice(len(labels), size=n_two, replace=False).tolist()) if n_two else set()
    specs = []
    width = max(3, len(str(len(labels))))
    for i, j in enumerate(order):
        if sessions:
            ses = ["01", "02"] if i in two else ["01"]
        else:
            ses = [None]
        specs.append(
            SubjectSpec(
                index=i,
                label=f"{i + 1:0{width}d}",
                group=labels[j],
                sessions=ses,
                seed=seed,
                effect_size=effect_size,
            )
        )
    return specs


def _fork_worker_init():
    # A forked child must not enter the OpenMP pool the parent may already have started (GNU
    # OpenMP is not fork-safe: the child's first parallel region hangs). One thread each; the
    # pool supplies the parallelism.
    import torch

    torch.set_num_threads(1)


def _run_subject(args):
    spec, opts = args
    return make_subject(spec, opts)


def generate(
    out: Path,
    *,
    n_per_group: int = 5,
    groups=("CN", "MCIs", "MCIc", "AD"),
    seed: int = 0,
    effect_size: float = 1.0,
    tracer: str = "FDG",
    pet_frames: int = 1,
    frame_duration: float = 300.0,
    two_session_fraction: float = 0.25,
    sessions: bool = True,
    preprocessed: bool = False,
    raw: bool = True,
    jobs: int = 1,
    effect: str | None = None,
    sites: int = 0,
    regions_only: bool = False,
) -> Path:
    """Write a synthetic cohort to ``out``; see the module docstring.

    ``effect`` (``ad``, ``coupling``, ``nonlinear``, ``none``) makes a realistic benchmark
    cohort (:mod:`bids_siamfuse.synth_effects`); ``sites`` > 1 adds site effects;
    ``regions_only`` writes the region files but not the MNI maps (``--preprocessed``).
    Without ``effect`` the original generator runs unchanged.
    """
    import pandas as pd

    unknown = sorted(set(groups) - set(STAGES))
    if unknown:
        raise UsageError(f"unknown group(s) {unknown}; choose from {list(STAGES)}")
    if n_per_group < 1:
        raise UsageError("--n-per-group must be 1 or more")
    out = Path(out).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotWriteError(f"cannot create {out}: {exc.strerror}") from None
    if not raw and not preprocessed:
        raise UsageError("--skip-raw writes only derivatives: add --preprocessed")
    settings = None
    if effect is not None:
        from . import synth_effects

        if effect not in synth_effects.FAMILIES:
            choices = list(synth_effects.FAMILIES)
            raise UsageError(f"unknown effect {effect!r}; choose from {choices}")
        if sites < 0:
            raise UsageError("--sites must be 0 or more")
        settings = synth_effects.EffectSettings(effect, effect_size, sites, regions_only)
    opts = CohortOptions(
        out,
        seed,
        effect_size,
        tracer,
        pet_frames,
        frame_duration,
        sessions,
        preprocessed,
        raw,
        settings,
    )
    specs = plan_cohort(n_per_group, groups, seed, two_session_fraction, sessions, effect_size)
    if settings is None or raw:
        head_model()  # built once, shared with forked workers
    if settings is not None:
        synth_effects.grid_model()
    if jobs > 1 and len(specs) > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(jobs, len(specs)), initializer=_fork_worker_init) as pool:
            rows = pool.map(_run_subject, [(s, opts) for s in specs], chunksize=1)
    else:
        rows = [make_subject(s, opts) for s in specs]

    if settings is not None:
        return _write_effect_cohort(out, rows, opts, groups, n_per_group)
    head = head_model()
    _write_dataset_files(out, rows, opts, head)
    truth = out / "derivatives" / "synth-truth"
    subjects = pd.DataFrame(
        [
            {k: r[k] for k in ("participant_id", "diagnosis", "severity", "atrophy_share")}
            for r in rows
        ]
    )
    subjects["effect_size"] = effect_size
    with atomic_path(truth / "subjects.tsv") as tmp:
        subjects.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    w_atr, w_hyp = effect_weights(head.aal_names)
    regions = pd.DataFrame(
        {
            "index": np.arange(1, len(head.aal_names) + 1),
            "name": head.aal_names,
            "atrophy_weight": w_atr[1:],
            "hypometabolism_weight": w_hyp[1:],
        }
    )
    with atomic_path(truth / "regions.tsv") as tmp:
        regions.to_csv(tmp, sep="\t", index=False)
    factors = pd.DataFrame(
        [
            {
                "participant_id": r["participant_id"],
                "index": i + 1,
                "gm_factor": g,
                "pet_factor": p,
            }
            for r in rows
            for i, (g, p) in enumerate(zip(r["gm_factor"], r["pet_factor"]))
        ]
    )
    with atomic_path(truth / "region_factors.tsv") as tmp:
        factors.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    save_json(
        truth / "dataset_description.json",
        {
            "Name": "bids_siamfuse synthetic ground truth",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "bids_siamfuse-synth", "Version": __version__}],
        },
    )
    save_json(
        truth / "cohort.json",
        {
            "seed": seed,
            "effect_size": effect_size,
            "groups": list(groups),
            "n_per_group": n_per_group,
            "tracer": tracer,
            "pet_frames": pet_frames,
            "frame_duration": frame_duration,
            "stages": STAGES,
            "max_atrophy": MAX_ATROPHY,
            "max_hypometabolism": MAX_HYPOMETABOLISM,
            "region_sd": REGION_SD,
            "effects": {k: list(v) for k, v in EFFECTS.items()},
        },
    )
    if preprocessed:
        ensure_dataset_description(out / "derivatives" / "bids_siamfuse", out)
    return out


def _write_effect_cohort(out: Path, rows, opts: CohortOptions, groups, n_per_group) -> Path:
    """Dataset files and truth tables of an ``--effect`` cohort."""
    import pandas as pd

    from . import synth_effects

    settings = opts.effect
    _write_dataset_files(out, rows, opts, None)
    truth = out / "derivatives" / "synth-truth"
    columns = (
        "participant_id",
        "diagnosis",
        "stage",
        "severity",
        "atrophy_share",
        "site",
        "head_scale",
        "warp_max_mm",
        "warp_min_jacobian",
    )
    subjects = pd.DataFrame([{k: r[k] for k in columns} for r in rows])
    subjects["effect_size"] = opts.effect_size
    subjects["effect_family"] = settings.family
    with atomic_path(truth / "subjects.tsv") as tmp:
        subjects.to_csv(tmp, sep="\t", index=False, float_format="%.6g", na_rep="n/a")
    names = synth_effects.grid_model().names
    synth_effects.write_truth_tables(out, rows, settings, names, opts.seed)
    save_json(
        truth / "dataset_description.json",
        {
            "Name": "bids_siamfuse synthetic ground truth",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "bids_siamfuse-synth", "Version": __version__}],
        },
    )
    save_json(
        truth / "cohort.json",
        {
            "seed": opts.seed,
            "effect_size": opts.effect_size,
            "groups": list(groups),
            "n_per_group": n_per_group,
            "tracer": opts.tracer,
            "pet_frames": opts.pet_frames,
            "frame_duration": opts.frame_duration,
            **synth_effects.cohort_parameters(settings),
        },
    )
    if opts.preprocessed:
        ensure_dataset_description(out / "derivatives" / "bids_siamfuse", out)
    return out


def _write_dataset_files(out: Path, rows, opts: CohortOptions, head) -> None:
    import pandas as pd

    save_json(
        out / "dataset_description.json",
        {
            "Name": "bids_siamfuse synthetic FDG-PET/T1w cohort",
            "BIDSVersion": "1.10.0",
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["bids_siamfuse-synth"],
            "GeneratedBy": [
                {
                    "Name": "bids_siamfuse-synth",
                    "Version": __version__,
                    "Description": f"seed {opts.seed}, effect size {opts.effect_size}",
                }
            ],
        },
    )
    with atomic_path(out / "README") as tmp:
        tmp.write_text(
            "Synthetic T1w + FDG-PET cohort written by bids_siamfuse-synth "
            f"(version {__version__}, seed {opts.seed}, effect size {opts.effect_size}).\n"
            "Built from the ICBM152 2009a templates and the AAL atlas; the ground truth is in "
            "derivatives/synth-truth. Not real data.\n"
        )
    columns = ["participant_id", "diagnosis", "age", "sex", "MMSE"]
    if opts.effect is not None and opts.effect.sites > 1:
        columns.append("site")
    table = pd.DataFrame([{k: r[k] for k in columns} for r in rows])
    with atomic_path(out / "participants.tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    save_json(
        out / "participants.json",
        {
            "diagnosis": {
                "Description": "clinical group",
                "Levels": {
                    "CN": "cognitively normal",
                    "MCIs": "stable mild cognitive impairment",
                    "MCIc": "MCI converting to AD",
                    "AD": "Alzheimer's disease",
                },
            },
            "age": {"Description": "age at the first session", "Units": "year"},
            "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
            "MMSE": {"Description": "Mini-Mental State Examination score", "Units": "points"},
            **(
                {"site": {"Description": "acquisition site (synthetic site effects)"}}
                if "site" in columns
                else {}
            ),
        },
    )
    for r in rows:
        if len(r["sessions"]) > 1:
            label = r["participant_id"]
            sessions = pd.DataFrame(
                [
                    {"session_id": f"ses-{s['session']}", "acq_time": s["acq_time"]}
                    for s in r["sessions"]
                ]
            )
            with atomic_path(out / label / f"{label}_sessions.tsv") as tmp:
                sessions.to_csv(tmp, sep="\t", index=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bids_siamfuse-synth",
        description="Write a synthetic T1w + FDG-PET BIDS cohort with known ground truth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="folder to write the dataset into")
    parser.add_argument("--n-per-group", type=int, default=5, help="subjects per group")
    parser.add_argument(
        "--groups",
        nargs="+",
        default=["CN", "MCIs", "MCIc", "AD"],
        choices=list(STAGES),
        help="groups to simulate",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--effect-size",
        type=float,
        default=1.0,
        help="scales every disease effect (0: no group difference)",
    )
    parser.add_argument("--tracer", default="FDG", help="trc- label of the PET files")
    parser.add_argument(
        "--pet-frames", type=int, default=1, help="frames per PET (1: static 3-D image)"
    )
    parser.add_argument(
        "--frame-duration", type=float, default=300.0, help="seconds per frame of a dynamic PET"
    )
    parser.add_argument(
        "--two-session-fraction",
        type=float,
        default=0.25,
        help="share of subjects with a second session",
    )
    parser.add_argument(
        "--no-sessions", action="store_true", help="write a dataset without ses- folders"
    )
    parser.add_argument(
        "--preprocessed",
        action="store_true",
        help="also write the derivatives of a perfect participant run",
    )
    parser.add_argument(
        "--skip-raw",
        action="store_true",
        help="with --preprocessed: write participants.tsv and the derivatives "
        "but no raw images (fast; for group-level tests and benchmarks)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="subjects generated in parallel",
    )
    parser.add_argument(
        "--effect",
        choices=["ad", "coupling", "nonlinear", "none"],
        default=None,
        help="realistic benchmark cohort with this effect family (per-subject anatomy, PSF, "
        "noise, age/sex; see docs/benchmarks.md); without it the original generator runs",
    )
    parser.add_argument(
        "--sites",
        type=int,
        default=0,
        help="with --effect: number of sites with their own GM/PET scale, offset and PSF "
        "(0 or 1: none); the site goes to participants.tsv",
    )
    parser.add_argument(
        "--regions-only",
        action="store_true",
        help="with --effect --preprocessed: write the region files but not the MNI maps",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.pet_frames < 1:
        print("bids_siamfuse-synth: error: --pet-frames must be 1 or more", file=sys.stderr)
        return UsageError.exit_code
    t0 = time.time()
    try:
        out = generate(
            args.out,
            n_per_group=args.n_per_group,
            groups=args.groups,
            seed=args.seed,
            effect_size=args.effect_size,
            tracer=args.tracer,
            pet_frames=args.pet_frames,
            frame_duration=args.frame_duration,
            two_session_fraction=args.two_session_fraction,
            sessions=not args.no_sessions,
            preprocessed=args.preprocessed,
            raw=not args.skip_raw,
            jobs=args.jobs,
            effect=args.effect,
            sites=args.sites,
            regions_only=args.regions_only,
        )
    except SiamFuseError as exc:
        print(f"bids_siamfuse-synth: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not args.quiet:
        print(f"wrote {out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
