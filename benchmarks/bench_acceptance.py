"""Issue 12 acceptance: the fusion model against its ablations and the linear baselines.

Three sub-commands::

    # 1. a cohort (needs nibabel): the realistic generator (bids_siamfuse-synth --effect ...,
    #    --preprocessed --skip-raw), read back as region arrays; writes COHORT.npz (a
    #    RegionDataset) and COHORT.truth.json (planted regions)
    python benchmarks/bench_acceptance.py make --effect coupling --seed 1101 \\
        --n-per-group 60 --out .acc/coupling-1101

    # 2. the cross-validation on one cohort (torch / numpy / scikit-learn only): every method,
    #    CIs, paired comparison, permutation p-values, siamese training shares, relevance
    #    rank AUC of the planted regions; one JSON
    python benchmarks/bench_acceptance.py cv .acc/coupling-1101.npz --folds 5 --repeats 1 \\
        --permutations 19 --sloppy --device cpu --threads 4 --json out/coupling.json
    #    --shuffle-labels S: labels permuted between subjects first (seed S), the "shuffled
    #    labels" control; --gate / --fusion: the variants compared on development cohorts

    # 3. markdown tables of several JSON results
    python benchmarks/bench_acceptance.py table out/*.json

Seeds: development cohorts (hyperparameter choices: gate, fusion default) use seeds 9xx;
evaluation cohorts use seeds 11xx; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench_group import machine  # noqa: E402  (benchmarks/ is on sys.path when run)

# ----------------------------------------------------------------------------------------------
# make
# ----------------------------------------------------------------------------------------------


def truth_regions(dataset: Path) -> dict:
    """Planted regions (atlas order) from the generator's ground truth, whatever the effect:
    a region is planted when any of its effect weights in ``synth-truth/regions.tsv`` is
    nonzero."""
    import pandas as pd

    table = pd.read_csv(dataset / "derivatives" / "synth-truth" / "regions.tsv", sep="\t")
    if "planted" in table:  # the realistic generator marks them for every effect family
        planted = table["planted"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    else:
        planted = (table["atrophy_weight"] > 0) | (table["hypometabolism_weight"] > 0)
    return {"names": table["name"].tolist(), "planted": np.asarray(planted).tolist()}


def cmd_make(args) -> None:
    from bids_siamfuse.bids import read_participants
    from bids_siamfuse.group.cohort import load_cohort

    out = Path(args.out)
    ds = out.with_suffix(".ds")
    if not (ds / "participants.tsv").is_file():
        from bids_siamfuse.synth import generate

        t0 = time.perf_counter()
        generate(
            ds,
            n_per_group=args.n_per_group,
            groups=tuple(args.groups),
            seed=args.seed,
            effect=args.effect,
            preprocessed=True,
            raw=False,
            regions_only=True,
            jobs=args.jobs,
        )
        print(f"generated {ds} in {time.perf_counter() - t0:.1f} s", flush=True)
    data = load_cohort(
        ds / "derivatives" / "bids_siamfuse", read_participants(ds), classes=tuple(args.groups)
    )
    data.save(out.with_suffix(".npz"))
    truth = truth_regions(ds)
    truth.update(effect=args.effect, seed=args.seed, n_per_group=args.n_per_group)
    out.with_suffix(".truth.json").write_text(json.dumps(truth))
    print(f"{out}.npz: {len(data)} sessions, planted {sum(truth['planted'])} regions")


# ----------------------------------------------------------------------------------------------
# cv
# ----------------------------------------------------------------------------------------------


def rank_auc(scores, positive) -> float | None:
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, np.asarray(scores)))


def cmd_cv(args) -> None:
    import dataclasses

    import torch

    from bids_siamfuse.model import cv
    from bids_siamfuse.model.data import RegionDataset
    from bids_siamfuse.model.folds import shuffle_subject_labels
    from bids_siamfuse.model.options import TrainConfig
    from bids_siamfuse.model.workers import resolve_devices

    path = Path(args.cohort)
    data = RegionDataset.load(path)
    truth_file = path.with_suffix(".truth.json")
    truth = json.loads(truth_file.read_text()) if truth_file.is_file() else None
    if args.shuffle_labels is not None:
        labels = shuffle_subject_labels(data.subjects, data.labels, args.shuffle_labels)
        data = dataclasses.replace(data, labels=labels)
    if args.threads:
        torch.set_num_threads(args.threads)
    # the package defaults unless named (the model row is then the default model)
    train_kwargs = {
        "sloppy": args.sloppy,
        "gate": args.gate or TrainConfig.gate,
        "fusion": args.fusion or TrainConfig.fusion,
    }
    if args.epochs:
        train_kwargs["epochs"] = args.epochs
    t0 = time.perf_counter()
    if args.device.startswith("cuda") and args.workers > 1:  # several workers on one GPU
        devices = [args.device if ":" in args.device else "cuda:0"] * args.workers
    else:
        devices = resolve_devices(args.device, 0, args.workers)
    res = cv.cross_validate(
        data,
        folds=args.folds,
        repeats=args.repeats,
        seed=args.cv_seed,
        permutations=args.permutations,
        config=TrainConfig(**train_kwargs),
        devices=devices,
        threads=args.threads or None,
        final_model=False,
    )
    wall = time.perf_counter() - t0
    methods = res.methods
    table = {
        m: {
            k: res.summary[m][k]
            for k in ("balanced_accuracy", "auc", "brier", "sensitivity", "specificity")
        }
        for m in methods
    }
    shares = {}
    planted = np.asarray(truth["planted"], dtype=bool) if truth else None
    for key in sorted({(r["repeat"], r["fold"]) for r in res.training}):
        rows = [r for r in res.training if (r["repeat"], r["fold"]) == key]
        trained = np.array([r["trained"] for r in rows])
        entry = {"all": float(trained.mean())}
        if planted is not None and planted.any():
            entry["planted"] = float(trained[planted].mean())
            entry["not_planted"] = float(trained[~planted].mean())
        shares[f"r{key[0]}f{key[1]}"] = entry
    relevance_auc = {}
    if planted is not None:
        for k, v in res.relevance.items():
            relevance_auc[k] = rank_auc(v, planted)
    out = {
        "cohort": str(path.name),
        "truth": {k: truth[k] for k in ("effect", "seed", "n_per_group")} if truth else None,
        "n_sessions": len(data),
        "n_subjects": int(len(np.unique(data.subjects))),
        "shuffled_labels": args.shuffle_labels,
        "settings": {
            "folds": args.folds,
            "repeats": args.repeats,
            "cv_seed": args.cv_seed,
            "permutations": args.permutations,
            **train_kwargs,
            "device": args.device,
            "workers": args.workers,
            "threads": args.threads,
        },
        "summary": table,
        "per_repeat": [r for r in res.per_repeat if r["level"] == "subject"],
        "p_values": res.p_values,
        "comparisons": [c for c in res.comparisons if c["metric"] == "balanced_accuracy"],
        "training_share": shares,
        "relevance_rank_auc": relevance_auc,
        "wall_s": round(wall, 1),
        "machine": machine(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    print(table_text([out]))


# ----------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------


def _ci(stats) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    if stats.get("ci_low") is None:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} [{stats['ci_low']:.2f}, {stats['ci_high']:.2f}]"


def table_text(results: list[dict]) -> str:
    lines = []
    for r in results:
        s = r["settings"]
        title = r["cohort"] + (
            f" (labels shuffled, seed {r['shuffled_labels']})"
            if r.get("shuffled_labels") is not None
            else ""
        )
        lines.append(
            f"### {title}: {r['n_subjects']} subjects, {s['folds']}-fold x {s['repeats']}, "
            f"gate {s['gate']}, fusion {s['fusion']}, sloppy {s['sloppy']}, "
            f"{r['wall_s']} s"
        )
        lines.append("")
        lines.append("| method | balanced accuracy [95 % CI] | AUC | Brier | permutation p |")
        lines.append("| --- | --- | --- | --- | --- |")
        for m, v in r["summary"].items():
            p = r["p_values"].get(m)
            lines.append(
                f"| {m} | {_ci(v['balanced_accuracy'])} | {_ci(v['auc'])} | "
                f"{_ci(v['brier'])} | {'' if p is None else f'{p:.3f}'} |"
            )
        best = [c for c in r["comparisons"] if c.get("best_baseline")]
        if best:
            c = best[0]
            lines.append("")
            lines.append(
                f"Model minus best baseline ({c['versus']}): {c['mean_difference']:+.3f} "
                f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], p = {c['p_value']:.3f} "
                "(corrected resampled t)"
            )
        if r["training_share"]:
            parts = [
                f"{k}: {v['all']:.2f}"
                + (
                    f" (planted {v['planted']:.2f}, other {v['not_planted']:.2f})"
                    if "planted" in v
                    else ""
                )
                for k, v in r["training_share"].items()
            ]
            lines.append("")
            lines.append("Share of region networks trained per fold: " + "; ".join(parts))
        if r["relevance_rank_auc"]:
            ra = r["relevance_rank_auc"]
            lines.append("")
            lines.append(
                "Relevance rank AUC of the planted regions: "
                + ", ".join(f"{k} {v:.3f}" for k, v in ra.items() if v is not None)
            )
        lines.append("")
    return "\n".join(lines)


def cmd_table(args) -> None:
    results = [json.loads(Path(p).read_text()) for p in args.files]
    print(table_text(results))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--effect", required=True)
    m.add_argument("--seed", type=int, required=True)
    m.add_argument("--n-per-group", type=int, default=60)
    m.add_argument("--groups", nargs="+", default=["CN", "AD"])
    m.add_argument("--jobs", type=int, default=2)
    m.add_argument("--out", required=True)
    c = sub.add_parser("cv")
    c.add_argument("cohort")
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--repeats", type=int, default=1)
    c.add_argument("--cv-seed", type=int, default=42)
    c.add_argument("--permutations", type=int, default=0)
    c.add_argument("--sloppy", action="store_true")
    c.add_argument("--epochs", type=int, default=0)
    c.add_argument("--gate", default=None, help="default: TrainConfig's")
    c.add_argument("--fusion", default=None, help="default: TrainConfig's")
    c.add_argument("--device", default="cpu")
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--shuffle-labels", type=int, default=None)
    c.add_argument("--json", required=True)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    {"make": cmd_make, "cv": cmd_cv, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
