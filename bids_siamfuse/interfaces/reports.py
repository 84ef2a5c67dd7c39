"""Reportlet interfaces: QC figures of the participant workflow (see reports/reportlets.py)."""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _ReportOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="the SVG reportlet")


def _binary(img, threshold=0.5):
    import nibabel as nb

    data = np.asanyarray(img.dataobj, dtype=np.float32) > threshold
    return nb.Nifti1Image(data.astype(np.uint8), img.affine)


def _crop_to(img, mask, margin_mm=8.0):
    """``img`` cropped to the bounding box of ``mask`` (same grid) plus a margin."""
    import nibabel as nb

    data = np.asanyarray(mask.dataobj) > 0
    idx = np.nonzero(data)
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    lo = [max(0, int(i.min() - margin_mm / z)) for i, z in zip(idx, zooms)]
    hi = [min(n, int(i.max() + margin_mm / z) + 1) for i, n, z in zip(idx, data.shape, zooms)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ np.array(lo) + img.affine[:3, 3]
    return nb.Nifti1Image(np.asanyarray(img.dataobj)[sl], aff)


class _SegReportInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    gm = File(exists=True, mandatory=True)
    wm = File(exists=True, mandatory=True)


class SegmentationReport(SimpleInterface):
    """Brain mask (red), WM (blue) and GM (magenta) outlines over the T1w."""

    input_spec = _SegReportInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        from ..reports.reportlets import segmentation_svg

        mask = nb.load(self.inputs.brain_mask)
        crop = lambda img: _crop_to(img, mask)  # noqa: E731
        out = os.path.join(runtime.cwd, "seg.svg")
        self._results["out_report"] = segmentation_svg(
            crop(nb.load(self.inputs.t1w)),
            [
                crop(_binary(mask)),
                crop(_binary(nb.load(self.inputs.wm))),
                crop(_binary(nb.load(self.inputs.gm))),
            ],
            out,
            colors=["r", "b", "magenta"],
        )
        return runtime


class _T1w2MNIInputSpec(BaseInterfaceInputSpec):
    t1w_mni = File(exists=True, mandatory=True, desc="T1w on the grid")


class T1w2MNIReport(SimpleInterface):
    """Flicker: the ICBM152 template on the grid and the normalized T1w."""

    input_spec = _T1w2MNIInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        from ..data.templates import grid_brain_mask, grid_image, load_template
        from ..preproc.registration import resample_to_grid
        from ..reports.reportlets import registration_svg

        tpl = load_template("T1w")
        tpl_grid = grid_image(resample_to_grid(np.asanyarray(tpl.dataobj, np.float32), tpl.affine))
        mask = grid_image(grid_brain_mask().astype(np.uint8), dtype=np.uint8)
        out = os.path.join(runtime.cwd, "t1w2mni.svg")
        self._results["out_report"] = registration_svg(
            tpl_grid,
            nb.load(self.inputs.t1w_mni),
            out,
            fixed_label="ICBM152 2009a (template)",
            moved_label="T1w (normalized)",
            bbox=mask,
            contour=mask,
        )
        return runtime


class _CoregReportInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    wm = File(exists=True, mandatory=True)
    pet_ref = File(exists=True, mandatory=True)
    matrix = File(exists=True, mandatory=True, desc="PET -> T1w matrix (.npy)")


class PETCoregReport(SimpleInterface):
    """Flicker: the T1w and the PET reference resampled into it, WM outline on both."""

    input_spec = _CoregReportInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        from ..preproc.registration import apply_matrix, sample_at
        from ..reports.reportlets import registration_svg

        mask = nb.load(self.inputs.brain_mask)
        t1 = _crop_to(nb.load(self.inputs.t1w), mask)
        wm = _crop_to(_binary(nb.load(self.inputs.wm)), mask)
        brain = _crop_to(mask, mask)
        pet = nb.load(self.inputs.pet_ref)
        idx = np.indices(t1.shape, dtype=np.float64).reshape(3, -1)
        pts = apply_matrix(
            np.linalg.inv(np.load(self.inputs.matrix)), apply_matrix(t1.affine, idx)
        )
        values = sample_at(
            np.asanyarray(pet.dataobj, np.float32), pet.affine, pts.reshape(3, *t1.shape)
        )
        out = os.path.join(runtime.cwd, "coreg.svg")
        self._results["out_report"] = registration_svg(
            t1,
            nb.Nifti1Image(values, t1.affine),
            out,
            fixed_label="T1w",
            moved_label="PET (coregistered)",
            bbox=brain,
            contour=wm,
        )
        return runtime


class _GridReportInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="a map on the grid")
    kind = traits.Enum("pet", "regions", mandatory=True)


class GridReport(SimpleInterface):
    """PET on the grid with the template brain outline, or GM with the AAL outlines."""

    input_spec = _GridReportInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        from ..data.atlas import load_atlas
        from ..data.templates import grid_brain_mask, grid_image
        from ..reports.reportlets import segmentation_svg

        mask = grid_image(grid_brain_mask().astype(np.uint8), dtype=np.uint8)
        out = os.path.join(runtime.cwd, f"{self.inputs.kind}.svg")
        if self.inputs.kind == "pet":
            self._results["out_report"] = segmentation_svg(
                nb.load(self.inputs.in_file), [mask], out, bbox=mask, colors=["r"]
            )
        else:
            from ..data.templates import GRID_AFFINE
            from ..reports.reportlets import in_plane_boundaries, overlay_svg, upsample_labels

            # thin AAL outlines over the GM map: in-plane, one-sided, on a 0.75 mm grid
            fine, fine_affine = upsample_labels(np.asarray(load_atlas().labels), GRID_AFFINE)
            edges = in_plane_boundaries(fine.astype(np.int16))
            self._results["out_report"] = overlay_svg(
                nb.load(self.inputs.in_file),
                {k: nb.Nifti1Image(v.astype(np.uint8), fine_affine) for k, v in edges.items()},
                out,
                bbox=mask,
                label="GM (MNI) and AAL116 regions",
            )
        return runtime
