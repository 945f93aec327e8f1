"""Files and folders: atomic writes, writable and creatable folders."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from deqir_dist.errors import DeqirError, one_line

# --------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write via ``write(fileobj)`` to a temp file in the target directory, then os.replace.

    On any failure the temp file is removed and the target is left untouched.
    """
    p = Path(path)
    parent = p.parent
    if not parent.is_dir():
        raise DeqirError(f"cannot write {p}: directory {parent} does not exist or is not a directory")
    tmp = parent / f".{p.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        fh = open(tmp, "xb")
    except OSError as e:
        raise DeqirError(f"cannot write {p}: directory {parent} is not writable ({one_line(e)})") from e
    try:
        with fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise DeqirError(f"cannot write {p}: {one_line(e)}") from e
        raise


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create directory ``path`` (with parents) if needed and check that files can be created in it."""
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:          # a file, or a link that leads nowhere (dangling, or a loop)
        what = "a symbolic link that leads to no folder (dangling, or a loop)" if d.is_symlink() else \
            "a file, not a folder"
        raise DeqirError(f"cannot create directory {d}: it is {what}") from e
    except OSError as e:
        raise DeqirError(f"cannot create directory {d}: {one_line(e)}") from e
    _probe_writable(d, f"directory {d} is not writable")
    return d


def _probe_writable(d: Path, what: str) -> None:
    probe = d / f".deqir-write-test-{uuid.uuid4().hex[:12]}"
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as e:
        raise DeqirError(f"{what}: {one_line(e)}") from e


def check_dir_creatable(path: str | os.PathLike) -> None:
    """Directory ``path`` exists and is writable, or can be created: checked without creating anything."""
    d = p = Path(path)
    while not p.exists():
        if p.is_symlink() or p == p.parent:
            raise DeqirError(f"cannot create directory {d}: {p} is a broken link")
        p = p.parent
    if not p.is_dir():
        raise DeqirError(f"cannot create directory {d}: {p} is not a directory")
    _probe_writable(p, f"directory {d} is not writable" if p == d else f"cannot create directory {d} in {p}")
