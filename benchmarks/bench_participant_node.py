"""Participant level on one node: wall time and peak memory of N subjects, next to a baseline.

Generates (or reuses) a raw synthetic cohort (``bids_siamfuse-synth``, CN and AD, one session
each), then runs ``bids_siamfuse DS OUT participant`` as a child process for each run asked
for, pinned to ``--cpus`` with ``taskset`` when given, and records:

* wall time and CPU time (the child and every worker it waited for: ``wait4``), CPU use as a
  share of the cores given;
* peak memory of the whole process tree, sampled every ``--interval`` s from ``/proc``: the
  sum of PSS (``smaps_rollup``: shared pages of the forked workers counted once) and the sum
  of RSS (counts them in every worker: an upper bound);
* pairs done/failed (``OUT/logs/participant-*.tsv``), and, when psutil is installed, every
  step's peak memory and duration from ``--resource-monitor`` (``--steps``);
* whether the outputs of the baseline and the measured run are the same
  (``benchmarks/compare_outputs.py``: NIfTI decompressed, provenance masked).

Runs (``--runs``, in order; each ``NAME`` is ``kind:subjects:nprocs[:omp[:timeout]]``;
``A+B`` runs A and B at the same time, e.g. on disjoint ``--cpus-for`` sets):

* ``new``: the current scheduling (``participant/resources.py``);
* ``legacy``: the previous scheduling in the same code (``BIDS_SIAMFUSE_LEGACY_SCHEDULING=1``:
  steps declare ``--omp-nthreads`` cores, nipype's memory default), the baseline;
* ``code=PATH``: another source tree (``PYTHONPATH=PATH``), e.g. a checkout of main.

Example (the figures of docs/hpc.md, "Filling a node")::

    python benchmarks/bench_participant_node.py --dataset /tmp/pn/ds --subjects 32 \\
        --synth-jobs 16 --runs new:32:16 legacy:1:2+new:1:2 \\
        --cpus-for legacy:1:2=0,1 new:1:2=2,3 --compare legacy:1:2,new:1:2

A run stops at ``--timeout`` seconds (then its figures say how far it got). Results go to
``--json`` (one object per run, plus the machine) and a table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        info["mem_total_gb"] = round(os.sysconf("SC_PHYS_PAGES") * PAGE / 1024**3, 1)
        info["load"] = os.getloadavg()
    except (OSError, ValueError):
        pass
    return info


# ----------------------------------------------------------------------------------------------
# the process tree's memory
# ----------------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def memory_of(pids) -> tuple[float, float]:
    """(sum of PSS, sum of RSS) of ``pids``, GB; processes gone meanwhile are skipped."""
    pss = rss = 0
    for pid in pids:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            pass
    return pss / 1024**3, rss / 1024**3


class Sampler(threading.Thread):
    """Peak memory and process count of a process tree, sampled until :meth:`stop`."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_pss = self.peak_rss = 0.0
        self.peak_procs = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            pids = tree(self.pid)
            pss, rss = memory_of(pids)
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


# ----------------------------------------------------------------------------------------------
# cohort and runs
# ----------------------------------------------------------------------------------------------


def cohort(dataset: Path, subjects: int, seed: int, jobs: int, env: dict) -> list[str]:
    """The raw synthetic cohort (made when ``dataset`` does not hold enough subjects)."""
    have = sorted(p.name[4:] for p in dataset.glob("sub-*")) if dataset.is_dir() else []
    if len(have) < subjects:
        shutil.rmtree(dataset, ignore_errors=True)
        per_group = (subjects + 1) // 2
        cmd = [sys.executable, "-m", "bids_siamfuse.synth", str(dataset), "--n-per-group"]
        cmd += [str(per_group), "--groups", "CN", "AD", "--two-session-fraction", "0"]
        cmd += ["--seed", str(seed), "--jobs", str(jobs), "-q"]
        started = time.monotonic()
        subprocess.run(cmd, check=True, env=env)
        print(f"cohort: {per_group * 2} subjects in {time.monotonic() - started:.0f} s")
        have = sorted(p.name[4:] for p in dataset.glob("sub-*"))
    return have[:subjects]


def parse_run(text: str, timeout: float) -> dict:
    parts = text.split(":")
    if len(parts) not in (3, 4, 5):
        raise SystemExit(f"--runs {text!r}: use kind:subjects:nprocs[:omp[:timeout]]")
    return {
        "name": text,
        "kind": parts[0],
        "subjects": int(parts[1]),
        "nprocs": int(parts[2]),
        "omp": int(parts[3]) if len(parts) >= 4 and parts[3] else 0,
        "timeout": float(parts[4]) if len(parts) == 5 and parts[4] else timeout,
    }


def start_run(spec: dict, labels: list[str], args, base_env: dict, folder: Path) -> dict:
    """Start one run (a child process in its own session) and its memory sampler."""
    out, work = folder / "out", folder / "work"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = dict(base_env)
    if spec["kind"] == "legacy":
        env["BIDS_SIAMFUSE_LEGACY_SCHEDULING"] = "1"
    elif spec["kind"].startswith("code="):
        code = spec["kind"].split("=", 1)[1]
        env["PYTHONPATH"] = os.pathsep.join([code, *args.extra_path])
    elif spec["kind"] != "new":
        raise SystemExit(f"unknown run kind {spec['kind']!r}")
    cmd = [sys.executable, "-m", "bids_siamfuse.cli.run", str(args.dataset), str(out)]
    cmd += ["participant", "--participant-label", *labels[: spec["subjects"]], "-w", str(work)]
    cmd += ["--skip-bids-validation", "--nprocs", str(spec["nprocs"])]
    if spec["omp"]:
        cmd += ["--omp-nthreads", str(spec["omp"])]
    if args.steps:
        cmd += ["--resource-monitor"]
    cpus = args.cpus_for.get(spec["name"]) or args.cpus
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    log = (folder / "run.log").open("w")
    started, epoch = time.monotonic(), time.time()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    sampler = Sampler(proc.pid, args.interval)
    sampler.start()
    return {"spec": spec, "proc": proc, "log": log, "sampler": sampler, "started": started,
            "epoch": epoch, "cpus": cpus, "out": out, "folder": folder, "status": None,
            "usage": None, "timed_out": False}  # fmt: skip


def _stop(run: dict) -> None:
    run["timed_out"] = True
    pid = run["proc"].pid
    os.killpg(pid, signal.SIGTERM)  # the app writes its status table and stops its workers
    for _ in range(50):
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            run["status"], run["usage"] = status, usage
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
        _, run["status"], run["usage"] = os.wait4(pid, 0)
    run["wall"] = time.monotonic() - run["started"]


def wait_runs(runs: list[dict], deadline: float) -> None:
    """Wait for every run; those still going at ``deadline`` (monotonic) are stopped."""
    while any(r["status"] is None for r in runs):
        for run in runs:
            if run["status"] is not None:
                continue
            pid, status, usage = os.wait4(run["proc"].pid, os.WNOHANG)
            if pid:
                run["status"], run["usage"] = status, usage
                run["wall"] = time.monotonic() - run["started"]
            elif time.monotonic() > deadline:
                _stop(run)
        time.sleep(0.2)


def finish_run(run: dict, args) -> dict:
    spec, sampler, out, cpus = run["spec"], run["sampler"], run["out"], run["cpus"]
    sampler.stop()
    run["log"].close()
    wall, usage = run["wall"], run["usage"]
    cores = len(_cpu_list(cpus)) if cpus else os.cpu_count()
    cpu = usage.ru_utime + usage.ru_stime
    rows = []
    for table in (out / "logs").glob("participant-*.tsv"):
        with table.open() as handle:
            rows += list(csv.DictReader(handle, delimiter="\t"))
    ok = sum(r.get("status") in ("ok", "flagged") for r in rows)
    steps_done = 0
    for path in (out / "logs").glob("resources-*.jsonl"):
        steps_done += sum('"status": "end"' in line for line in path.read_text().splitlines())
    result = {
        **spec,
        "cpus": cpus or f"all ({cores})",
        "cores": cores,
        "exit": os.waitstatus_to_exitcode(run["status"]),
        "timed_out": run["timed_out"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "cpu_use": round(cpu / (wall * cores), 3) if wall else None,
        "wall_per_subject_s": round(wall / spec["subjects"], 1),
        "peak_pss_gb": round(sampler.peak_pss, 2),
        "peak_rss_gb": round(sampler.peak_rss, 2),
        "peak_processes": sampler.peak_procs,
        "samples": sampler.samples,
        "pairs_done": ok,
        "pairs_failed": len(rows) - ok,
        "pairs_per_min": round(ok / wall * 60, 2) if wall else None,
        "steps_done": steps_done,
        "steps_per_min": round(steps_done / wall * 60, 1) if wall else None,
        "started_epoch": run["epoch"],
        "out": str(out),
    }
    if args.steps:
        result["steps"] = step_table(out)
    result["log_tail"] = (run["folder"] / "run.log").read_text(errors="replace").splitlines()[-3:]
    return result


def _cpu_list(text: str) -> list[int]:
    cpus = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        cpus += list(range(int(a), int(b or a) + 1))
    return cpus


def step_table(out: Path) -> dict:
    """Per step name (``register``, ``segment``...): count, peak memory (max) and median
    duration, from the ``--resource-monitor`` log (needs psutil for the memory)."""
    import statistics

    steps: dict[str, dict] = {}
    for path in (out / "logs").glob("resources-*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            name = rec["node"].rsplit(".", 1)[-1]
            entry = steps.setdefault(name, {"n": 0, "mem": [], "dur": [], "est": None})
            entry["n"] += 1
            if rec.get("mem_peak_gb") is not None:
                entry["mem"].append(float(rec["mem_peak_gb"]))
            if rec.get("duration_s") is not None:
                entry["dur"].append(float(rec["duration_s"]))
            entry["est"] = rec.get("mem_estimate_gb")
    return {
        name: {
            "n": e["n"],
            "mem_peak_gb_max": round(max(e["mem"]), 3) if e["mem"] else None,
            "duration_s_median": round(statistics.median(e["dur"]), 1) if e["dur"] else None,
            "mem_estimate_gb": e["est"],
        }
        for name, e in sorted(steps.items(), key=lambda kv: -max(kv[1]["mem"] or [0]))
    }


def same_outputs(a: dict, b: dict, labels: list[str]) -> dict:
    """compare_outputs.py on the subjects both runs processed (provenance masked)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_outputs

    common = [f"sub-{s}" for s in labels[: min(a["subjects"], b["subjects"])]]
    ra, rb = Path(a["out"]), Path(b["out"])
    fa, fb = compare_outputs.files(ra, common), compare_outputs.files(rb, common)
    only = sorted(k for k in set(fa) ^ set(fb))
    differ = sorted(
        k
        for k in set(fa) & set(fb)
        if compare_outputs.content(fa[k]) != compare_outputs.content(fb[k])
    )
    return {
        "runs": [a["name"], b["name"]],
        "files": [len(fa), len(fb)],
        "only_in_one": only[:20],
        "differ": differ[:20],
        "n_differ": len(differ),
    }


def steps_within(result: dict, seconds: float) -> int:
    """Steps of a run (``--steps``) that had ended ``seconds`` after it started."""
    from datetime import datetime

    limit, count = result["started_epoch"] + seconds, 0
    for path in (Path(result["out"]) / "logs").glob("resources-*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("status") == "end" and rec.get("end"):
                count += datetime.fromisoformat(str(rec["end"])).timestamp() <= limit
    return count


def table(results: list[dict]) -> None:
    cols = ("name", "cpus", "wall_s", "wall_per_subject_s", "cpu_use", "peak_pss_gb")
    cols += ("peak_rss_gb", "pairs_done", "pairs_failed", "pairs_per_min", "timed_out")
    print("\t".join(cols))
    for r in results:
        print("\t".join(str(r.get(c)) for c in cols))
    for r in results:
        if r["kind"] != "new":
            continue
        for b in results:  # the baselines on as many processes
            if b["kind"] == "new" or b["nprocs"] != r["nprocs"]:
                continue
            if b["subjects"] == r["subjects"] and not (b["timed_out"] or r["timed_out"]):
                print(f"{r['name']}: {b['wall_s'] / r['wall_s']:.2f}x faster than {b['name']}")
            elif b["timed_out"] and b["subjects"] == r["subjects"]:
                # a baseline stopped early: steps each run had finished after as long
                ours, theirs = steps_within(r, b["wall_s"]), b["steps_done"]
                print(
                    f"{r['name']}: {ours} steps done in the first {b['wall_s']:.0f} s, "
                    f"{b['name']}: {theirs} ({ours / max(theirs, 1):.2f}x)"
                )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=Path("/tmp/bench_participant_node/ds"))
    p.add_argument(
        "--folder", type=Path, default=None, help="runs go here (default: beside --dataset)"
    )
    p.add_argument("--subjects", type=int, default=32, help="subjects in the cohort")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--synth-jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runs", nargs="+", default=["new:32:16", "legacy:4:16"])
    p.add_argument("--cpus", default="", help="taskset CPU list for every run (e.g. 0-15)")
    p.add_argument("--cpus-for", nargs="*", default=[], metavar="RUN=CPUS")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--deadline", type=float, default=0, help="seconds for everything (0: none)")
    p.add_argument("--min-left", type=float, default=30, help="start no run with less left")
    p.add_argument("--interval", type=float, default=0.5, help="memory sampling period (s)")
    p.add_argument("--steps", action="store_true", help="--resource-monitor: peaks per step")
    p.add_argument(
        "--compare", nargs="*", default=[], metavar="RUN,RUN", help="outputs to compare"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.deadline if args.deadline else float("inf")
    args.cpus_for = dict(item.split("=", 1) for item in args.cpus_for)
    args.extra_path = [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]
    args.dataset = args.dataset.absolute()
    folder = (args.folder or args.dataset.parent).absolute()
    env = {k: v for k, v in os.environ.items() if k != "NILEARN_DATA"}
    env.setdefault("PYTHONPATH", str(ROOT))
    env["PYTHONUNBUFFERED"] = "1"
    specs = [[parse_run(r, args.timeout) for r in item.split("+")] for item in args.runs]
    labels = cohort(
        args.dataset,
        max(args.subjects, *(s["subjects"] for g in specs for s in g)),
        args.seed,
        args.synth_jobs,
        env,
    )
    report = {"machine": machine(), "command": sys.argv, "runs": [], "compare": [], "skipped": []}

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, default=str))

    index = 0
    for group in specs:  # the runs of a group (joined by '+') run at the same time
        names = "+".join(spec["name"] for spec in group)
        left = deadline - time.monotonic()
        if left < args.min_left:
            print(f"skipped {names}: {left:.0f} s left before --deadline", flush=True)
            report["skipped"].append(names)
            continue
        print(f"run {names} ...", flush=True)
        runs = []
        for spec in group:
            runs.append(start_run(spec, labels, args, env, folder / f"run{index}"))
            index += 1
        wait_runs(runs, min(deadline, time.monotonic() + max(s["timeout"] for s in group)))
        for run in runs:
            result = finish_run(run, args)
            report["runs"].append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "steps"}), flush=True)
        save()
    by_name = {r["name"]: r for r in report["runs"]}
    for pair in args.compare:
        a, b = pair.split(",")
        if a in by_name and b in by_name:
            report["compare"].append(same_outputs(by_name[a], by_name[b], labels))
            print(json.dumps(report["compare"][-1]), flush=True)
    save()
    table(report["runs"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
