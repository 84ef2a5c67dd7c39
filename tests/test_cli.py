"""Command line: argument handling, exit codes, dry run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bids_siamfuse import __version__
from bids_siamfuse.cli.parser import parse_args
from bids_siamfuse.cli.run import main
from bids_siamfuse.config import Settings


def run_cli(*args, capsys=None):
    code = main([str(a) for a in args])
    out = capsys.readouterr() if capsys else None
    return code, out


def test_version_console_script():
    proc = subprocess.run(
        [sys.executable, "-m", "bids_siamfuse", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert __version__ in proc.stdout


@pytest.fixture
def tiny_bids(tmp_path) -> Path:
    """A minimal BIDS folder (contents are not read before validation)."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "x", "BIDSVersion": "1.10.0"})
    )
    return root


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["{ds}", "{out}", "banana"], 17, "unknown analysis level"),
        (["{ds}", "{ds}", "participant"], 64, "must differ"),
        (["{ds}", "{ds}/sub-01/out", "participant"], 64, "inside the BIDS dataset"),
        (["{ds}", "{out}", "participant", "-w", "{ds}/work"], 64, "work directory"),
        (["{tmp}/missing", "{out}", "participant"], 66, "no such directory"),
        (["{ds}", "{out}", "participant", "--nprocs", "0"], 64, "must be 1 or more"),
        (["{ds}", "{out}", "participant", "--bogus"], 64, "unrecognized"),
        (["{ds}", "{out}", "participant", "--participant-label", "a_b"], 64, "BIDS label"),
        (["{ds}", "{out}", "participant", "--config-file", "{tmp}/no.toml"], 66, "no such"),
        (["{ds}", "{out}", "participant", "--bids-filter-file", "{tmp}/no.json"], 66, "no such"),
        (["{ds}", "{out}", "participant", "--model", "{tmp}/no.bundle"], 66, "no such file"),
        (["{ds}", "{out}", "participant", "--device", "tpu"], 64, "invalid choice"),
    ],
)
def test_exit_codes(tiny_bids, tmp_path, capsys, args, code, needle):
    fill = {"ds": tiny_bids, "out": tmp_path / "out", "tmp": tmp_path}
    got, out = run_cli(*[a.format(**fill) for a in args], capsys=capsys)
    assert got == code
    assert needle in out.err
    assert "Traceback" not in out.err
    assert len(out.err.strip().splitlines()) == 1  # one line, human-readable


def test_not_bids(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    code, out = run_cli(tmp_path / "ds", tmp_path / "out", "participant", capsys=capsys)
    assert code == 16
    assert "dataset_description.json" in out.err


def test_bad_config_and_filters(tiny_bids, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("folds = [")
    assert run_cli(tiny_bids, tmp_path / "o", "group", "--config-file", bad)[0] == 64
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("nonsense = 3\n")
    code, out = run_cli(
        tiny_bids, tmp_path / "o", "group", "--config-file", unknown, capsys=capsys
    )
    assert code == 64 and "unknown setting 'nonsense'" in out.err
    filt = tmp_path / "f.json"
    filt.write_text('{"bold": {"task": "rest"}}')
    code, out = run_cli(
        tiny_bids, tmp_path / "o", "participant", "--bids-filter-file", filt, capsys=capsys
    )
    assert code == 64 and "unknown queries" in out.err


def test_unwritable_output(synth_raw, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out = run_cli(
        synth_raw, blocker / "out", "participant", "--skip-bids-validation", capsys=capsys
    )
    assert code == 73
    assert "cannot write" in out.err


def test_config_file_then_cli(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nfolds = 7\nepochs = 9\n[execution]\nrandom_seed = 5\n")
    s = parse_args(["/d", "/o", "group", "--config-file", str(cfg), "--epochs", "3"])
    assert s.model.folds == 7  # from the file
    assert s.model.epochs == 3  # the command line wins
    assert s.execution.random_seed == 5
    assert s.execution.participant_label == []
    s2 = parse_args(["/d", "/o", "participant", "--participant_label", "sub-01", "02"])
    assert s2.execution.participant_label == ["01", "02"]


def test_settings_roundtrip(tmp_path):
    s = Settings.from_sources({}, {"bids_dir": "/d", "classes": ["CN", "MCIc"], "folds": 4})
    path = s.write(tmp_path)
    back = parse_args(["/d", "/o", "group", "--config-file", str(path)])
    assert back.model.classes == ["CN", "MCIc"]
    assert back.model.folds == 4
    assert back.execution.run_uuid != s.execution.run_uuid  # a repeat is a new run


def test_dry_run_lists_pairs(synth_raw, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out = run_cli(synth_raw, out_dir, "participant", "--dry-run", capsys=capsys)
    assert code == 0, out.err
    pets = sorted(synth_raw.glob("sub-*/ses-*/pet/*_pet.nii.gz"))
    assert len(pets) == 3
    for pet in pets:
        assert str(pet) in out.out
        t1w = pet.parent.parent / "anat" / pet.name.replace("_trc-FDG_pet", "_T1w")
        assert str(t1w) in out.out
    assert "3 PET/T1w pair(s)" in out.out
    assert not out_dir.exists()  # a dry run writes nothing


def test_dry_run_filters(synth_raw, tmp_path, capsys):
    two = [p.parent.name for p in synth_raw.glob("sub-*/ses-02")]
    assert len(two) == 1
    code, out = run_cli(
        synth_raw,
        tmp_path / "o",
        "participant",
        "--dry-run",
        "--participant-label",
        two[0],
        "--session-label",
        "02",
        "--skip-bids-validation",
        capsys=capsys,
    )
    assert code == 0
    assert "1 PET/T1w pair(s)" in out.out and f"{two[0]} ses-02" in out.out
    code, out = run_cli(
        synth_raw,
        tmp_path / "o",
        "participant",
        "--dry-run",
        "--participant-label",
        "042",
        capsys=capsys,
    )
    assert code == 18 and "sub-042" in out.err
    code, out = run_cli(
        synth_raw,
        tmp_path / "o",
        "participant",
        "--dry-run",
        "--tracer-label",
        "PiB",
        "--skip-bids-validation",
        capsys=capsys,
    )
    assert code == 18


def test_invalid_bids_is_16(synth_raw, tmp_path, capsys):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(synth_raw, ds, ignore=shutil.ignore_patterns("derivatives"))
    (ds / "sub-001" / "ses-01" / "anat" / "sub-001_ses-01_T1wXX.nii.gz").write_bytes(b"x")
    code, out = run_cli(ds, tmp_path / "o", "participant", "--dry-run", capsys=capsys)
    assert code == 16
    assert "not valid BIDS" in out.err


def test_unusable_pair_is_refused(synth_raw, tmp_path, capsys):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(synth_raw, ds, ignore=shutil.ignore_patterns("derivatives"))
    sidecar = sorted(ds.glob("sub-*/ses-01/pet/*_pet.json"))[0]
    meta = json.loads(sidecar.read_text())
    meta["FrameDuration"] = [600, 600, 600]
    meta["FrameTimesStart"] = [0, 600, 1200]
    sidecar.write_text(json.dumps(meta))
    sub = sidecar.name.split("_")[0]
    code, out = run_cli(ds, tmp_path / "o", "participant", "--dry-run", capsys=capsys)
    assert code == 0  # the other pairs can still run
    assert "refused" in out.out and "lists 3 frame(s), the image has 1" in out.out
    code, out = run_cli(
        ds,
        tmp_path / "o",
        "participant",
        "--dry-run",
        "--session-label",
        "01",
        "--participant-label",
        sub,
        capsys=capsys,
    )
    assert code == 65
    code, out = run_cli(
        ds,
        tmp_path / "o",
        "participant",
        "--session-label",
        "01",
        "--participant-label",
        sub,
        "--skip-bids-validation",
        capsys=capsys,
    )
    assert code == 65 and sidecar.name.replace(".json", ".nii.gz") in out.err
    assert not (tmp_path / "o").exists()
