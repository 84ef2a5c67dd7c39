"""A fast stand-in for ``bids_siamfuse.model.train`` for the group-level tests: :func:`fit` is a
:class:`bids_siamfuse.model.tasks.Fit` and :class:`FittedModel` a
:class:`~bids_siamfuse.model.tasks.Fitted` (the typed protocols the cross-validation runs), with
``from_state`` for bundles. Tests hand it to ``cross_validate(fit=...)``, to a whole
command-line run through the entry point's hooks (``cli.run.main(argv, fit=fit,
model_cls=FittedModel)``), or to ``init_apply_model_wf(model_cls=FittedModel)``.

Region means of the standardized crops -> logistic regression. It fits its Standardizer, its
validation split and its classifier on the training data it is given, like the real model, and
records which subjects it saw, so the tests can check the plumbing (folds, leakage, outputs,
bundles, workers) in seconds. Importable by name so spawned worker processes can use it.
"""

from __future__ import annotations

import numpy as np

from bids_siamfuse.model.data import RegionDataset, Standardizer
from bids_siamfuse.model.options import TrainConfig


def _features(std: Standardizer, data: RegionDataset) -> np.ndarray:
    lay = data.layout
    gm = lay.region_means(std.transform("gm", data.gm, lay))
    pet = lay.region_means(std.transform("pet", data.pet, lay))
    return np.concatenate([gm, pet], axis=1).astype(np.float64)


class FittedModel:
    def __init__(self, classes, standardizer, coef, intercept, layout, history=(), seen=()):
        self.classes = tuple(classes)
        self.standardizer = standardizer
        self.coef = np.asarray(coef, dtype=np.float64)  # (C or 1, 2R)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.layout = layout
        self.history = list(history)
        self.seen_subjects = set(seen)
        self.ablations = False
        r = layout.n_regions
        # the real model's training record: here "trained" = a nonzero GM weight > median
        w = np.abs(self.coef).sum(0)[:r]
        self.info = {
            "siamese_stop_epochs": [int(v > np.median(w)) * 3 for v in w],
            "siamese_val_hinge_initial": [1.0] * r,
            "siamese_val_hinge_kept": [float(1.0 - 0.5 * (v > np.median(w))) for v in w],
        }

    def predict_ablations(self, data) -> dict:
        """Two stand-in ablations: the GM half and the PET half of the classifier."""
        if not self.ablations:
            return {}
        r = self.layout.n_regions
        f = _features(self.standardizer, data)
        out = {}
        for name, part in (("mri_only", slice(0, r)), ("pet_only", slice(r, 2 * r))):
            z = f[:, part] @ self.coef[:, part].T + self.intercept
            if z.shape[1] == 1:
                p = 1 / (1 + np.exp(-z[:, 0]))
                out[name] = np.stack([1 - p, p], 1)
            else:
                e = np.exp(z - z.max(1, keepdims=True))
                out[name] = e / e.sum(1, keepdims=True)
        return out

    def _logits(self, data):
        return _features(self.standardizer, data) @ self.coef.T + self.intercept

    def predict_proba(self, data) -> np.ndarray:
        z = self._logits(data)
        if z.shape[1] == 1:
            p = 1 / (1 + np.exp(-z[:, 0]))
            return np.stack([1 - p, p], 1)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def embed(self, data) -> np.ndarray:
        f = _features(self.standardizer, data)
        r = self.layout.n_regions
        return np.repeat(np.stack([f[:, :r], f[:, r:]], -1), 20, axis=-1)

    def relevance(self, source: str = "effective") -> dict:
        r = self.layout.n_regions
        w = np.abs(self.coef).sum(0) if source == "effective" else (self.coef**2).sum(0)
        w = w / w.sum()  # the real model's contract: mri + pet sums to 1 over regions
        zero = np.zeros(r)
        return {"mri": w[:r], "pet": w[r:], "similarity": zero, "combined": w[:r] + w[r:]}

    def activation_counts(self, data) -> dict:
        f = np.abs(_features(self.standardizer, data))
        r = self.layout.n_regions
        mri, pet = (f[:, :r] > 1).astype(float) * 20, (f[:, r:] > 1).astype(float) * 20
        return {"mri": mri, "pet": pet, "fused": mri + pet}

    def subject_relevance(self, data) -> dict:
        f = _features(self.standardizer, data)
        r = self.layout.n_regions
        w = np.abs(self.coef).sum(0)
        contrib = np.abs(f * w)
        return {
            "mri": contrib[:, :r],
            "pet": contrib[:, r:],
            "similarity": np.zeros_like(contrib[:, :r]),
            "combined": contrib[:, :r] + contrib[:, r:],
        }

    def state(self):
        tensors = {
            "double.coef": self.coef.astype(np.float32),
            "double.intercept": self.intercept.astype(np.float32),
        }
        meta = {
            "kind": "double",
            "classes": list(self.classes),
            "standardizer": self.standardizer.to_dict(),
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors, meta, layout, device="cpu"):
        return cls(
            meta["classes"],
            Standardizer.from_dict(meta["standardizer"]),
            tensors["double.coef"],
            tensors["double.intercept"],
            layout,
        )


def fit(train: RegionDataset, config: TrainConfig) -> FittedModel:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(config.seed)
    std = Standardizer().fit({"gm": train.gm, "pet": train.pet}, train.layout)
    x = _features(std, train)
    y = np.asarray(train.labels)
    subjects = np.unique(train.subjects)
    val_subjects = set(
        rng.choice(subjects, max(1, int(len(subjects) * config.val_fraction)), replace=False)
    )
    is_val = np.isin(train.subjects, list(val_subjects))
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
    history = []
    for stage in ("siamese", "attention"):
        for epoch in range(1, min(config.epochs, 3) + 1):
            entry = {
                "stage": stage,
                "epoch": epoch,
                "train_loss": float(1.0 / epoch),
                "val_loss": float(1.0 / epoch + is_val.mean()),
            }
            history.append(entry)
            if config.progress is not None:
                config.progress(entry)
    model = FittedModel(
        train.classes,
        std,
        clf.coef_,
        clf.intercept_,
        train.layout,
        history=history,
        seen=set(np.asarray(train.subjects).tolist()),
    )
    model.ablations = bool(getattr(config, "ablations", False))
    return model


def fit_boom(train: RegionDataset, config: TrainConfig) -> FittedModel:
    """A fit that fails (to test how worker errors reach the parent)."""
    raise RuntimeError("boom: the double refuses to train")


def save_fitted(model, data, folder, **extra):
    """Save a fitted model (the double or the real one) as a bundle for ``data``'s layout and
    classes; ``extra`` goes to ``save_bundle`` (training, cohort, ...). Returns its path."""
    from bids_siamfuse.model import bundle as bundles

    tensors, meta = model.state()
    return bundles.save_bundle(
        folder,
        tensors=tensors,
        model_meta=meta,
        layout=data.layout,
        classes=data.classes,
        standardization=model.standardizer.to_dict(),
        **extra,
    )
