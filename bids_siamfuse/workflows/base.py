"""The participant level: one nipype workflow over every selected subject, run and reported.

:func:`run_participant` builds :func:`init_bids_siamfuse_wf` (a
:func:`init_single_subject_wf` per subject: one anatomical workflow per unique T1w, one PET
workflow per PET/T1w pair), runs it with nipype (MultiProc over ``--nprocs``, threads per ANTs
node from ``--omp-nthreads``, the work directory caching finished nodes so a rerun resumes), and
reports per pair whether it completed. A failing subject does not stop the others (unless
``--stop-on-first-crash``); nipype's crash files go to ``OUT/sub-<label>/log/<run_uuid>/``, a
summary table to ``OUT/logs/participant-<run_uuid>.tsv``, and the exit code is 1 when any pair
failed. A pair that completed but whose quality metrics fall outside their reference ranges
(``preproc/qc.py``) is ``flagged`` there, with the reasons; that does not fail the run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from pathlib import Path

from nipype.interfaces import utility as niu  # noqa: F401 - re-exported for builders
from nipype.pipeline import engine as pe  # noqa: F401
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .. import __version__
from ..errors import EXIT_FAILURE, EXIT_OK, UsageError
from ..progress import Callbacks, Progress, ResourceLog, pair_groups, run_summary

LOGGER = logging.getLogger("bids_siamfuse.participant")


def _safe(text: str) -> str:
    """A nipype-safe node name fragment."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_")


def _anat_name(subject: str, session: str | None) -> str:
    return f"anat_{_safe(session)}_wf" if session else "anat_wf"


def _pet_name(pair) -> str:
    key = pair.key.removeprefix(f"sub-{pair.subject}").strip("_")
    return f"pet_{_safe(key)}_wf"


def init_single_subject_wf(
    *,
    subject: str,
    pairs: list,
    output_dir: Path,
    bids_dir: Path | None,
    backend: str = "ants",
    sloppy: bool = False,
    pet_ref_region: str = "none",
    omp_nthreads: int = 1,
    seed: int = 42,
    spm=None,
    model: Path | None = None,
    device: str = "cpu",
    reports: bool = True,
    external: dict | None = None,
    name: str | None = None,
):
    """All the processing of one subject: its T1w(s) and every PET paired with them.

    Workflow graph::

        anat_<ses>_wf (one per unique T1w) --+--> pet_<ses>_trc_<tracer>_wf (one per pair)
                                             +--> pet_...  (pairs sharing the T1w)

    ``pairs``: the subject's :class:`~bids_siamfuse.bids.SessionPair` objects.
    ``external``: pair key -> :class:`~bids_siamfuse.external.ExternalPair` (``-d``); those
    pairs get :func:`~bids_siamfuse.workflows.external.init_external_pair_wf` instead.
    """
    from .anatomical import init_anat_preproc_wf
    from .pet import init_pet_preproc_wf

    workflow = Workflow(name=name or f"single_subject_{_safe(subject)}_wf")
    workflow.__desc__ = f"""\
Results included in this manuscript come from preprocessing performed using *bids_siamfuse*
{__version__}, which is based on Nipype [@nipype1] and NiWorkflows. Each T1w image was
processed once, and every PET series of the selected tracer was paired with the T1w of its own
session or, without one, of the nearest session in time.
"""
    anat_wfs = OrderedDict()
    for pair in pairs:
        # --- bring your own preprocessing (-d/--derivatives): regions from existing maps ---
        if external and pair.key in external:
            from .external import init_external_pair_wf

            workflow.add_nodes(
                [
                    init_external_pair_wf(
                        pair=pair,
                        maps=external[pair.key],
                        output_dir=output_dir,
                        pet_ref_region=pet_ref_region,
                        model=model,
                        device=device,
                        reports=reports,
                        name=_pet_name(pair),
                    )
                ]
            )
            continue
        # --- end -d ---
        t1w = str(pair.t1w)
        if t1w not in anat_wfs:
            anat_wfs[t1w] = init_anat_preproc_wf(
                t1w=pair.t1w,
                source={"subject": pair.subject, "session": pair.t1w_session},
                output_dir=output_dir,
                bids_dir=bids_dir,
                backend=backend,
                sloppy=sloppy,
                omp_nthreads=omp_nthreads,
                seed=seed,
                spm=spm,
                reports=reports,
                name=_anat_name(pair.subject, pair.t1w_session),
            )
        anat_wf = anat_wfs[t1w]
        pet_wf = init_pet_preproc_wf(
            pet=pair.pet,
            pet_meta=pair.pet_meta,
            source=pair.source_entities,
            anat_source={"subject": pair.subject, "session": pair.t1w_session},
            t1w=pair.t1w,
            output_dir=output_dir,
            bids_dir=bids_dir,
            backend=backend,
            sloppy=sloppy,
            pet_ref_region=pet_ref_region,
            omp_nthreads=omp_nthreads,
            seed=seed,
            spm=spm,
            model=model,
            device=device,
            reports=reports,
            name=_pet_name(pair),
        )
        fields = ["t1w_preproc", "brain_mask", "wm", "gm_mni_modulated"]
        if backend == "ants":
            fields += ["positions", "anat_qc", "gm_mni"]
        else:
            fields += ["spm_deformation"]
        workflow.connect(
            [(anat_wf, pet_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fields])]
        )
    return workflow


def init_bids_siamfuse_wf(
    *,
    plan,
    output_dir: Path,
    work_dir: Path,
    bids_dir: Path | None,
    run_uuid: str,
    backend: str = "ants",
    sloppy: bool = False,
    pet_ref_region: str = "none",
    omp_nthreads: int = 1,
    seed: int = 42,
    spm=None,
    model: Path | None = None,
    device: str = "cpu",
    reports: bool = True,
    external: dict | None = None,
    name: str = "bids_siamfuse_wf",
):
    """The participant workflow of every subject in ``plan`` (a :class:`bids.Plan`).

    Each subject's workflow gets its own crash-file folder, ``OUT/sub-<label>/log/<run_uuid>``
    (fMRIPrep's layout), so failures can be traced to the subject and session.
    """
    workflow = Workflow(name=name)
    workflow.base_dir = str(work_dir)
    by_subject = OrderedDict()
    for pair in plan.pairs:
        by_subject.setdefault(pair.subject, []).append(pair)
    for subject, pairs in by_subject.items():
        single = init_single_subject_wf(
            subject=subject,
            pairs=pairs,
            output_dir=output_dir,
            bids_dir=bids_dir,
            backend=backend,
            sloppy=sloppy,
            pet_ref_region=pet_ref_region,
            omp_nthreads=omp_nthreads,
            seed=seed,
            spm=spm,
            model=model,
            device=device,
            reports=reports,
            external=external,
        )
        crash_dir = Path(output_dir) / f"sub-{subject}" / "log" / run_uuid
        single.config["execution"]["crashdump_dir"] = str(crash_dir)
        for node in single._get_all_nodes():
            node.config = node.config or {}
            node.config.setdefault("execution", {})["crashdump_dir"] = str(crash_dir)
        workflow.add_nodes([single])
    return workflow


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def _threads(ex) -> tuple[int, int]:
    nprocs = ex.nprocs or os.cpu_count() or 1
    omp = ex.omp_nthreads or min(8, nprocs)
    if omp > nprocs:
        LOGGER.warning("--omp-nthreads %d exceeds --nprocs %d; using %d", omp, nprocs, nprocs)
        omp = nprocs
    return nprocs, omp


def resolve_threads(ex) -> tuple[int, int]:
    """Fill ``--nprocs``/``--omp-nthreads`` with the values the run will use (0 = default)."""
    ex.nprocs, ex.omp_nthreads = _threads(ex)
    return ex.nprocs, ex.omp_nthreads


def _device(name: str) -> str:
    if name != "auto":
        return name
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def run_participant(settings, plan) -> int:
    """Build, run and report the participant workflow; returns the exit code (0 or 1)."""
    from nipype import config as nipype_config

    from ..preproc.registration import set_threads

    ex, wf = settings.execution, settings.workflow
    if wf.backend not in ("ants", "spm"):
        raise UsageError(f"unknown --backend {wf.backend!r}")
    nprocs, omp = _threads(ex)
    set_threads(omp)  # inherited by the worker processes; each ANTs node also sets it
    spm = None
    if wf.backend == "spm":
        from ..preproc.spm import find_spm

        spm = find_spm(wf.spm_cmd)  # NoInputError (exit 66) when SPM12 is not installed
        spm.configure()
    output_dir = Path(ex.output_dir).absolute()
    work_dir = Path(ex.work_dir).absolute()
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
    from ..engine import quiet_node_crashes

    quiet_node_crashes(ex.verbosity)  # tracebacks to the crash files, not the terminal
    workflow = init_bids_siamfuse_wf(
        plan=plan,
        output_dir=output_dir,
        work_dir=work_dir,
        bids_dir=Path(ex.bids_dir).absolute() if ex.bids_dir else None,
        run_uuid=ex.run_uuid,
        backend=wf.backend,
        sloppy=wf.sloppy,
        pet_ref_region=wf.pet_ref_region,
        omp_nthreads=omp,
        seed=ex.random_seed,
        spm=spm,
        model=wf.model,
        device=_device(ex.device),
        external=getattr(plan, "external", None),  # -d/--derivatives
    )
    workflow.config["execution"].update(
        {
            "crashfile_format": "txt",
            "stop_on_first_crash": bool(ex.stop_on_first_crash),
            "remove_unnecessary_outputs": False,
        }
    )
    plugin_args = {"n_procs": nprocs, "raise_insufficient": False}
    if ex.mem_mb:
        plugin_args["memory_gb"] = ex.mem_mb / 1024.0
    plugin = "MultiProc" if nprocs > 1 else "Linear"
    plugin_args.update(low_mem_args(ex, workflow))
    if ex.write_graph:
        write_workflow_graph(workflow, output_dir / "logs", ex.run_uuid)
    callbacks = run_callbacks(ex, workflow, plan, output_dir)
    plugin_args["status_callback"] = callbacks
    runner = _guarded_runner(plugin, plugin_args, plan)  # see bids_siamfuse/engine.py
    LOGGER.info(
        "participant workflow: %d pair(s), backend %s%s, %d process(es) x %d thread(s); "
        "work directory %s",
        len(plan.pairs),
        wf.backend,
        " (sloppy)" if wf.sloppy else "",
        nprocs,
        omp,
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
    _mark_interrupted(status, error)
    _write_status(status, output_dir, ex.run_uuid)
    _raise_fatal(error)  # interrupts (130/143/129), disk full (73), stuck scheduler (64)
    write_participant_reports(
        output_dir,
        sorted({p.subject for p in plan.pairs}),
        bids_dir=Path(ex.bids_dir).absolute() if ex.bids_dir else None,
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

    tree = branches(plan, anat_name=_anat_name, pet_name=_pet_name, safe=_safe)
    if plugin == "MultiProc":
        return GuardedMultiProc(plugin_args={**plugin_args, "branches": tree})
    linear_args = {"branches": tree}
    if "status_callback" in plugin_args:  # progress lines and the resource log (--low-mem etc.)
        linear_args["status_callback"] = plugin_args["status_callback"]
    return GuardedLinear(plugin_args=linear_args)


def _mark_interrupted(status: list[dict], error) -> None:
    """Pairs left unfinished by an interrupt say so in the status table."""
    if error is None or isinstance(error, Exception):
        return
    for row in status:
        if row["status"] == "incomplete":
            row["status"], row["message"] = "interrupted", str(error) or type(error).__name__


def _raise_fatal(error) -> None:
    """Errors that end the whole run (not one pair) leave run_participant as they are."""
    from ..errors import CannotWriteError

    if error is None:
        return
    if not isinstance(error, Exception) or isinstance(error, (CannotWriteError, UsageError)):
        raise error


# ----------------------------------------------------------------------------------------------
# NiPreps flags: --low-mem, --write-graph, --resource-monitor, --boilerplate-only,
# --clean-workdir (see cli/parser.py for what each promises)
# ----------------------------------------------------------------------------------------------

#: --low-mem: memory for light steps beside the heaviest one (GB)
LOW_MEM_MARGIN_GB = 0.5


def low_mem_args(ex, workflow) -> dict:
    """MultiProc arguments for ``--low-mem``: a memory budget of the heaviest step's estimate
    plus :data:`LOW_MEM_MARGIN_GB` (below ``--mem-mb`` when given), so the heavy steps
    (registration, segmentation: 1.5-3 GB declared) run one at a time; {} without the flag."""
    if not ex.low_mem:
        return {}
    heaviest = max((float(n.mem_gb) for n in workflow._get_all_nodes()), default=1.0)
    budget = heaviest + LOW_MEM_MARGIN_GB
    if ex.mem_mb:
        budget = min(budget, ex.mem_mb / 1024.0)
    return {"memory_gb": budget}


def write_workflow_graph(workflow, logs_dir: Path, run_uuid: str) -> list[Path]:
    """``--write-graph``: ``logs/workflow-<run>.dot`` (and ``.svg`` when Graphviz' ``dot`` is
    installed); never fatal."""
    import networkx as nx

    logs_dir = Path(logs_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)
    dot = logs_dir / f"workflow-{run_uuid}.dot"
    written = []
    try:
        graph = workflow._create_flat_graph()
        lines = ["digraph bids_siamfuse_wf {", "  rankdir=LR;"]
        names = {node: f"{node._hierarchy}.{node.name}" for node in graph.nodes()}
        lines += [f'  "{names[node]}";' for node in nx.topological_sort(graph)]
        lines += [f'  "{names[a]}" -> "{names[b]}";' for a, b in graph.edges()]
        lines.append("}")
        from ..bids import atomic_path

        with atomic_path(dot) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        written.append(dot)
        if shutil.which("dot"):
            import subprocess

            svg = dot.with_suffix(".svg")
            subprocess.run(["dot", "-Tsvg", str(dot), "-o", str(svg)], check=True, timeout=300)
            written.append(svg)
    except Exception as exc:  # noqa: BLE001 - the graph is a convenience
        LOGGER.warning("workflow graph not written: %s", exc)
    for path in written:
        LOGGER.info("workflow graph: %s", path)
    return written


def run_callbacks(ex, workflow, plan, output_dir: Path) -> Callbacks:
    """The status callbacks of a run: progress lines, and the resource log when asked."""
    groups = pair_groups(
        workflow,
        plan,
        subject_name=lambda s: f"single_subject_{_safe(s)}_wf",
        anat_name=_anat_name,
        pet_name=_pet_name,
    )
    progress = Progress(groups) if ex.verbosity >= 0 else None
    resources = None
    if ex.resource_monitor:
        path = Path(output_dir) / "logs" / f"resources-{ex.run_uuid}.jsonl"
        resources = ResourceLog(path)
        LOGGER.info("resource monitor: one line per step in %s", path)
    return Callbacks(progress, resources)


def write_boilerplate(settings, plan) -> int:
    """``--boilerplate-only``: build the participant workflow the flags describe and write its
    methods text to ``OUT/logs/CITATION.md`` (and ``.html``); nothing runs."""
    from ..reports.boilerplate import participant_text, write_citation

    ex, wf = settings.execution, settings.workflow
    spm = None
    if wf.backend == "spm":
        from ..preproc.spm import find_spm

        spm = find_spm(wf.spm_cmd)
    output_dir = Path(ex.output_dir).absolute()
    workflow = init_bids_siamfuse_wf(
        plan=plan,
        output_dir=output_dir,
        work_dir=Path(ex.work_dir or output_dir / "logs").absolute(),
        bids_dir=Path(ex.bids_dir).absolute() if ex.bids_dir else None,
        run_uuid=ex.run_uuid,
        backend=wf.backend,
        sloppy=wf.sloppy,
        pet_ref_region=wf.pet_ref_region,
        omp_nthreads=_threads(ex)[1],
        seed=ex.random_seed,
        spm=spm,
        model=wf.model,
        device="cpu",
    )
    paths = write_citation(output_dir / "logs", "participant", participant_text(workflow))
    LOGGER.info("methods text written to %s", ", ".join(str(p) for p in paths))
    return EXIT_OK


def clean_work_dir(work_dir: Path, plan) -> list[Path]:
    """``--clean-workdir`` after a successful run: remove this run's subject folders from the
    work directory (other array tasks' folders stay), then the folders left empty."""
    work_dir = Path(work_dir)
    top = work_dir / "bids_siamfuse_wf"
    removed = []
    for subject in sorted({p.subject for p in plan.pairs}):
        folder = top / f"single_subject_{_safe(subject)}_wf"
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    # nipype's own files at the top (d3.js, graph*.json, index.html) go with the last subject
    with contextlib.suppress(OSError):
        if top.is_dir() and not any(p.is_dir() for p in top.iterdir()):
            shutil.rmtree(top)
            removed.append(top)
    with contextlib.suppress(OSError):
        work_dir.rmdir()  # only when empty: another task's or the user's files stay
        removed.append(work_dir)
    LOGGER.info("--clean-workdir: removed %s", ", ".join(str(p) for p in removed) or "nothing")
    return removed


def write_participant_reports(
    output_dir: Path, subjects, *, bids_dir=None, workflow=None, plan=None, run_uuid=""
):
    """Methods boilerplate (from ``workflow``) and ``OUT/sub-<label>.html`` per subject.

    ``logs/CITATION.md`` describes the whole dataset (counts from the derivatives on disk, the
    methods of the workflows, which name no file); this run's files go to
    ``logs/participant-<run_uuid>_methods.md``. Runs after every run, crashed or not (the
    reports show what finished); never fatal.
    """
    from ..bids import atomic_path
    from ..reports.boilerplate import dataset_text, participant_text, run_details, write_citation
    from ..reports.participant import build_participant_reports

    if workflow is not None:
        try:
            text = participant_text(workflow)
            summary = dataset_text(output_dir)
            write_citation(
                Path(output_dir) / "logs", "participant", (summary + "\n" + text).lstrip()
            )
            if plan is not None and run_uuid:
                path = Path(output_dir) / "logs" / f"participant-{run_uuid}_methods.md"
                with atomic_path(path) as tmp:
                    tmp.write_text(run_details(plan, run_uuid) + "\n" + text, encoding="utf-8")
        except Exception as exc:  # noqa: BLE001 - reports never change the exit code
            LOGGER.warning("methods boilerplate not written: %s", exc)
    return build_participant_reports(output_dir, subjects, bids_dir=bids_dir)


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


def _crash_records(output_dir: Path, subject: str, run_uuid: str) -> list[dict]:
    folder = Path(output_dir) / f"sub-{subject}" / "log" / run_uuid
    records = []
    for path in sorted(folder.glob("crash-*")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        node = re.search(r"^Node: (.+)$", text, re.M)
        workdir = re.search(r"^Working directory: (.+)$", text, re.M)
        lines = [line for line in text.strip().splitlines() if line.strip()]
        message = lines[-1].strip() if lines else ""
        records.append(
            {
                "file": str(path),
                "node": node.group(1).strip() if node else "",
                "workdir": workdir.group(1).strip() if workdir else "",
                "message": message[:300],
            }
        )
    return records


def pair_status(plan, output_dir: Path, run_uuid: str, error) -> list[dict]:
    """Per pair: ok, failed (a node of its anatomical or PET workflow crashed) or incomplete."""
    from ..bids import output_path

    rows = []
    crashes = {p.subject: _crash_records(output_dir, p.subject, run_uuid) for p in plan.pairs}
    for pair in plan.pairs:
        anat = _anat_name(pair.subject, pair.t1w_session)
        pet = _pet_name(pair)
        blame = None
        for rec in crashes[pair.subject]:
            where = rec["workdir"] + " " + rec["node"]
            if re.search(rf"(^|[/.\s]){re.escape(pet)}([/.\s]|$)", where) or re.search(
                rf"(^|[/.\s]){re.escape(anat)}([/.\s]|$)", where
            ):
                blame = rec
                break
        region = output_path(output_dir, "regions", pair.source_entities)
        if blame is not None:
            status, node, message, crash = "failed", blame["node"], blame["message"], blame["file"]
        elif error is not None and not region.is_file():
            status, node, message, crash = "incomplete", "", str(error).splitlines()[0], ""
        elif not region.is_file():
            status, node, message, crash = "incomplete", "", "no region file written", ""
        else:
            status, node, message, crash = "ok", "", "", ""
        qc_state = _qc_state(output_dir, pair) if status == "ok" else None
        if qc_state is not None and qc_state[0]:
            status, message = "flagged", "; ".join(qc_state[1])
        rows.append(
            {
                "pair": pair.key,
                "subject": pair.subject,
                "session": pair.session or "",
                "t1w_session": pair.t1w_session or "",
                "status": status,
                "node": node,
                "message": message,
                "crash_file": crash,
                "qc": "n/a" if qc_state is None else ("flagged" if qc_state[0] else "pass"),
            }
        )
    # --- pairs refused before the run (e.g. incomplete -d/--derivatives maps): exit 65 ---
    for pair, why in getattr(plan, "invalid", []):
        rows.append(
            {
                "pair": pair.key,
                "subject": pair.subject,
                "session": pair.session or "",
                "t1w_session": pair.t1w_session or "",
                "status": "refused",
                "node": "",
                "message": why[:300],
                "crash_file": "",
                "qc": "n/a",
            }
        )
    return rows


def _qc_state(output_dir: Path, pair):
    """(flagged, reasons) from the session's QC table (``preproc/qc.py``); None without one.

    A flagged session completed: its derivatives exist, the run's exit code stays 0, the
    group level leaves it out unless ``--include-flagged``.
    """
    from ..preproc.qc import qc_path, read_qc

    return read_qc(qc_path(output_dir, pair.source_entities))


def _write_status(rows: list[dict], output_dir: Path, run_uuid: str) -> None:
    import pandas as pd

    from ..bids import save_table

    try:
        save_table(Path(output_dir) / "logs" / f"participant-{run_uuid}.tsv", pd.DataFrame(rows))
    except Exception as exc:  # noqa: BLE001 - the summary is a convenience, never fatal
        LOGGER.warning("could not write the participant summary: %s", exc)
