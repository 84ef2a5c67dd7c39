"""The baselines: region-mean GM and PET features, ``StandardScaler`` + a linear SVM or
logistic regression, scikit-learn pipelines fit on the training rows of each fold (C tuned by
nested subject-level CV inside them).
"""

from __future__ import annotations

import numpy as np

from .data import RegionDataset

#: Baselines: method name -> (classifier, modalities of region-mean features).
BASELINES = {
    "svm_gm": ("svm", ("gm",)),
    "svm_pet": ("svm", ("pet",)),
    "svm_both": ("svm", ("gm", "pet")),
    "logreg_gm": ("logreg", ("gm",)),
    "logreg_pet": ("logreg", ("pet",)),
    "logreg_both": ("logreg", ("gm", "pet")),
}
#: Inner grid of the baselines' regularisation (C of LinearSVC / LogisticRegression), chosen by
#: nested subject-level CV inside each training fold.
BASELINE_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
BASELINE_INNER_FOLDS = 3


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
