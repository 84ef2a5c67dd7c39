"""Full-accuracy check of the participant preprocessing (default settings) against the truth.

Slow (several minutes on 2 cores): ``python -m pytest -m slow tests/test_preproc_accuracy.py``.
Three synthetic subjects, whose T1w images are stored in different orientations (some on an
oblique grid), with skull, scalp, neck and a bias field, each with a static FDG PET at a
random offset; every session must meet the targets of issue 3 (``benchmarks/preproc_scoring``):
T1w->MNI mean displacement error <= 1 mm inside the brain, GM Dice >= 0.85, PET->T1w error
<= 1 mm, modulated GM volume within 10 % of this cohort's truth (the 5 % volume target is
checked against the physical phantom, tests/test_phantom.py; docs/preprocessing.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    from preproc_scoring import score_session, sessions

    from bids_siamfuse.cli.run import main
    from bids_siamfuse.synth import generate

    root = tmp_path_factory.mktemp("accuracy")
    ds = generate(
        root / "ds",
        n_per_group=1,
        groups=("CN", "MCIc", "AD"),
        seed=3,
        two_session_fraction=0.0,
        preprocessed=True,
        jobs=2,
    )
    out, work = root / "out", root / "work"
    args = [ds, out, "participant", "-w", work, "--skip-bids-validation", "--nprocs", "2"]
    assert main([str(a) for a in args]) == 0
    return [score_session(ds, out, sub, ses, work_dir=work) for sub, ses in sessions(ds)]


def _where(row) -> str:
    return f"sub-{row['subject']} ({row['axcodes']}, tilt {row['tilt_deg']})"


def test_registration_and_segmentation_targets(scored):
    from preproc_scoring import TARGETS

    assert len(scored) == 3
    for row in scored:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        where = _where(row)
        assert row["disp_mm"] <= TARGETS["disp_mm"], where
        assert row["dice"] >= TARGETS["dice"], where
        assert row["pet_mm"] <= TARGETS["pet_mm"], where
        assert row["pet_corr"] > 0.97, where


def test_gm_volume_every_session_within_10_percent(scored):
    """Modulated GM volume: no session beyond 10 % of this cohort's truth.

    The 5 % volume target moved to the physical phantom
    (``tests/test_phantom.py::test_pipeline_tissue_volumes_on_the_phantom``): this cohort's
    "true" fractions are the ICBM152 probability maps, not partial volumes, and the
    partial-volume step that is right on the phantom reads +0.05 to +2.2 points above them here
    (measured 2026-11-30: +7.07 / +5.17 / +3.81 %; docs/preprocessing.md, "slow accuracy test").
    """
    for row in scored:
        assert abs(row["vol_err_pct"]) <= 10.0, _where(row)
