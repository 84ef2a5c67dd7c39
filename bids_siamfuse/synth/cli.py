"""``bids_siamfuse-synth``: the command line of the generator."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ..errors import SiamFuseError, UsageError
from .cohort import generate
from .head import STAGES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bids_siamfuse-synth",
        description="Write a synthetic T1w + FDG-PET BIDS cohort with known ground truth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="folder to write the dataset into")
    parser.add_argument("--n-per-group", type=int, default=5, help="subjects per group")
    parser.add_argument(
        "--groups",
        nargs="+",
        default=["CN", "MCIs", "MCIc", "AD"],
        choices=list(STAGES),
        help="groups to simulate",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--effect-size",
        type=float,
        default=1.0,
        help="scales every disease effect (0: no group difference)",
    )
    parser.add_argument("--tracer", default="FDG", help="trc- label of the PET files")
    parser.add_argument(
        "--pet-frames", type=int, default=1, help="frames per PET (1: static 3-D image)"
    )
    parser.add_argument(
        "--frame-duration", type=float, default=300.0, help="seconds per frame of a dynamic PET"
    )
    parser.add_argument(
        "--two-session-fraction",
        type=float,
        default=0.25,
        help="share of subjects with a second session",
    )
    parser.add_argument(
        "--no-sessions", action="store_true", help="write a dataset without ses- folders"
    )
    parser.add_argument(
        "--preprocessed",
        action="store_true",
        help="also write the derivatives of a perfect participant run",
    )
    parser.add_argument(
        "--skip-raw",
        action="store_true",
        help="with --preprocessed: write participants.tsv and the derivatives "
        "but no raw images (fast; for group-level tests and benchmarks)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="subjects generated in parallel",
    )
    parser.add_argument(
        "--effect",
        choices=["ad", "coupling", "nonlinear", "none"],
        default=None,
        help="realistic benchmark cohort with this effect family (per-subject anatomy, PSF, "
        "noise, age/sex; see docs/benchmarks.md); without it the original generator runs",
    )
    parser.add_argument(
        "--sites",
        type=int,
        default=0,
        help="with --effect: number of sites with their own GM/PET scale, offset and PSF "
        "(0 or 1: none); the site goes to participants.tsv",
    )
    parser.add_argument(
        "--regions-only",
        action="store_true",
        help="with --effect --preprocessed: write the region files but not the MNI maps",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.pet_frames < 1:
        print("bids_siamfuse-synth: error: --pet-frames must be 1 or more", file=sys.stderr)
        return UsageError.exit_code
    # the flags are generate()'s keywords, but for the two negated ones
    options = {k: v for k, v in vars(args).items() if k not in ("out", "quiet")}
    options["sessions"] = not options.pop("no_sessions")
    options["raw"] = not options.pop("skip_raw")
    t0 = time.time()
    try:
        out = generate(args.out, **options)
    except SiamFuseError as exc:
        print(f"bids_siamfuse-synth: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not args.quiet:
        print(f"wrote {out} in {time.time() - t0:.1f} s")
    return 0
