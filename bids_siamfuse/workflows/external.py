"""The participant workflow of a pair whose MNI-space maps come from ``-d/--derivatives``."""

from __future__ import annotations

from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .common import ParticipantOptions
from .outputs import connect_model, sink


def _map_text(item) -> str:
    if item.on_grid:
        return f"{item.space}, already on the 121x145x121 1.5 mm grid (not resampled)"
    zooms = "x".join(f"{z:g}" for z in item.zooms)
    return (
        f"{item.space} at {zooms} mm, resampled onto the 121x145x121 1.5 mm grid in a single "
        "trilinear interpolation, its world coordinates taken as MNI152NLin2009aSym's (no "
        "template-to-template warp)"
    )


def init_external_pair_wf(
    *,
    pair,
    maps,
    options: ParticipantOptions,
    name: str = "external_pair_wf",
):
    """Regions (and, with ``model``, the prediction) of one pair from existing MNI-space maps.

    Workflow graph::

        maps (interfaces.external.ExternalMaps: read, to the grid, PET normalization, AAL116)
            -> ds_gm_mni_modulated, ds_pet_mni, ds_regions, ds_gm_morph, ds_pet_stats
            [-> gm/pet reportlets] [-> apply_model_wf with --model]

    ``maps``: the pair's :class:`bids_siamfuse.external.ExternalPair`. Anatomical outputs are
    named after the pair's T1w (subject, T1w session), PET outputs after the PET.
    """
    from ..interfaces.external import ExternalMaps

    output_dir, pet_ref_region = options.output_dir, options.pet_ref_region

    workflow = Workflow(name=name)
    gm, pet = maps.gm, maps.pet
    if pet.normalized_by_app:
        norm_text = (
            f"used as it was (its sidecar records this app's normalization: "
            f"{pet.normalized_by_app})"
        )
    elif pet_ref_region == "none":
        norm_text = (
            "divided by the mean of the 0.1% brightest voxels within the template brain mask, "
            "voxels below 10% of that value set to zero as background [@arco]"
            + (
                " (the map was a reference-region SUVR; being a ratio, that scaling cancels in "
                "this normalization)"
                if pet.source_normalization.startswith("SUVR")
                else ""
            )
        )
    else:
        norm_text = "divided by the mean uptake of the AAL cerebellar grey matter (SUVR)"
    workflow.__desc__ = f"""\
Grey-matter and PET maps that already existed were used instead of preprocessing
(*bids_siamfuse* `-d/--derivatives`): modulated grey-matter and PET maps in MNI152NLin2009aSym,
MNI152NLin6Asym or SPM12's IXI549Space, from BIDS derivatives or a Clinica CAPS folder. Maps on
the 121x145x121, 1.5 mm grid were used as they were; maps at any other resolution or bounding
box were resampled onto it in a single trilinear interpolation, their world coordinates taken as
MNI152NLin2009aSym's (no template-to-template warp). For {pair.key}, the modulated grey-matter
map came from {gm.folder.label} ({gm.path.name}; {_map_text(gm)}) and the PET map from
{pet.folder.label} ({pet.path.name}; {_map_text(pet)}). The PET map was then
intensity-normalized: {norm_text}. Both maps were divided into the 116 regions of the AAL
atlas [@aal]; the source files, their SHA-256 digests, spaces and the interpolation are
recorded with every output."""

    source = dict(pair.source_entities)
    anat_source = {"subject": pair.subject, "session": pair.t1w_session}
    node = pe.Node(
        ExternalMaps(
            gm_file=str(gm.path),
            pet_file=str(pet.path),
            ref_region=pet_ref_region,
            pet_normalized=pet.normalized_by_app,
            provenance=maps.provenance(),
            sources=[gm.uri, pet.uri],
        ),
        name="maps",
        mem_gb=1.0,
    )
    sinks = [
        ("ds_gm_mni_modulated", "gm_mni_modulated", anat_source, "gm_mni", "gm_meta"),
        ("ds_pet_mni", "pet_mni", source, "pet_mni", "pet_meta"),
        ("ds_regions", "regions", source, "regions", "regions_meta"),
        ("ds_gm_morph", "gm_morph", anat_source, "gm_morph", "gm_morph_meta"),
        ("ds_pet_stats", "pet_stats", source, "pet_stats", "pet_stats_meta"),
    ]
    for sink_name, key, src, out_field, meta_field in sinks:
        image = key in ("gm_mni_modulated", "pet_mni")
        ds = sink(sink_name, key, src, output_dir, dtype="float32" if image else None)
        workflow.connect([(node, ds, [(out_field, "in_file"), (meta_field, "meta_dict")])])

    if options.reports:
        from ..interfaces.reports import GridReport

        for kind, out_field, key, src in (
            ("pet", "pet_mni", "fig_pet_mni", source),
            ("regions", "gm_mni", "fig_regions", anat_source),
        ):
            rpt = pe.Node(GridReport(kind=kind), name=f"{kind}_rpt", mem_gb=0.5)
            ds = sink(f"ds_{key}", key, src, output_dir)
            workflow.connect(
                [(node, rpt, [(out_field, "in_file")]), (rpt, ds, [("out_report", "in_file")])]
            )

    if options.model is not None:
        connect_model(workflow, node, "regions", source=source, options=options)
    return workflow
