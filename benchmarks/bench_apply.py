"""Applying a trained bundle: per-subject latency, batched, GPU and CPU, float32 vs float16 bundle.

Trains one model (``fit``, ``--epochs`` epochs with early stopping) on 80 % of a cohort expanded
from ``bench_group.py seed`` (or a ``RegionDataset.save()`` file), writes it as a bundle twice
(float32 and float16 weights, :func:`bids_siamfuse.model.bundle.save_bundle`), loads both and
times ``FittedModel.predict_proba`` on the held-out 20 % (repeated to ``--subjects`` subjects):

* per-subject latency (ms) at each ``--batches`` size, on the GPU with the inputs standardized on
  the device (the current path) and, as the baseline measured in the same run, on the host
  (``DEVICE_INPUTS = False``: the previous path, NumPy standardization then a copy);
* on the CPU with ``--cpu-threads`` threads (the "2 CPU cores" of the issue), batch 1 and 8,
  with the portable engine's samples-last inference layout (current) and its training layout
  (the baseline, same run);
* agreement: the largest |probability difference| between the float16 and the float32 bundle
  (the acceptance: 1e-3), on each device, and between the GPU and the CPU.

Example (the device tool; docs/benchmarks.md)::

    python3 benchmarks/bench_apply.py --seed-file .bench/seed.npz --n-per-group 60 \\
        --device cuda --json OUT/apply.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _inputs_module():
    """The module holding ``_Inputs`` (numerics.py; train.py before issue 15's split)."""
    import importlib

    for name in ("bids_siamfuse.model.numerics", "bids_siamfuse.model.train"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "_Inputs"):
            return mod
    raise ImportError("no _Inputs")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def latency(model, data, batch: int, repeat: int) -> float:
    """ms per subject of ``predict_proba`` over ``data`` in batches of ``batch``."""
    n = len(data)
    parts = [data.subset(np.arange(s, min(n, s + batch))) for s in range(0, n, batch)]
    model.predict_proba(parts[0])  # warm-up (kernels, caches)
    sync(model.device)
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for part in parts:
            model.predict_proba(part)
        sync(model.device)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed-file")
    ap.add_argument("--cohort")
    ap.add_argument("--n-per-group", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--subjects", type=int, default=128, help="subjects timed per setting")
    ap.add_argument("--cpu-threads", type=int, default=2)
    ap.add_argument("--cpu-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--cpu-subjects", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sloppy", action="store_true", help="sloppy model (quick CPU checks)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from bench_group import expand_seed

    from bids_siamfuse.model import bundle as bundles
    from bids_siamfuse.model.data import RegionDataset
    from bids_siamfuse.model.train import TrainConfig, fit

    data = (
        RegionDataset.load(args.cohort)
        if args.cohort
        else expand_seed(Path(args.seed_file), args.n_per_group, 21)
    )
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data))
    n_tr = int(0.8 * len(data))
    train, test = data.subset(order[:n_tr]), data.subset(order[n_tr:])
    t0 = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, device=args.device, seed=1, sloppy=args.sloppy)
    model = fit(train, config)
    print(f"fit: {len(train)} subjects, {time.perf_counter() - t0:.1f} s", flush=True)
    tensors, meta = model.state()
    results: dict = {"device": args.device, "torch": torch.__version__}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    loaded = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dt in ("float32", "float16"):
            folder = Path(tmp) / dt
            bundles.save_bundle(
                folder,
                tensors=tensors,
                model_meta=meta,
                layout=data.layout,
                classes=data.classes,
                standardization=model.standardizer.to_dict(),
                weights_dtype=dt,
            )
            size = (folder / bundles.WEIGHTS_NAME).stat().st_size / 1e6
            loaded[dt] = bundles.load_bundle(folder)
            results[f"bundle_mb_{dt}"] = size
            print(f"bundle {dt}: {size:.0f} MB", flush=True)
    reps = -(-args.subjects // len(test))
    timed = test.subset(np.tile(np.arange(len(test)), reps)[: args.subjects])
    inputs_mod = _inputs_module()
    probs = {}
    rows = []
    if args.device == "cuda":
        for dt in ("float32", "float16"):
            m = loaded[dt].model("cuda")
            probs[("cuda", dt)] = m.predict_proba(test)
            for path in ("device", "host"):
                if path == "host" and not hasattr(inputs_mod, "DEVICE_INPUTS"):
                    continue
                if hasattr(inputs_mod, "DEVICE_INPUTS"):
                    inputs_mod.DEVICE_INPUTS = path == "device"
                for b in args.batches:
                    ms = latency(m, timed, b, args.repeat)
                    rows.append({"device": "cuda", "bundle": dt, "inputs": path, "batch": b,
                                 "ms_per_subject": ms})  # fmt: skip
                    print(f"  cuda {dt} inputs on {path}: batch {b}: {ms:.2f} ms/subject",
                          flush=True)  # fmt: skip
            if hasattr(inputs_mod, "DEVICE_INPUTS"):
                inputs_mod.DEVICE_INPUTS = True
            del m
            torch.cuda.empty_cache()
    torch.set_num_threads(args.cpu_threads)
    cpu_set = test.subset(np.arange(min(len(test), args.cpu_subjects)))
    from bids_siamfuse.model import siamese

    for dt in ("float32", "float16"):
        m = loaded[dt].model("cpu")
        probs[("cpu", dt)] = m.predict_proba(test)
        # the portable engine's samples-last inference layout (current) and, as the baseline
        # measured in the same run, its training layout (INFERENCE_LAYOUT = False)
        for layout in ("samples-last", "training"):
            siamese.INFERENCE_LAYOUT = layout == "samples-last"
            if layout == "training":
                probs[("cpu training layout", dt)] = m.predict_proba(test)
            for b in args.cpu_batches:
                ms = latency(m, cpu_set, b, 1)
                rows.append({"device": f"cpu ({args.cpu_threads} threads)", "bundle": dt,
                             "inputs": "host", "layout": layout, "batch": b,
                             "ms_per_subject": ms})  # fmt: skip
                print(f"  cpu ({args.cpu_threads} threads) {dt} {layout} layout: batch {b}: "
                      f"{ms:.1f} ms/subject", flush=True)  # fmt: skip
        siamese.INFERENCE_LAYOUT = True
        del m
    agree = {}
    for dev in ("cuda", "cpu"):
        if (dev, "float16") in probs:
            agree[f"{dev}: float16 vs float32"] = float(
                np.abs(probs[(dev, "float16")] - probs[(dev, "float32")]).max()
            )
    agree["cpu float32: samples-last vs training layout"] = float(
        np.abs(probs[("cpu", "float32")] - probs[("cpu training layout", "float32")]).max()
    )
    if ("cuda", "float32") in probs:
        agree["float32: cuda vs cpu"] = float(
            np.abs(probs[("cuda", "float32")] - probs[("cpu", "float32")]).max()
        )
    for k, v in agree.items():
        print(f"max |probability difference| {k}: {v:.2e} ({len(test)} subjects)", flush=True)
    results.update(rows=rows, agreement=agree, test_subjects=len(test))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
