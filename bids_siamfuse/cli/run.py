"""``bids_siamfuse BIDS_DIR OUTPUT_DIR {participant,group}``: validate, build, run, report.

Every failure a user can cause ends here as a one-line message and the documented exit code
(:mod:`bids_siamfuse.errors`); an unexpected failure writes its traceback to
``OUTPUT_DIR/logs/crash-<run>.txt`` and exits 1 with a one-line pointer to it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import (
    EXIT_DATAERR,
    EXIT_FAILURE,
    CannotWriteError,
    DataError,
    NoInputError,
    SiamFuseError,
    UnknownLevelError,
    UsageError,
)
from .parser import LEVELS, parse_args

if TYPE_CHECKING:  # torch-free: the protocol only
    from ..model.tasks import Fit

LOGGER = logging.getLogger("bids_siamfuse")


def main(argv: list[str] | None = None, *, fit: Fit | None = None, model_cls=None) -> int:
    """Entry point of the ``bids_siamfuse`` command; returns the exit code.

    ``fit`` (a :class:`~bids_siamfuse.model.tasks.Fit`) and ``model_cls`` (the class a bundle is
    rebuilt as, with ``from_state``) replace the training engine and the model class: default
    :func:`~bids_siamfuse.model.tasks.default_fit` and
    :func:`~bids_siamfuse.model.bundle.default_model_cls`; the tests pass their fast double
    (``tests/model_double.py``). ``fit`` reaches the group level's workers (spawned ones
    import it by name), ``model_cls`` the ``--model-only`` application.
    """
    try:
        settings = parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors (64)
        return int(exc.code or 0)
    except SiamFuseError as exc:
        _say(exc)
        return exc.exit_code
    _setup_logging(settings.execution.verbosity)
    from .. import signals

    signals.install()  # SIGTERM/SIGINT/SIGHUP: stop workers, status table, 143/130/129
    try:
        return run(settings, fit=fit, model_cls=model_cls)
    except SiamFuseError as exc:
        _say(exc)
        return exc.exit_code
    except signals.Interrupted as exc:
        signals.stop_processes(signals.descendants())  # group-level workers, anything left
        sys.stderr.write(f"bids_siamfuse: {exc}; {_resume_hint(settings)}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("bids_siamfuse: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line out, details to a file
        where = _write_crash(settings, exc)
        sys.stderr.write(
            f"bids_siamfuse: error: unexpected {type(exc).__name__}: {exc} (details in {where})\n"
        )
        return EXIT_FAILURE
    finally:
        signals.restore()


def _resume_hint(settings) -> str:
    ex = settings.execution
    parts = []
    if ex.output_dir is not None and ex.analysis_level == "participant":
        parts.append(f"status in {Path(ex.output_dir) / 'logs'}/participant-{ex.run_uuid}.tsv")
    if ex.work_dir is not None:
        parts.append(f"rerun with -w {ex.work_dir} to resume")
    return "; ".join(parts) or "nothing was left half-written"


def _say(exc: SiamFuseError) -> None:
    sys.stderr.write(f"bids_siamfuse: error: {exc}\n")


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level,
        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s",
        datefmt="%y%m%d-%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    if verbosity < 2:
        for noisy in (
            "nipype.workflow",
            "nipype.interface",
            "nipype.utils",
            "bids",
            "bidsschematools",
        ):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _write_crash(settings, exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    out = settings.execution.output_dir
    candidates = []
    if out is not None and not settings.execution.dry_run:  # a dry run writes nothing there
        candidates.append(Path(out) / "logs")
    candidates.append(Path(tempfile.gettempdir()))
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{settings.execution.run_uuid}.txt"
            path.write_text(f"bids_siamfuse {__version__}\n{text}")
            return str(path)
        except OSError:
            continue
    return "stderr"


# ----------------------------------------------------------------------------------------------


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def check_paths(settings) -> None:
    """Refuse output/work folders that would write into the input dataset."""
    ex = settings.execution
    bids_dir = Path(ex.bids_dir).resolve()
    out = Path(ex.output_dir).resolve()
    if out == bids_dir:
        raise UsageError("the output directory must differ from the BIDS directory")
    if _is_within(out, bids_dir) and not _is_within(out, bids_dir / "derivatives"):
        raise UsageError(
            f"output directory {out} lies inside the BIDS dataset; use a folder outside it "
            f"or under {bids_dir / 'derivatives'}"
        )
    if _is_within(bids_dir, out):
        raise UsageError(f"the BIDS dataset {bids_dir} lies inside the output directory {out}")
    if ex.work_dir is not None:
        work = Path(ex.work_dir).resolve()
        if _is_within(work, bids_dir):
            raise UsageError(f"work directory {work} lies inside the BIDS dataset {bids_dir}")
    model = settings.workflow.model
    if model is not None and not Path(model).exists():
        raise NoInputError(f"--model {model}: no such file")


def prepare_output(settings) -> Path:
    """Create the output and log folders and prove they are writable (exit 73 otherwise)."""
    out = Path(settings.execution.output_dir)
    logs = out / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        probe = logs / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CannotWriteError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return logs


def check_output_writable(out: Path) -> None:
    """Exit 73 at once when OUTPUT_DIR (or, when it does not exist yet, the folder it would be
    created in) refuses a file; creates nothing. Docker's ``-v /data/out:/out`` with a
    root-owned ``/data/out`` and the image's non-root user fails here, not after indexing."""
    folder = Path(out).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CannotWriteError(f"cannot write to {out}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        hint = ""
        if hasattr(os, "getuid"):
            hint = f" (this process runs as uid {os.getuid()}; see README, Containers)"
        raise CannotWriteError(f"cannot write to {out}: {exc.strerror or exc}{hint}") from None


def resolve_work_dir(settings) -> Path:
    """``-w`` when given, else ``./work`` (fMRIPrep's default), else a temporary folder."""
    from ..safety import default_work_dir, make_work_dir

    ex = settings.execution
    explicit = ex.work_dir is not None
    if explicit:
        work = Path(ex.work_dir)
    else:
        work = default_work_dir()  # never a fixed shared path (safety.py)
        if work.parent != Path.cwd():
            LOGGER.warning("current folder not writable: work directory is %s", work)
    try:
        make_work_dir(work, explicit=explicit)  # refuses folders others can write (64)
    except OSError as exc:
        raise CannotWriteError(f"cannot create work directory {work}: {exc.strerror}") from None
    ex.work_dir = work.absolute()
    return ex.work_dir


def plan_participants(settings):
    """Validate the dataset and find the PET/T1w pairs selected by the filters."""
    from .. import bids

    ex = settings.execution
    bids.check_bids_root(ex.bids_dir)
    if not ex.skip_bids_validation:
        # the top-level files and the selected participants only: one array task per
        # participant must not validate the whole dataset each time
        warnings = bids.validate_dataset(ex.bids_dir, participants=ex.participant_label)
        if warnings:
            LOGGER.info("BIDS validator warnings: %s", ", ".join(warnings))
    layout = bids.load_layout(ex.bids_dir, ex.bids_database_dir)
    plan = bids.collect_pairs(
        layout,
        participant_label=ex.participant_label,
        session_label=ex.session_label,
        tracer=ex.tracer_label,
        bids_filters=ex.bids_filters,
        pairing=ex.pairing,
    )
    return screen_pairs(plan)


def screen_pairs(plan):
    """Header checks of every pair: unusable ones move to ``plan.invalid`` (exit 65 later)."""
    from ..checks import check_pair_headers, screen_duplicates
    from ..errors import DataError

    screen_duplicates(plan)  # one name, several files: resolved or refused per pair
    valid = []
    for pair in plan.pairs:
        try:
            check_pair_headers(pair)
        except DataError as exc:
            LOGGER.error("%s: %s", pair.key, exc)
            plan.invalid.append((pair, str(exc)))
        else:
            valid.append(pair)
    plan.pairs = valid
    return plan


def rebuild_reports(settings) -> int:
    """``--reports-only``: rewrite the reports from the derivatives in OUTPUT_DIR, no compute."""
    ex = settings.execution
    out = Path(ex.output_dir)
    bids_dir = Path(ex.bids_dir).absolute()
    if ex.analysis_level == "participant":
        from ..participant import write_participant_reports
        from ..reports.participant import find_subjects

        subjects = find_subjects(out, ex.participant_label)
        if not subjects:
            raise NoInputError(
                f"{out}: no sub-* derivatives"
                + (" for --participant-label" if ex.participant_label else "")
                + " to report on; run the participant level first"
            )
        prepare_output(settings)
        written = write_participant_reports(out, subjects, bids_dir=bids_dir)
        return 0 if len(written) == len(subjects) else EXIT_FAILURE
    from ..group.run import write_group_reports

    prepare_output(settings)
    written = write_group_reports(out, bids_dir=bids_dir, strict=True)
    return 0 if written is not None else EXIT_FAILURE


def _record_threads(ex, resolved) -> None:
    """The TOML (and summary.json) record the process and thread counts used, not 0 ("all")."""
    ex.nprocs = resolved.nprocs
    ex.omp_nthreads = resolved.omp_nthreads or 0


def run(settings, *, fit: Fit | None = None, model_cls=None) -> int:
    """Run the level ``settings`` asks for (``fit``, ``model_cls``: see :func:`main`)."""
    ex = settings.execution
    if ex.analysis_level not in LEVELS:
        raise UnknownLevelError(
            f"unknown analysis level {ex.analysis_level!r}; use one of {', '.join(LEVELS)}"
        )
    from .. import bids

    bids.check_bids_root(ex.bids_dir)
    check_paths(settings)
    if not ex.dry_run:
        # before validation and indexing: a root-owned /out in a container fails at once
        check_output_writable(Path(ex.output_dir))
    if ex.reports_only:
        return rebuild_reports(settings)
    from ..config import resolve

    # device(s), processes, threads, training configuration: decided here, once
    resolved = resolve(settings)
    if ex.analysis_level == "participant" and settings.workflow.model_only:
        # --model-only: apply --model to the region files already in OUTPUT_DIR, no nipype
        from ..apply import plan_apply, run_apply

        apply_plan = plan_apply(settings, resolved)
        if ex.dry_run:
            print(apply_plan.describe())
            return 0
        settings.write(prepare_output(settings))
        return run_apply(settings, apply_plan, model_cls=model_cls)
    if ex.analysis_level == "participant":
        # --- bring your own preprocessing (-d/--derivatives) ---
        folders = None
        if settings.workflow.derivatives:
            from ..external import parse_derivatives

            folders = parse_derivatives(settings.workflow.derivatives)  # 64 / 66
        plan = plan_participants(settings)
        if folders:
            from ..external import attach_external, describe

            attach_external(plan, folders)
            if ex.dry_run:
                print(describe(plan))
                return 0 if plan.pairs else EXIT_DATAERR
            if not plan.pairs and not plan.invalid:
                from ..errors import NothingSelectedError

                raise NothingSelectedError(
                    "no selected PET/T1w pair has maps in --derivatives: "
                    + "; ".join(f"sub-{s} ses-{e}: {w}" for s, e, w in plan.skipped[:3])
                )
        # --- end -d ---
        if ex.dry_run:
            print(plan.describe())
            return 0 if plan.pairs else EXIT_DATAERR
        if not plan.pairs:
            raise DataError(plan.invalid[0][1])
        if plan.invalid and ex.stop_on_first_crash:
            raise DataError(f"{plan.invalid[0][1]} (--stop-on-first-crash)")
        logs = prepare_output(settings)
        from ..participant import run_participant

        _record_threads(ex, resolved)
        if ex.boilerplate_only:
            from ..participant import write_boilerplate

            settings.write(logs)
            return write_boilerplate(settings, plan)
        resolve_work_dir(settings)
        settings.write(logs)
        bids.ensure_dataset_description(ex.output_dir, ex.bids_dir)
        if folders:  # -d: the sidecars' bids:<NAME>: URIs resolve through DatasetLinks
            from ..external import link_derivatives

            link_derivatives(ex.output_dir, folders)
        code = run_participant(
            settings,
            plan,
            nprocs=resolved.nprocs,
            omp_nthreads=resolved.omp_nthreads,
            device=resolved.device,
            memory_gb=resolved.memory_gb,
        )
        if code == 0 and ex.clean_workdir:
            from ..participant import clean_work_dir

            clean_work_dir(ex.work_dir, plan)
        if plan.invalid:
            sys.stderr.write(
                f"bids_siamfuse: {len(plan.invalid)} pair(s) refused as unusable input: "
                + "; ".join(why for _, why in plan.invalid)
                + "\n"
            )
            code = code or EXIT_DATAERR
        return code
    # group level
    from ..group.plan import plan_group
    from ..group.run import run_group

    group_plan = plan_group(settings, resolved)
    if ex.dry_run:
        print(group_plan.describe())
        return 0
    logs = prepare_output(settings)
    _record_threads(ex, resolved)
    settings.write(logs)
    bids.ensure_dataset_description(ex.output_dir, ex.bids_dir)
    return run_group(settings, group_plan, fit=fit)


if __name__ == "__main__":
    raise SystemExit(main())
