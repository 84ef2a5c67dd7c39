"""The nipype interface that applies a trained model bundle to one session's region file: a
thin wrapper around :func:`bids_siamfuse.apply.apply_bundle_to_file` (outputs described there).
"""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _ApplyModelInputSpec(BaseInterfaceInputSpec):
    bundle = File(
        exists=True,
        mandatory=True,
        desc="the bundle's model.json (its weights beside it; the JSON holds their SHA-256, so "
        "a retrained bundle changes this input's hash)",
    )
    region_file = File(exists=True, mandatory=True, desc="the session's AAL116 region file")
    source_entities = traits.Dict(mandatory=True, desc="entities of the PET (subject, session...)")
    output_dir = Directory(mandatory=True, desc="derivatives root")
    device = traits.Str(
        "cpu", usedefault=True, desc="torch device, resolved (bids_siamfuse.config.resolve)"
    )
    model_cls = traits.Any(
        None,
        usedefault=True,
        nohash=True,
        desc="the class the bundle is rebuilt as (None: bids_siamfuse.model.bundle."
        "default_model_cls; importable by name when nodes run in other processes)",
    )


class _ApplyModelOutputSpec(TraitedSpec):
    probabilities = File(desc="class probabilities and predicted class (TSV)")
    predicted_class = traits.Str(desc="the most probable class")
    relevance_maps = traits.List(File(), desc="relevance maps: MRI, PET, combined")
    relevance_table = File(desc="per-region relevance (TSV)")


class ApplyModel(SimpleInterface):
    """Apply a trained model bundle to a region file and write the model outputs."""

    input_spec = _ApplyModelInputSpec
    output_spec = _ApplyModelOutputSpec

    def _run_interface(self, runtime):
        import pandas as pd

        from ..apply import RELEVANCE_OUTPUTS, apply_bundle_to_file

        written = apply_bundle_to_file(
            self.inputs.bundle,
            self.inputs.region_file,
            self.inputs.source_entities,
            self.inputs.output_dir,
            device=self.inputs.device,
            model_cls=self.inputs.model_cls,
        )
        self._results["probabilities"] = str(written["model_probs"])
        self._results["predicted_class"] = str(
            pd.read_csv(written["model_probs"], sep="\t")["predicted"].iloc[0]
        )
        self._results["relevance_maps"] = [str(written[k]) for k in RELEVANCE_OUTPUTS.values()]
        self._results["relevance_table"] = str(written["model_relevance"])
        return runtime
