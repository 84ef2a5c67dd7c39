"""The participant report, ``OUT/sub-<label>.html`` (NiPreps style, one section per session).

Built only from what is on disk under ``OUT/sub-<label>/`` (and the raw dataset for the
summary), so it can be written after a crashed run (showing what finished and what failed) and
rebuilt with ``--reports-only``:

- summary: the input files, sessions, tracer, PET frames, and the status of every pair in the
  latest ``OUT/logs/participant-<run>.tsv`` (crash files named);
- the workflow's reportlets (``figures/``): segmentation, T1w->MNI, PET->T1w, PET on the grid,
  AAL outlines over the subject's GM;
- when a model bundle was applied: the class probabilities and the per-region relevance (MRI,
  PET, combined) on template slices, written as a reportlet (``figures/*_desc-relevance_stat.png``)
  and as a ranked table with the AAL names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..bids import is_output, output_glob, output_path, parse_entities, source_entities

LOGGER = logging.getLogger("bids_siamfuse.reports")

#: reportlets of a session, in report order: (output key of bids.OUTPUTS, title, caption)
REPORTLETS = (
    (
        "fig_seg",
        "Brain mask and tissue segmentation",
        "Outlines of the brain mask (red), white matter (blue) and grey matter (magenta) over "
        "the bias-corrected T1w.",
    ),
    (
        "fig_t1w2mni",
        "Spatial normalization of the T1w",
        "Hover to flicker between the ICBM152 2009a template and the T1w on the 1.5 mm MNI grid; "
        "the template brain outline is drawn on both.",
    ),
    (
        "fig_regions",
        "Region extraction (AAL116 over the subject's GM)",
        "The modulated grey-matter map on the MNI grid with the outlines of the 116 AAL regions "
        "that are cropped for the model.",
    ),
    (
        "fig_pet_coreg",
        "PET to T1w coregistration",
        "Hover to flicker between the T1w and the PET reference resampled into it; white-matter "
        "outline on both.",
    ),
    (
        "fig_pet_mni",
        "PET in MNI space",
        "The intensity-normalized PET on the MNI grid with the template brain outline (red).",
    ),
)


def _session_of(path: Path) -> str:
    return parse_entities(path.name).get("session", "")


def _tracer_of(name: str) -> str:
    return parse_entities(Path(name).name).get("tracer", "")


def latest_status(output_dir: Path, subject: str) -> tuple[list[dict], str]:
    """The subject's rows of the newest ``logs/participant-*.tsv`` and that file's name."""
    import pandas as pd

    logs = sorted(
        Path(output_dir, "logs").glob("participant-*.tsv"), key=lambda p: p.stat().st_mtime
    )
    for path in reversed(logs):
        try:
            table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        except (ValueError, OSError):
            continue
        rows = table[table.get("subject", pd.Series(dtype=str)) == subject]
        if len(rows):
            return rows.to_dict("records"), path.name
    return [], ""


def _raw_files(bids_dir: Path | None, subject: str, session: str) -> list[dict]:
    """The raw T1w and PET images of a session, with the PET frame count from its header."""
    if bids_dir is None:
        return []
    import nibabel as nb

    folder = Path(bids_dir) / f"sub-{subject}"
    if session:
        folder /= f"ses-{session}"
    out = []
    for datatype in ("anat", "pet"):
        for path in sorted((folder / datatype).glob("*.nii*")):
            if path.name.startswith("."):
                continue
            row = {"file": str(path.relative_to(bids_dir)), "datatype": datatype, "info": ""}
            try:
                shape = nb.load(str(path)).shape
                frames = shape[3] if len(shape) > 3 else 1
                row["info"] = "x".join(map(str, shape[:3])) + (
                    f", {frames} frame(s)" if datatype == "pet" else ""
                )
            except Exception as exc:  # noqa: BLE001 - a summary, never fatal
                row["info"] = f"unreadable header ({exc})"
            out.append(row)
    return out


def _relevance_reportlet(table, out_dir: Path, source: dict, background) -> Path:
    """Relevance (combined, MRI, PET) on template slices, saved as a figures derivative."""
    import uuid

    from ..bids import save_output
    from ..data.templates import GRID_AFFINE
    from . import figures
    from .group import _paint

    rows = [
        (label, _paint(table[key].to_numpy()))
        for key, label in (("combined", "combined"), ("mri", "MRI"), ("pet", "PET"))
        if key in table
    ]
    png = figures.region_rows(
        background,
        rows,
        GRID_AFFINE,
        title="Region relevance of this session's prediction",
        cmap="hot",
        unit="fraction of the session's relevance",
        n=8,
    )
    tmp = Path(out_dir) / f".relevance-{uuid.uuid4().hex[:8]}.png"
    tmp.write_bytes(png)
    try:
        return save_output(out_dir, "fig_relevance", tmp, source=source)
    finally:
        tmp.unlink(missing_ok=True)


def _model_section(pet_dir: Path, output_dir: Path, background) -> list[dict]:
    """One entry per applied model output (``model_probs``) in ``pet_dir``."""
    import pandas as pd

    from . import figures
    from .html import png_uri

    out = []
    for probs_path in sorted(pet_dir.glob(output_glob("model_probs"))):
        source = source_entities(probs_path.name)
        entry = {"prefix": probs_path.name[: -len(output_glob("model_probs")) + 1]}
        try:
            probs = pd.read_csv(probs_path, sep="\t")
            classes = [c.removeprefix("prob_") for c in probs.columns if c.startswith("prob_")]
            values = [float(probs.iloc[0][f"prob_{c}"]) for c in classes]
            predicted = str(
                probs.iloc[0].get(
                    "predicted", classes[int(max(range(len(values)), key=values.__getitem__))]
                )
            )
            entry.update(classes=list(zip(classes, values)), predicted=predicted)
            entry["probs_uri"] = png_uri(figures.probability_figure(classes, values, predicted))
            sidecar = probs_path.with_suffix(".json")
            if sidecar.is_file():
                meta = json.loads(sidecar.read_text())
                model = meta.get("Model", {}) or {}
                entry["model"] = {
                    "bundle": model.get("Bundle"),
                    "sha": (model.get("WeightsSHA256") or "")[:12],
                    "ba": (model.get("CrossValidatedBalancedAccuracy") or {}).get("mean"),
                }
        except Exception as exc:  # noqa: BLE001 - show what is broken, keep the report
            entry["error"] = f"{probs_path.name}: {exc}"
        rel_path = pet_dir / output_path(".", "model_relevance", source).name
        if rel_path.is_file():
            try:
                table = pd.read_csv(rel_path, sep="\t", na_values=["n/a"])
                ranked = table.sort_values("combined", ascending=False).head(15)
                entry["ranked"] = [
                    {"rank": i + 1, **row}
                    for i, (_, row) in enumerate(
                        ranked[["index", "name", "combined", "mri", "pet"]].iterrows()
                    )
                ]
                figure = _relevance_reportlet(table, output_dir, source, background)
                entry["relevance_figure"] = str(figure.relative_to(output_dir))
                entry["relevance_uri"] = png_uri(figure.read_bytes())
            except Exception as exc:  # noqa: BLE001
                entry["error"] = f"{rel_path.name}: {exc}"
        else:
            entry.setdefault("error", f"{rel_path.name} missing")
        out.append(entry)
    return out


def _qc_section(pet_dir: Path) -> list[dict]:
    """The session's QC tables (``*_desc-qc_stats.tsv``) and, for dynamic PET, its motion."""
    import pandas as pd

    from ..preproc.qc import THRESHOLDS
    from .html import png_uri

    out = []
    for path in sorted(pet_dir.glob(output_glob("qc"))):
        entry = {"file": path.name, "rows": []}
        try:
            table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
            for _, row in table.iterrows():
                lo, hi = row.get("lower", "n/a"), row.get("upper", "n/a")
                if lo in ("", "n/a") and hi in ("", "n/a"):
                    rng = ""
                elif lo in ("", "n/a"):
                    rng = f"<= {hi}"
                elif hi in ("", "n/a"):
                    rng = f">= {lo}"
                else:
                    rng = f"{lo} - {hi}"
                unit = row.get("unit", "")
                value = row.get("value", "")
                try:
                    value = f"{float(value):.4g}"
                except ValueError:
                    pass
                entry["rows"].append(
                    {
                        **row.to_dict(),
                        "value": value,
                        "range": f"{rng} {unit}".strip() if rng else "",
                    }
                )
        except Exception as exc:  # noqa: BLE001 - show what is broken, keep the report
            entry["error"] = f"{path.name}: {exc}"
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            entry["warnings"] = list(meta.get("Warnings", []) or [])
        except (OSError, ValueError):
            entry["warnings"] = []
        # the same PET source entities as the QC table
        motion = pet_dir / output_path(".", "pet_confounds", source_entities(path.name)).name
        if motion.is_file():
            try:
                table = pd.read_csv(motion, sep="\t", na_values=["n/a"])
                if len(table) > 1:
                    from .figures import motion_figure

                    limit = THRESHOLDS["pet_fd_max_mm"].upper
                    entry["motion_uri"] = png_uri(motion_figure(table, fd_limit=limit))
                    entry["fd_limit"] = limit
            except Exception as exc:  # noqa: BLE001
                entry["error"] = f"{motion.name}: {exc}"
        out.append(entry)
    return out


def subject_sections(output_dir: Path, subject: str, *, bids_dir=None, background=None):
    """Per session: raw files, reportlets found, model outputs."""
    from .html import inline_svg

    output_dir = Path(output_dir)
    sub_dir = output_dir / f"sub-{subject}"
    figures = sorted((sub_dir / "figures").glob("*.svg")) if sub_dir.is_dir() else []
    sessions = sorted({_session_of(p) for p in figures})
    ses_dirs = sorted(p.name[4:] for p in sub_dir.glob("ses-*") if p.is_dir())
    raw_sessions = []
    if bids_dir is not None:
        raw_sessions = sorted(
            p.name[4:] for p in (Path(bids_dir) / f"sub-{subject}").glob("ses-*") if p.is_dir()
        )
    sessions = sorted(set(sessions) | set(ses_dirs) | set(raw_sessions)) or [""]
    out = []
    for session in sessions:
        section = {"session": session, "reportlets": [], "missing": [], "model": []}
        section["raw"] = _raw_files(bids_dir, subject, session)
        mine = [p for p in figures if _session_of(p) == session]
        for key, title, caption in REPORTLETS:
            found = [p for p in mine if is_output(p.name, key)]
            if not found:
                section["missing"].append(title)
            for path in found:
                item = {"title": title, "caption": caption, "file": path.name}
                try:
                    item["svg"] = inline_svg(path)
                except (OSError, ValueError) as exc:
                    item["error"] = str(exc)
                if _tracer_of(path.name):
                    item["title"] += f" (tracer {_tracer_of(path.name)})"
                section["reportlets"].append(item)
        pet_dir = sub_dir / (f"ses-{session}" if session else "") / "pet"
        tracers = sorted({_tracer_of(p.name) for p in pet_dir.glob("*.nii.gz")} - {""})
        section["tracers"] = tracers or sorted(
            {_tracer_of(r["file"]) for r in section["raw"]} - {""}
        )
        section["qc"] = _qc_section(pet_dir) if pet_dir.is_dir() else []
        if pet_dir.is_dir():
            if background is None and any(pet_dir.glob(output_glob("model_probs"))):
                from ..preproc.qc import template_on_grid

                background = template_on_grid("T1w")
            section["model"] = _model_section(pet_dir, output_dir, background)
        section["derivatives"] = sorted(
            str(p.relative_to(output_dir))
            for p in (sub_dir / (f"ses-{session}" if session else "")).glob("*/*")
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".json")
        )
        out.append(section)
    return out


def build_participant_report(
    output_dir: Path, subject: str, *, bids_dir: Path | None = None, background=None
) -> Path:
    """Write ``OUT/sub-<subject>.html``; returns its path."""
    from .html import render, write_html

    output_dir = Path(output_dir)
    subject = subject.removeprefix("sub-")
    sections = subject_sections(output_dir, subject, bids_dir=bids_dir, background=background)
    status, status_file = latest_status(output_dir, subject)
    crashes = sorted(
        str(p.relative_to(output_dir))
        for p in (output_dir / f"sub-{subject}" / "log").glob("*/crash-*")
    )
    html = render(
        "report_participant.html.j2",
        subject=subject,
        sessions=sections,
        status=status,
        status_file=status_file,
        crashes=crashes,
        failed=[r for r in status if r.get("status") not in ("ok", "flagged")],
        flagged=[r for r in status if r.get("status") == "flagged"],
    )
    path = write_html(output_dir / f"sub-{subject}.html", html)
    LOGGER.info("participant report: %s", path)
    return path


def find_subjects(output_dir: Path, participant_label=None) -> list[str]:
    subjects = sorted(p.name[4:] for p in Path(output_dir).glob("sub-*") if p.is_dir())
    if participant_label:
        wanted = {s.removeprefix("sub-") for s in participant_label}
        subjects = [s for s in subjects if s in wanted]
    return subjects


def build_participant_reports(
    output_dir: Path, subjects=None, *, bids_dir: Path | None = None
) -> list[Path]:
    """Reports of ``subjects`` (default: every ``sub-*`` folder); a failure is logged, skipped."""
    subjects = list(subjects) if subjects else find_subjects(output_dir)
    written = []
    for subject in subjects:
        try:
            written.append(build_participant_report(output_dir, subject, bids_dir=bids_dir))
        except Exception as exc:  # noqa: BLE001 - one broken report must not hide the others
            LOGGER.error("sub-%s: report not written (%s: %s)", subject, type(exc).__name__, exc)
    return written
