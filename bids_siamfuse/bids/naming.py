"""Derivative names: the entity table, the :data:`OUTPUTS` table, and pybids building/parsing.

Every name the pipeline writes or reads comes from here: :func:`build_path` and
:func:`build_name` render the project's path patterns (:data:`PATH_PATTERNS`) with pybids'
:func:`bids.layout.writing.build_path`, and :func:`parse_entities` reads a name back with
pybids' :func:`bids.layout.parse_file_entities` over the same entity table (:data:`CONFIG`, a
pybids configuration). Entities are in the BIDS schema's filename order,
with NiPreps' ``from``/``to``/``mode`` before ``space``
(``sub-01_ses-01_trc-FDG_space-MNI152NLin2009aSym_res-1p5_desc-preproc_pet.nii.gz``).
"""

from __future__ import annotations

import functools
from pathlib import Path

#: Entity keys in filename order (BIDS schema order, NiPreps' from/to/mode before space).
ENTITY_ORDER = (
    ("subject", "sub"),
    ("session", "ses"),
    ("task", "task"),
    ("acquisition", "acq"),
    ("ceagent", "ce"),
    ("tracer", "trc"),
    ("reconstruction", "rec"),
    ("run", "run"),
    ("from", "from"),
    ("to", "to"),
    ("mode", "mode"),
    ("space", "space"),
    ("segmentation", "seg"),
    ("resolution", "res"),
    ("label", "label"),
    ("desc", "desc"),
)
#: Short (filename) key -> entity name, e.g. ``trc`` -> ``tracer``.
SHORT_TO_NAME = {short: name for name, short in ENTITY_ORDER}
#: Entities a PET's derivatives inherit from it (the pair's ``source_entities``).
PET_SOURCE_ENTITIES = ("subject", "session", "tracer", "acquisition", "reconstruction", "run")

_SEP = r"[_/\\]"
#: The project's entities in pybids' configuration format (each pattern finds its entity in a
#: file name or a path); :func:`config` makes the pybids ``Config`` of them.
CONFIG = {
    "name": "bids_siamfuse",
    "entities": [
        *(
            {"name": name, "pattern": rf"(?:^|{_SEP}){short}-([a-zA-Z0-9+]+)(?=[_.]|$)"}
            for name, short in ENTITY_ORDER
        ),
        {"name": "datatype", "pattern": r"[/\\](anat|pet|figures)[/\\]"},
        {"name": "suffix", "pattern": rf"(?:^|{_SEP})([a-zA-Z0-9]+)\.[^/\\]+$"},
        {"name": "extension", "pattern": r"[^./\\](\.[^/\\]+)$"},
    ],
}


@functools.cache
def config():
    """:data:`CONFIG` as a pybids ``Config`` (pybids imported on first use: ~1.8 s here, which
    commands that never name a file, such as ``--version``, do not pay)."""
    from bids.layout.models import Config

    return Config(**CONFIG)


#: A file name (pybids pattern); every part optional, so names without a subject (group-level
#: maps) or without suffix (pair keys) render too.
NAME_PATTERN = (
    "".join(f"[_{short}-{{{name}}}]" for name, short in ENTITY_ORDER) + "[_{suffix}][{extension}]"
)
#: Path patterns of every derivative (pybids syntax): ``sub-<label>/[ses-<label>/]<datatype>/``,
#: except reportlets, which NiPreps keeps in ``sub-<label>/figures/`` for all sessions.
PATH_PATTERNS = (
    "sub-{subject}[/ses-{session}]/{datatype<anat|pet>}/" + NAME_PATTERN,
    "sub-{subject}/{datatype<figures>}/" + NAME_PATTERN,
)


def normalize_entities(entities: dict) -> dict:
    """Full entity names (``seg`` -> ``segmentation``), values as text, empty ones dropped;
    ``run`` without zero padding. An entity outside :data:`ENTITY_ORDER` is a ValueError."""
    out = {}
    for key, value in entities.items():
        if value is None or value == "":
            continue
        key = SHORT_TO_NAME.get(key, key)
        if key not in SHORT_TO_NAME.values():
            raise ValueError(f"unknown entity {key!r}")
        if key == "run":
            value = str(int(value)) if str(value).isdigit() else str(value)
        out[key] = str(value)
    return out


def _render(entities: dict, patterns) -> str:
    from bids.layout.writing import build_path as pybids_build_path

    # the name part starts with "_" (every entity is optional in NAME_PATTERN): drop it
    path = pybids_build_path(entities, list(patterns))
    if path is None:
        raise ValueError(f"no derivative name pattern fits {entities}")
    folder, _, name = path.rpartition("/")
    return f"{folder}/{name.lstrip('_')}" if folder else name.lstrip("_")


def build_name(entities: dict, suffix: str | None = None, extension: str = "") -> str:
    """``sub-01_ses-01_trc-FDG_space-X_desc-preproc_pet.nii.gz`` from entities."""
    ent = normalize_entities(entities)
    if suffix:
        ent["suffix"] = suffix
    if extension:
        ent["extension"] = extension
    return _render(ent, [NAME_PATTERN])


def build_path(entities: dict, *, datatype: str, suffix: str, extension: str) -> Path:
    """The derivative's path relative to the output root (:data:`PATH_PATTERNS`)."""
    ent = normalize_entities(entities)
    if "subject" not in ent:
        raise ValueError("a derivative needs a subject")
    ent.update(datatype=datatype, suffix=suffix, extension=extension)
    return Path(_render(ent, PATH_PATTERNS))


def parse_entities(name: str | Path) -> dict:
    """Entities (full names, text values), ``suffix`` and ``extension`` of a derivative's
    name or path, read with pybids over :data:`CONFIG` (the inverse of :func:`build_path`)."""
    from bids.layout import parse_file_entities

    return parse_file_entities(str(name), entities=config().entities.values())


def sidecar_path(path: Path, extension: str) -> Path:
    """The JSON sidecar of a derivative (its name with ``extension`` replaced by ``.json``)."""
    path = Path(path)
    return path.with_name(path.name[: -len(extension)] + ".json")


def source_entities(name: str | Path) -> dict:
    """The entities a PET derivative inherited from its PET (:data:`PET_SOURCE_ENTITIES`)."""
    ent = parse_entities(name)
    return {k: ent[k] for k in PET_SOURCE_ENTITIES if k in ent}


#: What BIDS has no naming rule for (``.bidsignore`` in the output; docs/outputs.md lists why).
BIDSIGNORE = (
    # folders without a trailing slash: bids-validator-deno matches the folder itself then
    # (with "group/" it still reports /group/ as NOT_INCLUDED once files are nested in it)
    "logs",
    "group",
    "sub-*.html",
    "sub-*/log",
    "sub-*/figures",
    "*_morph.tsv",
    "*_morph.json",
    "*_stats.tsv",
    "*_stats.json",
    "*_regions.npz",
    "*_regions.json",
    "*_xfm.h5",
    "*_xfm.txt",
    "*_xfm.nii.gz",
    "*_xfm.json",
    "*_petref.nii.gz",
    "*_petref.json",
    "*_timeseries.tsv",
    "*_timeseries.json",
    "*_probs.tsv",
    "*_probs.json",
    "*_stat.nii.gz",
    "*_stat.tsv",
    "*_stat.json",
)


def _outputs() -> dict[str, dict]:
    from ..data.templates import RES_LABEL, SPACE

    mni = {"space": SPACE, "resolution": RES_LABEL}
    # sidecar fields every file of the key carries (merged under the writer's own): BIDS
    # requires SkullStripped for preprocessed T1w/PET; these keep the head (the PET's background
    # is thresholded, not masked), so it is false
    head = {"sidecar": {"SkullStripped": False}}
    xfm = {"datatype": "anat", "suffix": "xfm", "mode": "image"}
    fig = {"datatype": "figures", "extension": ".svg"}
    return {
        # anatomical (named after the T1w's subject/session)
        "t1w_preproc": {
            "datatype": "anat",
            "suffix": "T1w",
            "extension": ".nii.gz",
            "desc": "preproc",
            **head,
        },
        "t1w_mask": {
            "datatype": "anat",
            "suffix": "mask",
            "extension": ".nii.gz",
            "desc": "brain",
        },
        "t1w_dseg": {"datatype": "anat", "suffix": "dseg", "extension": ".nii.gz"},
        "t1w_gm": {"datatype": "anat", "suffix": "probseg", "extension": ".nii.gz", "label": "GM"},
        "t1w_wm": {"datatype": "anat", "suffix": "probseg", "extension": ".nii.gz", "label": "WM"},
        "t1w_csf": {
            "datatype": "anat",
            "suffix": "probseg",
            "extension": ".nii.gz",
            "label": "CSF",
        },
        "gm_mni": {
            "datatype": "anat",
            "suffix": "probseg",
            "extension": ".nii.gz",
            "label": "GM",
            **mni,
        },
        "gm_mni_modulated": {
            "datatype": "anat",
            "suffix": "probseg",
            "extension": ".nii.gz",
            "label": "GM",
            "desc": "modulated",
            **mni,
        },
        "t1w2mni_xfm": {**xfm, "extension": ".h5", "from": "T1w", "to": SPACE},
        "mni2t1w_xfm": {**xfm, "extension": ".h5", "from": SPACE, "to": "T1w"},
        # --backend spm: SPM12's deformation fields (y_*.nii, iy_*.nii)
        "t1w2mni_xfm_spm": {**xfm, "extension": ".nii.gz", "from": "T1w", "to": SPACE},
        "mni2t1w_xfm_spm": {**xfm, "extension": ".nii.gz", "from": SPACE, "to": "T1w"},
        "t1w_mni": {
            "datatype": "anat",
            "suffix": "T1w",
            "extension": ".nii.gz",
            "desc": "preproc",
            **mni,
            **head,
        },
        "gm_morph": {
            "datatype": "anat",
            "suffix": "morph",
            "extension": ".tsv",
            "segmentation": "AAL116",
            "desc": "gm",
        },
        # PET (named after the PET's subject/session/tracer/run)
        "pet_ref": {"datatype": "pet", "suffix": "petref", "extension": ".nii.gz", **head},
        "pet2t1w_xfm": {
            "datatype": "pet",
            "suffix": "xfm",
            "extension": ".txt",
            "from": "petref",
            "to": "T1w",
            "mode": "image",
        },
        # per-frame motion: a "_motion.tsv" would be read as BIDS' motion datatype (motion
        # capture); NiPreps' name for per-volume regressors is desc-confounds_timeseries
        "pet_confounds": {
            "datatype": "pet",
            "suffix": "timeseries",
            "extension": ".tsv",
            "desc": "confounds",
        },
        "pet_mni": {
            "datatype": "pet",
            "suffix": "pet",
            "extension": ".nii.gz",
            "desc": "preproc",
            **mni,
            **head,
        },
        "regions": {
            "datatype": "pet",
            "suffix": "regions",
            "extension": ".npz",
            "segmentation": "AAL116",
            **mni,
        },
        "pet_stats": {
            "datatype": "pet",
            "suffix": "stats",
            "extension": ".tsv",
            "segmentation": "AAL116",
            "desc": "pet",
        },
        # quality metrics and flags of the session (T1w + PET), one row per metric
        # (preproc/qc.py); not a BIDS suffix of pet/: listed in .bidsignore like pet_stats
        "qc": {"datatype": "pet", "suffix": "stats", "extension": ".tsv", "desc": "qc"},
        # reportlets (sub-<label>/figures/; anatomical ones named after the T1w)
        "fig_seg": {**fig, "suffix": "dseg", "desc": "seg"},
        "fig_t1w2mni": {**fig, "suffix": "T1w", "space": SPACE, "desc": "t1w2mni"},
        "fig_regions": {**fig, "suffix": "dseg", "desc": "regions"},
        "fig_pet_coreg": {**fig, "suffix": "pet", "desc": "coreg"},
        "fig_pet_mni": {**fig, "suffix": "pet", "space": SPACE, "desc": "pet"},
        # model application (--model BUNDLE; named after the PET; see interfaces/model.py)
        "model_probs": {
            "datatype": "pet",
            "suffix": "probs",
            "extension": ".tsv",
            "desc": "diagnosis",
        },
        **{
            f"model_relevance_{key}": {
                "datatype": "pet",
                "suffix": "stat",
                "extension": ".nii.gz",
                "segmentation": "AAL116",
                "desc": f"relevance{label}",
                **mni,
            }
            for key, label in (("mri", "MRI"), ("pet", "PET"), ("combined", "Combined"))
        },
        "model_relevance": {
            "datatype": "pet",
            "suffix": "stat",
            "extension": ".tsv",
            "segmentation": "AAL116",
            "desc": "relevance",
        },
        # the participant report's relevance figure (reports/participant.py)
        "fig_relevance": {
            "datatype": "figures",
            "suffix": "stat",
            "extension": ".png",
            "segmentation": "AAL116",
            "desc": "relevance",
        },
    }


OUTPUTS = _outputs()


def output_meta(key: str, meta: dict | None) -> dict | None:
    """The sidecar of output ``key``: its fixed fields (``sidecar`` in :data:`OUTPUTS`) under
    ``meta`` (the writer's fields win); None when neither has any."""
    fixed = OUTPUTS[key].get("sidecar")
    if meta is None and not fixed:
        return None
    return {**(fixed or {}), **(meta or {})}


def output_spec(key: str) -> dict:
    """Output ``key`` of :data:`OUTPUTS` as naming arguments (datatype, suffix, extension and
    entities), without its fixed sidecar fields."""
    spec = dict(OUTPUTS[key])
    spec.pop("sidecar", None)
    return spec


def output_path(out_dir: Path, key: str, source: dict) -> Path:
    """Where output ``key`` of :data:`OUTPUTS` goes for these source entities."""
    spec = output_spec(key)
    datatype, suffix, extension = spec.pop("datatype"), spec.pop("suffix"), spec.pop("extension")
    rel = build_path({**source, **spec}, datatype=datatype, suffix=suffix, extension=extension)
    return Path(out_dir) / rel


def _own_entities(key: str) -> dict:
    spec = output_spec(key)
    return {k: v for k, v in spec.items() if k not in ("datatype", "suffix", "extension")}


def output_glob(key: str) -> str:
    """A glob pattern matching output ``key`` of any source (``*_desc-diagnosis_probs.tsv``):
    the source entities come first in every name, the key's own ones after them."""
    spec = output_spec(key)
    return "*_" + build_name(_own_entities(key), spec["suffix"], spec["extension"])


def is_output(name: str | Path, key: str) -> bool:
    """Whether the file ``name`` is output ``key`` (its suffix, extension and own entities)."""
    ent = parse_entities(Path(name).name)
    spec = output_spec(key)
    want = normalize_entities(_own_entities(key))
    return (
        ent.get("suffix") == spec["suffix"]
        and ent.get("extension") == spec["extension"]
        and all(ent.get(k) == v for k, v in want.items())
    )
