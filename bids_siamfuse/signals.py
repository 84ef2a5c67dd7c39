"""SIGTERM, SIGINT and SIGHUP end a run cleanly.

Before, SIGTERM to the main process killed it at once: nipype's worker processes ran on,
nothing was printed, no status table was written, and a sidecar could stay without its data
file. Now the main process turns the signal into :class:`Interrupted` (a ``BaseException``, so
no ``except Exception`` in nipype or in our code swallows it); the scheduler stops its workers
(:mod:`bids_siamfuse.engine`), the participant level writes its status table
(``OUT/logs/participant-<run>.tsv``, unfinished pairs ``interrupted``), the CLI prints one line
and exits ``128 + signal`` (143 SIGTERM, 130 SIGINT, 129 SIGHUP). Derivatives are written
through :func:`bids_siamfuse.bids.atomic_path` (temporary name, renamed when complete), so
nothing half-written is visible; a rerun with the same work directory resumes.

Worker processes inherit the handlers (fork); in them a signal keeps its default meaning
(terminate), so stopping a worker does not raise inside the node it runs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_MAIN_PID: int | None = None
#: The signal received, if any. The scheduler checks it on every poll (``check()``): the
#: exception raised by the handler can land in code that swallows it (a completion callback
#: that runs in the main thread when its future is already done), so the flag is the
#: authoritative record.
requested: int | None = None


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt
    """The run was asked to stop by a signal."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def _handler(signum, frame):  # noqa: ARG001 - signal API
    if os.getpid() != _MAIN_PID:  # a forked worker: die as the signal says
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    global requested
    if requested is not None:  # a second signal while cleaning up: the first one stands
        return
    requested = signum
    raise Interrupted(signum)


def check() -> None:
    """Raise :class:`Interrupted` if a signal was received (called by the scheduler)."""
    if requested is not None and os.getpid() == _MAIN_PID:
        raise Interrupted(requested)


def install() -> None:
    """Install the handlers in the main process (call from the main thread)."""
    global _MAIN_PID, requested
    _MAIN_PID = os.getpid()
    requested = None
    for sig in HANDLED:
        try:
            signal.signal(sig, _handler)
        except (ValueError, OSError):  # pragma: no cover - not the main thread
            return


def restore() -> None:
    """Default handlers again (after a run, e.g. when the CLI is called in-process)."""
    for sig in HANDLED:
        try:
            signal.signal(
                sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            )
        except (ValueError, OSError):  # pragma: no cover
            return


# ----------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------


def descendants(pid: int | None = None) -> list[int]:
    """Every process below ``pid`` (default: this one), from /proc (Linux), deepest last."""
    pid = pid or os.getpid()
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the fields follow the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        try:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_processes(pids, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, every process in ``pids``."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.05)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:  # reap our own children (no zombies left for the test to see)
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
