#!/usr/bin/env python3
"""Print constraints.txt: the installed versions of bids_siamfuse's dependency closure.

Run in an environment where ``pip install torch==2.13.0 -e '.[test]'`` just passed the tests
(Python 3.11, as in CI and the image): ``python scripts/lock_constraints.py > constraints.txt``.
torch is left out (the Dockerfile's TORCH_SPEC pins it; CPU and CUDA builds differ).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

HEADER = """\
# Pinned versions of bids_siamfuse's dependencies and theirs (torch excluded: the
# TORCH_SPEC build argument pins it), as installed and tested with Python 3.11, the
# version CI and the image run. The Dockerfile and singularity/from_scratch.def install
# with `pip install -c constraints.txt`, so image builds are reproducible.
# Regenerate after changing a dependency: scripts/lock_constraints.py > constraints.txt"""


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    stack = [
        Requirement(r)
        for r in project["project"]["dependencies"] + project["build-system"]["requires"]
    ]
    env = {"python_version": "3.11", "extra": ""}
    seen: dict[str, str] = {}
    while stack:
        req = stack.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen or name == "torch":
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist.version
        stack.extend(Requirement(r) for r in dist.requires or [])
    print(HEADER)
    for name in sorted(seen):
        print(f"{name}=={seen[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
