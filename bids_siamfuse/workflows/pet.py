"""PET workflow: frames -> reference -> T1w -> MNI grid -> intensity normalization -> regions.

One per PET/T1w pair; it takes the anatomical workflow's outputs of the pair's T1w.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .common import ParticipantOptions
from .outputs import connect_model, init_pet_derivatives_wf, init_pet_reports_wf

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


def init_pet_preproc_wf(
    *,
    pet: Path,
    pet_meta: dict,
    source: dict,
    anat_source: dict,
    t1w: Path,
    options: ParticipantOptions,
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
    options
        The run's :class:`~bids_siamfuse.workflows.common.ParticipantOptions`:
        ``pet_ref_region`` ``none`` (the paper's top-0.1% normalization) or ``cerebellum``
        (SUVR); with ``model``, the bundle is applied to the region file
        (``workflows.model.init_apply_model_wf``).

    Inputs (``inputnode``) come from the anatomical workflow: ``t1w_preproc, brain_mask, wm,
    gm_mni_modulated, positions`` (``ants``) or ``spm_deformation`` (``spm``).
    """
    from ..interfaces.pet import PETCoregister, PETReference, PETToGrid, SessionQC
    from ..preproc import sidecars
    from ..preproc.registration import registration_settings
    from .regions import init_regions_wf

    backend, sloppy, seed = options.backend, options.sloppy, options.seed
    omp_nthreads, pet_ref_region = options.omp_nthreads, options.pet_ref_region
    settings = registration_settings(sloppy)
    pet_uri = sidecars.bids_uri(pet, options.bids_dir)
    t1w_uri = sidecars.bids_uri(t1w, options.bids_dir)
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
    # dataset-wide wording: the methods text covers every session of the dataset,
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
        # fmt: off
        workflow.connect([
            (inputnode, session_qc, [("anat_qc", "anat_metrics"), ("gm_mni", "gm_mni")]),
            (reference, session_qc, [("motion_table", "motion_table"), ("notes", "pet_notes")]),
            (to_grid, session_qc, [("coverage", "coverage"), ("out_file", "pet_mni")]),
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
            workflow, inputnode, reference, spm=options.spm, ref_region=pet_ref_region
        )

    regions_wf = init_regions_wf(
        output_dir=options.output_dir,
        anat_source=anat_source,
        pet_source=source,
        sources=[pet_uri, t1w_uri],
    )
    derivatives_wf = init_pet_derivatives_wf(pet=pet, t1w=t1w, source=source, options=options)
    # fmt: off
    workflow.connect([
        (to_grid, derivatives_wf, [("description", "inputnode.description"),
                                   ("value", "inputnode.value"),
                                   ("out_file", "inputnode.pet_mni")]),
        (reference, derivatives_wf, [("notes", "inputnode.notes"),
                                     ("n_frames", "inputnode.n_frames"),
                                     ("ref_file", "inputnode.pet_ref"),
                                     ("motion_table", "inputnode.motion_table")]),
        (xfm_node, derivatives_wf, [(xfm_field, "inputnode.xfm")]),
        (inputnode, regions_wf, [("gm_mni_modulated", "inputnode.gm_modulated")]),
        (to_grid, regions_wf, [("out_file", "inputnode.pet")]),
        (reference, outputnode, [("ref_file", "pet_ref")]),
        (to_grid, outputnode, [("out_file", "pet_mni")]),
        (regions_wf, outputnode, [("outputnode.regions", "regions")]),
    ])
    # fmt: on
    if backend == "ants":
        workflow.connect([
            (session_qc, derivatives_wf, [("out_file", "inputnode.qc"),
                                          ("meta", "inputnode.qc_meta")]),
        ])  # fmt: skip

    if options.reports:
        reports_wf = init_pet_reports_wf(source=source, options=options)
        workflow.connect(to_grid, "out_file", reports_wf, "inputnode.pet_mni")
        if backend == "ants":
            workflow.connect([
                (inputnode, reports_wf, [("t1w_preproc", "inputnode.t1w_preproc"),
                                         ("brain_mask", "inputnode.brain_mask"),
                                         ("wm", "inputnode.wm")]),
                (reference, reports_wf, [("ref_file", "inputnode.pet_ref")]),
                (coreg, reports_wf, [("matrix", "inputnode.matrix")]),
            ])  # fmt: skip

    if options.model is not None:
        connect_model(workflow, regions_wf, "outputnode.regions", source=source, options=options)
    return workflow
