"""Participant preprocessing benchmark: time, memory and accuracy against the synthetic truth.

::

    python benchmarks/bench_preproc.py --n-per-group 2 --groups CN MCIs MCIc AD --seed 1 \\
        --repeats 3 [--dataset DIR] [--pet-frames 1] [--json results.json]

1. Generates a synthetic cohort (``bids_siamfuse-synth``; skull, scalp, neck, RAS/LAS/LPS/PIR
   storage, oblique grids, bias fields) unless ``--dataset`` names one.
2. **Cost**: runs ``bids_siamfuse DS OUT participant --participant-label <first subject>
   --session-label <its first session>`` (one T1w + its PET, a fresh work directory each
   time) ``--repeats`` times with the default settings and as many with ``--sloppy`` (the
   baseline), interleaved, and reports the median wall time, the CPU time (user + system, of
   the whole process tree: a contention-free estimate of the wall time is CPU / cores) and
   the peak resident memory of the whole process tree (sampled from /proc every 0.2 s;
   nipype's worker processes included), with the load average.
3. **Accuracy**: runs every session once with each setting and scores the derivatives against
   the truth (``benchmarks/preproc_scoring.py``): T1w->MNI displacement error inside the brain,
   GM Dice, modulated GM volume error, PET->T1w error.
4. Prints both, and the ratios default/sloppy measured in this run. Results go to
   ``docs/benchmarks.md`` (section "Participant preprocessing").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _tree_rss_kb(root: int) -> int:
    """Resident memory (kB) of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def run_cli(args: list[str], env: dict) -> dict:
    """Run a command; wall time, exit code and peak process-tree RSS."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # nipype's workers included
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "code": proc.returncode,
        "peak_rss_gb": peak[0] / 1024**2,
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "tail": output.decode(errors="replace").strip().splitlines()[-3:],
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def participant_cmd(ds, out, work, extra) -> list[str]:
    exe = [sys.executable, "-m", "bids_siamfuse"]
    return [*exe, str(ds), str(out), "participant", "-w", str(work), "--skip-bids-validation",
            "-q", *extra]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, help="an existing synthetic cohort")
    parser.add_argument("--n-per-group", type=int, default=2)
    parser.add_argument("--groups", nargs="+", default=["CN", "MCIs", "MCIc", "AD"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pet-frames", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timing runs per setting")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--nprocs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, help="where runs are kept (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    from preproc_scoring import meets_targets, score_session, sessions

    env = dict(os.environ)
    env.setdefault("NILEARN_DATA", str(ROOT.parent / "shared" / "data" / "nilearn_data"))
    root = Path(args.work or tempfile.mkdtemp(prefix="bench_preproc_"))
    root.mkdir(parents=True, exist_ok=True)
    ds = args.dataset
    if ds is None:
        ds = root / "ds"
        if not (ds / "dataset_description.json").is_file():
            cmd = [sys.executable, "-m", "bids_siamfuse.synth", str(ds), "--n-per-group",
                   str(args.n_per_group), "--groups", *args.groups, "--seed", str(args.seed),
                   "--pet-frames", str(args.pet_frames), "--preprocessed", "-q"]  # fmt: skip
            subprocess.run(cmd, env=env, check=True)
    todo = sessions(ds)
    first, first_ses = todo[0]
    one = ["--participant-label", first] + (["--session-label", first_ses] if first_ses else [])
    info = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_model": _cpu_model(),
        },
        "dataset": str(ds),
        "sessions": len(todo),
        "nprocs": args.nprocs,
    }
    common = ["--nprocs", str(args.nprocs)]
    modes = {"default": [], "sloppy": ["--sloppy"]}

    # cost: one subject, fresh work directory each time, settings interleaved
    timing = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode, extra in modes.items():
            run_dir = root / f"time_{mode}_{r}"
            res = run_cli(
                participant_cmd(ds, run_dir / "out", run_dir / "work",
                                [*common, *extra, *one]),
                env,
            )  # fmt: skip
            timing[mode].append(res)
            print(
                f"[time] {mode:8s} run {r}: {res['seconds']:6.1f} s (CPU {res['cpu_s']:.0f} s), "
                f"peak RSS "
                f"{res['peak_rss_gb']:.2f} GB, exit {res['code']}, load "
                f"{res['load_before']:.2f}->{res['load_after']:.2f}",
                flush=True,
            )
    summary = {}
    for mode in modes:
        secs = [t["seconds"] for t in timing[mode]]
        summary[mode] = {
            "median_s": statistics.median(secs),
            "min_s": min(secs),
            # CPU seconds over the cores: the wall time on an otherwise idle machine, at best
            "median_cpu_s": statistics.median(t["cpu_s"] for t in timing[mode]),
            "peak_rss_gb": max(t["peak_rss_gb"] for t in timing[mode]),
        }
    info["timing"] = {"runs": timing, "summary": summary, "subject": first, "session": first_ses}

    # accuracy: every session, once per setting
    if not args.skip_accuracy:
        scores = {}
        for mode, extra in modes.items():
            run_dir = root / f"acc_{mode}"
            res = run_cli(participant_cmd(ds, run_dir / "out", run_dir / "work",
                                          [*common, *extra]), env)  # fmt: skip
            print(f"[accuracy] {mode}: all {len(todo)} session(s) in {res['seconds']:.0f} s, "
                  f"exit {res['code']}", flush=True)  # fmt: skip
            rows = []
            for sub, ses in todo:
                try:
                    rows.append(score_session(ds, run_dir / "out", sub, ses,
                                              work_dir=run_dir / "work"))  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - report and go on
                    rows.append({"subject": sub, "session": ses, "error": str(exc)})
            scores[mode] = rows
        info["accuracy"] = scores
        keys = ("disp_mm", "disp_p95", "dice", "vol_err_pct", "pet_mm")
        print("\nsession       storage  tilt   " + "  ".join(f"{k:>11s}" for k in keys))
        for mode, rows in scores.items():
            print(f"--- {mode}")
            for row in rows:
                if "error" in row:
                    print(f"sub-{row['subject']} ses-{row['session']}: ERROR {row['error']}")
                    continue
                ok = all(meets_targets(row).values())
                print(
                    f"sub-{row['subject']} ses-{row['session']}  {row['axcodes']:>5s} "
                    f"{row['tilt_deg']:5.1f}   "
                    + "  ".join(f"{row[k]:11.3f}" for k in keys)
                    + ("" if ok else "  MISSES A TARGET")
                )
        for mode, rows in scores.items():
            good = [r for r in rows if "error" not in r]
            agg = {k: (statistics.mean(r[k] for r in good), max(r[k] for r in good)) for k in keys}
            agg["vol_abs_max"] = max(abs(r["vol_err_pct"]) for r in good)
            agg["dice_min"] = min(r["dice"] for r in good)
            agg["all_targets"] = all(all(meets_targets(r).values()) for r in good) and len(
                good
            ) == len(rows)
            summary.setdefault(mode, {}).update({"accuracy": agg})
            print(
                f"{mode:8s} mean/max: disp {agg['disp_mm'][0]:.3f}/{agg['disp_mm'][1]:.3f} mm, "
                f"Dice {agg['dice'][0]:.4f} (min {agg['dice_min']:.4f}), |vol err| max "
                f"{agg['vol_abs_max']:.2f} %, PET {agg['pet_mm'][0]:.3f}/{agg['pet_mm'][1]:.3f}"
                f" mm; all targets met: {agg['all_targets']}"
            )

    d, s = summary["default"], summary["sloppy"]
    print(
        f"\n[cost] one subject (T1w + PET), {args.repeats} runs each: default median "
        f"{d['median_s']:.1f} s (min {d['min_s']:.1f}; CPU {d['median_cpu_s']:.0f} s), peak RSS "
        f"{d['peak_rss_gb']:.2f} GB; sloppy median {s['median_s']:.1f} s (CPU "
        f"{s['median_cpu_s']:.0f} s), peak {s['peak_rss_gb']:.2f} GB; "
        f"time ratio default/sloppy {d['median_s'] / s['median_s']:.2f}x"
    )
    if "accuracy" in d:
        da, sa = d["accuracy"], s["accuracy"]
        print(
            f"[ratios default/sloppy] displacement error {da['disp_mm'][0] / sa['disp_mm'][0]:.2f}"
            f", 1-Dice {(1 - da['dice'][0]) / (1 - sa['dice'][0]):.2f}, PET error "
            f"{da['pet_mm'][0] / sa['pet_mm'][0]:.2f}"
        )
    print(f"load average now: {os.getloadavg()}; CPU: {info['machine']['cpu_model']}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
