"""JSON sidecar contents of the participant derivatives, in one place.

The workflows' data sinks and the synthetic cohort's ``--preprocessed`` writer both build their
sidecars here, so a perfect synthetic run and a real run write the same fields.

``Sources`` lists BIDS URIs: ``bids:raw:<path>`` for files of the input dataset (the output's
``dataset_description.json`` links ``raw`` to it) and ``bids::<path>`` for derivatives of this
dataset. ``SpatialReference`` is the template identifier for MNI-space outputs and the URI of
the T1w for native T1w-space outputs.
"""

from __future__ import annotations

from pathlib import Path

from ..data.templates import RES_LABEL, SPACE


def bids_uri(path: Path | str, root: Path | str | None, dataset: str = "raw") -> str:
    """``bids:<dataset>:<path relative to root>`` (the plain path when it is not under root)."""
    path = Path(path)
    if root is not None:
        try:
            rel = path.absolute().relative_to(Path(root).absolute())
        except ValueError:
            return str(path)
        return f"bids:{dataset}:{rel.as_posix()}"
    return str(path)


def grid_meta() -> dict:
    return {
        "SpatialReference": SPACE,
        "Resolution": RES_LABEL,
        "GridShape": [121, 145, 121],
        "VoxelSize": [1.5, 1.5, 1.5],
    }


def gm_mni_meta(sources: list[str], *, modulated: bool, method: str) -> dict:
    """Sidecar of the GM map on the grid (SPM's wc1, or mwc1 when ``modulated``)."""
    desc = "Grey-matter map in MNI space on the 121x145x121 1.5 mm grid, " + (
        "modulated by the Jacobian determinant of the spatial normalization "
        "(preserves GM volume: sum x 3.375 mm3 = GM volume; SPM's mwc1)"
        if modulated
        else "not modulated (SPM's wc1)"
    )
    return {
        "Description": desc,
        "Sources": list(sources),
        **grid_meta(),
        "Modulated": bool(modulated),
        "Method": method,
    }


def pet_mni_meta(
    sources: list[str], *, normalization: str, value: float, ref_region: str, method: str
) -> dict:
    """Sidecar of the intensity-normalized PET on the grid."""
    return {
        "Description": "PET in MNI space on the 121x145x121 1.5 mm grid, intensity-normalized",
        "Sources": list(sources),
        **grid_meta(),
        "IntensityNormalization": normalization,
        "NormalizationValue": float(value),
        "ReferenceRegion": ref_region,
        "Units": "arbitrary" if ref_region == "none" else "SUVR",
        "Method": method,
    }


def native_meta(sources: list[str], t1w_uri: str, description: str, **extra) -> dict:
    """Sidecar of a T1w-space output."""
    return {
        "Description": description,
        "Sources": list(sources),
        "SpatialReference": t1w_uri,
        **extra,
    }


def xfm_meta(sources: list[str], description: str, **extra) -> dict:
    return {"Description": description, "Sources": list(sources), **extra}
