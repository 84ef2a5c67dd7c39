"""Are two output trees the same, provenance aside? (the redesign check of DEVELOPERS.md)

Usage::

    python benchmarks/compare_outputs.py BEFORE AFTER [SUBDIR ...]

BEFORE/AFTER hold the same runs made by two versions of the code (e.g. a participant run in
``part/`` and a group run in ``grp/derivatives/bids_siamfuse``: the default SUBDIRs). Work
folders (``work*``) and per-run log files (run id in the name) are skipped. NIfTI files are
compared decompressed (gzip headers carry mtimes), ``.h5`` transforms dataset by dataset (the
HDF5 container bytes change from run to run), JSON parsed with provenance keys dropped, text
(HTML, SVG, TSV logs, Markdown) with dates, run ids, paths, timings and matplotlib's random SVG
ids masked. Every other file is compared byte for byte. Prints one line per difference; exit 1
if there is any.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

PROVENANCE = {
    "created", "content_sha256", "attention_seconds", "siamese_seconds", "run_uuid",
    "bids_dir", "work_dir", "output_dir", "timing_s", "GeneratedBy", "DateCreated",
    "DatasetLinks", "SourceDatasets", "Date", "RunId", "Duration", "duration", "elapsed",
}  # fmt: skip
VOLATILE = re.compile(
    r"\d{8}-\d{6}_[0-9a-f]{8}"  # run ids
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # uuids
    r"|#?(p|image)[0-9a-f]{10}\b"  # matplotlib's SVG clip/image ids
    r"|\d{4}-\d\d-\d\d[T ]?[\d:.]*|\d{6}-\d\d:\d\d:\d\d"  # dates, log stamps
    r"|Timing \(s\):[^<]*|&#34;(run_uuid|\w+_dir)&#34;: &#34;[^&]*&#34;"
    r"|\d+(\.\d+)? ?(s|min|ms)\b|\b\d+m\d+s\b|/\S*/out-\w+|/tmp/\S+"
)
TEXT = {".html", ".md", ".txt", ".log", ".toml", ".svg"}
DEFAULT_SUBDIRS = ("part", "grp/derivatives/bids_siamfuse")


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in PROVENANCE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _h5(path: Path) -> list:
    import h5py
    import numpy as np

    out = []
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                value = np.asarray(obj[()])
                out.append(
                    (name, str(value.tolist()) if value.dtype == object else value.tobytes())
                )

        f.visititems(visit)
    return out


def content(path: Path):
    """What of ``path`` must not change between two versions of the code."""
    if path.suffix == ".h5":
        return _h5(path)
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if path.suffix == ".json":
        try:
            return json.dumps(_strip(json.loads(path.read_text())), sort_keys=True)
        except ValueError:
            return path.read_bytes()
    if path.suffix in TEXT or "logs" in path.parts:
        return VOLATILE.sub("<V>", path.read_text(errors="replace"))
    return path.read_bytes()


def files(root: Path, subdirs) -> dict[str, Path]:
    out = {}
    for sub in subdirs:
        for path in (root / sub).rglob("*"):
            rel = path.relative_to(root)
            if not path.is_file() or any(part.startswith("work") for part in rel.parts):
                continue
            if "logs" in rel.parts and re.search(r"\d{8}-\d{6}", path.name):
                continue  # per-run log files carry the run id in their names
            out[str(rel)] = path
    return out


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(
            __doc__.strip().splitlines()[0], "usage: compare_outputs.py BEFORE AFTER [SUBDIR ...]"
        )
        return 64
    a, b = Path(args[0]), Path(args[1])
    subdirs = args[2:] or DEFAULT_SUBDIRS
    fa, fb = files(a, subdirs), files(b, subdirs)
    bad = 0
    for key in sorted(set(fa) | set(fb)):
        if key not in fa or key not in fb:
            print(f"only in {a if key in fa else b}: {key}")
            bad += 1
        elif content(fa[key]) != content(fb[key]):
            print(f"differs: {key}")
            bad += 1
    print(f"{len(fa)} vs {len(fb)} files, {bad} difference(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
