"""Small synthetic images with known answers for the preprocessing tests."""

from __future__ import annotations

import numpy as np


def affine(voxel: float, shape, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A RAS affine of ``voxel`` mm whose grid is centred on ``centre``."""
    aff = np.diag([voxel, voxel, voxel, 1.0])
    aff[:3, 3] = np.asarray(centre) - voxel * (np.asarray(shape) - 1) / 2.0
    return aff


def rigid(angles_deg, translation, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 rotation (R = Rz Ry Rx) about ``centre`` followed by a translation."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx
    centre = np.asarray(centre, dtype=float)
    out[:3, 3] = centre - out[:3, :3] @ centre + np.asarray(translation, dtype=float)
    return out


def world(shape, aff) -> np.ndarray:
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (aff[:3, :3] @ idx + aff[:3, 3:4]).reshape(3, *shape)


def blobs(points: np.ndarray) -> np.ndarray:
    """A smooth, asymmetric 'brain' at world points (3, ...): an ellipsoid with lumps."""
    x, y, z = points
    body = 1.0 / (1.0 + np.exp(((x / 45.0) ** 2 + (y / 55.0) ** 2 + (z / 40.0) ** 2 - 1) * 12))
    lumps = (
        0.8 * np.exp(-((x - 15) ** 2 + (y - 20) ** 2 + (z - 5) ** 2) / (2 * 9.0**2))
        + 0.6 * np.exp(-((x + 20) ** 2 + (y + 10) ** 2 + (z - 15) ** 2) / (2 * 7.0**2))
        + 0.5 * np.exp(-((x - 5) ** 2 + (y + 30) ** 2 + (z + 12) ** 2) / (2 * 6.0**2))
    )
    return (100.0 * body * (1.0 + lumps)).astype(np.float32)


def moved(shape, aff, motion: np.ndarray) -> np.ndarray:
    """The phantom after ``motion``: the voxel at world q shows the phantom at motion @ q."""
    pts = world(shape, aff).reshape(3, -1)
    src = motion[:3, :3] @ pts + motion[:3, 3:4]
    return blobs(src.reshape(3, *shape))


def mean_error(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """Mean distance between two 4x4 maps applied to points (3, N)."""
    pa = a[:3, :3] @ points + a[:3, 3:4]
    pb = b[:3, :3] @ points + b[:3, 3:4]
    return float(np.linalg.norm(pa - pb, axis=0).mean())
