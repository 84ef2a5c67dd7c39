"""Cross-validation of the siamese-attention model and the baselines, on one or many devices.

torch / numpy / scikit-learn only (no nipype, pybids, nilearn, nibabel), so this runs alone on a
GPU machine: ``cross_validate(RegionDataset.load("cohort.npz"), ...)``.

Folds
    Stratified K-fold at **subject** level (:func:`subject_folds`): the subjects of each class
    are shuffled and dealt round-robin into the folds, so every session of one subject lands in
    the same fold and each fold holds each class in proportion (counts differ by at most one).
    Repeat ``r`` deals with its own generator, seeded from ``(seed, permutation, r)``.

Nothing sees the test fold
    Every fold calls ``fit(train_subset, TrainConfig(...))`` with the training rows only; the
    model fits its own standardization, validation split, siamese networks and attention module
    inside (see :mod:`bids_siamfuse.model.train`). The test rows are used once, for
    ``predict_proba`` (and the Figure 6 activation counts). The baselines (region-mean GM and PET
    features, ``StandardScaler`` + linear SVM or logistic regression) are scikit-learn pipelines
    fit on the same training rows.

Seeds
    Each task draws its seed from ``(seed, kind, permutation, repeat, fold)``
    (:func:`task_seed`), so results do not depend on which worker ran which fold, nor on how
    many workers there were (given the same device type and threads per worker). On GPUs the
    training is deterministic by default (``TrainConfig.deterministic``: fixed-order reductions
    in the fused kernels, torch's deterministic mode, one cuBLAS workspace setting and the same
    TF32/cuDNN flags in every worker), so one GPU, two GPUs or two runs give bit-identical
    results on GPUs of one model with the same software (``tests/test_determinism.py``).

Metrics (per fold, at session level: each test PET session is one sample)
    The predicted class is the one with the largest probability (score). With two classes the
    second class given to ``--classes`` is the *positive* class (``--classes CN AD``: AD):
    sensitivity = recall of the positive class, specificity = recall of the reference class,
    precision and F1 of the positive class, balanced accuracy = (sensitivity + specificity) / 2,
    AUC of the positive class's probability. With more classes: balanced accuracy = sensitivity
    = mean per-class recall; specificity, precision and F1 = unweighted means over classes of
    the one-vs-rest values; AUC = mean one-vs-rest AUC. A metric undefined in a fold (e.g. no
    predicted positive for precision) is 0 for precision/F1 and NaN otherwise.

Permutation test
    ``permutations=N`` reruns the whole CV (all repeats, new stratified folds) N times with the
    labels shuffled between *subjects* (sessions follow their subject). The p-value of the
    observed mean balanced accuracy is ``(1 + #{perm >= observed}) / (1 + N)``.

Devices
    :func:`resolve_devices` turns ``--device`` / ``--gpus`` / ``--cpu-workers`` into a list of
    worker devices. One entry: everything runs in this process. Several: one spawned process per
    entry (``torch.multiprocessing``, start method ``spawn``), each pulling tasks (folds,
    permutation repeats, the final model) from a shared queue; the cohort reaches them as
    memory-mapped ``.npy`` files, results come back to this process and are ordered by task,
    never by arrival. A GPU worker sees only its own GPU (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, SiamFuseError, UsageError
from .data import RegionDataset, RegionLayout

LOGGER = logging.getLogger("bids_siamfuse.cv")

MODEL_METHOD = "siamese_attention"
#: Baselines: method name -> (classifier, modalities of region-mean features).
BASELINES = {
    "svm_gm": ("svm", ("gm",)),
    "svm_pet": ("svm", ("pet",)),
    "svm_both": ("svm", ("gm", "pet")),
    "logreg_gm": ("logreg", ("gm",)),
    "logreg_pet": ("logreg", ("pet",)),
    "logreg_both": ("logreg", ("gm", "pet")),
}
#: Ablations trained in every CV fold beside the model (``train.ablation_specs``), named
#: ``siamese_attention_<ablation>`` in the outputs.
ABLATION_PREFIX = MODEL_METHOD + "_"
METRICS = ("balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "brier")
#: Unit of the metrics: ``subject`` (a subject's sessions averaged, the headline) or ``session``.
LEVELS = ("subject", "session")
#: Inner grid of the baselines' regularisation (C of LinearSVC / LogisticRegression), chosen by
#: nested subject-level CV inside each training fold.
BASELINE_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
BASELINE_INNER_FOLDS = 3
#: Bins of the reliability curve (probability of the positive class).
CALIBRATION_BINS = 10
RELEVANCE_KEYS = ("mri", "pet", "similarity", "combined")
#: The paper's literal Figure 7 reading (|W| of the attention MLP's first layer), kept beside
#: the default effective-weight relevance (see :mod:`.attention`).
FIRST_LAYER_SUFFIX = "_first_layer"
RELEVANCE_ALL_KEYS = RELEVANCE_KEYS + tuple(k + FIRST_LAYER_SUFFIX for k in RELEVANCE_KEYS)
ACTIVATION_KEYS = ("mri", "pet", "fused")
#: Fields of ``train.TrainConfig`` that the caller may set (seed, device, progress are per task).
TRAIN_FIELDS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "early_stop_loss",
    "patience",
    "val_fraction",
    "sloppy",
    "amp",
    "deterministic",
    "fusion",
    "gate",
)


# ----------------------------------------------------------------------------------------------
# Seeds, folds, shuffles
# ----------------------------------------------------------------------------------------------

KIND_CV, KIND_FINAL = 0, 1


def task_seed(seed: int, *key: int) -> int:
    """A 31-bit seed drawn from ``(seed, *key)``; distinct keys give independent streams."""
    return (
        int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, key)]).generate_state(1)[0])
        & 0x7FFFFFFF
    )


def subject_labels(subjects: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique subjects, their label); every session of a subject must carry the same label."""
    subjects = np.asarray(subjects).astype(str)
    labels = np.asarray(labels)
    uniq, inverse = np.unique(subjects, return_inverse=True)
    sub_label = np.full(len(uniq), -1, dtype=np.int64)
    sub_label[inverse] = labels
    if not np.array_equal(sub_label[inverse], labels):
        bad = sorted(
            {subjects[i] for i in range(len(labels)) if labels[i] != sub_label[inverse[i]]}
        )
        raise DataError(f"subject(s) with sessions of different classes: {', '.join(bad[:5])}")
    return uniq, sub_label


def check_foldable(subjects, labels, n_folds: int, classes) -> None:
    """Every class needs at least ``n_folds`` subjects (DataError otherwise)."""
    _, sub_label = subject_labels(subjects, labels)
    if n_folds < 2:
        raise UsageError(f"--folds must be 2 or more for cross-validation, got {n_folds}")
    for c, name in enumerate(classes):
        n = int((sub_label == c).sum())
        if n < n_folds:
            raise DataError(
                f"class {name} has {n} subject(s), fewer than --folds {n_folds}: "
                "every test fold needs each class; lower --folds or add subjects"
            )


def subject_folds(subjects, labels, n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) of every row: stratified, all sessions of a subject together."""
    uniq, sub_label = subject_labels(subjects, labels)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(uniq), dtype=np.int64)
    start = int(rng.integers(n_folds))
    for c in np.unique(sub_label):
        members = rng.permutation(np.flatnonzero(sub_label == c))
        fold_of[members] = (start + np.arange(len(members))) % n_folds
        start = (start + len(members)) % n_folds
    index = np.searchsorted(uniq, np.asarray(subjects).astype(str))
    return fold_of[index]


def shuffle_subject_labels(subjects, labels, seed: int) -> np.ndarray:
    """Labels permuted between subjects (sessions keep their subject's new label)."""
    uniq, sub_label = subject_labels(subjects, labels)
    rng = np.random.default_rng(seed)
    shuffled = sub_label[rng.permutation(len(uniq))]
    return shuffled[np.searchsorted(uniq, np.asarray(subjects).astype(str))]


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def region_features(data: RegionDataset) -> dict[str, np.ndarray]:
    """Region-mean GM and PET, (N, R) each."""
    return {"gm": data.layout.region_means(data.gm), "pet": data.layout.region_means(data.pet)}


def _baseline_pipe(kind: str, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if kind == "svm":
        clf = LinearSVC(C=c, random_state=seed, max_iter=20000)
    elif kind == "logreg":
        clf = LogisticRegression(C=c, max_iter=5000)
    else:
        raise ValueError(f"unknown baseline {kind!r}")
    return make_pipeline(StandardScaler(), clf)


def tune_baseline_c(kind: str, x_train, y_train, groups, seed: int) -> float:
    """C of the baseline chosen by subject-level stratified inner CV on the training rows
    (balanced accuracy, ``BASELINE_C_GRID``, ``BASELINE_INNER_FOLDS`` folds; ties: the smaller
    C, the stronger regularisation). Too few subjects per class for inner folds: C = 1."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.asarray(groups).astype(str)
    _, first = np.unique(groups, return_index=True)
    per_class = np.bincount(np.asarray(y_train)[first])
    n_inner = min(BASELINE_INNER_FOLDS, int(per_class[per_class > 0].min()))
    if n_inner < 2 or len(per_class[per_class > 0]) < 2:
        return 1.0
    inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed % (2**31))
    n_classes = int(np.max(y_train)) + 1
    scores = np.zeros(len(BASELINE_C_GRID))
    for tr, te in inner.split(x_train, y_train, groups):
        if len(np.unique(y_train[tr])) < 2:
            continue
        for k, c in enumerate(BASELINE_C_GRID):
            pipe = _baseline_pipe(kind, c, seed).fit(x_train[tr], y_train[tr])
            pred = pipe.predict(x_train[te])
            rec = [
                np.mean(pred[y_train[te] == j] == j)
                for j in range(n_classes)
                if np.any(y_train[te] == j)
            ]
            scores[k] += float(np.mean(rec))
    return float(BASELINE_C_GRID[int(np.argmax(scores))])  # argmax: first (smallest C) of ties


def baseline_scores(kind: str, x_train, y_train, x_test, n_classes: int, seed: int, groups=None):
    """Fit a StandardScaler + linear classifier on the training rows; scores of the test rows.

    With ``groups`` (the training rows' subjects) the regularisation C is tuned by nested CV
    inside the training rows (:func:`tune_baseline_c`); without, C = 1.
    Logistic regression gives probabilities. The linear SVM's decision values go through a
    logistic (two classes) or softmax (more) function: a monotone score in [0, 1] for the
    ROC/AUC and the argmax, not a calibrated probability.
    """
    y_train = np.asarray(y_train)
    c = 1.0 if groups is None else tune_baseline_c(kind, x_train, y_train, groups, seed)
    pipe = _baseline_pipe(kind, c, seed).fit(x_train, y_train)
    if kind == "logreg":
        probs = np.zeros((len(x_test), n_classes))
        probs[:, pipe.classes_] = pipe.predict_proba(x_test)
        return probs
    dec = pipe.decision_function(x_test)
    if dec.ndim == 1:
        pos = 1.0 / (1.0 + np.exp(-dec))
        return np.stack([1 - pos, pos], 1)
    dec = dec - dec.max(1, keepdims=True)
    exp = np.exp(dec)
    return exp / exp.sum(1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Tasks: one fit each (a CV fold of a repeat of a permutation, or the final model)
# ----------------------------------------------------------------------------------------------


@dataclass
class Task:
    kind: int  # KIND_CV or KIND_FINAL
    perm: int  # 0: observed labels; p >= 1: the p-th shuffle
    repeat: int
    fold: int
    seed: int
    train_index: np.ndarray
    test_index: np.ndarray
    labels: np.ndarray | None = None  # shuffled labels (None: the dataset's own)
    details: bool = True  # history, relevance, activation counts (observed CV and final only)
    ablations: bool = False  # train and score the ablations (CV tasks)

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.kind, self.perm, self.repeat, self.fold)

    def describe(self) -> str:
        if self.kind == KIND_FINAL:
            return "final model"
        where = f"repeat {self.repeat + 1} fold {self.fold + 1}"
        return where if self.perm == 0 else f"permutation {self.perm} {where}"


def default_fit():
    from .train import fit

    return fit


def default_config_cls():
    from .train import TrainConfig

    return TrainConfig


def run_task(
    data: RegionDataset,
    task: Task,
    *,
    fit: Callable,
    config_cls: type,
    train_kwargs: dict,
    device: str,
    progress: Callable | None = None,
    state_dir: Path | None = None,
) -> dict:
    """Fit on the task's training rows only; predict its test rows. Returns plain arrays."""
    labels = data.labels if task.labels is None else task.labels
    full = dataclasses.replace(data, labels=labels) if task.labels is not None else data
    train = full.subset(task.train_index)
    kwargs = dict(train_kwargs)
    if task.ablations and "ablations" in getattr(config_cls, "__dataclass_fields__", {}):
        kwargs["ablations"] = True
    config = config_cls(**kwargs, seed=task.seed, device=device, progress=progress)
    model = fit(train, config)
    out: dict = {"key": task.key}
    if task.kind == KIND_FINAL:
        tensors, meta = model.state()
        out["meta"] = meta
        out["standardizer"] = model.standardizer.to_dict()
        out["relevance"] = _relevance(model)
        out["history"] = list(model.history)
        if state_dir is None:
            out["tensors"] = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        else:  # from a worker: big tensors go through a file, not the result queue
            path = Path(state_dir) / "final-state.npz"
            np.savez(path, **{k: np.ascontiguousarray(v) for k, v in tensors.items()})
            out["tensors_file"] = str(path)
        return out
    test = full.subset(task.test_index)
    out["proba"] = np.asarray(model.predict_proba(test), dtype=np.float64)
    if task.ablations and hasattr(model, "predict_ablations"):
        out["ablations"] = {
            k: np.asarray(v, dtype=np.float64) for k, v in model.predict_ablations(test).items()
        }
    info = getattr(model, "info", {}) or {}
    if task.details and "siamese_stop_epochs" in info:
        out["training"] = {
            "kept_epoch": np.asarray(info["siamese_stop_epochs"], dtype=np.int64),
            "val_hinge_initial": np.asarray(info["siamese_val_hinge_initial"], dtype=float),
            "val_hinge_kept": np.asarray(info["siamese_val_hinge_kept"], dtype=float),
        }
    if task.details:
        out["history"] = list(model.history)
        out["relevance"] = _relevance(model)
        counts = model.activation_counts(test)
        out["activation_sum"] = {
            k: np.asarray(v, dtype=np.float64).sum(0) for k, v in counts.items()
        }
        out["activation_n"] = len(test)
    return out


def _relevance(model) -> dict[str, np.ndarray]:
    """Figure 7 both ways: effective weights (default keys) and first-layer ``|W|``."""
    rel = {k: np.asarray(v, dtype=np.float64) for k, v in model.relevance().items()}
    for k, v in model.relevance(source="first_layer").items():
        rel[k + FIRST_LAYER_SUFFIX] = np.asarray(v, dtype=np.float64)
    return rel


def _set_threads(threads: int | None) -> int | None:
    if not threads:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    return before


# ----------------------------------------------------------------------------------------------
# Devices and workers
# ----------------------------------------------------------------------------------------------


def resolve_devices(device: str = "auto", gpus: int = 0, cpu_workers: int = 1) -> list[str]:
    """Worker devices: every visible GPU (at most ``gpus`` when > 0), else CPU.

    On CPU one worker runs in this process, or ``cpu_workers`` worker processes when > 1.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is visible (use --device cpu)")
        if ":" in device:
            return [device]
        n = torch.cuda.device_count()
        if gpus:
            n = min(n, gpus)
        return [f"cuda:{i}" for i in range(n)]
    if device != "cpu":
        raise UsageError(f"unknown device {device!r}")
    return ["cpu"] * max(1, int(cpu_workers or 1))


def _save_shared(data: RegionDataset, folder: Path) -> str:
    """Write the cohort for the workers (big arrays as .npy, memory-mapped there).

    Only the folder's name goes to the workers: large process arguments can deadlock
    ``spawn`` when a child dies before reading them.
    """
    folder = Path(folder)
    np.save(folder / "gm.npy", np.ascontiguousarray(data.gm))
    np.save(folder / "pet.npy", np.ascontiguousarray(data.pet))
    np.savez(
        folder / "meta.npz",
        labels=np.asarray(data.labels),
        classes=np.array(data.classes),
        subjects=np.asarray(data.subjects).astype(str),
        sessions=np.asarray(data.sessions).astype(str),
        **data.layout.to_arrays(),
    )
    return str(folder)


def _load_shared(folder: str) -> RegionDataset:
    folder = Path(folder)
    with np.load(folder / "meta.npz", allow_pickle=False) as f:
        return RegionDataset(
            gm=np.load(folder / "gm.npy", mmap_mode="r"),
            pet=np.load(folder / "pet.npy", mmap_mode="r"),
            labels=f["labels"],
            classes=tuple(str(c) for c in f["classes"]),
            subjects=f["subjects"],
            sessions=f["sessions"],
            layout=RegionLayout.from_arrays(f),
        )


def _physical_gpu(device: str) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry of ``cuda:i`` as this process sees it."""
    if not device.startswith("cuda"):
        return None
    index = int(device.split(":")[1]) if ":" in device else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return ids[index] if index < len(ids) else str(index)
    return str(index)


def _worker_main(rank, device, threads, spec, fit, config_cls, train_kwargs, tasks, results):
    """One worker process: pull tasks until the sentinel, push results (or the error).

    A GPU worker sees only its own GPU (``CUDA_VISIBLE_DEVICES`` set before CUDA starts), so
    no worker opens a context on another worker's GPU.
    """
    key = None
    try:
        physical = _physical_gpu(device)
        local = device
        if physical is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = physical
            # before CUDA starts: the fixed cuBLAS workspace of deterministic GPU training
            # (``train.CUBLAS_WORKSPACE``; a value inherited from the parent wins, so that
            # every worker and the parent's own fits use one setting)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            local = "cuda:0"
        if threads:
            _set_threads(threads)
        if physical is not None:
            import torch

            torch.cuda.set_device(0)
        data = _load_shared(spec)
        while True:
            task = tasks.get()
            if task is None:
                break
            key = task.key

            def progress(info, _key=key):
                results.put(("progress", rank, _key, dict(info)))

            out = run_task(
                data,
                task,
                fit=fit,
                config_cls=config_cls,
                train_kwargs=train_kwargs,
                device=local,
                progress=progress,
                state_dir=spec,
            )
            results.put(("done", rank, key, out))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        kind = type(exc).__name__ if isinstance(exc, SiamFuseError) else None
        results.put(("error", rank, key, (kind, str(exc), traceback.format_exc())))


class WorkerError(RuntimeError):
    """A worker failed on a task; the message holds the worker's traceback."""


def _raise_remote(device: str, task_name: str, payload) -> None:
    kind, message, text = payload
    from .. import errors

    klass = getattr(errors, kind, None) if kind else None
    if isinstance(klass, type) and issubclass(klass, SiamFuseError):
        raise klass(message)
    raise WorkerError(
        f"{task_name} on {device} failed: {message}\n--- worker traceback ---\n{text}"
    )


def _run_workers(
    data, tasks, devices, *, fit, config_cls, train_kwargs, threads, progress, work_dir
):
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    by_key = {t.key: t for t in tasks}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="siamfuse-cv-", dir=work_dir) as folder:
        spec = _save_shared(data, Path(folder))
        task_q, result_q = ctx.Queue(), ctx.Queue()
        for task in tasks:
            task_q.put(task)
        for _ in devices:
            task_q.put(None)
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, dev, threads, spec, fit, config_cls, train_kwargs, task_q, result_q),
                name=f"siamfuse-worker-{rank}",
            )
            for rank, dev in enumerate(devices)
        ]
        for p in procs:
            p.start()
        try:
            while len(results) < len(tasks):
                try:
                    kind, rank, key, payload = result_q.get(timeout=1.0)
                except queue.Empty:
                    dead = [
                        (r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                    ]
                    if dead or all(p.exitcode is not None for p in procs):
                        r, code = dead[0] if dead else (0, 0)
                        raise WorkerError(
                            f"worker {r} ({devices[r]}) ended (exit code {code}) with "
                            f"{len(tasks) - len(results)} task(s) unfinished"
                        ) from None
                    continue
                if kind == "progress":
                    if progress is not None:
                        progress(by_key[key], payload)
                elif kind == "done":
                    if "tensors_file" in payload:
                        with np.load(payload.pop("tensors_file"), allow_pickle=False) as f:
                            payload["tensors"] = {k: f[k] for k in f.files}
                    results[key] = payload
                    if progress is not None:
                        progress(by_key[key], None)
                else:
                    name = by_key[key].describe() if key in by_key else "start-up"
                    _raise_remote(devices[rank], name, payload)
        finally:
            if len(results) < len(tasks):  # failed: do not wait to flush unread tasks
                task_q.cancel_join_thread()
            for p in procs:
                p.join(timeout=5 if len(results) == len(tasks) else 0.1)
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
            task_q.close()
            result_q.close()
    return results


def run_tasks(
    data: RegionDataset,
    tasks: list[Task],
    devices: list[str],
    *,
    fit: Callable | None = None,
    config_cls: type | None = None,
    train_kwargs: dict | None = None,
    threads: int | None = None,
    progress: Callable | None = None,
    work_dir: Path | None = None,
) -> dict:
    """Run every task on the devices; ``{task.key: result}``.

    ``fit``/``config_cls`` default to :func:`bids_siamfuse.model.train.fit` and its
    ``TrainConfig`` (tests pass doubles; in worker processes both must be importable by name).
    ``progress(task, info)`` is called (in this process) with each training progress dict,
    and with ``info=None`` when the task is done.
    """
    fit = fit or default_fit()
    config_cls = config_cls or default_config_cls()
    train_kwargs = dict(train_kwargs or {})
    if len(devices) <= 1:
        device = devices[0] if devices else "cpu"
        before = _set_threads(threads)
        try:
            results = {}
            for task in tasks:
                cb = None if progress is None else (lambda info, _t=task: progress(_t, info))
                results[task.key] = run_task(
                    data,
                    task,
                    fit=fit,
                    config_cls=config_cls,
                    train_kwargs=train_kwargs,
                    device=device,
                    progress=cb,
                )
                if progress is not None:
                    progress(task, None)
            return results
        finally:
            if before is not None:
                _set_threads(before)
    return _run_workers(
        data,
        tasks,
        devices,
        fit=fit,
        config_cls=config_cls,
        train_kwargs=train_kwargs,
        threads=threads,
        progress=progress,
        work_dir=work_dir,
    )


# ----------------------------------------------------------------------------------------------
# The whole cross-validation
# ----------------------------------------------------------------------------------------------


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


def plan_tasks(
    data: RegionDataset,
    *,
    folds: int,
    repeats: int,
    seed: int,
    permutations: int = 0,
    final_model: bool = True,
    ablations: bool = False,
) -> tuple[list[Task], dict]:
    """All tasks, and the fold assignment per (perm, repeat): ``{(perm, repeat): folds}``."""
    check_foldable(data.subjects, data.labels, folds, data.classes)
    tasks, assignment = [], {}
    n = len(data)
    if final_model:
        everyone = np.arange(n)
        tasks.append(
            Task(KIND_FINAL, 0, 0, 0, task_seed(seed, KIND_FINAL), everyone, everyone[:0])
        )
    for perm in range(permutations + 1):
        labels = None
        if perm:
            labels = shuffle_subject_labels(data.subjects, data.labels, task_seed(seed, 2, perm))
        for repeat in range(repeats):
            fold_of = subject_folds(
                data.subjects,
                data.labels if labels is None else labels,
                folds,
                task_seed(seed, 3, perm, repeat),
            )
            assignment[(perm, repeat)] = (fold_of, labels)
            for fold in range(folds):
                tasks.append(
                    Task(
                        KIND_CV,
                        perm,
                        repeat,
                        fold,
                        task_seed(seed, KIND_CV, perm, repeat, fold),
                        np.flatnonzero(fold_of != fold),
                        np.flatnonzero(fold_of == fold),
                        labels=labels,
                        details=perm == 0,
                        ablations=ablations,
                    )
                )
    return tasks, assignment


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
    train_kwargs: dict | None = None,
    devices: list[str] | None = None,
    threads: int | None = None,
    fit: Callable | None = None,
    config_cls: type | None = None,
    progress: Callable | None = None,
    baselines: bool = True,
    final_model: bool = True,
    work_dir: Path | None = None,
    ablations: bool = True,
) -> CVResult:
    """Cross-validate the model (and the baselines) on ``data``; see the module docstring."""
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
    results = run_tasks(
        data,
        tasks,
        devices or ["cpu"],
        fit=fit,
        config_cls=config_cls,
        train_kwargs=train_kwargs,
        threads=threads,
        progress=progress,
        work_dir=work_dir,
    )
    t_model = time.perf_counter() - t0
    res = CVResult(classes=classes)
    _collect(res, data, tasks, results, baselines=baselines, permutations=permutations)
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


def _collect(res: CVResult, data, tasks, results, *, baselines: bool, permutations: int):
    """Turn the task results into the CV tables (metrics, predictions, ROC, statistics)."""
    classes = res.classes
    n_classes = len(classes)
    feats = region_features(data) if baselines else None
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
            _baselines(data, feats, labels, task.train_index, task.test_index, task.seed)
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
            observed = res.summary[method]["balanced_accuracy"]["mean"]
            null = np.array([row[method] for row in res.permutations])
            # a tiny tolerance so that float noise does not turn a tie into a win
            res.p_values[method] = float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


def default_threads(devices: list[str], omp_nthreads: int = 0, nprocs: int = 0) -> int | None:
    """Torch threads per worker: ``--omp-nthreads`` when given; else on CPU the CPUs
    (``--nprocs``, default all) shared out between the workers, at most 8 each (the
    ``--omp-nthreads`` default); on GPUs torch's default.

    Explicit on CPU, because containers and batch systems often export ``OMP_NUM_THREADS=1``,
    which would otherwise leave a single-process CPU training on one core.
    """
    if omp_nthreads:
        return int(omp_nthreads)
    if devices and devices[0] == "cpu":
        cpus = int(nprocs or os.cpu_count() or 1)
        return max(1, min(8, cpus // len(devices)))
    return None
