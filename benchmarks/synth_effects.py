"""What the realistic benchmark cohorts hold, measured on their region files (issue 12).

Usage::

    python benchmarks/synth_effects.py OUT [--n-per-group 60] [--seed 101] [--families ad ...]
        [--jobs 2] [--keep] [--maps]

For each family it generates a ``--preprocessed --skip-raw`` CN/AD cohort (timed), loads the
region files with the project's loader and prints, per region group (planted / not planted):
Cohen's d (AD - CN) of the region means of modulated GM and PET, the within-class GM-PET
correlation of the region means, and the within-region voxel SD ratio (AD / CN). These are the
figures in ``docs/benchmarks.md`` ("Benchmark cohorts").
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd


def region_summary(root: Path, classes=("CN", "AD")) -> tuple[pd.DataFrame, dict]:
    """Per-region statistics of a cohort's region files (first sessions only)."""
    from bids_siamfuse.bids import read_participants
    from bids_siamfuse.preproc import regions

    data = regions.load_cohort(
        root / "derivatives" / "bids_siamfuse", read_participants(root), classes=classes
    )
    first = ~pd.Series(data.subjects).duplicated().to_numpy()
    layout = data.layout
    gm = np.stack([layout.region_means(x) for x in data.gm[first]])
    pet = np.stack([layout.region_means(x) for x in data.pet[first]])
    sd_gm = np.stack([_region_sd(x, layout) for x in data.gm[first]])
    sd_pet = np.stack([_region_sd(x, layout) for x in data.pet[first]])
    y = np.asarray(data.labels)[first]
    truth = pd.read_csv(root / "derivatives" / "synth-truth" / "regions.tsv", sep="\t")

    def pct(v):
        return 100.0 * (v[y == 1].mean(axis=0) / v[y == 0].mean(axis=0) - 1.0)

    def cohen(v):
        a, b = v[y == 1], v[y == 0]
        pooled = np.sqrt((a.var(axis=0, ddof=1) + b.var(axis=0, ddof=1)) / 2)
        return (a.mean(axis=0) - b.mean(axis=0)) / pooled

    def corr(k):
        out = []
        for r in range(gm.shape[1]):
            out.append(np.corrcoef(gm[y == k, r], pet[y == k, r])[0, 1])
        return np.array(out)

    table = pd.DataFrame(
        {
            "name": layout.names,
            "planted": truth["planted"].astype(bool).to_numpy(),
            "d_gm": cohen(gm),
            "d_pet": cohen(pet),
            "pct_gm": pct(gm),
            "pct_pet": pct(pet),
            "r_cn": corr(0),
            "r_ad": corr(1),
            "sd_ratio_gm": sd_gm[y == 1].mean(0) / sd_gm[y == 0].mean(0),
            "sd_ratio_pet": sd_pet[y == 1].mean(0) / sd_pet[y == 0].mean(0),
        }
    )
    return table, {"n_cn": int((y == 0).sum()), "n_ad": int((y == 1).sum())}


def _region_sd(vector, layout) -> np.ndarray:
    """Within-region SD of a compact vector, relative to the region mean."""
    off = layout.offsets
    out = np.empty(len(off) - 1)
    for r in range(len(off) - 1):
        v = vector[off[r] : off[r + 1]]
        out[r] = v.std() / max(abs(v.mean()), 1e-6)
    return out


def main(argv=None) -> int:
    from bids_siamfuse.synth import generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n-per-group", type=int, default=60)
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--families", nargs="+", default=["ad", "coupling", "nonlinear", "none"])
    parser.add_argument("--groups", nargs="+", default=["CN", "AD"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--maps", action="store_true", help="also write the MNI maps")
    parser.add_argument("--keep", action="store_true", help="keep the cohorts")
    args = parser.parse_args(argv)
    pd.set_option("display.width", 140)
    for family in args.families:
        root = args.out / family
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.time()
        generate(
            root,
            n_per_group=args.n_per_group,
            groups=tuple(args.groups),
            seed=args.seed,
            two_session_fraction=0.0,
            preprocessed=True,
            raw=False,
            jobs=args.jobs,
            effect=family,
            regions_only=not args.maps,
        )
        elapsed = time.time() - t0
        table, counts = region_summary(root)
        n = args.n_per_group * len(args.groups)
        print(f"\n== {family}: {n} subjects generated in {elapsed:.0f} s ({counts})")
        cols = [
            "d_gm",
            "d_pet",
            "pct_gm",
            "pct_pet",
            "r_cn",
            "r_ad",
            "sd_ratio_gm",
            "sd_ratio_pet",
        ]
        summary = table.groupby("planted")[cols].agg(["mean", "min", "max"]).T.round(2)
        print(summary.unstack(level=1).to_string())
        core = table[table.planted].sort_values("d_gm")
        print(core[["name", *cols]].round(2).to_string(index=False))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
