"""nipype interfaces of the anatomical workflow (ANTs backend): thin wrappers of preproc.anat."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..preproc import anat, segmentation
from ..preproc import registration as reg


class _ThreadedInputSpec(BaseInterfaceInputSpec):
    sloppy = traits.Bool(False, usedefault=True, desc="fast, low-accuracy settings")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")
    seed = traits.Int(42, usedefault=True, desc="random seed of the registrations")


def in_node_tmp(method):
    """Run an interface with its temporary files inside the node (``<cwd>/tmp``, removed after).

    antspyx leaves temporary files in the system temp dir (``tempfile.mktemp``); this keeps
    them inside the node's working directory and deletes them when the node ends.
    """

    @functools.wraps(method)
    def wrapper(self, runtime):
        with reg.node_tmp(os.path.join(runtime.cwd, "tmp")):
            return method(self, runtime)

    return wrapper


class _Collector:
    """Collects the WARNING records of ``bids_siamfuse.*`` loggers while a node runs, so the
    session's QC sidecar and report can list every warning of the run."""

    def __init__(self):
        import logging

        self.messages: list[str] = []
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                outer.messages.append(f"{record.name.split('.')[-1]}: {record.getMessage()}")

        self.handler = _Handler(level=logging.WARNING)
        self.logger = logging.getLogger("bids_siamfuse")

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        return False


def _prepare(inputs):
    reg.set_threads(inputs.num_threads)
    return reg.registration_settings(inputs.sloppy)


def _save(img, runtime, name: str) -> str:
    path = os.path.join(runtime.cwd, name)
    img.to_filename(path)
    return path


class AntsStep(SimpleInterface):
    """A step of the ANTs backend: :meth:`_step` runs with the node's ITK threads and
    registration settings (``sloppy``), its temporary files inside the node (``in_node_tmp``).
    :meth:`_collect` runs a call with the warnings it logs collected into the ``warnings``
    output."""

    @in_node_tmp
    def _run_interface(self, runtime):
        self._step(_prepare(self.inputs), runtime)
        return runtime

    def _step(self, settings, runtime) -> None:
        raise NotImplementedError

    def _collect(self, call, *args, **kwargs):
        with _Collector() as messages:
            out = call(*args, **kwargs)
        self._results["warnings"] = list(messages)
        return out


class _BiasCorrectInputSpec(_ThreadedInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the T1w as in the dataset")


class _BiasCorrectOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected T1w (float32)")
    head_mask = File(exists=True, desc="head mask (4 mm)")
    brain_centre = traits.List(traits.Float, desc="estimated brain centre (RAS mm)")


class T1wBiasCorrect(AntsStep):
    """Check the T1w, find the head and the brain centre, N4 inside the head."""

    input_spec = _BiasCorrectInputSpec
    output_spec = _BiasCorrectOutputSpec

    def _step(self, settings, runtime) -> None:
        import ants

        t1 = reg.to_ants(anat.load_t1w(self.inputs.in_file))
        head = anat.head_mask(t1)
        mask = ants.resample_image_to_target(head.mask, t1, interp_type="nearestNeighbor")
        # first pass (for registration): two fitting levels; the segmentation runs a second
        corrected, _ = anat.bias_correct(t1, mask, iterations=settings.n4_iterations[:2])
        self._results["out_file"] = _save(reg.to_nibabel(corrected), runtime, "t1w_n4.nii.gz")
        self._results["head_mask"] = _save(
            reg.to_nibabel(head.mask, np.uint8), runtime, "head_mask.nii.gz"
        )
        self._results["brain_centre"] = [float(v) for v in head.brain_centre]


class _TemplateRegistrationInputSpec(_ThreadedInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    brain_centre = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True)


class _TemplateRegistrationOutputSpec(TraitedSpec):
    composite = File(exists=True, desc="T1w->MNI (ANTs composite, .h5)")
    inverse_composite = File(exists=True, desc="MNI->T1w (ANTs composite, .h5)")
    affine = File(exists=True, desc="the affine part (ITK .mat)")
    rough_mask = File(exists=True, desc="brain mask of the affine stage (dilated)")
    affine_correlation = traits.Float(desc="template/T1w correlation after the affine")
    warnings = traits.List(traits.Str, desc="warnings logged while registering")


class TemplateRegistration(AntsStep):
    """Affine (masked, robust start) then SyN to the ICBM152 2009a template."""

    input_spec = _TemplateRegistrationInputSpec
    output_spec = _TemplateRegistrationOutputSpec

    def _step(self, settings, runtime) -> None:
        t1 = reg.to_ants(nb.load(self.inputs.in_file))
        head = anat.HeadInfo(
            mask=None, brain_centre=np.asarray(self.inputs.brain_centre), vertex_z=np.nan
        )
        out = self._collect(
            anat.register_to_template, t1, head, settings, Path(runtime.cwd), seed=self.inputs.seed
        )
        self._results["composite"] = out.composite
        self._results["inverse_composite"] = out.inverse_composite
        self._results["affine"] = out.affine
        self._results["rough_mask"] = _save(
            reg.to_nibabel(out.brain_mask_affine, np.uint8), runtime, "rough_brain_mask.nii.gz"
        )
        self._results["affine_correlation"] = out.affine_correlation


class _SegmentInputSpec(_ThreadedInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the T1w as in the dataset")
    n4_file = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    inverse_composite = File(exists=True, mandatory=True, desc="MNI->T1w transform")
    rough_mask = File(exists=True, mandatory=True, desc="generous brain mask")


class _SegmentOutputSpec(TraitedSpec):
    brain_mask = File(exists=True)
    gm = File(exists=True, desc="GM fraction (T1w space)")
    wm = File(exists=True, desc="WM fraction")
    csf = File(exists=True, desc="CSF fraction")
    dseg = File(exists=True, desc="labels: 1 GM, 2 WM, 3 CSF")
    tissue_means = traits.Dict(desc="global tissue intensity means")
    warnings = traits.List(traits.Str, desc="warnings logged while segmenting")


class TissueSegmentation(AntsStep):
    """Template brain mask and priors in the T1w, N4 in the brain, Atropos, partial volumes."""

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec

    def _step(self, settings, runtime) -> None:
        t1 = reg.to_ants(anat.load_t1w(self.inputs.in_file))
        n4 = reg.image_like(t1, reg.to_ants(nb.load(self.inputs.n4_file)).numpy())
        rough = reg.image_like(t1, reg.to_ants(nb.load(self.inputs.rough_mask)).numpy())
        inverse, cwd = self.inputs.inverse_composite, Path(runtime.cwd)
        seg = self._collect(segmentation.segment, t1, n4, inverse, rough, settings, cwd)
        for name in ("brain_mask", "gm", "wm", "csf", "dseg"):
            self._results[name] = _save(getattr(seg, name), runtime, f"{name}.nii.gz")
        self._results["tissue_means"] = {k: float(v) for k, v in seg.means.items()}


class _GridInputSpec(BaseInterfaceInputSpec):
    composite = File(exists=True, mandatory=True, desc="T1w->MNI transform")
    gm = File(exists=True, mandatory=True, desc="GM map in T1w space")
    t1w = File(exists=True, mandatory=True, desc="bias-corrected T1w (for QC)")
    num_threads = traits.Int(1, usedefault=True, nohash=True)


class _GridOutputSpec(TraitedSpec):
    positions = File(exists=True, desc="T1w position of every grid voxel (.npy, 3x121x145x121)")
    gm_mni = File(exists=True, desc="GM on the grid (wc1)")
    gm_mni_modulated = File(exists=True, desc="modulated GM on the grid (mwc1)")
    t1w_mni = File(exists=True, desc="T1w on the grid")
    gm_volume_native_mm3 = traits.Float()
    gm_volume_modulated_mm3 = traits.Float()


class GridNormalization(SimpleInterface):
    """The T1w->MNI map on the 121x145x121 grid; GM (plain and modulated) and T1w there."""

    input_spec = _GridInputSpec
    output_spec = _GridOutputSpec

    @in_node_tmp
    def _run_interface(self, runtime):
        from ..data.templates import grid_image

        reg.set_threads(self.inputs.num_threads)
        positions = anat.grid_positions(self.inputs.composite, Path(runtime.cwd))
        path = os.path.join(runtime.cwd, "grid_positions.npy")
        np.save(path, positions)
        self._results["positions"] = path
        gm = nb.load(self.inputs.gm)
        wc1, mwc1 = anat.normalize_to_grid(gm, positions)
        self._results["gm_mni"] = _save(grid_image(wc1), runtime, "gm_mni.nii.gz")
        self._results["gm_mni_modulated"] = _save(grid_image(mwc1), runtime, "gm_mni_mod.nii.gz")
        t1 = nb.load(self.inputs.t1w)
        t1_grid = reg.sample_at(np.asanyarray(t1.dataobj, np.float32), t1.affine, positions)
        self._results["t1w_mni"] = _save(grid_image(t1_grid), runtime, "t1w_mni.nii.gz")
        voxel = abs(float(np.linalg.det(gm.affine[:3, :3])))
        self._results["gm_volume_native_mm3"] = float(
            np.asanyarray(gm.dataobj, np.float64).sum() * voxel
        )
        self._results["gm_volume_modulated_mm3"] = float(mwc1.sum(dtype=np.float64) * 1.5**3)
        return runtime


class _AnatQCInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the T1w as in the dataset (voxel size)")
    t1w = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    brain_mask = File(exists=True, mandatory=True)
    gm = File(exists=True, mandatory=True, desc="GM fraction (T1w space)")
    wm = File(exists=True, mandatory=True)
    csf = File(exists=True, mandatory=True)
    tissue_means = traits.Dict(desc="Atropos class means (TissueSegmentation)")
    affine_correlation = traits.Float(desc="template/T1w correlation after the affine")
    gm_mni = File(exists=True, desc="GM on the grid (wc1)")
    t1w_mni = File(exists=True, desc="T1w on the grid")
    reg_warnings = traits.List(traits.Str, desc="warnings of the registration node")
    seg_warnings = traits.List(traits.Str, desc="warnings of the segmentation node")


class _AnatQCOutputSpec(TraitedSpec):
    metrics = traits.Dict(desc="T1w quality metrics (preproc/qc.py)")


class AnatQC(SimpleInterface):
    """T1w quality metrics: SNR/CNR, segmentation contrast, tissue fractions, template fits."""

    input_spec = _AnatQCInputSpec
    output_spec = _AnatQCOutputSpec

    def _run_interface(self, runtime):
        from ..preproc import qc

        def data(path):
            return np.asanyarray(nb.load(path).dataobj, dtype=np.float32)

        raw = nb.load(self.inputs.in_file)
        metrics = qc.anat_metrics(
            zooms=raw.header.get_zooms()[:3],
            t1w=data(self.inputs.t1w),
            brain_mask=data(self.inputs.brain_mask) > 0,
            gm=data(self.inputs.gm),
            wm=data(self.inputs.wm),
            csf=data(self.inputs.csf),
            means=dict(self.inputs.tissue_means or {}),
            affine_correlation=self.inputs.affine_correlation,
            gm_grid=data(self.inputs.gm_mni) if self.inputs.gm_mni else None,
            t1w_grid=data(self.inputs.t1w_mni) if self.inputs.t1w_mni else None,
        )
        self._results["metrics"] = {
            k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
            for k, v in metrics.items()
        }
        # travels with the metrics to the session's QC node (sidecar "Warnings", report)
        self._results["metrics"]["_warnings"] = [
            *(self.inputs.reg_warnings or []),
            *(self.inputs.seg_warnings or []),
        ]
        return runtime
