"""Running a planned group run (:func:`run_group`): read exactly the planned region files,
cross-validate the model and the baselines, train the final model, write the task folder
(:mod:`.outputs`), rebuild the group report (:func:`write_group_reports`) and print the summary
table (:func:`format_summary`).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import swap_folder
from ..errors import CannotWriteError, SiamFuseError
from .outputs import write_group_outputs
from .plan import GroupPlan

if TYPE_CHECKING:
    from ..model.tasks import Fit

LOGGER = logging.getLogger("bids_siamfuse.group")


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


def format_summary(plan: GroupPlan, result) -> str:
    """The table printed at the end: the model beside the baselines."""
    from ..model.cv import MODEL_METHOD

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
                f"  {MODEL_METHOD} - {c['versus']} (best baseline): "
                f"{c['mean_difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
                f"p = {c['p_value']:.3g} (corrected resampled t)"
            )
    if result.p_values:
        lines.append(
            f"  permutation test ({plan.permutations} reruns): p = "
            f"{result.p_values[MODEL_METHOD]:.4g} for {MODEL_METHOD}"
        )
    lines.append(f"  written to {plan.out_dir}")
    return "\n".join(lines)


def run_group(settings, plan: GroupPlan, *, fit: Fit | None = None) -> int:
    """Read the planned cohort, cross-validate, train the final model, write the task folder and
    the report (see :mod:`bids_siamfuse.group`). ``fit``: the training engine (default
    :func:`bids_siamfuse.model.tasks.default_fit`)."""
    from ..model.cv import cross_validate
    from .cohort import read_cohort

    ex = settings.execution
    t0 = time.perf_counter()
    data = read_cohort(plan.files, plan.classes)
    if plan.flagged:
        LOGGER.warning(
            "%d session(s) flagged by participant QC left out (--include-flagged keeps them)",
            len(plan.flagged),
        )
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
    result = cross_validate(
        data,
        folds=plan.folds,
        repeats=plan.repeats,
        seed=plan.seed,
        permutations=plan.permutations,
        config=plan.train,
        devices=plan.devices,
        threads=plan.threads,
        progress=progress,
        work_dir=plan.work_dir,
        ablations=plan.ablations,
        fit=fit,
    )
    result.timing["wall_s"] = time.perf_counter() - t0
    parent = plan.out_dir.parent
    staging = parent / f".{plan.out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        write_group_outputs(staging, plan, data, result, settings=settings)
        swap_folder(staging, plan.out_dir)
    except OSError as exc:
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
