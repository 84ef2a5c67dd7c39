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

    :func:`train_attention` runs its steps through :class:`_AttentionEpoch`, which captures
    a whole epoch of them in one graph; called on its own, a step replays its own graph on
    full batches as :class:`GraphedStep` does (the first ``WARMUP`` full batches and partial
    batches eagerly: the same kernels).
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


#: Epochs an attention head runs between two reads of its losses on the host. Early stopping
#: is decided on the device (the same comparisons as on the host, in float64), the
#: generator's state is rewound to the epoch that stopped, and the epochs run past the stop
#: are dropped: the same head, history and generator as deciding after every epoch
#: (``tests/test_model_train.py``).
ATTENTION_CHUNK = 8


@torch.no_grad()
def _track_best(val, epoch, best, best_epoch, stale, done, best_state, live, config):
    """One epoch of the early stopping on device tensors, in place: the head's state is kept
    when ``val`` improves on ``best`` (before ``done``); ``done`` once the best loss is below
    ``early_stop_loss`` or ``patience`` epochs passed without an improvement."""
    v = val.double()  # float32 -> float64 is exact: the host compared these Python floats
    improved = (v < best) & ~done
    best.copy_(torch.where(improved, v, best))
    best_epoch.copy_(torch.where(improved, epoch, best_epoch))
    stale.copy_(torch.where(improved, 0, stale + 1))
    for kept, current in zip(best_state, live, strict=True):
        kept.copy_(torch.where(improved, current, kept))
    done |= (best < config.early_stop_loss) | (stale >= config.patience)


class _AttentionEpoch(GraphedStep):
    """One epoch of an attention head on a permutation of its training rows (device tensor):
    the Adam steps, the validation loss and the early stopping's bookkeeping
    (:func:`_track_best`), all on the device; returns (training loss sum, validation loss,
    done) as float64.

    A head is small (a few thousand to 500k weights): its step is ~40 short kernels and an
    epoch a few hundred, so the stage was bound by launching them (1.0-1.6 s of a 4.5-5 s CV
    fit for six heads on an H200, docs/benchmarks.md), not by the GPU. On CUDA the whole
    epoch is one captured graph, replayed from the second epoch on (the first runs eagerly on
    a side stream: the same kernels).
    """

    WHAT = "attention"
    WARMUP = 1

    def __init__(self, step: _AttentionStep, x_va, y_va, tracking, config):
        self.step, self.x_va, self.y_va = step, x_va, y_va
        self.tracking, self.config = tracking, config
        self.opt = step.opt
        device = step.x.device
        self.n = step.x.shape[0]
        self.epoch = torch.zeros((), dtype=torch.long, device=device)
        self._setup_graph(device, self.n, device.type == "cuda")

    def __call__(self, perm: torch.Tensor, epoch: int) -> torch.Tensor:
        self.epoch.fill_(epoch)
        return super().__call__(perm)

    def _eager(self, perm):
        bs = self.step.batch_size
        att = self.step.att
        att.train()
        # summed on the device in float64 (the same sum as Python floats)
        total = torch.zeros((), dtype=torch.float64, device=perm.device)
        for start in range(0, self.n, bs):
            idx = perm[start : start + bs]
            total += self.step._eager(idx).double() * idx.numel()
        att.eval()
        if not self.x_va.shape[0]:
            return torch.stack([total, torch.full_like(total, math.nan), torch.zeros_like(total)])
        with torch.no_grad():
            val = F.cross_entropy(att(self.x_va), self.y_va, weight=self.step.weight)
        done = self.tracking[3]
        _track_best(val, self.epoch, *self.tracking, self.config)
        return torch.stack([total, val.double(), done.double()])


def train_attention(
    att: AttentionClassifier,
    emb_tr: torch.Tensor,
    y_tr: torch.Tensor,
    emb_va: torch.Tensor,
    y_va: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    history: list,
    chunk: int = ATTENTION_CHUNK,
) -> int:
    """Stage 2 (see the module docstring); returns the kept epoch.

    Per epoch: a permutation of the training rows from ``generator``, Adam steps of
    ``step_batch`` rows, the class-weighted validation loss; the state of the epoch with the
    lowest validation loss is kept, and training stops once that loss is below
    ``early_stop_loss`` or has not improved for ``patience`` epochs. ``chunk`` epochs run
    between two reads on the host (:data:`ATTENTION_CHUNK`); the result does not depend on it.
    """
    device = emb_tr.device
    counts = torch.bincount(y_tr, minlength=att.n_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (att.n_classes * counts.clamp(min=1)), 0.0)
    n = emb_tr.shape[0]
    bs = step_batch(config.batch_size, n)
    step = _AttentionStep(att, emb_tr, y_tr, weight, config.learning_rate, bs)
    validate = bool(emb_va.shape[0])
    live = list(att.state_dict().values())  # aliases of the head's tensors
    best_state = [v.detach().clone() for v in live]
    tracking = (
        torch.full((), math.inf, dtype=torch.float64, device=device),  # best validation loss
        torch.zeros((), dtype=torch.long, device=device),  # its epoch
        torch.zeros((), dtype=torch.long, device=device),  # epochs since
        torch.zeros((), dtype=torch.bool, device=device),  # done
        best_state,
        live,
    )
    run_epoch = _AttentionEpoch(step, emb_va, y_va, tracking, config)
    epoch, stopped = 0, False
    while epoch < config.epochs and not stopped:
        epochs = range(epoch + 1, min(epoch + max(1, chunk), config.epochs) + 1)
        states, perms = [], []
        for _ in epochs:
            states.append(generator.get_state())
            perms.append(torch.randperm(n, generator=generator))
        states.append(generator.get_state())
        perms = torch.stack(perms).to(device)
        rows = torch.stack([run_epoch(perms[j], e) for j, e in enumerate(epochs)]).tolist()
        for (total, val, done), e, state in zip(rows, epochs, states[1:], strict=True):
            row = {"stage": "attention", "epoch": e, "train_loss": total / n}
            _emit(config, history, {**row, "val_loss": val})
            epoch = e
            if done:
                # the epochs after the stop ran on permutations the host loop never drew
                generator.set_state(state)
                stopped = True
                break
    step.opt.zero_grad(set_to_none=True)  # gradients in the graph's memory pool
    del run_epoch, step  # the graph and its pool
    att.eval()
    if not validate:
        return epoch
    with torch.no_grad():
        for current, kept in zip(live, best_state, strict=True):
            current.copy_(kept)
    return int(tracking[1])
