"""Region extraction: boxes, crops, round trips, signatures, the cohort loader, eq. 1."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bids_siamfuse.bids import read_participants
from bids_siamfuse.errors import DataError, NothingSelectedError
from bids_siamfuse.group.cohort import load_cohort
from bids_siamfuse.model.data import RegionDataset, Standardizer, extract, layout_from_labels
from bids_siamfuse.preproc import regions


@pytest.fixture
def toy():
    labels = np.zeros((10, 12, 8), dtype=np.int16)
    labels[1:4, 2:7, 1:3] = 1  # a 3x5x2 box, full
    labels[5:9, 0:2, 4:8] = 2  # 4x2x4
    labels[6, 8, 2] = 3  # a single voxel
    labels[5, 9, 3] = 3  # -> box 2x2x2 with two voxels
    return labels, layout_from_labels(labels, ("a", "b", "c"), {"atlas": "toy"})


def test_boxes_and_crops(toy):
    labels, layout = toy
    assert layout.boxes.tolist() == [[1, 2, 1, 4, 7, 3], [5, 0, 4, 9, 2, 8], [5, 8, 2, 7, 10, 4]]
    assert layout.n_voxels == 30 + 32 + 2
    rng = np.random.default_rng(0)
    image = rng.random(labels.shape).astype(np.float32) + 1
    vec = extract(image, layout)
    for r in range(3):
        crop = layout.to_box(vec, r)
        b = layout.boxes[r]
        box = (slice(b[0], b[3]), slice(b[1], b[4]), slice(b[2], b[5]))
        inside = labels[box] == r + 1
        assert crop.shape == inside.shape
        assert np.array_equal(crop[inside], image[box][inside])  # the region's own values
        assert np.all(crop[~inside] == 0)  # nothing from neighbours or background


def test_paint_roundtrip(toy):
    labels, layout = toy
    values = np.array([2.0, -1.0, 7.5])
    painted = layout.paint(values)
    assert np.array_equal(painted[labels > 0], values[labels[labels > 0] - 1])
    assert np.all(painted[labels == 0] == 0)
    assert np.allclose(layout.region_means(extract(painted, layout)), values)


def test_standardizer_fits_training_only(toy):
    _, layout = toy
    rng = np.random.default_rng(1)
    train = rng.normal(5.0, 2.0, (20, layout.n_voxels)).astype(np.float32)
    test = rng.normal(50.0, 9.0, (5, layout.n_voxels)).astype(np.float32)
    std = Standardizer().fit({"gm": train}, layout)
    z = std.transform("gm", train, layout)
    for r in range(3):
        sl = layout.region_slice(r)
        assert abs(z[:, sl].mean()) < 1e-5
        assert abs(z[:, sl].std() - 1) < 1e-4
    # the test data do not influence the statistics, and are mapped with the training ones
    zt = std.transform("gm", test, layout)
    assert zt.mean() > 10
    back = Standardizer.from_dict(json.loads(json.dumps(std.to_dict())))
    assert np.allclose(back.transform("gm", test, layout), zt)


def test_atlas_layout_on_grid():
    layout = regions.atlas_layout()
    assert layout.n_regions == 116
    assert layout.names[0] == "Precentral_L" and layout.names[-1] == "Vermis_10"
    assert (layout.boxes[:, 3:] <= np.array(layout.grid_shape)).all()
    assert layout.signature["atlas"] == "AAL116" and layout.signature["shape"] == [121, 145, 121]
    # a 300-subject cohort (two modalities, float32) stays far under 8 GB
    assert 300 * 2 * 4 * layout.n_voxels < 2e9


def test_region_outputs_against_known_volumes(tmp_path):
    """The region writer against an independent construction: GM and PET maps whose voxel
    values are known functions of the atlas label, and expectations computed with numpy from
    the label volume alone (``np.bincount``), not with the layout or ``extract`` it writes with."""
    import pandas as pd

    from bids_siamfuse.data.atlas import load_atlas

    labels = np.asarray(load_atlas().labels).astype(np.int64)
    n = int(labels.max())
    assert n == 116
    rng = np.random.default_rng(7)
    level = rng.uniform(0.2, 0.9, n + 1)
    level[0] = 5.0  # background: must never reach a region
    ramp = np.indices(labels.shape)[0] * 1e-3  # varies inside every region
    gm = (level[labels] + ramp).astype(np.float32)
    pet = (2.0 * level[labels]).astype(np.float32)
    pet[(labels == 3) & (np.indices(labels.shape)[2] % 2 == 0)] = 0.0  # half of region 3
    src = {"subject": "01", "session": "01"}
    regions.write_region_outputs(
        tmp_path, gm, pet, anat_source=src, pet_source={**src, "tracer": "FDG"}
    )

    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1:]
    gm_sums = np.bincount(flat, weights=gm.ravel().astype(np.float64), minlength=n + 1)[1:]
    nonzero = np.bincount(flat, weights=(pet.ravel() > 0).astype(float), minlength=n + 1)[1:]
    gm_table = pd.read_csv(next(tmp_path.rglob("*desc-gm_morph.tsv")), sep="\t")
    assert gm_table["index"].tolist() == list(range(1, n + 1))
    assert gm_table["voxels"].tolist() == counts.tolist()
    assert np.allclose(gm_table["gm_volume_mm3"], gm_sums * 1.5**3, rtol=1e-5)  # 6 digits
    pet_table = pd.read_csv(next(tmp_path.rglob("*_stats.tsv")), sep="\t")
    # PET is 2 x level in a region's non-zero voxels
    assert np.allclose(pet_table["mean_uptake"], 2.0 * level[1:] * nonzero / counts, rtol=1e-5)
    fraction = pet_table["nonbackground_fraction"].to_numpy()
    assert np.allclose(fraction, nonzero / counts) and 0.4 < fraction[2] < 0.6
    assert np.all(np.delete(fraction, 2) == 1.0)

    with np.load(next(tmp_path.rglob("*_regions.npz"))) as data:
        vec_gm, vec_pet, signature = data["gm"], data["pet"], json.loads(str(data["signature"]))
    assert signature["atlas"] == "AAL116" and signature["shape"] == [121, 145, 121]
    assert vec_gm.shape == vec_pet.shape == (counts.sum(),)
    assert vec_gm.max() < 1.0 and vec_gm.min() > 0.0  # no background (5.0), no padding zeros
    # regions in index order, each segment holding exactly that region's voxel values
    offsets = np.r_[0, np.cumsum(counts)]
    for r in range(1, n + 1):
        seg = slice(offsets[r - 1], offsets[r])
        assert np.array_equal(np.sort(vec_gm[seg]), np.sort(gm[labels == r])), r
        assert np.array_equal(np.sort(vec_pet[seg]), np.sort(pet[labels == r])), r


def test_load_cohort(synth_derivs):
    parts = read_participants(synth_derivs)
    ds = load_cohort(synth_derivs / "derivatives" / "bids_siamfuse", parts, classes=("CN", "AD"))
    assert isinstance(ds, RegionDataset)
    n_files = len(list(synth_derivs.glob("derivatives/bids_siamfuse/sub-*/ses-*/pet/*.npz")))
    assert len(ds) == n_files and len(set(ds.subjects)) == 24
    assert ds.gm.flags["C_CONTIGUOUS"] and ds.gm.dtype == np.float32
    assert ds.gm.shape == (n_files, ds.layout.n_voxels)
    cn = parts.index[parts.diagnosis == "CN"]
    assert all((ds.labels[ds.subjects == s] == 0).all() for s in cn)
    with pytest.raises(NothingSelectedError):
        load_cohort(
            synth_derivs / "derivatives" / "bids_siamfuse", parts, classes=("MCIs", "MCIc")
        )
    with pytest.raises(DataError, match="at least two"):
        load_cohort(synth_derivs / "derivatives" / "bids_siamfuse", parts, classes=("CN",))


def test_signature_mismatch_is_refused(synth_derivs, tmp_path):
    import shutil

    deriv = tmp_path / "deriv"
    shutil.copytree(synth_derivs / "derivatives" / "bids_siamfuse", deriv)
    victim = sorted(deriv.glob("sub-*/ses-*/pet/*_regions.npz"))[0]
    with np.load(victim) as f:
        payload = dict(f)
    sig = json.loads(str(payload["signature"]))
    sig["atlas_source_sha256"] = "0" * 64
    payload["signature"] = np.array(json.dumps(sig, sort_keys=True))
    regions.save_region_file(victim, payload)
    with pytest.raises(DataError, match="another atlas or grid"):
        load_cohort(deriv, read_participants(synth_derivs), classes=("CN", "AD"))


def test_dataset_save_load(synth_derivs, tmp_path):
    parts = read_participants(synth_derivs)
    ds = load_cohort(synth_derivs / "derivatives" / "bids_siamfuse", parts)
    ds.save(tmp_path / "cohort.npz")
    back = RegionDataset.load(tmp_path / "cohort.npz")
    assert np.array_equal(back.gm, ds.gm) and back.classes == ds.classes
    assert np.array_equal(back.layout.local_index, ds.layout.local_index)
    assert back.layout.signature == ds.layout.signature
