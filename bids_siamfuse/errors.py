"""Errors that end a run with a documented exit code (BIDS-Apps execution spec).

Every error a user can cause is raised as one of these; the CLI turns it into a one-line
message on stderr and the exit code below, never a traceback.

======  ==========================  =========================================================
code    exception                   meaning
======  ==========================  =========================================================
1       ``SiamFuseError``           a processing step failed (see the crash files in the log)
16      ``InvalidBIDSError``        the input dataset is not valid BIDS
17      ``UnknownLevelError``       analysis level other than ``participant`` or ``group``
18      ``NothingSelectedError``    the filters (labels, filter file) selected nothing
64      ``UsageError``              bad command line (unknown flag, bad value, clashing paths)
65      ``DataError``               an input file is unusable (corrupt image, bad sidecar, ...)
66      ``NoInputError``            an input path or a required file does not exist
73      ``CannotWriteError``        the output or work directory cannot be created or written
======  ==========================  =========================================================

A run stopped by a signal exits ``128 + signal``: 143 (SIGTERM), 130 (SIGINT), 129 (SIGHUP),
after writing its status table (:mod:`bids_siamfuse.signals`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID_BIDS = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NOTHING_SELECTED = 18
EXIT_USAGE = 64
EXIT_DATAERR = 65
EXIT_NOINPUT = 66
EXIT_CANTCREAT = 73


class SiamFuseError(Exception):
    """Base class: a failure the user should read about in one line."""

    exit_code = EXIT_FAILURE

    def __init_subclass__(cls, code: int | None = None, **kwargs):
        # ``class X(SiamFuseError, code=N)`` sets X's exit code; subclasses without one keep
        # their parent's
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.exit_code = code


class InvalidBIDSError(SiamFuseError, code=EXIT_INVALID_BIDS):
    """The input dataset is not valid BIDS."""


class UnknownLevelError(SiamFuseError, code=EXIT_UNKNOWN_LEVEL):
    """Analysis level other than ``participant`` or ``group``."""


class NothingSelectedError(SiamFuseError, code=EXIT_NOTHING_SELECTED):
    """The filters (labels, filter file) selected nothing."""


class UsageError(SiamFuseError, code=EXIT_USAGE):
    """Bad command line (unknown flag, bad value, clashing paths)."""


class DataError(SiamFuseError, code=EXIT_DATAERR):
    """An input file is unusable (corrupt image, bad sidecar, ...)."""


class NoInputError(SiamFuseError, code=EXIT_NOINPUT):
    """An input path or a required file does not exist."""


class CannotWriteError(SiamFuseError, code=EXIT_CANTCREAT):
    """The output or work directory cannot be created or written."""
