"""Bring your own preprocessing: MNI-space GM and PET maps from ``-d/--derivatives NAME=PATH``.

With ``-d`` the participant level does not segment, register or normalize anything: for every
PET/T1w pair of the raw dataset it takes a modulated grey-matter map and a PET map that another
pipeline already put in MNI space, brings them onto the 121x145x121 1.5 mm grid, and continues
as usual (AAL116 regions, tables, reports, ``--model``). Two layouts are read (the folder holding
``subjects/`` is a Clinica CAPS, any other a BIDS derivatives dataset):

BIDS derivatives (named like this app's own outputs, :data:`bids_siamfuse.bids.OUTPUTS`)
    * GM: ``sub-<S>[/ses-<T>]/anat/sub-<S>[_ses-<T>]_space-<SPACE>[_res-<R>]
      _label-GM_desc-modulated_probseg.nii[.gz]`` (``T``: the session of the pair's T1w);
    * PET: ``sub-<S>[/ses-<E>]/pet/sub-<S>[_ses-<E>]_trc-<TRACER>[_acq/rec/run of the raw
      PET]_space-<SPACE>[_res-<R>]_desc-preproc_pet.nii[.gz]``;
    * ``SPACE`` one of ``MNI152NLin2009aSym`` (this app's), ``MNI152NLin6Asym`` (FSL/fMRIPrep),
      ``IXI549Space`` (SPM12's TPM space), at any resolution.

Clinica CAPS (``t1-volume``, ``pet-volume``; names as ``clinica.utils.input_files`` queries them)
    * GM: ``subjects/sub-<S>/ses-<T>/t1/spm/segmentation/normalized_space/
      <T1w source>_segm-graymatter_space-Ixi549Space_modulated-on_probability.nii[.gz]``
      (SPM12 unified segmentation, modulated: the paper's ``mwc1``; the DARTEL maps under
      ``t1/spm/dartel/group-*`` depend on a group template and are not read);
    * PET: ``subjects/sub-<S>/ses-<E>/pet/preprocessing/group-<G>/
      <PET source>_space-Ixi549Space_suvr-<REF>_pet.nii[.gz]`` where ``<PET source>`` is the raw
      PET's name without extension (``sub-<S>_ses-<E>_trc-18FFDG[_rec-<R>]_pet``; Clinica
      before 0.9 used ``..._acq-fdg_pet``) and ``REF`` is ``pons``, ``cerebellumPons``,
      ``pons2`` or ``cerebellumPons2``: the SUVR map without partial-volume correction,
      brain mask or smoothing (``_pvc-rbv``, ``_mask-brain``, ``_fwhm-<X>mm`` variants are not
      read), 121x145x121 at 1.5 mm.

A pair is *refused* (exit code 65 at the end, the other pairs go on) when only one of its two
maps is found, when a map is in another space, is not a 3-D image, or does not cover the
brain (CAPS maps must be 121x145x121), or when one folder holds several candidates that rank
equally. A pair for which no folder holds either map is *skipped* (listed, not processed): a
CAPS often covers a subset of the sessions, and computing the missing ones here would mix two
pipelines in one cohort.

Everything found is recorded per map (:meth:`MapFile.provenance`: the folder's NAME and layout,
the file, its SHA-256, the space, shape, voxel size, and how it is brought onto the grid); the
workflow writes it into the region file and every sidecar.

Why one module of ~550 lines: both layouts' finders feed one ranking and refusal rule
(:func:`_pick`) and one plan (:func:`attach_external`); a third layout would be the moment
to split the finders into a package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bids.naming import normalize_entities, parse_entities
from .errors import DataError, NoInputError, UsageError

LOGGER = logging.getLogger("bids_siamfuse.external")

#: MNI-like spaces accepted, lower case -> the identifier recorded (template order of preference)
SPACES = {
    "mni152nlin2009asym": "MNI152NLin2009aSym",
    "ixi549space": "IXI549Space",
    "mni152nlin6asym": "MNI152NLin6Asym",
}
#: Share of the grid's brain-mask voxels a map's field of view must hold.
MIN_BRAIN_COVERAGE = 0.95
INTERPOLATION = "trilinear"
CAPS_SUVR_REGIONS = ("pons", "cerebellumPons", "pons2", "cerebellumPons2")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# ----------------------------------------------------------------------------------------------
# The -d/--derivatives values
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DerivativesFolder:
    """One ``-d NAME=PATH``: its name (for ``bids:<NAME>:`` URIs), root and layout."""

    name: str
    root: Path
    layout: str  # "caps" or "bids"

    @property
    def label(self) -> str:
        return "Clinica CAPS" if self.layout == "caps" else "BIDS derivatives"


def parse_derivatives(values) -> list[DerivativesFolder]:
    """``["caps=/data/caps", "/data/spm"]`` -> folders (exit 64 for a bad value, 66 missing).

    ``NAME=PATH`` as fMRIPrep; a bare ``PATH`` is named after its folder.
    """
    folders, names = [], set()
    for value in values or []:
        text = str(value)
        name, sep, path = text.partition("=")
        if not sep:
            name, path = Path(text).name, text
        name = name.strip()
        if not name or not path.strip() or not _NAME.match(name):
            raise UsageError(f"-d/--derivatives {text!r}: expected NAME=PATH")
        if name in names:
            raise UsageError(f"-d/--derivatives: the name {name!r} is given twice")
        if name == "raw":  # bids:raw: URIs already point at BIDS_DIR
            raise UsageError("-d/--derivatives: the name 'raw' is reserved; choose another")
        root = Path(path).expanduser().absolute()
        if not root.is_dir():
            raise NoInputError(f"-d/--derivatives {name}={root}: no such directory")
        layout = "caps" if (root / "subjects").is_dir() else "bids"
        if layout == "bids" and not any(root.glob("sub-*")):
            raise NoInputError(
                f"-d/--derivatives {name}={root}: neither a CAPS (subjects/) nor a BIDS "
                "derivatives folder (sub-*/)"
            )
        names.add(name)
        folders.append(DerivativesFolder(name=name, root=root, layout=layout))
    return folders


def link_derivatives(out_dir: Path, folders: list[DerivativesFolder]) -> None:
    """Add ``DatasetLinks.<NAME>`` to the output's ``dataset_description.json``.

    The sidecars cite the maps as ``bids:<NAME>:<path>``; the link makes those URIs resolvable.
    Several jobs may do this at once: each rewrites the file atomically with the same links.
    """
    from .bids import save_json

    path = Path(out_dir) / "dataset_description.json"
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(desc, dict):
        return
    links = dict(desc.get("DatasetLinks") or {})
    wanted = {f.name: f.root.as_uri() for f in folders}
    if all(links.get(k) == v for k, v in wanted.items()):
        return
    desc["DatasetLinks"] = {**links, **wanted}
    save_json(path, desc)


# ----------------------------------------------------------------------------------------------
# One map file
# ----------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class MapFile:
    """A GM or PET map found in a derivatives folder, checked at the header level."""

    kind: str  # "GM" or "PET"
    path: Path
    folder: DerivativesFolder
    space: str
    shape: tuple = ()
    zooms: tuple = ()
    on_grid: bool = False
    digest: str = ""
    #: what the source says about the PET's intensities (CAPS: the SUVR reference region)
    source_normalization: str = ""
    #: set when the map was intensity-normalized by this app already (its sidecar says so)
    normalized_by_app: str = ""
    #: named after the pair's own raw file (rather than another copy of the raw data)
    exact: bool = True

    @property
    def uri(self) -> str:
        rel = self.path.relative_to(self.folder.root).as_posix()
        return f"bids:{self.folder.name}:{rel}"

    @property
    def resampling(self) -> str:
        if self.on_grid:
            return "none: already on the 121x145x121 1.5 mm grid"
        zooms = "x".join(f"{z:g}" for z in self.zooms)
        return (
            f"{INTERPOLATION} interpolation from {zooms} mm ({self.space}) onto the "
            "121x145x121 1.5 mm grid, one resampling, world coordinates taken as equal"
        )

    def provenance(self) -> dict:
        out = {
            "Derivatives": self.folder.name,
            "Layout": self.folder.label,
            "File": str(self.path),
            "URI": self.uri,
            "SHA256": self.digest,
            "Space": self.space,
            "Shape": list(self.shape),
            "VoxelSize": [float(z) for z in self.zooms],
            "Resampling": self.resampling,
        }
        if self.source_normalization:
            out["SourceIntensity"] = self.source_normalization
        if self.normalized_by_app:
            out["AlreadyNormalized"] = self.normalized_by_app
        return out


def check_map(item: MapFile) -> MapFile:
    """Header checks of a candidate map; fills shape/zooms/grid; DataError naming the file."""
    import nibabel as nb

    from .data.templates import GRID_SHAPE, on_grid

    try:
        img = nb.load(str(item.path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(f"{item.path}: not a readable NIfTI image ({first})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 2:
        raise DataError(f"{item.path}: {item.kind} map of shape {shape}; expected a 3-D volume")
    affine = img.affine
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise DataError(f"{item.path}: singular or non-finite affine")
    item.shape = shape
    item.zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0).round(4))
    item.on_grid = shape == GRID_SHAPE and on_grid(img)
    if item.folder.layout == "caps" and shape != GRID_SHAPE:
        raise DataError(
            f"{item.path}: shape {shape}, but Clinica writes Ixi549Space maps on SPM's "
            f"{GRID_SHAPE} 1.5 mm grid"
        )
    if not item.on_grid:
        coverage = brain_coverage(shape, affine)
        if coverage < MIN_BRAIN_COVERAGE:
            raise DataError(
                f"{item.path}: its field of view holds {coverage:.0%} of the MNI brain "
                f"(shape {shape}, voxels {item.zooms} mm); need {MIN_BRAIN_COVERAGE:.0%}"
            )
    item.digest = sha256(item.path)
    return item


def brain_coverage(shape, affine) -> float:
    """Share of the grid's brain-mask voxels inside an image's field of view."""
    from .data.templates import GRID_AFFINE, grid_brain_mask

    ijk = np.argwhere(grid_brain_mask()).T.astype(np.float64)
    world = GRID_AFFINE[:3, :3] @ ijk + GRID_AFFINE[:3, 3:4]
    inv = np.linalg.inv(affine)
    src = inv[:3, :3] @ world + inv[:3, 3:4]
    inside = np.all((src >= -0.5) & (src <= np.array(shape)[:, None] - 0.5), axis=0)
    return float(inside.mean()) if inside.size else 0.0


# ----------------------------------------------------------------------------------------------
# Finding the maps of one pair
# ----------------------------------------------------------------------------------------------


def _stem(path: Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _nifti(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")) and p.is_file()
    )


@dataclass
class Candidates:
    """What one folder holds for one map of one pair: usable files, and rejected ones."""

    usable: list[MapFile] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.usable or self.rejected)


def _space_rank(space: str) -> int:
    return list(SPACES.values()).index(space)


def _bids_candidates(folder: DerivativesFolder, pair, kind: str) -> Candidates:
    """GM (of the pair's T1w session) or PET (of the pair) in a BIDS derivatives folder."""
    out = Candidates()
    if kind == "GM":
        session, datatype = pair.t1w_session, "anat"
        wanted = {"subject": pair.subject, "label": "GM", "desc": "modulated"}
        suffix = "probseg"
    else:
        session, datatype = pair.session, "pet"
        wanted = {"subject": pair.subject, "desc": "preproc"}
        wanted.update(normalize_entities(pair.pet_entities))
        suffix = "pet"
    base = folder.root / f"sub-{pair.subject}"
    where = (base / f"ses-{session}" if session else base) / datatype
    for path in _nifti(where):
        ents = parse_entities(path.name)
        if ents.get("suffix") != suffix or ents.get("session") != (session or None):
            continue
        if "run" in ents:
            ents["run"] = normalize_entities({"run": ents["run"]})["run"]
        if any(ents.get(k) != v for k, v in wanted.items()):
            continue
        other = ("acquisition", "reconstruction", "run")
        if kind == "PET" and any(k in ents for k in other if k not in wanted):
            continue  # another acquisition/reconstruction/run of this session
        space = ents.get("space")
        if space is None or space.lower() not in SPACES:
            out.rejected.append(
                (
                    path,
                    f"space-{space} is not one of {', '.join(SPACES.values())}"
                    if space
                    else "no space- entity, so not a standard-space map",
                )
            )
            continue
        item = MapFile(kind=kind, path=path, folder=folder, space=SPACES[space.lower()])
        if kind == "PET":
            item.normalized_by_app, item.source_normalization = _pet_sidecar(path)
        out.usable.append(item)
    return out


def _pet_sidecar(path: Path) -> tuple[str, str]:
    """(normalized by this app: how, what the sidecar says about the intensities)."""
    sidecar = path.with_name(_stem(path) + ".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return "", "unknown (no readable JSON sidecar)"
    if not isinstance(meta, dict):
        return "", "unknown (sidecar is not a JSON object)"
    norm = meta.get("IntensityNormalization")
    units = meta.get("Units")
    said = f"Units {units!r}" if units else "no Units in the sidecar"
    if norm and isinstance(norm, str):
        ref = meta.get("ReferenceRegion", "none")
        return f"{norm} (reference region {ref})", said
    return "", said


_CAPS_GM = re.compile(
    r"^(?P<source>sub-[A-Za-z0-9]+_ses-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*_T1w)"
    r"_segm-graymatter_space-Ixi549Space_modulated-on_probability\.nii(?:\.gz)?$"
)
_CAPS_PET = re.compile(
    r"^(?P<source>sub-[A-Za-z0-9]+_ses-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*_pet)"
    r"_space-Ixi549Space_suvr-(?P<ref>[A-Za-z0-9]+)_pet\.nii(?:\.gz)?$"
)


def _caps_candidates(folder: DerivativesFolder, pair, kind: str) -> Candidates:
    out = Candidates()
    session = pair.t1w_session if kind == "GM" else pair.session
    if not session:
        return out  # CAPS always has sessions
    ses_dir = folder.root / "subjects" / f"sub-{pair.subject}" / f"ses-{session}"
    prefix = f"sub-{pair.subject}_ses-{session}_"
    if kind == "GM":
        files = _nifti(ses_dir / "t1" / "spm" / "segmentation" / "normalized_space")
        own = _stem(pair.t1w)
        for path in files:
            m = _CAPS_GM.match(path.name)
            if m is None or not path.name.startswith(prefix):
                continue
            item = MapFile(kind="GM", path=path, folder=folder, space="IXI549Space")
            item.exact = m["source"] == own
            out.usable.append(item)
        # the raw T1w's own map; another T1w run of the session only without it
        out.usable = [c for c in out.usable if c.exact] or out.usable
        return out
    own = _stem(pair.pet)
    tracer = str(pair.pet_entities.get("tracer", "")).lower()
    for path in sorted((ses_dir / "pet" / "preprocessing").glob("group-*/*.nii*")):
        m = _CAPS_PET.match(path.name)
        if m is None or not path.name.startswith(prefix):
            continue
        source_ents = parse_entities(m["source"] + ".nii")
        if m["source"] != own:
            # same session and tracer, named from another copy of the raw data (trc- since
            # Clinica 0.9, acq-<tracer> before): accepted only when nothing matches exactly
            named = {
                source_ents.get("tracer", "").lower(),
                source_ents.get("acquisition", "").lower(),
            }
            if tracer not in named and tracer.removeprefix("18f") not in named:
                continue
        if m["ref"] not in CAPS_SUVR_REGIONS:
            out.rejected.append((path, f"suvr-{m['ref']} is not a Clinica reference region"))
            continue
        item = MapFile(kind="PET", path=path, folder=folder, space="IXI549Space")
        item.source_normalization = (
            f"SUVR (Clinica pet-volume, reference region {m['ref']}, DARTEL {path.parent.name})"
        )
        item.exact = m["source"] == own
        out.usable.append(item)
    out.usable = [c for c in out.usable if c.exact] or out.usable
    return out


def _pick(cands: Candidates, kind: str, pair) -> MapFile:
    """The one usable candidate (after header checks and ranking); DataError otherwise."""
    checked, problems = [], list(cands.rejected)
    for item in cands.usable:
        try:
            checked.append(check_map(item))
        except DataError as exc:
            problems.append((item.path, str(exc).removeprefix(f"{item.path}: ")))
    if not checked:
        path, why = problems[0]
        raise DataError(f"{path}: {why}")
    # this app's space first, then maps already on the grid, then finer voxels
    checked.sort(key=lambda c: (_space_rank(c.space), not c.on_grid, max(c.zooms)))
    best = checked[0]
    ties = [
        c
        for c in checked[1:]
        if (c.space, c.on_grid, c.zooms) == (best.space, best.on_grid, best.zooms)
    ]
    if ties:
        raise DataError(
            f"{best.path}: ambiguous {kind} map for {pair.key}: also "
            + ", ".join(str(c.path) for c in ties)
            + "; keep one, or point -d at a folder holding one"
        )
    return best


@dataclass
class ExternalPair:
    """The two maps that replace the preprocessing of one pair."""

    gm: MapFile
    pet: MapFile
    notes: list[str] = field(default_factory=list)

    def provenance(self, *, pet_normalization: str = "") -> dict:
        return {
            "Preprocessing": "external (-d/--derivatives): maps read, not computed",
            "GM": self.gm.provenance(),
            "PET": self.pet.provenance(),
            "Interpolation": INTERPOLATION,
            **({"PETIntensityNormalization": pet_normalization} if pet_normalization else {}),
        }


def find_pair_maps(pair, folders: list[DerivativesFolder]) -> ExternalPair | None:
    """The GM and PET maps of ``pair`` (None when no folder has either; DataError if refused).

    Each map comes from the first folder (in ``-d`` order) that holds a candidate for it.
    """
    found = {}
    for kind in ("GM", "PET"):
        for folder in folders:
            finder = _caps_candidates if folder.layout == "caps" else _bids_candidates
            cands = finder(folder, pair, kind)
            if cands:
                found[kind] = (cands, folder)
                break
    if not found:
        return None
    if len(found) == 1:
        ((kind, (cands, folder)),) = found.items()
        other = "PET" if kind == "GM" else "grey-matter"
        first = cands.usable[0].path if cands.usable else cands.rejected[0][0]
        raise DataError(
            f"{first}: {'grey-matter' if kind == 'GM' else 'PET'} map without a matching "
            f"{other} map for {pair.key} in " + ", ".join(f"{f.name}={f.root}" for f in folders)
        )
    gm = _pick(found["GM"][0], "GM", pair)
    pet = _pick(found["PET"][0], "PET", pair)
    notes = []
    for item in (gm, pet):
        notes.append(
            f"{item.kind}: {item.path} ({item.folder.name}, {item.space}, "
            f"{'on the grid' if item.on_grid else INTERPOLATION + ' resampling'})"
        )
    return ExternalPair(gm=gm, pet=pet, notes=notes)


def attach_external(plan, folders: list[DerivativesFolder]) -> dict:
    """Give every pair of ``plan`` its external maps, in ``plan.external`` (key -> pair).

    Refused pairs move to ``plan.invalid`` (exit 65 at the end), pairs without any map to
    ``plan.skipped``; the others stay in ``plan.pairs``. A pair refused earlier for its *raw*
    images (header screening) comes back when both its maps are found: with ``-d`` the raw
    images are never read.
    """
    keep, external, still_invalid = [], {}, []
    for pair, why in list(plan.invalid):
        try:
            maps = find_pair_maps(pair, folders)
        except DataError:
            maps = None
        if maps is None:
            still_invalid.append((pair, why))
            continue
        note = f"raw images not read (-d), so their problem does not matter: {why}"
        LOGGER.info("%s: %s", pair.key, note)
        pair.notes.append(note)
        plan.pairs.append(pair)
    plan.invalid = still_invalid
    for pair in sorted(plan.pairs, key=lambda p: p.key):
        try:
            maps = find_pair_maps(pair, folders)
        except DataError as exc:
            LOGGER.error("%s: refused: %s", pair.key, exc)
            plan.invalid.append((pair, str(exc)))
            continue
        if maps is None:
            where = ", ".join(f.name for f in folders)
            plan.skipped.append(
                (pair.subject, pair.session, f"no GM or PET map in --derivatives {where}")
            )
            LOGGER.warning("%s: no GM or PET map in --derivatives %s; skipped", pair.key, where)
            continue
        external[pair.key] = maps
        keep.append(pair)
    plan.pairs = keep
    plan.external = external
    return external


def describe(plan) -> str:
    """``--dry-run`` with ``-d``: what would be read for each pair (instead of the raw images)."""
    external = getattr(plan, "external", {}) or {}
    lines = [f"{len(plan.pairs)} pair(s) to process from --derivatives (no preprocessing):"]
    for pair in plan.pairs:
        maps = external[pair.key]
        lines.append(f"  {pair.key}")
        for item in (maps.gm, maps.pet):
            lines.append(f"    {item.kind}: {item.path}")
            lines.append(
                f"      from {item.folder.name} ({item.folder.label}), {item.space}, shape "
                f"{'x'.join(map(str, item.shape))}, sha256 {item.digest[:16]}..."
            )
            lines.append(f"      resampling: {item.resampling}")
        lines.extend(f"    note: {note}" for note in pair.notes)
    return "\n".join(lines + plan.left_out_lines())
