"""Per-fold metrics and their statistics (Table 2, ROC, calibration, corrected paired tests).

numpy / scikit-learn / scipy only.

Metrics (per fold, at session level: each test PET session is one sample)
    The predicted class is the one with the largest probability (score). With two classes the
    second class given to ``--classes`` is the *positive* class (``--classes CN AD``: AD):
    sensitivity = recall of the positive class, specificity = recall of the reference class,
    precision and F1 of the positive class, balanced accuracy = (sensitivity + specificity) / 2,
    AUC of the positive class's probability. With more classes: balanced accuracy = sensitivity
    = mean per-class recall; specificity, precision and F1 = unweighted means over classes of
    the one-vs-rest values; AUC = mean one-vs-rest AUC. A metric undefined in a fold (e.g. no
    predicted positive for precision) is 0 for precision/F1 and NaN otherwise.
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "brier")
#: Unit of the metrics: ``subject`` (a subject's sessions averaged, the headline) or ``session``.
LEVELS = ("subject", "session")
#: Bins of the reliability curve (probability of the positive class).
CALIBRATION_BINS = 10


def compute_metrics(y_true, scores, n_classes: int) -> dict[str, float]:
    """Table 2 metrics of one fold (see the module docstring for the definitions)."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    y_pred = scores.argmax(1)
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)  # true rows per class
    predicted = cm.sum(0)
    total = cm.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        negatives = total - support
        tn = total - support - predicted + tp
        specificity = np.where(negatives > 0, tn / negatives, np.nan)
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        f1_den = support + predicted
        f1 = np.where(f1_den > 0, 2 * tp / np.maximum(f1_den, 1), 0.0)
    present = np.unique(y_true)
    onehot = np.eye(n_classes)[y_true]
    if n_classes == 2:
        brier = float(np.mean((scores[:, 1] - onehot[:, 1]) ** 2))
    else:
        brier = float(np.mean(((scores - onehot) ** 2).sum(1)))
    if n_classes == 2:
        sens, spec = float(recall[1]), float(recall[0])
        out = {
            "balanced_accuracy": (sens + spec) / 2,
            "sensitivity": sens,
            "specificity": spec,
            "precision": float(precision[1]),
            "f1": float(f1[1]),
        }
        out["auc"] = float(roc_auc_score(y_true, scores[:, 1])) if len(present) == 2 else math.nan
    else:
        out = {
            "balanced_accuracy": float(np.nanmean(recall)),
            "sensitivity": float(np.nanmean(recall)),
            "specificity": float(np.nanmean(specificity)),
            "precision": float(np.mean(precision[support > 0])),
            "f1": float(np.mean(f1[support > 0])),
        }
        if len(present) == n_classes:
            probs = scores / scores.sum(1, keepdims=True)
            out["auc"] = float(
                roc_auc_score(
                    y_true, probs, multi_class="ovr", average="macro", labels=np.arange(n_classes)
                )
            )
        else:
            out["auc"] = math.nan
    out["brier"] = brier
    return out


def roc_points(y_true, scores, classes) -> list[dict]:
    """ROC points: for two classes the positive (second) class; else one-vs-rest per class."""
    from sklearn.metrics import roc_curve

    y_true = np.asarray(y_true)
    targets = [1] if len(classes) == 2 else range(len(classes))
    rows = []
    for c in targets:
        positive = y_true == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, thr = roc_curve(positive, scores[:, c])
        rows.extend(
            {"class": classes[c], "fpr": float(f), "tpr": float(t), "threshold": float(h)}
            for f, t, h in zip(fpr, tpr, thr)
        )
    return rows


def summarize(values, test_train_ratio: float | None = None) -> dict:
    """Mean, SD (ddof 1), count of the finite values, and a 95 % confidence interval.

    The interval is Nadeau and Bengio's corrected resampled t interval (Mach. Learn. 52,
    2003): ``mean +- t(0.975, k - 1) sqrt((1/k + n_test/n_train) SD^2)`` over the k folds of
    all repeats; the ``n_test/n_train`` term accounts for the overlap of the training sets,
    which makes the plain ``SD/sqrt(k)`` far too narrow. Without ``test_train_ratio`` (or
    with fewer than 2 values) no interval is given.
    """
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "sd": None, "n": 0, "ci_low": None, "ci_high": None}
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    out = {
        "mean": float(arr.mean()),
        "sd": sd,
        "n": int(arr.size),
        "ci_low": None,
        "ci_high": None,
    }
    if test_train_ratio is not None and arr.size > 1:
        half = _nb_halfwidth(sd, arr.size, test_train_ratio)
        out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    return out


def _nb_halfwidth(sd: float, k: int, ratio: float, level: float = 0.95) -> float:
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.5 + level / 2, k - 1) * math.sqrt((1 / k + ratio) * sd**2))


def corrected_paired_test(diffs, test_train_ratio: float) -> dict:
    """Nadeau-Bengio corrected resampled t-test of paired per-fold differences (same splits):
    ``t = mean / sqrt((1/k + n_test/n_train) SD^2)``, k - 1 degrees of freedom, two-sided p,
    and the corrected 95 % interval of the mean difference."""
    from scipy.stats import t as student_t

    d = np.asarray([v for v in diffs if v is not None and np.isfinite(v)], dtype=np.float64)
    k = d.size
    if k < 2:
        return {
            "mean_difference": float(d.mean()) if k else None,
            "t": None,
            "p_value": None,
            "ci_low": None,
            "ci_high": None,
            "n": int(k),
        }
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = math.sqrt((1 / k + test_train_ratio) * sd**2)
    if se == 0:  # every split the same difference: no t (JSON has no infinity)
        t, p = (0.0, 1.0) if mean == 0 else (None, 0.0)
    else:
        t = mean / se
        p = float(2 * student_t.sf(abs(t), k - 1))
    half = _nb_halfwidth(sd, k, test_train_ratio)
    return {
        "mean_difference": mean,
        "t": t,
        "p_value": p,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "n": int(k),
        "df": int(k - 1),
    }


def subject_scores(subjects, y, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(subjects, labels, scores) with each subject's sessions averaged (subject-level unit)."""
    subjects = np.asarray(subjects).astype(str)
    uniq, inverse = np.unique(subjects, return_inverse=True)
    out = np.zeros((len(uniq), scores.shape[1]))
    np.add.at(out, inverse, scores)
    out /= np.bincount(inverse)[:, None]
    labels = np.zeros(len(uniq), dtype=np.int64)
    labels[inverse] = y
    return uniq, labels, out


def reliability(y_true, scores, n_bins: int = CALIBRATION_BINS) -> list[dict]:
    """Reliability curve: two classes, the positive class's probability in equal-width bins
    against the observed share of positives; more classes, the top probability against the
    accuracy. Empty bins are left out."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[1] == 2:
        p, hit = scores[:, 1], (y_true == 1).astype(float)
    else:
        p, hit = scores.max(1), (scores.argmax(1) == y_true).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = which == b
        if sel.any():
            rows.append(
                {
                    "bin": b + 1,
                    "bin_low": float(edges[b]),
                    "bin_high": float(edges[b + 1]),
                    "mean_predicted": float(p[sel].mean()),
                    "observed": float(hit[sel].mean()),
                    "n": int(sel.sum()),
                }
            )
    return rows
