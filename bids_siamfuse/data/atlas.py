"""The AAL 116-region atlas (SPM8 release) on the 1.5 mm output grid.

The atlas is obtained through ``nilearn.datasets.fetch_atlas_aal(version="SPM8")``, which reads
``$NILEARN_DATA/aal_SPM8`` when it is there (the container prefetches it; tests point
``NILEARN_DATA`` at a read-only copy) and downloads it only when it is absent.

Region order: the atlas's own order (``ROI_MNI_V4.txt``, AAL codes 2001..9170 ascending), and
region *index* r = 1..116 in that order; index 0 is background. The index, the AAL code and the
name are listed by :func:`region_table`. The source file's SHA-256 is part of the atlas
signature that region files and model bundles carry.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NoInputError
from .templates import GRID_AFFINE, GRID_SHAPE, array_digest, grid_image, grid_signature

ATLAS_NAME = "AAL116"


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
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_aal_files() -> tuple[Path, list[str], list[int]]:
    """The AAL image path, names and codes, through nilearn (offline when prefetched)."""
    from nilearn import datasets

    try:
        aal = datasets.fetch_atlas_aal(version="SPM8", verbose=0)
    except Exception as exc:  # noqa: BLE001 - nilearn raises many kinds when offline
        raise NoInputError(
            "the AAL atlas is not available and could not be downloaded "
            f"({type(exc).__name__}: {exc}); set NILEARN_DATA to a folder holding aal_SPM8"
        ) from None
    names = list(aal.labels)
    codes = list(aal.indices)
    if names and names[0] == "Background":
        names, codes = names[1:], codes[1:]
    return Path(aal.maps), names, [int(c) for c in codes]


@functools.lru_cache(maxsize=2)
def load_atlas() -> Atlas:
    """AAL116 resampled by nearest neighbour onto the 121x145x121 1.5 mm grid."""
    import nibabel as nb
    from scipy import ndimage

    path, names, codes = fetch_aal_files()
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
