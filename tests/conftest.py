"""Shared fixtures: offline atlas data, small synthetic cohorts built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_SHARED_NILEARN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nilearn_data"
if "NILEARN_DATA" not in os.environ and _SHARED_NILEARN.is_dir():
    os.environ["NILEARN_DATA"] = str(_SHARED_NILEARN.resolve())
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory) -> Path:
    """Two subjects (CN, AD), one with two sessions: raw images, truth and perfect derivatives."""
    from bids_siamfuse.synth import generate

    out = tmp_path_factory.mktemp("synth") / "raw"
    return generate(
        out,
        n_per_group=1,
        groups=("CN", "AD"),
        seed=3,
        two_session_fraction=0.5,
        preprocessed=True,
        jobs=2,
    )


@pytest.fixture(scope="session")
def synth_derivs(tmp_path_factory) -> Path:
    """Twelve subjects per group (CN, AD), derivatives only (no raw images), strong effect."""
    from bids_siamfuse.synth import generate

    out = tmp_path_factory.mktemp("synth") / "derivs"
    return generate(
        out,
        n_per_group=12,
        groups=("CN", "AD"),
        seed=11,
        effect_size=1.5,
        two_session_fraction=0.15,
        preprocessed=True,
        raw=False,
        jobs=2,
    )
