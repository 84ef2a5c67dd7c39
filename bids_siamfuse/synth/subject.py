"""One subject of the original generator (no ``--effect``): its images, truth and derivatives."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bids import save_image, save_json, save_output
from ..data.templates import GRID_AFFINE, GRID_SHAPE, SPACE, grid_image
from .files import WARP_CONVENTION, _prefix, _save_nifti, _save_warp, _session_dir
from .geometry import (
    BRAIN_CENTER_MNI,
    EXT_AFFINE,
    PET_FOV,
    T1_FOV,
    T1_FOV_CENTER_MNI,
    Mapping,
    _grid_inverse_jacobian,
    apply_affine,
    grid_points,
    oriented_grid,
    rigid,
    rotation,
    sample,
)
from .head import (
    T1_TISSUE,
    SubjectSpec,
    head_model,
    smoothed_uptake,
    subject_maps,
    subject_parameters,
)

LOGGER = logging.getLogger("bids_siamfuse.synth")


def _bias_field(shape, rng) -> np.ndarray:
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    c = rng.normal(0.0, 0.08, 9)
    # The sum in its original order, added in place (float64, as before): the temporaries of
    # the full-size terms cost more than the arithmetic.
    log_b = c[0] * x + c[1] * y + c[2] * z
    for term in (c[3] * x * x, c[4] * y * y, c[5] * z * z, c[6] * x * y, c[7] * y * z):
        log_b += term
    log_b += c[8] * x * z
    return np.exp(log_b, out=log_b).astype(np.float32)


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
    effect: object = None  # effects.EffectSettings for --effect cohorts


@dataclass
class Acquisition:
    """One session's scanning: T1w and PET grids, the PET pose and frame motion, the PET
    sidecar, and the uptake as the PET scanner resolves it (Bq/mL on a 2 mm grid)."""

    t1_shape: tuple
    t1_affine: np.ndarray
    pet_shape: tuple
    pet_affine: np.ndarray
    pet_to_t1w: np.ndarray
    motions: list
    sidecar: dict
    uptake: np.ndarray
    uptake_affine: np.ndarray
    axcodes: str
    tilt: float
    fwhm: float


def draw_acquisition(
    rng, mapping: Mapping, opts, fdg, uptake_scale: float, *, fwhm=None, jitter: bool = True
) -> Acquisition:
    """Draw a session's scanning from ``rng`` and blur the head's uptake ``fdg`` to match.

    Both generators draw in this fixed order, which their cohorts depend on. ``jitter`` (the
    original generator) also makes some T1w voxels 1.2 mm along one axis, shifts the T1w and
    PET fields of view by a few mm and draws the PET's axial voxel size apart; ``fwhm`` None:
    the PET resolution is drawn here (after the T1w grid).
    """
    inv_A = np.linalg.inv(mapping.A)
    axcodes = str(rng.choice(["RAS", "LAS", "LPS", "PIR"]))
    voxel = np.round(rng.uniform(1.0, 1.2), 2) * np.ones(3)
    if jitter and rng.random() < 0.3:
        voxel[rng.integers(3)] = 1.2
    tilt = float(rng.uniform(-15.0, 15.0)) if rng.random() < 0.3 else 0.0
    center = apply_affine(inv_A, T1_FOV_CENTER_MNI[:, None])[:, 0]
    if jitter:
        center = center + rng.uniform(-5, 5, 3)
    shape, t1_aff = oriented_grid(axcodes, voxel, T1_FOV, center, tilt)
    if fwhm is None:
        fwhm = float(rng.uniform(6.0, 8.0))
    p_angles = rng.uniform(-10.0, 10.0, 3)
    p_shift = rng.uniform(-20.0, 20.0, 3)
    brain_native = apply_affine(inv_A, BRAIN_CENTER_MNI[:, None])[:, 0]
    pet_to_t1w = rigid(p_angles, p_shift, center=brain_native)
    if jitter:
        pet_voxel = np.array([rng.uniform(2.0, 2.5)] * 2 + [rng.uniform(2.0, 2.5)]).round(3)
    else:
        pet_voxel = np.array([rng.uniform(2.0, 2.5)] * 3).round(3)
    pet_center = apply_affine(np.linalg.inv(pet_to_t1w), brain_native[:, None])[:, 0]
    if jitter:
        pet_center = pet_center + rng.uniform(-8, 8, 3)
    pet_codes = str(rng.choice(["RAS", "LAS", "LPS"]))
    pet_shape, pet_aff = oriented_grid(pet_codes, pet_voxel, PET_FOV, pet_center)
    motions = [np.eye(4)] + [
        rigid(rng.uniform(-1.0, 1.0, 3), rng.uniform(-1.5, 1.5, 3), pet_center)
        for _ in range(opts.pet_frames - 1)
    ]
    sidecar = pet_sidecar(opts.pet_frames, opts.frame_duration, opts.tracer, rng)
    uptake, uptake_aff = smoothed_uptake(fdg, fwhm)
    uptake *= uptake_scale
    return Acquisition(
        shape,
        t1_aff,
        pet_shape,
        pet_aff,
        pet_to_t1w,
        motions,
        sidecar,
        uptake,
        uptake_aff,
        axcodes,
        tilt,
        fwhm,
    )


def session_row(spec: SubjectSpec, session, s_index: int, t0: float) -> dict:
    """The session's row of ``sessions.tsv`` (a yearly visit), once it is written (logged)."""
    LOGGER.info(
        "sub-%s%s: %.1f s", spec.label, f" ses-{session}" if session else "", time.time() - t0
    )
    return {"session": session, "acq_time": f"{2020 + s_index}-03-0{1 + s_index}T09:00:00"}


def participant_row(spec: SubjectSpec, draws: dict, sessions: list, **more) -> dict:
    """The subject's row of participants.tsv and the truth tables: who it is, its drawn age,
    sex, MMSE and severity, the ``more`` columns, and its ``sessions`` rows."""
    return {
        "participant_id": f"sub-{spec.label}",
        "diagnosis": spec.group,
        "age": draws["age"],
        "sex": draws["sex"],
        "MMSE": draws["mmse"],
        "severity": draws["severity"],
        **more,
        "sessions": sessions,
    }


def make_subject(spec: SubjectSpec, opts: CohortOptions) -> dict:
    """Generate and write every session of one subject; return its table rows.

    All random choices come from the subject's generator in a fixed order, and image noise from
    generators of their own, so ``raw=False`` (derivatives only) gives the same subjects.
    ``--effect`` cohorts are made by :func:`bids_siamfuse.synth.effect_cohort.make_subject`
    (:func:`bids_siamfuse.synth.cohort.subject_maker` picks one).
    """
    t0 = time.time()
    head = head_model()
    params = subject_parameters(spec, len(head.aal_names), head.aal_names)
    rng = params["rng"]
    maps = subject_maps(head, params["gm_factor"], params["pet_factor"])
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
        acq = draw_acquisition(rng, mapping, opts, maps["fdg"], params["uptake_scale"])
        prefix = _prefix(spec.label, session)
        truth_anat = _session_dir(truth_root, spec.label, session, "anat")
        gm_volume_native = None
        if opts.raw:
            gm_volume_native = _write_raw_session(
                out, spec, session, opts, maps, mapping, params, noise_rng, acq, truth_anat
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
            "warp_convention": WARP_CONVENTION,
            "pet_to_t1w_affine": acq.pet_to_t1w.tolist(),
            "pet_frame_motion": [m.tolist() for m in acq.motions],
            "pet_frame_motion_convention": "frame f shows the head at position motion_f @ q",
            "pet_fwhm_mm": acq.fwhm,
            "t1w_axcodes": acq.axcodes,
            "t1w_tilt_deg": acq.tilt,
            "gm_volume_native_mm3": gm_volume_native,
            "gm_volume_modulated_mm3": float(mwc1.sum() * 1.5**3),
            "uptake_scale_bq_ml": params["uptake_scale"],
        }
        save_json(truth_anat / f"{prefix}_desc-truth_xfm.json", truth)
        if opts.preprocessed:
            _write_preprocessed(
                out, spec, session, opts, acq.uptake, acq.uptake_affine, gm_mni, mwc1, grid_pts
            )
        rows.append(session_row(spec, session, s_index, t0))
    return participant_row(
        spec,
        params,
        rows,
        atrophy_share=params["atrophy_share"],
        gm_factor=params["gm_factor"][1:].tolist(),
        pet_factor=params["pet_factor"][1:].tolist(),
    )


def _write_raw_session(
    out, spec, session, opts, maps, mapping, params, noise_rng, acq: Acquisition, truth_anat
) -> float:
    """The native T1w and PET images of one session (and the native GM truth)."""
    head = head_model()
    prefix = _prefix(spec.label, session)
    shape, t1_aff = acq.t1_shape, acq.t1_affine
    mni_pts = mapping.native_grid_to_mni(shape, t1_aff)
    image = sample(maps["t1"], EXT_AFFINE, mni_pts).reshape(shape)
    gm_native = sample(maps["gm"], head.template_affine, mni_pts).reshape(shape)
    del mni_pts
    bias = _bias_field(shape, noise_rng)
    bias *= params["t1_gain"]
    image *= bias
    del bias
    sigma = 0.025 * T1_TISSUE["WM"] * params["t1_gain"]
    n1 = noise_rng.standard_normal(shape, dtype=np.float32)
    n1 *= sigma
    n2 = noise_rng.standard_normal(shape, dtype=np.float32)
    n2 *= sigma
    # sqrt((image + n1) ** 2 + n2 ** 2) in place (the same float32 operations)
    image += n1
    np.square(image, out=image)
    image += np.square(n2, out=n2)
    np.sqrt(image, out=image)
    del n1, n2
    anat = _session_dir(out, spec.label, session, "anat")
    _save_nifti(anat / f"{prefix}_T1w.nii.gz", np.round(image).astype(np.int16), t1_aff)
    save_json(anat / f"{prefix}_T1w.json", T1W_SIDECAR)
    del image
    voxel_volume = abs(np.linalg.det(t1_aff[:3, :3]))
    gm_volume_native = float(gm_native.sum() * voxel_volume)
    _save_nifti(truth_anat / f"{prefix}_label-GM_probseg.nii.gz", gm_native, t1_aff, as_uint8=True)
    del gm_native

    pet_shape, pet_aff = acq.pet_shape, acq.pet_affine
    data, data_aff = acq.uptake, acq.uptake_affine
    frames = []
    duration = opts.frame_duration if opts.pet_frames > 1 else 1800.0
    for f, motion in enumerate(acq.motions):
        pts = mapping.native_grid_to_mni(pet_shape, acq.pet_to_t1w @ motion @ pet_aff)
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
    save_json(pet_dir / f"{pet_name}.json", acq.sidecar)
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
    from ..preproc import sidecars
    from ..preproc.pet import normalize

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
    from ..preproc.regions import write_region_outputs

    write_region_outputs(
        deriv, mwc1, pet_norm, anat_source=anat_src, pet_source=pet_src, sources=pet_sources
    )
