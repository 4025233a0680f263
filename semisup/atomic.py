"""Writing a file so that readers, and a process killed mid-write, see all of it or none of it.

The bytes go to a uniquely named file beside the target, are flushed to disk, and the file is
renamed over the target (``os.replace``, atomic on POSIX). A failed write leaves the previous
file and no staging file behind. Local paths only; on object stores one PUT is already atomic.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step."""
    target = Path(path)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with staging.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """Replace ``path`` with ``value`` as JSON (a trailing newline; ``default=str``)."""
    write_text_atomic(path, json.dumps(value, indent=indent, default=str) + "\n")
