"""Inpainting mask generators.

Every generator is a pure function of ``(H, W, **params)`` returning a float32
``(H, W)`` tensor of 0/1 values, where 1 = pixel kept (observed) and 0 = pixel
missing.  Use :func:`make_mask` as the single entry point:

==========  ===================================================  ==========================
kind        missing pixels                                       parameters (defaults)
==========  ===================================================  ==========================
``box``     one centred box of ``fraction`` of the image area,   ``fraction=0.25``
            with the image's aspect ratio (side ``sqrt(f)*H``
            by ``sqrt(f)*W``, rounded)
``random``  each pixel independently with probability            ``fraction=0.5, seed=0``
            ``fraction`` (``torch.Generator`` seeded by ``seed``)
``stripes`` horizontal bands: rows ``r`` with                    ``width=4``
            ``(r // width) % 2 == 1`` (every other band of
            ``width`` rows, starting with a kept band)
``text``    the glyphs of ``text``, drawn with Pillow's default  ``text="DeqIR", lines=4``
            font, scaled to fit a ``H/lines x W`` cell with a
            10% margin (aspect ratio kept), repeated in each of
            the ``lines`` cells from top to bottom
==========  ===================================================  ==========================
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from deqir_dist.errors import DeqirError, TooLarge

MASK_DEFAULTS: dict[str, dict] = {
    "box": {"fraction": 0.25},
    "random": {"fraction": 0.5, "seed": 0},
    "stripes": {"width": 4},
    "text": {"text": "DeqIR", "lines": 4},
}
MASK_KINDS: tuple[str, ...] = tuple(MASK_DEFAULTS)

MAX_TEXT = 256  # characters of a text mask
_FONT_PX = 64  # render size of the text before it is scaled to the image


def mask_params(kind: str, **params) -> dict:
    """Validate ``params`` for mask ``kind`` and return them with defaults filled in."""
    if kind not in MASK_DEFAULTS:
        raise DeqirError(f"unknown mask kind {kind!r}; valid kinds: {', '.join(MASK_KINDS)}")
    unknown = sorted(set(params) - set(MASK_DEFAULTS[kind]))
    if unknown:
        raise DeqirError(
            f"unknown parameter(s) {', '.join(unknown)} for mask {kind!r}; "
            f"valid: {', '.join(MASK_DEFAULTS[kind])}"
        )
    full = {**MASK_DEFAULTS[kind], **params}
    if "fraction" in full:
        f = full["fraction"]
        low = 0.0 if kind == "box" else -math.inf  # a box of zero area is no box
        numeric = isinstance(f, Real) and not isinstance(f, bool)
        if not (numeric and 0 <= f <= 1 and f > low):
            bounds = "(0, 1]" if kind == "box" else "[0, 1]"
            raise DeqirError(f"mask {kind!r} needs fraction in {bounds}, got {f!r}")
        full["fraction"] = float(f)
    for key in ("seed", "width", "lines"):
        if key in full:
            v = full[key]
            minimum = 0 if key == "seed" else 1
            if isinstance(v, bool) or not isinstance(v, Integral) or v < minimum:
                raise DeqirError(f"mask {kind!r} needs integer {key} >= {minimum}, got {v!r}")
            full[key] = int(v)
    if "text" in full:
        t = full["text"]
        if not isinstance(t, str) or not t.strip() or "\n" in t:
            raise DeqirError(f"mask 'text' needs a non-empty one-line string, got {t[:40]!r}")
        if len(t) > MAX_TEXT:   # drawn at 64 px a glyph before scaling: 60,000 characters were a 2 GB canvas
            raise TooLarge(f"mask 'text' has {len(t)} characters, over the cap of {MAX_TEXT} (a line across "
                             "the image holds far fewer legible glyphs)")
    return full


def make_mask(kind: str, H: int, W: int, **params) -> torch.Tensor:
    """Generate mask ``kind`` of size ``(H, W)``: float32 tensor, 1 = keep, 0 = missing."""
    for n, v in (("H", H), ("W", W)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
            raise DeqirError(f"mask size {n} must be a positive integer, got {v!r}")
    p = mask_params(kind, **params)
    if kind == "text" and p["lines"] > H:         # (and a billion lines would be a billion empty cells)
        raise DeqirError(f"mask 'text' with {p['lines']} lines on a {H}x{W} image removes no pixel: use fewer "
                         "lines or a larger image")
    mask = _GENERATORS[kind](int(H), int(W), **p)
    if kind in ("stripes", "text") and bool(mask.all()):
        raise DeqirError(f"mask {kind!r} with {p} removes no pixel of a {H}x{W} image: "
                         f"{'use a narrower width' if kind == 'stripes' else 'use fewer lines or a larger image'}")
    return mask


def box_mask(H: int, W: int, fraction: float) -> torch.Tensor:
    """Centred box of about ``fraction * H * W`` missing pixels."""
    side = math.sqrt(fraction)
    bh, bw = min(H, max(1, round(side * H))), min(W, max(1, round(side * W)))
    top, left = (H - bh) // 2, (W - bw) // 2
    mask = torch.ones(H, W)
    mask[top : top + bh, left : left + bw] = 0
    return mask


def random_mask(H: int, W: int, fraction: float, seed: int) -> torch.Tensor:
    """Each pixel missing independently with probability ``fraction``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(H, W, generator=gen, dtype=torch.float64) >= fraction).float()


def stripes_mask(H: int, W: int, width: int) -> torch.Tensor:
    """Every other horizontal band of ``width`` rows missing (the first band is kept)."""
    keep_rows = (torch.arange(H) // width) % 2 == 0
    return keep_rows.float()[:, None].expand(H, W).contiguous()


def text_mask(H: int, W: int, text: str, lines: int) -> torch.Tensor:
    """``text`` repeated on ``lines`` rows, each scaled to its ``H/lines x W`` cell."""
    glyphs = _render_text(text)  # float array in [0, 1], tight bounding box
    canvas = np.zeros((H, W))
    for k in range(lines):
        top, bottom = round(k * H / lines), round((k + 1) * H / lines)
        cell_h = bottom - top
        scale = 0.9 * min(cell_h / glyphs.shape[0], W / glyphs.shape[1])
        th, tw = max(1, round(glyphs.shape[0] * scale)), max(1, round(glyphs.shape[1] * scale))
        if th > cell_h or tw > W:
            continue
        img = Image.fromarray((glyphs * 255).astype(np.uint8)).resize((tw, th), Image.BILINEAR)
        y0, x0 = top + (cell_h - th) // 2, (W - tw) // 2
        canvas[y0 : y0 + th, x0 : x0 + tw] = np.asarray(img) / 255.0
    return torch.from_numpy(canvas < 0.5).float()


def _render_text(text: str) -> np.ndarray:
    """Draw ``text`` in white on black with Pillow's default font, cropped to its ink."""
    try:
        font = ImageFont.load_default(size=_FONT_PX)
    except TypeError:  # Pillow < 10.1: bitmap default font only
        font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    img = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(img).text((1 - left, 1 - top), text, fill=255, font=font)
    arr = np.asarray(img, dtype=np.float64) / 255.0
    rows, cols = np.nonzero(arr > 0.5)
    if rows.size == 0:  # e.g. characters the font cannot draw
        raise DeqirError(f"mask 'text' string {text!r} draws no visible glyphs")
    return arr[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


_GENERATORS = {"box": box_mask, "random": random_mask, "stripes": stripes_mask, "text": text_mask}
