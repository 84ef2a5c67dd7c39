"""Anatomical workflow: T1w -> GM/WM/CSF, MNI normalization, GM on the 1.5 mm grid.

One per unique T1w (several PET sessions may share a T1w through the nearest-session rule).
Two backends build the same outputs (``outputnode`` fields): ``ants`` (default) and ``spm``.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .common import ANAT_FIELDS, ParticipantOptions
from .outputs import init_anat_derivatives_wf, init_anat_reports_wf


def _versions() -> dict:
    import ants
    import nipype
    import niworkflows

    from .. import __version__

    return {
        "antspyx": getattr(ants, "__version__", "unknown"),
        "nipype": nipype.__version__,
        "niworkflows": niworkflows.__version__,
        "bids_siamfuse": __version__,
    }


def init_anat_preproc_wf(
    *,
    t1w: Path,
    source: dict,
    options: ParticipantOptions,
    name: str = "anat_preproc_wf",
):
    """Build the anatomical workflow of one T1w.

    Workflow graph (``ants``)::

        inputnode -> bias (N4, head, brain centre) -> register (affine + SyN to ICBM152)
                  -> segment (template mask and priors, N4 in brain, Atropos, partial volumes)
                  -> grid (T1w->MNI map on the grid, wc1, mwc1) -> outputnode, data sinks

    Parameters
    ----------
    t1w
        The T1w file (set on ``inputnode.t1w``).
    source
        Entities its derivatives are named after (``{"subject", "session"}`` of the T1w).
    options
        The run's :class:`~bids_siamfuse.workflows.common.ParticipantOptions` (backend,
        ``sloppy``, threads, seed, ``reports``: the reportlets of :func:`init_anat_reports_wf`).

    Outputs (``outputnode``): ``t1w_preproc, brain_mask, gm, wm, csf, dseg`` (T1w space),
    ``gm_mni, gm_mni_modulated`` (grid), ``positions`` (T1w position of each grid voxel,
    ``ants``), ``t1w2mni_xfm, mni2t1w_xfm`` and ``spm_deformation`` (``spm``).
    """
    if options.backend == "spm":
        from .spm import init_anat_spm_wf

        return init_anat_spm_wf(t1w=t1w, source=source, options=options, name=name)
    from ..data.templates import template_source
    from ..interfaces.anat import (
        AnatQC,
        GridNormalization,
        T1wBiasCorrect,
        TemplateRegistration,
        TissueSegmentation,
    )
    from ..preproc.registration import registration_settings

    sloppy, omp_nthreads, seed = options.sloppy, options.omp_nthreads, options.seed
    settings = registration_settings(sloppy)
    versions = _versions()
    syn = settings.syn_stages[0]
    workflow = Workflow(name=name)
    workflow.__desc__ = f"""\
Each T1-weighted (T1w) image was processed with ANTs through antspyx
{versions["antspyx"]} (called in-process). A head mask was found with Otsu's threshold and
the position of the brain estimated from the top of the head; the image was corrected for
intensity non-uniformity with N4 [@n4] (B-spline distance 100 mm, at 4 mm). It was then
registered to the ICBM 2009a nonlinear symmetric template [@mni152nlin2009asym]
({template_source()}): a translation initialized from the estimated brain centre, then
{settings.affine_stages[0].describe()} and {settings.affine_stages[1].describe()} with a
metric mask of the template brain dilated by 6 mm; the brain was extracted with the template
brain mask mapped back through the affine transform, and registered to the template at
{settings.template_resolution:g} mm with the symmetric normalization (SyN) of ANTs [@ants]
({syn.describe()}, gradient step 0.2, update field smoothing 2 voxels). The template's brain
mask and grey matter (GM), white matter (WM) and cerebrospinal fluid (CSF) probability maps
were mapped into the T1w through the inverse transform; within the brain mask, a second N4
pass refined the intensity correction, and Atropos [@atropos] classified the tissues (3
classes, template priors weighted {settings.atropos_prior_weight:g}, MRF smoothing
{settings.atropos_mrf:g}, {settings.atropos_iterations} iterations, at
{settings.segmentation_resolution:g} mm). Partial-volume tissue fractions were computed at
the T1w's resolution by unmixing each voxel's intensity between the two adjacent tissue
classes chosen by the posteriors, with tissue means estimated locally (20 mm Gaussian
windows). The GM map was resampled to the MNI grid of 121x145x121 voxels of 1.5 mm through
the composed transform (SPM's *wc1*), and multiplied by the Jacobian determinant of the
transform to preserve the amount of GM (SPM's modulated *mwc1*), which is the input of the
region analysis.""" + (" Fast, low-accuracy settings (`--sloppy`) were used." if sloppy else "")

    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = str(t1w)
    outputnode = pe.Node(niu.IdentityInterface(fields=ANAT_FIELDS), name="outputnode")

    common = {"sloppy": sloppy, "num_threads": omp_nthreads}
    bias = pe.Node(T1wBiasCorrect(**common), name="bias", n_procs=omp_nthreads, mem_gb=1.0)
    register = pe.Node(
        TemplateRegistration(seed=seed, **common),
        name="register",
        n_procs=omp_nthreads,
        mem_gb=1.5,
    )
    segment = pe.Node(
        TissueSegmentation(**common), name="segment", n_procs=omp_nthreads, mem_gb=1.5
    )
    grid = pe.Node(
        GridNormalization(num_threads=omp_nthreads),
        name="grid",
        n_procs=omp_nthreads,
        mem_gb=1.0,
    )
    # quality metrics of the T1w (preproc/qc.py); the PET workflow adds its own and flags
    anat_qc = pe.Node(AnatQC(), name="anat_qc", mem_gb=1.0)
    # fmt: off
    workflow.connect([
        (inputnode, anat_qc, [("t1w", "in_file")]),
        (bias, anat_qc, [("out_file", "t1w")]),
        (register, anat_qc, [("affine_correlation", "affine_correlation"),
                             ("warnings", "reg_warnings")]),
        (segment, anat_qc, [("brain_mask", "brain_mask"), ("gm", "gm"), ("wm", "wm"),
                            ("csf", "csf"), ("tissue_means", "tissue_means"),
                            ("warnings", "seg_warnings")]),
        (grid, anat_qc, [("gm_mni", "gm_mni"), ("t1w_mni", "t1w_mni")]),
        (anat_qc, outputnode, [("metrics", "anat_qc")]),
    ])
    workflow.connect([
        (inputnode, bias, [("t1w", "in_file")]),
        (bias, register, [("out_file", "in_file"), ("brain_centre", "brain_centre")]),
        (inputnode, segment, [("t1w", "in_file")]),
        (bias, segment, [("out_file", "n4_file")]),
        (register, segment, [("inverse_composite", "inverse_composite"),
                             ("rough_mask", "rough_mask")]),
        (register, grid, [("composite", "composite")]),
        (segment, grid, [("gm", "gm")]),
        (bias, grid, [("out_file", "t1w")]),
        (bias, outputnode, [("out_file", "t1w_preproc")]),
        (segment, outputnode, [("brain_mask", "brain_mask"), ("gm", "gm"), ("wm", "wm"),
                               ("csf", "csf"), ("dseg", "dseg")]),
        (grid, outputnode, [("gm_mni", "gm_mni"), ("gm_mni_modulated", "gm_mni_modulated"),
                            ("positions", "positions")]),
        (register, outputnode, [("composite", "t1w2mni_xfm"),
                                ("inverse_composite", "mni2t1w_xfm")]),
    ])
    # fmt: on

    derivatives_wf = init_anat_derivatives_wf(t1w=t1w, source=source, options=options)
    workflow.connect([
        (bias, derivatives_wf, [("out_file", "inputnode.t1w_preproc")]),
        (segment, derivatives_wf, [("brain_mask", "inputnode.t1w_mask"),
                                   ("dseg", "inputnode.t1w_dseg"), ("gm", "inputnode.t1w_gm"),
                                   ("wm", "inputnode.t1w_wm"), ("csf", "inputnode.t1w_csf")]),
        (grid, derivatives_wf, [("gm_mni", "inputnode.gm_mni"),
                                ("gm_mni_modulated", "inputnode.gm_mni_modulated"),
                                ("t1w_mni", "inputnode.t1w_mni")]),
        (register, derivatives_wf, [("composite", "inputnode.t1w2mni_xfm"),
                                    ("inverse_composite", "inputnode.mni2t1w_xfm")]),
    ])  # fmt: skip
    if options.reports:
        reports_wf = init_anat_reports_wf(source=source, options=options)
        workflow.connect([
            (bias, reports_wf, [("out_file", "inputnode.t1w")]),
            (segment, reports_wf, [("brain_mask", "inputnode.brain_mask"),
                                   ("gm", "inputnode.gm"), ("wm", "inputnode.wm")]),
            (grid, reports_wf, [("t1w_mni", "inputnode.t1w_mni"),
                                ("gm_mni", "inputnode.gm_mni")]),
        ])  # fmt: skip
    return workflow
