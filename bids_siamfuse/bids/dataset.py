"""The derivatives dataset's own files: ``dataset_description.json``, ``README.md``,
``.bidsignore`` (written once, safely when many jobs start together), and the container
and source-dataset provenance they record."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from .._version import __version__
from ..atomic import atomic_path, publish_once
from ..errors import CannotWriteError
from .naming import BIDSIGNORE

LOGGER = logging.getLogger("bids_siamfuse.bids")

PIPELINE_NAME = "bids_siamfuse"
CODE_URL = "https://github.com/bids-siamfuse/bids_siamfuse"

#: Environment variable naming the input dataset's location as the user sees it (the host path
#: when the app runs in a container, where BIDS_DIR is a mount point such as /data).
HOST_BIDS_DIR_ENV = "BIDS_SIAMFUSE_HOST_BIDS_DIR"
# Docker creates it in every container; the variable lets a test suite that itself runs in a
# container (CI) behave as on a bare machine (tests/conftest.py)
_DOCKERENV = Path(os.environ.get("BIDS_SIAMFUSE_DOCKERENV", "/.dockerenv"))


def container_info() -> dict | None:
    """``GeneratedBy.Container`` when this process runs in a container, else None.

    Detected the usual way: Docker creates ``/.dockerenv``; Apptainer/Singularity set
    ``APPTAINER_NAME``/``SINGULARITY_NAME`` (the image file's name) in the container.
    ``BIDS_SIAMFUSE_CONTAINER_TAG`` overrides the tag (the image sets its own version).
    """
    tag = os.environ.get("BIDS_SIAMFUSE_CONTAINER_TAG") or f"{PIPELINE_NAME}:{__version__}"
    for var in ("APPTAINER_NAME", "SINGULARITY_NAME"):
        if os.environ.get(var):
            kind = "apptainer" if var.startswith("APPTAINER") else "singularity"
            return {
                "Type": kind,
                "Tag": os.environ.get("BIDS_SIAMFUSE_CONTAINER_TAG") or os.environ[var],
            }
    if _DOCKERENV.exists():
        return {"Type": "docker", "Tag": tag}
    return None


def source_location(bids_dir: Path, out_dir: Path | None = None) -> str | None:
    """Where the input dataset is, as seen from outside this process (for ``DatasetLinks``).

    1. the relative path from ``out_dir`` up to the input when the input is a parent of the
       output (``../..`` for ``BIDS_DIR/derivatives/bids_siamfuse``): valid wherever the two
       folders travel together, inside or outside a container;
    2. else ``$BIDS_SIAMFUSE_HOST_BIDS_DIR`` when set (the host path of a container's mount);
    3. else, in a container, None (the mount point, e.g. ``/data``, means nothing outside it);
    4. else the path the user gave (made absolute).
    """
    bids_dir = Path(bids_dir).absolute()
    if out_dir is not None:
        out_dir = Path(out_dir).absolute()
        for raw, out in ((bids_dir, out_dir), (bids_dir.resolve(), out_dir.resolve())):
            try:
                out.relative_to(raw)
            except ValueError:
                continue
            return Path(os.path.relpath(raw, out)).as_posix()
    host = os.environ.get(HOST_BIDS_DIR_ENV, "").strip()
    if host:
        return host
    if container_info() is not None:
        return None
    return str(bids_dir)


def dataset_description(bids_dir: Path | None, out_dir: Path | None = None) -> dict:
    generated = {
        "Name": PIPELINE_NAME,
        "Version": __version__,
        "CodeURL": CODE_URL,
        "Description": "T1w/FDG-PET preprocessing, AAL116 regions and a siamese-attention"
        " classifier (Arco et al.)",
    }
    container = container_info()
    if container is not None:
        generated["Container"] = container
    desc = {
        "Name": "bids_siamfuse derivatives",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "HowToAcknowledge": "Cite the software (CITATION.cff) and the method paper; see "
        "logs/CITATION.md for the methods boilerplate.",
    }
    if bids_dir is not None:
        bids_dir = Path(bids_dir).absolute()
        location = source_location(bids_dir, out_dir)
        source = {}
        if location is not None:
            source["URL"] = location
        else:
            LOGGER.warning(
                "running in a container: the input dataset's host path is unknown, so "
                "dataset_description.json records no DatasetLinks.raw; set %s to record it",
                HOST_BIDS_DIR_ENV,
            )
        with contextlib.suppress(OSError, ValueError, json.JSONDecodeError):
            raw = json.loads((bids_dir / "dataset_description.json").read_text())
            if raw.get("DatasetDOI"):
                source["DOI"] = raw["DatasetDOI"]
        if source:
            desc["SourceDatasets"] = [source]
        if location is not None:
            desc["DatasetLinks"] = {"raw": location}  # for bids:raw:... Sources URIs
    return desc


DERIVATIVES_README = """\
# bids_siamfuse derivatives

Written by bids_siamfuse (https://github.com/bids-siamfuse/bids_siamfuse): per subject and
session, the preprocessed T1w and FDG-PET on the 121x145x121 1.5 mm MNI grid, their 116 AAL
regions (`*_regions.npz`), QC figures and `sub-<label>.html` reports; `group/` holds the
cross-validated model and its report. `dataset_description.json` links the input dataset
(`DatasetLinks.raw`); `logs/` holds each run's settings and the methods text (`CITATION.md`).
Every file is described in the project's docs/outputs.md; `.bidsignore` lists the files BIDS
has no naming rule for.
"""


def ensure_readme(out_dir: Path) -> Path:
    """``OUT/README.md`` (BIDS recommends one per dataset), unless one is there."""
    path = Path(out_dir) / "README.md"
    if not any((Path(out_dir) / n).exists() for n in ("README", "README.md", "README.txt")):
        with atomic_path(path) as tmp:  # parallel jobs write the same text: last one wins
            tmp.write_text(DERIVATIVES_README)
    return path


def ensure_bidsignore(out_dir: Path) -> Path:
    """Write ``OUT/.bidsignore`` with :data:`BIDSIGNORE`, keeping lines a user added.

    Every job writes the same content atomically (last writer wins), so parallel array tasks
    are safe.
    """
    path = Path(out_dir) / ".bidsignore"
    try:
        current = path.read_text().splitlines() if path.is_file() else []
    except (OSError, UnicodeDecodeError):
        current = []
    missing = [line for line in BIDSIGNORE if line not in current]
    if not missing:
        return path
    header = "# bids_siamfuse: files BIDS has no naming rule for (docs/outputs.md)"
    lines = current or [header]
    text = "\n".join([*lines, *missing]) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def ensure_dataset_description(out_dir: Path, bids_dir: Path | None) -> Path:
    """Write ``dataset_description.json`` unless a valid one is there (race-free), and the
    ``.bidsignore`` (:func:`ensure_bidsignore`).

    Many participant jobs may start at once on one output folder: each writes a private
    temporary file and *links* it into place, which fails for all but the first, so readers
    never see a partial file and no job overwrites another's.
    """
    out_dir = Path(out_dir)
    path = out_dir / "dataset_description.json"
    with contextlib.suppress(CannotWriteError):
        ensure_bidsignore(out_dir)  # never fatal: the description below reports write errors
        ensure_readme(out_dir)
    if path.is_file():
        try:
            current = json.loads(path.read_text())
            names = [g.get("Name") for g in current.get("GeneratedBy", [])]
            if PIPELINE_NAME not in names:
                LOGGER.warning(
                    "%s was written by %s, not %s; leaving it alone", path, names, PIPELINE_NAME
                )
            return path
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            LOGGER.warning("%s is not valid JSON; replacing it", path)
    text = json.dumps(dataset_description(bids_dir, out_dir), indent=2) + "\n"
    publish_once(path, lambda tmp: tmp.write_text(text), replace=path.exists())
    return path
