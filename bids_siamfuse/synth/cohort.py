"""The cohort: planning the subjects, generating them (in parallel) and the dataset files."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np

from .. import __version__
from ..bids import atomic_path, ensure_dataset_description, save_json
from ..errors import CannotWriteError, UsageError
from . import effects
from .effect_cohort import make_subject as make_effect_subject
from .effect_cohort import write_truth_tables
from .head import (
    EFFECTS,
    MAX_ATROPHY,
    MAX_HYPOMETABOLISM,
    REGION_SD,
    STAGES,
    SubjectSpec,
    effect_weights,
    head_model,
)
from .subject import CohortOptions, make_subject


def plan_cohort(
    n_per_group: int,
    groups,
    seed: int,
    two_session_fraction: float,
    sessions: bool,
    effect_size: float,
) -> list[SubjectSpec]:
    rng = np.random.default_rng(seed)
    labels = [g for g in groups for _ in range(n_per_group)]
    order = rng.permutation(len(labels))
    n_two = int(round(two_session_fraction * len(labels))) if sessions else 0
    if sessions and two_session_fraction > 0 and len(labels) >= 2:
        n_two = max(n_two, 1)
    two = set(rng.choice(len(labels), size=n_two, replace=False).tolist()) if n_two else set()
    specs = []
    width = max(3, len(str(len(labels))))
    for i, j in enumerate(order):
        if sessions:
            ses = ["01", "02"] if i in two else ["01"]
        else:
            ses = [None]
        specs.append(
            SubjectSpec(
                index=i,
                label=f"{i + 1:0{width}d}",
                group=labels[j],
                sessions=ses,
                seed=seed,
                effect_size=effect_size,
            )
        )
    return specs


def _fork_worker_init():
    # A forked child must not enter the OpenMP pool the parent may already have started (GNU
    # OpenMP is not fork-safe: the child's first parallel region hangs). One thread each; the
    # pool supplies the parallelism.
    import torch

    torch.set_num_threads(1)


def _run_subject(args):
    spec, opts = args
    return subject_maker(opts)(spec, opts)


def generate(
    out: Path,
    *,
    n_per_group: int = 5,
    groups=("CN", "MCIs", "MCIc", "AD"),
    seed: int = 0,
    effect_size: float = 1.0,
    tracer: str = "FDG",
    pet_frames: int = 1,
    frame_duration: float = 300.0,
    two_session_fraction: float = 0.25,
    sessions: bool = True,
    preprocessed: bool = False,
    raw: bool = True,
    jobs: int = 1,
    effect: str | None = None,
    sites: int = 0,
    regions_only: bool = False,
) -> Path:
    """Write a synthetic cohort to ``out``; see the module docstring.

    ``effect`` (``ad``, ``coupling``, ``nonlinear``, ``none``) makes a realistic benchmark
    cohort (:mod:`bids_siamfuse.synth.effects`); ``sites`` > 1 adds site effects;
    ``regions_only`` writes the region files but not the MNI maps (``--preprocessed``).
    Without ``effect`` the original generator runs unchanged.
    """
    import pandas as pd

    unknown = sorted(set(groups) - set(STAGES))
    if unknown:
        raise UsageError(f"unknown group(s) {unknown}; choose from {list(STAGES)}")
    if n_per_group < 1:
        raise UsageError("--n-per-group must be 1 or more")
    out = Path(out).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotWriteError(f"cannot create {out}: {exc.strerror}") from None
    if not raw and not preprocessed:
        raise UsageError("--skip-raw writes only derivatives: add --preprocessed")
    settings = None
    if effect is not None:
        if effect not in effects.FAMILIES:
            choices = list(effects.FAMILIES)
            raise UsageError(f"unknown effect {effect!r}; choose from {choices}")
        if sites < 0:
            raise UsageError("--sites must be 0 or more")
        settings = effects.EffectSettings(effect, effect_size, sites, regions_only)
    opts = CohortOptions(
        out,
        seed,
        effect_size,
        tracer,
        pet_frames,
        frame_duration,
        sessions,
        preprocessed,
        raw,
        settings,
    )
    specs = plan_cohort(n_per_group, groups, seed, two_session_fraction, sessions, effect_size)
    if settings is None or raw:
        head_model()  # built once, shared with forked workers
    if settings is not None:
        effects.grid_model()
    if jobs > 1 and len(specs) > 1:
        # Longest first (a two-session subject takes about twice as long), so that the last
        # subjects to start are short ones and the workers finish together; each subject
        # depends only on its own seed, and the rows go back in plan order.
        order = sorted(range(len(specs)), key=lambda i: -len(specs[i].sessions))
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(jobs, len(specs)), initializer=_fork_worker_init) as pool:
            done = pool.map(_run_subject, [(specs[i], opts) for i in order], chunksize=1)
        rows = [None] * len(specs)
        for i, row in zip(order, done):
            rows[i] = row
    else:
        rows = [subject_maker(opts)(s, opts) for s in specs]

    if settings is not None:
        return _write_effect_cohort(out, rows, opts, groups, n_per_group)
    head = head_model()
    _write_dataset_files(out, rows, opts, head)
    truth = out / "derivatives" / "synth-truth"
    subjects = pd.DataFrame(
        [
            {k: r[k] for k in ("participant_id", "diagnosis", "severity", "atrophy_share")}
            for r in rows
        ]
    )
    subjects["effect_size"] = effect_size
    with atomic_path(truth / "subjects.tsv") as tmp:
        subjects.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    w_atr, w_hyp = effect_weights(head.aal_names)
    regions = pd.DataFrame(
        {
            "index": np.arange(1, len(head.aal_names) + 1),
            "name": head.aal_names,
            "atrophy_weight": w_atr[1:],
            "hypometabolism_weight": w_hyp[1:],
        }
    )
    with atomic_path(truth / "regions.tsv") as tmp:
        regions.to_csv(tmp, sep="\t", index=False)
    factors = pd.DataFrame(
        [
            {
                "participant_id": r["participant_id"],
                "index": i + 1,
                "gm_factor": g,
                "pet_factor": p,
            }
            for r in rows
            for i, (g, p) in enumerate(zip(r["gm_factor"], r["pet_factor"]))
        ]
    )
    with atomic_path(truth / "region_factors.tsv") as tmp:
        factors.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    parameters = {
        "stages": STAGES,
        "max_atrophy": MAX_ATROPHY,
        "max_hypometabolism": MAX_HYPOMETABOLISM,
        "region_sd": REGION_SD,
        "effects": {k: list(v) for k, v in EFFECTS.items()},
    }
    return _write_cohort_description(out, opts, groups, n_per_group, parameters)


def _write_effect_cohort(out: Path, rows, opts: CohortOptions, groups, n_per_group) -> Path:
    """Dataset files and truth tables of an ``--effect`` cohort."""
    import pandas as pd

    settings = opts.effect
    _write_dataset_files(out, rows, opts, None)
    truth = out / "derivatives" / "synth-truth"
    columns = (
        "participant_id",
        "diagnosis",
        "stage",
        "severity",
        "atrophy_share",
        "site",
        "head_scale",
        "warp_max_mm",
        "warp_min_jacobian",
    )
    subjects = pd.DataFrame([{k: r[k] for k in columns} for r in rows])
    subjects["effect_size"] = opts.effect_size
    subjects["effect_family"] = settings.family
    with atomic_path(truth / "subjects.tsv") as tmp:
        subjects.to_csv(tmp, sep="\t", index=False, float_format="%.6g", na_rep="n/a")
    names = effects.grid_model().names
    write_truth_tables(out, rows, settings, names, opts.seed)
    return _write_cohort_description(
        out, opts, groups, n_per_group, effects.cohort_parameters(settings)
    )


def _write_cohort_description(out: Path, opts: CohortOptions, groups, n_per_group, parameters):
    """The truth's dataset_description.json and cohort.json (the settings of the run, then the
    generator's ``parameters``), and with ``--preprocessed`` the derivatives' description."""
    truth = out / "derivatives" / "synth-truth"
    save_json(
        truth / "dataset_description.json",
        {
            "Name": "bids_siamfuse synthetic ground truth",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "bids_siamfuse-synth", "Version": __version__}],
        },
    )
    save_json(
        truth / "cohort.json",
        {
            "seed": opts.seed,
            "effect_size": opts.effect_size,
            "groups": list(groups),
            "n_per_group": n_per_group,
            "tracer": opts.tracer,
            "pet_frames": opts.pet_frames,
            "frame_duration": opts.frame_duration,
            **parameters,
        },
    )
    if opts.preprocessed:
        ensure_dataset_description(out / "derivatives" / "bids_siamfuse", out)
    return out


def _write_dataset_files(out: Path, rows, opts: CohortOptions, head) -> None:
    import pandas as pd

    save_json(
        out / "dataset_description.json",
        {
            "Name": "bids_siamfuse synthetic FDG-PET/T1w cohort",
            "BIDSVersion": "1.10.0",
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["bids_siamfuse-synth"],
            "GeneratedBy": [
                {
                    "Name": "bids_siamfuse-synth",
                    "Version": __version__,
                    "Description": f"seed {opts.seed}, effect size {opts.effect_size}",
                }
            ],
        },
    )
    with atomic_path(out / "README") as tmp:
        tmp.write_text(
            "Synthetic T1w + FDG-PET cohort written by bids_siamfuse-synth "
            f"(version {__version__}, seed {opts.seed}, effect size {opts.effect_size}).\n"
            "Built from the ICBM152 2009a templates and the AAL atlas; the ground truth is in "
            "derivatives/synth-truth. Not real data.\n"
        )
    columns = ["participant_id", "diagnosis", "age", "sex", "MMSE"]
    if opts.effect is not None and opts.effect.sites > 1:
        columns.append("site")
    table = pd.DataFrame([{k: r[k] for k in columns} for r in rows])
    with atomic_path(out / "participants.tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    save_json(
        out / "participants.json",
        {
            "diagnosis": {
                "Description": "clinical group",
                "Levels": {
                    "CN": "cognitively normal",
                    "MCIs": "stable mild cognitive impairment",
                    "MCIc": "MCI converting to AD",
                    "AD": "Alzheimer's disease",
                },
            },
            "age": {"Description": "age at the first session", "Units": "year"},
            "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
            "MMSE": {"Description": "Mini-Mental State Examination score", "Units": "points"},
            **(
                {"site": {"Description": "acquisition site (synthetic site effects)"}}
                if "site" in columns
                else {}
            ),
        },
    )
    for r in rows:
        if len(r["sessions"]) > 1:
            label = r["participant_id"]
            sessions = pd.DataFrame(
                [
                    {"session_id": f"ses-{s['session']}", "acq_time": s["acq_time"]}
                    for s in r["sessions"]
                ]
            )
            with atomic_path(out / label / f"{label}_sessions.tsv") as tmp:
                sessions.to_csv(tmp, sep="\t", index=False)


def subject_maker(opts: CohortOptions):
    """The subject generator of this cohort: the realistic ``--effect`` one or the original."""
    return make_effect_subject if opts.effect is not None else make_subject
