"""The packaged AAL atlas, and nilearn's layout as the alternative source."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from bids_siamfuse.data import atlas


def test_packaged_atlas_offline(monkeypatch, tmp_path):
    monkeypatch.delenv(atlas.SOURCE_ENV, raising=False)
    # a nilearn folder that holds nothing: the packaged copy must not need it
    monkeypatch.setenv("NILEARN_DATA", str(tmp_path / "empty"))
    aal = atlas.load_atlas()
    assert aal.n_regions == 116
    assert aal.codes[0] == 2001 and aal.codes[-1] == 9170
    assert aal.names[0] == "Precentral_L" and aal.names[-1] == "Vermis_10"
    assert set(np.unique(aal.labels)) == set(range(117))
    assert aal.labels.shape == (121, 145, 121)


def test_nilearn_layout_gives_the_same_atlas(monkeypatch, tmp_path):
    """NILEARN_DATA laid out as nilearn's fetcher leaves it: same labels, same signature."""
    folder = tmp_path / "nilearn_data" / "aal_SPM8" / "aal_for_SPM8"
    folder.mkdir(parents=True)
    with gzip.open(atlas.PACKAGED_AAL / "ROI_MNI_V4.nii.gz", "rb") as src:
        (folder / "ROI_MNI_V4.nii").write_bytes(src.read())
    shutil.copy(atlas.PACKAGED_AAL / "ROI_MNI_V4.txt", folder / "ROI_MNI_V4.txt")
    monkeypatch.setenv("NILEARN_DATA", str(tmp_path / "nilearn_data"))
    monkeypatch.delenv(atlas.SOURCE_ENV, raising=False)
    packaged = atlas.load_atlas()
    monkeypatch.setenv(atlas.SOURCE_ENV, "nilearn")
    from_nilearn = atlas.load_atlas()
    assert from_nilearn.source.endswith("ROI_MNI_V4.nii")
    assert from_nilearn.names == packaged.names
    assert from_nilearn.codes == packaged.codes
    assert np.array_equal(from_nilearn.labels, packaged.labels)
    assert from_nilearn.signature() == packaged.signature()


def test_unknown_source_is_refused(monkeypatch):
    monkeypatch.setenv(atlas.SOURCE_ENV, "internet")
    with pytest.raises(atlas.NoInputError, match="expected 'package' or 'nilearn'"):
        atlas.fetch_aal_files()
