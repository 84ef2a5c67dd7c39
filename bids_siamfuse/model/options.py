"""What :func:`.train.fit` can be told (:class:`TrainConfig`), the per-region network it builds
and its validation split of the training subjects.

Sloppy mode (``sloppy=True``, for tests and quick looks; same code path)
    Crops averaged over 2x2x2 blocks (3 mm voxels, 8x fewer) and pooled to 2^3 instead of 4^3
    before the first linear layer (128 inputs instead of 1024); at most ``SLOPPY_EPOCHS``
    epochs and a patience of at most ``SLOPPY_PATIENCE``. Timings of a 32-subject 4-fold CV on
    2 CPU cores are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from .siamese import SiameseArch

SLOPPY_EPOCHS = 30
SLOPPY_PATIENCE = 8
FUSIONS = ("paper", "similarity")
GATES = ("paired", "constant", "se", "none")


#: The batch below which :func:`step_batch` does not shrink a batch (the default before 32).
SMALL_BATCH = 16


def step_batch(batch_size: int, n: int) -> int:
    """The batch the optimizer steps with on ``n`` training rows: ``batch_size``, shrunk (not
    below ``SMALL_BATCH``) so that an epoch has at least two steps.

    Why: at 32 a small cohort gets one step per epoch. On the 32-subject strong-effect cohort
    of ``tests/test_group.py`` (seed 21, 4 folds, sloppy, CPU; ~23 training rows per fold) the
    model scored 0.875 at batch 32 and 0.906 at 16 and at 12. From 64 training rows on (the
    60-per-class acceptance cohorts: ~90) nothing changes, nor does an explicit batch of 16.
    """
    bs = max(1, int(batch_size))
    return max(1, min(bs, max(SMALL_BATCH, -(-int(n) // 2))))


@dataclass
class TrainConfig:
    """Everything :func:`fit` can be told (see the module docstring)."""

    epochs: int = 200  # max epochs of siamese training (and of the attention stage)
    # 32: 1.38x the engine's speed at 16 and a 23 % shorter CV on an H200, the same
    # balanced accuracy within one subject on the development cohort (docs/benchmarks.md)
    batch_size: int = 32
    learning_rate: float = 1e-3
    early_stop_loss: float = 0.01  # paper: stop when the validation loss falls below this
    patience: int = 20  # ... or when it has not improved for this many epochs
    val_fraction: float = 0.2  # share of the *training subjects* held out for early stopping
    sloppy: bool = False  # fast mode for tests/quick looks (see the module docstring)
    seed: int = 42
    device: str = "cpu"  # "cpu", "cuda", "cuda:1" ... the caller picks
    amp: bool | None = None  # None: bf16/TF32 on CUDA, float32 on CPU
    # CUDA: fixed-order reductions + torch deterministic mode (bit-reproducible on any number of
    # GPUs of one model); False: atomic adds, the opt-in fast path (``--nondeterministic-gpu``)
    deterministic: bool = True
    # "paper": region embeddings only (default: on the development cohorts the similarity
    # feature did not help, docs/benchmarks.md); "similarity": + the per-region MRI-PET similarity
    fusion: str = "paper"
    gate: str = "paired"  # which epochs may replace the untrained network (see _RegionEarlyStop)
    ablations: bool = False  # also train the ablation heads (ABLATIONS; cross-validation only)
    progress: Callable[[dict], None] | None = None  # per epoch: stage, epoch, losses

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {self.fusion!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, not {self.gate!r}")

    def effective(self) -> TrainConfig:
        """The numbers actually used (sloppy mode caps epochs and patience)."""
        if not self.sloppy:
            return self
        return replace(
            self,
            epochs=min(self.epochs, SLOPPY_EPOCHS),
            patience=min(self.patience, SLOPPY_PATIENCE),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("progress")
        return d

    def run_settings(self) -> dict:
        """The training settings a run records (``summary.json``, the bundle): every field but
        those the cross-validation sets per task (``PER_TASK``)."""
        return {k: v for k, v in self.to_dict().items() if k not in PER_TASK}


#: Fields of :class:`TrainConfig` set per task (seed, device, progress, ablations) or by the
#: device (amp), not by the run's settings.
PER_TASK = ("seed", "device", "amp", "ablations", "progress")


def architecture(sloppy: bool) -> SiameseArch:
    """The per-region network of :mod:`.siamese`; sloppy: 2x coarser crops, 2^3 pooling."""
    return SiameseArch(pool=2, downsample=2) if sloppy else SiameseArch()


def split_validation(labels, subjects, fraction: float, seed: int):
    """Row indices (train part, validation part): subjects drawn per class, all sessions kept
    together. Classes with a single subject stay whole in the training part."""
    labels = np.asarray(labels)
    subjects = np.asarray(subjects).astype(str)
    uniq, first = np.unique(subjects, return_index=True)
    sub_label = labels[first]
    rng = np.random.default_rng(seed)
    val_subjects = []
    if fraction > 0:
        for c in np.unique(sub_label):
            members = uniq[sub_label == c]
            if members.size < 2:
                continue
            n_val = min(members.size - 1, max(1, int(round(fraction * members.size))))
            val_subjects.extend(rng.choice(members, n_val, replace=False).tolist())
    is_val = np.isin(subjects, np.array(val_subjects, dtype=str))
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _emit(config: TrainConfig, history: list, row: dict) -> None:
    history.append(row)
    if config.progress is not None:
        config.progress(dict(row))
