"""The group level's cohort: which region files take part, and reading exactly those.

:func:`select_region_files` decides once which sessions a group run uses (the participant and
session filters, ``participants.tsv`` labels, participant QC flags); the plan
(:mod:`.plan`) records its choice and :func:`read_cohort` reads exactly the planned files into
contiguous (sessions x voxels) arrays through the one region-file reader
(:func:`bids_siamfuse.preproc.regions.read_region_arrays`), without touching the MNI maps again.
:func:`load_cohort` does both in one call (scripts, benchmarks, tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, NoInputError, NothingSelectedError
from ..model.data import RegionDataset, RegionLayout

LOGGER = logging.getLogger("bids_siamfuse.group")

#: BIDS entity keys of a region file name -> the PET's entity names it inherited.
_SOURCE_KEYS = {
    "sub": "subject",
    "ses": "session",
    "trc": "tracer",
    "acq": "acquisition",
    "rec": "reconstruction",
    "run": "run",
}


def source_from_name(name: str) -> dict:
    """Entities a region file inherited from its PET (subject, session, tracer, acq, rec, run)."""
    from ..preproc.regions import parse_entities

    ent = parse_entities(name)
    return {full: ent[short] for short, full in _SOURCE_KEYS.items() if short in ent}


@dataclass
class Selection:
    """The region files a group run uses, and what it left out."""

    classes: tuple
    files: list  # (path, subject, session, class index)
    left_out: dict = field(default_factory=dict)  # label -> sessions left out (not in classes)
    # sessions left out because participant QC flagged them: (path, subject, session, reasons)
    flagged: list = field(default_factory=list)


def select_region_files(
    deriv_dir: Path,
    participants,
    *,
    label_column: str = "diagnosis",
    classes=("CN", "AD"),
    tracer: str = "FDG",
    participant_label=None,
    session_label=None,
    include_flagged: bool = False,
) -> Selection:
    """The region files of ``deriv_dir`` that a group run of ``classes`` uses.

    ``participants`` is the table of :func:`bids_siamfuse.bids.read_participants`. Sessions of
    subjects whose label is not in ``classes`` are left out (counted per label), as are sessions
    flagged by participant QC unless ``include_flagged``. Errors: no region files (66); a subject
    missing from ``participants.tsv`` (65); nothing of the classes selected (18); a class
    without any file, or fewer than two different classes (65).
    """
    from ..preproc.qc import session_flag
    from ..preproc.regions import find_region_files

    deriv = Path(deriv_dir)
    classes = tuple(classes)
    if len(set(classes)) < 2:
        raise DataError(f"--classes needs at least two different labels, got {list(classes)}")
    files = find_region_files(deriv, tracer) if deriv.is_dir() else []
    if not files:
        raise NoInputError(
            f"{deriv}: no region files (sub-*/[ses-*/]pet/*_trc-{tracer}_*_regions.npz); "
            "run the participant level first"
        )
    selected, unknown_subjects, left_out, flagged = [], set(), {}, []
    for path in files:
        src = source_from_name(path.name)
        sub, ses = src.get("subject"), src.get("session", "")
        if participant_label and sub not in participant_label:
            continue
        if session_label and ses not in session_label:
            continue
        if sub not in participants.index:
            unknown_subjects.add(sub)
            continue
        is_flagged, why = session_flag(deriv, path)
        if is_flagged and not include_flagged:
            flagged.append((path, sub, ses, why))
            continue
        label = str(participants.loc[sub, label_column])
        if label not in classes:
            left_out[label] = left_out.get(label, 0) + 1
            continue
        selected.append((path, sub, ses, classes.index(label)))
    if unknown_subjects:
        raise DataError(
            "participants.tsv lacks subject(s) that have region files: "
            + ", ".join(f"sub-{s}" for s in sorted(unknown_subjects))
        )
    if not selected:
        raise NothingSelectedError(
            f"no region file in {deriv} belongs to a subject of {', '.join(classes)}"
            + (
                " among the selected participants/sessions"
                if participant_label or session_label
                else ""
            )
        )
    found = {c: len({f[1] for f in selected if f[3] == i}) for i, c in enumerate(classes)}
    missing = [c for c, n in found.items() if n == 0]
    if missing:
        raise DataError(
            f"no region files for class(es) {', '.join(missing)} (subjects per class: {found}); "
            "a classification needs every class; run the participant level on them or change "
            "--classes"
        )
    return Selection(classes=classes, files=selected, left_out=left_out, flagged=flagged)


def read_cohort(files, classes, layout: RegionLayout | None = None) -> RegionDataset:
    """Read exactly ``files`` ((path, subject, session, class index) each) into a
    :class:`~bids_siamfuse.model.data.RegionDataset` (every file checked: exit 65 naming it)."""
    from ..preproc.regions import atlas_layout, read_region_arrays

    layout = layout or atlas_layout()
    n, v = len(files), layout.n_voxels
    gm = np.empty((n, v), dtype=np.float32)
    pet = np.empty((n, v), dtype=np.float32)
    for i, (path, *_rest) in enumerate(files):
        gm[i], pet[i] = read_region_arrays(path, layout)
    return RegionDataset(
        gm=gm,
        pet=pet,
        labels=np.array([f[3] for f in files], dtype=np.int64),
        classes=tuple(classes),
        subjects=np.array([f[1] for f in files]),
        sessions=np.array([f[2] for f in files]),
        layout=layout,
        sources=tuple(str(f[0]) for f in files),
    )


def load_cohort(
    deriv_dir: Path, participants, *, layout: RegionLayout | None = None, **filters
) -> RegionDataset:
    """:func:`select_region_files` (``filters``: its keyword arguments) then
    :func:`read_cohort`, in one call; the selection's left-out sessions are logged."""
    deriv_dir = Path(deriv_dir)
    if not deriv_dir.is_dir():
        raise NoInputError(f"{deriv_dir}: no such derivatives folder")
    selection = select_region_files(deriv_dir, participants, **filters)
    if selection.left_out:
        LOGGER.info("left out (label not in --classes): %s", selection.left_out)
    if selection.flagged:
        LOGGER.info("left out (flagged by participant QC): %d session(s)", len(selection.flagged))
    return read_cohort(selection.files, selection.classes, layout)
