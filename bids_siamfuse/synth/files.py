"""File names and NIfTI writers of the synthetic cohort, and reading its ground truth back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bids import atomic_path
from .geometry import WARP_AFFINE, Mapping

#: How ``desc-truth_xfm.json`` and the warp file give the native->MNI map (:class:`Mapping`).
WARP_CONVENTION = (
    "MNI = z + u(z), z = A @ native (RAS mm); u trilinear on the warp file's grid "
    "(edge values extend outside it)"
)


def _session_dir(out: Path, label: str, session: str | None, datatype: str) -> Path:
    base = out / f"sub-{label}"
    if session:
        base = base / f"ses-{session}"
    return base / datatype


def _prefix(label: str, session: str | None) -> str:
    return f"sub-{label}" + (f"_ses-{session}" if session else "")


def fortran(data) -> np.ndarray:
    """``data`` in Fortran order, the order NIfTI stores: nibabel then writes contiguous slices
    instead of gathering each one from a C-order array (same bytes; a 175x230x230 int16 T1w
    took 0.78 s to write from C order, 0.53 s with this 0.035 s copy)."""
    return np.asfortranarray(data)


def _save_nifti(path: Path, data, affine, *, as_uint8=False, frame_s=None):
    import nibabel as nb

    if as_uint8:
        data = np.clip(np.round(data * 255), 0, 255).astype(np.uint8)
        img = nb.Nifti1Image(fortran(data), affine)
        img.header.set_slope_inter(1.0 / 255.0, 0.0)
    else:
        img = nb.Nifti1Image(fortran(data), affine)
    img.set_sform(affine, 1)
    img.set_qform(affine, 1)
    img.header.set_xyzt_units("mm", "sec")
    if frame_s is not None:
        img.header.set_zooms(img.header.get_zooms()[:3] + (float(frame_s),))
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))


def _save_warp(path: Path, warp):
    import nibabel as nb

    img = nb.Nifti1Image(fortran(warp[:, :, :, None, :].astype(np.float32)), WARP_AFFINE)
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
