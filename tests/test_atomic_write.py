"""scripts/atomic_write.py: the tools' one atomic-write helper (make_record.py, ab.py and
data/build_local_corpus.py write through it)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from atomic_write import write_atomically  # noqa: E402


def test_bytes_text_and_chunks_are_written_whole(tmp_path: Path):
    target = tmp_path / "deeper" / "file.bin"
    write_atomically(target, b"abc")
    assert target.read_bytes() == b"abc"
    write_atomically(target, "é text")
    assert target.read_bytes() == "é text".encode("utf-8")
    tokens = np.arange(5, dtype="<u2")
    write_atomically(target, [b"head", tokens])
    assert target.read_bytes() == b"head" + tokens.tobytes()
    assert sorted(path.name for path in target.parent.iterdir()) == ["file.bin"]


def test_a_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "summary.json"
    target.write_bytes(b"previous")

    def failing_chunks() -> Iterator[bytes]:
        yield b"half of the new"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, failing_chunks())
    assert target.read_bytes() == b"previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["summary.json"]


def test_the_file_gets_the_mode_a_plain_open_would_give(tmp_path: Path):
    previous = os.umask(0o027)
    try:
        write_atomically(tmp_path / "shared.txt", b"x")
        (tmp_path / "plain.txt").write_bytes(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640
