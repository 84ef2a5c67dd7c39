"""nipype interface of bring-your-own preprocessing: wraps preproc.external and preproc.regions.

:class:`ExternalMaps` takes the GM and PET maps found by :mod:`bids_siamfuse.external`, brings
them onto the grid (normalizing the PET), extracts the AAL116 regions, and returns the files and
the sidecar contents, each carrying the provenance (source files, SHA-256, space,
interpolation, PET normalization). The region file holds the same provenance as a JSON string
under the key ``provenance``.
"""

from __future__ import annotations

import json

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    traits,
)


class _ExternalMapsInputSpec(BaseInterfaceInputSpec):
    gm_file = File(exists=True, mandatory=True, desc="modulated GM map in an MNI-like space")
    pet_file = File(exists=True, mandatory=True, desc="PET map in an MNI-like space")
    ref_region = traits.Enum("none", "cerebellum", usedefault=True, desc="--pet-ref-region")
    pet_normalized = Str("", usedefault=True, desc="how this app normalized the PET already")
    provenance = traits.Dict(mandatory=True, desc="ExternalPair.provenance() of the pair")
    sources = traits.List(Str, desc="URIs of the two maps, for the sidecars")


class _ExternalMapsOutputSpec(TraitedSpec):
    gm_mni = File(exists=True, desc="modulated GM on the grid")
    pet_mni = File(exists=True, desc="normalized PET on the grid")
    regions = File(exists=True, desc="region file (.npz) with provenance")
    gm_morph = File(exists=True, desc="GM volume per AAL region (TSV)")
    pet_stats = File(exists=True, desc="mean uptake per AAL region (TSV)")
    gm_meta = traits.Dict(desc="sidecar of gm_mni")
    pet_meta = traits.Dict(desc="sidecar of pet_mni")
    regions_meta = traits.Dict(desc="sidecar of the region file")
    gm_morph_meta = traits.Dict(desc="sidecar of gm_morph")
    pet_stats_meta = traits.Dict(desc="sidecar of pet_stats")


class ExternalMaps(SimpleInterface):
    """External GM/PET maps -> grid maps, region file and tables, with their sidecars."""

    input_spec = _ExternalMapsInputSpec
    output_spec = _ExternalMapsOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        from ..bids import save_image, save_table
        from ..data.templates import grid_image
        from ..preproc import sidecars
        from ..preproc.external import prepare_pair
        from ..preproc.regions import (
            GM_MORPH_META,
            PET_STATS_META,
            REGION_META,
            compute_region_outputs,
            save_region_file,
        )

        gm, pet, done = prepare_pair(
            self.inputs.gm_file,
            self.inputs.pet_file,
            ref_region=self.inputs.ref_region,
            pet_normalized=self.inputs.pet_normalized,
        )
        prov = json.loads(json.dumps(dict(self.inputs.provenance)))
        prov["GM"].update(done["GM"])
        prov["PET"].update(done["PET"])
        cwd = Path(runtime.cwd)
        payload, gm_table, pet_table = compute_region_outputs(gm, pet)
        payload["provenance"] = np.array(json.dumps(prov, sort_keys=True))
        self._results["gm_mni"] = str(save_image(cwd / "gm_mni.nii.gz", grid_image(gm)))
        self._results["pet_mni"] = str(save_image(cwd / "pet_mni.nii.gz", grid_image(pet)))
        self._results["regions"] = str(save_region_file(cwd / "regions.npz", payload))
        self._results["gm_morph"] = str(save_table(cwd / "gm_morph.tsv", gm_table))
        self._results["pet_stats"] = str(save_table(cwd / "pet_stats.tsv", pet_table))

        sources = list(self.inputs.sources) if self.inputs.sources else []
        extra = {"Sources": sources, "ExternalPreprocessing": prov}
        gm_meta = sidecars.gm_mni_meta(
            sources, modulated=True, method="read from --derivatives " + prov["GM"]["Derivatives"]
        )
        pet_norm = done["PET"]
        pet_meta = sidecars.pet_mni_meta(
            sources,
            normalization=pet_norm["IntensityNormalization"],
            value=pet_norm.get("NormalizationValue", 1.0),
            ref_region=pet_norm.get("ReferenceRegion", self.inputs.ref_region),
            method="read from --derivatives " + prov["PET"]["Derivatives"],
        )
        self._results["gm_meta"] = {**gm_meta, "ExternalPreprocessing": prov}
        self._results["pet_meta"] = {**pet_meta, "ExternalPreprocessing": prov}
        self._results["regions_meta"] = {**REGION_META, **extra}
        self._results["gm_morph_meta"] = {**GM_MORPH_META, **extra}
        self._results["pet_stats_meta"] = {**PET_STATS_META, **extra}
        return runtime
