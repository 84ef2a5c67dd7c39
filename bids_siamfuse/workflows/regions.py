"""Region extraction workflow: AAL116 regions of the GM and PET maps."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .outputs import sink


def init_regions_wf(
    *,
    output_dir: Path,
    anat_source: dict,
    pet_source: dict,
    sources: list[str] | None = None,
    name: str = "regions_wf",
):
    """Extract the AAL116 regions of one session and write them as derivatives.

    Workflow graph::

        inputnode (gm_modulated, pet) -> regions (preproc.regions.compute_region_outputs)
            -> ds_regions (``regions``: ``..._seg-AAL116_res-1p5_regions.npz``),
               ds_gm_morph (``gm_morph``, named after the T1w),
               ds_pet_stats (``pet_stats``) -> outputnode (regions, gm_morph, pet_stats)

    ``sources``: BIDS URIs of the raw inputs, for the sidecars.
    """
    from ..interfaces.regions import RegionExtraction
    from ..preproc.regions import GM_MORPH_META, PET_STATS_META, REGION_META

    workflow = Workflow(name=name)
    workflow.__desc__ = """\
The modulated GM map and the normalized PET map were divided into the 116 regions of the
AAL atlas [@aal] (SPM8 release, resampled by nearest neighbour onto the 1.5 mm grid); for each
region and modality the values of the region's voxels were stored, with the regional GM
volume and mean normalized uptake."""
    inputnode = pe.Node(niu.IdentityInterface(fields=["gm_modulated", "pet"]), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["regions", "gm_morph", "pet_stats"]), name="outputnode"
    )
    regions = pe.Node(RegionExtraction(), name="regions", mem_gb=1.0)
    sources = list(sources or [])
    extra = {"Sources": sources} if sources else {}
    ds_regions = sink(
        "ds_regions", "regions", pet_source, output_dir, meta={**REGION_META, **extra}
    )
    ds_gm_morph = sink(
        "ds_gm_morph", "gm_morph", anat_source, output_dir, meta={**GM_MORPH_META, **extra}
    )
    ds_pet_stats = sink(
        "ds_pet_stats", "pet_stats", pet_source, output_dir, meta={**PET_STATS_META, **extra}
    )
    # fmt: off
    workflow.connect([
        (inputnode, regions, [("gm_modulated", "gm_modulated"), ("pet", "pet")]),
        (regions, ds_regions, [("regions", "in_file")]),
        (regions, ds_gm_morph, [("gm_morph", "in_file")]),
        (regions, ds_pet_stats, [("pet_stats", "in_file")]),
        (regions, outputnode, [("regions", "regions"), ("gm_morph", "gm_morph"),
                               ("pet_stats", "pet_stats")]),
    ])
    # fmt: on
    return workflow
