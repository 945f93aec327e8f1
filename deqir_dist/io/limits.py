"""Caps on what an input file may make the library read or allocate, checked before decoding.

* **Pixels.** An image (or a measurement's image) may have at most ``max_pixels()`` pixels:
  ``DEFAULT_MAX_PIXELS`` = 4096 x 4096 (16.8 M) unless set (``deqir ... --max-pixels N``,
  :func:`set_decode_limits` or the :func:`decode_limits` context). The check reads the size
  from the file's header, before any pixel is decoded, so a small file that claims a huge
  image (a decompression bomb) fails with one line instead of allocating gigabytes.
* **Bytes.** An input file may hold at most ``max_file_bytes()`` bytes: by default
  ``16 * max_pixels() + 1 MiB`` (an uncompressed 16-bit RGBA image is 8 bytes a pixel, a float32
  RGB tensor 12), or an explicit value.
* **Regular files only.** :func:`read_file_bytes` opens with ``O_NONBLOCK`` (a named pipe with
  no writer cannot hang the open) and reads only what ``fstat`` on the open descriptor calls a
  regular file: devices (``/dev/zero``), pipes, sockets and folders are refused without a read.

Every refusal is a :class:`~deqir_dist.errors.DeqirError` with a one-line message.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from deqir_dist.errors import DeqirError, TooLarge, is_int

DEFAULT_MAX_PIXELS = 4096 * 4096
_MIB = 1 << 20

_limits: dict = {"max_pixels": DEFAULT_MAX_PIXELS, "max_bytes": None}
_PILLOW_DEFAULT = 89_478_485           # PIL.Image.MAX_IMAGE_PIXELS as Pillow ships it


def max_pixels() -> int:
    """The current pixel cap (per image)."""
    return _limits["max_pixels"]


def max_file_bytes() -> int:
    """The current byte cap (per input file)."""
    explicit = _limits["max_bytes"]
    return explicit if explicit is not None else 16 * _limits["max_pixels"] + _MIB


def current() -> dict:
    """The caps as a dict (``max_pixels``, ``max_bytes``: None = derived from the pixel cap)."""
    return dict(_limits)


def _check_cap(name: str, value) -> int:
    if not is_int(value) or value < 1:
        raise DeqirError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def set_decode_limits(max_pixels: int | None = None, max_bytes: int | None = None) -> dict:
    """Set the caps (None keeps the pixel cap / derives the byte cap); returns the previous ones."""
    previous = current()
    new = dict(previous)
    if max_pixels is not None:
        new["max_pixels"] = _check_cap("--max-pixels", max_pixels)
    new["max_bytes"] = None if max_bytes is None else _check_cap("the input byte cap", max_bytes)
    _apply(new)
    return previous


def _apply(new: dict) -> None:
    """Set the caps; Pillow's own bomb check (an error at 2 x its MAX_IMAGE_PIXELS, 179 M pixels)
    is raised to follow a larger cap, which every reader checks from the header itself."""
    _limits.update(new)
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = max(_PILLOW_DEFAULT, _limits["max_pixels"])


@contextlib.contextmanager
def decode_limits(max_pixels: int | None = None, max_bytes: int | None = None):
    """The caps inside a ``with`` block (restored afterwards)."""
    previous = set_decode_limits(max_pixels, max_bytes)
    try:
        yield current()
    finally:
        _apply(previous)


def check_pixels(width: int, height: int, what: str = "image") -> None:
    """Raise DeqirError when a ``width`` x ``height`` image is over the pixel cap (or empty)."""
    cap = max_pixels()
    if width < 1 or height < 1:
        raise DeqirError(f"{what} has an empty size {width}x{height}")
    if width * height > cap:
        raise TooLarge(f"{what} of {width}x{height} = {width * height} pixels is over the cap of {cap} pixels "
                         "(--max-pixels)")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, what: str = "input") -> os.stat_result:
    """``stat`` of ``path`` (links followed): a regular file within the byte cap, or DeqirError.

    Nothing is opened, so a device or a pipe is refused without being touched."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DeqirError(f"{what} not found: {p}") from None
    except OSError as e:
        raise DeqirError(f"cannot read {what} {p}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DeqirError(f"{what} {p} is {_kind(st.st_mode)}, not a regular file; only regular files are read")
    _check_size(p, st.st_size, what)
    return st


def _check_size(p: Path, size: int, what: str, cap: int | None = None) -> None:
    why = "16 x --max-pixels + 1 MiB" if cap is None else "a file of this kind is far smaller"
    cap = max_file_bytes() if cap is None else cap
    if size > cap:
        raise TooLarge(f"{what} {p} has {size} bytes, over the cap of {cap} bytes ({why})")


def zip_members(source, what: str) -> tuple[int, bool]:
    """``(declared uncompressed bytes of all members, whether any member is compressed)`` of a zip
    archive (a torch.save file), read from its central directory without inflating anything.
    ``source``: the bytes or a path. A deflated member is what lets a few MB inflate to GB, and
    what torch's ``mmap=True`` would map as raw (compressed) tensor bytes."""
    import io
    import zipfile
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DeqirError(f"cannot read {what}: truncated or corrupt file (not a valid zip archive: {e})") from None
    return sum(i.file_size for i in infos), any(i.compress_type != zipfile.ZIP_STORED for i in infos)


def open_regular(path: str | os.PathLike, flags: int, what: str, mode: int = 0o644) -> int:
    """``os.open`` of a file a job keeps in its output folder (a results log): never through a
    symbolic link (a planted link cannot make the job write outside the folder), never blocking
    (a planted named pipe cannot hang it), and only a regular file (``fstat`` on the descriptor)."""
    p = Path(path)
    extra = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags | extra, mode)
    except OSError as e:
        if os.path.islink(p):
            raise DeqirError(f"{what} {p} is a symbolic link; a job writes only regular files inside its "
                             "output folder: remove the link") from None
        raise DeqirError(f"cannot open {what} {p}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DeqirError(f"{what} {p} is {_kind(st.st_mode)}, not a regular file: remove it")
    return fd


def read_file_bytes(path: str | os.PathLike, what: str = "input", cap: int | None = None) -> bytes:
    """The bytes of a regular file within the byte cap (or ``cap``: small JSON tables); never
    blocks on a pipe, never reads a device."""
    p = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise DeqirError(f"{what} not found: {p}") from None
    except OSError as e:
        raise DeqirError(f"cannot read {what} {p}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeqirError(f"{what} {p} is {_kind(st.st_mode)}, not a regular file; only regular files are read")
        _check_size(p, st.st_size, what, cap)
        cap = max_file_bytes() if cap is None else cap
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(cap + 1 - total, 8 * _MIB))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:                   # the file grew while being read
                _check_size(p, total, what, cap)
        return b"".join(chunks)
    except OSError as e:
        raise DeqirError(f"cannot read {what} {p}: {e.strerror or e}") from None
    finally:
        os.close(fd)
