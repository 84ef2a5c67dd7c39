"""PET intensity normalization (paper section 4.2.2).

``normalize_top_mean``: the normalization value is the mean of the brightest 0.1 % of the
voxels considered (the brain mask when one is given, else every finite voxel above zero); the
image is divided by it and voxels below 10 % of it (values < 0.1 after division) are set to 0,
as background.

``normalize_reference``: SUVR, the image divided by the mean of a reference region (e.g. AAL
cerebellar grey matter), with the same background rule.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

TOP_FRACTION = 0.001
BACKGROUND_FRACTION = 0.1


def top_mean(data: np.ndarray, mask: np.ndarray | None = None, fraction: float = TOP_FRACTION):
    """Mean of the brightest ``fraction`` of the voxels (at least one voxel)."""
    values = np.asarray(data, dtype=np.float64)
    sel = np.isfinite(values) & (values > 0)
    if mask is not None:
        sel &= np.asarray(mask, dtype=bool)
    values = values[sel]
    if values.size == 0:
        raise DataError("PET normalization: no positive voxel inside the mask")
    k = max(1, int(round(values.size * fraction)))
    return float(np.partition(values, values.size - k)[values.size - k :].mean())


def _apply(data, value, background):
    out = np.where(np.isfinite(data), data, 0.0).astype(np.float32) / np.float32(value)
    out[out < background] = 0.0
    return out


def normalize_top_mean(
    data: np.ndarray,
    mask: np.ndarray | None = None,
    fraction: float = TOP_FRACTION,
    background: float = BACKGROUND_FRACTION,
) -> tuple[np.ndarray, float]:
    """Divide by the top-``fraction`` mean, zero what falls below ``background``.

    Returns the normalized float32 array and the normalization value.
    """
    value = top_mean(data, mask, fraction)
    return _apply(data, value, background), value


def normalize_reference(
    data: np.ndarray, reference: np.ndarray, background: float = BACKGROUND_FRACTION
) -> tuple[np.ndarray, float]:
    """SUVR: divide by the mean over ``reference`` (a boolean mask); same background rule."""
    ref = np.asarray(reference, dtype=bool) & np.isfinite(data)
    if ref.sum() == 0:
        raise DataError("PET normalization: the reference region is empty")
    value = float(np.asarray(data, dtype=np.float64)[ref].mean())
    if not value > 0:
        raise DataError(f"PET normalization: reference region mean is {value:g}, not positive")
    # the background threshold is relative to the top-voxel mean in both modes
    out = np.where(np.isfinite(data), data, 0.0).astype(np.float32) / np.float32(value)
    top = top_mean(out)
    out[out < background * top] = 0.0
    return out, value
