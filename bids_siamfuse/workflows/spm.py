"""The SPM12 backend (``--backend spm``): the paper's own tools, through nipype.interfaces.spm.

Anatomy: SPM12's unified segmentation (``spm.spatial.preproc``, TPM priors, default settings)
writes the native tissue maps c1-c3, the bias-corrected T1w, the forward/inverse deformation
fields and the GM warped to MNI on the 1.5 mm TPM box (121x145x121), plain (``wc1``) and
modulated (``mwc1``). PET: the frames are realigned and averaged as in the ANTs backend (same
Python node), the reference coregistered to the bias-corrected T1w with SPM12's Coregister
(normalized mutual information) and written to the grid through the deformation field
(Normalise: Write, 4th-degree B-spline), then intensity-normalized in Python.

SPM cannot run on the development machines: the graph and the generated batches are tested
(``tests/test_workflows.py``), the SPM runs themselves are not (docs/preprocessing.md).
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..preproc.spm import BOUNDING_BOX, SPM_RELEASE, VOXEL_SIZE
from .common import ANAT_FIELDS, ParticipantOptions
from .outputs import init_anat_derivatives_wf, init_anat_reports_wf


def _first(items):
    """First file of SPM's per-tissue/per-channel output lists (Function node)."""
    while isinstance(items, (list, tuple)):
        items = items[0]
    return items


def _pick(items, index):
    return items[index][0] if isinstance(items[index], (list, tuple)) else items[index]


def init_anat_spm_wf(
    *,
    t1w: Path,
    source: dict,
    options: ParticipantOptions,
    name: str = "anat_preproc_wf",
):
    """SPM12 segmentation and normalization of one T1w (same ``outputnode`` as the ANTs one).

    ``options.spm``: the :class:`~bids_siamfuse.preproc.spm.SPMInstall` (command, TPM).
    """
    from ..interfaces.spm import GridConform, SPMTissues, ToNifti, spm12_segment

    spm = options.spm

    workflow = Workflow(name=name)
    workflow.__desc__ = f"""\
Each T1-weighted image was segmented into grey matter, white matter and
CSF with the unified segmentation of {SPM_RELEASE} [@spm12; @ashburner2005] (standalone, MATLAB
Runtime; tissue probability maps of SPM12, bias regularization 0.001, 60 mm FWHM, 1/1/2/3/4/2
Gaussians per class, warping regularization [0 0.001 0.5 0.05 0.2], sampling distance 3 mm,
MRF 1, light clean-up), which also estimates the nonlinear deformation to MNI space. The GM map
was written in MNI space on a 121x145x121 grid of 1.5 mm voxels (bounding box
[-90 -126 -72; 90 90 108] mm), plain (*wc1*) and modulated by the Jacobian of the
deformation (*mwc1*), the input of the region analysis."""
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = str(t1w)
    outputnode = pe.Node(niu.IdentityInterface(fields=ANAT_FIELDS), name="outputnode")
    to_nifti = pe.Node(ToNifti(out_name="t1w.nii"), name="to_nifti")
    segment = pe.Node(spm12_segment(str(spm.tpm), **spm.node_inputs()), name="segment")
    segment.interface._references = []  # nipype's generic SPM citation; ours is in __desc__
    tissues = pe.Node(SPMTissues(), name="tissues")
    first = lambda name: pe.Node(  # noqa: E731
        niu.Function(function=_first, input_names=["items"], output_names=["out"]), name=name
    )
    pick = lambda name, index: pe.Node(  # noqa: E731
        niu.Function(function=_pick, input_names=["items", "index"], output_names=["out"]),
        name=name,
    )
    c1, c2, c3 = pick("c1", 0), pick("c2", 1), pick("c3", 2)
    for i, node in enumerate((c1, c2, c3)):
        node.inputs.index = i
    wc1, mwc1 = first("wc1"), first("mwc1")
    bias_corrected, forward, inverse = first("bias_corrected"), first("forward"), first("inverse")
    gm_grid = pe.Node(GridConform(out_name="gm_mni.nii.gz"), name="gm_grid")
    mgm_grid = pe.Node(GridConform(out_name="gm_mni_mod.nii.gz"), name="mgm_grid")
    # fmt: off
    workflow.connect([
        (inputnode, to_nifti, [("t1w", "in_file")]),
        (to_nifti, segment, [("out_file", "channel_files")]),
        (segment, c1, [("native_class_images", "items")]),
        (segment, c2, [("native_class_images", "items")]),
        (segment, c3, [("native_class_images", "items")]),
        (segment, wc1, [("normalized_class_images", "items")]),
        (segment, mwc1, [("modulated_class_images", "items")]),
        (segment, bias_corrected, [("bias_corrected_images", "items")]),
        (segment, forward, [("forward_deformation_field", "items")]),
        (segment, inverse, [("inverse_deformation_field", "items")]),
        (c1, tissues, [("out", "c1")]),
        (c2, tissues, [("out", "c2")]),
        (c3, tissues, [("out", "c3")]),
        (wc1, gm_grid, [("out", "in_file")]),
        (mwc1, mgm_grid, [("out", "in_file")]),
        (bias_corrected, outputnode, [("out", "t1w_preproc")]),
        (tissues, outputnode, [("brain_mask", "brain_mask"), ("dseg", "dseg")]),
        (c1, outputnode, [("out", "gm")]),
        (c2, outputnode, [("out", "wm")]),
        (c3, outputnode, [("out", "csf")]),
        (gm_grid, outputnode, [("out_file", "gm_mni")]),
        (mgm_grid, outputnode, [("out_file", "gm_mni_modulated")]),
        (forward, outputnode, [("out", "spm_deformation")]),
    ])
    # fmt: on
    derivatives_wf = init_anat_derivatives_wf(t1w=t1w, source=source, options=options)
    workflow.connect([
        (bias_corrected, derivatives_wf, [("out", "inputnode.t1w_preproc")]),
        (tissues, derivatives_wf, [("brain_mask", "inputnode.t1w_mask"),
                                   ("dseg", "inputnode.t1w_dseg")]),
        (c1, derivatives_wf, [("out", "inputnode.t1w_gm")]),
        (c2, derivatives_wf, [("out", "inputnode.t1w_wm")]),
        (c3, derivatives_wf, [("out", "inputnode.t1w_csf")]),
        (gm_grid, derivatives_wf, [("out_file", "inputnode.gm_mni")]),
        (mgm_grid, derivatives_wf, [("out_file", "inputnode.gm_mni_modulated")]),
        (forward, derivatives_wf, [("out", "inputnode.t1w2mni_xfm_spm")]),
        (inverse, derivatives_wf, [("out", "inputnode.mni2t1w_xfm_spm")]),
    ])  # fmt: skip
    if options.reports:
        reports_wf = init_anat_reports_wf(source=source, options=options)
        workflow.connect([
            (bias_corrected, reports_wf, [("out", "inputnode.t1w")]),
            (tissues, reports_wf, [("brain_mask", "inputnode.brain_mask")]),
            (c1, reports_wf, [("out", "inputnode.gm")]),
            (c2, reports_wf, [("out", "inputnode.wm")]),
            (gm_grid, reports_wf, [("out_file", "inputnode.gm_mni")]),
        ])  # fmt: skip
    return workflow


def init_pet_spm_nodes(workflow, inputnode, reference, *, spm, ref_region: str):
    """Add the SPM12 PET nodes to ``workflow``; returns (grid node, xfm node, xfm field).

    The grid node has the outputs of the ANTs backend's ``PETToGrid`` (``out_file``,
    ``value``, ``description``).
    """
    from nipype.interfaces.spm import Coregister, Normalize12

    from ..interfaces.spm import HeaderTransform, PETNormalize, ToNifti

    ref_nii = pe.Node(ToNifti(out_name="petref.nii"), name="ref_nii")
    t1_nii = pe.Node(ToNifti(out_name="t1w_bc.nii"), name="t1_nii")
    coreg = pe.Node(
        Coregister(jobtype="estimate", cost_function="nmi", **spm.node_inputs()), name="coreg"
    )
    xfm = pe.Node(HeaderTransform(), name="coreg_xfm")
    write = pe.Node(
        Normalize12(
            jobtype="write",
            write_bounding_box=[list(b) for b in BOUNDING_BOX],
            write_voxel_sizes=list(VOXEL_SIZE),
            write_interp=4,
            **spm.node_inputs(),
        ),
        name="to_mni",
    )
    first = pe.Node(
        niu.Function(function=_first, input_names=["items"], output_names=["out"]),
        name="pet_written",
    )
    grid = pe.Node(PETNormalize(ref_region=ref_region), name="to_grid")
    # fmt: off
    workflow.connect([
        (reference, ref_nii, [("ref_file", "in_file")]),
        (inputnode, t1_nii, [("t1w_preproc", "in_file")]),
        (t1_nii, coreg, [("out_file", "target")]),
        (ref_nii, coreg, [("out_file", "source")]),
        (ref_nii, xfm, [("out_file", "original")]),
        (coreg, xfm, [("coregistered_source", "coregistered")]),
        (inputnode, write, [("spm_deformation", "deformation_file")]),
        (coreg, write, [("coregistered_source", "apply_to_files")]),
        (write, first, [("normalized_files", "items")]),
        (first, grid, [("out", "in_file")]),
    ])
    # fmt: on
    return grid, xfm, "itk_file"
