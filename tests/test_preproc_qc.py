"""Participant quality control (preproc/qc.py): synthetic failures are flagged with the right
reason, sound sessions are not; the flag reaches the status table and the group level.

Everything here runs on small phantoms or on the grid directly (seconds); the participant
workflow's QC table is checked in tests/test_participant.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import phantoms
import pytest

from bids_siamfuse import bids
from bids_siamfuse.preproc import pet as petlib
from bids_siamfuse.preproc import qc, segmentation


def _flagged(metrics: dict) -> dict:
    """metric -> reason of the flagged rows."""
    return {r["metric"]: r["reason"] for r in qc.evaluate(metrics) if r["status"] == "flagged"}


# ----------------------------------------------------------------------------------------------
# A three-tissue phantom: WM core, GM shell, CSF shell (1 mm), Atropos run on it
# ----------------------------------------------------------------------------------------------


def _tissue_phantom(gm_intensity: float, *, slice_mm: float = 1.0, seed: int = 0):
    """(T1w, fractions CSF/GM/WM, brain mask, zooms) of nested spheres with partial volumes.

    ``slice_mm``: the z voxel size; thicker slices average the 1 mm model over the slice.
    """
    rng = np.random.default_rng(seed)
    n = 48
    r = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2, axis=0)
    # sharp boundaries blurred to fractions by 4x supersampling of the radius
    fine = np.linspace(-0.375, 0.375, 4)
    wm = np.mean([np.clip(12.0 - (r + d), 0, 1) for d in fine], axis=0)
    inner = np.mean([np.clip(17.0 - (r + d), 0, 1) for d in fine], axis=0)
    brain = np.mean([np.clip(21.0 - (r + d), 0, 1) for d in fine], axis=0)
    gm = np.clip(inner - wm, 0, 1)
    csf = np.clip(brain - inner, 0, 1)
    t1 = 300.0 * csf + gm_intensity * gm + 1000.0 * wm
    k = int(round(slice_mm))
    if k > 1:  # thick slices: average k planes along z
        m = n // k
        t1 = t1[:, :, : m * k].reshape(n, n, m, k).mean(axis=3)
        gm, wm, csf, brain = (
            a[:, :, : m * k].reshape(n, n, m, k).mean(axis=3) for a in (gm, wm, csf, brain)
        )
    t1 = t1 + rng.normal(0.0, 25.0, t1.shape)
    return t1.astype(np.float32), (csf, gm, wm), brain > 0.5, (1.0, 1.0, float(k))


def _atropos_means(t1, fractions, mask, zooms, tmp_path) -> dict:
    """Atropos (the pipeline's call) with smoothed truth as priors; the global class means."""
    import ants

    img = ants.from_numpy(t1, spacing=zooms)
    msk = img.new_image_like(mask.astype(np.float32))
    priors = [img.new_image_like(np.clip(f, 0, 1).astype(np.float32)) for f in fractions]
    posts = segmentation.atropos(
        img, msk, priors, tmp_path, iterations=3, prior_weight=0.5, mrf=0.1
    )
    _, means = segmentation._local_means(t1, posts, mask, float(np.mean(zooms)))
    return dict(zip(("atropos_CSF", "atropos_GM", "atropos_WM"), means))


def _anat(t1, fractions, mask, zooms, means):
    csf, gm, wm = fractions
    return qc.anat_metrics(
        zooms=zooms,
        t1w=t1,
        brain_mask=mask,
        gm=gm,
        wm=wm,
        csf=csf,
        means=means,
        affine_correlation=0.8,
    )


def test_sound_t1w_is_not_flagged(tmp_path):
    t1, fractions, mask, zooms = _tissue_phantom(600.0)
    means = _atropos_means(t1, fractions, mask, zooms, tmp_path)
    metrics = _anat(t1, fractions, mask, zooms, means)
    assert metrics["seg_gm_wm_contrast"] > 0.3
    assert metrics["t1w_snr_wm"] > 20 and metrics["t1w_cnr"] > 5
    flagged = _flagged(metrics)
    # the phantom's brain is small (TIV, fractions of a sphere): only those may be outside
    assert not set(flagged) - {"tiv_ml", "gm_fraction", "wm_fraction", "csf_fraction"}


def test_collapsed_tissue_classes_are_flagged(tmp_path):
    """GM almost as bright as WM (issue 17's 1x1x3 mm run: GM 792, WM 861)."""
    t1, fractions, mask, zooms = _tissue_phantom(930.0)
    means = _atropos_means(t1, fractions, mask, zooms, tmp_path)
    metrics = _anat(t1, fractions, mask, zooms, means)
    flagged = _flagged(metrics)
    assert "seg_gm_wm_contrast" in flagged
    assert "tissue classes collapsed" in flagged["seg_gm_wm_contrast"]
    assert "t1w_voxel_max_mm" not in flagged


def _warned(metrics: dict) -> dict:
    return {r["metric"]: r["reason"] for r in qc.evaluate(metrics) if r["status"] == "warning"}


def test_thick_slices_that_segment_well_only_warn(tmp_path):
    """Issue 17: 3 mm slices alone are no failure (the phantom segments at 1x1x3 mm as well
    as at 1 mm): a warning in the table and the report, no flag."""
    t1, fractions, mask, zooms = _tissue_phantom(600.0, slice_mm=3.0)
    means = _atropos_means(t1, fractions, mask, zooms, tmp_path)
    metrics = _anat(t1, fractions, mask, zooms, means)
    assert metrics["seg_gm_wm_contrast"] > 0.3
    flagged = _flagged(metrics)
    assert not set(flagged) - {"tiv_ml", "gm_fraction", "wm_fraction", "csf_fraction"}
    warned = _warned(metrics)
    assert "thick slices" in warned["t1w_voxel_max_mm"] and "= 3 > 2" in warned["t1w_voxel_max_mm"]
    assert qc.warnings(qc.evaluate(metrics)) == [warned["t1w_voxel_max_mm"]]


def test_thick_slices_with_collapsed_classes_are_flagged(tmp_path):
    """The failure of issue 17's 1x1x3 mm T1w: thick slices and GM almost as bright as WM.
    Flagged for the collapse, the reason naming the thick slices."""
    t1, fractions, mask, zooms = _tissue_phantom(930.0, slice_mm=3.0)
    means = _atropos_means(t1, fractions, mask, zooms, tmp_path)
    flagged = _flagged(_anat(t1, fractions, mask, zooms, means))
    reason = flagged["seg_gm_wm_contrast"]
    assert "tissue classes collapsed" in reason and "on thick slices (3 mm)" in reason
    assert "t1w_voxel_max_mm" not in flagged


def test_gm_in_deep_white_matter_is_flagged():
    """GM where the template has deep WM (issue 17's collapsed run: 0.37; sound <= 0.045)."""
    gm = qc.template_on_grid("GM")
    sound = qc.anat_metrics(**_grid_case(gm), gm_grid=gm)
    assert sound["gm_deep_wm"] < 0.02 and "gm_deep_wm" not in _flagged(sound)
    collapsed = np.clip(gm + 0.35 * qc.template_on_grid("WM"), 0, 1)
    metrics = qc.anat_metrics(**_grid_case(gm, zooms=(1.0, 1.0, 3.0)), gm_grid=collapsed)
    reason = _flagged(metrics)["gm_deep_wm"]
    assert "GM in deep white matter" in reason and "on thick slices (3 mm)" in reason


def _grid_case(gm, zooms=(1.0, 1.0, 1.0)) -> dict:
    """anat_metrics inputs on the grid itself (the T1w-space metrics do not matter here)."""
    wm = qc.template_on_grid("WM")
    return dict(
        zooms=zooms,
        t1w=600 * gm + 1000 * wm,
        brain_mask=gm + wm > 0.5,
        gm=gm,
        wm=wm,
        csf=qc.template_on_grid("CSF"),
        means={"atropos_GM": 600.0, "atropos_WM": 1000.0},
        affine_correlation=0.8,
    )


def test_legacy_qc_switch_flags_thick_slices(monkeypatch):
    """BIDS_SIAMFUSE_LEGACY_QC=1: the QC as before (thick slices flagged, no gm_deep_wm)."""
    gm = qc.template_on_grid("GM")
    monkeypatch.setenv(qc.LEGACY_QC_VARIABLE, "1")
    metrics = qc.anat_metrics(**_grid_case(gm, zooms=(1.0, 1.0, 3.0)), gm_grid=gm)
    assert "gm_deep_wm" not in metrics
    assert "thick slices" in _flagged(metrics)["t1w_voxel_max_mm"]


# ----------------------------------------------------------------------------------------------
# PET: field of view and motion, on the real grid with the identity T1w <-> MNI map
# ----------------------------------------------------------------------------------------------


def _grid_positions():
    from bids_siamfuse.data.templates import GRID_AFFINE, GRID_SHAPE

    return phantoms.world(GRID_SHAPE, GRID_AFFINE).astype(np.float32)


def _pet_frames(z_min: float, n_frames: int = 1) -> petlib.PETFrames:
    """A PET of 2 mm voxels covering x, y of the head and z from ``z_min`` to +90 mm."""
    shape = (96, 112, int((90.0 - z_min) / 2.0) + 1)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = (-95.0, -131.0, z_min)
    data = np.ones((*shape, n_frames), dtype=np.float32)
    return petlib.PETFrames(data, aff, np.ones(n_frames), np.full(n_frames, np.nan), [])


def _pet_coverage(frames, motions=None):
    from bids_siamfuse.data.atlas import load_atlas

    atlas = load_atlas()
    motions = motions or [np.eye(4)] * frames.n_frames
    cov = petlib.fov_coverage(frames, motions, np.eye(4), _grid_positions())
    return qc.pet_metrics(
        coverage=cov, atlas_labels=np.asarray(atlas.labels), atlas_names=list(atlas.names)
    )


def test_full_pet_field_of_view_is_not_flagged():
    metrics = _pet_coverage(_pet_frames(-80.0))
    assert metrics["pet_coverage"] == pytest.approx(1.0)
    assert not _flagged(metrics)


def test_truncated_pet_field_of_view_is_flagged():
    """The axial field of view starts at z = -30 mm: the cerebellum is cut off."""
    metrics = _pet_coverage(_pet_frames(-30.0))
    flagged = _flagged(metrics)
    assert metrics["pet_coverage"] < 0.9
    assert "misses part of the brain" in flagged["pet_coverage"]
    assert "Cerebel" in flagged["pet_region_coverage_min"]


def _motion(shifts_mm):
    frames = _pet_frames(-80.0, n_frames=len(shifts_mm))
    motions = [phantoms.rigid((0, 0, 0), (s, 0, 0)) for s in shifts_mm]
    return qc.pet_metrics(motion=petlib.motion_table(frames, motions, np.zeros(3)))


def test_small_motion_is_not_flagged():
    metrics = _motion([0.0, 0.8, 1.5, 1.0])
    assert metrics["pet_fd_max_mm"] == pytest.approx(0.8)
    assert not _flagged(metrics)


def test_large_motion_is_flagged():
    """One frame 12 mm away from the previous (issue 17: a test subject moved 21 mm)."""
    metrics = _motion([0.0, 1.0, 13.0, 12.0])
    flagged = _flagged(metrics)
    assert "large PET motion" in flagged["pet_fd_max_mm"]
    assert metrics["pet_fd_max_mm"] == pytest.approx(12.0)


def test_pet_gm_correlation_detects_misregistration():
    """The PET fit metric: PET and GM agree when aligned, not after a 10 mm shift."""
    from bids_siamfuse.data.templates import grid_brain_mask

    gm = qc.template_on_grid("GM")
    mask = grid_brain_mask()
    good = qc.pet_metrics(pet_grid=0.3 + gm, gm_grid=gm, grid_mask=mask)
    bad = qc.pet_metrics(pet_grid=0.3 + np.roll(gm, 7, axis=0), gm_grid=gm, grid_mask=mask)
    assert good["pet_gm_correlation"] > 0.9
    assert "poor PET/T1w fit" in _flagged(bad)["pet_gm_correlation"]


# ----------------------------------------------------------------------------------------------
# The flag downstream: status table, group level
# ----------------------------------------------------------------------------------------------


def _write_qc(out, source, metrics):
    rows = qc.evaluate(metrics)
    bids.save_output(
        out, "qc", qc.qc_table(rows), source=source, meta=qc.sidecar(qc.reasons(rows))
    )


def test_flag_reaches_the_status_table(tmp_path):
    from types import SimpleNamespace

    from bids_siamfuse.participant import pair_status

    out = tmp_path / "out"
    pairs = []
    for sub, shift in (("01", 1.0), ("02", 20.0)):
        pair = bids.SessionPair(sub, "01", tmp_path / "p.nii", tmp_path / "t.nii", "01")
        pair.pet_entities = {"tracer": "FDG"}
        pairs.append(pair)
        region = bids.output_path(out, "regions", pair.source_entities)
        region.parent.mkdir(parents=True, exist_ok=True)
        region.write_bytes(b"x")
        _write_qc(out, pair.source_entities, _motion([0.0, shift]))
    rows = pair_status(SimpleNamespace(pairs=pairs), out, "run1", None)
    status = {r["subject"]: (r["status"], r["qc"], r["message"]) for r in rows}
    assert status["01"] == ("ok", "pass", "")
    assert status["02"][:2] == ("flagged", "flagged")
    assert "large PET motion" in status["02"][2]
    meta = json.loads(
        bids.output_path(out, "qc", pairs[1].source_entities)
        .with_suffix("")
        .with_suffix(".json")
        .read_text()
    )
    assert meta["Flagged"] is True and meta["Reasons"]


def test_group_level_leaves_flagged_sessions_out(synth_derivs, tmp_path, capsys):
    """plan_group and load_cohort skip flagged sessions; --include-flagged keeps them."""
    from bids_siamfuse.cli.run import main
    from bids_siamfuse.group.cohort import load_cohort
    from bids_siamfuse.preproc.regions import find_region_files

    ds = tmp_path / "ds"
    ds.mkdir()
    for name in ("participants.tsv", "dataset_description.json"):
        shutil.copy(synth_derivs / name, ds / name)
    src = synth_derivs / "derivatives" / "bids_siamfuse"
    out = ds / "derivatives" / "bids_siamfuse"
    for f in src.rglob("*_regions.*"):
        (out / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, out / f.relative_to(src))
    shutil.copy(src / "dataset_description.json", out)
    files = find_region_files(out)
    victim = files[0]
    ent = bids_parse(victim.name)
    _write_qc(out, ent, _motion([0.0, 30.0]))
    participants = bids.read_participants(ds)
    kept = load_cohort(out, participants)
    assert str(victim) not in kept.sources and len(kept) == len(files) - 1
    assert len(load_cohort(out, participants, include_flagged=True)) == len(files)
    args = [ds, out, "group", "--classes", "CN", "AD", "--folds", "2", "--dry-run"]
    assert main([str(a) for a in args]) == 0
    text = capsys.readouterr().out
    assert "1 session(s) flagged by participant QC left out" in text
    assert f"{len(files) - 1} session(s)" in text
    assert main([str(a) for a in args + ["--include-flagged"]]) == 0
    text = capsys.readouterr().out
    assert "flagged" not in text and f"{len(files)} session(s)" in text


def bids_parse(name: str) -> dict:
    from bids_siamfuse.preproc.regions import parse_entities

    ent = parse_entities(name)
    keys = {"sub": "subject", "ses": "session", "trc": "tracer"}
    return {full: ent[short] for short, full in keys.items() if short in ent}


def test_qc_table_layout():
    rows = qc.evaluate({"t1w_voxel_max_mm": 1.0, "pet_fd_max_mm": float("nan"), "x": 3.0})
    table = qc.qc_table(rows)
    assert list(table.columns) == qc.COLUMNS
    assert dict(zip(table.metric, table.status)) == {
        "t1w_voxel_max_mm": "ok",
        "pet_fd_max_mm": "n/a",
        "x": "info",
    }
    assert isinstance(table, pd.DataFrame)


def test_session_qc_node_keeps_every_warning(tmp_path):
    """Warnings logged by the ANTs nodes and the PET notes reach the QC sidecar (and report)."""
    import logging

    from bids_siamfuse.interfaces.anat import _Collector
    from bids_siamfuse.interfaces.pet import SessionQC

    with _Collector() as messages:
        logging.getLogger("bids_siamfuse.anat").warning("affine fit to the template is poor")
        logging.getLogger("bids_siamfuse.anat").info("not a warning")
    assert messages == ["anat: affine fit to the template is poor"]
    node = SessionQC(
        anat_metrics={
            "t1w_voxel_max_mm": 3.0,
            "seg_gm_wm_contrast": 0.05,
            "_warnings": messages,
        },
        pet_notes=["FrameDuration lists 0 value(s) for 4 frames: frames weighted equally"],
    )
    result = node.run(cwd=str(tmp_path))
    meta = result.outputs.meta
    # the thick slices are a QC warning (shown with the others), the collapse the flag
    assert meta["Warnings"][:2] == messages + node.inputs.pet_notes
    assert len(meta["Warnings"]) == 3 and "thick slices" in meta["Warnings"][2]
    assert result.outputs.reasons == [r for r in result.outputs.reasons if "collapsed" in r]
    assert result.outputs.flagged and "on thick slices (3 mm)" in result.outputs.reasons[0]
    table = pd.read_csv(result.outputs.out_file, sep="\t")
    assert "_warnings" not in set(table.metric)
