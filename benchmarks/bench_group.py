"""Group-level benchmark: the whole group run, and its scaling over worker processes / GPUs.

Three sub-commands::

    # 1. the whole CLI group run on a synthetic cohort (this machine; CPU by default):
    #    generates the cohort (bids_siamfuse-synth --preprocessed --skip-raw) unless present,
    #    then times `bids_siamfuse DS DS/derivatives/bids_siamfuse group ...` once per
    #    worker count; the first count is the baseline of the ratios.
    python benchmarks/bench_group.py cli --n-per-group 16 --folds 4 --sloppy --workers 1 2

    # 2. a small "seed" file for machines without nibabel/nilearn (the GPU machine): the AAL
    #    layout, one synthetic control's GM and PET region vectors and the planted regions.
    python benchmarks/bench_group.py seed .bench/seed.npz

    # 3. the cross-validation alone (torch/numpy/scikit-learn only), on a cohort expanded from
    #    the seed file (or a RegionDataset.save() file), once per number of devices:
    python benchmarks/bench_group.py cv --seed-file .bench/seed.npz --n-per-group 125 \\
        --folds 5 --device cuda --workers 1 2 4

``--workers N`` means N worker processes: N GPUs (``--gpus N``) with ``--device cuda``, N CPU
processes (``--cpu-workers N``) with ``--device cpu``; ``--share-gpu`` puts several worker
processes on one GPU when fewer are visible. ``--out-dir DIR`` writes each row's
``predictions.tsv`` and ``metrics.tsv`` under ``DIR/workers<N>/`` and prints their SHA-256
digests, to compare runs; ``--nondeterministic-gpu`` trains with the opt-in atomic-add kernels.
Every row reports the wall time, the speed-up against the first row (measured in the same
run), the scaling efficiency ``T(first) * first / (T(N) * N)``, the balanced accuracy, and
whether the predictions equal the first row's (the seeds do not depend on the number of
workers).

The expanded cohort mimics the synthetic generator at region level (per-region GM and uptake
factors with 7 % normal variation; atrophy and hypometabolism in the planted regions scaled by
a subject severity; 5 % voxel noise); it is for timing and scaling, not for accuracy claims.
Results go to ``docs/benchmarks.md`` (section "Group level") with the machine and ``uptime``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
    try:
        info["load"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
    except ImportError:  # pragma: no cover
        pass
    return info


def report(rows: list[dict]) -> None:
    base = rows[0]
    print(
        f"{'workers':>8}{'wall s':>10}{'speed-up':>10}{'efficiency':>12}{'bal.acc':>9}"
        f"{'same as first':>15}"
    )
    for r in rows:
        speed = base["wall_s"] / r["wall_s"]
        eff = speed * base["workers"] / r["workers"]
        r["speedup"], r["efficiency"] = speed, eff
        print(
            f"{r['workers']:>8}{r['wall_s']:>10.1f}{speed:>10.2f}{eff:>12.2f}"
            f"{r['balanced_accuracy']:>9.3f}{str(r.get('same_as_first', '-')):>15}"
        )


# ----------------------------------------------------------------------------------------------
# cli: the whole group run
# ----------------------------------------------------------------------------------------------


def cmd_cli(args) -> int:
    ds = Path(args.data or f"/tmp/bench_group_{args.n_per_group}x2_seed{args.seed}").absolute()
    if not (ds / "participants.tsv").is_file():
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bids_siamfuse.synth",
                str(ds),
                "--n-per-group",
                str(args.n_per_group),
                "--groups",
                "CN",
                "AD",
                "--seed",
                str(args.seed),
                "--effect-size",
                str(args.effect_size),
                "--two-session-fraction",
                "0.15",
                "--preprocessed",
                "--skip-raw",
                "-q",
            ],
            check=True,
        )
        print(f"cohort written to {ds} in {time.perf_counter() - t0:.0f} s")
    out = ds / "derivatives" / "bids_siamfuse"
    rows, first = [], None
    if args.previous_path:
        set_previous_path(True)
    for workers in args.workers:
        cmd = [
            sys.executable,
            "-m",
            "bids_siamfuse",
            str(ds),
            str(out),
            "group",
            "--classes",
            "CN",
            "AD",
            "--folds",
            str(args.folds),
            "--device",
            args.device,
            "-q",
        ]
        if args.sloppy:
            cmd.append("--sloppy")
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        if args.permutation_tests:
            cmd += ["--permutation-tests", str(args.permutation_tests)]
        if args.device == "cpu":
            cmd += ["--cpu-workers", str(workers)]
            if args.threads:
                cmd += ["--omp-nthreads", str(args.threads)]
        else:
            cmd += ["--gpus", str(workers)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        task = out / "group" / "CN_vs_AD"
        summary = json.loads((task / "summary.json").read_text())
        preds = (task / "predictions.tsv").read_text()
        row = {
            "workers": workers,
            "wall_s": wall,
            "balanced_accuracy": summary["metrics"]["siamese_attention"]["balanced_accuracy"][
                "mean"
            ],
            "timing": summary["timing_s"],
            "command": " ".join(cmd[2:]),
        }
        if first is None:
            first = preds
        else:
            row["same_as_first"] = preds == first
        rows.append(row)
        print(f"{workers} worker(s): {wall:.1f} s  ({row['command']})", flush=True)
    report(rows)
    result = {"mode": "cli", "machine": machine(), "args": vars(args), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------------------------
# seed: what the GPU machine needs to build a cohort without nibabel/nilearn
# ----------------------------------------------------------------------------------------------


def cmd_seed(args) -> int:
    import tempfile

    from bids_siamfuse.preproc.regions import atlas_layout, find_region_files
    from bids_siamfuse.synth import effect_weights, generate

    layout = atlas_layout()
    with tempfile.TemporaryDirectory() as tmp:
        ds = generate(
            Path(tmp) / "ds",
            n_per_group=1,
            groups=("CN",),
            seed=0,
            effect_size=0.0,
            sessions=False,
            preprocessed=True,
            raw=False,
        )
        region_file = find_region_files(ds / "derivatives" / "bids_siamfuse")[0]
        with np.load(region_file) as f:
            gm, pet = f["gm"], f["pet"]
    atrophy, hypo = effect_weights(layout.names)
    Path(args.path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.path,
        gm=gm.astype(np.float32),
        pet=pet.astype(np.float32),
        atrophy=atrophy[1:],
        hypometabolism=hypo[1:],
        **{**layout.to_arrays(), "layout_local_index": layout.local_index.astype(np.int32)},
    )
    print(f"wrote {args.path} ({Path(args.path).stat().st_size / 1e6:.1f} MB)")
    return 0


def expand_seed(path: Path, n_per_group: int, seed: int, effect_size: float = 1.5):
    """A CN/AD RegionDataset at region level from a seed file (see the module docstring)."""
    from bids_siamfuse.model.data import RegionDataset, RegionLayout

    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    layout = RegionLayout.from_arrays(
        {**arrays, "layout_local_index": arrays["layout_local_index"].astype(np.int64)}
    )
    counts = np.diff(layout.offsets)
    n = 2 * n_per_group
    rng = np.random.default_rng(seed)
    gm = np.empty((n, layout.n_voxels), np.float32)
    pet = np.empty((n, layout.n_voxels), np.float32)
    labels = np.repeat([0, 1], n_per_group)
    rng.shuffle(labels)
    for i in range(n):
        severity = labels[i] * float(np.clip(rng.normal(1.0, 0.4), 0.1, 2.0))
        share = rng.uniform(0.2, 0.8)
        jitter = np.clip(rng.normal(1.0, 0.25, (2, layout.n_regions)), 0, 2)
        g = rng.normal(1, 0.07, layout.n_regions) * (
            1 - effect_size * 0.3 * severity * 2 * share * arrays["atrophy"] * jitter[0]
        )
        p = rng.normal(1, 0.07, layout.n_regions) * (
            1
            - effect_size * 0.3 * severity * 2 * (1 - share) * arrays["hypometabolism"] * jitter[1]
        )
        noise = rng.normal(1, 0.05, (2, layout.n_voxels)).astype(np.float32)
        gm[i] = arrays["gm"] * np.repeat(np.clip(g, 0.2, 1.3), counts) * noise[0]
        pet[i] = arrays["pet"] * np.repeat(np.clip(p, 0.2, 1.3), counts) * noise[1]
    return RegionDataset(
        gm=gm,
        pet=pet,
        labels=labels,
        classes=("CN", "AD"),
        subjects=np.array([f"{i + 1:03d}" for i in range(n)]),
        sessions=np.array([""] * n),
        layout=layout,
    )


def write_tables(res, folder: Path) -> dict:
    """``predictions.tsv`` and ``metrics.tsv`` of a CV (the group level's columns, floats
    written exactly with ``repr``); returns their SHA-256 digests (first 16 hex digits)."""
    import csv
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, rows in (("predictions", res.predictions), ("metrics", res.metrics)):
        path = folder / f"{name}.tsv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in r.items()}
                             for r in rows)  # fmt: skip
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return digests


def set_previous_path(previous: bool) -> dict:
    """Issue 16's switches back to the previous path (host standardization, baselines after
    the model tasks) or forward; returns what was switched. Processes spawned later (workers)
    import the modules afresh and take the defaults (the current path)."""
    import importlib

    done = {}
    for module, name in (
        ("bids_siamfuse.model.numerics", "DEVICE_INPUTS"),
        ("bids_siamfuse.model.train", "DEVICE_INPUTS"),
        ("bids_siamfuse.model.cv", "PARALLEL_BASELINES"),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, name):
            setattr(mod, name, not previous)
            done[f"{module}.{name}"] = not previous
    print(f"switches: {done}", flush=True)
    return done


def cmd_cv(args) -> int:
    from bids_siamfuse.model import cv
    from bids_siamfuse.model.data import RegionDataset
    from bids_siamfuse.model.options import TrainConfig
    from bids_siamfuse.model.workers import default_threads, resolve_devices

    t0 = time.perf_counter()
    if args.cohort:
        data = RegionDataset.load(args.cohort)
    else:
        data = expand_seed(Path(args.seed_file), args.n_per_group, args.seed)
    print(f"cohort: {len(data)} sessions, built in {time.perf_counter() - t0:.1f} s", flush=True)
    train_kwargs = {"sloppy": args.sloppy}
    if args.nondeterministic_gpu:
        train_kwargs["deterministic"] = False
    if args.epochs:
        train_kwargs["epochs"] = args.epochs
    if args.batch_size:
        train_kwargs["batch_size"] = args.batch_size
    rows, first = [], None
    if args.previous_path:
        set_previous_path(True)
    for workers in args.workers:
        if args.device == "cpu":
            devices = ["cpu"] * workers
        else:
            devices = resolve_devices(args.device, gpus=workers)
            if len(devices) < workers and args.share_gpu:
                # N worker processes on fewer GPUs (round robin): the process-independence
                # check where a machine has one GPU
                devices = [devices[i % len(devices)] for i in range(workers)]
            elif len(devices) < workers:
                print(f"only {len(devices)} GPU(s) visible; skipping {workers}")
                continue
        done = []

        def progress(task, info, _done=done):
            if info is None:
                _done.append(task.describe())
                print(f"  {task.describe()} done ({len(_done)})", flush=True)

        t0 = time.perf_counter()
        res = cv.cross_validate(
            data,
            folds=args.folds,
            repeats=args.repeats,
            seed=42,
            permutations=args.permutation_tests,
            config=TrainConfig(**train_kwargs),
            devices=devices,
            threads=default_threads(devices, args.threads or 0),
            progress=progress,
            final_model=not args.no_final,
        )
        wall = time.perf_counter() - t0
        probs = np.array(
            [
                p["prob_AD"]
                for p in sorted(
                    (p for p in res.predictions if p["method"] == cv.MODEL_METHOD),
                    key=lambda p: p["participant_id"],
                )
            ]
        )
        row = {
            "per_task_s": res.timing["model_s"] / max(1, res.timing["tasks"]),
            "workers": workers,
            "devices": devices,
            "wall_s": wall,
            "model_s": res.timing["model_s"],
            "balanced_accuracy": res.mean_balanced_accuracy(),
            "tasks": res.timing["tasks"],
        }
        if first is None:
            first = probs
        else:
            row["max_prob_diff"] = float(np.abs(probs - first).max())
            row["same_as_first"] = bool(row["max_prob_diff"] == 0.0)
        if args.out_dir:
            row["sha256"] = write_tables(res, Path(args.out_dir) / f"workers{workers}")
        rows.append(row)
        print(f"{workers} worker(s): {wall:.1f} s {row.get('sha256', '')}", flush=True)
    report(rows)
    result = {"mode": "cv", "machine": machine(), "args": vars(args), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--n-per-group", type=int, default=16)
        p.add_argument("--folds", type=int, default=4)
        p.add_argument("--sloppy", action="store_true")
        p.add_argument("--epochs", type=int, default=0, help="0: the default (200; sloppy 30)")
        p.add_argument("--permutation-tests", type=int, default=0)
        p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        p.add_argument("--workers", type=int, nargs="+", default=[1])
        p.add_argument("--threads", type=int, default=0, help="threads per CPU worker")
        p.add_argument("--seed", type=int, default=21)
        p.add_argument("--out", help="write the results as JSON here")

    p = sub.add_parser("cli", help="time the whole CLI group run")
    common(p)
    p.add_argument("--data", help="cohort folder (default /tmp/bench_group_...)")
    p.add_argument("--effect-size", type=float, default=1.5)
    p.set_defaults(func=cmd_cli)
    p = sub.add_parser("seed", help="write the seed file for `cv` on a bare GPU machine")
    p.add_argument("path")
    p.set_defaults(func=cmd_seed)
    p = sub.add_parser("cv", help="time cross_validate alone over 1..N devices")
    common(p)
    p.add_argument("--seed-file", help="from `seed`")
    p.add_argument("--cohort", help="a RegionDataset.save() file instead of --seed-file")
    p.add_argument("--no-final", action="store_true", help="skip the final model")
    p.add_argument(
        "--share-gpu",
        action="store_true",
        help="with fewer GPUs than --workers: several worker processes per GPU",
    )
    p.add_argument(
        "--nondeterministic-gpu",
        action="store_true",
        help="train with the atomic-add fused kernels (TrainConfig(deterministic=False))",
    )
    p.add_argument("--out-dir", help="write predictions.tsv/metrics.tsv per row here")
    p.add_argument("--batch-size", type=int, default=0, help="0: TrainConfig's default")
    p.add_argument(
        "--previous-path",
        action="store_true",
        help="issue 16's baseline: standardize on the host, baselines after the model tasks "
        "(one process; with --batch-size 16 the path before issue 16)",
    )
    p.add_argument("--repeats", type=int, default=1, help="repeated CV (new fold draws)")
    p.set_defaults(func=cmd_cv)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
