"""Shared fixtures: small synthetic cohorts built once per session.

The AAL atlas ships in the package, so the suite needs no ``NILEARN_DATA`` (``.ci/run`` unsets
it); ``tests/test_atlas.py`` checks the nilearn layout as the alternative source.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    """``main()`` points the logging handlers at the stderr of the test that ran it; pytest
    closes that stream afterwards. Plain stream handlers left behind are removed so a later
    test does not print "--- Logging error ---" into its own captured stderr."""
    yield
    import logging
    import sys

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            if type(handler) is logging.StreamHandler and handler.stream not in (
                sys.__stderr__,
                sys.__stdout__,
            ):
                logger.removeHandler(handler)


os.environ.setdefault("OMP_NUM_THREADS", "2")
# CI runs inside a container (/.dockerenv): the outputs' container provenance is tested on its
# own (test_nipreps.py), every other test sees a bare machine, subprocesses included
os.environ["BIDS_SIAMFUSE_DOCKERENV"] = str(Path(__file__).with_name("no-dockerenv"))


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


@pytest.fixture(scope="session")
def bids_validator():
    """``check(folder)`` runs ``bids-validator-deno`` on a derivatives folder (its root) and
    returns ``(exit code, {(code, severity)}, text)``; skips when the validator is absent."""
    import json
    import subprocess

    from bids_siamfuse.bids import find_validator

    exe = find_validator()
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")

    def check(folder: Path):
        proc = subprocess.run(
            [exe, str(folder), "--format", "json", "--ignoreNiftiHeaders"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        issues = json.loads(proc.stdout).get("issues", {}).get("issues", [])
        found = {(i.get("code"), i.get("severity")) for i in issues}
        errors = [
            f"{i.get('code')} {i.get('location')}" for i in issues if i.get("severity") == "error"
        ]
        return proc.returncode, found, "\n".join(errors)

    return check
