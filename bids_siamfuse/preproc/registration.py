"""ANTs registration through antspyx, called in-process (no ANTs command-line tools needed).

Conventions
    Every matrix this module returns is a 4x4 *RAS* world-to-world map (nibabel's convention).
    ANTs/ITK work in LPS and store the transform that maps *fixed* (reference) points to
    *moving* points; :func:`itk_to_ras` and :func:`ras_to_itk` convert. Images go in and out as
    nibabel images; :func:`to_ants` and :func:`to_nibabel` convert without touching the disk.

Registration
    :func:`antsreg` runs ``antsRegistration`` with an explicit list of stages (metric, transform,
    convergence, shrink factors, smoothing), the way nipype's ``ants.Registration`` or an
    ``antsRegistration`` command line would, so every setting is visible and documented
    (``docs/preprocessing.md``). :class:`RegistrationSettings` holds the settings of the
    default and the ``--sloppy`` runs.

Threads
    ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` when it starts; :func:`set_threads` (from
    :mod:`bids_siamfuse.threads`) sets it (``--omp-nthreads``) before antspyx is first used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import SiamFuseError
from ..threads import (  # noqa: F401 - the one thread setter (shared with model/), re-exported
    ITK_THREADS_VARIABLE,
    THREAD_VARIABLES,
    itk_threads,
    set_threads,
)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class RegistrationError(SiamFuseError):
    """antsRegistration (or another ANTs routine) failed."""


@contextlib.contextmanager
def node_tmp(directory):
    """Temporary files of antspyx (``tempfile.mktemp``) and of anything else honouring
    ``TMPDIR`` go to ``directory`` (created, then removed with its content on exit).

    antspyx writes e.g. Atropos posteriors (``antsr*prob*.nii.gz``) and registration outputs
    to the system temp dir and never deletes them; inside a node they land in (and are cleaned
    from) the node's working directory instead.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(directory)
    os.environ["TMPDIR"] = str(directory)
    try:
        yield directory
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(directory, ignore_errors=True)


def _ants():
    import ants

    return ants


# ----------------------------------------------------------------------------------------------
# Images and matrices
# ----------------------------------------------------------------------------------------------


def split_affine(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, spacing, direction) in LPS of a RAS voxel-to-world affine.

    A sheared affine has no exact ITK equivalent: the nearest rotation is used (polar
    decomposition), as ITK's NIfTI reader does.
    """
    lps = LPS @ np.asarray(affine, dtype=float)
    lin = lps[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = lin / spacing
    u, _, vt = np.linalg.svd(direction)
    rot = u @ vt
    if not np.allclose(rot, direction, atol=1e-4):
        direction = rot
    return lps[:3, 3].copy(), spacing, direction


def to_ants(img, dtype=np.float32):
    """A 3-D nibabel image as an ANTsImage (float32 by default)."""
    ants = _ants()
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {data.shape}")
    origin, spacing, direction = split_affine(img.affine)
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=dtype),
        origin=tuple(float(v) for v in origin),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
    )


def ants_affine(image) -> np.ndarray:
    """The RAS voxel-to-world affine of an ANTsImage."""
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(image.direction) @ np.diag(image.spacing)
    aff[:3, 3] = image.origin
    return LPS @ aff


def to_nibabel(image, dtype=np.float32):
    """An ANTsImage as a nibabel NIfTI image."""
    import nibabel as nb

    data = image.numpy().astype(dtype, copy=False)
    out = nb.Nifti1Image(data, ants_affine(image))
    out.header.set_xyzt_units("mm")
    return out


def image_like(reference, data: np.ndarray):
    """An ANTsImage holding ``data`` on ``reference``'s grid (same geometry, bit for bit)."""
    return reference.new_image_like(np.ascontiguousarray(data, dtype=np.float32))


def itk_to_ras(transform) -> np.ndarray:
    """The 4x4 RAS matrix of an ITK affine transform (fixed point -> moving point)."""
    params = np.asarray(transform.parameters, dtype=float)
    center = np.asarray(transform.fixed_parameters, dtype=float)
    mat = params[:9].reshape(3, 3)
    trans = params[9:12]
    out = np.eye(4)
    out[:3, :3] = mat
    out[:3, 3] = trans + center - mat @ center
    return LPS @ out @ LPS


def ras_to_itk(matrix: np.ndarray):
    """An ITK AffineTransform (LPS) equal to a 4x4 RAS point map."""
    ants = _ants()
    lps = LPS @ np.asarray(matrix, dtype=float) @ LPS
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    tx.set_fixed_parameters([0.0, 0.0, 0.0])
    tx.set_parameters(np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]]).tolist())
    return tx


def read_matrix(path: Path) -> np.ndarray:
    """RAS fixed->moving matrix of an ITK affine transform file (.mat or .txt)."""
    return itk_to_ras(_ants().read_transform(str(path)))


def write_matrix(matrix: np.ndarray, path: Path) -> Path:
    """Write a RAS fixed->moving matrix as an ITK transform (.txt: text, .mat: binary)."""
    _ants().write_transform(ras_to_itk(matrix), str(path))
    return Path(path)


def apply_matrix(matrix: np.ndarray, points: np.ndarray, *, dtype=np.float64) -> np.ndarray:
    """4x4 matrix applied to points of shape (3, N), computed in ``dtype``.

    ``dtype=np.float32`` halves the memory of large point clouds (the synthetic generator's
    13 M-point head grid) at ~1e-5 mm of rounding.
    """
    matrix = np.asarray(matrix, dtype=dtype)
    return matrix[:3, :3] @ np.asarray(points, dtype=dtype) + matrix[:3, 3:4]


# ----------------------------------------------------------------------------------------------
# antsRegistration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One antsRegistration stage."""

    transform: str  # e.g. "Rigid[0.2]", "Affine[0.1]", "SyN[0.2,2,0]"
    metric: str  # "MI" (Mattes), "CC", "MeanSquares"
    iterations: str  # "500x250x100"
    shrink: str  # "4x2x1"
    smoothing: str  # "2x1x0vox" or "4x2x1mm"
    metric_param: int = 32  # bins (MI) or radius (CC)
    sampling: float = 1.0  # fraction of voxels (regular sampling) for MI; 1: all
    convergence: str = "1e-6,10"
    masked: bool = True

    def args(self, fixed, moving, fixed_mask, moving_mask) -> list[str]:
        ants = _ants()
        f = ants.internal.get_pointer_string(fixed)
        m = ants.internal.get_pointer_string(moving)
        if self.metric == "MI":
            sampling = f",Regular,{self.sampling}" if self.sampling < 1 else ""
            metric = f"Mattes[{f},{m},1,{self.metric_param}{sampling}]"
        elif self.metric == "CC":
            metric = f"CC[{f},{m},1,{self.metric_param}]"
        elif self.metric == "MeanSquares":
            sampling = f",Regular,{self.sampling}" if self.sampling < 1 else ""
            metric = f"MeanSquares[{f},{m},1,0{sampling}]"
        else:
            raise ValueError(f"unknown metric {self.metric}")
        fm = ants.internal.get_pointer_string(fixed_mask) if fixed_mask is not None else "NA"
        mm = ants.internal.get_pointer_string(moving_mask) if moving_mask is not None else "NA"
        return [
            "--metric",
            metric,
            "--transform",
            self.transform,
            "--convergence",
            f"[{self.iterations},{self.convergence}]",
            "--shrink-factors",
            self.shrink,
            "--smoothing-sigmas",
            self.smoothing,
            "--masks",
            f"[{fm},{mm}]" if self.masked else "[NA,NA]",
        ]

    def describe(self) -> str:
        metric = {"MI": "Mattes mutual information", "CC": "cross-correlation"}.get(
            self.metric, self.metric
        )
        name = self.transform.split("[")[0]
        return (
            f"{name} ({metric}, {self.iterations} iterations at shrink factors "
            f"{self.shrink}, smoothing {self.smoothing})"
        )


def antsreg(
    fixed,
    moving,
    stages: list[Stage],
    *,
    out_prefix: str,
    initial: str | None = None,
    fixed_mask=None,
    moving_mask=None,
    composite: bool = False,
    seed: int = 42,
    winsorize: tuple[float, float] | None = (0.005, 0.995),
) -> dict:
    """Run antsRegistration; returns the transform files it wrote.

    ``initial``: an ITK transform file applied first (``-r``); with ``composite`` it is part of
    the written ``Composite.h5``. Keys of the result: ``affine`` (the last linear stage,
    ``0GenericAffine.mat``) for linear-only runs, ``composite``/``inverse_composite`` with
    ``composite``.
    """
    ants = _ants()
    args = ["--dimensionality", "3", "--float", "1"]
    if initial is not None:
        args += ["--initial-moving-transform", str(initial)]
    # antsRegistration reads masks as unsigned char images (a float mask is misread)
    if fixed_mask is not None:
        fixed_mask = (fixed_mask > 0.5).clone("unsigned char")
    if moving_mask is not None:
        moving_mask = (moving_mask > 0.5).clone("unsigned char")
    for stage in stages:
        args += stage.args(fixed, moving, fixed_mask, moving_mask)
    args += ["--output", f"[{out_prefix}]", "--random-seed", str(int(seed))]
    args += ["--collapse-output-transforms", "1"]
    if winsorize is not None:
        args += ["--winsorize-image-intensities", f"[{winsorize[0]},{winsorize[1]}]"]
    args += ["--write-composite-transform", "1" if composite else "0"]
    code = ants.internal.get_lib_fn("antsRegistration")(ants.internal.process_arguments(args))
    if code != 0:
        raise RegistrationError(f"antsRegistration failed (exit {code})")
    out = {}
    if composite:
        out["composite"] = f"{out_prefix}Composite.h5"
        out["inverse_composite"] = f"{out_prefix}InverseComposite.h5"
    else:
        out["affine"] = f"{out_prefix}0GenericAffine.mat"
    for path in out.values():
        if not Path(path).is_file():
            raise RegistrationError(f"antsRegistration did not write {path}")
    if "affine" in out and not np.isfinite(read_matrix(out["affine"])).all():
        raise RegistrationError("antsRegistration diverged (non-finite transform)")
    return out


@dataclass(frozen=True)
class RegistrationSettings:
    """Registration and segmentation settings (default run and ``--sloppy``)."""

    name: str
    template_resolution: float  # mm, the template grid SyN runs on
    affine_stages: tuple
    syn_stages: tuple
    n4_iterations: tuple
    atropos_iterations: int
    atropos_prior_weight: float
    atropos_mrf: float
    segmentation_resolution: float  # mm, Atropos (class means/posteriors)
    pet_stages: tuple
    realign_stages: tuple

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("affine_stages", "syn_stages", "pet_stages", "realign_stages"):
            out[key] = [asdict(s) for s in getattr(self, key)]
        return out


def _affine_stages(sloppy: bool) -> tuple:
    # 8 and 4 mm only: SyN refines everything finer (a 2 mm affine level cost 5 s, gained 0)
    its = "200x100" if sloppy else "500x250"
    shrink, smooth = "4x2", "2x1vox"
    return (
        Stage("Rigid[0.2]", "MI", its, shrink, smooth, sampling=0.25),
        Stage("Affine[0.1]", "MI", its, shrink, smooth, sampling=0.25),
    )


def _syn_stages(sloppy: bool) -> tuple:
    if sloppy:  # the 2 mm level is skipped: SyN at 8 and 4 mm only
        return (Stage("SyN[0.2,2,0]", "MI", "100x70", "4x2", "2x1vox", convergence="1e-7,8"),)
    return (Stage("SyN[0.2,2,0]", "MI", "100x70x20", "4x2x1", "2x1x0vox", convergence="1e-7,8"),)


def _pet_stages(sloppy: bool) -> tuple:
    # fixed: the T1w brain at 2 mm; 0.24-0.32 mm error measured at 4x2x1 (0.29-0.36 at 8x4x2)
    shrink = "8x4x2" if sloppy else "4x2x1"
    smooth = "4x2x1vox" if sloppy else "2x1x0vox"
    return (Stage("Rigid[0.1]", "MI", "200x100x50", shrink, smooth, sampling=0.25),)


def _realign_stages(sloppy: bool) -> tuple:
    # frames at 2-2.5 mm, 6-8 mm FWHM: shrink 4 and 2 suffice (0.02-0.04 mm error measured;
    # the full-resolution level cost 12x more and gained nothing)
    its = "50x25" if sloppy else "100x50"
    return (Stage("Rigid[0.1]", "MI", its, "4x2", "1x0vox", sampling=0.25, masked=True),)


def registration_settings(sloppy: bool = False) -> RegistrationSettings:
    return RegistrationSettings(
        name="sloppy" if sloppy else "default",
        template_resolution=2.0,
        affine_stages=_affine_stages(sloppy),
        syn_stages=_syn_stages(sloppy),
        n4_iterations=(20, 20) if sloppy else (20, 20, 20),
        atropos_iterations=3 if sloppy else 5,
        atropos_prior_weight=0.5,
        atropos_mrf=0.1,
        segmentation_resolution=2.0,
        pet_stages=_pet_stages(sloppy),
        realign_stages=_realign_stages(sloppy),
    )


# ----------------------------------------------------------------------------------------------
# Deformations
# ----------------------------------------------------------------------------------------------


def compose_to_grid(transforms: list[str], shape, affine, work_dir: Path) -> np.ndarray:
    """Where each voxel of a grid maps to through ANTs ``transforms`` (RAS mm, (3, *shape)).

    ``transforms`` is a list as antsApplyTransforms takes it (fixed->moving point maps, last
    applied first); the grid is the fixed (reference) space, so for a T1w->template
    registration the forward composite gives, for every template-grid voxel, its position in
    the T1w.
    """
    import nibabel as nb

    ants = _ants()
    ref = to_ants(nb.Nifti1Image(np.zeros(shape, dtype=np.float32), affine))
    prefix = str(Path(work_dir) / "composed_")
    path = ants.apply_transforms(ref, ref, list(transforms), compose=prefix)
    if path is None or not Path(path).is_file():
        raise RegistrationError("antsApplyTransforms could not compose the transforms")
    field = np.asanyarray(nb.load(path).dataobj, dtype=np.float32).reshape(*shape, 3)
    Path(path).unlink(missing_ok=True)
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = apply_matrix(affine, idx)
    disp = field.reshape(-1, 3).T.astype(np.float64)
    disp[:2] *= -1.0  # LPS -> RAS
    return (world + disp).astype(np.float32).reshape(3, *shape)


def jacobian_determinant(positions: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """|det d(position)/d(world)| of a map given on a grid ((3, *shape) RAS positions)."""
    lin = np.asarray(affine, dtype=float)[:3, :3]
    inv = np.linalg.inv(lin)  # d(index)/d(world)
    # d(pos_i)/d(index_j), then chain rule to world coordinates
    grads = np.empty((3, 3, *positions.shape[1:]), dtype=np.float32)
    for i in range(3):
        for j, g in enumerate(np.gradient(positions[i].astype(np.float32))):
            grads[i, j] = g
    jac = np.einsum("ij...,jk->ik...", grads, inv)
    jac = np.moveaxis(jac, (0, 1), (-2, -1))
    return np.abs(np.linalg.det(jac)).astype(np.float32)


@functools.cache
def grid_points() -> np.ndarray:
    """World (RAS mm) position of every voxel of the output grid, (3, *GRID_SHAPE), read-only."""
    from ..data.templates import GRID_AFFINE, GRID_SHAPE

    idx = np.indices(GRID_SHAPE, dtype=np.float64).reshape(3, -1)
    points = apply_matrix(GRID_AFFINE, idx).reshape(3, *GRID_SHAPE)
    points.setflags(write=False)
    return points


def resample_to_grid(data: np.ndarray, affine: np.ndarray, *, order: int = 1, cval=0.0):
    """``data`` (voxel->world ``affine``) on the output grid: float32, trilinear by default
    (``order`` 0: nearest), ``cval`` outside its field of view; the one "to grid" step.

    Not nilearn's ``resample_to_img``: that composes one voxel-to-voxel matrix and casts the
    result back to the input's type, so its values differ from these (two float64 matrix
    products, float32 samples) in the last bits; the derivatives written so far came from
    this arithmetic, and staying byte-identical to them matters more.
    """
    return sample_at(data, affine, grid_points(), order=order, cval=cval)


def sample_at(
    data: np.ndarray,
    affine: np.ndarray,
    points: np.ndarray,
    order: int = 1,
    cval=0.0,
    *,
    mode: str = "constant",
    dtype=np.float64,
):
    """Values of a volume at world points ((3, ...) RAS mm), trilinear by default.

    ``dtype``: of the voxel coordinates (see :func:`apply_matrix`); ``mode``: scipy's
    ``map_coordinates`` mode outside the volume.
    """
    from scipy import ndimage

    shape = points.shape[1:]
    vox = apply_matrix(np.linalg.inv(affine), points.reshape(3, -1), dtype=dtype)
    out = ndimage.map_coordinates(
        np.asarray(data, dtype=np.float32),
        vox,
        order=order,
        mode=mode,
        cval=cval,
        prefilter=False,
        output=np.float32,
    )
    return out.reshape(shape)
