"""The AAL 116-region atlas (SPM8 release) on the 1.5 mm output grid.

The atlas ships inside the package (``data/aal/``: ``ROI_MNI_V4.nii.gz``, the SPM8 release's
``ROI_MNI_V4.nii`` gzip-compressed byte for byte, its label list ``ROI_MNI_V4.txt`` and the
distribution's own readme with the terms), so nothing downloads at run time. Provenance,
reference and terms: ``docs/outputs.md`` ("The atlas"). nilearn's layout stays an alternative
source: with ``BIDS_SIAMFUSE_ATLAS_SOURCE=nilearn`` the files come from
``nilearn.datasets.fetch_atlas_aal(version="SPM8")`` (``$NILEARN_DATA/aal_SPM8``, downloaded by
nilearn only when absent). Both sources hold the same bytes, so they give the same signature.

Region order: the atlas's own order (``ROI_MNI_V4.txt``, AAL codes 2001..9170 ascending), and
region *index* r = 1..116 in that order; index 0 is background. The index, the AAL code and the
name are listed by :func:`region_table`. The SHA-256 of the uncompressed NIfTI is part of the
atlas signature that region files and model bundles carry.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NoInputError
from .templates import GRID_AFFINE, GRID_SHAPE, array_digest, grid_image, grid_signature

ATLAS_NAME = "AAL116"
PACKAGED_AAL = Path(__file__).with_name("aal")
#: where the atlas comes from: "package" (default, offline) or "nilearn" (nilearn's fetcher)
SOURCE_ENV = "BIDS_SIAMFUSE_ATLAS_SOURCE"


@dataclass(frozen=True)
class Atlas:
    """AAL labels on the output grid: ``labels[i, j, k]`` in 0..116."""

    labels: np.ndarray
    names: tuple[str, ...]
    codes: tuple[int, ...]
    source: str
    source_sha256: str

    @property
    def n_regions(self) -> int:
        return len(self.names)

    def image(self):
        return grid_image(self.labels, dtype=np.int16)

    def signature(self) -> dict:
        return {
            "atlas": ATLAS_NAME,
            "atlas_source_sha256": self.source_sha256,
            "labels_digest": array_digest(self.labels),
            "n_regions": self.n_regions,
            **grid_signature(),
        }

    def region_table(self):
        import pandas as pd

        return pd.DataFrame(
            {"index": np.arange(1, self.n_regions + 1), "code": self.codes, "name": self.names}
        )


def _sha256(path: Path) -> str:
    """SHA-256 of the NIfTI bytes (of the decompressed stream for ``.nii.gz``)."""
    h = hashlib.sha256()
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_label_list(path: Path) -> tuple[list[str], list[int]]:
    """``ROI_MNI_V4.txt``: one ``<abbrev> <name> <code>`` line per region."""
    names, codes = [], []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3:
            names.append(fields[1])
            codes.append(int(fields[2]))
    return names, codes


def _nilearn_aal_files() -> tuple[Path, list[str], list[int]]:
    from nilearn import datasets

    try:
        aal = datasets.fetch_atlas_aal(version="SPM8", verbose=0)
    except Exception as exc:  # noqa: BLE001 - nilearn raises many kinds when offline
        raise NoInputError(
            f"the AAL atlas is not in nilearn's data folder and could not be downloaded "
            f"({type(exc).__name__}: {exc}); unset {SOURCE_ENV} to use the packaged copy"
        ) from None
    names = list(aal.labels)
    codes = list(aal.indices)
    if names and names[0] == "Background":
        names, codes = names[1:], codes[1:]
    return Path(aal.maps), names, [int(c) for c in codes]


def fetch_aal_files(source: str | None = None) -> tuple[Path, list[str], list[int]]:
    """The AAL image path, names and codes: the packaged copy unless nilearn's is asked for."""
    source = source or os.environ.get(SOURCE_ENV, "package")
    if source == "nilearn":
        return _nilearn_aal_files()
    if source != "package":
        raise NoInputError(f"{SOURCE_ENV}={source!r}: expected 'package' or 'nilearn'")
    image = PACKAGED_AAL / "ROI_MNI_V4.nii.gz"
    names, codes = _read_label_list(PACKAGED_AAL / "ROI_MNI_V4.txt")
    return image, names, codes


def load_atlas() -> Atlas:
    """AAL116 resampled by nearest neighbour onto the 121x145x121 1.5 mm grid."""
    return _load_atlas(os.environ.get(SOURCE_ENV, "package"))


@functools.lru_cache(maxsize=2)
def _load_atlas(source: str) -> Atlas:
    import nibabel as nb
    from scipy import ndimage

    path, names, codes = fetch_aal_files(source)
    img = nb.load(str(path))
    data = np.asanyarray(img.dataobj).astype(np.int32)
    # voxel (i, j, k) of the grid -> voxel of the atlas image, nearest neighbour
    vox2vox = np.linalg.inv(img.affine) @ GRID_AFFINE
    coords = np.indices(GRID_SHAPE, dtype=np.float32).reshape(3, -1)
    src = vox2vox[:3, :3] @ coords + vox2vox[:3, 3:4]
    raw = ndimage.map_coordinates(data, src, order=0, mode="constant", cval=0)
    lookup = {code: index for index, code in enumerate(codes, start=1)}
    table = np.zeros(int(data.max()) + 1, dtype=np.int16)
    for code, index in lookup.items():
        table[code] = index
    labels = table[raw.reshape(GRID_SHAPE)]
    return Atlas(
        labels=labels,
        names=tuple(names),
        codes=tuple(codes),
        source=str(path),
        source_sha256=_sha256(path),
    )
