"""Where offlab keeps things (OFFLAB_HOME, default ~/.offlab, and the repository folders it reads) and how it
writes a file there all at once."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def home() -> Path:
    """OFFLAB_HOME, default ~/.offlab; read on every call so tests can point it elsewhere."""
    return Path(os.environ.get("OFFLAB_HOME", Path.home() / ".offlab")).expanduser()


def datasets_dir() -> Path:
    """The dataset cache: one folder per dataset name."""
    return home() / "datasets"


def staging_dir() -> Path:
    """Temporary folders for atomic writes; on the same filesystem as the cache so rename is atomic."""
    return home() / ".staging"


def locks_dir() -> Path:
    """Lock files that serialise work two offlab processes could otherwise do at once (`file_lock`)."""
    return home() / ".locks"


def catalog_dir() -> Path:
    """The shipped catalog, behaviour policies and recipes (the repository's datasets/ folder)."""
    return Path(os.environ.get("OFFLAB_CATALOG_DIR", REPO_ROOT / "datasets"))


def evaluators_dir() -> Path:
    return REPO_ROOT / "evaluators"


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", *, fsync: bool = False) -> Iterator[IO]:
    """Write `path` all at once: yield a temporary file beside it, rename it over `path` on a clean exit.

    Readers see the old file or the new one, never half of one. On an error (or Ctrl-C) the temporary
    file is removed and `path` is left as it was. The file gets the permissions `open` would give it.
    `fsync` forces the bytes to disk before the rename (checkpoints, which must survive a power cut).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `path` (created if missing) until the block ends; yields True.

    Serialises work that processes started side by side would otherwise race on (building a missing dataset,
    creating a fresh MLflow store, training one run). With `wait=False` it yields False at once, holding
    nothing, when another process holds the lock. The lock goes with its process: a killed holder frees it.
    A no-op (yields True) where fcntl is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_arrays(folder: str, key: list, make: Callable[[], tuple]) -> tuple[tuple, bool]:
    """`make()`'s tuple of arrays and numbers, kept on disk at OFFLAB_HOME/<folder>/<digest of key>.npz and
    read back bit for bit by later calls with the same key; returns (value, whether it was read from disk).

    `key` (JSON-serialisable) must name everything the value depends on, a digest of the input data included.
    A damaged file is computed again and replaced; a cache that cannot be written (read-only or full
    OFFLAB_HOME) is skipped, never an error.
    """
    import numpy as np

    path = cached_path(folder, key)
    if path.is_file():
        try:
            with np.load(path) as f:
                arrays = [f[f"v{i}"] for i in range(len(f.files))]  # each read once: NpzFile reads on every access
            return tuple(a if a.ndim else a.item() for a in arrays), True
        except (OSError, ValueError, KeyError):
            pass
    value = make()
    try:
        with atomic_write(path) as f:
            np.savez(f, **{f"v{i}": np.asarray(v) for i, v in enumerate(value)})
    except OSError:
        pass
    return value, False


def cached_path(folder: str, key: list) -> Path:
    """Where `cached_arrays` keeps the value for `key` (it exists once a value was stored)."""
    import hashlib
    import json

    return home() / folder / f"{hashlib.blake2b(json.dumps(key).encode(), digest_size=16).hexdigest()}.npz"


def digest(*arrays: Any) -> str:
    """A short hex digest of the arrays' bytes (contiguous copies where needed)."""
    import hashlib

    import numpy as np

    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
