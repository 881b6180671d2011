"""Writing results so that a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: The process's umask, read once at import (reading it means setting it for a moment).
_UMASK = _read_umask()


def write_text_atomic(path: "Path | str", text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and an atomic rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: "Path | str", data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # as a new file from open() would be (mkstemp makes it owner-only)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: "Path | str", payload) -> None:
    """JSON version of :func:`write_text_atomic` (non-JSON values written with ``str``)."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")
