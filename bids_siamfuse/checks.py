"""Input checks: catch unusable images and sidecars early, with a one-line reason.

Two levels:

* :func:`check_header` reads only the NIfTI header (milliseconds): file type, dimensions,
  data type, affine, voxel size, and the size the data would take in memory, so a huge image is
  refused *before* it is loaded. The planner runs it on every selected file.
* :func:`check_data` reads the voxels: truncated/corrupt compression, non-finite values, empty or
  constant images. The participant workflow runs it as its first step, per subject, so one bad
  scan fails that subject only.

Every problem raises :class:`~bids_siamfuse.errors.DataError` (exit code 65) whose message names
the file and the problem. Documented choices:

* a T1w must be 3-D (a 4-D T1w with one volume is accepted; with several, refused);
* a PET may be 3-D (static) or 4-D (frames, matched against ``FrameTimesStart``/``FrameDuration``
  of its sidecar);
* non-finite voxels: refused in a T1w; in a PET, set to 0 with a warning when they are under
  ``MAX_PET_NONFINITE`` of the volume (reconstruction software marks voxels outside the field of
  view that way), refused above;
* sheared or singular affines are refused: ITK/ANTs cannot represent shear, so the image would be
  silently distorted.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

LOGGER = logging.getLogger("bids_siamfuse.checks")

#: Largest in-memory size (bytes) of an input image before it is refused.
MAX_IMAGE_BYTES = {"T1w": 2 * 1024**3, "PET": 8 * 1024**3}
MAX_PET_NONFINITE = 0.05
_BAD_KINDS = {
    "c": "complex",
    "V": "structured (e.g. RGB)",
    "O": "object",
    "U": "text",
    "S": "bytes",
    "b": "boolean",
}


def _load(path: Path):
    import nibabel as nb

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return nb.load(str(path))
    except (
        nb.filebasedimages.ImageFileError,
        OSError,
        EOFError,
        ValueError,
        zlib.error,
        gzip.BadGzipFile,
    ) as exc:
        raise DataError(f"{path}: not a readable NIfTI image ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def check_header(path: Path, kind: str) -> dict:
    """Header-level checks; returns a small summary (shape, zooms, frames, axcodes)."""
    import nibabel as nb

    img = _load(path)
    if not isinstance(img, (nb.Nifti1Image, nb.Nifti2Image)):
        raise DataError(f"{path}: a {type(img).__name__}, not a NIfTI image")
    shape = tuple(int(s) for s in img.shape)
    dtype = img.get_data_dtype()
    if dtype.kind in _BAD_KINDS or dtype.names is not None:
        raise DataError(
            f"{path}: {_BAD_KINDS.get(dtype.kind, 'structured')} voxel type "
            f"({dtype}); expected real numbers"
        )
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise DataError(f"{path}: a {len(shape)}-D image of shape {shape}; expected a 3-D volume")
    frames = shape[3] if len(shape) > 3 else 1
    if len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise DataError(f"{path}: {len(shape)}-D image of shape {shape}; expected 3-D or 4-D")
    if kind == "T1w" and frames > 1:
        raise DataError(f"{path}: a 4-D T1w with {frames} volumes; give one 3-D volume")
    nbytes = int(np.prod(shape, dtype=np.int64)) * max(dtype.itemsize, 4)
    limit = MAX_IMAGE_BYTES[kind]
    if nbytes > limit:
        raise DataError(
            f"{path}: {nbytes / 1024**3:.1f} GB in memory (shape {shape}), over "
            f"the {limit / 1024**3:.0f} GB limit for a {kind}; crop or downsample it"
        )
    affine = img.affine
    if not np.isfinite(affine).all():
        raise DataError(f"{path}: the affine holds NaN or infinite values")
    lin = affine[:3, :3]
    zooms = np.linalg.norm(lin, axis=0)
    if np.any(zooms < 1e-3) or abs(np.linalg.det(lin)) < 1e-6:
        raise DataError(f"{path}: singular affine (voxel sizes {np.round(zooms, 4).tolist()})")
    if np.any(zooms > 20):
        raise DataError(f"{path}: implausible voxel size {np.round(zooms, 2).tolist()} mm")
    cosines = lin / zooms
    off = cosines.T @ cosines - np.eye(3)
    if np.abs(off).max() > 1e-3:
        raise DataError(
            f"{path}: sheared affine (axes not orthogonal); ITK/ANTs cannot "
            "represent shear: reslice the image first"
        )
    return {
        "shape": shape,
        "zooms": np.round(zooms, 4).tolist(),
        "frames": frames,
        "axcodes": "".join(nb.aff2axcodes(affine)),
    }


def check_data(path: Path, kind: str):
    """Read the voxels and check them; returns the (possibly cleaned) float32 array and image."""
    img = _load(path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: truncated or corrupt image data ({_short(exc)})") from None
    finite = np.isfinite(data)
    bad = data.size - int(finite.sum())
    if bad:
        share = bad / data.size
        if kind != "PET" or share > MAX_PET_NONFINITE:
            raise DataError(f"{path}: {bad} NaN/infinite voxels ({share:.1%})")
        LOGGER.warning("%s: %d NaN/infinite voxels (%.2f%%) set to 0", path, bad, 100 * share)
        data = np.where(finite, data, 0.0).astype(np.float32)
    if not np.any(data):
        raise DataError(f"{path}: every voxel is zero")
    if float(data.max()) == float(data.min()):
        raise DataError(f"{path}: constant image (every voxel is {float(data.max()):g})")
    if kind == "PET" and float(np.percentile(data, 99.9)) <= 0:
        raise DataError(f"{path}: no positive uptake")
    return data, img


def check_pet_sidecar(path: Path, meta: dict, frames: int) -> dict:
    """Timing fields of a PET sidecar, checked against the image; returns them cleaned."""
    if not meta:
        raise DataError(f"{path}: no JSON sidecar (BIDS requires one for PET)")
    starts = meta.get("FrameTimesStart")
    durations = meta.get("FrameDuration")
    if starts is None or durations is None:
        missing = [k for k in ("FrameTimesStart", "FrameDuration") if meta.get(k) is None]
        raise DataError(f"{path}: sidecar lacks {', '.join(missing)}")
    starts = np.atleast_1d(np.asarray(starts, dtype=float))
    durations = np.atleast_1d(np.asarray(durations, dtype=float))
    if starts.size != durations.size:
        raise DataError(
            f"{path}: FrameTimesStart has {starts.size} values but FrameDuration {durations.size}"
        )
    if starts.size != frames:
        raise DataError(
            f"{path}: the sidecar lists {starts.size} frame(s), the image has {frames}"
        )
    if not np.isfinite(starts).all() or not np.isfinite(durations).all():
        raise DataError(f"{path}: non-numeric frame times")
    if np.any(durations <= 0):
        raise DataError(f"{path}: FrameDuration must be positive, got {durations.tolist()}")
    if starts.size > 1 and np.any(np.diff(starts) < durations[:-1] - 1e-3):
        raise DataError(f"{path}: frames overlap (FrameTimesStart vs FrameDuration)")
    if meta.get("Units") is None:
        LOGGER.warning("%s: sidecar has no Units", path)
    return {"FrameTimesStart": starts.tolist(), "FrameDuration": durations.tolist()}


def check_pair_headers(pair) -> None:
    """Header and sidecar checks of one PET/T1w pair (raises DataError)."""
    check_header(pair.t1w, "T1w")
    pet = check_header(pair.pet, "PET")
    check_pet_sidecar(pair.pet, pair.pet_meta, pet["frames"])
