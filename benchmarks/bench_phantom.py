"""Tissue volumes of the anatomical pipeline against the physical phantom (issue 17, item 3).

::

    nice python benchmarks/bench_phantom.py --voxel 1x1x1 --seed 1 --json out.json \\
        [--variant head|skull-stripped|conformed] [--save PREFIX | --load PREFIX] [--sloppy]

Builds :func:`bids_siamfuse.phantom.make_phantom` (or reads one saved by ``--save``), runs the
anatomical steps exactly as the workflow's nodes call them (``load_t1w``, ``head_mask``, N4,
``register_to_template``, ``segment``, ``grid_positions``/``normalize_to_grid``) at the
default settings, and scores the native partial-volume fractions against the phantom's true
fractions (:func:`bids_siamfuse.phantom.score`: totals, AAL-regional GM, lobe-like regional
GM/WM/CSF), the brain mask (Dice, volume), where the GM excess sits (voxels mixing CSF and GM,
GM and WM, CSF and WM: the ventricle rim) and the modulated GM on the grid per AAL region
against the true regional GM. ``--variant`` stores the phantom another way first
(:func:`bids_siamfuse.phantom.variant`: skull-stripped, or FreeSurfer-conformed-like: WM 110,
uint8, 256^3, LIA). Prints JSON; timings per step (ITK threads: see
``BIDS_SIAMFUSE_ITK_THREADS``, one by default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def boundary_excess(truth, gm) -> dict:
    """GM estimated minus true (mL) in voxels by the true mixture they hold."""
    import numpy as np

    v = truth.voxel_ml
    mix = 0.02
    c, g, w = truth.csf > mix, truth.gm > mix, truth.wm > mix
    kinds = {
        "pure_GM": g & ~c & ~w,
        "CSF/GM": c & g & ~w,
        "GM/WM": g & w & ~c,
        "CSF/WM (no GM)": c & w & ~g,
        "three classes": c & g & w,
        "pure CSF": c & ~g & ~w,
        "pure WM": w & ~c & ~g,
    }
    diff = np.asarray(gm, np.float64) - truth.gm
    return {k: round(float(diff[m].sum() * v), 2) for k, m in kinds.items()}


def run(ph, work: Path, sloppy: bool) -> tuple[dict, dict]:
    import ants
    import nibabel as nb
    import numpy as np

    from bids_siamfuse.data.atlas import load_atlas
    from bids_siamfuse.preproc import anat, segmentation
    from bids_siamfuse.preproc import registration as reg

    settings = reg.registration_settings(sloppy)
    times = {}
    cpu = {}

    def cpu_now():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    path = work / "t1w.nii.gz"
    nb.save(ph.image, path)
    t0, c0 = time.perf_counter(), cpu_now()
    t1 = reg.to_ants(anat.load_t1w(path))
    head = anat.head_mask(t1)
    mask = ants.resample_image_to_target(head.mask, t1, interp_type="nearestNeighbor")
    n4, _ = anat.bias_correct(t1, mask, iterations=settings.n4_iterations[:2])
    times["bias"] = time.perf_counter() - t0
    cpu["bias"] = cpu_now() - c0
    t0, c0 = time.perf_counter(), cpu_now()
    regd = anat.register_to_template(n4, head, settings, work, seed=42)
    times["register"] = time.perf_counter() - t0
    cpu["register"] = cpu_now() - c0
    t0, c0 = time.perf_counter(), cpu_now()
    seg = segmentation.segment(
        t1, n4, regd.inverse_composite, regd.brain_mask_affine, settings, work
    )
    times["segment"] = time.perf_counter() - t0
    cpu["segment"] = cpu_now() - c0
    t0, c0 = time.perf_counter(), cpu_now()
    positions = anat.grid_positions(regd.composite, work)
    gm_img = seg.gm
    wc1, mwc1 = anat.normalize_to_grid(gm_img, positions)
    times["grid"] = time.perf_counter() - t0
    cpu["grid"] = cpu_now() - c0
    gm = np.asanyarray(seg.gm.dataobj, np.float32)
    wm = np.asanyarray(seg.wm.dataobj, np.float32)
    csf = np.asanyarray(seg.csf.dataobj, np.float32)
    brain = np.asanyarray(seg.brain_mask.dataobj) > 0
    from bids_siamfuse import phantom

    out = phantom.score(ph, gm, wm, csf)
    inter = float((brain & ph.brain).sum())
    out["brain_mask"] = {
        "dice": 2 * inter / float(brain.sum() + ph.brain.sum()),
        "est_ml": float(brain.sum()) * ph.voxel_ml,
        "true_ml": float(ph.brain.sum()) * ph.voxel_ml,
    }
    out["gm_excess_ml_by_true_mixture"] = boundary_excess(ph, gm)
    out["affine_correlation"] = regd.affine_correlation
    out["tissue_means"] = {k: round(float(v), 4) for k, v in seg.means.items()}
    # modulated GM on the grid, per AAL region, against the phantom's true regional GM
    atlas = load_atlas()
    grid_reg = np.bincount(atlas.labels.ravel(), mwc1.ravel().astype(np.float64), 117)[1:]
    grid_reg *= 1.5**3 / 1000.0
    true_reg = np.bincount(ph.aal.ravel(), ph.gm.ravel(), 117)[1:] * ph.voxel_ml
    keep = true_reg >= 1.0
    err = 100 * (grid_reg[keep] - true_reg[keep]) / true_reg[keep]
    out["grid_mwc1"] = {
        "total_ml": float(mwc1.sum()) * 1.5**3 / 1000.0,
        "total_error_pct": 100
        * (float(mwc1.sum()) * 1.5**3 / 1000.0 - out["GM"]["true_ml"])
        / out["GM"]["true_ml"],
        "aal_median_abs_pct": float(np.median(np.abs(err))),
        "aal_p90_abs_pct": float(np.percentile(np.abs(err), 90)),
        "aal_mean_pct": float(err.mean()),
    }
    # the session's T1w QC (preproc/qc.py) as far as it is computed here (no T1w on the grid)
    from bids_siamfuse.preproc import qc

    metrics = qc.anat_metrics(
        zooms=ph.voxel,
        t1w=n4.numpy(),
        brain_mask=brain,
        gm=gm,
        wm=wm,
        csf=csf,
        means=dict(seg.means),
        affine_correlation=regd.affine_correlation,
        gm_grid=wc1,
    )
    out["qc"] = {
        r["metric"]: [
            round(r["value"], 4) if isinstance(r["value"], float) else r["value"],
            r["status"],
        ]
        for r in qc.evaluate(metrics)
        if r["status"] != "info"
    }
    out["affine_starts_tried"] = sorted(p.name for p in work.glob("init_*.mat"))
    out["cpu_seconds"] = {k: round(v, 1) for k, v in cpu.items()}
    return out, times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--voxel", default="1x1x1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sloppy", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--save", type=Path, help="save the phantom (prefix) and exit")
    p.add_argument("--load", type=Path, help="read a phantom saved with --save (prefix)")
    p.add_argument("--work", type=Path)
    p.add_argument(
        "--variant",
        default="head",
        help="head, skull-stripped, conformed (256^3) or conformed-unpadded",
    )
    args = p.parse_args(argv)
    from bids_siamfuse import phantom
    from bids_siamfuse.preproc import registration as reg

    reg.set_threads(1)  # ITK: bids_siamfuse's default (BIDS_SIAMFUSE_ITK_THREADS overrides)
    voxel = tuple(float(v) for v in args.voxel.split("x"))
    t0 = time.perf_counter()
    if args.load:
        ph = phantom.load(args.load)
    else:
        ph = phantom.make_phantom(voxel, seed=args.seed)
    ph = phantom.variant(ph, args.variant)
    t_make = time.perf_counter() - t0
    if args.save:
        phantom.save(ph, args.save)
        print(f"saved {args.save} ({t_make:.0f} s)")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_phantom_"))
    work.mkdir(parents=True, exist_ok=True)
    with reg.node_tmp(work / "tmp"):
        out, times = run(ph, work, args.sloppy)
    out["seconds"] = {k: round(v, 1) for k, v in times.items()}
    out["itk_threads"] = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    out["load_average"] = os.getloadavg()
    out["phantom"] = ph.params
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
