"""Compare two participant-level outputs of one subject (reproducibility, issue 17 item 4).

::

    python benchmarks/compare_runs.py OUT_A OUT_B

Prints native and modulated GM totals (from the ``label-GM_probseg`` files), the brain-mask
Dice and the number of differing voxels, the largest relative difference of the regional PET
(first float column of ``desc-pet_stats.tsv``), and how many data files (NIfTI, TSV, NPZ, ITK
``.txt``/``.h5``) are byte-identical (``.h5`` transforms: equal dataset by dataset, the HDF5
container bytes hold timestamps). Targets of issue 17: GM within 0.2 %, Dice >= 0.999,
regional PET within 0.1 %. Runs and figures: docs/preprocessing.md, "Reproducibility".
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise SystemExit(f"{root}: no file matches {pattern}")
    return found[0]


def _gm_ml(root: Path, pattern: str) -> float:
    img = nb.load(_one(root, pattern))
    return float(img.get_fdata().sum() * abs(np.linalg.det(img.affine[:3, :3])) / 1000)


def _h5_equal(f: Path, g: Path) -> bool:
    import h5py

    same = []
    with h5py.File(f) as a, h5py.File(g) as b:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                same.append(name in b and np.array_equal(obj[()], b[name][()]))

        a.visititems(visit)
    return bool(same) and all(same)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a, b = Path(argv[0]), Path(argv[1])
    for name, pat in (
        ("native GM", "sub-*/**/anat/*_label-GM_probseg.nii.gz"),
        ("modulated GM", "sub-*/**/anat/*_label-GM_desc-modulated_probseg.nii.gz"),
    ):
        x, y = _gm_ml(a, pat), _gm_ml(b, pat)
        print(f"{name}: {x:.2f} vs {y:.2f} mL, difference {100 * (y - x) / x:+.4f} %")
    m1 = nb.load(_one(a, "sub-*/**/anat/*_desc-brain_mask.nii.gz")).get_fdata() > 0
    m2 = nb.load(_one(b, "sub-*/**/anat/*_desc-brain_mask.nii.gz")).get_fdata() > 0
    dice = 2 * (m1 & m2).sum() / (m1.sum() + m2.sum())
    print(f"brain mask Dice {dice:.6f}, voxels differing {(m1 ^ m2).sum()}")
    p1 = pd.read_csv(_one(a, "sub-*/**/pet/*_desc-pet_stats.tsv"), sep="\t")
    p2 = pd.read_csv(_one(b, "sub-*/**/pet/*_desc-pet_stats.tsv"), sep="\t")
    col = [c for c in p1.columns if p1[c].dtype.kind == "f"][0]
    rel = (p2[col] - p1[col]).abs() / p1[col].abs()
    print(
        f"regional PET ({col}, {len(p1)} regions): max relative difference {100 * rel.max():.4f} %"
    )
    same, h5, diff = 0, 0, []
    for f in sorted(a.rglob("*")):
        if not f.is_file() or f.suffix not in (".gz", ".tsv", ".npz", ".h5", ".txt"):
            continue
        if "log" in f.parts or "logs" in f.parts or "figures" in f.parts:
            continue
        g = b / f.relative_to(a)
        if (
            g.is_file()
            and hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256(g.read_bytes()).digest()
        ):
            same += 1
        elif g.is_file() and f.suffix == ".h5" and _h5_equal(f, g):
            same, h5 = same + 1, h5 + 1
        else:
            diff.append(f.name)
    print(
        f"identical data files: {same} (.h5 equal dataset by dataset: {h5}); "
        f"differing: {len(diff)} {diff[:8]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
