"""What a participant run leaves behind: per-pair status (crash files parsed, QC flags) in
``OUT/logs/participant-<run_uuid>.tsv``, the methods text and the HTML reports."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..atomic import write_text
from ..workflows.common import anat_wf_name, pet_wf_name

LOGGER = logging.getLogger("bids_siamfuse.participant")


def mark_interrupted(status: list[dict], error) -> None:
    """Pairs left unfinished by an interrupt say so in the status table."""
    if error is None or isinstance(error, Exception):
        return
    for row in status:
        if row["status"] == "incomplete":
            row["status"], row["message"] = "interrupted", str(error) or type(error).__name__


def write_participant_reports(
    output_dir: Path, subjects, *, bids_dir=None, workflow=None, plan=None, run_uuid=""
):
    """Methods boilerplate (from ``workflow``) and ``OUT/sub-<label>.html`` per subject.

    ``logs/CITATION.md`` describes the whole dataset (counts from the derivatives on disk, the
    methods of the workflows, which name no file); this run's files go to
    ``logs/participant-<run_uuid>_methods.md``. Runs after every run, crashed or not (the
    reports show what finished); never fatal.
    """
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
                write_text(path, run_details(plan, run_uuid) + "\n" + text)
        except Exception as exc:  # noqa: BLE001 - reports never change the exit code
            LOGGER.warning("methods boilerplate not written: %s", exc)
    return build_participant_reports(output_dir, subjects, bids_dir=bids_dir)


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
        anat = anat_wf_name(pair.subject, pair.t1w_session)
        pet = pet_wf_name(pair)
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


def write_status(rows: list[dict], output_dir: Path, run_uuid: str) -> None:
    import pandas as pd

    from ..bids import save_table

    try:
        save_table(Path(output_dir) / "logs" / f"participant-{run_uuid}.tsv", pd.DataFrame(rows))
    except Exception as exc:  # noqa: BLE001 - the summary is a convenience, never fatal
        LOGGER.warning("could not write the participant summary: %s", exc)
