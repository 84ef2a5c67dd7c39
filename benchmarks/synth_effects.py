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

import pandas as pd


def main(argv=None) -> int:
    from bids_siamfuse.synth import generate
    from bids_siamfuse.synth.effect_cohort import region_summary

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
