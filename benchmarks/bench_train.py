"""Siamese training: the batched engine against the per-region loop, same data and weights.

Prints, for the engine (:class:`~bids_siamfuse.model.siamese.SiameseBank`, through the same
``train_siamese`` that :func:`~bids_siamfuse.model.train.fit` runs) and the reference loop
(:class:`~bids_siamfuse.model.siamese.LoopSiamese`: 116 ``RegionNet`` modules, one after the
other, on box crops precomputed on the device so that only the networks are timed):

* the largest relative difference of their outputs for the same weights (the check comes first);
* subject-epochs/s: (training-part + validation-part subjects) x epochs / seconds, with a
  training part of 80 % of the subjects in batches of ``--batch-size`` and the per-epoch
  validation forward pass, as in ``fit``; early stopping is off;
* the engine / loop ratio, both measured in this run;
* with ``--compare-determinism`` (CUDA): the engine with the deterministic fused kernels (the
  default: fixed-order reductions, torch's deterministic mode) and with the opt-in atomic-add
  path, interleaved (det, atomic, det, atomic) in the same run, each inside the numerics
  context that ``fit`` uses; the reproducibility of each (two trainings from the same weights,
  max |difference| of the final weights) and, with ``--profile``, the kernels of a step of each;
* with ``--fit-folds K``: ``fit()`` itself, end to end (standardization, siamese training,
  embedding, attention), ``--epochs`` epochs with early stopping off, on K folds of a
  ``--subjects`` cohort (each fold trains on (folds - 1) / folds of it); the CV estimate is
  ``folds`` x the mean fold time.

Data: random region values (``--subjects`` subjects; the speed does not depend on the values)
on a layout read from the atlas (needs nilearn) or from ``--layout`` (an .npz written by
``--save-layout``, for machines without nilearn).

Examples::

    # CPU, sloppy geometry (what the tests and quick looks use)
    python benchmarks/bench_train.py --device cpu --sloppy --subjects 10 --epochs 1 \
        --loop-epochs 1
    # GPU (the numbers in docs/benchmarks.md)
    python benchmarks/bench_train.py --device cuda --layout .bench/layout.npz --subjects 250 \
        --epochs 5 --fit-folds 5 --fit-epochs 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bids_siamfuse.model.data import RegionDataset, RegionLayout  # noqa: E402
from bids_siamfuse.model.geometry import RegionGrid, coarsen  # noqa: E402
from bids_siamfuse.model.losses import siamese_loss  # noqa: E402
from bids_siamfuse.model.numerics import _tf32  # noqa: E402
from bids_siamfuse.model.options import TrainConfig, architecture  # noqa: E402
from bids_siamfuse.model.siamese import SiameseBank, extend  # noqa: E402
from bids_siamfuse.model.siamese_stage import train_siamese  # noqa: E402
from bids_siamfuse.model.train import fit  # noqa: E402


def load_layout(path: str | None) -> RegionLayout:
    if path:
        with np.load(path, allow_pickle=False) as f:
            return RegionLayout.from_arrays(f)
    from bids_siamfuse.preproc.regions import atlas_layout

    return atlas_layout()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(n: int, n_voxels: int, device, dtype, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    xm = extend(torch.randn(n, n_voxels, generator=g)).to(device, dtype)
    xp = extend(torch.randn(n, n_voxels, generator=g)).to(device, dtype)
    t = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(device)
    return xm, xp, t


def check_equal(bank: SiameseBank, grid: RegionGrid, device, dtype) -> float:
    """Max |engine - loop| / max |loop| over 4 random subjects, same weights."""
    loop = bank.to_loop()
    g = torch.Generator().manual_seed(123)
    x = torch.randn(4, grid.n_voxels, generator=g)
    crops = [
        torch.as_tensor(grid.to_box(x.numpy(), r)).unsqueeze(1).to(device)
        for r in range(grid.n_regions)
    ]
    with torch.no_grad():
        out = bank(extend(x).to(device, dtype), dtype).float()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            ref = loop(crops).float()
    return float((out - ref).abs().max() / ref.abs().max())


def check_grads(bank: SiameseBank, grid: RegionGrid, device, dtype) -> dict:
    """Fused vs portable engine, same weights and data: outputs and gradients (rel. error),
    and both against float32 on the portable path."""
    g = torch.Generator().manual_seed(7)
    x = extend(torch.randn(6, grid.n_voxels, generator=g)).to(device)
    out = {}
    ref = None
    for label, fused, dt in (
        ("fp32 portable", False, torch.float32),
        ("bf16 portable", False, dtype),
        ("bf16 fused", True, dtype),
    ):
        bank.fused = fused
        for p in bank.parameters():
            p.grad = None
        y = bank(x.to(dt), dt).float()
        w = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
        (y * w).sum().backward()
        grads = {n: bank.param(n).grad.float().clone() for n in ("conv1.weight", "conv2.weight")}
        if ref is None:
            ref = (y, grads)
            continue
        errs = {"out": float((y - ref[0]).norm() / ref[0].norm())}
        for n, gr in grads.items():
            errs[n] = float((gr - ref[1][n]).norm() / ref[1][n].norm())
        out[label] = errs
        print(f"  {label} vs fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    bank.fused = None
    for p in bank.parameters():
        p.grad = None
    return out


def time_engine(bank, xm, xp, t, n_tr, n_va, epochs, batch, dtype, graphs, device):
    cfg = TrainConfig(epochs=epochs, batch_size=batch, early_stop_loss=-1.0, patience=10**9)
    idx = np.arange(n_tr + n_va)
    hist: list = []
    gen = torch.Generator().manual_seed(0)
    # warm-up epoch (allocator, cuBLAS handles, graph capture), then the timed epochs
    warm = TrainConfig(epochs=1, batch_size=batch, early_stop_loss=-1.0, patience=10**9)
    train_siamese(bank, xm, xp, t, idx[:n_tr], idx[n_tr:], warm, dtype, gen, [], 64, graphs)
    sync(device)
    t0 = time.perf_counter()
    train_siamese(bank, xm, xp, t, idx[:n_tr], idx[n_tr:], cfg, dtype, gen, hist, 64, graphs)
    sync(device)
    return (n_tr + n_va) * epochs / (time.perf_counter() - t0)


def time_loop(bank, grid, xm, xp, t, n_tr, n_va, epochs, batch, dtype, device, lr=1e-3):
    """The reference loop trained like the engine (same batches, Adam, loss, validation)."""
    loop = bank.to_loop()
    n = n_tr + n_va
    crops_m, crops_p = [], []
    for r in range(grid.n_regions):  # box crops of every subject, on the device, untimed
        idx = torch.as_tensor(grid.local_index[grid.offsets[r] : grid.offsets[r + 1]])
        shape = tuple(int(s) for s in grid.shapes[r])
        for src, dst in ((xm, crops_m), (xp, crops_p)):
            box = torch.zeros(n, int(np.prod(shape)), device=device, dtype=dtype)
            box[:, idx.to(device)] = src[:, grid.offsets[r] : grid.offsets[r + 1]]
            dst.append(box.view(n, 1, *shape))
    if device.type == "cuda":
        opt = torch.optim.Adam(loop.parameters(), lr=lr, fused=True)
    else:
        opt = torch.optim.Adam(loop.parameters(), lr=lr, foreach=True)
    amp = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    gen = torch.Generator().manual_seed(0)

    def epoch():
        perm = torch.randperm(n_tr, generator=gen).to(device)
        for start in range(0, n_tr, batch):
            idx = perm[start : start + batch]
            b = idx.numel()
            with torch.autocast(**amp):
                out = loop([torch.cat([cm[idx], cp[idx]]) for cm, cp in zip(crops_m, crops_p)])
            losses = siamese_loss(out[:, :b], out[:, b:], t[idx])
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
        with torch.no_grad(), torch.autocast(**amp):
            va = torch.arange(n_tr, n, device=device)
            out = loop([torch.cat([cm[va], cp[va]]) for cm, cp in zip(crops_m, crops_p)])
            float(siamese_loss(out[:, :n_va], out[:, n_va:], t[va]).mean())

    epoch()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    sync(device)
    return n * epochs / (time.perf_counter() - t0)


def profile_step(bank, xm, xp, t, batch, dtype, device):
    """Top kernels of eager training steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from bids_siamfuse.model.siamese_stage import SiameseStep

    step = SiameseStep(bank, xm, xp, t, dtype, 1e-3, batch, graphs=False)
    idx = torch.arange(batch, device=device)
    for _ in range(2):
        step(idx)
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True, with_stack=True) as prof:
        for _ in range(3):
            step(idx)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
    # where the elementwise copies/casts come from: the ops with their shapes and the
    # project's source lines that issued them (issue 16: 29 copy kernels per step)
    print("copies and casts by input shape:")
    rows = [
        e
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key in ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")
    ]
    rows.sort(key=lambda e: -getattr(e, "device_time_total", 0.0))
    for e in rows[:20]:
        print(f"  {e.key:16s} {getattr(e, 'device_time_total', 0.0) / 3:9.1f} us/step "
              f"x{e.count // 3:<4d} {str(e.input_shapes)[:110]}")  # fmt: skip
    print("copies by source line:")
    rows = [e for e in prof.key_averages(group_by_stack_n=6) if e.key == "aten::copy_"]
    rows.sort(key=lambda e: -getattr(e, "device_time_total", 0.0))
    for e in rows[:12]:
        stack = [f for f in e.stack if "bids_siamfuse" in f or "torch/optim" in f][:3]
        print(f"  {getattr(e, 'device_time_total', 0.0) / 3:9.1f} us/step x{e.count // 3:<4d} "
              f"{' <- '.join(stack) or '(no project frame)'}")  # fmt: skip


def compare_determinism(grid, arch, xm, xp, t, n_tr, n_va, args, dtype, device) -> dict:
    """Deterministic (default) vs atomic fused kernels: speed, interleaved, and whether two
    trainings of each from the same weights end in the same bits."""
    rates: dict = {True: [], False: []}
    diffs = {}
    for det in (True, False, True, False):
        bank = SiameseBank(grid, arch, generator=torch.Generator().manual_seed(0)).to(device)
        bank.deterministic = det
        with _tf32(True, det):
            rate = time_engine(
                bank, xm, xp, t, n_tr, n_va, args.epochs, args.batch_size, dtype, True, device
            )
        rates[det].append(rate)
        state = {n: p.detach().clone() for n, p in bank.params.items()}
        if det in diffs:
            continue
        # reproducibility: the same training again from the same initial weights
        other = SiameseBank(grid, arch, generator=torch.Generator().manual_seed(0)).to(device)
        other.deterministic = det
        with _tf32(True, det):
            time_engine(
                other, xm, xp, t, n_tr, n_va, args.epochs, args.batch_size, dtype, True, device
            )
        diffs[det] = max(
            float((p.detach() - state[n]).abs().max()) for n, p in other.params.items()
        )
        del other
        if args.profile:
            print(f"  profile, {'deterministic' if det else 'atomic'} kernels:", flush=True)
            with _tf32(True, det):
                profile_step(bank, xm, xp, t, args.batch_size, dtype, device)
        del bank
        torch.cuda.empty_cache()
    det_rate, fast_rate = float(np.mean(rates[True])), float(np.mean(rates[False]))
    out = {
        "deterministic_subject_epochs_per_s": rates[True],
        "atomic_subject_epochs_per_s": rates[False],
        "cost": 1 - det_rate / fast_rate,
        "max_weight_difference_between_two_trainings": {
            "deterministic": diffs[True],
            "atomic": diffs[False],
        },
    }
    print(
        f"deterministic kernels: {det_rate:.1f} subject-epochs/s ({rates[True]}), atomic: "
        f"{fast_rate:.1f} ({rates[False]}); cost of determinism {100 * out['cost']:.1f} %; "
        f"two trainings differ by {diffs[True]:.3g} (deterministic) / {diffs[False]:.3g} "
        "(atomic) in the final weights",
        flush=True,
    )
    return out


def sweep_batches(grid, arch, xm, xp, t, n_tr, n_va, args, dtype, graphs, device) -> dict:
    """Engine speed per batch size: fresh weights, interleaved (all sizes, then again), inside
    the numerics context of ``fit`` (deterministic kernels); ratios against the first size."""
    rates: dict = {b: [] for b in args.batch_sizes}
    for _ in range(2):
        for b in args.batch_sizes:
            bank = SiameseBank(grid, arch, generator=torch.Generator().manual_seed(0)).to(device)
            with _tf32(device.type == "cuda", True):
                rate = time_engine(
                    bank, xm, xp, t, n_tr, n_va, args.epochs, b, dtype, graphs, device
                )
            rates[b].append(rate)
            del bank
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = float(np.mean(rates[args.batch_sizes[0]]))
    for b, r in rates.items():
        print(
            f"  batch {b}: {np.mean(r):.1f} subject-epochs/s ({', '.join(f'{x:.0f}' for x in r)})"
            f", {np.mean(r) / base:.2f}x batch {args.batch_sizes[0]}",
            flush=True,
        )
    return {str(b): r for b, r in rates.items()}


class PhaseTimer:
    """Wall time per phase of ``fit``/``predict_proba``: wraps the named functions of
    :mod:`bids_siamfuse.model.train` (and the standardizer) with timers that synchronize the
    device, so each phase's GPU work is counted in it (nested phases count in both)."""

    NAMES = ("train_siamese", "train_attention", "_embed", "_new_bank")

    def __init__(self, device):
        from bids_siamfuse.model import data as data_mod
        from bids_siamfuse.model import train as train_mod

        self.device, self.totals, self.saved = device, {}, []
        targets = [(train_mod, n) for n in self.NAMES if hasattr(train_mod, n)]
        std = data_mod.Standardizer
        targets += [(std, n) for n in ("fit", "transform", "fit_tensors") if hasattr(std, n)]
        if hasattr(train_mod, "_Inputs"):
            targets.append((train_mod._Inputs, "tensors"))
        for owner, name in targets:
            self._wrap(owner, name)

    def _wrap(self, owner, name):
        fn = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}".split(".", 1)[-1]
        label = label.replace("bids_siamfuse.model.", "")

        def timed(*a, **k):
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(self.device)
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - t0

        self.saved.append((owner, name, fn))
        setattr(owner, name, timed)

    def restore(self):
        for owner, name, fn in reversed(self.saved):
            setattr(owner, name, fn)


def time_fit(layout, n, folds, n_folds_run, epochs, sloppy, device, seed=0):
    rng = np.random.default_rng(seed)
    v = layout.n_voxels
    labels = np.arange(n) % 2
    effect = np.zeros(v, dtype=np.float32)
    effect[: v // 10] = 0.5  # a planted difference, so the attention stage has work to do
    data = RegionDataset(
        gm=(rng.standard_normal((n, v), dtype=np.float32) - labels[:, None] * effect),
        pet=(rng.standard_normal((n, v), dtype=np.float32) - labels[:, None] * effect),
        labels=labels,
        classes=("CN", "AD"),
        subjects=np.array([f"s{i:03d}" for i in range(n)]),
        sessions=np.array([""] * n),
        layout=layout,
    )
    fold_of = np.arange(n) % folds
    times, accs = [], []
    phases = PhaseTimer(device)
    for k in range(n_folds_run):
        tr, te = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        cfg = TrainConfig(
            epochs=epochs,
            early_stop_loss=-1.0,
            patience=10**9,
            sloppy=sloppy,
            device=str(device),
            seed=k,
        )
        sync(device)
        t0 = time.perf_counter()
        model = fit(data.subset(tr), cfg)
        prob = model.predict_proba(data.subset(te))
        sync(device)
        times.append(time.perf_counter() - t0)
        accs.append(float((prob.argmax(1) == labels[te]).mean()))
        info = {k: v for k, v in model.info.items() if not k.startswith("siamese_")}
        info["siamese_seconds"] = model.info.get("siamese_seconds")
        print(f"  fit fold {k}: {times[-1]:.1f} s ({info}) acc {accs[-1]:.2f}", flush=True)
        print(
            "    phases (s, synchronized): "
            + ", ".join(f"{n} {v:.2f}" for n, v in sorted(phases.totals.items())),
            flush=True,
        )
        phases.totals.clear()
    phases.restore()
    return times, accs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layout", help="layout .npz (default: the AAL atlas via nilearn)")
    ap.add_argument("--save-layout", help="write the atlas layout to this .npz and stop")
    ap.add_argument("--subjects", type=int, default=250, help="subjects of one training fold")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="also time the engine at these batch sizes (fresh weights each, interleaved, "
        "twice, inside fit()'s deterministic numerics context); the first is the baseline",
    )
    ap.add_argument("--epochs", type=int, default=3, help="timed engine epochs")
    ap.add_argument("--loop-epochs", type=int, default=1, help="timed loop epochs")
    ap.add_argument("--sloppy", action="store_true", help="sloppy geometry (2x coarser, pool 2)")
    ap.add_argument("--fp32", action="store_true", help="float32 on CUDA too (default bf16)")
    ap.add_argument("--variants", action="store_true", help="also time engine variants")
    ap.add_argument("--profile", action="store_true", help="print the kernels of a step")
    ap.add_argument(
        "--compare-determinism",
        action="store_true",
        help="time deterministic vs atomic fused kernels (CUDA), interleaved",
    )
    ap.add_argument("--skip-loop", action="store_true", help="do not time the reference loop")
    ap.add_argument("--fit-folds", type=int, default=0, help="time fit() on this many folds")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fit-subjects", type=int, default=250)
    ap.add_argument("--fit-epochs", type=int, default=200)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    if args.save_layout:
        layout = load_layout(None)
        np.savez_compressed(args.save_layout, **layout.to_arrays())
        print(f"wrote {args.save_layout}")
        return 0

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}", flush=True)
    if hasattr(os, "getloadavg"):
        print(f"load average: {os.getloadavg()}", flush=True)

    layout = load_layout(args.layout)
    arch = architecture(args.sloppy)
    grid, _ = coarsen(RegionGrid.from_layout(layout), arch.downsample)
    n = args.subjects
    n_va = max(1, int(round(0.2 * n)))
    n_tr = n - n_va
    results = {
        "device": name,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "subjects": n,
        "batch_size": args.batch_size,
        "sloppy": args.sloppy,
        "regions": grid.n_regions,
        "voxels": grid.n_voxels,
    }

    bank = SiameseBank(grid, arch, generator=torch.Generator().manual_seed(0)).to(device)
    t1, p1, t2, p2 = bank.geometry.padded_rows()
    print(
        f"geometry: {len(bank.geometry.buckets)} buckets, layer-1 rows {t1} (padded {p1}), "
        f"layer-2 rows {t2} (padded {p2})",
        flush=True,
    )
    err = check_equal(bank, grid, device, dtype)
    print(f"engine vs loop, same weights: max rel. difference {err:.2e}", flush=True)
    results["max_rel_difference"] = err
    if device.type == "cuda":
        results["fused"] = bank.use_fused(torch.zeros(1, device=device, dtype=dtype), dtype)
        print(f"fused Triton kernels: {results['fused']}", flush=True)
        results["grad_check"] = check_grads(bank, grid, device, dtype)

    xm, xp, t = make_data(n, grid.n_voxels, device, dtype, seed=1)
    graphs = device.type == "cuda"
    eng = time_engine(
        bank, xm, xp, t, n_tr, n_va, args.epochs, args.batch_size, dtype, graphs, device
    )
    print(f"engine: {eng:.1f} subject-epochs/s", flush=True)
    results["engine_subject_epochs_per_s"] = eng

    if args.variants and device.type == "cuda":
        variants = {
            "portable engine (bucketed bmm, no Triton)": dict(fused=False),
            "portable engine, no CUDA graph": dict(fused=False, graphs=False),
            "fused, no CUDA graph": dict(graphs=False),
        }
        results["variants"] = {}
        for label, kw in variants.items():
            g = kw.pop("graphs", True)
            try:
                vb = SiameseBank(grid, arch, **kw).to(device)
                rate = time_engine(
                    vb, xm, xp, t, n_tr, n_va, args.epochs, args.batch_size, dtype, g, device
                )
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"  variant {label}: failed ({exc})", flush=True)
                continue
            print(f"  variant {label}: {rate:.1f} subject-epochs/s", flush=True)
            results["variants"][label] = rate
            del vb
            torch.cuda.empty_cache()

    if args.batch_sizes:
        results["batch_sizes"] = sweep_batches(
            grid, arch, xm, xp, t, n_tr, n_va, args, dtype, graphs, device
        )

    if args.compare_determinism and device.type == "cuda":
        results["determinism"] = compare_determinism(
            grid, arch, xm, xp, t, n_tr, n_va, args, dtype, device
        )

    if args.profile:
        profile_step(bank, xm, xp, t, args.batch_size, dtype, device)

    if not args.skip_loop:
        loop_n_tr = n_tr if device.type == "cuda" else min(n_tr, 8)
        loop_n_va = n_va if device.type == "cuda" else min(n_va, 2)
        lp = time_loop(
            bank, grid, xm, xp, t, loop_n_tr, loop_n_va, args.loop_epochs, args.batch_size,
            dtype, device,
        )  # fmt: skip
        print(f"loop: {lp:.1f} subject-epochs/s", flush=True)
        print(f"engine / loop: {eng / lp:.1f}x", flush=True)
        results["loop_subject_epochs_per_s"] = lp
        results["ratio"] = eng / lp
    del xm, xp
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if args.fit_folds:
        times, accs = time_fit(
            layout,
            args.fit_subjects,
            args.folds,
            args.fit_folds,
            args.fit_epochs,
            args.sloppy,
            device,
        )
        est = args.folds * float(np.mean(times))
        print(
            f"fit(): {args.fit_subjects} subjects, {args.folds}-fold, {args.fit_epochs} epochs: "
            f"{np.mean(times):.1f} s per fold -> CV {est:.0f} s ({est / 60:.1f} min)",
            flush=True,
        )
        results.update(fit_seconds=times, fit_acc=accs, cv_estimate_seconds=est)

    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
