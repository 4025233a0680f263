"""Putting a store in place atomically, and deciding whether it needs building at all.

A store is written into a hidden temporary sibling of ``out`` (``.NAME.tmp-XXXXXXXX``) and
renamed to ``out`` only when complete; on any failure the temporary folder is removed, so nothing
is left at ``out``. An existing store is moved aside, replaced, and deleted only after the new
one is in place. Renames stay on one file system because the temporary folder is a sibling.

Whether a build is needed is decided by a fingerprint: a sha256 over the input files' paths,
sizes and modification times, and the options.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from data_prep.errors import PrepError
from semisup.store import TILE_INDEX_FILE, open_store, read_store_meta


class Existing(Enum):
    """What is at ``out`` before a build."""

    ABSENT = "absent"  # nothing, or an empty folder: build and rename into place
    UP_TO_DATE = "up to date"  # a store with the same fingerprint: nothing to do
    REPLACE = "replace"  # a store from other inputs/options, and overwrite was asked for


def fingerprint(files: Sequence[Path | None], options: Mapping[str, Any]) -> str:
    """sha256 hex of every file's absolute path, size and mtime (None entries kept as such) and
    of ``options`` (JSON-serialisable)."""

    def stat(path: Path | None) -> list[Any] | None:
        if path is None:
            return None
        info = path.stat()
        return [os.path.abspath(path), info.st_size, info.st_mtime_ns]

    payload = {"files": [stat(p) for p in files], "options": options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def is_store(path: Path) -> bool:
    """Whether ``path`` looks like a semisup store (a Zarr group with a tile index)."""
    return path.is_dir() and (path / "zarr.json").is_file() and (path / TILE_INDEX_FILE).is_file()


def check_existing(out: Path, expected_fingerprint: str, overwrite: bool) -> Existing:
    """Classify ``out``; raise if it is something that must not be touched.

    A folder that is not a semisup store is never replaced, even with ``overwrite``: deleting
    a folder that some typo pointed at is not a risk worth taking.
    """
    if not out.exists() and not out.is_symlink():
        return Existing.ABSENT
    if out.is_dir() and not any(out.iterdir()):
        return Existing.ABSENT
    if not is_store(out):
        raise PrepError(
            f"{out} exists and is not a semisup store; choose another --out or remove it"
        )
    try:
        stored = read_store_meta(open_store(str(out))).fingerprint
    except (ValueError, KeyError, OSError):
        stored = None  # another format version, or damaged: never up to date
    if stored == expected_fingerprint:
        return Existing.UP_TO_DATE
    if not overwrite:
        raise PrepError(f"{out} exists (built from other inputs/options); pass --overwrite")
    return Existing.REPLACE


@contextmanager
def staged(out: Path, replace: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder path to build in; move it to ``out`` on success.

    On an exception (KeyboardInterrupt included) the temporary folder is removed and ``out``
    is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        _move_into_place(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path, replace: bool) -> None:
    if not replace:
        os.replace(tmp, out)  # also takes over an empty folder
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
