"""The group level (train, cross-validate, report) and the model application.

Group level: ``bids_siamfuse BIDS_DIR OUTPUT_DIR group --classes CN AD``
    :func:`plan_group` checks the request without reading any image (labels from
    ``BIDS_DIR/participants.tsv``, region files found in ``OUTPUT_DIR``, enough subjects per
    class for the folds, devices); :func:`run_group` loads the cohort
    (:func:`bids_siamfuse.preproc.regions.load_cohort`), cross-validates the model and the
    baselines (:func:`bids_siamfuse.model.cv.cross_validate`), trains the final model on every
    selected subject and writes ``OUTPUT_DIR/group/<A>_vs_<B>/`` (see ``docs/outputs.md``). The
    folder is built under a hidden name and renamed into place at the end, so a crashed or
    interrupted run never leaves a half-written report under the real name (a previous report
    stays until the new one is complete).

Errors (one line, documented exit code): fewer than two ``--classes`` or a repeated one, or a
label that ``participants.tsv`` does not hold: 64; ``participants.tsv`` missing, without the
label column, or listing no subject of a class among the derivatives; a class with fewer
subjects than ``--folds``: 65; no region files in ``OUTPUT_DIR``: 66; filters that select no
region file of the classes: 18.

Model application, participant level with ``--model BUNDLE``
    :func:`init_apply_model_wf` is the nipype workflow the participant workflow connects to
    each session's region file. With ``--model-only`` the participant level skips
    preprocessing: :func:`plan_apply`/:func:`run_apply` apply the bundle to the region files
    already in ``OUTPUT_DIR`` (no raw data needed, no nipype). Either way the outputs are
    written by :func:`bids_siamfuse.interfaces.model.apply_bundle_to_file`. A bundle made with
    another atlas or grid is refused with exit 65 before anything runs.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import (
    DataError,
    NoInputError,
    NothingSelectedError,
    SiamFuseError,
    UsageError,
)

LOGGER = logging.getLogger("bids_siamfuse.group")

GROUP_FOLDER = "group"


def task_name(classes) -> str:
    """``CN_vs_AD``: the classes in the order given, unsafe characters replaced by '-'."""
    return "_vs_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", str(c)) for c in classes)


def _source_from_name(name: str) -> dict:
    """Entities a region file inherited from its PET (subject, session, tracer, acq, rec, run)."""
    from ..preproc.regions import parse_entities

    ent = parse_entities(name)
    keys = {
        "sub": "subject",
        "ses": "session",
        "trc": "tracer",
        "acq": "acquisition",
        "rec": "reconstruction",
        "run": "run",
    }
    return {full: ent[short] for short, full in keys.items() if short in ent}


# ----------------------------------------------------------------------------------------------
# Group level: plan
# ----------------------------------------------------------------------------------------------


@dataclass
class GroupPlan:
    """What a group run will do (``--dry-run`` prints :meth:`describe`)."""

    bids_dir: Path
    deriv_dir: Path
    out_dir: Path
    classes: tuple
    label_column: str
    tracer: str
    participant_label: list
    session_label: list
    files: list  # (path, subject, session, class index)
    left_out: dict  # label -> sessions left out (not in --classes)
    folds: int
    repeats: int
    permutations: int
    seed: int
    devices: list
    threads: int | None
    train_kwargs: dict
    work_dir: Path | None = None
    notes: list = field(default_factory=list)
    ablations: bool = True
    # sessions left out because participant QC flagged them: (path, subject, session, reasons)
    flagged: list = field(default_factory=list)
    include_flagged: bool = False

    def counts(self) -> dict:
        out = {}
        for i, c in enumerate(self.classes):
            rows = [f for f in self.files if f[3] == i]
            out[c] = {"subjects": len({f[1] for f in rows}), "sessions": len(rows)}
        return out

    @property
    def n_tasks(self) -> int:
        return self.folds * self.repeats * (self.permutations + 1) + 1

    def describe(self) -> str:
        counts = self.counts()
        n_sub = len({f[1] for f in self.files})
        lines = [
            f"group level: {' vs '.join(self.classes)} (labels from column "
            f"'{self.label_column}' of {self.bids_dir / 'participants.tsv'})",
            f"  region files from {self.deriv_dir}: {len(self.files)} session(s) of "
            f"{n_sub} subject(s)",
        ]
        for c, n in counts.items():
            lines.append(f"    {c}: {n['subjects']} subject(s), {n['sessions']} session(s)")
        if self.left_out:
            other = ", ".join(f"{k}: {v}" for k, v in sorted(self.left_out.items()))
            lines.append(f"  left out (label not in --classes): {other} session(s)")
        perms = (
            f", {self.permutations} permutation rerun(s) of the whole CV"
            if self.permutations
            else ""
        )
        lines.append(
            f"  {self.folds}-fold subject-level stratified CV x {self.repeats} repeat(s){perms}; "
            "then the final model on every selected subject"
        )
        kw = self.train_kwargs
        lines.append(
            f"  training: up to {kw['epochs']} epochs, batch {kw['batch_size']}, "
            f"learning rate {kw['learning_rate']}, validation share {kw['val_fraction']}, "
            f"early stop below {kw['early_stop_loss']} or after {kw['patience']} flat epochs"
            + (", sloppy mode" if kw.get("sloppy") else "")
        )
        lines.append(
            f"  fusion {kw.get('fusion', 'paper')}, siamese gate {kw.get('gate', 'se')}"
            + ("; ablations in every fold" if self.ablations else "; no ablations")
        )
        workers = (
            "in this process"
            if len(self.devices) == 1
            else f"{len(self.devices)} worker processes"
        )
        threads = f", {self.threads} thread(s) each" if self.threads else ""
        lines.append(f"  devices: {', '.join(self.devices)} ({workers}{threads})")
        lines.append(
            f"  {self.n_tasks} model fit(s); baselines (linear SVM, logistic regression on "
            "region means) on the same folds"
        )
        lines.append(f"  writes {self.out_dir}/")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def plan_group(settings) -> GroupPlan:
    """Check a group-level request without reading images (see the module docstring)."""
    from .. import bids
    from ..model.folds import check_foldable
    from ..model.workers import default_threads, resolve_devices
    from ..preproc.regions import find_region_files

    ex, mo, wf = settings.execution, settings.model, settings.workflow
    classes = tuple(str(c) for c in mo.classes)
    if len(classes) < 2:
        raise UsageError(f"--classes needs at least two labels, got {list(classes)}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise UsageError(f"--classes lists {', '.join(repeated)} more than once")
    if mo.folds < 2:
        raise UsageError(f"--folds must be 2 or more, got {mo.folds}")
    # issue 12 variants (also reachable from a config file, so checked here, not only by argparse)
    for flag, value, allowed in (
        ("--fusion", getattr(mo, "fusion", "paper"), ("paper", "similarity")),
        ("--gate", getattr(mo, "gate", "paired"), ("paired", "constant", "se", "none")),
    ):
        if value not in allowed:
            raise UsageError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    participants = bids.read_participants(ex.bids_dir, ex.label_column)
    present = sorted({str(v) for v in participants[ex.label_column]} - {"", "n/a"})
    unknown = [c for c in classes if c not in present]
    if unknown:
        raise UsageError(
            f"--classes {' '.join(unknown)}: no participant has that '{ex.label_column}' in "
            f"participants.tsv (labels there: {', '.join(present) or 'none'})"
        )
    deriv = Path(ex.output_dir)
    files = find_region_files(deriv, ex.tracer_label) if deriv.is_dir() else []
    if not files:
        raise NoInputError(
            f"{deriv}: no region files (sub-*/[ses-*/]pet/*_trc-{ex.tracer_label}_*_regions.npz); "
            "run the participant level first"
        )
    from ..preproc.qc import session_flag

    selected, unknown_subjects, left_out, flagged = [], set(), {}, []
    for path in files:
        src = _source_from_name(path.name)
        sub, ses = src.get("subject"), src.get("session", "")
        if ex.participant_label and sub not in ex.participant_label:
            continue
        if ex.session_label and ses not in ex.session_label:
            continue
        if sub not in participants.index:
            unknown_subjects.add(sub)
            continue
        is_flagged, why = session_flag(deriv, path)
        if is_flagged and not mo.include_flagged:
            flagged.append((path, sub, ses, why))
            continue
        label = str(participants.loc[sub, ex.label_column])
        if label not in classes:
            left_out[label] = left_out.get(label, 0) + 1
            continue
        selected.append((path, sub, ses, classes.index(label)))
    if unknown_subjects:
        raise DataError(
            "participants.tsv lacks subject(s) that have region files: "
            + ", ".join(f"sub-{s}" for s in sorted(unknown_subjects))
        )
    if not selected:
        raise NothingSelectedError(
            f"no region file in {deriv} belongs to a subject of {', '.join(classes)}"
            + (
                " among the selected participants/sessions"
                if ex.participant_label or ex.session_label
                else ""
            )
        )
    found = {c: len({f[1] for f in selected if f[3] == i}) for i, c in enumerate(classes)}
    missing = [c for c, n in found.items() if n == 0]
    if missing:
        raise DataError(
            f"no region files for class(es) {', '.join(missing)} (subjects per class: {found}); "
            "a classification needs every class; run the participant level on them or change "
            "--classes"
        )
    labels = np.array([f[3] for f in selected])
    subjects = np.array([f[1] for f in selected])
    check_foldable(subjects, labels, mo.folds, classes)
    devices = resolve_devices(ex.device, mo.gpus, mo.cpu_workers)
    threads = default_threads(devices, ex.omp_nthreads, ex.nprocs)
    train_kwargs = {
        "epochs": mo.epochs,
        "batch_size": mo.batch_size,
        "learning_rate": mo.learning_rate,
        "early_stop_loss": mo.early_stop_loss,
        "patience": mo.patience,
        "val_fraction": mo.val_fraction,
        "sloppy": bool(wf.sloppy),
        "deterministic": not mo.nondeterministic_gpu,
        "fusion": getattr(mo, "fusion", "paper"),
        "gate": getattr(mo, "gate", "paired"),
    }
    notes = []
    if flagged:
        notes.append(
            f"{len(flagged)} session(s) flagged by participant QC left out "
            "(--include-flagged keeps them): "
            + ", ".join(f"sub-{f[1]}" + (f" ses-{f[2]}" if f[2] else "") for f in flagged)
        )
    if wf.sloppy:
        notes.append("--sloppy: coarse crops and capped epochs, for tests and quick looks only")
    if mo.nondeterministic_gpu and any(d.startswith("cuda") for d in devices):
        notes.append(
            "--nondeterministic-gpu: results differ between runs and GPU counts (not "
            "bit-reproducible)"
        )
    return GroupPlan(
        bids_dir=Path(ex.bids_dir),
        deriv_dir=deriv,
        out_dir=deriv / GROUP_FOLDER / task_name(classes),
        classes=classes,
        label_column=ex.label_column,
        tracer=ex.tracer_label,
        participant_label=list(ex.participant_label),
        session_label=list(ex.session_label),
        files=selected,
        left_out=left_out,
        folds=mo.folds,
        repeats=mo.repeats,
        permutations=mo.permutation_tests,
        seed=ex.random_seed,
        devices=devices,
        threads=threads,
        train_kwargs=train_kwargs,
        work_dir=Path(ex.work_dir) if ex.work_dir else None,
        notes=notes,
        ablations=bool(getattr(mo, "ablations", True)),
        flagged=flagged,
        include_flagged=bool(mo.include_flagged),
    )


# ----------------------------------------------------------------------------------------------
# Group level: run
# ----------------------------------------------------------------------------------------------


class _Progress:
    """Training progress on the terminal: a line per task every ``every`` epochs or so."""

    def __init__(self, total: int, every: int = 10, interval: float = 15.0):
        self.total, self.every, self.interval = total, every, interval
        self.done = 0
        self.t0 = time.monotonic()
        self.last: dict = {}
        self.started: dict = {}

    def __call__(self, task, info) -> None:
        now = time.monotonic()
        self.started.setdefault(task.key, now)
        if info is None:
            self.done += 1
            LOGGER.info(
                "%s: done in %.0f s (%d/%d fits, %.0f s elapsed)",
                task.describe(),
                now - self.started[task.key],
                self.done,
                self.total,
                now - self.t0,
            )
            return
        epoch = int(info.get("epoch", 0))
        if (
            epoch == 1
            or epoch % self.every == 0
            or now - self.last.get(task.key, 0) >= self.interval
        ):
            self.last[task.key] = now
            val = info.get("val_loss")
            LOGGER.info(
                "%s: %s epoch %d, train loss %.4f, validation loss %s",
                task.describe(),
                info.get("stage", "?"),
                epoch,
                float(info.get("train_loss", float("nan"))),
                "n/a" if val is None or not np.isfinite(val) else f"{val:.4f}",
            )


METRIC_DEFINITIONS = {
    "unit": "headline (summary metrics, Table 2): one test subject, its sessions' class "
    "probabilities averaged; metrics.tsv also has rows per test PET session (level = session, "
    "summary metrics_session). Per fold, then the mean over all folds of all repeats",
    "ci95": "95 % confidence interval of the mean over folds: Nadeau-Bengio corrected "
    "resampled t interval, mean +- t(0.975, k-1) sqrt((1/k + n_test/n_train) SD^2), k folds x "
    "repeats (SD with ddof 1)",
    "paired_comparison": "per fold of every repeat, the model's metric minus the other "
    "method's on the same test subjects; Nadeau-Bengio corrected resampled t-test (two-sided) "
    "and its corrected 95 % interval; best_baseline flags the baseline with the highest mean "
    "balanced accuracy",
    "predicted_class": "the class with the largest probability (score)",
    "two_classes": "the second class of --classes is positive: sensitivity = its recall, "
    "specificity = the first class's recall, precision and F1 of the positive class, balanced "
    "accuracy = (sensitivity + specificity) / 2, AUC of the positive class's probability, "
    "Brier score = mean squared difference of the positive class's probability and the label",
    "more_classes": "balanced accuracy = sensitivity = mean per-class recall; specificity, "
    "precision, F1 = unweighted means of the one-vs-rest values; AUC = mean one-vs-rest AUC; "
    "Brier = mean over subjects of the summed squared probability errors",
    "calibration": "calibration.tsv: test subjects of every fold and repeat pooled, positive-"
    "class probability in 10 equal bins against the observed share of the positive class",
    "undefined": "a metric undefined in a fold (e.g. AUC with one class) is n/a and left out "
    "of the mean; precision/F1 with no predicted positive are 0",
    "permutation_p_value": "(1 + number of permutations whose mean balanced accuracy >= the "
    "observed one) / (1 + permutations); labels shuffled between subjects, whole CV rerun "
    "(every method, ablations included)",
    "baselines": "region-mean GM (modulated) and/or PET per AAL region, StandardScaler + "
    "LinearSVC or LogisticRegression, fit on the training fold, C chosen from "
    "0.001/0.01/0.1/1/10 by a 3-fold subject-level stratified inner CV on the training fold "
    "(balanced accuracy); SVM scores are the logistic/softmax of the decision values (not "
    "calibrated)",
    "ablations": "siamese_attention_<name>, trained in the same folds as the model from the "
    "same siamese networks: similarity_fusion / paper_fusion = the other fusion variant; "
    "similarity_only = only the 116 per-region MRI-PET similarities; untrained = the whole "
    "pipeline with the siamese networks left at their initialisation; mri_only / pet_only = "
    "only the MRI (PET) branch embeddings",
    "siamese_training": "training.tsv: per fold and region the kept epoch (0 = the network "
    "kept its initial weights), the mean validation hinge of the untrained and of the kept "
    "network and their difference",
}

RELEVANCE_GROUP_TEXT = (
    "Figure 7 relevance of the siamese-attention model, averaged over the cross-validation "
    "folds. Default (columns mri, pet, similarity, combined; the maps): per attention-stage "
    "feature the effective weight of the attention module, mean attention mask (training "
    "sessions) times the spread of the linear classifier's weights between classes, summed "
    "over the region's 20 MRI (or 20 PET) embedding features, or its MRI-PET similarity "
    "feature (fusion = similarity), divided by the total (combined = mri + pet + similarity "
    "sums to 1 over regions; uniform = 1/116). Columns *_first_layer: the paper's literal "
    "reading, the absolute weights of the attention MLP's first linear layer summed over "
    "hidden units and features, normalized the same way."
)
ACTIVATION_TEXT = (
    "Figure 6 activation counts: per test session, the number of a region's 20 MRI (PET) "
    "embedding features whose attention mask (sigmoid output) exceeds 0.9; fused = MRI + PET "
    "(0..40); mean over every test session of every fold."
)


def _region_map_name(desc: str) -> str:
    from ..bids import build_name
    from ..data.templates import RES_LABEL, SPACE

    return build_name(
        {"space": SPACE, "segmentation": "AAL116", "resolution": RES_LABEL, "desc": desc},
        "stat",
        ".nii.gz",
    )


def _write_region_maps(folder: Path, layout, values: dict, what: str, text: str, units, meta):
    """Per-region ``values`` painted on the grid, one NIfTI + JSON per modality key.

    ``what`` names the maps (``desc-<what><Label>``) and ``units`` maps a key to its units.
    """
    from ..bids import save_image, save_json
    from ..data.templates import grid_image

    labels = {
        "mri": "MRI",
        "pet": "PET",
        "similarity": "Similarity",
        "combined": "Combined",
        "fused": "Fused",
    }
    written = []
    for key, label in labels.items():
        if key not in values:
            continue
        name = _region_map_name(f"{what}{label}")
        sidecar = {
            "Description": f"{text} Modality: {key}. Every voxel of an AAL region holds the "
            "region's value; 0 outside the atlas.",
            "Units": units(key),
            "Modality": key,
            "Atlas": "AAL116",
            **meta,
        }
        save_json(folder / name.replace(".nii.gz", ".json"), sidecar)
        save_image(folder / name, grid_image(layout.paint(values[key])), space_code=4)
        written.extend([name, name.replace(".nii.gz", ".json")])
    return written


def _region_table(layout, values: dict, keys):
    import pandas as pd

    table = {"index": np.arange(1, layout.n_regions + 1), "name": list(layout.names)}
    for k in keys:
        v = values.get(k)
        table[k] = np.asarray(v, dtype=np.float64) if v is not None else np.nan
    return pd.DataFrame(table)


def _training_summary(rows: list) -> list:
    """Per repeat and fold: how many region networks moved from their initial weights and
    the mean validation-hinge improvement of those that did."""
    out = []
    for key in sorted({(r["repeat"], r["fold"]) for r in rows}):
        sel = [r for r in rows if (r["repeat"], r["fold"]) == key]
        moved = [r for r in sel if r["trained"]]
        out.append(
            {
                "repeat": key[0],
                "fold": key[1],
                "regions": len(sel),
                "trained": len(moved),
                "share_trained": len(moved) / len(sel) if sel else None,
                "mean_improvement_trained": (
                    float(np.mean([r["val_hinge_improvement"] for r in moved])) if moved else None
                ),
                "mean_kept_epoch_trained": (
                    float(np.mean([r["kept_epoch"] for r in moved])) if moved else None
                ),
            }
        )
    return out


def write_group_outputs(folder: Path, plan: GroupPlan, data, result, *, settings=None) -> list:
    """Write every group-level file of one task into ``folder``; returns the names."""
    import pandas as pd

    from ..bids import save_json, save_table
    from ..model import bundle as bundles
    from ..model import cv
    from ..model.folds import KIND_FINAL, task_seed
    from ..model.metrics import METRICS
    from ..model.tasks import ACTIVATION_KEYS, RELEVANCE_ALL_KEYS, RELEVANCE_KEYS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = list(plan.classes)
    layout = data.layout
    written = []

    def table(name, rows, columns):
        frame = pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame(columns=columns)
        extra = [c for c in frame.columns if c not in columns]
        save_table(folder / name, frame[list(columns) + extra])
        written.append(name)

    table(
        "metrics.tsv",
        result.metrics,
        ["method", "repeat", "fold", "n_test", "level", *METRICS],
    )
    if result.training:
        table(
            "training.tsv",
            result.training,
            [
                "repeat",
                "fold",
                "index",
                "name",
                "kept_epoch",
                "trained",
                "val_hinge_initial",
                "val_hinge_kept",
                "val_hinge_improvement",
            ],
        )
    if result.calibration:
        table(
            "calibration.tsv",
            result.calibration,
            ["method", "bin", "bin_low", "bin_high", "mean_predicted", "observed", "n"],
        )
    table(
        "predictions.tsv",
        result.predictions,
        [
            "participant_id",
            "session",
            "repeat",
            "fold",
            "method",
            "true",
            "predicted",
            *[f"prob_{c}" for c in classes],
        ],
    )
    table("roc.tsv", result.roc, ["method", "repeat", "fold", "class", "fpr", "tpr", "threshold"])
    table(
        "history.tsv",
        result.history,
        ["repeat", "fold", "stage", "epoch", "train_loss", "val_loss"],
    )
    save_table(
        folder / "relevance.tsv", _region_table(layout, result.relevance, RELEVANCE_ALL_KEYS)
    )
    written.append("relevance.tsv")
    save_table(
        folder / "activations.tsv", _region_table(layout, result.activations, ACTIVATION_KEYS)
    )
    written.append("activations.tsv")
    if result.permutations:
        rows = []
        for row in result.permutations:
            out = {"permutation": row["permutation"], "balanced_accuracy": row[cv.MODEL_METHOD]}
            out.update(
                {
                    f"balanced_accuracy_{m}": row[m]
                    for m in row
                    if m not in ("permutation", cv.MODEL_METHOD)
                }
            )
            rows.append(out)
        table("permutation.tsv", rows, ["permutation", "balanced_accuracy"])

    # relevance (mean over folds) and activation counts painted on the grid
    written += _write_region_maps(
        folder,
        layout,
        {
            k: result.relevance[k]
            for k in RELEVANCE_KEYS
            if k in result.relevance and (k != "similarity" or np.any(result.relevance[k]))
        },
        "relevance",
        RELEVANCE_GROUP_TEXT,
        lambda key: "arbitrary (fraction of the total relevance)",
        {"Classes": classes, "Table": "relevance.tsv"},
    )
    written += _write_region_maps(
        folder,
        layout,
        result.activations,
        "activation",
        ACTIVATION_TEXT,
        lambda key: f"features (0..{40 if key == 'fused' else 20})",
        {"Classes": classes, "Table": "activations.tsv"},
    )

    counts = plan.counts()
    cohort = {
        "subjects": int(len(np.unique(data.subjects))),
        "sessions": int(len(data)),
        "per_class": counts,
        "left_out": plan.left_out,
        "flagged_excluded": len(plan.flagged),
        "flagged_sessions": [
            {"subject": f[1], "session": f[2], "reasons": list(f[3])} for f in plan.flagged
        ],
    }
    cv_settings = {
        "folds": plan.folds,
        "repeats": plan.repeats,
        "seed": plan.seed,
        "permutation_tests": plan.permutations,
        "split": "stratified by class at subject level (all sessions of a subject in one fold)",
    }
    if result.final is not None:
        final = result.final
        bundles.save_bundle(
            folder,
            tensors=final["tensors"],
            model_meta=final["meta"],
            layout=layout,
            classes=classes,
            standardization=final["standardizer"],
            training={
                **plan.train_kwargs,
                "seed": task_seed(plan.seed, KIND_FINAL),
                "history": final.get("history", []),
                "cross_validation": cv_settings,
            },
            cv_metrics=result.summary.get(cv.MODEL_METHOD, {}),
            cohort=cohort,
            extra={
                "task": plan.out_dir.name,
                "label_column": plan.label_column,
                "tracer": plan.tracer,
                "relevance": {k: np.asarray(v).tolist() for k, v in final["relevance"].items()},
            },
        )
        written.extend([bundles.WEIGHTS_NAME, bundles.META_NAME])

    model_ba = result.summary[cv.MODEL_METHOD]["balanced_accuracy"]
    order = np.argsort(-np.asarray(result.relevance.get("combined", np.zeros(layout.n_regions))))
    summary = {
        "task": plan.out_dir.name,
        "classes": classes,
        "reference_class": classes[0],
        "positive_class": classes[1] if len(classes) == 2 else None,
        "label_column": plan.label_column,
        "tracer": plan.tracer,
        "cohort": cohort,
        "cross_validation": cv_settings,
        "training": plan.train_kwargs,
        "devices": plan.devices,
        "threads_per_worker": plan.threads,
        "metrics": result.summary,
        "metrics_level": "subject (sessions of a subject averaged); per session in "
        "metrics_session and in metrics.tsv rows with level = session",
        "metrics_session": result.summary_session,
        "methods": list(result.methods or result.summary),
        "per_repeat": result.per_repeat,
        "comparisons": result.comparisons,
        "siamese_training": _training_summary(result.training),
        "balanced_accuracy": model_ba,
        "permutation": (
            {
                "n": plan.permutations,
                "p_value": result.p_values.get(cv.MODEL_METHOD),
                "p_values": result.p_values,
                "null_mean_balanced_accuracy": float(
                    np.mean([r[cv.MODEL_METHOD] for r in result.permutations])
                ),
            }
            if result.permutations
            else None
        ),
        "top_regions": [
            {"name": layout.names[i], "combined": float(result.relevance["combined"][i])}
            for i in order[:10]
        ]
        if "combined" in result.relevance
        else [],
        "metric_definitions": METRIC_DEFINITIONS,
        "versions": bundles.versions(),
        "timing_s": {
            k: round(v, 2) if isinstance(v, float) else v for k, v in result.timing.items()
        },
        "files": sorted(written + ["summary.json"]),
    }
    if settings is not None:
        summary["settings"] = settings.as_dict()
    save_json(folder / "summary.json", bundles._jsonable(summary))
    written.append("summary.json")
    return written


def _swap_into_place(staging: Path, final: Path) -> None:
    """Replace ``final`` with the complete ``staging`` folder (the old one removed after)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    try:
        staging.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def format_summary(plan: GroupPlan, result) -> str:
    """The table printed at the end: the model beside the baselines."""
    from ..model import cv

    def cell(stats):
        if stats["mean"] is None:
            return "n/a"
        if stats.get("ci_low") is None:
            return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"
        return f"{stats['mean']:.3f} [{stats['ci_low']:.2f}, {stats['ci_high']:.2f}]"

    width = max([20] + [len(m) + 2 for m in result.summary])
    lines = [
        f"{plan.out_dir.name}: {sum(n['subjects'] for n in plan.counts().values())} subjects, "
        f"{plan.folds}-fold CV x {plan.repeats}; per subject, mean [95 % CI]",
        f"  {'method':<{width}}{'balanced acc.':>20}{'AUC':>20}{'sensitivity':>20}"
        f"{'specificity':>20}",
    ]
    for method, stats in result.summary.items():
        lines.append(
            f"  {method:<{width}}"
            + "".join(
                f"{cell(stats[m]):>20}"
                for m in ("balanced_accuracy", "auc", "sensitivity", "specificity")
            )
        )
    for c in getattr(result, "comparisons", []) or []:
        best = c.get("best_baseline") and c["metric"] == "balanced_accuracy"
        if best and c.get("t") is not None:
            lines.append(
                f"  {cv.MODEL_METHOD} - {c['versus']} (best baseline): "
                f"{c['mean_difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
                f"p = {c['p_value']:.3g} (corrected resampled t)"
            )
    if result.p_values:
        lines.append(
            f"  permutation test ({plan.permutations} reruns): p = "
            f"{result.p_values[cv.MODEL_METHOD]:.4g} for {cv.MODEL_METHOD}"
        )
    lines.append(f"  written to {plan.out_dir}")
    return "\n".join(lines)


def run_group(settings, plan: GroupPlan, *, fit=None, config_cls=None) -> int:
    """Cross-validate, train the final model and write the report (see the module docstring)."""
    from .. import bids
    from ..model import cv
    from ..preproc.regions import atlas_layout, load_cohort

    ex = settings.execution
    t0 = time.perf_counter()
    participants = bids.read_participants(plan.bids_dir, plan.label_column)
    data = load_cohort(
        plan.deriv_dir,
        participants,
        label_column=plan.label_column,
        classes=plan.classes,
        tracer=plan.tracer,
        participant_label=plan.participant_label or None,
        session_label=plan.session_label or None,
        layout=atlas_layout(),
        include_flagged=plan.include_flagged,
    )
    if plan.flagged:
        LOGGER.warning(
            "%d session(s) flagged by participant QC left out (--include-flagged keeps them)",
            len(plan.flagged),
        )
    if sorted(map(str, data.sources)) != sorted(str(f[0]) for f in plan.files):
        raise SiamFuseError("the region files changed between planning and loading; rerun")
    LOGGER.info(
        "loaded %d session(s) of %d subject(s) in %.1f s; %d model fit(s) on %s",
        len(data),
        len(np.unique(data.subjects)),
        time.perf_counter() - t0,
        plan.n_tasks,
        ", ".join(plan.devices),
    )
    quiet = ex.verbosity < 0
    progress = None if quiet else _Progress(plan.n_tasks)
    result = cv.cross_validate(
        data,
        folds=plan.folds,
        repeats=plan.repeats,
        seed=plan.seed,
        permutations=plan.permutations,
        train_kwargs=plan.train_kwargs,
        devices=plan.devices,
        threads=plan.threads,
        fit=fit,
        config_cls=config_cls,
        progress=progress,
        work_dir=plan.work_dir,
        ablations=plan.ablations,
    )
    result.timing["wall_s"] = time.perf_counter() - t0
    parent = plan.out_dir.parent
    staging = parent / f".{plan.out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        write_group_outputs(staging, plan, data, result, settings=settings)
        _swap_into_place(staging, plan.out_dir)
    except OSError as exc:
        from ..errors import CannotWriteError

        raise CannotWriteError(f"cannot write {plan.out_dir}: {exc.strerror or exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    write_group_reports(plan.deriv_dir, bids_dir=plan.bids_dir)
    if not quiet:
        sys.stdout.write(format_summary(plan, result) + "\n")
    LOGGER.info("group level done in %.0f s", time.perf_counter() - t0)
    return 0


def write_group_reports(
    output_dir: Path, *, bids_dir: Path | None = None, strict: bool = False
) -> Path | None:
    """``OUT/group/report.html`` and the methods boilerplate from the task folders.

    After training this is never fatal (the results are written: failures are logged);
    ``--reports-only`` passes ``strict`` so that nothing to report on (exit 66) or an
    unwritable folder (exit 73) ends the run with its code.
    """
    from ..reports.boilerplate import group_text, write_citation
    from ..reports.group import build_group_report, find_tasks

    try:
        path = build_group_report(output_dir, bids_dir=bids_dir)
        texts = []
        for task in find_tasks(Path(output_dir) / "group"):
            summary = task / "summary.json"
            if summary.is_file():
                texts.append(group_text(json.loads(summary.read_text())))
        if texts:
            write_citation(Path(output_dir) / "logs", "group", "\n".join(texts))
        return path
    except SiamFuseError as exc:
        if strict:
            raise
        LOGGER.warning("group report not written: %s", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - a report failure must not lose the results
        LOGGER.warning("group report not written: %s: %s", type(exc).__name__, exc)
        return None


# ----------------------------------------------------------------------------------------------
# Model application
# ----------------------------------------------------------------------------------------------


def resolve_apply_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible (use --device cpu)")
    return device


def check_bundle(bundle: Path) -> dict:
    """The bundle's JSON, checked against this installation's atlas and grid (exit 65)."""
    from ..model import bundle as bundles
    from ..preproc.regions import atlas_layout

    meta = bundles.read_meta(bundle)
    bundles.check_compatible(meta, atlas_layout(), where=f"--model {bundle}")
    _, weights = bundles.bundle_paths(bundle)
    if not weights.is_file():
        raise DataError(f"--model {bundle}: the weights file {weights.name} is missing")
    return meta


def init_apply_model_wf(
    *, bundle: Path, output_dir: Path, device: str = "cpu", name: str = "apply_model_wf"
):
    """Apply a trained model bundle to one session's region file.

    Workflow graph::

        inputnode (region_file, source_entities) -> apply_model -> outputnode

    Parameters
    ----------
    bundle
        The bundle (its folder, ``model.json`` or ``model.safetensors``); checked here against
        the atlas and grid of this installation (``DataError``, exit 65, if it does not match).
    output_dir
        The derivatives root the outputs are written to (named after ``source_entities``).
    device
        Torch device for the prediction.

    Inputs: ``region_file`` (the session's ``..._regions.npz``), ``source_entities`` (the PET's
    entities: subject, session, tracer, ...). Outputs: ``probabilities`` (TSV),
    ``predicted_class``, ``relevance_maps`` (MRI, PET, combined NIfTI), ``relevance_table``.
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe
    from niworkflows.engine.workflows import LiterateWorkflow as Workflow

    from ..interfaces.model import ApplyModel
    from ..model.bundle import bundle_paths

    meta = check_bundle(bundle)
    meta_path, _ = bundle_paths(bundle)
    classes = meta["classes"]
    ba = (meta.get("cv_metrics") or {}).get("balanced_accuracy") or {}
    perf = (
        f" (cross-validated balanced accuracy {ba['mean']:.2f} ± {ba['sd']:.2f})"
        if ba.get("mean") is not None
        else ""
    )
    n_train = (meta.get("cohort") or {}).get("subjects")
    workflow = Workflow(name=name)
    workflow.__desc__ = (
        "A siamese-attention model (Arco et al.) trained with *bids_siamfuse* to separate "
        f"{' vs '.join(classes)}"
        + (f" on {n_train} subjects" if n_train else "")
        + f"{perf} was applied to the AAL116 regions of each session's grey-matter and PET "
        "maps, giving class probabilities and, per region and modality, the relevance of the "
        "region for that session's prediction."
    )
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["region_file", "source_entities"]), name="inputnode"
    )
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=["probabilities", "predicted_class", "relevance_maps", "relevance_table"]
        ),
        name="outputnode",
    )
    apply_model = pe.Node(
        ApplyModel(bundle=str(meta_path.absolute()), output_dir=str(output_dir), device=device),
        name="apply_model",
        mem_gb=3,
    )
    workflow.connect(
        [
            (
                inputnode,
                apply_model,
                [("region_file", "region_file"), ("source_entities", "source_entities")],
            ),
            (
                apply_model,
                outputnode,
                [
                    ("probabilities", "probabilities"),
                    ("predicted_class", "predicted_class"),
                    ("relevance_maps", "relevance_maps"),
                    ("relevance_table", "relevance_table"),
                ],
            ),
        ]
    )
    return workflow


@dataclass
class ApplyPlan:
    """``--model-only``: which region files get the bundle."""

    bundle: Path
    meta: dict
    out_dir: Path
    files: list  # (path, source entities)
    device: str

    def describe(self) -> str:
        lines = [
            f"apply model {self.bundle} ({' vs '.join(self.meta['classes'])}) to "
            f"{len(self.files)} region file(s) in {self.out_dir} on {self.device}:"
        ]
        lines.extend(f"  {p.relative_to(self.out_dir)}" for p, _ in self.files)
        return "\n".join(lines)


def plan_apply(settings) -> ApplyPlan:
    """Check a ``--model-only`` request: the bundle, and the region files it applies to."""
    from ..preproc.regions import find_region_files

    ex, wf = settings.execution, settings.workflow
    if wf.model is None:
        raise UsageError("--model-only needs --model BUNDLE")
    meta = check_bundle(wf.model)
    out = Path(ex.output_dir)
    files = find_region_files(out, ex.tracer_label) if out.is_dir() else []
    if not files:
        raise NoInputError(
            f"{out}: no region files (*_trc-{ex.tracer_label}_*_regions.npz) for --model-only; "
            "run the participant level without --model-only first"
        )
    chosen = []
    for path in files:
        src = _source_from_name(path.name)
        if ex.participant_label and src.get("subject") not in ex.participant_label:
            continue
        if ex.session_label and src.get("session") not in ex.session_label:
            continue
        chosen.append((path, src))
    if not chosen:
        raise NothingSelectedError(
            "no region file in the output folder matches --participant-label/--session-label"
        )
    return ApplyPlan(
        bundle=Path(wf.model),
        meta=meta,
        out_dir=out,
        files=chosen,
        device=resolve_apply_device(ex.device),
    )


def run_apply(settings, plan: ApplyPlan) -> int:
    """Apply the bundle to every planned region file (no nipype)."""
    from ..interfaces.model import apply_bundle_to_file
    from ..model import bundle as bundles
    from ..preproc.regions import atlas_layout

    t0 = time.perf_counter()
    bundle = bundles.load_bundle(plan.bundle, layout=atlas_layout())
    model = bundle.model(device=plan.device)
    failed = []
    for path, source in plan.files:
        try:
            written = apply_bundle_to_file(bundle, path, source, plan.out_dir, model=model)
        except DataError as exc:
            if settings.execution.stop_on_first_crash:
                raise
            LOGGER.error("%s: %s", path.name, exc)
            failed.append((path, str(exc)))
            continue
        probs = json.loads(written["model_probs"].with_suffix(".json").read_text())
        LOGGER.info("%s: %s", path.name.split("_space-")[0], probs["PredictedClass"])
    LOGGER.info(
        "model applied to %d of %d session(s) in %.1f s",
        len(plan.files) - len(failed),
        len(plan.files),
        time.perf_counter() - t0,
    )
    if failed:
        raise DataError(
            f"{len(failed)} of {len(plan.files)} region file(s) could not be used; first: "
            f"{failed[0][1]}"
        )
    return 0
