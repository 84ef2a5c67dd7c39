"""bids_siamfuse: MRI + FDG-PET fusion with region-wise siamese networks and attention."""

from ._version import __version__

__all__ = ["__version__"]
