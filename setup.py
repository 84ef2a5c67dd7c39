"""Setuptools shim; the metadata lives in pyproject.toml."""

from setuptools import setup

if __name__ == "__main__":
    setup()
