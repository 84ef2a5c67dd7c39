"""Reliability and security, round 2 (issue 14): settings from every source, header screening,
region files and bundles, per-pair isolation, the guarded scheduler (no hangs, disk full,
cancelled branches, no tracebacks), signals, work folders, sanitized SVG, Dockerfile checksums.

docs/reliability.md lists each case with its test. Cheap variants run by default (toy nipype
workflows of sleeping nodes stand in for the real one where the property is the scheduler's);
the real participant runs are ``slow``.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_siamfuse import bids, checks
from bids_siamfuse.cli.run import main
from bids_siamfuse.errors import CannotWriteError, DataError, UsageError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("bids_siamfuse: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def tiny_ds(tmp_path) -> Path:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    return root


def make_pair_ds(root: Path, subjects=("01",), *, t1w_shape=(64, 64, 64), t1w_mm=2.0) -> Path:
    """A small valid BIDS dataset: per subject one T1w and one FDG PET (with sidecar)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    rng = np.random.default_rng(0)
    for sub in subjects:
        ses = root / f"sub-{sub}" / "ses-01"
        (ses / "anat").mkdir(parents=True)
        (ses / "pet").mkdir(parents=True)
        t1w = rng.random(t1w_shape).astype(np.float32) + 0.5
        nb.Nifti1Image(t1w, np.diag([t1w_mm] * 3 + [1])).to_filename(
            ses / "anat" / f"sub-{sub}_ses-01_T1w.nii.gz"
        )
        pet = rng.random((40, 40, 40)).astype(np.float32) + 0.5
        nb.Nifti1Image(pet, np.diag([3.0, 3.0, 3.0, 1])).to_filename(
            ses / "pet" / f"sub-{sub}_ses-01_trc-FDG_pet.nii.gz"
        )
        (ses / "pet" / f"sub-{sub}_ses-01_trc-FDG_pet.json").write_text(
            json.dumps(
                {"FrameTimesStart": [0], "FrameDuration": [600], "Units": "Bq/mL"}, indent=1
            )
        )
    return root


# ----------------------------------------------------------------------------------------------
# 1. settings: one validation whatever the source
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("nprocs = -2", "nprocs"),
        ("omp_nthreads = -1", "omp_nthreads"),
        ("[model]\nbatch_size = 0", "batch_size"),
        ("val_fraction = 5", "val_fraction"),
        ("learning_rate = -0.001", "learning_rate"),
        ('pairing = "sometimes"', "pairing"),
        ('tracer_label = "../../etc"', "tracer_label"),
        ("mem_mb = 8", "mem_mb"),
        ("folds = 2.5", "folds"),
        ('device = "tpu"', "device"),
    ],
)
def test_config_file_values_are_validated(tiny_ds, tmp_path, capsys, toml, key):
    """A TOML value gets the CLI's range/choice checks: 64 naming the key and the file."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml + "\n")
    code = main([str(tiny_ds), str(tmp_path / "o"), "group", "--config-file", str(cfg)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 64
    assert f"'{key}'" in line and str(cfg) in line


def test_mem_floor_and_units(tiny_ds, tmp_path, capsys):
    """``--mem 8`` (8 MB, a typo for 8 GB) is refused; --help states the unit."""
    code = main([str(tiny_ds), str(tmp_path / "o"), "participant", "--mem", "8"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 64 and "'mem_mb'" in line and "command line" in line and "GB" in line
    from bids_siamfuse.cli.parser import parse_args

    assert parse_args([str(tiny_ds), "/o", "participant", "--mem", "8GB"]).execution.mem_mb == 8192
    assert main(["--help"]) == 0
    assert "megabytes (MB)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("filters", "needle"),
    [
        ({"t1w": {"foo": "x"}}, "unknown entity 'foo'"),
        ({"t1w": {"acquisition": {"a": 1}}}, "'t1w.acquisition'"),
        ({"pet": {"subject": "01"}}, "use --participant-label"),
        ({"pet": {"reconstruction": "a b"}}, "'pet.reconstruction'"),
        ({"t1w": {"run": [1, True]}}, "'t1w.run'"),
    ],
    ids=["unknown_entity", "object_value", "own_key", "not_a_label", "bool_in_list"],
)
def test_filter_file_checked_against_entities(tiny_ds, tmp_path, capsys, filters, needle):
    """Filter-file mistakes: 64 naming the file and the key; no pybids/sqlite internals."""
    path = tmp_path / "f.json"
    path.write_text(json.dumps(filters))
    code = main(
        [str(tiny_ds), str(tmp_path / "o"), "participant", "--bids-filter-file", str(path)]
    )
    line = _one_error_line(capsys.readouterr().err)
    assert code == 64 and needle in line and str(path) in line
    assert "sqlite" not in line.lower() and "pybids" not in line.lower()
    # the same filters from a TOML config file meet the same checks
    cfg = tmp_path / "c.toml"
    import tomli_w

    cfg.write_text(tomli_w.dumps({"execution": {"bids_filters": filters}}))
    code = main([str(tiny_ds), str(tmp_path / "o"), "participant", "--config-file", str(cfg)])
    assert code == 64 and str(cfg) in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------
# 2. header screening before any work
# ----------------------------------------------------------------------------------------------


def _write_header_only(path: Path, header, data: bytes = b"") -> Path:
    """A NIfTI file written byte by byte (nibabel's writer would fix what is tested)."""
    block = header.binaryblock
    offset = int(header["vox_offset"]) or len(block) + 4
    raw = block + b"\0" * (offset - len(block)) + data
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as handle:
            handle.write(raw)
    else:
        Path(path).write_bytes(raw)
    return path


def test_nifti2_huge_dims_do_not_overflow(tmp_path):
    """2**40 voxels per axis: the size check in Python integers (int64 wrapped to 0 before)."""
    hdr = nb.Nifti2Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((2**40, 2**40, 2**40))
    hdr.set_qform(np.eye(4), 1)
    path = _write_header_only(tmp_path / "huge.nii", hdr, b"\0" * 64)
    with pytest.raises(DataError, match=r"GB in memory") as err:
        checks.check_header(path, "T1w")
    assert str(path) in str(err.value)


def test_zero_voxel_size_is_refused_not_replaced(tmp_path):
    """pixdim 0 in the qform: refused (nibabel silently makes it 1 mm on load)."""
    hdr = nb.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((40, 40, 40))
    hdr["pixdim"][1:4] = [1.0, 0.0, 1.0]
    hdr["qform_code"], hdr["sform_code"] = 1, 0
    hdr["vox_offset"] = 352
    data = np.ones((40, 40, 40), np.float32).tobytes()
    path = _write_header_only(tmp_path / "zero.nii", hdr, data)
    assert nb.load(path).header.get_zooms()[:3] == (1.0, 1.0, 1.0)  # what nibabel makes of it
    with pytest.raises(DataError, match="zero or invalid voxel size"):
        checks.check_header(path, "T1w")


def test_decompression_bomb_is_refused(tmp_path):
    """A ~1 MB .nii.gz whose header declares 1.6 GB (under the 2 GB memory limit)."""
    hdr = nb.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((1024, 1024, 400))
    hdr.set_qform(np.eye(4), 1)
    hdr["vox_offset"] = 352
    path = _write_header_only(tmp_path / "bomb.nii.gz", hdr, b"\0" * (4 * 1024 * 1024))
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match="decompression bomb") as err:
        checks.check_header(path, "T1w")
    assert str(path) in str(err.value)


def _pair(tmp_path, *, t1w=None, pet=None, subject="01", meta=None):
    from bids_siamfuse.bids import SessionPair

    return SessionPair(
        subject=subject,
        session="01",
        pet=pet or tmp_path / "pet.nii.gz",
        t1w=t1w or tmp_path / "t1w.nii.gz",
        t1w_session="01",
        pet_meta=meta if meta is not None else {"FrameTimesStart": [0], "FrameDuration": [600]},
        pet_entities={"tracer": "FDG"},
    )


def test_shape_limits_per_modality(tmp_path):
    """Tiny images are refused at planning time (they failed minutes into preprocessing)."""
    ds = make_pair_ds(tmp_path / "ds", t1w_shape=(8, 9, 10), t1w_mm=1.0)
    ses = ds / "sub-01" / "ses-01"
    t1w = ses / "anat" / "sub-01_ses-01_T1w.nii.gz"
    pair = _pair(tmp_path, t1w=t1w, pet=ses / "pet" / "sub-01_ses-01_trc-FDG_pet.nii.gz")
    with pytest.raises(DataError, match=r"too small for a T1w") as err:
        checks.check_pair_headers(pair)
    assert str(t1w) in str(err.value)
    ok = make_pair_ds(tmp_path / "ok")
    ses = ok / "sub-01" / "ses-01"
    checks.check_pair_headers(
        _pair(
            tmp_path,
            t1w=ses / "anat" / "sub-01_ses-01_T1w.nii.gz",
            pet=ses / "pet" / "sub-01_ses-01_trc-FDG_pet.nii.gz",
        )
    )
    info = {"shape": (4096, 128, 128), "zooms": [1.0, 1.0, 1.0], "frames": 1}
    with pytest.raises(DataError, match="over the 2048"):
        checks.check_extent(t1w, info, "T1w")


def test_long_labels_are_refused(tmp_path):
    """A 200-character label cannot become a derivative file name: refused when planning."""
    pair = _pair(tmp_path, subject="a" * 200)
    with pytest.raises(DataError, match=r"200 characters"):
        checks.check_pair_headers(pair)
    pair = _pair(tmp_path, subject="a" * 60)
    pair.pet_entities = {"tracer": "b" * 60, "reconstruction": "c" * 60, "run": "9" * 60}
    with pytest.raises(DataError, match=r"bytes \(file names stop at 255\)"):
        checks.check_labels(pair)


def test_float64_beyond_float32_range(tmp_path):
    """Reported as out of float32's range, not as NaN/infinite voxels."""
    data = np.random.default_rng(0).random((20, 20, 20)) + 1.0
    data[3, 3, 3] = 1e300
    path = tmp_path / "big.nii.gz"
    nb.Nifti1Image(data.astype(np.float64), np.eye(4)).to_filename(path)
    with pytest.raises(DataError, match=r"beyond float32's range \(largest 1e\+300\)"):
        checks.check_data(path, "T1w")


# ----------------------------------------------------------------------------------------------
# 3. region files and bundles validated on load
# ----------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan(path: Path) -> None:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["pet"] = arrays["pet"].copy()
    arrays["pet"][10] = np.nan
    np.savez_compressed(path, **arrays)


def _shape(path: Path) -> None:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["gm"] = arrays["gm"][:-5]
    np.savez_compressed(path, **arrays)


@pytest.mark.parametrize(
    ("spoil", "needle"),
    [(_truncate, "unreadable region file"), (_nan, "NaN/infinite"), (_shape, "has shape")],
    ids=["truncated", "nan", "shape"],
)
def test_bad_region_file_at_group_level(group_ds, tmp_path, capsys, spoil, needle):
    """Exit 65 naming the file, before any training (a NaN trained on NaN loss before)."""
    ds = tmp_path / "ds"
    shutil.copytree(group_ds, ds)
    deriv = ds / "derivatives" / "bids_siamfuse"
    victim = sorted(deriv.rglob("*_regions.npz"))[3]
    spoil(victim)
    trained = []
    args = [str(ds), str(deriv), "group", "--classes", "CN", "AD", "--folds", "3", "-q"]
    code = main(args, fit=lambda *a, **k: trained.append(1))  # an in-process engine that counts
    line = _one_error_line(capsys.readouterr().err)
    assert code == 65 and str(victim) in line and needle in line
    assert trained == []


@pytest.fixture
def bundle_dir(synth_derivs, tmp_path) -> Path:
    import model_double as md

    from bids_siamfuse.group.cohort import load_cohort
    from bids_siamfuse.model.options import TrainConfig

    cohort = load_cohort(
        synth_derivs / "derivatives" / "bids_siamfuse", bids.read_participants(synth_derivs)
    )
    model = md.fit(cohort, TrainConfig())
    folder = tmp_path / "bundle"
    md.save_fitted(model, cohort, folder)
    return folder


def _edit(key, value):
    def edit(meta):
        meta[key] = value(meta[key]) if callable(value) else value

    return edit


def _nest(meta):
    meta["training"] = "__NEST__"  # replaced by 5000 nested lists in the file


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_edit("classes", lambda c: c[::-1]), "model.json was changed"),
        (_edit("classes", "CNAD"), "'classes' must be"),
        (_edit("classes", ["CN", "CN"]), "'classes' must be"),
        (_edit("format_version", "two"), "'format_version' must be"),
        (_edit("signature", [1, 2]), "'signature' must be"),
        (_edit("crop_boxes", [[0, 0, 0]]), "'crop_boxes' must be"),
        (_nest, "nested deeper than"),
    ],
    ids=["reversed_classes", "classes_string", "classes_twice", "version", "signature",
         "boxes", "deep_json"],
)  # fmt: skip
def test_bundle_json_validated_and_hashed(bundle_dir, edit, needle):
    """model.json's content is hashed and its structure checked: 65 naming the file."""
    from bids_siamfuse.model import bundle as bundles

    bundles.load_bundle(bundle_dir)  # intact: loads
    path = bundle_dir / "model.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta).replace('"__NEST__"', "[" * 5000 + "]" * 5000))
    with pytest.raises(DataError, match=needle) as err:
        bundles.load_bundle(bundle_dir)
    assert str(path) in str(err.value)


@pytest.mark.slow  # trains the real network for one epoch (~60 s on a loaded 2-core machine)
def test_bundle_tensor_shape_edit_is_a_data_error(synth_derivs, tmp_path):
    """A weights file rewritten with a wrong-shaped tensor (hashes updated): 65, not exit 1."""
    import model_double as md
    from safetensors.numpy import load_file, save_file

    from bids_siamfuse.group.cohort import load_cohort
    from bids_siamfuse.model import bundle as bundles
    from bids_siamfuse.model import train

    cohort = load_cohort(
        synth_derivs / "derivatives" / "bids_siamfuse", bids.read_participants(synth_derivs)
    )
    small = cohort.subset(np.arange(10))
    model = train.fit(small, train.TrainConfig(epochs=1, sloppy=True, seed=1))
    bundle_dir = tmp_path / "bundle"
    md.save_fitted(model, small, bundle_dir)
    weights = bundle_dir / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if not k.startswith("layout.") and tensors[k].ndim)
    tensors[name] = np.zeros(tuple(s + 3 for s in tensors[name].shape), tensors[name].dtype)
    save_file(tensors, str(weights))
    path = bundle_dir / "model.json"
    meta = json.loads(path.read_text())
    meta["weights_sha256"] = bundles._sha256(weights)
    meta["content_sha256"] = bundles.content_hash(meta)
    path.write_text(json.dumps(meta))
    bundle = bundles.load_bundle(bundle_dir)
    with pytest.raises(DataError, match="cannot rebuild the model") as err:
        bundle.model()
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------------------------
# 4. per-pair isolation at planning time; --dry-run writes nothing
# ----------------------------------------------------------------------------------------------


def _both_extensions(ds: Path) -> Path:
    pet = ds / "sub-01" / "ses-01" / "pet" / "sub-01_ses-01_trc-FDG_pet.nii.gz"
    nb.load(pet).to_filename(pet.with_name(pet.name[:-3]))
    return pet


def _sidecar(value):
    def mutate(ds: Path) -> Path:
        path = ds / "sub-01" / "ses-01" / "pet" / "sub-01_ses-01_trc-FDG_pet.json"
        if value == "array":
            path.write_text("[1, 2, 3]")
        else:
            meta = json.loads(path.read_text())
            meta["FrameDuration"] = value
            path.write_text(json.dumps(meta))
        return path

    return mutate


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (_both_extensions, "stored more than once"),
        (_sidecar("600"), "field FrameDuration must be a number"),
        (_sidecar({"value": 600}), "field FrameDuration must be a number"),
        (_sidecar("array"), "a JSON list, not an object"),
    ],
    ids=["nii_and_niigz", "string_field", "object_field", "json_array"],
)
def test_bad_pair_is_refused_alone(tmp_path, capsys, mutate, needle):
    """One bad pair is refused at planning; the other is planned; --dry-run writes nothing."""
    ds = make_pair_ds(tmp_path / "ds", subjects=("01", "02"))
    culprit = mutate(ds)
    out = tmp_path / "out"
    code = main([str(ds), str(out), "participant", "--skip-bids-validation", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err  # sub-02 still runs
    assert "1 PET/T1w pair(s) to process" in captured.out and "sub-02" in captured.out
    refused = captured.out.split("refused", 1)[1]
    assert "sub-01_ses-01_trc-FDG" in refused and needle in refused
    assert culprit.name in refused or str(culprit) in refused
    assert "Traceback" not in captured.err and "unexpected" not in captured.err
    assert not out.exists()  # a dry run writes nothing (no crash file either)
    # --stop-on-first-crash: the refusal ends the run at once, before any work
    code = main(
        [str(ds), str(out), "participant", "--skip-bids-validation", "--stop-on-first-crash"]
    )
    assert code == 65 and needle in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").rglob("*.pklz"))


def test_symlink_loop_is_resolved(tmp_path, capsys):
    """A directory link loop under --skip-bids-validation: the PET is planned once."""
    ds = make_pair_ds(tmp_path / "ds", subjects=("01",))
    (ds / "sub-01" / "ses-01" / "pet" / "loop").symlink_to("..")
    code = main(
        [str(ds), str(tmp_path / "o"), "participant", "--skip-bids-validation", "--dry-run"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 PET/T1w pair(s) to process" in captured.out
    assert "symbolic link" in captured.out and "refused" not in captured.out


# ----------------------------------------------------------------------------------------------
# 5./6. the guarded scheduler: cancelled branches, no hangs, disk full, no tracebacks
# ----------------------------------------------------------------------------------------------

ROOT_WF = "bids_siamfuse_wf"
SUBJECT_WF = "single_subject_01_wf"


def _sleep(seconds: float, tag: str = "") -> str:
    import time

    time.sleep(seconds)
    return tag


def _fail(value: str = "") -> str:
    from bids_siamfuse.errors import DataError

    raise DataError("/data/sub-01_pet.nii.gz: every voxel is zero")


def _enospc_node(value: str = "") -> str:
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/sub-01/anat/x.nii.gz")


def toy_workflow(base: Path, *, pet=_fail, anat_sleep=1.0, anat_nodes=4, pet_sleep=0.0):
    """anat_wf: a chain of sleeping nodes; pet_wf: ``pet`` then a node fed by the anat chain."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    top = pe.Workflow(name=ROOT_WF, base_dir=str(base))
    sub = pe.Workflow(name=SUBJECT_WF)
    anat = pe.Workflow(name="anat_wf")
    pet_wf = pe.Workflow(name="pet_x_wf")
    chain = []
    for i in range(anat_nodes):
        node = pe.Node(niu.Function(input_names=["seconds", "tag"], function=_sleep), name=f"a{i}")
        node.inputs.seconds = anat_sleep
        if chain:
            anat.connect(chain[-1], "out", node, "tag")
        else:
            node.inputs.tag = "start"
        chain.append(node)
    first = pe.Node(niu.Function(input_names=["value"], function=pet), name="p0")
    first.inputs.value = "x"
    if pet_sleep:
        first = pe.Node(niu.Function(input_names=["seconds", "tag"], function=_sleep), name="p0")
        first.inputs.seconds, first.inputs.tag = pet_sleep, "p"
    last = pe.Node(niu.Function(input_names=["value"], function=_identity), name="p1")
    pet_wf.add_nodes([first, last])
    sub.connect(anat, f"{chain[-1].name}.out", pet_wf, "p1.value")
    top.add_nodes([sub])
    for wf in (top,):
        wf.config["execution"].update(
            {"crashfile_format": "txt", "crashdump_dir": str(base / "crash"),
             "poll_sleep_duration": 0.01, "stop_on_first_crash": False}
        )  # fmt: skip
    return top


def _identity(value: str = "") -> str:
    return value


BRANCHES = {f"{ROOT_WF}.{SUBJECT_WF}.anat_wf": [f"{ROOT_WF}.{SUBJECT_WF}.pet_x_wf"]}


def _done(base: Path) -> list[str]:
    return sorted(p.parent.name for p in base.rglob("result_*.pklz"))


@pytest.mark.parametrize("plugin", ["MultiProc", "Linear"])
def test_failed_pet_branch_cancels_the_t1w_branch(tmp_path, plugin):
    """The PET node fails at once: the T1w chain stops after the node already running."""
    from bids_siamfuse.engine import GuardedLinear, GuardedMultiProc

    wf = toy_workflow(tmp_path, anat_sleep=1.0, anat_nodes=4)
    runner = (
        GuardedMultiProc(plugin_args={"n_procs": 2, "branches": BRANCHES})
        if plugin == "MultiProc"
        else GuardedLinear(plugin_args={"branches": BRANCHES})
    )
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        wf.run(plugin=runner)
    seconds = time.monotonic() - t0
    done = _done(tmp_path)
    # MultiProc: a0 was running when p0 failed; Linear runs the graph in topological order
    assert "a3" not in done and "a2" not in done, done
    assert len([n for n in done if n.startswith("a")]) <= 1
    assert any(name.endswith("anat_wf.a3") for name in runner.cancelled)
    print(f"{plugin}: ended after {seconds:.1f} s; the 4-node T1w chain takes >= 4 s")


def test_disk_full_in_a_node_ends_the_run(tmp_path):
    """ENOSPC inside a node: CannotWriteError (73) at once, nothing else started."""
    from bids_siamfuse.engine import GuardedLinear, GuardedMultiProc

    for runner in (
        GuardedMultiProc(plugin_args={"n_procs": 2, "branches": BRANCHES}),
        GuardedLinear(plugin_args={"branches": BRANCHES}),
    ):
        base = tmp_path / type(runner).__name__
        wf = toy_workflow(base, pet=_enospc_node, anat_sleep=0.5, anat_nodes=4)
        with pytest.raises(CannotWriteError, match="No space left on device") as err:
            wf.run(plugin=runner)
        assert err.value.exit_code == 73
        assert "a3" not in _done(base)


def test_disk_full_in_the_completion_callback_does_not_hang(tmp_path, monkeypatch):
    """ENOSPC raised inside nipype's completion callback: the scheduler waited forever."""
    from nipype.pipeline.plugins.multiproc import MultiProcPlugin

    from bids_siamfuse.engine import GuardedMultiProc

    real = MultiProcPlugin._async_callback
    calls = []

    def callback(self, args):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, args)

    monkeypatch.setattr(MultiProcPlugin, "_async_callback", callback)
    wf = toy_workflow(tmp_path, pet=_identity, anat_sleep=0.1, anat_nodes=2)
    t0 = time.monotonic()
    with pytest.raises(CannotWriteError, match="No space left"):
        wf.run(plugin=GuardedMultiProc(plugin_args={"n_procs": 2}))
    assert time.monotonic() - t0 < 60


def test_stuck_scheduler_ends_with_usage_error(tmp_path, monkeypatch):
    """Nodes the resources can never start: 64 within the watchdog time, not an endless poll."""
    from bids_siamfuse import engine

    wf = toy_workflow(tmp_path, pet=_identity, anat_sleep=0.1, anat_nodes=2)
    with pytest.raises(UsageError, match="--mem gives 10 MB but a node needs"):
        wf.run(plugin=engine.GuardedMultiProc(plugin_args={"n_procs": 2, "memory_gb": 0.01}))
    monkeypatch.setattr(engine, "STALL_SECONDS", 1.0)
    wf = toy_workflow(tmp_path / "b", pet=_identity, anat_sleep=0.1, anat_nodes=2)
    for node in wf._get_all_nodes():
        node._mem_gb = 0.001  # fits the 5 MB given, so the pre-run check passes ...
    t0 = time.monotonic()
    # ... but MultiProc starts nothing while under 10 MB are free: it polled forever
    plugin = engine.GuardedMultiProc(plugin_args={"n_procs": 2, "memory_gb": 0.005})
    with pytest.raises(UsageError, match="could not start"):
        wf.run(plugin=plugin)
    assert time.monotonic() - t0 < 30


def test_no_traceback_on_the_terminal(tmp_path, capfd):
    """A failing node: its traceback goes to the crash file, not to stderr (workers too)."""
    from bids_siamfuse.cli.run import _setup_logging
    from bids_siamfuse.engine import GuardedMultiProc, quiet_node_crashes
    from bids_siamfuse.participant.run import _route_nipype_logs

    _setup_logging(0)
    _route_nipype_logs()
    quiet_node_crashes(0)
    wf = toy_workflow(tmp_path, anat_sleep=0.1, anat_nodes=2)
    with pytest.raises(RuntimeError):
        wf.run(plugin=GuardedMultiProc(plugin_args={"n_procs": 2, "branches": BRANCHES}))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "every voxel is zero" not in err, err
    crash = list((tmp_path / "crash").glob("crash-*.txt"))
    assert crash and "Traceback" in crash[0].read_text()


def test_disk_full_through_run_participant_exits_73(tmp_path, monkeypatch, capsys):
    """run_participant lets the disk-full stop through: the CLI's 73, one line, status table."""
    from bids_siamfuse.config import Settings
    from bids_siamfuse.participant import run as base

    ds = make_pair_ds(tmp_path / "ds")
    out = tmp_path / "out"
    work = tmp_path / "work"
    monkeypatch.setattr(
        base,
        "init_bids_siamfuse_wf",
        lambda **kwargs: toy_workflow(work, pet=_enospc_node, anat_sleep=0.2, anat_nodes=3),
    )
    monkeypatch.setattr(base, "write_participant_reports", lambda *a, **k: [])
    code = main([str(ds), str(out), "participant", "--skip-bids-validation", "-w", str(work),
                 "--nprocs", "2", "--omp-nthreads", "1"])  # fmt: skip
    line = _one_error_line(capsys.readouterr().err)
    assert code == 73 and "No space left on device" in line
    assert list((out / "logs").glob("participant-*.tsv"))
    del Settings


def test_no_sidecar_without_its_data_after_disk_full(tmp_path, monkeypatch):
    """The sidecar is written first; when the data write fails, it goes too."""

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nb.Nifti1Image, "to_filename", enospc)
    img = nb.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4))
    with pytest.raises(CannotWriteError):
        bids.save_output(tmp_path, "gm_mni", img, source={"subject": "01"}, meta={"a": 1})
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# ----------------------------------------------------------------------------------------------
# 7. signals
# ----------------------------------------------------------------------------------------------

SIGNAL_RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import test_hardening as th
from bids_siamfuse.participant import run as base
work = Path(sys.argv[2])
base.init_bids_siamfuse_wf = lambda **kw: th.toy_workflow(
    work, pet=th._identity, anat_sleep=120, anat_nodes=2, pet_sleep=120)
base.write_participant_reports = lambda *a, **k: []
from bids_siamfuse.cli.run import main
raise SystemExit(main(sys.argv[1:2] + sys.argv[3:]))
"""


def _descendants(pid: int) -> list[int]:
    """Processes below ``pid``, from /proc (the test's own scan, not the one under test)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_text = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat_text.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.parametrize(
    ("sig", "code"),
    [
        (signal.SIGTERM, 143),
        pytest.param(signal.SIGHUP, 129, marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
    ],
    ids=["SIGTERM", "SIGHUP", "SIGINT"],
)
def test_signal_stops_workers_and_writes_status(tmp_path, sig, code):
    """A real CLI process (toy workflow) gets the signal while two workers run: conventional
    exit code, one line, status table with 'interrupted', no process left behind."""
    ds = make_pair_ds(tmp_path / "ds")
    out, work = tmp_path / "out", tmp_path / "work"
    script = tmp_path / "runner.py"
    script.write_text(SIGNAL_RUNNER.format(tests=str(TESTS)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    cmd = [sys.executable, str(script), str(ds), str(work), str(out), "participant",
           "--skip-bids-validation", "-w", str(work), "--nprocs", "2",
           "--omp-nthreads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    children = []
    while time.monotonic() < deadline and proc.poll() is None:
        children = _descendants(proc.pid)
        if len(children) >= 2 and list(work.rglob("_node.pklz")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(1.0)
    children = _descendants(proc.pid)
    os.kill(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err[-3000:]
    final = [line for line in err.splitlines() if line.startswith("bids_siamfuse: interrupted")]
    assert len(final) == 1 and "Traceback" not in err, err[-3000:]
    assert f"-w {work}" in final[0]
    time.sleep(0.5)
    alive = [p for p in children if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]  # fmt: skip
    assert alive == [], f"worker processes left: {alive}"
    tables = list((out / "logs").glob("participant-*.tsv"))
    assert tables and "interrupted" in tables[0].read_text()
    # no temporary left visible (.bidsignore is an output: written before the run starts)
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name != ".bidsignore"]


# ----------------------------------------------------------------------------------------------
# 8. work folders
# ----------------------------------------------------------------------------------------------


def _settings(tmp_path, work=None):
    from bids_siamfuse.config import Settings

    values = {"bids_dir": tmp_path / "ds", "output_dir": tmp_path / "out"}
    if work is not None:
        values["work_dir"] = work
    return Settings.from_sources(cli_values=values)


def test_work_folder_never_a_fixed_shared_path(tmp_path, monkeypatch):
    """Unwritable current folder: a private per-user folder (0700), not $TMPDIR/bids_siamfuse_work;
    a world-writable one planted under that name is refused."""
    from bids_siamfuse.cli import run as cli_run

    monkeypatch.setattr(tempfile_module(), "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if Path(p) == Path.cwd() else real_access(p, m)
    )
    settings = _settings(tmp_path)
    work = cli_run.resolve_work_dir(settings)
    assert work != tmp_path / "tmp" / "bids_siamfuse_work"
    assert str(os.getuid()) in work.name
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
    shutil.rmtree(work)
    work.mkdir()
    work.chmod(0o777)  # planted by someone else, world-writable
    with pytest.raises(UsageError, match="writable by every user"):
        cli_run.resolve_work_dir(_settings(tmp_path))


def tempfile_module():
    import tempfile

    return tempfile


def test_unsafe_work_folders_are_refused(tmp_path):
    """-w: refused when world-writable (or its nipype folder is); a team folder is accepted."""
    from bids_siamfuse.cli import run as cli_run

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UsageError, match="writable by every user"):
        cli_run.resolve_work_dir(_settings(tmp_path, shared))
    team = tmp_path / "team"
    (team / "bids_siamfuse_wf").mkdir(parents=True)
    team.chmod(0o775)
    assert cli_run.resolve_work_dir(_settings(tmp_path, team)) == team  # explicit, group: ok
    (team / "bids_siamfuse_wf").chmod(0o777)
    with pytest.raises(UsageError, match="bids_siamfuse_wf is writable by every user"):
        cli_run.resolve_work_dir(_settings(tmp_path, team))
    from bids_siamfuse.safety import check_work_dir

    (team / "bids_siamfuse_wf").chmod(0o755)
    with pytest.raises(UsageError, match="writable by its group"):
        check_work_dir(team, explicit=False)  # the default location must be private
    if os.getuid() == 0:  # another user's folder (root can make one)
        other = tmp_path / "other"
        other.mkdir(mode=0o755)
        os.chown(other, 12345, 12345)
        with pytest.raises(UsageError, match="owned by another user"):
            check_work_dir(other, explicit=False)


# ----------------------------------------------------------------------------------------------
# 9. sanitized SVG in the reports
# ----------------------------------------------------------------------------------------------

HOSTILE_SVG = """<?xml version="1.0" encoding="utf-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"
     width="200" height="100" onload="document.title='PWNED-onload'">
  <script>document.title = 'PWNED-script';</script>
  <style>@import url(http://127.0.0.1:9/import.css);
    .x {{ fill: url(http://127.0.0.1:9/f) }}</style>
  <foreignObject width="10" height="10"><iframe xmlns="http://www.w3.org/1999/xhtml"
      src="http://127.0.0.1:9/iframe"></iframe></foreignObject>
  <a xlink:href="javascript:document.title='PWNED-link'"><rect width="5" height="5"/></a>
  <rect class="x" width="50" height="50" fill="#3a6" onmouseover="document.title='PWNED'"
        style="fill: url(http://127.0.0.1:9/style)"/>
  <image width="10" height="10" xlink:href="data:image/png;base64,{png}"/>
  <set attributeName="onclick" to="document.title='PWNED-set'"/>
  <circle cx="100" cy="50" r="20" fill="#a36"/>
</svg>
"""


def _planted_report(tmp_path) -> Path:
    import base64

    from test_reports import make_bids, make_participant

    from bids_siamfuse.reports.participant import build_participant_reports

    out = tmp_path / "out"
    make_participant(out)
    png = base64.b64encode(
        bytes.fromhex(
            "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944"
            "41547801636060606000000005000101a5f645400000000049454e44ae426082"
        )
    ).decode()
    for svg in (out / "sub-01" / "figures").glob("*_desc-seg_dseg.svg"):
        svg.write_text(HOSTILE_SVG.format(png=png))
    bids_dir = make_bids(tmp_path / "bids", sessions=("01", "02"))
    build_participant_reports(out, ["01"], bids_dir=bids_dir)
    return out / "sub-01.html"


def test_report_inlines_only_sanitized_svg(tmp_path, parse_html):
    html = _planted_report(tmp_path).read_text()
    body = html.split("<body", 1)[1]
    for bad in ("PWNED", "<script", "onload=", "onmouseover", "foreignObject", "@import",
                "127.0.0.1", "javascript:", "<set"):  # fmt: skip
        assert bad not in body, bad
    doc = parse_html(html)
    assert not doc.xpath("//body//script | //body//*[local-name()='foreignobject']")
    assert not [a for a in doc.xpath("//body//@*") if a.attrname.lower().startswith("on")]
    # the drawing itself is kept, inside the reportlet figure
    assert doc.xpath("//figure//svg//*[local-name()='circle']")


def _chromium():
    from test_reports import _chromium as find

    return find()


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_hostile_svg_runs_nothing_in_the_browser(tmp_path):
    """Headless Chromium: the report page makes no request and runs no planted script."""
    from test_reports import _external, browse

    html = _planted_report(tmp_path)
    result = browse(html, tmp_path / "browser", tmp_path / "shot.png")
    assert result["netlog_written"]
    assert _external(result["netlog_urls"]) == [] and _external(result["resources"]) == []
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
         f"--user-data-dir={tmp_path / 'profile2'}", "--virtual-time-budget=3000",
         "--dump-dom", html.as_uri()],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    title = re.search(r"<title>(.*?)</title>", dom.stdout, re.S)
    assert title is not None and "PWNED" not in title.group(1)
    assert "PWNED" not in dom.stdout


# ----------------------------------------------------------------------------------------------
# 10. Dockerfile checksums
# ----------------------------------------------------------------------------------------------


def _run_spm_stage(dockerfile, tmp_path: Path, **args) -> tuple[int, str, list[str]]:
    """The SPM stage's RUN script, run by bash with the build args ``args``, its paths moved
    under ``tmp_path`` and stubs for apt-get, curl (writes ``payload <url basename>``) and unzip
    (logs its calls; creates an executable ``install`` in its target folder).

    (exit code, stderr, unzip calls)."""
    (run,) = [i for i in dockerfile if i.stage == "spm" and i.keyword == "RUN"]
    script = re.sub(
        r"/opt/spm|/tmp|/downloads",
        lambda m: str(tmp_path / m.group(0).strip("/")),
        run.script(),
    )
    (tmp_path / "tmp").mkdir()
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    calls = tmp_path / "unzip.log"
    for name, body in {
        "apt-get": "exit 0",
        "curl": 'while [ "$#" -gt 1 ]; do [ "$1" = -o ] && out="$2"; shift; done; '
        'printf "payload %s" "${1##*/}" > "$out"',
        "unzip": f'echo "$@" >> {calls}; while [ "$#" -gt 1 ]; do [ "$1" = -d ] && d="$2"; '
        'shift; done; mkdir -p "$d"; printf "#!/bin/sh\\n" > "$d/install"; '
        'chmod +x "$d/install"',
    }.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    env = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "MCR_URL": "https://example.org/mcr.zip",
        "SPM_URL": "https://example.org/spm12.zip",
        "MCR_VERSION": "v97",
        **args,
    }
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", script], env=env, capture_output=True, text=True
    )
    done = calls.read_text().splitlines() if calls.exists() else []
    return proc.returncode, proc.stderr, done


def test_dockerfile_spm_downloads_must_match_their_sha256(dockerfile, tmp_path):
    """The SPM stage, run with stub downloads: a wrong or missing hash stops the build before
    anything is unpacked; the right one lets it through; without WITH_SPM nothing is fetched."""
    import hashlib

    def sha(name):
        return hashlib.sha256(f"payload {name}".encode()).hexdigest()

    good = {"WITH_SPM": "1", "MCR_SHA256": sha("mcr.zip"), "SPM_SHA256": sha("spm12.zip")}
    runs = {}
    for case, args in {
        "wrong_mcr": {**good, "MCR_SHA256": sha("other.zip")},
        "wrong_spm": {**good, "SPM_SHA256": sha("other.zip")},
        "no_hash": {**good, "SPM_SHA256": ""},
        "without_spm": {"WITH_SPM": "0"},
    }.items():
        (tmp_path / case).mkdir()
        runs[case] = _run_spm_stage(dockerfile, tmp_path / case, **args)
    code, err, unzipped = runs["wrong_mcr"]
    assert code != 0 and "did NOT match" in err and unzipped == []
    code, err, unzipped = runs["wrong_spm"]  # the runtime passed its check, SPM did not
    assert code != 0 and "did NOT match" in err
    assert len(unzipped) == 1 and "mcr.zip" in unzipped[0]
    code, err, unzipped = runs["no_hash"]
    assert code == 1 and "SPM_SHA256" in err and unzipped == []
    code, err, unzipped = runs["without_spm"]
    assert code == 0 and unzipped == [] and not list((tmp_path / "without_spm" / "tmp").iterdir())


def test_dockerfile_fetches_nothing_unverified(dockerfile):
    """Only the SPM stage downloads (checked above); no remote ADD, no piping into a shell."""
    for i in dockerfile:
        if i.keyword == "ADD":
            assert not re.search(r"https?://", i.value), i.value
        if i.keyword == "RUN" and re.search(r"\b(curl|wget)\b", i.value):
            assert i.stage == "spm", i.value[:80]
            assert not re.search(r"\b(curl|wget)\b[^|;&]*\|\s*(ba)?sh\b", i.value)


# ----------------------------------------------------------------------------------------------
# slow: the real participant workflow
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_ds(tmp_path_factory):
    from bids_siamfuse.synth import generate

    root = tmp_path_factory.mktemp("hardening_real")
    ds = generate(root / "ds", n_per_group=1, groups=("CN", "AD"), seed=2,
                  two_session_fraction=0.0)  # fmt: skip
    return root, ds


def _real_cmd(ds, out, work, *extra):
    return [sys.executable, "-m", "bids_siamfuse", str(ds), str(out), "participant", "--sloppy",
            "-w", str(work), "--skip-bids-validation", "--omp-nthreads", "1", "--nprocs", "2",
            "--participant-label", "001", *extra]  # fmt: skip


@pytest.mark.slow
def test_sigterm_real_run_and_resume(real_ds):
    """SIGTERM to a real run once nodes finished: 143, status table, no process left; the rerun
    with the same work folder finishes."""
    root, ds = real_ds
    out, work = root / "term_out", root / "term_work"
    proc = subprocess.Popen(_real_cmd(ds, out, work), stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(work.rglob("result_*.pklz"))) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    children = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    time.sleep(0.5)
    assert [p for p in children if Path(f"/proc/{p}").exists()] == []
    table = next((out / "logs").glob("participant-*.tsv")).read_text()
    assert "interrupted" in table
    again = subprocess.run(_real_cmd(ds, out, work), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.slow
def test_real_pet_failure_cancels_t1w_and_prints_one_line(real_ds):
    """All-NaN PET: the PET reference node fails; the T1w workflow stops after its running
    node; the terminal has one line naming the file, no traceback."""
    root, ds = real_ds
    bad = root / "bad_ds"
    shutil.copytree(ds, bad, ignore=shutil.ignore_patterns("derivatives"))
    pet = next(bad.glob("sub-001/ses-01/pet/*_pet.nii.gz"))
    img = nb.load(pet)
    data = np.full(img.shape, np.nan, np.float32)
    data[0, 0, 0], data[1, 1, 1] = 1, 2
    nb.Nifti1Image(data, img.affine, img.header).to_filename(pet)
    out, work = root / "nan_out", root / "nan_work"
    t0 = time.monotonic()
    proc = subprocess.run(_real_cmd(bad, out, work), capture_output=True, text=True)
    seconds = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if str(pet) in line]
    assert len(lines) == 1 and "NaN/infinite" in lines[0]
    anat = {p.parent.name for p in work.rglob("anat_*_wf/*/result_*.pklz")}
    assert len(anat) <= 2, anat  # the node(s) running when the PET failed
    print(f"PET failure run: {seconds:.0f} s, T1w nodes run: {sorted(anat)}")
