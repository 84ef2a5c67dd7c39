"""Command-line parser (BIDS-Apps conventions, fMRIPrep/PETPrep flag names).

The parser only parses: it turns ``argv`` into a :class:`~bids_siamfuse.config.Settings`
(defaults, then ``--config-file``, then the flags given). Checks that need the file system
(does the dataset exist, can the output be written) happen in :mod:`bids_siamfuse.cli.run`.

Flags are grouped by what they control; each group has its own ``_add_*`` function so a new
capability adds its flags in one place. Argument types (labels, numbers, memory) and the
``flag``/``switch`` helpers live in :mod:`.argtypes`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__
from ..config import Settings, load_toml
from ..errors import EXIT_USAGE, NoInputError
from .argtypes import (
    bids_label,
    flag,
    fraction,
    load_bids_filters,
    memory_mb,
    nonnegative_int,
    positive_float,
    positive_int,
    switch,
)

LEVELS = ("participant", "group")


class _Parser(argparse.ArgumentParser):
    """argparse with the BIDS-Apps usage exit code (64) and a one-line message."""

    def error(self, message):  # noqa: D401 - argparse API
        sys.stderr.write(f"bids_siamfuse: error: {message} (see bids_siamfuse --help)\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bids_siamfuse",
        description=(
            "Fuse T1w MRI and FDG-PET with region-wise siamese networks and an attention "
            "module (Arco et al.). 'participant' preprocesses each subject/session (and applies "
            "a trained model with --model); 'group' trains and cross-validates the model on the "
            "participant derivatives found in OUTPUT_DIR."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("bids_dir", type=Path, help="the root of the BIDS dataset")
    parser.add_argument(
        "output_dir",
        type=Path,
        help="where derivatives are written (e.g. BIDS_DIR/derivatives/bids_siamfuse)",
    )
    parser.add_argument(
        "analysis_level", metavar="{participant,group}", help="the processing stage to run"
    )
    parser.add_argument("--version", action="version", version=f"bids_siamfuse {__version__}")
    _add_selection_args(parser)
    _add_performance_args(parser)
    _add_subset_args(parser)
    _add_workflow_args(parser)
    _add_model_args(parser)
    _add_qc_args(parser)
    _add_other_args(parser)
    _add_nipreps_args(parser)
    return parser


def _add_selection_args(parser):
    g = parser.add_argument_group("Options for filtering BIDS queries")
    flag(
        g,
        "--participant-label",
        nargs="+",
        type=bids_label("sub"),
        metavar="LABEL",
        help="subjects to process, with or without 'sub-' (default: all)",
    )
    flag(
        g,
        "--session-label",
        nargs="+",
        type=bids_label("ses"),
        metavar="LABEL",
        help="sessions to process, with or without 'ses-' (default: all)",
    )
    flag(
        g,
        "--tracer-label",
        type=bids_label("trc"),
        metavar="LABEL",
        help="the PET tracer entity to use (trc-<label>); default FDG",
    )
    flag(
        g,
        "--bids-filter-file",
        type=Path,
        metavar="FILE",
        help='JSON of extra pybids filters per query, e.g. {"t1w": {"acquisition": "mprage"}, '
        '"pet": {"reconstruction": "acdyn"}}',
    )
    g.add_argument(
        "--label-column",
        dest="label_column",
        metavar="COLUMN",
        help="participants.tsv column holding the diagnosis (default: diagnosis)",
    )
    g.add_argument(
        "--pairing",
        choices=("nearest", "same-session"),
        help="which T1w goes with a PET: 'same-session' only, or 'nearest' (the same session "
        "when it has one, else the T1w of the nearest session in time; default)",
    )
    switch(
        g,
        "--skip-bids-validation",
        help="do not run the BIDS validator on the input (by default it checks the top-level "
        "files and the selected participants only)",
    )
    flag(
        g,
        "--bids-database-dir",
        type=Path,
        metavar="DIR",
        help="reuse the pybids index saved in DIR, or save it there (share one across the "
        "tasks of a SLURM array instead of indexing the dataset in each)",
    )


def _add_performance_args(parser):
    g = parser.add_argument_group("Options to handle performance")
    g.add_argument(
        "--nprocs",
        "--nthreads",
        "--n-cpus",
        "--n_cpus",
        dest="nprocs",
        type=positive_int,
        help="processes the workflow engine may run at once (default: all CPUs)",
    )
    flag(
        g,
        "--omp-nthreads",
        type=positive_int,
        help="threads per process for ANTs/ITK and torch (default: min(8, nprocs))",
    )
    flag(
        g,
        "--mem-mb",
        "--mem",
        type=memory_mb,
        metavar="MB",
        help="memory the workflow engine may plan for: a number is megabytes (MB), or give "
        "the unit: 16000, 16000MB, 16GB (at least 2048 MB; default: 90%% of the machine's)",
    )
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="where the model trains and predicts (registration always runs on the CPU); auto "
        "picks cuda when available",
    )
    g.add_argument(
        "--gpus",
        type=nonnegative_int,
        help="at most this many GPUs for group training (0: all visible)",
    )
    flag(
        g,
        "--workers-per-gpu",
        type=positive_int,
        help="group training on GPUs: worker processes sharing each GPU (default: 1; 4 filled "
        "an H200's idle time between fits, 1.27x faster)",
    )
    flag(
        g,
        "--cpu-workers",
        type=positive_int,
        help="group training with --device cpu: worker processes sharing the folds (default: "
        "1), each with --omp-nthreads threads (default: the CPUs shared out)",
    )


def _add_subset_args(parser):
    g = parser.add_argument_group("Options for performing only a subset of the workflow")
    switch(
        g,
        "--boilerplate-only",
        help="write the methods text (OUTPUT_DIR/logs/CITATION.md) of the workflow the flags "
        "describe, then exit without processing anything",
    )
    switch(
        g,
        "--reports-only",
        help="rebuild the reports from existing derivatives, computing nothing",
    )
    switch(
        g,
        "--dry-run",
        help="print what would be processed (and what is skipped, and why), then exit",
    )


def _add_workflow_args(parser):
    g = parser.add_argument_group("Workflow configuration")
    g.add_argument(
        "--backend",
        choices=("ants", "spm"),
        help="registration/segmentation engine: ants (antspyx, default) or spm "
        "(SPM12 standalone + MATLAB Runtime)",
    )
    flag(
        g,
        "--spm-cmd",
        metavar="CMD",
        help="command that runs SPM12 standalone (default: from SPMSTANDALONE_HOME/MCR_HOME)",
    )
    flag(
        g,
        "--pet-ref-region",
        choices=("none", "cerebellum"),
        help="'none': the paper's normalization (mean of the top 0.1%% voxels); 'cerebellum': "
        "SUVR to AAL cerebellar grey matter",
    )
    g.add_argument(
        "--sloppy",
        action="store_true",
        help="fast, low-accuracy settings for tests and quick looks (never for analysis)",
    )
    g.add_argument(
        "--model",
        type=Path,
        metavar="BUNDLE",
        help="participant level: apply this trained model bundle to every processed session",
    )
    switch(
        g,
        "--model-only",
        help="with --model: skip preprocessing and apply the bundle to the region files "
        "already in OUTPUT_DIR",
    )
    g.add_argument(
        "-d",
        "--derivatives",
        dest="derivatives",
        action="extend",
        nargs="+",
        metavar="NAME=PATH",
        help="bring your own preprocessing: read MNI-space modulated GM and PET maps from "
        "these BIDS derivatives or Clinica CAPS folders instead of computing them (repeatable; "
        "see docs/preprocessing.md)",
    )


def _add_model_args(parser):
    g = parser.add_argument_group("Group-level model")
    g.add_argument(
        "--classes",
        nargs="+",
        metavar="LABEL",
        help="diagnoses to classify, first is the reference (default: CN AD)",
    )
    g.add_argument("--folds", type=positive_int, help="cross-validation folds (default: 5)")
    g.add_argument("--repeats", type=positive_int, help="repetitions of the whole CV (default: 1)")
    g.add_argument("--epochs", type=positive_int, help="maximum training epochs (default: 200)")
    g.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=positive_int, help="batch size"
    )
    flag(
        g,
        "--learning-rate",
        type=positive_float,
        help="Adam learning rate",
    )
    flag(
        g,
        "--val-fraction",
        type=fraction,
        help="share of each training fold held out for early stopping",
    )
    flag(
        g,
        "--early-stop-loss",
        type=positive_float,
        help="stop training once the validation loss falls below this (default: 0.01)",
    )
    g.add_argument(
        "--patience",
        type=positive_int,
        help="stop training after this many epochs without improvement (default: 20)",
    )
    flag(
        g,
        "--permutation-tests",
        type=nonnegative_int,
        help="reruns of the first repeat's CV with shuffled labels, for a p-value (default: 0)",
    )
    switch(
        g,
        "--nondeterministic-gpu",
        help="GPU training with atomic-add reductions instead of the default fixed-order ones: "
        "no longer bit-reproducible between runs or GPU counts (measured speed gain on an H200: "
        "none to 5 %%; see docs/benchmarks.md)",
    )
    # model variants and ablations
    g.add_argument(
        "--fusion",
        dest="fusion",
        choices=["similarity", "paper"],
        help="attention-stage input: the region embeddings only, as in the paper (paper, "
        "default), or plus the per-region MRI-PET similarity (similarity)",
    )
    g.add_argument(
        "--gate",
        dest="gate",
        choices=["paired", "constant", "se", "none"],
        help="when a siamese epoch may replace the untrained network: paired one-sided test "
        "over validation subjects (paired, default), the same and also against the best "
        "constant similarity (constant), 2 SE below the untrained loss (se), any improvement "
        "(none)",
    )
    flag(
        g,
        "--no-ablations",
        dest="ablations",
        action="store_false",
        help="skip the ablations (similarity only, untrained networks, MRI/PET only, other "
        "fusion) trained beside the model in every CV fold",
    )


def _add_qc_args(parser):
    # separate function so the model-argument group above stays as it was
    g = parser.add_argument_group("Quality control")
    switch(
        g,
        "--include-flagged",
        help="group level: keep sessions flagged by participant quality control (left out by "
        "default; the report counts them)",
    )


def _add_other_args(parser):
    g = parser.add_argument_group("Other options")
    flag(
        g,
        "-w",
        "--work-dir",
        type=Path,
        help="nipype working directory (default: ./work in the current folder, or a "
        "bids_siamfuse_work folder under the temporary folder when the current one is not "
        "writable; measured about 130 MB per PET/T1w pair with --sloppy, see README); reuse "
        "it to resume an interrupted run, remove it afterwards or pass --clean-workdir",
    )
    flag(
        g,
        "--config-file",
        type=Path,
        metavar="FILE",
        help="TOML settings (as written to OUTPUT_DIR/logs); flags given here win",
    )
    g.add_argument(
        "--stop-on-first-crash",
        dest="stop_on_first_crash",
        action="store_true",
        help="stop at the first failing subject instead of finishing the others",
    )
    g.add_argument("--random-seed", dest="random_seed", type=int, help="seed for everything")
    g.add_argument(
        "-v",
        "--verbose",
        dest="verbose_count",
        action="count",
        help="more messages (-vv: debug)",
    )
    g.add_argument(
        "-q", "--quiet", dest="quiet", action="store_true", help="only warnings and errors"
    )


def _add_nipreps_args(parser):
    """Flags NiPreps users (fMRIPrep/PETPrep) and their scripts pass, in fMRIPrep's groups."""
    groups = {g.title: g for g in parser._action_groups}
    g = groups["Other options"]
    g.add_argument(
        "--notrack",
        dest="notrack",
        action="store_true",
        help="accepted for NiPreps scripts and ignored: bids_siamfuse never sends usage data",
    )
    switch(
        g,
        "--clean-workdir",
        help="after a successful run (exit 0), remove what this run put in the work directory "
        "(and the directory itself when it is then empty); kept after a failure, to resume",
    )
    switch(
        groups["Options to handle performance"],
        "--low-mem",
        help="participant level: run at most one memory-heavy step (registration, "
        "segmentation) at a time, the light ones still in parallel; lowers the peak memory, "
        "lengthens the run",
    )
    switch(
        g,
        "--write-graph",
        help="write the participant workflow graph to OUTPUT_DIR/logs/workflow-<run>.dot "
        "(Graphviz; also .svg when the dot program is installed)",
    )
    switch(
        g,
        "--resource-monitor",
        help="record each step's run time, CPU and memory to "
        "OUTPUT_DIR/logs/resources-<run>.jsonl (nipype's resource monitor)",
    )


def parse_args(argv: list[str] | None = None) -> Settings:
    """Parse ``argv`` into Settings; exits 64 on a usage error (0 for --help/--version)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    file_values = {}
    config_file = args.pop("config_file", None)
    if config_file is not None:
        if not config_file.exists():
            raise NoInputError(f"--config-file {config_file}: no such file")
        file_values = load_toml(config_file)
    filter_file = args.pop("bids_filter_file", None)
    if filter_file is not None:
        args["bids_filters"] = load_bids_filters(filter_file)
    verbose = args.pop("verbose_count", 0)
    quiet = args.pop("quiet", False)
    if verbose or quiet:
        args["verbosity"] = -1 if quiet else verbose
    label = f"--config-file {config_file}" if config_file is not None else "the config file"
    return Settings.from_sources(file_values, args, file_label=label)
