"""The NiPreps flags of a participant run: ``--low-mem``, ``--write-graph``,
``--resource-monitor``, ``--boilerplate-only``, ``--clean-workdir`` (``cli/parser.py`` says
what each promises)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from ..atomic import write_text
from ..errors import EXIT_OK
from ..progress import Callbacks, Progress, ResourceLog, pair_groups
from ..workflows.base import init_bids_siamfuse_wf
from ..workflows.common import ParticipantOptions, anat_wf_name, pet_wf_name, subject_wf_name

LOGGER = logging.getLogger("bids_siamfuse.participant")

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
        write_text(dot, "\n".join(lines) + "\n")
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
        subject_name=subject_wf_name,
        anat_name=anat_wf_name,
        pet_name=pet_wf_name,
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
    # the methods text depends on no thread count or device: the resolved ones, or 1 / cpu
    options = ParticipantOptions.from_settings(
        settings, omp_nthreads=ex.omp_nthreads or 1, device="cpu", spm=spm
    )
    output_dir = options.output_dir
    workflow = init_bids_siamfuse_wf(
        plan=plan,
        options=options,
        work_dir=Path(ex.work_dir or output_dir / "logs").absolute(),
        run_uuid=ex.run_uuid,
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
        folder = top / subject_wf_name(subject)
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
