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
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..data.templates import GRID_AFFINE, GRID_SHAPE
from .geometry import (
    COARSE_SHAPE,
    WARP_SHAPE,
    WARP_SPACING,
    grid_points,
    jacobian_determinant,
    sample,
)
from .head import region_stem

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

_COARSE = COARSE_SHAPE  # 3 mm grid: index 2k = fine index k


@dataclass(frozen=True)
class EffectSettings:
    family: str
    effect_size: float = 1.0
    sites: int = 0
    regions_only: bool = False


def region_table(names, family: str, effect_size: float = 1.0):
    """Per region: planted flag and the family's weights (the truth's ``regions.tsv``)."""
    import pandas as pd

    rows = []
    for index, name in enumerate(names, start=1):
        stem = region_stem(name)
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
    from ..data.atlas import load_atlas
    from ..data.templates import load_template

    tissue = []
    pts = grid_points(GRID_SHAPE, GRID_AFFINE)
    for kind in ("GM", "WM", "CSF"):
        img = load_template(kind)
        tissue.append(sample(np.asanyarray(img.dataobj, dtype=np.float32), img.affine, pts))
    atlas = load_atlas()
    # cached here so that forked workers inherit them: the PET normalization's mask and the
    # region writer's layout
    from ..data.templates import grid_brain_mask
    from ..preproc.regions import atlas_layout

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
        stems=tuple(region_stem(n) for n in atlas.names),
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
    core = np.array([region_stem(x) in CORE for x in names])
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
    stems = [region_stem(x) for x in names]
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
