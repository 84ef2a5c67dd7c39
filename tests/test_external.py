"""Bring your own preprocessing (``-d/--derivatives``): Clinica CAPS and BIDS derivatives.

Fixtures are laid out as the tools write them:

* a Clinica CAPS (``t1-volume`` + ``pet-volume``; names as ``clinica.utils.input_files``
  queries them, with the decoys those pipelines write beside the files read): Ixi549Space maps
  on SPM's 121x145x121 1.5 mm grid, a pons-SUVR PET with NaN outside the field of view (SPM's
  habit in float images);
* a BIDS derivatives dataset named like this app's outputs, in other spaces and resolutions:
  GM in ``MNI152NLin6Asym`` at 2 mm (91x109x91, FSL's box), PET in ``MNI152NLin2009aSym`` at
  1 mm (TemplateFlow's 197x233x189 box).

The maps are one smooth function of world coordinates, sampled on each file's own grid. The
participant run's region files are compared with :func:`preproc.regions.compute_region_outputs`
applied to the same maps, brought onto the grid here independently (nibabel's
``resample_from_to``, order 1) and normalized with the paper's rule.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from bids_siamfuse import bids
from bids_siamfuse.bids import SessionPair
from bids_siamfuse.data.templates import GRID_AFFINE, GRID_SHAPE
from bids_siamfuse.errors import DataError

NLIN6_2MM = (
    (91, 109, 91),
    np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]]),
)
NLIN2009A_1MM = (
    (197, 233, 189),
    np.array([[1.0, 0, 0, -98], [0, 1.0, 0, -134], [0, 0, 1.0, -72], [0, 0, 0, 1]]),
)
NLIN2009A_2MM = (
    (99, 117, 95),
    np.array([[2.0, 0, 0, -98], [0, 2.0, 0, -134], [0, 0, 2.0, -72], [0, 0, 0, 1]]),
)
TRACER = "18FFDG"


def _world(shape, affine):
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape((3, *shape))


def _gm(shape, affine, seed):
    """A modulated-GM-like map: smooth, in [0, 1.2], zero outside a brain-sized ellipsoid."""
    x, y, z = _world(shape, affine)
    r = (x / 70) ** 2 + ((y + 18) / 95) ** 2 + ((z - 10) / 75) ** 2
    ripple = 0.5 + 0.4 * np.sin(x / (7 + seed)) * np.cos(y / 9) * np.sin(z / 11 + seed)
    return (np.clip(1.0 - r, 0, None) ** 0.3 * ripple * 1.2).astype(np.float32)


def _pet(shape, affine, seed, scale):
    """A PET-like map: positive everywhere in the head, brighter in 'cortex'."""
    x, y, z = _world(shape, affine)
    r = (x / 75) ** 2 + ((y + 18) / 100) ** 2 + ((z - 10) / 80) ** 2
    uptake = 0.3 + 0.7 * np.clip(1 - r, 0, None) + 0.2 * np.cos(x / 13 + seed) ** 2
    return (scale * uptake * (r < 1.3)).astype(np.float32)


def _save(path: Path, data, affine, *, code=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nb.Nifti1Image(np.asarray(data, np.float32), affine)
    img.set_sform(affine, code)
    img.set_qform(affine, code)
    img.to_filename(str(path))
    return path


def _json(path: Path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def _raw(root: Path, subjects):
    """A raw BIDS dataset in Clinica's naming (ses-M000, trc-18FFDG): small images, just above
    header screening's minimum shapes (T1w 32 voxels / 100 mm, PET 16 voxels / 60 mm per axis).

    sub-01's PET sidecar lacks the frame timing (header screening refuses such a pair): with
    -d the raw images are not read, so the pair is processed from its CAPS maps anyway."""
    _json(root / "dataset_description.json", {"Name": "raw", "BIDSVersion": "1.10.0"})
    rows = ["participant_id\tdiagnosis"] + [f"sub-{s}\tCN" for s in subjects]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    rng = np.random.default_rng(0)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    for sub in subjects:
        ses = root / f"sub-{sub}" / "ses-M000"
        _save(ses / "anat" / f"sub-{sub}_ses-M000_T1w.nii.gz", rng.random((32, 32, 32)), affine)
        pet = ses / "pet" / f"sub-{sub}_ses-M000_trc-{TRACER}_pet.nii.gz"
        _save(pet, rng.random((16, 16, 16)) + 0.5, affine)
        _json(
            pet.with_name(pet.name.replace(".nii.gz", ".json")),
            {
                "Units": "Bq/mL",
                "TracerName": "FDG",
                "ModeOfAdministration": "bolus",
                **({} if sub == "01" else {"FrameTimesStart": [0], "FrameDuration": [1800]}),
            },
        )


def _caps(root: Path, with_pet=("01",), with_gm=("01", "03")):
    """A Clinica CAPS after ``t1-volume`` and ``pet-volume`` (group ADNI, pons SUVR)."""
    _json(
        root / "dataset_description.json",
        {
            "Name": "caps",
            "BIDSVersion": "1.7.0",
            "CAPSVersion": "1.0.0",
            "DatasetType": "derivative",
            "Processing": [
                {"Name": "t1-volume-tissue-segmentation", "InputPath": "/bids"},
                {"Name": "pet-volume", "InputPath": "/bids"},
            ],
        },
    )
    tiny = np.ones((4, 4, 4), np.float32)  # decoys: never read (picked one would be refused)
    files = {}
    for sub in sorted(set(with_pet) | set(with_gm)):
        ses = root / "subjects" / f"sub-{sub}" / "ses-M000"
        t1 = f"sub-{sub}_ses-M000_T1w"
        if sub in with_gm:
            seg = ses / "t1" / "spm" / "segmentation"
            norm = seg / "normalized_space"
            gm = norm / f"{t1}_segm-graymatter_space-Ixi549Space_modulated-on_probability.nii.gz"
            files[(sub, "GM")] = _save(gm, _gm(GRID_SHAPE, GRID_AFFINE, 1), GRID_AFFINE)
            for name in (
                f"{t1}_segm-graymatter_space-Ixi549Space_modulated-off_probability.nii.gz",
                f"{t1}_segm-whitematter_space-Ixi549Space_modulated-on_probability.nii.gz",
                f"{t1}_space-Ixi549Space_T1w.nii.gz",
            ):
                _save(norm / name, tiny, np.eye(4))
            _save(
                seg / "native_space" / f"{t1}_segm-graymatter_probability.nii.gz", tiny, np.eye(4)
            )
            _save(
                seg / "dartel_input" / f"{t1}_segm-graymatter_dartelinput.nii.gz", tiny, np.eye(4)
            )
            dartel = ses / "t1" / "spm" / "dartel" / "group-ADNI"
            _save(
                dartel / f"{t1}_segm-graymatter_space-Ixi549Space_modulated-on_probability.nii.gz",
                tiny,
                np.eye(4),
            )
        if sub in with_pet:
            group = ses / "pet" / "preprocessing" / "group-ADNI"
            src = f"sub-{sub}_ses-M000_trc-{TRACER}_pet"
            suvr = _pet(GRID_SHAPE, GRID_AFFINE, 2, scale=1.7)
            suvr[:3] = np.nan  # SPM: NaN outside the source's field of view
            files[(sub, "PET")] = _save(
                group / f"{src}_space-Ixi549Space_suvr-pons_pet.nii.gz", suvr, GRID_AFFINE
            )
            for name in (
                f"{src}_space-T1w_pet.nii.gz",
                f"{src}_space-Ixi549Space_pet.nii.gz",
                f"{src}_space-Ixi549Space_pvc-rbv_suvr-pons_pet.nii.gz",
                f"{src}_space-Ixi549Space_suvr-pons_mask-brain_pet.nii.gz",
                f"{src}_space-Ixi549Space_suvr-pons_mask-brain_fwhm-8mm_pet.nii.gz",
                f"{t1}_space-Ixi549Space_brainmask.nii.gz",
            ):
                _save(group / name, tiny, np.eye(4))
            stats = group / "atlas_statistics"
            stats.mkdir(parents=True, exist_ok=True)
            (stats / f"{src}_space-AAL2_suvr-pons_statistics.tsv").write_text("index\n")
    return files


def _bids_derivs(root: Path, sub="02", pet_grid=NLIN2009A_1MM):
    """BIDS derivatives named like this app's outputs, in other spaces/resolutions."""
    _json(
        root / "dataset_description.json",
        {
            "Name": "spm12 cat12 derivatives",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "in-house SPM12 batch"}],
        },
    )
    ses = root / f"sub-{sub}" / "ses-M000"
    shape, affine = NLIN6_2MM
    gm = (
        ses
        / "anat"
        / f"sub-{sub}_ses-M000_space-MNI152NLin6Asym_res-2_label-GM_desc-modulated_probseg.nii.gz"
    )
    _save(gm, _gm(shape, affine, 3), affine)
    # the unmodulated map beside it is not read
    _save(gm.with_name(gm.name.replace("_desc-modulated", "")), np.ones((4, 4, 4)), np.eye(4))
    shape, affine = NLIN2009A_1MM
    pet = (
        ses
        / "pet"
        / f"sub-{sub}_ses-M000_trc-{TRACER}_space-MNI152NLin2009aSym_res-1_desc-preproc_pet.nii"
    )
    _save(pet, _pet(shape, affine, 4, scale=9000.0), affine)
    _json(pet.with_name(pet.name.replace(".nii", ".json")), {"Units": "Bq/mL"})
    return {(sub, "GM"): gm, (sub, "PET"): pet}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    _raw(root / "raw", ["01", "02", "03", "04"])
    files = _caps(root / "caps")
    files.update(_bids_derivs(root / "deriv"))
    return root, files


def _main(args):
    from bids_siamfuse.cli.run import main

    return main([str(a) for a in args])


def _args(root, *extra):
    return [
        root / "raw",
        root / "out",
        "participant",
        "--skip-bids-validation",
        "--tracer-label",
        TRACER,
        "-w",
        root / "work",
        "--nprocs",
        "1",
        "-d",
        f"caps={root / 'caps'}",
        f"deriv={root / 'deriv'}",
        *extra,
    ]


def _quick_svg(*args, **kwargs):
    out = args[2] if len(args) > 2 else kwargs["out_file"]
    Path(out).write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    return str(out)


@pytest.fixture(scope="module")
def run(fixture):
    """The participant run. Reportlet drawing is stubbed (about 1 s per figure on an idle core,
    25 s under load; test_participant draws them): the nodes, sinks and names still run."""
    from bids_siamfuse.reports import reportlets

    root, files = fixture
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reportlets, "segmentation_svg", _quick_svg)
        mp.setattr(reportlets, "overlay_svg", _quick_svg)
        code = _main(_args(root))
    return root, files, code


def _expected(gm_img, pet_img):
    """The region payload from maps brought onto the grid here, independently."""
    from nibabel.processing import resample_from_to

    from bids_siamfuse.preproc.pet import normalize
    from bids_siamfuse.preproc.regions import compute_region_outputs

    maps = []
    for img in (gm_img, pet_img):
        data = np.asarray(img.dataobj, np.float32)
        data = np.where(np.isfinite(data), data, 0).astype(np.float32)
        img = nb.Nifti1Image(data, img.affine)
        if img.shape != GRID_SHAPE or not np.allclose(img.affine, GRID_AFFINE):
            img = resample_from_to(img, (GRID_SHAPE, GRID_AFFINE), order=1, cval=0.0)
        maps.append(np.asarray(img.dataobj, np.float32))
    pet, _, _ = normalize(maps[1], "none")
    payload, gm_table, pet_table = compute_region_outputs(maps[0], pet)
    return payload, gm_table, pet_table


def _pet_source(sub):
    return {"subject": sub, "session": "M000", "tracer": TRACER}


@pytest.mark.parametrize("sub", ["01", "02"], ids=["caps", "bids-derivatives"])
def test_region_files_match_direct_extraction(run, sub):
    root, files, _ = run
    out = root / "out"
    region = bids.output_path(out, "regions", _pet_source(sub))
    assert region.is_file()
    payload, gm_table, pet_table = _expected(
        nb.load(files[(sub, "GM")]), nb.load(files[(sub, "PET")])
    )
    with np.load(region, allow_pickle=False) as f:
        assert f["gm"].shape == payload["gm"].shape
        np.testing.assert_allclose(f["gm"], payload["gm"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(f["pet"], payload["pet"], rtol=0, atol=1e-6)
        assert str(f["signature"]) == str(payload["signature"])
        prov = json.loads(str(f["provenance"]))
    # provenance: files, digests, spaces, interpolation
    for kind in ("GM", "PET"):
        digest = hashlib.sha256(files[(sub, kind)].read_bytes()).hexdigest()
        assert prov[kind]["File"] == str(files[(sub, kind)])
        assert prov[kind]["SHA256"] == digest
    assert prov["Interpolation"] == "trilinear"
    links = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]
    assert links["caps"] == (root / "caps").as_uri() and "raw" in links
    if sub == "01":
        assert prov["GM"]["Space"] == prov["PET"]["Space"] == "IXI549Space"
        assert prov["GM"]["Resampling"].startswith("none")
        assert "pons" in prov["PET"]["SourceIntensity"]
        assert prov["PET"]["NonFiniteVoxelsSetToZero"] == 3 * 145 * 121
    else:
        assert prov["GM"]["Space"] == "MNI152NLin6Asym"
        assert prov["PET"]["Space"] == "MNI152NLin2009aSym"
        assert prov["GM"]["Resampling"].startswith("trilinear")
        assert prov["GM"]["VoxelSize"] == [2.0, 2.0, 2.0]
        assert prov["PET"]["VoxelSize"] == [1.0, 1.0, 1.0]
    assert "top 0.1% voxels" in prov["PET"]["IntensityNormalization"]
    # the tables, and the sidecars carrying the same provenance
    anat = {"subject": sub, "session": "M000"}
    morph = pd.read_csv(bids.output_path(out, "gm_morph", anat), sep="\t")
    np.testing.assert_allclose(morph["gm_volume_mm3"], gm_table["gm_volume_mm3"], rtol=1e-5)
    stats = pd.read_csv(bids.output_path(out, "pet_stats", _pet_source(sub)), sep="\t")
    np.testing.assert_allclose(stats["mean_uptake"], pet_table["mean_uptake"], rtol=1e-5)
    for key, source in (
        ("regions", _pet_source(sub)),
        ("pet_stats", _pet_source(sub)),
        ("pet_mni", _pet_source(sub)),
        ("gm_morph", anat),
        ("gm_mni_modulated", anat),
    ):
        path = bids.output_path(out, key, source)
        ext = bids.OUTPUTS[key]["extension"]
        meta = json.loads(path.with_name(path.name[: -len(ext)] + ".json").read_text())
        ext_prov = meta["ExternalPreprocessing"]
        assert ext_prov["GM"]["SHA256"] == prov["GM"]["SHA256"], key
        assert ext_prov["PET"]["SHA256"] == prov["PET"]["SHA256"], key
        assert len(meta["Sources"]) == 2 and meta["Sources"][0].startswith("bids:")


def test_incomplete_pair_refused_others_continue(run):
    """sub-03: GM in the CAPS, no PET anywhere -> refused, exit 65; sub-04: nothing -> skipped."""
    root, _, code = run
    assert code == 65
    table = pd.read_csv(
        next((root / "out" / "logs").glob("participant-*.tsv")), sep="\t", dtype=str
    )
    status = dict(zip(table["subject"], table["status"]))
    assert status == {"01": "ok", "02": "ok", "03": "refused"}
    message = table[table["subject"] == "03"].iloc[0]["message"]
    assert "sub-03_ses-M000_T1w_segm-graymatter_space-Ixi549Space_modulated-on" in message
    assert "without a matching PET map" in message
    assert not bids.output_path(root / "out", "regions", _pet_source("03")).exists()
    assert not list((root / "out").glob("sub-04"))
    # the reportlets of both pairs, and their participant pages
    for sub in ("01", "02"):
        assert len(list((root / "out" / f"sub-{sub}" / "figures").glob("*.svg"))) == 2
        assert (root / "out" / f"sub-{sub}.html").is_file()


def test_methods_text_names_the_interpolation(run):
    root, _, _ = run
    text = (root / "out" / "logs" / "CITATION.md").read_text()
    assert "trilinear interpolation" in text
    assert "MNI152NLin6Asym" in text and "used instead of preprocessing" in text


def test_suvr_scale_cancels(tmp_path, fixture):
    """The documented reason for normalizing a CAPS SUVR again: the reference scale cancels."""
    from bids_siamfuse.preproc.external import prepare_pair

    _, files = fixture
    img = nb.load(files[("01", "PET")])
    scaled = _save(tmp_path / "scaled.nii.gz", np.asarray(img.dataobj) * 2.37, img.affine)
    _, pet_a, _ = prepare_pair(files[("01", "GM")], files[("01", "PET")])
    _, pet_b, _ = prepare_pair(files[("01", "GM")], scaled)
    np.testing.assert_allclose(pet_a, pet_b, rtol=0, atol=1e-6)
    # a PET this app normalized already is used as it is (NaN -> 0 only)
    _, pet_c, done = prepare_pair(files[("01", "GM")], scaled, pet_normalized="top 0.1%")
    raw = np.asarray(nb.load(scaled).dataobj, np.float32)
    np.testing.assert_array_equal(pet_c, np.where(np.isfinite(raw), raw, 0))
    assert done["PET"]["IntensityNormalization"].startswith("none here: already normalized")


def test_dry_run_lists_what_would_be_read(fixture, capsys):
    root, files = fixture
    code = _main(_args(root, "--dry-run"))
    text = capsys.readouterr().out
    assert code == 0
    for key in (("01", "GM"), ("01", "PET"), ("02", "GM"), ("02", "PET")):
        assert str(files[key]) in text
    assert "refused" in text and "sub-03" in text
    assert "sub-04 ses-M000: no GM or PET map" in text
    assert "trilinear" in text and "sha256" in text
    assert "raw images not read (-d)" in text and "FrameTimesStart" in text  # sub-01


# ----------------------------------------------------------------------------------------------
# The finder on its own: refusals name the file
# ----------------------------------------------------------------------------------------------


def _pair(raw: Path, sub: str) -> SessionPair:
    return SessionPair(
        subject=sub,
        session="M000",
        pet=raw / f"sub-{sub}/ses-M000/pet/sub-{sub}_ses-M000_trc-{TRACER}_pet.nii.gz",
        t1w=raw / f"sub-{sub}/ses-M000/anat/sub-{sub}_ses-M000_T1w.nii.gz",
        t1w_session="M000",
        pet_entities={"tracer": TRACER},
    )


def _folders(*specs):
    from bids_siamfuse.external import parse_derivatives

    return parse_derivatives([f"{name}={path}" for name, path in specs])


def test_pet_without_gm_refused(tmp_path):
    from bids_siamfuse.external import find_pair_maps

    _caps(tmp_path / "caps", with_pet=("05",), with_gm=())
    with pytest.raises(DataError, match=r"suvr-pons_pet\.nii\.gz: PET map without a matching"):
        find_pair_maps(_pair(tmp_path, "05"), _folders(("caps", tmp_path / "caps")))


def test_wrong_space_refused(tmp_path):
    from bids_siamfuse.external import find_pair_maps

    files = _bids_derivs(tmp_path / "d", sub="06", pet_grid=NLIN2009A_2MM)
    gm = files[("06", "GM")]
    wrong = gm.with_name(gm.name.replace("MNI152NLin6Asym", "MNI152NLin2009cAsym"))
    gm.rename(wrong)
    with pytest.raises(DataError, match=r"MNI152NLin2009cAsym.*space-MNI152NLin2009cAsym is not"):
        find_pair_maps(_pair(tmp_path, "06"), _folders(("d", tmp_path / "d")))


def test_wrong_shape_refused(tmp_path):
    from bids_siamfuse.external import find_pair_maps

    files = _caps(tmp_path / "caps", with_pet=("07",), with_gm=("07",))
    gm = files[("07", "GM")]
    _save(gm, np.ones((120, 145, 121)), GRID_AFFINE)
    with pytest.raises(DataError, match=r"modulated-on_probability\.nii\.gz: shape \(120, 145"):
        find_pair_maps(_pair(tmp_path, "07"), _folders(("caps", tmp_path / "caps")))


def test_cropped_field_of_view_refused(tmp_path):
    from bids_siamfuse.external import find_pair_maps

    files = _bids_derivs(tmp_path / "d", sub="08", pet_grid=NLIN2009A_2MM)
    pet = files[("08", "PET")]
    _save(pet, np.ones((30, 30, 30)), NLIN2009A_2MM[1])  # 6 cm of the 2 mm box
    with pytest.raises(DataError, match=r"desc-preproc_pet\.nii: its field of view holds"):
        find_pair_maps(_pair(tmp_path, "08"), _folders(("d", tmp_path / "d")))


def test_already_normalized_pet_used_as_is(tmp_path):
    """This app's own desc-preproc_pet (sidecar with IntensityNormalization) is not redone."""
    from bids_siamfuse.external import find_pair_maps

    files = _bids_derivs(tmp_path / "d", sub="09", pet_grid=NLIN2009A_2MM)
    pet = files[("09", "PET")]
    _json(
        pet.with_name(pet.name.replace(".nii", ".json")),
        {"IntensityNormalization": "top 0.1%", "ReferenceRegion": "none"},
    )
    maps = find_pair_maps(_pair(tmp_path, "09"), _folders(("d", tmp_path / "d")))
    assert maps.pet.normalized_by_app.startswith("top 0.1%")
    assert maps.gm.path == files[("09", "GM")]


@pytest.mark.parametrize(
    ("value", "code"),
    [("nowhere=/no/such/folder", 66), ("=/tmp", 64), ("a b=/tmp", 64), ("raw=/tmp", 64)],
)
def test_bad_derivatives_values(fixture, value, code, capsys):
    root, _ = fixture
    args = [root / "raw", root / "out2", "participant", "--skip-bids-validation", "-d", value]
    assert _main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-d/--derivatives" in err[0]


def test_model_is_applied_to_the_external_region_file(fixture, tmp_path, monkeypatch):
    """With --model, the region file made from the external maps feeds the model workflow."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe
    from niworkflows.engine.workflows import LiterateWorkflow

    import bids_siamfuse.workflows.model as model_mod
    from bids_siamfuse.external import attach_external
    from bids_siamfuse.workflows.base import init_bids_siamfuse_wf
    from bids_siamfuse.workflows.common import ParticipantOptions

    def fake_apply_model_wf(*, bundle, output_dir, name="apply_model_wf", **kwargs):
        wf = LiterateWorkflow(name=name)
        wf.__desc__ = "model"
        fields = ["region_file", "source_entities"]
        wf.add_nodes([pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")])
        return wf

    monkeypatch.setattr(model_mod, "init_apply_model_wf", fake_apply_model_wf)
    root, _ = fixture
    plan = bids.Plan(pairs=[_pair(root / "raw", "01"), _pair(root / "raw", "04")], skipped=[])
    attach_external(plan, _folders(("caps", root / "caps")))
    assert [p.subject for p in plan.pairs] == ["01"] and plan.skipped[0][0] == "04"
    options = ParticipantOptions(
        output_dir=tmp_path / "out", bids_dir=root / "raw", model=tmp_path / "bundle"
    )
    wf = init_bids_siamfuse_wf(
        plan=plan, options=options, work_dir=tmp_path / "work", run_uuid="test"
    )
    names = {n.fullname for n in wf._get_all_nodes()}
    assert not [n for n in names if n.endswith((".bias", ".register", ".coreg"))]
    pair_wf = wf.get_node("single_subject_01_wf").get_node("pet_ses_M000_trc_18FFDG_wf")
    edges = {(u.name, v.name): d["connect"] for u, v, d in pair_wf._graph.edges(data=True)}
    assert ("regions", "inputnode.region_file") in edges[("maps", "apply_model_wf")]
    apply_input = pair_wf.get_node("apply_model_wf").get_node("inputnode")
    assert apply_input.inputs.source_entities == plan.pairs[0].source_entities


def test_caps_variants(tmp_path):
    """Two DARTEL groups -> ambiguous, refused; Clinica < 0.9 naming (acq-fdg) is matched."""
    import shutil

    from bids_siamfuse.external import find_pair_maps

    files = _caps(tmp_path / "caps", with_pet=("10",), with_gm=("10",))
    pet = files[("10", "PET")]
    other = pet.parent.parent / "group-AD" / pet.name
    other.parent.mkdir()
    shutil.copy(pet, other)
    folders = _folders(("caps", tmp_path / "caps"))
    with pytest.raises(DataError, match=r"ambiguous PET map .*group-AD"):
        find_pair_maps(_pair(tmp_path, "10"), folders)
    other.unlink()
    old = pet.with_name(
        "sub-10_ses-M000_task-rest_acq-fdg_pet_space-Ixi549Space_suvr-pons_pet.nii.gz"
    )
    pet.rename(old)
    maps = find_pair_maps(_pair(tmp_path, "10"), folders)
    assert maps.pet.path == old and "pons" in maps.pet.source_normalization
