"""A measurement PNG's description of its operator, in a PNG text chunk.

``deqir degrade`` writes one ``tEXt`` chunk with keyword ``deqir-measurement`` right after the
header: JSON (ASCII) with the task, the operator's full parameters (a random mask's seed, a mask
file's digest), the image shape, the measurement noise sigma_y and the bit depth. ``deqir
restore`` reads it back (:func:`read_description`), so the flags need not be repeated and a
flag that contradicts the file is refused.
"""
from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from deqir_dist.errors import DeqirError, one_line
from deqir_dist.io.limits import check_pixels
from deqir_dist.physics.registry import _REGISTRY

TEXT_KEY = "deqir-measurement"
FORMAT = 1
_SIG = b"\x89PNG\r\n\x1a\n"
NOT_AN_IMAGE = "not an image format Pillow knows (PNG, JPEG, BMP, TIFF, WebP, ...), or a corrupt file"
_MAX_TEXT = 1 << 16           # a description is a few hundred bytes


def text_chunk(key: str, text: str) -> bytes:
    """One PNG ``tEXt`` chunk (keyword and text in Latin-1, CRC included)."""
    body = key.encode("latin-1") + b"\0" + text.encode("latin-1")
    return struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))


def add_text(png: bytes, text: dict[str, str]) -> bytes:
    """``png`` (an encoded file) with a ``tEXt`` chunk per entry, inserted right after IHDR."""
    if not png.startswith(_SIG) or png[12:16] != b"IHDR":
        raise DeqirError("add_text: not a PNG file")
    end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4          # signature, IHDR chunk
    return png[:end] + b"".join(text_chunk(k, v) for k, v in text.items()) + png[end:]


def describe_measurement(op, sigma_y: float, bits: int) -> str:
    """The JSON text of the chunk for a measurement of ``op`` (``op.describe()``)."""
    d = json.loads(json.dumps(op.describe()))
    return json.dumps({"format": FORMAT, "task": d["name"], "image_shape": d["image_shape"],
                       "params": d["params"], "sigma_y": float(sigma_y), "bits": int(bits)},
                      sort_keys=True, ensure_ascii=True)


def read_description(path) -> dict | None:
    """The operator description stored in the PNG at ``path``; None when it has none (a PNG
    from elsewhere, or not a PNG). A chunk that is there but broken is a DeqirError."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(24)
        if head[:8] != _SIG:
            return None
        if head[12:16] == b"IHDR":            # the cap from the header, before Pillow's own bomb check
            check_pixels(*struct.unpack(">II", head[16:24]), f"PNG {p}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # io.limits' cap applies on read
            with Image.open(p) as im:
                raw = im.info.get(TEXT_KEY)      # Pillow reads the text chunks before the pixels
    except UnidentifiedImageError:
        raise DeqirError(f"cannot read {p}: {NOT_AN_IMAGE}") from None
    except Image.DecompressionBombError as e:
        raise DeqirError(f"cannot read {p}: {one_line(e, bare_deqir=True)}") from None
    except OSError as e:
        raise DeqirError(f"cannot read {p}: {one_line(e, bare_deqir=True)}") from None
    if raw is None:
        return None
    try:
        if len(raw) > _MAX_TEXT:
            raise ValueError("too long")
        desc = json.loads(raw)
        if not isinstance(desc, dict) or not isinstance(desc.get("task"), str) \
                or not isinstance(desc.get("params"), dict) or not isinstance(desc.get("image_shape"), list) \
                or len(desc["image_shape"]) != 3 \
                or not all(type(d) is int and d > 0 for d in desc["image_shape"]):
            raise ValueError("needs task, params and image_shape")
        if desc["task"] not in _REGISTRY:
            raise ValueError(f"unknown task {desc['task'][:40]!r}; known: {', '.join(sorted(_REGISTRY))}")
    except (ValueError, TypeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise DeqirError(f"{p}: its {TEXT_KEY} text chunk is not a valid operator description ({why})") from None
    return desc
