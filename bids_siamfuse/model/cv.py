"""Cross-validation of the siamese-attention model and the baselines, on one or many devices.

torch / numpy / scikit-learn only (no nipype, pybids, nilearn, nibabel), so this runs alone on a
GPU machine: ``cross_validate(RegionDataset.load("cohort.npz"), ...)``. The pieces, by job:
:mod:`.folds` (seeds, subject-level folds, shuffles), :mod:`.tasks` (one fit per task),
:mod:`.workers` (devices and worker processes), :mod:`.metrics` (per-fold metrics and
statistics), :mod:`.baselines`; this module runs them and gathers the tables (:class:`CVResult`).

Nothing sees the test fold
    Every fold calls ``fit(train_subset, TrainConfig(...))`` with the training rows only; the
    model fits its own standardization, validation split, siamese networks and attention module
    inside (see :mod:`bids_siamfuse.model.train`). The test rows are used once, for
    ``predict_proba`` (and the Figure 6 activation counts). The baselines (region-mean GM and PET
    features, ``StandardScaler`` + linear SVM or logistic regression) are scikit-learn pipelines
    fit on the same training rows.

Permutation test
    ``permutations=N`` reruns the CV of the first repeat (new stratified folds) N times with the
    labels shuffled between *subjects* (sessions follow their subject). The p-value of the first
    repeat's observed mean balanced accuracy is ``(1 + #{perm >= observed}) / (1 + N)``: both
    sides are one repeat's statistic (the mean over all repeats would face a wider null and make
    the test conservative; rerunning every repeat per permutation costs ``repeats`` times more).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .baselines import BASELINES, baseline_scores, region_features
from .data import RegionDataset, release_device_rows
from .folds import KIND_CV
from .metrics import (
    METRICS,
    compute_metrics,
    corrected_paired_test,
    reliability,
    roc_points,
    subject_scores,
    summarize,
)
from .tasks import Fit, plan_tasks
from .workers import run_tasks

if TYPE_CHECKING:
    from .options import TrainConfig

MODEL_METHOD = "siamese_attention"
#: Ablations trained in every CV fold beside the model (``attention_stage.ablation_specs``), named
#: ``siamese_attention_<ablation>`` in the outputs.
ABLATION_PREFIX = MODEL_METHOD + "_"


@dataclass
class CVResult:
    classes: tuple
    metrics: list[dict] = field(default_factory=list)  # method, repeat, fold, level, METRICS
    predictions: list[dict] = field(default_factory=list)
    roc: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    relevance: dict = field(default_factory=dict)  # key -> (R,) mean over folds
    activations: dict = field(default_factory=dict)  # key -> (R,) mean over test sessions
    permutations: list[dict] = field(default_factory=list)  # permutation, method -> BA
    summary: dict = field(default_factory=dict)  # method -> metric -> mean/sd/n
    p_values: dict = field(default_factory=dict)  # method -> p
    permutation_observed: dict = field(default_factory=dict)  # method -> first repeat's BA
    final: dict | None = None  # tensors, meta, standardizer, relevance, history
    fold_relevance: dict = field(default_factory=dict)  # (repeat, fold) -> key -> (R,)
    folds: dict = field(default_factory=dict)  # (perm, repeat) -> fold index per row
    timing: dict = field(default_factory=dict)
    summary_session: dict = field(default_factory=dict)  # as summary, per test session
    per_repeat: list[dict] = field(default_factory=list)  # method, repeat, level, metric means
    comparisons: list[dict] = field(default_factory=list)  # model vs each method, paired
    calibration: list[dict] = field(default_factory=list)  # method, bin, predicted, observed
    training: list[dict] = field(default_factory=list)  # repeat, fold, region, kept epoch...
    methods: list = field(default_factory=list)  # model, ablations, baselines (output order)

    def mean_balanced_accuracy(self, method: str = MODEL_METHOD) -> float:
        return self.summary[method]["balanced_accuracy"]["mean"]


#: Issue 16: compute the baselines of every CV task in a thread of this process while the
#: model tasks run on a GPU or in worker processes (this process then mostly waits) instead of
#: after them (4-6 s of a 250-subject CV on an H200). Not with one CPU device: there the
#: thread would compete with torch's threads for the same cores. ``False``: always after them
#: (the benchmarks' baseline). Same numbers either way.
PARALLEL_BASELINES = True


def _parallel_baselines(devices: list[str]) -> bool:
    return PARALLEL_BASELINES and (
        len(devices) > 1 or any(str(d).startswith("cuda") for d in devices)
    )


def _all_baselines(data, tasks) -> dict:
    """``{task.key: baseline scores}`` of every CV task (see :func:`_baselines`)."""
    feats = region_features(data)
    out = {}
    for task in tasks:
        if task.kind != KIND_CV:
            continue
        labels = data.labels if task.labels is None else task.labels
        out[task.key] = _baselines(
            data, feats, labels, task.train_index, task.test_index, task.seed
        )
    return out


def _baselines(data, feats, labels, train_idx, test_idx, seed) -> dict[str, np.ndarray]:
    out = {}
    groups = np.asarray(data.subjects).astype(str)[train_idx]
    for method, (kind, mods) in BASELINES.items():
        x = np.concatenate([feats[m] for m in mods], axis=1)
        out[method] = baseline_scores(
            kind, x[train_idx], labels[train_idx], x[test_idx], len(data.classes), seed, groups
        )
    return out


def cross_validate(
    data: RegionDataset,
    *,
    folds: int = 5,
    repeats: int = 1,
    seed: int = 42,
    permutations: int = 0,
    config: TrainConfig | None = None,
    devices: list[str] | None = None,
    threads: int | None = None,
    fit: Fit | None = None,
    progress: Callable | None = None,
    baselines: bool = True,
    final_model: bool = True,
    work_dir: Path | None = None,
    ablations: bool = True,
) -> CVResult:
    """Cross-validate the model (and the baselines) on ``data``; see the module docstring.

    ``config``: the training configuration (:func:`bids_siamfuse.config.train_config` at the
    group level; default: every default); ``fit``: the training engine (default
    :func:`bids_siamfuse.model.train.fit`).
    """
    t0 = time.perf_counter()
    classes = tuple(data.classes)
    tasks, assignment = plan_tasks(
        data,
        folds=folds,
        repeats=repeats,
        seed=seed,
        permutations=permutations,
        final_model=final_model,
        ablations=ablations,
    )
    pool = pending = None
    if baselines and _parallel_baselines(devices or ["cpu"]):
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baselines")
        pending = pool.submit(_all_baselines, data, tasks)
    try:
        results = run_tasks(
            data,
            tasks,
            devices or ["cpu"],
            fit=fit,
            config=config,
            threads=threads,
            progress=progress,
            work_dir=work_dir,
        )
        t_model = time.perf_counter() - t0
        precomputed = pending.result() if pending is not None else None
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        release_device_rows()  # this process's GPU copy of the cohort
    res = CVResult(classes=classes)
    _collect(
        res,
        data,
        tasks,
        results,
        baselines=baselines,
        permutations=permutations,
        precomputed=precomputed,
    )
    if final_model:
        res.final = results[tasks[0].key]
    res.folds = {key: fold_of for key, (fold_of, _labels) in assignment.items()}
    res.timing = {"model_s": t_model, "total_s": time.perf_counter() - t0, "tasks": len(tasks)}
    return res


def _method_scores(out: dict, baseline_scores_: dict | None) -> dict[str, np.ndarray]:
    scores = {MODEL_METHOD: out["proba"]}
    for name, sc in (out.get("ablations") or {}).items():
        scores[ABLATION_PREFIX + name] = sc
    if baseline_scores_:
        scores.update(baseline_scores_)
    return scores


def _collect(
    res: CVResult,
    data,
    tasks,
    results,
    *,
    baselines: bool,
    permutations: int,
    precomputed: dict | None = None,
):
    """Turn the task results into the CV tables (metrics, predictions, ROC, statistics);
    ``precomputed``: the baselines' scores per task key (:func:`_all_baselines`)."""
    classes = res.classes
    n_classes = len(classes)
    feats = region_features(data) if baselines and precomputed is None else None
    subjects = np.asarray(data.subjects).astype(str)
    sessions = np.asarray(data.sessions).astype(str)
    names = list(data.layout.names)
    rel_sum: dict = {}
    act_sum: dict = {}
    act_n = 0
    n_rel = 0
    perm_ba: dict[int, dict[str, list]] = {}
    calib: dict[str, list] = {}
    sizes = {"subject": [], "session": []}  # (n_train, n_test) per observed fold
    methods: list = []
    for task in tasks:
        if task.kind != KIND_CV:
            continue
        out = results[task.key]
        labels = data.labels if task.labels is None else task.labels
        y_test = labels[task.test_index]
        base = (
            precomputed[task.key]
            if baselines and precomputed is not None
            else _baselines(data, feats, labels, task.train_index, task.test_index, task.seed)
            if baselines
            else None
        )
        scores = _method_scores(out, base)
        for method in scores:
            if method not in methods:
                methods.append(method)
        test_subjects = subjects[task.test_index]
        for method, sc in scores.items():
            _, y_sub, sc_sub = subject_scores(test_subjects, y_test, sc)
            m_sub = compute_metrics(y_sub, sc_sub, n_classes)
            if task.perm:
                perm_ba.setdefault(task.perm, {}).setdefault(method, []).append(
                    m_sub["balanced_accuracy"]
                )
                continue
            m_ses = compute_metrics(y_test, sc, n_classes)
            calib.setdefault(method, []).append((y_sub, sc_sub))
            for level, m, n_test in (
                ("subject", m_sub, len(y_sub)),
                ("session", m_ses, len(task.test_index)),
            ):
                res.metrics.append(
                    {
                        "method": method,
                        "repeat": task.repeat + 1,
                        "fold": task.fold + 1,
                        "level": level,
                        "n_test": n_test,
                        **m,
                    }
                )
            for row in roc_points(y_test, sc, classes):
                res.roc.append(
                    {"method": method, "repeat": task.repeat + 1, "fold": task.fold + 1, **row}
                )
            pred = sc.argmax(1)
            for j, i in enumerate(task.test_index):
                res.predictions.append(
                    {
                        "participant_id": f"sub-{subjects[i]}",
                        "session": f"ses-{sessions[i]}" if sessions[i] else None,
                        "repeat": task.repeat + 1,
                        "fold": task.fold + 1,
                        "method": method,
                        "true": classes[y_test[j]],
                        "predicted": classes[pred[j]],
                        **{f"prob_{c}": float(sc[j, k]) for k, c in enumerate(classes)},
                    }
                )
        if task.perm:
            continue
        sizes["session"].append((len(task.train_index), len(task.test_index)))
        sizes["subject"].append(
            (len(np.unique(subjects[task.train_index])), len(np.unique(test_subjects)))
        )
        for h in out.get("history", []):
            res.history.append(
                {
                    "repeat": task.repeat + 1,
                    "fold": task.fold + 1,
                    "stage": h.get("stage"),
                    "epoch": h.get("epoch"),
                    "train_loss": h.get("train_loss"),
                    "val_loss": h.get("val_loss"),
                }
            )
        if "training" in out:
            tr = out["training"]
            for r in range(len(tr["kept_epoch"])):
                init, kept = float(tr["val_hinge_initial"][r]), float(tr["val_hinge_kept"][r])
                res.training.append(
                    {
                        "repeat": task.repeat + 1,
                        "fold": task.fold + 1,
                        "index": r + 1,
                        "name": names[r] if r < len(names) else str(r + 1),
                        "kept_epoch": int(tr["kept_epoch"][r]),
                        "trained": bool(tr["kept_epoch"][r] > 0),
                        "val_hinge_initial": init,
                        "val_hinge_kept": kept,
                        "val_hinge_improvement": init - kept,
                    }
                )
        if "relevance" in out:
            res.fold_relevance[(task.repeat, task.fold)] = out["relevance"]
            for k, v in out["relevance"].items():
                rel_sum[k] = rel_sum.get(k, 0.0) + np.asarray(v)
            n_rel += 1
        if "activation_sum" in out:
            for k, v in out["activation_sum"].items():
                act_sum[k] = act_sum.get(k, 0.0) + v
            act_n += out["activation_n"]
    if n_rel:
        res.relevance = {k: np.asarray(v) / n_rel for k, v in rel_sum.items()}
    if act_n:
        res.activations = {k: np.asarray(v) / act_n for k, v in act_sum.items()}
    res.methods = methods

    def ratio(level):
        n = np.asarray(sizes[level], dtype=float)
        return float(n[:, 1].mean() / n[:, 0].mean()) if len(n) else None

    for level, target in (("subject", res.summary), ("session", res.summary_session)):
        rows = [r for r in res.metrics if r["level"] == level]
        for method in methods:
            target[method] = {
                metric: summarize([r[metric] for r in rows if r["method"] == method], ratio(level))
                for metric in METRICS
            }
            for rep in sorted({r["repeat"] for r in rows}):
                sel = [r for r in rows if r["method"] == method and r["repeat"] == rep]
                res.per_repeat.append(
                    {
                        "method": method,
                        "repeat": rep,
                        "level": level,
                        **{m: summarize([r[m] for r in sel])["mean"] for m in METRICS},
                    }
                )
    # paired comparisons over the same splits (subject level): the model against every
    # other method; the best baseline (highest mean balanced accuracy) is flagged
    rows = [r for r in res.metrics if r["level"] == "subject"]
    by = {(r["method"], r["repeat"], r["fold"]): r for r in rows}
    base_methods = [m for m in methods if m in BASELINES]
    best = (
        max(base_methods, key=lambda m: res.summary[m]["balanced_accuracy"]["mean"] or -1)
        if base_methods
        else None
    )
    splits = sorted({(r["repeat"], r["fold"]) for r in rows if r["method"] == MODEL_METHOD})
    for other in methods:
        if other == MODEL_METHOD:
            continue
        for metric in ("balanced_accuracy", "auc", "brier"):
            diffs = [
                by[(MODEL_METHOD, *k)][metric] - by[(other, *k)][metric]
                for k in splits
                if (other, *k) in by
            ]
            res.comparisons.append(
                {
                    "method": MODEL_METHOD,
                    "versus": other,
                    "best_baseline": other == best,
                    "metric": metric,
                    **corrected_paired_test(diffs, ratio("subject") or 0.0),
                }
            )
    for method, parts in calib.items():
        y = np.concatenate([p[0] for p in parts])
        sc = np.concatenate([p[1] for p in parts])
        for row in reliability(y, sc):
            res.calibration.append({"method": method, **row})
    if permutations:
        for perm in range(1, permutations + 1):
            row = {"permutation": perm}
            for method in methods:
                row[method] = float(np.mean(perm_ba[perm][method]))
            res.permutations.append(row)
        for method in methods:
            # the first repeat's statistic, as each rerun's (see the module docstring)
            observed = float(
                np.mean(
                    [
                        m["balanced_accuracy"]
                        for m in res.metrics
                        if m["method"] == method and m["level"] == "subject" and m["repeat"] == 1
                    ]
                )
            )
            res.permutation_observed[method] = observed
            null = np.array([row[method] for row in res.permutations])
            # a tiny tolerance so that float noise does not turn a tie into a win
            res.p_values[method] = float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))
