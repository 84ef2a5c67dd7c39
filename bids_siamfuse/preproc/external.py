"""External MNI-space maps onto the grid (``-d/--derivatives``, see :mod:`bids_siamfuse.external`).

:func:`map_to_grid` reads a GM or PET map that another pipeline wrote in an MNI-like space and
returns it on the 121x145x121 1.5 mm grid: untouched when it already lies on the grid (Clinica's
``Ixi549Space`` maps, this app's own), otherwise resampled once by trilinear interpolation
(order 1, no prefilter, 0 outside the field of view). The map's world coordinates are taken as
those of the grid: ``MNI152NLin6Asym``, ``IXI549Space`` and ``MNI152NLin2009aSym`` are all
registered to MNI coordinates, and no template-to-template warp ships with this app (nothing
downloads at run time), so the few millimetres by which these templates differ remain.

Trilinear rather than higher-order: the maps are probabilities (GM) and ratios (PET) that must
stay non-negative (a cubic B-spline overshoots at the brain edge) and already carry the
smoothness of their own pipeline; one interpolation, like the app's own PET resampling.

:func:`prepare_pair` adds the PET intensity normalization of the run (``--pet-ref-region``;
see ``docs/preprocessing.md``, "Bring your own preprocessing", for why a Clinica SUVR map is
normalized again) and returns what the workflow writes.
"""

from __future__ import annotations

import numpy as np

from ..data.templates import on_grid
from ..errors import DataError
from .registration import resample_to_grid


def map_to_grid(path, kind: str) -> tuple[np.ndarray, dict]:
    """(float32 map on the grid, facts for the provenance); DataError naming the file."""
    import nibabel as nb

    try:
        img = nb.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - truncated gzip, bad header...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(f"{path}: unreadable {kind} map ({first})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: {kind} map of shape {data.shape}; expected a 3-D volume")
    finite = np.isfinite(data)
    # SPM writes NaN outside the source's field of view in float images
    nonfinite = int(data.size - finite.sum())
    if nonfinite:
        data = np.where(finite, data, 0.0).astype(np.float32)
    if on_grid(img):
        out, resampled = data, False
    else:
        out, resampled = resample_to_grid(data, img.affine), True
    if not np.any(out > 0):
        raise DataError(f"{path}: the {kind} map has no positive voxel on the grid")
    if kind == "GM" and float(out.min()) < -1e-3:
        raise DataError(f"{path}: negative grey-matter values ({float(out.min()):g})")
    return out, {"NonFiniteVoxelsSetToZero": nonfinite, "Resampled": resampled}


def prepare_pair(
    gm_path, pet_path, *, ref_region: str = "none", pet_normalized: str = ""
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Both maps on the grid, the PET normalized; (gm, pet, what was done to the PET).

    ``pet_normalized``: non-empty when the PET's sidecar says this app normalized it already
    (its own ``desc-preproc_pet``); it is then used as it is.
    """
    from .pet import normalize

    gm, gm_info = map_to_grid(gm_path, "GM")
    pet, pet_info = map_to_grid(pet_path, "PET")
    if pet_normalized:
        info = {"IntensityNormalization": f"none here: already normalized ({pet_normalized})"}
    else:
        pet, value, description = normalize(pet, ref_region)
        info = {
            "IntensityNormalization": description,
            "NormalizationValue": float(value),
            "ReferenceRegion": ref_region,
        }
    return gm, pet, {"GM": gm_info, "PET": {**pet_info, **info}}
