"""Anatomical workflow: T1w -> GM/WM/CSF, MNI normalization, GM on the 1.5 mm grid.

One per unique T1w (several PET sessions may share a T1w through the nearest-session rule).
Two backends build the same outputs (``outputnode`` fields): ``ants`` (default) and ``spm``.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.bids import DerivativesDataSink

OUTPUT_FIELDS = [
    "t1w_preproc",
    "brain_mask",
    "gm",
    "wm",
    "csf",
    "dseg",
    "gm_mni",
    "gm_mni_modulated",
    "positions",
    "t1w2mni_xfm",
    "mni2t1w_xfm",
    "spm_deformation",
    "anat_qc",
]


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


def sink(name, key, source, output_dir, meta=None, dtype=None):
    """A DerivativesDataSink node for output ``key`` of ``bids.OUTPUTS``."""
    node = pe.Node(
        DerivativesDataSink(
            base_directory=str(output_dir), output_key=key, source_entities=dict(source)
        ),
        name=name,
        run_without_submitting=True,
    )
    if meta is not None:
        node.inputs.meta_dict = meta
    if dtype is not None:
        node.inputs.data_dtype = dtype
    return node


def init_anat_preproc_wf(
    *,
    t1w: Path,
    source: dict,
    output_dir: Path,
    bids_dir: Path | None,
    backend: str = "ants",
    sloppy: bool = False,
    omp_nthreads: int = 1,
    seed: int = 42,
    spm=None,
    reports: bool = True,
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
    output_dir, bids_dir
        Derivatives root and input dataset (for ``bids:raw:`` sources in the sidecars).
    backend
        ``ants`` or ``spm`` (``spm``: an :class:`~bids_siamfuse.preproc.spm.SPMInstall`).
    sloppy
        Fast, low-accuracy settings (docs/preprocessing.md).
    omp_nthreads, seed
        Threads per ANTs node; registration seed.
    reports
        Write the reportlets (segmentation, T1w->MNI).

    Outputs (``outputnode``): ``t1w_preproc, brain_mask, gm, wm, csf, dseg`` (T1w space),
    ``gm_mni, gm_mni_modulated`` (grid), ``positions`` (T1w position of each grid voxel,
    ``ants``), ``t1w2mni_xfm, mni2t1w_xfm`` and ``spm_deformation`` (``spm``).
    """
    if backend == "spm":
        from .spm import init_anat_spm_wf

        return init_anat_spm_wf(
            t1w=t1w, source=source, output_dir=output_dir, bids_dir=bids_dir, spm=spm,
            reports=reports, name=name,
        )  # fmt: skip
    from ..data.templates import template_source
    from ..interfaces.anat import (
        AnatQC,
        GridNormalization,
        T1wBiasCorrect,
        TemplateRegistration,
        TissueSegmentation,
    )
    from ..preproc import sidecars
    from ..preproc.registration import registration_settings

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
    outputnode = pe.Node(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

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

    t1w_uri = sidecars.bids_uri(t1w, bids_dir)
    method = f"ANTs (antspyx {versions['antspyx']}) SyN + Atropos partial volumes"
    native = lambda d, **kw: sidecars.native_meta([t1w_uri], t1w_uri, d, **kw)  # noqa: E731
    sinks = {
        "t1w_preproc": (bias, "out_file", native("bias-corrected T1w (N4)"), "float32"),
        "t1w_mask": (segment, "brain_mask", native("brain mask", Type="Brain"), "uint8"),
        "t1w_dseg": (
            segment,
            "dseg",
            native("tissue labels (largest fraction)", Labels={"1": "GM", "2": "WM", "3": "CSF"}),
            "uint8",
        ),
        "t1w_gm": (segment, "gm", native("GM partial-volume fraction"), "float32"),
        "t1w_wm": (segment, "wm", native("WM partial-volume fraction"), "float32"),
        "t1w_csf": (segment, "csf", native("CSF partial-volume fraction"), "float32"),
        "gm_mni": (
            grid,
            "gm_mni",
            sidecars.gm_mni_meta([t1w_uri], modulated=False, method=method),
            "float32",
        ),
        "gm_mni_modulated": (
            grid,
            "gm_mni_modulated",
            sidecars.gm_mni_meta([t1w_uri], modulated=True, method=method),
            "float32",
        ),
        "t1w_mni": (
            grid,
            "t1w_mni",
            {
                "Description": "bias-corrected T1w on the MNI grid (QC)",
                "Sources": [t1w_uri],
                **sidecars.grid_meta(),
            },
            "float32",
        ),
        "t1w2mni_xfm": (
            register,
            "composite",
            sidecars.xfm_meta(
                [t1w_uri],
                "ANTs composite transform (affine + SyN), T1w to MNI152NLin2009aSym: "
                "antsApplyTransforms -i T1w-space image -r MNI reference -t this file",
            ),
            None,
        ),
        "mni2t1w_xfm": (
            register,
            "inverse_composite",
            sidecars.xfm_meta([t1w_uri], "ANTs composite transform, MNI152NLin2009aSym to T1w"),
            None,
        ),
    }
    for key, (node, field, meta, dtype) in sinks.items():
        ds = sink(f"ds_{key}", key, source, output_dir, meta=meta, dtype=dtype)
        workflow.connect(node, field, ds, "in_file")

    if reports:
        from ..interfaces.reports import GridReport, SegmentationReport, T1w2MNIReport

        seg_rpt = pe.Node(SegmentationReport(), name="seg_rpt", mem_gb=0.5)
        norm_rpt = pe.Node(T1w2MNIReport(), name="t1w2mni_rpt", mem_gb=0.5)
        regions_rpt = pe.Node(GridReport(kind="regions"), name="regions_rpt", mem_gb=0.5)
        # fmt: off
        workflow.connect([
            (bias, seg_rpt, [("out_file", "t1w")]),
            (segment, seg_rpt, [("brain_mask", "brain_mask"), ("gm", "gm"), ("wm", "wm")]),
            (grid, norm_rpt, [("t1w_mni", "t1w_mni")]),
            (grid, regions_rpt, [("gm_mni", "in_file")]),
        ])
        # fmt: on
        for key, node in (
            ("fig_seg", seg_rpt),
            ("fig_t1w2mni", norm_rpt),
            ("fig_regions", regions_rpt),
        ):
            ds = sink(f"ds_{key}", key, source, output_dir)
            workflow.connect(node, "out_report", ds, "in_file")
    return workflow
