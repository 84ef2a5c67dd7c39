"""Score participant derivatives against the synthetic cohort's ground truth.

Used by ``benchmarks/bench_preproc.py`` and the slow accuracy test. For one session:

* ``disp_mm``: mean distance, over the template brain voxels of the 1.5 mm grid, between the
  T1w position our published T1w->MNI transform (``..._from-T1w_to-MNI..._xfm.h5``, composed on
  the grid) gives each voxel and the true one (``truth.mapping.mni_to_native``); ``disp_p95``;
* ``dice``: Dice of normalized GM > 0.5 against the true MNI GM > 0.5;
* ``vol_err_pct``: GM volume of the modulated map (sum x 3.375 mm3) against the true native GM
  volume, in percent (``vol_err_mod_pct``: against the true modulated map's volume);
* ``pet_mm``: mean distance, over the T1w brain voxels, between where our PET->T1w transform
  and the true one put them in the PET (the reference of a dynamic PET is the mean position:
  its frame-0 motion from the work directory is composed in when given);
* ``pet_corr``: correlation of our normalized PET with the perfect one, when present.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np


def score_session(ds: Path, out: Path, subject: str, session: str | None, tracer="FDG", *,
                  work_dir: Path | None = None) -> dict:  # fmt: skip
    import nibabel as nb

    from bids_siamfuse import bids, synth
    from bids_siamfuse.data.templates import GRID_AFFINE, GRID_SHAPE, grid_brain_mask
    from bids_siamfuse.preproc import registration as reg

    ds, out = Path(ds), Path(out)
    anat = {"subject": subject, "session": session}
    pet = {**anat, "tracer": tracer}
    truth = synth.load_truth(ds, subject, session)
    result = {"subject": subject, "session": session, "axcodes": truth.meta["t1w_axcodes"]}
    result["tilt_deg"] = round(float(truth.meta["t1w_tilt_deg"]), 1)
    # T1w -> MNI: the published transform, composed on the grid
    xfm = bids.output_path(out, "t1w2mni_xfm", anat)
    with tempfile.TemporaryDirectory() as tmp:
        positions = reg.compose_to_grid([str(xfm)], GRID_SHAPE, GRID_AFFINE, Path(tmp))
    brain = grid_brain_mask().reshape(-1)
    idx = np.indices(GRID_SHAPE, dtype=np.float64).reshape(3, -1)[:, brain]
    mni = reg.apply_matrix(GRID_AFFINE, idx).astype(np.float32)
    true_native = truth.mapping.mni_to_native(mni)
    err = np.linalg.norm(positions.reshape(3, -1)[:, brain] - true_native, axis=0)
    result["disp_mm"] = float(err.mean())
    result["disp_p95"] = float(np.percentile(err, 95))
    # GM
    prefix = bids.build_name(anat) + f"_space-{bids.OUTPUTS['gm_mni']['space']}_res-1p5_label-GM"
    true_gm = nb.load(truth.folder / f"{prefix}_probseg.nii.gz").get_fdata()
    gm = nb.load(bids.output_path(out, "gm_mni", anat)).get_fdata()
    a, b = gm > 0.5, true_gm > 0.5
    result["dice"] = float(2 * (a & b).sum() / (a.sum() + b.sum()))
    mwc1 = nb.load(bids.output_path(out, "gm_mni_modulated", anat)).get_fdata()
    volume = float(mwc1.sum() * 1.5**3)
    result["gm_volume_mm3"] = volume
    result["vol_err_pct"] = 100 * (volume / truth.meta["gm_volume_native_mm3"] - 1)
    result["vol_err_mod_pct"] = 100 * (volume / truth.meta["gm_volume_modulated_mm3"] - 1)
    # PET -> T1w
    t1_to_pet = reg.read_matrix(bids.output_path(out, "pet2t1w_xfm", pet))  # T1w pt -> petref pt
    pet_to_t1w = np.linalg.inv(t1_to_pet)
    if work_dir is not None:  # the reference of a dynamic PET is the frames' mean position
        key = re.sub(r"[^0-9a-zA-Z]+", "_", bids.build_name(pet).removeprefix(f"sub-{subject}_"))
        motions = (
            Path(work_dir) / "bids_siamfuse_wf" / f"single_subject_{subject}_wf"
            / f"pet_{key.strip('_')}_wf" / "reference" / "motions.npy"
        )  # fmt: skip
        if motions.is_file():
            pet_to_t1w = pet_to_t1w @ np.load(motions)[0]  # frame 0 -> T1w
    mask = nb.load(bids.output_path(out, "t1w_mask", anat))
    vox = np.array(np.nonzero(np.asanyarray(mask.dataobj) > 0), dtype=np.float64)
    pts = reg.apply_matrix(mask.affine, vox[:, ::7])
    true = np.linalg.inv(truth.pet_to_t1w())
    ours = np.linalg.inv(pet_to_t1w)
    diff = reg.apply_matrix(ours, pts) - reg.apply_matrix(true, pts)
    result["pet_mm"] = float(np.linalg.norm(diff, axis=0).mean())
    perfect = bids.output_path(ds / "derivatives" / "bids_siamfuse", "pet_mni", pet)
    if perfect.is_file():
        x = nb.load(bids.output_path(out, "pet_mni", pet)).get_fdata().ravel()
        y = nb.load(perfect).get_fdata().ravel()
        result["pet_corr"] = float(np.corrcoef(x, y)[0, 1])
    return result


def sessions(ds: Path) -> list[tuple[str, str | None]]:
    """(subject, session) of every session with a truth file."""
    found = []
    for f in sorted((Path(ds) / "derivatives" / "synth-truth").rglob("*_desc-truth_xfm.json")):
        meta = json.loads(f.read_text())
        found.append((meta["subject"], meta["session"]))
    return found


TARGETS = {"disp_mm": 1.0, "dice": 0.85, "vol_err_pct": 5.0, "pet_mm": 1.0}


def meets_targets(row: dict) -> dict:
    return {
        "disp_mm": row["disp_mm"] <= TARGETS["disp_mm"],
        "dice": row["dice"] >= TARGETS["dice"],
        "vol_err_pct": abs(row["vol_err_pct"]) <= TARGETS["vol_err_pct"],
        "pet_mm": row["pet_mm"] <= TARGETS["pet_mm"],
    }
