"""Synthetic T1w + FDG-PET BIDS cohort with a known answer (the demo and the test data).

``bids_siamfuse-synth OUT --n-per-group 5 --groups CN MCIs MCIc AD --seed 0`` writes a valid
BIDS dataset built from the ICBM152 2009a templates (see :mod:`bids_siamfuse.data.templates`)
and the AAL atlas. Each subject is the template, changed and moved:

Anatomy (MNI space, 1 mm)
    GM is scaled per AAL region by (a) normal inter-subject variation (SD 7 %), (b) age
    (-0.3 %/year around 75) and (c) disease: atrophy in planted regions, scaled by the group's
    stage (CN 0 < MCIs < MCIc < AD), a subject severity, a per-subject split between atrophy
    and hypometabolism and ``--effect-size``. Lost GM becomes CSF. FDG uptake is
    3.5 x GM + 1 x WM (+ a little CSF and scalp), times the per-region metabolism factors.
    Planted regions (both hemispheres, see ``EFFECTS``): hippocampus, parahippocampal, inferior
    and middle temporal (atrophy and hypometabolism), precuneus, posterior cingulate, angular
    (hypometabolism without atrophy), amygdala, fusiform (atrophy without hypometabolism).

Native T1w
    Position x (scanner mm) maps to MNI as ``y = N(A x)``: ``A`` a random affine (rotation up to
    10 degrees, translation up to 10 mm, scaling up to 5 %, session-specific pose and
    subject-specific size) and ``N(z) = z + u(z)`` a smooth random displacement (up to ~5 mm)
    stored on a 5 mm grid and interpolated trilinearly. Voxels 1.0-1.2 mm, stored as RAS, LAS,
    LPS or PIR, some with an oblique (tilted) grid; intensities from the tissue mixture plus
    CSF rim, skull, scalp and a neck below the brain, a smooth bias field and Rician noise.

Native PET
    Its own scanner space, a rigid transform from the T1w (up to 10 degrees, 20 mm), 2-2.5 mm
    voxels, 6-8 mm FWHM, Bq/mL with Poisson-like noise; optionally dynamic (``--pet-frames``:
    frames of ``--frame-duration`` seconds with small inter-frame head motion). Sidecars hold
    every field the BIDS PET specification requires.

Ground truth (``OUT/derivatives/synth-truth``)
    Per session: ``desc-truth_xfm.json`` (the affine ``A``, the PET-to-T1w matrix, frame motions,
    GM volumes), the subject's displacement field ``desc-warp_xfm.nii.gz``, native GM/WM maps,
    and the true MNI-space GM (plain and modulated) on the 121x145x121 grid. Cohort tables:
    ``subjects.tsv`` (group, stage, severity, atrophy share), ``regions.tsv`` (planted weights),
    ``region_factors.tsv`` (per-subject, per-region GM and uptake factors). :func:`load_truth`
    rebuilds the exact native<->MNI mappings from these files.

``--preprocessed`` also writes, under ``OUT/derivatives/bids_siamfuse``, what a perfect
participant run would write (modulated GM and normalized PET on the grid, region files), with
the pipeline's own writers, so group-level work can be tested without registration.

``--effect ad|coupling|nonlinear|none`` makes realistic benchmark cohorts instead
(:mod:`bids_siamfuse.synth.effects`).

Modules, by job:
    ``geometry``  grids, affines, sampling, the native<->MNI :class:`Mapping`
    ``head``      the template head model and the original generator's subject parameters
    ``subject``   one subject of the original generator written out (raw, truth, derivatives)
    ``files``     file names, NIfTI writers, :func:`load_truth`
    ``cohort``    planning, :func:`generate` (parallel subjects), dataset files and truth tables
    ``cli``       ``bids_siamfuse-synth`` (:func:`main`; also ``python -m bids_siamfuse.synth``)
    ``effects``   the ``--effect`` families' parameters and per-subject draws
    ``effect_maps``    their session maps (texture, residuals, noise, PSF, modulation)
    ``effect_cohort``  their subjects written out, truth tables, :func:`region_summary`
"""

from .cli import build_parser, main
from .cohort import generate, plan_cohort
from .files import Truth, load_truth
from .geometry import Mapping, apply_affine, grid_points, oriented_grid, rigid, rotation, sample
from .head import EFFECTS, STAGES, HeadModel, SubjectSpec, effect_weights, head_model
from .subject import CohortOptions, make_subject

__all__ = [
    "EFFECTS",
    "STAGES",
    "CohortOptions",
    "HeadModel",
    "Mapping",
    "SubjectSpec",
    "Truth",
    "apply_affine",
    "build_parser",
    "effect_weights",
    "generate",
    "grid_points",
    "head_model",
    "load_truth",
    "main",
    "make_subject",
    "oriented_grid",
    "plan_cohort",
    "rigid",
    "rotation",
    "sample",
]
