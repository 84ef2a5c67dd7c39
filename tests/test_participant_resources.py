"""Participant level on a node: memory budget, processes and cores per step
(``participant/resources.py``), on faked memory and CPU figures; fast (no run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bids_siamfuse.participant import resources as res

GB = 1024**3


def _cgroup_v2(tmp_path: Path, limit, current: int, inactive: int = 0, cpu_max=None) -> dict:
    root = tmp_path / "cg"
    job = root / "slurm" / "job_7"
    job.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (job / "memory.max").write_text(f"{limit}\n")
    (job / "memory.current").write_text(f"{current}\n")
    (job / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\nactive_file 3\n")
    if cpu_max:
        (job / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/slurm/job_7\n")
    return {"root": root, "proc_cgroup": proc}


def _meminfo(tmp_path: Path, available_kb: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: 131072000 kB\nMemFree: 1000 kB\nMemAvailable: {available_kb} kB\n")
    return path


def test_meminfo_available(tmp_path):
    assert res.meminfo_available_gb(_meminfo(tmp_path, 64 * 1024**2)) == pytest.approx(64.0)
    assert res.meminfo_available_gb(tmp_path / "absent") is None


def test_cgroup_v2_limit_minus_usage_without_page_cache(tmp_path):
    cg = _cgroup_v2(tmp_path, limit=16 * GB, current=6 * GB, inactive=2 * GB)
    # 16 GB limit, 6 GB charged of which 2 GB reclaimable page cache: 12 GB left
    assert res.cgroup_memory_gb(cg["root"], cg["proc_cgroup"]) == pytest.approx(12.0)
    unlimited = _cgroup_v2(tmp_path / "u", limit="max", current=GB)
    assert res.cgroup_memory_gb(unlimited["root"], unlimited["proc_cgroup"]) is None


def test_cgroup_v1_container_view(tmp_path):
    """v1 inside a container: /proc/self/cgroup names a host path, the mount is the cgroup."""
    mount = tmp_path / "cg" / "memory"
    mount.mkdir(parents=True)
    (mount / "memory.limit_in_bytes").write_text(f"{8 * GB}\n")
    (mount / "memory.usage_in_bytes").write_text(f"{3 * GB}\n")
    (mount / "memory.stat").write_text(f"total_inactive_file {GB}\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/process_api/3e27\n3:cpuset:/\n0::/\n")
    assert res.cgroup_memory_gb(tmp_path / "cg", proc) == pytest.approx(6.0)
    (mount / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert res.cgroup_memory_gb(tmp_path / "cg", proc) is None


def test_available_memory_is_the_tighter_of_the_two(tmp_path):
    cg = _cgroup_v2(tmp_path, limit=16 * GB, current=4 * GB)
    paths = {"cgroup_root": cg["root"], "proc_cgroup": cg["proc_cgroup"]}
    loose = _meminfo(tmp_path, 100 * 1024**2)
    assert res.available_memory_gb(meminfo=loose, **paths) == pytest.approx(12.0)
    (tmp_path / "tight").mkdir()
    tight = _meminfo(tmp_path / "tight", 5 * 1024**2)
    assert res.available_memory_gb(meminfo=tight, **paths) == pytest.approx(5.0)


def test_cpu_quota_caps_the_affinity_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(res.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cg = _cgroup_v2(tmp_path, limit="max", current=0, cpu_max="250000 100000")
    assert res.available_cpus(cg["root"], cg["proc_cgroup"]) == 3  # 2.5 CPUs of quota
    free = _cgroup_v2(tmp_path / "f", limit="max", current=0, cpu_max="max 100000")
    assert res.available_cpus(free["root"], free["proc_cgroup"]) == 16


def test_budget_and_processes(monkeypatch):
    monkeypatch.delenv(res.LEGACY_VARIABLE, raising=False)
    assert res.memory_budget_gb(8192, available_gb=100.0) == 8.0  # --mem-mb wins
    assert res.memory_budget_gb(0, available_gb=100.0) == pytest.approx(100 * res.MEMORY_SHARE)
    assert res.default_nprocs(16, 115.2) == 16  # a 16-core node with 128 GB: every core
    per = res.WORKER_PEAK_GB
    assert res.default_nprocs(16, 3 * per + 0.1) == 3  # memory holds 3 workers
    assert res.default_nprocs(16, per / 2) == 1  # never 0
    assert res.default_nprocs(4, None) == 4  # nothing known: the CPUs
    monkeypatch.setenv(res.LEGACY_VARIABLE, "1")
    assert res.memory_budget_gb(0, available_gb=100.0) is None  # nipype's default again


def test_resolve_participant_on_faked_node(monkeypatch):
    from bids_siamfuse.config import Settings, resolve

    monkeypatch.delenv(res.LEGACY_VARIABLE, raising=False)
    monkeypatch.setattr(res, "available_cpus", lambda *a, **k: 16)
    monkeypatch.setattr(res, "available_memory_gb", lambda *a, **k: 128.0)
    settings = Settings()
    r = resolve(settings)
    assert (r.nprocs, r.memory_gb, r.omp_nthreads) == (16, pytest.approx(115.2), 8)
    monkeypatch.setattr(res, "available_memory_gb", lambda *a, **k: 7.0)
    r = resolve(settings)  # 6.3 GB plan: 3 workers at 2 GB, threads follow
    assert (r.nprocs, r.omp_nthreads) == (int(6.3 // res.WORKER_PEAK_GB), 3)
    settings.execution.nprocs, settings.execution.mem_mb = 5, 4096
    r = resolve(settings)  # given values are kept
    assert (r.nprocs, r.memory_gb) == (5, 4.0)
    group = Settings()
    group.execution.analysis_level = "group"
    group.execution.nprocs = 2
    assert resolve(group).memory_gb is None  # the group level does not use it


def _anat_wf(omp: int):
    from bids_siamfuse.workflows.anatomical import init_anat_preproc_wf
    from bids_siamfuse.workflows.common import ParticipantOptions

    options = ParticipantOptions(
        output_dir=Path("/nonexistent/out"), bids_dir=Path("/nonexistent/bids"), omp_nthreads=omp
    )
    return init_anat_preproc_wf(
        t1w=Path("/nonexistent/bids/sub-01/anat/sub-01_T1w.nii.gz"),
        source={"subject": "01", "session": None},
        options=options,
        name="anat_wf",
    )


def test_steps_declare_their_itk_cores_and_keep_their_threads(monkeypatch):
    from bids_siamfuse.interfaces.bids import DerivativesDataSink

    monkeypatch.delenv(res.LEGACY_VARIABLE, raising=False)
    monkeypatch.delenv("BIDS_SIAMFUSE_ITK_THREADS", raising=False)
    wf = _anat_wf(8)
    itk = {n.name: n for n in wf._get_all_nodes() if hasattr(n.inputs, "num_threads")}
    assert {"bias", "register", "segment", "grid"} <= set(itk)
    assert all(n.n_procs == 8 for n in itk.values())  # as built: --omp-nthreads cores
    sinks = [n for n in wf._get_all_nodes() if isinstance(n.interface, DerivativesDataSink)]
    assert sinks and all(n.run_without_submitting for n in sinks)
    done = res.schedule_steps(wf, 8)
    assert done == {"cores": len(itk), "sinks": len(sinks)}
    for node in itk.values():
        assert node.n_procs == 1  # single-threaded ITK: one core for the scheduler
        assert node.inputs.num_threads == 8  # what the step runs with is unchanged
    assert not any(n.run_without_submitting for n in sinks)
    # ITK told to follow --omp-nthreads: the steps declare those cores again
    monkeypatch.setenv("BIDS_SIAMFUSE_ITK_THREADS", "omp")
    wf = _anat_wf(4)
    res.schedule_steps(wf, 4)
    assert {n.n_procs for n in wf._get_all_nodes() if hasattr(n.inputs, "num_threads")} == {4}
    # the previous scheduling, switchable back
    monkeypatch.delenv("BIDS_SIAMFUSE_ITK_THREADS")
    monkeypatch.setenv(res.LEGACY_VARIABLE, "1")
    wf = _anat_wf(8)
    assert res.schedule_steps(wf, 8) == {"cores": 0, "sinks": 0}
    assert all(n.n_procs == 8 for n in wf._get_all_nodes() if hasattr(n.inputs, "num_threads"))


def test_plugin_args_never_refuse_a_step_on_a_measured_budget():
    wf = _anat_wf(1)
    heaviest = max(float(n.mem_gb) for n in wf._get_all_nodes())
    args = res.plugin_args(16, 0.5, wf)  # little memory measured: steps run one at a time
    assert args == {"n_procs": 16, "raise_insufficient": False, "memory_gb": heaviest}
    assert res.plugin_args(4, 0.5)["memory_gb"] == 0.5  # --mem-mb given: kept (exit 64 then)
    assert "memory_gb" not in res.plugin_args(4, None)  # unknown: nipype's default
