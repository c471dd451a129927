"""One way to write files: atomic writes, checksums, deterministic PNGs, the output-directory guard.

Every output a stage writes goes to a temporary name in the same folder and is renamed into place
(``os.replace`` is atomic on POSIX), so a killed run never leaves a half-written file under a final
name and a rerun never reads one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipelines.errors import UserError

FILE_MODE = 0o644  # what every written file gets (mkstemp's own 0600 would hide outputs from a team)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, rename it to ``path`` and
    fsync the folder (so the rename itself survives a crash); the file is mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(obj: Any, path: str | Path) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(Path(path), lambda f: f.write(data))


def write_bytes(data: bytes, path: str | Path) -> None:
    atomic_write(Path(path), lambda f: f.write(data))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 swaps the two paths atomically
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where the platform or
    the file system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def replace_dir(new: Path, target: Path, between: Callable[[], None] | None = None) -> None:
    """Put the finished directory ``new`` at ``target`` with no moment where ``target`` is missing
    or partial: a rename when there is none yet, else an atomic exchange (then the old one is
    deleted). Where the file system cannot exchange, the old directory is renamed aside first and
    there is a moment without ``target``. ``between(),`` if given, runs after the swap and before
    the old directory is deleted (the test seam of a kill there)."""
    import shutil

    _fsync_dir(new)
    old = target.parent / f".{target.name}-old"
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        old = new  # the exchange left the old directory at ``new``
    else:
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(new, target)
    _fsync_dir(target.parent)
    if between is not None:
        between()
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of (H, W, 3) RGB or (H, W) grayscale uint8; no metadata, so bytes are deterministic."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


class OutputInUse(UserError):
    """An output directory holds something this run must not touch; the message says what."""


def claim_output(
    out: Path,
    record: str,
    kind: str,
    identity: Mapping[str, Any] | None = None,
    ours: Callable[[Path], bool] | None = None,
    flag: str = "--output",
) -> dict[str, Any] | None:
    """Check that ``out`` may be written by this run, before anything is created in it.

    ``out`` may be missing, empty, or hold an earlier output of the same ``kind`` — recognised
    by its ``record`` file (e.g. ``train.json``), whose ``identity`` keys must equal this run's
    (same data, same settings). Anything else raises ``OutputInUse``: nothing a run did not
    write is ever overwritten. ``ours(path)`` accepts entries of an unfinished earlier run that
    has no record yet (e.g. a state folder). Returns the earlier record, or None.
    """
    if out.exists() and not out.is_dir():
        raise OutputInUse(f"{flag} {out}: exists and is not a directory")
    rec = out / record
    if rec.is_file():
        try:
            prev = json.loads(rec.read_text())
        except ValueError as e:
            raise OutputInUse(
                f"{flag} {out}: {record} is not valid JSON ({e}); give a new directory"
            ) from None
        for key, value in (identity or {}).items():
            if prev.get(key) != value:
                raise OutputInUse(
                    f"{flag} {out} holds a {kind} with another {key} ({prev.get(key)!r}, now {value!r}); "
                    "give a new directory"
                )
        return prev
    if out.is_dir() and any(not (ours and ours(p)) for p in out.iterdir()):
        raise OutputInUse(
            f"{flag} {out} is not empty and holds no {kind} (no {record}); nothing there is "
            "overwritten: give a new or empty directory"
        )
    return None
