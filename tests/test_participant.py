"""End to end: ``bids_siamfuse DS OUT participant --sloppy`` on a tiny synthetic cohort.

Two subjects; the second one's T1w holds no data (a valid header, zeros inside), so its
workflow fails inside nipype while the first completes: the run exits 1, names the failure,
and writes nothing for the failed subject under a final derivative name. A rerun with the same
work directory reuses every finished node.
"""

from __future__ import annotations

import json
import tempfile
import time

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from bids_siamfuse import bids
from bids_siamfuse.data.templates import GRID_AFFINE, GRID_SHAPE

GRID_KEYS = ("gm_mni", "gm_mni_modulated", "pet_mni")
TABLE_KEYS = ("regions", "gm_morph", "pet_stats")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from bids_siamfuse.synth import generate

    root = tmp_path_factory.mktemp("participant")
    ds = generate(
        root / "ds",
        n_per_group=1,
        groups=("CN", "AD"),
        seed=7,
        two_session_fraction=0.0,
        preprocessed=True,  # the perfect derivatives, to compare names and sidecars with
        jobs=2,
    )
    bad = sorted(ds.glob("sub-002/ses-01/anat/*_T1w.nii.gz"))[0]
    img = nb.load(bad)
    nb.Nifti1Image(np.zeros(img.shape, np.int16), img.affine, img.header).to_filename(bad)
    return root, ds


def _run(ds, out, work):
    from bids_siamfuse.cli.run import main

    args = [ds, out, "participant", "--sloppy", "-w", work, "--skip-bids-validation"]
    args += ["--nprocs", "2", "--omp-nthreads", "2"]
    t0 = time.time()
    code = main([str(a) for a in args])
    return code, time.time() - t0


@pytest.fixture(scope="module")
def first_run(tiny):
    root, ds = tiny
    out, work = root / "out", root / "work"
    system_tmp = root / "system_tmp"  # stands for /tmp: the run must leave nothing there
    system_tmp.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(system_tmp))
        mp.setenv("TMPDIR", str(system_tmp))
        code, seconds = _run(ds, out, work)
    return ds, out, work, code, seconds


def test_no_temporary_file_left_behind(first_run, tiny):
    """antspyx writes temporaries with tempfile.mktemp (e.g. Atropos' antsr*prob*.nii.gz):
    every ANTs node keeps them in its own folder and removes them."""
    root, _ = tiny
    assert sorted(p.name for p in (root / "system_tmp").iterdir()) == []
    assert not [p for p in first_run[2].rglob("tmp") if p.is_dir()]


def test_exit_code_and_summary(first_run):
    ds, out, work, code, _ = first_run
    assert code == 1  # one subject failed
    table = pd.read_csv(next((out / "logs").glob("participant-*.tsv")), sep="\t", dtype=str)
    status = dict(zip(table["subject"], table["status"]))
    assert status == {"001": "ok", "002": "failed"}
    failed = table[table["subject"] == "002"].iloc[0]
    assert failed["node"].endswith("bias") and "zero" in failed["message"]
    assert list((out / "sub-002" / "log").glob("*/crash-*.txt"))
    # nothing downstream of the failure; what was written (the PET reference, which does
    # not need the T1w) is complete: no temporary file, every data file has its sidecar
    pet = {"subject": "002", "session": "01", "tracer": "FDG"}
    for key in GRID_KEYS + TABLE_KEYS:
        source = pet if bids.OUTPUTS[key]["datatype"] == "pet" else pet | {"tracer": None}
        assert not bids.output_path(out, key, source).exists(), key
    written = [p for p in (out / "sub-002").rglob("*") if p.is_file() and "log" not in p.parts]
    assert not [p for p in written if p.name.startswith(".")]
    for path in written:
        if not path.name.endswith(".json"):
            assert path.with_name(path.name.split(".")[0] + ".json").is_file()


def test_outputs_match_the_perfect_run(first_run):
    """Same names, grid, dtype and sidecar fields as the synthetic perfect derivatives."""
    ds, out, _, _, _ = first_run
    perfect = ds / "derivatives" / "bids_siamfuse"
    anat = {"subject": "001", "session": "01"}
    pet = {**anat, "tracer": "FDG"}
    for key in GRID_KEYS + TABLE_KEYS:
        source = pet if bids.OUTPUTS[key]["datatype"] == "pet" else anat
        ours, ref = bids.output_path(out, key, source), bids.output_path(perfect, key, source)
        assert ours.is_file(), key
        assert ours.name == ref.name
        meta = json.loads(ours.with_name(ours.name.split(".")[0] + ".json").read_text())
        ref_meta = json.loads(ref.with_name(ref.name.split(".")[0] + ".json").read_text())
        assert set(meta) == set(ref_meta), key
        assert meta["Sources"] and all(s.startswith("bids:raw:") for s in meta["Sources"])
        if key in GRID_KEYS:
            img = nb.load(ours)
            assert img.shape == GRID_SHAPE and np.allclose(img.affine, GRID_AFFINE)
            assert img.get_data_dtype() == np.float32
    for key in ("t1w_preproc", "t1w_mask", "t1w_gm", "t1w_dseg", "t1w2mni_xfm", "mni2t1w_xfm"):
        assert bids.output_path(out, key, anat).is_file(), key
    for key in ("pet_ref", "pet2t1w_xfm", "pet_confounds"):
        assert bids.output_path(out, key, pet).is_file(), key
    figures = sorted(p.name for p in (out / "sub-001" / "figures").glob("*.svg"))
    assert figures == sorted(
        bids.output_path(
            out, k, anat if k in ("fig_seg", "fig_t1w2mni", "fig_regions") else pet
        ).name
        for k in ("fig_seg", "fig_t1w2mni", "fig_regions", "fig_pet_coreg", "fig_pet_mni")
    )
    # the group level finds the region file and accepts its atlas/grid signature
    from bids_siamfuse.preproc.regions import atlas_layout, find_region_files

    files = find_region_files(out)
    assert [f.name.split("_")[0] for f in files] == ["sub-001"]
    with np.load(files[0]) as f:
        assert json.loads(str(f["signature"])) == atlas_layout().signature
        assert f["gm"].shape == f["pet"].shape == (atlas_layout().n_voxels,)


def test_sloppy_accuracy(first_run):
    """Even --sloppy lands close to the truth (the full-accuracy check is the slow test)."""
    ds, out, _, _, _ = first_run
    truth = ds / "derivatives" / "synth-truth" / "sub-001" / "ses-01" / "anat"
    ours = nb.load(bids.output_path(out, "gm_mni", {"subject": "001", "session": "01"}))
    true = nb.load(sorted(truth.glob("*_res-1p5_label-GM_probseg.nii.gz"))[0])
    a, b = ours.get_fdata() > 0.5, true.get_fdata() > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8
    pet_src = {"subject": "001", "session": "01", "tracer": "FDG"}
    p_ours = nb.load(bids.output_path(out, "pet_mni", pet_src)).get_fdata().ravel()
    perfect = ds / "derivatives" / "bids_siamfuse"
    p_ref = nb.load(bids.output_path(perfect, "pet_mni", pet_src)).get_fdata().ravel()
    assert np.corrcoef(p_ours, p_ref)[0, 1] > 0.95


def test_rerun_reuses_the_work_directory(first_run):
    ds, out, work, _, seconds = first_run
    results = sorted(work.rglob("result_register.pklz")) + sorted(work.rglob("result_syn*.pklz"))
    stamps = {p: p.stat().st_mtime for p in results}
    assert stamps
    code, again = _run(ds, out, work)
    assert code == 1
    assert {p: p.stat().st_mtime for p in results} == stamps  # not recomputed
    assert again < 0.6 * seconds


def test_participant_output_is_valid_bids(first_run, bids_validator):
    """bids-validator-deno accepts the participant output (warnings documented in
    docs/outputs.md), including a failed subject's crash-file folder."""
    _, out, _, _, _ = first_run
    code, issues, errors = bids_validator(out)
    assert code == 0, errors
    assert {c for c, sev in issues if sev == "warning"} <= {"TOO_FEW_AUTHORS"}
    assert (out / ".bidsignore").is_file() and (out / "README.md").is_file()


def test_qc_table_and_flag_reach_the_status_table(first_run):
    """The workflow writes the session's QC table; its verdict is the status table's."""
    from bids_siamfuse.preproc import qc

    ds, out, _, _, _ = first_run
    source = {"subject": "001", "session": "01", "tracer": "FDG"}
    path = bids.output_path(out, "qc", source)
    assert path.name == "sub-001_ses-01_trc-FDG_desc-qc_stats.tsv"
    table = pd.read_csv(path, sep="\t", keep_default_na=False)
    assert list(table.columns) == qc.COLUMNS
    values = dict(zip(table.metric, table.value))
    for metric in qc.THRESHOLDS:  # every metric measured by the workflow
        assert metric in values, metric
        assert np.isfinite(float(values[metric])), metric
    assert float(values["t1w_voxel_max_mm"]) <= 2.0
    flagged, reasons = qc.read_qc(path)
    status = pd.read_csv(next((out / "logs").glob("participant-*.tsv")), sep="\t", dtype=str)
    row = status[status["subject"] == "001"].iloc[0]
    assert row["qc"] == ("flagged" if flagged else "pass")
    assert row["status"] == ("flagged" if flagged else "ok")
    # the sound synthetic subject passes every check (thresholds catch gross failures only)
    assert not flagged, reasons
    assert "Quality metrics" in (out / "sub-001.html").read_text()
