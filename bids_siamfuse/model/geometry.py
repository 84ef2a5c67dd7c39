"""Region geometry for the batched siamese engine: crops, convolution tables, buckets, pooling.

NumPy only. Everything here depends on the region layout alone (never on subjects), is built
once per layout and travels to the device as index tensors.

Regions
    :class:`RegionGrid` is what the engine needs of a :class:`~.data.RegionLayout`: each
    region's box shape and the box-local (C-order) position of each of its compact voxels.
    :func:`coarsen` gives the grid of the *sloppy* mode, where each region's box crop is
    averaged over 2x2x2 blocks (zeros outside the region count as zeros), together with the
    sparse matrix that maps compact fine data to compact coarse data.

Convolutions as gathers (im2col on compact data)
    A 3-D convolution of a region's box crop with kernel ``k``, stride ``s`` and zero padding
    ``p`` reads, for output position ``o`` and kernel offset ``a``, input position
    ``s * o - p + a``. :func:`conv_tables` turns this into index tables:

    * layer 1 reads the *compact* data vector directly: entry = the compact index of the voxel,
      or ``ZERO`` (the box voxel is outside the region, or the position is padding). A last
      column points at ``ONE`` for real output rows and ``ZERO`` for padded rows, so the bias
      rides in the matrix product and padded rows come out exactly 0 after the ReLU;
    * layer 2 reads rows of layer 1's output (one row per layer-1 output position, channels
      last); padding points at a row that is guaranteed to be zero (each region in a bucket
      owns at least one padded layer-1 row).

Buckets
    Regions are sorted by their layer-1 row count and cut into contiguous buckets
    (:func:`make_buckets`, an exact dynamic programme trading padded rows against the number of
    buckets). Inside a bucket every region is padded to the same row counts, so one batched
    matrix product per layer serves the whole bucket; the padding is along *rows* only (1-D),
    far tighter than padding 3-D boxes to a shared shape.

Pooling
    The adaptive average pooling of layer 2's output (each region has its own output grid) to a
    fixed ``pool^3`` grid is a per-region (rows x pool^3) matrix of PyTorch's
    ``adaptive_avg_pool3d`` weights, zero on padded rows.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RegionGrid",
    "BucketTables",
    "Geometry",
    "conv_out",
    "coarsen",
    "make_buckets",
    "build_geometry",
    "cached_geometry",
    "grid_key",
    "adaptive_pool_matrix",
]


@dataclass(frozen=True)
class RegionGrid:
    """Box shapes and compact voxel positions of R regions (what the engine needs)."""

    shapes: np.ndarray  # (R, 3) int box shape
    offsets: np.ndarray  # (R + 1,) start of each region in the compact vector
    local_index: np.ndarray  # (V,) C-order flat index inside the region's box

    @property
    def n_regions(self) -> int:
        return int(self.shapes.shape[0])

    @property
    def n_voxels(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_layout(cls, layout) -> RegionGrid:
        shapes = np.array([layout.box_shape(r) for r in range(layout.n_regions)], dtype=np.int64)
        return cls(
            shapes=shapes,
            offsets=np.asarray(layout.offsets, dtype=np.int64),
            local_index=np.asarray(layout.local_index, dtype=np.int64),
        )

    def to_box(self, values: np.ndarray, r: int) -> np.ndarray:
        """Region r of compact ``values`` (..., V) as its box crop (..., bx, by, bz)."""
        shape = tuple(int(s) for s in self.shapes[r])
        sl = slice(int(self.offsets[r]), int(self.offsets[r + 1]))
        lead = values.shape[:-1]
        out = np.zeros((*lead, int(np.prod(shape))), dtype=values.dtype)
        out[..., self.local_index[sl]] = values[..., sl]
        return out.reshape(*lead, *shape)


def conv_out(n, kernel: int, stride: int, padding: int):
    """Output length of a convolution along one axis (works on arrays)."""
    return (np.asarray(n) + 2 * padding - kernel) // stride + 1


def coarsen(grid: RegionGrid, factor: int = 2):
    """The grid of crops averaged over ``factor^3`` blocks, and the (V, Vc) averaging matrix.

    Block ``(i, j, k)`` of a region's box holds box voxels ``factor*i .. factor*i+factor-1``
    (per axis, from the box corner; the last block may be partial); its value is the sum of the
    region's voxels in it divided by ``factor^3``, i.e. the mean of the zero-filled crop over
    the block. Only blocks holding at least one region voxel are stored.
    """
    import scipy.sparse as sp

    if factor == 1:
        n = grid.n_voxels
        return grid, sp.identity(n, dtype=np.float32, format="csr")
    shapes_c = -(-grid.shapes // factor)
    offsets_c = [0]
    local_c, rows, cols = [], [], []
    for r in range(grid.n_regions):
        sl = slice(int(grid.offsets[r]), int(grid.offsets[r + 1]))
        coords = np.unravel_index(grid.local_index[sl], tuple(grid.shapes[r]))
        cell = np.ravel_multi_index([c // factor for c in coords], tuple(shapes_c[r]))
        uniq, inverse = np.unique(cell, return_inverse=True)
        local_c.append(uniq)
        rows.append(np.arange(sl.start, sl.stop))
        cols.append(offsets_c[-1] + inverse.reshape(-1))
        offsets_c.append(offsets_c[-1] + uniq.size)
    n_c = offsets_c[-1]
    matrix = sp.csr_matrix(
        (
            np.full(grid.n_voxels, 1.0 / factor**3, dtype=np.float32),
            (np.concatenate(rows), np.concatenate(cols)),
        ),
        shape=(grid.n_voxels, n_c),
    )
    coarse = RegionGrid(
        shapes=shapes_c.astype(np.int64),
        offsets=np.asarray(offsets_c, dtype=np.int64),
        local_index=np.concatenate(local_c).astype(np.int64),
    )
    return coarse, matrix


def coarsen_table(matrix) -> tuple[np.ndarray, float]:
    """The averaging ``matrix`` of :func:`coarsen` as a gather table: (Vc, k) fine-voxel
    indices per coarse voxel (padded with V, an index past the data, i.e. a zero column) and
    the common weight ``1 / factor^3``."""
    csc = matrix.tocsc()
    counts = np.diff(csc.indptr)
    k = int(counts.max()) if counts.size else 1
    n_fine, n_c = matrix.shape
    table = np.full((n_c, k), n_fine, dtype=np.int64)
    slot = np.arange(csc.indices.size) - np.repeat(csc.indptr[:-1], counts)
    table[np.repeat(np.arange(n_c), counts), slot] = csc.indices
    weights = np.unique(csc.data)
    if weights.size > 1:  # pragma: no cover - coarsen() writes one weight
        raise ValueError("coarsening matrix with unequal weights")
    return table, float(weights[0]) if weights.size else 1.0


_COARSEN_TABLES: OrderedDict = OrderedDict()


def coarsen_tensor(values, matrix):
    """``(matrix.T @ values.T).T`` for a tensor (N, V) on its own device: a gather of each
    coarse voxel's fine voxels and a sum in a fixed order (no atomics, so the same bits on
    every run), e.g. to coarsen standardized crops on the GPU (sloppy mode)."""
    import torch

    key = (id(matrix), str(values.device))
    entry = _COARSEN_TABLES.get(key)
    if entry is None or entry[0] is not matrix:
        table, weight = coarsen_table(matrix)
        entry = (matrix, torch.as_tensor(table, device=values.device), weight)
        _COARSEN_TABLES[key] = entry
        while len(_COARSEN_TABLES) > 4:
            _COARSEN_TABLES.popitem(last=False)
    _, table, weight = entry
    padded = torch.cat([values, values.new_zeros(values.shape[0], 1)], dim=1)
    gathered = padded[:, table]  # (N, Vc, k)
    out = gathered[:, :, 0].clone()
    for j in range(1, table.shape[1]):
        out += gathered[:, :, j]
    return out * weight


def make_buckets(sizes, max_buckets: int = 12, bucket_cost: float = 0.02) -> list[np.ndarray]:
    """Cut regions, sorted by ``sizes`` (descending), into contiguous buckets.

    Minimises ``padded rows + bucket_cost * total rows * n_buckets`` exactly (dynamic
    programme over the sorted list), with at most ``max_buckets`` buckets. Returns lists of
    region indices, largest bucket first.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    order = np.argsort(-sizes, kind="stable")
    s = sizes[order]
    n = s.size
    penalty = bucket_cost * s.sum()
    max_buckets = max(1, min(max_buckets, n))
    inf = float("inf")
    # best[b][j]: cost of the first j regions in b buckets; group (i, j] costs (j - i) * s[i]
    best = np.full((max_buckets + 1, n + 1), inf)
    back = np.zeros((max_buckets + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for b in range(1, max_buckets + 1):
        for j in range(1, n + 1):
            i = np.arange(0, j)
            cost = best[b - 1, i] + (j - i) * s[i] + penalty
            k = int(np.argmin(cost))
            best[b, j], back[b, j] = cost[k], i[k]
    nb = int(np.argmin(best[1:, n])) + 1
    cuts, j = [], n
    for b in range(nb, 0, -1):
        i = int(back[b, j])
        cuts.append((i, j))
        j = i
    return [order[i:j] for i, j in reversed(cuts)]


def adaptive_pool_matrix(shape, pool: int) -> np.ndarray:
    """(prod(shape), pool^3) weights of ``adaptive_avg_pool3d(., pool)`` on a grid ``shape``."""
    per_axis = []
    for n in shape:
        m = np.zeros((n, pool), dtype=np.float64)
        for o in range(pool):
            start = (o * n) // pool
            stop = -(-((o + 1) * n) // pool)
            m[start:stop, o] = 1.0 / (stop - start)
        per_axis.append(m)
    full = np.einsum("ai,bj,ck->abcijk", *per_axis)
    return full.reshape(int(np.prod(shape)), pool**3)


@dataclass
class BucketTables:
    """Index tables of one bucket of m regions (engine positions ``start .. start + m``)."""

    start: int
    regions: np.ndarray  # (m,) atlas indices
    rows1: int  # padded layer-1 rows per region (>= true rows + 1)
    rows2: int  # padded layer-2 rows per region
    gather1: np.ndarray  # (m, rows1, k^3 + 1) int64 into [compact data, ZERO, ONE]
    gather2: np.ndarray  # (m, rows2, k^3) int64 into the bucket's layer-1 rows (m * rows1)
    pool: np.ndarray  # (m, rows2, pool^3) float32
    scatter2: np.ndarray  # (m * rows1, c) int64: entries of gather2 (flat) reading each row

    @property
    def size(self) -> int:
        return int(self.regions.size)


@dataclass
class Geometry:
    """All tables of one layout + architecture; ``order`` maps engine position -> region."""

    grid: RegionGrid
    kernel: int
    stride: int
    padding: int
    pool: int
    buckets: list
    order: np.ndarray  # (R,) engine position -> atlas region index
    shapes1: np.ndarray  # (R, 3) layer-1 output grid per region (atlas order)
    shapes2: np.ndarray  # (R, 3) layer-2 output grid

    @property
    def zero_slot(self) -> int:
        return self.grid.n_voxels

    @property
    def one_slot(self) -> int:
        return self.grid.n_voxels + 1

    def padded_rows(self) -> tuple[int, int, int, int]:
        """(true layer-1 rows, padded, true layer-2 rows, padded) over all regions."""
        t1 = int(np.prod(self.shapes1, axis=1).sum())
        t2 = int(np.prod(self.shapes2, axis=1).sum())
        p1 = sum(b.size * b.rows1 for b in self.buckets)
        p2 = sum(b.size * b.rows2 for b in self.buckets)
        return t1, p1, t2, p2


def _region_tables(grid: RegionGrid, r: int, kernel: int, stride: int, padding: int, pool: int):
    shape = tuple(int(s) for s in grid.shapes[r])
    sl = slice(int(grid.offsets[r]), int(grid.offsets[r + 1]))
    zero = grid.n_voxels
    # box position -> compact index (or ZERO)
    box_to_compact = np.full(int(np.prod(shape)), zero, dtype=np.int64)
    box_to_compact[grid.local_index[sl]] = np.arange(sl.start, sl.stop)
    box_to_compact = box_to_compact.reshape(shape)

    def table(in_shape, lookup, fill):
        out_shape = tuple(int(v) for v in conv_out(in_shape, kernel, stride, padding))
        grids = np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij")
        offs = np.meshgrid(*[np.arange(kernel)] * 3, indexing="ij")
        pos = [
            stride * g.reshape(-1, 1) - padding + o.reshape(1, -1)
            for g, o in zip(grids, offs, strict=True)
        ]  # 3 x (rows, k^3)
        inside = np.ones(pos[0].shape, dtype=bool)
        for d in range(3):
            inside &= (pos[d] >= 0) & (pos[d] < in_shape[d])
        idx = np.full(pos[0].shape, fill, dtype=np.int64)
        clipped = [np.clip(pos[d], 0, in_shape[d] - 1) for d in range(3)]
        idx[inside] = lookup(clipped)[inside]
        return out_shape, idx

    shape1, t1 = table(shape, lambda c: box_to_compact[c[0], c[1], c[2]], zero)
    # layer 2 reads layer-1 rows: row = C-order position on the layer-1 grid; -1 = zero row
    shape2, t2 = table(shape1, lambda c: np.ravel_multi_index(c, shape1), -1)
    pmat = adaptive_pool_matrix(shape2, pool)
    return shape1, shape2, t1, t2, pmat


def _scatter_table(gather2: np.ndarray, rows1: int) -> np.ndarray:
    """The transpose of layer 2's gather, for a deterministic, atomic-free backward.

    Row ``i`` lists the flat positions of ``gather2`` that read layer-1 row ``i`` (at most 8
    for kernel 3, stride 2), padded with a position that reads nothing but has an exactly zero
    gradient: a tap of a padded layer-2 row (its pooling weights are 0). Zero rows (padding)
    list nothing: their gradient is never used (they are 0 before the ReLU).
    """
    m, r2, k3 = gather2.shape
    flat = gather2.reshape(-1)
    region_of_entry = np.repeat(np.arange(m), r2 * k3)
    row_in_region = flat - region_of_entry * rows1
    real = row_in_region != rows1 - 1  # the designated zero row of each region
    pos = np.flatnonzero(real)
    target = flat[pos]
    order = np.argsort(target, kind="stable")
    target, pos = target[order], pos[order]
    counts = np.bincount(target, minlength=m * rows1)
    width = max(1, int(counts.max()))
    zero_pos = (r2 - 1) * k3  # first tap of region 0's last (padded) layer-2 row
    table = np.full((m * rows1, width), zero_pos, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(target.size) - starts[target]
    table[target, rank] = pos
    return table


def build_geometry(
    grid: RegionGrid,
    *,
    kernel: int = 3,
    stride: int = 2,
    padding: int = 1,
    pool: int = 4,
    max_buckets: int = 12,
    bucket_cost: float = 0.02,
) -> Geometry:
    """Tables for the batched engine (see the module docstring)."""
    per_region = [
        _region_tables(grid, r, kernel, stride, padding, pool) for r in range(grid.n_regions)
    ]
    shapes1 = np.array([p[0] for p in per_region], dtype=np.int64)
    shapes2 = np.array([p[1] for p in per_region], dtype=np.int64)
    rows1 = np.prod(shapes1, axis=1) + 1  # + the zero row
    groups = make_buckets(rows1, max_buckets=max_buckets, bucket_cost=bucket_cost)
    order = np.concatenate(groups)
    zero, one = grid.n_voxels, grid.n_voxels + 1
    k3 = kernel**3
    buckets, start = [], 0
    for regions in groups:
        m = regions.size
        r1 = int(rows1[regions].max())
        r2 = int(np.prod(shapes2[regions], axis=1).max()) + 1  # >= 1 padded row per region
        g1 = np.full((m, r1, k3 + 1), zero, dtype=np.int64)
        g2 = np.empty((m, r2, k3), dtype=np.int64)
        pm = np.zeros((m, r2, pool**3), dtype=np.float32)
        for j, r in enumerate(regions):
            _, _, t1, t2, pmat = per_region[r]
            n1, n2 = t1.shape[0], t2.shape[0]
            g1[j, :n1, :k3] = t1
            g1[j, :n1, k3] = one
            zero_row = j * r1 + r1 - 1  # padded, hence exactly zero after layer 1
            t2 = np.where(t2 < 0, zero_row, t2 + j * r1)
            g2[j, :n2] = t2
            g2[j, n2:] = zero_row
            pm[j, :n2] = pmat
        buckets.append(BucketTables(start, regions, r1, r2, g1, g2, pm, _scatter_table(g2, r1)))
        start += m
    return Geometry(
        grid=grid,
        kernel=kernel,
        stride=stride,
        padding=padding,
        pool=pool,
        buckets=buckets,
        order=order,
        shapes1=shapes1,
        shapes2=shapes2,
    )


#: Geometries kept per process by :func:`cached_geometry` (one per layout and architecture; a
#: CV uses one, sloppy and full resolution two).
GEOMETRY_CACHE_SIZE = 4
_GEOMETRY_CACHE: OrderedDict = OrderedDict()


def grid_key(grid: RegionGrid) -> str:
    """A digest of the grid's box shapes and voxel positions (what the tables depend on)."""
    h = hashlib.sha256()
    for a in (grid.shapes, grid.offsets, grid.local_index):
        a = np.ascontiguousarray(a, dtype=np.int64)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cached_geometry(grid: RegionGrid, **kwargs) -> tuple[Geometry, tuple]:
    """:func:`build_geometry` once per grid and settings in this process (it was
    rebuilt for every fit, ~1.1 s of each fold on the H200 machine's CPU; ~9 s on 2 loaded
    cores), and the cache key. The tables are a pure function of the key, so a cached
    geometry gives the same model bit for bit; callers must not modify it."""
    key = (grid_key(grid), tuple(sorted(kwargs.items())))
    geom = _GEOMETRY_CACHE.get(key)
    if geom is None:
        geom = build_geometry(grid, **kwargs)
        _GEOMETRY_CACHE[key] = geom
        while len(_GEOMETRY_CACHE) > GEOMETRY_CACHE_SIZE:
            _GEOMETRY_CACHE.popitem(last=False)
    else:
        _GEOMETRY_CACHE.move_to_end(key)
    return geom, key
