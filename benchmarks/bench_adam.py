"""Adam on the siamese bank's parameters (CUDA): torch's fused Adam against the Triton Adam of
``bids_siamfuse/model/optim.py`` with float32 and with bfloat16 moments (issue 16).

Parameters shaped like the bank's (``SiameseArch().shapes(116)``: the default network on the
116 AAL regions, 125 M float32 values, 122 M of them in ``fc1.weight``) and random gradients.
Each optimizer is timed eagerly and as a replayed CUDA graph of its step (as
``model/graphed.py`` runs training), with CUDA events around every step, after warm-up; the
median of ``--steps`` steps is printed with its ratio against torch's fused Adam measured in the
same run (eager against eager, graph against graph), and the memory traffic it implies (28
bytes per parameter with float32 moments, 20 with bfloat16). Then the accuracy: the largest
difference of the parameters after ``--check-steps`` steps against torch's fused Adam (float32
moments: float32 rounding, ~1e-7 relative; bfloat16 moments for information).

Example::

    python benchmarks/bench_adam.py            # on a CUDA machine with Triton
    python benchmarks/bench_adam.py --regions 16 --steps 20   # smaller, quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bids_siamfuse.model.optim import TritonAdam  # noqa: E402
from bids_siamfuse.model.siamese import PARAM_NAMES, SiameseArch  # noqa: E402

BYTES = {"float32": 28, "bfloat16": 20}  # per parameter and step (see optim.py)


def make_params(shapes, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, device=device, generator=g).mul_(0.03) for s in shapes]


def make_opt(kind: str, params, lr: float, capturable: bool):
    if kind == "torch fused":
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)
    return TritonAdam(params, lr=lr, moments=kind.split()[-1])


def time_steps(run, n: int) -> float:
    """Median ms of ``run()`` over ``n`` calls, each between two CUDA events."""
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(kind: str, init, grads, args, graph: bool) -> float:
    params = [p.clone().requires_grad_() for p in init]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt = make_opt(kind, params, args.lr, capturable=graph)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the Triton kernels) off the capture
        for _ in range(args.warmup):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if not graph:
        ms = time_steps(opt.step, args.steps)
    else:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            opt.step()
        for _ in range(args.warmup):
            g.replay()
        ms = time_steps(g.replay, args.steps)
    del opt, params
    torch.cuda.empty_cache()
    return ms


def trajectory(kind: str, init, steps: int, lr: float):
    params = [p.clone().requires_grad_() for p in init]
    opt = make_opt(kind, params, lr, capturable=False)
    gen = torch.Generator(device=init[0].device).manual_seed(99)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device=p.device, generator=gen)
        opt.step()
    return [p.detach() for p in params]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regions", type=int, default=116)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--check-steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_adam.py needs CUDA")
    dev = torch.device("cuda")
    shapes = SiameseArch().shapes(args.regions)
    shapes = [shapes[n] for n in PARAM_NAMES]
    init = make_params(shapes, dev)
    n = sum(p.numel() for p in init)
    g = torch.Generator(device=dev).manual_seed(1)
    grads = [torch.randn(p.shape, device=dev, generator=g) for p in init]
    print(f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}")
    print(f"{len(init)} tensors, {n / 1e6:.1f} M parameters; median of {args.steps} steps")

    kinds = ("torch fused", "triton float32", "triton bfloat16")
    res = {}
    for graph in (False, True):
        for kind in kinds:
            res[(kind, graph)] = bench(kind, init, grads, args, graph)
    print(f"{'optimizer':<18}{'mode':<7}{'ms/step':>9}{'vs torch':>10}{'GB/s':>8}")
    rows = []
    for graph in (False, True):
        base = res[("torch fused", graph)]
        for kind in kinds:
            ms = res[(kind, graph)]
            bytes_ = BYTES["bfloat16" if "bfloat16" in kind else "float32"] * n
            mode = "graph" if graph else "eager"
            print(f"{kind:<18}{mode:<7}{ms:>9.3f}{base / ms:>9.2f}x{bytes_ / ms / 1e6:>8.0f}")
            rows.append({"optimizer": kind, "mode": mode, "ms": ms, "speedup": base / ms})

    ref = trajectory("torch fused", init, args.check_steps, args.lr)
    checks = {}
    for kind in kinds[1:]:
        out = trajectory(kind, init, args.check_steps, args.lr)
        diff = max(float((a - b).abs().max()) for a, b in zip(out, ref, strict=True))
        scale = max(float(b.abs().max()) for b in ref)
        moved = max(float((b - p).abs().max()) for b, p in zip(ref, init, strict=True))
        checks[kind] = {"max_abs_diff": diff, "relative": diff / scale, "of_update": diff / moved}
        print(
            f"{kind} vs torch fused after {args.check_steps} steps: max |diff| {diff:.3g} "
            f"({diff / scale:.3g} of max |p|, {diff / moved:.3g} of the largest change)"
        )
    if args.json:
        args.json.write_text(json.dumps({"timing": rows, "accuracy": checks}, indent=2))


if __name__ == "__main__":
    main()
