"""Whole fits on the expanded seed cohort: where a fit's time goes, and bitwise A/B checks.

Subcommands (the seed file comes from ``bench_group.py seed``; CUDA unless ``--device``):

``phases``
    ``fit()`` as a cross-validation task runs it (default settings, ablations on) on folds
    0..K-1 of a 5-fold split of the 250-subject expanded cohort; per fold the wall time, the
    siamese stage's epochs and seconds, the attention stage's seconds, the regions' kept epochs
    (quantiles) and the phases timed with device syncs (``bench_train.PhaseTimer``). The first
    fold of a process includes Triton compilation and graph capture.
``save``
    the same fits; writes the held-out probabilities of the model and of every ablation, the
    regions' kept epochs and the history's losses to an .npz. ``--no-skip`` disables
    ``SiameseBank.set_active`` (every region computed until the fit ends): two files, one
    with and one without, compare equal when skipping stopped regions changes nothing.
    ``--no-row-adam`` (either subcommand): torch's Adam over every region inside the graph
    instead of ``siamese_stage._RowAdam``.
``grads``
    one bfloat16 forward/backward of the bank on the AAL grid (32 random subjects, fused
    kernels); writes the output and the 8 parameter gradients to a .pt file: run it with two
    trees (old and new kernels) and ``compare`` the files.
``compare A B``
    array by array: identical, or the largest absolute difference.

Examples (the numbers in docs/benchmarks.md, fifth session)::

    python benchmarks/bench_fits.py phases .bench/seed.npz --folds-run 3
    python benchmarks/bench_fits.py save .bench/seed.npz skip.npz
    python benchmarks/bench_fits.py save .bench/seed.npz noskip.npz --no-skip
    python benchmarks/bench_fits.py compare skip.npz noskip.npz
    python benchmarks/bench_fits.py grads .bench/layout.npz new.pt   # per tree
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_group import expand_seed  # noqa: E402
from bench_train import PhaseTimer, architecture, load_layout, make_data  # noqa: E402


def _fits(args, record=None):
    from bids_siamfuse.model.options import TrainConfig
    from bids_siamfuse.model.train import fit

    device = torch.device(args.device)
    data = expand_seed(Path(args.seed_file), 125, 21)
    fold = np.arange(len(data)) % 5
    phases = PhaseTimer(device) if record is None else None
    for k in range(args.folds_run):
        tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model = fit(data.subset(tr), TrainConfig(device=str(device), ablations=True, seed=k))
        prob = model.predict_proba(data.subset(te))
        ablations = model.predict_ablations(data.subset(te))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        stop = np.asarray(model.info["siamese_stop_epochs"])
        epochs = sum(1 for h in model.history if h["stage"] == "siamese")
        print(
            f"fold {k}: {wall:.2f} s; siamese {model.info['siamese_seconds']} s over {epochs} "
            f"epochs; attention {model.info['attention_seconds']} s; kept epochs (10/50/90/100 "
            f"%) {np.percentile(stop, [10, 50, 90, 100]).tolist()}",
            flush=True,
        )
        if phases is not None:
            print(
                "   phases (s): "
                + ", ".join(f"{a} {b:.2f}" for a, b in sorted(phases.totals.items())),
                flush=True,
            )
            phases.totals.clear()
        if record is not None:
            record[f"prob{k}"] = prob
            record[f"stop{k}"] = stop
            record[f"history{k}"] = np.array(
                [[h["epoch"], h["train_loss"], h["val_loss"]] for h in model.history]
            )
            for name, value in ablations.items():
                record[f"ablation{k}_{name}"] = np.asarray(value)
    if phases is not None:
        phases.restore()


def cmd_grads(args) -> int:
    from bids_siamfuse.model.geometry import RegionGrid, coarsen
    from bids_siamfuse.model.siamese import PARAM_NAMES, SiameseBank

    grid, _ = coarsen(RegionGrid.from_layout(load_layout(args.layout)), 1)
    bank = SiameseBank(grid, architecture(False), generator=torch.Generator().manual_seed(0))
    bank = bank.to(args.device)
    xm, xp, _ = make_data(32, grid.n_voxels, args.device, torch.bfloat16, 5)
    y = bank(torch.cat([xm, xp]), torch.bfloat16)
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    (y.float() * weights).sum().backward()
    out = {"y": y.detach().cpu()}
    out.update({n: bank.param(n).grad.cpu() for n in PARAM_NAMES})
    torch.save(out, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_compare(args) -> int:
    def load(path):
        if str(path).endswith(".pt"):
            return {k: v.float().numpy() for k, v in torch.load(path).items()}
        return dict(np.load(path))

    a, b = load(args.a), load(args.b)
    same = True
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            print(f"{key}: only in {'A' if key in a else 'B'}")
            same = False
        elif np.array_equal(a[key], b[key]):
            print(f"{key}: identical")
        else:
            diff = np.abs(a[key].astype(float) - b[key].astype(float)).max()
            print(f"{key}: max |difference| {diff:.3g}")
            same = False
    print("all identical" if same else "DIFFERENT")
    return 0 if same else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("phases", "save"):
        p = sub.add_parser(name)
        p.add_argument("seed_file")
        if name == "save":
            p.add_argument("out")
            p.add_argument("--no-skip", action="store_true", help="compute stopped regions")
        p.add_argument("--folds-run", type=int, default=3)
        p.add_argument("--device", default="cuda")
        p.add_argument(
            "--no-row-adam",
            action="store_true",
            help="torch's Adam over every region inside the graph (siamese_stage.ROW_ADAM)",
        )
    p = sub.add_parser("grads")
    p.add_argument("layout")
    p.add_argument("out")
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("compare")
    p.add_argument("a")
    p.add_argument("b")
    args = ap.parse_args(argv)
    if getattr(args, "no_row_adam", False):
        from bids_siamfuse.model import siamese_stage

        siamese_stage.ROW_ADAM = False
    if args.command == "phases":
        _fits(args)
        return 0
    if args.command == "save":
        if args.no_skip:
            from bids_siamfuse.model.siamese import SiameseBank

            SiameseBank.set_active = lambda self, mask: None
        record: dict = {}
        _fits(args, record)
        np.savez(args.out, **record)
        print(f"wrote {args.out}")
        return 0
    return {"grads": cmd_grads, "compare": cmd_compare}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
