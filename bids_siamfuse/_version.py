"""The package version, kept in one place (setup.py, CITATION.cff and the CLI read it)."""

__version__ = "0.1.0"
