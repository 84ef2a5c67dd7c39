"""Planning a group run: check the request without reading any image (:func:`plan_group`).

Labels come from ``BIDS_DIR/participants.tsv``, the region files from ``OUTPUT_DIR``
(:func:`.cohort.select_region_files`: the plan records exactly which files the run reads),
every class needs enough subjects for the folds. Devices, threads and the training
configuration arrive resolved (:func:`bids_siamfuse.config.resolve`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError

GROUP_FOLDER = "group"


def task_name(classes) -> str:
    """``CN_vs_AD``: the classes in the order given, unsafe characters replaced by '-'."""
    return "_vs_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", str(c)) for c in classes)


@dataclass
class GroupPlan:
    """What a group run will do (``--dry-run`` prints :meth:`describe`)."""

    bids_dir: Path
    deriv_dir: Path
    out_dir: Path
    classes: tuple
    label_column: str
    tracer: str
    files: list  # (path, subject, session, class index): exactly what the run reads
    left_out: dict  # label -> sessions left out (not in --classes)
    folds: int
    repeats: int
    permutations: int
    seed: int
    devices: list
    threads: int | None
    train: object  # the run's TrainConfig (bids_siamfuse.config.train_config)
    work_dir: Path | None = None
    notes: list = field(default_factory=list)
    ablations: bool = True
    # sessions left out because participant QC flagged them: (path, subject, session, reasons)
    flagged: list = field(default_factory=list)

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
        tc = self.train
        lines.append(
            f"  training: up to {tc.epochs} epochs, batch {tc.batch_size}, "
            f"learning rate {tc.learning_rate}, validation share {tc.val_fraction}, "
            f"early stop below {tc.early_stop_loss} or after {tc.patience} flat epochs"
            + (", sloppy mode" if tc.sloppy else "")
        )
        lines.append(
            f"  fusion {tc.fusion}, siamese gate {tc.gate}"
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


def plan_group(settings, resolved) -> GroupPlan:
    """Check a group-level request without reading images (see the module docstring);
    ``resolved``: :func:`bids_siamfuse.config.resolve`'s devices, threads, training config."""
    from .. import bids
    from ..model.folds import check_foldable
    from .cohort import select_region_files

    ex, mo, wf = settings.execution, settings.model, settings.workflow
    classes = tuple(str(c) for c in mo.classes)
    if len(classes) < 2:
        raise UsageError(f"--classes needs at least two labels, got {list(classes)}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise UsageError(f"--classes lists {', '.join(repeated)} more than once")
    if mo.folds < 2:
        raise UsageError(f"--folds must be 2 or more, got {mo.folds}")
    participants = bids.read_participants(ex.bids_dir, ex.label_column)
    present = sorted({str(v) for v in participants[ex.label_column]} - {"", "n/a"})
    unknown = [c for c in classes if c not in present]
    if unknown:
        raise UsageError(
            f"--classes {' '.join(unknown)}: no participant has that '{ex.label_column}' in "
            f"participants.tsv (labels there: {', '.join(present) or 'none'})"
        )
    deriv = Path(ex.output_dir)
    selection = select_region_files(
        deriv,
        participants,
        label_column=ex.label_column,
        classes=classes,
        tracer=ex.tracer_label,
        participant_label=ex.participant_label,
        session_label=ex.session_label,
        include_flagged=mo.include_flagged,
    )
    selected, flagged = selection.files, selection.flagged
    labels = np.array([f[3] for f in selected])
    subjects = np.array([f[1] for f in selected])
    check_foldable(subjects, labels, mo.folds, classes)
    devices = list(resolved.devices)
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
        files=selected,
        left_out=selection.left_out,
        folds=mo.folds,
        repeats=mo.repeats,
        permutations=mo.permutation_tests,
        seed=ex.random_seed,
        devices=devices,
        threads=resolved.omp_nthreads,
        train=resolved.train,
        work_dir=Path(ex.work_dir) if ex.work_dir else None,
        notes=notes,
        ablations=bool(mo.ablations),
        flagged=flagged,
    )
