"""AAL116 region extraction (paper section 3.2): writing and reading region files.

Participant level
    :func:`compute_region_outputs` turns a subject's MNI-space modulated GM map and normalized
    PET map (both on the 121x145x121 grid) into

    * the region file (``..._seg-AAL116_res-1p5_regions.npz``): for GM and PET the compact
      vector of every region's own voxels (see :mod:`bids_siamfuse.model.data`) and the
      atlas/grid signature. NumPy ``.npz`` rather than HDF5: no extra dependency, one
      compressed file of ~2 MB that ``np.load`` reads in milliseconds, and nothing in it needs
      partial reads;
    * ``..._seg-AAL116_desc-gm_morph.tsv``: per region the GM volume (mm3) from the modulated
      map;
    * ``..._seg-AAL116_desc-pet_stats.tsv``: per region the mean normalized uptake.

Reading
    :func:`find_region_files` lists the region files of a derivatives folder and
    :func:`read_region_arrays` reads one, fully checked (the group level's cohort,
    :mod:`bids_siamfuse.group.cohort`, and the model application, :mod:`bids_siamfuse.apply`).
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import numpy as np

from ..data.atlas import load_atlas
from ..data.templates import GRID_SHAPE, RES_LABEL, SPACE
from ..errors import DataError
from ..model.data import (
    RegionLayout,
    check_signature,
    extract,
    layout_from_labels,
    signature_text,
)

LOGGER = logging.getLogger("bids_siamfuse.regions")
VOXEL_VOLUME_MM3 = 1.5**3
REGION_FILE_VERSION = 1


@functools.lru_cache(maxsize=1)
def atlas_layout() -> RegionLayout:
    """The region layout of the AAL116 atlas on the output grid."""
    atlas = load_atlas()
    return layout_from_labels(atlas.labels, atlas.names, atlas.signature())


def _check_grid_array(name: str, data: np.ndarray) -> np.ndarray:
    data = np.asarray(data)
    if data.shape != GRID_SHAPE:
        raise DataError(f"{name}: shape {data.shape} is not the {GRID_SHAPE} grid")
    if not np.isfinite(data).all():
        raise DataError(f"{name}: holds NaN or infinite values")
    return data


def compute_region_outputs(gm_modulated: np.ndarray, pet: np.ndarray, layout=None):
    """(payload for the .npz, GM morphometry table, PET statistics table)."""
    import pandas as pd

    layout = layout or atlas_layout()
    gm = extract(_check_grid_array("GM map", gm_modulated), layout)
    pt = extract(_check_grid_array("PET map", pet), layout)
    payload = {
        "gm": gm.astype(np.float32),
        "pet": pt.astype(np.float32),
        "signature": np.array(signature_text(layout.signature)),
        "version": np.array(REGION_FILE_VERSION),
    }
    index = np.arange(1, layout.n_regions + 1)
    counts = np.diff(layout.offsets)
    gm_sum = np.add.reduceat(gm.astype(np.float64), layout.offsets[:-1])
    gm_table = pd.DataFrame(
        {
            "index": index,
            "name": layout.names,
            "voxels": counts,
            "gm_volume_mm3": gm_sum * VOXEL_VOLUME_MM3,
        }
    )
    nonzero = np.add.reduceat((pt > 0).astype(np.float64), layout.offsets[:-1])
    pet_table = pd.DataFrame(
        {
            "index": index,
            "name": layout.names,
            "voxels": counts,
            "mean_uptake": layout.region_means(pt),
            "nonbackground_fraction": nonzero / counts,
        }
    )
    return payload, gm_table, pet_table


def save_region_file(path: Path, payload: dict) -> Path:
    from ..bids import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **payload)
    return Path(path)


REGION_META = {
    "Description": "AAL116 regions of the modulated GM map and the normalized PET map: for each "
    "modality the values of every region's own voxels, region after region (C order inside "
    "the region's bounding box on the grid).",
    "Atlas": "AAL (SPM8 release, 116 regions), nearest-neighbour on the 1.5 mm grid",
    "SpatialReference": SPACE,
    "Resolution": RES_LABEL,
}
GM_MORPH_META = {
    "gm_volume_mm3": {
        "Description": "GM volume of the region from the modulated GM map",
        "Units": "mm^3",
    },
    "voxels": {"Description": "region voxels on the 1.5 mm grid"},
}
PET_STATS_META = {
    "mean_uptake": {
        "Description": "mean normalized uptake over the region's voxels "
        "(background voxels count as 0)",
        "Units": "arbitrary",
    },
    "nonbackground_fraction": {
        "Description": "share of the region's voxels above the background threshold"
    },
    "voxels": {"Description": "region voxels on the 1.5 mm grid"},
}


def write_region_outputs(
    out_dir, gm_modulated, pet, *, anat_source: dict, pet_source: dict, sources=None
):
    """Compute and write the region file and both summary tables as derivatives.

    ``sources``: BIDS URIs of the inputs, listed as ``Sources`` in the sidecars (the
    participant workflow's region sinks write the same fields).
    """
    from ..bids import output_path, save_json, save_output

    extra = {"Sources": list(sources)} if sources else {}
    payload, gm_table, pet_table = compute_region_outputs(gm_modulated, pet)
    region_path = output_path(out_dir, "regions", pet_source)
    save_json(region_path.with_suffix(".json"), {**REGION_META, **extra})
    save_region_file(region_path, payload)
    gm_meta = {**GM_MORPH_META, **extra}
    save_output(out_dir, "gm_morph", gm_table, source=anat_source, meta=gm_meta)
    pet_meta = {**PET_STATS_META, **extra}
    save_output(out_dir, "pet_stats", pet_table, source=pet_source, meta=pet_meta)
    return region_path


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

_ENTITY = re.compile(r"(?:^|_)([a-zA-Z]+)-([a-zA-Z0-9]+)")


#: Arrays a region file must hold (anything else is ignored).
REGION_KEYS = ("gm", "pet", "signature")


def read_region_arrays(
    path: Path,
    layout: RegionLayout,
    *,
    than: str = "this run",
    remedy: str = "rerun the participant level",
):
    """(gm, pet) float32 vectors of one region file, fully checked; DataError (65) naming it.

    The one reader of region files (the group level's cohort and the model application both
    use it). Checks: a readable zip (a truncated file failed as ``BadZipFile``, exit 1), the
    arrays present, the atlas/grid signature against ``layout``'s
    (:func:`~bids_siamfuse.model.data.check_signature`; ``than``/``remedy`` word the message),
    1-D numeric vectors of the layout's voxel count, finite values (a NaN trained the model on
    NaN loss before).
    """
    import zipfile

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in REGION_KEYS if k not in f.files]
            if missing:
                raise DataError(f"{path}: not a region file (no {', '.join(missing)} array)")
            signature = str(f["signature"])
            gm, pet = f["gm"], f["pet"]
    except DataError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib_error()) as exc:
        raise DataError(f"{path}: unreadable region file ({type(exc).__name__}: {exc})") from None
    check_signature(signature, layout, where=str(path), than=than, remedy=remedy)
    n_voxels = layout.n_voxels
    for name, arr in (("gm", gm), ("pet", pet)):
        if arr.dtype.kind not in "fiu":
            raise DataError(f"{path}: '{name}' holds {arr.dtype} values, expected numbers")
        if arr.ndim != 1 or arr.shape != (n_voxels,):
            raise DataError(f"{path}: '{name}' has shape {arr.shape}, expected ({n_voxels},)")
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise DataError(f"{path}: '{name}' holds {bad} NaN/infinite value(s)")
    return gm.astype(np.float32), pet.astype(np.float32)


def zlib_error():
    import zlib

    return zlib.error


def parse_entities(name: str) -> dict:
    return {k: v for k, v in _ENTITY.findall(name.split(".")[0])}


def find_region_files(deriv_dir: Path, tracer: str = "FDG") -> list[Path]:
    deriv_dir = Path(deriv_dir)
    pattern = f"*_trc-{tracer}_*space-{SPACE}_seg-AAL116_res-{RES_LABEL}_regions.npz"
    files = sorted(deriv_dir.glob(f"sub-*/pet/{pattern}"))
    files += sorted(deriv_dir.glob(f"sub-*/ses-*/pet/{pattern}"))
    return sorted(files)
