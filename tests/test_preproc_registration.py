"""ANTs plumbing: conversions, transform files, rigid registration, composed deformations."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest
from phantoms import affine, blobs, mean_error, moved, rigid, world

from bids_siamfuse.preproc import registration as reg


def test_to_ants_round_trip_oblique():
    """Physical coordinates survive nibabel -> ANTs -> nibabel, oblique and flipped axes."""
    aff = np.eye(4)
    aff[:3, :3] = rigid((12.0, -7.0, 20.0), (0, 0, 0))[:3, :3] @ np.diag([-1.1, 1.2, 1.0])
    aff[:3, 3] = [30.0, -40.0, 12.0]
    data = np.random.default_rng(0).random((9, 10, 11)).astype(np.float32)
    img = nb.Nifti1Image(data, aff)
    a = reg.to_ants(img)
    assert np.allclose(reg.ants_affine(a), aff, atol=1e-5)
    # ANTs' own index->point agrees with the nibabel affine (LPS <-> RAS)
    point = np.array(a.origin) + np.asarray(a.direction) @ (np.array(a.spacing) * [2, 3, 4])
    assert np.allclose(point * [-1, -1, 1], aff[:3, :3] @ [2, 3, 4] + aff[:3, 3], atol=1e-4)
    back = reg.to_nibabel(a)
    assert np.allclose(back.affine, aff, atol=1e-5)
    assert np.array_equal(back.get_fdata(dtype=np.float32), data)


def test_matrix_files_round_trip(tmp_path):
    m = rigid((5.0, -3.0, 8.0), (4.0, -2.0, 7.5), centre=(10.0, 5.0, -3.0))
    for name in ("x.txt", "x.mat"):
        path = reg.write_matrix(m, tmp_path / name)
        assert np.allclose(reg.read_matrix(path), m, atol=1e-5)
    assert (tmp_path / "x.txt").read_text().startswith("#Insight Transform File")


def test_rigid_registration_recovers_known_transform(tmp_path):
    """A phantom moved by a known rotation and shift: the rigid fit finds it to < 0.3 mm."""
    shape, voxel = (56, 64, 52), 2.0
    aff = affine(voxel, shape)
    fixed = nb.Nifti1Image(blobs(world(shape, aff)), aff)
    motion = rigid((6.0, -4.0, 5.0), (3.0, -4.0, 2.5))
    moving = nb.Nifti1Image(moved(shape, aff, motion), aff)
    stage = reg.Stage("Rigid[0.2]", "MeanSquares", "200x100x50", "4x2x1", "2x1x0vox")
    out = reg.antsreg(
        reg.to_ants(fixed), reg.to_ants(moving), [stage], out_prefix=str(tmp_path / "r_")
    )
    estimate = reg.read_matrix(out["affine"])  # fixed point -> moving point = inv(motion)
    inside = world(shape, aff).reshape(3, -1)[:, fixed.get_fdata().ravel() > 50]
    assert mean_error(estimate, np.linalg.inv(motion), inside) < 0.3


def test_compose_to_grid_and_jacobian(tmp_path):
    """An affine transform composed on a grid: exact positions, Jacobian = |det A|."""
    a = np.diag([1.1, 0.95, 1.05, 1.0])
    a[:3, 3] = [2.0, -3.0, 1.0]
    path = reg.write_matrix(a, tmp_path / "a.mat")
    shape = (12, 14, 10)
    aff = affine(3.0, shape)
    aff[0, 0] = -3.0  # a flipped axis, like the output grid
    pos = reg.compose_to_grid([str(path)], shape, aff, tmp_path)
    expected = world(shape, aff).reshape(3, -1)
    expected = a[:3, :3] @ expected + a[:3, 3:4]
    assert np.allclose(pos.reshape(3, -1), expected, atol=1e-3)
    jac = reg.jacobian_determinant(pos, aff)
    assert np.allclose(jac, abs(np.linalg.det(a[:3, :3])), atol=1e-4)


def test_sample_at_matches_voxels():
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    aff = affine(2.0, data.shape, centre=(3.0, -1.0, 2.0))
    pts = world(data.shape, aff)
    assert np.allclose(reg.sample_at(data, aff, pts), data)


def test_settings_default_and_sloppy():
    default, sloppy = reg.registration_settings(False), reg.registration_settings(True)
    assert default.syn_stages[0].shrink == "4x2x1"  # SyN reaches the 2 mm template grid
    assert sloppy.syn_stages[0].shrink == "4x2"  # --sloppy stops at 4 mm
    assert sloppy.atropos_iterations < default.atropos_iterations
    assert "Rigid" in default.as_dict()["affine_stages"][0]["transform"]


def test_antsreg_failure_is_reported(tmp_path):
    """A failed registration raises RegistrationError (the node fails cleanly)."""
    img = reg.to_ants(
        nb.Nifti1Image(blobs(world((16, 16, 16), affine(4.0, (16,) * 3))), np.eye(4))
    )
    stage = reg.Stage("Rigid[0.2]", "MeanSquares", "10", "1", "0vox")
    with pytest.raises(reg.RegistrationError):  # a missing initial transform
        reg.antsreg(img, img, [stage], out_prefix=str(tmp_path / "y"), initial="nope.mat")


def test_node_tmp_keeps_antspyx_temporaries_inside(tmp_path, monkeypatch):
    """ants.atropos writes its posteriors with tempfile.mktemp (antsr*prob*.nii.gz): inside
    node_tmp they land in the node's folder, which is removed; the system temp dir gets
    nothing."""
    import tempfile

    import ants

    outer = tmp_path / "system_tmp"
    outer.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(outer))
    data = blobs(world((24, 24, 24), affine(4.0, (24,) * 3))).astype(np.float32)
    img = ants.from_numpy(data)
    mask = ants.from_numpy((data > np.percentile(data, 30)).astype(np.float32))
    node = tmp_path / "node" / "tmp"
    with reg.node_tmp(node) as inside:
        assert tempfile.gettempdir() == str(inside)
        ants.atropos(a=img, x=mask, i="kmeans[2]", m="[0.1,1x1x1]", c="[2,0]", v=0)
        assert list(inside.glob("antsr*prob*.nii.gz"))  # where antspyx wrote them
    assert not node.exists()
    assert list(outer.iterdir()) == []
    assert tempfile.gettempdir() == str(outer)


def test_set_threads_sizes_the_itk_pool_and_torch():
    """--omp-nthreads: ITK's pool (threads created by an ANTs filter) and torch follow it.

    One thread: ITK and torch would otherwise take every core (2 on CI)."""
    threads = 1
    import subprocess
    import sys

    script = f"""
from bids_siamfuse.preproc import registration as reg
reg.set_threads({threads})
import numpy as np, ants, torch
count = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('Threads'))
                    .split()[1])
before = count()
ants.smooth_image(ants.from_numpy(np.random.rand(40, 40, 40).astype('float32')), 2.0)
print(count() - before, torch.get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    itk, torch_threads = (int(v) for v in out.stdout.split())
    assert itk == threads
    assert torch_threads == threads
