"""The running fedgate's version: ``fedgate --version`` and ``fedgate_build_info``."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def package_version(dist: str = "fedgate") -> str:
    """The installed distribution's version; from a source checkout that is not installed,
    the checkout's pyproject.toml; else "unknown"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    import tomllib

    try:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        if project["name"] == "fedgate":
            return str(project["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return "unknown"
