"""Adam as one Triton elementwise kernel per parameter tensor, with optional bfloat16 moments.

Why: in a siamese training step on an H200 (5.9 ms, 125 M float32 parameters, 122 M of them in
``fc1.weight``) torch's fused Adam took 1.29 ms (22 %). The optimizer is memory bound: it moves
28 bytes per parameter (parameter read and write 8, gradient 4, first moment read and write 8,
second moment 8). Storing both moments in bfloat16 moves 20 bytes (-29 %), and halves the
moments' memory (1 GB -> 0.5 GB for the bank).

The math is torch.optim.Adam's default (no weight decay, no amsgrad), in the order of torch's
fused CUDA kernel (``fused_adam_utils.cuh``)::

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),   bc_i = 1 - beta_i ** step

element math in float32 (correctly rounded square root and divisions, as CUDA's defaults),
the bias corrections in float64 from the device state (as torch does in double). With float32
moments the result agrees with torch's Adam to float32 rounding (not bit for bit:
``tests/test_optim.py`` checks 1e-6 relative after 5 steps).

bfloat16 moments: both moments are read as bfloat16, updated in float32 and written back with
*stochastic rounding*. Round-to-nearest would freeze the second moment: with beta2 = 0.999 a
step moves v by 0.1 % of (g^2 - v), which once v is near the mean square is below half of
bfloat16's spacing (0.2-0.39 % of the value), so the update rounds back to the old value and v
stops short of the true mean square (``tests/test_optim.py``: 41 % low after 600 steps of a
constant gradient; the first moment stops 2.5 % short). Stochastic rounding rounds up with the
probability of the dropped fraction, so v is right on average. The random bits come from a
counter-based hash of (seed, parameter index, step, element index): two runs give identical bits
(no atomics, every element independent), and no random state is kept. Not Philox
(``tl.randint``): 10 rounds are ~80 integer operations per element, by estimate (not measured)
~0.6 ms for the bank on an H200's integer units, more than the ~0.25 ms the smaller moments
save; two murmur3 finalisers are ~15 operations and ample for rounding decisions (16 bits per
moment).

CUDA graphs: the step count and the running powers beta^step live in a float64 device tensor
advanced by device ops before the kernels, which read them; no host synchronisation, nothing
step-dependent baked into a captured launch (``graphed.py`` replays the whole training step).
All state is allocated in ``__init__`` so that no allocation or host-to-device copy happens in
a captured step.

Imported only where Triton is (CUDA builds of torch ship it); CPU training keeps
``torch.optim.Adam(foreach=True)`` (:class:`.siamese_stage.SiameseStep`). Under
``TRITON_INTERPRET=1`` (the tests, on the CPU) CPU tensors are accepted.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MOMENTS = ("float32", "bfloat16")
BLOCK = 4096  # elements per program: 16 per thread with 8 warps (4 x 16-byte float32 loads)
NUM_WARPS = 8
# columns of the per-parameter device state (float64): step, beta1^step, beta2^step, key
_STEP = 0


@triton.jit
def _mix(x):
    """murmur3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _round_bf16(x, r):
    """float32 -> bfloat16 bits (int16), rounded up with probability (dropped bits) / 2^16:
    adding 16 uniform random bits to the 16 bits that are dropped carries into the kept part
    exactly that often. Sign-magnitude, so negative values round away from zero alike; inf
    stays inf; NaN is kept as NaN (the carry could otherwise reach the sign bit)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (r & 0xFFFF)) >> 16
    rounded = tl.where(x != x, bits >> 16, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _from_bf16(h):
    """bfloat16 bits (int16) -> float32 (exact)."""
    return (h.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _adam_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, state_ptr, hyper_ptr, n, BF16: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # per-step scalars, float64 as in torch (bc2 = 1 - 0.999^t loses digits in float32)
    step = tl.load(state_ptr + 0)
    lr = tl.load(hyper_ptr + 0)
    beta1 = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    step_size = (lr / (1.0 - tl.load(state_ptr + 1))).to(tl.float32)
    bc2_sqrt = tl.sqrt_rn((1.0 - tl.load(state_ptr + 2)).to(tl.float32))
    eps = tl.load(hyper_ptr + 3).to(tl.float32)
    b1 = beta1.to(tl.float32)
    b2 = beta2.to(tl.float32)
    omb1 = (1.0 - beta1).to(tl.float32)
    omb2 = (1.0 - beta2).to(tl.float32)

    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask)
    if BF16:
        m = _from_bf16(tl.load(m_ptr + offs, mask=mask))
        v = _from_bf16(tl.load(v_ptr + offs, mask=mask))
    else:
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
    m = b1 * m + omb1 * g
    v = b2 * v + omb2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptr + offs, p, mask=mask)
    if BF16:
        # the update above used the unrounded float32 moments; only the stored copies round
        key = tl.load(state_ptr + 3).to(tl.int64).to(tl.uint32)
        base = _mix(_mix(key) ^ step.to(tl.int64).to(tl.uint32))
        r = _mix(_mix(offs.to(tl.uint32) ^ base) + base)
        tl.store(m_ptr + offs, _round_bf16(m, r), mask=mask)  # low 16 bits for m
        tl.store(v_ptr + offs, _round_bf16(v, r >> 16), mask=mask)  # high 16 bits for v
    else:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonAdam(torch.optim.Optimizer):
    """Adam (torch's defaults, no weight decay) for contiguous float32 CUDA parameters, one
    Triton kernel per parameter tensor; ``moments="bfloat16"`` stores both moments as bfloat16
    with deterministic stochastic rounding (see the module docstring). ``seed`` picks the
    rounding stream. CUDA-graph capturable; ``zero_grad`` is torch's. Parameters without a
    gradient are skipped (their step count does not advance), as in torch."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        moments: str = "float32",
        seed: int = 0,
    ):
        if moments not in MOMENTS:
            raise ValueError(f"moments must be one of {', '.join(MOMENTS)}, not {moments!r}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), not {betas}")
        super().__init__(params, {"lr": float(lr), "betas": tuple(betas), "eps": float(eps)})
        self.moments = moments
        self._params = [p for group in self.param_groups for p in group["params"]]
        if not self._params:
            raise ValueError("TritonAdam got no parameters")
        device = self._params[0].device
        for i, p in enumerate(self._params):
            if p.dtype != torch.float32:
                raise ValueError(f"TritonAdam: parameter {i} is {p.dtype}, needs torch.float32")
            if not p.is_contiguous():
                raise ValueError(f"TritonAdam: parameter {i} is not contiguous")
            if p.device != device:
                raise ValueError("TritonAdam: all parameters must be on one device")
        if device.type != "cuda" and not _interpreted():
            raise ValueError(
                f"TritonAdam needs CUDA parameters, not {device.type} (use torch.optim.Adam there)"
            )
        # everything allocated now: a captured step must not allocate or copy from the host
        store = torch.float32 if moments == "float32" else torch.bfloat16
        self._m = [torch.zeros_like(p, dtype=store) for p in self._params]
        self._v = [torch.zeros_like(p, dtype=store) for p in self._params]
        rows, hyper, mult = [], [], []
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for _ in group["params"]:
                key = (int(seed) * 1_000_003 + len(rows)) % 2**31  # rounding stream per tensor
                rows.append([0.0, 1.0, 1.0, float(key)])
                hyper.append([group["lr"], b1, b2, group["eps"]])
                mult.append([1.0, b1, b2, 1.0])
        f64 = {"dtype": torch.float64, "device": device}
        self._state = torch.tensor(rows, **f64)  # step, beta1^step, beta2^step, key
        self._hyper = torch.tensor(hyper, **f64)  # lr, beta1, beta2, eps
        self._mult = torch.tensor(mult, **f64)
        self._inc = torch.tensor([1.0, 0.0, 0.0, 0.0], **f64)
        self._lr = [h[0] for h in hyper]
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]

    def _views(self, i: int):
        if self.moments == "float32":
            return self._m[i], self._v[i]
        return self._m[i].view(torch.int16), self._v[i].view(torch.int16)

    @torch.no_grad()
    def moments_of(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """First and second moment of parameter ``i`` as float32 copies (tests, checks)."""
        return self._m[i].float(), self._v[i].float()

    @torch.no_grad()
    def step_count(self, i: int = 0) -> int:
        """Steps taken by parameter ``i`` (reads the device: not for captured code)."""
        return int(self._state[i, _STEP].item())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not active:
            return loss
        for i in active:
            lr = float(self.param_groups[self._group_of[i]]["lr"])
            if lr != self._lr[i]:  # a changed learning rate (a scheduler): into the device row
                self._hyper[i, 0].fill_(lr)
                self._lr[i] = lr
        # step += 1, beta^step *= beta: device ops, so a captured graph advances them on replay
        if len(active) == len(self._params):
            self._state.mul_(self._mult).add_(self._inc)
        else:
            for i in active:
                self._state[i].mul_(self._mult[i]).add_(self._inc)
        bf16 = self.moments == "bfloat16"
        for i in active:
            p = self._params[i]
            g = p.grad
            if g.is_sparse:
                raise ValueError("TritonAdam does not support sparse gradients")
            if g.dtype != torch.float32:
                raise ValueError(f"TritonAdam: gradient {i} is {g.dtype}, needs torch.float32")
            g = g.contiguous()
            m, v = self._views(i)
            n = p.numel()
            _adam_kernel[(triton.cdiv(n, BLOCK),)](
                p,
                g,
                m,
                v,
                self._state[i],
                self._hyper[i],
                n,
                BF16=bf16,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
        return loss
