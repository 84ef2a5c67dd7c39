"""Writing derivatives: every file through :mod:`bids_siamfuse.atomic` (never half-written).

:func:`save_output` names output ``key`` of :data:`~bids_siamfuse.bids.naming.OUTPUTS` and
writes it with its JSON sidecar (sidecar first; removed again when the data write fails);
:func:`save_image`/:func:`save_table`/:func:`save_json` write one file each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..atomic import atomic_path
from .naming import build_path, output_meta, output_spec, sidecar_path


def save_json(path: Path, data: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=json_default) + "\n")
    return Path(path)


def json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def save_image(path: Path, img, *, dtype=None, space_code: int | None = None) -> Path:
    """Write a nibabel image atomically; ``dtype`` coerces the data, sform/qform codes set."""
    import nibabel as nb
    import numpy as np

    img = nb.Nifti1Image(
        np.asanyarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype),
        img.affine,
        img.header,
    )
    if dtype is not None:
        img.set_data_dtype(dtype)
        img.header.set_slope_inter(1.0, 0.0)
    code = space_code if space_code is not None else int(img.header["sform_code"]) or 1
    img.set_sform(img.affine, code)
    img.set_qform(img.affine, code)
    img.header.set_xyzt_units("mm", img.header.get_xyzt_units()[1])
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))
    return Path(path)


def save_table(path: Path, table) -> Path:
    """Write a DataFrame as a BIDS TSV (n/a for missing values) atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    return Path(path)


def save_derivative(
    out_dir: Path,
    obj,
    *,
    source: dict,
    datatype: str,
    suffix: str,
    extension: str,
    meta: dict | None = None,
    dtype=None,
    **entities,
) -> Path:
    """Name and write one derivative (image, table, dict or existing file) with its sidecar.

    ``source`` holds the entities inherited from the input (subject, session, tracer...);
    ``entities`` adds or overrides (space, res, label, desc...). The sidecar JSON is written
    before the data, so a data file present on disk always has its metadata.
    """

    ent = {**source, **entities}
    rel = build_path(ent, datatype=datatype, suffix=suffix, extension=extension)
    path = Path(out_dir) / rel
    sidecar = sidecar_path(path, extension)
    if meta is not None:
        save_json(sidecar, meta)
    try:
        return _save_data(path, obj, ent, extension=extension, dtype=dtype)
    except BaseException:
        # a disk full (or an interrupt) while writing the data: no sidecar left without its
        # data file (13 were, after a disk-full run)
        if meta is not None and not path.exists():
            sidecar.unlink(missing_ok=True)
        raise


def _save_data(path: Path, obj, ent: dict, *, extension: str, dtype=None) -> Path:
    """The data part of :func:`save_derivative` (image, table, dict or existing file)."""
    import nibabel as nb

    space = ent.get("space")
    if isinstance(obj, (str, Path)):
        src = Path(obj)
        if extension.startswith(".nii"):
            obj = nb.load(str(src))
        elif extension == ".svg":  # reportlets: embedded PNGs as lossless WebP (~3x smaller)
            from ..reports.compress import compress_svg_text

            text = src.read_text(encoding="utf-8", errors="replace")
            with atomic_path(path) as tmp:
                tmp.write_text(compress_svg_text(text), encoding="utf-8")
            return path
        else:
            with atomic_path(path) as tmp:
                shutil.copyfile(src, tmp)
            return path
    if isinstance(obj, nb.spatialimages.SpatialImage):
        code = 4 if space and space.startswith("MNI") else (2 if space else 1)
        save_image(path, obj, dtype=dtype, space_code=code)
    elif hasattr(obj, "to_csv"):
        save_table(path, obj)
    elif isinstance(obj, dict):
        save_json(path, obj)
    else:
        raise TypeError(f"cannot save a {type(obj).__name__} as a derivative")
    return path


def save_output(
    out_dir: Path, key: str, obj, *, source: dict, meta: dict | None = None, dtype=None
) -> Path:
    """Write output ``key`` of :data:`OUTPUTS` (see :func:`save_derivative`)."""
    spec = output_spec(key)
    meta = output_meta(key, meta)
    return save_derivative(out_dir, obj, source=source, meta=meta, dtype=dtype, **spec)
