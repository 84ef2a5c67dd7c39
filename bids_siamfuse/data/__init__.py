"""Packaged data and the resolution of external data (templates, atlas) without downloads."""

from importlib.resources import files


def data_path(name: str):
    """Path of a file shipped in this folder."""
    return files(__name__) / name
