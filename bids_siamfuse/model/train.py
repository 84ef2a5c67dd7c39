"""Training of the siamese-attention model on one training set (one CV fold, or everything).

API (stable; the group level builds on it)
    ::

        config = TrainConfig(device="cuda", seed=0)   # every knob, seeds included, lives here
        model = fit(train_data, config)               # RegionDataset -> FittedModel
        model.predict_proba(test_data)                # (N, n_classes)
        model.embed(data)                             # (N, R, 40): MRI 20 + PET 20 per region
        model.relevance()                             # Figure 7: {"mri", "pet", "combined"} (R,)
        model.activation_counts(data)                 # Figure 6: {"mri", "pet", "fused"} (N, R)
        model.subject_relevance(data)                 # {"mri", "pet", "combined"} (N, R)
        tensors, meta = model.state()                 # for safetensors + JSON
        FittedModel.from_state(tensors, meta, layout, device="cpu")

What :func:`fit` does, seeing nothing but ``train``
    1. Fits the :class:`~.data.Standardizer` (paper eq. 1) on ``train``.
    2. Splits the *subjects* of ``train`` into a training part and a validation part
       (``val_fraction``, stratified by class, all sessions of a subject on one side, drawn with
       ``seed``); the validation part only decides early stopping.
    3. Trains all region siamese networks at once (:class:`~.siamese.SiameseBank`) with Adam on
       the sum over regions of each region's mean hinge loss (:mod:`.losses`; Adam is
       element-wise, so this is exactly 116 independent trainings run as one computation). Early
       stopping is *per region*, as if each network were trained alone: a region stops once its
       validation loss falls below ``early_stop_loss`` (paper: 0.01) or has not improved for
       ``patience`` epochs, and keeps the weights of its best validation epoch; training ends
       when every region has stopped or after ``epochs`` epochs. The untrained network (epoch 0)
       is the first candidate, and an epoch only counts as an improvement if its loss is also
       below the region's gate: the untrained loss minus two standard errors of its
       per-subject validation hinge (or 0.01, if higher). A region that never generalises
       keeps its untrained weights rather than a state that memorised the training subjects,
       which made the attention stage trust features that separate the training subjects and
       nobody else (first two folds of a 32-subject strong-effect sloppy CV: balanced accuracy
       0.60/0.90 without the gate, 0.90/1.00 with it). Stopped regions keep being computed (one
       batched computation) but no longer change their kept weights. History rows hold the
       means over regions; ``FittedModel.info`` has each region's kept epoch.
    4. Embeds both parts (R x 40 per subject) and trains the attention module
       (:mod:`.attention`) on the training part with Adam (L2 weight decay
       ``ATTENTION_WEIGHT_DECAY``) on class-balanced cross-entropy, with the same early
       stopping on the validation part's loss; the best epoch's weights are kept. The
       embedding standardization and the mean attention mask (Figure 7) come from the training
       part.

Fusion variants, gate, ablations (issue 12)
    ``fusion="paper"`` (default) feeds the attention stage the region embeddings (R x 40), as
    the paper does; ``fusion="similarity"`` adds per region the MRI-PET similarity, the scaled
    cosine the hinge loss trained (R x 41). ``gate`` picks which siamese epochs may replace a
    region's untrained network (:class:`_RegionEarlyStop`; default ``"paired"``).
    ``ablations=True`` (cross-validation) also trains, from the same networks and split, the
    attention heads of ``ablation_specs``: the other fusion variant, the similarities alone,
    the untrained networks (a copy of the bank at initialisation), MRI-only and PET-only
    embeddings; :meth:`FittedModel.predict_ablations` scores them. The model itself is trained
    first, so it does not depend on whether ablations run. ``FittedModel.info`` records per
    region the kept epoch and the mean validation hinge of the untrained and kept networks.

Precision, devices, speed
    ``device`` is whatever the caller passes (``"cpu"``, ``"cuda"``, ``"cuda:1"``). ``amp=None``
    runs the convolutions in bfloat16 on CUDA (fused Triton kernels, :mod:`.kernels`, when
    Triton imports) and the linear layers in float32 with TF32 products, with float32 master
    weights and optimizer state; float32 throughout on the CPU. On CUDA each full training
    batch replays a captured CUDA graph of the whole step (:class:`SiameseStep`). Seeds:
    ``seed`` drives the weight initialisation (drawn on the CPU, so identical on every
    device), the validation split and the batch order; nothing reads or sets global RNGs. On the
    CPU, the same seed and thread count give the same model. On CUDA too, by default
    (``deterministic=True``): fixed-order reductions in the fused kernels and torch's
    deterministic mode (:func:`_tf32`) give the same bits on every run, process and GPU of one
    model; ``deterministic=False`` is the opt-in atomic path (docs/benchmarks.md).

Sloppy mode (``sloppy=True``, for tests and quick looks; same code path)
    Crops averaged over 2x2x2 blocks (3 mm voxels, 8x fewer) and pooled to 2^3 instead of 4^3
    before the first linear layer (128 inputs instead of 1024); at most ``SLOPPY_EPOCHS``
    epochs and a patience of at most ``SLOPPY_PATIENCE``. Timings of a 32-subject 4-fold CV on
    2 CPU cores are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .attention import (
    AttentionClassifier,
    mask_counts,
    subject_relevance,
    weight_relevance,
)
from .data import RegionDataset, RegionLayout, Standardizer
from .geometry import RegionGrid, coarsen
from .losses import SIMILARITY_SCALE, hinge, siamese_loss, siamese_targets, similarity
from .siamese import PARAM_NAMES, SiameseArch, SiameseBank, extend

__all__ = [
    "TrainConfig",
    "FittedModel",
    "fit",
    "split_validation",
    "SLOPPY_EPOCHS",
    "SLOPPY_PATIENCE",
    "FORMAT",
]

FORMAT = "bids_siamfuse/siamese-attention"
FORMAT_VERSION = 2  # 2: fusion variants (per-region similarity features)
SLOPPY_EPOCHS = 30
SLOPPY_PATIENCE = 8
ATTENTION_HIDDEN = 128
#: L2 penalty (Adam ``weight_decay``) of the attention stage: 4640 inputs, tens of training
#: subjects. On two folds of a 32-subject CN/AD cohort (4 seeds each) it raised the balanced
#: accuracy from 0.78/0.90 to 0.88/0.95 and the relevance rank AUC of the planted regions.
ATTENTION_WEIGHT_DECAY = 0.1
#: Per-region features the attention stage sees, by fusion variant and ablation: the MRI
#: embedding (20), the PET embedding (20), the MRI-PET similarity (1: the scaled cosine that
#: the hinge loss trained).
FEATURE_SETS = {
    "paper": ("mri", "pet"),
    "similarity": ("mri", "pet", "similarity"),
    "similarity_only": ("similarity",),
    "mri_only": ("mri",),
    "pet_only": ("pet",),
}
FUSIONS = ("paper", "similarity")
GATES = ("paired", "constant", "se", "none")
#: One-sided level of the paired gate (see :class:`_RegionEarlyStop`).
GATE_ALPHA = 0.05
#: Ablations trained beside the model when ``TrainConfig.ablations``: name -> (feature set or
#: None for the model's own fusion, networks "trained" or "untrained"). The other fusion
#: variant is added as an ablation too (:func:`ablation_specs`).
ABLATIONS = {
    "similarity_only": ("similarity_only", "trained"),
    "untrained": (None, "untrained"),
    "mri_only": ("mri_only", "trained"),
    "pet_only": ("pet_only", "trained"),
}


def ablation_specs(fusion: str) -> dict[str, tuple[str, str]]:
    """Ablation name -> (feature set, networks) for a model of the given fusion variant."""
    other = "paper" if fusion == "similarity" else "similarity"
    specs = {f"{other}_fusion": (other, "trained")}
    for name, (fset, nets) in ABLATIONS.items():
        specs[name] = (fset or fusion, nets)
    return specs


def region_feature_set(emb: torch.Tensor, fset: str) -> tuple[torch.Tensor, tuple]:
    """Embeddings (N, R, 2E) -> the attention input (N, R, F) of ``fset`` and its groups."""
    e = emb.shape[-1] // 2
    parts = {
        "mri": emb[..., :e],
        "pet": emb[..., e:],
        "similarity": similarity(emb[..., :e].float(), emb[..., e:].float()).unsqueeze(-1),
    }
    names = FEATURE_SETS[fset]
    groups = tuple(g for name in names for g in (name,) * parts[name].shape[-1])
    return torch.cat([parts[n].float() for n in names], dim=-1), groups


@dataclass
class TrainConfig:
    """Everything :func:`fit` can be told (see the module docstring)."""

    epochs: int = 200  # max epochs of siamese training (and of the attention stage)
    batch_size: int = 16
    learning_rate: float = 1e-3
    early_stop_loss: float = 0.01  # paper: stop when the validation loss falls below this
    patience: int = 20  # ... or when it has not improved for this many epochs
    val_fraction: float = 0.2  # share of the *training subjects* held out for early stopping
    sloppy: bool = False  # fast mode for tests/quick looks (see the module docstring)
    seed: int = 42
    device: str = "cpu"  # "cpu", "cuda", "cuda:1" ... the caller picks
    amp: bool | None = None  # None: bf16/TF32 on CUDA, float32 on CPU
    # CUDA: fixed-order reductions + torch deterministic mode (bit-reproducible on any number of
    # GPUs of one model); False: atomic adds, the opt-in fast path (``--nondeterministic-gpu``)
    deterministic: bool = True
    # "paper": region embeddings only (default: on the development cohorts the similarity
    # feature did not help, docs/benchmarks.md); "similarity": + the per-region MRI-PET similarity
    fusion: str = "paper"
    gate: str = "paired"  # which epochs may replace the untrained network (see _RegionEarlyStop)
    ablations: bool = False  # also train the ablation heads (ABLATIONS; cross-validation only)
    progress: Callable[[dict], None] | None = None  # per epoch: stage, epoch, losses

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {self.fusion!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, not {self.gate!r}")

    def effective(self) -> TrainConfig:
        """The numbers actually used (sloppy mode caps epochs and patience)."""
        if not self.sloppy:
            return self
        return replace(
            self,
            epochs=min(self.epochs, SLOPPY_EPOCHS),
            patience=min(self.patience, SLOPPY_PATIENCE),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("progress")
        return d


def architecture(sloppy: bool) -> SiameseArch:
    """The per-region network of :mod:`.siamese`; sloppy: 2x coarser crops, 2^3 pooling."""
    return SiameseArch(pool=2, downsample=2) if sloppy else SiameseArch()


def split_validation(labels, subjects, fraction: float, seed: int):
    """Row indices (train part, validation part): subjects drawn per class, all sessions kept
    together. Classes with a single subject stay whole in the training part."""
    labels = np.asarray(labels)
    subjects = np.asarray(subjects).astype(str)
    uniq, first = np.unique(subjects, return_index=True)
    sub_label = labels[first]
    rng = np.random.default_rng(seed)
    val_subjects = []
    if fraction > 0:
        for c in np.unique(sub_label):
            members = uniq[sub_label == c]
            if members.size < 2:
                continue
            n_val = min(members.size - 1, max(1, int(round(fraction * members.size))))
            val_subjects.extend(rng.choice(members, n_val, replace=False).tolist())
    is_val = np.isin(subjects, np.array(val_subjects, dtype=str))
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


#: cuBLAS workspace setting that makes its GEMMs reproducible (NVIDIA's cuBLAS docs, "Results
#: reproducibility"); torch refuses cuBLAS calls in deterministic mode without it. Read when a
#: process first uses cuBLAS: ``cv`` sets it in every worker before CUDA starts, ``fit`` (for
#: this process) before its first CUDA call.
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def _tf32(enabled: bool, deterministic: bool = True):
    """The numerics of a CUDA fit or prediction (``enabled``; on the CPU nothing changes).

    Every setting that decides which kernels run is set here to the same value in every process
    (so that a task's result does not depend on the process or GPU that ran it) and restored on
    exit: TF32 products for the float32 linear layers, reduced-precision bf16/fp16 GEMM
    reductions as torch's default, no cuDNN autotuning. ``deterministic`` (the default; see
    ``TrainConfig.deterministic``) also turns on ``torch.use_deterministic_algorithms`` (warn
    only: an op without a deterministic kernel warns instead of stopping a run;
    ``tests/test_determinism.py`` requires no such warning) with the fixed cuBLAS workspace.
    Uninitialised-memory filling, which deterministic mode adds to every ``torch.empty``, is
    switched off: the fused kernels write every element of their buffers, and the fill would
    add ~1 GB of memsets per training step of 16 subjects (the layer-2 patch gradient alone is
    0.7 GB; sizes, not a timing).
    """
    if not enabled:
        yield
        return
    import torch.utils.deterministic as tud

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    old = (
        mm.allow_tf32,
        cudnn.allow_tf32,
        mm.allow_bf16_reduced_precision_reduction,
        mm.allow_fp16_reduced_precision_reduction,
        cudnn.deterministic,
        cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        tud.fill_uninitialized_memory,
    )
    mm.allow_tf32 = cudnn.allow_tf32 = True
    mm.allow_bf16_reduced_precision_reduction = True
    mm.allow_fp16_reduced_precision_reduction = True
    cudnn.deterministic = bool(deterministic)
    cudnn.benchmark = False
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    tud.fill_uninitialized_memory = False
    try:
        yield
    finally:
        (
            mm.allow_tf32,
            cudnn.allow_tf32,
            mm.allow_bf16_reduced_precision_reduction,
            mm.allow_fp16_reduced_precision_reduction,
            cudnn.deterministic,
            cudnn.benchmark,
            enabled_before,
            warn_only,
            tud.fill_uninitialized_memory,
        ) = old
        torch.use_deterministic_algorithms(enabled_before, warn_only=warn_only)


def _compute_dtype(device: torch.device, amp: bool | None) -> torch.dtype:
    if amp is None:
        amp = device.type == "cuda"
    return torch.bfloat16 if amp else torch.float32


def _layout_key(layout: RegionLayout) -> str:
    return json.dumps(layout.signature, sort_keys=True)


class _Inputs:
    """Turns a RegionDataset into engine inputs: standardize, coarsen, extend, move."""

    def __init__(self, layout: RegionLayout, arch: SiameseArch, standardizer: Standardizer):
        self.layout = layout
        self.standardizer = standardizer
        self.fine = RegionGrid.from_layout(layout)
        self.grid, self.matrix = coarsen(self.fine, arch.downsample)
        self.downsample = arch.downsample

    def tensors(self, data: RegionDataset, device, dtype, chunk: int = 32):
        if _layout_key(data.layout) != _layout_key(self.layout) or (
            data.layout.n_voxels != self.layout.n_voxels
        ):
            raise ValueError(
                "the data were made with another atlas or grid than the model "
                "(layout signature mismatch)"
            )
        out = []
        for mod in ("gm", "pet"):
            values = getattr(data, mod)
            parts = []
            for start in range(0, len(data), chunk):
                z = self.standardizer.transform(mod, values[start : start + chunk], self.layout)
                if self.downsample > 1:
                    z = np.asarray((self.matrix.T @ z.T).T, dtype=np.float32)
                t = extend(torch.from_numpy(np.ascontiguousarray(z)))
                parts.append(t.to(device=device, dtype=dtype))
            out.append(
                torch.cat(parts)
                if parts
                else torch.empty((0, self.grid.n_voxels + 2), device=device, dtype=dtype)
            )
        return out[0], out[1]


def _batch(xm: torch.Tensor, xp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.cat([xm.index_select(0, idx), xp.index_select(0, idx)])


@torch.no_grad()
def _embed(bank, xm, xp, dtype, chunk) -> torch.Tensor:
    """(N, R, 2 * embed) float32: MRI then PET branch output per region."""
    outs = []
    n = xm.shape[0]
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(n, start + chunk), device=xm.device)
        out = bank(_batch(xm, xp, idx), dtype).float()  # (R, 2b, E)
        b = idx.numel()
        outs.append(torch.cat([out[:, :b], out[:, b:]], dim=-1).transpose(0, 1))
    if not outs:
        return torch.empty(0, bank.n_regions, 2 * bank.arch.embed, device=xm.device)
    return torch.cat(outs)


def _region_hinges(emb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Hinge per region and subject of embeddings (N, R, 2E) with targets (N,) -> (R, N)."""
    e = emb.shape[-1] // 2
    y = similarity(emb[..., :e].transpose(0, 1), emb[..., e:].transpose(0, 1))
    return hinge(y, t.float().unsqueeze(0))


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
    * ``"constant"`` (not evaluated on realistic cohorts yet, docs/benchmarks.md): the paired
      test above *and* a one-sided t-test that the validation subjects' hinge is below the mean
      hinge of the best constant similarity (``y = +1`` or ``y = -1`` for every subject,
      whichever is lower on the validation part; 1 with balanced classes). The untrained
      network's cosine is about the same for every subject, so merely shrinking it towards 0
      already beats the untrained network on unseen subjects without carrying class
      information; a constant cannot be beaten that way. Needs ``targets``.
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
        self.stale = torch.where(keep, 0, self.stale + 1)
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


@torch.no_grad()
def _seeded_init(module: torch.nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear init, drawn from ``generator`` (CPU) instead of the global RNG."""
    for mod in module.modules():
        if isinstance(mod, torch.nn.Linear):
            bound = 1.0 / math.sqrt(mod.weight.shape[1])
            for p in (mod.weight, mod.bias):
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)


def _emit(config: TrainConfig, history: list, row: dict) -> None:
    history.append(row)
    if config.progress is not None:
        config.progress(dict(row))


class SiameseStep:
    """One optimizer step of all region networks on a batch of subject indices.

    On CUDA with ``graphs=True``, full-size batches replay a captured CUDA graph of the whole
    step (batch assembly, forward, backward, Adam): the step is hundreds of small kernels, and
    the graph removes their launch cost. The first ``WARMUP`` full batches run eagerly (real
    steps, on a side stream, as capture requires), partial batches always run eagerly; both
    paths run the same kernels on the same tensors.
    """

    WARMUP = 3

    def __init__(self, bank, xm, xp, t, dtype, lr, batch_size, graphs: bool):
        self.bank, self.xm, self.xp, self.t, self.dtype = bank, xm, xp, t, dtype
        self.params = [bank.param(n) for n in PARAM_NAMES]
        self.device = xm.device
        self.graphs = bool(graphs) and self.device.type == "cuda"
        if self.device.type == "cuda":
            self.opt = torch.optim.Adam(self.params, lr=lr, fused=True, capturable=self.graphs)
        else:
            self.opt = torch.optim.Adam(self.params, lr=lr, foreach=True)
        self.batch_size = batch_size
        self.graph = None
        self.warm = 0
        if self.graphs:
            self.static_idx = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    def _eager(self, idx: torch.Tensor) -> torch.Tensor:
        b = idx.numel()
        out = self.bank(_batch(self.xm, self.xp, idx), self.dtype)
        losses = siamese_loss(out[:, :b], out[:, b:], self.t.index_select(0, idx))
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.opt.step()
        return losses.detach()

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """Train on ``idx`` (device tensor); returns the per-region losses (R,) before the step."""
        if not self.graphs or idx.numel() != self.batch_size:
            return self._eager(idx)
        if self.graph is None and self.warm < self.WARMUP:
            self.warm += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                losses = self._eager(idx)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return losses
        if self.graph is None:
            self.static_idx.copy_(idx)
            self.opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.static_losses = self._eager(self.static_idx)
            except RuntimeError as exc:  # capture unsupported here: stay eager
                warnings.warn(
                    f"CUDA graph capture failed ({exc}); training without graphs", stacklevel=2
                )
                self.graphs = False
                self.opt.zero_grad(set_to_none=True)
                return self._eager(idx)
            self.graph = graph
        self.static_idx.copy_(idx)
        self.graph.replay()
        return self.static_losses.clone()


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
    bs = max(1, int(config.batch_size))
    step = SiameseStep(bank, xm, xp, t, dtype, config.learning_rate, bs, graphs)
    tr = torch.as_tensor(train_idx, dtype=torch.long)
    va = torch.as_tensor(val_idx, dtype=torch.long, device=device)
    xm_va, xp_va, t_va = xm.index_select(0, va), xp.index_select(0, va), t.index_select(0, va)
    if va.numel():
        bank.eval()
        h0 = _region_hinges(_embed(bank, xm_va, xp_va, dtype, eval_chunk), t_va)  # (R, n)
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
    for epoch in range(1, config.epochs + 1):
        bank.train()
        perm = tr[torch.randperm(n_tr, generator=generator)].to(device)
        total = torch.zeros(bank.n_regions, device=device)
        for start in range(0, n_tr, bs):
            idx = perm[start : start + bs]
            total += step(idx) * idx.numel()
        train_loss = total / n_tr
        last = epoch
        if va.numel():
            bank.eval()
            hinges = _region_hinges(_embed(bank, xm_va, xp_va, dtype, eval_chunk), t_va)
            finished = stopper.update(hinges, epoch)
            val_mean = float(hinges.mean())
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
    if va.numel():
        stopper.restore()
        return {
            "stop_epoch": stopper.stop_epoch.cpu().numpy(),
            "val_hinge_initial": stopper.initial.double().cpu().numpy(),
            "val_hinge_kept": stopper.kept.double().cpu().numpy(),
        }
    nan = np.full(bank.n_regions, np.nan)
    return {
        "stop_epoch": np.full(bank.n_regions, last),
        "val_hinge_initial": nan,
        "val_hinge_kept": nan.copy(),
    }


def train_attention(
    att: AttentionClassifier,
    emb_tr: torch.Tensor,
    y_tr: torch.Tensor,
    emb_va: torch.Tensor,
    y_va: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    history: list,
) -> int:
    """Stage 2 (see the module docstring); returns the kept epoch."""
    device = emb_tr.device
    counts = torch.bincount(y_tr, minlength=att.n_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (att.n_classes * counts.clamp(min=1)), 0.0)
    opt = torch.optim.Adam(
        list(att.parameters()),
        lr=config.learning_rate,
        weight_decay=ATTENTION_WEIGHT_DECAY,
        **({"fused": True} if device.type == "cuda" else {"foreach": True}),
    )
    n = emb_tr.shape[0]
    bs = max(1, int(config.batch_size))
    best, best_epoch, stale = math.inf, 0, 0
    best_state = {k: v.detach().clone() for k, v in att.state_dict().items()}
    for epoch in range(1, config.epochs + 1):
        att.train()
        perm = torch.randperm(n, generator=generator).to(device)
        total = 0.0
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            loss = F.cross_entropy(att(emb_tr[idx]), y_tr[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        att.eval()
        if emb_va.shape[0]:
            with torch.no_grad():
                val = float(F.cross_entropy(att(emb_va), y_va, weight=weight))
        else:
            val = float("nan")
        _emit(
            config,
            history,
            {"stage": "attention", "epoch": epoch, "train_loss": total / n, "val_loss": val},
        )
        if not emb_va.shape[0]:
            best_epoch = epoch
            continue
        if val < best:
            best, best_epoch, stale = val, epoch, 0
            best_state = {k: v.detach().clone() for k, v in att.state_dict().items()}
        else:
            stale += 1
        if best < config.early_stop_loss or stale >= config.patience:
            break
    if emb_va.shape[0]:
        att.load_state_dict(best_state)
    att.eval()
    return best_epoch


# ---------------------------------------------------------------------------------------------
# the fitted model
# ---------------------------------------------------------------------------------------------


class FittedModel:
    """A trained siamese-attention model (see the module docstring for the API)."""

    def __init__(
        self,
        *,
        classes,
        standardizer: Standardizer,
        layout: RegionLayout,
        arch: SiameseArch,
        bank: SiameseBank,
        attention: AttentionClassifier,
        config: TrainConfig,
        history: list | None = None,
        info: dict | None = None,
    ):
        self.classes = tuple(classes)
        self.standardizer = standardizer
        self.layout = layout
        self.arch = arch
        self.bank = bank.eval()
        self.attention = attention.eval()
        self.config = config
        self.history = list(history or [])
        self.info = dict(info or {})
        self.device = bank.order.device
        self.dtype = _compute_dtype(self.device, config.amp)
        self._inputs = _Inputs(layout, arch, standardizer)
        self.fusion = getattr(config, "fusion", "paper")
        #: ablation name -> (attention module, feature set, "trained"/"untrained"); CV only
        self.ablation_heads: dict = {}
        self.init_bank: SiameseBank | None = None  # the networks at initialisation (ablations)

    # -- embeddings and predictions
    def _chunk(self) -> int:
        return 64 if self.device.type == "cuda" else 8

    @torch.no_grad()
    def _embeddings(self, data: RegionDataset, bank: SiameseBank | None = None) -> torch.Tensor:
        bank = self.bank if bank is None else bank
        outs = []
        step = 64
        with _tf32(self.device.type == "cuda", self.config.deterministic):
            for start in range(0, len(data), step):
                part = data.subset(np.arange(start, min(len(data), start + step)))
                xm, xp = self._inputs.tensors(part, self.device, self.dtype)
                outs.append(_embed(bank, xm, xp, self.dtype, self._chunk()))
        if not outs:
            return torch.empty(0, self.layout.n_regions, 2 * self.arch.embed, device=self.device)
        return torch.cat(outs)

    def embed(self, data: RegionDataset) -> np.ndarray:
        """(N, R, 40) float32: per region the MRI branch output (20), then PET's (20)."""
        return self._embeddings(data).cpu().numpy()

    def _features(self, data: RegionDataset) -> torch.Tensor:
        """The attention stage's input (N, R, F) for this model's fusion variant."""
        return region_feature_set(self._embeddings(data), self.fusion)[0]

    def similarity(self, data: RegionDataset) -> np.ndarray:
        """(N, R) per-region MRI-PET similarity (the scaled cosine the hinge loss trained)."""
        feats = region_feature_set(self._embeddings(data), "similarity_only")[0]
        return feats[..., 0].cpu().numpy()

    @torch.no_grad()
    def predict_proba(self, data: RegionDataset) -> np.ndarray:
        """(N, n_classes) class probabilities, columns in ``classes`` order."""
        logits = self.attention(self._features(data))
        return torch.softmax(logits, dim=-1).double().cpu().numpy()

    @torch.no_grad()
    def predict_ablations(self, data: RegionDataset) -> dict[str, np.ndarray]:
        """Ablation name -> (N, n_classes) probabilities (empty unless trained with
        ``ablations=True``; see ``ABLATIONS``)."""
        if not self.ablation_heads:
            return {}
        emb = {"trained": self._embeddings(data)}
        if self.init_bank is not None:
            emb["untrained"] = self._embeddings(data, self.init_bank)
        out = {}
        for name, (att, fset, nets) in self.ablation_heads.items():
            logits = att(region_feature_set(emb[nets], fset)[0])
            out[name] = torch.softmax(logits, dim=-1).double().cpu().numpy()
        return out

    def predict(self, data: RegionDataset) -> np.ndarray:
        """(N,) index of the most probable class."""
        return self.predict_proba(data).argmax(1)

    # -- relevance
    def relevance(self, source: str = "effective") -> dict[str, np.ndarray]:
        """Figure 7: ``mri``, ``pet``, ``combined``, each (R,), summing to 1 over regions.

        ``source="effective"``: the attention module's effective per-feature weights (mean
        mask x class-separating classifier weight); ``"first_layer"``: its first linear layer's
        ``|W|``. See :mod:`.attention` for both definitions and why the first is the default.
        """
        return weight_relevance(self.attention, source)

    def activation_counts(self, data: RegionDataset) -> dict[str, np.ndarray]:
        """Figure 6: ``mri``, ``pet``, ``fused`` counts, each (N, R) (see :mod:`.attention`)."""
        return mask_counts(self.attention, self._features(data))

    def subject_relevance(self, data: RegionDataset) -> dict[str, np.ndarray]:
        """Per-subject ``mri``, ``pet``, ``combined``, each (N, R) (see :mod:`.attention`)."""
        return subject_relevance(self.attention, self._features(data))

    # -- persistence
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Tensors (float32 numpy, atlas order; for safetensors) and JSON-able metadata."""
        tensors = {
            f"siamese.{k}": v.float().cpu().numpy() for k, v in self.bank.region_state().items()
        }
        for k, v in self.attention.state_dict().items():
            tensors[f"attention.{k}"] = v.detach().float().cpu().numpy()
        layout = self.layout
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "classes": list(self.classes),
            "reference_class": self.classes[0],
            "architecture": self.arch.to_dict(),
            "similarity": {"kind": "scaled_cosine", "scale": SIMILARITY_SCALE},
            "fusion": self.fusion,
            "attention": self.attention.config(),
            "config": self.config.to_dict(),
            "standardizer": self.standardizer.to_dict(),
            "geometry": {
                "grid_shape": [int(s) for s in layout.grid_shape],
                "n_voxels": int(layout.n_voxels),
                "boxes": layout.boxes.astype(int).tolist(),
                "region_names": list(layout.names),
                "downsample": self.arch.downsample,
            },
            "layout_signature": layout.signature,
            "history": self.history,
            "info": self.info,
            "torch_version": torch.__version__,
        }
        return tensors, meta

    @classmethod
    def from_state(
        cls, tensors: dict, meta: dict, layout: RegionLayout, device: str = "cpu"
    ) -> FittedModel:
        """Rebuild a model saved with :meth:`state`; refuses a layout that does not match."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} model (format {meta.get('format')!r})")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"model format version {meta['format_version']} is too new")
        if json.dumps(meta.get("layout_signature", {}), sort_keys=True) != _layout_key(layout):
            raise ValueError(
                "the model was trained on another atlas or grid (layout signature mismatch)"
            )
        geom = meta.get("geometry", {})
        if (
            geom.get("n_voxels") != layout.n_voxels
            or np.asarray(geom.get("boxes", [])).shape != np.asarray(layout.boxes).shape
            or not np.array_equal(np.asarray(geom.get("boxes")), layout.boxes)
        ):
            raise ValueError("the model's region boxes differ from this layout's")
        cfg = {k: v for k, v in meta["config"].items() if k in TrainConfig.__dataclass_fields__}
        cfg["device"] = device
        # version-1 bundles predate the fusion variants: they are the paper's
        cfg["fusion"] = meta.get("fusion", "paper")
        config = TrainConfig(**cfg)
        arch = SiameseArch.from_dict(meta["architecture"])
        dev = torch.device(device)
        bank = SiameseBank(coarsen(RegionGrid.from_layout(layout), arch.downsample)[0], arch)
        bank.deterministic = config.deterministic
        bank.load_region_state(
            {n: torch.as_tensor(np.asarray(tensors[f"siamese.{n}"])) for n in PARAM_NAMES}
        )
        with torch.random.fork_rng(devices=[]):
            att = AttentionClassifier(**meta["attention"])
        att.load_state_dict(
            {
                k[len("attention.") :]: torch.as_tensor(np.asarray(v))
                for k, v in tensors.items()
                if k.startswith("attention.")
            }
        )
        return cls(
            classes=meta["classes"],
            standardizer=Standardizer.from_dict(meta["standardizer"]),
            layout=layout,
            arch=arch,
            bank=bank.to(dev),
            attention=att.to(dev),
            config=config,
            history=meta.get("history", []),
            info=meta.get("info", {}),
        )


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------


def fit(train: RegionDataset, config: TrainConfig | None = None) -> FittedModel:
    """Fit Standardizer on `train` only, hold out a validation subset of *subjects* of `train`
    (all sessions of a subject on one side) for early stopping, train all region siamese nets
    (batched), embed, train the attention classifier; never sees anything but `train`."""
    config = config or TrainConfig()
    eff = config.effective()
    labels = np.asarray(train.labels, dtype=np.int64)
    n_classes = len(train.classes)
    if n_classes < 2:
        raise ValueError("need at least two classes")
    if len(np.unique(labels)) < 2:
        raise ValueError("the training set holds a single class")
    device = torch.device(config.device)
    dtype = _compute_dtype(device, config.amp)
    arch = architecture(config.sloppy)
    layout = train.layout
    t0 = time.perf_counter()

    standardizer = Standardizer().fit({"gm": train.gm, "pet": train.pet}, layout)
    tr_idx, va_idx = split_validation(labels, train.subjects, eff.val_fraction, eff.seed)
    generator = torch.Generator().manual_seed(int(eff.seed))
    inputs = _Inputs(layout, arch, standardizer)
    bank = SiameseBank(inputs.grid, arch, generator=generator).to(device)
    bank.deterministic = config.deterministic
    history: list = []
    eval_chunk = 64 if device.type == "cuda" else 8
    # the untrained control (ablations) keeps a copy of the networks at initialisation
    init_bank = copy.deepcopy(bank) if eff.ablations else None
    with _tf32(device.type == "cuda", config.deterministic):
        xm, xp = inputs.tensors(train, device, dtype)
        t = torch.as_tensor(siamese_targets(labels), device=device)
        stage1 = train_siamese(
            bank, xm, xp, t, tr_idx, va_idx, eff, dtype, generator, history, eval_chunk
        )
        t1 = time.perf_counter()
        bank.eval()
        emb = _embed(bank, xm, xp, dtype, eval_chunk)
        emb0 = None
        if init_bank is not None:
            init_bank.eval()
            emb0 = _embed(init_bank, xm, xp, dtype, eval_chunk)
        del xm, xp
        y = torch.as_tensor(labels, device=device)
        tr_t = torch.as_tensor(tr_idx, device=device)
        va_t = torch.as_tensor(va_idx, device=device)

        def head(embeddings, fset, cfg, hist):
            feats, groups = region_feature_set(embeddings, fset)
            with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
                att = AttentionClassifier(
                    layout.n_regions, feats.shape[-1], n_classes, ATTENTION_HIDDEN, groups
                )
            _seeded_init(att, generator)  # from the seeded generator, like the siamese nets
            att = att.to(device)
            att.fit_scaling(feats.index_select(0, tr_t))
            epoch = train_attention(
                att,
                feats.index_select(0, tr_t),
                y.index_select(0, tr_t),
                feats.index_select(0, va_t),
                y.index_select(0, va_t),
                cfg,
                generator,
                hist,
            )
            att.fit_mask_mean(feats.index_select(0, tr_t))
            return att, epoch

        # the model first, so that it does not depend on whether ablations are trained
        att, att_epoch = head(emb, eff.fusion, eff, history)
        ablation_heads = {}
        if eff.ablations:
            quiet = replace(eff, progress=None)
            for name, (fset, nets) in ablation_specs(eff.fusion).items():
                source = emb0 if nets == "untrained" else emb
                ablation_heads[name] = (head(source, fset, quiet, [])[0], fset, nets)
    t2 = time.perf_counter()
    stop_epochs = stage1["stop_epoch"]
    info = {
        "n_train_part": int(len(tr_idx)),
        "n_validation_part": int(len(va_idx)),
        "fusion": eff.fusion,
        "gate": eff.gate,
        "siamese_stop_epochs": [int(e) for e in stop_epochs],
        "siamese_val_hinge_initial": [float(v) for v in stage1["val_hinge_initial"]],
        "siamese_val_hinge_kept": [float(v) for v in stage1["val_hinge_kept"]],
        "regions_trained": int((np.asarray(stop_epochs) > 0).sum()),
        "attention_epoch": int(att_epoch),
        "siamese_seconds": round(t1 - t0, 3),
        "attention_seconds": round(t2 - t1, 3),
        "device": str(device),
        "compute_dtype": str(dtype).replace("torch.", ""),
    }
    model = FittedModel(
        classes=train.classes,
        standardizer=standardizer,
        layout=layout,
        arch=arch,
        bank=bank,
        attention=att,
        config=config,
        history=history,
        info=info,
    )
    model.ablation_heads = ablation_heads
    model.init_bank = init_bank
    return model
