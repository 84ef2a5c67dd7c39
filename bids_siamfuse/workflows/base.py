"""The participant workflow: one nipype workflow over every selected subject.

:func:`init_bids_siamfuse_wf` holds a :func:`init_single_subject_wf` per subject: one
anatomical workflow per unique T1w, one PET workflow per PET/T1w pair (or, with
``-d/--derivatives``, one workflow from the existing maps). Running it (nipype settings, logs,
status table, reports) is :mod:`bids_siamfuse.participant`'s job.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .. import __version__
from .common import ParticipantOptions, anat_wf_name, pet_wf_name, subject_wf_name


def init_single_subject_wf(
    *,
    subject: str,
    pairs: list,
    options: ParticipantOptions,
    external: dict | None = None,
    name: str | None = None,
):
    """All the processing of one subject: its T1w(s) and every PET paired with them.

    Workflow graph::

        anat_<ses>_wf (one per unique T1w) --+--> pet_<ses>_trc_<tracer>_wf (one per pair)
                                             +--> pet_...  (pairs sharing the T1w)

    ``pairs``: the subject's :class:`~bids_siamfuse.bids.SessionPair` objects.
    ``external``: pair key -> :class:`~bids_siamfuse.external.ExternalPair` (``-d``); those
    pairs get :func:`~bids_siamfuse.workflows.external.init_external_pair_wf` instead.
    """
    from .anatomical import init_anat_preproc_wf
    from .pet import init_pet_preproc_wf

    workflow = Workflow(name=name or subject_wf_name(subject))
    workflow.__desc__ = f"""\
Results included in this manuscript come from preprocessing performed using *bids_siamfuse*
{__version__}, which is based on Nipype [@nipype1] and NiWorkflows. Each T1w image was
processed once, and every PET series of the selected tracer was paired with the T1w of its own
session or, without one, of the nearest session in time.
"""
    anat_wfs = OrderedDict()
    for pair in pairs:
        if external and pair.key in external:  # -d/--derivatives: regions from existing maps
            from .external import init_external_pair_wf

            workflow.add_nodes(
                [
                    init_external_pair_wf(
                        pair=pair,
                        maps=external[pair.key],
                        options=options,
                        name=pet_wf_name(pair),
                    )
                ]
            )
            continue
        t1w = str(pair.t1w)
        if t1w not in anat_wfs:
            anat_wfs[t1w] = init_anat_preproc_wf(
                t1w=pair.t1w,
                source={"subject": pair.subject, "session": pair.t1w_session},
                options=options,
                name=anat_wf_name(pair.subject, pair.t1w_session),
            )
        anat_wf = anat_wfs[t1w]
        pet_wf = init_pet_preproc_wf(
            pet=pair.pet,
            pet_meta=pair.pet_meta,
            source=pair.source_entities,
            anat_source={"subject": pair.subject, "session": pair.t1w_session},
            t1w=pair.t1w,
            options=options,
            name=pet_wf_name(pair),
        )
        fields = ["t1w_preproc", "brain_mask", "wm", "gm_mni_modulated"]
        if options.backend == "ants":
            fields += ["positions", "anat_qc", "gm_mni"]
        else:
            fields += ["spm_deformation"]
        workflow.connect(
            [(anat_wf, pet_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fields])]
        )
    return workflow


def init_bids_siamfuse_wf(
    *,
    plan,
    options: ParticipantOptions,
    work_dir: Path,
    run_uuid: str,
    name: str = "bids_siamfuse_wf",
):
    """The participant workflow of every subject in ``plan`` (a :class:`bids.Plan`; its
    ``external`` maps, when ``-d/--derivatives`` attached some, replace preprocessing).

    Each subject's workflow gets its own crash-file folder, ``OUT/sub-<label>/log/<run_uuid>``
    (fMRIPrep's layout), so failures can be traced to the subject and session.
    """
    workflow = Workflow(name=name)
    workflow.base_dir = str(work_dir)
    by_subject = OrderedDict()
    for pair in plan.pairs:
        by_subject.setdefault(pair.subject, []).append(pair)
    for subject, pairs in by_subject.items():
        single = init_single_subject_wf(
            subject=subject,
            pairs=pairs,
            options=options,
            external=getattr(plan, "external", None),
        )
        crash_dir = Path(options.output_dir) / f"sub-{subject}" / "log" / run_uuid
        single.config["execution"]["crashdump_dir"] = str(crash_dir)
        for node in single._get_all_nodes():
            node.config = node.config or {}
            node.config.setdefault("execution", {})["crashdump_dir"] = str(crash_dir)
        workflow.add_nodes([single])
    return workflow
