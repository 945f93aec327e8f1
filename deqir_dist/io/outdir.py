"""An output folder held by one job: an exclusive lock for the whole job, and staged outputs.

``with OutputFolder(out, "restore") as folder:`` creates ``out`` if needed (remembering what it
created), then takes an exclusive ``fcntl.flock`` on ``out/.deqir.lock`` and writes the holder
(pid, host, command) into it. A second job on the same folder fails at once with one line that
names the holder. The kernel drops the lock when the holder exits, however it ends, so a lock
left by a killed job is stale and the next job takes it. On exit the lock file is removed (the
inode is checked after locking, so a job that opened the file just before it was removed tries
again) and, if the block raised, the folders the job created are removed while empty.

:class:`Staging` writes a job's files into a hidden folder inside ``out`` and moves them into
place only by :meth:`Staging.commit`; :meth:`Staging.abort` removes them, leaving ``out`` as it
was. Staging folders left by a killed job are removed by the next job that holds the lock.
The lock needs a file system with working ``flock`` (local disks; not every network mount).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path

from deqir_dist.errors import DeqirError, one_line
from deqir_dist.io.files import ensure_writable_dir

LOCK_NAME = ".deqir.lock"
STAGING_PREFIX = ".deqir-staging-"
_HELD: dict[str, OutputFolder] = {}        # folders this process holds (real path -> holder)


def _holder_line(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another deqir job"
    cmd = " ".join(str(info.get("command", "?")).split())[:160]
    return f"pid {info.get('pid')} on {info.get('host', '?')} ({cmd})"


class OutputFolder:
    """The output folder of one job, locked for the job (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, command: str | None = None):
        self.path = Path(path)
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.created: list[Path] = []
        self._fd: int | None = None
        self._nested = False

    # ---------------------------------------------------------------- folder
    def _make(self) -> None:
        missing, p = [], self.path
        while not os.path.lexists(p) and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            ensure_writable_dir(self.path)
        finally:
            self.created = [m for m in reversed(missing) if m.is_dir()]     # outermost first

    def remove_created(self) -> None:
        """Remove the folders this job created, innermost first, while they are empty."""
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                d.rmdir()
        self.created = []

    # ---------------------------------------------------------------- lock
    def _lock(self) -> None:
        lock = self.path / LOCK_NAME
        for _ in range(20):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:
                raise DeqirError(f"cannot lock output folder {self.path}: {one_line(e)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_line(fd)
                os.close(fd)
                raise DeqirError(f"output folder {self.path} is in use by {holder}; wait for that job to end "
                                 "or choose another output folder") from None
            except OSError as e:
                os.close(fd)
                raise DeqirError(f"cannot lock output folder {self.path}: {one_line(e)}") from None
            try:
                same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:                  # the holder removed it as we opened it: take the new one
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
            except OSError as e:
                os.close(fd)
                raise DeqirError(f"cannot write the lock of output folder {self.path}: {one_line(e)}") from None
            self._fd = fd
            return
        raise DeqirError(f"cannot lock output folder {self.path}: its lock file keeps changing")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK_NAME)       # still holding the lock: no one else uses this inode
        os.close(self._fd)
        self._fd = None

    def remove_stale_staging(self) -> None:
        """Staging folders of jobs that were killed (only called while holding the lock)."""
        with contextlib.suppress(OSError):
            for d in self.path.iterdir():
                if d.name.startswith(STAGING_PREFIX) and d.is_dir() and not d.is_symlink():
                    shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> OutputFolder:
        key = os.path.realpath(self.path)
        if key in _HELD:                  # this process holds it already (the CLI around a library call)
            self._nested = True
            return self
        self._make()
        try:
            self._lock()
        except BaseException:
            self.remove_created()
            raise
        self._key = os.path.realpath(self.path)
        _HELD[self._key] = self
        self.remove_stale_staging()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._nested:
            self._nested = False
            return
        _HELD.pop(self._key, None)
        self.release()
        if exc_type is not None:
            self.remove_created()


class Staging:
    """Files of a job written under ``out/.deqir-staging-*`` and moved into ``out`` at the end."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.dir: Path | None = None
        self.names: list[str] = []

    def path(self, name: str) -> Path:
        """Where to write ``out/name`` until :meth:`commit`."""
        if self.dir is None:
            d = self.out / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                d.mkdir()
            except OSError as e:
                raise DeqirError(f"cannot write to {self.out}: {one_line(e)}") from None
            self.dir = d
        self.names.append(name)
        return self.dir / name

    def commit(self, summary: str | None = None) -> list[Path]:
        """Move every staged file into ``out`` (each by one rename); returns their final paths.

        ``summary``: the name of a staged file that describes the others (summary.json). The
        renames are one by one, so a kill (or a failure) can stop the commit half way; a summary
        must then never describe a folder it does not: the old ``out/summary`` is removed *before*
        the first rename, and the new one, staged like the pictures (so a disk that is full fails
        before anything moved), is renamed *last*. At every instant the folder holds either the
        old summary over the old files, no summary (a commit in progress or interrupted: the
        files are those of two jobs, and nothing claims otherwise), or the new summary over all
        the new files."""
        if summary is not None:
            self.names = [n for n in self.names if n != summary] + [summary]
            old = self.out / summary
            if old.is_symlink() or old.is_file():
                try:
                    os.unlink(old)
                except OSError as e:
                    raise DeqirError(f"cannot replace {old}: {one_line(e)}") from None
        done = []
        for name in self.names:
            src, dst = self.dir / name, self.out / name
            if dst.is_dir() and not dst.is_symlink():
                raise DeqirError(f"cannot write {dst}: it is a folder")
            try:
                os.replace(src, dst)
            except OSError as e:
                raise DeqirError(f"cannot write {dst}: {one_line(e)}") from None
            done.append(dst)
        self.abort()
        return done

    def public(self, message: str) -> str:
        """``message`` with the hidden staging folder's paths shown as the outputs' own."""
        return message if self.dir is None else message.replace(str(self.dir), str(self.out))

    def abort(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir, self.names = None, []
