"""The Triton Adam (``bids_siamfuse/model/optim.py``, issue 16): torch's Adam math with float32
moments, bfloat16 moments with deterministic stochastic rounding, and the ``adam_moments``
setting.

The kernel runs on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, a subprocess
as in ``tests/test_determinism.py``); the GPU tests (``-m gpu``) compare with torch's fused
Adam and check CUDA-graph capture.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bids_siamfuse.model.options import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _interpret(code: str) -> str:
    """Run ``code`` with the Triton interpreter on the CPU; returns its stdout (asserts "ok")."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------


def test_train_config_adam_moments():
    assert TrainConfig().adam_moments == "float32"
    assert TrainConfig(adam_moments="bfloat16").adam_moments == "bfloat16"
    with pytest.raises(ValueError, match="adam_moments"):
        TrainConfig(adam_moments="float16")


def test_cli_adam_moments_reaches_train_config():
    from bids_siamfuse.cli.parser import parse_args
    from bids_siamfuse.config import train_config

    settings = parse_args(["/d", "/o", "group", "--adam-moments", "bfloat16"])
    assert settings.model.adam_moments == "bfloat16"
    assert train_config(settings).adam_moments == "bfloat16"
    assert train_config(parse_args(["/d", "/o", "group"])).adam_moments == "float32"
    with pytest.raises(SystemExit):
        parse_args(["/d", "/o", "group", "--adam-moments", "float16"])
    # a config file can hold anything: the one validation of settings refuses it (exit 64)
    from bids_siamfuse.config import Settings
    from bids_siamfuse.errors import UsageError

    with pytest.raises(UsageError, match="adam_moments"):
        Settings.from_sources({"model": {"adam_moments": "float16"}}, {})


def test_methods_text_names_bfloat16_moments():
    from bids_siamfuse.reports.boilerplate import group_text

    base = {"classes": ["CN", "AD"], "cross_validation": {"folds": 5}}
    plain = group_text({**base, "training": {"adam_moments": "float32"}})
    assert "bfloat16" not in plain and plain == group_text({**base, "training": {}})
    assert "bfloat16" in group_text({**base, "training": {"adam_moments": "bfloat16"}})


def test_cpu_step_keeps_torch_adam():
    """On the CPU ``SiameseStep`` keeps torch's foreach Adam whatever the moments setting."""
    from bids_siamfuse.model.siamese_stage import make_optimizer

    p = [torch.zeros(3, requires_grad=True)]
    for moments in ("float32", "bfloat16"):
        opt = make_optimizer(p, 1e-3, torch.device("cpu"), graphs=False, moments=moments)
        assert type(opt) is torch.optim.Adam and opt.defaults["foreach"]


# ----------------------------------------------------------------------------------------------
# the kernel, in the Triton interpreter
# ----------------------------------------------------------------------------------------------


@needs_triton
def test_float32_moments_match_torch_adam():
    """5 steps on random parameters and gradients of shapes with a partial last block: the
    parameters and both moments equal torch.optim.Adam (foreach, CPU) to 1e-6 relative; CPU
    tensors and wrong parameters are refused with a ValueError."""
    _interpret(
        """
import torch
from bids_siamfuse.model.optim import BLOCK, TritonAdam
g = torch.Generator().manual_seed(0)
shapes = [(3, 7), (2, BLOCK + 5), (4, 1, 3, 3, 3)]
ps = [torch.randn(s, generator=g) for s in shapes]
a = [p.clone().requires_grad_() for p in ps]
b = [p.clone().requires_grad_() for p in ps]
oa, ob = TritonAdam(a, lr=1e-2), torch.optim.Adam(b, lr=1e-2, foreach=True)
for _ in range(5):
    for x, y in zip(a, b):
        x.grad = torch.randn(x.shape, generator=g)
        y.grad = x.grad.clone()
    oa.step()
    ob.step()
    oa.zero_grad(set_to_none=True)
    assert all(x.grad is None for x in a)
def rel(x, y):
    return float((x - y).abs().max() / y.abs().max())
for i, (x, y) in enumerate(zip(a, b)):
    m, v = oa.moments_of(i)
    st = ob.state[y]
    assert rel(x.detach(), y.detach()) < 1e-6, (i, rel(x.detach(), y.detach()))
    assert rel(m, st["exp_avg"]) < 1e-6, (i, rel(m, st["exp_avg"]))
    assert rel(v, st["exp_avg_sq"]) < 1e-6, (i, rel(v, st["exp_avg_sq"]))
    assert oa.step_count(i) == 5
for bad, what in (
    (torch.zeros(4, 4).t(), "contiguous"),
    (torch.zeros(4, dtype=torch.float64), "float32"),
):
    try:
        TritonAdam([bad.requires_grad_()])
    except ValueError as exc:
        assert what in str(exc), exc
    else:
        raise AssertionError(what)
try:
    TritonAdam([torch.zeros(2, requires_grad=True)], moments="float16")
except ValueError as exc:
    assert "moments" in str(exc)
else:
    raise AssertionError("moments")
print("ok")
"""
    )


@needs_triton
def test_bfloat16_moments_track_float32_and_are_deterministic():
    """600 steps with a constant gradient per element (1e-4 .. 1, both signs): the bfloat16
    moments (stochastic rounding) stay unbiased against the float32 ones and the parameters
    follow float32 Adam's trajectory; two runs give identical bits.

    The tolerances fail with round-to-nearest (checked by swapping the rounding in
    ``optim._round_bf16``): v then freezes once its per-step change (0.1 % x (g^2 - v) / v)
    falls under half a bfloat16 spacing, 41 % low on average after 600 steps (here: 0.0 %);
    m stops 2.5 % short of g (here: 0.0 %); the parameters' error is 6 % of their displacement
    on average (here: 0.6 %)."""
    _interpret(
        """
import torch
from bids_siamfuse.model.optim import TritonAdam
n = 2048
g = torch.Generator().manual_seed(3)
grad = torch.logspace(-4, 0, n) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
p0 = torch.randn(n, generator=g)
def run(moments, steps, seed=1):
    p = p0.clone().requires_grad_()
    opt = TritonAdam([p], lr=1e-3, moments=moments, seed=seed)
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    return (p.detach().clone(), *opt.moments_of(0)), opt
(pf, mf, vf), _ = run("float32", 600)
(pb, mb, vb), opt = run("bfloat16", 600)
assert opt._m[0].dtype == opt._v[0].dtype == torch.bfloat16
dv, dm = vb / vf - 1, mb / mf - 1
disp = (pf - p0).abs()
dp = (pb - pf).abs() / disp
print(f"v {float(dv.mean()):.4f} |v| {float(dv.abs().median()):.4f} m {float(dm.mean()):.4f} "
      f"p {float(dp.mean()):.4f}")
assert abs(float(dv.mean())) < 0.01  # round-to-nearest: -0.41
assert float(dv.abs().median()) < 0.05
assert abs(float(dm.mean())) < 0.005  # round-to-nearest: -0.025
assert float(dp.mean()) < 0.02  # round-to-nearest: 0.06
assert float(dp.max()) < 0.1
# determinism: the same seed gives the same bits, another seed other rounding
a, _ = run("bfloat16", 20)
b, _ = run("bfloat16", 20)
c, _ = run("bfloat16", 20, seed=2)
assert all(torch.equal(x, y) for x, y in zip(a, b))
assert not torch.equal(a[2], c[2])
print("ok")
"""
    )


@needs_triton
def test_stochastic_rounding_is_unbiased():
    """One step of bfloat16 moments on values half-way between bfloat16 neighbours: about half
    round up, and the mean of the stored values equals the exact value (round-to-nearest
    would put every one on the same side)."""
    _interpret(
        """
import torch
from bids_siamfuse.model.optim import TritonAdam
n = 8192
# gradients whose first moment (1 - beta1) * g lies 1/4 of the way between bf16 neighbours
lo = torch.full((n,), 1.0, dtype=torch.bfloat16).float()
hi = torch.nextafter(lo.bfloat16(), torch.tensor(2.0, dtype=torch.bfloat16)).float()
target = lo + 0.25 * (hi - lo)
p = torch.zeros(n, requires_grad=True)
opt = TritonAdam([p], moments="bfloat16")
p.grad = target / (1 - 0.9)
opt.step()
m, _ = opt.moments_of(0)
exact = (1 - torch.tensor(0.9, dtype=torch.float32)) * p.grad
up = float((m > exact).float().mean())
assert 0.22 < up < 0.28, up
assert abs(float(m.double().mean() / exact.double().mean()) - 1) < 2e-4
print("ok")
"""
    )


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


def _bank_like(dev, seed=0):
    """A few parameters shaped like the bank's (smaller region count), float32 on ``dev``."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 8, 1, 3, 3, 3), (5, 8), (5, 1024, 1024), (5, 1024), (5, 20, 1024), (5, 20)]
    return [torch.randn(s, generator=g).mul_(0.05).to(dev) for s in shapes]


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_float32_moments_match_fused_adam_and_capture():
    """CUDA: 20 steps of float32 moments against torch's fused Adam (1e-6 relative); the same
    step captured in a CUDA graph and replayed gives the eager step's bits, for both moment
    types."""
    from bids_siamfuse.model.optim import TritonAdam

    dev = torch.device("cuda")
    init = _bank_like(dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    grads = [[torch.randn(p.shape, device=dev, generator=gen) for p in init] for _ in range(20)]

    def eager(make):
        ps = [p.clone().requires_grad_() for p in init]
        opt = make(ps)
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in ps]

    ref = eager(lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True))
    out = eager(lambda ps: TritonAdam(ps, lr=1e-3))
    for a, b in zip(out, ref, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-6

    for moments in ("float32", "bfloat16"):
        want = eager(lambda ps, m=moments: TritonAdam(ps, lr=1e-3, moments=m))
        # compile the kernels outside the capture, on throwaway copies (same specialisations)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager(lambda ps, m=moments: TritonAdam(ps, lr=1e-3, moments=m))
        torch.cuda.current_stream().wait_stream(side)
        ps = [p.clone().requires_grad_() for p in init]
        opt = TritonAdam(ps, lr=1e-3, moments=moments)
        static = [torch.zeros_like(p) for p in ps]
        for p, s in zip(ps, static, strict=True):
            p.grad = s
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: parameters and state unchanged
            opt.step()
        for gs in grads:
            for s, g in zip(static, gs, strict=True):
                s.copy_(g)
            graph.replay()
        torch.cuda.synchronize()
        assert opt.step_count() == len(grads)
        for a, b in zip(ps, want, strict=True):
            assert torch.equal(a.detach(), b), moments


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_siamese_step_graphed_equals_eager():
    """``SiameseStep`` with bfloat16 moments runs the Triton Adam, and a graphed run (3 eager
    warm-up steps, capture, replays) ends with the eager run's bits; float32 moments (torch's
    fused Adam) are checked alike, as the reference for what the graphs preserve."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_model_siamese import toy_layout

    from bids_siamfuse.model.geometry import RegionGrid
    from bids_siamfuse.model.optim import TritonAdam
    from bids_siamfuse.model.siamese import SiameseBank, extend
    from bids_siamfuse.model.siamese_stage import SiameseStep

    dev, dt = torch.device("cuda"), torch.bfloat16
    grid = RegionGrid.from_layout(toy_layout())
    g = torch.Generator().manual_seed(2)
    n = 12
    xm = extend(torch.randn(n, grid.n_voxels, generator=g)).to(dev, dt)
    xp = extend(torch.randn(n, grid.n_voxels, generator=g)).to(dev, dt)
    t = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(dev)

    def run(graphs, moments):
        bank = SiameseBank(grid, generator=torch.Generator().manual_seed(3)).to(dev)
        step = SiameseStep(bank, xm, xp, t, dt, 1e-3, 4, graphs, moments)
        assert isinstance(step.opt, TritonAdam) == (moments == "bfloat16")
        order = torch.Generator().manual_seed(4)
        for _ in range(8):
            step(torch.randperm(n, generator=order)[:4].to(dev))
        assert (step.graph is not None) == graphs
        return [p.detach().clone() for p in step.params]

    for moments in ("float32", "bfloat16"):
        eager, graphed = run(False, moments), run(True, moments)
        assert all(torch.equal(a, b) for a, b in zip(eager, graphed, strict=True)), moments


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cv_with_bfloat16_moments_is_reproducible():
    """The full-resolution CV of ``tests/test_determinism.py`` with bfloat16 moments, twice:
    bit-identical predictions, metrics, histories, relevance and final weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_determinism import _cv, _same

    first = _cv(["cuda:0"], adam_moments="bfloat16")
    _same(first, _cv(["cuda:0"], adam_moments="bfloat16"))
    assert first.final["meta"]["config"]["adam_moments"] == "bfloat16"
