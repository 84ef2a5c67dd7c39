"""BIDS input and derivative output.

Input
    :func:`collect_pairs` finds, for every selected subject, each PET series of the chosen tracer
    and the T1w that goes with it. **Pairing rule** (``--pairing``):

    * ``same-session``: a PET is processed only when its session has a T1w.
    * ``nearest`` (default): the T1w of the PET's own session when there is one; otherwise the
      T1w of the session nearest in time, where time is ``acq_time`` from
      ``sub-<label>_sessions.tsv`` when both sessions have it, else the number in the session
      label (``ses-m06`` -> 6, ``ses-02`` -> 2) when every session label of the subject holds
      one, else the sessions' sorted order. A tie goes to the earlier session. The plan and the
      log say which T1w was borrowed.

    Several T1w runs in one session: the lowest ``run`` (then the first in sorted order) is used
    and the others are listed as ignored; pick another with ``--bids-filter-file``
    (``{"t1w": {"run": 2}}``). Each PET file of the tracer is its own pair (runs,
    reconstructions). Sessions with a T1w but no PET, and subjects without any T1w, are skipped
    and listed with the reason.

    :func:`read_participants` reads the diagnosis labels from ``participants.tsv``.

Output
    :func:`build_path` names derivatives the NiPreps way (entity order of the BIDS schema),
    :func:`save_image`/:func:`save_table`/:func:`save_json` write them atomically (a temporary
    file in the same folder, then :func:`os.replace`), and :func:`ensure_dataset_description`
    writes ``dataset_description.json`` once, safely when many jobs start together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ._version import __version__
from .atomic import atomic_path, publish_once
from .errors import (
    CannotWriteError,
    DataError,
    InvalidBIDSError,
    NoInputError,
    NothingSelectedError,
    UsageError,
)

LOGGER = logging.getLogger("bids_siamfuse.bids")

PIPELINE_NAME = "bids_siamfuse"
CODE_URL = "https://github.com/bids-siamfuse/bids_siamfuse"

#: Folders never indexed in the input dataset.
IGNORE_INPUT = ("code", "derivatives", "sourcedata", "stimuli", "models", "logs")


# ----------------------------------------------------------------------------------------------
# Input: validation, layout, pairs
# ----------------------------------------------------------------------------------------------


def check_bids_root(bids_dir: Path) -> Path:
    """The input folder exists and looks like a BIDS dataset (exit 66 / 16 otherwise)."""
    bids_dir = Path(bids_dir).absolute()
    if not bids_dir.exists():
        raise NoInputError(f"BIDS dataset {bids_dir}: no such directory")
    if not bids_dir.is_dir():
        raise NoInputError(f"BIDS dataset {bids_dir}: not a directory")
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise InvalidBIDSError(f"{bids_dir}: no dataset_description.json, so not a BIDS dataset")
    try:
        json.loads(description.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidBIDSError(f"{description}: not valid JSON ({exc})") from None
    return bids_dir


def find_validator() -> str | None:
    """``bids-validator-deno`` beside the running interpreter (a venv's ``bin/`` that was not
    activated), else on ``PATH``. The legacy node ``bids-validator`` is not used: its JSON
    report has another shape."""
    import sys

    beside = Path(sys.executable).parent / "bids-validator-deno"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("bids-validator-deno")


@contextlib.contextmanager
def _selected_view(bids_dir: Path, participants: list[str] | None) -> Iterator[Path]:
    """The dataset itself, or a temporary folder of links to its top-level files and the
    selected ``sub-*`` folders only (the validator follows links), so an array task validates
    its own participant, not the whole dataset."""
    if not participants:
        yield bids_dir
        return
    keep = {f"sub-{label}" for label in participants}
    with tempfile.TemporaryDirectory(prefix="bids_siamfuse_validate_") as tmp:
        for entry in bids_dir.iterdir():
            if entry.name.startswith("sub-") and entry.name not in keep:
                continue
            (Path(tmp) / entry.name).symlink_to(entry.absolute(), entry.is_dir())
        yield Path(tmp)


def validate_dataset(
    bids_dir: Path, timeout: float = 600, participants: list[str] | None = None
) -> list[str]:
    """Run the BIDS validator (``bids-validator-deno``); raise InvalidBIDSError on errors.

    Returns the warning codes, for the log. The validator reads only the dataset (no network)
    and skips ``derivatives/``. ``participants``: validate the top-level files and these
    subjects only (``--participant-label``).
    """
    exe = find_validator()
    if exe is None:
        raise InvalidBIDSError(
            "the BIDS validator is not installed (pip install bids-validator-deno); "
            "install it or pass --skip-bids-validation"
        )
    if participants:
        participants = [p for p in participants if (Path(bids_dir) / f"sub-{p}").is_dir()]
        if not participants:
            return []  # none of them exists: the selection fails next, with its own exit code
    with _selected_view(Path(bids_dir), participants) as view:
        return _run_validator(exe, Path(bids_dir), view, timeout)


def _run_validator(exe: str, bids_dir: Path, view: Path, timeout: float) -> list[str]:
    cmd = [exe, str(view), "--format", "json", "--ignoreNiftiHeaders"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise InvalidBIDSError(
            f"the BIDS validator did not finish in {timeout:.0f} s; use --skip-bids-validation"
        ) from None
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InvalidBIDSError(f"the BIDS validator failed: {tail[0]}") from None
    issues = report.get("issues", {}).get("issues", [])
    errors = [i for i in issues if i.get("severity") == "error"]
    if errors:
        first = errors[0]
        where = first.get("location", "")
        codes = sorted({e.get("code", "?") for e in errors})
        raise InvalidBIDSError(
            f"{bids_dir} is not valid BIDS: {len(errors)} error(s) ({', '.join(codes)}), "
            f"first: {first.get('code')} {where}".rstrip()
            + "; run bids-validator-deno for details or pass --skip-bids-validation"
        )
    return sorted({i.get("code", "?") for i in issues if i.get("severity") == "warning"})


def load_layout(bids_dir: Path, database_dir: Path | None = None):
    """A pybids layout of the raw dataset (derivatives and code folders not indexed).

    ``database_dir`` (``--bids-database-dir``): reuse the index saved there (SLURM array tasks
    share one instead of each indexing the dataset), or build it and save it there. A new index
    is built in a private folder and moved into place, so tasks starting together never read a
    half-written one; an index of another dataset is refused (exit 64).
    """
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    ignore = [re.compile(rf"^/{name}(/|$)") for name in IGNORE_INPUT]
    ignore.append(re.compile(r"/\."))  # hidden files and folders
    ignore += [re.compile(rf"^{re.escape(rel)}$") for rel in non_object_sidecars(bids_dir)]
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore)
    kwargs = {"validate": False, "derivatives": False, "indexer": indexer}
    try:
        if database_dir is None:
            return BIDSLayout(str(bids_dir), **kwargs)
        return _layout_from_database(Path(bids_dir), Path(database_dir), kwargs)
    except (ValueError, OSError) as exc:
        raise InvalidBIDSError(f"{bids_dir}: pybids cannot read it ({exc})") from None


def non_object_sidecars(bids_dir: Path) -> list[str]:
    """Sidecars that are valid JSON but not an object (e.g. an array), as ``/rel/path``.

    pybids crashed on them while indexing the whole dataset (a TypeError, exit 1); they are
    left out of the index instead, and the pair whose PET they belong to is refused on its
    own at screening (:func:`bids_siamfuse.checks.check_pet_sidecar`). Walks without following
    symbolic links (a link loop cannot trap it).
    """
    root = Path(bids_dir)
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        rel_folder = Path(folder).relative_to(root)
        if rel_folder.parts and (
            rel_folder.parts[0] in IGNORE_INPUT or any(p.startswith(".") for p in rel_folder.parts)
        ):
            dirs[:] = []
            continue
        for name in files:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                with open(Path(folder) / name, "rb") as handle:
                    head = handle.read(64).lstrip()
            except OSError:
                continue
            if head[:1] and head[:1] != b"{":
                try:
                    value = json.loads((Path(folder) / name).read_text())
                except (ValueError, OSError):
                    continue  # not JSON at all: pybids reports it (exit 16)
                if not isinstance(value, dict):
                    found.append("/" + (rel_folder / name).as_posix())
    return found


_DB_FILE = "layout_index.sqlite"


def _layout_from_database(bids_dir: Path, database_dir: Path, kwargs: dict):
    from bids.layout import BIDSLayout

    db_file = database_dir / _DB_FILE
    if db_file.is_file():
        layout = BIDSLayout(str(bids_dir), database_path=str(database_dir), **kwargs)
        if Path(layout.root).resolve() != bids_dir.resolve():
            raise UsageError(
                f"--bids-database-dir {database_dir} indexes {layout.root}, not {bids_dir}; "
                "give an empty folder or the index of this dataset"
            )
        LOGGER.info("pybids index reused from %s", database_dir)
        return layout
    try:
        database_dir.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=".index-", dir=database_dir))
    except OSError as exc:
        raise CannotWriteError(
            f"--bids-database-dir {database_dir}: cannot write ({exc.strerror or exc})"
        ) from None
    try:
        layout = BIDSLayout(str(bids_dir), database_path=str(private), **kwargs)
        layout.connection_manager.session.commit()
        layout.connection_manager.engine.dispose()
        os.replace(private / _DB_FILE, db_file)  # atomic: the first complete index wins
    finally:
        shutil.rmtree(private, ignore_errors=True)
    LOGGER.info("pybids index saved to %s", database_dir)
    return BIDSLayout(str(bids_dir), database_path=str(database_dir), **kwargs)


@dataclass
class SessionPair:
    """One PET series and the T1w processed with it."""

    subject: str
    session: str | None
    pet: Path
    t1w: Path
    t1w_session: str | None
    pet_meta: dict = field(default_factory=dict)
    pet_entities: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: why the PET sidecar could not be read (the pair is then refused at screening, alone)
    meta_error: str | None = None

    @property
    def key(self) -> str:
        """``sub-01_ses-01_trc-FDG`` (plus run/rec entities when present)."""
        return build_name({"subject": self.subject, "session": self.session, **self.pet_entities})

    @property
    def source_entities(self) -> dict:
        """Entities derivatives of this pair inherit (subject, session, PET's own)."""
        return {"subject": self.subject, "session": self.session, **self.pet_entities}


@dataclass
class Plan:
    pairs: list[SessionPair]
    skipped: list[tuple[str, str | None, str]]
    invalid: list[tuple[SessionPair, str]] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{len(self.pairs)} PET/T1w pair(s) to process:"]
        for pair in self.pairs:
            ses = f"ses-{pair.session}" if pair.session else "(no session)"
            lines.append(f"  sub-{pair.subject} {ses}")
            lines.append(f"    PET: {pair.pet}")
            lines.append(f"    T1w: {pair.t1w}")
            lines.extend(f"    note: {note}" for note in pair.notes)
        if self.invalid:
            lines.append(f"{len(self.invalid)} refused (unusable input, exit code 65):")
            lines.extend(f"  {pair.key}: {why}" for pair, why in self.invalid)
        if self.skipped:
            lines.append(f"{len(self.skipped)} skipped:")
            for sub, ses, why in self.skipped:
                where = f"sub-{sub}" + (f" ses-{ses}" if ses else "")
                lines.append(f"  {where}: {why}")
        return "\n".join(lines)


_PET_KEEP = ("tracer", "acquisition", "reconstruction", "run")


def collect_pairs(
    layout,
    *,
    participant_label: list[str] | None = None,
    session_label: list[str] | None = None,
    tracer: str = "FDG",
    bids_filters: dict | None = None,
    pairing: str = "nearest",
) -> Plan:
    """Find the PET/T1w pairs to process (see the module docstring for the pairing rule)."""
    bids_filters = bids_filters or {}
    subjects = sorted(layout.get_subjects())
    if not subjects:
        raise NothingSelectedError(f"{layout.root}: the dataset has no subjects")
    if participant_label:
        missing = sorted(set(participant_label) - set(subjects))
        if missing:
            raise NothingSelectedError(
                "no such participant(s) in the dataset: " + ", ".join(f"sub-{m}" for m in missing)
            )
        subjects = [s for s in subjects if s in set(participant_label)]

    pairs: list[SessionPair] = []
    skipped: list[tuple[str, str | None, str]] = []
    all_sessions = set()
    for subject in subjects:
        base = {"subject": subject, "extension": [".nii", ".nii.gz"], "return_type": "object"}
        t1ws = layout.get(**base, datatype="anat", suffix="T1w", **bids_filters.get("t1w", {}))
        pet_query = {"datatype": "pet", "suffix": "pet", "tracer": tracer}
        pet_query.update(bids_filters.get("pet", {}))
        pets = layout.get(**base, **pet_query)
        t1w_by_session: dict[str | None, list] = {}
        for f in t1ws:
            t1w_by_session.setdefault(f.entities.get("session"), []).append(f)
        pet_sessions = {f.entities.get("session") for f in pets}
        subject_sessions = set(t1w_by_session) | pet_sessions
        all_sessions |= {s for s in subject_sessions if s}
        if session_label:
            wanted = set(session_label)
            pets = [f for f in pets if f.entities.get("session") in wanted]
            subject_sessions = {s for s in subject_sessions if s in wanted}
        if not t1ws:
            skipped.append((subject, None, "no T1w image in any session"))
            continue
        for ses in sorted(s for s in subject_sessions if s not in pet_sessions and s):
            skipped.append((subject, ses, f"T1w but no PET with trc-{tracer}"))
        if not pets:
            if not pet_sessions:
                skipped.append((subject, None, f"no PET with trc-{tracer}"))
            continue
        order = _session_order(layout, subject, set(t1w_by_session) | pet_sessions)
        for pet in sorted(pets, key=lambda f: f.path):
            ses = pet.entities.get("session")
            notes = []
            if ses in t1w_by_session:
                t1w_ses = ses
            elif pairing == "same-session":
                skipped.append(
                    (subject, ses, "PET but no T1w in this session (--pairing same-session)")
                )
                continue
            else:
                t1w_ses = min(t1w_by_session, key=lambda s: (abs(order[s] - order[ses]), order[s]))
                notes.append(f"no T1w in this session: using the T1w of ses-{t1w_ses} (nearest)")
            candidates = sorted(
                t1w_by_session[t1w_ses],
                key=lambda f: (int(f.entities.get("run", 0) or 0), f.path),
            )
            if len(candidates) > 1:
                notes.append(
                    "several T1w: using "
                    + Path(candidates[0].path).name
                    + ", ignoring "
                    + ", ".join(Path(c.path).name for c in candidates[1:])
                )
            meta_error = None
            try:
                meta = pet.get_metadata()
            except Exception as exc:  # noqa: BLE001 - pybids raises many kinds; this pair only
                meta, meta_error = {}, f"{pet.path}: cannot read its JSON sidecar ({exc})"
            if not isinstance(meta, dict):  # pragma: no cover - pybids merges into a dict
                meta, meta_error = {}, f"{pet.path}: its JSON sidecar is not an object"
            entities = {k: pet.entities[k] for k in _PET_KEEP if pet.entities.get(k) is not None}
            pairs.append(
                SessionPair(
                    subject=subject,
                    session=ses,
                    pet=Path(pet.path),
                    t1w=Path(candidates[0].path),
                    t1w_session=t1w_ses,
                    pet_meta=dict(meta),
                    pet_entities=entities,
                    notes=notes,
                    meta_error=meta_error,
                )
            )
    if session_label:
        missing = sorted(set(session_label) - all_sessions)
        if missing and not pairs:
            raise NothingSelectedError(
                "no such session(s) in the selected subjects: "
                + ", ".join(f"ses-{m}" for m in missing)
            )
    if not pairs:
        reasons = "; ".join(f"sub-{s}{' ses-' + e if e else ''}: {w}" for s, e, w in skipped[:5])
        raise NothingSelectedError(
            f"nothing to process: no subject/session has both a T1w and a trc-{tracer} PET"
            + (f" ({reasons})" if reasons else "")
        )
    return Plan(pairs=pairs, skipped=skipped)


def _session_order(layout, subject: str, sessions: set) -> dict:
    """A number per session giving its place in time (see the pairing rule)."""
    sessions = sorted(sessions, key=lambda s: (s is not None, s or ""))
    times = {}
    tsv = Path(layout.root) / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    if tsv.is_file():
        import pandas as pd

        try:
            table = pd.read_csv(tsv, sep="\t", dtype=str)
            if "acq_time" in table and "session_id" in table:
                for sid, when in zip(table["session_id"], table["acq_time"]):
                    stamp = pd.to_datetime(when, errors="coerce")
                    if not pd.isna(stamp):
                        times[str(sid).removeprefix("ses-")] = stamp.timestamp()
        except (ValueError, OSError) as exc:
            LOGGER.warning("%s: cannot read acq_time (%s); ordering sessions by label", tsv, exc)
    if all(s in times for s in sessions if s is not None) and times:
        return {s: times.get(s, 0.0) for s in sessions}
    numbers = {s: re.findall(r"\d+", s) for s in sessions if s is not None}
    if all(numbers.values()):
        return {s: (float(numbers[s][-1]) if s is not None else 0.0) for s in sessions}
    return {s: float(i) for i, s in enumerate(sessions)}


def read_participants(bids_dir: Path, label_column: str = "diagnosis", *, required: bool = True):
    """``participants.tsv`` as a DataFrame indexed by label (without ``sub-``).

    Raises DataError when the file is missing (and ``required``), has no ``participant_id``
    column, lists a participant twice, or lacks ``label_column``.
    """
    import pandas as pd

    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        if required:
            raise DataError(f"{path}: missing; group level needs a '{label_column}' column there")
        return pd.DataFrame(columns=[label_column]).rename_axis("participant_id")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    if "participant_id" not in table:
        raise DataError(f"{path}: no 'participant_id' column")
    table["participant_id"] = table["participant_id"].str.strip().str.removeprefix("sub-")
    duplicated = sorted(set(table["participant_id"][table["participant_id"].duplicated()]))
    if duplicated:
        raise DataError(f"{path}: participant(s) listed twice: {', '.join(duplicated)}")
    if label_column not in table:
        raise DataError(
            f"{path}: no '{label_column}' column (columns: {', '.join(table.columns)}); "
            "choose one with --label-column"
        )
    table[label_column] = table[label_column].str.strip()
    return table.set_index("participant_id")


# ----------------------------------------------------------------------------------------------
# Output: names, atomic writes, dataset_description.json
# ----------------------------------------------------------------------------------------------

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
_KEYS = dict(ENTITY_ORDER)
_KEYS.update({short: short for _, short in ENTITY_ORDER})
_ALIASES = {
    "seg": "segmentation",
    "res": "resolution",
    "trc": "tracer",
    "acq": "acquisition",
    "rec": "reconstruction",
    "ses": "session",
    "sub": "subject",
    "ce": "ceagent",
}


def _normalize_entities(entities: dict) -> dict:
    out = {}
    for key, value in entities.items():
        if value is None or value == "":
            continue
        key = _ALIASES.get(key, key)
        if key not in _KEYS:
            raise ValueError(f"unknown entity {key!r}")
        if key == "run":
            value = str(int(value)) if str(value).isdigit() else str(value)
        out[key] = str(value)
    return out


def build_name(entities: dict, suffix: str | None = None, extension: str = "") -> str:
    """``sub-01_ses-01_trc-FDG_space-X_desc-preproc_pet.nii.gz`` from entities."""
    entities = _normalize_entities(entities)
    parts = [f"{short}-{entities[key]}" for key, short in ENTITY_ORDER if key in entities]
    if suffix:
        parts.append(suffix)
    return "_".join(parts) + extension


def build_path(entities: dict, *, datatype: str, suffix: str, extension: str) -> Path:
    """The derivative's path relative to the output root."""
    ent = _normalize_entities(entities)
    if "subject" not in ent:
        raise ValueError("a derivative needs a subject")
    folder = Path(f"sub-{ent['subject']}")
    if "session" in ent and datatype != "figures":  # NiPreps: sub-<label>/figures/
        folder /= f"ses-{ent['session']}"
    return folder / datatype / build_name(ent, suffix, extension)


def save_json(path: Path, data: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def save_image(path: Path, img, *, dtype=None, space_code: int | None = None) -> Path:
    """Write a nibabel image atomically; ``dtype`` coerces the data, sform/qform codes set."""
    import nibabel as nb
    import numpy as np

    img = nb.Nifti1Image(
        np.asanyarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype),
        img.affine,
        img.header,
    )
    if dtype is not None:
        img.set_data_dtype(dtype)
        img.header.set_slope_inter(1.0, 0.0)
    code = space_code if space_code is not None else int(img.header["sform_code"]) or 1
    img.set_sform(img.affine, code)
    img.set_qform(img.affine, code)
    img.header.set_xyzt_units("mm", img.header.get_xyzt_units()[1])
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))
    return Path(path)


def save_table(path: Path, table) -> Path:
    """Write a DataFrame as a BIDS TSV (n/a for missing values) atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    return Path(path)


def save_derivative(
    out_dir: Path,
    obj,
    *,
    source: dict,
    datatype: str,
    suffix: str,
    extension: str,
    meta: dict | None = None,
    dtype=None,
    **entities,
) -> Path:
    """Name and write one derivative (image, table, dict or existing file) with its sidecar.

    ``source`` holds the entities inherited from the input (subject, session, tracer...);
    ``entities`` adds or overrides (space, res, label, desc...). The sidecar JSON is written
    before the data, so a data file present on disk always has its metadata.
    """

    ent = {**source, **entities}
    rel = build_path(ent, datatype=datatype, suffix=suffix, extension=extension)
    path = Path(out_dir) / rel
    sidecar = path.with_name(rel.name[: -len(extension)] + ".json")
    if meta is not None:
        save_json(sidecar, meta)
    try:
        return _save_data(path, obj, ent, extension=extension, dtype=dtype)
    except BaseException:
        # a disk full (or an interrupt) while writing the data: no sidecar left without its
        # data file (13 were, after a disk-full run)
        if meta is not None and not path.exists():
            sidecar.unlink(missing_ok=True)
        raise


def _save_data(path: Path, obj, ent: dict, *, extension: str, dtype=None) -> Path:
    """The data part of :func:`save_derivative` (image, table, dict or existing file)."""
    import nibabel as nb

    space = ent.get("space")
    if isinstance(obj, (str, Path)):
        src = Path(obj)
        if extension.startswith(".nii"):
            obj = nb.load(str(src))
        elif extension == ".svg":  # reportlets: embedded PNGs as lossless WebP (~3x smaller)
            from .reports.compress import compress_svg_text

            text = src.read_text(encoding="utf-8", errors="replace")
            with atomic_path(path) as tmp:
                tmp.write_text(compress_svg_text(text), encoding="utf-8")
            return path
        else:
            with atomic_path(path) as tmp:
                shutil.copyfile(src, tmp)
            return path
    if isinstance(obj, nb.spatialimages.SpatialImage):
        code = 4 if space and space.startswith("MNI") else (2 if space else 1)
        save_image(path, obj, dtype=dtype, space_code=code)
    elif hasattr(obj, "to_csv"):
        save_table(path, obj)
    elif isinstance(obj, dict):
        save_json(path, obj)
    else:
        raise TypeError(f"cannot save a {type(obj).__name__} as a derivative")
    return path


#: Environment variable naming the input dataset's location as the user sees it (the host path
#: when the app runs in a container, where BIDS_DIR is a mount point such as /data).
HOST_BIDS_DIR_ENV = "BIDS_SIAMFUSE_HOST_BIDS_DIR"
# Docker creates it in every container; the variable lets a test suite that itself runs in a
# container (CI) behave as on a bare machine (tests/conftest.py)
_DOCKERENV = Path(os.environ.get("BIDS_SIAMFUSE_DOCKERENV", "/.dockerenv"))


def container_info() -> dict | None:
    """``GeneratedBy.Container`` when this process runs in a container, else None.

    Detected the usual way: Docker creates ``/.dockerenv``; Apptainer/Singularity set
    ``APPTAINER_NAME``/``SINGULARITY_NAME`` (the image file's name) in the container.
    ``BIDS_SIAMFUSE_CONTAINER_TAG`` overrides the tag (the image sets its own version).
    """
    tag = os.environ.get("BIDS_SIAMFUSE_CONTAINER_TAG") or f"{PIPELINE_NAME}:{__version__}"
    for var in ("APPTAINER_NAME", "SINGULARITY_NAME"):
        if os.environ.get(var):
            kind = "apptainer" if var.startswith("APPTAINER") else "singularity"
            return {
                "Type": kind,
                "Tag": os.environ.get("BIDS_SIAMFUSE_CONTAINER_TAG") or os.environ[var],
            }
    if _DOCKERENV.exists():
        return {"Type": "docker", "Tag": tag}
    return None


def source_location(bids_dir: Path, out_dir: Path | None = None) -> str | None:
    """Where the input dataset is, as seen from outside this process (for ``DatasetLinks``).

    1. the relative path from ``out_dir`` up to the input when the input is a parent of the
       output (``../..`` for ``BIDS_DIR/derivatives/bids_siamfuse``): valid wherever the two
       folders travel together, inside or outside a container;
    2. else ``$BIDS_SIAMFUSE_HOST_BIDS_DIR`` when set (the host path of a container's mount);
    3. else, in a container, None (the mount point, e.g. ``/data``, means nothing outside it);
    4. else the path the user gave (made absolute).
    """
    bids_dir = Path(bids_dir).absolute()
    if out_dir is not None:
        out_dir = Path(out_dir).absolute()
        for raw, out in ((bids_dir, out_dir), (bids_dir.resolve(), out_dir.resolve())):
            try:
                out.relative_to(raw)
            except ValueError:
                continue
            return Path(os.path.relpath(raw, out)).as_posix()
    host = os.environ.get(HOST_BIDS_DIR_ENV, "").strip()
    if host:
        return host
    if container_info() is not None:
        return None
    return str(bids_dir)


def dataset_description(bids_dir: Path | None, out_dir: Path | None = None) -> dict:
    generated = {
        "Name": PIPELINE_NAME,
        "Version": __version__,
        "CodeURL": CODE_URL,
        "Description": "T1w/FDG-PET preprocessing, AAL116 regions and a siamese-attention"
        " classifier (Arco et al.)",
    }
    container = container_info()
    if container is not None:
        generated["Container"] = container
    desc = {
        "Name": "bids_siamfuse derivatives",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "HowToAcknowledge": "Cite the software (CITATION.cff) and the method paper; see "
        "logs/CITATION.md for the methods boilerplate.",
    }
    if bids_dir is not None:
        bids_dir = Path(bids_dir).absolute()
        location = source_location(bids_dir, out_dir)
        source = {}
        if location is not None:
            source["URL"] = location
        else:
            LOGGER.warning(
                "running in a container: the input dataset's host path is unknown, so "
                "dataset_description.json records no DatasetLinks.raw; set %s to record it",
                HOST_BIDS_DIR_ENV,
            )
        with contextlib.suppress(OSError, ValueError, json.JSONDecodeError):
            raw = json.loads((bids_dir / "dataset_description.json").read_text())
            if raw.get("DatasetDOI"):
                source["DOI"] = raw["DatasetDOI"]
        if source:
            desc["SourceDatasets"] = [source]
        if location is not None:
            desc["DatasetLinks"] = {"raw": location}  # for bids:raw:... Sources URIs
    return desc


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


DERIVATIVES_README = """\
# bids_siamfuse derivatives

Written by bids_siamfuse (https://github.com/bids-siamfuse/bids_siamfuse): per subject and
session, the preprocessed T1w and FDG-PET on the 121x145x121 1.5 mm MNI grid, their 116 AAL
regions (`*_regions.npz`), QC figures and `sub-<label>.html` reports; `group/` holds the
cross-validated model and its report. `dataset_description.json` links the input dataset
(`DatasetLinks.raw`); `logs/` holds each run's settings and the methods text (`CITATION.md`).
Every file is described in the project's docs/outputs.md; `.bidsignore` lists the files BIDS
has no naming rule for.
"""


def ensure_readme(out_dir: Path) -> Path:
    """``OUT/README.md`` (BIDS recommends one per dataset), unless one is there."""
    path = Path(out_dir) / "README.md"
    if not any((Path(out_dir) / n).exists() for n in ("README", "README.md", "README.txt")):
        with atomic_path(path) as tmp:  # parallel jobs write the same text: last one wins
            tmp.write_text(DERIVATIVES_README)
    return path


def ensure_bidsignore(out_dir: Path) -> Path:
    """Write ``OUT/.bidsignore`` with :data:`BIDSIGNORE`, keeping lines a user added.

    Every job writes the same content atomically (last writer wins), so parallel array tasks
    are safe.
    """
    path = Path(out_dir) / ".bidsignore"
    try:
        current = path.read_text().splitlines() if path.is_file() else []
    except (OSError, UnicodeDecodeError):
        current = []
    missing = [line for line in BIDSIGNORE if line not in current]
    if not missing:
        return path
    header = "# bids_siamfuse: files BIDS has no naming rule for (docs/outputs.md)"
    lines = current or [header]
    text = "\n".join([*lines, *missing]) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def ensure_dataset_description(out_dir: Path, bids_dir: Path | None) -> Path:
    """Write ``dataset_description.json`` unless a valid one is there (race-free), and the
    ``.bidsignore`` (:func:`ensure_bidsignore`).

    Many participant jobs may start at once on one output folder: each writes a private
    temporary file and *links* it into place, which fails for all but the first, so readers
    never see a partial file and no job overwrites another's.
    """
    out_dir = Path(out_dir)
    path = out_dir / "dataset_description.json"
    with contextlib.suppress(CannotWriteError):
        ensure_bidsignore(out_dir)  # never fatal: the description below reports write errors
        ensure_readme(out_dir)
    if path.is_file():
        try:
            current = json.loads(path.read_text())
            names = [g.get("Name") for g in current.get("GeneratedBy", [])]
            if PIPELINE_NAME not in names:
                LOGGER.warning(
                    "%s was written by %s, not %s; leaving it alone", path, names, PIPELINE_NAME
                )
            return path
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            LOGGER.warning("%s is not valid JSON; replacing it", path)
    text = json.dumps(dataset_description(bids_dir, out_dir), indent=2) + "\n"
    publish_once(path, lambda tmp: tmp.write_text(text), replace=path.exists())
    return path


# ----------------------------------------------------------------------------------------------
# What the pipeline writes: one table used by the workflows' data sinks, the synthetic
# cohort's --preprocessed writer and the group-level loader, so names cannot drift apart.
# ----------------------------------------------------------------------------------------------


def _outputs() -> dict[str, dict]:
    from .data.templates import RES_LABEL, SPACE

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
    }


OUTPUTS = _outputs()


def output_meta(key: str, meta: dict | None) -> dict | None:
    """The sidecar of output ``key``: its fixed fields (``sidecar`` in :data:`OUTPUTS`) under
    ``meta`` (the writer's fields win); None when neither has any."""
    fixed = OUTPUTS[key].get("sidecar")
    if meta is None and not fixed:
        return None
    return {**(fixed or {}), **(meta or {})}


def output_path(out_dir: Path, key: str, source: dict) -> Path:
    """Where output ``key`` of :data:`OUTPUTS` goes for these source entities."""
    spec = dict(OUTPUTS[key])
    spec.pop("sidecar", None)
    datatype, suffix, extension = spec.pop("datatype"), spec.pop("suffix"), spec.pop("extension")
    rel = build_path({**source, **spec}, datatype=datatype, suffix=suffix, extension=extension)
    return Path(out_dir) / rel


def save_output(
    out_dir: Path, key: str, obj, *, source: dict, meta: dict | None = None, dtype=None
) -> Path:
    """Write output ``key`` of :data:`OUTPUTS` (see :func:`save_derivative`)."""
    spec = dict(OUTPUTS[key])
    spec.pop("sidecar", None)
    meta = output_meta(key, meta)
    return save_derivative(out_dir, obj, source=source, meta=meta, dtype=dtype, **spec)
