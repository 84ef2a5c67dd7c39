"""The command line's argument types and flag helpers (:mod:`.parser` builds the options).

- Types: ``bids_label`` (``sub-01`` or ``01``), ``number`` and its instances (``positive_int``
  ...), ``memory_mb`` (fMRIPrep's ``8GB`` forms); each refuses a bad value with a one-line
  argparse message (exit 64).
- ``flag``/``switch``: ``add_argument`` with fMRIPrep's twin ``--multi_word`` spelling.
- ``load_bids_filters``: the ``--bids-filter-file`` JSON, checked.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ..errors import NoInputError, UsageError

_LABEL = re.compile(r"^[a-zA-Z0-9]+$")


def bids_label(prefix: str):
    """An argparse type: a BIDS label, with or without its ``<prefix>-``."""

    def parse(value: str) -> str:
        value = value.strip()
        if value.startswith(f"{prefix}-"):
            value = value[len(prefix) + 1 :]
        if not _LABEL.match(value):
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a BIDS label (letters and digits only)"
            )
        return value

    return parse


def number(cast, noun: str, ok, requirement: str):
    """An argparse type: ``cast`` the value (else "is not <noun>"), then require ``ok``."""

    def parse(value: str):
        try:
            parsed = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {noun}") from None
        if not ok(parsed):
            raise argparse.ArgumentTypeError(f"{value!r} {requirement}")
        return parsed

    return parse


positive_int = number(int, "an integer", lambda n: n >= 1, "must be 1 or more")
nonnegative_int = number(int, "an integer", lambda n: n >= 0, "must be 0 or more")
fraction = number(float, "a number", lambda n: 0 < n < 1, "must lie between 0 and 1")
positive_float = number(float, "a number", lambda n: n > 0, "must be positive")


def memory_mb(value: str) -> int:
    """Accept ``8000``, ``8000MB``, ``8GB``, ``8G`` (fMRIPrep's forms)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?\s*", value)
    if not match:
        raise argparse.ArgumentTypeError(f"{value!r} is not an amount of memory")
    number, unit = float(match.group(1)), match.group(2).upper()
    scale = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}[unit]
    return int(number * scale)


def flag(group, *names: str, **kwargs):
    """``group.add_argument`` with every ``--multi-word`` name also accepted as ``--multi_word``.

    fMRIPrep accepts both spellings; the underscore one follows its dashed twin (as ``--help``
    lists them), and argparse's ``dest`` is the first long name with ``_``.
    """
    spellings = []
    for name in names:
        spellings.append(name)
        if name.startswith("--") and "-" in name[2:]:
            spellings.append("--" + name[2:].replace("-", "_"))
    return group.add_argument(*spellings, **kwargs)


def switch(group, *names: str, help: str):
    """An on/off flag (``store_true``), spelled as :func:`flag` does."""
    return flag(group, *names, action="store_true", help=help)


def load_bids_filters(path: Path) -> dict:
    """Read a ``--bids-filter-file``: ``{"t1w": {...}, "pet": {...}}`` of pybids filters."""
    path = Path(path)
    if not path.is_file():
        raise NoInputError(f"--bids-filter-file {path}: no such file")
    try:
        filters = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--bids-filter-file {path}: not valid JSON ({exc})") from None
    from ..safety import check_bids_filters

    return check_bids_filters(filters, f"--bids-filter-file {path}")
