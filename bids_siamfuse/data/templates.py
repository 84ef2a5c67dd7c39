"""The standard space: ICBM152 2009a symmetric templates and the paper's 1.5 mm grid.

Templates are read, in this order, from

1. a prefetched TemplateFlow home (``$TEMPLATEFLOW_HOME/tpl-MNI152NLin2009aSym``), when its
   files are real (TemplateFlow's wheel alone holds empty placeholders);
2. the copies that ship inside nilearn's wheel (T1w brain, GM, WM, brain mask; 1 mm).

Neither path downloads anything. nilearn ships no CSF map, so CSF is derived as
``mask - GM - WM`` (clipped to [0, 1]) in both cases, which keeps the three priors summing to
one inside the brain.

The output grid is SPM12's default bounding box at 1.5 mm: 121 x 145 x 121 voxels, origin
(90, -126, -72) mm, stored like SPM's ``wc1`` images (x axis flipped, LAS storage).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

SPACE = "MNI152NLin2009aSym"
RES_LABEL = "1p5"
GRID_SHAPE = (121, 145, 121)
GRID_AFFINE = np.array(
    [
        [-1.5, 0.0, 0.0, 90.0],
        [0.0, 1.5, 0.0, -126.0],
        [0.0, 0.0, 1.5, -72.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
TISSUES = ("GM", "WM", "CSF")


def grid_signature() -> dict:
    """What identifies the grid: derivatives and model bundles carry it and are checked."""
    return {
        "space": SPACE,
        "resolution": RES_LABEL,
        "shape": list(GRID_SHAPE),
        "affine": np.round(GRID_AFFINE, 6).tolist(),
    }


def grid_image(data=None, dtype=np.float32):
    """A NIfTI on the 121x145x121 grid (zeros when ``data`` is None)."""
    import nibabel as nb

    if data is None:
        data = np.zeros(GRID_SHAPE, dtype=dtype)
    data = np.asarray(data)
    if data.shape[:3] != GRID_SHAPE:
        raise ValueError(f"data of shape {data.shape} is not on the {GRID_SHAPE} grid")
    img = nb.Nifti1Image(data.astype(dtype, copy=False), GRID_AFFINE)
    img.set_sform(GRID_AFFINE, 4)
    img.set_qform(GRID_AFFINE, 4)
    img.header.set_xyzt_units("mm")
    return img


def on_grid(img) -> bool:
    """Whether an image lies on the output grid (shape and affine to 1e-3 mm)."""
    return tuple(img.shape[:3]) == GRID_SHAPE and np.allclose(img.affine, GRID_AFFINE, atol=1e-3)


def _templateflow_file(suffix: str) -> Path | None:
    home = os.environ.get("TEMPLATEFLOW_HOME")
    if not home:
        return None
    path = Path(home) / f"tpl-{SPACE}" / f"tpl-{SPACE}_res-1_{suffix}"
    if path.is_file() and path.stat().st_size > 1024:
        return path
    return None


_TF_SUFFIX = {
    "T1w": "T1w.nii.gz",
    "GM": "label-GM_probseg.nii.gz",
    "WM": "label-WM_probseg.nii.gz",
    "CSF": "label-CSF_probseg.nii.gz",
    "mask": "desc-brain_mask.nii.gz",
}


@functools.lru_cache(maxsize=8)
def load_template(kind: str):
    """The 1 mm template image of ``kind`` (T1w brain, GM, WM, CSF or mask)."""
    import nibabel as nb

    if kind not in _TF_SUFFIX:
        raise ValueError(f"unknown template kind {kind!r}")
    tf_files = {k: _templateflow_file(v) for k, v in _TF_SUFFIX.items()}
    if tf_files["T1w"] and tf_files["GM"] and tf_files["WM"] and tf_files["mask"]:
        mask = nb.load(tf_files["mask"])
        if kind == "CSF" and tf_files["CSF"]:
            return nb.load(tf_files["CSF"])
        if kind == "T1w":
            t1 = nb.load(tf_files["T1w"])
            brain = np.asanyarray(t1.dataobj, dtype=np.float32) * (np.asanyarray(mask.dataobj) > 0)
            return nb.Nifti1Image(brain, t1.affine, t1.header)
        if kind != "CSF":
            return nb.load(tf_files[kind])
    else:
        from nilearn import datasets

        loaders = {
            "T1w": datasets.load_mni152_template,
            "GM": datasets.load_mni152_gm_template,
            "WM": datasets.load_mni152_wm_template,
            "mask": datasets.load_mni152_brain_mask,
        }
        if kind != "CSF":
            img = loaders[kind](resolution=1)
            return nb.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    gm = np.asanyarray(load_template("GM").dataobj, dtype=np.float32)
    wm = np.asanyarray(load_template("WM").dataobj, dtype=np.float32)
    mask_img = load_template("mask")
    mask = np.asanyarray(mask_img.dataobj) > 0
    csf = np.clip(mask - gm - wm, 0.0, 1.0).astype(np.float32)
    return nb.Nifti1Image(csf, mask_img.affine)


def template_source() -> str:
    """Where the templates come from, for the methods text and provenance."""
    if _templateflow_file("T1w"):
        return f"TemplateFlow ({os.environ['TEMPLATEFLOW_HOME']}/tpl-{SPACE})"
    return "nilearn's packaged ICBM152 2009a symmetric maps"


def array_digest(array: np.ndarray) -> str:
    """A short content hash of an array (shape, dtype and bytes)."""
    h = hashlib.sha256()
    h.update(str((array.shape, array.dtype.str)).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def grid_brain_mask() -> np.ndarray:
    """The template brain mask on the output grid (boolean), for PET normalization."""
    from scipy import ndimage

    mask_img = load_template("mask")
    vox2vox = np.linalg.inv(mask_img.affine) @ GRID_AFFINE
    coords = np.indices(GRID_SHAPE, dtype=np.float32).reshape(3, -1)
    src = vox2vox[:3, :3] @ coords + vox2vox[:3, 3:4]
    data = np.asanyarray(mask_img.dataobj).astype(np.float32)
    values = ndimage.map_coordinates(data, src, order=1, mode="constant", prefilter=False)
    return values.reshape(GRID_SHAPE) >= 0.5
