"""Geometry of the synthetic cohort: grids, affines, sampling and the native<->MNI mapping.

The extended 1 mm grid holds the whole head (template grid + room for skull and neck); the
subject's displacement field lives on a 5 mm grid over it. :class:`Mapping` is ``y = N(A x)``,
the exact map from a T1w's scanner position to MNI that :func:`bids_siamfuse.synth.load_truth`
rebuilds from the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data.templates import GRID_AFFINE, GRID_SHAPE
from ..preproc.registration import apply_matrix, sample_at

# The extended 1 mm grid that holds the whole head (template grid + room for skull and neck).
EXT_ORIGIN = np.array([-100.0, -140.0, -140.0])
EXT_SHAPE = (201, 251, 261)
WARP_SPACING = 5.0
WARP_SHAPE = (41, 51, 53)
T1_FOV = np.array([180.0, 236.0, 236.0])  # L-R, A-P, S-I extent in head-aligned mm
T1_FOV_CENTER_MNI = np.array([0.0, -14.0, -12.0])
PET_FOV = np.array([256.0, 256.0, 200.0])
BRAIN_CENTER_MNI = np.array([0.0, -18.0, 12.0])


def _affine(origin, spacing=1.0):
    aff = np.eye(4)
    aff[:3, :3] *= spacing
    aff[:3, 3] = origin
    return aff


EXT_AFFINE = _affine(EXT_ORIGIN)
WARP_AFFINE = _affine(EXT_ORIGIN, WARP_SPACING)
# The output grid at 3 mm (every second voxel, index 2k = fine index k): smooth fields are
# computed there and interpolated.
COARSE_SHAPE = tuple((n + 1) // 2 for n in GRID_SHAPE)
COARSE_AFFINE = GRID_AFFINE.copy()
COARSE_AFFINE[:3, :3] *= 2.0


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------


def apply_affine(aff: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points of shape (3, N), in float32 (the head grid has 13 M)."""
    return apply_matrix(aff, pts, dtype=np.float32)


def sample(volume, vol_affine, pts, order=1, cval=0.0, mode="constant"):
    """Values of float32 ``volume`` at world points ``pts`` (3, N), trilinear by default.

    The default (trilinear, zero outside) is :func:`trilinear`: the same values as
    :func:`~bids_siamfuse.preproc.registration.sample_at`, bit for bit, in about half the time.
    """
    if mode == "constant" and cval == 0.0 and np.ndim(volume) == 3:
        if order == 1:
            return trilinear(volume, vol_affine, pts)
        if order == 0:
            return nearest(volume, vol_affine, pts)
    return sample_at(volume, vol_affine, pts, order, cval, mode=mode, dtype=np.float32)


def nearest(volume, vol_affine, pts) -> np.ndarray:
    """``sample_at(volume, vol_affine, pts, order=0, dtype=np.float32)``, bit for bit.

    scipy's order 0: the voxel at ``floor(x + 0.5)`` (in float64) of float32 coordinates that
    lie in ``[0, n - 1]`` on every axis, 0 elsewhere, added to +0.0 (the value passes through
    float64 exactly).
    (The atlas labels of the head model: 0.8 s of scipy's spline loop, 0.2 s here.)
    """
    vol = np.asarray(volume, dtype=np.float32)
    shape = np.asarray(pts).shape[1:]
    inv = np.asarray(np.linalg.inv(vol_affine), dtype=np.float32)
    vox = apply_matrix(inv, np.asarray(pts, dtype=np.float32).reshape(3, -1), dtype=np.float32)
    last = np.array([[n - 1] for n in vol.shape])
    inside = ~((vox < 0) | (vox > last.astype(np.float32))).any(axis=0)
    i = np.floor(vox.astype(np.float64) + 0.5).astype(np.intp)
    np.maximum(i, 0, out=i)
    np.minimum(i, last, out=i)
    out = vol[i[0], i[1], i[2]]
    out[~inside] = 0.0
    out += np.float32(0.0)  # scipy's sum starts at +0.0: a -0.0 voxel comes out as +0.0
    return out.reshape(shape)


_CHUNK = 1 << 14  # points per step of trilinear(): its ~12 temporaries stay in the CPU caches


def trilinear(volume, vol_affine, pts) -> np.ndarray:
    """``sample_at(volume, vol_affine, pts, dtype=np.float32)`` (scipy's ``map_coordinates``,
    order 1, zero outside, float32 out), bit for bit, about twice as fast (:func:`interpolate`).

    Why: sampling the head at the 7-10 M voxels of a T1w took half of a synthetic subject's
    time (scipy's generic spline loop, ~130 ns a point).
    """
    vol = np.asarray(volume, dtype=np.float32)
    shape = np.asarray(pts).shape[1:]
    pts = np.asarray(pts, dtype=np.float32).reshape(3, -1)
    inv = np.asarray(np.linalg.inv(vol_affine), dtype=np.float32)
    # apply_matrix(inv, pts) = inv[:3, :3] @ pts + shift. With an identity linear part (the
    # 1 mm RAS head grids) the product is exact (1 * x + 0 * y + 0 * z), so adding the shift
    # per chunk gives the same float32 coordinates without a pass over all points.
    if np.array_equal(inv[:3, :3], np.eye(3, dtype=np.float32)):
        return interpolate([vol], pts, shift=inv[:3, 3:4])[0].reshape(shape)
    return interpolate([vol], apply_matrix(inv, pts, dtype=np.float32))[0].reshape(shape)


def interpolate(volumes, vox, *, shift=None, nearest_edge=False) -> list[np.ndarray]:
    """scipy's ``map_coordinates(v, vox (+ shift), order=1, prefilter=False,
    output=np.float32)`` for each of ``volumes`` (float32, one shape), bit for bit.

    ``mode="constant"`` (cval 0) by default, ``mode="nearest"`` with ``nearest_edge``. This is
    scipy's arithmetic for order 1 (``ni_interpolation.c``, ``ni_splines.c``): float32
    coordinates (``+ shift`` in float32), clamped to ``[0, n - 1]`` (nearest) or giving 0 when
    outside it on any axis (constant); then in float64 ``x - floor(x)``, weights ``w0 = 1 - x``,
    ``w1 = 1 - w0``, the 8 corners added in C order to ``t = 0.0``, each as ``value * w_i *
    w_j * w_k`` in that order, and ``t`` rounded to float32. Vectorized over cache-sized chunks;
    the volumes share the weights; with one volume, points whose 8 corners are all zero (air,
    outside the brain) are not computed: their sum is +0.0 as in scipy. A corner past the last
    voxel (read only when its weight is exactly 0) reads a padding zero or the next row where
    scipy reads a mirrored voxel: the product is a zero either way and does not change ``t``.
    ``tests/test_synth.py`` checks the identity against scipy, edges included.
    """
    vols = [np.asarray(v, dtype=np.float32) for v in volumes]
    n0, n1, n2 = vols[0].shape
    size, s0, s1 = n0 * n1 * n2, n1 * n2, n2
    offsets = [a + b + c for a in (0, s0) for b in (0, s1) for c in (0, 1)]
    corners, support = [], None
    for vol in vols:
        flat = np.zeros(size + s0 + s1 + 1, dtype=np.float32)  # padded: see the docstring
        flat[:size].reshape(vol.shape)[...] = vol
        corners.append([flat[o:] for o in offsets])
    if len(vols) == 1:
        nonzero = flat != 0
        support = nonzero[:size].copy()  # some corner of the cell at this voxel is non-zero
        for o in offsets[1:]:
            support |= nonzero[o : o + size]
        del nonzero
    last = np.array([[n0 - 1], [n1 - 1], [n2 - 1]])
    last32 = last.astype(np.float32)
    outs = [np.zeros(vox.shape[1], dtype=np.float32) for _ in vols]
    for a in range(0, vox.shape[1], _CHUNK):
        c32 = vox[:, a : a + _CHUNK]
        if shift is not None:
            c32 = c32 + shift
        if nearest_edge:
            c32 = np.maximum(c32, 0)
            np.minimum(c32, last32, out=c32)
        fl32 = np.floor(c32)
        i = fl32.astype(np.intp)
        np.maximum(i, 0, out=i)  # (np.clip's Python overhead was 10 % of this loop)
        np.minimum(i, last, out=i)
        base = i[0] * s0
        base += i[1] * s1
        base += i[2]
        keep = None if support is None else support[base]
        if not nearest_edge:
            inside = ~((c32 < 0) | (c32 > last32)).any(axis=0)
            keep = inside if keep is None else keep & inside
        if keep is not None:
            sel = np.flatnonzero(keep)
            if sel.size == 0:
                continue
            base, c32, fl32 = base[sel], c32[:, sel], fl32[:, sel]
        w0 = c32.astype(np.float64)
        w0 -= fl32
        np.subtract(1.0, w0, out=w0)
        w1 = 1.0 - w0
        weights = ((w0[0], w1[0]), (w0[1], w1[1]), (w0[2], w1[2]))
        v = np.empty(base.size)
        for corner, out in zip(corners, outs):
            t = np.zeros(base.size)
            k = 0
            for f0 in (0, 1):
                for f1 in (0, 1):
                    for f2 in (0, 1):
                        np.multiply(corner[k].take(base), weights[0][f0], out=v)
                        v *= weights[1][f1]
                        v *= weights[2][f2]
                        t += v
                        k += 1
            if keep is None:
                out[a : a + base.size] = t
            else:
                out[a + sel] = t
    return outs


def grid_points(shape, affine) -> np.ndarray:
    """World coordinates (3, N) of every voxel centre of a grid, C order."""
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return apply_affine(affine, idx)


def rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(angles_deg, translation, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 rotation about ``center`` followed by a translation."""
    rot = rotation(angles_deg)
    center = np.asarray(center, dtype=float)
    aff = np.eye(4)
    aff[:3, :3] = rot
    aff[:3, 3] = center - rot @ center + np.asarray(translation, dtype=float)
    return aff


_AXES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def oriented_grid(axcodes: str, voxel, fov, center_world, tilt_deg=0.0):
    """Shape and affine of a grid whose axes point along ``axcodes`` (e.g. 'PIR')."""
    direction = np.zeros((3, 3))
    voxel = np.asarray(voxel, dtype=float)
    for col, code in enumerate(axcodes):
        world_axis, sign = _AXES[code]
        direction[world_axis, col] = sign
    extent = np.abs(direction.T) @ np.asarray(fov, dtype=float)  # FOV along each voxel axis
    shape = tuple(int(np.ceil(e / v)) for e, v in zip(extent, voxel))
    lin = rotation((tilt_deg, 0.0, 0.0)) @ direction @ np.diag(voxel)
    aff = np.eye(4)
    aff[:3, :3] = lin
    centre_vox = (np.array(shape) - 1) / 2.0
    aff[:3, 3] = np.asarray(center_world, dtype=float) - lin @ centre_vox
    return shape, aff


# ----------------------------------------------------------------------------------------------
# The native <-> MNI mapping
# ----------------------------------------------------------------------------------------------


@dataclass
class Mapping:
    """``y = N(A x)``: scanner position x of the T1w to MNI position y (both RAS mm)."""

    A: np.ndarray  # 4x4
    warp: np.ndarray  # (41, 51, 53, 3) displacement in mm on the 5 mm grid
    warp_affine: np.ndarray = field(default_factory=lambda: WARP_AFFINE.copy())

    def displacement(self, z: np.ndarray) -> np.ndarray:
        vox = apply_affine(np.linalg.inv(self.warp_affine), z)
        # scipy's map_coordinates(warp[..., i], vox, order=1, mode="nearest"), bit for bit
        return np.stack(interpolate([self.warp[..., i] for i in range(3)], vox, nearest_edge=True))

    def native_to_mni(self, x: np.ndarray) -> np.ndarray:
        z = apply_affine(self.A, x)
        return z + self.displacement(z)

    def native_grid_to_mni(self, shape, affine, step: int = 3) -> np.ndarray:
        """MNI points (3, N) of every voxel of a native grid, fast.

        The mapping is evaluated exactly on every ``step``-th voxel and interpolated
        trilinearly in between: exact for the affine part, within ~0.05 mm for the smooth
        displacement (whose scale is ~12 mm).
        """
        import torch

        coarse_shape = tuple(int(np.ceil((n - 1) / step)) + 1 for n in shape)
        idx = np.indices(coarse_shape, dtype=np.float32).reshape(3, -1) * step
        coarse = self.native_to_mni(apply_affine(affine, idx)).reshape(3, *coarse_shape)
        size = tuple(step * (m - 1) + 1 for m in coarse_shape)
        with torch.no_grad():
            fine = torch.nn.functional.interpolate(
                torch.from_numpy(coarse)[None], size=size, mode="trilinear", align_corners=True
            )[0]
        fine = fine[:, : shape[0], : shape[1], : shape[2]]
        return np.ascontiguousarray(fine.numpy()).reshape(3, -1)

    def mni_to_native(self, y: np.ndarray, iterations: int = 6) -> np.ndarray:
        z = np.array(y, dtype=np.float32, copy=True)
        for _ in range(iterations):  # fixed point of z = y - u(z); |du/dz| << 1
            z = y - self.displacement(z)
        return apply_affine(np.linalg.inv(self.A), z)

    def inverse_jacobian(self, y: np.ndarray) -> np.ndarray:
        """|det d(native)/d(MNI)| at MNI points: the SPM modulation factor."""
        det_n = jacobian_determinant(self.warp, WARP_SPACING)
        z = np.array(y, dtype=np.float32, copy=True)
        for _ in range(3):  # the determinant varies slowly: 3 fixed-point steps suffice
            z = y - self.displacement(z)
        vox = apply_affine(np.linalg.inv(self.warp_affine), z)
        det_at = interpolate([det_n], vox, nearest_edge=True)[0]  # = map_coordinates, nearest
        return (1.0 / (abs(np.linalg.det(self.A[:3, :3])) * det_at)).astype(np.float32)

    def coarse_inverse_jacobian(self) -> np.ndarray:
        """:meth:`inverse_jacobian` on the 3 mm output grid (``COARSE_SHAPE``): it is smooth."""
        jac = self.inverse_jacobian(grid_points(COARSE_SHAPE, COARSE_AFFINE))
        return jac.reshape(COARSE_SHAPE)


def jacobian_determinant(disp: np.ndarray, spacing: float) -> np.ndarray:
    """det(I + du/dx) of a displacement field ``disp`` (*shape, 3) in mm, float32."""
    grads = [np.gradient(disp[..., i], spacing) for i in range(3)]
    jac = np.empty((*disp.shape[:3], 3, 3), dtype=np.float32)
    for i in range(3):
        for j in range(3):
            jac[..., i, j] = grads[i][j] + (1.0 if i == j else 0.0)
    return np.linalg.det(jac)


def _grid_inverse_jacobian(mapping: Mapping) -> np.ndarray:
    """The modulation factor on the output grid, computed at 3 mm and interpolated (smooth)."""
    jac = mapping.coarse_inverse_jacobian()
    fine = np.indices(GRID_SHAPE, dtype=np.float32).reshape(3, -1) / 2.0
    # = map_coordinates(jac, fine, order=1, mode="nearest", output=np.float32), bit for bit
    return interpolate([jac], fine, nearest_edge=True)[0].reshape(GRID_SHAPE)
