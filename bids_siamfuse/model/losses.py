"""The siamese hinge loss (paper eq. 2) and its similarity score.

Similarity
    For the two branch outputs ``a`` (MRI) and ``b`` (PET) of one region, both in R^20::

        cos(a, b) = a . b / sqrt(max(|a|^2 |b|^2, eps^2))        (eps = 1e-8)
        y         = SIMILARITY_SCALE * cos(a, b)                  (SIMILARITY_SCALE = 2)

    ``y`` lies in [-2, 2]. The scale sets the margin: the hinge is exactly 0 once
    ``t * cos >= 1 / SIMILARITY_SCALE = 0.5``, so the paper's early-stopping threshold
    (validation loss < 0.01) can actually be reached; with a plain cosine (scale 1) the loss
    only vanishes at perfectly (anti-)parallel embeddings.

Hinge (paper eq. 2)
    ``L = max(0, 1 - t * y)``, averaged over the subjects of a batch, separately per region.

Targets
    ``t = +1`` for the *reference class*, the first entry of ``classes`` (``--classes CN AD``:
    CN), and ``t = -1`` for every other class. The first class is the earliest stage in every
    task of the paper (CN vs AD, CN vs MCIc, CN vs MCIs, MCIs vs MCIc): in healthy tissue GM and
    FDG uptake go together, so the network is asked to map a region's MRI and PET crops to
    *agreeing* embeddings (positive pairs), and to *disagreeing* ones when disease has changed
    structure and/or metabolism. With more than two classes the hinge stays binary (reference vs
    the rest); the softmax classifier of the attention module separates all classes.
"""

from __future__ import annotations

import numpy as np
import torch

SIMILARITY_SCALE = 2.0
EPS = 1e-8

__all__ = [
    "SIMILARITY_SCALE",
    "cosine",
    "similarity",
    "hinge",
    "siamese_targets",
    "siamese_loss",
]


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Cosine similarity over the last axis: ``a.b / sqrt(max(|a|^2 |b|^2, eps^2))``."""
    dot = (a * b).sum(-1)
    norms = (a * a).sum(-1) * (b * b).sum(-1)
    return dot / torch.sqrt(torch.clamp(norms, min=eps * eps))


def similarity(a: torch.Tensor, b: torch.Tensor, scale: float = SIMILARITY_SCALE) -> torch.Tensor:
    """The score ``y`` of eq. 2: ``scale * cos(a, b)``."""
    return scale * cosine(a, b)


def hinge(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 2, element-wise: ``max(0, 1 - t * y)``."""
    return torch.clamp(1.0 - t * y, min=0.0)


def siamese_targets(labels, reference: int = 0) -> np.ndarray:
    """``t`` per sample: +1 for the reference class (the first in ``classes``), -1 otherwise."""
    labels = np.asarray(labels)
    return np.where(labels == reference, 1.0, -1.0).astype(np.float32)


def siamese_loss(
    emb_mri: torch.Tensor,
    emb_pet: torch.Tensor,
    t: torch.Tensor,
    scale: float = SIMILARITY_SCALE,
) -> torch.Tensor:
    """Per-region mean hinge: embeddings (R, B, E), targets (B,) -> (R,), in float32."""
    y = similarity(emb_mri.float(), emb_pet.float(), scale)
    return hinge(y, t.float().unsqueeze(0)).mean(-1)
