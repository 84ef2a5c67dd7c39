"""The model-application workflow of the participant level (``--model BUNDLE``).

:func:`init_apply_model_wf` is the nipype workflow the participant workflow connects to each
session's region file; the work is done by :mod:`bids_siamfuse.apply` (also used, without
nipype, by ``--model-only``). The group level lives in :mod:`bids_siamfuse.group`.
"""

from __future__ import annotations

from pathlib import Path


def init_apply_model_wf(
    *,
    bundle: Path,
    output_dir: Path,
    device: str = "cpu",
    model_cls=None,
    name: str = "apply_model_wf",
):
    """Apply a trained model bundle to one session's region file.

    Workflow graph::

        inputnode (region_file, source_entities) -> apply_model -> outputnode

    Parameters
    ----------
    bundle
        The bundle (its folder, ``model.json`` or ``model.safetensors``); checked here against
        the atlas and grid of this installation (``DataError``, exit 65, if it does not match).
    output_dir
        The derivatives root the outputs are written to (named after ``source_entities``).
    device
        Torch device for the prediction, resolved (:func:`bids_siamfuse.config.resolve`).
    model_cls
        The class the bundle is rebuilt as (``from_state``); None:
        :func:`bids_siamfuse.model.bundle.default_model_cls` (the tests pass their double).

    Inputs: ``region_file`` (the session's ``..._regions.npz``), ``source_entities`` (the PET's
    entities: subject, session, tracer, ...). Outputs: ``probabilities`` (TSV),
    ``predicted_class``, ``relevance_maps`` (MRI, PET, combined NIfTI), ``relevance_table``.
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe
    from niworkflows.engine.workflows import LiterateWorkflow as Workflow

    from ..apply import check_bundle
    from ..interfaces.model import ApplyModel
    from ..model.bundle import bundle_paths

    meta = check_bundle(bundle)
    meta_path, _ = bundle_paths(bundle)
    classes = meta["classes"]
    ba = (meta.get("cv_metrics") or {}).get("balanced_accuracy") or {}
    perf = (
        f" (cross-validated balanced accuracy {ba['mean']:.2f} ± {ba['sd']:.2f})"
        if ba.get("mean") is not None
        else ""
    )
    n_train = (meta.get("cohort") or {}).get("subjects")
    workflow = Workflow(name=name)
    workflow.__desc__ = (
        "A siamese-attention model (Arco et al.) trained with *bids_siamfuse* to separate "
        f"{' vs '.join(classes)}"
        + (f" on {n_train} subjects" if n_train else "")
        + f"{perf} was applied to the AAL116 regions of each session's grey-matter and PET "
        "maps, giving class probabilities and, per region and modality, the relevance of the "
        "region for that session's prediction."
    )
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["region_file", "source_entities"]), name="inputnode"
    )
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=["probabilities", "predicted_class", "relevance_maps", "relevance_table"]
        ),
        name="outputnode",
    )
    apply_model = pe.Node(
        ApplyModel(
            bundle=str(meta_path.absolute()),
            output_dir=str(output_dir),
            device=device,
            model_cls=model_cls,
        ),
        name="apply_model",
        mem_gb=3,
    )
    workflow.connect(
        [
            (
                inputnode,
                apply_model,
                [("region_file", "region_file"), ("source_entities", "source_entities")],
            ),
            (
                apply_model,
                outputnode,
                [
                    ("probabilities", "probabilities"),
                    ("predicted_class", "predicted_class"),
                    ("relevance_maps", "relevance_maps"),
                    ("relevance_table", "relevance_table"),
                ],
            ),
        ]
    )
    return workflow
