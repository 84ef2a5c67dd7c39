"""Group level and model application through the CLI: outputs, bad inputs, bundles.

``double=True`` runs give ``main`` the fast ``model_double`` (the train API over a logistic
regression; through ``main(fit=, model_cls=)``) to check the plumbing in seconds; ``real``
runs use the siamese-attention network (sloppy, few epochs).
The accuracy evidence of the real network (strong effect >= 0.9, chance on shuffled labels and
on effect size 0, relevance on the planted regions) runs with ``-m slow``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import model_double as md
import numpy as np
import pandas as pd
import pytest

from bids_siamfuse.bids import read_participants
from bids_siamfuse.cli.run import main
from bids_siamfuse.errors import DataError
from bids_siamfuse.group.cohort import load_cohort
from bids_siamfuse.model import bundle as bundles
from bids_siamfuse.model import cv
from bids_siamfuse.model.baselines import BASELINES
from bids_siamfuse.model.folds import shuffle_subject_labels
from bids_siamfuse.model.metrics import METRICS
from bids_siamfuse.model.options import TrainConfig
from bids_siamfuse.preproc import regions

GROUP_FILES = {
    "metrics.tsv",
    "training.tsv",
    "calibration.tsv",
    "summary.json",
    "predictions.tsv",
    "roc.tsv",
    "history.tsv",
    "relevance.tsv",
    "activations.tsv",
    "model.safetensors",
    "model.json",
    "space-MNI152NLin2009aSym_seg-AAL116_res-1p5_desc-relevanceMRI_stat.nii.gz",
    "space-MNI152NLin2009aSym_seg-AAL116_res-1p5_desc-relevancePET_stat.nii.gz",
    "space-MNI152NLin2009aSym_seg-AAL116_res-1p5_desc-relevanceCombined_stat.nii.gz",
    "space-MNI152NLin2009aSym_seg-AAL116_res-1p5_desc-activationMRI_stat.nii.gz",
    "space-MNI152NLin2009aSym_seg-AAL116_res-1p5_desc-activationPET_stat.nii.gz",
    "space-MNI152NLin2009aSym_seg-AAL116_res-1p5_desc-activationFused_stat.nii.gz",
}
#: the double's stand-in ablations (the real model has five: see attention_stage.ABLATIONS)
ABLATIONS = {cv.ABLATION_PREFIX + "mri_only", cv.ABLATION_PREFIX + "pet_only"}
METHODS = {cv.MODEL_METHOD, *ABLATIONS, *BASELINES}


@pytest.fixture(scope="module")
def ds(group_ds) -> Path:
    """A private copy of the synth_derivs cohort (region files only) for the double's runs."""
    return group_ds


#: the fast model double, given to the entry point through its typed hooks (no patching)
DOUBLE = {"fit": md.fit, "model_cls": md.FittedModel}


def run(*args, double: bool = False) -> int:
    return main([str(a) for a in args], **(DOUBLE if double else {}))


def planted(dataset: Path) -> pd.DataFrame:
    table = pd.read_csv(dataset / "derivatives" / "synth-truth" / "regions.tsv", sep="\t")
    table["planted"] = (table.atrophy_weight > 0) | (table.hypometabolism_weight > 0)
    return table


def rank_auc(scores, positive) -> float:
    """Probability that a planted region outranks a non-planted one (0.5 = chance)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(positive), np.asarray(scores)))


# ----------------------------------------------------------------------------------------------
# the group level with the double: every output, its shape and its meaning
# ----------------------------------------------------------------------------------------------


def test_group_outputs(ds, synth_derivs, capsys):
    out = ds / "derivatives" / "bids_siamfuse"
    args = ["--classes", "CN", "AD", "--folds", "3", "--permutation-tests", "2", "--sloppy"]
    code = run(ds, out, "group", *args, "--random-seed", "3", double=True)
    assert code == 0
    printed = capsys.readouterr().out
    assert "siamese_attention" in printed and "svm_both" in printed  # model beside baselines
    task = out / "group" / "CN_vs_AD"
    names = {p.name for p in task.iterdir()}
    assert GROUP_FILES | {"permutation.tsv"} <= names
    assert not [n for n in (out / "group").iterdir() if n.name.startswith(".")]  # no staging

    cohort = load_cohort(out, read_participants(ds))
    metrics = pd.read_csv(task / "metrics.tsv", sep="\t")
    assert list(metrics.columns[:5]) == ["method", "repeat", "fold", "n_test", "level"]
    assert set(METRICS) <= set(metrics.columns)
    assert set(metrics.method) == METHODS and len(metrics) == len(METHODS) * 3 * 2
    per_session = metrics[metrics.level == "session"]
    assert per_session.groupby("method").n_test.sum().eq(len(cohort)).all()
    per_subject = metrics[metrics.level == "subject"]
    n_subjects = len(np.unique(cohort.subjects))
    assert per_subject.groupby("method").n_test.sum().eq(n_subjects).all()

    preds = pd.read_csv(task / "predictions.tsv", sep="\t")
    model_preds = preds[preds.method == cv.MODEL_METHOD]
    assert len(model_preds) == len(cohort)
    assert model_preds.groupby("participant_id").fold.nunique().eq(1).all()  # subject level
    assert np.allclose(model_preds[["prob_CN", "prob_AD"]].sum(1), 1)
    truth = read_participants(ds).diagnosis
    assert (model_preds.true == truth.loc[model_preds.participant_id.str[4:]].values).all()
    recomputed = (model_preds.predicted == model_preds.true).groupby(model_preds.fold).mean()
    assert len(recomputed) == 3

    summary = json.loads((task / "summary.json").read_text())
    ba = summary["metrics"][cv.MODEL_METHOD]["balanced_accuracy"]
    fold_ba = per_subject[per_subject.method == cv.MODEL_METHOD].balanced_accuracy
    assert ba["mean"] == pytest.approx(fold_ba.mean()) and ba["sd"] == pytest.approx(fold_ba.std())
    assert ba["ci_low"] <= ba["mean"] <= ba["ci_high"]
    assert set(summary["methods"]) == METHODS
    best = [c for c in summary["comparisons"] if c["best_baseline"]]
    assert best and best[0]["versus"] in BASELINES
    assert len(summary["siamese_training"]) == 3
    training = pd.read_csv(task / "training.tsv", sep="\t")
    assert len(training) == 3 * 116 and set(training.fold) == {1, 2, 3}
    calibration = pd.read_csv(task / "calibration.tsv", sep="\t")
    assert set(calibration.method) == METHODS and calibration.n.gt(0).all()
    assert summary["cohort"]["subjects"] == 24 and summary["classes"] == ["CN", "AD"]
    assert summary["permutation"]["n"] == 2 and summary["permutation"]["p_value"] >= 1 / 3
    assert summary["training"]["sloppy"] is True

    perm = pd.read_csv(task / "permutation.tsv", sep="\t")
    assert list(perm.columns[:2]) == ["permutation", "balanced_accuracy"] and len(perm) == 2
    roc = pd.read_csv(task / "roc.tsv", sep="\t")
    assert {"method", "repeat", "fold", "fpr", "tpr", "threshold"} <= set(roc.columns)
    hist = pd.read_csv(task / "history.tsv", sep="\t")
    assert list(hist.columns) == ["repeat", "fold", "stage", "epoch", "train_loss", "val_loss"]

    # relevance: the table, the maps painted from it, and the planted regions on top
    rel = pd.read_csv(task / "relevance.tsv", sep="\t")
    layout = regions.atlas_layout()
    assert rel.name.tolist() == list(layout.names)
    for suffix in ("", "_first_layer"):  # both Figure 7 readings, each a distribution
        assert np.isclose(rel[f"combined{suffix}"].sum(), 1.0)
        total = rel[f"mri{suffix}"] + rel[f"pet{suffix}"] + rel[f"similarity{suffix}"]
        assert np.allclose(total, rel[f"combined{suffix}"])
    import nibabel as nb

    img = nb.load(
        task / "space-MNI152NLin2009aSym_seg-AAL116_res-1p5_desc-relevancePET_stat.nii.gz"
    )
    assert img.shape == layout.grid_shape
    painted = np.asarray(img.dataobj).reshape(-1)[layout.grid_index()]
    assert np.allclose(layout.region_means(painted), rel.pet, rtol=1e-5)
    # Figure 6 counts painted the same way, with sidecars naming their table
    acts = pd.read_csv(task / "activations.tsv", sep="\t")
    for key, label in (("mri", "MRI"), ("pet", "PET"), ("fused", "Fused")):
        name = f"space-MNI152NLin2009aSym_seg-AAL116_res-1p5_desc-activation{label}_stat"
        img = nb.load(task / f"{name}.nii.gz")
        painted = np.asarray(img.dataobj).reshape(-1)[layout.grid_index()]
        assert np.allclose(layout.region_means(painted), acts[key], rtol=1e-5)
        meta = json.loads((task / f"{name}.json").read_text())
        assert meta["Table"] == "activations.tsv" and meta["Modality"] == key
    truth_regions = planted(synth_derivs)
    assert rank_auc(rel.combined, truth_regions.planted) >= 0.75
    acts = pd.read_csv(task / "activations.tsv", sep="\t")
    assert list(acts.columns) == ["index", "name", "mri", "pet", "fused"]

    # the bundle loads and predicts like the model it holds
    b = bundles.load_bundle(task, layout=layout)
    assert b.classes == ("CN", "AD") and b.meta["cohort"]["subjects"] == 24
    assert b.meta["cv_metrics"]["balanced_accuracy"]["mean"] == pytest.approx(ba["mean"])
    assert "torch" in b.meta["versions"] and b.meta["training"]["sloppy"] is True
    model = b.model(model_cls=md.FittedModel)
    assert model.predict_proba(cohort).shape == (len(cohort), 2)


def test_group_dry_run_and_quiet(ds, capsys, tmp_path):
    out = ds / "derivatives" / "bids_siamfuse"
    assert (
        run(ds, out, "group", "--classes", "AD", "CN", "--folds", "4", "--dry-run", double=True)
        == 0
    )
    text = capsys.readouterr().out
    assert "AD vs CN" in text and "4-fold" in text and "AD: 12 subject(s)" in text
    assert not (out / "group" / "AD_vs_CN").exists()
    # -q: nothing on stdout; the folder is named after the classes in the order given
    assert run(ds, out, "group", "--classes", "AD", "CN", "--folds", "2", "-q", double=True) == 0
    assert capsys.readouterr().out == ""
    summary = json.loads((out / "group" / "AD_vs_CN" / "summary.json").read_text())
    assert summary["positive_class"] == "CN"


@pytest.fixture
def bad_bids(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    return root


@pytest.mark.parametrize(
    ("args", "participants", "code", "needle"),
    [
        (["--classes", "CN"], None, 64, "at least two"),
        (["--classes", "CN", "CN"], None, 64, "more than once"),
        (["--classes", "CN", "XX"], None, 64, "XX: no participant has"),
        (["--folds", "13"], None, 65, "fewer than --folds 13"),
        (["--folds", "1"], None, 64, "2 or more"),
        (["--participant-label", "CN_SUBJECTS"], None, 65, "no region files for class(es) AD"),
        (["--session-label", "09"], None, 18, "no region file"),
        (["--device", "cuda"], None, 64, "no CUDA device"),
        ([], "missing", 65, "participants.tsv: missing"),
        ([], "nocolumn", 65, "no 'diagnosis' column"),
        (["--label-column", "group"], None, 65, "no 'group' column"),
        ([], "onlyCN", 64, "AD: no participant has"),
        ([], "unknownsub", 65, "lacks subject"),
    ],
)
def test_group_bad_input(ds, bad_bids, capsys, args, participants, code, needle):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = ds / "derivatives" / "bids_siamfuse"
    table = pd.read_csv(ds / "participants.tsv", sep="\t", dtype=str)
    if "CN_SUBJECTS" in args:
        cn = table.participant_id[table.diagnosis == "CN"].str[4:].tolist()
        i = args.index("CN_SUBJECTS")
        args = args[:i] + cn + args[i + 1 :]
    bids_dir = ds
    if participants is not None:
        bids_dir = bad_bids
        if participants == "nocolumn":
            table = table.drop(columns="diagnosis")
        elif participants == "onlyCN":
            table = table.assign(diagnosis="CN")
        elif participants == "unknownsub":
            table = table.iloc[1:]
        if participants != "missing":
            table.to_csv(bids_dir / "participants.tsv", sep="\t", index=False)
    classes = [] if "--classes" in args else ["--classes", "CN", "AD"]
    assert run(bids_dir, out, "group", *classes, *args, "--dry-run") == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_group_without_region_files(bad_bids, tmp_path, capsys):
    (bad_bids / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-01\tCN\n")
    assert run(bad_bids, tmp_path / "out", "group", "--classes", "CN", "AD", "--dry-run") == 64
    (bad_bids / "participants.tsv").write_text(
        "participant_id\tdiagnosis\nsub-01\tCN\nsub-02\tAD\n"
    )
    assert run(bad_bids, tmp_path / "out", "group", "--dry-run") == 66
    assert "run the participant level first" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# bundles and model application
# ----------------------------------------------------------------------------------------------


def test_bundle_round_trip_real(cohort, tmp_path):
    """The real network: save, load, same predictions; a tampered bundle is refused."""
    from bids_siamfuse.model import train

    small = cohort.subset(np.arange(10))
    model = train.fit(small, train.TrainConfig(epochs=1, sloppy=True, seed=1))
    path = md.save_fitted(model, cohort, tmp_path / "b", training={"epochs": 1})
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files
    loaded = bundles.load_bundle(path, layout=regions.atlas_layout())
    again = loaded.model()
    probe = cohort.subset(np.arange(10, 14))
    assert np.allclose(again.predict_proba(probe), model.predict_proba(probe), atol=1e-6)
    for k, v in model.relevance().items():
        assert np.allclose(again.relevance()[k], v)
    saved = json.loads(path.read_text())
    assert saved["standardization"] == model.standardizer.to_dict()
    assert saved["crop_boxes"] == cohort.layout.boxes.tolist()
    # weights changed after the JSON was written: refused
    weights = path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match the JSON"):
        bundles.load_bundle(path)


@pytest.fixture
def double_bundle(cohort, tmp_path):
    model = md.fit(cohort, TrainConfig())
    folder = tmp_path / "bundle"
    md.save_fitted(model, cohort, folder, cohort={"subjects": 24})
    return folder


def _foreign(bundle: Path) -> Path:
    """The same bundle, claiming another atlas."""
    meta = json.loads((bundle / "model.json").read_text())
    meta["signature"]["atlas_source_sha256"] = "0" * 64
    (bundle / "model.json").write_text(json.dumps(meta))
    return bundle


def test_mismatching_bundle_is_refused(ds, double_bundle, capsys):
    out = ds / "derivatives" / "bids_siamfuse"
    _foreign(double_bundle)
    with pytest.raises(DataError, match="another atlas or grid"):
        bundles.load_bundle(double_bundle, layout=regions.atlas_layout())
    code = run(ds, out, "participant", "--model", double_bundle, "--model-only")
    assert code == 65
    assert "another atlas or grid" in capsys.readouterr().err
    from bids_siamfuse.workflows.model import init_apply_model_wf

    with pytest.raises(DataError):
        init_apply_model_wf(bundle=double_bundle, output_dir=out)


def test_not_a_bundle(ds, tmp_path, capsys):
    fake = tmp_path / "model.json"
    fake.write_text('{"hello": 1}')
    out = ds / "derivatives" / "bids_siamfuse"
    assert run(ds, out, "participant", "--model", fake, "--model-only") == 65
    assert run(ds, out, "participant", "--model-only") == 64


def test_model_only_writes_outputs(ds, double_bundle, cohort, capsys):
    out = ds / "derivatives" / "bids_siamfuse"
    subject = str(cohort.subjects[0])
    args = ["--model", double_bundle, "--model-only", "--participant-label", subject]
    assert run(ds, out, "participant", *args, "--dry-run", double=True) == 0
    assert f"sub-{subject}" in capsys.readouterr().out
    assert run(ds, out, "participant", *args, double=True) == 0
    pet = sorted(out.glob(f"sub-{subject}/**/pet"))[0]
    probs = next(pet.glob("*_desc-diagnosis_probs.tsv"))
    table = pd.read_csv(probs, sep="\t")
    assert list(table.columns) == ["participant_id", "session", "predicted", "prob_CN", "prob_AD"]
    assert table[["prob_CN", "prob_AD"]].sum(1).iloc[0] == pytest.approx(1)
    sidecar = json.loads(probs.with_suffix(".json").read_text())
    assert sidecar["PredictedClass"] == table.predicted.iloc[0]
    assert sidecar["Model"]["Classes"] == ["CN", "AD"]
    rel = pd.read_csv(next(pet.glob("*_seg-AAL116_desc-relevance_stat.tsv")), sep="\t")
    assert list(rel.columns) == ["index", "name", "mri", "pet", "combined"]
    import nibabel as nb

    layout = regions.atlas_layout()
    for label, col in (("MRI", "mri"), ("PET", "pet"), ("Combined", "combined")):
        nii = next(
            pet.glob(
                f"*_space-MNI152NLin2009aSym_seg-AAL116_res-1p5_desc-relevance{label}_stat.nii.gz"
            )
        )
        img = nb.load(nii)
        assert img.shape == layout.grid_shape and np.allclose(img.affine, nb.load(nii).affine)
        vals = np.asarray(img.dataobj).reshape(-1)[layout.grid_index()]
        assert np.allclose(layout.region_means(vals), rel[col], rtol=1e-5)
        meta = json.loads((nii.parent / nii.name.replace(".nii.gz", ".json")).read_text())
        assert "Description" in meta and meta["Modality"] == col
        assert (pet / meta["Table"]).is_file()  # the map names its table
    # same numbers as the model applied directly
    model = bundles.load_bundle(double_bundle).model(model_cls=md.FittedModel)
    row = np.flatnonzero(cohort.subjects == subject)[0]
    direct = model.predict_proba(cohort.subset([row]))[0]
    assert np.allclose(table[["prob_CN", "prob_AD"]].values[0], direct, atol=1e-6)


def test_application_module_and_group_package_import_no_nipype_nor_torch():
    """--model-only applies bundles without nipype; importing the application module or the
    group package loads neither nipype nor torch (torch comes when a model is built)."""
    import subprocess
    import sys

    code = (
        "import sys, bids_siamfuse.apply, bids_siamfuse.group.plan, bids_siamfuse.group.run;"
        "print(sorted(m for m in ('nipype', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_apply_model_workflow(double_bundle, cohort, synth_derivs, tmp_path):
    from bids_siamfuse.workflows.model import init_apply_model_wf

    wf = init_apply_model_wf(
        bundle=double_bundle, output_dir=tmp_path / "out", model_cls=md.FittedModel
    )
    assert "siamese-attention" in wf.__desc__
    region_file = Path(cohort.sources[0])
    wf.inputs.inputnode.region_file = str(region_file)
    wf.inputs.inputnode.source_entities = {"subject": "xyz", "session": "01", "tracer": "FDG"}
    wf.base_dir = str(tmp_path / "work")
    wf.run()
    written = sorted(p.name for p in (tmp_path / "out" / "sub-xyz" / "ses-01" / "pet").iterdir())
    assert "sub-xyz_ses-01_trc-FDG_desc-diagnosis_probs.tsv" in written
    assert len([n for n in written if n.endswith("_stat.nii.gz")]) == 3


# ----------------------------------------------------------------------------------------------
# the real network through the CLI
# ----------------------------------------------------------------------------------------------


def test_group_cli_real_network(synth_derivs, ds, capsys):
    """``bids_siamfuse DS DS/derivatives/bids_siamfuse group ... --sloppy`` end to end."""
    out = synth_derivs / "derivatives" / "bids_siamfuse"
    args = ["--classes", "CN", "AD", "--folds", "3", "--sloppy", "--epochs", "2"]
    args += ["--no-ablations"]  # the ablations of the real network: test_model_train.py
    code = run(synth_derivs, out, "group", *args, "--device", "cpu", "--random-seed", "1")
    assert code == 0
    task = out / "group" / "CN_vs_AD"
    assert GROUP_FILES <= {p.name for p in task.iterdir()}
    hist = pd.read_csv(task / "history.tsv", sep="\t")
    assert set(hist.stage) == {"siamese", "attention"} and hist.epoch.max() <= 2
    assert set(pd.read_csv(task / "metrics.tsv", sep="\t").method) == METHODS - ABLATIONS
    training = pd.read_csv(task / "training.tsv", sep="\t")  # the real record of every fold
    assert len(training) == 3 * 116 and training.kept_epoch.between(0, 2).all()
    moved = training[training.trained]
    assert (moved.val_hinge_improvement > 0).all()
    assert (training[~training.trained].val_hinge_improvement == 0).all()
    err = capsys.readouterr().err
    assert "fold 3" in err and "epoch" in err  # progress on the terminal
    # the bundle applies to a session of the copy (participant level, --model-only)
    subject = sorted(p.name for p in (ds / "derivatives" / "bids_siamfuse").glob("sub-*"))[0]
    args = ["--model", task, "--model-only", "--participant-label", subject[4:]]
    code = run(ds, ds / "derivatives" / "bids_siamfuse", "participant", *args)
    assert code == 0
    assert list((ds / "derivatives" / "bids_siamfuse" / subject).glob("**/*_probs.tsv"))


# ----------------------------------------------------------------------------------------------
# evidence with the real network (slow)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strong32(tmp_path_factory) -> Path:
    from bids_siamfuse.synth import generate

    return generate(
        tmp_path_factory.mktemp("strong32") / "ds",
        n_per_group=16,
        groups=("CN", "AD"),
        seed=21,
        effect_size=1.5,
        two_session_fraction=0.15,
        preprocessed=True,
        raw=False,
        jobs=2,
    )


@pytest.fixture(scope="module")
def strong32_cv(strong32):
    data = load_cohort(strong32 / "derivatives" / "bids_siamfuse", read_participants(strong32))
    return data, cv.cross_validate(
        data,
        folds=4,
        seed=42,
        permutations=1,
        config=TrainConfig(sloppy=True),
        final_model=False,
    )


@pytest.mark.slow
def test_real_model_separates_strong_effect(strong32_cv):
    _, res = strong32_cv
    # ratios of counts: compare without float-summation noise (0.9 may come out 0.8999...)
    assert res.mean_balanced_accuracy() >= 0.9 - 1e-9, res.summary[cv.MODEL_METHOD]


@pytest.mark.slow
def test_real_model_shuffled_labels_score_chance(strong32_cv):
    _, res = strong32_cv
    null = res.permutations[0][cv.MODEL_METHOD]
    assert null <= 0.75, null


@pytest.mark.slow
def test_real_model_relevance_on_planted_regions(strong32, strong32_cv):
    data, res = strong32_cv
    truth = planted(strong32)
    assert truth.name.tolist() == list(data.layout.names)
    assert rank_auc(res.relevance["combined"], truth.planted) >= 0.65


@pytest.mark.slow
def test_real_model_effect_size_zero_scores_chance(tmp_path_factory):
    from bids_siamfuse.synth import generate

    root = generate(
        tmp_path_factory.mktemp("null") / "ds",
        n_per_group=12,
        groups=("CN", "AD"),
        seed=5,
        effect_size=0.0,
        two_session_fraction=0.15,
        preprocessed=True,
        raw=False,
        jobs=2,
    )
    data = load_cohort(root / "derivatives" / "bids_siamfuse", read_participants(root))
    res = cv.cross_validate(
        data, folds=3, seed=42, config=TrainConfig(sloppy=True), final_model=False
    )
    assert res.mean_balanced_accuracy() <= 0.75, res.summary[cv.MODEL_METHOD]


# ----------------------------------------------------------------------------------------------
# issue 12: the group report a reviewer can read (DOM from headless Chromium, parsed)
# ----------------------------------------------------------------------------------------------


class _Dom:
    """A minimal element tree of an HTML document (tags, attributes, text), from html.parser."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        root = {"tag": "root", "attrs": {}, "children": [], "text": ""}
        stack = [root]
        void = {"img", "br", "meta", "link", "input", "hr", "col", "source"}

        class P(HTMLParser):
            def handle_starttag(self, tag, attrs):
                node = {"tag": tag, "attrs": dict(attrs), "children": [], "text": ""}
                stack[-1]["children"].append(node)
                if tag not in void:
                    stack.append(node)

            def handle_endtag(self, tag):
                for i in range(len(stack) - 1, 0, -1):
                    if stack[i]["tag"] == tag:
                        del stack[i:]
                        break

            def handle_data(self, data):
                stack[-1]["text"] += data

        P().feed(text)
        self.root = root

    def find_all(self, tag=None, node=None, **attrs):
        node = node or self.root
        out = []
        for child in node["children"]:
            if (tag is None or child["tag"] == tag) and all(
                child["attrs"].get(k) == v for k, v in attrs.items()
            ):
                out.append(child)
            out.extend(self.find_all(tag, child, **attrs))
        return out

    @staticmethod
    def text(node) -> str:
        return (node["text"] + "".join(_Dom.text(c) for c in node["children"])).strip()


def _report_dom(html: Path) -> _Dom:
    """The report's DOM after Chromium loaded it (offline), or the file when no browser."""
    import subprocess

    from test_reports import _OFFLINE, _chromium

    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    work = html.parent / ".browser"
    dom = subprocess.run(
        [browser, *_OFFLINE, f"--user-data-dir={work}", "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(work)},
    )
    assert "<table" in dom.stdout, dom.stderr[-2000:]
    return _Dom(dom.stdout)


def test_group_report_structure_in_browser(ds, tmp_path, copy_cohort):
    import re

    root = copy_cohort(ds, tmp_path / "ds")
    out = root / "derivatives" / "bids_siamfuse"
    args = ["--classes", "CN", "AD", "--folds", "3", "--repeats", "2", "--sloppy"]
    assert run(root, out, "group", *args, "--permutation-tests", "1", double=True) == 0
    dom = _report_dom(out / "group" / "report.html")
    task = "CN_vs_AD"
    # Table 2: the model, then its ablations, then the baselines; every cell mean [CI]
    table = dom.find_all("table", id=f"{task}-table2")[0]
    rows = dom.find_all("tr", table)[1:]
    kinds = [r["attrs"]["data-kind"] for r in rows]
    assert kinds == sorted(kinds, key=["model", "ablation", "baseline"].index)
    assert set(kinds) == {"model", "ablation", "baseline"}
    assert {r["attrs"]["data-method"] for r in rows} == METHODS
    header = [_Dom.text(th) for th in dom.find_all("th", table)]
    ba_col = header.index("balanced accuracy")
    ci = re.compile(r"^-?\d\.\d{3} \[-?\d+\.\d{3}, -?\d+\.\d{3}\]$")
    for r in rows:
        cells = dom.find_all("td", r)
        assert ci.match(_Dom.text(cells[ba_col])), _Dom.text(cells[ba_col])
        assert len(cells) == len(header)
    # the paired comparison: one row per other method, exactly one best baseline
    comp = dom.find_all("table", id=f"{task}-comparisons")[0]
    comp_rows = dom.find_all("tr", comp)[1:]
    assert {r["attrs"]["data-versus"] for r in comp_rows} == METHODS - {cv.MODEL_METHOD}
    assert sum(r["attrs"].get("class") == "model" for r in comp_rows) == 1
    # per-repeat table (2 repeats), calibration figure + Brier, siamese training per fold
    per_repeat = dom.find_all("table", id=f"{task}-per-repeat")[0]
    assert len(dom.find_all("th", per_repeat)) == 1 + 2
    assert len(dom.find_all("tr", dom.find_all("table", id=f"{task}-training")[0])) == 1 + 6
    brier = dom.find_all("table", id=f"{task}-brier")[0]
    assert len(dom.find_all("tr", brier)) >= 3
    alts = [img["attrs"].get("alt") for img in dom.find_all("img")]
    for alt in ("ROC curves per fold and mean", "reliability curves", "relevance maps"):
        assert alt in alts
    for img in dom.find_all("img"):
        assert img["attrs"]["src"].startswith("data:image/png;base64,")
    ids = {h["attrs"].get("id") for h in dom.find_all("h3")}
    for part in ("metrics", "comparison", "repeats", "roc", "calibration", "siamese"):
        assert f"{task}-{part}" in ids
    perm = dom.find_all("table", id=f"{task}-permutation-p")[0]
    assert {r["attrs"]["data-method"] for r in dom.find_all("tr", perm)[1:]} == METHODS


# ----------------------------------------------------------------------------------------------
# issue 12 acceptance (slow): realistic cohorts, 60 subjects per class, sloppy mode, 5 folds.
# The same runs as benchmarks/run_acceptance.py (evaluation seeds 11xx; docs/benchmarks.md).
# ----------------------------------------------------------------------------------------------


def _acceptance_devices(workers: int = 1) -> list[str] | None:
    """A GPU where there is one: these runs take hours on 2 CPU cores and minutes on one H200,
    where the thresholds were measured (docs/benchmarks.md); ``workers`` > 1 shares it between
    worker processes (the permutation reruns). ``None``: the CPU, as everywhere else."""
    import torch

    return ["cuda:0"] * workers if torch.cuda.is_available() else None


def _generator_jobs() -> int:
    # the cohort does not depend on the number of processes (seeded per subject); use the cores
    return max(2, min(14, len(os.sched_getaffinity(0))))


def _effect_cohort(tmp_path_factory, effect: str, seed: int, n: int = 60):
    from bids_siamfuse.synth import generate

    root = generate(
        tmp_path_factory.mktemp(f"{effect}{seed}") / "ds",
        n_per_group=n,
        groups=("CN", "AD"),
        seed=seed,
        effect=effect,
        preprocessed=True,
        raw=False,
        regions_only=True,
        jobs=_generator_jobs(),
    )
    data = load_cohort(root / "derivatives" / "bids_siamfuse", read_participants(root))
    return root, data


def _acceptance_cv(data, *, sloppy=True, **kw):
    return cv.cross_validate(
        data,
        folds=5,
        seed=42,
        config=TrainConfig(sloppy=sloppy),
        final_model=False,
        devices=_acceptance_devices(),
        **kw,
    )


def _ci_covers(stats, value=0.5) -> bool:
    return stats["ci_low"] <= value <= stats["ci_high"]


@pytest.fixture(scope="module")
def coupling_eval(tmp_path_factory):
    root, data = _effect_cohort(tmp_path_factory, "coupling", 1101)
    return root, data, _acceptance_cv(data, repeats=2)


@pytest.fixture(scope="module")
def ad_eval(tmp_path_factory):
    # the default model (not sloppy): the acceptance is about it, and sloppy mode misses the
    # 0.03 margin on ad-1102 by 0.007 (docs/benchmarks.md, third session; GPU: -0.029 default;
    # both before the early-stopping order fix, -0.038 after it: AD_NOT_MET)
    root, data = _effect_cohort(tmp_path_factory, "ad", 1102)
    return root, data, _acceptance_cv(data, sloppy=False, repeats=2)


COUPLING_NOT_MET = (
    "issue 12 acceptance not met (docs/benchmarks.md): on coupling-1101 the model scored "
    "0.52-0.55 (target 0.85) and ranked the planted regions at 0.32 (target 0.85); a logistic "
    "regression on per-region GM x PET products reaches 0.61-0.78 on this family (0.85-0.91 "
    "only when told the planted regions), so the target is at or above what the data allow"
)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=COUPLING_NOT_MET)
def test_acceptance_coupling_model_beats_every_linear_baseline(coupling_eval):
    _, _, res = coupling_eval
    assert res.mean_balanced_accuracy() >= 0.85, res.summary[cv.MODEL_METHOD]
    for method in BASELINES:
        assert res.mean_balanced_accuracy(method) <= 0.65, (method, res.summary[method])


AD_NOT_MET = (
    "issue 12 acceptance not met (docs/benchmarks.md, fifth session): with per-region early "
    "stopping restoring each region's own snapshot (the order fix of 2026-12-01) the model "
    "scored 0.933 on ad-1102 (H200, 2 x 5 folds) against 0.971 for the best baseline, 0.008 "
    "short of the 0.03 margin; before the fix it was 0.029 short, inside it"
)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=AD_NOT_MET)
def test_acceptance_ad_model_within_003_of_best_baseline(ad_eval):
    _, _, res = ad_eval
    best = max(res.mean_balanced_accuracy(m) for m in BASELINES)
    assert res.mean_balanced_accuracy() >= best - 0.03, res.summary


@pytest.mark.slow
@pytest.mark.parametrize(
    "which",
    [
        pytest.param(
            "coupling_eval", marks=pytest.mark.xfail(strict=True, reason=COUPLING_NOT_MET)
        ),
        "ad_eval",
    ],
)
def test_acceptance_relevance_ranks_planted_regions_first(which, request):
    root, data, res = request.getfixturevalue(which)
    truth = planted(root)
    assert truth.name.tolist() == list(data.layout.names)
    assert rank_auc(res.relevance["combined"], truth.planted) >= 0.85


@pytest.mark.slow
def test_acceptance_planted_networks_train_in_every_fold(ad_eval):
    root, _, res = ad_eval
    truth = planted(root).planted.to_numpy()
    training = pd.DataFrame(res.training)
    for _, fold in training.groupby(["repeat", "fold"]):
        trained = fold.sort_values("index").trained.to_numpy()
        assert trained[truth].mean() >= 0.9, trained[truth].mean()


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", [False, True])
def test_acceptance_no_effect_and_shuffled_labels_score_chance(tmp_path_factory, shuffle):
    import dataclasses

    if shuffle:
        _, data = _effect_cohort(tmp_path_factory, "ad", 1102)
        labels = shuffle_subject_labels(data.subjects, data.labels, 7)
        data = dataclasses.replace(data, labels=labels)
    else:
        _, data = _effect_cohort(tmp_path_factory, "none", 1103)
    # 5 folds, 19 permutations, as measured on the GPU (docs/benchmarks.md, third session: every
    # interval covers 0.5, the lowest p of any method is 0.10 on none-1103 and 0.40 shuffled)
    res = cv.cross_validate(
        data,
        folds=5,
        seed=42,
        permutations=19,
        config=TrainConfig(sloppy=True),
        final_model=False,
        devices=_acceptance_devices(workers=6),
    )
    for method in res.methods:
        assert _ci_covers(res.summary[method]["balanced_accuracy"]), (method, res.summary[method])
        assert res.p_values[method] > 0.05, (method, res.p_values[method])


def test_methods_text_states_what_ran():
    from bids_siamfuse.reports.boilerplate import group_text

    base = {"classes": ["CN", "AD"], "cross_validation": {"folds": 5, "repeats": 2}}
    paper = group_text(
        {**base, "training": {"epochs": 200, "sloppy": True, "fusion": "paper", "gate": "paired"}}
    )
    assert "sloppy mode" in paper and "at most 30 epochs" in paper  # sloppy caps at 30
    assert "As in the original method" in paper and "paired t-test" in paper
    assert "repeated 2 times" in paper and "[@nadeau]" in paper
    sim = group_text(
        {
            **base,
            "training": {"epochs": 200, "fusion": "similarity", "gate": "se"},
            "methods": ["siamese_attention", "siamese_attention_untrained", "svm_gm"],
        }
    )
    assert "Beyond the original method" in sim and "two standard errors" in sim
    assert "at most 200 epochs" in sim and "sloppy" not in sim
    assert "Ablations were trained in the same folds: untrained" in sim
