"""Run settings: one place for everything a run can be told.

Settings come from three sources, each overriding the one before:

1. the defaults below;
2. a TOML file given with ``--config-file`` (keys either flat, ``folds = 10``, or under their
   section, ``[model]`` / ``folds = 10``);
3. the command line.

The top layer (:mod:`bids_siamfuse.cli.run`) builds one :class:`Settings` and passes the
values down as plain arguments; nothing below it reads the configuration on its own. Every run
writes the settings it used to ``<output_dir>/logs/config-<run_uuid>.toml``, which can be fed
back with ``--config-file`` to repeat the run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ExecutionSettings:
    """What to run on, where to write, and how the engine behaves."""

    bids_dir: Path | None = None
    output_dir: Path | None = None
    analysis_level: str = "participant"
    work_dir: Path | None = None
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    tracer_label: str = "FDG"
    bids_filters: dict = field(default_factory=dict)
    label_column: str = "diagnosis"
    pairing: str = "nearest"
    skip_bids_validation: bool = False
    dry_run: bool = False
    reports_only: bool = False
    stop_on_first_crash: bool = False
    nprocs: int = 0
    omp_nthreads: int = 0
    mem_mb: int = 0
    random_seed: int = 42
    device: str = "auto"
    verbosity: int = 0
    run_uuid: str = ""
    # NiPreps-compatible execution flags (cli/parser.py, "Other options" and friends)
    notrack: bool = False  # accepted for NiPreps scripts; this app never sends usage data
    bids_database_dir: Path | None = None
    boilerplate_only: bool = False
    clean_workdir: bool = False
    low_mem: bool = False
    write_graph: bool = False
    resource_monitor: bool = False


@dataclass
class WorkflowSettings:
    """Participant-level processing choices."""

    backend: str = "ants"
    sloppy: bool = False
    pet_ref_region: str = "none"
    spm_cmd: str = ""
    model: Path | None = None
    model_only: bool = False
    #: -d/--derivatives NAME=PATH: existing MNI-space GM/PET maps instead of preprocessing
    derivatives: list[str] = field(default_factory=list)


@dataclass
class ModelSettings:
    """Group-level training and evaluation."""

    classes: list[str] = field(default_factory=lambda: ["CN", "AD"])
    folds: int = 5
    repeats: int = 1
    epochs: int = 200
    batch_size: int = 32  # chosen on speed and accuracy (docs/benchmarks.md)
    learning_rate: float = 1e-3
    early_stop_loss: float = 0.01
    patience: int = 20
    val_fraction: float = 0.2
    permutation_tests: int = 0
    gpus: int = 0
    cpu_workers: int = 1
    workers_per_gpu: int | None = None  # None: 1 (absent from the recorded settings)
    nondeterministic_gpu: bool = False  # opt-in atomic-add GPU training (not reproducible)
    # what reaches the attention stage, which siamese epochs count, ablations
    fusion: str = "paper"  # "paper" (embeddings) or "similarity" (+ MRI-PET similarity)
    gate: str = "paired"  # "paired", "constant", "se" (previous), "none"; model/siamese_stage.py
    ablations: bool = True  # train the ablation heads in every CV fold
    # sessions flagged by participant quality control (preproc/qc.py) are left out unless set
    include_flagged: bool = False


SECTIONS = {"execution": ExecutionSettings, "workflow": WorkflowSettings, "model": ModelSettings}


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index = {}
    for section, klass in SECTIONS.items():
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            index[f.name] = (section, hints[f.name])
    return index


FIELDS = _field_index()


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a TOML/CLI value to the type the field declares, or raise UsageError."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and args:
        hint, origin, args = args[0], typing.get_origin(args[0]), typing.get_args(args[0])
    try:
        if hint is Path:
            return Path(os.path.expanduser(str(value))).absolute()
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"{value!r} is not a whole number")
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [value]
            return [str(v) for v in value]
        if hint is dict or origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"setting '{name}': cannot use {value!r} ({exc})") from None
    return value


@dataclass
class Settings:
    """All settings of one run, grouped in the sections written to the TOML file."""

    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    workflow: WorkflowSettings = field(default_factory=WorkflowSettings)
    model: ModelSettings = field(default_factory=ModelSettings)

    @classmethod
    def from_sources(
        cls,
        file_values: dict | None = None,
        cli_values: dict | None = None,
        *,
        file_label: str = "the config file",
    ):
        """Merge defaults, then the config file, then the command line; then validate all."""
        settings = cls()
        from_file = _flatten(file_values or {})
        from_file.pop("run_uuid", None)  # a repeated run is a new run
        sources = {}
        for label, source in ((file_label, from_file), ("the command line", cli_values or {})):
            for name, value in source.items():
                settings.set(name, value, source=label)
                sources[name] = label
        from .safety import validate_settings

        validate_settings(settings, sources)  # one check whatever the source (exit 64)
        if not settings.execution.run_uuid:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            settings.execution.run_uuid = f"{stamp}_{uuid.uuid4().hex[:8]}"
        return settings

    def set(self, name: str, value: Any, *, source: str | None = None) -> None:
        if name not in FIELDS:
            raise UsageError(f"unknown setting '{name}'" + (f" (in {source})" if source else ""))
        section, hint = FIELDS[name]
        try:
            coerced = _coerce(name, value, hint)
        except UsageError as exc:
            if source is None:
                raise
            raise UsageError(f"{exc} (from {source})") from None
        setattr(getattr(self, section), name, coerced)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for section in SECTIONS:
            values = {}
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                if value is None:
                    continue  # TOML has no null: absent means "default"
                values[key] = str(value) if isinstance(value, Path) else value
            out[section] = values
        return out

    def to_toml(self) -> str:
        import tomli_w

        header = "# bids_siamfuse run settings; feed back with --config-file to repeat this run\n"
        return header + tomli_w.dumps(self.as_dict())

    def write(self, log_dir: Path) -> Path:
        """Write the settings as ``config-<run_uuid>.toml`` (atomically) and return its path."""
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / f"config-{self.execution.run_uuid}.toml"
        from .atomic import write_text

        return write_text(path, self.to_toml())


def _flatten(values: dict) -> dict:
    """Accept both ``{"model": {"folds": 3}}`` and ``{"folds": 3}``."""
    flat = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[sub.replace("-", "_")] = subvalue
        else:
            flat[key] = value
    return flat


def load_toml(path: Path) -> dict:
    """Read a settings file, turning every problem into a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config-file {path}: no such file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config-file {path}: not valid TOML ({exc})") from None


# ----------------------------------------------------------------------------------------------
# Resolved run-wide choices
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """Run-wide choices, fixed once by :func:`resolve` at the top (:mod:`bids_siamfuse.cli.run`)
    and passed down; nothing below decides them again."""

    #: torch device of this process for the model (participant ``--model``, ``--model-only``):
    #: ``cpu``, ``cuda``, ``cuda:1`` (never ``auto``); ``cpu`` when no model runs
    device: str = "cpu"
    #: group level: one entry per cross-validation worker (one: everything in this process)
    devices: tuple = ("cpu",)
    #: processes: nipype's MultiProc at the participant level, the CPUs the group workers share
    nprocs: int = 1
    #: threads per process (participant nodes) or per group worker; None: torch's default
    #: (GPU workers)
    omp_nthreads: int | None = None
    #: group level: the training configuration (seed, device, progress set per task)
    train: Any = None
    #: participant level: the memory MultiProc plans with, GB (None: nipype's default)
    memory_gb: float | None = None


def train_config(settings):
    """The one :class:`~bids_siamfuse.model.options.TrainConfig` built from the settings (the
    model section and ``--sloppy``); the cross-validation sets seed, device, progress and
    ablations per task. Unknown ``--fusion``/``--gate`` values (a config file can hold any):
    exit 64."""
    from .model.options import FUSIONS, GATES, TrainConfig

    mo = settings.model
    for flag, value, allowed in (("--fusion", mo.fusion, FUSIONS), ("--gate", mo.gate, GATES)):
        if value not in allowed:
            raise UsageError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    return TrainConfig(
        epochs=mo.epochs,
        batch_size=mo.batch_size,
        learning_rate=mo.learning_rate,
        early_stop_loss=mo.early_stop_loss,
        patience=mo.patience,
        val_fraction=mo.val_fraction,
        sloppy=bool(settings.workflow.sloppy),
        deterministic=not mo.nondeterministic_gpu,
        fusion=mo.fusion,
        gate=mo.gate,
    )


def resolve(settings) -> Resolved:
    """Fix device(s), processes, threads and (group level) the training configuration once.

    Device: ``auto`` -> ``cuda`` when visible, else ``cpu``; ``cuda`` without a visible GPU:
    exit 64 (:func:`bids_siamfuse.model.workers.resolve_devices`). Only resolved where a model
    runs (group level, ``--model``), so a participant run without a model never imports torch
    here. Processes: ``--nprocs``, else every CPU (participant level: the CPUs this process
    may use, no more than its memory budget holds, :mod:`bids_siamfuse.participant.resources`).
    Threads:
    :func:`bids_siamfuse.model.workers.default_threads` (``--omp-nthreads``, else the CPUs
    shared out between the workers, at most 8 each; torch's default on GPUs).
    """
    ex, mo, wf = settings.execution, settings.model, settings.workflow
    group = ex.analysis_level == "group"
    nprocs, memory_gb = int(ex.nprocs or os.cpu_count() or 1), None
    if not group:  # participant: the CPUs and memory this process may use (docs/hpc.md)
        from .participant.resources import participant_nprocs

        nprocs, memory_gb = participant_nprocs(ex.nprocs, ex.mem_mb)
    device, devices, train = "cpu", ("cpu",), None
    if group or wf.model is not None:
        from .model.workers import resolve_device, resolve_devices

        if group:
            train = train_config(settings)
            devices = tuple(
                resolve_devices(ex.device, mo.gpus, mo.cpu_workers, mo.workers_per_gpu or 1)
            )
            device = devices[0]
        else:
            device = resolve_device(ex.device)
    from .model.workers import default_threads

    threads = default_threads(list(devices), ex.omp_nthreads, nprocs)
    return Resolved(
        device=device,
        devices=devices,
        nprocs=nprocs,
        omp_nthreads=threads,
        train=train,
        memory_gb=memory_gb,
    )
