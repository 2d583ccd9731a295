"""The one atomic-write helper of the tools (scripts/ and data/build_local_corpus.py).

The trainer has its own `atomic_output` (and `write_atomically` over it), the same idea, because a record folder ships
train_gpt.py alone and it cannot import from here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and restore it
    os.umask(mask)
    return mask


def write_atomically(path: Path, data: bytes | str | Iterable[bytes]) -> None:
    """Write `data` (bytes, text as UTF-8, or chunks) to a temporary file beside `path`, flush it
    to disk, then rename it over `path`: a reader, or a crash, never sees half a file, and a
    failure leaves the previous file as it was and no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
