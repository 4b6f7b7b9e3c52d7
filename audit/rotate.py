"""``fedgate audit rotate``: move the audit file aside without breaking the chain.

Under the appenders' flock on the current file:

1. end it with a checkpoint of its head (when a checkpoint key is configured);
2. write the new file's first line to a temporary file beside it: ``audit.rotated``,
   ``prev_hash`` = the old file's last hash, ``event.sequence`` = its last + 1, the
   old file's final checkpoint copied in ``checkpoint.*`` and its new name in
   ``audit.rotated_from``;
3. hard-link the old file to its new name, then rename the temporary file over the
   path (so the path always names a file: no appender ever starts a fresh chain);
4. unlock: every appender notices the path names another file and continues there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from audit.chain import AuditError, AuditLog
from audit.checkpoints import CHECKPOINT, ROTATED, Checkpoint, Checkpointer, checkpoint_event
from audit.ecs import service_event
from audit.events import rfc3339_ms
from audit.seal import read_line, seal
from audit.tail import head, last_line
from schemas.canonical import dumps

__all__ = ["default_target", "rotate"]


def default_target(path: Path, now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return path.with_name(f"{path.name}.{stamp}")


def rotate(log: AuditLog, target: Path, checkpointer: Checkpointer | None = None) -> int:
    """Rotate ``log.path`` to ``target``; the sequence the new file starts at."""
    if os.path.lexists(target):
        raise AuditError(f"{target} exists: choose another name")
    with log.locked() as fd:
        last_hash, seq, action = head(fd)
        if seq == 0:
            raise AuditError(f"{log.path} is empty: nothing to rotate")
        cp = None
        if checkpointer is not None and action != CHECKPOINT:
            cp = checkpointer.write_locked(log, fd, seq, last_hash)
            last_hash, seq, action = head(fd)
        elif action == CHECKPOINT:
            line = last_line(fd, os.fstat(fd).st_size)
            cp = Checkpoint.from_mapping(read_line(line[:-1]), "checkpoint.")
        now = cp.signed_at if cp is not None else time.time()
        event = (checkpoint_event(cp, ROTATED) if cp is not None else
                 service_event(rfc3339_ms(now), ROTATED))
        event["audit.rotated_from"] = target.name
        event = seal(event, last_hash, seq + 1)
        tmp = log.path.with_name(f".{log.path.name}.rotate.{os.getpid()}.tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            os.write(out, dumps(event) + b"\n")
            os.fsync(out)
        finally:
            os.close(out)
        try:
            os.link(log.path, target)
            os.replace(tmp, log.path)
        except OSError:
            if tmp.exists():
                tmp.unlink()
            raise
        dir_fd = os.open(log.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return seq + 1

