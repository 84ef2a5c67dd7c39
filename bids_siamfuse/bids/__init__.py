"""BIDS input and derivative output.

=============  ==============================================================================
module         what happens there
=============  ==============================================================================
``inputs``     the input dataset: root check, validator, pybids layout (and its shared
               index), PET/T1w pairs (:func:`collect_pairs`), ``participants.tsv`` labels
``naming``     every derivative name: the entity table, :data:`OUTPUTS` (output key ->
               entities), pybids ``build_path``/``parse_file_entities`` with the project's
               patterns (:func:`output_path`, :func:`build_name`, :func:`parse_entities`)
``writing``    writing derivatives atomically with their sidecars (:func:`save_output`)
``dataset``    ``dataset_description.json``, ``README.md``, ``.bidsignore``
=============  ==============================================================================

The names below are the package's public interface; import them from here.
"""

from ..atomic import atomic_path
from .dataset import (
    CODE_URL,
    DERIVATIVES_README,
    HOST_BIDS_DIR_ENV,
    PIPELINE_NAME,
    container_info,
    dataset_description,
    ensure_bidsignore,
    ensure_dataset_description,
    ensure_readme,
    source_location,
)
from .inputs import (
    IGNORE_INPUT,
    Plan,
    SessionPair,
    check_bids_root,
    collect_pairs,
    find_validator,
    load_layout,
    non_object_sidecars,
    read_participants,
    validate_dataset,
)
from .naming import (
    BIDSIGNORE,
    ENTITY_ORDER,
    OUTPUTS,
    PET_SOURCE_ENTITIES,
    build_name,
    build_path,
    is_output,
    normalize_entities,
    output_glob,
    output_meta,
    output_path,
    output_spec,
    parse_entities,
    sidecar_path,
    source_entities,
)
from .writing import (
    json_default,
    save_derivative,
    save_image,
    save_json,
    save_output,
    save_table,
)

__all__ = [
    "BIDSIGNORE",
    "CODE_URL",
    "DERIVATIVES_README",
    "ENTITY_ORDER",
    "HOST_BIDS_DIR_ENV",
    "IGNORE_INPUT",
    "OUTPUTS",
    "PET_SOURCE_ENTITIES",
    "PIPELINE_NAME",
    "Plan",
    "SessionPair",
    "atomic_path",
    "build_name",
    "build_path",
    "is_output",
    "check_bids_root",
    "collect_pairs",
    "container_info",
    "dataset_description",
    "ensure_bidsignore",
    "ensure_dataset_description",
    "ensure_readme",
    "find_validator",
    "json_default",
    "load_layout",
    "non_object_sidecars",
    "normalize_entities",
    "output_glob",
    "output_meta",
    "output_path",
    "output_spec",
    "parse_entities",
    "read_participants",
    "save_derivative",
    "save_image",
    "save_json",
    "save_output",
    "save_table",
    "sidecar_path",
    "source_entities",
    "source_location",
    "validate_dataset",
]
