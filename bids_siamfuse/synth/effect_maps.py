"""The ``--effect`` families' maps of one session: texture, residuals, noise, PSF, modulation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..data.templates import GRID_AFFINE, GRID_SHAPE
from .effects import (
    _COARSE,
    COREG_ERROR,
    FDG_TISSUE,
    PET_NOISE,
    RESIDUAL_SESSION_RMS_MM,
    RESIDUAL_SIGMA_MM,
    SEG_ADD_SD,
    SEG_MULT_SD,
    TEXTURE_BASE,
    TEXTURE_SIGMA_MM,
    EffectSettings,
    GridModel,
    grid_model,
    session_factors,
    smooth_field,
    upsample,
)
from .geometry import grid_points, rigid, sample
from .head import subject_maps


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
    return upsample(mapping.coarse_inverse_jacobian()[None])[0]


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
    from ..preproc.pet import normalize

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


def head_maps_1mm(head, gm_factor, pet_factor, texture) -> dict:
    """The subject's tissue and image maps on the head model's 1 mm grids (raw images).

    :func:`bids_siamfuse.synth.head.subject_maps` with the session's regional factors and the
    subject's within-region texture (resampled from the output grid) multiplied in.
    """
    pts = grid_points(head.gm.shape, head.template_affine)
    tex = [sample(t, GRID_AFFINE, pts).reshape(head.gm.shape) for t in texture]
    del pts
    return subject_maps(head, gm_factor, pet_factor, tex, FDG_TISSUE)
