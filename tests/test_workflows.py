"""Participant workflow graphs (both backends), the SPM batch, the data sink."""

from __future__ import annotations

import json
import os
import stat
from copy import deepcopy
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_siamfuse import bids
from bids_siamfuse.errors import NoInputError


@pytest.fixture(scope="module")
def plan(synth_raw):
    return bids.collect_pairs(bids.load_layout(synth_raw))


@pytest.fixture
def fake_spm(tmp_path, monkeypatch):
    """An SPM12 standalone lookalike: run_spm12.sh, an MCR folder and tpm/TPM.nii."""
    home = tmp_path / "spm12"
    (home / "spm12_mcr" / "spm12" / "tpm").mkdir(parents=True)
    script = home / "run_spm12.sh"
    script.write_text('#!/bin/sh\necho "SPM12 (7771)"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    tpm = home / "spm12_mcr" / "spm12" / "tpm" / "TPM.nii"
    nb.Nifti1Image(np.zeros((4, 4, 4, 6), np.float32), np.eye(4)).to_filename(tpm)
    (tmp_path / "mcr").mkdir()
    monkeypatch.setenv("SPMSTANDALONE_HOME", str(home))
    monkeypatch.setenv("MCR_HOME", str(tmp_path / "mcr"))
    return home


def _nodes(workflow, prefix=""):
    """Every node by its dotted path in the (nested) workflow."""
    out = {}
    for name in workflow.list_node_names():
        top = name.split(".")[0]
        node = workflow.get_node(top)
        path = f"{prefix}{workflow.name}.{top}"
        if hasattr(node, "list_node_names"):
            out.update(_nodes(node, f"{prefix}{workflow.name}."))
        else:
            out[path] = node
    return out


def _build(plan, tmp_path, **kwargs):
    from bids_siamfuse.workflows.base import init_bids_siamfuse_wf
    from bids_siamfuse.workflows.common import ParticipantOptions

    options = ParticipantOptions(
        output_dir=tmp_path / "out", bids_dir=Path(plan.pairs[0].t1w).parents[3], **kwargs
    )
    return init_bids_siamfuse_wf(
        plan=plan, options=options, work_dir=tmp_path / "work", run_uuid="test"
    )


def _workflows(workflow):
    out = [workflow]
    for name in workflow.list_node_names():
        node = workflow.get_node(name.split(".")[0])
        if hasattr(node, "list_node_names"):
            out.extend(_workflows(node))
    return out


def test_ants_graph(plan, tmp_path):
    wf = _build(plan, tmp_path, sloppy=True)
    nodes = _nodes(wf)
    n_t1w = len({p.t1w for p in plan.pairs})
    assert sum(n.endswith(".register") for n in nodes) == n_t1w
    assert sum(n.endswith(".coreg") for n in nodes) == len(plan.pairs)
    assert sum(n.endswith("regions_wf.regions") for n in nodes) == len(plan.pairs)
    keys = {n.inputs.output_key for n in nodes.values() if n.name.startswith("ds_")}
    assert keys <= set(bids.OUTPUTS)
    for key in ("gm_mni", "gm_mni_modulated", "pet_mni", "regions", "gm_morph", "pet_stats"):
        assert key in keys
    assert {k for k in keys if k.startswith("fig_")} == {
        "fig_seg",
        "fig_t1w2mni",
        "fig_regions",
        "fig_pet_coreg",
        "fig_pet_mni",
    }
    # every processing workflow has a methods paragraph (the derivatives/reportlet writers
    # compute nothing to describe)
    writers = ("_derivatives_wf", "_reports_wf", "writers")
    for sub in _workflows(wf)[1:]:
        assert getattr(sub, "__desc__", None) or sub.name.endswith(writers), sub.name
    # crash files of each subject go to its own log folder
    crash = {n.config["execution"]["crashdump_dir"] for n in nodes.values() if n.config}
    assert all("/log/test" in c for c in crash)
    # the data sinks always run (a resumed run rewrites derivatives from the cache)
    ds = next(n for n in nodes.values() if n.name == "ds_gm_mni")
    assert ds.interface.always_run


def test_nearest_session_shares_one_anatomical_workflow(plan, tmp_path):
    """Two PET sessions paired with one T1w: one anatomical workflow feeds both."""
    first = plan.pairs[0]
    twin = deepcopy(first)
    twin.session = "99"
    twin.notes = ["no T1w in this session: using the T1w of ses-01 (nearest)"]
    shared = bids.Plan(pairs=[first, twin], skipped=[])
    nodes = _nodes(_build(shared, tmp_path))
    assert sum(n.endswith(".register") for n in nodes) == 1
    assert sum(n.endswith(".coreg") for n in nodes) == 2


def test_model_is_connected_when_given(plan, tmp_path, monkeypatch):
    """With --model, each PET workflow feeds its region file to the model workflow."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe
    from niworkflows.engine.workflows import LiterateWorkflow

    import bids_siamfuse.workflows.model as model_mod

    calls = []

    def fake_apply_model_wf(*, bundle, output_dir, name="apply_model_wf", **kwargs):
        calls.append((bundle, output_dir, kwargs))
        wf = LiterateWorkflow(name=name)
        wf.__desc__ = "model"
        wf.add_nodes(
            [
                pe.Node(
                    niu.IdentityInterface(fields=["region_file", "source_entities"]),
                    name="inputnode",
                )
            ]
        )
        return wf

    monkeypatch.setattr(model_mod, "init_apply_model_wf", fake_apply_model_wf)
    one = bids.Plan(pairs=plan.pairs[:1], skipped=[])
    nodes = _nodes(_build(one, tmp_path, model=tmp_path / "bundle"))
    assert len(calls) == 1 and calls[0][0] == tmp_path / "bundle"
    inputnode = next(n for k, n in nodes.items() if k.endswith("apply_model_wf.inputnode"))
    assert inputnode.inputs.source_entities == one.pairs[0].source_entities


def test_spm_absent_is_a_clear_error(monkeypatch):
    from bids_siamfuse.preproc.spm import find_spm

    for var in ("SPMSTANDALONE_HOME", "MCR_HOME"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(NoInputError, match="SPMSTANDALONE_HOME"):
        find_spm("")
    with pytest.raises(NoInputError, match="not found"):
        find_spm("/no/such/run_spm12.sh /opt/mcr script")


def test_spm_absent_exit_code(synth_raw, tmp_path, monkeypatch, capsys):
    from bids_siamfuse.cli.run import main

    for var in ("SPMSTANDALONE_HOME", "MCR_HOME"):
        monkeypatch.delenv(var, raising=False)
    args = [synth_raw, tmp_path / "out", "participant", "--backend", "spm"]
    args += ["--skip-bids-validation", "-w", tmp_path / "work", "--participant-label"]
    args += [plan_subject(synth_raw)]
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 66
    assert "SPM12" in err and len(err.strip().splitlines()) == 1


def plan_subject(ds: Path) -> str:
    return sorted(p.name for p in ds.glob("sub-*"))[0].removeprefix("sub-")


def test_spm_version_check(fake_spm, tmp_path):
    from bids_siamfuse.preproc.spm import find_spm

    install = find_spm("")  # runs the fake script: it answers SPM12
    assert install.tpm.name == "TPM.nii" and "run_spm12.sh" in install.matlab_cmd
    (fake_spm / "run_spm12.sh").write_text('#!/bin/sh\necho "SPM8 (4667)"\n')
    with pytest.raises(NoInputError, match="not SPM12"):
        find_spm("")


def test_spm_graph_and_batch(plan, fake_spm, tmp_path):
    """The SPM backend builds, and its batches hold the grid, the modulation and SPM12."""
    from bids_siamfuse.preproc.spm import find_spm

    spm = find_spm("", check=False)
    one = bids.Plan(pairs=plan.pairs[:1], skipped=[])
    nodes = _nodes(_build(one, tmp_path, backend="spm", spm=spm))
    segment = next(n for k, n in nodes.items() if k.endswith("anat_01_wf.segment"))
    to_mni = next(n for k, n in nodes.items() if k.endswith(".to_mni"))
    coreg = next(n for k, n in nodes.items() if k.endswith(".coreg"))
    assert segment.interface.version.startswith("12.")
    t1 = tmp_path / "t1.nii"
    nb.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_filename(t1)
    seg = deepcopy(segment.interface)
    seg.inputs.channel_files = str(t1)
    script = seg._make_matlab_command(deepcopy(seg._parse_inputs()))
    assert "spm.spatial.preproc" in script and "preproc8" not in script  # SPM12, pinned
    for line in (
        "warp.vox(1) = 1.5;",
        "warp.bb(1,1) = -90.0;",
        "warp.bb(1,2) = -126.0;",
        "warp.bb(1,3) = -72.0;",
        "warp.bb(2,1) = 90.0;",
        "warp.bb(2,2) = 90.0;",
        "warp.bb(2,3) = 108.0;",
        "tissue(1).warped(1) = 1;",  # wc1
        "tissue(1).warped(2) = 1;",  # mwc1: modulated
        "warp.write(2) = 1;",  # forward deformation (y_), for the PET
    ):
        assert line in script, line
    assert (
        segment.interface.inputs.use_mcr and "run_spm12.sh" in segment.interface.inputs.matlab_cmd
    )
    # 121 x 145 x 121 voxels of 1.5 mm between the bounding-box corners
    bb = np.array(segment.interface.inputs.warp_bounding_box)
    assert tuple(np.round((bb[1] - bb[0]) / 1.5).astype(int) + 1) == (121, 145, 121)
    write = deepcopy(to_mni.interface)
    write.inputs.deformation_file = str(t1)
    write.inputs.apply_to_files = [str(t1)]
    script = write._make_matlab_command(deepcopy(write._parse_inputs()))
    assert "spm.spatial.normalise.write" in script and "woptions.vox(3) = 1.5;" in script
    assert "woptions.bb(2,3) = 108.0;" in script
    assert coreg.interface.inputs.cost_function == "nmi"


def test_data_sink_names_and_writes(tmp_path):
    from bids_siamfuse.data.templates import grid_image
    from bids_siamfuse.interfaces.bids import DerivativesDataSink

    src = tmp_path / "gm.nii.gz"
    grid_image(np.random.default_rng(0).random((121, 145, 121))).to_filename(src)
    source = {"subject": "01", "session": "02"}
    res = DerivativesDataSink(
        base_directory=str(tmp_path / "out"),
        in_file=str(src),
        output_key="gm_mni_modulated",
        source_entities=source,
        meta_dict={"Sources": ["bids:raw:x"], "Modulated": True},
        data_dtype="float32",
    ).run()
    out = Path(res.outputs.out_file)
    assert out == bids.output_path(tmp_path / "out", "gm_mni_modulated", source)
    assert json.loads(Path(res.outputs.out_meta).read_text())["Modulated"] is True
    assert nb.load(out).get_data_dtype() == np.float32
    svg = tmp_path / "f.svg"
    svg.write_text("<svg/>")
    res = DerivativesDataSink(
        base_directory=str(tmp_path / "out"),
        in_file=str(svg),
        output_key="fig_seg",
        source_entities=source,
    ).run()
    assert (
        Path(res.outputs.out_file)
        == tmp_path / "out/sub-01/figures/sub-01_ses-02_desc-seg_dseg.svg"
    )
    leftovers = [p for p in (tmp_path / "out").rglob(".*") if p.is_file()]
    assert not leftovers  # no temporary files left behind
    assert os.access(out, os.R_OK)
