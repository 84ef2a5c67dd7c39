"""Ingestion (pairs, pairing rule, labels) and derivative writing."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_siamfuse import bids
from bids_siamfuse.errors import DataError, NothingSelectedError

PET_META = {"TracerName": "FDG", "Units": "Bq/mL", "FrameTimesStart": [0], "FrameDuration": [1800]}


def make_ds(root: Path, files: list[str], sessions_tsv: dict | None = None) -> Path:
    """A BIDS folder holding tiny images at the given relative paths."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "t", "BIDSVersion": "1.10.0"})
    )
    img = nb.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.to_filename(str(path))
        if "_pet" in rel:
            path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(PET_META))
    for sub, rows in (sessions_tsv or {}).items():
        lines = ["session_id\tacq_time"] + [f"ses-{s}\t{t}" for s, t in rows]
        (root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").write_text("\n".join(lines) + "\n")
    return root


def pairs_of(root, **kw):
    plan = bids.collect_pairs(bids.load_layout(root), **kw)
    return plan, [(p.subject, p.session, p.t1w.name, p.pet.name) for p in plan.pairs]


def test_no_sessions(tmp_path):
    root = make_ds(
        tmp_path / "ds", ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/pet/sub-01_trc-FDG_pet.nii.gz"]
    )
    plan, pairs = pairs_of(root)
    assert pairs == [("01", None, "sub-01_T1w.nii.gz", "sub-01_trc-FDG_pet.nii.gz")]
    assert plan.pairs[0].pet_meta["Units"] == "Bq/mL"
    assert plan.pairs[0].key == "sub-01_trc-FDG"


def test_two_sessions_and_missing_pet(tmp_path):
    root = make_ds(
        tmp_path / "ds",
        [
            "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
            "sub-01/ses-1/pet/sub-01_ses-1_trc-FDG_pet.nii.gz",
            "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
            "sub-01/ses-2/pet/sub-01_ses-2_trc-FDG_pet.nii.gz",
            "sub-01/ses-3/anat/sub-01_ses-3_T1w.nii.gz",
        ],
    )
    plan, pairs = pairs_of(root)
    assert [(s, e) for s, e, *_ in pairs] == [("01", "1"), ("01", "2")]
    assert ("01", "3", "T1w but no PET with trc-FDG") in plan.skipped
    assert "sub-01 ses-3: T1w but no PET" in plan.describe()


def test_missing_t1w_uses_nearest_session(tmp_path):
    root = make_ds(
        tmp_path / "ds",
        [
            "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz",
            "sub-01/ses-06/anat/sub-01_ses-06_T1w.nii.gz",
            "sub-01/ses-04/pet/sub-01_ses-04_trc-FDG_pet.nii.gz",
        ],
    )
    plan, pairs = pairs_of(root)
    assert pairs == [("01", "04", "sub-01_ses-06_T1w.nii.gz", "sub-01_ses-04_trc-FDG_pet.nii.gz")]
    assert plan.pairs[0].t1w_session == "06"
    assert "nearest" in plan.pairs[0].notes[0]
    with pytest.raises(NothingSelectedError):
        pairs_of(root, pairing="same-session")


def test_nearest_uses_acq_time(tmp_path):
    files = [
        "sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz",
        "sub-01/ses-b/anat/sub-01_ses-b_T1w.nii.gz",
        "sub-01/ses-c/pet/sub-01_ses-c_trc-FDG_pet.nii.gz",
    ]
    # label order would pick ses-b; acq_time says ses-a is the nearer one
    times = {
        "01": [
            ("a", "2020-01-01T00:00:00"),
            ("b", "2015-01-01T00:00:00"),
            ("c", "2020-06-01T00:00:00"),
        ]
    }
    root = make_ds(tmp_path / "ds", files, times)
    _, pairs = pairs_of(root)
    assert pairs[0][2] == "sub-01_ses-a_T1w.nii.gz"


def test_two_tracers_and_two_t1w_runs(tmp_path):
    root = make_ds(
        tmp_path / "ds",
        [
            "sub-01/anat/sub-01_run-1_T1w.nii.gz",
            "sub-01/anat/sub-01_run-2_T1w.nii.gz",
            "sub-01/pet/sub-01_trc-FDG_pet.nii.gz",
            "sub-01/pet/sub-01_trc-PiB_pet.nii.gz",
        ],
    )
    plan, pairs = pairs_of(root)
    assert pairs == [("01", None, "sub-01_run-1_T1w.nii.gz", "sub-01_trc-FDG_pet.nii.gz")]
    assert "ignoring sub-01_run-2_T1w.nii.gz" in plan.pairs[0].notes[0]
    _, pib = pairs_of(root, tracer="PiB")
    assert pib[0][3] == "sub-01_trc-PiB_pet.nii.gz"
    _, run2 = pairs_of(root, bids_filters={"t1w": {"run": 2}})
    assert run2[0][2] == "sub-01_run-2_T1w.nii.gz"


def test_subject_without_t1w_and_filters(tmp_path):
    root = make_ds(
        tmp_path / "ds",
        [
            "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-01/pet/sub-01_trc-FDG_pet.nii.gz",
            "sub-02/pet/sub-02_trc-FDG_pet.nii.gz",
        ],
    )
    plan, pairs = pairs_of(root)
    assert [p[0] for p in pairs] == ["01"]
    assert ("02", None, "no T1w image in any session") in plan.skipped
    with pytest.raises(NothingSelectedError, match="sub-07"):
        pairs_of(root, participant_label=["07"])
    with pytest.raises(NothingSelectedError):
        pairs_of(root, participant_label=["02"])


def test_participants_table(tmp_path):
    (tmp_path / "participants.tsv").write_text(
        "participant_id\tdiagnosis\tage\nsub-01\tCN\t70\nsub-02\tAD\t80\n"
    )
    table = bids.read_participants(tmp_path)
    assert table.loc["02", "diagnosis"] == "AD"
    with pytest.raises(DataError, match="no 'dx' column"):
        bids.read_participants(tmp_path, "dx")
    (tmp_path / "participants.tsv").write_text(
        "participant_id\tdiagnosis\nsub-01\tCN\nsub-01\tAD\n"
    )
    with pytest.raises(DataError, match="twice"):
        bids.read_participants(tmp_path)
    (tmp_path / "participants.tsv").unlink()
    with pytest.raises(DataError, match="missing"):
        bids.read_participants(tmp_path)


def test_build_path_nipreps_names():
    src = {"subject": "01", "session": "01", "tracer": "FDG"}
    path = bids.output_path(Path("/o"), "pet_mni", src)
    assert str(path) == (
        "/o/sub-01/ses-01/pet/sub-01_ses-01_trc-FDG_space-MNI152NLin2009aSym_res-1p5_"
        "desc-preproc_pet.nii.gz"
    )
    anat = bids.output_path(Path("/o"), "gm_mni_modulated", {"subject": "01", "session": "01"})
    assert anat.name == (
        "sub-01_ses-01_space-MNI152NLin2009aSym_res-1p5_label-GM_desc-modulated_probseg.nii.gz"
    )
    assert (
        bids.build_name({"sub": "01", "seg": "AAL116", "desc": "relevance"}, "stat", ".nii.gz")
        == "sub-01_seg-AAL116_desc-relevance_stat.nii.gz"
    )


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "x.json"
    with pytest.raises(RuntimeError):
        with bids.atomic_path(target) as tmp:
            tmp.write_text("{partial")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    bids.save_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def _describe(args):
    out, bids_dir = args
    return bids.ensure_dataset_description(Path(out), Path(bids_dir)).read_text()


def test_dataset_description_concurrent(tmp_path):
    out = tmp_path / "deriv"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        texts = pool.map(_describe, [(str(out), str(tmp_path))] * 32)
    first = json.loads((out / "dataset_description.json").read_text())
    assert first["DatasetType"] == "derivative"
    assert first["GeneratedBy"][0]["Name"] == "bids_siamfuse"
    assert all(json.loads(t) == first for t in texts)
    names = sorted(p.name for p in out.iterdir())
    assert names == [".bidsignore", "README.md", "dataset_description.json"]
