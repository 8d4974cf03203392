"""offlab.paths.atomic_write: a file is replaced whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from offlab.paths import atomic_write


def test_atomic_write_replaces_the_file_whole_with_opens_permissions(tmp_path):
    path = tmp_path / "sub" / "out.json"
    with atomic_write(path, "w") as f:
        f.write("new")
        assert not path.exists()  # nothing at the path until the block ends
    assert path.read_text() == "new"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    for error in (ValueError, KeyboardInterrupt):
        with pytest.raises(error), atomic_write(path, fsync=True) as f:
            f.write(b"half of a new fi")
            raise error
        assert path.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
