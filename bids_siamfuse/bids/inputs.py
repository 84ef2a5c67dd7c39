"""BIDS input: the dataset, its validation, the PET/T1w pairs and the diagnosis labels.

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

from ..errors import (
    CannotWriteError,
    DataError,
    InvalidBIDSError,
    NoInputError,
    NothingSelectedError,
    UsageError,
)
from .naming import PET_SOURCE_ENTITIES, build_name

LOGGER = logging.getLogger("bids_siamfuse.bids")

#: Folders never indexed in the input dataset.
IGNORE_INPUT = ("code", "derivatives", "sourcedata", "stimuli", "models", "logs")


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
        return "\n".join(lines + self.left_out_lines())

    def left_out_lines(self) -> list[str]:
        """The refused pairs and the skipped subjects/sessions, with why (for the plans)."""
        lines = []
        if self.invalid:
            lines.append(f"{len(self.invalid)} refused (unusable input, exit code 65):")
            lines.extend(f"  {pair.key}: {why}" for pair, why in self.invalid)
        if self.skipped:
            lines.append(f"{len(self.skipped)} skipped:")
            for sub, ses, why in self.skipped:
                where = f"sub-{sub}" + (f" ses-{ses}" if ses else "")
                lines.append(f"  {where}: {why}")
        return lines


#: the PET entities its derivatives inherit (besides subject and session)
_PET_KEEP = PET_SOURCE_ENTITIES[2:]


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
