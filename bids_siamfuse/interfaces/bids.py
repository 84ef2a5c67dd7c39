"""The data sink: writes derivatives named by :data:`bids_siamfuse.bids.OUTPUTS`.

A plain ``SimpleInterface`` in the role of niworkflows' ``DerivativesDataSink`` (the node at
the end of every branch, always rerun so a resumed run rewrites its derivatives from the
cache) that names and writes files through :func:`bids_siamfuse.bids.save_output`: the name
comes from the output key and the source entities (the T1w's subject/session for anatomical
outputs, the PET pair's entities for PET outputs), the JSON sidecar is written before the data,
and both are written atomically (temporary file, then rename), so an interrupted run never
leaves a partial file under a final name. A derivative already written from the same work-
directory file (newer than it, same sidecar) is left as it is, so a resumed run is quick.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from .. import bids


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    base_directory = Directory(mandatory=True, desc="the derivatives root (OUTPUT_DIR)")
    in_file = File(exists=True, mandatory=True, desc="the file to save")
    output_key = traits.Enum(*bids.OUTPUTS, mandatory=True, desc="key of bids.OUTPUTS")
    source_entities = traits.Dict(mandatory=True, desc="entities inherited from the input")
    meta_dict = traits.Dict(desc="sidecar contents (no sidecar when undefined)")
    data_dtype = Str(desc="NumPy dtype to store NIfTI data as (e.g. float32, uint8)")


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the derivative written")
    out_meta = File(desc="its JSON sidecar")


class DerivativesDataSink(SimpleInterface):
    """Save ``in_file`` as output ``output_key`` of ``bids.OUTPUTS`` (see module docstring)."""

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec
    _always_run = True  # a resumed run rewrites (or confirms) the derivative from the cache

    def _run_interface(self, runtime):
        key = self.inputs.output_key
        meta = dict(self.inputs.meta_dict) if isdefined(self.inputs.meta_dict) else None
        meta = bids.output_meta(key, meta)  # with the key's fixed fields, as save_output writes
        dtype = np.dtype(self.inputs.data_dtype) if isdefined(self.inputs.data_dtype) else None
        target = bids.output_path(self.inputs.base_directory, key, self.inputs.source_entities)
        sidecar = bids.sidecar_path(target, bids.OUTPUTS[key]["extension"])
        self._results["out_file"] = str(target)
        if meta is not None:
            self._results["out_meta"] = str(sidecar)
        if _up_to_date(target, sidecar, self.inputs.in_file, meta):
            return runtime  # a resumed run: the derivative already holds this result
        path = bids.save_output(
            self.inputs.base_directory,
            key,
            self.inputs.in_file,
            source=dict(self.inputs.source_entities),
            meta=meta,
            dtype=dtype,
        )
        self._results["out_file"] = str(path)
        return runtime


def _up_to_date(target: Path, sidecar: Path, in_file: str, meta: dict | None) -> bool:
    """The derivative was written from this very file (newer than it) with this sidecar."""
    try:
        if not target.is_file() or target.stat().st_mtime < Path(in_file).stat().st_mtime:
            return False
        if meta is None:
            return True
        return json.loads(sidecar.read_text()) == json.loads(
            json.dumps(meta, sort_keys=True, default=bids.json_default)
        )
    except (OSError, ValueError):
        return False
