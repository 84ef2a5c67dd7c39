"""BIDS-valid derivatives and NiPreps CLI parity (issue 13).

The validator runs on the ``--preprocessed`` synthetic derivatives and on a group output here,
on the participant output in ``tests/test_participant.py``. Every NiPreps flag is exercised
cheaply: ``--dry-run``, ``--boilerplate-only``, graph building, helpers on fake nodes; nothing
here runs the preprocessing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from bids_siamfuse import bids
from bids_siamfuse.cli.run import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args, **hooks) -> int:
    """``main`` on ``args``; ``hooks``: its ``fit``/``model_cls`` (the model double)."""
    return main([str(a) for a in args], **hooks)


# ----------------------------------------------------------------------------------------------
# BIDS-valid derivatives
# ----------------------------------------------------------------------------------------------


def test_synthetic_derivatives_are_valid_bids(tmp_path, bids_validator):
    """``bids_siamfuse-synth DS --n-per-group 1 --groups CN --seed 0 --preprocessed
    --skip-raw``: its DS/derivatives/bids_siamfuse passes the validator."""
    from bids_siamfuse.synth import main as synth_main

    ds = tmp_path / "ds"
    args = ["--n-per-group", "1", "--groups", "CN", "--seed", "0", "--preprocessed"]
    assert synth_main([str(ds), *args, "--skip-raw"]) in (0, None)
    out = ds / "derivatives" / "bids_siamfuse"
    code, issues, errors = bids_validator(out)
    assert code == 0, errors
    assert {c for c, sev in issues if sev == "warning"} <= {"TOO_FEW_AUTHORS"}
    pet = json.loads(next(out.rglob("*_desc-preproc_pet.json")).read_text())
    assert pet["SkullStripped"] is False
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"]["raw"] == "../.."  # the raw dataset is a parent: relative


def test_group_output_is_valid_bids(synth_derivs, tmp_path, bids_validator, monkeypatch):
    """A group run (the fast model double) and a --model-only application leave a valid
    derivatives folder."""
    import model_double as md

    double = {"fit": md.fit, "model_cls": md.FittedModel}  # main's typed hooks, no patching
    ds = tmp_path / "ds"
    ds.mkdir()
    for name in ("participants.tsv", "dataset_description.json"):
        shutil.copy(synth_derivs / name, ds / name)
    src = synth_derivs / "derivatives" / "bids_siamfuse"
    out = tmp_path / "out"  # not under the dataset: the link is the path given
    for f in src.rglob("*_regions.*"):
        target = out / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    monkeypatch.setattr(bids.dataset, "_DOCKERENV", tmp_path / "no-dockerenv")
    monkeypatch.delenv(bids.HOST_BIDS_DIR_ENV, raising=False)
    args = ["--classes", "CN", "AD", "--folds", "3", "--sloppy", "-q"]
    assert run(ds, out, "group", *args, **double) == 0
    subject = sorted(p.name for p in out.glob("sub-*"))[0]
    task = out / "group" / "CN_vs_AD"
    args = ["--model", task, "--model-only", "--participant-label", subject[4:], "-q"]
    assert run(ds, out, "participant", *args, **double) == 0
    assert list(out.glob(f"{subject}/**/*_probs.tsv"))
    code, issues, errors = bids_validator(out)
    assert code == 0, errors
    assert {c for c, sev in issues if sev == "warning"} <= {"TOO_FEW_AUTHORS"}
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"]["raw"] == str(ds)
    assert "Container" not in desc["GeneratedBy"][0]


def test_dataset_description_source_and_container(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text('{"DatasetDOI": "doi:10.1/x"}')
    nested = raw / "derivatives" / "bids_siamfuse"
    outside = tmp_path / "elsewhere" / "out"
    monkeypatch.delenv(bids.HOST_BIDS_DIR_ENV, raising=False)
    for var in ("APPTAINER_NAME", "SINGULARITY_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(bids.dataset, "_DOCKERENV", tmp_path / "no-dockerenv")
    # outside a container: relative when the raw dataset is a parent, else the path given
    desc = bids.dataset_description(raw, nested)
    assert desc["DatasetLinks"] == {"raw": "../.."}
    assert desc["SourceDatasets"] == [{"URL": "../..", "DOI": "doi:10.1/x"}]
    assert bids.dataset_description(raw, outside)["DatasetLinks"] == {"raw": str(raw)}
    assert "Container" not in desc["GeneratedBy"][0]
    # Docker: the mount point means nothing outside, so no link unless the host path is given
    (tmp_path / "dockerenv").write_text("")
    monkeypatch.setattr(bids.dataset, "_DOCKERENV", tmp_path / "dockerenv")
    desc = bids.dataset_description(Path("/data"), Path("/out"))
    assert desc["GeneratedBy"][0]["Container"]["Type"] == "docker"
    assert "DatasetLinks" not in desc and "SourceDatasets" not in desc
    assert bids.dataset_description(raw, nested)["DatasetLinks"] == {"raw": "../.."}
    monkeypatch.setenv(bids.HOST_BIDS_DIR_ENV, "/home/me/study")
    desc = bids.dataset_description(Path("/data"), Path("/out"))
    assert desc["DatasetLinks"] == {"raw": "/home/me/study"}
    # Apptainer: its own variables
    monkeypatch.setattr(bids.dataset, "_DOCKERENV", tmp_path / "no-dockerenv")
    monkeypatch.setenv("APPTAINER_NAME", "bids_siamfuse.sif")
    container = bids.dataset_description(raw, nested)["GeneratedBy"][0]["Container"]
    assert container == {"Type": "apptainer", "Tag": "bids_siamfuse.sif"}


def test_bidsignore_keeps_user_lines(tmp_path):
    (tmp_path / ".bidsignore").write_text("extra/\n")
    bids.ensure_bidsignore(tmp_path)
    lines = (tmp_path / ".bidsignore").read_text().splitlines()
    assert lines[0] == "extra/" and set(bids.BIDSIGNORE) <= set(lines)
    bids.ensure_bidsignore(tmp_path)  # idempotent
    assert (tmp_path / ".bidsignore").read_text().splitlines() == lines


def test_outputs_table_names():
    """The PET motion table is not read as BIDS' motion datatype; preprocessed images say
    SkullStripped."""
    assert bids.output_path(
        Path("o"), "pet_confounds", {"subject": "1", "tracer": "FDG"}
    ).name == ("sub-1_trc-FDG_desc-confounds_timeseries.tsv")
    for key in ("t1w_preproc", "t1w_mni", "pet_mni"):
        assert bids.output_meta(key, {"a": 1}) == {"SkullStripped": False, "a": 1}
    assert bids.output_meta("regions", None) is None


# ----------------------------------------------------------------------------------------------
# NiPreps flags
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_ds(synth_raw, tmp_path_factory) -> Path:
    """A private copy of the two-subject raw cohort (no derivatives)."""
    dst = tmp_path_factory.mktemp("nipreps") / "ds"
    shutil.copytree(synth_raw, dst, ignore=shutil.ignore_patterns("derivatives"))
    return dst


def test_help_lists_nipreps_flags(capsys):
    assert run("--help") == 0
    text = capsys.readouterr().out
    for group in (
        "Options for filtering BIDS queries",
        "Options to handle performance",
        "Options for performing only a subset of the workflow",
        "Workflow configuration",
        "Other options",
    ):
        assert group in text
    for flag in (
        "--notrack",
        "--bids-database-dir",
        "--boilerplate-only",
        "--clean-workdir",
        "--low-mem",
        "--write-graph",
        "--resource-monitor",
    ):
        assert flag in text
    assert "./work" in text  # the work folder's default location is stated


def test_notrack_is_accepted(raw_ds, tmp_path, capsys):
    args = [raw_ds, tmp_path / "out", "participant", "--dry-run", "--skip-bids-validation"]
    assert run(*args, "--notrack") == 0
    assert "pair(s) to process" in capsys.readouterr().out


def test_validation_limited_to_selected_participants(raw_ds, tmp_path, bids_validator, capsys):
    """An invalid file in sub-002 fails validation of the dataset (16) but not of a run
    restricted to sub-001; --skip-bids-validation skips it."""
    ds = tmp_path / "ds"
    shutil.copytree(raw_ds, ds, symlinks=True)
    (ds / "sub-002" / "not_bids.txt").write_text("x")
    out = tmp_path / "out"
    assert run(ds, out, "participant", "--dry-run") == 16
    assert "not valid BIDS" in capsys.readouterr().err
    assert run(ds, out, "participant", "--dry-run", "--participant-label", "001") == 0
    assert run(ds, out, "participant", "--dry-run", "--skip-bids-validation") == 0


def test_validator_found_beside_the_interpreter(tmp_path, monkeypatch):
    """A venv's bin/bids_siamfuse run without activating the venv still finds the validator."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    exe = venv_bin / "bids-validator-deno"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert bids.find_validator() == str(exe)
    exe.unlink()
    assert bids.find_validator() is None


def test_bids_database_dir_is_reused(raw_ds, tmp_path):
    db = tmp_path / "db"
    args = [raw_ds, tmp_path / "out", "participant", "--dry-run", "--skip-bids-validation"]
    assert run(*args, "--bids-database-dir", db) == 0
    index = db / "layout_index.sqlite"
    assert index.is_file()
    stamp = index.stat().st_mtime_ns
    assert run(*args, "--bids-database-dir", db) == 0
    assert index.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert [p.name for p in db.iterdir()] == ["layout_index.sqlite"]  # no private leftovers
    other = tmp_path / "other"
    shutil.copytree(raw_ds, other, symlinks=True)
    assert run(other, tmp_path / "out2", "participant", "--dry-run", "--skip-bids-validation",
               "--bids-database-dir", db) == 64  # fmt: skip


def test_boilerplate_only_and_resolved_threads(raw_ds, tmp_path):
    """--boilerplate-only writes the methods text and processes nothing; the settings file
    records the thread counts used, not 0."""
    out = tmp_path / "out"
    code = run(raw_ds, out, "participant", "--boilerplate-only", "--skip-bids-validation")
    assert code == 0
    text = (out / "logs" / "CITATION.md").read_text()
    assert "bids_siamfuse" in text and "PET" in text
    assert not list(out.glob("sub-*/**/*.nii.gz"))
    import tomllib

    config = tomllib.loads(next((out / "logs").glob("config-*.toml")).read_text())
    ex = config["execution"]
    assert ex["nprocs"] == os.cpu_count() and ex["omp_nthreads"] == min(8, os.cpu_count())
    assert ex["boilerplate_only"] is True


@pytest.fixture(scope="module")
def workflow_and_plan(raw_ds, tmp_path_factory):
    from bids_siamfuse.cli.run import plan_participants
    from bids_siamfuse.config import Settings
    from bids_siamfuse.workflows.base import init_bids_siamfuse_wf
    from bids_siamfuse.workflows.common import ParticipantOptions

    root = tmp_path_factory.mktemp("graph")
    settings = Settings.from_sources(
        {}, {"bids_dir": raw_ds, "output_dir": root / "out", "skip_bids_validation": True}
    )
    plan = plan_participants(settings)
    options = ParticipantOptions(output_dir=root / "out", bids_dir=raw_ds)
    wf = init_bids_siamfuse_wf(plan=plan, options=options, work_dir=root / "work", run_uuid="test")
    return wf, plan, root


def test_write_graph(workflow_and_plan):
    from bids_siamfuse.participant import write_workflow_graph

    wf, plan, root = workflow_and_plan
    written = write_workflow_graph(wf, root / "out" / "logs", "test")
    dot = root / "out" / "logs" / "workflow-test.dot"
    assert dot in written
    text = dot.read_text()
    assert text.startswith("digraph") and "->" in text
    assert "ds_regions" in text and "single_subject_001_wf" in text


def test_low_mem_budget(workflow_and_plan):
    from bids_siamfuse.config import ExecutionSettings
    from bids_siamfuse.participant import LOW_MEM_MARGIN_GB, low_mem_args

    wf = workflow_and_plan[0]
    heaviest = max(n.mem_gb for n in wf._get_all_nodes())
    assert low_mem_args(ExecutionSettings(), wf) == {}
    assert low_mem_args(ExecutionSettings(low_mem=True), wf) == {
        "memory_gb": heaviest + LOW_MEM_MARGIN_GB
    }
    capped = low_mem_args(ExecutionSettings(low_mem=True, mem_mb=1024), wf)
    assert capped == {"memory_gb": 1.0}


class _Runtime:
    startTime, endTime, duration, mem_peak_gb = "t0", "t1", 2.5, 0.7


class _Node:
    def __init__(self, hierarchy, name, mem_gb=0.2, result=True):
        self._hierarchy, self.name, self.mem_gb = hierarchy, name, mem_gb
        if result:
            self.result = type("R", (), {"runtime": _Runtime()})()


def test_resource_monitor_and_progress(workflow_and_plan, tmp_path):
    """--resource-monitor writes one JSON line per finished step; the progress callback
    counts pairs and steps, and gives an ETA."""
    from bids_siamfuse import progress
    from bids_siamfuse.config import ExecutionSettings
    from bids_siamfuse.participant import run_callbacks

    wf, plan, _ = workflow_and_plan
    ex = ExecutionSettings(resource_monitor=True, run_uuid="t")
    callbacks = run_callbacks(ex, wf, plan, tmp_path)
    kinds = [type(c).__name__ for c in callbacks.callbacks]
    assert kinds == ["Progress", "ResourceLog"]
    prog = callbacks.callbacks[0]
    assert len(prog.groups) == len(plan.pairs) and prog.total > 10
    clock = iter(range(100, 10000, 10))
    prog.clock, prog.start = lambda: next(clock), 100
    first = plan.pairs[0]
    key, (subject_wf, anat_wf, pet_wf, n_steps) = first.key, prog.groups[first.key]
    for i in range(n_steps):
        wfname = anat_wf if i % 2 else pet_wf
        node = _Node(f"bids_siamfuse_wf.{subject_wf}.{wfname}", f"step{i}")
        callbacks(node, "start")
        callbacks(node, "end")
    callbacks.callbacks[1].close()
    assert prog.finished == [key]
    line = prog.line()
    assert f"1/{len(plan.pairs)} pair(s) done" in line and "ETA" in line
    records = [json.loads(x) for x in (tmp_path / "logs" / "resources-t.jsonl").open()]
    assert len(records) == n_steps and records[0]["duration_s"] == 2.5
    status = [{"status": "ok"}, {"status": "failed"}]
    summary = progress.run_summary(status, started=time.time() - 5, output_dir=tmp_path,
                                   work_dir=tmp_path)  # fmt: skip
    assert summary.startswith("summary: 2 pair(s): 1 ok, 1 failed, 0 flagged; wall time 0m0")


def test_clean_workdir_removes_only_this_runs_folders(tmp_path):
    from bids_siamfuse.participant import clean_work_dir

    work = tmp_path / "work"
    top = work / "bids_siamfuse_wf"
    for sub in ("001", "002"):
        (top / f"single_subject_{sub}_wf" / "anat_wf").mkdir(parents=True)
    (top / "d3.js").write_text("")
    pairs = lambda *subs: type("P", (), {"pairs": [type("X", (), {"subject": s}) for s in subs]})  # noqa: E731
    clean_work_dir(work, pairs("001"))
    assert sorted(p.name for p in top.iterdir()) == ["d3.js", "single_subject_002_wf"]
    clean_work_dir(work, pairs("002"))
    assert not work.exists()


def test_unwritable_output_fails_at_once(raw_ds, tmp_path, capsys):
    """`docker run bids_siamfuse /data /out participant` with a root-owned /out: exit 73
    before validation or indexing, in under a second. As root (chmod does not stop root)
    the unwritable folder is one under /proc."""
    if os.geteuid() == 0:
        out = Path("/proc/bids_siamfuse_test/out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        out = locked / "out"
    t0 = time.perf_counter()
    code = run(raw_ds, out, "participant")  # validation not skipped: it would take seconds
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 73, err
    assert seconds < 1.0, seconds
    assert err.count("\n") == 1 and "cannot write to" in err and "uid" in err


def test_reportlet_compression_keeps_the_picture():
    """Straight runs merge, curves stay; an embedded PNG becomes a smaller WebP of the same
    pixels (lossless when not downsampled)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from bids_siamfuse.reports import compress

    path = "M 0 0 L 1 0 L 2 0 L 3 0 L 3 1 L 3 2 z M 5.123456 5 L 6 5"
    assert compress.simplify_path(path) == "M 0 0 L 3 0 L 3 2 z M 5.1 5 L 6 5"
    assert compress.simplify_path("M 0 0 C 1 1 2 2 3 3") == "M 0 0 C 1 1 2 2 3 3"
    pixels = np.zeros((60, 80, 4), np.uint8)
    pixels[..., 3] = 255
    pixels[10:50, 20:60, :3] = 200
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    uri = base64.b64encode(buf.getvalue()).decode()
    svg = f'<svg><image width="80" height="60" xlink:href="data:image/png;base64,{uri}"/></svg>'
    out = compress.compress_svg_text(svg)
    assert "image/webp" in out and len(out) < len(svg)
    webp = base64.b64decode(out.split("base64,")[1].split('"')[0])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(webp)).convert("RGBA")), pixels)
