"""Reports: participant and group HTML, methods boilerplate, --reports-only, offline rendering.

Reports are built from small hand-made derivative files (the shapes the pipeline writes), so
these tests cost seconds, not a pipeline run. The browser tests open each report in Debian's
Chromium (headless, proxy pointed at a closed port, DNS off) and check that every image decodes,
that nothing was requested from the network, and take a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CLASSES = ["CN", "AD"]
SPACE_ENT = "space-MNI152NLin2009aSym_seg-AAL116_res-1p5"

_SVG = """<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">
<svg xmlns="http://www.w3.org/2000/svg" width="200" height="80" viewBox="0 0 200 80">
<g class="background-svg"><rect width="200" height="80" fill="#333"/></g>
<g class="foreground-svg"><circle cx="{cx}" cy="40" r="30" fill="#c44"/></g>
</svg>
"""


def _names():
    from bids_siamfuse.data.atlas import load_atlas

    return list(load_atlas().names)


def make_group_folder(out: Path, *, permutations: int = 20, seed: int = 0) -> Path:
    """A task folder with the files of DEVELOPERS.md's group contract (values made up)."""
    rng = np.random.default_rng(seed)
    folder = out / "group" / "CN_vs_AD"
    folder.mkdir(parents=True)
    names = _names()
    methods = ["siamese_attention", "svm_both", "logreg_both", "svm_gm"]
    metrics, roc, history, preds = [], [], [], []
    subjects = [f"{i:02d}" for i in range(1, 13)]
    for fold in (1, 2, 3):
        for method in methods:
            vals = rng.uniform(0.5, 0.95, size=6)
            metrics.append([method, 1, fold, 4, *vals])
            fpr = np.r_[0, np.sort(rng.uniform(0, 1, 4)), 1]
            tpr = np.r_[0, np.sort(rng.uniform(0, 1, 4)), 1]
            for f, t in zip(fpr, tpr):
                roc.append([method, 1, fold, "AD", f, t, 0.5])
        for stage, epochs in (("siamese", 8), ("attention", 5)):
            for epoch in range(1, epochs + 1):
                history.append([1, fold, stage, epoch, 1.0 / epoch, 1.1 / epoch])
        for sub in subjects[(fold - 1) * 4 : fold * 4]:
            true = CLASSES[int(sub) % 2]
            p = rng.uniform()
            for method in methods:
                preds.append(
                    [f"sub-{sub}", "01", 1, fold, method, true, CLASSES[p > 0.5], 1 - p, p]
                )
    cols = ["balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "auc"]
    pd.DataFrame(metrics, columns=["method", "repeat", "fold", "n_test", *cols]).to_csv(
        folder / "metrics.tsv", sep="\t", index=False
    )
    pd.DataFrame(
        roc, columns=["method", "repeat", "fold", "class", "fpr", "tpr", "threshold"]
    ).to_csv(folder / "roc.tsv", sep="\t", index=False)
    pd.DataFrame(
        history, columns=["repeat", "fold", "stage", "epoch", "train_loss", "val_loss"]
    ).to_csv(folder / "history.tsv", sep="\t", index=False)
    pd.DataFrame(
        preds,
        columns=["participant_id", "session", "repeat", "fold", "method", "true", "predicted"]
        + [f"prob_{c}" for c in CLASSES],
    ).to_csv(folder / "predictions.tsv", sep="\t", index=False)
    mri, pet = rng.uniform(0, 1, 116), rng.uniform(0, 1, 116)
    mri[40] = pet[40] = 5.0  # one clear winner
    total = mri.sum() + pet.sum()
    pd.DataFrame(
        {
            "index": np.arange(1, 117),
            "name": names,
            "mri": mri / total,
            "pet": pet / total,
            "combined": (mri + pet) / total,
        }
    ).to_csv(folder / "relevance.tsv", sep="\t", index=False)
    act_mri, act_pet = rng.uniform(0, 20, 116), rng.uniform(0, 20, 116)
    pd.DataFrame(
        {
            "index": np.arange(1, 117),
            "name": names,
            "mri": act_mri,
            "pet": act_pet,
            "fused": act_mri + act_pet,
        }
    ).to_csv(folder / "activations.tsv", sep="\t", index=False)
    if permutations:
        pd.DataFrame(
            {
                "permutation": np.arange(1, permutations + 1),
                "balanced_accuracy": rng.uniform(0.3, 0.7, permutations),
            }
        ).to_csv(folder / "permutation.tsv", sep="\t", index=False)
    summary = {
        "task": "CN_vs_AD",
        "classes": CLASSES,
        "reference_class": "CN",
        "positive_class": "AD",
        "label_column": "diagnosis",
        "cohort": {
            "per_class": {
                "CN": {"subjects": 6, "sessions": 6},
                "AD": {"subjects": 6, "sessions": 6},
            }
        },
        "cross_validation": {"folds": 3, "repeats": 1, "seed": 42, "split": "stratified"},
        "training": {"epochs": 10, "learning_rate": 0.001},
        "balanced_accuracy": {"mean": 0.8, "sd": 0.1, "n": 3},
        "permutation": {"n": permutations, "p_value": 1 / (1 + permutations)}
        if permutations
        else None,
        "versions": {"bids_siamfuse": "test", "torch": "x"},
        "settings": {"model": {"folds": 3}},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def make_bids(root: Path, subject: str = "01", sessions=("01", "02")) -> Path:
    import nibabel as nb

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "t", "BIDSVersion": "1.10.0"})
    )
    rows = [
        ["sub-01", "AD", 71.5, "F", 22],
        ["sub-02", "CN", 70.1, "M", 29],
        ["sub-03", "AD", 75.0, "M", 20],
        ["sub-04", "CN", 69.0, "F", 30],
    ]
    pd.DataFrame(rows, columns=["participant_id", "diagnosis", "age", "sex", "MMSE"]).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    for ses in sessions:
        base = root / f"sub-{subject}" / f"ses-{ses}"
        (base / "anat").mkdir(parents=True)
        (base / "pet").mkdir(parents=True)
        nb.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)).to_filename(
            base / "anat" / f"sub-{subject}_ses-{ses}_T1w.nii.gz"
        )
        nb.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.eye(4)).to_filename(
            base / "pet" / f"sub-{subject}_ses-{ses}_trc-FDG_pet.nii.gz"
        )
    return root


def make_participant(out: Path, subject: str = "01", *, model_session: str = "01") -> Path:
    """Reportlets of two sessions (the second PET crashed: no PET figures) and model outputs."""
    fig = out / f"sub-{subject}" / "figures"
    fig.mkdir(parents=True)
    mni = "space-MNI152NLin2009aSym"
    names = [
        "ses-01_desc-seg_dseg",
        f"ses-01_{mni}_desc-t1w2mni_T1w",
        "ses-01_desc-regions_dseg",
        "ses-01_trc-FDG_desc-coreg_pet",
        f"ses-01_trc-FDG_{mni}_desc-pet_pet",
        "ses-02_desc-seg_dseg",
    ]
    for i, name in enumerate(names):
        (fig / f"sub-{subject}_{name}.svg").write_text(_SVG.format(cx=40 + 20 * i))
    pet = out / f"sub-{subject}" / f"ses-{model_session}" / "pet"
    pet.mkdir(parents=True)
    prefix = f"sub-{subject}_ses-{model_session}_trc-FDG"
    pd.DataFrame(
        [[f"sub-{subject}", model_session, "AD", 0.2, 0.8]],
        columns=["participant_id", "session", "predicted", "prob_CN", "prob_AD"],
    ).to_csv(pet / f"{prefix}_desc-diagnosis_probs.tsv", sep="\t", index=False)
    (pet / f"{prefix}_desc-diagnosis_probs.json").write_text(
        json.dumps({"PredictedClass": "AD", "Model": {"Bundle": "/b", "WeightsSHA256": "ab" * 32}})
    )
    values = np.linspace(0, 1, 116)
    values[7] = 3.0
    values /= 2 * values.sum()
    pd.DataFrame(
        {
            "index": np.arange(1, 117),
            "name": _names(),
            "mri": values,
            "pet": values,
            "combined": 2 * values,
        }
    ).to_csv(pet / f"{prefix}_seg-AAL116_desc-relevance_stat.tsv", sep="\t", index=False)
    # quality control: ses-01 flagged for motion (dynamic PET, 4 frames)
    from bids_siamfuse import bids as bidsmod
    from bids_siamfuse.preproc import qc

    rows = qc.evaluate({"t1w_voxel_max_mm": 1.0, "pet_fd_max_mm": 12.0, "pet_frames": 4})
    source = {"subject": subject, "session": model_session, "tracer": "FDG"}
    meta = {**qc.sidecar(qc.reasons(rows)), "Warnings": ["anat: affine fit is poor (test)"]}
    bidsmod.save_output(out, "qc", qc.qc_table(rows), source=source, meta=meta)
    motion = pd.DataFrame(
        {
            "frame": range(4),
            **{f"trans_{a}": [0.0, 1.0, 12.0, 12.5] for a in "xyz"},
            **{f"rot_{a}": [0.0, 0.001, 0.002, 0.0] for a in "xyz"},
            "framewise_displacement": [0.0, 3.1, 33.2, 1.8],
        }
    )
    bidsmod.save_output(out, "pet_confounds", motion, source=source)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    crash = out / f"sub-{subject}" / "log" / "run1" / "crash-1-pet.txt"
    crash.parent.mkdir(parents=True)
    crash.write_text("Node: pet_wf\nboom\n")
    pd.DataFrame(
        [
            [f"{prefix}", subject, "01", "01", "flagged", "", qc.reasons(rows)[0], ""],
            [
                f"sub-{subject}_ses-02_trc-FDG",
                subject,
                "02",
                "02",
                "failed",
                "pet_wf.coreg",
                "ValueError: boom",
                str(crash),
            ],
        ],
        columns=[
            "pair",
            "subject",
            "session",
            "t1w_session",
            "status",
            "node",
            "message",
            "crash_file",
        ],
    ).to_csv(logs / "participant-run1.tsv", sep="\t", index=False)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One output folder with a participant (crashed second session) and a group task."""
    from bids_siamfuse.reports.group import build_group_report
    from bids_siamfuse.reports.participant import build_participant_report

    root = tmp_path_factory.mktemp("reports")
    bids = make_bids(root / "bids")
    out = root / "out"
    make_participant(out)
    make_group_folder(out)
    participant = build_participant_report(out, "01", bids_dir=bids)
    group = build_group_report(out, bids_dir=bids)
    return {"bids": bids, "out": out, "participant": participant, "group": group}


# ----------------------------------------------------------------------------------------------
# content


def test_participant_report_content(built, parse_html):
    html = built["participant"].read_text()
    doc = parse_html(html)
    assert built["participant"] == built["out"] / "sub-01.html"
    # one section per session, the crash reported, the inputs summarized
    assert 'id="ses-01"' in html and 'id="ses-02"' in html
    assert "failed" in html and "ValueError: boom" in html and "crash-1-pet.txt" in html
    assert "sub-01/ses-01/pet/sub-01_ses-01_trc-FDG_pet.nii.gz" in html
    assert "4x5x6, 3 frame(s)" in html
    # reportlets inlined (5 in ses-01, 1 in ses-02) as SVG drawings captioned with their
    # figures/ file, missing ones named for ses-02
    for session, n in (("ses-01", 5), ("ses-02", 1)):
        figures = reportlet_figures(doc, session)
        assert len(figures) == n, session
        for fig in figures:
            assert fig.xpath("./svg//*"), "an empty drawing"
            shown = fig.xpath("string(./figcaption//span)").strip("() ")
            assert (built["out"] / "sub-01" / shown).is_file(), shown
    assert "<?xml" not in html
    ses02 = html[html.index('id="ses-02"') :]
    assert "Not available for this session" in ses02 and "PET to T1w coregistration" in ses02
    # model: probabilities and the relevance ranking (region 8 is the top one)
    assert "0.800" in html and "predicted: AD" not in html  # the figure is an image, not text
    top = _names()[7]
    assert ranked_regions(doc)[0] == ("1", top)
    # the relevance reportlet is a derivative under figures/
    rel = list((built["out"] / "sub-01" / "figures").glob("*desc-relevance*_stat.png"))
    assert len(rel) == 1 and rel[0].stat().st_size > 1000
    assert "sub-01_ses-01_trc-FDG_seg-AAL116_desc-relevance_stat.png" == rel[0].name
    # QC: the flag and its reason at the top, the metric table with ranges, the warnings,
    # the motion trace of the dynamic PET
    flag = html.index("Flagged by quality control")
    assert flag < html.index('id="summary"') and "large PET motion" in html[flag:][:400]
    assert "Quality metrics" in ses01(html) and "&lt;= 8 mm" in ses01(html)
    assert "affine fit is poor (test)" in ses01(html)
    assert 'alt="PET motion"' in ses01(html)
    assert "1 pair(s) did not finish" in html  # the flagged one finished


def reportlet_figures(doc, section: str) -> list:
    """The reportlet figures (``<figure class="reportlet">``) inside a session's section."""
    return doc.xpath(
        f'//section[@id="{section}"]//figure[contains(concat(" ", @class, " "), " reportlet ")]'
    )


def ranked_regions(doc) -> list[tuple[str, str]]:
    """(rank, region) of each row of the first table whose header starts with "rank"."""
    table = doc.xpath('//table[tr[1]/th[1][normalize-space()="rank"]]')[0]
    return [(r.xpath("string(td[1])"), r.xpath("string(td[2])")) for r in table.xpath("tr[td]")]


def ses01(html: str) -> str:
    return html[html.index('id="ses-01"') : html.index('id="ses-02"')]


def test_group_report_content(built, parse_html):
    html = built["group"].read_text()
    doc = parse_html(html)
    assert built["group"] == built["out"] / "group" / "report.html"
    # Table 1 from participants.tsv: subjects 01..12 in predictions, 01..04 in participants.tsv
    assert "sex (M/F)" in html and "MMSE (mean ± SD)" in html
    # Table 2: mean ± SD from metrics.tsv, recomputed here
    metrics = pd.read_csv(built["out"] / "group" / "CN_vs_AD" / "metrics.tsv", sep="\t")
    ba = metrics[metrics.method == "svm_both"].balanced_accuracy
    assert f"{ba.mean():.3f} ± {ba.std(ddof=1):.3f}" in html
    assert html.index("siamese_attention") < html.index("svm_both")
    # relevance: top region named first (index 41 forced highest)
    assert ranked_regions(doc)[0] == ("1", _names()[40])
    # permutation p and figures
    assert "p = 0.048" in html
    # the figures: ROC, relevance, activations, permutations, curves, each an inline PNG
    images = {img.get("alt"): img.get("src") for img in doc.xpath("//img")}
    assert set(images) == {
        "ROC curves per fold and mean",
        "relevance maps",
        "activation count maps",
        "permutation histogram",
        "training curves",
    }
    for alt, src in images.items():
        head, _, data = src.partition(",")
        assert head == "data:image/png;base64", alt
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n", alt
    assert "http://" not in html and "https://" not in html


def test_cohort_table_counts():
    from bids_siamfuse.group.readback import cohort_table

    parts = pd.DataFrame(
        {"Sex": ["M", "F", "female", "M"], "age": ["70", "80", "n/a", "60"], "mmse": [1, 2, 3, 4]},
        index=["a", "b", "c", "d"],
    )
    table = cohort_table(parts, {"CN": ["a", "b"], "AD": ["c", "d", "zz"]})
    assert table["columns"] == ["class", "N", "sex (M/F)", "age (mean ± SD)", "MMSE (mean ± SD)"]
    assert table["rows"][0] == ["CN", "2", "1/1", "75.0 ± 7.1", "1.5 ± 0.7"]
    assert table["rows"][1][:4] == ["AD", "3", "1/1", "60.0 ± n/a"]
    assert cohort_table(None, {"CN": ["a"]}) == {"columns": ["class", "N"], "rows": [["CN", "1"]]}


def test_no_group_results_is_noinput(tmp_path):
    from bids_siamfuse.errors import NoInputError
    from bids_siamfuse.reports.group import build_group_report

    with pytest.raises(NoInputError):
        build_group_report(tmp_path)


def test_inline_svg_refuses_external(tmp_path):
    from bids_siamfuse.reports.html import inline_svg

    bad = tmp_path / "x.svg"
    bad.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg"><image href="https://e.com/a.png"/></svg>'
    )
    with pytest.raises(ValueError, match="external"):
        inline_svg(bad)
    good = tmp_path / "y.svg"
    good.write_text(_SVG.format(cx=5))
    assert str(inline_svg(good)).startswith("<svg")


# ----------------------------------------------------------------------------------------------
# boilerplate


def test_citation_parts_and_references(tmp_path, parse_html):
    from bids_siamfuse.reports.boilerplate import group_text, write_citation

    logs = tmp_path / "logs"
    write_citation(logs, "participant", "Preprocessed with Nipype [@nipype1] and ANTs [@ants].")
    md, html = write_citation(
        logs,
        "group",
        group_text(
            {
                "classes": CLASSES,
                "cross_validation": {"folds": 5, "repeats": 1},
                "training": {"epochs": 200},
                "permutation": {"n": 100},
            }
        ),
    )
    text = md.read_text()
    # both parts kept, citations numbered, references listed (always-owed ones included)
    assert "## Preprocessing" in text and "## Classification" in text
    assert "Nipype [1] and ANTs [2]" in text
    assert "5-fold cross-validation" in text and "100 label permutations" in text
    refs = text.split("## References")[1]
    for needle in (
        "Nipype",
        "Symmetric diffeomorphic",
        "siamese neural networks",
        "PyTorch",
        "Automated anatomical labeling",
        "scikit-learn",
    ):
        assert needle in refs
    assert "Tzourio-Mazoyer" in refs and "{" not in refs and "\\" not in refs
    page = parse_html(html)
    items = page.xpath('//h2[normalize-space()="References"]/following-sibling::ol[1]/li')
    assert len(items) == len(re.findall(r"^\d+\. ", refs, re.M)) >= 6
    assert "http" not in page.xpath("string(//main)")  # nothing to fetch in the page text


def test_participant_text_first_subject_only():
    from niworkflows.engine.workflows import LiterateWorkflow

    from bids_siamfuse.reports.boilerplate import participant_text

    top = LiterateWorkflow("top")
    for sub in ("01", "02"):
        single = LiterateWorkflow(f"single_subject_{sub}_wf")
        single.__desc__ = f"Subject {sub} text [@nipype1]. "
        inner = LiterateWorkflow(f"anat_{sub}_wf")
        inner.__desc__ = f"Anat of {sub} [@aal]."
        single.add_nodes([inner])
        top.add_nodes([single])
    text = participant_text(top)
    assert "Subject 01 text [@nipype1].\n\nAnat of 01 [@aal]." in text  # one paragraph each
    assert "02" not in text


@pytest.mark.slow
def test_participant_boilerplate_from_workflow(synth_raw, tmp_path):
    from bids_siamfuse import bids
    from bids_siamfuse.reports.boilerplate import participant_text
    from bids_siamfuse.workflows.base import init_bids_siamfuse_wf
    from bids_siamfuse.workflows.common import ParticipantOptions

    plan = bids.collect_pairs(bids.load_layout(synth_raw))
    options = ParticipantOptions(output_dir=tmp_path / "out", bids_dir=synth_raw, sloppy=True)
    wf = init_bids_siamfuse_wf(plan=plan, options=options, work_dir=tmp_path / "w", run_uuid="x")
    text = participant_text(wf)
    assert "[@nipype1]" in text and "[@aal]" in text
    # dataset-wide: no file of any subject, static and dynamic PET both described
    assert all(Path(p.pet).name not in text and Path(p.t1w).name not in text for p in plan.pairs)
    assert "dynamic (4-D) PET" in text and "is static" not in text


def test_methods_text_aggregates_the_dataset(tmp_path):
    """Issue 17: logs/CITATION.md described only the last run's subject ("the PET is static"
    after a static subject although others were dynamic). It now counts every session on
    disk; the run's own files go to logs/participant-<run>_methods.md."""
    from types import SimpleNamespace

    import nibabel as nb
    from niworkflows.engine.workflows import LiterateWorkflow

    from bids_siamfuse import bids
    from bids_siamfuse.participant import write_participant_reports

    out = tmp_path / "out"
    sessions = [("01", "01", 4), ("01", "02", 1), ("02", "01", 1)]
    for sub, ses, frames in sessions:
        anat, pet = {"subject": sub, "session": ses}, {"subject": sub, "session": ses}
        pet["tracer"] = "FDG"
        img = nb.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
        bids.save_output(out, "pet_ref", img, source=pet, meta={"FramesAveraged": frames})
        bids.save_output(out, "t1w_preproc", img, source=anat, meta={})
    top = LiterateWorkflow("top")
    single = LiterateWorkflow("single_subject_02_wf")
    single.__desc__ = "Each PET series was processed [@nipype1]."
    top.add_nodes([single])
    pair = bids.SessionPair(
        "02",
        "01",
        Path("sub-02_ses-01_trc-FDG_pet.nii.gz"),
        Path("sub-02_ses-01_T1w.nii.gz"),
        "01",
        pet_entities={"tracer": "FDG"},
    )
    write_participant_reports(
        out, [], workflow=top, plan=SimpleNamespace(pairs=[pair]), run_uuid="r1"
    )
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "3 T1w image(s) and 3 PET series of 2 subject(s) (3 session(s))" in citation
    assert "1 PET series was dynamic and 2 static" in citation
    assert "sub-02_ses-01" not in citation
    run_log = (out / "logs" / "participant-r1_methods.md").read_text()
    assert "sub-02_ses-01_trc-FDG_pet.nii.gz" in run_log and "(static)" in run_log


# ----------------------------------------------------------------------------------------------
# CLI: --reports-only


def test_reports_only_cli(tmp_path):
    from bids_siamfuse.cli.run import main

    bids = make_bids(tmp_path / "bids")
    out = tmp_path / "out"
    make_participant(out)
    make_group_folder(out, permutations=0)
    assert main([str(bids), str(out), "participant", "--reports-only"]) == 0
    assert (out / "sub-01.html").is_file()
    assert main([str(bids), str(out), "group", "--reports-only"]) == 0
    html = (out / "group" / "report.html").read_text()
    assert "Not run" in html  # no permutation test
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "siamese neural network" in citation
    # nothing to report on: exit 66 (no input)
    empty = tmp_path / "empty"
    assert main([str(bids), str(empty), "group", "--reports-only"]) == 66
    assert main([str(bids), str(empty), "participant", "--reports-only"]) == 66


# ----------------------------------------------------------------------------------------------
# headless browser


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                .map(function (i) { return i.alt || i.src.slice(0, 40); });
  var svgs = Array.prototype.slice.call(document.querySelectorAll('svg')).filter(
    function (s) { return !s.parentElement.closest('svg'); });
  var flat = svgs.filter(function (s) { var r = s.getBoundingClientRect();
    return !(r.width > 0 && r.height > 0); }).length;
  var res = performance.getEntriesByType('resource').map(function (e) { return e.name; });
  var pre = document.createElement('pre'); pre.id = 'report-check';
  pre.textContent = 'CHECK' + JSON.stringify({images: imgs.length, bad: bad, svgs: svgs.length,
    flat: flat, resources: res}) + 'END';
  document.body.appendChild(pre);
});
</script>"""

_OFFLINE = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def page_requests(netlog: Path) -> list[str]:
    """URLs the page asked for, from Chromium's NetLog (the browser's own services excluded).

    Requests made on behalf of a ``file://`` page carry a network isolation key of ``file://``;
    Chromium's background services (time, updates, accounts) do not.
    """
    if not netlog.is_file():
        return []
    text = netlog.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # not closed: the browser was killed mid-write
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        e["params"]["url"]
        for e in log.get("events", [])
        if e.get("type") == start
        and str(e.get("params", {}).get("network_isolation_key", "")).startswith("file://")
    ]


def browse(html: Path, work: Path, screenshot: Path) -> dict:
    """Open ``html`` offline in headless Chromium: image check, network log, screenshot."""
    browser = _chromium()
    work.mkdir(parents=True, exist_ok=True)
    probe = work / html.name
    text = html.read_text()
    probe.write_text(text.replace("</body>", _CHECK + "</body>"))
    netlog = work / "netlog.json"
    env = {**os.environ, "HOME": str(work)}
    common = [browser, *_OFFLINE, f"--user-data-dir={work / 'profile'}"]
    dom = subprocess.run(
        [
            *common,
            f"--log-net-log={netlog}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    match = re.search(r'<pre id="report-check">CHECK(.*?)END</pre>', dom.stdout, re.S)
    assert match, f"no check result from chromium: {dom.stderr[-2000:]}"
    import html as html_lib

    result = json.loads(html_lib.unescape(match.group(1)))
    result["netlog_urls"] = page_requests(netlog)
    result["netlog_written"] = netlog.is_file() and netlog.stat().st_size > 0
    subprocess.run(
        [
            *common,
            f"--screenshot={screenshot}",
            "--window-size=1280,1600",
            "--hide-scrollbars",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return result


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_browser_check_sees_external_requests(tmp_path):
    """The check can fail: a page that asks the network for an image is caught."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img alt="remote" src="http://example.invalid/x.png">'
        "</body></html>"
    )
    result = browse(page, tmp_path / "browser", tmp_path / "bad.png")
    assert result["bad"] == ["remote"]
    assert any("example.invalid" in u for u in _external(result["netlog_urls"]))


def _external(urls):
    return [u for u in urls if not u.startswith(("data:", "file:", "about:", "chrome"))]


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
@pytest.mark.parametrize("which", ["participant", "group"])
def test_report_renders_offline_in_chromium(built, which, tmp_path):
    from PIL import Image

    html = built[which]
    shot = tmp_path / f"{which}.png"
    result = browse(html, tmp_path / "browser", shot)
    # participant: two figures + ses-01's PET motion trace (the fixture's dynamic PET)
    assert result["images"] == (3 if which == "participant" else 5)
    assert result["bad"] == [], f"images that did not decode: {result['bad']}"
    if which == "participant":
        assert result["svgs"] == 6 and result["flat"] == 0
    assert _external(result["resources"]) == []
    assert result["netlog_written"]
    assert _external(result["netlog_urls"]) == []
    with Image.open(shot) as img:
        assert img.size == (1280, 1600)
        assert len(set(img.convert("L").resize((64, 80)).getdata())) > 10  # not blank


def test_crashed_participant_run_still_reports(tmp_path, monkeypatch, parse_html):
    """run_participant writes the report after a workflow failure, naming the failed pair."""
    from bids_siamfuse.bids import Plan, SessionPair
    from bids_siamfuse.config import Settings
    from bids_siamfuse.participant import run as base

    bids = make_bids(tmp_path / "bids", sessions=("01",))
    out = tmp_path / "out"
    make_participant(out)
    (out / "logs" / "participant-run1.tsv").unlink()  # only this run's status counts

    import networkx as nx

    class Crashing:
        config = {"execution": {}}
        _graph = nx.DiGraph()  # no steps: the progress lines count none

        def _get_all_nodes(self):  # no steps to schedule either (participant/resources.py)
            return iter(())

        def run(self, **kwargs):
            raise RuntimeError("a node crashed")

    monkeypatch.setattr(base, "init_bids_siamfuse_wf", lambda **kwargs: Crashing())
    settings = Settings.from_sources(
        cli_values={
            "bids_dir": bids,
            "output_dir": out,
            "work_dir": tmp_path / "work",
            "nprocs": 1,
            "omp_nthreads": 1,
        }
    )
    ses = bids / "sub-01" / "ses-01"
    pair = SessionPair(
        subject="01",
        session="01",
        pet=ses / "pet" / "sub-01_ses-01_trc-FDG_pet.nii.gz",
        t1w=ses / "anat" / "sub-01_ses-01_T1w.nii.gz",
        t1w_session="01",
        pet_entities={"tracer": "FDG"},
    )
    code = base.run_participant(
        settings, Plan(pairs=[pair], skipped=[]), nprocs=1, omp_nthreads=1, device="cpu"
    )
    assert code == 1
    html = (out / "sub-01.html").read_text()
    assert "incomplete" in html and "a node crashed" in html
    # what finished is shown: every reportlet drawing written, each inlined
    doc = parse_html(html)
    shown = [
        fig.xpath("string(./figcaption//span)").strip("() ")
        for fig in doc.xpath('//figure[contains(concat(" ", @class, " "), " reportlet ")]')
        if fig.xpath("./svg//*")
    ]
    written = [f"figures/{f.name}" for f in (out / "sub-01" / "figures").glob("*.svg")]
    assert sorted(shown) == sorted(written) and len(shown) == 6


def test_aal_outlines_are_thin_and_in_plane():
    """Issue 17: the AAL figure was mostly solid colour (3-D, two-sided boundaries)."""
    from bids_siamfuse.data.atlas import load_atlas
    from bids_siamfuse.reports.reportlets import (
        in_plane_boundaries,
        label_boundaries,
        upsample_labels,
    )

    labels = np.asarray(load_atlas().labels)
    brain = labels > 0
    old = np.zeros_like(brain)  # the former rule: any of six neighbours differs
    for axis in range(3):
        for shift in (1, -1):
            old |= labels != np.roll(labels, shift, axis=axis)
    old &= brain
    k = labels.shape[2] // 2
    old_share = old[:, :, k].sum() / brain[:, :, k].sum()  # 0.46: mostly colour
    fine, _ = upsample_labels(labels, np.eye(4))
    z = in_plane_boundaries(fine)["z"][:, :, 2 * k]
    share = z.sum() / (fine[:, :, 2 * k] > 0).sum()  # 0.14 measured
    assert 0.05 < share < 0.4 * old_share
    # a two-region toy: the boundary is one voxel wide in the plane
    toy = np.zeros((6, 6, 3), int)
    toy[:3], toy[3:] = 1, 2
    assert label_boundaries(toy, axes=(0, 1))[:, 2, 1].tolist() == [0, 0, 1, 0, 0, 1]


def test_report_slices_run_the_same_way_for_any_storage_order(tmp_path):
    """Issue 17: one session's panels ran top-down, the next bottom-up (LPS vs RAS T1w)."""
    import nibabel as nb
    from niworkflows.viz.utils import cuts_from_bbox

    from bids_siamfuse.reports.reportlets import _float

    data = np.zeros((20, 24, 18), np.float32)
    data[4:16, 5:20, 3:15] = 1
    ras = nb.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    flipped_aff = ras.affine @ np.array(
        [[-1, 0, 0, 19], [0, -1, 0, 23], [0, 0, -1, 17], [0, 0, 0, 1]], float
    )
    lps = nb.Nifti1Image(data[::-1, ::-1, ::-1].copy(), flipped_aff)
    a, b = cuts_from_bbox(_float(ras), cuts=7), cuts_from_bbox(_float(lps), cuts=7)
    for mode in "xyz":
        assert a[mode] == sorted(a[mode]) and np.allclose(a[mode], b[mode])
