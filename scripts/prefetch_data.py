#!/usr/bin/env python3
"""Put the MNI templates where bids_siamfuse finds them offline, and check the atlas.

Used by the Dockerfile at build time, and usable on a cluster login node before jobs run
without network (``python scripts/prefetch_data.py --templateflow-home DIR``, then export
``TEMPLATEFLOW_HOME`` in the jobs). Needs the ``templateflow`` package (a dependency of
niworkflows, so installed with bids_siamfuse) only for downloads.

* The AAL atlas (SPM8 release) ships inside the package (``bids_siamfuse/data/aal/``): nothing
  to fetch; the check below loads it.
* TemplateFlow ``tpl-MNI152NLin2009aSym`` res-1 T1w, brain mask and GM/WM/CSF probsegs: copied
  from ``--templateflow-seed`` (a prefetched TemplateFlow home) when it holds them, otherwise
  downloaded with ``templateflow.api.get``. ``--templateflow auto`` (default) tolerates a
  failed download: bids_siamfuse then uses nilearn's packaged ICBM152 2009a maps
  (``bids_siamfuse.data.templates``); ``yes`` makes it fatal; ``no`` skips it. Either way the
  TemplateFlow home gets its skeleton, so ``import templateflow`` never writes at run time.

Finally the package's own loaders are run once (``load_atlas``, ``load_template``) to prove the
data resolve offline, a manifest (what is where, SHA-256, which template source is in use) is
written, and everything is made readable by any user.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

SPACE = "MNI152NLin2009aSym"
# query for templateflow.api.get -> file name that bids_siamfuse.data.templates looks for
TEMPLATE_FILES = {
    "T1w": ({"suffix": "T1w", "desc": None}, f"tpl-{SPACE}_res-1_T1w.nii.gz"),
    "mask": ({"suffix": "mask", "desc": "brain"}, f"tpl-{SPACE}_res-1_desc-brain_mask.nii.gz"),
    "GM": ({"suffix": "probseg", "label": "GM"}, f"tpl-{SPACE}_res-1_label-GM_probseg.nii.gz"),
    "WM": ({"suffix": "probseg", "label": "WM"}, f"tpl-{SPACE}_res-1_label-WM_probseg.nii.gz"),
    "CSF": ({"suffix": "probseg", "label": "CSF"}, f"tpl-{SPACE}_res-1_label-CSF_probseg.nii.gz"),
}


def log(message: str) -> None:
    print(f"prefetch: {message}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _real_nifti(path: Path) -> bool:
    """A complete, loadable 3-D image (not an empty placeholder, not a partial download)."""
    if not path.is_file() or path.stat().st_size <= 1024:
        return False
    try:
        import nibabel as nb
        import numpy as np

        img = nb.load(str(path))
        data = np.asanyarray(img.dataobj)
        return data.ndim == 3 and bool(np.isfinite(data).all())
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def fetch_templateflow(home: Path, seed: Path | None, mode: str) -> dict:
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
    home.mkdir(parents=True, exist_ok=True)
    import templateflow.conf as tfconf  # lays out the skeleton (no download)

    tfconf._cache.ensure()
    folder = home / f"tpl-{SPACE}"
    folder.mkdir(parents=True, exist_ok=True)
    status = {}
    for kind, (_, name) in TEMPLATE_FILES.items():
        source = seed / f"tpl-{SPACE}" / name if seed is not None else None
        if source is not None and _real_nifti(source) and not _real_nifti(folder / name):
            log(f"TemplateFlow: copying {source}")
            shutil.copyfile(source, folder / name)
        status[kind] = _real_nifti(folder / name)
    missing = [kind for kind, ok in status.items() if not ok]
    if missing and mode != "no":
        from templateflow import api

        for kind in missing:
            query, name = TEMPLATE_FILES[kind]
            try:
                api.get(SPACE, resolution=1, extension=".nii.gz", raise_empty=True, **query)
            except Exception as exc:  # noqa: BLE001 - network errors of every kind
                why = f"{type(exc).__name__}: {str(exc)[:160]}"
                log(f"TemplateFlow: {name} not downloaded ({why})")
            status[kind] = _real_nifti(folder / name)
            if not status[kind] and (folder / name).exists():
                (folder / name).write_bytes(b"")  # back to the skeleton's empty placeholder
    missing = [kind for kind, ok in status.items() if not ok]
    if missing and mode == "yes":
        raise SystemExit(f"prefetch: error: TemplateFlow files missing: {', '.join(missing)}")
    if missing:
        log(
            f"TemplateFlow: {', '.join(missing)} unavailable; bids_siamfuse will use nilearn's "
            "packaged ICBM152 2009a maps"
        )
    files = {}
    for kind, (_, name) in TEMPLATE_FILES.items():
        if status[kind]:
            files[kind] = {"path": str(folder / name), "sha256": sha256(folder / name)}
    return files


def verify() -> dict:
    """Run the package's own loaders, offline, exactly as a participant run will."""
    from bids_siamfuse.data import atlas, templates

    aal = atlas.load_atlas()
    if aal.n_regions != 116:
        raise SystemExit(f"prefetch: error: AAL has {aal.n_regions} regions, expected 116")
    for kind in ("T1w", "GM", "WM", "CSF", "mask"):
        templates.load_template(kind)
    return {
        "atlas_source": aal.source,
        "atlas_signature": aal.signature()["labels_digest"],
        "template_source": templates.template_source(),
    }


def make_readable(*roots: Path) -> None:
    """Directories a+rx, files a+r: the image runs as any uid."""
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = path.stat().st_mode
            extra = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
            if path.is_dir():
                extra |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
            path.chmod(mode | extra)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--templateflow-home", type=Path, required=True, help="TEMPLATEFLOW_HOME")
    parser.add_argument("--templateflow-seed", type=Path, help="a prefetched TemplateFlow home")
    parser.add_argument("--templateflow", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--manifest", type=Path, help="write what was prefetched here (JSON)")
    parser.add_argument("--no-verify", action="store_true", help="skip the bids_siamfuse check")
    args = parser.parse_args(argv)

    manifest = {}
    manifest["templateflow"] = fetch_templateflow(
        args.templateflow_home.absolute(), args.templateflow_seed, args.templateflow
    )
    if not args.no_verify:
        manifest.update(verify())
    make_readable(args.templateflow_home.absolute())
    text = json.dumps(manifest, indent=2, sort_keys=True)
    if args.manifest:
        args.manifest.parent.mkdir(parents=True, exist_ok=True)
        args.manifest.write_text(text + "\n")
        args.manifest.chmod(0o644)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
