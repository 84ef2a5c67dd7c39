"""Writing a group run's task folder (``OUTPUT_DIR/group/<A>_vs_<B>/``, see ``docs/outputs.md``):
tables, region maps, the final model's bundle and ``summary.json`` (:func:`write_group_outputs`);
the folder is built under a hidden name and swapped into place when complete
(:func:`bids_siamfuse.atomic.swap_folder`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plan import GroupPlan

METRIC_DEFINITIONS = {
    "unit": "headline (summary metrics, Table 2): one test subject, its sessions' class "
    "probabilities averaged; metrics.tsv also has rows per test PET session (level = session, "
    "summary metrics_session). Per fold, then the mean over all folds of all repeats",
    "ci95": "95 % confidence interval of the mean over folds: Nadeau-Bengio corrected "
    "resampled t interval, mean +- t(0.975, k-1) sqrt((1/k + n_test/n_train) SD^2), k folds x "
    "repeats (SD with ddof 1)",
    "paired_comparison": "per fold of every repeat, the model's metric minus the other "
    "method's on the same test subjects; Nadeau-Bengio corrected resampled t-test (two-sided) "
    "and its corrected 95 % interval; best_baseline flags the baseline with the highest mean "
    "balanced accuracy",
    "predicted_class": "the class with the largest probability (score)",
    "two_classes": "the second class of --classes is positive: sensitivity = its recall, "
    "specificity = the first class's recall, precision and F1 of the positive class, balanced "
    "accuracy = (sensitivity + specificity) / 2, AUC of the positive class's probability, "
    "Brier score = mean squared difference of the positive class's probability and the label",
    "more_classes": "balanced accuracy = sensitivity = mean per-class recall; specificity, "
    "precision, F1 = unweighted means of the one-vs-rest values; AUC = mean one-vs-rest AUC; "
    "Brier = mean over subjects of the summed squared probability errors",
    "calibration": "calibration.tsv: test subjects of every fold and repeat pooled, positive-"
    "class probability in 10 equal bins against the observed share of the positive class",
    "undefined": "a metric undefined in a fold (e.g. AUC with one class) is n/a and left out "
    "of the mean; precision/F1 with no predicted positive are 0",
    "permutation_p_value": "(1 + number of permutations whose mean balanced accuracy >= the "
    "observed one) / (1 + permutations); labels shuffled between subjects, whole CV rerun "
    "(every method, ablations included)",
    "baselines": "region-mean GM (modulated) and/or PET per AAL region, StandardScaler + "
    "LinearSVC or LogisticRegression, fit on the training fold, C chosen from "
    "0.001/0.01/0.1/1/10 by a 3-fold subject-level stratified inner CV on the training fold "
    "(balanced accuracy); SVM scores are the logistic/softmax of the decision values (not "
    "calibrated)",
    "ablations": "siamese_attention_<name>, trained in the same folds as the model from the "
    "same siamese networks: similarity_fusion / paper_fusion = the other fusion variant; "
    "similarity_only = only the 116 per-region MRI-PET similarities; untrained = the whole "
    "pipeline with the siamese networks left at their initialisation; mri_only / pet_only = "
    "only the MRI (PET) branch embeddings",
    "siamese_training": "training.tsv: per fold and region the kept epoch (0 = the network "
    "kept its initial weights), the mean validation hinge of the untrained and of the kept "
    "network and their difference",
}

RELEVANCE_GROUP_TEXT = (
    "Figure 7 relevance of the siamese-attention model, averaged over the cross-validation "
    "folds. Default (columns mri, pet, similarity, combined; the maps): per attention-stage "
    "feature the effective weight of the attention module, mean attention mask (training "
    "sessions) times the spread of the linear classifier's weights between classes, summed "
    "over the region's 20 MRI (or 20 PET) embedding features, or its MRI-PET similarity "
    "feature (fusion = similarity), divided by the total (combined = mri + pet + similarity "
    "sums to 1 over regions; uniform = 1/116). Columns *_first_layer: the paper's literal "
    "reading, the absolute weights of the attention MLP's first linear layer summed over "
    "hidden units and features, normalized the same way."
)
ACTIVATION_TEXT = (
    "Figure 6 activation counts: per test session, the number of a region's 20 MRI (PET) "
    "embedding features whose attention mask (sigmoid output) exceeds 0.9; fused = MRI + PET "
    "(0..40); mean over every test session of every fold."
)


def _region_map_name(desc: str) -> str:
    from ..bids import build_name
    from ..data.templates import RES_LABEL, SPACE

    return build_name(
        {"space": SPACE, "segmentation": "AAL116", "resolution": RES_LABEL, "desc": desc},
        "stat",
        ".nii.gz",
    )


def _write_region_maps(folder: Path, layout, values: dict, what: str, text: str, units, meta):
    """Per-region ``values`` painted on the grid, one NIfTI + JSON per modality key.

    ``what`` names the maps (``desc-<what><Label>``) and ``units`` maps a key to its units.
    """
    from ..bids import save_image, save_json
    from ..data.templates import grid_image

    labels = {
        "mri": "MRI",
        "pet": "PET",
        "similarity": "Similarity",
        "combined": "Combined",
        "fused": "Fused",
    }
    written = []
    for key, label in labels.items():
        if key not in values:
            continue
        name = _region_map_name(f"{what}{label}")
        sidecar = {
            "Description": f"{text} Modality: {key}. Every voxel of an AAL region holds the "
            "region's value; 0 outside the atlas.",
            "Units": units(key),
            "Modality": key,
            "Atlas": "AAL116",
            **meta,
        }
        save_json(folder / name.replace(".nii.gz", ".json"), sidecar)
        save_image(folder / name, grid_image(layout.paint(values[key])), space_code=4)
        written.extend([name, name.replace(".nii.gz", ".json")])
    return written


def _region_table(layout, values: dict, keys):
    import pandas as pd

    table = {"index": np.arange(1, layout.n_regions + 1), "name": list(layout.names)}
    for k in keys:
        v = values.get(k)
        table[k] = np.asarray(v, dtype=np.float64) if v is not None else np.nan
    return pd.DataFrame(table)


def _training_summary(rows: list) -> list:
    """Per repeat and fold: how many region networks moved from their initial weights and
    the mean validation-hinge improvement of those that did."""
    out = []
    for key in sorted({(r["repeat"], r["fold"]) for r in rows}):
        sel = [r for r in rows if (r["repeat"], r["fold"]) == key]
        moved = [r for r in sel if r["trained"]]
        out.append(
            {
                "repeat": key[0],
                "fold": key[1],
                "regions": len(sel),
                "trained": len(moved),
                "share_trained": len(moved) / len(sel) if sel else None,
                "mean_improvement_trained": (
                    float(np.mean([r["val_hinge_improvement"] for r in moved])) if moved else None
                ),
                "mean_kept_epoch_trained": (
                    float(np.mean([r["kept_epoch"] for r in moved])) if moved else None
                ),
            }
        )
    return out


def write_group_outputs(folder: Path, plan: GroupPlan, data, result, *, settings=None) -> list:
    """Write every group-level file of one task into ``folder``; returns the names."""
    import pandas as pd

    from ..bids import save_json, save_table
    from ..model import bundle as bundles
    from ..model.cv import MODEL_METHOD
    from ..model.folds import KIND_FINAL, task_seed
    from ..model.metrics import METRICS
    from ..model.tasks import ACTIVATION_KEYS, RELEVANCE_ALL_KEYS, RELEVANCE_KEYS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = list(plan.classes)
    layout = data.layout
    written = []

    def table(name, rows, columns):
        frame = pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame(columns=columns)
        extra = [c for c in frame.columns if c not in columns]
        save_table(folder / name, frame[list(columns) + extra])
        written.append(name)

    table(
        "metrics.tsv",
        result.metrics,
        ["method", "repeat", "fold", "n_test", "level", *METRICS],
    )
    if result.training:
        table(
            "training.tsv",
            result.training,
            [
                "repeat",
                "fold",
                "index",
                "name",
                "kept_epoch",
                "trained",
                "val_hinge_initial",
                "val_hinge_kept",
                "val_hinge_improvement",
            ],
        )
    if result.calibration:
        table(
            "calibration.tsv",
            result.calibration,
            ["method", "bin", "bin_low", "bin_high", "mean_predicted", "observed", "n"],
        )
    table(
        "predictions.tsv",
        result.predictions,
        [
            "participant_id",
            "session",
            "repeat",
            "fold",
            "method",
            "true",
            "predicted",
            *[f"prob_{c}" for c in classes],
        ],
    )
    table("roc.tsv", result.roc, ["method", "repeat", "fold", "class", "fpr", "tpr", "threshold"])
    table(
        "history.tsv",
        result.history,
        ["repeat", "fold", "stage", "epoch", "train_loss", "val_loss"],
    )
    save_table(
        folder / "relevance.tsv", _region_table(layout, result.relevance, RELEVANCE_ALL_KEYS)
    )
    written.append("relevance.tsv")
    save_table(
        folder / "activations.tsv", _region_table(layout, result.activations, ACTIVATION_KEYS)
    )
    written.append("activations.tsv")
    if result.permutations:
        rows = []
        for row in result.permutations:
            out = {"permutation": row["permutation"], "balanced_accuracy": row[MODEL_METHOD]}
            out.update(
                {
                    f"balanced_accuracy_{m}": row[m]
                    for m in row
                    if m not in ("permutation", MODEL_METHOD)
                }
            )
            rows.append(out)
        table("permutation.tsv", rows, ["permutation", "balanced_accuracy"])

    # relevance (mean over folds) and activation counts painted on the grid
    written += _write_region_maps(
        folder,
        layout,
        {
            k: result.relevance[k]
            for k in RELEVANCE_KEYS
            if k in result.relevance and (k != "similarity" or np.any(result.relevance[k]))
        },
        "relevance",
        RELEVANCE_GROUP_TEXT,
        lambda key: "arbitrary (fraction of the total relevance)",
        {"Classes": classes, "Table": "relevance.tsv"},
    )
    written += _write_region_maps(
        folder,
        layout,
        result.activations,
        "activation",
        ACTIVATION_TEXT,
        lambda key: f"features (0..{40 if key == 'fused' else 20})",
        {"Classes": classes, "Table": "activations.tsv"},
    )

    training = plan.train.run_settings()
    counts = plan.counts()
    cohort = {
        "subjects": int(len(np.unique(data.subjects))),
        "sessions": int(len(data)),
        "per_class": counts,
        "left_out": plan.left_out,
        "flagged_excluded": len(plan.flagged),
        "flagged_sessions": [
            {"subject": f[1], "session": f[2], "reasons": list(f[3])} for f in plan.flagged
        ],
    }
    cv_settings = {
        "folds": plan.folds,
        "repeats": plan.repeats,
        "seed": plan.seed,
        "permutation_tests": plan.permutations,
        "split": "stratified by class at subject level (all sessions of a subject in one fold)",
    }
    if result.final is not None:
        final = result.final
        bundles.save_bundle(
            folder,
            tensors=final["tensors"],
            model_meta=final["meta"],
            layout=layout,
            classes=classes,
            standardization=final["standardizer"],
            training={
                **training,
                "seed": task_seed(plan.seed, KIND_FINAL),
                "history": final.get("history", []),
                "cross_validation": cv_settings,
            },
            cv_metrics=result.summary.get(MODEL_METHOD, {}),
            cohort=cohort,
            extra={
                "task": plan.out_dir.name,
                "label_column": plan.label_column,
                "tracer": plan.tracer,
                "relevance": {k: np.asarray(v).tolist() for k, v in final["relevance"].items()},
            },
        )
        written.extend([bundles.WEIGHTS_NAME, bundles.META_NAME])

    model_ba = result.summary[MODEL_METHOD]["balanced_accuracy"]
    order = np.argsort(-np.asarray(result.relevance.get("combined", np.zeros(layout.n_regions))))
    summary = {
        "task": plan.out_dir.name,
        "classes": classes,
        "reference_class": classes[0],
        "positive_class": classes[1] if len(classes) == 2 else None,
        "label_column": plan.label_column,
        "tracer": plan.tracer,
        "cohort": cohort,
        "cross_validation": cv_settings,
        "training": training,
        "devices": plan.devices,
        "threads_per_worker": plan.threads,
        "metrics": result.summary,
        "metrics_level": "subject (sessions of a subject averaged); per session in "
        "metrics_session and in metrics.tsv rows with level = session",
        "metrics_session": result.summary_session,
        "methods": list(result.methods or result.summary),
        "per_repeat": result.per_repeat,
        "comparisons": result.comparisons,
        "siamese_training": _training_summary(result.training),
        "balanced_accuracy": model_ba,
        "permutation": (
            {
                "n": plan.permutations,
                "p_value": result.p_values.get(MODEL_METHOD),
                "p_values": result.p_values,
                # the statistic the reruns are compared with: the first repeat's (model/cv.py)
                "observed_balanced_accuracy": result.permutation_observed.get(MODEL_METHOD),
                "null_mean_balanced_accuracy": float(
                    np.mean([r[MODEL_METHOD] for r in result.permutations])
                ),
            }
            if result.permutations
            else None
        ),
        "top_regions": [
            {"name": layout.names[i], "combined": float(result.relevance["combined"][i])}
            for i in order[:10]
        ]
        if "combined" in result.relevance
        else [],
        "metric_definitions": METRIC_DEFINITIONS,
        "versions": bundles.versions(),
        "timing_s": {
            k: round(v, 2) if isinstance(v, float) else v for k, v in result.timing.items()
        },
        "files": sorted(written + ["summary.json"]),
    }
    if settings is not None:
        summary["settings"] = settings.as_dict()
    save_json(folder / "summary.json", bundles._jsonable(summary))
    written.append("summary.json")
    return written
