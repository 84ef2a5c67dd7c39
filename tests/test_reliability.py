"""Reliability: bad input beyond the image catalog, kills and resumes, parallel jobs, no network,
determinism, untouched inputs (docs/reliability.md lists every case and the test that covers it).

Cheap variants run in the default suite (real processes where the property is about processes:
SIGKILL, parallel writers, blocked sockets); the participant-level runs (about 2 minutes each on
2 cores) are ``slow`` and share module-scoped fixtures.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from bids_siamfuse import bids
from bids_siamfuse.cli.run import main
from bids_siamfuse.errors import CannotWriteError, DataError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# ----------------------------------------------------------------------------------------------
# helpers: blocked network, hashes, digests of derivatives, subprocess runs
# ----------------------------------------------------------------------------------------------

#: Loaded by every Python process of a run (PYTHONPATH), nipype and torch workers included: IP
#: sockets cannot connect or resolve names; every attempt is logged to $SIAMFUSE_NET_LOG.
SITECUSTOMIZE = """
import os
import socket

_LOG = os.environ.get("SIAMFUSE_NET_LOG")


def _refuse(what, address):
    if _LOG:
        with open(_LOG, "a") as handle:
            handle.write(f"{os.getpid()} {what} {address!r}\\n")
    raise OSError(101, f"network blocked by the test: {what} {address!r}")


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_sendto = socket.socket.sendto
_IP = (socket.AF_INET, socket.AF_INET6)


def connect(self, address):
    if self.family in _IP:
        _refuse("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in _IP:
        _refuse("connect_ex", address)
    return _connect_ex(self, address)


def sendto(self, data, *args):
    if self.family in _IP:
        _refuse("sendto", args[-1])
    return _sendto(self, data, *args)


def getaddrinfo(host, *args, **kwargs):
    _refuse("getaddrinfo", host)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.socket.sendto = sendto
socket.getaddrinfo = getaddrinfo
"""

#: Runs ``bids_siamfuse`` with the group level's fast model double (tests/model_double.py);
#: ``SIAMFUSE_SLOW_WRITES`` makes every group-level table write take that many seconds, so a
#: kill can land while the output folder is being written.
GROUP_DRIVER = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS)!r})
import model_double as md
from bids_siamfuse import bids
delay = float(os.environ.get("SIAMFUSE_SLOW_WRITES", "0"))
if delay:  # the group writer imports bids.save_table when it runs: patched here
    _save_table = bids.save_table
    def slow_save_table(path, table):
        time.sleep(delay)
        return _save_table(path, table)
    bids.save_table = slow_save_table
from bids_siamfuse.cli.run import main
raise SystemExit(main(sys.argv[1:], fit=md.fit, model_cls=md.FittedModel))
"""


def offline_env(folder: Path, **extra) -> dict:
    """Environment of a subprocess whose Python processes cannot reach the network."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(folder), str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env["SIAMFUSE_NET_LOG"] = str(folder / "attempts.log")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def net_attempts(env: dict) -> str:
    log = Path(env["SIAMFUSE_NET_LOG"])
    return log.read_text() if log.exists() else ""


def tree_hashes(root: Path, skip: tuple = ()) -> dict:
    """sha256, mode and mtime of every file under ``root`` (``skip``: relative prefixes)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in skip) or path.is_dir():
            continue
        st = path.stat()
        out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode, st.st_mtime_ns)
    return out


def _digest_array(arr) -> str:
    arr = np.ascontiguousarray(arr)
    return hashlib.sha256(str((arr.dtype.str, arr.shape)).encode() + arr.tobytes()).hexdigest()


#: Sidecar fields that name the run (timestamps, paths) rather than describe the data.
VOLATILE_KEYS = {"Sources", "RawSources", "GeneratedBy", "CommandLine", "DateTime", "Timestamp"}


def derivative_digest(out: Path, subject: str) -> dict:
    """What must be identical between two runs: every derivative's data of one subject.

    NIfTI: data array + affine (not the gzip stream); TSV and text transforms: bytes; ``.npz``:
    each array; JSON sidecars: content minus :data:`VOLATILE_KEYS`. Figures (SVG) and ANTs'
    HDF5 transforms hold creation stamps and are compared through the images made from them.
    """
    folder = Path(out) / f"sub-{subject}"
    digests = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or "log" in path.relative_to(folder).parts[:1]:
            continue
        name = path.name
        if name.startswith("."):
            digests[rel] = "hidden temporary file"
        elif name.endswith((".nii.gz", ".nii")):
            img = nb.load(path)
            digests[rel] = _digest_array(np.asanyarray(img.dataobj)) + _digest_array(img.affine)
        elif name.endswith(".npz"):
            with np.load(path) as f:
                digests[rel] = {k: _digest_array(f[k]) for k in sorted(f.files)}
        elif name.endswith((".tsv", ".txt")):
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif name.endswith(".json"):
            meta = json.loads(path.read_text())
            digests[rel] = {k: v for k, v in meta.items() if k not in VOLATILE_KEYS}
        else:
            digests[rel] = "present"  # .svg, .h5: existence only
    return digests


def participant_cmd(ds, out, work, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bids_siamfuse",
        str(ds),
        str(out),
        "participant",
        "--sloppy",
        "-w",
        str(work),
        "--skip-bids-validation",
        "--omp-nthreads",
        "1",
        *map(str, extra),
    ]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started (what SLURM does at the time limit)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def wait_until(proc: subprocess.Popen, condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------------------------
# the blocker itself works (otherwise the no-network tests prove nothing)
# ----------------------------------------------------------------------------------------------


def test_network_blocker_blocks(tmp_path):
    env = offline_env(tmp_path / "net")
    code = "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "network blocked by the test" in proc.stderr
    assert "127.0.0.1" in net_attempts(env)
    # a child process of a child (nipype/torch workers) is blocked too
    nested = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {code!r}]))"
    assert subprocess.run([sys.executable, "-c", nested], env=env).returncode != 0


# ----------------------------------------------------------------------------------------------
# bad input: cases not covered elsewhere (the image-level catalog is tests/test_checks.py)
# ----------------------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_derivative_write(tmp_path, monkeypatch):
    """ENOSPC while writing: exit-73 error naming the file, nothing under the final name."""
    source = {"subject": "01", "session": "01"}
    img = nb.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4))
    monkeypatch.setattr(nb.Nifti1Image, "to_filename", _enospc)
    with pytest.raises(CannotWriteError, match="No space left on device") as err:
        bids.save_output(tmp_path, "gm_mni", img, source=source, meta={"a": 1})
    target = bids.output_path(tmp_path, "gm_mni", source)
    assert str(target) in str(err.value) and err.value.exit_code == 73
    assert not target.exists()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == []  # the temporary file went too
    monkeypatch.setattr(pd.DataFrame, "to_csv", _enospc)
    with pytest.raises(CannotWriteError, match="No space left"):
        bids.save_table(tmp_path / "t.tsv", pd.DataFrame({"a": [1]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub-01"]


@pytest.fixture
def double() -> dict:
    """``main``'s typed hooks with the fast model double (``tests/model_double.py``)."""
    import model_double as md

    return {"fit": md.fit, "model_cls": md.FittedModel}


GROUP_ARGS = ["--classes", "CN", "AD", "--folds", "3", "--random-seed", "5", "-q"]


def test_disk_full_during_group_write(group_ds, tmp_path, double, monkeypatch, capsys):
    """ENOSPC in the middle of the group report: exit 73, one line, no task folder, no staging."""
    out = tmp_path / "out"
    (out).mkdir()
    bids.ensure_dataset_description(out, group_ds)
    real = pd.DataFrame.to_csv
    calls = []

    def to_csv(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # a few tables written, then the disk fills
            _enospc()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    deriv = group_ds / "derivatives" / "bids_siamfuse"
    code = main([str(group_ds), str(deriv), "group", *GROUP_ARGS], **double)
    err = capsys.readouterr().err
    assert code == 73, err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    group = deriv / "group"
    assert not (group / "CN_vs_AD").exists()
    assert not [p for p in group.glob(".*")]  # the staging folder is gone too


@pytest.mark.parametrize(
    ("table", "code", "needle"),
    [
        ("participant_id\tdiagnosis\nsub-01\tCN\nsub-01\tAD\n", 65, "listed twice: 01"),
        ("subject\tdiagnosis\n01\tCN\n", 65, "no 'participant_id' column"),
        (b"\xff\xfe\x00bad", 65, "participants.tsv: cannot read it"),
    ],
    ids=["duplicate_subject", "no_participant_id", "not_text"],
)
def test_participants_table_cases(tmp_path, capsys, table, code, needle):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    path = ds / "participants.tsv"
    path.write_bytes(table if isinstance(table, bytes) else table.encode())
    got = main([str(ds), str(tmp_path / "out"), "group", "--classes", "CN", "AD", "--dry-run"])
    err = capsys.readouterr().err
    assert got == code and needle in err and str(path) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def _raw_copy(synth_raw: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(synth_raw, dst, ignore=shutil.ignore_patterns("derivatives"))
    return dst


def _first(ds: Path, pattern: str) -> Path:
    return sorted(ds.glob(pattern))[0]


def _bad_sidecar(ds):
    path = _first(ds, "sub-*/ses-01/pet/*_pet.json")
    path.write_text('{"FrameDuration": [30')
    return path


def _text_t1w(ds):
    path = _first(ds, "sub-*/ses-01/anat/*_T1w.nii.gz")
    path.write_text("hello")
    return path


def _no_sidecar(ds):
    path = _first(ds, "sub-*/ses-01/pet/*_pet.json")
    path.unlink()
    return path.with_name(path.name.replace(".json", ".nii.gz"))


def _no_pet(ds):
    for path in ds.glob("sub-*/ses-*/pet/*"):
        path.unlink()
    return Path("no PET with trc-FDG")


@pytest.mark.parametrize(
    ("mutate", "code", "needle"),
    [
        (_bad_sidecar, 16, "decode JSON"),
        (_text_t1w, 65, "not a readable NIfTI image"),
        (_no_sidecar, 65, "no JSON sidecar"),
        (_no_pet, 18, "nothing to process"),
    ],
    ids=["sidecar_not_json", "text_as_nifti", "pet_without_sidecar", "no_pet_at_all"],
)
def test_dataset_cases_through_the_cli(synth_raw, tmp_path, capsys, mutate, code, needle):
    """Broken datasets, through the real CLI (planning only): code, file named, one line."""
    ds = _raw_copy(synth_raw, tmp_path / "ds")
    culprit = mutate(ds)
    sub = culprit.name.split("_")[0][4:] if culprit.name.startswith("sub-") else None
    args = [ds, tmp_path / "out", "participant", "--skip-bids-validation"]
    args += ["--participant-label", sub, "--session-label", "01"] if sub else []
    got = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert got == code, err
    final = [line for line in err.splitlines() if line.startswith("bids_siamfuse: error:")]
    assert len(final) == 1 and needle in final[0] and "Traceback" not in err
    assert str(culprit) in final[0] or culprit.name in final[0] or not sub
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("sub-*"))


def test_participant_label_given_twice(synth_raw, tmp_path, capsys):
    """Duplicate labels on the command line select the subject once (documented choice)."""
    sub = sorted(p.name for p in synth_raw.glob("sub-*"))[0][4:]
    args = [synth_raw, tmp_path / "o", "participant", "--dry-run"]
    code = main([str(a) for a in args + ["--participant-label", sub, sub]])
    text = capsys.readouterr().out
    assert code == 0
    once = main([str(a) for a in args + ["--participant-label", sub]])
    assert once == 0 and capsys.readouterr().out == text  # same plan as naming it once
    assert text.count(f"sub-{sub}_ses-01") >= 1


def test_first_node_fails_on_bad_data(tmp_path):
    """The nodes that load the inputs run the data checks: a DataError naming the file."""
    from bids_siamfuse.interfaces.anat import T1wBiasCorrect
    from bids_siamfuse.interfaces.pet import PETReference

    data = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    data[5:10] = np.nan
    t1w = tmp_path / "sub-01_T1w.nii.gz"
    nb.Nifti1Image(data, np.eye(4)).to_filename(t1w)
    node = T1wBiasCorrect(in_file=str(t1w))
    with pytest.raises(DataError, match=r"NaN/infinite voxels") as err:
        node.run(cwd=str(tmp_path))
    assert str(t1w) in str(err.value)
    pet = tmp_path / "sub-01_pet.nii.gz"
    nb.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)).to_filename(pet)
    node = PETReference(in_file=str(pet), metadata={"FrameDuration": [300]})
    with pytest.raises(DataError, match="every voxel is zero") as err:
        node.run(cwd=str(tmp_path))
    assert str(pet) in str(err.value)


# ----------------------------------------------------------------------------------------------
# kills: a SIGKILL in the middle of writing derivatives, and of a group run
# ----------------------------------------------------------------------------------------------

WRITER = """
import sys, time
import numpy as np, nibabel as nb
from bids_siamfuse import bids
out, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    ramp = np.arange(121, dtype=np.float32)[:, None, None]
    data = np.full((121, 145, 121), i, np.float32) + ramp
    src = {"subject": f"{i:02d}", "session": "01"}
    bids.save_output(out, "gm_mni", nb.Nifti1Image(data, np.eye(4)), source=src, meta={"i": i})
    bids.save_output(out, "gm_morph", __import__("pandas").DataFrame({"i": [i]}), source=src)
    print(i, flush=True)
"""


def _written_ok(out: Path, n: int) -> list[int]:
    """Subjects whose derivatives are all there and complete; asserts nothing is half-written."""
    done = []
    for i in range(n):
        src = {"subject": f"{i:02d}", "session": "01"}
        img_path = bids.output_path(out, "gm_mni", src)
        tsv = bids.output_path(out, "gm_morph", src)
        if img_path.exists():
            data = np.asanyarray(nb.load(img_path).dataobj)  # raises if truncated
            assert data.shape == (121, 145, 121) and data[0, 0, 0] == i
            sidecar = img_path.with_name(img_path.name.replace(".nii.gz", ".json"))
            assert json.loads(sidecar.read_text()) == {"i": i}  # sidecar before the data
        if tsv.exists():
            assert pd.read_csv(tsv, sep="\t").i.tolist() == [i]
        if img_path.exists() and tsv.exists():
            done.append(i)
    return done


def test_sigkill_while_writing_derivatives(tmp_path):
    out, n = tmp_path / "out", 12
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", WRITER, str(out), str(n)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, start_new_session=True)
    line = proc.stdout.readline()  # the first subject is written: kill during the next ones
    time.sleep(0.15)
    kill_group(proc)
    assert line.strip() == b"0"
    partial = _written_ok(out, n)
    assert 0 in partial and len(partial) < n
    hidden = [p for p in out.rglob(".*") if p.is_file()]
    assert all(re.match(r"\.sub-\d\d_.*\.tmp", p.name) for p in hidden)  # only temporaries
    assert subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode == 0
    assert _written_ok(out, n) == list(range(n))  # the rerun completes every subject


def _group_digest(task: Path) -> dict:
    out = {}
    for path in sorted(task.iterdir()):
        if path.name == "summary.json":
            summary = json.loads(path.read_text())
            out[path.name] = {k: v for k, v in summary.items() if k in ("metrics", "counts")}
        elif path.suffix == ".tsv":
            out[path.name] = path.read_bytes()
        elif path.name.endswith(".nii.gz"):
            out[path.name] = _digest_array(np.asanyarray(nb.load(path).dataobj))
        else:
            out[path.name] = "present"
    return out


def _group_cmd(ds: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", GROUP_DRIVER, str(ds), str(out), "group", *GROUP_ARGS]


def test_group_offline_killed_resumed_deterministic(group_ds, synth_derivs, tmp_path, copy_cohort):
    """The group level, as subprocesses with sockets blocked: an uninterrupted run; a run
    SIGKILLed while it writes its report (no task folder appears, only a hidden staging folder);
    a rerun that completes with outputs identical to the uninterrupted run; the BIDS folder is
    unchanged throughout (everything but the output folder inside it)."""
    deriv = group_ds / "derivatives" / "bids_siamfuse"
    before = tree_hashes(group_ds, skip=("derivatives/bids_siamfuse",))
    regions_before = {k: v for k, v in tree_hashes(deriv).items() if "regions" in k}

    env = offline_env(tmp_path / "net")
    ref_ds = copy_cohort(synth_derivs, tmp_path / "ref_ds")  # the same cohort, elsewhere
    ref_out = ref_ds / "derivatives" / "bids_siamfuse"
    first = subprocess.run(_group_cmd(ref_ds, ref_out), env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    reference = _group_digest(ref_out / "group" / "CN_vs_AD")
    assert {"metrics.tsv", "predictions.tsv", "model.json"} <= set(reference)

    slow = offline_env(tmp_path / "net", SIAMFUSE_SLOW_WRITES=0.5)
    proc = subprocess.Popen(
        _group_cmd(group_ds, deriv), env=slow, stderr=subprocess.PIPE, start_new_session=True
    )
    group = deriv / "group"

    def staging_has_files():
        return any(p.is_file() for s in group.glob(".CN_vs_AD.partial-*") for p in s.rglob("*"))

    reached = wait_until(proc, staging_has_files, timeout=120)
    kill_group(proc)
    assert reached, proc.stderr.read().decode()[-2000:]
    assert not (group / "CN_vs_AD").exists()  # nothing presented as complete
    assert list(group.glob(".CN_vs_AD.partial-*"))  # the killed run's hidden staging folder

    again = subprocess.run(_group_cmd(group_ds, deriv), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _group_digest(group / "CN_vs_AD") == reference  # same seed, same outputs
    assert net_attempts(env) == ""  # not even an attempt to reach the network
    assert tree_hashes(group_ds, skip=("derivatives/bids_siamfuse",)) == before
    assert {k: v for k, v in tree_hashes(deriv).items() if "regions" in k} == regions_before


# ----------------------------------------------------------------------------------------------
# concurrency: participant jobs of a SLURM array starting at once on one output folder
# ----------------------------------------------------------------------------------------------

JOB = """
import sys, time
from pathlib import Path
import numpy as np, nibabel as nb, pandas as pd
from bids_siamfuse import bids
out, bids_dir, sub, go = sys.argv[1:5]
while not Path(go).exists():
    time.sleep(0.001)
bids.ensure_dataset_description(Path(out), Path(bids_dir))
src = {"subject": sub, "session": "01"}
data = np.full((60, 70, 60), int(sub), np.float32)
for rep in range(3):  # rewrites of one's own files never show a partial file to the others
    bids.save_output(out, "gm_mni", nb.Nifti1Image(data, np.eye(4)), source=src, meta={"s": sub})
    bids.save_output(out, "gm_morph", pd.DataFrame({"s": [sub] * 50}), source=src)
print(bids.ensure_dataset_description(Path(out), Path(bids_dir)).read_text(), end="")
"""


def test_parallel_jobs_share_an_output_folder(synth_raw, tmp_path):
    out, go, n = tmp_path / "out", tmp_path / "go", 6
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", JOB, str(out), str(synth_raw), f"{i:03d}", str(go)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(1, n + 1)
    ]
    time.sleep(3)  # every job imported and waiting: then all start together
    go.write_text("")
    texts = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Name"] == "bids_siamfuse"
    assert all(json.loads(t) == desc for t in texts)  # every job saw the same complete file
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".bidsignore"]
    for i in range(1, n + 1):
        src = {"subject": f"{i:03d}", "session": "01"}
        img = nb.load(bids.output_path(out, "gm_mni", src))
        assert np.all(np.asanyarray(img.dataobj) == i)
        assert (
            pd.read_csv(bids.output_path(out, "gm_morph", src), sep="\t", dtype=str)
            .s.eq(f"{i:03d}")
            .all()
        )


# ----------------------------------------------------------------------------------------------
# the participant level for real (slow): reference run offline, killed + resumed run, two
# array jobs at once; bitwise comparisons of the derivatives; inputs unchanged
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_ds(tmp_path_factory):
    from bids_siamfuse.synth import generate

    root = tmp_path_factory.mktemp("reliability_participant")
    ds = generate(
        root / "ds", n_per_group=1, groups=("CN", "AD"), seed=1, two_session_fraction=0.0
    )
    return root, ds, tree_hashes(ds)


def _timed(cmd, env, **kwargs):
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, **kwargs)
    return proc, time.time() - t0


@pytest.fixture(scope="module")
def reference_run(raw_ds):
    """sub-001, uninterrupted, with sockets blocked."""
    root, ds, _ = raw_ds
    env = offline_env(root / "net")
    out, work = root / "ref_out", root / "ref_work"
    cmd = participant_cmd(ds, out, work, "--participant-label", "001", "--nprocs", "2")
    proc, seconds = _timed(cmd, env)
    print(f"reference participant run: {seconds:.0f} s, load {os.getloadavg()}")
    return out, proc, seconds, env


@pytest.mark.slow
def test_participant_offline_and_inputs_untouched(raw_ds, reference_run):
    _, ds, before = raw_ds
    out, proc, _, env = reference_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert net_attempts(env) == ""
    assert bids.output_path(out, "regions", {"subject": "001", "session": "01", "tracer": "FDG"})
    digest = derivative_digest(out, "001")
    assert len(digest) > 20 and "hidden temporary file" not in digest.values()
    assert tree_hashes(ds) == before


@pytest.mark.slow
def test_participant_killed_and_resumed(raw_ds, reference_run):
    """SIGKILL once some nodes finished and derivatives exist; rerun with the same work dir."""
    root, ds, before = raw_ds
    ref_out, ref_proc, ref_seconds, _ = reference_run
    assert ref_proc.returncode == 0
    out, work = root / "kill_out", root / "kill_work"
    cmd = participant_cmd(ds, out, work, "--participant-label", "001", "--nprocs", "2")
    env = dict(os.environ)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )

    def midway():
        results = list(work.rglob("result_*.pklz"))
        files = [p for p in (out / "sub-001").rglob("*") if p.is_file()]
        return len(results) >= 8 and len(files) >= 6

    reached = wait_until(proc, midway, timeout=600)
    kill_group(proc)
    assert reached, "the run ended before the kill point"
    killed = derivative_digest(out, "001")
    reference = derivative_digest(ref_out, "001")
    assert len(killed) < len(reference)  # killed in the middle
    for rel, value in killed.items():  # whatever has its final name is complete and right
        assert value == "hidden temporary file" or value == reference[rel], rel
    t0 = time.time()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(f"resumed participant run: {time.time() - t0:.0f} s (reference {ref_seconds:.0f} s)")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = {
        k: v for k, v in derivative_digest(out, "001").items() if v != "hidden temporary file"
    }
    assert resumed == reference  # byte-identical data arrays and tables
    assert tree_hashes(ds) == before


@pytest.mark.slow
def test_participant_array_jobs_at_once(raw_ds, reference_run):
    """Two array tasks (one --participant-label each) on one output folder, started together;
    sub-001 is bitwise identical to the reference run (another process, another work dir)."""
    root, ds, before = raw_ds
    ref_out, ref_proc, _, _ = reference_run
    assert ref_proc.returncode == 0
    out = root / "array_out"
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            participant_cmd(
                ds, out, root / f"array_work_{sub}", "--participant-label", sub, "--nprocs", "1"
            ),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for sub in ("001", "002")
    ]
    errs = [p.communicate(timeout=1200)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Name"] == "bids_siamfuse"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".bidsignore"]
    assert derivative_digest(out, "001") == derivative_digest(ref_out, "001")
    two = derivative_digest(out, "002")
    assert any(k.endswith("_regions.npz") for k in two)
    assert "hidden temporary file" not in two.values()
    logs = sorted((out / "logs").glob("participant-*.tsv"))
    assert len(logs) == 2  # one summary per job, none overwritten
    assert tree_hashes(ds) == before


def test_catalog_lists_existing_tests():
    """docs/reliability.md's catalog table: >= 20 bad-input cases, each naming tests that are
    collected test functions (parsed from the modules, so a renamed or deleted test fails)."""
    import ast

    text = (ROOT / "docs" / "reliability.md").read_text()
    table = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    header = table[0]
    cases = [row for row in table[2:] if row[0].isdigit()]
    assert header[0] == "#" and header[-1] == "test" and len(cases) >= 20
    named = [re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row[-1]) for row in cases]
    assert all(named), "every case names its test"
    defined = {}
    for path, name in sorted({pair for pairs in named for pair in pairs}):
        if path not in defined:
            tree = ast.parse((ROOT / path).read_text())
            defined[path] = {
                node.name
                for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
            }
        assert name in defined[path], f"{path}::{name}"
