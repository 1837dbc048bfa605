"""The installed distribution's version (``pyproject.toml``), read from its metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modelpress")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"
