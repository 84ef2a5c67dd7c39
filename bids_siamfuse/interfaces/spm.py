"""SPM12 interfaces (nipype.interfaces.spm, version pinned) and the Python glue around them."""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    traits,
)
from nipype.interfaces.spm.base import SPMCommand
from nipype.interfaces.spm.preprocess import NewSegment, NewSegmentInputSpec

from ..preproc.spm import BOUNDING_BOX, SPM_VERSION, VOXEL_SIZE
from .pet import RigidXfmOutputSpec, save_normalized, save_pet2t1w


class _SPM12SegmentInputSpec(NewSegmentInputSpec):
    warp_voxel_size = traits.List(
        traits.Float, minlen=3, maxlen=3, field="warp.vox", desc="voxel size of warped maps"
    )
    warp_bounding_box = traits.List(
        traits.List(traits.Float, minlen=3, maxlen=3),
        minlen=2,
        maxlen=2,
        field="warp.bb",
        desc="bounding box of warped maps (mm)",
    )
    mrf = traits.Float(field="warp.mrf", desc="MRF cleanup strength")
    cleanup = traits.Int(field="warp.cleanup", desc="0 none, 1 light, 2 thorough")
    smoothness = traits.Float(field="warp.fwhm", desc="smoothness (FWHM, mm)")


class SPM12Segment(NewSegment):
    """SPM12's unified segmentation (``spm.spatial.preproc``), SPM12 pinned.

    nipype picks the batch from the SPM version it detects by running MATLAB and falls back to
    SPM8's ``spm.tools.preproc8`` when that fails; this interface always writes the SPM12
    batch, and adds the warped maps' voxel size and bounding box, which nipype's
    ``NewSegment`` lacks (SPM12 writes them on the TPM's 1.5 mm box by default, which is the
    121x145x121 grid).
    """

    input_spec = _SPM12SegmentInputSpec

    def __init__(self, **inputs):
        self._jobtype = "spatial"
        self._jobname = "preproc"
        SPMCommand.__init__(self, **inputs)

    @property
    def version(self):
        return SPM_VERSION


def spm12_segment(tpm: str, **inputs) -> SPM12Segment:
    """The segmentation as the paper ran it: SPM12 defaults, GM warped and modulated."""
    tissues = []
    for index, gaussians in enumerate((1, 1, 2, 3, 4, 2), start=1):
        native = (index <= 3, False)
        warped = (True, True) if index == 1 else (False, False)
        tissues.append(((tpm, index), gaussians, native, warped))
    return SPM12Segment(
        channel_info=(0.001, 60.0, (False, True)),  # biasreg, biasfwhm, save bias-corrected
        tissues=tissues,
        affine_regularization="mni",
        warping_regularization=[0.0, 0.001, 0.5, 0.05, 0.2],
        sampling_distance=3.0,
        mrf=1.0,
        cleanup=1,
        smoothness=0.0,
        write_deformation_fields=[True, True],  # inverse (iy_), forward (y_)
        warp_voxel_size=list(VOXEL_SIZE),
        warp_bounding_box=[list(b) for b in BOUNDING_BOX],
        **inputs,
    )


class _ToNiftiInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    out_name = Str("image.nii", usedefault=True)


class _ToNiftiOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class ToNifti(SimpleInterface):
    """An uncompressed float32 3-D NIfTI copy (SPM reads neither .nii.gz nor odd types)."""

    input_spec = _ToNiftiInputSpec
    output_spec = _ToNiftiOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        img = nb.load(self.inputs.in_file)
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        out = nb.Nifti1Image(data, img.affine)
        out.header.set_xyzt_units("mm")
        self._results["out_file"] = os.path.join(runtime.cwd, self.inputs.out_name)
        out.to_filename(self._results["out_file"])
        return runtime


class _SPMTissuesInputSpec(BaseInterfaceInputSpec):
    c1 = File(exists=True, mandatory=True)
    c2 = File(exists=True, mandatory=True)
    c3 = File(exists=True, mandatory=True)


class _SPMTissuesOutputSpec(TraitedSpec):
    brain_mask = File(exists=True)
    dseg = File(exists=True)


class SPMTissues(SimpleInterface):
    """Brain mask (c1 + c2 + c3 > 0.5) and labels (1 GM, 2 WM, 3 CSF) from SPM's maps."""

    input_spec = _SPMTissuesInputSpec
    output_spec = _SPMTissuesOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        imgs = [nb.load(getattr(self.inputs, k)) for k in ("c1", "c2", "c3")]
        data = np.stack([np.asanyarray(i.dataobj, dtype=np.float32) for i in imgs])
        mask = data.sum(axis=0) > 0.5
        dseg = np.where(mask, np.argmax(data, axis=0) + 1, 0).astype(np.uint8)
        for name, arr in (("brain_mask", mask.astype(np.uint8)), ("dseg", dseg)):
            path = os.path.join(runtime.cwd, f"{name}.nii.gz")
            nb.Nifti1Image(arr, imgs[0].affine).to_filename(path)
            self._results[name] = path
        return runtime


class _GridConformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="an SPM output on (or near) the grid")
    out_name = Str("grid.nii.gz", usedefault=True)


class _GridConformOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class GridConform(SimpleInterface):
    """SPM's warped map as a float32 image exactly on the 121x145x121 grid.

    SPM writes the grid itself (same shape, affine within 1e-3 mm): the data are kept. Any
    other geometry is resampled (trilinear) onto the grid.
    """

    input_spec = _GridConformInputSpec
    output_spec = _GridConformOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        from ..data.templates import grid_image, on_grid
        from ..preproc.registration import resample_to_grid

        img = nb.load(self.inputs.in_file)
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        data = np.where(np.isfinite(data), data, 0.0)
        if not on_grid(img):
            data = resample_to_grid(data, img.affine)
        self._results["out_file"] = os.path.join(runtime.cwd, self.inputs.out_name)
        grid_image(data).to_filename(self._results["out_file"])
        return runtime


class _PETNormalizeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="PET on the grid")
    ref_region = traits.Enum("none", "cerebellum", usedefault=True)


class _PETNormalizeOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    value = traits.Float()
    description = Str()


class PETNormalize(SimpleInterface):
    """Intensity normalization of a PET already on the grid (SPM backend)."""

    input_spec = _PETNormalizeInputSpec
    output_spec = _PETNormalizeOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        from ..data.templates import on_grid
        from ..errors import DataError
        from ..preproc.pet import normalize

        img = nb.load(self.inputs.in_file)
        if not on_grid(img):
            raise DataError(f"{self.inputs.in_file}: not on the 121x145x121 grid")
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        out, value, description = normalize(data, self.inputs.ref_region)
        save_normalized(self._results, runtime, out, value, description)
        return runtime


class _HeaderXfmInputSpec(BaseInterfaceInputSpec):
    original = File(exists=True, mandatory=True, desc="the PET reference before Coregister")
    coregistered = File(exists=True, mandatory=True, desc="after (header changed)")


class HeaderTransform(SimpleInterface):
    """The rigid transform SPM's Coregister wrote into the header, as an ITK file."""

    input_spec = _HeaderXfmInputSpec
    output_spec = RigidXfmOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        from ..preproc.registration import write_matrix

        before = nb.load(self.inputs.original).affine
        after = nb.load(self.inputs.coregistered).affine
        pet_to_t1w = after @ np.linalg.inv(before)
        self._results["matrix"] = save_pet2t1w(runtime, pet_to_t1w)
        self._results["itk_file"] = str(
            write_matrix(np.linalg.inv(pet_to_t1w), os.path.join(runtime.cwd, "pet2t1w.txt"))
        )
        return runtime
