"""Running the participant level: nipype settings, logs, the run, its status table and reports.

:func:`run_participant` builds :func:`~bids_siamfuse.workflows.base.init_bids_siamfuse_wf`
from :class:`~bids_siamfuse.workflows.common.ParticipantOptions` (:func:`participant_options`),
runs it with the guarded schedulers of :mod:`bids_siamfuse.engine` (MultiProc over the
processes, threads per ANTs node; the work directory caches finished nodes so a rerun
resumes), and reports per pair whether it completed. A failing subject does not stop the
others (unless ``--stop-on-first-crash``); nipype's crash files go to
``OUT/sub-<label>/log/<run_uuid>/``, a summary table to ``OUT/logs/participant-<run_uuid>.tsv``,
and the exit code is 1 when any pair failed. A pair that completed but whose quality metrics
fall outside their reference ranges (``preproc/qc.py``) is ``flagged`` there, with the
reasons; that does not fail the run.

The caller (``cli/run.py``) passes the resolved processes, threads and device; nothing here
resolves them again. The NiPreps flags ``--low-mem``, ``--write-graph``,
``--resource-monitor``, ``--boilerplate-only`` and ``--clean-workdir`` are served here too.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from pathlib import Path

from ..errors import EXIT_FAILURE, EXIT_OK, UsageError
from ..progress import run_summary
from ..workflows.base import init_bids_siamfuse_wf
from ..workflows.common import ParticipantOptions, anat_wf_name, pet_wf_name, safe_name
from .flags import low_mem_args, run_callbacks, write_workflow_graph
from .outcome import mark_interrupted, pair_status, write_participant_reports, write_status
from .resources import memory_budget_gb, schedule_steps
from .resources import plugin_args as resource_args

LOGGER = logging.getLogger("bids_siamfuse.participant")


def configure_nipype(ex) -> None:
    """nipype's settings for the run (set once; the workflow built after copies them) and
    its log messages through our handler; node tracebacks to the crash files only."""
    from nipype import config as nipype_config

    from ..engine import quiet_node_crashes

    level = {-1: "WARNING", 0: "WARNING", 1: "INFO"}.get(ex.verbosity, "DEBUG")
    nipype_config.update_config(
        {
            "logging": {
                "workflow_level": level,
                "interface_level": level,
                "utils_level": level,
                "log_to_file": False,
            },
            "execution": {
                "crashfile_format": "txt",
                "stop_on_first_crash": bool(ex.stop_on_first_crash),
                "remove_unnecessary_outputs": False,
                "poll_sleep_duration": 0.01,  # nipype's 2 s default idles between jobs
                "get_linked_libs": False,
                "check_version": False,
                "parameterize_dirs": False,
            },
            # --resource-monitor: nipype's sampler (needs psutil; without it only times)
            "monitoring": {"enabled": bool(ex.resource_monitor), "sample_frequency": "1"},
        }
    )
    _route_nipype_logs()
    quiet_node_crashes(ex.verbosity)  # tracebacks to the crash files, not the terminal


def run_participant(
    settings,
    plan,
    *,
    nprocs: int,
    omp_nthreads: int,
    device: str = "cpu",
    memory_gb: float | None = None,
) -> int:
    """Build, run and report the participant workflow; returns the exit code (0 or 1).

    ``nprocs``, ``omp_nthreads``, ``device``, ``memory_gb`` (the scheduler's memory budget;
    None: :func:`~bids_siamfuse.participant.resources.memory_budget_gb`): resolved by the
    caller. How steps share the node: :mod:`bids_siamfuse.participant.resources`.
    """
    from ..preproc.registration import set_threads

    ex, wf = settings.execution, settings.workflow
    if wf.backend not in ("ants", "spm"):
        raise UsageError(f"unknown --backend {wf.backend!r}")
    nprocs, omp = nprocs, omp_nthreads
    set_threads(omp)  # inherited by the worker processes; each ANTs node also sets it
    spm = None
    if wf.backend == "spm":
        from ..preproc.spm import find_spm

        spm = find_spm(wf.spm_cmd)  # NoInputError (exit 66) when SPM12 is not installed
        spm.configure()
    options = ParticipantOptions.from_settings(settings, omp_nthreads=omp, device=device, spm=spm)
    output_dir = options.output_dir
    work_dir = Path(ex.work_dir).absolute()
    configure_nipype(ex)
    workflow = init_bids_siamfuse_wf(
        plan=plan, options=options, work_dir=work_dir, run_uuid=ex.run_uuid
    )
    # ANTs/ITK steps declare the cores they use and data sinks run in the workers, so the
    # steps of many subjects share the node (participant/resources.py)
    schedule_steps(workflow, omp)
    if memory_gb is None:
        memory_gb = memory_budget_gb(ex.mem_mb)
    # a budget the user gave is kept (the engine refuses a step that cannot fit); a measured
    # one never stops a step from running alone
    plugin_args = resource_args(nprocs, memory_gb, None if ex.mem_mb else workflow)
    plugin = "MultiProc" if nprocs > 1 else "Linear"
    plugin_args.update(low_mem_args(ex, workflow))
    if ex.write_graph:
        write_workflow_graph(workflow, output_dir / "logs", ex.run_uuid)
    callbacks = run_callbacks(ex, workflow, plan, output_dir)
    plugin_args["status_callback"] = callbacks
    runner = _guarded_runner(plugin, plugin_args, plan)  # see bids_siamfuse/engine.py
    LOGGER.info(
        "participant workflow: %d pair(s), backend %s%s, %d process(es) x %d thread(s), "
        "memory budget %s; work directory %s",
        len(plan.pairs),
        wf.backend,
        " (sloppy)" if wf.sloppy else "",
        nprocs,
        omp,
        f"{plugin_args['memory_gb']:.1f} GB" if "memory_gb" in plugin_args else "nipype's",
        work_dir,
    )
    # nipype's scheduler runs gc.collect() around every job; the objects alive now (pybids and
    # TemplateFlow layouts: ~0.25 s per collection) are moved out of its way
    gc.collect()
    gc.freeze()
    error = None
    started = time.time()
    try:
        workflow.run(plugin=runner)
    except Exception as exc:  # noqa: BLE001 - nipype raises RuntimeError and others
        error = exc
    except BaseException as exc:  # noqa: BLE001 - signals.Interrupted: status, then out
        error = exc
    finally:
        gc.unfreeze()
        for callback in callbacks.callbacks:
            with contextlib.suppress(Exception):
                callback.close()
    status = pair_status(plan, output_dir, ex.run_uuid, error)
    mark_interrupted(status, error)
    write_status(status, output_dir, ex.run_uuid)
    _raise_fatal(error)  # interrupts (130/143/129), disk full (73), stuck scheduler (64)
    write_participant_reports(
        output_dir,
        sorted({p.subject for p in plan.pairs}),
        bids_dir=options.bids_dir,
        workflow=workflow,
        plan=plan,
        run_uuid=ex.run_uuid,
    )
    # refused pairs end the run with 65 (below); flagged ones finished and only warn
    failed = [s for s in status if s["status"] not in ("ok", "refused", "flagged")]
    LOGGER.info(
        "%s",
        run_summary(status, started=started, output_dir=output_dir, work_dir=work_dir),
    )
    for row in status:
        if row["status"] == "ok":
            LOGGER.info("%s: done", row["pair"])
        elif row["status"] == "flagged":
            LOGGER.warning("%s: done, flagged by quality control: %s", row["pair"], row["message"])
        else:
            LOGGER.error(
                "%s: %s%s%s",
                row["pair"],
                row["status"],
                f" in {row['node']}" if row["node"] else "",
                f" ({row['message']})" if row["message"] else "",
            )
    if failed:
        LOGGER.error(
            "%d of %d pair(s) failed; crash files under %s/sub-*/log/%s",
            len(failed),
            len(status),
            output_dir,
            ex.run_uuid,
        )
        return EXIT_FAILURE
    if error is not None:  # failed but no pair could be blamed: report it plainly
        LOGGER.error("the workflow did not finish: %s", error)
        return EXIT_FAILURE
    return EXIT_OK


def _guarded_runner(plugin: str, plugin_args: dict, plan):
    """The scheduler with the guards of :mod:`bids_siamfuse.engine` (stops, cancels, ends)."""
    from ..engine import GuardedLinear, GuardedMultiProc, branches

    tree = branches(plan, anat_name=anat_wf_name, pet_name=pet_wf_name, safe=safe_name)
    if plugin == "MultiProc":
        return GuardedMultiProc(plugin_args={**plugin_args, "branches": tree})
    linear_args = {"branches": tree}
    if "status_callback" in plugin_args:  # progress lines and the resource log (--low-mem etc.)
        linear_args["status_callback"] = plugin_args["status_callback"]
    return GuardedLinear(plugin_args=linear_args)


def _raise_fatal(error) -> None:
    """Errors that end the whole run (not one pair) leave run_participant as they are."""
    from ..errors import CannotWriteError

    if error is None:
        return
    if not isinstance(error, Exception) or isinstance(error, (CannotWriteError, UsageError)):
        raise error


def _route_nipype_logs() -> None:
    """nipype's messages through our handler (one format, stderr), at the configured level."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    nipype_logging.update_logging(nipype_config)
    names = ("nipype", "nipype.workflow", "nipype.interface", "nipype.utils", "nipype.filemanip")
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
