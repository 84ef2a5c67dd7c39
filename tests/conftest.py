"""Shared fixtures: small synthetic cohorts built once per session (and per-module copies,
the loaded cohort), an HTML parser for report structure checks, the parsed Dockerfile.

The AAL atlas ships in the package, so the suite needs no ``NILEARN_DATA`` (``.ci/run`` unsets
it); ``tests/test_atlas.py`` checks the nilearn layout as the alternative source.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

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


def _copy_cohort(src: Path, dst: Path) -> Path:
    """participants.tsv, dataset_description.json and the region files of a synth cohort."""
    dst.mkdir(parents=True)
    for name in ("participants.tsv", "dataset_description.json"):
        shutil.copy(src / name, dst / name)
    deriv = src / "derivatives" / "bids_siamfuse"
    for f in deriv.rglob("*_regions.*"):
        target = dst / "derivatives" / "bids_siamfuse" / f.relative_to(deriv)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    shutil.copy(deriv / "dataset_description.json", dst / "derivatives" / "bids_siamfuse")
    return dst


@pytest.fixture(scope="session")
def copy_cohort():
    """``copy_cohort(src, dst) -> dst``: a cohort's participants.tsv, dataset_description.json
    and region files (what the group level reads), copied to ``dst``."""
    return _copy_cohort


@pytest.fixture(scope="module")
def group_ds(synth_derivs, tmp_path_factory) -> Path:
    """This test module's private copy of the synth_derivs cohort (region files only)."""
    return _copy_cohort(synth_derivs, tmp_path_factory.mktemp("group_ds") / "ds")


@pytest.fixture(scope="module")
def cohort(synth_derivs):
    """The synth_derivs cohort's CN and AD region files as a ``RegionDataset``."""
    from bids_siamfuse.bids import read_participants
    from bids_siamfuse.group.cohort import load_cohort

    return load_cohort(
        synth_derivs / "derivatives" / "bids_siamfuse",
        read_participants(synth_derivs),
        classes=("CN", "AD"),
    )


@pytest.fixture(scope="session")
def parse_html():
    """``parse_html(text_or_path)``: the document's element tree (lxml, a forgiving parser like
    a browser's), for structure checks with XPath instead of counting markup in the text."""
    import lxml.html

    def parse(source):
        text = source.read_text() if isinstance(source, Path) else source
        return lxml.html.document_fromstring(text)

    return parse


class DockerInstruction(NamedTuple):
    stage: str  # the ``AS`` name of the stage it belongs to ("" before the first FROM)
    keyword: str  # FROM, RUN, ENV, ...
    value: str  # the rest, continuation lines joined

    def pairs(self) -> dict:
        """``KEY=value`` pairs of an ENV, ARG or LABEL instruction (shell quoting removed)."""
        import shlex

        return dict(
            item.split("=", 1) if "=" in item else (item, None) for item in shlex.split(self.value)
        )

    def script(self) -> str:
        """A RUN instruction's shell command, without its ``--mount=...`` options."""
        import re

        return re.sub(r"^(--\S+\s+)+", "", self.value)


def _parse_dockerfile(path: Path) -> list[DockerInstruction]:
    instructions, stage, pending = [], "", ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not (pending or line.strip()):
            continue  # comments go even inside continued instructions, as in docker build
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, value = pending.strip().partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            words = value.split()
            stage = words[2] if len(words) > 2 and words[1].upper() == "AS" else words[0]
        instructions.append(DockerInstruction(stage, keyword, value.strip()))
    return instructions


@pytest.fixture(scope="session")
def dockerfile() -> list[DockerInstruction]:
    """The project's Dockerfile as a list of instructions (a small parser of the subset of the
    syntax it uses), for checks on its structure rather than on its text."""
    return _parse_dockerfile(Path(__file__).resolve().parents[1] / "Dockerfile")


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
