"""The bad-input catalog at image level: each case names the file and the problem (exit 65)."""

from __future__ import annotations

import gzip

import nibabel as nb
import numpy as np
import pytest

from bids_siamfuse import checks
from bids_siamfuse.errors import DataError


def _img(path, data, affine=None, dtype=None):
    img = nb.Nifti1Image(np.asarray(data), np.eye(4))
    if affine is not None:  # through the sform only: nibabel cannot put a singular one in qform
        img.header.set_qform(None, code=0)
        img.header.set_sform(affine, code=2)
        img = nb.Nifti1Image(img.dataobj, None, img.header)
    if dtype is not None:
        img.set_data_dtype(dtype)
    img.to_filename(str(path))
    return path


def good(shape=(8, 9, 10)):
    rng = np.random.default_rng(0)
    return rng.random(shape).astype(np.float32) + 0.5


def test_good_images_pass(tmp_path):
    t1 = _img(tmp_path / "t1.nii.gz", good())
    info = checks.check_header(t1, "T1w")
    assert info["shape"] == (8, 9, 10) and info["frames"] == 1 and info["axcodes"] == "RAS"
    data, _ = checks.check_data(t1, "T1w")
    assert data.dtype == np.float32
    pet = _img(tmp_path / "pet.nii.gz", good((8, 9, 10, 3)))
    assert checks.check_header(pet, "PET")["frames"] == 3
    one = _img(tmp_path / "one.nii.gz", good((8, 9, 10, 1)))
    assert checks.check_header(one, "T1w")["frames"] == 1


def _shear():
    aff = np.eye(4)
    aff[0, 1] = 0.3
    return aff


CASES = [
    ("4d_t1w", lambda p: _img(p, good((8, 9, 10, 2))), "T1w", "4-D T1w with 2 volumes"),
    ("2d", lambda p: _img(p, good((8, 9))), "T1w", "expected a 3-D volume"),
    ("flat", lambda p: _img(p, good((8, 9, 1))), "T1w", "expected a 3-D volume"),
    ("complex", lambda p: _img(p, good().astype(np.complex64)), "T1w", "complex voxel type"),
    (
        "rgb",
        lambda p: _img(p, np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])),
        "T1w",
        "RGB",
    ),
    ("singular", lambda p: _img(p, good(), np.diag([1.0, 0.0, 1.0, 1.0])), "T1w", "singular"),
    ("sheared", lambda p: _img(p, good(), _shear()), "PET", "sheared affine"),
    ("huge_zoom", lambda p: _img(p, good(), np.diag([50.0, 1, 1, 1])), "T1w", "implausible"),
    ("nan_affine", lambda p: _img(p, good(), np.diag([1.0, np.nan, 1, 1])), "PET", "NaN or inf"),
    ("5d_pet", lambda p: _img(p, good((8, 9, 10, 2, 2))), "PET", "expected 3-D or 4-D"),
    ("empty_file", lambda p: p.write_bytes(b"") or p, "T1w", "not a readable NIfTI"),
]


@pytest.mark.parametrize(("name", "make", "kind", "needle"), CASES, ids=[c[0] for c in CASES])
def test_header_cases(tmp_path, name, make, kind, needle):
    path = make(tmp_path / f"{name}.nii.gz")
    with pytest.raises(DataError, match=needle) as err:
        checks.check_header(path, kind)
    assert str(path) in str(err.value)


DATA_CASES = [
    ("nan_t1w", lambda p: _img(p, np.where(good() > 1.2, np.nan, good())), "T1w", "NaN"),
    ("inf_pet", lambda p: _img(p, np.where(good() > 0.6, np.inf, good())), "PET", "NaN/infinite"),
    ("zeros", lambda p: _img(p, np.zeros((8, 9, 10), np.float32)), "T1w", "every voxel is zero"),
    ("constant", lambda p: _img(p, np.full((8, 9, 10), 3.0, np.float32)), "PET", "constant"),
    ("negative_pet", lambda p: _img(p, -good()), "PET", "no positive uptake"),
]


@pytest.mark.parametrize(
    ("name", "make", "kind", "needle"), DATA_CASES, ids=[c[0] for c in DATA_CASES]
)
def test_data_cases(tmp_path, name, make, kind, needle):
    path = make(tmp_path / f"{name}.nii.gz")
    checks.check_header(path, kind)  # the header is fine: only the data betray it
    with pytest.raises(DataError, match=needle) as err:
        checks.check_data(path, kind)
    assert str(path) in str(err.value)


def test_few_nonfinite_pet_voxels_are_zeroed(tmp_path):
    data = good()
    data[0, 0, 0] = np.nan
    path = _img(tmp_path / "pet.nii.gz", data)
    cleaned, _ = checks.check_data(path, "PET")
    assert cleaned[0, 0, 0] == 0 and np.isfinite(cleaned).all()


def test_truncated_and_fake_files(tmp_path):
    full = _img(tmp_path / "full.nii.gz", good((40, 40, 40)))
    raw = full.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    checks.check_header(truncated, "T1w")  # the header survives ...
    with pytest.raises(DataError, match="truncated or corrupt"):
        checks.check_data(truncated, "T1w")  # ... the data do not
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"this is a text file, not an image" * 20))
    with pytest.raises(DataError, match="not a readable NIfTI"):
        checks.check_header(fake, "T1w")
    plain = tmp_path / "plain.nii.gz"
    plain.write_text("hello")
    with pytest.raises(DataError, match="not a readable NIfTI"):
        checks.check_header(plain, "PET")
    with pytest.raises(DataError, match="no such file"):
        checks.check_header(tmp_path / "missing.nii.gz", "PET")


def test_huge_image_refused_before_loading(tmp_path):
    hdr = nb.Nifti1Header()
    hdr.set_data_shape((1400, 1400, 1400))
    hdr.set_data_dtype(np.float32)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as f:  # a header claiming 10 GB, and almost no data behind it
        hdr.write_to(f)
        f.write(b"\0" * 1024)
    with pytest.raises(DataError, match="GB limit"):
        checks.check_header(path, "T1w")


@pytest.mark.parametrize(
    ("meta", "frames", "needle"),
    [
        ({}, 1, "no JSON sidecar"),
        ({"FrameDuration": [300]}, 1, "lacks FrameTimesStart"),
        ({"FrameTimesStart": [0, 300], "FrameDuration": [300]}, 2, "has 2 values"),
        ({"FrameTimesStart": [0, 300], "FrameDuration": [300, 300]}, 3, "lists 2 frame"),
        ({"FrameTimesStart": [0], "FrameDuration": [0]}, 1, "must be positive"),
        ({"FrameTimesStart": [0, 100], "FrameDuration": [300, 300]}, 2, "overlap"),
    ],
)
def test_pet_sidecar(tmp_path, meta, frames, needle):
    with pytest.raises(DataError, match=needle):
        checks.check_pet_sidecar(tmp_path / "pet.nii.gz", meta, frames)


def test_pet_sidecar_ok():
    out = checks.check_pet_sidecar(
        "p", {"FrameTimesStart": [0, 300], "FrameDuration": [300, 300], "Units": "Bq/mL"}, 2
    )
    assert out["FrameDuration"] == [300.0, 300.0]
