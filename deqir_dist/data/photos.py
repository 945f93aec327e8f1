"""Photographs and crops: scikit-image's photos, resizing, crops, held-out images."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import torch

from deqir_dist.errors import DeqirError

# Natural colour photographs shipped inside scikit-image (checked: all load offline from
# skimage/data). motorcycle_left/right are the two views of one stereo pair (both trained on).
TRAIN_IMAGES = ("astronaut", "rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
                "immunohistochemistry", "retina")
HELDOUT_IMAGES = ("chelsea", "coffee")
HELDOUT_SHORT = 256          # short side of the held-out photographs stored in the weights file


# ----------------------------------------------------------------------------- data

def _skimage_data():
    try:
        from skimage import data
    except ImportError:
        raise DeqirError("training the prior needs scikit-image (pip install -e '.[train]'): "
                         "its bundled photographs are the training data") from None
    return data


def load_skimage_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB photograph ``name`` from scikit-image's bundled data (no network)."""
    data = _skimage_data()
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    else:
        fn = getattr(data, name, None)
        if fn is None:
            raise DeqirError(f"scikit-image has no bundled image {name!r}")
        try:
            img = fn()
        except Exception as e:  # noqa: BLE001 - e.g. an image that would need a download
            raise DeqirError(f"cannot load skimage.data.{name}() offline: {type(e).__name__}: {e}") from None
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] < 3:
        raise DeqirError(f"skimage.data.{name} is not a colour image (shape {img.shape})")
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def resize_short(img: np.ndarray, short: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image so its short side is ``short`` (Pillow bicubic, antialiased)."""
    from PIL import Image
    h, w = img.shape[:2]
    s = short / min(h, w)
    size = (max(short, round(w * s)), max(short, round(h * s)))   # PIL: (width, height)
    if size == (w, h):
        return img.copy()
    return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window of a (C, H, W) tensor."""
    _, h, w = x.shape
    if h < size or w < size:
        raise DeqirError(f"cannot take a {size}x{size} crop of a {h}x{w} image")
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top:top + size, left:left + size]


class CropSampler:
    """Random augmented crops from an image pyramid; all draws come from one ``torch.Generator``."""

    def __init__(self, images: dict[str, np.ndarray], min_short: int, max_short: int, levels: int,
                 seed: int):
        if not images:
            raise DeqirError("no training images")
        self.names = list(images)
        self.pyramids: list[list[torch.Tensor]] = []
        self.shorts = []
        for name in self.names:
            img = images[name]
            top = min(max_short, min(img.shape[:2]))
            lo = min(min_short, top)
            shorts = sorted({int(round(lo * (top / lo) ** (i / max(levels - 1, 1)))) for i in range(levels)})
            self.shorts.append(shorts)
            self.pyramids.append([torch.from_numpy(resize_short(img, s).copy()).permute(2, 0, 1).contiguous()
                                  for s in shorts])
        self.gen = torch.Generator().manual_seed(seed)

    def _randint(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.gen))

    def batch(self, n: int, size: int) -> torch.Tensor:
        """(n, 3, size, size) float32 crops in [-1, 1]."""
        out = torch.empty((n, 3, size, size), dtype=torch.uint8)
        for b in range(n):
            levels = self.pyramids[self._randint(len(self.pyramids))]
            img = levels[self._randint(len(levels))]
            _, h, w = img.shape
            if h < size or w < size:
                raise DeqirError(f"crop {size} is larger than a training image at its smallest scale ({h}x{w})")
            top, left = self._randint(h - size + 1), self._randint(w - size + 1)
            crop = img[:, top:top + size, left:left + size]
            k = self._randint(8)
            if k & 4:
                crop = crop.flip(2)
            out[b] = torch.rot90(crop, k & 3, dims=(1, 2))
        return out.float() / 127.5 - 1.0


def heldout_crops(images: dict[str, np.ndarray], size: int, n: int, short_factor: float = 2.0) -> torch.Tensor:
    """n deterministic (3, size, size) crops in [-1, 1] of the held-out photographs.

    Each photograph is resized to a short side of ``short_factor * size`` (never enlarged past
    its own short side, never below ``size``); crop j of an image is the centre crop for j = 0,
    then positions on a fixed ring around the centre.
    """
    names = list(images)
    if not names:
        raise DeqirError("no held-out images")
    out = []
    offsets = [(0.0, 0.0), (-0.5, -0.5), (0.5, 0.5), (-0.5, 0.5), (0.5, -0.5), (0.0, -0.5), (0.0, 0.5),
               (-0.5, 0.0), (0.5, 0.0)]
    for j in range(n):
        name = names[j % len(names)]
        ring = j // len(names)
        short = max(size, min(round(short_factor * size), min(images[name].shape[:2])))
        x = to_tensor(resize_short(images[name], short))
        _, h, w = x.shape
        dy, dx = offsets[ring % len(offsets)]
        top = int(round((h - size) / 2 * (1 + dy)))
        left = int(round((w - size) / 2 * (1 + dx)))
        out.append(x[:, top:top + size, left:left + size])
    return torch.stack(out)


# ----------------------------------------------------------------------------- held-out PNGs

def _stored_heldout(img: np.ndarray) -> np.ndarray:
    """A held-out photograph as stored with the weights: short side at most HELDOUT_SHORT."""
    return resize_short(img, min(HELDOUT_SHORT, min(img.shape[:2])))


def stored_photo_folder(folder) -> dict:
    """name -> every PNG in ``folder`` as the weights file stores a held-out photograph (short
    side at most HELDOUT_SHORT): held-out photographs from a folder (bench/prior_data.py's heldout/)
    that benchmarks crop exactly as they crop the stored ones. DeqirError when there is none."""
    from PIL import Image
    out = {}
    for f in sorted(Path(folder).glob("*.png")):
        with Image.open(f) as im:
            out[f.stem] = _stored_heldout(np.asarray(im.convert("RGB")))
    if not out:
        raise DeqirError(f"no PNG photographs in {folder}")
    return out


def _png_b64(img: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def read_heldout_png(metadata_value: str) -> dict[str, np.ndarray]:
    """The held-out photographs stored in a weights file's ``deqir_heldout_png`` metadata."""
    from PIL import Image
    try:
        table = json.loads(metadata_value)
        return {name: np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
                for name, b64 in table.items()}
    except Exception as e:  # noqa: BLE001
        raise DeqirError(f"corrupt held-out images in the weights file ({type(e).__name__}: {e})") from None
