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
    #: where the rows came from (set by :meth:`subset`): the root cohort's ``gm``/``pet``
    #: arrays, the row index into them, and this dataset's own ``gm``/``pet`` objects (a
    #: ``dataclasses.replace`` that swaps the arrays leaves a stale origin, which
    #: :func:`device_rows` then ignores). Lets a process keep one copy of the cohort on the GPU
    #: and index it for every fit and prediction.
    origin: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.labels)
        for name in ("gm", "pet", "subjects", "sessions"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, labels {n}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):  # pickled (e.g. to a worker): the rows alone, not their root
        state = dict(self.__dict__)
        state["origin"] = None
        return state

    def _root(self) -> tuple:
        """(root gm, root pet, row index into them) of this dataset's rows."""
        o = self.origin
        if o is not None and o[3] is self.gm and o[4] is self.pet:
            return o[0], o[1], o[2]
        return self.gm, self.pet, None

    def subset(self, index) -> RegionDataset:
        index = np.asarray(index)
        root_gm, root_pet, root_index = self._root()
        rows = np.arange(len(self))[index] if root_index is None else root_index[index]
        out = RegionDataset(
            gm=self.gm[index],
            pet=self.pet[index],
            labels=self.labels[index],
            classes=self.classes,
            subjects=self.subjects[index],
            sessions=self.sessions[index],
            layout=self.layout,
            sources=tuple(np.asarray(self.sources, dtype=object)[index]) if self.sources else (),
        )
        out.origin = (root_gm, root_pet, np.asarray(rows, dtype=np.int64), out.gm, out.pet)
        return out

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
        self._device_stats = {}  # transform_tensor's copies of the old statistics
        return self

    def fit_tensors(self, data: dict, layout: RegionLayout, chunk: int = 32) -> Standardizer:
        """:meth:`fit` on device tensors (modality -> (N, V) float32): per-voxel sums over the
        subjects in float64 on the device (chunks of ``chunk`` rows, always added in the same
        order: the same bits on every run), then per region on the host (``reduceat`` over V
        values). The same statistics as :meth:`fit` up to the order of float64 additions."""
        import torch

        counts = np.diff(layout.offsets)
        for mod, values in data.items():
            n = int(values.shape[0])
            s1 = torch.zeros(values.shape[1], dtype=torch.float64, device=values.device)
            s2 = torch.zeros_like(s1)
            for start in range(0, n, chunk):
                part = values[start : start + chunk].double()
                s1 += part.sum(0)
                s2 += (part * part).sum(0)
            sums = np.add.reduceat(s1.cpu().numpy(), layout.offsets[:-1])
            sq = np.add.reduceat(s2.cpu().numpy(), layout.offsets[:-1])
            mean = sums / (counts * n)
            var = np.maximum(sq / (counts * n) - mean**2, 0.0)
            std = np.sqrt(var)
            std[std < 1e-8] = 1.0
            self.mean[mod], self.std[mod] = mean.astype(np.float32), std.astype(np.float32)
        self._device_stats = {}
        return self

    def transform_tensor(self, mod: str, values, layout: RegionLayout):
        """:meth:`transform` of a device tensor (N, V) float32, on its device: the same
        float32 operations, ``(x - mean) / sd`` (IEEE subtraction and division), so the same
        values as the NumPy path."""
        import torch

        cache = self.__dict__.setdefault("_device_stats", {})
        key = (mod, str(values.device))
        if key not in cache:
            counts = torch.as_tensor(np.diff(layout.offsets), device=values.device)
            cache[key] = tuple(
                torch.repeat_interleave(
                    torch.as_tensor(getattr(self, stat)[mod], device=values.device), counts
                )
                for stat in ("mean", "std")
            )
        mean, std = cache[key]
        return (values - mean) / std

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


# ---------------------------------------------------------------------------------------------
# the cohort on the GPU: uploaded once per process, indexed by every fit
# ---------------------------------------------------------------------------------------------

#: at most this share of a device's memory holds a resident cohort (beyond it: upload per call)
RESIDENT_SHARE = 0.25
#: device -> (root gm array, root pet array, {modality: (N, V) float32 tensor}); one cohort
#: per device (the strong references keep ``id`` reuse impossible)
_RESIDENT: dict = {}


def _upload(values: np.ndarray, device, chunk: int = 64):
    import torch

    out = torch.empty(values.shape, dtype=torch.float32, device=device)
    for start in range(0, values.shape[0], chunk):
        part = np.ascontiguousarray(values[start : start + chunk], dtype=np.float32)
        out[start : start + chunk].copy_(torch.from_numpy(part))
    return out


def device_rows(data: RegionDataset, device) -> dict:
    """The raw (unstandardized) ``gm`` and ``pet`` rows of ``data`` as (N, V) float32 tensors
    on ``device``.

    On CUDA, the root cohort that ``data`` is a :meth:`~RegionDataset.subset` of is uploaded
    once per process and device and kept there (if it takes at most ``RESIDENT_SHARE`` of the
    device's memory); every later call indexes it on the device instead of copying rows from
    the host: the folds, repeats and permutations of a CV share one upload (250 subjects:
    0.9 GB). Elsewhere (and for data of no known root) the rows are uploaded.
    """
    import torch

    device = torch.device(device)
    root_gm, root_pet, index = data._root()
    if device.type == "cuda" and index is not None:
        key = str(device)
        entry = _RESIDENT.get(key)
        if entry is None or entry[0] is not root_gm or entry[1] is not root_pet:
            _RESIDENT.pop(key, None)
            need = (root_gm.size + root_pet.size) * 4
            total = torch.cuda.get_device_properties(device).total_memory
            if need <= RESIDENT_SHARE * total:
                tensors = {"gm": _upload(root_gm, device), "pet": _upload(root_pet, device)}
                entry = _RESIDENT[key] = (root_gm, root_pet, tensors)
            else:
                entry = None
        if entry is not None:
            idx = torch.as_tensor(index, device=device)
            return {mod: entry[2][mod].index_select(0, idx) for mod in MODALITIES}
    return {"gm": _upload(data.gm, device), "pet": _upload(data.pet, device)}


def release_device_rows() -> None:
    """Forget the resident cohorts (their GPU memory returns to torch's cache)."""
    _RESIDENT.clear()
