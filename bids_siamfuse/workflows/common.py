"""What every participant-level builder shares: the run's options and the workflow names.

:class:`ParticipantOptions` is built once from the resolved settings
(:meth:`ParticipantOptions.from_settings`) and handed to every builder, instead of
the same keywords passed through each signature. The name helpers are the single definition
of the graph's node names, which the runner (status per pair, crash blame, progress groups,
the scheduler's branches) reads back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ParticipantOptions:
    """The settings that shape a participant workflow (already resolved: no ``auto`` here).

    ``output_dir``/``bids_dir``: derivatives root and input dataset (``bids:raw:`` sources in
    the sidecars). ``backend``: ``ants`` or ``spm`` (then ``spm`` is the
    :class:`~bids_siamfuse.preproc.spm.SPMInstall`). ``sloppy``: fast, low-accuracy settings.
    ``pet_ref_region``: ``none`` (the paper's top-0.1% normalization) or ``cerebellum``.
    ``omp_nthreads``, ``seed``: threads per ANTs node, registration seed. ``model``/``device``:
    apply this bundle to each region file. ``reports``: write the reportlets.
    """

    output_dir: Path
    bids_dir: Path | None = None
    backend: str = "ants"
    sloppy: bool = False
    pet_ref_region: str = "none"
    omp_nthreads: int = 1
    seed: int = 42
    spm: object = None
    model: Path | None = None
    device: str = "cpu"
    reports: bool = True

    @classmethod
    def from_settings(
        cls, settings, *, omp_nthreads: int, device: str, spm=None
    ) -> ParticipantOptions:
        """The options of a run: its settings plus the values resolved by the caller."""
        ex, wf = settings.execution, settings.workflow
        return cls(
            output_dir=Path(ex.output_dir).absolute(),
            bids_dir=Path(ex.bids_dir).absolute() if ex.bids_dir else None,
            backend=wf.backend,
            sloppy=wf.sloppy,
            pet_ref_region=wf.pet_ref_region,
            omp_nthreads=omp_nthreads,
            seed=ex.random_seed,
            spm=spm,
            model=wf.model,
            device=device,
        )


#: ``outputnode`` fields of the anatomical workflow (both backends).
ANAT_FIELDS = [
    "t1w_preproc",
    "brain_mask",
    "gm",
    "wm",
    "csf",
    "dseg",
    "gm_mni",
    "gm_mni_modulated",
    "positions",
    "t1w2mni_xfm",
    "mni2t1w_xfm",
    "spm_deformation",
    "anat_qc",
]


def safe_name(text: str) -> str:
    """A nipype-safe node name fragment."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_")


def subject_wf_name(subject: str) -> str:
    return f"single_subject_{safe_name(subject)}_wf"


def anat_wf_name(subject: str, session: str | None) -> str:
    return f"anat_{safe_name(session)}_wf" if session else "anat_wf"


def pet_wf_name(pair) -> str:
    key = pair.key.removeprefix(f"sub-{pair.subject}").strip("_")
    return f"pet_{safe_name(key)}_wf"
