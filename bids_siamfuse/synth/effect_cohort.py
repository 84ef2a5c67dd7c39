"""One ``--effect`` subject written out (images, derivatives, truth), truth tables, summaries."""

from __future__ import annotations

import os
import time

import numpy as np

from ..bids import atomic_path, save_json, save_output
from ..data.templates import grid_image
from .effect_maps import grid_modulation, head_maps_1mm, session_maps, subject_texture
from .effects import (
    PET_FWHM_MM,
    RESIDUAL_RMS_MM,
    TEXTURE_BASE,
    EffectSettings,
    draw_subject,
    grid_model,
    region_table,
    site_parameters,
)
from .files import WARP_CONVENTION, _prefix, _save_warp, _session_dir
from .geometry import (
    Mapping,
    rotation,
)
from .head import head_model
from .subject import _write_raw_session, draw_acquisition, participant_row, session_row


def make_subject(spec, opts) -> dict:
    """Generate and write every session of one subject (the ``--effect`` path of synth)."""
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
    _save_warp(warp_path, subj["warp"])
    size = subj["head_scale"] * np.ones(3)
    rows, factors = [], []
    for s_index, session in enumerate(spec.sessions):
        years = 0.0 if s_index == 0 else subj["interval"] * s_index
        noise_rng = np.random.default_rng([spec.seed, spec.index, s_index, 1203])
        angles = rng.uniform(-10.0, 10.0, 3)
        shift = rng.uniform(-10.0, 10.0, 3)
        A = np.eye(4)
        A[:3, :3] = rotation(angles) @ np.diag(1.0 / size)
        A[:3, 3] = shift
        mapping = Mapping(A=A, warp=subj["warp"])
        fwhm = site["pet_fwhm_mm"]
        fwhm = (
            float(rng.uniform(*PET_FWHM_MM))
            if fwhm is None
            else float(np.clip(fwhm + rng.normal(0.0, 0.25), *PET_FWHM_MM))
        )
        jac = grid_modulation(mapping)
        maps = session_maps(subj, settings, years, jac, site, noise_rng, fwhm)
        prefix = _prefix(spec.label, session)
        truth_anat = _session_dir(truth_root, spec.label, session, "anat")
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
            "warp_convention": WARP_CONVENTION,
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
        factors.append((session, maps["gm_factor"], maps["pet_factor"]))
        rows.append(session_row(spec, session, s_index, t0))
    return participant_row(
        spec,
        subj,
        rows,
        site=site["site"],
        atrophy_share=float("nan"),
        stage=subj["stage"],
        head_scale=subj["head_scale"],
        warp_max_mm=subj["warp_max_mm"],
        warp_min_jacobian=subj["warp_min_jacobian"],
        gm_factor=factors[0][1][1:].tolist(),
        pet_factor=factors[0][2][1:].tolist(),
        session_factors=[(s, g[1:].tolist(), p[1:].tolist()) for s, g, p in factors],
        gm_latent=subj["g"].tolist(),
        pet_latent=subj["p"].tolist(),
        rho=subj["rho"].tolist(),
        texture_sd=subj["texture_sd"].tolist(),
    )


def _write_derivatives(out, spec, session, opts, maps, settings: EffectSettings):
    """The derivatives of a participant run, through the pipeline's own writers."""
    from ..preproc import sidecars
    from ..preproc.regions import write_region_outputs

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


def _write_raw(spec, session, opts, subj, maps, mapping, rng, noise_rng, fwhm, truth_anat):
    """Native T1w and PET of the subject (the synth head model, with this subject's factors)."""
    head = head_model()
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
    acq = draw_acquisition(
        rng, mapping, opts, head_maps["fdg"], params["uptake_scale"], fwhm=fwhm, jitter=False
    )
    gm_native = _write_raw_session(
        opts.out, spec, session, opts, head_maps, mapping, params, noise_rng, acq, truth_anat
    )
    maps["pet_to_t1w"] = acq.pet_to_t1w
    maps["gm_volume_native"] = gm_native
    maps["pet_frame_motion"] = acq.motions


def write_truth_tables(out, rows, settings: EffectSettings, names, seed: int) -> None:
    """The effect families' additions to ``synth-truth``."""
    import pandas as pd

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


def region_summary(root, classes=("CN", "AD")) -> tuple:
    """Per-region statistics of a cohort's region files (first sessions only).

    (table, counts): per region the planted flag, Cohen's d (second class - first) and the %
    change of the region means of modulated GM and PET, the within-class GM-PET correlation of
    the region means, and the ratio of the within-region relative SD (second / first class).
    ``benchmarks/synth_effects.py`` prints it; the slow tests check it.
    """
    from pathlib import Path

    import pandas as pd

    from ..bids import read_participants
    from ..group.cohort import load_cohort

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
