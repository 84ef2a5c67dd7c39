"""The participant workflow's scheduler: nipype's MultiProc/Linear with the guarantees a BIDS
App run needs.

nipype's plugins poll forever when something goes wrong outside a node, and print tracebacks on
the terminal when something goes wrong inside one. :class:`GuardedMultiProc` (and
:class:`GuardedLinear`) add:

* **every run ends**: an exception inside the completion callback of a finished job (ENOSPC
  while nipype unpickles or stores its result) was swallowed by ``concurrent.futures`` and the
  scheduler waited for the job forever; it now fails that job. A watchdog ends the run when
  nothing runs and nothing can start for :data:`STALL_SECONDS` (exit 64: the resources given
  cannot run the next node) instead of polling forever;
* **disk full ends the run at once**: the first node that fails with ENOSPC/EDQUOT (in the
  output or the work folder) stops scheduling, stops the workers and ends the run with exit 73;
* **a failed pair stops its other branch**: when a node of a PET workflow fails, the nodes of
  the T1w workflow that only served failed pairs are cancelled (nipype removes a failed node's
  descendants only, so the T1w branch of a pair whose PET failed ran on for minutes);
* **workers are stopped** whenever the run ends early (interrupt, disk full, watchdog): every
  worker process and its children, so nothing keeps writing after the main process returns;
* **no traceback on the terminal**: nipype's crash reports (about 30 lines per failed node) are
  kept out of the terminal (:class:`NodeCrashFilter`); the crash file holds the traceback and
  the run prints one line per failed pair.

The plugin takes the pairs' branches from :func:`branches` (built from the plan in
:mod:`bids_siamfuse.participant.run`).
"""

from __future__ import annotations

import errno
import logging
import os
import time

from nipype.pipeline.plugins.linear import LinearPlugin
from nipype.pipeline.plugins.multiproc import MultiProcPlugin

from . import signals
from .errors import CannotWriteError, UsageError
from .signals import descendants, stop_processes

LOGGER = logging.getLogger("bids_siamfuse.engine")

#: Seconds the scheduler may sit with nothing running and jobs waiting that it will not start.
STALL_SECONDS = float(os.environ.get("BIDS_SIAMFUSE_STALL_SECONDS", "60"))
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")


def disk_full(text: str) -> bool:
    return any(marker in text for marker in _DISK_FULL)


def _last_line(traceback) -> str:
    text = "".join(traceback) if isinstance(traceback, (list, tuple)) else str(traceback or "")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------------------------
# branches of a pair
# ----------------------------------------------------------------------------------------------


def branches(plan, *, anat_name, pet_name, safe, root: str = "bids_siamfuse_wf") -> dict:
    """``{anat prefix: [pet prefixes]}``: the T1w workflow of each subject and the PET
    workflows that use it (node full names start with these prefixes)."""
    out: dict[str, list[str]] = {}
    for pair in plan.pairs:
        subject = f"{root}.single_subject_{safe(pair.subject)}_wf"
        anat = f"{subject}.{anat_name(pair.subject, pair.t1w_session)}"
        out.setdefault(anat, []).append(f"{subject}.{pet_name(pair)}")
    return out


class _Guard:
    """What both plugins add (mixed into nipype's plugin classes)."""

    def _guard_init(self, plugin_args):
        self._branches = dict(plugin_args.get("branches") or {})
        self._dead: set[str] = set()
        self._fatal: BaseException | None = None
        self._idle_since: float | None = None
        self.cancelled: list[str] = []

    # -- failures -----------------------------------------------------------------------------

    def _clean_queue(self, jobid, graph, result=None):
        tb = (result or {}).get("traceback") if result else None
        text = "".join(tb) if isinstance(tb, (list, tuple)) else str(tb or "")
        try:
            notrun = super()._clean_queue(jobid, graph, result=result)
        except OSError as exc:  # the crash file itself could not be written
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CannotWriteError(f"cannot write a crash file: {exc.strerror}") from None
            raise
        if disk_full(text):
            line = _last_line(text).split(": ", 1)[-1] if _last_line(text) else ""
            self._fatal = CannotWriteError(line or "No space left on device")
            raise self._fatal
        self._cancel_branch(self.procs[jobid].fullname, graph)
        return notrun

    def _mark_dead(self, fullname: str) -> None:
        """The failed node's pair is dead; a T1w workflow whose pairs all died is dead too."""
        for anat, pets in self._branches.items():
            if fullname.startswith(anat + "."):
                self._dead.update(pets)
                self._dead.add(anat)
            for pet in pets:
                if fullname.startswith(pet + "."):
                    self._dead.add(pet)
            if all(p in self._dead for p in pets):
                self._dead.add(anat)

    def _cancel_branch(self, fullname: str, graph) -> None:
        """Cancel the pending nodes that serve only dead pairs (see :meth:`_mark_dead`)."""
        if not self._branches:
            return
        self._mark_dead(fullname)
        for jobid, node in enumerate(self.procs):
            if self.proc_done[jobid]:
                continue  # finished, running, or already removed
            name = node.fullname
            if any(name.startswith(prefix + ".") for prefix in self._dead):
                self.proc_done[jobid] = True
                self.proc_pending[jobid] = False
                self.cancelled.append(name)
        if self.cancelled:
            LOGGER.debug("cancelled %d node(s) of failed pairs", len(self.cancelled))

    # -- the watchdog -------------------------------------------------------------------------

    def _watch(self):
        signals.check()  # a signal whose exception was swallowed on the way
        if self._fatal is not None:
            raise self._fatal
        import numpy as np

        running = bool(self.pending_tasks)
        waiting = bool(np.any(~self.proc_done))
        if running or not waiting:
            self._idle_since = None
            return
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since > STALL_SECONDS:
            names = [n.fullname for i, n in enumerate(self.procs) if not self.proc_done[i]]
            raise UsageError(
                f"the scheduler could not start {len(names)} waiting node(s) for "
                f"{STALL_SECONDS:.0f} s with nothing running (first: {names[0]}); check "
                "--mem/--nprocs against the nodes' needs"
            )


class GuardedMultiProc(_Guard, MultiProcPlugin):
    """MultiProc with the guards above."""

    def __init__(self, plugin_args=None):
        plugin_args = dict(plugin_args or {})
        super().__init__(plugin_args={k: v for k, v in plugin_args.items() if k != "branches"})
        self._guard_init(plugin_args)

    def _prerun_check(self, graph):
        """Refuse (64) before running when a node needs more memory than ``--mem`` gives."""
        needs = max((node.mem_gb for node in graph.nodes()), default=0)
        if needs > self.memory_gb:
            raise UsageError(
                f"--mem gives {self.memory_gb * 1024:.0f} MB but a node needs "
                f"{needs * 1024:.0f} MB; give at least {needs * 1024:.0f} MB"
            )
        super()._prerun_check(graph)

    def _async_callback(self, args):
        try:
            super()._async_callback(args)
        except Exception as exc:  # noqa: BLE001 - swallowed by concurrent.futures before
            taskid = next((t for t, f in self._task_obj.items() if f is args), None)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._fatal = CannotWriteError(f"cannot store a node's result: {exc.strerror}")
            if taskid is not None:
                self._taskresult[taskid] = {
                    "result": None,
                    "traceback": [f"{type(exc).__name__}: {exc}\n"],
                    "taskid": taskid,
                }

    def _send_procs_to_workers(self, updatehash=False, graph=None):
        self._watch()
        super()._send_procs_to_workers(updatehash=updatehash, graph=graph)

    def run(self, graph, config, updatehash=False):
        try:
            return super().run(graph, config, updatehash=updatehash)
        except BaseException:
            self.stop_workers()
            raise

    def stop_workers(self) -> None:
        """Stop every worker (and what they started); used when a run ends early."""
        pool = getattr(self, "pool", None)
        pids = descendants()
        if pool is not None:
            pids += [p for p in getattr(pool, "_processes", {}) or {} if p not in pids]
        stop_processes(pids)
        if pool is not None:
            try:
                pool.shutdown(wait=False, cancel_futures=True)
            except Exception:  # noqa: BLE001 - a broken pool after the kill
                pass


class GuardedLinear(_Guard, LinearPlugin):
    """nipype's Linear plugin (``--nprocs 1``) with the same failure handling."""

    def __init__(self, plugin_args=None):
        plugin_args = dict(plugin_args or {})
        super().__init__(plugin_args={k: v for k, v in plugin_args.items() if k != "branches"})
        self._guard_init(plugin_args)

    def run(self, graph, config, updatehash=False):
        """nipype's serial loop (Linear 1.11) with the disk-full stop and branch cancelling."""
        import traceback as tb_module

        import networkx as nx
        from nipype.pipeline.engine.utils import topological_sort
        from nipype.pipeline.plugins.base import report_crash, report_nodes_not_run, str2bool

        old_wd = os.getcwd()
        notrun, donotrun, errors = [], set(), []
        stop_on_first_crash = str2bool(config["execution"]["stop_on_first_crash"])
        nodes, _ = topological_sort(graph)
        try:
            for node in nodes:
                signals.check()
                if node in donotrun or any(
                    node.fullname.startswith(prefix + ".") for prefix in self._dead
                ):
                    if node not in donotrun:
                        self.cancelled.append(node.fullname)
                    continue
                try:
                    node.run(updatehash=updatehash)
                except Exception as exc:  # noqa: BLE001 - any node failure, as nipype does
                    text = "".join(tb_module.format_exception(exc))
                    crashfile = report_crash(node)
                    if disk_full(text):
                        raise CannotWriteError(
                            _last_line(text).split(": ", 1)[-1] or "No space left on device"
                        ) from None
                    subnodes = list(nx.dfs_preorder_nodes(graph, node))
                    notrun.append({"node": node, "dependents": subnodes, "crashfile": crashfile})
                    donotrun.update(subnodes)
                    errors.append(exc)
                    self._mark_dead(node.fullname)
                    if stop_on_first_crash:
                        break
        except BaseException:
            stop_processes(descendants())
            raise
        finally:
            os.chdir(old_wd)
        report_nodes_not_run(notrun)
        if errors:
            raise RuntimeError(f"{len(errors)} node(s) failed") from errors[0]


# ----------------------------------------------------------------------------------------------
# the terminal
# ----------------------------------------------------------------------------------------------


class NodeCrashFilter(logging.Filter):
    """Keep nipype's crash reports (tracebacks) off the terminal; crash files hold them."""

    _DROP = (
        "Saving crash info to",
        "failed to run on host",
        "could not run node",
        "Traceback (most recent call last)",
        "Workflow did not execute cleanly",
        "***********************************",
        "Node crashed",
        "[Node] Error on",
        "Storing result file without outputs",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: let logging handle it
            return True
        if any(marker in text for marker in self._DROP):
            return False
        if "\n" in text and record.levelno >= logging.WARNING:
            # multi-line nipype messages (crash details): their first line only
            record.msg, record.args = text.splitlines()[0], ()
        return True


def quiet_node_crashes(verbosity: int) -> None:
    """Install :class:`NodeCrashFilter` on nipype's loggers (not at -vv: debugging wants all)."""
    if verbosity >= 2:
        return
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils", "nipype"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, NodeCrashFilter) for f in logger.filters):
            logger.addFilter(NodeCrashFilter())
