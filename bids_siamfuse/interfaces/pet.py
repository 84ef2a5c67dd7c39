"""nipype interfaces of the PET workflow: thin wrappers of preproc.pet."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    traits,
)

from .anat import AntsStep, in_node_tmp


class _PETReferenceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the PET as in the dataset (3-D or 4-D)")
    metadata = traits.Dict(desc="the PET's JSON sidecar (FrameDuration, FrameTimesStart)")
    sloppy = traits.Bool(False, usedefault=True)
    seed = traits.Int(42, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True)


class _PETReferenceOutputSpec(TraitedSpec):
    ref_file = File(exists=True, desc="duration-weighted mean of the realigned frames")
    motions = File(exists=True, desc="per-frame 4x4 RAS matrices, frame -> reference (.npy)")
    motion_table = File(exists=True, desc="motion parameters per frame (TSV)")
    n_frames = traits.Int()
    notes = traits.List(Str)


class PETReference(AntsStep):
    """Realign the frames of a dynamic PET (static images pass through) and average them."""

    input_spec = _PETReferenceInputSpec
    output_spec = _PETReferenceOutputSpec

    def _step(self, settings, runtime) -> None:
        import nibabel as nb

        from ..bids import save_table
        from ..preproc import pet
        from ..preproc import registration as reg

        frames = pet.load_pet(self.inputs.in_file, dict(self.inputs.metadata or {}))
        ref, motions = pet.realign(
            frames,
            settings,
            Path(runtime.cwd),
            passes=1 if self.inputs.sloppy else 2,
            seed=self.inputs.seed,
        )
        img = nb.Nifti1Image(ref.astype(np.float32), frames.affine)
        img.header.set_xyzt_units("mm")
        self._results["ref_file"] = os.path.join(runtime.cwd, "petref.nii.gz")
        img.to_filename(self._results["ref_file"])
        self._results["motions"] = os.path.join(runtime.cwd, "motions.npy")
        np.save(self._results["motions"], np.stack(motions))
        positive = np.where(ref > 0, ref, 0.0)
        idx = np.array(np.nonzero(positive > 0.3 * positive.max()), dtype=np.float64)
        centre = reg.apply_matrix(frames.affine, idx).mean(axis=1)
        table = pet.motion_table(frames, motions, centre)
        self._results["motion_table"] = str(save_table(Path(runtime.cwd) / "motion.tsv", table))
        self._results["n_frames"] = frames.n_frames
        self._results["notes"] = list(frames.notes)


class _CoregisterInputSpec(BaseInterfaceInputSpec):
    pet_ref = File(exists=True, mandatory=True, desc="PET reference image")
    t1w = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    brain_mask = File(exists=True, mandatory=True, desc="T1w brain mask")
    sloppy = traits.Bool(False, usedefault=True)
    seed = traits.Int(42, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True)


class RigidXfmOutputSpec(TraitedSpec):
    """The PET -> T1w transform of either backend (``PETCoregister``, SPM's
    ``HeaderTransform``)."""

    itk_file = File(exists=True, desc="ITK transform (T1w points -> PET points; .txt)")
    matrix = File(exists=True, desc="4x4 RAS matrix PET world -> T1w world (.npy)")


def save_pet2t1w(runtime, matrix) -> str:
    """The PET -> T1w RAS matrix as ``pet2t1w_ras.npy`` in the node's folder."""
    path = os.path.join(runtime.cwd, "pet2t1w_ras.npy")
    np.save(path, matrix)
    return path


class PETCoregister(AntsStep):
    """Rigid PET -> T1w registration, Mattes mutual information."""

    input_spec = _CoregisterInputSpec
    output_spec = RigidXfmOutputSpec

    def _step(self, settings, runtime) -> None:
        import nibabel as nb

        from ..preproc import pet

        matrix, itk_file = pet.coregister(
            nb.load(self.inputs.pet_ref),
            nb.load(self.inputs.t1w),
            nb.load(self.inputs.brain_mask),
            settings,
            Path(runtime.cwd),
            seed=self.inputs.seed,
        )
        self._results["itk_file"] = itk_file
        self._results["matrix"] = save_pet2t1w(runtime, matrix)


class _ToGridInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the PET as in the dataset")
    metadata = traits.Dict(desc="the PET's JSON sidecar")
    motions = File(exists=True, mandatory=True, desc="per-frame motion matrices (.npy)")
    matrix = File(exists=True, mandatory=True, desc="PET -> T1w matrix (.npy)")
    positions = File(exists=True, mandatory=True, desc="T1w position of each grid voxel (.npy)")
    ref_region = traits.Enum("none", "cerebellum", usedefault=True)


class _ToGridOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="intensity-normalized PET on the grid")
    value = traits.Float(desc="normalization value (Bq/mL or the data's units)")
    description = Str(desc="what the normalization did")
    coverage = traits.Dict(desc="field-of-view coverage metrics of the grid brain (QC)")


def save_normalized(results: dict, runtime, data, value, description: str) -> None:
    """The outputs of an intensity-normalized PET on the grid (``PETToGrid`` and the SPM
    backend's ``PETNormalize``): ``pet_mni.nii.gz`` in the node, the value, the description."""
    from ..data.templates import grid_image

    results["out_file"] = os.path.join(runtime.cwd, "pet_mni.nii.gz")
    grid_image(data).to_filename(results["out_file"])
    results["value"] = float(value)
    results["description"] = description


class PETToGrid(SimpleInterface):
    """PET to the 121x145x121 grid in one interpolation, then intensity normalization."""

    input_spec = _ToGridInputSpec
    output_spec = _ToGridOutputSpec

    @in_node_tmp
    def _run_interface(self, runtime):
        from ..preproc import pet

        frames = pet.load_pet(self.inputs.in_file, dict(self.inputs.metadata or {}))
        motions = list(np.load(self.inputs.motions))
        if len(motions) != frames.n_frames:
            raise ValueError(f"{len(motions)} motion matrices for {frames.n_frames} frames")
        positions = np.load(self.inputs.positions)
        data = pet.to_grid(frames, motions, np.load(self.inputs.matrix), positions)
        normalized, value, description = pet.normalize(data, self.inputs.ref_region)
        from ..data.atlas import load_atlas
        from ..preproc import qc

        atlas = load_atlas()
        self._results["coverage"] = qc.pet_metrics(
            coverage=pet.fov_coverage(frames, motions, np.load(self.inputs.matrix), positions),
            atlas_labels=np.asarray(atlas.labels),
            atlas_names=list(atlas.names),
        )
        save_normalized(self._results, runtime, normalized, value, description)
        return runtime


class _SessionQCInputSpec(BaseInterfaceInputSpec):
    anat_metrics = traits.Dict(desc="T1w metrics (AnatQC)")
    coverage = traits.Dict(desc="PET field-of-view metrics (PETToGrid)")
    motion_table = File(exists=True, desc="per-frame motion (PETReference)")
    pet_mni = File(exists=True, desc="normalized PET on the grid")
    gm_mni = File(exists=True, desc="GM on the grid")
    pet_notes = traits.List(Str, desc="notes of the PET reference node (frame timing)")


class _SessionQCOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="QC table: one row per metric (TSV)")
    meta = traits.Dict(desc="sidecar of the QC table")
    flagged = traits.Bool(desc="any metric outside its reference range")
    reasons = traits.List(Str, desc="why the session is flagged")


class SessionQC(SimpleInterface):
    """Every quality metric of the session against its reference range (preproc/qc.py)."""

    input_spec = _SessionQCInputSpec
    output_spec = _SessionQCOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb
        import pandas as pd

        from ..bids import save_table
        from ..preproc import qc

        metrics = dict(self.inputs.anat_metrics or {})
        warnings = list(metrics.pop("_warnings", []) or []) + list(self.inputs.pet_notes or [])
        motion = None
        if self.inputs.motion_table:
            motion = pd.read_csv(self.inputs.motion_table, sep="\t", na_values=["n/a"])
        pet_grid = gm_grid = None
        if self.inputs.pet_mni and self.inputs.gm_mni:
            pet_grid = np.asanyarray(nb.load(self.inputs.pet_mni).dataobj, np.float32)
            gm_grid = np.asanyarray(nb.load(self.inputs.gm_mni).dataobj, np.float32)
        metrics.update(qc.pet_metrics(motion=motion, pet_grid=pet_grid, gm_grid=gm_grid))
        metrics.update(dict(self.inputs.coverage or {}))
        rows = qc.evaluate(metrics)
        why = qc.reasons(rows)
        warnings += qc.warnings(rows)  # outside a warning range (thick slices): shown, no flag
        path = os.path.join(runtime.cwd, "qc.tsv")
        save_table(Path(path), qc.qc_table(rows))
        self._results["out_file"] = path
        self._results["flagged"] = bool(why)
        self._results["reasons"] = why
        self._results["meta"] = {**qc.sidecar(why), "Warnings": warnings}
        return runtime
