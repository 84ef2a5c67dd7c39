"""Fused Triton kernels for the two convolutions and the pooling of all region networks (CUDA).

The portable engine (:meth:`.siamese.SiameseBank.pooled`) materialises im2col patches, runs one
batched product per bucket and lets autograd handle the backward: ~300 kernels and ~12 GB of
memory traffic per training step of 16 subjects on the full atlas, dominated by the patch
tensors (layer 1: 28 values per output row, layer 2: 216) and their gradients. Here the same
function is four kernels that never write a patch:

``_conv1_fwd``
    per block of layer-1 rows (one region per block) and group of samples: gather the 27 taps
    (+ the constant ONE that carries the bias) straight from the compact data, multiply by the
    region's (32 x 8) weights on the tensor cores, ReLU, store layer 1 (channels last);
``_conv2_fwd``
    per block of layer-2 rows: gather 27 x 8 values from layer 1, (BR x 256) @ (256 x 16), bias,
    ReLU, and the adaptive pooling fused in: the block's (64 x BR) pooling weights times its
    output, a partial of the pooled features (S, R, 16, 64) in float32 (see Determinism);
    before a backward it also stores layer 2's ReLU mask (int8, 16 per row);
``_conv2_bwd``
    reads that mask, pulls the pooled gradient back through the pooling weights, and
    accumulates dW2/db2 over its samples in registers (one partial per block, reduced in a
    fixed order; or one atomic add per block on the non-deterministic path); writes the
    gradient of the layer-2 patches (BR x 256 per sample);
``_conv1_bwd``
    per block of layer-1 rows: sums the patch gradients that read each row (the transposed
    gather table: at most 8 for kernel 3 / stride 2, no atomics), takes the ReLU mask from the
    stored layer 1 and accumulates dW1.

Reading the masks instead of recomputing both pre-activations (a second gather and product
each) took a training step of 32 subjects from 6.13 to 5.40 ms of GPU time on an H200, with
bitwise the same gradients (docs/benchmarks.md, fifth session). Blocks of regions that
:meth:`.siamese.SiameseBank.set_active` marks as stopped compute nothing (their pooled
features and gradients are 0).

Rows are *ragged*: each region's rows are padded to a multiple of the block size only (no
buckets), so one launch serves all 116 regions. Padded rows read only the ZERO slot, hence
produce exactly 0 and zero gradients. Inputs are bfloat16 (the CUDA AMP path); products
accumulate in float32. Checked against the portable engine and the per-region loop in
``tests/test_model_siamese.py`` (GPU) and ``benchmarks/bench_train.py``.

Determinism (the default, ``deterministic=True``)
    Every sum that crosses thread blocks is done in a fixed order: each block writes its
    partial sum (pooled features per sample; dW2, db2, dW1 per block and sample group) to a
    buffer, and ``_segment_sum`` adds a region's partials block after block, always in the same
    order. The same inputs then give bit-identical outputs and gradients on every run, process
    and GPU of the same model. ``deterministic=False`` keeps the original ``tl.atomic_add``
    accumulation, whose order depends on scheduling (rounding differences of ~1e-7 relative that
    training amplifies: 250-subject CV probabilities up to 0.72 apart between two runs); its
    speed difference is measured in ``docs/benchmarks.md``.

Imported only on CUDA machines with Triton (which ships with PyTorch's CUDA builds); everything
else uses the portable engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from .geometry import Geometry, conv_out

BR1 = 128  # layer-1 rows per block
BR2 = 64  # layer-2 rows per block
TAPS = 32  # 27 kernel taps (+ ONE for layer 1), padded to a power of two
C1, C2, NP1 = 8, 16, 16  # channels; layer 1's 8 output channels padded to 16 for tl.dot
SB = 8  # samples per program


@dataclass
class RaggedTables:
    """Block-ragged tables (engine region order) for the fused kernels."""

    tab1: torch.Tensor  # (rows1, 32) int32 into [compact data, ZERO, ONE]
    blk1: torch.Tensor  # (rows1 / BR1,) int32 region of each block
    tab2: torch.Tensor  # (rows2, 32) int32 layer-1 rows (zero row for padding)
    blk2: torch.Tensor  # (rows2 / BR2,) int32
    pool2: torch.Tensor  # (rows2, 64) float32 pooling weights (0 on padded rows)
    sc1: torch.Tensor  # (rows1, W) int32 flat layer-2 patch positions reading each row
    seg1: torch.Tensor  # (R + 1,) int32 first layer-1 block of each region (+ end)
    seg2: torch.Tensor  # (R + 1,) int32 first layer-2 block of each region (+ end)
    rows1: int
    rows2: int
    pool3: int

    def to(self, device) -> RaggedTables:
        out = {}
        for k, v in self.__dict__.items():
            out[k] = v.to(device) if torch.is_tensor(v) else v
        return RaggedTables(**out)


def _pad_to(n: int, block: int) -> int:
    return -(-n // block) * block


def ragged_tables(geom: Geometry) -> RaggedTables:
    """Build the kernels' tables from the engine's geometry (same region order)."""
    grid = geom.grid
    k, s, p, pool = geom.kernel, geom.stride, geom.padding, geom.pool
    if k**3 + 1 > TAPS:
        raise ValueError("the fused kernels support kernels up to 3^3 taps")
    zero, one = grid.n_voxels, grid.n_voxels + 1
    from .geometry import _region_tables

    order = geom.order
    per = [_region_tables(grid, int(r), k, s, p, pool) for r in order]
    n1 = [int(np.prod(q[0])) for q in per]
    n2 = [int(np.prod(q[1])) for q in per]
    pad1 = [_pad_to(n, BR1) for n in n1]
    pad2 = [_pad_to(n, BR2) for n in n2]
    start1 = np.concatenate([[0], np.cumsum(pad1)])
    start2 = np.concatenate([[0], np.cumsum(pad2)])
    rows1 = int(start1[-1]) + BR1  # + one block of zero rows
    rows2 = int(start2[-1]) + BR2  # + one block of zero rows (a zero gradient slot)
    zero_row1 = rows1 - BR1
    k3 = k**3
    tab1 = np.full((rows1, TAPS), zero, dtype=np.int64)
    tab2 = np.full((rows2, TAPS), zero_row1, dtype=np.int64)
    pool2 = np.zeros((rows2, pool**3), dtype=np.float32)
    blk1 = np.zeros(rows1 // BR1, dtype=np.int64)
    blk2 = np.zeros(rows2 // BR2, dtype=np.int64)
    for j, (_, _, t1, t2, pm) in enumerate(per):
        a1, a2 = int(start1[j]), int(start2[j])
        tab1[a1 : a1 + n1[j], :k3] = t1
        tab1[a1 : a1 + n1[j], k3] = one
        tab2[a2 : a2 + n2[j], :k3] = np.where(t2 < 0, zero_row1, t2 + a1)
        pool2[a2 : a2 + n2[j]] = pm
        blk1[a1 // BR1 : (a1 + pad1[j]) // BR1] = j
        blk2[a2 // BR2 : (a2 + pad2[j]) // BR2] = j
    # transposed layer-2 gather: positions (row2 * TAPS + tap) reading each layer-1 row
    flat = tab2[:, :k3].reshape(-1)
    pos = (np.arange(rows2)[:, None] * TAPS + np.arange(k3)[None, :]).reshape(-1)
    real = flat != zero_row1
    flat, pos = flat[real], pos[real]
    order_ = np.argsort(flat, kind="stable")
    flat, pos = flat[order_], pos[order_]
    counts = np.bincount(flat, minlength=rows1)
    width = max(1, int(counts.max()))
    width = 1 << (width - 1).bit_length()
    zero_pos = (rows2 - 1) * TAPS  # a tap of the last (zero) layer-2 row: zero gradient
    sc1 = np.full((rows1, width), zero_pos, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sc1[flat, np.arange(flat.size) - first[flat]] = pos
    as32 = lambda a: torch.as_tensor(a.astype(np.int32))  # noqa: E731
    return RaggedTables(
        tab1=as32(tab1),
        blk1=as32(blk1),
        tab2=as32(tab2),
        blk2=as32(blk2),
        pool2=torch.as_tensor(pool2),
        sc1=as32(sc1),
        seg1=as32(start1 // BR1),  # the trailing zero block belongs to no region
        seg2=as32(start2 // BR2),
        rows1=rows1,
        rows2=rows2,
        pool3=pool**3,
    )


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


# Every operand is loaded in the layout its product needs: no tl.trans and no tl.reshape of
# loaded tiles (Triton 3.6 on sm_90 miscompiled a dot on a transposed, reshaped gather into an
# out-of-bounds shared-memory read; compute-sanitizer caught it). Layer 2's (rows x 256) patch
# tile reads its tap table with ``k // C1`` (each entry 8 times, from L1) instead.


@triton.jit
def _block(blk_ptr, act_ptr, S, BR: tl.constexpr, SB: tl.constexpr):
    """This program's block of rows: its index, first sample, region (int64), rows and the
    number of samples to compute: ``S``, or 0 for a block of a region that is not training
    (``act_ptr``, see :meth:`.siamese.SiameseBank.set_active`); the last block (zero rows, a
    zero gradient slot of every region) always runs."""
    pid = tl.program_id(0)
    s0 = tl.program_id(1) * SB
    region = tl.load(blk_ptr + pid).to(tl.int64)
    rows = pid * BR + tl.arange(0, BR)
    live = (tl.load(act_ptr + region) != 0) | (pid == tl.num_programs(0) - 1)
    return pid, s0, region, rows, tl.where(live, S, 0)


@triton.jit
def _conv1_operands(tab_ptr, w_ptr, rows, region, TAPS: tl.constexpr, NP: tl.constexpr):
    """Layer 1: the tap and column ranges, the (BR, TAPS) gather offsets of the block's rows
    and the region's (TAPS, NP) weights."""
    taps = tl.arange(0, TAPS)
    cols = tl.arange(0, NP)
    idx = tl.load(tab_ptr + rows[:, None] * TAPS + taps[None, :]).to(tl.int64)
    w = tl.load(w_ptr + region * TAPS * NP + taps[:, None] * NP + cols[None, :])
    return taps, cols, idx, w


@triton.jit
def _conv2_operands(
    tab_ptr, w_ptr, b_ptr, rows, region,
    TAPS: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, P3: tl.constexpr,
):  # fmt: skip
    """Layer 2: the patch, channel and pooling ranges, the (BR, TAPS * C1) patch offsets in a
    sample's layer 1 (tap ``k // C1``, channel ``k % C1``), the region's (TAPS * C1, C2)
    weights and its bias."""
    k = tl.arange(0, TAPS * C1)
    c2 = tl.arange(0, C2)
    p3 = tl.arange(0, P3)
    idx = tl.load(tab_ptr + rows[:, None] * TAPS + (k // C1)[None, :]).to(tl.int64)
    offs = idx * C1 + (k % C1)[None, :]
    w = tl.load(w_ptr + region * TAPS * C1 * C2 + k[:, None] * C2 + c2[None, :])
    b = tl.load(b_ptr + region * C2 + c2)
    return k, c2, p3, offs, w, b


@triton.jit
def _add_gradient(ptr, pid, region, size, offs, acc, DET: tl.constexpr):
    """Add a block's gradient ``acc`` (summed over its samples): DET, into its own partial
    (block, sample group) of ``size`` values, reduced by ``_segment_sum``; else atomically into
    the region's ``size`` values."""
    if DET:
        part = pid.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
        tl.store(ptr + part * size + offs, acc)
    else:
        tl.atomic_add(ptr + region * size + offs, acc)


@triton.jit
def _conv1_fwd(
    x_ptr, x_stride, tab_ptr, blk_ptr, act_ptr, w_ptr, h_ptr, n_rows, S,
    BR: tl.constexpr, SB: tl.constexpr, TAPS: tl.constexpr, C1: tl.constexpr,
    NP: tl.constexpr,
):  # fmt: skip
    pid, s0, region, rows, S = _block(blk_ptr, act_ptr, S, BR, SB)
    taps, cols, idx, w = _conv1_operands(tab_ptr, w_ptr, rows, region, TAPS, NP)
    out_mask = cols[None, :] < C1
    for i in range(SB):
        s = s0 + i
        if s < S:
            s64 = s.to(tl.int64)
            v = tl.load(x_ptr + s64 * x_stride + idx)
            acc = tl.maximum(tl.dot(v, w), 0.0)
            ptrs = h_ptr + (s64 * n_rows + rows[:, None]) * C1 + cols[None, :]
            tl.store(ptrs, acc.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv2_fwd(
    h_ptr, n_rows1, tab_ptr, blk_ptr, act_ptr, w_ptr, b_ptr, pool_ptr, out_ptr, m_ptr, n_rows2,
    S, R,
    BR: tl.constexpr, SB: tl.constexpr, TAPS: tl.constexpr, C1: tl.constexpr,
    C2: tl.constexpr, P3: tl.constexpr, DET: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    # DET: out_ptr is the (S, blocks, C2, P3) partial buffer, reduced by _segment_sum;
    # else the pooled features (S, R, C2, P3), accumulated with atomics
    pid, s0, region, rows, S = _block(blk_ptr, act_ptr, S, BR, SB)
    k, c2, p3, offs, w, b = _conv2_operands(tab_ptr, w_ptr, b_ptr, rows, region, TAPS, C1, C2, P3)
    pw_t = tl.load(pool_ptr + rows[None, :] * P3 + p3[:, None])  # (P3, BR) float32
    for i in range(SB):
        s = s0 + i
        if s < S:
            s64 = s.to(tl.int64)
            v = tl.load(h_ptr + s64 * n_rows1 * C1 + offs)
            pre = tl.dot(v, w) + b[None, :]
            h2 = tl.maximum(pre, 0.0)  # (BR, C2) float32
            if MASK:  # ReLU's mask for the backward (which then need not recompute layer 2)
                m_ptrs = m_ptr + (s64 * n_rows2 + rows[:, None]) * C2 + c2[None, :]
                tl.store(m_ptrs, (pre > 0).to(tl.int8))
            contrib = tl.dot(pw_t, h2)  # (P3, C2)
            if DET:
                n_blk = tl.num_programs(0)
                ptrs = out_ptr + ((s64 * n_blk + pid) * C2 + c2[None, :]) * P3 + p3[:, None]
                tl.store(ptrs, contrib)
            else:
                ptrs = out_ptr + ((s64 * R + region) * C2 + c2[None, :]) * P3 + p3[:, None]
                tl.atomic_add(ptrs, contrib, sem="relaxed")


@triton.jit
def _conv2_bwd(
    h_ptr, n_rows1, tab_ptr, blk_ptr, act_ptr, w_ptr, pool_ptr, dout_ptr, m_ptr, dp_ptr, dw_ptr,
    db_ptr, n_rows2, S, R,
    BR: tl.constexpr, SB: tl.constexpr, TAPS: tl.constexpr, C1: tl.constexpr,
    C2: tl.constexpr, P3: tl.constexpr, DET: tl.constexpr,
):  # fmt: skip
    # DET: dw_ptr/db_ptr are (blocks, sample groups, ...) partial buffers (see _segment_sum)
    pid, s0, region, rows, S = _block(blk_ptr, act_ptr, S, BR, SB)
    # the pre-activation is not recomputed (the mask comes from the forward): no operands of
    # _conv2_operands but its ranges
    k, c2, p3 = tl.arange(0, TAPS * C1), tl.arange(0, C2), tl.arange(0, P3)
    idx_t = tl.load(tab_ptr + rows[None, :] * TAPS + (k // C1)[:, None]).to(tl.int64)
    offs_t = idx_t * C1 + (k % C1)[:, None]  # (256, BR)
    w_t = tl.load(w_ptr + region * TAPS * C1 * C2 + k[None, :] * C2 + c2[:, None])  # (C2, 256)
    pw = tl.load(pool_ptr + rows[:, None] * P3 + p3[None, :])  # (BR, P3)
    acc_w = tl.zeros((TAPS * C1, C2), dtype=tl.float32)
    acc_b = tl.zeros((C2,), dtype=tl.float32)
    for i in range(SB):
        s = s0 + i
        if s < S:
            s64 = s.to(tl.int64)
            hs = h_ptr + s64 * n_rows1 * C1
            # the forward's ReLU mask: one contiguous (BR, C2) int8 read instead of a second
            # (BR x 256) gather of layer 1 and a product (docs/benchmarks.md)
            m = tl.load(m_ptr + (s64 * n_rows2 + rows[:, None]) * C2 + c2[None, :])
            g = tl.load(dout_ptr + ((s64 * R + region) * C2 + c2[None, :]) * P3 + p3[:, None])
            dh2 = tl.dot(pw, g)  # (BR, C2)
            dpre = tl.where(m != 0, dh2, 0.0)
            dpre_lo = dpre.to(h_ptr.dtype.element_ty)
            v_t = tl.load(hs + offs_t)
            acc_w += tl.dot(v_t, dpre_lo)
            acc_b += tl.sum(dpre, axis=0)
            dp = tl.dot(dpre_lo, w_t)  # (BR, 256)
            ptrs = dp_ptr + (s64 * n_rows2 + rows[:, None]) * (TAPS * C1) + k[None, :]
            tl.store(ptrs, dp.to(dp_ptr.dtype.element_ty))
    _add_gradient(dw_ptr, pid, region, TAPS * C1 * C2, k[:, None] * C2 + c2[None, :], acc_w, DET)
    _add_gradient(db_ptr, pid, region, C2, c2, acc_b, DET)


@triton.jit
def _conv1_bwd(
    x_ptr, x_stride, tab_ptr, blk_ptr, act_ptr, h_ptr, n_rows1, sc_ptr, dp_ptr, n_rows2, dw_ptr,
    S,
    BR: tl.constexpr, SB: tl.constexpr, TAPS: tl.constexpr, C1: tl.constexpr,
    NP: tl.constexpr, SCW: tl.constexpr, DET: tl.constexpr,
):  # fmt: skip
    pid, s0, region, rows, S = _block(blk_ptr, act_ptr, S, BR, SB)
    taps, cols = tl.arange(0, TAPS), tl.arange(0, NP)  # (the mask comes from the forward)
    idx_t = tl.load(tab_ptr + rows[None, :] * TAPS + taps[:, None]).to(tl.int64)  # (TAPS, BR)
    sc = tl.load(sc_ptr + rows[:, None] * SCW + tl.arange(0, SCW)[None, :]).to(tl.int64)
    dp_offs = sc[:, :, None] * C1 + cols[None, None, :]  # (BR, SCW, NP)
    dp_mask = cols[None, None, :] < C1
    acc = tl.zeros((TAPS, NP), dtype=tl.float32)
    for i in range(SB):
        s = s0 + i
        if s < S:
            s64 = s.to(tl.int64)
            xs = x_ptr + s64 * x_stride
            # ReLU's mask from the stored layer 1 (h > 0 exactly where the pre-activation is,
            # bar float32 values below bfloat16's smallest subnormal): a contiguous read
            # instead of a second (BR x 32) gather of the input and a product
            h_ptrs = h_ptr + (s64 * n_rows1 + rows[:, None]) * C1 + cols[None, :]
            h = tl.load(h_ptrs, mask=cols[None, :] < C1, other=0.0)
            base = dp_ptr + s64 * n_rows2 * TAPS * C1
            dh = tl.sum(tl.load(base + dp_offs, mask=dp_mask, other=0.0).to(tl.float32), axis=1)
            dpre = tl.where(h > 0, dh, 0.0)
            v_t = tl.load(xs + idx_t)
            acc += tl.dot(v_t, dpre.to(v_t.dtype))
    _add_gradient(dw_ptr, pid, region, TAPS * NP, taps[:, None] * NP + cols[None, :], acc, DET)


@triton.jit
def _segment_sum(
    p_ptr, p_stride, seg_ptr, act_ptr, scale, out_ptr, out_stride, K,
    BK: tl.constexpr,
):  # fmt: skip
    """out[b, r, :] = sum over j in [seg[r] * scale, seg[r + 1] * scale) of p[b, j, :], j in
    increasing order (one program per region, batch entry and column chunk): the fixed-order
    replacement of the atomic adds."""
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BK + tl.arange(0, BK)
    mask = cols < K
    first = tl.load(seg_ptr + r) * scale
    last = tl.load(seg_ptr + r + 1) * scale
    last = tl.where(tl.load(act_ptr + r) != 0, last, first)  # not training: 0, not computed
    ptrs = p_ptr + b * p_stride + first.to(tl.int64) * K + cols
    acc = tl.zeros((BK,), dtype=tl.float32)
    # a while loop, not ``range(first, last)``: the Triton interpreter turns a loaded bound into
    # a Python int through a 1-element array, which NumPy >= 2.4 refuses (the interpreter test
    # failed on the device host with Triton 3.6); compiled, both are the same scf loop
    j = first
    while j < last:
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += K
        j += 1
    tl.store(out_ptr + b * out_stride + r * K + cols, acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


def _segment_reduce(part, seg, scale: int, n_regions: int, active: torch.Tensor):
    """Fixed-order sums of a region's partials: ``part`` (B, J, K) -> (B, R, K) float32, row
    ``j`` of region ``r`` for ``seg[r] * scale <= j < seg[r + 1] * scale``."""
    b, _, k = part.shape
    out = torch.empty((b, n_regions, k), device=part.device, dtype=torch.float32)
    bk = min(1024, triton.next_power_of_2(k))
    _segment_sum[(n_regions, b, triton.cdiv(k, bk))](
        part, part.stride(0), seg, active, scale, out, out.stride(0), k, BK=bk, num_warps=4
    )
    return out


def _forward(
    x, w1, w2, b2, t: RaggedTables, n_regions: int, active, deterministic=True, mask=False
):
    s_count = x.shape[0]
    dev = x.device
    h1 = torch.empty((s_count, t.rows1, C1), device=dev, dtype=x.dtype)
    grid1 = (t.rows1 // BR1, triton.cdiv(s_count, SB))
    _conv1_fwd[grid1](
        x, x.stride(0), t.tab1, t.blk1, active, w1, h1, t.rows1, s_count,
        BR=BR1, SB=SB, TAPS=TAPS, C1=C1, NP=NP1, num_warps=4,
    )  # fmt: skip
    n_blk2 = t.rows2 // BR2
    grid2 = (n_blk2, triton.cdiv(s_count, SB))
    if deterministic:  # every (sample, block) partial is written: no zero fill needed
        out = torch.empty((s_count, n_blk2, C2, t.pool3), device=dev, dtype=torch.float32)
    else:
        out = torch.zeros((s_count, n_regions, C2, t.pool3), device=dev, dtype=torch.float32)
    # layer 2's ReLU mask, for a backward (int8, 16 values per row)
    m2 = torch.empty((s_count, t.rows2, C2), device=dev, dtype=torch.int8) if mask else h1
    _conv2_fwd[grid2](
        h1, t.rows1, t.tab2, t.blk2, active, w2, b2, t.pool2, out, m2, t.rows2, s_count,
        n_regions,
        BR=BR2, SB=SB, TAPS=TAPS, C1=C1, C2=C2, P3=t.pool3, DET=deterministic, MASK=mask,
        num_warps=4,
    )  # fmt: skip
    if deterministic:
        out = _segment_reduce(out.view(s_count, n_blk2, -1), t.seg2, 1, n_regions, active)
    return h1, m2, out.view(s_count, n_regions, C2, t.pool3)


class FusedConvs(torch.autograd.Function):
    """(x, w1, w2, b2) -> pooled features (S, R, 16 * pool^3) float32 (see module docstring).

    ``deterministic`` (default True): fixed-order reductions instead of atomic adds (see the
    module docstring). ``active`` (R,) int32, engine order: regions whose entry is 0 are not
    computed (their pooled features and gradients are 0; the others are bit for bit what they
    are with every region active)."""

    @staticmethod
    def forward(
        ctx, x, w1, w2, b2, tables: RaggedTables, n_regions: int, active, deterministic=True
    ):
        deterministic = bool(deterministic)
        grad = any(ctx.needs_input_grad[:4])
        h1, m2, pooled = _forward(x, w1, w2, b2, tables, n_regions, active, deterministic, grad)
        ctx.save_for_backward(x, w1, w2, b2, h1, m2, active)
        ctx.tables, ctx.n_regions, ctx.deterministic = tables, n_regions, deterministic
        return pooled.view(x.shape[0], n_regions, C2 * tables.pool3)

    @staticmethod
    def backward(ctx, dpooled):
        x, w1, w2, b2, h1, m2, active = ctx.saved_tensors
        t, n_regions, det = ctx.tables, ctx.n_regions, ctx.deterministic
        s_count = x.shape[0]
        dev = x.device
        dpooled = dpooled.contiguous().float()
        n_blk1, n_blk2, n_sg = t.rows1 // BR1, t.rows2 // BR2, triton.cdiv(s_count, SB)
        if det:  # per (block, sample group) partials, each written exactly once
            dw2 = torch.empty((n_blk2 * n_sg,) + tuple(w2.shape[1:]), device=dev,
                              dtype=torch.float32)  # fmt: skip
            db2 = torch.empty((n_blk2 * n_sg,) + tuple(b2.shape[1:]), device=dev,
                              dtype=torch.float32)  # fmt: skip
            dw1 = torch.empty((n_blk1 * n_sg,) + tuple(w1.shape[1:]), device=dev,
                              dtype=torch.float32)  # fmt: skip
        else:
            dw2 = torch.zeros(w2.shape, device=dev, dtype=torch.float32)
            db2 = torch.zeros(b2.shape, device=dev, dtype=torch.float32)
            dw1 = torch.zeros(w1.shape, device=dev, dtype=torch.float32)
        dp = torch.empty((s_count, t.rows2, TAPS * C1), device=dev, dtype=x.dtype)
        _conv2_bwd[(n_blk2, n_sg)](
            h1, t.rows1, t.tab2, t.blk2, active, w2, t.pool2, dpooled, m2, dp, dw2, db2, t.rows2,
            s_count, n_regions,
            BR=BR2, SB=SB, TAPS=TAPS, C1=C1, C2=C2, P3=t.pool3, DET=det, num_warps=4,
        )  # fmt: skip
        _conv1_bwd[(n_blk1, n_sg)](
            x, x.stride(0), t.tab1, t.blk1, active, h1, t.rows1, t.sc1, dp, t.rows2, dw1, s_count,
            BR=BR1, SB=SB, TAPS=TAPS, C1=C1, NP=NP1, SCW=t.sc1.shape[1], DET=det,
            num_warps=4,
        )  # fmt: skip
        if det:
            n, a = n_regions, active
            dw2 = _segment_reduce(dw2.view(1, n_blk2 * n_sg, -1), t.seg2, n_sg, n, a)
            db2 = _segment_reduce(db2.view(1, n_blk2 * n_sg, -1), t.seg2, n_sg, n, a)
            dw1 = _segment_reduce(dw1.view(1, n_blk1 * n_sg, -1), t.seg1, n_sg, n, a)
            dw2, db2, dw1 = dw2.view(w2.shape), db2.view(b2.shape), dw1.view(w1.shape)
        dw = (dw1.to(w1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype))
        return (None, *dw, None, None, None, None)


def pack_weights(conv1_w, conv1_b, conv2_w, conv2_b, dtype):
    """Differentiable repacking of stacked conv parameters into the kernels' layouts."""
    r, c1 = conv1_w.shape[:2]
    c2 = conv2_w.shape[1]
    k3 = int(np.prod(conv1_w.shape[2:]))
    w1 = torch.cat([conv1_w.reshape(r, c1, k3).transpose(1, 2), conv1_b.unsqueeze(1)], 1)
    w1 = torch.nn.functional.pad(w1, (0, NP1 - c1, 0, TAPS - k3 - 1)).to(dtype)
    w2 = conv2_w.permute(0, 3, 4, 5, 2, 1).reshape(r, k3 * c1, c2)
    w2 = torch.nn.functional.pad(w2, (0, 0, 0, (TAPS - k3) * c1)).to(dtype)
    return w1.contiguous(), w2.contiguous(), conv2_b.float().contiguous()


__all__ = ["RaggedTables", "ragged_tables", "FusedConvs", "pack_weights", "conv_out"]
