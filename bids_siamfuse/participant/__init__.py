"""The participant level's running (the graphs themselves are built in ``workflows/``).

``run``: nipype settings (once), log rerouting, the guarded run, exit code;
``outcome``: status table (crash files parsed, QC flags), methods text, HTML reports;
``flags``: ``--low-mem``, ``--write-graph``, ``--resource-monitor``, ``--boilerplate-only``,
``--clean-workdir``.
"""

from .flags import (
    LOW_MEM_MARGIN_GB,
    clean_work_dir,
    low_mem_args,
    run_callbacks,
    write_boilerplate,
    write_workflow_graph,
)
from .outcome import pair_status, write_participant_reports
from .run import (
    configure_nipype,
    run_participant,
)

__all__ = [
    "LOW_MEM_MARGIN_GB",
    "clean_work_dir",
    "configure_nipype",
    "low_mem_args",
    "pair_status",
    "run_callbacks",
    "run_participant",
    "write_boilerplate",
    "write_participant_reports",
    "write_workflow_graph",
]
