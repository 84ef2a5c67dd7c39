"""Tasks of the cross-validation: one fit each (a CV fold of a repeat of a permutation, or the
final model), planned from the folds (:func:`plan_tasks`) and run on one device
(:func:`run_task`, which returns plain arrays).

The training engine is any :class:`Fit`: :func:`bids_siamfuse.model.train.fit` by default
(:func:`default_fit`), or a stand-in with the same contract (the group-level tests' double,
``tests/model_double.py``). It receives the run's :class:`~.options.TrainConfig` with the
task's seed, device, progress callback and ablations filled in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from .data import RegionDataset
from .folds import (
    KIND_CV,
    KIND_FINAL,
    check_foldable,
    shuffle_subject_labels,
    subject_folds,
    task_seed,
)

if TYPE_CHECKING:  # torch only where a model trains
    from .options import TrainConfig

RELEVANCE_KEYS = ("mri", "pet", "similarity", "combined")
#: The paper's literal Figure 7 reading (|W| of the attention MLP's first layer), kept beside
#: the default effective-weight relevance (see :mod:`.attention`).
FIRST_LAYER_SUFFIX = "_first_layer"
RELEVANCE_ALL_KEYS = RELEVANCE_KEYS + tuple(k + FIRST_LAYER_SUFFIX for k in RELEVANCE_KEYS)
ACTIVATION_KEYS = ("mri", "pet", "fused")


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


@runtime_checkable
class Fitted(Protocol):
    """What the cross-validation reads of a fitted model."""

    classes: tuple
    history: list

    def predict_proba(self, data: RegionDataset) -> np.ndarray: ...

    def relevance(self, source: str = "effective") -> dict: ...

    def activation_counts(self, data: RegionDataset) -> dict: ...

    def state(self) -> tuple[dict, dict]: ...


@runtime_checkable
class Fit(Protocol):
    """A training engine: fits on ``train`` only (in worker processes it must be importable by
    name, as a module-level function)."""

    def __call__(self, train: RegionDataset, config: TrainConfig) -> Fitted: ...


def default_fit() -> Fit:
    """The training engine used unless the caller passes one (``model.train.fit``)."""
    from .train import fit

    return fit


def default_config() -> TrainConfig:
    """The training configuration used unless the caller passes one (every default)."""
    from .options import TrainConfig

    return TrainConfig()


def task_config(
    config: TrainConfig, task: Task, device: str, progress: Callable | None = None
) -> TrainConfig:
    """The configuration a task's fit runs with: its seed, device, progress, ablations."""
    return dataclasses.replace(
        config, seed=task.seed, device=device, progress=progress, ablations=task.ablations
    )


def run_task(
    data: RegionDataset,
    task: Task,
    *,
    fit: Fit,
    config: TrainConfig,
    device: str,
    progress: Callable | None = None,
    state_dir: Path | None = None,
) -> dict:
    """Fit on the task's training rows only; predict its test rows. Returns plain arrays."""
    labels = data.labels if task.labels is None else task.labels
    full = dataclasses.replace(data, labels=labels) if task.labels is not None else data
    train = full.subset(task.train_index)
    model = fit(train, task_config(config, task, device, progress))
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
        # a rerun with shuffled labels repeats the first repeat's procedure only (new folds from
        # its own seed), and the p-value compares it with the first repeat's observed score
        # (cv.cross_validate): the same statistic on both sides, so the test stays exact, and
        # `--repeats 10 --permutation-tests 100` plans 10 x 5 + 100 x 5 + 1 = 551 fits instead
        # of 5051 (issue 16)
        for repeat in range(repeats if perm == 0 else 1):
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
