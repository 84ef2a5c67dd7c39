"""Methods boilerplate: ``OUT/logs/CITATION.md`` and ``CITATION.html``.

The participant level contributes its workflows' ``__desc__`` paragraphs (niworkflows'
``LiterateWorkflow.visit_desc``), the group level a paragraph written from the task's
``summary.json``. Both parts are kept in ``OUT/logs/CITATION.json`` so either level can rewrite
its own part without losing the other's; the Markdown and HTML files are rendered from it, with a
reference list: every ``[@key]`` cited in the text plus the references always owed (the method
paper, Nipype, nilearn, AAL, PyTorch), from ``data/preproc.bib`` and ``data/reports.bib``.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from .html import DATA_DIR

ALWAYS = ("arco", "nipype1", "nilearn", "aal", "pytorch")
PARTS = ("participant", "group")
_CITE = re.compile(r"\[(@[^\]]+)\]")
_NUMBER = re.compile(r"^\d+\. ")


def read_bib(paths=None) -> dict[str, dict]:
    """BibTeX entries (key -> fields, plus ``_type``) of the package's .bib files."""
    paths = paths or [DATA_DIR / "preproc.bib", DATA_DIR / "reports.bib"]
    entries = {}
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        for match in re.finditer(r"@(\w+)\s*\{\s*([^,\s]+)\s*,(.*?)\n\}", text, re.S):
            kind, key, body = match.groups()
            fields = {"_type": kind.lower()}
            for field in re.finditer(r"(\w+)\s*=\s*\{((?:[^{}]|\{[^{}]*\})*)\}", body):
                fields[field.group(1).lower()] = field.group(2)
            entries[key] = fields
    return entries


def _plain(text: str) -> str:
    """BibTeX text without braces and accents commands (``{\\'e}`` -> ``é``)."""
    accents = {"'": "\u0301", '"': "\u0308", "`": "\u0300", "^": "\u0302", "~": "\u0303"}

    def accent(m):
        import unicodedata

        return unicodedata.normalize("NFC", m.group(2) + accents[m.group(1)])

    text = re.sub(r"\{?\\(['\"`^~])\{?(\w)\}?\}?", accent, text)
    return re.sub(r"\s+", " ", text.replace("{", "").replace("}", "")).strip()


def format_reference(entry: dict) -> str:
    authors = [_plain(a) for a in entry.get("author", "").split(" and ") if a.strip()]
    who = ", ".join(authors[:6]) + (", et al." if len(authors) > 6 else "")
    where = _plain(entry.get("journal") or entry.get("booktitle") or entry.get("publisher", ""))
    parts = [f"{who} ({entry.get('year', 'n.d.')}).", _plain(entry.get("title", "")) + "."]
    if where:
        vol = entry.get("volume", "")
        num = f"({entry['number']})" if entry.get("number") else ""
        pages = _plain(entry.get("pages", "")).replace("--", "-")
        if vol:
            where_text = f"*{where}* {vol}{num}" + (f":{pages}" if pages else "")
        else:
            where_text = f"*{where}*" + (f", pp. {pages}" if pages else "")
        parts.append(where_text + ".")
    if entry.get("doi"):
        parts.append(f"doi:{entry['doi']}")
    elif entry.get("url"):
        parts.append(entry["url"])
    return " ".join(p for p in parts if p.strip(". "))


def cited_keys(text: str) -> list[str]:
    keys = []
    for group in _CITE.findall(text):
        for key in re.findall(r"@([\w:.-]+)", group):
            if key not in keys:
                keys.append(key)
    return keys


def compose(parts: dict[str, str], bib: dict | None = None) -> tuple[str, list[tuple]]:
    """The Markdown text and its numbered references ``[(n, key, formatted), ...]``."""
    bib = bib if bib is not None else read_bib()
    body = []
    if parts.get("participant"):
        body += ["## Preprocessing", "", parts["participant"].strip(), ""]
    if parts.get("group"):
        body += ["## Classification", "", parts["group"].strip(), ""]
    text = "\n".join(body)
    keys = [k for k in cited_keys(text) if k in bib] + [k for k in ALWAYS if k in bib]
    keys = list(dict.fromkeys(keys))
    number = {k: i + 1 for i, k in enumerate(keys)}

    def replace(match):
        refs = re.findall(r"@([\w:.-]+)", match.group(1))
        found = [str(number[k]) for k in refs if k in number]
        return f"[{', '.join(found)}]" if found else match.group(0)

    text = _CITE.sub(replace, text)
    return text, [(number[k], k, format_reference(bib[k])) for k in keys]


def to_markdown(text: str, refs) -> str:
    head = (
        "# Methods boilerplate\n\n"
        "Written by bids_siamfuse for your methods section; edit it freely. The numbers in "
        "brackets refer to the references below. Please also cite the software itself "
        "(CITATION.cff).\n\n"
    )
    lines = [f"{n}. {ref}" for n, _, ref in refs]
    return head + text + "\n## References\n\n" + "\n".join(lines) + "\n"


def _inline(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"\*(.+?)\*", r"<em>\1</em>", out)
    out = re.sub(r"`(.+?)`", r"<code>\1</code>", out)
    return out


def to_html(markdown: str) -> str:
    """A small Markdown subset (headings, paragraphs, numbered lists) as a standalone page."""
    blocks = []
    for block in re.split(r"\n\s*\n", markdown.strip()):
        block = block.strip()
        if block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            blocks.append(f"<h{level}>{_inline(block.lstrip('#').strip())}</h{level}>")
        elif re.match(r"^\d+\. ", block):
            items = re.split(r"\n(?=\d+\. )", block)
            blocks.append(
                "<ol>"
                + "".join(f"<li>{_inline(_NUMBER.sub('', i))}</li>" for i in items)
                + "</ol>"
            )
        else:
            blocks.append(f"<p>{_inline(' '.join(block.split()))}</p>")
    css = (DATA_DIR / "report.css").read_text()
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Methods boilerplate</title><style>{css}</style></head>"
        "<body><main>" + "\n".join(blocks) + "</main></body></html>\n"
    )


def write_citation(logs_dir: Path, part: str, text: str) -> tuple[Path, Path]:
    """Store ``text`` as ``part`` (participant or group); rewrite CITATION.md and .html."""
    from ..bids import atomic_path, save_json

    if part not in PARTS:
        raise ValueError(f"unknown boilerplate part {part!r}")
    logs_dir = Path(logs_dir)
    store = logs_dir / "CITATION.json"
    parts = {}
    if store.is_file():
        try:
            parts = {k: v for k, v in json.loads(store.read_text()).items() if k in PARTS}
        except (json.JSONDecodeError, OSError, AttributeError):
            parts = {}
    parts[part] = text
    save_json(store, parts)
    body, refs = compose(parts)
    markdown = to_markdown(body, refs)
    md_path, html_path = logs_dir / "CITATION.md", logs_dir / "CITATION.html"
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    with atomic_path(html_path) as tmp:
        tmp.write_text(to_html(markdown), encoding="utf-8")
    return md_path, html_path


def _descriptions(workflow) -> list[str]:
    """``__desc__`` of ``workflow`` and its sub-workflows, graph order, duplicates once."""
    from nipype.pipeline.engine.utils import topological_sort
    from niworkflows.engine.workflows import LiterateWorkflow

    out = [workflow.__desc__.strip()] if getattr(workflow, "__desc__", None) else []
    for node in topological_sort(workflow._graph)[0]:
        if isinstance(node, LiterateWorkflow):
            out += [d for d in _descriptions(node) if d not in out]
    if getattr(workflow, "__postdesc__", None):
        out.append(workflow.__postdesc__.strip())
    return out


def participant_text(workflow) -> str:
    """The method paragraphs of the first subject's workflow (the same for every subject).

    One paragraph per workflow description (niworkflows' ``visit_desc`` order). The
    descriptions name no file and hold for static and dynamic PET alike, so this text stands
    for the whole dataset; :func:`dataset_text` adds the counts, :func:`run_details` the
    files of one run.
    """
    from niworkflows.engine.workflows import LiterateWorkflow

    subjects = [
        n for n in workflow._graph.nodes() if isinstance(n, LiterateWorkflow) and n.__desc__
    ]
    source = subjects[0] if subjects else workflow
    return "\n\n".join(_descriptions(source)) + "\n"


def group_text(summary: dict) -> str:
    """A methods paragraph for one group-level task, from its ``summary.json``."""
    classes = summary.get("classes", [])
    cv = summary.get("cross_validation", {})
    train = summary.get("training", {})
    cohort = summary.get("cohort", {})
    per_class = cohort.get("per_class", {})
    counts = ", ".join(
        f"{c}: {v.get('subjects', '?')} subjects ({v.get('sessions', '?')} sessions)"
        if isinstance(v, dict)
        else f"{c}: {v}"
        for c, v in per_class.items()
    )
    fusion = train.get("fusion", "paper")
    gate = train.get("gate", "se")
    sloppy = bool(train.get("sloppy"))
    text = (
        f"A siamese neural network with a self-attention module [@arco], implemented in "
        f"PyTorch [@pytorch], was trained to separate {' vs '.join(classes)}"
        + (f" ({counts})" if counts else "")
        + ". For each of the 116 AAL regions [@aal], the region's modulated grey-matter and "
        "normalized FDG-PET voxels (z-scored with the training subjects' statistics"
        + (
            "; sloppy mode: averaged over 2x2x2 voxel blocks, pooled to 2x2x2 cells before the "
            "first linear layer"
            if sloppy
            else ""
        )
        + ") fed two branches with shared weights (two convolution + ReLU layers, linear layers "
        "of 1024 and 20 units) trained with a hinge loss tying the scaled cosine similarity of "
        "the MRI and PET embeddings to the label. "
    )
    if gate == "paired":
        text += (
            "A region's network replaced its initial weights only with an epoch whose "
            "validation hinge was lower than the untrained network's in a one-sided paired "
            "t-test over the validation subjects (level 0.05); otherwise it kept its "
            "initial weights. "
        )
    elif gate == "constant":
        text += (
            "A region's network replaced its initial weights only with an epoch whose "
            "validation hinge was lower, in one-sided t-tests over the validation subjects "
            "(level 0.05), than both the untrained network's (paired) and the best constant "
            "similarity's; otherwise it kept its initial weights. "
        )
    elif gate == "se":
        text += (
            "A region's network replaced its initial weights only with an epoch whose "
            "validation hinge was two standard errors below the untrained network's. "
        )
    if fusion == "similarity":
        text += (
            "Beyond the original method, the attention stage received, per region, the "
            "MRI-PET similarity (the scaled cosine the hinge loss trained) beside the 20 + 20 "
            "embedding features; the features were weighted by an attention mask (MLP + "
            "sigmoid) before a linear classifier. "
        )
    else:
        text += (
            "As in the original method, the concatenated region embeddings were weighted by an "
            "attention mask (MLP + sigmoid) before a linear classifier. "
        )
    text += (
        f"Performance was estimated with {cv.get('folds', '?')}-fold cross-validation"
        + (f" repeated {cv['repeats']} times" if cv.get("repeats", 1) > 1 else "")
        + ", stratified by class at the subject level (all sessions of a subject in one fold); "
        "standardization, network training and early stopping used the training folds only"
    )
    if train.get("epochs"):
        epochs = min(int(train["epochs"]), 30) if sloppy else train["epochs"]
        text += f" (at most {epochs} epochs"
        text += f", learning rate {train['learning_rate']}" if train.get("learning_rate") else ""
        text += ")"
    methods = summary.get("methods") or []
    ablations = [m for m in methods if m.startswith("siamese_attention_")]
    if ablations:
        text += (
            ". Ablations were trained in the same folds: "
            + ", ".join(m.removeprefix("siamese_attention_").replace("_", " ") for m in ablations)
            + " (untrained: the same pipeline with the siamese networks at initialization)"
        )
    text += (
        ". Baselines (linear SVM and logistic regression on the regional means of grey matter, "
        "PET or both, regularization chosen by a nested subject-level cross-validation inside "
        "each training fold) were fit on the same folds. Metrics were computed per subject "
        "(sessions averaged) with 95 % confidence intervals from the corrected resampled t "
        "[@nadeau]; the model was compared with the best baseline by the corrected resampled "
        "t-test over the same splits; calibration was summarized by the Brier score and a "
        "reliability curve. Region relevance was read from the attention module's effective "
        "weights (mean mask times class-separating classifier weight) and averaged over folds."
    )
    if train.get("deterministic") is False and any(
        str(d).startswith("cuda") for d in summary.get("devices", [])
    ):
        text += (
            " GPU training used non-deterministic (atomic) accumulation in the convolution "
            "kernels (`--nondeterministic-gpu`): a rerun with the same seed gives slightly "
            "different per-subject results."
        )
    perm = summary.get("permutation")
    if perm:
        text += (
            f" Significance was assessed with {perm.get('n')} label permutations (subjects "
            "shuffled, the first repeat's cross-validation rerun on new folds; p-value against "
            "that repeat's balanced accuracy)."
        )
    return text + "\n"


def _sidecar(path: Path) -> dict:
    try:
        return json.loads(path.with_name(path.name.split(".")[0] + ".json").read_text())
    except (OSError, ValueError):
        return {}


def dataset_text(output_dir: Path) -> str:
    """The dataset's processed sessions, counted from the derivatives on disk (every run).

    Counting what is on disk (not one run's plan) keeps ``logs/CITATION.md`` right when
    subjects are processed by separate runs (SLURM arrays): the last run describes them all.
    """
    output_dir = Path(output_dir)
    refs = sorted(output_dir.glob("sub-*/pet/*_petref.nii.gz"))
    refs += sorted(output_dir.glob("sub-*/ses-*/pet/*_petref.nii.gz"))
    t1ws = [
        p
        for pattern in ("sub-*/anat/*_desc-preproc_T1w.nii.gz", "sub-*/ses-*/anat/*_T1w.nii.gz")
        for p in output_dir.glob(pattern)
        if "_space-" not in p.name and "_desc-preproc_" in p.name
    ]
    if not refs and not t1ws:
        return ""
    subjects = {p.name.split("_")[0] for p in refs + t1ws}
    sessions = {
        tuple(part for part in p.name.split("_") if part[:4] in ("sub-", "ses-")) for p in refs
    }
    dynamic = sum(1 for p in refs if int(_sidecar(p).get("FramesAveraged", 1) or 1) > 1)
    flagged = 0
    for pattern in ("sub-*/pet/*_desc-qc_stats.tsv", "sub-*/ses-*/pet/*_desc-qc_stats.tsv"):
        flagged += sum(1 for p in output_dir.glob(pattern) if _sidecar(p).get("Flagged"))
    text = (
        f"The derivatives hold {len(t1ws)} T1w image(s) and {len(refs)} PET series of "
        f"{len(subjects)} subject(s) ({len(sessions)} session(s)); {dynamic} PET series "
        f"{'was' if dynamic == 1 else 'were'} dynamic and {len(refs) - dynamic} static."
    )
    if flagged:
        text += (
            f" Quality control flagged {flagged} session(s), left out of the group analysis "
            "by default."
        )
    return text + "\n"


def run_details(plan, run_uuid: str) -> str:
    """This run's inputs, pair by pair (for ``logs/participant-<run>_methods.md``)."""
    lines = [f"# Participant run {run_uuid}", ""]
    for pair in plan.pairs:
        frames = pair.pet_meta.get("FrameDuration")
        n = len(frames) if isinstance(frames, list) else 1
        kind = f"dynamic, {n} frames" if n > 1 else "static"
        lines.append(
            f"- {pair.key}: T1w `{Path(pair.t1w).name}`, PET `{Path(pair.pet).name}` ({kind})"
        )
        lines.extend(f"  - {note}" for note in pair.notes)
    return "\n".join(lines) + "\n"
