"""The template-derived head model and the original generator's subjects (no ``--effect``).

Anatomy on the ICBM152 1 mm template grid, scaled per AAL region by normal variation, age and
the planted disease effects (:data:`EFFECTS`), and the head around it (CSF rim, skull, scalp,
neck) on the extended grid of :mod:`bids_siamfuse.synth.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..data.templates import load_template
from ..errors import SiamFuseError
from .geometry import (
    EXT_ORIGIN,
    EXT_SHAPE,
    WARP_SHAPE,
    _affine,
    grid_points,
    interpolate,
    sample,
)

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
FDG_TISSUE = {"GM": 3.5, "WM": 1.0, "CSF": 0.05}
#: Layers of the head outside the brain: (T1w intensity, FDG uptake).
HEAD_LAYERS = {
    "rim": (180.0, 0.05),
    "skull": (60.0, 0.1),
    "scalp": (650.0, 0.4),
    "muscle": (420.0, 0.5),
    "fat": (760.0, 0.2),
    "cord": (620.0, 0.8),
    "bone": (280.0, 0.3),
}

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
    #: template-grid box holding every voxel with GM plus the smoothing radius (see
    #: :func:`_smoothed_factor`), as slices
    gm_box: tuple = ()


_HEAD: HeadModel | None = None


def head_model() -> HeadModel:
    global _HEAD
    if _HEAD is None:
        _HEAD = _build_head_model()
    return _HEAD


def _build_head_model() -> HeadModel:
    import nibabel as nb

    from ..data.atlas import fetch_aal_files

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
    # = map_coordinates(dist2, fine, order=1, mode="nearest", output=np.float32), bit for bit
    dist = interpolate([dist2], fine, nearest_edge=True)[0].reshape(EXT_SHAPE)
    dist[brain] = 0.0
    del fine
    layer = np.zeros(EXT_SHAPE, dtype=np.uint8)  # 0 air, then HEAD_LAYERS in order
    codes = {name: i + 1 for i, name in enumerate(HEAD_LAYERS)}
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

    def layered(column):
        lut = np.array([0.0] + [v[column] for v in HEAD_LAYERS.values()], dtype=np.float32)
        return ndimage.gaussian_filter(lut[layer], 0.7, truncate=3.0)

    t1_head = layered(0)
    fdg_head = layered(1)

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
    where = np.nonzero(gm)
    radius = _FACTOR_RADIUS
    gm_box = tuple(
        slice(max(0, int(w.min()) - radius), min(n, int(w.max()) + 1 + radius))
        for w, n in zip(where, gm.shape)
    )
    return HeadModel(gm, wm, csf, aff, offset, t1_head, fdg_head, aal, tuple(names), gm_box)


_FACTOR_SIGMA, _FACTOR_TRUNCATE = 1.5, 2.0
_FACTOR_RADIUS = int(_FACTOR_TRUNCATE * _FACTOR_SIGMA + 0.5)  # scipy's kernel radius: 3 voxels


def _smoothed_factor(head: HeadModel, factor) -> np.ndarray:
    """``gaussian_filter(factor[head.aal], 1.5, truncate=2.0)`` (float32) where it is used.

    The factor maps only ever multiply the GM (zero outside ``head.gm_box``): filtering the box
    alone gives the same values, bit for bit, at every voxel at least one kernel radius inside
    it (scipy's separable filter reads a 7-voxel window per axis), i.e. wherever there is GM;
    outside the box the map is 1 (it multiplies zeros). Half the template grid, half the time.
    """
    lut = factor.astype(np.float32)
    out = np.ones(head.aal.shape, dtype=np.float32)
    box = head.gm_box
    out[box] = ndimage.gaussian_filter(
        lut[head.aal[box]], _FACTOR_SIGMA, truncate=_FACTOR_TRUNCATE
    )
    return out


# ----------------------------------------------------------------------------------------------
# Subject parameters and maps
# ----------------------------------------------------------------------------------------------


def region_stem(name: str) -> str:
    """An AAL name without its hemisphere (``Hippocampus_L`` -> ``Hippocampus``)."""
    return name.rsplit("_", 1)[0] if name.endswith(("_L", "_R")) else name


def effect_weights(names) -> tuple[np.ndarray, np.ndarray]:
    """Atrophy and hypometabolism weight per region (index 0 = background)."""
    atrophy = np.zeros(len(names) + 1)
    hypo = np.zeros(len(names) + 1)
    for index, name in enumerate(names, start=1):
        stem = region_stem(name)
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


def subject_maps(
    head: HeadModel, gm_factor, met_factor, texture=None, fdg_tissue=FDG_TISSUE
) -> dict:
    """The subject's MNI-space tissue maps (template grid) and head images (extended grid).

    ``gm_factor``, ``met_factor``: per region (index 0 = outside the atlas), smoothed across
    region borders; ``texture``: optional (GM, metabolism) relative modulations on the template
    grid (the ``--effect`` families' within-region heterogeneity).
    """
    gm_fac = _smoothed_factor(head, gm_factor)
    met_fac = _smoothed_factor(head, met_factor)
    room = head.gm + head.csf
    gm = head.gm * gm_fac
    if texture is not None:
        gm = gm * (1.0 + texture[0])
    gm = np.minimum(gm, room)
    csf = room - gm
    wm = head.wm
    sl = tuple(slice(o, o + s) for o, s in zip(head.offset, gm.shape))
    outside = np.clip(1.0 - (gm + wm + csf), 0.0, 1.0)
    uptake = gm * met_fac
    if texture is not None:
        uptake = uptake * (1.0 + texture[1])
    # a * ka + wm * kw + csf * kc + outside * head, left to right in float32 as written before,
    # into two buffers instead of seven temporaries of the template's size
    term = np.empty_like(gm)

    def mix(first, k_first, k_wm, k_csf, head_image):
        out = head_image.copy()
        acc = np.multiply(first, np.float32(k_first))
        acc += np.multiply(wm, np.float32(k_wm), out=term)
        acc += np.multiply(csf, np.float32(k_csf), out=term)
        acc += np.multiply(outside, out[sl], out=term)
        out[sl] = acc
        return out

    t1 = mix(gm, T1_TISSUE["GM"], T1_TISSUE["WM"], T1_TISSUE["CSF"], head.t1_head)
    fdg = mix(uptake, fdg_tissue["GM"], fdg_tissue["WM"], fdg_tissue["CSF"], head.fdg_head)
    return {"gm": gm, "wm": wm, "csf": csf, "t1": t1, "fdg": fdg}


def smoothed_uptake(fdg_ext: np.ndarray, fwhm_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Uptake averaged to 2 mm and smoothed to the scanner's resolution; (data, affine)."""
    nx, ny, nz = (n // 2 for n in fdg_ext.shape)
    trimmed = fdg_ext[: 2 * nx, : 2 * ny, : 2 * nz]
    coarse = trimmed.reshape(nx, 2, ny, 2, nz, 2).mean(axis=(1, 3, 5))
    sigma = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / 2.0
    aff = _affine(EXT_ORIGIN + 0.5, 2.0)
    return ndimage.gaussian_filter(coarse, sigma, mode="constant"), aff
