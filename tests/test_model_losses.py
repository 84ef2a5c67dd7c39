"""The siamese hinge loss (paper eq. 2) on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bids_siamfuse.model.losses import (
    SIMILARITY_SCALE,
    cosine,
    hinge,
    siamese_loss,
    siamese_targets,
    similarity,
)

# (a, b, cos(a, b)) worked out by hand
PAIRS = [
    ((1.0, 0.0, 0.0), (2.0, 0.0, 0.0), 1.0),  # parallel
    ((1.0, 0.0, 0.0), (0.0, 3.0, 0.0), 0.0),  # orthogonal
    ((3.0, 4.0, 0.0), (4.0, 3.0, 0.0), 24.0 / 25.0),
    ((1.0, 1.0, 0.0), (-1.0, 0.0, 0.0), -1.0 / math.sqrt(2.0)),
    ((1.0, 2.0, 2.0), (2.0, 0.0, 1.0), 4.0 / (3.0 * math.sqrt(5.0))),
    ((1.0, 0.0, 0.0), (1.0, math.sqrt(15.0), 0.0), 0.25),  # |b| = 4
]


def test_scale_is_two():
    assert SIMILARITY_SCALE == 2.0


@pytest.mark.parametrize("a, b, cos", PAIRS)
def test_cosine_similarity_and_hinge_by_hand(a, b, cos):
    ta, tb = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert cosine(ta, tb).item() == pytest.approx(cos, abs=1e-12)
    y = 2.0 * cos
    assert similarity(ta, tb).item() == pytest.approx(y, abs=1e-12)
    for t in (1.0, -1.0):
        expected = max(0.0, 1.0 - t * y)
        got = hinge(similarity(ta, tb), torch.tensor([t], dtype=torch.float64)).item()
        assert got == pytest.approx(expected, abs=1e-12)


def test_hinge_table():
    # y = 2 cos: the hinge is 0 once t * cos >= 0.5
    y = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -2.0])
    assert hinge(y, torch.ones(6)).tolist() == [0.0, 0.0, 0.5, 1.0, 1.5, 3.0]
    assert hinge(y, -torch.ones(6)).tolist() == [3.0, 2.0, 1.5, 1.0, 0.5, 0.0]


def test_zero_vector_is_finite():
    a = torch.zeros(1, 20, requires_grad=True)
    b = torch.randn(1, 20, requires_grad=True)
    y = similarity(a, b)
    assert y.item() == 0.0
    hinge(y, torch.ones(1)).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_targets_reference_class_is_positive():
    assert siamese_targets([0, 1, 2, 0, 1]).tolist() == [1.0, -1.0, -1.0, 1.0, -1.0]
    assert siamese_targets(np.array([1, 1]), reference=1).tolist() == [1.0, 1.0]


def test_siamese_loss_per_region_mean():
    # 2 regions, 2 subjects: region 0 (cos 1, cos 0), region 1 (cos 0.25, cos -1)
    mri = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    pet = torch.tensor(
        [[[3.0, 0.0], [0.0, 1.0]], [[1.0, math.sqrt(15.0)], [-2.0, 0.0]]], dtype=torch.float64
    )
    t = torch.tensor([1.0, -1.0])  # subject 0 reference class, subject 1 not
    # region 0: max(0, 1 - 2) = 0 and max(0, 1 + 0) = 1 -> 0.5
    # region 1: max(0, 1 - 0.5) = 0.5 and max(0, 1 - 2) = 0 -> 0.25
    loss = siamese_loss(mri, pet, t)
    assert loss.dtype == torch.float32
    assert loss.tolist() == pytest.approx([0.5, 0.25], abs=1e-6)
