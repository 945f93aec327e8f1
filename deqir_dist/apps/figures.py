"""Pictures for the demo: image grids and convergence plots, drawn with Pillow."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from deqir_dist.io.files import atomic_write

# ----------------------------------------------------------------------------- drawing (Pillow only)

def _font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _to_pil(x: torch.Tensor, zoom: int):
    from PIL import Image
    arr = ((x.detach().cpu().double().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(arr)
    return im.resize((im.width * zoom, im.height * zoom), Image.NEAREST) if zoom > 1 else im


def draw_grid(path, title: str, headers, rows, names, captions=None, zoom: int = 1) -> None:
    """Save a labelled grid: rows[i][j] is a (3, H, W) tensor in [-1, 1]; captions[i][j] a string.
    Cells may differ in size by a few pixels (each is placed at its cell's top left)."""
    from PIL import Image, ImageDraw

    h = max(int(x.shape[-2]) for row in rows for x in row)
    w = max(int(x.shape[-1]) for row in rows for x in row)
    cw, ch = w * zoom, h * zoom
    pad, head, cap = 6, 34, 16
    left = max(70, 12 + 7 * max(len(n) for n in names))     # room for the longest row label
    ncol = len(headers)
    W = left + ncol * (cw + pad) + pad
    H = head + len(rows) * (ch + cap + pad) + pad
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    d.text((pad, 2), title, fill="black", font=font)
    for j, label in enumerate(headers):
        d.text((left + j * (cw + pad) + pad, 18), label, fill="black", font=small)
    for i, row in enumerate(rows):
        y0 = head + i * (ch + cap + pad)
        d.text((pad, y0 + ch // 2 - 6), names[i], fill="black", font=small)
        for j, x in enumerate(row):
            x0 = left + j * (cw + pad) + pad
            img.paste(_to_pil(x, zoom), (x0, y0))
            if captions and captions[i][j]:
                d.text((x0, y0 + ch + 2), captions[i][j], fill=(40, 40, 40), font=small)
    atomic_write(Path(path), lambda fh: img.save(fh, format="PNG"))


_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
            (140, 86, 75)]


def _panel(d, box, series, title, ylabel, hline=None, ylim=None, font=None):
    """One line chart in box = (x0, y0, x1, y1); series: list of (label, [(x, y), ...])."""
    x0, y0, x1, y1 = box
    ml, mb, mt = 46, 28, 22
    px0, py0, px1, py1 = x0 + ml, y0 + mt, x1 - 10, y1 - mb
    d.rectangle((px0, py0, px1, py1), outline="black")
    d.text((x0 + ml, y0 + 4), title, fill="black", font=font)
    pts = [p for _, s in series for p in s if math.isfinite(p[1])]
    if not pts:
        return
    xmax = max(p[0] for p in pts)
    xmin = 1
    lo, hi = ylim if ylim else (min(p[1] for p in pts), max(p[1] for p in pts))
    if hline is not None:
        lo, hi = min(lo, hline), max(hi, hline)
    if hi - lo < 1e-9:
        hi = lo + 1
    span = hi - lo
    lo, hi = lo - 0.05 * span, hi + 0.05 * span

    def X(v):
        return px0 + (v - xmin) / max(xmax - xmin, 1) * (px1 - px0)

    def Y(v):
        return py1 - (min(max(v, lo), hi) - lo) / (hi - lo) * (py1 - py0)

    raw = (hi - lo) / 5                                  # y ticks at a 1-2-5 step
    mag = 10 ** math.floor(math.log10(raw))
    tick = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    v = math.ceil(lo / tick) * tick
    while v <= hi:
        d.line((px0 - 3, Y(v), px0, Y(v)), fill="black")
        d.text((x0 + 2, Y(v) - 6), f"{v:g}", fill="black", font=font)
        v += tick
    step = max(1, round(xmax / 8))
    for v in range(1, int(xmax) + 1, step):              # x ticks
        d.line((X(v), py1, X(v), py1 + 3), fill="black")
        d.text((X(v) - 4, py1 + 4), str(v), fill="black", font=font)
    d.text(((px0 + px1) // 2 - 30, y1 - 13), "iteration k", fill="black", font=font)
    d.text((x0 + 2, y0 + 4 + 12), ylabel, fill=(90, 90, 90), font=font)
    if hline is not None:
        for xs in range(int(px0), int(px1), 8):
            d.line((xs, Y(hline), min(xs + 4, px1), Y(hline)), fill=(120, 120, 120))
    for c, (label, s) in enumerate(series):
        col = _COLOURS[c % len(_COLOURS)]
        pts = [(X(a), Y(b)) for a, b in s if math.isfinite(b)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for p in pts:
            d.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=col)


def _row_change_db(q: float) -> float:
    """The 'rows' stopping quantity (max change / sigma) in dB below the noise level."""
    return -20 * math.log10(q) if q > 0 else math.inf


def draw_convergence(path, conv: dict, stop_tol: float, title: str) -> None:
    """conv: task -> list of {k, psnr_vs_serial, q}; two panels and a legend, Pillow only."""
    from PIL import Image, ImageDraw

    W, H = 980, 400
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = _font(11)
    d.text((10, 4), title, fill="black", font=_font(13))
    cap = 100.0
    s1 = [(t, [(r["k"], min(r["psnr_vs_serial"], cap)) for r in rows]) for t, rows in conv.items()]
    s2 = [(t, [(r["k"], min(_row_change_db(r["q"]), cap)) for r in rows]) for t, rows in conv.items()]
    _panel(d, (0, 24, 400, H - 10), s1, "final image: PSNR vs serial (dB, capped at 100)", "", font=font)
    _panel(d, (410, 24, 810, H - 10), s2, f"largest row change / noise level, -20 log10 (dB); stop at "
           f"{_row_change_db(stop_tol):.1f}", "", hline=_row_change_db(stop_tol), font=font)
    for c, t in enumerate(conv):
        col = _COLOURS[c % len(_COLOURS)]
        y = 60 + 18 * c
        d.line((822, y + 6, 842, y + 6), fill=col, width=3)
        d.text((848, y), t, fill="black", font=font)
    atomic_write(Path(path), lambda fh: img.save(fh, format="PNG"))


def display_measurement(op, y: torch.Tensor, size) -> torch.Tensor:
    """A (B, 3, H, W) picture of the measurement y; ``size`` is H = W or (H, W)."""
    if op.name.startswith("sr_"):
        hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        y = torch.nn.functional.interpolate(y, size=hw, mode="nearest")
    if y.shape[1] == 1:
        y = y.repeat(1, 3, 1, 1)
    return y
