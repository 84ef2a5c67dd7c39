"""The SPM12 backend's installation: where SPM12 standalone is and how nipype calls it.

SPM12 standalone (compiled, no MATLAB licence) runs on the MATLAB Runtime (MCR). It is found,
in this order, from

1. ``--spm-cmd CMD``: the full command nipype runs, e.g.
   ``/opt/spm12/run_spm12.sh /opt/mcr/v97 script``;
2. ``SPMSTANDALONE_HOME`` (the folder holding ``run_spm12.sh``) and ``MCR_HOME`` (the MATLAB
   Runtime folder), Clinica's convention: the command is
   ``$SPMSTANDALONE_HOME/run_spm12.sh $MCR_HOME script``.

Without either, or when the files are missing, :func:`find_spm` raises ``NoInputError`` (exit
66) with one line saying what to install or set. The backend targets **SPM12 r7771** (the last
SPM12 release); the version is pinned in the batch (``spm.spatial.preproc``, SPM12's
segmentation), not detected, because nipype writes an SPM8 batch when detection fails.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import NoInputError

SPM_VERSION = "12.7771"
SPM_RELEASE = "SPM12 r7771"
#: SPM's default bounding box and voxel size for warped tissue maps: the 121x145x121 grid.
BOUNDING_BOX = [[-90.0, -126.0, -72.0], [90.0, 90.0, 108.0]]
VOXEL_SIZE = [1.5, 1.5, 1.5]


@dataclass
class SPMInstall:
    matlab_cmd: str
    tpm: Path
    use_mcr: bool = True
    root: Path | None = None

    def node_inputs(self) -> dict:
        """Inputs every SPM node takes (so worker processes need no global state)."""
        return {"matlab_cmd": self.matlab_cmd, "use_mcr": self.use_mcr, "mfile": True}

    def configure(self) -> None:
        """Set nipype's SPM defaults for this process (no MATLAB call)."""
        from nipype.interfaces.spm.base import SPMCommand

        SPMCommand._matlab_cmd = self.matlab_cmd
        SPMCommand._use_mcr = self.use_mcr


def _find_tpm(root: Path) -> Path | None:
    for pattern in ("tpm/TPM.nii", "*/tpm/TPM.nii", "*/*/tpm/TPM.nii", "*/*/*/tpm/TPM.nii"):
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    return None


def find_spm(spm_cmd: str = "", *, check: bool = True) -> SPMInstall:
    """Locate SPM12 standalone (see the module docstring); NoInputError when absent."""
    hint = (
        "install SPM12 standalone (r7771) and the MATLAB Runtime, then set SPMSTANDALONE_HOME "
        "and MCR_HOME or pass --spm-cmd; or use --backend ants"
    )
    if spm_cmd:
        parts = shlex.split(spm_cmd)
        exe = shutil.which(parts[0]) if parts else None
        if exe is None:
            raise NoInputError(f"--backend spm: --spm-cmd {parts[0] if parts else ''!r} not found")
        root = Path(exe).resolve().parent
        cmd = spm_cmd
    else:
        home, mcr = os.environ.get("SPMSTANDALONE_HOME"), os.environ.get("MCR_HOME")
        if not home or not mcr:
            raise NoInputError(f"--backend spm: SPM12 not found; {hint}")
        root = Path(home)
        script = root / "run_spm12.sh"
        if not script.is_file():
            raise NoInputError(f"--backend spm: {script} not found (SPMSTANDALONE_HOME); {hint}")
        if not Path(mcr).is_dir():
            raise NoInputError(f"--backend spm: MCR_HOME={mcr} is not a folder; {hint}")
        cmd = f"{script} {mcr} script"
    tpm = _find_tpm(root)
    if tpm is None:
        raise NoInputError(f"--backend spm: no tpm/TPM.nii under {root}; {hint}")
    install = SPMInstall(matlab_cmd=cmd, tpm=tpm, root=root)
    if check:
        check_version(install)
    return install


def check_version(install: SPMInstall, timeout: float = 300) -> str:
    """Run SPM once and make sure it is SPM12 (NoInputError otherwise)."""
    cmd = shlex.split(install.matlab_cmd)
    if cmd and cmd[-1] == "script":
        cmd = cmd[:-1]
    try:
        proc = subprocess.run(
            [*cmd, "--version"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NoInputError(f"--backend spm: cannot run SPM12 ({exc})") from None
    text = proc.stdout + proc.stderr
    if "SPM12" not in text:
        tail = (text.strip().splitlines() or ["no output"])[-1]
        raise NoInputError(f"--backend spm: {install.matlab_cmd} is not SPM12 ({tail})")
    return text
