"""Applying a trained model bundle to region files (participant level with ``--model BUNDLE``).

The one model-application module, without nipype: the ``--model-only`` path
(:func:`plan_apply` / :func:`run_apply`, no raw data needed) and the nipype interface
:class:`bids_siamfuse.interfaces.model.ApplyModel` (a thin wrapper; the participant workflow
connects it to each session's region file) both call :func:`apply_bundle_to_file`. A bundle
made with another atlas or grid is refused with exit 65 before anything runs
(:func:`check_bundle`); a region file made with another one, when it is read.

Outputs, named after the PET (``source_entities``), through
:func:`bids_siamfuse.bids.save_output`:

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
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, NoInputError, NothingSelectedError, UsageError

LOGGER = logging.getLogger("bids_siamfuse.apply")

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


def predict_region_file(bundle, model, region_file: Path, source: dict) -> dict:
    """Probabilities and per-region relevance for one region file (no writing)."""
    from .model.data import RegionDataset
    from .preproc.regions import read_region_arrays

    gm, pet = read_region_arrays(
        region_file,
        bundle.layout,
        than=f"the model bundle {bundle.path}",
        remedy="rerun the participant level with this installation",
    )
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

    from .bids import output_path, save_output
    from .data.templates import grid_image

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
    bundle,
    region_file: Path,
    source_entities: dict,
    output_dir: Path,
    *,
    model=None,
    device="cpu",
    model_cls=None,
) -> dict:
    """Load (if given a path) and apply a bundle to one region file; write the outputs.

    ``device``: a resolved torch device (:func:`bids_siamfuse.config.resolve`), never ``auto``;
    ``model``: the bundle's model, already rebuilt, else rebuilt here as ``model_cls``
    (default :func:`bids_siamfuse.model.bundle.default_model_cls`).
    """
    from .model import bundle as bundles

    if not hasattr(bundle, "meta"):
        from .preproc.regions import atlas_layout

        bundle = bundles.load_bundle(bundle, layout=atlas_layout())
    if model is None:
        model = bundle.model(device=device, model_cls=model_cls)
    source = {k: v for k, v in dict(source_entities).items() if v not in (None, "")}
    result = predict_region_file(bundle, model, region_file, source)
    return write_model_outputs(output_dir, source, result, bundle, region_file)


def check_bundle(bundle: Path) -> dict:
    """The bundle's JSON, checked against this installation's atlas and grid (exit 65)."""
    from .model import bundle as bundles
    from .preproc.regions import atlas_layout

    meta = bundles.read_meta(bundle)
    bundles.check_compatible(meta, atlas_layout(), where=f"--model {bundle}")
    _, weights = bundles.bundle_paths(bundle)
    if not weights.is_file():
        raise DataError(f"--model {bundle}: the weights file {weights.name} is missing")
    return meta


@dataclass
class ApplyPlan:
    """``--model-only``: which region files get the bundle."""

    bundle: Path
    meta: dict
    out_dir: Path
    files: list  # (path, source entities)
    device: str

    def describe(self) -> str:
        lines = [
            f"apply model {self.bundle} ({' vs '.join(self.meta['classes'])}) to "
            f"{len(self.files)} region file(s) in {self.out_dir} on {self.device}:"
        ]
        lines.extend(f"  {p.relative_to(self.out_dir)}" for p, _ in self.files)
        return "\n".join(lines)


def plan_apply(settings, resolved) -> ApplyPlan:
    """Check a ``--model-only`` request: the bundle, and the region files it applies to;
    ``resolved``: :func:`bids_siamfuse.config.resolve`'s device."""
    from .group.cohort import source_from_name
    from .preproc.regions import find_region_files

    ex, wf = settings.execution, settings.workflow
    if wf.model is None:
        raise UsageError("--model-only needs --model BUNDLE")
    meta = check_bundle(wf.model)
    out = Path(ex.output_dir)
    files = find_region_files(out, ex.tracer_label) if out.is_dir() else []
    if not files:
        raise NoInputError(
            f"{out}: no region files (*_trc-{ex.tracer_label}_*_regions.npz) for --model-only; "
            "run the participant level without --model-only first"
        )
    chosen = []
    for path in files:
        src = source_from_name(path.name)
        if ex.participant_label and src.get("subject") not in ex.participant_label:
            continue
        if ex.session_label and src.get("session") not in ex.session_label:
            continue
        chosen.append((path, src))
    if not chosen:
        raise NothingSelectedError(
            "no region file in the output folder matches --participant-label/--session-label"
        )
    return ApplyPlan(
        bundle=Path(wf.model),
        meta=meta,
        out_dir=out,
        files=chosen,
        device=resolved.device,
    )


def run_apply(settings, plan: ApplyPlan, *, model_cls=None) -> int:
    """Apply the bundle to every planned region file (no nipype); ``model_cls``: the class the
    bundle is rebuilt as (default :func:`bids_siamfuse.model.bundle.default_model_cls`)."""
    from .model import bundle as bundles
    from .preproc.regions import atlas_layout

    t0 = time.perf_counter()
    bundle = bundles.load_bundle(plan.bundle, layout=atlas_layout())
    model = bundle.model(device=plan.device, model_cls=model_cls)
    failed = []
    for path, source in plan.files:
        try:
            written = apply_bundle_to_file(bundle, path, source, plan.out_dir, model=model)
        except DataError as exc:
            if settings.execution.stop_on_first_crash:
                raise
            LOGGER.error("%s: %s", path.name, exc)
            failed.append((path, str(exc)))
            continue
        probs = json.loads(written["model_probs"].with_suffix(".json").read_text())
        LOGGER.info("%s: %s", path.name.split("_space-")[0], probs["PredictedClass"])
    LOGGER.info(
        "model applied to %d of %d session(s) in %.1f s",
        len(plan.files) - len(failed),
        len(plan.files),
        time.perf_counter() - t0,
    )
    if failed:
        raise DataError(
            f"{len(failed)} of {len(plan.files)} region file(s) could not be used; first: "
            f"{failed[0][1]}"
        )
    return 0
