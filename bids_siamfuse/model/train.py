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
       0.60/0.90 without the gate, 0.90/1.00 with it). Stopped regions keep their kept weights;
       on CUDA the fused kernels and Adam skip them (``SiameseBank.set_active``,
       ``siamese_stage._RowAdam``: the same result as computing them). History rows hold the
       means over regions; ``FittedModel.info`` has each region's kept epoch.
    4. Embeds both parts (R x 40 per subject) and trains the attention module
       (:mod:`.attention`) on the training part with Adam (L2 weight decay
       ``ATTENTION_WEIGHT_DECAY``) on class-balanced cross-entropy, with the same early
       stopping on the validation part's loss; the best epoch's weights are kept. The
       embedding standardization and the mean attention mask (Figure 7) come from the training
       part.

Where the pieces live
    :mod:`.options` (:class:`TrainConfig`, sloppy mode, the validation split),
    :mod:`.siamese_stage` (stage 1, the gates), :mod:`.attention_stage` (stage 2, fusion
    variants, ablations), :mod:`.numerics` (precision, devices, inputs), :mod:`.fitted`
    (:class:`FittedModel` and its persistence); this module runs them (:func:`fit`).
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch

from . import numerics
from .attention import AttentionClassifier
from .attention_stage import ATTENTION_HIDDEN, ablation_specs, region_feature_set, train_attention
from .data import RegionDataset, Standardizer, device_rows
from .fitted import FORMAT, FittedModel
from .losses import siamese_targets
from .numerics import _compute_dtype, _embed, _Inputs, _seeded_init, _tf32
from .options import (
    SLOPPY_EPOCHS,
    SLOPPY_PATIENCE,
    TrainConfig,
    architecture,
    split_validation,
)
from .siamese import SiameseBank, draw_region_uniforms
from .siamese_stage import train_siamese

__all__ = [
    "TrainConfig",
    "FittedModel",
    "fit",
    "split_validation",
    "SLOPPY_EPOCHS",
    "SLOPPY_PATIENCE",
    "FORMAT",
]


def _new_bank(grid, arch, generator, device, uniforms=None) -> SiameseBank:
    return SiameseBank(grid, arch, generator=generator, uniforms=uniforms, device=device).to(
        device
    )


#: The next fit's initial draws, being made on a host thread (:func:`prefetch`):
#: (architecture, regions, seed) -> future of (draws, the generator's state after them).
_PREFETCHED: dict = {}
_PREFETCH_POOL: ThreadPoolExecutor | None = None


def _draw(arch, n_regions: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return draw_region_uniforms(arch, n_regions, generator), generator.get_state()


def prefetch(layout, config: TrainConfig) -> None:
    """Start drawing, on a host thread, the initial weights of a later :func:`fit` with
    ``config`` on data of ``layout``; that fit takes them instead of drawing (the same
    values and generator state). The draws are 125M values from the seeded CPU generator,
    0.6 s of one core that a fit otherwise waits for; a runner that knows its next task calls
    this while the current one trains (``workers.run_tasks``). One prefetch is kept at a time.
    """
    global _PREFETCH_POOL
    key = (architecture(config.sloppy), layout.n_regions, int(config.effective().seed))
    if key in _PREFETCHED:
        return
    _PREFETCHED.clear()
    if _PREFETCH_POOL is None:
        _PREFETCH_POOL = ThreadPoolExecutor(1, thread_name_prefix="siamfuse-prefetch")
    _PREFETCHED[key] = _PREFETCH_POOL.submit(_draw, *key)


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

    generator = torch.Generator().manual_seed(int(eff.seed))
    inputs = _Inputs(layout, arch, None)
    uniforms = None
    ahead = _PREFETCHED.pop((arch, layout.n_regions, int(eff.seed)), None)
    if ahead is not None:
        uniforms, state = ahead.result()
        generator.set_state(state)
    # the bank (its geometry, and the initial draws unless they were made ahead: 125M values
    # from the seeded generator, 0.6 s of a host core) is made while the standardizer is fit
    # and the inputs are built; nothing else uses the generator before it
    with ThreadPoolExecutor(1, thread_name_prefix="siamfuse-init") as pool:
        pending = pool.submit(_new_bank, inputs.grid, arch, generator, device, uniforms)
        # on CUDA the raw rows come from the cohort kept on the device and the
        # standardizer is fit there (1.1 s on the host per 200-subject fit before)
        raw = device_rows(train, device) if numerics.device_inputs(device) else None
        if raw is not None:
            standardizer = Standardizer().fit_tensors(raw, layout)
        else:
            standardizer = Standardizer().fit({"gm": train.gm, "pet": train.pet}, layout)
        inputs.standardizer = standardizer
        tr_idx, va_idx = split_validation(labels, train.subjects, eff.val_fraction, eff.seed)
        with _tf32(device.type == "cuda", config.deterministic):
            xm, xp = inputs.tensors(train, device, dtype, rows=raw)
        del raw
        bank = pending.result()
    bank.deterministic = config.deterministic
    history: list = []
    eval_chunk = 64 if device.type == "cuda" else 8
    # the untrained control (ablations) keeps a copy of the networks at initialisation
    init_bank = copy.deepcopy(bank) if eff.ablations else None
    with _tf32(device.type == "cuda", config.deterministic):
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


#: runners that know their next task draw its initial weights ahead (``workers.run_tasks``)
fit.prefetch = prefetch
