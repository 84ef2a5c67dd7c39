"""Reading a task folder back for the group report (``reports/group.py`` only renders what
these functions return): Table 1 from ``participants.tsv`` for the subjects that entered the
cross-validation, Table 2's cells from ``summary.json`` (or, in task folders older than its 95 %
confidence intervals, from ``metrics.tsv``), and the permutation result (from ``summary.json``;
recomputed from ``permutation.tsv`` only where an older folder lacks it).
"""

from __future__ import annotations

import numpy as np


def _column(table, *names):
    lower = {c.lower(): c for c in table.columns}
    for name in names:
        if name in lower:
            return lower[name]
    return None


def cohort_table(participants, subjects_by_class: dict) -> dict:
    """Table 1: per class N, sex counts, age and MMSE mean +- SD (the columns that exist).

    ``participants``: DataFrame indexed by participant label; ``subjects_by_class``: class ->
    subject labels. Returns ``{"columns": [...], "rows": [[...], ...]}``.
    """
    import pandas as pd

    sex_col = _column(participants, "sex", "gender") if participants is not None else None
    age_col = _column(participants, "age") if participants is not None else None
    mmse_col = _column(participants, "mmse") if participants is not None else None
    columns = ["class", "N"]
    if sex_col:
        columns.append("sex (M/F)")
    if age_col:
        columns.append("age (mean ± SD)")
    if mmse_col:
        columns.append("MMSE (mean ± SD)")
    rows = []

    def mean_sd(values):
        values = pd.to_numeric(values, errors="coerce").dropna()
        if values.empty:
            return "n/a"
        sd = f"{values.std(ddof=1):.1f}" if len(values) > 1 else "n/a"
        return f"{values.mean():.1f} ± {sd}"

    for label, subjects in subjects_by_class.items():
        row = [label, str(len(subjects))]
        sub = (
            participants.loc[[s for s in subjects if s in participants.index]]
            if participants is not None
            else None
        )
        if sex_col:
            sex = sub[sex_col].astype(str).str.strip().str.upper().str[:1]
            row.append(f"{int((sex == 'M').sum())}/{int((sex == 'F').sum())}")
        if age_col:
            row.append(mean_sd(sub[age_col]))
        if mmse_col:
            row.append(mean_sd(sub[mmse_col]))
        rows.append(row)
    return {"columns": columns, "rows": rows}


def ci_cell(stats: dict) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    if stats.get("ci_low") is None:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"


def method_kind(method: str, model_method: str = "siamese_attention") -> str:
    """``model``, ``ablation`` or ``baseline`` (the row groups of Table 2)."""
    if method == model_method:
        return "model"
    return "ablation" if method.startswith(model_method + "_") else "baseline"


def metrics_table(metrics, model_method: str = "siamese_attention", summary=None) -> dict:
    """Table 2, the model first, then its ablations, then the baselines.

    With ``summary`` (``summary.json`` -> ``metrics``, holding 95 % CIs): mean [CI] at subject
    level; otherwise (older task folders) mean +- SD (ddof 1) over the folds of metrics.tsv.
    """
    from ..model.metrics import METRICS

    names = [m for m in METRICS if m in metrics.columns]
    if "level" in metrics.columns:
        metrics = metrics[metrics["level"] == "subject"]
    methods = list(dict.fromkeys(metrics["method"]))
    order = {m: i for i, m in enumerate(methods)}
    rank = {"model": 0, "ablation": 1, "baseline": 2}
    methods.sort(key=lambda m: (rank[method_kind(m, model_method)], order[m]))
    stats = (summary or {}).get("metrics") or {}
    with_ci = any(
        (v or {}).get("ci_low") is not None
        for m in stats.values()
        for v in (m or {}).values()
        if isinstance(v, dict)
    )
    rows = []
    for method in methods:
        part = metrics[metrics["method"] == method]
        cells = []
        for name in names:
            if with_ci and method in stats:
                cells.append(ci_cell(stats[method].get(name)))
                continue
            values = part[name].dropna().astype(float)
            if values.empty:
                cells.append("n/a")
            elif len(values) == 1:
                cells.append(f"{values.iloc[0]:.3f}")
            else:
                cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f}")
        kind = method_kind(method, model_method)
        rows.append({"method": method, "model": kind == "model", "kind": kind, "cells": cells})
    folds = int(metrics[["repeat", "fold"]].drop_duplicates().shape[0]) if len(metrics) else 0
    return {"columns": names, "rows": rows, "folds": folds, "ci": with_ci}


def cohort_members(predictions, classes, model_method: str) -> tuple[dict, dict]:
    """(class -> subject labels, class -> test sessions) of the subjects in ``predictions.tsv``
    (the model's rows; every method's when it has none)."""
    model_rows = predictions[predictions["method"] == model_method]
    if model_rows.empty:
        model_rows = predictions
    firsts = model_rows.drop_duplicates("participant_id")
    by_class = {
        c: sorted(
            str(s).removeprefix("sub-")
            for s in firsts.loc[firsts["true"].astype(str) == c, "participant_id"]
        )
        for c in classes
    }
    sessions = model_rows.groupby("true")["session"].size().to_dict()
    return by_class, {str(k): int(v) for k, v in sessions.items()}


def permutation_result(summary: dict, metrics, permutation, model_method: str):
    """(observed balanced accuracy the reruns were compared with, p-value) of the model."""
    observed = (summary.get("permutation") or {}).get("observed_balanced_accuracy")
    if observed is not None:
        return observed, summary["permutation"].get("p_value")
    observed = summary.get("balanced_accuracy", {})
    observed = observed.get("mean") if isinstance(observed, dict) else observed
    if observed is None and metrics is not None:
        observed = float(
            metrics.loc[metrics["method"] == model_method, "balanced_accuracy"].mean()
        )
    p_value = (summary.get("permutation") or {}).get("p_value")
    if p_value is None and observed is not None:
        null = permutation["balanced_accuracy"].to_numpy(dtype=float)
        p_value = float((1 + np.sum(null >= observed)) / (1 + null.size))
    return observed, p_value
