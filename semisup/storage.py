"""Output folders that may be local paths or URLs Ray accepts (``s3://``, ``gs://``, ...).

The same resolution Ray applies to ``storage_path``: pyarrow filesystems, so that a sweep's
driver and its trials, on other nodes, read and write the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def is_local(out: str) -> bool:
    """Whether OUT is a local path (no scheme, or ``file:``)."""
    return urlsplit(out).scheme in ("", "file")


def child(out: str, *parts: str) -> str:
    """``out`` with ``parts`` appended to its path (a URL keeps its query, e.g. an endpoint)."""
    if is_local(out):
        return str(Path(absolute(out)).joinpath(*parts))
    url = urlsplit(out)
    return urlunsplit(url._replace(path="/".join([url.path.rstrip("/"), *parts])))


def absolute(out: str | Path) -> str:
    """A local OUT as an absolute path (trial processes run elsewhere); a URL as it is."""
    out = str(out)
    if not is_local(out):
        return out
    return str(Path(urlsplit(out).path if out.startswith("file:") else out).resolve())


def filesystem(out: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path of OUT on it): the same resolution Ray applies."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(absolute(out))
    return fs, path.rstrip("/")


def exists(fs: Any, path: str) -> bool:
    """Whether ``path`` exists on the pyarrow filesystem ``fs``."""
    import pyarrow.fs

    return bool(fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound)


def write(fs: Any, path: str, data: str | bytes) -> None:
    """Write ``data`` to ``path`` on ``fs``, creating its folder."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data.encode() if isinstance(data, str) else data)


def read_json(fs: Any, path: str) -> Any:
    """The JSON document at ``path`` on ``fs`` (None when there is none)."""
    if not exists(fs, path):
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.readall())
