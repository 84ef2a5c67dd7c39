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
import math
import os
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
    # Python integers: np.prod in int64 wrapped to 0 for a NIfTI-2 header of 2**40 per axis
    nbytes = math.prod(shape) * max(dtype.itemsize, 4)
    limit = MAX_IMAGE_BYTES[kind]
    if nbytes > limit:
        raise DataError(
            f"{path}: {nbytes / 1024**3:.1f} GB in memory (shape {shape}), over "
            f"the {limit / 1024**3:.0f} GB limit for a {kind}; crop or downsample it"
        )
    _check_raw_header(path, img)
    _check_expansion(path, img, shape, dtype)
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


def _check_raw_header(path: Path, img) -> None:
    """Voxel sizes as stored: nibabel silently turns a zero ``pixdim`` into 1 mm on load.

    The qform's voxel sizes are ``pixdim[1:4]`` (used when ``qform_code`` > 0, or when neither
    form is set); the sform carries its own (checked through the affine in :func:`check_header`).
    """
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as handle:
            raw = type(img.header).from_fileobj(handle, check=False)
    except Exception as exc:  # noqa: BLE001 - the header was just read once; report plainly
        raise DataError(f"{path}: unreadable header ({_short(exc)})") from None
    qcode, scode = int(raw["qform_code"]), int(raw["sform_code"])
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=float)
    if qcode > 0 or scode == 0:
        if not np.isfinite(pixdim).all() or np.any(np.abs(pixdim) < 1e-3):
            raise DataError(
                f"{path}: zero or invalid voxel size in the header (pixdim "
                f"{np.round(pixdim, 4).tolist()}{', qform' if qcode else ''}); "
                "fix the header rather than let a reader assume 1 mm"
            )


#: Largest size a compressed image may declare without being compared with its file size.
GZIP_CHECK_ABOVE = 64 * 1024**2
#: Largest expansion of a ``.nii.gz`` (declared data size / file size). Real scans compress
#: 2-10x (skull-stripped PET with much background up to ~30x); gzip's ceiling is ~1030x, which
#: a 1.9 MB file that expands to 1.9 GB of zeros reaches.
MAX_GZIP_RATIO = 200


def _check_expansion(path: Path, img, shape, dtype) -> None:
    """A small ``.gz`` that declares a huge image (decompression bomb) is refused."""
    if not str(path).endswith(".gz"):
        return
    declared = math.prod(shape) * dtype.itemsize + int(img.header.get("vox_offset", 0) or 0)
    size = max(Path(path).stat().st_size, 1)
    if declared > GZIP_CHECK_ABOVE and declared / size > MAX_GZIP_RATIO:
        raise DataError(
            f"{path}: a {size / 1024**2:.1f} MB file that expands to "
            f"{declared / 1024**3:.2f} GB ({declared / size:.0f}x, over the {MAX_GZIP_RATIO}x "
            "a real scan compresses); refused as a possible decompression bomb"
        )


#: Smallest field of view (mm) and voxel count per axis, largest voxel count per axis, per
#: modality. Below them registration to MNI fails minutes into preprocessing (a 2 mm slab).
MIN_FOV_MM = {"T1w": 100.0, "PET": 60.0}
MIN_VOXELS = {"T1w": 32, "PET": 16}
MAX_VOXELS = {"T1w": 2048, "PET": 1024}
MAX_FRAMES = 1000


def check_extent(path: Path, info: dict, kind: str) -> None:
    """Shape limits per modality (planning time; :func:`check_header` gives ``info``)."""
    shape, zooms = info["shape"][:3], info["zooms"]
    fov = [round(n * z, 1) for n, z in zip(shape, zooms)]
    if min(shape) < MIN_VOXELS[kind] or min(fov) < MIN_FOV_MM[kind]:
        raise DataError(
            f"{path}: too small for a {kind} (shape {tuple(shape)}, field of view {fov} mm; "
            f"at least {MIN_VOXELS[kind]} voxels and {MIN_FOV_MM[kind]:g} mm per axis)"
        )
    if max(shape) > MAX_VOXELS[kind]:
        raise DataError(
            f"{path}: {max(shape)} voxels along one axis, over the {MAX_VOXELS[kind]} "
            f"accepted for a {kind}"
        )
    if info["frames"] > MAX_FRAMES:
        raise DataError(f"{path}: {info['frames']} frames, over the {MAX_FRAMES} accepted")


def check_labels(pair) -> None:
    """Entity labels must be BIDS labels that fit in every derivative's file name."""
    from .bids import OUTPUTS, output_path
    from .safety import LABEL, MAX_LABEL

    for key, value in pair.source_entities.items():
        if value is None:
            continue
        text = str(value)
        if not LABEL.match(text) or len(text) > MAX_LABEL:
            raise DataError(
                f"{pair.pet}: the {key} label {text[:40]!r}{'...' if len(text) > 40 else ''} "
                f"({len(text)} characters) is not a BIDS label of at most {MAX_LABEL} letters "
                "and digits"
            )
    longest = max(
        (output_path(Path("/"), key, pair.source_entities).name for key in OUTPUTS), key=len
    )
    if len(longest.encode()) > 255:
        raise DataError(
            f"{pair.pet}: its labels make derivative names of {len(longest.encode())} bytes "
            "(file names stop at 255)"
        )


def check_data(path: Path, kind: str):
    """Read the voxels and check them; returns the (possibly cleaned) float32 array and image."""
    img = _load(path)
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: truncated or corrupt image data ({_short(exc)})") from None
    if data.dtype.kind == "f" and data.dtype.itemsize > 4:
        # float64 values beyond float32's range would turn into inf below and be reported as
        # "NaN/infinite voxels"; name them for what they are
        big = np.isfinite(data) & (np.abs(data) > np.finfo(np.float32).max)
        if big.any():
            raise DataError(
                f"{path}: {int(big.sum())} voxel(s) beyond float32's range (largest "
                f"{float(np.abs(data[big]).max()):.3g}); rescale the image"
            )
    data = np.asarray(data, dtype=np.float32)
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


def _numbers(path: Path, name: str, value) -> np.ndarray:
    """A sidecar field that must hold a number or a flat list of numbers (DataError if not)."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in items
    ):
        shown = json_preview(value)
        sidecar = sidecar_of(path)
        where = sidecar if sidecar.is_file() else f"{path} (its sidecar)"
        raise DataError(
            f"{where}: field {name} must be a number or a list of numbers, got {shown}"
        )
    return np.atleast_1d(np.asarray(items, dtype=float))


def json_preview(value, limit: int = 60) -> str:
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar beside an image (``x.nii.gz`` -> ``x.json``)."""
    name = Path(path).name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.rsplit(".", 1)[0]
    return Path(path).with_name(stem + ".json")


def _sidecar_problem(path: Path) -> None:
    """The PET's own sidecar exists but was left out of the index: say why (DataError)."""
    import json

    sidecar = sidecar_of(path)
    if not sidecar.is_file():
        return
    try:
        value = json.loads(sidecar.read_text())
    except (ValueError, OSError) as exc:
        raise DataError(f"{sidecar}: not readable JSON ({_short(exc)})") from None
    if not isinstance(value, dict):
        raise DataError(
            f"{sidecar}: a JSON {type(value).__name__}, not an object ({json_preview(value)})"
        )


def check_pet_sidecar(path: Path, meta: dict, frames: int) -> dict:
    """Timing fields of a PET sidecar, checked against the image; returns them cleaned."""
    if meta is not None and not isinstance(meta, dict):
        raise DataError(f"{path}: its JSON sidecar is not an object ({json_preview(meta)})")
    _sidecar_problem(path)
    if not meta:
        raise DataError(f"{path}: no JSON sidecar (BIDS requires one for PET)")
    starts = meta.get("FrameTimesStart")
    durations = meta.get("FrameDuration")
    if starts is None or durations is None:
        missing = [k for k in ("FrameTimesStart", "FrameDuration") if meta.get(k) is None]
        raise DataError(f"{path}: sidecar lacks {', '.join(missing)}")
    starts = _numbers(path, "FrameTimesStart", starts)
    durations = _numbers(path, "FrameDuration", durations)
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
    meta_error = getattr(pair, "meta_error", None)
    if meta_error:
        raise DataError(meta_error)
    check_labels(pair)
    t1w = check_header(pair.t1w, "T1w")
    check_extent(pair.t1w, t1w, "T1w")
    pet = check_header(pair.pet, "PET")
    check_extent(pair.pet, pet, "PET")
    check_pet_sidecar(pair.pet, pair.pet_meta, pet["frames"])


def _same_file(paths) -> bool:
    try:
        return len({os.path.realpath(p) for p in paths}) == 1
    except OSError:  # pragma: no cover
        return False


def screen_duplicates(plan) -> None:
    """Pairs that would share one name, resolved or refused *per pair* at planning time.

    * the same file reached through several paths (a directory symbolic link, a loop under
      ``--skip-bids-validation``): kept once, through its shortest path, with a note;
    * two different files with the same entities (a PET stored as ``.nii`` *and*
      ``.nii.gz``): which one is meant cannot be known, so the pair is refused (exit 65 at the
      end) while the other pairs run.

    Before this, both ended the whole dataset with nipype's "Duplicate node name" (exit 1).
    """
    groups: dict[str, list] = {}
    for pair in plan.pairs:
        groups.setdefault(pair.key, []).append(pair)
    keep = []
    for key, pairs in groups.items():
        if len(pairs) == 1:
            keep.append(pairs[0])
            continue
        pets = [p.pet for p in pairs]
        if _same_file(pets) and _same_file([p.t1w for p in pairs]):
            best = min(pairs, key=lambda p: (len(str(p.pet)), str(p.pet)))
            others = sorted((str(p.pet) for p in pairs if p is not best), key=len)
            more = f" and {len(others) - 1} other path(s)" if len(others) > 1 else ""
            best.notes.append(
                f"the same file also reached as {others[0][:200]}{more} (a symbolic link; ignored)"
            )
            LOGGER.warning("%s: the same PET reached through %d paths", key, len(pairs))
            keep.append(best)
            continue
        names = ", ".join(sorted(str(p) for p in pets))
        why = f"{pets[0]}: stored more than once ({names}); keep one file per series"
        LOGGER.error(why)
        plan.invalid.append((pairs[0], why))
    # a T1w stored twice (.nii and .nii.gz) is refused for the pairs that use it
    out = []
    for pair in sorted(keep, key=lambda p: plan.pairs.index(p)):
        twin = _twin(pair.t1w)
        if twin is not None:
            why = f"{pair.t1w}: stored twice ({pair.t1w.name} and {twin.name}); keep one"
            plan.invalid.append((pair, why))
        else:
            out.append(pair)
    plan.pairs = out


def _twin(path: Path) -> Path | None:
    """The same image under the other NIfTI extension, when both exist."""
    name = Path(path).name
    if name.endswith(".nii.gz"):
        other = Path(path).with_name(name[: -len(".gz")])
    elif name.endswith(".nii"):
        other = Path(path).with_name(name + ".gz")
    else:
        return None
    if other.exists() and not _same_file([path, other]):
        return other
    return None
