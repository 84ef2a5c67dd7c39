"""Stage 2 of :func:`.train.fit`: the attention stage's input per fusion variant and ablation
(:func:`region_feature_set`) and its training (:func:`train_attention`). See :mod:`.train`.

Fusion variants, gate, ablations
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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import AttentionClassifier
from .graphed import GraphedStep
from .losses import similarity
from .options import TrainConfig, _emit, step_batch

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


class _AttentionStep(GraphedStep):
    """One Adam step of an attention head on a batch of row indices (device tensor).

    The head is small (a few thousand to 500k weights) and its step is ~40 short kernels:
    launch-bound. On CUDA, full batches replay a captured graph of the whole step (gather,
    forward, loss, backward, Adam), as :class:`SiameseStep` does for the siamese networks;
    the first ``WARMUP`` full batches and partial batches run eagerly (the same kernels).
    """

    WHAT = "attention"

    def __init__(self, att, x, y, weight, lr, batch_size):
        self.att, self.x, self.y, self.weight = att, x, y, weight
        graphs = x.device.type == "cuda"
        kwargs = {"fused": True, "capturable": True} if graphs else {"foreach": True}
        self.opt = torch.optim.Adam(
            list(att.parameters()), lr=lr, weight_decay=ATTENTION_WEIGHT_DECAY, **kwargs
        )
        self._setup_graph(x.device, batch_size, graphs)

    def _eager(self, idx):
        logits = self.att(self.x.index_select(0, idx))
        loss = F.cross_entropy(logits, self.y.index_select(0, idx), weight=self.weight)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


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
    n = emb_tr.shape[0]
    bs = step_batch(config.batch_size, n)
    step = _AttentionStep(att, emb_tr, y_tr, weight, config.learning_rate, bs)
    best, best_epoch, stale = math.inf, 0, 0
    best_state = {k: v.detach().clone() for k, v in att.state_dict().items()}
    for epoch in range(1, config.epochs + 1):
        att.train()
        perm = torch.randperm(n, generator=generator).to(device)
        # summed on the device in float64 (the same sum as Python floats) and read once per
        # epoch: a read per step made the host wait for the GPU ~2600 times per 200-epoch head
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            total += step(idx).double() * idx.numel()
        total = float(total)
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
