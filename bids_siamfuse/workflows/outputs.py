"""Derivative and reportlet workflows (sMRIPrep's ``init_*_derivatives_wf``/``init_*_reports_wf``).

The processing builders (:mod:`.anatomical`, :mod:`.spm`, :mod:`.pet`) compute; these take
their results on an ``inputnode`` and write them: one data sink per output key of
:data:`bids_siamfuse.bids.OUTPUTS` (:class:`~bids_siamfuse.interfaces.bids.DerivativesDataSink`,
atomic, sidecar first) and the reportlet nodes with their sinks. Sidecar contents are fixed
here (their descriptions name the method of each backend).
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.bids import DerivativesDataSink
from .common import ParticipantOptions


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


def init_derivatives_wf(*, outputs: dict, source: dict, output_dir: Path, name: str):
    """One data sink per output key; ``inputnode.<key>`` is the file to write.

    ``outputs``: key -> ``{"meta": dict | None, "dtype": str | None, "source": dict | None,
    "meta_input": bool}``; ``source`` overrides the workflow's entities for that key (e.g.
    anatomical outputs of a PET pair), ``meta_input`` adds ``inputnode.<key>_meta`` for a
    sidecar computed at run time.
    """
    workflow = Workflow(name=name)
    fields = [*outputs, *(f"{k}_meta" for k, o in outputs.items() if o.get("meta_input"))]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    for key, spec in outputs.items():
        ds = sink(
            f"ds_{key}",
            key,
            spec.get("source") or source,
            output_dir,
            meta=spec.get("meta"),
            dtype=spec.get("dtype"),
        )
        workflow.connect(inputnode, key, ds, "in_file")
        if spec.get("meta_input"):
            workflow.connect(inputnode, f"{key}_meta", ds, "meta_dict")
    return workflow


def _antspyx_version() -> str:
    import ants

    return getattr(ants, "__version__", "unknown")


def anat_output_keys(backend: str) -> list[str]:
    """The anatomical outputs each backend writes (``inputnode`` fields of
    :func:`init_anat_derivatives_wf`)."""
    keys = ["t1w_preproc", "t1w_mask", "t1w_dseg", "t1w_gm", "t1w_wm", "t1w_csf"]
    keys += ["gm_mni", "gm_mni_modulated"]
    if backend == "spm":
        return keys + ["t1w2mni_xfm_spm", "mni2t1w_xfm_spm"]
    return keys + ["t1w_mni", "t1w2mni_xfm", "mni2t1w_xfm"]


def init_anat_derivatives_wf(
    *, t1w: Path, source: dict, options: ParticipantOptions, name: str = "anat_derivatives_wf"
):
    """Write the anatomical derivatives of one T1w (:func:`anat_output_keys`)."""
    from ..preproc import sidecars
    from ..preproc.spm import SPM_RELEASE

    t1w_uri = sidecars.bids_uri(t1w, options.bids_dir)
    native = lambda d, **kw: sidecars.native_meta([t1w_uri], t1w_uri, d, **kw)  # noqa: E731
    labels = {"1": "GM", "2": "WM", "3": "CSF"}
    if options.backend == "spm":
        method = f"{SPM_RELEASE} unified segmentation"
        metas = {
            "t1w_preproc": native("bias-corrected T1w (SPM12)"),
            "t1w_mask": native("brain mask (c1+c2+c3 > 0.5)"),
            "t1w_dseg": native("tissue labels", Labels=labels),
            "t1w_gm": native("GM probability (SPM12 c1)"),
            "t1w_wm": native("WM probability (SPM12 c2)"),
            "t1w_csf": native("CSF probability (SPM12 c3)"),
            "t1w2mni_xfm_spm": sidecars.xfm_meta(
                [t1w_uri],
                "SPM12 forward deformation field (y_*.nii): MNI position of each voxel "
                "of its grid, for Normalise: Write / the Deformations utility",
            ),
            "mni2t1w_xfm_spm": sidecars.xfm_meta(
                [t1w_uri], "SPM12 inverse deformation field (iy_*.nii)"
            ),
        }
    else:
        method = f"ANTs (antspyx {_antspyx_version()}) SyN + Atropos partial volumes"
        metas = {
            "t1w_preproc": native("bias-corrected T1w (N4)"),
            "t1w_mask": native("brain mask", Type="Brain"),
            "t1w_dseg": native("tissue labels (largest fraction)", Labels=labels),
            "t1w_gm": native("GM partial-volume fraction"),
            "t1w_wm": native("WM partial-volume fraction"),
            "t1w_csf": native("CSF partial-volume fraction"),
            "t1w_mni": {
                "Description": "bias-corrected T1w on the MNI grid (QC)",
                "Sources": [t1w_uri],
                **sidecars.grid_meta(),
            },
            "t1w2mni_xfm": sidecars.xfm_meta(
                [t1w_uri],
                "ANTs composite transform (affine + SyN), T1w to MNI152NLin2009aSym: "
                "antsApplyTransforms -i T1w-space image -r MNI reference -t this file",
            ),
            "mni2t1w_xfm": sidecars.xfm_meta(
                [t1w_uri], "ANTs composite transform, MNI152NLin2009aSym to T1w"
            ),
        }
    metas["gm_mni"] = sidecars.gm_mni_meta([t1w_uri], modulated=False, method=method)
    metas["gm_mni_modulated"] = sidecars.gm_mni_meta([t1w_uri], modulated=True, method=method)
    dtypes = {"t1w_mask": "uint8", "t1w_dseg": "uint8"}
    outputs = {
        key: {"meta": metas[key], "dtype": None if "xfm" in key else dtypes.get(key, "float32")}
        for key in anat_output_keys(options.backend)
    }
    return init_derivatives_wf(
        outputs=outputs, source=source, output_dir=options.output_dir, name=name
    )


def init_anat_reports_wf(
    *, source: dict, options: ParticipantOptions, name: str = "anat_reports_wf"
):
    """Reportlets of one T1w: segmentation, T1w->MNI (``ants``), regions over the GM map.

    Inputs: ``t1w, brain_mask, gm, wm, gm_mni`` and ``t1w_mni`` (``ants``).
    """
    from ..interfaces.reports import GridReport, SegmentationReport, T1w2MNIReport

    ants = options.backend == "ants"
    workflow = Workflow(name=name)
    fields = ["t1w", "brain_mask", "gm", "wm", "gm_mni"] + (["t1w_mni"] if ants else [])
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    seg_rpt = pe.Node(SegmentationReport(), name="seg_rpt", mem_gb=0.5)
    regions_rpt = pe.Node(GridReport(kind="regions"), name="regions_rpt", mem_gb=0.5)
    workflow.connect([
        (inputnode, seg_rpt, [("t1w", "t1w"), ("brain_mask", "brain_mask"), ("gm", "gm"),
                              ("wm", "wm")]),
        (inputnode, regions_rpt, [("gm_mni", "in_file")]),
    ])  # fmt: skip
    reportlets = [("fig_seg", seg_rpt)]
    if ants:
        norm_rpt = pe.Node(T1w2MNIReport(), name="t1w2mni_rpt", mem_gb=0.5)
        workflow.connect(inputnode, "t1w_mni", norm_rpt, "t1w_mni")
        reportlets.append(("fig_t1w2mni", norm_rpt))
    reportlets.append(("fig_regions", regions_rpt))
    for key, node in reportlets:
        ds = sink(f"ds_{key}", key, source, options.output_dir)
        workflow.connect(node, "out_report", ds, "in_file")
    return workflow


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


def init_pet_derivatives_wf(
    *,
    pet: Path,
    t1w: Path,
    source: dict,
    options: ParticipantOptions,
    name: str = "pet_derivatives_wf",
):
    """Write the PET derivatives of one pair (normalized PET, reference, motion, transform,
    and the session's QC table with ``ants``).

    Inputs: ``pet_mni, description, value`` (the grid node), ``pet_ref, notes, n_frames`` (the
    reference node), ``motion_table``, ``xfm`` and, with ``ants``, ``qc, qc_meta``.
    """
    from ..preproc import sidecars

    ants = options.backend == "ants"
    pet_uri = sidecars.bids_uri(pet, options.bids_dir)
    t1w_uri = sidecars.bids_uri(t1w, options.bids_dir)
    method = "ANTs (antspyx) rigid + T1w transforms" if ants else "SPM12"
    outputs = {
        "pet_mni": {"dtype": "float32", "meta_input": True},
        "pet_ref": {"dtype": "float32", "meta_input": True},
        "pet_confounds": {
            "meta": {
                "Description": "per-frame rigid motion relative to the PET reference",
                "Sources": [pet_uri],
                "trans_x": {"Description": "displacement of the reference centre", "Units": "mm"},
                "rot_x": {"Description": "rotation angle (R = Rz Ry Rx)", "Units": "rad"},
                "framewise_displacement": {
                    "Description": "Power's FD, 50 mm sphere",
                    "Units": "mm",
                },
            }
        },
        "pet2t1w_xfm": {
            "meta": sidecars.xfm_meta(
                [pet_uri, t1w_uri],
                "rigid PET reference to T1w transform"
                + (
                    " (ITK text format: antsApplyTransforms -i petref -r T1w -t this file)"
                    if ants
                    else " (SPM12 Coregister: the reference's header matrix change, 4x4 RAS)"
                ),
            )
        },
    }
    if ants:  # quality metrics of the session and its flag (preproc/qc.py)
        outputs["qc"] = {"meta_input": True}
    writers = init_derivatives_wf(
        outputs=outputs, source=source, output_dir=options.output_dir, name="writers"
    )
    workflow = Workflow(name=name)
    fields = ["pet_mni", "description", "value", "pet_ref", "notes", "n_frames"]
    fields += ["motion_table", "xfm"] + (["qc", "qc_meta"] if ants else [])
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    pet_meta = pe.Node(
        niu.Function(
            function=_pet_meta,
            input_names=["description", "value", "sources", "ref_region", "method"],
            output_names=["meta"],
        ),
        name="pet_meta",
        run_without_submitting=True,
    )
    pet_meta.inputs.sources = [pet_uri, t1w_uri]
    pet_meta.inputs.ref_region = options.pet_ref_region
    pet_meta.inputs.method = method
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
    workflow.connect([
        (inputnode, pet_meta, [("description", "description"), ("value", "value")]),
        (inputnode, ref_meta, [("notes", "notes"), ("n_frames", "n_frames")]),
        (pet_meta, writers, [("meta", "inputnode.pet_mni_meta")]),
        (ref_meta, writers, [("meta", "inputnode.pet_ref_meta")]),
        (inputnode, writers, [("pet_mni", "inputnode.pet_mni"), ("pet_ref", "inputnode.pet_ref"),
                              ("motion_table", "inputnode.pet_confounds"),
                              ("xfm", "inputnode.pet2t1w_xfm")]),
    ])  # fmt: skip
    if ants:
        workflow.connect(
            [(inputnode, writers, [("qc", "inputnode.qc"), ("qc_meta", "inputnode.qc_meta")])]
        )
    return workflow


def init_pet_reports_wf(
    *, source: dict, options: ParticipantOptions, name: str = "pet_reports_wf"
):
    """Reportlets of one PET: the normalized PET on the grid and (``ants``) the coregistration.

    Inputs: ``pet_mni`` and, with ``ants``, ``t1w_preproc, brain_mask, wm, pet_ref, matrix``.
    """
    from ..interfaces.reports import GridReport, PETCoregReport

    ants = options.backend == "ants"
    workflow = Workflow(name=name)
    fields = ["pet_mni"] + (
        ["t1w_preproc", "brain_mask", "wm", "pet_ref", "matrix"] if ants else []
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    pet_rpt = pe.Node(GridReport(kind="pet"), name="pet_mni_rpt", mem_gb=0.5)
    workflow.connect(inputnode, "pet_mni", pet_rpt, "in_file")
    ds = sink("ds_fig_pet_mni", "fig_pet_mni", source, options.output_dir)
    workflow.connect(pet_rpt, "out_report", ds, "in_file")
    if ants:
        coreg_rpt = pe.Node(PETCoregReport(), name="coreg_rpt", mem_gb=0.5)
        workflow.connect([
            (inputnode, coreg_rpt, [("t1w_preproc", "t1w"), ("brain_mask", "brain_mask"),
                                    ("wm", "wm"), ("pet_ref", "pet_ref"), ("matrix", "matrix")]),
        ])  # fmt: skip
        ds = sink("ds_fig_pet_coreg", "fig_pet_coreg", source, options.output_dir)
        workflow.connect(coreg_rpt, "out_report", ds, "in_file")
    return workflow


def connect_model(workflow, node, field: str, *, source: dict, options: ParticipantOptions):
    """``--model``: apply the bundle to the region file ``node.field`` (``apply_model_wf``)."""
    from .model import init_apply_model_wf

    apply_wf = init_apply_model_wf(
        bundle=Path(options.model),
        output_dir=Path(options.output_dir),
        device=options.device,
        name="apply_model_wf",
    )
    apply_wf.inputs.inputnode.source_entities = dict(source)
    workflow.connect(node, field, apply_wf, "inputnode.region_file")
    return apply_wf
