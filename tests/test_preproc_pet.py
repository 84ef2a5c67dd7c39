"""PET numerics with known answers: frames, realignment, coregistration, grid, normalization."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest
from phantoms import affine, blobs, mean_error, moved, rigid, world

from bids_siamfuse.errors import DataError
from bids_siamfuse.preproc import pet
from bids_siamfuse.preproc import registration as reg

SHAPE, VOXEL = (48, 56, 44), 2.5


def _dynamic(tmp_path, motions, durations):
    aff = affine(VOXEL, SHAPE)
    frames = np.stack([moved(SHAPE, aff, m) for m in motions], axis=-1)
    path = tmp_path / "pet.nii.gz"
    nb.Nifti1Image(frames, aff).to_filename(path)
    starts = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
    meta = {"FrameDuration": list(durations), "FrameTimesStart": starts.tolist()}
    return path, meta, aff


def test_load_pet_static_and_dynamic(tmp_path):
    path, meta, _ = _dynamic(tmp_path, [np.eye(4)] * 3, [60.0, 120.0, 300.0])
    frames = pet.load_pet(path, meta)
    assert frames.n_frames == 3
    assert np.allclose(frames.weights, np.array([60, 120, 300]) / 480)
    # the sidecar disagrees with the image: equal weights, and the reason is noted
    frames = pet.load_pet(path, {"FrameDuration": [1.0, 2.0]})
    assert np.allclose(frames.weights, 1 / 3) and frames.notes
    static = tmp_path / "static.nii.gz"
    nb.Nifti1Image(blobs(world(SHAPE, affine(VOXEL, SHAPE))), affine(VOXEL, SHAPE)).to_filename(
        static
    )
    assert pet.load_pet(static, {}).n_frames == 1
    empty = tmp_path / "empty.nii.gz"
    nb.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)).to_filename(empty)
    with pytest.raises(DataError):
        pet.load_pet(empty, {})


def test_realignment_recovers_known_motions(tmp_path):
    """Frames moved by known rigid motions: realignment finds them to < 0.25 mm."""
    truth = [
        np.eye(4),
        rigid((2.0, -1.5, 1.0), (1.5, -1.0, 2.0)),
        rigid((-1.0, 2.5, -2.0), (-2.0, 1.5, -1.0)),
    ]
    path, meta, aff = _dynamic(tmp_path, truth, [300.0, 300.0, 600.0])
    frames = pet.load_pet(path, meta)
    ref, motions = pet.realign(frames, reg.registration_settings(False), tmp_path)
    inside = world(SHAPE, aff).reshape(3, -1)[:, frames.data[..., 0].ravel() > 50]
    for f in (1, 2):
        # motions map frame f's world onto the reference's; relative to frame 0 they equal the
        # truth's "frame f shows the head at motion_f @ q"
        estimate = np.linalg.inv(motions[0]) @ motions[f]
        assert mean_error(estimate, truth[f], inside) < 0.25
    # the realigned mean is sharp: it matches frame 0 moved to the reference
    assert ref.shape == SHAPE and np.isfinite(ref).all()
    table = pet.motion_table(frames, motions, inside.mean(axis=1))
    assert list(table.columns[:4]) == ["frame", "frame_start", "frame_duration", "weight"]
    assert {"trans_x", "rot_z", "framewise_displacement"} <= set(table.columns)


def test_to_grid_is_one_interpolation_of_the_frames():
    """Identity transforms: the grid values are the weighted frames sampled at the points."""
    aff = affine(VOXEL, SHAPE)
    data = blobs(world(SHAPE, aff))
    frames = pet.PETFrames(
        data=np.stack([data, 2 * data], axis=-1),
        affine=aff,
        durations=np.array([1.0, 3.0]),
        starts=np.array([0.0, 1.0]),
        notes=[],
    )
    pts = world((10, 12, 9), affine(4.0, (10, 12, 9)))
    out = pet.to_grid(frames, [np.eye(4), np.eye(4)], np.eye(4), pts)
    expected = reg.sample_at(data, aff, pts) * (0.25 + 0.75 * 2)
    assert np.allclose(out, expected, rtol=1e-5)


def test_coregistration_recovers_a_rigid_offset(tmp_path):
    """A 'PET' (other contrast, blurred, coarser) of a 'T1w' moved 10 mm / 6 deg: < 1 mm."""
    from scipy import ndimage

    shape_t1 = (90, 104, 84)
    aff_t1 = affine(1.5, shape_t1)
    t1 = blobs(world(shape_t1, aff_t1))
    mask = (t1 > 30).astype(np.uint8)
    offset = rigid((4.0, -6.0, 3.0), (8.0, -5.0, 4.0))  # PET world -> T1w world
    aff_pet = affine(VOXEL, SHAPE)
    # the PET voxel at world q shows the T1w anatomy at offset @ q, with another contrast
    src = world(SHAPE, aff_pet).reshape(3, -1)
    src = (offset[:3, :3] @ src + offset[:3, 3:4]).reshape(3, *SHAPE)
    uptake = blobs(src)
    uptake = ndimage.gaussian_filter(np.sqrt(uptake) * 10, 1.2)  # nonlinear contrast, blur
    matrix, itk = pet.coregister(
        nb.Nifti1Image(uptake.astype(np.float32), aff_pet),
        nb.Nifti1Image(t1, aff_t1),
        nb.Nifti1Image(mask, aff_t1),
        reg.registration_settings(False),
        tmp_path,
    )
    inside = world(shape_t1, aff_t1).reshape(3, -1)[:, mask.ravel() > 0]
    assert mean_error(np.linalg.inv(matrix), np.linalg.inv(offset), inside) < 1.0
    assert np.allclose(reg.read_matrix(itk), np.linalg.inv(matrix), atol=1e-4)


def test_normalization_top_mean_and_cerebellum():
    from bids_siamfuse.data.templates import GRID_SHAPE, grid_brain_mask

    rng = np.random.default_rng(1)
    data = np.where(grid_brain_mask(), rng.uniform(1000, 2000, GRID_SHAPE), 5.0)
    out, value, text = pet.normalize(data.astype(np.float32), "none")
    assert 1990 < value <= 2000 and "0.1%" in text
    assert out.max() == pytest.approx(2000 / value, rel=1e-4)
    assert (out[~grid_brain_mask()] == 0).all()  # background under 10 % of the top mean
    from bids_siamfuse.data.atlas import load_atlas

    atlas = load_atlas()
    cerebellar = np.isin(atlas.labels, [i for i, n in enumerate(atlas.names, 1) if "Cerebel" in n])
    cereb = pet.cerebellum_mask()
    assert 30_000 < cereb.sum() < cerebellar.sum()  # the grey part: 100-200 mL
    out, value, text = pet.normalize(data.astype(np.float32), "cerebellum")
    assert value == pytest.approx(float(data[cereb].mean()), rel=1e-6)
    assert "cerebellar" in text
