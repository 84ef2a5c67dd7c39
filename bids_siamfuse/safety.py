"""One validation for every setting, whatever its source; safe work folders.

Settings reach a run from three sources (defaults, ``--config-file``, the command line; see
:mod:`bids_siamfuse.config`). argparse checks the flags it parses, but a TOML file bypassed those
checks (a negative thread count crashed, ``batch_size = 0`` ran silently).
:func:`validate_settings` runs on the merged settings, so every value meets the same range and
choice rules; a bad value ends the run with exit 64 naming the key and where it came from.

Work folders: nipype *unpickles* ``result_*.pklz`` files from the work folder, so whoever can
write there can run code in the next run. :func:`check_work_dir` refuses a work folder that
another user owns or can write, and :func:`default_work_dir` never returns a fixed shared path.

Imports nothing heavy (no nipype, pybids): it runs while parsing the command line.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
from pathlib import Path

from .errors import UsageError

#: BIDS labels: letters and digits only (they become parts of file names).
LABEL = re.compile(r"^[A-Za-z0-9]+$")
#: Longest label accepted (a derivative name holds several labels; file names stop at 255 bytes).
MAX_LABEL = 64
#: Smallest ``--mem`` a run accepts. The heaviest participant nodes ask the scheduler for
#: 1.5 GB (segmentation, PET to MNI) and the model node 3 GB; with less, nipype's MultiProc
#: never starts them and polled forever (``--mem 8``, 8 MB, a typo for 8 GB, hung the run).
MIN_MEM_MB = 2048


def _int_range(low=None, high=None):
    def check(value):
        if not isinstance(value, int) or isinstance(value, bool):
            return "an integer"
        if low is not None and value < low:
            return f"{low} or more"
        if high is not None and value > high:
            return f"{high} or less"
        return None

    return check


def _float_range(low=None, high=None, *, low_open=True, high_open=True):
    def check(value):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "a number"
        if not math.isfinite(value):
            return "a finite number"
        if low is not None and (value <= low if low_open else value < low):
            return f"{'over' if low_open else 'at least'} {low}"
        if high is not None and (value >= high if high_open else value > high):
            return f"{'under' if high_open else 'at most'} {high}"
        return None

    return check


def _choice(*options):
    def check(value):
        return None if value in options else f"one of {', '.join(map(repr, options))}"

    return check


def _label(value):
    if not isinstance(value, str) or not LABEL.match(value):
        return "a BIDS label (letters and digits only)"
    if len(value) > MAX_LABEL:
        return f"a BIDS label of at most {MAX_LABEL} characters"
    return None


def _labels(value):
    if not isinstance(value, list):
        return "a list of BIDS labels"
    for item in value:
        if _label(item):
            return f"a list of BIDS labels (letters and digits only; {item!r} is not)"
    return None


def _memory(value):
    if not isinstance(value, int) or isinstance(value, bool):
        return "an integer number of MB"
    if value != 0 and value < MIN_MEM_MB:
        return (
            f"0 (all memory) or at least {MIN_MEM_MB} MB; {value} MB is too little for one "
            "node (did you mean GB? write e.g. 8GB)"
        )
    return None


def _nonempty_text(value):
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        return "a non-empty one-line text"
    return None


def _class_list(value):
    if not isinstance(value, list) or not value:
        return "a list of diagnosis labels"
    if not all(isinstance(v, str) and v.strip() and len(v) <= MAX_LABEL for v in value):
        return f"a list of non-empty labels (at most {MAX_LABEL} characters)"
    return None


#: The rules every source must meet (the CLI's argparse types say the same, see cli/parser.py).
RULES = {
    "participant_label": _labels,
    "session_label": _labels,
    "tracer_label": _label,
    "label_column": _nonempty_text,
    "pairing": _choice("nearest", "same-session"),
    "nprocs": _int_range(0, 4096),
    "omp_nthreads": _int_range(0, 4096),
    "mem_mb": _memory,
    "random_seed": _int_range(0, 2**32 - 1),
    "device": _choice("auto", "cpu", "cuda"),
    "verbosity": _int_range(-1, 10),
    "backend": _choice("ants", "spm"),
    "pet_ref_region": _choice("none", "cerebellum"),
    "classes": _class_list,
    "folds": _int_range(1, 1000),
    "repeats": _int_range(1, 10000),
    "epochs": _int_range(1, 1_000_000),
    "batch_size": _int_range(1, 1_000_000),
    "learning_rate": _float_range(0, 10),
    "early_stop_loss": _float_range(0, None),
    "patience": _int_range(1, 1_000_000),
    "val_fraction": _float_range(0, 1),
    "permutation_tests": _int_range(0, 1_000_000),
    "gpus": _int_range(0, 1024),
    "cpu_workers": _int_range(1, 4096),
}


_ABSENT = object()


def _setting(settings, name: str):
    """The value of setting ``name`` in whichever section holds it (``_ABSENT`` if none)."""
    for section in ("execution", "workflow", "model"):
        values = getattr(settings, section)
        if hasattr(values, name):
            return getattr(values, name)
    return _ABSENT


def validate_settings(settings, sources: dict | None = None) -> None:
    """Check every setting with a rule; UsageError (64) naming the key and its source."""
    sources = sources or {}
    for name, rule in RULES.items():
        value = _setting(settings, name)
        if value is _ABSENT:  # pragma: no cover - a rule for a field another branch removed
            continue
        problem = rule(value)
        if problem:
            where = sources.get(name, "default")
            raise UsageError(f"setting '{name}' = {value!r} (from {where}): must be {problem}")
    filters = _setting(settings, "bids_filters")
    if filters:
        check_bids_filters(
            filters, f"bids_filters (from {sources.get('bids_filters', 'default')})"
        )


# ----------------------------------------------------------------------------------------------
# --bids-filter-file
# ----------------------------------------------------------------------------------------------

FILTER_QUERIES = ("t1w", "pet")
#: pybids entities a filter may use (their long names, as in fMRIPrep's filter files).
FILTER_ENTITIES = (
    "acquisition",
    "ceagent",
    "reconstruction",
    "run",
    "task",
    "echo",
    "part",
    "inversion",
    "flip",
    "mtransfer",
    "chunk",
    "direction",
)
#: Keys that the app sets itself: a filter giving them clashed with pybids internals.
_OWN_KEYS = {
    "subject": "--participant-label",
    "session": "--session-label",
    "tracer": "--tracer-label",
    "datatype": None,
    "suffix": None,
    "extension": None,
    "return_type": None,
    "scope": None,
}


def _filter_value_ok(value) -> bool:
    if value is None:
        return True  # "the entity must be absent" (as in fMRIPrep's filter files)
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 <= value < 10**6
    if isinstance(value, str):
        return bool(LABEL.match(value)) and len(value) <= MAX_LABEL
    return False


def check_bids_filters(filters, where: str) -> dict:
    """Filter-file content: queries t1w/pet, known entities, label or integer values."""
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(
            f'{where}: expected an object of objects, e.g. {{"t1w": {{"acquisition": "mprage"}}}}'
        )
    unknown = sorted(set(filters) - set(FILTER_QUERIES))
    if unknown:
        raise UsageError(f"{where}: unknown queries {unknown}; use {list(FILTER_QUERIES)}")
    for query, entities in filters.items():
        for key, value in entities.items():
            if key in _OWN_KEYS:
                hint = f"; use {_OWN_KEYS[key]}" if _OWN_KEYS[key] else ""
                raise UsageError(f"{where}: '{query}' may not filter on '{key}'{hint}")
            if key not in FILTER_ENTITIES:
                raise UsageError(
                    f"{where}: '{query}' filters on unknown entity '{key}'; "
                    f"supported: {', '.join(FILTER_ENTITIES)}"
                )
            values = value if isinstance(value, list) else [value]
            if not values or not all(_filter_value_ok(v) for v in values):
                raise UsageError(
                    f"{where}: '{query}.{key}' = {value!r}: expected a label (letters and "
                    "digits), a non-negative integer, null, or a list of those"
                )
    return filters


# ----------------------------------------------------------------------------------------------
# work folders
# ----------------------------------------------------------------------------------------------


def default_work_dir(cwd: Path | None = None) -> Path:
    """``./work`` when the current folder is writable, else a private per-user temporary one.

    Never a fixed shared path: the fallback is ``$TMPDIR/bids_siamfuse_work-<uid>`` created
    with mode 0700 (and then checked like any other work folder: another user's folder of
    that name is refused, not reused).
    """
    cwd = Path(cwd or Path.cwd())
    if os.access(cwd, os.W_OK):
        return cwd / "work"
    return Path(tempfile.gettempdir()) / f"bids_siamfuse_work-{os.getuid()}"


def _owner_problem(path: Path, *, strict: bool) -> str | None:
    st = os.stat(path)  # follows a symbolic link: the folder nipype will really use
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    if st.st_mode & stat.S_IWOTH:
        return "writable by every user"
    if strict and st.st_uid != os.getuid():
        return f"owned by another user (uid {st.st_uid})"
    if strict and st.st_mode & stat.S_IWGRP:
        return "writable by its group"
    return None


def check_work_dir(work: Path, *, explicit: bool) -> None:
    """Refuse (64) a work folder whose pickles someone else could have planted.

    Nipype unpickles ``result_*.pklz`` from the work folder, so it is as sensitive as code.
    An implicit work folder (``./work`` or the temporary fallback) must be owned by the user
    and writable by nobody else. One given with ``-w`` may be a team folder owned by someone
    else or group-writable (the user chose it), but never writable by every user; the same
    holds for the workflow folder nipype keeps inside it.
    """
    work = Path(work)
    strict = not explicit
    checks = [work]
    inner = work / "bids_siamfuse_wf"
    if inner.exists():
        checks.append(inner)
    for folder in checks:
        try:
            problem = _owner_problem(folder, strict=strict)
        except OSError as exc:
            raise UsageError(f"work directory {folder}: {exc.strerror or exc}") from None
        if problem:
            hint = (
                "; give a private folder with -w/--work-dir"
                if strict
                else "; nipype loads pickled results from it, so use a folder only you can write"
            )
            raise UsageError(f"work directory {folder} is {problem}{hint}")


def make_work_dir(work: Path, *, explicit: bool) -> Path:
    """Create the work folder (0700 when it is new) and check it (see :func:`check_work_dir`)."""
    work = Path(work)
    if not work.exists():
        old = os.umask(0o077)
        try:
            work.mkdir(parents=True, exist_ok=True)
        finally:
            os.umask(old)
    check_work_dir(work, explicit=explicit)
    return work
