"""The group report, ``OUT/group/report.html``: one section per task folder ``OUT/group/<task>/``.

Everything shown is read back from the task folder's files (see DEVELOPERS.md, "Group-level
outputs"), so the report can be rebuilt at any time (``--reports-only``) without training; this
module renders, the numbers it shows that are not in those files as such come from
:mod:`bids_siamfuse.group.readback`:

- cohort (the paper's Table 1): N, sex, age and MMSE per class, from ``participants.tsv``
  columns when present, for the subjects that entered the cross-validation;
- metrics (Table 2): mean +- SD over folds of every method in ``metrics.tsv``;
- ROC curves per fold and their mean (Figure 5), from ``roc.tsv``;
- relevance (Figure 7) painted on the template, with the top regions named;
- activation counts (Figure 6) for MRI, PET and fused, painted the same way (the NIfTI maps
  themselves are group outputs, written with the task folder);
- the permutation histogram and p-value, the training curves, the settings and versions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger("bids_siamfuse.reports")

ACTIVATION_LABELS = (("mri", "MRI"), ("pet", "PET"), ("fused", "Fused"))
RELEVANCE_LABELS = (
    ("combined", "Combined"),
    ("mri", "MRI"),
    ("pet", "PET"),
    ("similarity", "Similarity"),
)


def _read_tsv(path: Path):
    import pandas as pd

    if not Path(path).is_file():
        return None
    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"])
    except (ValueError, OSError) as exc:
        LOGGER.warning("%s: unreadable (%s)", path, exc)
        return None


def comparison_rows(summary: dict) -> list[dict]:
    """The paired comparisons of the model against every other method (balanced accuracy)."""
    rows = []
    for c in summary.get("comparisons") or []:
        if c.get("metric") != "balanced_accuracy":
            continue
        rows.append(
            {
                "versus": c["versus"],
                "best_baseline": bool(c.get("best_baseline")),
                "difference": c.get("mean_difference"),
                "ci_low": c.get("ci_low"),
                "ci_high": c.get("ci_high"),
                "t": c.get("t"),
                "p_value": c.get("p_value"),
                "n": c.get("n"),
            }
        )
    rows.sort(key=lambda r: (not r["best_baseline"],))
    return rows


def repeat_rows(summary: dict) -> dict:
    """Balanced accuracy per repeat (subject level): {"repeats": [...], "rows": [...]}."""
    per = [r for r in summary.get("per_repeat") or [] if r.get("level") == "subject"]
    repeats = sorted({r["repeat"] for r in per})
    methods = list(dict.fromkeys(r["method"] for r in per))
    rows = []
    for m in methods:
        vals = {r["repeat"]: r.get("balanced_accuracy") for r in per if r["method"] == m}
        rows.append({"method": m, "cells": [vals.get(k) for k in repeats]})
    return {"repeats": repeats, "rows": rows}


def _paint(values: np.ndarray):
    """Per-region values (atlas order) painted on the grid (0 outside the atlas, NaN as 0)."""
    from ..preproc.regions import atlas_layout

    return atlas_layout().paint(np.nan_to_num(np.asarray(values, dtype=np.float32)))


def _brain_figure(table, labels, background, *, title, unit, cmap, anchored=False):
    """One PNG (data URI): a row of axial slices per modality of ``table``, or None."""
    from ..data.templates import GRID_AFFINE
    from . import figures
    from .html import png_uri

    rows = [
        (label, _paint(table[key].to_numpy()))
        for key, label in labels
        if key in table and not table[key].isna().all()
    ]
    if not rows:
        return None
    anchors = None
    if anchored:  # each row centred on its uniform value (its total / number of regions)
        keys = [key for key, _ in labels if key in table and not table[key].isna().all()]
        anchors = [float(np.nansum(table[k].to_numpy(dtype=float))) / len(table) for k in keys]
        rows = [(lab, img) for (lab, img), a in zip(rows, anchors) if a > 0]
        anchors = [a for a in anchors if a > 0]
    return png_uri(
        figures.region_rows(
            background, rows, GRID_AFFINE, title=title, cmap=cmap, unit=unit, n=8, anchors=anchors
        )
    )


def _top(table, key: str, n: int = 10) -> list[dict]:
    if table is None or key not in table:
        return []
    order = table.sort_values(key, ascending=False).head(n)
    cols = [c for c in table.columns if c not in ("index", "name")]
    return [
        {"rank": i + 1, "index": int(r["index"]), "name": r["name"], **{c: r[c] for c in cols}}
        for i, (_, r) in enumerate(order.iterrows())
    ]


def task_section(folder: Path, background, *, bids_dir: Path | None) -> dict:
    """Everything the template shows for one task folder."""
    from ..group.readback import (
        ci_cell,
        cohort_members,
        cohort_table,
        metrics_table,
        permutation_result,
    )
    from ..model.cv import MODEL_METHOD
    from . import figures
    from .html import png_uri

    folder = Path(folder)
    summary = {}
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
    classes = summary.get("classes") or folder.name.split("_vs_")
    section = {"name": folder.name, "classes": classes, "summary": summary, "missing": []}
    metrics = _read_tsv(folder / "metrics.tsv")
    roc = _read_tsv(folder / "roc.tsv")
    predictions = _read_tsv(folder / "predictions.tsv")
    relevance = _read_tsv(folder / "relevance.tsv")
    activations = _read_tsv(folder / "activations.tsv")
    history = _read_tsv(folder / "history.tsv")
    permutation = _read_tsv(folder / "permutation.tsv")
    for name, table in (
        ("metrics.tsv", metrics),
        ("roc.tsv", roc),
        ("predictions.tsv", predictions),
        ("relevance.tsv", relevance),
        ("activations.tsv", activations),
        ("history.tsv", history),
    ):
        if table is None:
            section["missing"].append(name)

    # Table 1: the subjects that entered the CV, per class
    if predictions is not None and len(predictions):
        by_class, sessions = cohort_members(predictions, classes, MODEL_METHOD)
        participants = None
        if bids_dir is not None and (Path(bids_dir) / "participants.tsv").is_file():
            from ..bids import read_participants

            try:
                participants = read_participants(
                    bids_dir, summary.get("label_column", "diagnosis"), required=False
                )
            except Exception as exc:  # noqa: BLE001 - the cohort table is optional
                LOGGER.warning("participants.tsv unreadable for the report: %s", exc)
        section["cohort"] = cohort_table(participants, by_class)
        section["cohort"]["sessions"] = sessions
    if metrics is not None and len(metrics):
        section["metrics"] = metrics_table(metrics, MODEL_METHOD, summary)
    section["comparisons"] = comparison_rows(summary)
    section["per_repeat"] = repeat_rows(summary)
    section["training"] = summary.get("siamese_training") or []
    calibration = _read_tsv(folder / "calibration.tsv")
    if calibration is not None and len(calibration):
        methods = list(dict.fromkeys(calibration["method"]))
        best = [r["versus"] for r in section["comparisons"] if r["best_baseline"]]
        shown = [m for m in methods if m == MODEL_METHOD] + [m for m in best if m in methods]
        shown += [m for m in methods if m not in shown and not m.startswith(MODEL_METHOD)]
        section["calibration"] = png_uri(figures.calibration_figure(calibration, shown))
        brier = summary.get("metrics") or {}
        section["brier"] = [
            {"method": m, "cell": ci_cell((brier.get(m) or {}).get("brier"))} for m in shown
        ]
    if roc is not None and len(roc):
        positive = summary.get("positive_class")
        if "class" in roc and positive:
            roc = roc[roc["class"].astype(str) == str(positive)]
        present = list(dict.fromkeys(roc["method"]))
        baselines = [m for m in present if m != MODEL_METHOD]
        section["roc"] = png_uri(
            figures.roc_figure(
                roc,
                MODEL_METHOD,
                title=f"ROC of {MODEL_METHOD} per fold and mean"
                + (f" ({positive} positive)" if positive else ""),
                baselines=baselines,
            )
        )
    if relevance is not None:
        section["relevance_map"] = _brain_figure(
            relevance,
            RELEVANCE_LABELS,
            background,
            title="Relevance (Figure 7): red above, blue below the uniform share",
            unit="fraction of total relevance (white: uniform, 1/116 for combined)",
            cmap="hot",
            anchored=True,
        )
        section["relevance_top"] = _top(relevance, "combined")
    if activations is not None:
        section["activation_map"] = _brain_figure(
            activations,
            ACTIVATION_LABELS,
            background,
            title="Activation counts (Figure 6)",
            unit="features with mask > 0.9",
            cmap="viridis",
        )
        section["activation_top"] = _top(activations, "fused")
    perm = summary.get("permutation")
    if permutation is not None and len(permutation):
        observed, p_value = permutation_result(summary, metrics, permutation, MODEL_METHOD)
        section["permutation"] = {
            "p_values": (perm or {}).get("p_values") or {},
            "n": int(len(permutation)),
            "p_value": p_value,
            "observed": observed,
            "uri": png_uri(
                figures.permutation_figure(
                    permutation["balanced_accuracy"].to_numpy(dtype=float), observed, p_value
                )
            ),
        }
    if history is not None and len(history):
        section["history"] = png_uri(figures.history_figure(history))
    section["settings"] = json.dumps(
        {k: summary[k] for k in ("cross_validation", "training", "devices") if k in summary},
        indent=2,
        default=str,
    )
    section["versions"] = summary.get("versions", {})
    section["timing"] = summary.get("timing_s", {})
    section["run_settings"] = json.dumps(summary.get("settings", {}), indent=2, default=str)
    section["files"] = sorted(p.name for p in folder.iterdir() if p.is_file())
    return section


def find_tasks(group_dir: Path) -> list[Path]:
    """Complete task folders (hidden staging folders excluded)."""
    group_dir = Path(group_dir)
    if not group_dir.is_dir():
        return []
    return sorted(
        p
        for p in group_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "metrics.tsv").is_file()
    )


def build_group_report(output_dir: Path, *, bids_dir: Path | None = None) -> Path:
    """Write ``OUT/group/report.html`` from every task folder; returns its path.

    Raises :class:`~bids_siamfuse.errors.NoInputError` when ``OUT/group`` holds no task.
    """
    from ..errors import NoInputError
    from .html import render, write_html

    group_dir = Path(output_dir) / "group"
    tasks = find_tasks(group_dir)
    if not tasks:
        raise NoInputError(f"{group_dir}: no group results (run the group level first)")
    from ..preproc.qc import template_on_grid

    background = template_on_grid("T1w")  # the ICBM152 T1w, background of every brain figure
    sections = [task_section(t, background, bids_dir=bids_dir) for t in tasks]
    html = render("report_group.html.j2", tasks=sections, output_dir=str(output_dir))
    path = write_html(group_dir / "report.html", html)
    LOGGER.info("group report: %s", path)
    return path
