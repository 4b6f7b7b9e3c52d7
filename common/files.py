"""Small durable file operations shared by both sides (audit sidecars, ship state)."""

from __future__ import annotations

import os
from pathlib import Path


def replace_durably(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data`` atomically and durably: a temporary file beside it,
    fsync, rename over ``path``, fsync of the directory (a crash leaves old or new)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
