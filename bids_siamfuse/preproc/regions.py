"""AAL116 region extraction (paper section 3.2) and the group-level cohort loader.

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

Group level
    :func:`load_cohort` finds every region file under a derivatives folder, checks that all share
    the current atlas/grid signature, joins the diagnosis from ``participants.tsv`` and reads the
    data into contiguous (subjects x voxels) arrays without touching the MNI maps again.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path

import numpy as np

from ..data.atlas import load_atlas
from ..data.templates import GRID_SHAPE, RES_LABEL, SPACE
from ..errors import DataError, NoInputError, NothingSelectedError
from ..model.data import RegionDataset, RegionLayout, extract, layout_from_labels

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
        "signature": np.array(json.dumps(layout.signature, sort_keys=True)),
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
# Group level
# ----------------------------------------------------------------------------------------------

_ENTITY = re.compile(r"(?:^|_)([a-zA-Z]+)-([a-zA-Z0-9]+)")


#: Arrays a region file must hold (anything else is ignored).
REGION_KEYS = ("gm", "pet", "signature")


def read_region_arrays(path: Path, n_voxels: int | None, expected_signature: str | None = None):
    """(gm, pet, signature) of one region file, fully checked; DataError (65) naming it.

    Checks: a readable zip (a truncated file failed as ``BadZipFile``, exit 1), the arrays
    present, 1-D float vectors of the layout's voxel count, finite values (a NaN trained the
    model on NaN loss before), and the atlas/grid signature.
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
    if expected_signature is not None and signature != expected_signature:
        raise DataError(
            f"{path}: made with another atlas or grid than this run "
            "(signature mismatch); rerun the participant level"
        )
    for name, arr in (("gm", gm), ("pet", pet)):
        if arr.dtype.kind not in "fiu":
            raise DataError(f"{path}: '{name}' holds {arr.dtype} values, expected numbers")
        if arr.ndim != 1 or (n_voxels is not None and arr.shape != (n_voxels,)):
            raise DataError(f"{path}: '{name}' has shape {arr.shape}, expected ({n_voxels},)")
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise DataError(f"{path}: '{name}' holds {bad} NaN/infinite value(s)")
    return gm.astype(np.float32), pet.astype(np.float32), signature


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


def load_cohort(
    deriv_dir: Path,
    participants,
    *,
    label_column: str = "diagnosis",
    classes=("CN", "AD"),
    tracer: str = "FDG",
    participant_label=None,
    session_label=None,
    layout: RegionLayout | None = None,
    include_flagged: bool = False,
) -> RegionDataset:
    """Read every selected region file into a :class:`RegionDataset`.

    ``participants`` is the table from :func:`bids_siamfuse.bids.read_participants`. Sessions
    of subjects whose diagnosis is not in ``classes`` are left out (with a log line), as are
    sessions flagged by participant QC unless ``include_flagged``; a subject
    missing from ``participants.tsv`` is an error, as is a file whose signature differs.
    """
    deriv_dir = Path(deriv_dir)
    if not deriv_dir.is_dir():
        raise NoInputError(f"{deriv_dir}: no such derivatives folder")
    files = find_region_files(deriv_dir, tracer)
    if not files:
        raise NoInputError(
            f"{deriv_dir}: no region files (*_trc-{tracer}_*_seg-AAL116_*_regions.npz); "
            "run the participant level first"
        )
    layout = layout or atlas_layout()
    expected = json.dumps(layout.signature, sort_keys=True)
    classes = tuple(classes)
    if len(set(classes)) < 2:
        raise DataError(f"--classes needs at least two different labels, got {list(classes)}")
    from .qc import session_flag

    selected = []
    unknown_subjects = []
    other = {}
    n_flagged = 0
    for path in files:
        ent = parse_entities(path.name)
        sub, ses = ent.get("sub"), ent.get("ses", "")
        if participant_label and sub not in participant_label:
            continue
        if session_label and ses not in session_label:
            continue
        if sub not in participants.index:
            unknown_subjects.append(sub)
            continue
        if not include_flagged and session_flag(deriv_dir, path)[0]:
            n_flagged += 1  # participant QC flagged it (preproc/qc.py)
            continue
        label = participants.loc[sub, label_column]
        if label not in classes:
            other[label] = other.get(label, 0) + 1
            continue
        selected.append((path, sub, ses, classes.index(label)))
    if unknown_subjects:
        raise DataError(
            "participants.tsv lacks subject(s) with derivatives: "
            + ", ".join(f"sub-{s}" for s in sorted(set(unknown_subjects)))
        )
    if other:
        LOGGER.info("left out (label not in --classes): %s", other)
    if n_flagged:
        LOGGER.info("left out (flagged by participant QC): %d session(s)", n_flagged)
    if not selected:
        present = sorted(set(participants[label_column]))
        raise NothingSelectedError(
            f"no region file belongs to the classes {list(classes)} "
            f"(labels in participants.tsv: {present})"
        )
    found = {c: sum(1 for s in selected if s[3] == i) for i, c in enumerate(classes)}
    missing = [c for c, n in found.items() if n == 0]
    if missing:
        raise DataError(
            f"no subject of class(es) {missing} among the derivatives (found {found}); "
            "check --classes and participants.tsv"
        )
    n, v = len(selected), layout.n_voxels
    gm = np.empty((n, v), dtype=np.float32)
    pet = np.empty((n, v), dtype=np.float32)
    for i, (path, *_rest) in enumerate(selected):
        gm[i], pet[i], _ = read_region_arrays(path, v, expected)
    return RegionDataset(
        gm=gm,
        pet=pet,
        labels=np.array([s[3] for s in selected], dtype=np.int64),
        classes=classes,
        subjects=np.array([s[1] for s in selected]),
        sessions=np.array([s[2] for s in selected]),
        layout=layout,
        sources=tuple(str(s[0]) for s in selected),
    )
