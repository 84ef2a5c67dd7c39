"""The synthetic cohort: valid BIDS, consistent ground truth, deterministic, effect control."""

from __future__ import annotations

import json
import subprocess

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from bids_siamfuse import synth
from bids_siamfuse.data.templates import GRID_AFFINE, GRID_SHAPE


def test_passes_bids_validator(synth_raw):
    proc = subprocess.run(
        ["bids-validator-deno", str(synth_raw), "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(proc.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == []
    assert sorted(report["summary"]["subjects"]) == ["001", "002"]


def test_layout_and_participants(synth_raw):
    table = pd.read_csv(synth_raw / "participants.tsv", sep="\t")
    assert sorted(table["diagnosis"]) == ["AD", "CN"]
    assert {"participant_id", "age", "sex", "MMSE"} <= set(table.columns)
    pet = sorted(synth_raw.glob("sub-*/ses-*/pet/*_pet.json"))
    meta = json.loads(pet[0].read_text())
    for key in (
        "TracerName",
        "TracerRadionuclide",
        "InjectedRadioactivity",
        "TimeZero",
        "ScanStart",
        "InjectionStart",
        "FrameTimesStart",
        "FrameDuration",
        "Units",
        "ReconMethodName",
        "AttenuationCorrection",
        "ModeOfAdministration",
    ):
        assert key in meta
    assert meta["Units"] == "Bq/mL"
    multi = list(synth_raw.glob("sub-*/sub-*_sessions.tsv"))
    assert len(multi) == 1


def _truth_pairs(root):
    for t1 in sorted(root.glob("sub-*/ses-*/anat/*_T1w.nii.gz")):
        sub = t1.name.split("_")[0][4:]
        ses = t1.name.split("_")[1][4:]
        yield sub, ses, t1


def test_truth_mapping_reproduces_native_gm(synth_raw):
    """Warping the true MNI GM through the stored mapping gives the stored native GM."""
    for sub, ses, _t1 in _truth_pairs(synth_raw):
        truth = synth.load_truth(synth_raw, sub, ses)
        native_gm = nb.load(str(truth.folder / f"sub-{sub}_ses-{ses}_label-GM_probseg.nii.gz"))
        gm_data = np.asanyarray(native_gm.dataobj, dtype=np.float32)
        mni_gm = nb.load(
            str(
                truth.folder
                / (f"sub-{sub}_ses-{ses}_space-MNI152NLin2009aSym_res-1p5_label-GM_probseg.nii.gz")
            )
        )
        rng = np.random.default_rng(0)
        idx = np.argwhere(gm_data > 0.05)
        idx = idx[rng.choice(len(idx), 20000, replace=False)].T.astype(np.float32)
        native_pts = synth.apply_affine(native_gm.affine, idx)
        mni_pts = truth.mapping.native_to_mni(native_pts)
        expected = synth.sample(np.asanyarray(mni_gm.dataobj), mni_gm.affine, mni_pts)
        observed = gm_data[tuple(idx.astype(int))]
        assert np.corrcoef(expected, observed)[0, 1] > 0.9
        assert np.median(np.abs(expected - observed)) < 0.08
        # a wrong mapping (the PET transform applied on top) must not fit
        wrong = synth.sample(
            np.asanyarray(mni_gm.dataobj),
            mni_gm.affine,
            truth.mapping.native_to_mni(synth.apply_affine(truth.pet_to_t1w(), native_pts)),
        )
        assert np.corrcoef(wrong, observed)[0, 1] < 0.6


def test_mapping_inverse_and_volume(synth_raw):
    for sub, ses, _t1 in _truth_pairs(synth_raw):
        truth = synth.load_truth(synth_raw, sub, ses)
        pts = synth.grid_points(GRID_SHAPE, GRID_AFFINE)[:, ::997]
        back = truth.mapping.native_to_mni(truth.mapping.mni_to_native(pts))
        assert np.abs(back - pts).max() < 0.01  # mm
        meta = truth.meta
        rel = abs(meta["gm_volume_modulated_mm3"] / meta["gm_volume_native_mm3"] - 1)
        assert rel < 0.02


def test_pet_truth_is_consistent(synth_raw):
    """PET voxels that map (through the stored transforms) to GM are brighter than WM ones."""
    from bids_siamfuse.data.templates import load_template

    gm_t = load_template("GM")
    wm_t = load_template("WM")
    for sub, ses, _t1 in _truth_pairs(synth_raw):
        truth = synth.load_truth(synth_raw, sub, ses)
        pet = nb.load(str(next(synth_raw.glob(f"sub-{sub}/ses-{ses}/pet/*_pet.nii.gz"))))
        data = np.asanyarray(pet.dataobj, dtype=np.float32)
        idx = np.indices(data.shape[:3], dtype=np.float32).reshape(3, -1)[:, ::7]
        mni = truth.mapping.native_to_mni(synth.apply_affine(truth.pet_to_t1w() @ pet.affine, idx))
        gm = synth.sample(np.asanyarray(gm_t.dataobj), gm_t.affine, mni)
        wm = synth.sample(np.asanyarray(wm_t.dataobj), wm_t.affine, mni)
        values = data.reshape(-1)[::7]
        ratio = values[gm > 0.8].mean() / values[wm > 0.9].mean()
        assert ratio > 1.4  # 3.5:1 in tissue, blurred by the 6-8 mm PSF
        off = truth.mapping.native_to_mni(synth.apply_affine(pet.affine, idx))  # no PET->T1w
        gm_off = synth.sample(np.asanyarray(gm_t.dataobj), gm_t.affine, off)
        wm_off = synth.sample(np.asanyarray(wm_t.dataobj), wm_t.affine, off)
        assert values[gm_off > 0.8].mean() / values[wm_off > 0.9].mean() < ratio * 0.8


def test_orientations():
    for codes in ("RAS", "LAS", "LPS", "PIR"):
        shape, aff = synth.oriented_grid(codes, (1.0, 1.1, 1.2), (180, 220, 200), (0, 0, 0))
        assert "".join(nb.aff2axcodes(aff)) == codes
        centre = aff @ np.r_[(np.array(shape) - 1) / 2, 1]
        assert np.allclose(centre[:3], 0, atol=1e-6)


def _factors(root):
    return pd.read_csv(root / "derivatives" / "synth-truth" / "region_factors.tsv", sep="\t")


def test_deterministic_and_effect_size(tmp_path):
    kw = dict(
        n_per_group=1,
        groups=("CN", "AD"),
        seed=5,
        preprocessed=True,
        raw=False,
        two_session_fraction=0,
    )
    a = synth.generate(tmp_path / "a", effect_size=1.0, **kw)
    b = synth.generate(tmp_path / "b", effect_size=1.0, **kw)
    z = synth.generate(tmp_path / "z", effect_size=0.0, **kw)
    files = sorted(a.glob("derivatives/bids_siamfuse/sub-*/ses-*/pet/*_regions.npz"))
    assert len(files) == 2
    for f in files:
        fa, fb = np.load(f), np.load(str(f).replace(str(a), str(b)))
        assert np.array_equal(fa["gm"], fb["gm"]) and np.array_equal(fa["pet"], fb["pet"])
    fa, fz = _factors(a), _factors(z)
    groups = pd.read_csv(a / "participants.tsv", sep="\t").set_index("participant_id")
    planted = pd.read_csv(a / "derivatives/synth-truth/regions.tsv", sep="\t")
    planted = set(planted.loc[planted.atrophy_weight > 0, "index"])
    for sub, rows in fa.groupby("participant_id"):
        zrows = fz[fz.participant_id == sub]
        same = np.isclose(rows.gm_factor.values, zrows.gm_factor.values)
        if groups.loc[sub, "diagnosis"] == "CN":
            assert same.all()
        else:  # AD: planted regions lose GM, the others are untouched
            in_planted = rows["index"].isin(planted).values
            assert same[~in_planted].all()
            assert (rows.gm_factor.values[in_planted] < zrows.gm_factor.values[in_planted]).all()


def test_dynamic_pet(tmp_path):
    root = synth.generate(
        tmp_path / "dyn",
        n_per_group=1,
        groups=("CN",),
        seed=2,
        pet_frames=3,
        frame_duration=300,
        two_session_fraction=0,
        sessions=False,
    )
    pet = nb.load(str(next(root.glob("sub-*/pet/*_pet.nii.gz"))))
    assert pet.shape[3] == 3
    meta = json.loads(next(root.glob("sub-*/pet/*_pet.json")).read_text())
    assert meta["FrameDuration"] == [300] * 3
    assert np.allclose(np.diff(meta["FrameTimesStart"]), 300)
    truth = json.loads(
        next(root.glob("derivatives/synth-truth/sub-*/anat/*truth_xfm.json")).read_text()
    )
    motions = np.array(truth["pet_frame_motion"])
    assert motions.shape == (3, 4, 4) and not np.allclose(motions[1], np.eye(4))


@pytest.mark.slow
def test_twenty_subjects_under_a_minute(tmp_path):
    import time

    t0 = time.time()
    synth.generate(tmp_path / "c", n_per_group=5, seed=0, jobs=2)
    assert time.time() - t0 < 60


def test_trilinear_is_scipy_bit_for_bit():
    """The generator's fast trilinear (and nearest) sampling gives scipy's values exactly
    (outputs of a fixed seed must not move): edges, exact grid points, zero regions, -0.0 and
    oblique grids included."""
    from bids_siamfuse.preproc.registration import sample_at
    from bids_siamfuse.synth.geometry import trilinear

    rng = np.random.default_rng(3)
    vol = rng.standard_normal((9, 11, 7)).astype(np.float32)
    vol[3:6] = 0.0  # a zero slab: its points are skipped, not computed
    vol[:, :, 0] = -vol[:, :, 0]
    for affine in (np.eye(4), synth.rigid([7.0, -4.0, 11.0], [1.5, -2.0, 0.3])):
        affine = affine.copy()
        affine[:3, 3] += [-3.0, 2.0, -1.0]
        vox = rng.uniform(-1.5, 12.0, (3, 50_000)).astype(np.float32)
        vox[:, ::5] = np.round(vox[:, ::5])  # exact grid points
        vox[0, ::7], vox[1, ::11], vox[2, ::13], vox[2, ::17] = 8.0, 10.0, 6.0, 0.0  # last/first
        pts = synth.apply_affine(affine, vox).reshape(3, 250, 200)
        expected = sample_at(vol, affine, pts, dtype=np.float32)
        got = trilinear(vol, affine, pts)
        assert got.shape == expected.shape == (250, 200)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
        assert np.count_nonzero(expected) > 5_000
        labels = sample_at(vol, affine, pts, order=0, dtype=np.float32)
        got = synth.sample(vol, affine, pts, order=0)
        assert np.array_equal(got.view(np.uint32), labels.view(np.uint32))
        assert not np.array_equal(labels, expected)
    # mode "nearest" (the displacement field), several volumes sharing the weights
    from scipy import ndimage

    from bids_siamfuse.synth.geometry import interpolate

    vox = rng.uniform(-1.5, 12.0, (3, 50_000)).astype(np.float32)
    vox[:, ::5] = np.round(vox[:, ::5])
    vox[0, ::7], vox[1, ::11], vox[2, ::13] = 8.0, 10.0, 6.0
    volumes = [vol, vol[::-1].copy(), vol * 3]
    for got, v in zip(interpolate(volumes, vox, nearest_edge=True), volumes):
        expected = ndimage.map_coordinates(
            v, vox, order=1, mode="nearest", prefilter=False, output=np.float32
        )
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    (got,) = interpolate([vol], vox, nearest_edge=True)  # one volume: zero cells skipped
    expected = ndimage.map_coordinates(
        vol, vox, order=1, mode="nearest", prefilter=False, output=np.float32
    )
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
