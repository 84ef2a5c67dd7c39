"""Stage 1 of :func:`.train.fit`: all region siamese networks trained at once, with per-region
early stopping behind a gate (:class:`_RegionEarlyStop`); on CUDA each full batch replays a
captured CUDA graph of the whole step (:class:`SiameseStep`). See :mod:`.train`, step 3.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .graphed import GraphedStep
from .losses import hinge, siamese_loss, similarity
from .numerics import _batch, _embed
from .options import TrainConfig, _emit, step_batch
from .siamese import PARAM_NAMES, SiameseBank

#: One-sided level of the paired gate (see :class:`_RegionEarlyStop`).
GATE_ALPHA = 0.05


def _region_hinges(bank, emb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Hinge per region and subject of embeddings (N, R, 2E) with targets (N,) -> (R, N), the
    regions in the bank's *engine* order, the order of its stacked parameters: the embeddings
    come in atlas order, and the early stopping's per-region decisions select parameter rows.
    (Until 2026-12 they were compared in atlas order: each region's snapshot and stop were
    decided by another region's validation loss; ``tests/test_model_train.py``.)"""
    e = emb.shape[-1] // 2
    y = similarity(emb[..., :e].transpose(0, 1), emb[..., e:].transpose(0, 1))
    return hinge(y, t.float().unsqueeze(0)).index_select(0, bank.order)


class _RegionEarlyStop:
    """Per-region early stopping with best-weight snapshots (stacked parameters).

    The untrained network (epoch 0) is the first snapshot. An epoch counts as an improvement
    for a region only if its validation loss is below the kept snapshot's *and* it passes the
    region's gate against the untrained network:

    * ``"paired"`` (default): a one-sided paired t-test over the validation subjects of the
      per-subject hinge of this epoch minus that of the untrained network, at level
      ``GATE_ALPHA``. Pairing removes the between-subject spread of the hinge, which at
      initialisation is large (the untrained cosine is similar for every subject, so the
      hinge is near 0 for one class and near 2-3 for the other) and which made the old gate
      nearly impossible to pass on a handful of validation subjects.
    * ``"constant"`` (development folds only, docs/benchmarks.md): the paired
      test above *and* a one-sided t-test that the validation subjects' hinge is below the mean
      hinge of the best constant similarity (``y = +1`` or ``y = -1`` for every subject,
      whichever is lower on the validation part; 1 with balanced classes). The untrained
      network's cosine is about the same for every subject, so merely shrinking it towards 0
      already beats the untrained network on unseen subjects without carrying class
      information; a constant cannot be beaten that way. Needs ``targets``. Its patience
      counts epochs without any improvement of the validation loss (gated or not), so a
      network still on its way below the constant keeps training.
    * ``"se"`` (the previous gate): the loss must fall below the untrained loss minus two
      standard errors of the per-subject untrained hinge.
    * ``"none"``: any epoch with a lower validation loss is kept.

    A region stops after ``patience`` epochs without an improvement, or once its kept loss is
    below the threshold (paper: 0.01). A region whose network never does clearly better than
    at initialisation on unseen subjects keeps its untrained weights instead of a state that
    has memorised the training subjects, which would hand the attention stage features that
    separate the training subjects and nobody else.
    """

    def __init__(
        self, params, hinge0, threshold, patience, gate="paired", significance=2.0, targets=None
    ):
        self.params = params
        self.hinge_const = None
        if gate == "constant":
            t = torch.as_tensor(targets, dtype=hinge0.dtype, device=hinge0.device).reshape(1, -1)
            best = min(float(hinge(torch.full_like(t, c), t).mean()) for c in (1.0, -1.0))
            self.hinge_const = torch.full_like(hinge0, best)
        self.best_params = [p.detach().clone() for p in params]
        self.hinge0 = hinge0
        init_val = hinge0.mean(1)
        n = hinge0.shape[1]
        se = hinge0.std(1, unbiased=False) / math.sqrt(n)
        self.gate_mode = gate
        self.se_gate = torch.clamp(init_val - significance * se, min=threshold)
        if n >= 2:
            from scipy.stats import t as student_t

            self.t_crit = float(student_t.ppf(1 - GATE_ALPHA, n - 1))
        else:
            self.t_crit = math.inf
        self.initial = init_val.clone()
        self.kept = init_val.clone()  # loss of the kept snapshot
        self.best_seen = init_val.clone()  # lowest validation loss of any epoch
        n_regions, device = init_val.numel(), init_val.device
        self.stale = torch.zeros(n_regions, dtype=torch.long, device=device)
        self.done = torch.zeros(n_regions, dtype=torch.bool, device=device)
        self.stop_epoch = torch.zeros(n_regions, dtype=torch.long, device=device)
        self.threshold, self.patience = threshold, patience

    def _passes(self, hinges: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        if self.gate_mode == "none":
            return torch.ones_like(val, dtype=torch.bool)
        if self.gate_mode == "se":
            return val <= self.se_gate
        ok = self._paired(hinges - self.hinge0)  # (R, n) paired differences
        if self.hinge_const is not None:
            ok &= self._paired(hinges - self.hinge_const)
        return ok

    def _paired(self, d: torch.Tensor) -> torch.Tensor:
        """One-sided paired t-test per region that the differences (R, n) are below 0."""
        n = d.shape[1]
        if n < 2:
            return torch.zeros(d.shape[0], dtype=torch.bool, device=d.device)
        mean = d.mean(1)
        se = d.std(1, unbiased=True) / math.sqrt(n)
        # t <= -t_crit, written without dividing by a zero SE (all differences equal)
        return (mean < 0) & (mean <= -self.t_crit * se)

    @torch.no_grad()
    def update(self, hinges: torch.Tensor, epoch: int) -> bool:
        """``hinges``: (R, n) per-subject validation hinge of this epoch."""
        val = hinges.mean(1)
        active = ~self.done
        keep = (val < self.kept) & self._passes(hinges, val) & active
        self.kept = torch.where(keep, val, self.kept)
        progress = keep
        if self.gate_mode == "constant":
            # the patience counts epochs without *any* validation improvement: a network on its
            # way below the constant's hinge is not stopped for not being there yet (with the
            # patience counting gated epochs, only 0.40 of the planted networks of a dev-ad-906
            # fold trained, docs/benchmarks.md)
            progress = keep | (val < self.best_seen)
        self.best_seen = torch.minimum(self.best_seen, val)
        self.stale = torch.where(progress, 0, self.stale + 1)
        for p, b in zip(self.params, self.best_params, strict=True):
            shape = (-1,) + (1,) * (p.dim() - 1)
            b.copy_(torch.where(keep.view(shape), p, b))
        self.stop_epoch = torch.where(keep, epoch, self.stop_epoch)
        newly = active & ((self.kept < self.threshold) | (self.stale >= self.patience))
        self.done |= newly
        return bool(self.done.all())

    @torch.no_grad()
    def restore(self) -> None:
        for p, b in zip(self.params, self.best_params, strict=True):
            p.copy_(b)


#: Adam updates only the regions still training (CUDA; :class:`_RowAdam`). A stopped region's
#: weights are restored from its snapshot when the stage ends, so updating them changes
#: nothing; the fused optimizer over all 125M parameters was 1.29 ms of a 5.4 ms step while
#: half of the regions stop by epoch ~30 of 70-100 (docs/benchmarks.md). ``False`` gives back
#: torch's optimizer inside the captured graph (benchmarks).
ROW_ADAM = True


class _RowAdam:
    """Adam over the rows (regions) of stacked parameters that are still training: torch's
    fused Adam kernel (``torch._fused_adam_``, as ``torch.optim.Adam(fused=True)`` runs it:
    the same arithmetic per element, one float32 step count) on row views of the parameters,
    gradients and moments. Bit for bit ``torch.optim.Adam(fused=True)`` on those rows
    (``tests/test_model_train.py``); the other rows are left as they are."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = float(lr), betas, float(eps)

        def zeros():
            return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

        self.exp_avg, self.exp_avg_sq = zeros(), zeros()
        self.step_count = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        self.runs: list[tuple[int, int]] | None = None  # row ranges; None: every row
        self._rows = None  # the mask the runs came from
        self._make_views()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def set_rows(self, rows) -> None:
        """Which rows (bool (R,), host) are updated from now on; ``None`` or all: every row.
        Called once per epoch; the views are remade only when the rows change."""
        rows = None if rows is None or np.all(rows) else np.asarray(rows, dtype=bool)
        if rows is None or self._rows is None:
            if rows is self._rows:
                return
        elif np.array_equal(rows, self._rows):
            return
        self._rows = rows
        if rows is None:
            self.runs = None
        else:
            flips = np.diff(np.concatenate([[False], rows, [False]]).astype(np.int8))
            edges = np.flatnonzero(flips)
            self.runs = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
        self._make_views()

    def _make_views(self) -> None:
        # row views, made once per change: slicing hundreds of views per step cost more host
        # time than the GPU spent on the step (docs/benchmarks.md, sixth session)
        self._views = [self._rows_of(t) for t in (self.params, self.exp_avg, self.exp_avg_sq)]
        self._grads = (None, None)

    def _rows_of(self, tensors) -> list:
        if self.runs is None:
            return list(tensors)
        return [t[a:b] for t in tensors for a, b in self.runs]

    @torch.no_grad()
    def step(self, grads=None) -> None:
        """One Adam step of the selected rows on ``grads`` (default: the parameters' .grad);
        the same list object in every call (a graph's gradients) reuses its row views."""
        if grads is None:
            grad_rows = self._rows_of([p.grad for p in self.params])
        elif self._grads[0] is grads:
            grad_rows = self._grads[1]
        else:
            grad_rows = self._rows_of(grads)
            self._grads = (grads, grad_rows)
        params, exp_avg, exp_avg_sq = self._views
        self.step_count.add_(1)
        if not params:
            return
        torch._fused_adam_(
            params,
            grad_rows,
            exp_avg,
            exp_avg_sq,
            [],
            [self.step_count] * len(params),
            amsgrad=False,
            lr=self.lr,
            beta1=self.beta1,
            beta2=self.beta2,
            weight_decay=0,
            eps=self.eps,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )


class SiameseStep(GraphedStep):
    """One optimizer step of all region networks on a batch of subject indices.

    On CUDA with ``graphs=True``, full-size batches replay a captured CUDA graph of the whole
    step (batch assembly, forward, backward, Adam): the step is hundreds of small kernels, and
    the graph removes their launch cost. The first ``WARMUP`` full batches run eagerly (real
    steps, on a side stream, as capture requires), partial batches always run eagerly; both
    paths run the same kernels on the same tensors.
    """

    def __init__(self, bank, xm, xp, t, dtype, lr, batch_size, graphs: bool):
        self.bank, self.xm, self.xp, self.t, self.dtype = bank, xm, xp, t, dtype
        self.params = [bank.param(n) for n in PARAM_NAMES]
        graphs = bool(graphs) and xm.device.type == "cuda"
        self.row_adam = ROW_ADAM and xm.device.type == "cuda"
        if self.row_adam:
            self.opt = _RowAdam(self.params, lr=lr)
        elif xm.device.type == "cuda":
            self.opt = torch.optim.Adam(self.params, lr=lr, fused=True, capturable=graphs)
        else:
            self.opt = torch.optim.Adam(self.params, lr=lr, foreach=True)
        self.static_grads = None
        self._setup_graph(xm.device, batch_size, graphs)

    def set_running(self, running) -> None:
        """The regions (engine order, bool (R,) on the host) that Adam still updates."""
        if self.row_adam:
            self.opt.set_rows(running)

    def _forward_backward(self, idx: torch.Tensor) -> torch.Tensor:
        b = idx.numel()
        out = self.bank(_batch(self.xm, self.xp, idx), self.dtype)
        losses = siamese_loss(out[:, :b], out[:, b:], self.t.index_select(0, idx))
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        return losses.detach()

    def _eager(self, idx: torch.Tensor) -> torch.Tensor:
        losses = self._forward_backward(idx)
        self.opt.step()
        return losses

    def _captured(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.row_adam:
            return self._eager(idx)
        # the graph holds forward and backward; Adam runs after each replay over the rows of
        # the regions still training (they change from epoch to epoch), on the gradients the
        # graph writes (an eager partial batch may have replaced the parameters' .grad since)
        losses = self._forward_backward(idx)
        self.static_grads = [p.grad for p in self.params]
        return losses

    def _replayed(self) -> None:
        if self.row_adam:
            self.opt.step(self.static_grads)


def train_siamese(
    bank: SiameseBank,
    xm: torch.Tensor,
    xp: torch.Tensor,
    t: torch.Tensor,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    dtype: torch.dtype,
    generator: torch.Generator,
    history: list,
    eval_chunk: int,
    graphs: bool = True,
) -> dict[str, np.ndarray]:
    """Stage 1 (see the module docstring); per region: the kept epoch (``stop_epoch``, 0 =
    untrained), the mean validation hinge of the untrained (``val_hinge_initial``) and of the
    kept network (``val_hinge_kept``); NaN without a validation part."""
    device = xm.device
    bs = step_batch(config.batch_size, len(train_idx))
    step = SiameseStep(bank, xm, xp, t, dtype, config.learning_rate, bs, graphs)
    tr = torch.as_tensor(train_idx, dtype=torch.long)
    va = torch.as_tensor(val_idx, dtype=torch.long, device=device)
    xm_va, xp_va, t_va = xm.index_select(0, va), xp.index_select(0, va), t.index_select(0, va)
    if va.numel():
        bank.eval()
        h0 = _region_hinges(bank, _embed(bank, xm_va, xp_va, dtype, eval_chunk), t_va)
        stopper = _RegionEarlyStop(
            step.params,
            h0,
            config.early_stop_loss,
            config.patience,
            gate=config.gate,
            targets=t_va,
        )
    n_tr = tr.numel()
    last = 0
    # a stopped region's losses as of its last epoch of training (the history's per-epoch
    # means use them: the fused kernels no longer compute its network, see set_active)
    frozen_train = torch.zeros(bank.n_regions, device=device)
    frozen_val = torch.zeros(bank.n_regions, device=device)
    running = torch.ones(bank.n_regions, dtype=torch.bool, device=device)
    try:
        for epoch in range(1, config.epochs + 1):
            bank.train()
            perm = tr[torch.randperm(n_tr, generator=generator)].to(device)
            total = torch.zeros(bank.n_regions, device=device)
            for start in range(0, n_tr, bs):
                idx = perm[start : start + bs]
                total += step(idx) * idx.numel()
            train_loss = torch.where(running, total / n_tr, frozen_train)
            last = epoch
            if va.numel():
                bank.eval()
                hinges = _region_hinges(bank, _embed(bank, xm_va, xp_va, dtype, eval_chunk), t_va)
                val = torch.where(running, hinges.mean(1), frozen_val)
                finished = stopper.update(hinges, epoch)
                val_mean = float(val.mean())
                frozen_train, frozen_val = train_loss, val
                running = ~stopper.done
                bank.set_active(running)
                step.set_running(running.cpu().numpy())
            else:
                finished, val_mean = False, float("nan")
            _emit(
                config,
                history,
                {
                    "stage": "siamese",
                    "epoch": epoch,
                    "train_loss": float(train_loss.mean()),
                    "val_loss": val_mean,
                },
            )
            if finished:
                break
    finally:
        bank.set_active(None)
        # the gradients live in the captured graph's memory pool (0.5 GB for the AAL bank);
        # the fitted model does not need them
        step.opt.zero_grad(set_to_none=True)
    if va.numel():
        stopper.restore()
        atlas = bank.inverse  # the stopper's engine order back to atlas order
        return {
            "stop_epoch": stopper.stop_epoch[atlas].cpu().numpy(),
            "val_hinge_initial": stopper.initial[atlas].double().cpu().numpy(),
            "val_hinge_kept": stopper.kept[atlas].double().cpu().numpy(),
        }
    nan = np.full(bank.n_regions, np.nan)
    return {
        "stop_epoch": np.full(bank.n_regions, last),
        "val_hinge_initial": nan,
        "val_hinge_kept": nan.copy(),
    }
