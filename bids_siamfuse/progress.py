"""Where a long participant run is, and what it cost: progress lines, ETA and a summary.

:class:`Progress` is nipype's ``status_callback`` (called in the main process when a step
starts, ends or fails). It counts the steps of each PET/T1w pair (its anatomical workflow and
its PET workflow), and reports pairs done/total, the step just finished, the elapsed time and an
ETA (elapsed time / share of steps done, so early estimates are rough: registration steps are
longer than the others). On a terminal it redraws one progress-bar line; in a log (stderr not a
terminal: SLURM, ``docker logs``) it writes a plain line when a pair completes and at most every
``interval`` seconds otherwise. :func:`run_summary` is the closing line: pairs ok/failed/
flagged, wall time and disk written.

:class:`ResourceLog` (``--resource-monitor``) writes one JSON line per finished step: run time,
and nipype's peak memory and CPU when ``psutil`` is installed (nipype's resource monitor needs
it; without it the times are still recorded).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path

LOGGER = logging.getLogger("bids_siamfuse.progress")


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _fmt_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


class Progress:
    """nipype ``status_callback`` counting steps per pair (see the module docstring).

    ``groups``: ``{pair key: (subject workflow name, anatomical workflow name, PET workflow
    name, number of steps of the two)}``, from :func:`pair_groups`.
    """

    def __init__(self, groups: dict, *, stream=None, interval: float = 60.0, clock=time.time):
        self.groups = groups
        self.stream = stream if stream is not None else sys.stderr
        self.interval = float(interval)
        self.clock = clock
        self.start = clock()
        self.last_line = self.start
        self.total = sum(g[3] for g in groups.values()) or 1
        self.done = 0
        self.counted: set[str] = set()
        self.pair_done: dict[str, int] = {k: 0 for k in groups}
        self.finished: list[str] = []
        self.stage = "starting"
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False

    # nipype calls this with the node and "start", "end" or "exception"
    def __call__(self, node, status: str) -> None:
        try:
            self._update(node, status)
        except Exception as exc:  # noqa: BLE001 - progress must never break a run
            LOGGER.debug("progress: %s", exc)

    def _update(self, node, status: str) -> None:
        hierarchy = f"{getattr(node, '_hierarchy', '')}.{getattr(node, 'name', '')}"
        if status == "start":
            self.stage = _stage(hierarchy)
            if self.tty:
                self._draw()
            return
        if status not in ("end", "exception") or hierarchy in self.counted:
            return
        self.counted.add(hierarchy)
        self.done += 1
        self.stage = _stage(hierarchy)  # cached steps report only their end
        completed = None
        for key, (subject_wf, anat_wf, pet_wf, n_steps) in self.groups.items():
            parts = hierarchy.split(".")
            if subject_wf in parts and (anat_wf in parts or pet_wf in parts):
                self.pair_done[key] += 1
                if self.pair_done[key] >= n_steps and key not in self.finished:
                    self.finished.append(key)
                    completed = key
        now = self.clock()
        if self.tty:
            self._draw()
        elif completed or now - self.last_line >= self.interval:
            self.last_line = now
            LOGGER.info("%s", self.line(completed))

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total)

    def eta(self) -> float | None:
        elapsed = self.clock() - self.start
        if self.done == 0 or elapsed <= 0:
            return None
        return elapsed * (1 - self.fraction) / self.fraction

    def line(self, completed: str | None = None) -> str:
        eta = self.eta()
        text = (
            f"progress: {len(self.finished)}/{len(self.groups)} pair(s) done, "
            f"{self.done}/{self.total} steps ({100 * self.fraction:.0f}%), "
            f"elapsed {_fmt_time(self.clock() - self.start)}"
            + (f", ETA {_fmt_time(eta)}" if eta is not None and self.fraction < 1 else "")
        )
        if completed:
            return f"{text}; {completed} finished"
        return f"{text}; at {self.stage}"

    def _draw(self) -> None:
        width = 24
        filled = int(round(width * self.fraction))
        bar = "#" * filled + "-" * (width - filled)
        eta = self.eta()
        text = (
            f"\r[{bar}] {len(self.finished)}/{len(self.groups)} pairs "
            f"{100 * self.fraction:3.0f}% {_fmt_time(self.clock() - self.start)}"
            + (f" ETA {_fmt_time(eta)}" if eta is not None else "")
            + f" {self.stage}"
        )
        self.stream.write(text[:120].ljust(120))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _stage(hierarchy: str) -> str:
    """``single_subject_001_wf.pet_ses_01_trc_FDG_wf.coreg`` -> ``sub-001 pet_ses_01... coreg``."""
    parts = hierarchy.split(".")
    subject = next((p for p in parts if p.startswith("single_subject_")), "")
    label = re.sub(r"^single_subject_(.+)_wf$", r"sub-\1", subject)
    inner = [p for p in parts if p.endswith("_wf") and p != subject and p != "bids_siamfuse_wf"]
    return " ".join(x for x in (label, inner[0] if inner else "", parts[-1]) if x)


def _n_run(nodes) -> int:
    """Nodes nipype will run: it drops plain IdentityInterface nodes (inputnode/outputnode)
    from the execution graph, so they never report."""
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline.engine import JoinNode

    return sum(
        1
        for n in nodes
        if not (isinstance(n.interface, IdentityInterface) and not isinstance(n, JoinNode))
    )


def pair_groups(workflow, plan, *, subject_name, anat_name, pet_name) -> dict:
    """Per pair: the names of its subject/anatomical/PET workflows and their step count."""
    groups = {}
    subject_wfs = {w.name: w for w in workflow._graph.nodes()}
    for pair in plan.pairs:
        subject_wf = subject_wfs.get(subject_name(pair.subject))
        if subject_wf is None:
            continue
        children = {w.name: w for w in subject_wf._graph.nodes()}
        anat, pet = anat_name(pair.subject, pair.t1w_session), pet_name(pair)
        n_steps = sum(
            _n_run(children[name]._get_all_nodes()) for name in (anat, pet) if name in children
        )
        groups[pair.key] = (subject_wf.name, anat, pet, n_steps)
    return groups


class ResourceLog:
    """``--resource-monitor``: one JSON line per finished step (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("a")

    def __call__(self, node, status: str) -> None:
        if status not in ("end", "exception"):
            return
        record = {"node": f"{getattr(node, '_hierarchy', '')}.{node.name}", "status": status}
        try:
            runtime = node.result.runtime
            for key, name in (
                ("startTime", "start"),
                ("endTime", "end"),
                ("duration", "duration_s"),
                ("mem_peak_gb", "mem_peak_gb"),
                ("cpu_percent", "cpu_percent"),
                ("nthreads_max", "threads_max"),
            ):
                value = getattr(runtime, key, None)
                if value is not None:
                    record[name] = value
        except Exception:  # noqa: BLE001 - a failed step may have no result
            pass
        record["mem_estimate_gb"] = getattr(node, "mem_gb", None)
        self.handle.write(json.dumps(record, default=str) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class Callbacks:
    """Several status callbacks as one (nipype takes a single ``status_callback``)."""

    def __init__(self, *callbacks):
        self.callbacks = [c for c in callbacks if c is not None]

    def __call__(self, node, status):
        for callback in self.callbacks:
            callback(node, status)


def bytes_written(folders, since: float) -> int:
    """Bytes of the regular files under ``folders`` modified at or after ``since``."""
    total = 0
    seen = set()
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        for root, _dirs, files in os.walk(folder):
            for name in files:
                try:
                    st = os.lstat(os.path.join(root, name))
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in seen or st.st_mtime < since:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def folder_size(folder) -> int:
    return bytes_written([folder], since=0.0)


def run_summary(status: list[dict], *, started: float, output_dir, work_dir) -> str:
    """``summary: 3 pair(s): 2 ok, 1 failed, 0 flagged; wall time 12m03s; wrote ...``."""
    # a flagged pair finished (its outputs exist) but participant QC set it aside (preproc/qc.py)
    flagged = sum(1 for row in status if row.get("status") == "flagged")
    ok = sum(1 for row in status if row.get("status") == "ok")
    failed = len(status) - ok - flagged
    wall = time.time() - started
    out_bytes = bytes_written([output_dir], started)
    work_bytes = folder_size(work_dir) if work_dir is not None else 0
    return (
        f"summary: {len(status)} pair(s): {ok} ok, {failed} failed, {flagged} flagged; "
        f"wall time {_fmt_time(wall)}; wrote {_fmt_bytes(out_bytes)} to {output_dir}"
        + (f"; work directory {work_dir} holds {_fmt_bytes(work_bytes)}" if work_dir else "")
    )
