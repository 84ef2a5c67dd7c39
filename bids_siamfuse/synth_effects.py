"""Realistic benchmark cohorts for :mod:`bids_siamfuse.synth` (``--effect``).

``bids_siamfuse-synth OUT --effect ad|coupling|nonlinear|none`` builds subjects that differ the
way real ones do, and plants one *family* of diagnostic effect whose answer is written to
``derivatives/synth-truth``. Without ``--effect`` the generator keeps its original (linear,
template-anatomy) behaviour, which the test fixtures rely on.

Every family shares the same model of normal variation (parameters and sources in
``docs/benchmarks.md``, "Benchmark cohorts"):

Anatomy
    A smooth random diffeomorphic deformation per subject (a stationary velocity field on the
    5 mm warp grid, exponentiated by scaling and squaring; its Jacobian is the modulation) and a
    head-size scale (sex difference and spread from Ruigrok et al. 2014); per-subject, per-region
    GM and FDG deviations (latents ``g``, ``p``) with a natural positive correlation.
Pipeline residuals (``--preprocessed``)
    What a participant run leaves in MNI-space maps: a registration residual (a small smooth
    displacement, mostly the subject's own, a little per session), segmentation-like noise on
    GM (smooth multiplicative plus voxel noise at tissue borders), a PET scanner PSF of 6-8 mm
    FWHM, PET noise, a small PET-to-T1w coregistration error, and the pipeline's own intensity
    normalization and region writer.
Covariates
    Age (GM -0.4 %/year; FDG -0.3 %/year in frontal, cingulate and insular regions and
    -0.1 %/year elsewhere), sex (through head size), longitudinal sessions 1-2.5 years apart
    (age change, and for ``ad`` the disease progressing), optional sites (``--sites``: a GM
    scale/offset, a PET scale/offset and the site's PSF), recorded in ``participants.tsv``.

Families (``--effect-size`` scales each; MCI groups get the fraction :data:`STAGES` of it)
    ``ad``: atrophy and hypometabolism in the AD pattern (:data:`AD_PATTERN`).
    ``coupling``: only the GM-PET relation changes with the diagnosis: in the planted regions
    the latents are correlated +0.6 in CN and -0.6 in AD with unchanged variances, so each
    modality's per-class distribution is the same.
    ``nonlinear``: the within-region heterogeneity (a smooth zero-mean texture of GM and
    metabolism) grows with the diagnosis while every region's mean stays the same: no linear
    model on region means (nor on voxels: the texture's phase is random) can use it.
    ``none``: no effect at all.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .bids import save_json, save_output
from .data.templates import GRID_AFFINE, GRID_SHAPE, grid_image

FAMILIES = ("ad", "coupling", "nonlinear", "none")

#: Disease stage per group for the realistic families (fraction of the full AD effect):
#: hippocampal loss in MCI is about half of AD's (Shi et al. 2009), more in converters.
STAGES = {"CN": 0.0, "MCIs": 0.3, "MCIc": 0.65, "AD": 1.0}
MMSE = {"CN": (29.0, 1.0), "MCIs": (27.2, 2.0), "MCIc": (26.0, 2.5), "AD": (22.5, 3.0)}
AGE = (73.5, 6.5)  # one distribution for every group: age must not tell the class
AGE_RANGE = (55.0, 90.0)
AGE_CENTER = 73.5

#: AD pattern: AAL stem -> (GM loss, intrinsic FDG loss) at the full AD stage, effect size 1.
#: The measured PET loss adds the partial-volume share of the atrophy (PET follows GM).
AD_PATTERN = {
    "Hippocampus": (0.26, 0.06),
    "ParaHippocampal": (0.20, 0.08),
    "Amygdala": (0.25, 0.03),
    "Temporal_Inf": (0.12, 0.12),
    "Temporal_Mid": (0.10, 0.12),
    "Fusiform": (0.08, 0.06),
    "Cingulum_Post": (0.08, 0.18),
    "Precuneus": (0.08, 0.15),
    "Angular": (0.08, 0.17),
    "Parietal_Inf": (0.06, 0.15),
}
#: Regions planted by ``coupling`` and ``nonlinear``: the AD core (both hemispheres).
CORE = (
    "Hippocampus",
    "ParaHippocampal",
    "Amygdala",
    "Temporal_Inf",
    "Temporal_Mid",
    "Cingulum_Post",
    "Precuneus",
    "Angular",
)
SEVERITY_SD = 0.3  # spread of the disease effect inside a group (relative)
PROGRESSION = 0.15  # stage units per year: hippocampus +3 %/yr beyond ageing in AD (Barnes 2009)

GM_SD = 0.08  # per-region natural spread of GM (relative, head size apart)
PET_SD = 0.11  # per-region natural spread of the GM uptake: ~7 % in the regional means
NATURAL_RHO = 0.3  # natural GM-PET correlation of the regional latents
COUPLING_RHO = 0.6  # |correlation| in the planted regions of ``coupling`` (CN +, AD -)
TEXTURE_BASE = 0.05  # within-region heterogeneity (SD, relative) of everybody
TEXTURE_GAIN = 0.20  # added at the full AD stage (``nonlinear``)
TEXTURE_SIGMA_MM = 4.0  # FWHM ~9 mm: part of it survives the PET PSF

GM_AGE_SLOPE = 0.004  # per year (Fjell & Walhovd 2010; Raz et al. 2005)
FDG_AGE_SLOPE = {"frontal": 0.003, "other": 0.001}  # per year (Kalpouzos et al. 2009)
FDG_AGE_FRONTAL = ("Frontal", "Cingulum_Ant", "Cingulum_Mid", "Insula", "Rectus", "Olfactory")
HEAD_SCALE_SEX = {"M": 1.019, "F": 0.981}  # linear: ICV ratio 1.12 (Ruigrok et al. 2014)
HEAD_SCALE_SD = 0.03  # linear; ICV SD ~9 %

WARP_MAX_MM = (3.0, 6.0)  # subject deformation, maximum displacement
RESIDUAL_RMS_MM = 1.5  # registration residual of the subject (Klein et al. 2009)
RESIDUAL_SESSION_RMS_MM = 0.4
RESIDUAL_SIGMA_MM = 4.5
COREG_ERROR = (1.0, 1.0)  # PET-to-T1w: degrees, mm (SD per axis)
SEG_MULT_SD = 0.06  # smooth multiplicative segmentation noise
SEG_ADD_SD = 0.05  # voxel noise at tissue borders (weighted by 4 p (1 - p))
PET_FWHM_MM = (6.0, 8.0)
PET_NOISE = 0.06  # relative noise SD at GM uptake, correlated over ~3 mm
FDG_TISSUE = {"GM": 3.5, "WM": 1.0, "CSF": 0.05}
SITE_SD = {"gm_scale": 0.04, "gm_offset": 0.01, "pet_scale": 0.03, "pet_offset": 0.02}

_COARSE = tuple((n + 1) // 2 for n in GRID_SHAPE)  # 3 mm grid: index 2k = fine index k


@dataclass(frozen=True)
class EffectSettings:
    family: str
    effect_size: float = 1.0
    sites: int = 0
    regions_only: bool = False


def _stem(name: str) -> str:
    return name.rsplit("_", 1)[0] if name.endswith(("_L", "_R")) else name


def region_table(names, family: str, effect_size: float = 1.0):
    """Per region: planted flag and the family's weights (the truth's ``regions.tsv``)."""
    import pandas as pd

    rows = []
    for index, name in enumerate(names, start=1):
        stem = _stem(name)
        gm_loss, fdg_loss = AD_PATTERN.get(stem, (0.0, 0.0))
        core = stem in CORE
        row = {"index": index, "name": name, "atrophy_weight": 0.0, "hypometabolism_weight": 0.0}
        if family == "ad":
            row["atrophy_weight"] = gm_loss * effect_size
            row["hypometabolism_weight"] = fdg_loss * effect_size
            row["planted"] = bool(gm_loss > 0 or fdg_loss > 0)
        else:
            row["planted"] = bool(core) and family in ("coupling", "nonlinear")
        row["coupling_rho_cn"] = COUPLING_RHO if family == "coupling" and core else NATURAL_RHO
        row["coupling_rho_ad"] = (
            _rho(1.0, effect_size) if family == "coupling" and core else NATURAL_RHO
        )
        row["texture_sd_cn"] = TEXTURE_BASE
        row["texture_sd_ad"] = (
            TEXTURE_BASE + TEXTURE_GAIN * effect_size
            if family == "nonlinear" and core
            else TEXTURE_BASE
        )
        row["effect_family"] = family
        rows.append(row)
    return pd.DataFrame(rows)


def _rho(stage: float, effect_size: float) -> float:
    return float(np.clip(COUPLING_RHO * (1.0 - 2.0 * stage * effect_size), -0.95, 0.95))


# ----------------------------------------------------------------------------------------------
# Template on the output grid (built once per process, shared with forked workers)
# ----------------------------------------------------------------------------------------------


@dataclass
class GridModel:
    tissue: np.ndarray  # (3, X, Y, Z) template GM, WM, CSF on the grid
    labels: np.ndarray  # AAL 0..116 on the grid (the region writer's atlas)
    names: tuple
    stems: tuple
    index: np.ndarray  # flat grid index of the voxels worked on (brain, dilated 6 mm)
    position: np.ndarray  # (3, N) their voxel coordinates


@functools.lru_cache(maxsize=1)
def grid_model() -> GridModel:
    from .data.atlas import load_atlas
    from .data.templates import load_template
    from .synth import apply_affine, grid_points

    tissue = []
    pts = grid_points(GRID_SHAPE, GRID_AFFINE)
    for kind in ("GM", "WM", "CSF"):
        img = load_template(kind)
        vox = apply_affine(np.linalg.inv(img.affine), pts)
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        tissue.append(
            ndimage.map_coordinates(data, vox, order=1, prefilter=False, output=np.float32)
        )
    atlas = load_atlas()
    # cached here so that forked workers inherit them: the PET normalization's mask and the
    # region writer's layout
    from .data.templates import grid_brain_mask
    from .preproc.regions import atlas_layout

    grid_brain_mask()
    atlas_layout()
    tissue = np.stack(tissue).reshape(3, *GRID_SHAPE)
    # only the brain and a margin wider than the residual displacement is computed: 35 % of
    # the grid (the rest holds no tissue), which makes a session ~3x cheaper
    work = ndimage.binary_dilation(tissue.sum(0) > 0.01, iterations=4)
    index = np.flatnonzero(work)
    return GridModel(
        tissue=tissue,
        labels=np.asarray(atlas.labels, dtype=np.int64),
        names=tuple(atlas.names),
        stems=tuple(_stem(n) for n in atlas.names),
        index=index,
        position=np.stack(np.unravel_index(index, GRID_SHAPE)).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------
# Random fields
# ----------------------------------------------------------------------------------------------


def smooth_field(rng, shape, sigma_cells, channels=1) -> np.ndarray:
    """Unit-SD smooth Gaussian noise (channels, *shape)."""
    noise = rng.standard_normal((channels, *shape), dtype=np.float32)
    out = np.stack([ndimage.gaussian_filter(c, sigma_cells, mode="wrap") for c in noise])
    out /= out.std(axis=tuple(range(1, out.ndim)), keepdims=True) + 1e-12
    return out


def upsample(coarse: np.ndarray) -> np.ndarray:
    """(C, *_COARSE) on the 3 mm grid -> (C, *GRID_SHAPE), trilinear (index 2k -> k)."""
    import torch

    with torch.no_grad():
        fine = torch.nn.functional.interpolate(
            torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[None],
            size=tuple(2 * (n - 1) + 1 for n in _COARSE),
            mode="trilinear",
            align_corners=True,
        )[0]
    return np.ascontiguousarray(fine.numpy()[:, : GRID_SHAPE[0], : GRID_SHAPE[1], : GRID_SHAPE[2]])


def exponentiate(velocity: np.ndarray, spacing: float, steps: int = 6) -> np.ndarray:
    """Displacement (mm) of exp(v) by scaling and squaring; ``velocity`` (*shape, 3) in mm."""
    disp = velocity / 2.0**steps
    shape = disp.shape[:3]
    idx = np.indices(shape, dtype=np.float32)
    for _ in range(steps):  # phi <- phi o phi: u(x) + u(x + u(x))
        pos = idx + np.moveaxis(disp, -1, 0) / spacing
        moved = np.stack(
            [
                ndimage.map_coordinates(disp[..., i], pos, order=1, mode="nearest")
                for i in range(3)
            ],
            -1,
        )
        disp = disp + moved
    return disp.astype(np.float32)


def jacobian_determinant(disp: np.ndarray, spacing: float) -> np.ndarray:
    grads = [np.gradient(disp[..., i], spacing) for i in range(3)]
    jac = np.empty((*disp.shape[:3], 3, 3), dtype=np.float32)
    for i in range(3):
        for j in range(3):
            jac[..., i, j] = grads[i][j] + (1.0 if i == j else 0.0)
    return np.linalg.det(jac)


# ----------------------------------------------------------------------------------------------
# One subject
# ----------------------------------------------------------------------------------------------


def draw_covariates(spec, settings: EffectSettings, names) -> dict:
    """The subject's covariates, disease and regional latents (cheap: no fields).

    Drawn from the subject's own generator, which then goes on to the session poses.
    """
    rng = np.random.default_rng([spec.seed, spec.index, 1201])
    family, es = settings.family, settings.effect_size
    stage = STAGES[spec.group] if family != "none" else 0.0
    n = len(names)
    age = float(np.clip(rng.normal(*AGE), *AGE_RANGE))
    sex = str(rng.choice(["M", "F"]))
    mmse = int(np.clip(round(rng.normal(*MMSE[spec.group])), 10, 30))
    head_scale = HEAD_SCALE_SEX[sex] * float(np.clip(rng.normal(1.0, HEAD_SCALE_SD), 0.9, 1.1))
    # drawn for everybody, so that a subject's other draws do not depend on its group
    severity = float(np.clip(rng.normal(1.0, SEVERITY_SD), 0.3, 1.8)) * (stage > 0)
    site = int(rng.integers(settings.sites)) if settings.sites > 1 else 0
    # regional latents: natural variation, and the coupling family's planted relation
    core = np.array([_stem(x) in CORE for x in names])
    rho = np.full(n, NATURAL_RHO)
    if family == "coupling":
        rho[core] = _rho(stage, es)
    z1, z2 = rng.standard_normal(n), rng.standard_normal(n)
    g = GM_SD * z1
    p = PET_SD * (rho * z1 + np.sqrt(1.0 - rho**2) * z2)
    texture_sd = np.full(n, TEXTURE_BASE)
    if family == "nonlinear":
        texture_sd[core] = TEXTURE_BASE + TEXTURE_GAIN * stage * es
    return {
        "rng": rng,
        "stage": stage,
        "age": round(age, 1),
        "sex": sex,
        "mmse": mmse,
        "head_scale": head_scale,
        "severity": severity,
        "site": site,
        "g": g,
        "p": p,
        "rho": rho,
        "texture_sd": texture_sd,
        "interval": float(rng.uniform(1.0, 2.5)),
    }


def draw_anatomy(spec) -> dict:
    """The subject's deformation, registration residual and texture seed (own generator)."""
    from .synth import WARP_SHAPE, WARP_SPACING

    rng = np.random.default_rng([spec.seed, spec.index, 1204])
    # a smooth stationary velocity field, exponentiated: a diffeomorphism by construction;
    # the check on the Jacobian guards the discretization
    warp_max = float(rng.uniform(*WARP_MAX_MM))
    for _attempt in range(5):
        v = np.moveaxis(smooth_field(rng, WARP_SHAPE, 2.5, 3), 0, -1)
        v *= warp_max / np.linalg.norm(v, axis=-1).max()
        warp = exponentiate(v, WARP_SPACING)
        det = jacobian_determinant(warp, WARP_SPACING)
        if det.min() > 0.2:
            break
        warp_max *= 0.7
    # the registration residual (subject part), in voxels of the output grid
    residual = smooth_field(rng, _COARSE, RESIDUAL_SIGMA_MM / 3.0, 3)
    residual *= RESIDUAL_RMS_MM / np.sqrt(3.0) / 1.5
    return {
        "warp": warp,
        "warp_max_mm": float(np.linalg.norm(warp, axis=-1).max()),
        "warp_min_jacobian": float(det.min()),
        "residual": residual.astype(np.float32),
        "texture_seed": int(rng.integers(2**31)),
    }


def draw_subject(spec, settings: EffectSettings, names) -> dict:
    """Everything random about one subject that is not image noise."""
    return {**draw_covariates(spec, settings, names), **draw_anatomy(spec)}


def session_factors(subj: dict, settings: EffectSettings, names, years: float):
    """(GM factor, metabolism factor) per region (index 0 = outside the atlas) at ``years``.

    ``p`` is the deviation of the observed (GM-weighted) uptake, so metabolism is
    ``(1 + p) / (1 + g)``: with the partial-volume effect the PET regional value moves by ``p``.
    """
    n = len(names)
    stems = [_stem(x) for x in names]
    age = subj["age"] + years
    gm = np.ones(n + 1)
    met = np.ones(n + 1)
    gm[1:] = 1.0 + subj["g"]
    met[1:] = (1.0 + subj["p"]) / (1.0 + subj["g"])
    gm *= 1.0 - GM_AGE_SLOPE * (age - AGE_CENTER)
    fdg_slope = np.array(
        [FDG_AGE_SLOPE["other"]]
        + [
            FDG_AGE_SLOPE["frontal"] if s.startswith(FDG_AGE_FRONTAL) else FDG_AGE_SLOPE["other"]
            for s in stems
        ]
    )
    met *= 1.0 - fdg_slope * (age - AGE_CENTER)
    if settings.family == "ad" and subj["stage"] > 0:
        load = settings.effect_size * (
            subj["stage"] * subj["severity"] + PROGRESSION * subj["stage"] * years
        )
        for i, s in enumerate(stems, start=1):
            gm_loss, fdg_loss = AD_PATTERN.get(s, (0.0, 0.0))
            gm[i] *= max(0.2, 1.0 - gm_loss * load)
            met[i] *= max(0.2, 1.0 - fdg_loss * load)
    return gm.astype(np.float32), met.astype(np.float32)


def site_parameters(seed: int, sites: int) -> list[dict]:
    rng = np.random.default_rng([seed, 1202])
    out = []
    for k in range(max(sites, 1)):
        if sites <= 1:
            out.append(
                {
                    "site": "site01",
                    "gm_scale": 1.0,
                    "gm_offset": 0.0,
                    "pet_scale": 1.0,
                    "pet_offset": 0.0,
                    "pet_fwhm_mm": None,
                }
            )
            continue
        out.append(
            {
                "site": f"site{k + 1:02d}",
                "gm_scale": float(rng.normal(1.0, SITE_SD["gm_scale"])),
                "gm_offset": float(rng.normal(0.0, SITE_SD["gm_offset"])),
                "pet_scale": float(rng.normal(1.0, SITE_SD["pet_scale"])),
                "pet_offset": float(rng.normal(0.0, SITE_SD["pet_offset"])),
                "pet_fwhm_mm": float(rng.uniform(*PET_FWHM_MM)),
            }
        )
    return out


def _sample(volumes: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Channels of ``volumes`` (C, X, Y, Z) at voxel positions ``pos`` (3, N), trilinear."""
    import torch

    size = np.array(volumes.shape[1:], dtype=np.float32).reshape(3, 1)
    norm = 2.0 * pos / (size - 1.0) - 1.0
    grid = torch.from_numpy(np.ascontiguousarray(norm[::-1].T))[None, None, None]
    with torch.no_grad():
        out = torch.nn.functional.grid_sample(
            torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))[None],
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )[0, :, 0, 0]
    return out.numpy()


def subject_texture(subj: dict, model: GridModel) -> np.ndarray:
    """The subject's texture fields, (4, grid): unit SD, zero GM-weighted mean per region.

    Channels 0 and 1 (GM, metabolism) scaled by ``TEXTURE_BASE`` are everybody's within-region
    heterogeneity; channels 2 and 3 carry the ``nonlinear`` family's extra texture
    (:func:`add_texture`). Cached in ``subj``.
    """
    if "texture_fields" in subj:
        return subj["texture_fields"]
    rng = np.random.default_rng(subj["texture_seed"])
    fields = upsample(smooth_field(rng, _COARSE, TEXTURE_SIGMA_MM / 3.0, 4))
    labels = model.labels.reshape(-1)
    weight = model.tissue[0].reshape(-1).astype(np.float64)
    for f in fields:
        _remove_region_means(f.reshape(-1), labels, weight)
    subj["texture_fields"] = fields
    return fields


def _remove_region_means(flat: np.ndarray, labels: np.ndarray, weight) -> None:
    """Subtract from ``flat`` (in place) its ``weight``-weighted mean in every label."""
    count = int(labels.max()) + 1
    wsum = np.bincount(labels, weights=weight, minlength=count)
    mean = np.bincount(labels, weights=weight * flat, minlength=count)
    flat -= (mean / np.where(wsum > 0, wsum, 1.0)).astype(np.float32)[labels]


def add_texture(image: np.ndarray, field: np.ndarray, sd_per_region, labels) -> np.ndarray:
    """``image x (1 + sd x t)`` with ``t`` made zero-mean per region under weights ``image``.

    Every atlas region's mean of the result equals the image's (to float precision): the
    ``nonlinear`` family's texture is added to the final maps, after the PET normalization,
    whose top-0.1 % mean would otherwise turn more heterogeneity into a lower global PET level.
    """
    flat_labels = labels.reshape(-1)
    t = field.reshape(-1).astype(np.float32).copy()
    _remove_region_means(t, flat_labels, image.reshape(-1).astype(np.float64))
    gain = np.asarray(sd_per_region, dtype=np.float32)[flat_labels]
    out = image.reshape(-1) * (1.0 + gain * t)
    return np.maximum(out, 0.0).reshape(image.shape).astype(np.float32)


def grid_modulation(mapping) -> np.ndarray:
    """The modulation factor (inverse Jacobian of the subject's native->MNI map) on the grid."""
    from .synth import grid_points

    coarse_aff = GRID_AFFINE.copy()
    coarse_aff[:3, :3] *= 2.0
    jac = mapping.inverse_jacobian(grid_points(_COARSE, coarse_aff)).reshape(_COARSE)
    return upsample(jac[None])[0]


def session_maps(
    subj: dict,
    settings: EffectSettings,
    years: float,
    jac: np.ndarray,
    site: dict,
    noise_rng,
    fwhm: float,
) -> dict:
    """wc1, mwc1 and the normalized PET on the grid for one session, with their truth."""
    from .preproc.pet import normalize
    from .synth import rigid

    model = grid_model()
    idx = model.index
    gm_f, met_f = session_factors(subj, settings, model.names, years)
    texture = subject_texture(subj, model)[:2] * TEXTURE_BASE
    # smooth random fields of the session, drawn at 3 mm and interpolated together
    session_residual = smooth_field(noise_rng, _COARSE, RESIDUAL_SIGMA_MM / 3.0, 3)
    session_residual *= RESIDUAL_SESSION_RMS_MM / np.sqrt(3.0) / 1.5
    seg = smooth_field(noise_rng, _COARSE, 0.7, 1) * SEG_MULT_SD
    pet_noise = smooth_field(noise_rng, _COARSE, 0.5, 1)
    fields = upsample(np.concatenate([subj["residual"] + session_residual, seg, pet_noise]))
    fields = fields.reshape(len(fields), -1)[:, idx]
    # where the subject's anatomy sits: the grid voxel plus the registration residual
    pos = model.position + fields[:3]
    painted = np.concatenate(
        [model.tissue, gm_f[model.labels][None], met_f[model.labels][None], texture]
    )
    gm_t, wm_t, csf_t, gmf, metf, tex_g, tex_p = _sample(painted, pos)
    room = gm_t + csf_t
    gm_true = np.minimum(gm_t * gmf * (1.0 + tex_g), room)
    # segmentation-like noise: smooth gain errors plus voxel noise at tissue borders
    border = 4.0 * gm_true * (1.0 - np.clip(gm_true, 0.0, 1.0))
    voxel = noise_rng.standard_normal(len(idx), dtype=np.float32) * SEG_ADD_SD
    gm_obs = np.clip(gm_true * (1.0 + fields[3]) + voxel * border, 0.0, 1.0)
    gm_obs = np.clip(gm_obs * site["gm_scale"] + site["gm_offset"] * (gm_obs > 0.05), 0.0, 1.0)
    wc1 = np.zeros(GRID_SHAPE, dtype=np.float32)
    wc1.reshape(-1)[idx] = gm_obs
    mwc1 = (wc1 * jac).astype(np.float32)
    # PET: tissue uptake, the scanner PSF, a small PET-to-T1w coregistration error
    # (rigid; it commutes with the isotropic PSF, so it is applied to the blurred image), noise
    uptake = np.zeros(GRID_SHAPE, dtype=np.float32)
    uptake.reshape(-1)[idx] = (
        FDG_TISSUE["GM"] * gm_true * metf * (1.0 + tex_p)
        + FDG_TISSUE["WM"] * wm_t
        + FDG_TISSUE["CSF"] * (room - gm_true)
    )
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / 1.5
    blurred = ndimage.gaussian_filter(uptake, sigma, mode="constant", truncate=3.0)
    angles = noise_rng.normal(0.0, COREG_ERROR[0], 3)
    shift = noise_rng.normal(0.0, COREG_ERROR[1], 3) / 1.5
    coreg = rigid(angles, shift, (np.array(GRID_SHAPE) - 1) / 2.0)
    pos_pet = coreg[:3, :3].astype(np.float32) @ model.position + coreg[:3, 3:4].astype(np.float32)
    seen = _sample(blurred[None], pos_pet)[0]
    ref = FDG_TISSUE["GM"]
    seen = seen + PET_NOISE * np.sqrt(ref * np.maximum(seen, 0.0)) * fields[4]
    pet = np.zeros(GRID_SHAPE, dtype=np.float32)
    pet.reshape(-1)[idx] = np.maximum(seen, 0.0)
    pet_norm, value, description = normalize(pet, "none")
    pet_norm = pet_norm * site["pet_scale"] + site["pet_offset"] * (pet_norm > 0)
    pet_norm = np.maximum(pet_norm, 0.0).astype(np.float32)
    extra = np.r_[0.0, subj["texture_sd"] - TEXTURE_BASE]
    if extra.max() > 0:  # the nonlinear family: more heterogeneity, same region means
        fields = subject_texture(subj, model)
        wc1 = add_texture(wc1, fields[2], extra, model.labels)
        mwc1 = add_texture(mwc1, fields[2], extra, model.labels)
        # the metabolism texture as the scanner sees it: through the PSF, back to unit SD
        seen_t = ndimage.gaussian_filter(fields[3], sigma, mode="constant", truncate=3.0)
        seen_t /= seen_t.reshape(-1)[idx].std() + 1e-12
        pet_norm = add_texture(pet_norm, seen_t, extra, model.labels)
    return {
        "wc1": wc1,
        "mwc1": mwc1,
        "pet": pet_norm,
        "norm_value": value,
        "norm_description": description,
        "gm_factor": gm_f,
        "pet_factor": met_f,
        "coreg_error": coreg,
    }


def make_subject(spec, opts) -> dict:
    """Generate and write every session of one subject (the ``--effect`` path of synth)."""
    from . import synth

    t0 = time.time()
    settings: EffectSettings = opts.effect
    model = grid_model()
    subj = draw_subject(spec, settings, model.names)
    rng = subj["rng"]
    sites = site_parameters(spec.seed, settings.sites)
    site = sites[subj["site"]]
    out = opts.out
    truth_root = out / "derivatives" / "synth-truth"
    warp_path = truth_root / f"sub-{spec.label}" / f"sub-{spec.label}_desc-warp_xfm.nii.gz"
    synth._save_warp(warp_path, subj["warp"])
    size = subj["head_scale"] * np.ones(3)
    rows, factors = [], []
    for s_index, session in enumerate(spec.sessions):
        years = 0.0 if s_index == 0 else subj["interval"] * s_index
        noise_rng = np.random.default_rng([spec.seed, spec.index, s_index, 1203])
        angles = rng.uniform(-10.0, 10.0, 3)
        shift = rng.uniform(-10.0, 10.0, 3)
        A = np.eye(4)
        A[:3, :3] = synth.rotation(angles) @ np.diag(1.0 / size)
        A[:3, 3] = shift
        mapping = synth.Mapping(A=A, warp=subj["warp"])
        fwhm = site["pet_fwhm_mm"]
        fwhm = (
            float(rng.uniform(*PET_FWHM_MM))
            if fwhm is None
            else float(np.clip(fwhm + rng.normal(0.0, 0.25), *PET_FWHM_MM))
        )
        jac = grid_modulation(mapping)
        maps = session_maps(subj, settings, years, jac, site, noise_rng, fwhm)
        prefix = synth._prefix(spec.label, session)
        truth_anat = synth._session_dir(truth_root, spec.label, session, "anat")
        if opts.raw:
            _write_raw(spec, session, opts, subj, maps, mapping, rng, noise_rng, fwhm, truth_anat)
        truth = {
            "subject": spec.label,
            "session": session,
            "group": spec.group,
            "effect_family": settings.family,
            "years_since_baseline": years,
            "age": subj["age"] + years,
            "native_to_prewarp_affine": A.tolist(),
            "warp_file": os.path.relpath(warp_path, truth_anat),
            "warp_convention": (
                "MNI = z + u(z), z = A @ native (RAS mm); u trilinear on the warp file's grid "
                "(edge values extend outside it)"
            ),
            "warp_max_displacement_mm": subj["warp_max_mm"],
            "warp_min_jacobian": subj["warp_min_jacobian"],
            "head_scale": subj["head_scale"],
            "registration_residual_rms_mm": RESIDUAL_RMS_MM,
            "pet_to_t1w_affine": np.eye(4).tolist(),
            "pet_coregistration_error_grid_voxels": maps["coreg_error"].tolist(),
            "pet_frame_motion": [np.eye(4).tolist()],
            "pet_fwhm_mm": fwhm,
            "site": site["site"],
            "gm_volume_modulated_mm3": float(maps["mwc1"].sum() * 1.5**3),
            "gm_volume_native_mm3": None,
        }
        if opts.raw and "pet_to_t1w" in maps:
            truth["pet_to_t1w_affine"] = maps["pet_to_t1w"].tolist()
            truth["gm_volume_native_mm3"] = maps.get("gm_volume_native")
            truth["pet_frame_motion"] = [m.tolist() for m in maps["pet_frame_motion"]]
        save_json(truth_anat / f"{prefix}_desc-truth_xfm.json", truth)
        if opts.preprocessed:
            _write_derivatives(out, spec, session, opts, maps, settings)
        rows.append(
            {"session": session, "acq_time": f"{2020 + s_index}-03-0{1 + s_index}T09:00:00"}
        )
        factors.append((session, maps["gm_factor"], maps["pet_factor"]))
        synth.LOGGER.info(
            "sub-%s%s: %.1f s", spec.label, f" ses-{session}" if session else "", time.time() - t0
        )
    return {
        "participant_id": f"sub-{spec.label}",
        "diagnosis": spec.group,
        "age": subj["age"],
        "sex": subj["sex"],
        "MMSE": subj["mmse"],
        "site": site["site"],
        "severity": subj["severity"],
        "atrophy_share": float("nan"),
        "stage": subj["stage"],
        "head_scale": subj["head_scale"],
        "warp_max_mm": subj["warp_max_mm"],
        "warp_min_jacobian": subj["warp_min_jacobian"],
        "gm_factor": factors[0][1][1:].tolist(),
        "pet_factor": factors[0][2][1:].tolist(),
        "session_factors": [(s, g[1:].tolist(), p[1:].tolist()) for s, g, p in factors],
        "gm_latent": subj["g"].tolist(),
        "pet_latent": subj["p"].tolist(),
        "rho": subj["rho"].tolist(),
        "texture_sd": subj["texture_sd"].tolist(),
        "sessions": rows,
    }


def _write_derivatives(out, spec, session, opts, maps, settings: EffectSettings):
    """The derivatives of a participant run, through the pipeline's own writers."""
    from .preproc import sidecars
    from .preproc.regions import write_region_outputs
    from .synth import _prefix

    deriv = out / "derivatives" / "bids_siamfuse"
    anat_src = {"subject": spec.label, "session": session}
    pet_src = {**anat_src, "tracer": opts.tracer}
    if opts.raw:
        ses_dir = f"ses-{session}/" if session else ""
        prefix = _prefix(spec.label, session)
        t1w_uri = f"bids:raw:sub-{spec.label}/{ses_dir}anat/{prefix}_T1w.nii.gz"
        pet_uri = f"bids:raw:sub-{spec.label}/{ses_dir}pet/{prefix}_trc-{opts.tracer}_pet.nii.gz"
        anat_sources, pet_sources = [t1w_uri], [pet_uri, t1w_uri]
    else:
        anat_sources = pet_sources = ["synthetic benchmark cohort"]
    method = (
        f"simulated participant run (bids_siamfuse-synth --effect {settings.family}: "
        "registration residual, segmentation noise, PET PSF and noise)"
    )
    if not settings.regions_only:
        for key, data, modulated in (
            ("gm_mni", maps["wc1"], False),
            ("gm_mni_modulated", maps["mwc1"], True),
        ):
            meta = sidecars.gm_mni_meta(anat_sources, modulated=modulated, method=method)
            save_output(deriv, key, grid_image(data), source=anat_src, meta=meta)
        meta = sidecars.pet_mni_meta(
            pet_sources,
            normalization=maps["norm_description"],
            value=maps["norm_value"],
            ref_region="none",
            method=method,
        )
        save_output(deriv, "pet_mni", grid_image(maps["pet"]), source=pet_src, meta=meta)
    write_region_outputs(
        deriv,
        maps["mwc1"],
        maps["pet"],
        anat_source=anat_src,
        pet_source=pet_src,
        sources=pet_sources,
    )


def head_maps_1mm(head, gm_factor, pet_factor, texture) -> dict:
    """The subject's tissue and image maps on the head model's 1 mm grids (raw images).

    As :func:`bids_siamfuse.synth.subject_maps`, with the session's regional factors and the
    subject's within-region texture (resampled from the output grid) multiplied in.
    """
    from .synth import T1_TISSUE, apply_affine, grid_points

    vox = apply_affine(
        np.linalg.inv(GRID_AFFINE), grid_points(head.gm.shape, head.template_affine)
    )
    tex = [
        ndimage.map_coordinates(t, vox, order=1, prefilter=False, output=np.float32).reshape(
            head.gm.shape
        )
        for t in texture
    ]
    del vox
    gm_fac = ndimage.gaussian_filter(gm_factor.astype(np.float32)[head.aal], 1.5, truncate=2.0)
    met_fac = ndimage.gaussian_filter(pet_factor.astype(np.float32)[head.aal], 1.5, truncate=2.0)
    room = head.gm + head.csf
    gm = np.minimum(head.gm * gm_fac * (1.0 + tex[0]), room)
    csf = room - gm
    wm = head.wm
    sl = tuple(slice(o, o + n) for o, n in zip(head.offset, gm.shape))
    outside = np.clip(1.0 - (gm + wm + csf), 0.0, 1.0)
    t1 = head.t1_head.copy()
    t1[sl] = (
        gm * T1_TISSUE["GM"] + wm * T1_TISSUE["WM"] + csf * T1_TISSUE["CSF"] + outside * t1[sl]
    )
    fdg = head.fdg_head.copy()
    fdg[sl] = (
        gm * met_fac * (1.0 + tex[1]) * FDG_TISSUE["GM"]
        + wm * FDG_TISSUE["WM"]
        + csf * FDG_TISSUE["CSF"]
        + outside * fdg[sl]
    )
    return {"gm": gm, "wm": wm, "csf": csf, "t1": t1, "fdg": fdg}


def _write_raw(spec, session, opts, subj, maps, mapping, rng, noise_rng, fwhm, truth_anat):
    """Native T1w and PET of the subject (the synth head model, with this subject's factors)."""
    from . import synth

    head = synth.head_model()
    params = {
        "uptake_scale": float(rng.uniform(4000.0, 8000.0)),
        "t1_gain": float(rng.uniform(0.6, 1.6)),
    }
    # raw images: the whole texture goes through the images (and the PSF, the normalization)
    model = grid_model()
    sd = np.r_[TEXTURE_BASE, subj["texture_sd"]].astype(np.float32)[model.labels]
    fields = subject_texture(subj, model)
    texture = [fields[0] * sd, fields[1] * sd]
    head_maps = head_maps_1mm(head, maps["gm_factor"], maps["pet_factor"], texture)
    axcodes = str(rng.choice(["RAS", "LAS", "LPS", "PIR"]))
    voxel = np.round(rng.uniform(1.0, 1.2), 2) * np.ones(3)
    tilt = float(rng.uniform(-15.0, 15.0)) if rng.random() < 0.3 else 0.0
    inv_A = np.linalg.inv(mapping.A)
    center = synth.apply_affine(inv_A, synth.T1_FOV_CENTER_MNI[:, None])[:, 0]
    shape, t1_aff = synth.oriented_grid(axcodes, voxel, synth.T1_FOV, center, tilt)
    p_angles = rng.uniform(-10.0, 10.0, 3)
    p_shift = rng.uniform(-20.0, 20.0, 3)
    brain_native = synth.apply_affine(inv_A, synth.BRAIN_CENTER_MNI[:, None])[:, 0]
    pet_to_t1w = synth.rigid(p_angles, p_shift, center=brain_native)
    pet_voxel = np.array([rng.uniform(2.0, 2.5)] * 3).round(3)
    pet_center = synth.apply_affine(np.linalg.inv(pet_to_t1w), brain_native[:, None])[:, 0]
    pet_codes = str(rng.choice(["RAS", "LAS", "LPS"]))
    pet_shape, pet_aff = synth.oriented_grid(pet_codes, pet_voxel, synth.PET_FOV, pet_center)
    motions = [np.eye(4)] + [
        synth.rigid(rng.uniform(-1.0, 1.0, 3), rng.uniform(-1.5, 1.5, 3), pet_center)
        for _ in range(opts.pet_frames - 1)
    ]
    sidecar = synth.pet_sidecar(opts.pet_frames, opts.frame_duration, opts.tracer, rng)
    uptake, uptake_aff = synth.smoothed_uptake(head_maps["fdg"], fwhm)
    uptake *= params["uptake_scale"]
    gm_native = synth._write_raw_session(
        opts.out,
        spec,
        session,
        opts,
        head_maps,
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
    maps["pet_to_t1w"] = pet_to_t1w
    maps["gm_volume_native"] = gm_native
    maps["pet_frame_motion"] = motions


def write_truth_tables(out, rows, settings: EffectSettings, names, seed: int) -> None:
    """The effect families' additions to ``synth-truth``."""
    import pandas as pd

    from .bids import atomic_path

    truth = out / "derivatives" / "synth-truth"
    table = region_table(names, settings.family, settings.effect_size)
    with atomic_path(truth / "regions.tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    factors = pd.DataFrame(
        [
            {
                "participant_id": r["participant_id"],
                "session": s or "n/a",
                "index": i + 1,
                "gm_factor": gm[i],
                "pet_factor": pet[i],
                "gm_latent": r["gm_latent"][i],
                "pet_latent": r["pet_latent"][i],
                "rho": r["rho"][i],
                "texture_sd": r["texture_sd"][i],
            }
            for r in rows
            for s, gm, pet in r["session_factors"]
            for i in range(len(names))
        ]
    )
    with atomic_path(truth / "region_factors.tsv") as tmp:
        factors.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    sites = site_parameters(seed, settings.sites)
    with atomic_path(truth / "sites.tsv") as tmp:
        pd.DataFrame(sites).to_csv(tmp, sep="\t", index=False, float_format="%.6g", na_rep="n/a")


def cohort_parameters(settings: EffectSettings) -> dict:
    """The realistic families' parameters, for ``cohort.json``."""
    return {
        "effect_family": settings.family,
        "sites": settings.sites,
        "stages": STAGES,
        "ad_pattern": {k: list(v) for k, v in AD_PATTERN.items()},
        "core_regions": list(CORE),
        "severity_sd": SEVERITY_SD,
        "progression_stage_per_year": PROGRESSION,
        "gm_sd": GM_SD,
        "pet_sd": PET_SD,
        "natural_rho": NATURAL_RHO,
        "coupling_rho": COUPLING_RHO,
        "texture_base": TEXTURE_BASE,
        "texture_gain": TEXTURE_GAIN,
        "texture_sigma_mm": TEXTURE_SIGMA_MM,
        "gm_age_slope_per_year": GM_AGE_SLOPE,
        "fdg_age_slope_per_year": FDG_AGE_SLOPE,
        "head_scale_sex": HEAD_SCALE_SEX,
        "head_scale_sd": HEAD_SCALE_SD,
        "warp_max_mm": list(WARP_MAX_MM),
        "registration_residual_rms_mm": RESIDUAL_RMS_MM,
        "registration_residual_session_rms_mm": RESIDUAL_SESSION_RMS_MM,
        "seg_noise": {"multiplicative_sd": SEG_MULT_SD, "border_sd": SEG_ADD_SD},
        "pet_fwhm_mm": list(PET_FWHM_MM),
        "pet_noise": PET_NOISE,
        "pet_coregistration_error_deg_mm": list(COREG_ERROR),
        "site_sd": SITE_SD,
        "age": list(AGE),
    }


def region_summary(root, classes=("CN", "AD")) -> tuple:
    """Per-region statistics of a cohort's region files (first sessions only).

    (table, counts): per region the planted flag, Cohen's d (second class - first) and the %
    change of the region means of modulated GM and PET, the within-class GM-PET correlation of
    the region means, and the ratio of the within-region relative SD (second / first class).
    ``benchmarks/synth_effects.py`` prints it; the slow tests check it.
    """
    from pathlib import Path

    import pandas as pd

    from .bids import read_participants
    from .group.cohort import load_cohort

    data = load_cohort(
        Path(root) / "derivatives" / "bids_siamfuse", read_participants(root), classes=classes
    )
    first = ~pd.Series(data.subjects).duplicated().to_numpy()
    layout = data.layout
    gm = np.stack([layout.region_means(x) for x in data.gm[first]])
    pet = np.stack([layout.region_means(x) for x in data.pet[first]])
    sd_gm = np.stack([_region_sd(x, layout) for x in data.gm[first]])
    sd_pet = np.stack([_region_sd(x, layout) for x in data.pet[first]])
    y = np.asarray(data.labels)[first]
    truth = pd.read_csv(Path(root) / "derivatives" / "synth-truth" / "regions.tsv", sep="\t")

    def pct(v):
        return 100.0 * (v[y == 1].mean(axis=0) / v[y == 0].mean(axis=0) - 1.0)

    def cohen(v):
        a, b = v[y == 1], v[y == 0]
        pooled = np.sqrt((a.var(axis=0, ddof=1) + b.var(axis=0, ddof=1)) / 2)
        return (a.mean(axis=0) - b.mean(axis=0)) / pooled

    def corr(k):
        out = []
        for r in range(gm.shape[1]):
            out.append(np.corrcoef(gm[y == k, r], pet[y == k, r])[0, 1])
        return np.array(out)

    table = pd.DataFrame(
        {
            "name": layout.names,
            "planted": truth["planted"].astype(bool).to_numpy(),
            "d_gm": cohen(gm),
            "d_pet": cohen(pet),
            "pct_gm": pct(gm),
            "pct_pet": pct(pet),
            "r_cn": corr(0),
            "r_ad": corr(1),
            "sd_ratio_gm": sd_gm[y == 1].mean(0) / sd_gm[y == 0].mean(0),
            "sd_ratio_pet": sd_pet[y == 1].mean(0) / sd_pet[y == 0].mean(0),
        }
    )
    return table, {"n_cn": int((y == 0).sum()), "n_ad": int((y == 1).sum())}


def _region_sd(vector, layout) -> np.ndarray:
    """Within-region SD of a compact vector, relative to the region mean."""
    off = layout.offsets
    out = np.empty(len(off) - 1)
    for r in range(len(off) - 1):
        v = vector[off[r] : off[r + 1]]
        out[r] = v.std() / max(abs(v.mean()), 1e-6)
    return out
