#!/usr/bin/env python3
"""Check a bids_siamfuse container from the inside: offline data, writable places, engines.

Run it in the image with the same flags as a real run, e.g. (read-only root, no network):

    docker run --rm --read-only --tmpfs /tmp --network none -v "$PWD/scripts:/checks:ro" \
        -v /scratch/work:/work --entrypoint python3 bids_siamfuse:dev \
        /checks/container_check.py /work
    apptainer exec --cleanenv --containall -B scripts:/checks:ro -B /scratch/work:/work \
        bids_siamfuse.sif python3 /checks/container_check.py /work

It prints one JSON report and exits 1 if a check failed. Checks: the AAL atlas and the
templates resolve offline through the package; $HOME, matplotlib's and nipype's config
folders and the temporary folder are writable; nothing else outside WORK_DIR is (when the
root file system is read-only); a two-node nipype MultiProc workflow runs in WORK_DIR; an
antspyx rigid registration, a torch training step and a matplotlib figure work; no socket
can reach the internet (reported, not required).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path


def _writable(folder: str | Path) -> bool:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _double(x):
    return 2 * x


def check_nipype(work: Path) -> dict:
    from nipype import Node, Workflow, logging
    from nipype import config as nipype_config
    from nipype.interfaces.utility import Function

    nipype_config.set("logging", "workflow_level", "WARNING")  # keep stdout for the report
    logging.update_logging(nipype_config)

    wf = Workflow(name="container_check", base_dir=str(work))
    first = Node(Function(input_names=["x"], output_names=["y"], function=_double), name="a")
    second = Node(Function(input_names=["x"], output_names=["y"], function=_double), name="b")
    first.inputs.x = 3
    wf.connect(first, "y", second, "x")
    wf.config["execution"]["crashdump_dir"] = str(work / "crash")
    graph = wf.run(plugin="MultiProc", plugin_args={"n_procs": 2})
    result = [n for n in graph.nodes() if n.name == "b"][0].result.outputs.y
    config_dir = os.path.dirname(nipype_config.data_file)
    return {"ok": result == 12, "config_dir": config_dir, "config_writable": _writable(config_dir)}


def check_ants() -> dict:
    import ants
    import numpy as np

    from bids_siamfuse.data.templates import load_template

    img = load_template("T1w")
    data = np.asanyarray(img.dataobj, dtype=np.float32)[::4, ::4, ::4]
    fixed = ants.from_numpy(data, spacing=(4.0, 4.0, 4.0))
    moving = ants.from_numpy(np.roll(data, 2, axis=0), spacing=(4.0, 4.0, 4.0))
    start = time.time()
    reg = ants.registration(fixed, moving, type_of_transform="Rigid")
    return {"ok": bool(reg["fwdtransforms"]), "seconds": round(time.time() - start, 2)}


def check_torch() -> dict:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return {
        "ok": bool(torch.isfinite(loss)),
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }


def check_matplotlib(work: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = work / "container_check.png"
    fig.savefig(out)
    plt.close(fig)
    return {
        "ok": out.stat().st_size > 0,
        "configdir": matplotlib.get_configdir(),
        "cachedir": matplotlib.get_cachedir(),
        "configdir_writable": _writable(matplotlib.get_configdir()),
    }


def check_data() -> dict:
    from bids_siamfuse.data import atlas, templates

    aal = atlas.load_atlas()
    for kind in ("T1w", "GM", "WM", "CSF", "mask"):
        templates.load_template(kind)
    manifest = Path("/opt/data/prefetch.json")  # written by scripts/prefetch_data.py
    return {
        "ok": aal.n_regions == 116,
        "atlas_source": aal.source,
        "template_source": templates.template_source(),
        "manifest": json.loads(manifest.read_text()) if manifest.is_file() else None,
    }


def check_write_confinement(work: Path) -> dict:
    """Which candidate folders accept a file (a read-only root should refuse all but these)."""
    candidates = ["/", "/opt", "/opt/venv", "/opt/data", "/usr/local", "/var/tmp", "/home"]
    writable = [c for c in candidates if os.path.isdir(c) and _writable(c)]
    return {
        "ok": True,
        "read_only_root": not _writable("/"),
        "writable_outside_work_tmp_home": writable,
        "home": os.environ.get("HOME"),
        "home_writable": _writable(os.path.expanduser("~")),
        "tmp": tempfile.gettempdir(),
        "tmp_writable": _writable(tempfile.gettempdir()),
        "work_writable": _writable(work),
        "uid": os.getuid(),
    }


def check_network() -> dict:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        reachable = True
    except OSError:
        reachable = False
    return {"ok": True, "internet_reachable": reachable}


def main(argv: list[str]) -> int:
    work = Path(argv[1] if len(argv) > 1 else tempfile.mkdtemp()).absolute()
    work.mkdir(parents=True, exist_ok=True)
    checks = {
        "confinement": lambda: check_write_confinement(work),
        "data": check_data,
        "matplotlib": lambda: check_matplotlib(work),
        "nipype": lambda: check_nipype(work),
        "ants": check_ants,
        "torch": check_torch,
        "network": check_network,
    }
    report, failed = {}, []
    for name, check in checks.items():
        start = time.time()
        try:
            report[name] = check()
        except Exception as exc:  # noqa: BLE001 - report every failure, keep checking
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        report[name]["elapsed_s"] = round(time.time() - start, 2)
        if not report[name]["ok"]:
            failed.append(name)
    report["failed"] = failed
    print(json.dumps(report, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
