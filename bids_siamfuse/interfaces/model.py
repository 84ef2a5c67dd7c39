"""Applying a trained model bundle to one subject/session's region file.

:func:`apply_bundle_to_file` does the work (the nipype interface :class:`ApplyModel` and the
``--model-only`` path of :mod:`bids_siamfuse.workflows.model` both call it). It writes, named
after the PET (``source_entities``), through :func:`bids_siamfuse.bids.save_output`:

* ``model_probs``: ``..._desc-diagnosis_probs.tsv`` (+ ``.json``): one row, the predicted class
  and one ``prob_<class>`` column per class; the sidecar repeats them and names the bundle;
* ``model_relevance_{mri,pet,combined}``:
  ``..._space-MNI152NLin2009aSym_seg-AAL116_res-1p5_desc-relevance{MRI,PET,Combined}_stat.nii.gz``
  (+ ``.json``): the subject's region relevance painted on the 121x145x121 grid;
* ``model_relevance``: ``..._seg-AAL116_desc-relevance_stat.tsv`` (+ ``.json``): ``index, name,
  mri, pet, combined`` per region.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..errors import DataError

#: Output key of :data:`bids_siamfuse.bids.OUTPUTS` per relevance read-out.
RELEVANCE_OUTPUTS = {
    "mri": "model_relevance_mri",
    "pet": "model_relevance_pet",
    "combined": "model_relevance_combined",
}

RELEVANCE_DEFINITION = (
    "Per-subject relevance of the siamese-attention model: for every embedding feature f of "
    "this subject, mask_f * |z_f| * w_f, where z_f is the feature standardized with the "
    "training subjects' statistics, mask_f the attention module's sigmoid mask and w_f the "
    "spread of the classifier weights of f over the classes (how strongly f moves the class "
    "scores apart); summed over the 20 MRI (or PET) features of each AAL region and divided "
    "by the subject's total, so 'combined' (= MRI + PET) sums to 1 over the 116 regions. "
    "Higher: the region weighed more in this subject's prediction. Not a p-value nor an "
    "effect size."
)
MODALITY_TEXT = {
    "mri": "MRI (grey matter) branch",
    "pet": "FDG-PET branch",
    "combined": "MRI + PET",
}


def bundle_description(bundle) -> dict:
    """What a sidecar says about the model that produced it."""
    cv = bundle.meta.get("cv_metrics", {}) or {}
    ba = (cv.get("balanced_accuracy") or {}) if isinstance(cv, dict) else {}
    return {
        "Bundle": str(bundle.path),
        "WeightsSHA256": bundle.meta.get("weights_sha256"),
        "Classes": list(bundle.classes),
        "Created": bundle.meta.get("created"),
        "TrainedOn": bundle.meta.get("cohort", {}),
        "CrossValidatedBalancedAccuracy": ba or None,
    }


def read_region_file(path: Path, bundle) -> tuple[np.ndarray, np.ndarray]:
    """(gm, pet) compact vectors of a region file, checked against the bundle (exit 65)."""
    from ..preproc.regions import read_region_arrays

    path = Path(path)
    gm, pet, text = read_region_arrays(path, None)  # shape checked below
    try:
        signature = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: unreadable signature ({exc})") from None
    if json.dumps(signature, sort_keys=True) != json.dumps(bundle.signature, sort_keys=True):
        raise DataError(
            f"{path}: made with another atlas or grid than the model bundle {bundle.path} "
            "(signature mismatch)"
        )
    n = bundle.layout.n_voxels
    if gm.shape != (n,) or pet.shape != (n,):
        raise DataError(f"{path}: has {gm.shape[0]} voxels, the model expects {n}")
    return gm, pet


def predict_region_file(bundle, model, region_file: Path, source: dict) -> dict:
    """Probabilities and per-region relevance for one region file (no writing)."""
    from ..model.data import RegionDataset

    gm, pet = read_region_file(region_file, bundle)
    data = RegionDataset(
        gm=gm[None],
        pet=pet[None],
        labels=np.zeros(1, dtype=np.int64),  # unknown; not read by predictions
        classes=bundle.classes,
        subjects=np.array([str(source.get("subject", ""))]),
        sessions=np.array([str(source.get("session") or "")]),
        layout=bundle.layout,
    )
    proba = np.asarray(model.predict_proba(data), dtype=np.float64)[0]
    relevance = {
        k: np.asarray(v, dtype=np.float64)[0] for k, v in model.subject_relevance(data).items()
    }
    return {"proba": proba, "relevance": relevance}


def write_model_outputs(out_dir: Path, source: dict, result: dict, bundle, region_file) -> dict:
    """Write the outputs of :func:`predict_region_file`; ``{output key: path}``."""
    import pandas as pd

    from ..bids import output_path, save_output
    from ..data.templates import grid_image

    classes = list(bundle.classes)
    proba = result["proba"]
    predicted = classes[int(np.argmax(proba))]
    model = bundle_description(bundle)
    sources = [str(region_file), str(bundle.path)]
    sub, ses = source.get("subject"), source.get("session")
    table = pd.DataFrame(
        [
            {
                "participant_id": f"sub-{sub}",
                "session": f"ses-{ses}" if ses else None,
                "predicted": predicted,
                **{f"prob_{c}": float(p) for c, p in zip(classes, proba)},
            }
        ]
    )
    probs_meta = {
        "Description": "Diagnosis predicted by the siamese-attention model (bids_siamfuse "
        "--model) from this session's AAL116 region file.",
        "PredictedClass": predicted,
        "Probabilities": {c: float(p) for c, p in zip(classes, proba)},
        "participant_id": {"Description": "participant label"},
        "session": {"Description": "session label (n/a when the dataset has none)"},
        "predicted": {"Description": "the class with the largest probability", "Levels": classes},
        **{
            f"prob_{c}": {"Description": f"model probability of class {c} (softmax output)"}
            for c in classes
        },
        "Model": model,
        "Sources": sources,
    }
    written = {
        "model_probs": save_output(out_dir, "model_probs", table, source=source, meta=probs_meta)
    }
    layout = bundle.layout
    rel = result["relevance"]
    for key, name in RELEVANCE_OUTPUTS.items():
        meta = {
            "Description": f"Region relevance, {MODALITY_TEXT[key]}: every voxel of an AAL region "
            "holds the region's value; 0 outside the atlas. " + RELEVANCE_DEFINITION,
            "Units": "arbitrary (fraction of the subject's total relevance)",
            "Modality": key,
            "Atlas": "AAL116",
            "Model": model,
            "Table": output_path(out_dir, "model_relevance", source).name,
            "Sources": sources,
        }
        img = grid_image(layout.paint(rel[key]))
        written[name] = save_output(out_dir, name, img, source=source, meta=meta)
    table = pd.DataFrame(
        {
            "index": np.arange(1, layout.n_regions + 1),
            "name": list(layout.names),
            "mri": rel["mri"],
            "pet": rel["pet"],
            "combined": rel["combined"],
        }
    )
    table_meta = {
        "Description": "Per-region relevance of this session's prediction. "
        + RELEVANCE_DEFINITION,
        "index": {"Description": "AAL116 region index (atlas order)"},
        "name": {"Description": "AAL region name"},
        "mri": {"Description": "relevance of the region's MRI (grey matter) features"},
        "pet": {"Description": "relevance of the region's FDG-PET features"},
        "combined": {"Description": "mri + pet"},
        "Model": model,
        "Sources": sources,
    }
    written["model_relevance"] = save_output(
        out_dir, "model_relevance", table, source=source, meta=table_meta
    )
    return written


def apply_bundle_to_file(
    bundle, region_file: Path, source_entities: dict, output_dir: Path, *, model=None, device="cpu"
) -> dict:
    """Load (if given a path) and apply a bundle to one region file; write the outputs."""
    from ..model import bundle as bundles

    if not hasattr(bundle, "meta"):
        from ..preproc.regions import atlas_layout

        bundle = bundles.load_bundle(bundle, layout=atlas_layout())
    if model is None:
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = bundle.model(device=device, model_cls=bundles.default_model_cls())
    source = {k: v for k, v in dict(source_entities).items() if v not in (None, "")}
    result = predict_region_file(bundle, model, region_file, source)
    return write_model_outputs(output_dir, source, result, bundle, region_file)


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
    device = traits.Str("cpu", usedefault=True, desc="torch device")


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

        written = apply_bundle_to_file(
            self.inputs.bundle,
            self.inputs.region_file,
            self.inputs.source_entities,
            self.inputs.output_dir,
            device=self.inputs.device,
        )
        self._results["probabilities"] = str(written["model_probs"])
        self._results["predicted_class"] = str(
            pd.read_csv(written["model_probs"], sep="\t")["predicted"].iloc[0]
        )
        self._results["relevance_maps"] = [str(written[k]) for k in RELEVANCE_OUTPUTS.values()]
        self._results["relevance_table"] = str(written["model_relevance"])
        return runtime
