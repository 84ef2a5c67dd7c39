"""Seeds, subject-level folds and label shuffles of the cross-validation (:mod:`.cv`).

numpy only.

Folds
    Stratified K-fold at **subject** level (:func:`subject_folds`): the subjects of each class
    are shuffled and dealt round-robin into the folds, so every session of one subject lands in
    the same fold and each fold holds each class in proportion (counts differ by at most one).
    Repeat ``r`` deals with its own generator, seeded from ``(seed, permutation, r)``.

Seeds
    Each task draws its seed from ``(seed, kind, permutation, repeat, fold)``
    (:func:`task_seed`), so results do not depend on which worker ran which fold, nor on how
    many workers there were (given the same device type and threads per worker). On GPUs the
    training is deterministic by default (``TrainConfig.deterministic``: fixed-order reductions
    in the fused kernels, torch's deterministic mode, one cuBLAS workspace setting and the same
    TF32/cuDNN flags in every worker), so one GPU, two GPUs or two runs give bit-identical
    results on GPUs of one model with the same software (``tests/test_determinism.py``).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError, UsageError

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
