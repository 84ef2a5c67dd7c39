"""Region data in memory: the compact per-region layout, the cohort arrays, standardization.

NumPy only (no nipype, pybids or nilearn), so this runs alone on a GPU machine.

Layout
    Each AAL region r has a fixed bounding box on the 121x145x121 grid (the same for every
    subject, so crops line up) and a list of the grid voxels that belong to it. A subject's
    region data is stored *compactly*: for each modality one float32 vector holding, region
    after region, the values of that region's own voxels (C order inside the box). The crop the
    paper feeds to the network (the box, zero outside the region) is rebuilt on demand by
    :meth:`RegionLayout.to_box` (or on the GPU by scattering ``local_index``). 440k voxels
    instead of 2.2M box voxels per modality: a 300-subject cohort takes ~1 GB in float32.

Standardization (paper eq. 1)
    :class:`Standardizer` computes, per region and modality, the mean and SD over all the
    region's voxels of all *training* subjects, and maps ``z = (x - mu) / sigma``; voxels outside
    the region stay 0 in the boxes. Fit it inside each training fold only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

MODALITIES = ("gm", "pet")


def _json_default(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def signature_text(signature: dict) -> str:
    """The one serialization of an atlas/grid signature (region files, cohort files, bundles,
    model states): JSON with sorted keys, so equal signatures give equal text."""
    return json.dumps(signature, sort_keys=True, default=_json_default)


def check_signature(found, layout: RegionLayout, *, where: str, than: str, remedy: str) -> None:
    """Refuse (``DataError``, exit 65) data made with another atlas or grid than ``layout``.

    ``found``: the data's signature (a dict, or its JSON text). The message names the data
    (``where``), what it was compared with (``than``), the signature keys that differ, and what
    to do (``remedy``).
    """
    from ..errors import DataError

    if isinstance(found, str):
        try:
            found = json.loads(found)
        except ValueError as exc:
            raise DataError(f"{where}: unreadable signature ({exc})") from None
    ours = layout.signature
    if isinstance(found, dict) and signature_text(found) == signature_text(ours):
        return
    found = found if isinstance(found, dict) else {}
    differ = sorted(k for k in set(ours) | set(found) if ours.get(k) != found.get(k))
    raise DataError(
        f"{where}: made with another atlas or grid than {than} "
        f"(signature differs in {', '.join(differ) or 'format'}); {remedy}"
    )


@dataclass(frozen=True)
class RegionLayout:
    """Where each region's voxels live: boxes on the grid and indices inside them."""

    boxes: np.ndarray  # (R, 6) int: x0, y0, z0, x1, y1, z1 (half-open) on the grid
    offsets: np.ndarray  # (R + 1,) start of each region in the compact vector
    local_index: np.ndarray  # (V,) C-order flat index of each voxel inside its region's box
    names: tuple
    grid_shape: tuple
    signature: dict = field(default_factory=dict)

    @property
    def n_regions(self) -> int:
        return len(self.names)

    @property
    def n_voxels(self) -> int:
        return int(self.offsets[-1])

    def box_shape(self, r: int) -> tuple[int, int, int]:
        b = self.boxes[r]
        return int(b[3] - b[0]), int(b[4] - b[1]), int(b[5] - b[2])

    def region_slice(self, r: int) -> slice:
        return slice(int(self.offsets[r]), int(self.offsets[r + 1]))

    def to_box(self, values: np.ndarray, r: int) -> np.ndarray:
        """Region r of compact ``values`` (..., V) as its box crop (..., bx, by, bz)."""
        shape = self.box_shape(r)
        lead = values.shape[:-1]
        out = np.zeros((*lead, int(np.prod(shape))), dtype=values.dtype)
        out[..., self.local_index[self.region_slice(r)]] = values[..., self.region_slice(r)]
        return out.reshape(*lead, *shape)

    def grid_index(self) -> np.ndarray:
        """(V,) C-order flat index of every compact voxel on the full grid."""
        out = np.empty(self.n_voxels, dtype=np.int64)
        for r in range(self.n_regions):
            sl = self.region_slice(r)
            shape = self.box_shape(r)
            local = np.unravel_index(self.local_index[sl], shape)
            coords = [local[d] + self.boxes[r, d] for d in range(3)]
            out[sl] = np.ravel_multi_index(coords, self.grid_shape)
        return out

    def paint(self, per_region: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """A grid image with each region's voxels set to its value in ``per_region`` (R,)."""
        per_region = np.asarray(per_region)
        if per_region.shape[0] != self.n_regions:
            raise ValueError(f"expected {self.n_regions} values, got {per_region.shape[0]}")
        grid = np.full(int(np.prod(self.grid_shape)), fill, dtype=np.float32)
        counts = np.diff(self.offsets)
        grid[self.grid_index()] = np.repeat(per_region.astype(np.float32), counts)
        return grid.reshape(self.grid_shape)

    def region_means(self, values: np.ndarray) -> np.ndarray:
        """Mean over each region's voxels: (..., V) -> (..., R)."""
        sums = np.add.reduceat(values.astype(np.float64), self.offsets[:-1], axis=-1)
        return (sums / np.diff(self.offsets)).astype(np.float32)

    def to_arrays(self) -> dict:
        return {
            "layout_boxes": self.boxes,
            "layout_offsets": self.offsets,
            "layout_local_index": self.local_index,
            "layout_names": np.array(self.names),
            "layout_grid_shape": np.array(self.grid_shape),
            "layout_signature": np.array(signature_text(self.signature)),
        }

    @classmethod
    def from_arrays(cls, arrays) -> RegionLayout:
        return cls(
            boxes=np.asarray(arrays["layout_boxes"]),
            offsets=np.asarray(arrays["layout_offsets"]),
            local_index=np.asarray(arrays["layout_local_index"]),
            names=tuple(str(n) for n in arrays["layout_names"]),
            grid_shape=tuple(int(s) for s in arrays["layout_grid_shape"]),
            signature=json.loads(str(arrays["layout_signature"])),
        )


def layout_from_labels(labels: np.ndarray, names, signature: dict | None = None) -> RegionLayout:
    """Build the layout from a label image holding 1..R (0 = background)."""
    labels = np.asarray(labels)
    n = len(names)
    boxes = np.zeros((n, 6), dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    local = []
    from scipy import ndimage

    objects = ndimage.find_objects(labels.astype(np.int32), max_label=n)
    for r, obj in enumerate(objects):
        if obj is None:
            raise ValueError(f"region {r + 1} ({names[r]}) has no voxel on the grid")
        boxes[r] = [s.start for s in obj] + [s.stop for s in obj]
        inside = labels[obj] == r + 1
        idx = np.flatnonzero(inside.ravel())
        local.append(idx)
        offsets[r + 1] = offsets[r] + idx.size
    return RegionLayout(
        boxes=boxes,
        offsets=offsets,
        local_index=np.concatenate(local).astype(np.int64),
        names=tuple(names),
        grid_shape=tuple(labels.shape),
        signature=dict(signature or {}),
    )


def extract(volume: np.ndarray, layout: RegionLayout) -> np.ndarray:
    """The compact vector (V,) of a grid image: each region's own voxels, region by region."""
    flat = np.asarray(volume, dtype=np.float32).reshape(-1)
    return flat[layout.grid_index()]


@dataclass
class RegionDataset:
    """A cohort's region data: compact arrays (N, V) per modality plus who is who."""

    gm: np.ndarray
    pet: np.ndarray
    labels: np.ndarray  # (N,) int class index
    classes: tuple
    subjects: np.ndarray  # (N,) participant labels (sessions of one subject share it)
    sessions: np.ndarray  # (N,) session labels ('' when none)
    layout: RegionLayout
    sources: tuple = ()

    def __post_init__(self):
        n = len(self.labels)
        for name in ("gm", "pet", "subjects", "sessions"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, labels {n}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> RegionDataset:
        index = np.asarray(index)
        return RegionDataset(
            gm=self.gm[index],
            pet=self.pet[index],
            labels=self.labels[index],
            classes=self.classes,
            subjects=self.subjects[index],
            sessions=self.sessions[index],
            layout=self.layout,
            sources=tuple(np.asarray(self.sources, dtype=object)[index]) if self.sources else (),
        )

    def save(self, path) -> None:
        """One .npz holding everything (e.g. to carry a cohort to a GPU machine)."""
        np.savez(
            path,
            gm=self.gm,
            pet=self.pet,
            labels=self.labels,
            classes=np.array(self.classes),
            subjects=self.subjects.astype(str),
            sessions=self.sessions.astype(str),
            **self.layout.to_arrays(),
        )

    @classmethod
    def load(cls, path) -> RegionDataset:
        with np.load(path, allow_pickle=False) as f:
            return cls(
                gm=f["gm"],
                pet=f["pet"],
                labels=f["labels"],
                classes=tuple(str(c) for c in f["classes"]),
                subjects=f["subjects"],
                sessions=f["sessions"],
                layout=RegionLayout.from_arrays(f),
            )


@dataclass
class Standardizer:
    """Paper eq. 1 per region and modality; fit on training subjects only."""

    mean: dict = field(default_factory=dict)  # modality -> (R,)
    std: dict = field(default_factory=dict)

    def fit(self, data: dict, layout: RegionLayout) -> Standardizer:
        """``data``: modality -> (N, V) training arrays."""
        counts = np.diff(layout.offsets)
        for mod, values in data.items():
            values = np.asarray(values, dtype=np.float64)
            n = values.shape[0]
            sums = np.add.reduceat(values, layout.offsets[:-1], axis=1).sum(0)
            sq = np.add.reduceat(values**2, layout.offsets[:-1], axis=1).sum(0)
            mean = sums / (counts * n)
            var = np.maximum(sq / (counts * n) - mean**2, 0.0)
            std = np.sqrt(var)
            std[std < 1e-8] = 1.0
            self.mean[mod], self.std[mod] = mean.astype(np.float32), std.astype(np.float32)
        return self

    def transform(self, mod: str, values: np.ndarray, layout: RegionLayout) -> np.ndarray:
        counts = np.diff(layout.offsets)
        mean = np.repeat(self.mean[mod], counts)
        std = np.repeat(self.std[mod], counts)
        return ((np.asarray(values, dtype=np.float32) - mean) / std).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            mod: {"mean": self.mean[mod].tolist(), "std": self.std[mod].tolist()}
            for mod in self.mean
        }

    @classmethod
    def from_dict(cls, data: dict) -> Standardizer:
        out = cls()
        for mod, stats in data.items():
            out.mean[mod] = np.asarray(stats["mean"], dtype=np.float32)
            out.std[mod] = np.asarray(stats["std"], dtype=np.float32)
        return out
