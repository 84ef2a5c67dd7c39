"""PET workflow: frames -> reference -> T1w -> MNI grid -> intensity normalization -> regions.

One per PET/T1w pair; it takes the anatomical workflow's outputs of the pair's T1w.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .anatomical import sink

INPUT_FIELDS = [
    "t1w_preproc",
    "brain_mask",
    "wm",
    "gm_mni_modulated",
    "positions",
    "spm_deformation",
    "anat_qc",
    "gm_mni",
]


def _pet_meta(description, value, sources, ref_region, method):
    """Sidecar of the normalized PET (a Function node: imports inside)."""
    from bids_siamfuse.preproc.sidecars import pet_mni_meta

    return pet_mni_meta(
        sources, normalization=description, value=value, ref_region=ref_region, method=method
    )


def _ref_meta(notes, n_frames, sources):
    return {
        "Description": "PET reference: duration-weighted mean of the realigned frames"
        if n_frames > 1
        else "PET reference: the static PET image",
        "Sources": list(sources),
        "FramesAveraged": int(n_frames),
        "Notes": list(notes),
    }


def init_pet_preproc_wf(
    *,
    pet: Path,
    pet_meta: dict,
    source: dict,
    anat_source: dict,
    t1w: Path,
    output_dir: Path,
    bids_dir: Path | None,
    backend: str = "ants",
    sloppy: bool = False,
    pet_ref_region: str = "none",
    omp_nthreads: int = 1,
    seed: int = 42,
    spm=None,
    model: Path | None = None,
    device: str = "cpu",
    reports: bool = True,
    name: str = "pet_preproc_wf",
):
    """Build the workflow of one PET series.

    Workflow graph::

        inputnode -> reference (realign frames, weighted mean) -> coreg (rigid, MI, to T1w)
                  -> to_grid (frames -> T1w -> MNI grid, one interpolation; normalization)
                  -> regions_wf (AAL116) [-> apply_model_wf with --model] -> data sinks

    Parameters
    ----------
    pet, pet_meta
        The PET file and its sidecar (frame durations).
    source, anat_source
        Entities of the PET (``pair.source_entities``) and of its T1w's derivatives.
    t1w
        The pair's T1w (for provenance).
    pet_ref_region
        ``none`` (the paper's top-0.1% normalization) or ``cerebellum`` (SUVR).
    model, device
        Apply this bundle to the region file (``workflows.model.init_apply_model_wf``).

    Inputs (``inputnode``) come from the anatomical workflow: ``t1w_preproc, brain_mask, wm,
    gm_mni_modulated, positions`` (``ants``) or ``spm_deformation`` (``spm``).
    """
    from ..interfaces.pet import PETCoregister, PETReference, PETToGrid, SessionQC
    from ..preproc import sidecars
    from ..preproc.registration import registration_settings
    from .regions import init_regions_wf

    settings = registration_settings(sloppy)
    pet_uri = sidecars.bids_uri(pet, bids_dir)
    t1w_uri = sidecars.bids_uri(t1w, bids_dir)
    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=INPUT_FIELDS), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["pet_ref", "pet_mni", "regions", "pet2t1w_xfm"]),
        name="outputnode",
    )
    reference = pe.Node(
        PETReference(
            in_file=str(pet),
            metadata=dict(pet_meta),
            sloppy=sloppy,
            seed=seed,
            num_threads=omp_nthreads,
        ),
        name="reference",
        n_procs=omp_nthreads,
        mem_gb=1.0,
    )
    # dataset-wide wording (issue 17): the methods text covers every session of the dataset,
    # static and dynamic alike; which PET was which is in the run's log (and the counts in the
    # dataset summary of logs/CITATION.md, reports/boilerplate.dataset_text)
    realign_text = (
        "The frames of dynamic (4-D) PET series were realigned rigidly (Mattes mutual "
        "information, two passes to the duration-weighted mean, as SPM's register-to-mean) "
        "and averaged weighted by their duration into a reference image; a static PET served "
        "as its own reference. "
    )
    norm_text = (
        "divided by the mean of the 0.1% brightest voxels within the template brain mask, and "
        "voxels below 10% of that value were set to zero as background [@arco]"
        if pet_ref_region == "none"
        else "divided by the mean uptake of the AAL cerebellar grey matter (SUVR), voxels "
        "below 10% of the brightest-voxel mean were set to zero as background"
    )
    method = "ANTs (antspyx) rigid + T1w transforms" if backend == "ants" else "SPM12"
    if backend == "ants":
        workflow.__desc__ = f"""\
Each PET series was processed as follows. {realign_text}The reference was
registered to the T1w with a rigid transform ({settings.pet_stages[0].describe()}),
initialized by matching the centres of mass of the bright PET voxels and the T1w brain mask.
The PET was then resampled onto the 121x145x121, 1.5 mm MNI grid in a single interpolation
that composes the frame motions, the PET-to-T1w transform and the T1w-to-MNI transform, and
intensity-normalized: {norm_text}."""
        coreg = pe.Node(
            PETCoregister(sloppy=sloppy, seed=seed, num_threads=omp_nthreads),
            name="coreg",
            n_procs=omp_nthreads,
            mem_gb=1.0,
        )
        to_grid = pe.Node(
            PETToGrid(in_file=str(pet), metadata=dict(pet_meta), ref_region=pet_ref_region),
            name="to_grid",
            mem_gb=1.5,
        )
        # fmt: off
        workflow.connect([
            (inputnode, coreg, [("t1w_preproc", "t1w"), ("brain_mask", "brain_mask")]),
            (reference, coreg, [("ref_file", "pet_ref")]),
            (reference, to_grid, [("motions", "motions")]),
            (coreg, to_grid, [("matrix", "matrix")]),
            (inputnode, to_grid, [("positions", "positions")]),
            (coreg, outputnode, [("itk_file", "pet2t1w_xfm")]),
        ])
        # fmt: on
        xfm_node, xfm_field = coreg, "itk_file"
        # quality metrics of the session and its flag (preproc/qc.py, docs/preprocessing.md)
        session_qc = pe.Node(SessionQC(), name="session_qc", mem_gb=1.0)
        ds_qc = sink("ds_qc", "qc", source, output_dir)
        # fmt: off
        workflow.connect([
            (inputnode, session_qc, [("anat_qc", "anat_metrics"), ("gm_mni", "gm_mni")]),
            (reference, session_qc, [("motion_table", "motion_table"), ("notes", "pet_notes")]),
            (to_grid, session_qc, [("coverage", "coverage"), ("out_file", "pet_mni")]),
            (session_qc, ds_qc, [("out_file", "in_file"), ("meta", "meta_dict")]),
        ])
        # fmt: on
    else:
        from .spm import init_pet_spm_nodes

        workflow.__desc__ = f"""\
Each PET series was processed as follows. {realign_text}The reference was
coregistered to the bias-corrected T1w with SPM12's Coregister (normalized mutual information)
and written onto the 121x145x121, 1.5 mm MNI grid through the T1w's SPM12 deformation field
(Normalise: Write, 4th-degree B-spline), then intensity-normalized: {norm_text}."""
        to_grid, xfm_node, xfm_field = init_pet_spm_nodes(
            workflow, inputnode, reference, spm=spm, ref_region=pet_ref_region
        )

    regions_wf = init_regions_wf(
        output_dir=output_dir,
        anat_source=anat_source,
        pet_source=source,
        sources=[pet_uri, t1w_uri],
    )
    pet_meta_node = pe.Node(
        niu.Function(
            function=_pet_meta,
            input_names=["description", "value", "sources", "ref_region", "method"],
            output_names=["meta"],
        ),
        name="pet_meta",
        run_without_submitting=True,
    )
    pet_meta_node.inputs.sources = [pet_uri, t1w_uri]
    pet_meta_node.inputs.ref_region = pet_ref_region
    pet_meta_node.inputs.method = method
    ref_meta = pe.Node(
        niu.Function(
            function=_ref_meta,
            input_names=["notes", "n_frames", "sources"],
            output_names=["meta"],
        ),
        name="ref_meta",
        run_without_submitting=True,
    )
    ref_meta.inputs.sources = [pet_uri]
    ds_pet_mni = sink("ds_pet_mni", "pet_mni", source, output_dir, dtype="float32")
    ds_pet_ref = sink("ds_pet_ref", "pet_ref", source, output_dir, dtype="float32")
    ds_motion = sink(
        "ds_pet_confounds",
        "pet_confounds",
        source,
        output_dir,
        meta={
            "Description": "per-frame rigid motion relative to the PET reference",
            "Sources": [pet_uri],
            "trans_x": {"Description": "displacement of the reference centre", "Units": "mm"},
            "rot_x": {"Description": "rotation angle (R = Rz Ry Rx)", "Units": "rad"},
            "framewise_displacement": {"Description": "Power's FD, 50 mm sphere", "Units": "mm"},
        },
    )
    ds_xfm = sink(
        "ds_pet2t1w_xfm",
        "pet2t1w_xfm",
        source,
        output_dir,
        meta=sidecars.xfm_meta(
            [pet_uri, t1w_uri],
            "rigid PET reference to T1w transform"
            + (
                " (ITK text format: antsApplyTransforms -i petref -r T1w -t this file)"
                if backend == "ants"
                else " (SPM12 Coregister: the reference's header matrix change, 4x4 RAS)"
            ),
        ),
    )
    # fmt: off
    workflow.connect([
        (to_grid, pet_meta_node, [("description", "description"), ("value", "value")]),
        (pet_meta_node, ds_pet_mni, [("meta", "meta_dict")]),
        (to_grid, ds_pet_mni, [("out_file", "in_file")]),
        (reference, ref_meta, [("notes", "notes"), ("n_frames", "n_frames")]),
        (ref_meta, ds_pet_ref, [("meta", "meta_dict")]),
        (reference, ds_pet_ref, [("ref_file", "in_file")]),
        (reference, ds_motion, [("motion_table", "in_file")]),
        (xfm_node, ds_xfm, [(xfm_field, "in_file")]),
        (inputnode, regions_wf, [("gm_mni_modulated", "inputnode.gm_modulated")]),
        (to_grid, regions_wf, [("out_file", "inputnode.pet")]),
        (reference, outputnode, [("ref_file", "pet_ref")]),
        (to_grid, outputnode, [("out_file", "pet_mni")]),
        (regions_wf, outputnode, [("outputnode.regions", "regions")]),
    ])
    # fmt: on

    if reports:
        from ..interfaces.reports import GridReport, PETCoregReport

        pet_rpt = pe.Node(GridReport(kind="pet"), name="pet_mni_rpt", mem_gb=0.5)
        workflow.connect(to_grid, "out_file", pet_rpt, "in_file")
        ds = sink("ds_fig_pet_mni", "fig_pet_mni", source, output_dir)
        workflow.connect(pet_rpt, "out_report", ds, "in_file")
        if backend == "ants":
            coreg_rpt = pe.Node(PETCoregReport(), name="coreg_rpt", mem_gb=0.5)
            # fmt: off
            workflow.connect([
                (inputnode, coreg_rpt, [("t1w_preproc", "t1w"), ("brain_mask", "brain_mask"),
                                        ("wm", "wm")]),
                (reference, coreg_rpt, [("ref_file", "pet_ref")]),
                (coreg, coreg_rpt, [("matrix", "matrix")]),
            ])
            # fmt: on
            ds = sink("ds_fig_pet_coreg", "fig_pet_coreg", source, output_dir)
            workflow.connect(coreg_rpt, "out_report", ds, "in_file")

    if model is not None:
        try:
            from .model import init_apply_model_wf
        except ImportError as exc:  # the model workflow is not part of this build
            from ..errors import SiamFuseError

            raise SiamFuseError(f"--model: model application is not available ({exc})") from None
        import inspect

        kwargs = {"bundle": Path(model), "output_dir": Path(output_dir), "name": "apply_model_wf"}
        if "device" in inspect.signature(init_apply_model_wf).parameters:
            kwargs["device"] = device
        apply_wf = init_apply_model_wf(**kwargs)
        apply_wf.inputs.inputnode.source_entities = dict(source)
        workflow.connect(regions_wf, "outputnode.regions", apply_wf, "inputnode.region_file")
    return workflow
