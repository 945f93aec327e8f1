"""Image and tensor file I/O with explicit conversions and atomic writes.

Images in memory are (C, H, W) float32 tensors in [-1, 1] with C in {1, 3}.
Every bad input (missing, unreadable or corrupt file, bad tensor, unwritable
destination) raises :class:`~deqir_dist.errors.DeqirError` with a one-line
message naming the file.

Pillow reduces 16-bit colour PNGs to 8 bits, so those (RGB, RGBA and gray+alpha
at 16 bits per sample) are decoded and encoded by the small PNG codec below;
everything else goes through Pillow.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from deqir_dist.errors import DeqirError, one_line
from deqir_dist.io.files import atomic_write
from deqir_dist.io.limits import check_pixels, read_file_bytes
from deqir_dist.io.pngtext import NOT_AN_IMAGE, add_text

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

_LUMA_BT601 = np.array([0.299, 0.587, 0.114])




def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise DeqirError("<what> contains NaN or Inf") unless every element of ``t`` is finite."""
    if not bool(torch.isfinite(t).all()):
        raise DeqirError(f"{what} contains NaN or Inf")


# --------------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike, channels: int = 3) -> torch.Tensor:
    """Read an image file as a (channels, H, W) float32 tensor in [-1, 1].

    Supported: 8- and 16-bit PNG, JPEG and anything else Pillow decodes to modes
    1, L, LA, P, PA, RGB, RGBA, I;16 (and its byte-order variants), I, CMYK, YCbCr.
    Multi-frame files give their first frame; an EXIF Orientation tag is applied
    (the picture comes out upright, as viewers show it; 16-bit colour PNGs too, from their eXIf chunk).

    Conversions, all done in float64 at full precision:

    * samples are scaled by 1/255 (8-bit) or 1/65535 (16-bit: I;16, 16-bit PNG);
      mode I is read as 16-bit gray and must lie in [0, 65535]; mode 1 is 0 or 1;
    * palette (P/PA) images are expanded through their palette to RGB(A);
    * alpha (LA, RGBA, PA, palette or colour-key transparency) is composited over
      a WHITE background: ``c * a + (1 - a)``; the alpha channel is then dropped;
    * CMYK / YCbCr are converted to RGB by Pillow;
    * channels=3: grayscale is replicated to 3 channels;
    * channels=1: colour is reduced to ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B.

    A missing, unreadable, truncated or non-image file raises DeqirError.
    """
    if channels not in (1, 3):
        raise DeqirError(f"read_image: channels must be 1 or 3, got {channels!r}")
    p = Path(path)
    data = read_file_bytes(p, "image file")  # regular files within the byte cap only (io.limits)
    try:
        samples, maxval = _decode(data)
    except DeqirError as e:
        raise type(e)(f"cannot read image {p}: {e}") from e
    except UnidentifiedImageError as e:  # its message names an in-memory buffer, not the file
        raise DeqirError(f"cannot read image {p}: {NOT_AN_IMAGE}") from e
    except Exception as e:  # Pillow / zlib raise many types on corrupt input
        raise DeqirError(f"cannot read image {p}: {one_line(e)}") from e

    f = samples.astype(np.float64) / maxval
    if f.shape[-1] in (2, 4):  # trailing alpha channel
        color, alpha = f[..., :-1], f[..., -1:]
        f = color * alpha + (1.0 - alpha)
    if channels == 1 and f.shape[-1] == 3:
        f = (f @ _LUMA_BT601)[..., None]
    elif channels == 3 and f.shape[-1] == 1:
        f = np.repeat(f, 3, axis=-1)
    out = torch.from_numpy(np.ascontiguousarray(f.transpose(2, 0, 1)))
    return (out * 2 - 1).to(torch.float32)


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) of an image file from its header, nothing decoded (upright: an EXIF
    orientation that turns the picture swaps them); None when Pillow cannot open it (reading
    it reports why)."""
    data = read_file_bytes(path, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                # a PNG's eXIf chunk may follow its pixels, and Pillow's getexif() decodes them all
                # to look there (a 4096 px PNG: +64 MB before any check): the chunks are scanned instead
                orientation = _png_exif_orientation(data) if data.startswith(_PNG_SIG) else \
                    im.getexif().get(0x0112, 1)
                turned = orientation in (5, 6, 7, 8)
    except Exception:          # noqa: BLE001 - read_image gives the one-line reason
        return None
    return (h, w) if turned else (w, h)


def _png_exif_orientation(data: bytes) -> int:
    """The EXIF Orientation of a PNG from its eXIf chunk, found by walking the chunk headers (no
    pixel is inflated); 1 without one, or when the chunk list is broken (its read says why)."""
    pos = len(_PNG_SIG)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if ctype == b"eXIf":
            return _exif_orientation(data[pos + 8 : pos + 8 + length])
        if ctype == b"IEND":
            break
        pos += 12 + length
    return 1


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    """Fully decode ``data`` to (H, W, K) unsigned samples (K: L, LA, RGB or RGBA) and their max."""
    if _png_needs_own_decoder(data[:_PNG_HEAD_LEN]):
        arr, exif = _png16_decode(data)
        return _orient(arr, _exif_orientation(exif)), 65535

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # io.limits' cap applies instead
        im = Image.open(io.BytesIO(data))
    with im:
        check_pixels(*im.size)  # from the header, before any pixel is decoded
        im.load()  # Pillow is lazy: force the full decode here
        im = _upright(im)
        mode = im.mode
        if mode == "1":
            im, mode = im.convert("L"), "L"
        elif mode in ("P", "PA"):
            has_alpha = mode == "PA" or "transparency" in im.info
            mode = "RGBA" if has_alpha else "RGB"
            im = im.convert(mode)
        elif mode in ("CMYK", "YCbCr"):
            im, mode = im.convert("RGB"), "RGB"
        elif mode not in ("L", "LA", "RGB", "RGBA", "I") and not mode.startswith("I;16"):
            raise DeqirError(f"unsupported image mode {mode!r}")
        arr = np.asarray(im)
        key = im.info.get("transparency")

    if arr.ndim == 2:
        arr = arr[..., None]
    maxval = 255
    if mode == "I" or mode.startswith("I;16"):
        maxval = 65535
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            raise DeqirError("mode I samples outside the 16-bit range [0, 65535]")
        arr = arr.astype(np.uint16)
    if key is not None and arr.shape[-1] in (1, 3) and not isinstance(key, bytes):
        # Colour-key transparency (PNG tRNS): matching pixels are fully transparent.
        opaque = ~np.all(arr == np.asarray(key, dtype=arr.dtype).reshape(-1), axis=-1)
        arr = np.concatenate([arr, (opaque * maxval).astype(arr.dtype)[..., None]], axis=-1)
    return arr, maxval


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF Orientation tag says (phone photos), or ``im`` itself without one."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as viewers do
        return im
    return ImageOps.exif_transpose(im) if orientation in (2, 3, 4, 5, 6, 7, 8) else im


def _exif_orientation(exif: bytes | None) -> int:
    """The Orientation tag (1-8) of a raw EXIF block (a PNG eXIf chunk); 1 without one or when the
    block is broken (ignored, as viewers do)."""
    if not exif:
        return 1
    try:
        tags = Image.Exif()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # Pillow warns of a corrupt block before it gives up
            tags.load(exif)
        orientation = tags.get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as viewers do
        return 1
    return orientation if orientation in (1, 2, 3, 4, 5, 6, 7, 8) else 1


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, K) samples turned upright for EXIF ``orientation``: the transposes ``_upright`` makes
    Pillow do (2 mirror, 3 half turn, 4 flip, 5 transpose, 6 quarter turn clockwise, 7 transverse,
    8 quarter turn anticlockwise)."""
    if orientation in (5, 6, 7, 8):
        arr = arr.transpose(1, 0, 2)                     # 5; 6, 7, 8 start from the transpose
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        arr = arr[:, ::-1]
    if orientation in (3, 4):
        arr = arr[::-1]
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- 16-bit PNG codec

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_HEAD_LEN = 8 + 8 + 13  # signature, IHDR length+type, IHDR data
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel
# Adam7 passes: (x0, y0, dx, dy)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_needs_own_decoder(head: bytes) -> bool:
    """True for 16-bit PNGs with colour or alpha (Pillow would drop them to 8 bits)."""
    if len(head) < _PNG_HEAD_LEN or not head.startswith(_PNG_SIG) or head[12:16] != b"IHDR":
        return False
    bit_depth, color_type = head[24], head[25]
    return bit_depth == 16 and color_type in (2, 4, 6)


def _png_chunks(data: bytes):
    pos = len(_PNG_SIG)
    while True:
        if pos + 8 > len(data):
            raise DeqirError("PNG is truncated (missing IEND)")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise DeqirError("PNG is truncated")
        body = data[pos + 8 : end]
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(ctype + body) != crc:
            raise DeqirError(f"PNG chunk {ctype.decode('latin-1')!r} has a bad CRC")
        yield ctype, body
        if ctype == b"IEND":
            return
        pos = end + 4


def _png16_decode(data: bytes) -> tuple[np.ndarray, bytes | None]:
    """Decode a 16-bit PNG (any colour type, optionally Adam7) to (H, W, K) uint16, and its eXIf
    chunk (raw EXIF, or None)."""
    if not data.startswith(_PNG_SIG):
        raise DeqirError("not a PNG file")
    ihdr, idat, trns, exif = None, [], None, None
    for ctype, body in _png_chunks(data):
        if ctype == b"IHDR":
            ihdr = body
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"tRNS":
            trns = body
        elif ctype == b"eXIf":
            exif = body
    if ihdr is None or len(ihdr) != 13 or not idat:
        raise DeqirError("PNG lacks a valid IHDR or IDAT")
    w, h, depth, color_type, comp, filt, interlace = struct.unpack(">IIBBBBB", ihdr)
    if depth != 16 or color_type not in _PNG_CHANNELS or comp or filt or interlace > 1 or not w or not h:
        raise DeqirError("unsupported or invalid PNG header")
    check_pixels(w, h, "PNG")  # io.limits' cap, before anything is decompressed
    k = _PNG_CHANNELS[color_type]
    bpp = 2 * k
    passes = []  # (x0, y0, dx, dy, width, height) of each non-empty (sub)image
    for x0, y0, dx, dy in _ADAM7 if interlace else [(0, 0, 1, 1)]:
        pw, ph = (w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy
        if pw > 0 and ph > 0:
            passes.append((x0, y0, dx, dy, pw, ph))
    expected = sum(ph * (1 + pw * bpp) for *_, pw, ph in passes)
    raw = zlib.decompressobj().decompress(b"".join(idat), expected)  # bounded output
    if len(raw) < expected:
        raise DeqirError("PNG image data is truncated")

    out = np.empty((h, w, k), dtype=np.uint16)
    pos = 0
    for x0, y0, dx, dy, pw, ph in passes:
        size = ph * (1 + pw * bpp)
        rows = _unfilter(raw[pos : pos + size], pw, ph, bpp)
        out[y0::dy, x0::dx] = rows.view(">u2").reshape(ph, pw, k)
        pos += size

    if trns is not None and k in (1, 3) and len(trns) == 2 * k:
        key = np.frombuffer(trns, dtype=">u2")
        opaque = ~np.all(out == key, axis=-1)
        out = np.concatenate([out, (opaque * 65535).astype(np.uint16)[..., None]], axis=-1)
    return out, exif


def _unfilter(data: bytes, w: int, h: int, bpp: int) -> np.ndarray:
    """Undo PNG row filters; returns (h, w * bpp) uint8."""
    stride = w * bpp
    rows = np.frombuffer(data, dtype=np.uint8).reshape(h, stride + 1)
    out = np.empty((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        ftype, line = rows[y, 0], rows[y, 1:]
        if ftype == 0:
            cur = line.copy()
        elif ftype == 1:  # Sub: running sum (mod 256) along the pixels of each byte lane
            cur = np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.uint8).reshape(stride)
        elif ftype == 2:  # Up
            cur = line + prev
        elif ftype in (3, 4):  # Average / Paeth: sequential, done byte by byte
            cur = np.frombuffer(_unfilter_seq(ftype, line.tobytes(), prev.tobytes(), bpp), np.uint8)
        else:
            raise DeqirError(f"invalid PNG filter type {ftype}")
        out[y] = cur
        prev = out[y]
    return out


def _unfilter_seq(ftype: int, line: bytes, prev: bytes, bpp: int) -> bytearray:
    cur = bytearray(line)
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if ftype == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 0xFF
        else:
            c = prev[i - bpp] if i >= bpp else 0
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (cur[i] + pred) & 0xFF
    return cur


def _png16_encode(samples: np.ndarray) -> bytes:
    """Encode (H, W, 1 | 3) uint16 samples as a 16-bit gray or RGB PNG (no row filter)."""
    h, w, k = samples.shape
    color_type = {1: 0, 3: 2}[k]
    rows = samples.astype(">u2").reshape(h, w * k).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rows], axis=1).tobytes()

    def chunk(ctype: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return _PNG_SIG + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_image(path: str | os.PathLike, x: torch.Tensor, bits: int = 8, text: dict[str, str] | None = None) -> None:
    """Write a (C, H, W) image in [-1, 1], C in {1, 3}, as an 8- or 16-bit PNG, atomically.

    Values are clamped to [-1, 1], mapped to [0, 1] and rounded to the nearest
    code (x 255 or x 65535). The path must end in .png and its directory must
    exist and be writable. NaN/Inf in ``x`` raise DeqirError; nothing is written
    then, and a failed write leaves neither a partial file nor a temp file.
    ``text``: PNG text chunks {keyword: Latin-1 text} (io.pngtext; deqir degrade's description).
    """
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise DeqirError(f"write_image writes PNG files; expected a .png path, got {p}")
    if bits not in (8, 16):
        raise DeqirError(f"write_image: bits must be 8 or 16, got {bits!r}")
    if not isinstance(x, torch.Tensor):
        raise DeqirError(f"write_image: expected a torch.Tensor for {p}, got {type(x).__name__}")
    if x.ndim != 3 or x.shape[0] not in (1, 3) or x.shape[1] == 0 or x.shape[2] == 0:
        raise DeqirError(
            f"write_image: expected a (C, H, W) tensor with C in {{1, 3}} for {p}, "
            f"got shape {tuple(x.shape)}"
        )
    if x.is_complex():
        raise DeqirError(f"write_image: complex tensor for {p}")
    check_finite(x, f"image for {p}")

    maxval = 255 if bits == 8 else 65535
    u = (x.detach().to("cpu", torch.float64).clamp(-1, 1) + 1) / 2
    codes = torch.round(u * maxval).permute(1, 2, 0).numpy()
    if bits == 8:
        arr = codes.astype(np.uint8)
        im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        if not text:
            atomic_write(p, lambda fh: im.save(fh, format="PNG"))
            return
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        data = _png16_encode(codes.astype(np.uint16))
    if text:
        data = add_text(data, text)
    atomic_write(p, lambda fh: fh.write(data))


# --------------------------------------------------------------------------- tensors


def write_tensor(path: str | os.PathLike, t: torch.Tensor) -> None:
    """Save a tensor (detached, on CPU, compacted) to ``path`` with torch.save, atomically."""
    if not isinstance(t, torch.Tensor):
        raise DeqirError(f"write_tensor: expected a torch.Tensor for {path}, got {type(t).__name__}")
    t = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    atomic_write(path, lambda fh: torch.save(t, fh))


def read_tensor(path: str | os.PathLike) -> torch.Tensor:
    """Load a tensor saved by :func:`write_tensor` (weights_only, onto CPU).

    A missing, corrupt or truncated file, or one that does not hold a single
    tensor, raises DeqirError.
    """
    p = Path(path)
    buf = io.BytesIO(read_file_bytes(p, "tensor file"))  # a regular file within the byte cap
    try:
        obj = torch.load(buf, weights_only=True, map_location="cpu")
    except Exception as e:  # pickle / zip / EOF / RuntimeError on corrupt input
        raise DeqirError(f"cannot read tensor file {p}: {one_line(e)}") from e
    if not isinstance(obj, torch.Tensor):
        raise DeqirError(f"tensor file {p} holds a {type(obj).__name__}, not a tensor")
    return obj


# --------------------------------------------------------------------------- folders


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files in ``folder`` (non-recursive).

    Image files have a suffix in IMAGE_SUFFIXES (case-insensitive); hidden files
    (name starting with '.') are skipped. A missing folder raises DeqirError.
    """
    d = Path(folder)
    if not d.is_dir():
        raise DeqirError(f"image folder not found or not a directory: {d}")
    return sorted(
        f
        for f in d.iterdir()
        if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()
    )
