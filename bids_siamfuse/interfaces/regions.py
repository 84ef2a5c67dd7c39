"""nipype interface of the region extraction: wraps preproc.regions."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec


class _RegionsInputSpec(BaseInterfaceInputSpec):
    gm_modulated = File(exists=True, mandatory=True, desc="modulated GM on the grid")
    pet = File(exists=True, mandatory=True, desc="normalized PET on the grid")


class _RegionsOutputSpec(TraitedSpec):
    regions = File(exists=True, desc="region file (.npz)")
    gm_morph = File(exists=True, desc="GM volume per AAL region (TSV)")
    pet_stats = File(exists=True, desc="mean uptake per AAL region (TSV)")


class RegionExtraction(SimpleInterface):
    """AAL116 region vectors of both maps and the per-region tables."""

    input_spec = _RegionsInputSpec
    output_spec = _RegionsOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        import nibabel as nb

        from ..bids import save_table
        from ..data.templates import on_grid
        from ..errors import DataError
        from ..preproc.regions import compute_region_outputs, save_region_file

        maps = []
        for name in ("gm_modulated", "pet"):
            img = nb.load(getattr(self.inputs, name))
            if not on_grid(img):
                raise DataError(f"{name}: not on the 121x145x121 grid")
            maps.append(np.asanyarray(img.dataobj, dtype=np.float32))
        payload, gm_table, pet_table = compute_region_outputs(*maps)
        cwd = Path(runtime.cwd)
        self._results["regions"] = str(save_region_file(cwd / "regions.npz", payload))
        self._results["gm_morph"] = str(save_table(cwd / "gm_morph.tsv", gm_table))
        self._results["pet_stats"] = str(save_table(cwd / "pet_stats.tsv", pet_table))
        return runtime
