"""One siamese CNN per AAL region (paper 3.2): the batched engine and its reference loop.

Architecture (per region, both branches share every weight)
    ::

        box crop (1 x bx x by x bz), zero outside the region
        Conv3d(1 -> 8,  kernel 3, stride 2, padding 1) + ReLU
        Conv3d(8 -> 16, kernel 3, stride 2, padding 1) + ReLU
        adaptive average pooling to 4 x 4 x 4, flatten          -> 16 * 64 = 1024 features
        Linear(1024 -> 1024) + ReLU
        Linear(1024 -> 20)                                      -> the region's embedding

    Why: the strided convolutions shrink every box 64-fold before anything dense happens (the
    largest AAL box, 41 x 40 x 47 voxels on the 1.5 mm grid, leaves an 11 x 10 x 12 grid; the
    longest boxes leave at most 19 cells along an axis), and the adaptive pooling
    gives every region, small or large, the same 1024-wide input to the first linear layer: 1M
    weights per region (122M over 116 regions), where flattening the largest region's grid
    would need 16 x 1320 = 21k inputs (22M weights) for that region alone. Small regions (the
    smallest box is 384 voxels) are pooled up to 4^3 by repetition, as adaptive pooling does.
    The MRI crop and the PET crop go through the same network (the two branches are one set
    of weights, applied to a batch holding both). ``SiameseArch`` holds these numbers; sloppy
    mode (see :mod:`.train`) changes ``pool`` and ``downsample`` only.

Two implementations of the same function
    * :class:`RegionNet` / :class:`LoopSiamese`: plain ``nn.Conv3d``/``nn.Linear`` modules, one
      per region, run in a Python loop over box crops. This is the *reference*: tests and the
      benchmark compare the engine with it; nothing trains with it.
    * :class:`SiameseBank`: the engine. Parameters of all regions are stacked along a leading
      region axis. The convolutions run as gathers from the *compact* region data (no box crops
      are ever built; see :mod:`.geometry`) followed by one batched matrix product per layer
      and bucket of similar-sized regions; pooling is one batched product with per-region
      pooling matrices; both linear layers are one ``baddbmm`` over all 116 regions. A training
      step costs O(buckets) kernel launches, not O(regions). On CUDA in bfloat16 the two
      convolutions and the pooling instead run as four fused Triton kernels over all regions
      at once (:mod:`.kernels`; ~2.3x faster on an H100, ``docs/benchmarks.md``). All give the
      same outputs and gradients for the same weights (``tests/test_model_siamese.py``);
      weights move between engine and loop with :meth:`SiameseBank.to_loop` /
      :meth:`SiameseBank.from_loop`.

Engine input
    ``x``: (S, V + 2) compact values (standardized, optionally coarsened) of S crops per region
    (MRI and PET of a batch stacked along S), plus two constant columns: ``x[:, V] == 0`` and
    ``x[:, V + 1] == 1`` (see :func:`extend`). Output: (R, S, embed) float32, atlas region
    order.
    Parameters are stored in the engine's bucket order (``geometry.order``);
    :meth:`SiameseBank.region_state` gives them in atlas order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .geometry import Geometry, RegionGrid, cached_geometry
from .ops import batched_linear

__all__ = ["SiameseArch", "RegionNet", "LoopSiamese", "SiameseBank", "extend", "PARAM_NAMES"]

#: Without autograd the portable engine uses :meth:`SiameseBank._pooled_inference`; False: the
#: training layout (``benchmarks/bench_apply.py`` measures both in one run)
INFERENCE_LAYOUT = True

PARAM_NAMES = (
    "conv1.weight",
    "conv1.bias",
    "conv2.weight",
    "conv2.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
)


@dataclass(frozen=True)
class SiameseArch:
    """Per-region network shape (see the module docstring)."""

    channels: tuple = (8, 16)
    kernel: int = 3
    stride: int = 2
    padding: int = 1
    pool: int = 4
    hidden: int = 1024
    embed: int = 20
    downsample: int = 1  # crops averaged over downsample^3 blocks first (sloppy mode: 2)

    @property
    def features(self) -> int:
        return self.channels[1] * self.pool**3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SiameseArch:
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)

    def shapes(self, n_regions: int) -> dict[str, tuple]:
        """Stacked parameter shapes (region axis first), PyTorch module layouts."""
        c1, c2 = self.channels
        k = self.kernel
        return {
            "conv1.weight": (n_regions, c1, 1, k, k, k),
            "conv1.bias": (n_regions, c1),
            "conv2.weight": (n_regions, c2, c1, k, k, k),
            "conv2.bias": (n_regions, c2),
            "fc1.weight": (n_regions, self.hidden, self.features),
            "fc1.bias": (n_regions, self.hidden),
            "fc2.weight": (n_regions, self.embed, self.hidden),
            "fc2.bias": (n_regions, self.embed),
        }


def _fan_in(name: str, arch: SiameseArch) -> int:
    c1, _ = arch.channels
    k3 = arch.kernel**3
    return {"conv1": k3, "conv2": c1 * k3, "fc1": arch.features, "fc2": arch.hidden}[
        name.split(".")[0]
    ]


def draw_region_uniforms(
    arch: SiameseArch, n_regions: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The U(0, 1) draws behind :func:`init_region_state`, on the CPU from ``generator``, in
    atlas order (125M values for the AAL atlas: 0.6 s of one host core, drawn ahead of a fit
    by :func:`bids_siamfuse.model.train.prefetch`)."""
    return {
        name: torch.rand(shape, generator=generator, dtype=torch.float32)
        for name, shape in arch.shapes(n_regions).items()
    }


def _scaled_uniform(name: str, arch: SiameseArch, u: torch.Tensor) -> torch.Tensor:
    """U(0, 1) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)): exact doubling and shift, one float32
    rounding of the product, so the same bits on every device."""
    return (u * 2 - 1) * (1.0 / math.sqrt(_fan_in(name, arch)))


def init_region_state(
    arch: SiameseArch, n_regions: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """PyTorch's default init (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases),
    drawn on the CPU from ``generator`` in atlas order, so a seed gives the same network on
    every device."""
    draws = draw_region_uniforms(arch, n_regions, generator)
    return {name: _scaled_uniform(name, arch, u) for name, u in draws.items()}


class RegionNet(nn.Module):
    """The reference network of one region (plain modules, box crops in)."""

    def __init__(self, arch: SiameseArch):
        super().__init__()
        c1, c2 = arch.channels
        k, s, p = arch.kernel, arch.stride, arch.padding
        self.conv1 = nn.Conv3d(1, c1, k, s, p)
        self.conv2 = nn.Conv3d(c1, c2, k, s, p)
        self.pool = nn.AdaptiveAvgPool3d(arch.pool)
        self.fc1 = nn.Linear(arch.features, arch.hidden)
        self.fc2 = nn.Linear(arch.hidden, arch.embed)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(S, 1, bx, by, bz) -> (S, embed)."""
        h = F.relu(self.conv1(crops))
        h = F.relu(self.conv2(h))
        h = self.pool(h).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


class LoopSiamese(nn.Module):
    """The reference implementation: one :class:`RegionNet` per region, a loop over regions."""

    def __init__(self, arch: SiameseArch, n_regions: int):
        super().__init__()
        self.arch = arch
        self.nets = nn.ModuleList(RegionNet(arch) for _ in range(n_regions))

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """``crops[r]``: (S, 1, *box_r) -> (R, S, embed)."""
        return torch.stack([net(c) for net, c in zip(self.nets, crops, strict=True)])


def _triton_ok() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            from . import kernels  # noqa: F401

            _TRITON = True
        except Exception:  # noqa: BLE001 - no Triton, or one that does not load: portable path
            _TRITON = False
    return _TRITON


_TRITON = None
#: the fused kernels' tables (~50 MB on the device for the atlas) per geometry and device
_RAGGED_CACHE: dict = {}


class _GatherRows(torch.autograd.Function):
    """``src.index_select(1, index)`` whose backward gathers through the transposed table
    (``geometry._scatter_table``) and sums, instead of scattering with atomics: deterministic
    on every device, and the same sums as ``index_add_`` up to the order of additions."""

    @staticmethod
    def forward(ctx, src, index, scatter):
        ctx.save_for_backward(scatter)
        ctx.n_rows = src.shape[1]
        return src.index_select(1, index)

    @staticmethod
    def backward(ctx, grad):
        (scatter,) = ctx.saved_tensors
        s_count, _, c = grad.shape
        g = grad.contiguous().index_select(1, scatter.reshape(-1))
        g = g.view(s_count, ctx.n_rows, scatter.numel() // ctx.n_rows, c).sum(2)
        return g, None, None


def extend(x: torch.Tensor) -> torch.Tensor:
    """Append the engine's two constant columns (0, then 1) to compact data (..., V)."""
    lead = x.shape[:-1]
    consts = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device).expand(*lead, 2)
    return torch.cat([x, consts], dim=-1)


class SiameseBank(nn.Module):
    """All region networks as one batched computation (see the module docstring)."""

    def __init__(
        self,
        grid: RegionGrid,
        arch: SiameseArch = SiameseArch(),
        *,
        generator: torch.Generator | None = None,
        max_buckets: int = 12,
        index_dtype: torch.dtype = torch.int32,
        scatter: str = "gather",
        fused: bool | None = None,
        deterministic: bool = True,
        uniforms: dict[str, torch.Tensor] | None = None,
        device: torch.device | str | None = None,
    ):
        """``uniforms``: the draws of :func:`draw_region_uniforms` (made ahead), instead of
        drawing from ``generator``; ``device``: where the parameters are made (the buffers
        stay on the CPU until ``.to``)."""
        super().__init__()
        if scatter not in ("gather", "index_add"):
            raise ValueError(f"scatter must be 'gather' or 'index_add', not {scatter!r}")
        self.arch = arch
        self.grid = grid
        self.scatter = scatter
        self.fused = fused
        # fused kernels: fixed-order reductions (bit-reproducible) or atomic adds (kernels.py)
        self.deterministic = bool(deterministic)
        self._ragged = None
        geom, self._geometry_key = cached_geometry(
            grid,
            kernel=arch.kernel,
            stride=arch.stride,
            padding=arch.padding,
            pool=arch.pool,
            max_buckets=max_buckets,
        )
        self.geometry: Geometry = geom
        self.n_regions = grid.n_regions
        order = torch.as_tensor(geom.order, dtype=torch.long)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        # regions still training (engine order); see set_active
        self.register_buffer(
            "active", torch.ones(self.n_regions, dtype=torch.int32), persistent=False
        )
        self.bucket_slices = []
        self._inference_cache: dict = {}  # (bucket, device) -> _inference_tables
        for i, b in enumerate(geom.buckets):
            for name, table in (("g1", b.gather1), ("g2", b.gather2), ("s2", b.scatter2)):
                index = torch.as_tensor(table.reshape(-1)).to(index_dtype)
                self.register_buffer(f"{name}_{i}", index, persistent=False)
            self.register_buffer(f"pool_{i}", torch.as_tensor(b.pool), persistent=False)
            self.bucket_slices.append((b.start, b.size, b.rows1, b.rows2))
        if uniforms is None:
            uniforms = draw_region_uniforms(
                arch, self.n_regions, generator or torch.Generator().manual_seed(0)
            )
        # the draws are put in engine order and scaled where the parameters will live (on a
        # GPU: 0.5 GB of host work less per fit); elementwise, so the same values as scaling
        # first on the host (init_region_state)
        device = torch.device("cpu") if device is None else torch.device(device)
        engine = order.to(device)
        self.params = nn.ParameterDict()
        for name in PARAM_NAMES:
            u = uniforms[name].to(device).index_select(0, engine)
            self.params[name.replace(".", "_")] = nn.Parameter(_scaled_uniform(name, arch, u))

    @torch.no_grad()
    def set_active(self, mask: torch.Tensor | None) -> None:
        """Which regions (engine order, bool (R,), on this module's device; ``None``: all) the
        fused kernels compute. Per-region early stopping freezes a region's kept weights; its
        network need not run any more: on the 250-subject seed cohort half of the regions
        have stopped by epoch ~30 of 70-100 (docs/benchmarks.md). The regions that do run
        get bit for bit the same outputs and gradients; the others get pooled features and
        convolution gradients of 0 (their linear layers still run, batched with the rest).
        In place: a captured CUDA graph sees the change. The portable engine computes every
        region regardless."""
        if mask is None:
            self.active.fill_(1)
        else:
            self.active.copy_(mask.to(self.active.device, torch.int32))

    # ------------------------------------------------------------------ parameters
    def param(self, name: str) -> nn.Parameter:
        return self.params[name.replace(".", "_")]

    def region_state(self) -> dict[str, torch.Tensor]:
        """Stacked parameters in atlas order (detached copies), keys of :data:`PARAM_NAMES`."""
        return {n: self.param(n).detach()[self.inverse].clone() for n in PARAM_NAMES}

    @torch.no_grad()
    def load_region_state(self, state: dict) -> None:
        """Load stacked parameters given in atlas order."""
        for n in PARAM_NAMES:
            value = (
                torch.as_tensor(np.asarray(state[n]))
                if not torch.is_tensor(state[n])
                else state[n]
            )
            p = self.param(n)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{n}: shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            p.copy_(value.to(p.device, p.dtype)[self.order.to(p.device)])

    def to_loop(self) -> LoopSiamese:
        """A :class:`LoopSiamese` holding the same weights (on this module's device)."""
        loop = LoopSiamese(self.arch, self.n_regions).to(self.order.device)
        state = self.region_state()
        with torch.no_grad():
            for r, net in enumerate(loop.nets):
                for n in PARAM_NAMES:
                    net.get_parameter(n).copy_(state[n][r])
        return loop

    @classmethod
    def from_loop(cls, loop: LoopSiamese, grid: RegionGrid, **kwargs) -> SiameseBank:
        bank = cls(grid, loop.arch, **kwargs)
        state = {
            n: torch.stack([net.get_parameter(n).detach().cpu() for net in loop.nets])
            for n in PARAM_NAMES
        }
        bank.load_region_state(state)
        return bank

    # ------------------------------------------------------------------ forward
    def use_fused(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether :meth:`pooled` runs the fused Triton kernels (:mod:`.kernels`): by default
        on CUDA in bfloat16 when Triton imports; ``fused=True/False`` forces the choice."""
        if self.fused is not None:
            return self.fused
        if x.device.type != "cuda" or dtype != torch.bfloat16 or x.dtype != dtype:
            return False
        return self.kernels_support(self.arch) and _triton_ok()

    @staticmethod
    def kernels_support(arch: SiameseArch) -> bool:
        """The shapes the fused kernels are written for: channels 8/16, kernel 3, stride 2,
        pooling to 4^3 (``tl.dot`` needs >= 16 pooled cells, a power of two). Sloppy mode
        (pooling to 2^3) runs the portable engine on CUDA too."""
        return (
            tuple(arch.channels) == (8, 16)
            and arch.kernel == 3
            and arch.stride == 2
            and arch.padding == 1
            and arch.pool == 4
        )

    def _fused_pooled(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        from . import kernels

        if self._ragged is None or self._ragged.tab1.device != x.device:
            key = (self._geometry_key, str(x.device))
            self._ragged = _RAGGED_CACHE.get(key)
            if self._ragged is None:  # once per geometry and device in this process
                self._ragged = kernels.ragged_tables(self.geometry).to(x.device)
                _RAGGED_CACHE[key] = self._ragged
                while len(_RAGGED_CACHE) > 4:
                    _RAGGED_CACHE.pop(next(iter(_RAGGED_CACHE)))
        w1, w2, b2 = kernels.pack_weights(
            self.param("conv1.weight"),
            self.param("conv1.bias"),
            self.param("conv2.weight"),
            self.param("conv2.bias"),
            dtype,
        )
        return kernels.FusedConvs.apply(
            x.contiguous(),
            w1,
            w2,
            b2,
            self._ragged,
            self.n_regions,
            self.active,
            self.deterministic,
        )

    def pooled(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Both convolutions and the pooling: (S, V + 2) -> (S, R, features), engine order."""
        dtype = dtype or x.dtype
        if self.use_fused(x, dtype):
            return self._fused_pooled(x, dtype)
        if INFERENCE_LAYOUT and not torch.is_grad_enabled():
            return self._pooled_inference(x, dtype)
        s_count = x.shape[0]
        c1, c2 = self.arch.channels
        k3 = self.arch.kernel**3
        w1_all = self.param("conv1.weight")
        b1_all = self.param("conv1.bias")
        w2_all = self.param("conv2.weight")
        b2_all = self.param("conv2.bias")
        outs = []
        for i, (start, m, r1, r2) in enumerate(self.bucket_slices):
            sl = slice(start, start + m)
            # layer 1: gather patches (+ the ONE column carrying the bias), one batched product
            w1 = torch.cat(
                [w1_all[sl].reshape(m, c1, k3).transpose(1, 2), b1_all[sl].unsqueeze(1)], 1
            ).to(dtype)
            # (S, m, rows, K) -> (m, S * rows, K): one bmm per bucket whose weight gradient is
            # a plain bmm too (a broadcast 4-D matmul sums S copies: ~8x slower on the CPU)
            p1 = x.index_select(1, getattr(self, f"g1_{i}")).view(s_count, m, r1 * (k3 + 1))
            p1 = p1.transpose(0, 1).reshape(m, s_count * r1, k3 + 1)
            h1 = F.relu(torch.bmm(p1, w1))  # (m, S * r1, c1); padded rows are exactly 0
            h1 = h1.view(m, s_count, r1, c1).transpose(0, 1).reshape(s_count, m * r1, c1)
            # layer 2: gather layer-1 rows (channels last), kernel offset major
            w2 = w2_all[sl].permute(0, 3, 4, 5, 2, 1).reshape(m, k3 * c1, c2).to(dtype)
            if self.scatter == "gather":
                p2 = _GatherRows.apply(h1, getattr(self, f"g2_{i}"), getattr(self, f"s2_{i}"))
            else:  # autograd's index_add_ backward (atomics on CUDA)
                p2 = h1.index_select(1, getattr(self, f"g2_{i}"))
            p2 = p2.view(s_count, m, r2 * k3 * c1).transpose(0, 1)
            p2 = p2.reshape(m, s_count * r2, k3 * c1)
            h2 = F.relu(torch.baddbmm(b2_all[sl].to(dtype).unsqueeze(1), p2, w2))
            # adaptive average pooling: (m, S * c2, rows2) @ (m, rows2, pool^3)
            h2 = h2.view(m, s_count, r2, c2).transpose(2, 3).reshape(m, s_count * c2, r2)
            pooled = torch.bmm(h2, getattr(self, f"pool_{i}").to(dtype))
            outs.append(pooled.view(m, s_count, c2 * self.arch.pool**3))
        return torch.cat(outs, dim=0).transpose(0, 1)

    def _inference_tables(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket ``i``'s gathers reordered for :meth:`_pooled_inference` (built once per
        bucket and device from the training gathers): layer 1 (m, K, rows1) into the data's
        voxels, layer 2 (m, taps, c1, rows2) into layer 1 stored (m, c1, rows1)."""
        cache = self._inference_cache
        g1 = getattr(self, f"g1_{i}")
        key = (i, str(g1.device))
        if key not in cache:
            _, m, r1, r2 = self.bucket_slices[i]
            c1, k3 = self.arch.channels[0], self.arch.kernel**3
            t1 = g1.view(m, r1, k3 + 1).transpose(1, 2).reshape(-1)
            g2 = getattr(self, f"g2_{i}").view(m, r2, k3).long()
            rows = (g2 // r1) * (c1 * r1) + g2 % r1  # layer-1 row in the (m, c1, r1) layout
            chan = torch.arange(c1, device=g2.device).view(1, 1, c1, 1) * r1
            t2 = (rows.transpose(1, 2).unsqueeze(2) + chan).reshape(-1).to(g1.dtype)
            cache[key] = (t1, t2)
        return cache[key]

    def _pooled_inference(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`pooled` without autograd, laid out for the products: the samples are the
        fastest axis of every gathered tensor, so each gather copies rows of S values and
        lands directly in the layout its product reads (the training path transposes both
        patch tensors: 27 % of a 4-subject forward on 2 CPU cores went to those copies and 39
        % to scalar gathers; docs/benchmarks.md). Same products up to float rounding."""
        s_count = x.shape[0]
        c1, c2 = self.arch.channels
        k3 = self.arch.kernel**3
        xt = x.to(dtype).t().contiguous()  # (V + 2, S)
        outs = []
        for i, (start, m, r1, r2) in enumerate(self.bucket_slices):
            sl = slice(start, start + m)
            t1, t2 = self._inference_tables(i)
            w1 = torch.cat(
                [
                    self.param("conv1.weight")[sl].reshape(m, c1, k3),
                    self.param("conv1.bias")[sl].unsqueeze(2),
                ],
                2,
            ).to(dtype)  # (m, c1, K)
            p1 = xt.index_select(0, t1).view(m, k3 + 1, r1 * s_count)
            h1 = torch.bmm(w1, p1).relu_()  # (m, c1, r1 * S); padded rows exactly 0
            p2 = h1.view(m * c1 * r1, s_count).index_select(0, t2)
            w2 = self.param("conv2.weight")[sl].permute(0, 1, 3, 4, 5, 2).reshape(m, c2, -1)
            b2 = self.param("conv2.bias")[sl].to(dtype).unsqueeze(2)
            h2 = torch.baddbmm(b2, w2.to(dtype), p2.view(m, k3 * c1, r2 * s_count)).relu_()
            h2 = h2.view(m, c2, r2, s_count).permute(0, 3, 1, 2).reshape(m, s_count * c2, r2)
            pooled = torch.bmm(h2, getattr(self, f"pool_{i}").to(dtype))
            outs.append(pooled.view(m, s_count, c2 * self.arch.pool**3))
        return torch.cat(outs, dim=0).transpose(0, 1)

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(S, V + 2) -> (R, S, embed) float32, atlas order.

        ``dtype`` is the convolutions' compute type (bfloat16 for CUDA AMP). The two linear
        layers always run on float32 weights (TF32 products on CUDA when enabled): casting
        their 122M weights to bfloat16 and their gradients back every step moves more bytes
        than the products save.
        """
        dtype = dtype or x.dtype
        h = self.pooled(x, dtype).float().transpose(0, 1)  # (R, S, F)
        # weight gradients computed in the weights' layout (no 0.83 ms copy per step)
        h = F.relu(batched_linear(h, self.param("fc1.weight"), self.param("fc1.bias")))
        out = batched_linear(h, self.param("fc2.weight"), self.param("fc2.bias"))
        return out.index_select(0, self.inverse)
