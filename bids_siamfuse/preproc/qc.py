"""Quality metrics and flags of one session (T1w + PET), computed inside the workflow.

:func:`anat_metrics` (the T1w: acquisition, segmentation, registration) and
:func:`pet_metrics` (the PET: motion, field of view, coregistration) return plain dicts of
numbers; :func:`evaluate` compares them with :data:`THRESHOLDS` and gives one row per metric
(value, reference range, ``ok``/``flagged``/``warning``/``n/a``, reason). A session with any
flagged metric is *flagged*: the participant status table says so with the reasons, the report
shows them at the top, and the group level leaves the session out unless ``--include-flagged``.
A ``warning`` (thick slices) is shown in the report and the QC table but flags nothing: the
metrics of what actually fails on such scans (the tissue classes collapsing) flag.

The thresholds catch gross failures (the tissue classes collapsing on a thick-slice T1w, a PET
that misses part of the brain, a subject who moved more than the PET's resolution); they are
not a grading of ordinary scans. Where they come from is documented in
``docs/preprocessing.md`` ("Quality control"), next to the values measured here.

This module imports numpy/scipy/pandas only (the interfaces do the file handling).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Threshold:
    lower: float | None
    upper: float | None
    unit: str
    what: str  # the reason shown when flagged ("{value}" and the limit are appended)
    severity: str = "flag"  # "flag": the session is flagged; "warning": shown, flags nothing


#: metric -> reference range. ``None``: no bound on that side. See docs/preprocessing.md.
THRESHOLDS: dict[str, Threshold] = {
    # acquisition: a warning only. The real 1x1x3 mm T1w of issue 17 collapsed, but the
    # phantom at 1x1x3 mm segments as well as at 1 mm (docs/preprocessing.md): the
    # segmentation metrics below flag the collapse itself, naming thick slices when present
    "t1w_voxel_max_mm": Threshold(
        None, 2.0, "mm", "thick slices (largest voxel side)", severity="warning"
    ),
    # MRIQC-style image quality (bias-corrected T1w, pure-tissue voxels)
    "t1w_snr_wm": Threshold(5.0, None, "", "low T1w SNR in white matter"),
    "t1w_cnr": Threshold(1.0, None, "", "low T1w grey/white contrast-to-noise"),
    # segmentation: the Atropos class means (WM - GM) / WM; ~0.25-0.45 on T1w, 0.08 on the
    # collapsed real 1x1x3 mm run (GM 792, WM 861)
    "seg_gm_wm_contrast": Threshold(0.12, None, "", "tissue classes collapsed (GM/WM means)"),
    # mean GM (wc1) in the template's deep WM: 0.37 (modulated) on the collapsed real run,
    # <= 0.045 on every other (issue 17); the phantoms and synthetic subjects: see the docs
    "gm_deep_wm": Threshold(None, 0.15, "", "tissue classes collapsed (GM in deep white matter)"),
    # tissue fractions of the total intracranial volume (brain-mask GM + WM + CSF)
    "gm_fraction": Threshold(0.30, 0.60, "", "implausible GM fraction of TIV"),
    "wm_fraction": Threshold(0.20, 0.50, "", "implausible WM fraction of TIV"),
    "csf_fraction": Threshold(0.05, 0.50, "", "implausible CSF fraction of TIV"),
    # generous upper end: the synthetic cohort's template-sized brains measure ~2250 mL
    "tiv_ml": Threshold(900.0, 2800.0, "mL", "implausible intracranial volume"),
    # registration: correlations with the template (masked); real upright heads give 0.54-0.59
    # after the affine, a wrong orientation far less
    "affine_correlation": Threshold(0.45, None, "", "poor affine fit to the template"),
    "t1w_template_correlation": Threshold(0.60, None, "", "poor nonlinear fit to the template"),
    # modulated-free GM on the grid vs the template GM: 0.57-0.68 on real runs, 0.29 collapsed
    "gm_template_correlation": Threshold(0.45, None, "", "GM map unlike the template GM"),
    # PET
    # one PET resolution element (ADNI's standardized 8 mm FWHM); the synthetic cohort's
    # "small" inter-frame motion gives FD 4.2-4.7 mm
    "pet_fd_max_mm": Threshold(None, 8.0, "mm", "large PET motion (framewise displacement)"),
    "pet_coverage": Threshold(0.97, None, "", "PET field of view misses part of the brain"),
    "pet_region_coverage_min": Threshold(
        0.90, None, "", "PET field of view misses part of an AAL region"
    ),
    "pet_gm_correlation": Threshold(0.30, None, "", "poor PET/T1w fit (PET unlike the GM)"),
}

#: Set to 1 for the QC as it was before issue 17's thick-slice change (every T1w with voxels
#: over 2 mm flagged, no ``gm_deep_wm`` row): for output comparisons only (DEVELOPERS.md).
LEGACY_QC_VARIABLE = "BIDS_SIAMFUSE_LEGACY_QC"


def _legacy() -> bool:
    return bool(os.environ.get(LEGACY_QC_VARIABLE))


#: the QC table's columns (one row per metric)
COLUMNS = ["metric", "value", "lower", "upper", "unit", "status", "reason"]


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _pure(fraction: np.ndarray, mask: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Voxels of (nearly) pure tissue, eroded once so edges and partial volumes stay out."""
    sel = (fraction >= level) & mask
    eroded = ndimage.binary_erosion(sel)
    return eroded if eroded.sum() >= 50 else sel


def image_quality(t1w: np.ndarray, gm: np.ndarray, wm: np.ndarray, mask: np.ndarray) -> dict:
    """SNR in WM (mean / SD, MRIQC's ``snr_wm``) and CNR (WM - GM) / sqrt(SD_GM^2 + SD_WM^2).

    MRIQC's CNR adds the air's variance under the root; skull-stripped and conformed inputs
    have no usable air, so it is left out (the figures are a little higher than MRIQC's).
    """
    mask = np.asarray(mask, bool)
    w, g = _pure(wm, mask), _pure(gm, mask, 0.9)
    out = {"t1w_snr_wm": math.nan, "t1w_cnr": math.nan}
    if w.sum() >= 10:
        vals = t1w[w].astype(np.float64)
        out["t1w_snr_wm"] = float(vals.mean() / max(vals.std(ddof=1), 1e-12))
    if w.sum() >= 10 and g.sum() >= 10:
        vw, vg = t1w[w].astype(np.float64), t1w[g].astype(np.float64)
        out["t1w_cnr"] = float(
            abs(vw.mean() - vg.mean()) / max(math.sqrt(vw.var(ddof=1) + vg.var(ddof=1)), 1e-12)
        )
    return out


def segmentation_contrast(means: dict) -> float:
    """(WM - GM) / WM of the Atropos class means (NaN when they are not available)."""
    gm, wm = means.get("atropos_GM"), means.get("atropos_WM")
    if gm is None or wm is None or not wm > 0:
        return math.nan
    return float((wm - gm) / wm)


def tissue_fractions(gm, wm, csf, mask, voxel_ml: float) -> dict:
    """GM, WM, CSF shares of the total intracranial volume (their sum in the brain mask)."""
    mask = np.asarray(mask, bool)
    vols = [float(np.asarray(a, np.float64)[mask].sum()) * voxel_ml for a in (gm, wm, csf)]
    tiv = sum(vols)
    if tiv <= 0:
        return {k: math.nan for k in ("gm_fraction", "wm_fraction", "csf_fraction", "tiv_ml")}
    return {
        "gm_fraction": vols[0] / tiv,
        "wm_fraction": vols[1] / tiv,
        "csf_fraction": vols[2] / tiv,
        "tiv_ml": tiv,
        "gm_ml": vols[0],
        "wm_ml": vols[1],
        "csf_ml": vols[2],
    }


def masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    mask = np.asarray(mask, bool) & np.isfinite(a) & np.isfinite(b)
    if mask.sum() < 10:
        return math.nan
    x, y = np.asarray(a, np.float64)[mask], np.asarray(b, np.float64)[mask]
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


@functools.lru_cache(maxsize=4)
def template_on_grid(kind: str) -> np.ndarray:
    """A template map (``T1w``, ``GM``...) sampled on the 121x145x121 grid."""
    from ..data.templates import load_template
    from .registration import resample_to_grid

    img = load_template(kind)
    return resample_to_grid(np.asanyarray(img.dataobj, np.float32), img.affine)


@functools.lru_cache(maxsize=1)
def deep_wm_mask() -> np.ndarray:
    """Deep white matter on the grid: template WM >= 0.9, eroded by 3 mm (2 voxels).

    96 mL; the template's own GM there averages 0.005 (at most 0.10), so GM found there is
    misclassified WM, not anatomy (the collapse of issue 17's 1x1x3 mm run put 0.37 there).
    """
    deep = ndimage.binary_erosion(template_on_grid("WM") >= 0.9, iterations=2)
    deep.setflags(write=False)
    return deep


#: the metrics that say the tissue classes collapsed (their reasons name thick slices too)
COLLAPSE_METRICS = ("seg_gm_wm_contrast", "gm_deep_wm", "gm_template_correlation")


def anat_metrics(
    *,
    zooms,
    t1w: np.ndarray,
    brain_mask: np.ndarray,
    gm: np.ndarray,
    wm: np.ndarray,
    csf: np.ndarray,
    means: dict,
    affine_correlation: float,
    gm_grid: np.ndarray | None = None,
    t1w_grid: np.ndarray | None = None,
    grid_mask: np.ndarray | None = None,
) -> dict:
    """Every T1w metric of :data:`THRESHOLDS` (arrays in T1w space, grid arrays optional)."""
    zooms = [float(z) for z in zooms[:3]]
    out = {
        "t1w_voxel_max_mm": max(zooms),
        "t1w_voxel_min_mm": min(zooms),
        "seg_gm_wm_contrast": segmentation_contrast(means),
        "affine_correlation": float(affine_correlation),
    }
    out.update(image_quality(t1w, gm, wm, brain_mask))
    out.update(tissue_fractions(gm, wm, csf, brain_mask, float(np.prod(zooms)) / 1000.0))
    for key in ("atropos_CSF", "atropos_GM", "atropos_WM"):
        if key in means:
            out[key] = float(means[key])
    if grid_mask is None and (gm_grid is not None or t1w_grid is not None):
        from ..data.templates import grid_brain_mask

        grid_mask = grid_brain_mask()
    if gm_grid is not None:
        out["gm_template_correlation"] = masked_correlation(
            gm_grid, template_on_grid("GM"), grid_mask
        )
        if not _legacy():
            gm_deep = np.asarray(gm_grid, np.float64)[deep_wm_mask()]
            out["gm_deep_wm"] = float(gm_deep.mean())
    if t1w_grid is not None:
        out["t1w_template_correlation"] = masked_correlation(
            t1w_grid, template_on_grid("T1w"), grid_mask
        )
    return out


def pet_metrics(
    *,
    motion=None,
    coverage: np.ndarray | None = None,
    atlas_labels: np.ndarray | None = None,
    atlas_names=None,
    pet_grid: np.ndarray | None = None,
    gm_grid: np.ndarray | None = None,
    grid_mask: np.ndarray | None = None,
) -> dict:
    """PET metrics: motion (a motion table), FOV coverage of the grid brain, PET/GM fit.

    ``coverage``: the fraction of the frames' weight that sees each grid voxel (1 inside the
    field of view of every frame); ``pet_grid``/``gm_grid``: the normalized PET and the GM map
    on the grid.
    """
    out: dict = {}
    if motion is not None and len(motion):
        fd = np.asarray(motion["framewise_displacement"], dtype=np.float64)
        out["pet_fd_max_mm"] = float(np.nanmax(fd)) if fd.size else 0.0
        out["pet_fd_mean_mm"] = float(np.nanmean(fd[1:])) if fd.size > 1 else 0.0
        out["pet_frames"] = int(len(motion))
    if grid_mask is None:
        from ..data.templates import grid_brain_mask

        grid_mask = grid_brain_mask()
    if coverage is not None:
        cov = np.asarray(coverage, np.float64)
        out["pet_coverage"] = float((cov[grid_mask] >= 0.999).mean())
        if atlas_labels is not None:
            worst, worst_name = 1.0, ""
            for i in range(1, int(atlas_labels.max()) + 1):
                sel = atlas_labels == i
                if not sel.any():
                    continue
                share = float((cov[sel] >= 0.999).mean())
                if share < worst:
                    worst = share
                    worst_name = atlas_names[i - 1] if atlas_names is not None else str(i)
            out["pet_region_coverage_min"] = worst
            out["pet_region_least_covered"] = worst_name
    if pet_grid is not None and gm_grid is not None:
        out["pet_gm_correlation"] = masked_correlation(pet_grid, gm_grid, grid_mask)
    return out


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def evaluate(metrics: dict, thresholds: dict | None = None) -> list[dict]:
    """One row per metric (see :data:`COLUMNS`); metrics without a threshold are ``info``."""
    thresholds = THRESHOLDS if thresholds is None else thresholds
    legacy = _legacy()
    rows = []
    for name, value in metrics.items():
        spec = thresholds.get(name)
        row = {"metric": name, "value": value, "lower": None, "upper": None, "unit": ""}
        row.update(status="info", reason="")
        if spec is not None:
            row.update(lower=spec.lower, upper=spec.upper, unit=spec.unit)
            number = value if isinstance(value, (int, float)) else math.nan
            if number is None or not math.isfinite(number):
                row["status"] = "n/a"
            elif spec.lower is not None and number < spec.lower:
                row["status"] = "flagged" if spec.severity == "flag" or legacy else "warning"
                row["reason"] = f"{spec.what}: {name} = {_fmt(number)} < {_fmt(spec.lower)}"
            elif spec.upper is not None and number > spec.upper:
                row["status"] = "flagged" if spec.severity == "flag" or legacy else "warning"
                row["reason"] = f"{spec.what}: {name} = {_fmt(number)} > {_fmt(spec.upper)}"
            else:
                row["status"] = "ok"
            if row["status"] == "flagged" and name in COLLAPSE_METRICS and not legacy:
                row["reason"] += _thick_slices(metrics, thresholds)
            if row["status"] == "flagged" and name == "pet_region_coverage_min":
                where = metrics.get("pet_region_least_covered")
                row["reason"] += f" ({where})" if where else ""
        rows.append(row)
    return rows


def _thick_slices(metrics: dict, thresholds: dict) -> str:
    """`` on thick slices (3 mm)`` when the T1w's voxels are over the thick-slice limit."""
    spec = thresholds.get("t1w_voxel_max_mm")
    side = metrics.get("t1w_voxel_max_mm")
    if spec is None or spec.upper is None or not isinstance(side, (int, float)):
        return ""
    return f" on thick slices ({_fmt(float(side))} mm)" if side > spec.upper else ""


def reasons(rows: list[dict]) -> list[str]:
    return [r["reason"] for r in rows if r["status"] == "flagged"]


def warnings(rows: list[dict]) -> list[str]:
    """Reasons of the rows outside a warning range (shown; they flag nothing)."""
    return [r["reason"] for r in rows if r["status"] == "warning"]


def qc_table(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows, columns=COLUMNS)


def read_qc(path: Path) -> tuple[bool, list[str]] | None:
    """(flagged, reasons) of a QC table on disk; None when there is none or it is unreadable."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        status = table["status"].tolist()
        why = [r for r, s in zip(table["reason"], status) if s == "flagged"]
    except (ValueError, OSError, KeyError):
        return None
    return bool(why), why


def qc_path(out_dir: Path, source: dict) -> Path:
    from ..bids import output_path

    return output_path(out_dir, "qc", source)


def session_flag(deriv_dir: Path, region_file: Path) -> tuple[bool, list[str]]:
    """Whether the session of a region file is flagged (no QC table: not flagged)."""
    from ..bids import source_entities

    found = read_qc(qc_path(deriv_dir, source_entities(Path(region_file).name)))
    return found if found is not None else (False, [])


def sidecar(why: list[str]) -> dict:
    """The QC table's JSON sidecar: the verdict and what the columns mean."""
    return {
        "Description": "quality metrics of the session (T1w and PET) against reference ranges; "
        "a session with any metric outside its range is flagged and left out of the group "
        "level unless --include-flagged (docs/preprocessing.md, 'Quality control')",
        "Flagged": bool(why),
        "Reasons": list(why),
        "metric": {"Description": "metric name (docs/preprocessing.md)"},
        "value": {"Description": "measured value"},
        "lower": {"Description": "lowest acceptable value (n/a: no bound)"},
        "upper": {"Description": "highest acceptable value (n/a: no bound)"},
        "status": {
            "Description": "ok, flagged (outside the range), "
            + ("" if _legacy() else "warning (outside a range that flags nothing: thick slices), ")
            + "n/a (not measured), info (no range)"
        },
        "reason": {"Description": "why the metric is flagged"},
    }
