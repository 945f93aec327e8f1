"""The built-in prior: a small DDPM UNet whose trained weights ship inside the package.

``load_builtin()`` returns it ready to use (float32, eval mode). The weights were trained with
``deqir train-prior`` (the exact command, data, held-out images, wall time and validation
numbers are in the model card ``weights/builtin.json``, see :func:`builtin_card`). It is a
demonstration prior trained on a handful of photographs bundled with scikit-image, not a
paper-grade model. Fully convolutional: it runs on any H, W that are multiples of
:data:`BUILTIN_SIZE_MULTIPLE` (4); other sizes raise a ``DeqirError`` naming the multiple.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from deqir_dist.data.photos import heldout_crops, read_heldout_png
from deqir_dist.errors import DeqirError
from deqir_dist.models.ddpm import DDPMUNet
from deqir_dist.models.loading import apply_precision, state_dict_mismatch
from deqir_dist.models.settings import check_card

BUILTIN_CONFIG = dict(ch=32, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                      in_channels=3, resolution=64, resamp_with_conv=True)
BUILTIN_SIZE_MULTIPLE = 2 ** (len(BUILTIN_CONFIG["ch_mult"]) - 1)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUILTIN_WEIGHTS = WEIGHTS_DIR / "builtin.safetensors"
BUILTIN_CARD = WEIGHTS_DIR / "builtin.json"

_RETRAIN = ("reinstall deqir-dist, or train it again with "
            "`deqir train-prior -o {path}` (the model card builtin.json records the exact command)")


def _normal(cfg: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def read_builtin_file(path: str | os.PathLike | None = None) -> tuple[dict, dict, dict]:
    """(state dict, config, metadata) of a prior weights file (default: the shipped one)."""
    p = Path(path) if path is not None else BUILTIN_WEIGHTS
    if not p.is_file():
        if path is None:
            raise DeqirError(f"the built-in prior's weights are missing (expected {p}); "
                             + _RETRAIN.format(path=p))
        raise DeqirError(f"prior weights file not found: {p}")
    try:
        from safetensors import safe_open
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - one line for any corrupt or truncated file
        raise DeqirError(f"cannot read the prior weights {p}: {type(e).__name__}: {e}; "
                         + _RETRAIN.format(path=p)) from None
    if meta.get("deqir_arch") != "ddpm" or "deqir_config" not in meta:
        raise DeqirError(f"{p} is not a deqir prior weights file (no ddpm architecture metadata)")
    try:
        cfg = _normal(json.loads(meta["deqir_config"]))
    except (ValueError, RecursionError):
        raise DeqirError(f"{p}: metadata deqir_config is not valid JSON") from None
    return sd, cfg, meta


def load_builtin(dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                 path: str | os.PathLike | None = None) -> torch.nn.Module:
    """The built-in prior (a ``DDPMUNet``) in eval mode, float32 unless ``dtype`` says otherwise.

    ``path`` loads another file written by ``deqir train-prior`` instead of the shipped one.
    A missing or corrupt file, or one that does not hold :data:`BUILTIN_CONFIG` (shipped file
    only), raises ``DeqirError`` saying how to get it back.
    """
    sd, cfg, _ = read_builtin_file(path)
    if path is None and cfg != _normal(BUILTIN_CONFIG):
        raise DeqirError(f"{BUILTIN_WEIGHTS} holds config {cfg}, not BUILTIN_CONFIG {BUILTIN_CONFIG}; "
                         + _RETRAIN.format(path=BUILTIN_WEIGHTS))
    try:
        with torch.device("meta"):
            model = DDPMUNet(**cfg)
    except TypeError as e:
        raise DeqirError(f"bad prior config in the weights file: {e}") from None
    mismatch = state_dict_mismatch(model.state_dict(), sd)
    if mismatch:
        raise DeqirError(f"the prior weights do not match their config: {mismatch}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    model = apply_precision(model, dtype)
    if device is not None:
        model = model.to(device)
    model.weights_path = str(path or BUILTIN_WEIGHTS)
    card = builtin_sampler_card(path)
    if card is not None:
        model.sampler_card = card
    return model.eval()


def builtin_sampler_card(path: str | os.PathLike | None = None) -> dict | None:
    """The recommended sampler settings in the card beside a prior's weights (the shipped card,
    or ``<path>.json``), with ``source`` naming the card; None when there is no card or no
    sampler section in it."""
    card_path = BUILTIN_CARD if path is None else Path(path).with_suffix(".json")
    if not card_path.is_file():
        return None
    try:
        sampler = builtin_card(card_path).get("sampler")
    except ValueError:
        raise DeqirError(f"model card {card_path} is not valid JSON") from None
    if sampler is None:
        return None
    return {**check_card(sampler, str(card_path)), "source": f"model card {card_path.name}"}


def builtin_card(path: str | os.PathLike | None = None) -> dict:
    """The model card (JSON) of the shipped prior, or of the card at ``path``."""
    p = Path(path) if path is not None else BUILTIN_CARD
    if not p.is_file():
        raise DeqirError(f"model card not found: {p}")
    with open(p) as f:
        return json.load(f)


def builtin_heldout(path: str | os.PathLike | None = None) -> dict:
    """name -> (H, W, 3) uint8 held-out photograph stored in the weights file (never trained on)."""
    _, _, meta = read_builtin_file(path)
    if "deqir_heldout_png" not in meta:
        raise DeqirError(f"{path or BUILTIN_WEIGHTS} stores no held-out images")
    return read_heldout_png(meta["deqir_heldout_png"])


# ----------------------------------------------------------------------------- images

def heldout_images(weights=None) -> dict:
    """name -> (H, W, 3) uint8 held-out photograph of the prior (from its weights file)."""
    return builtin_heldout(weights)


def builtin_bench_images(n: int, size: int, weights=None) -> torch.Tensor:
    """(n, 3, size, size) held-out crops in [-1, 1] for benchmarking the built-in prior.

    Crop j cycles over the held-out photographs (each resized to a short side of 2 x size): the
    centre crop first, then a fixed ring of offsets around it. Deterministic.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DeqirError(f"builtin_bench_images needs n >= 1, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < BUILTIN_SIZE_MULTIPLE \
            or size % BUILTIN_SIZE_MULTIPLE:
        raise DeqirError(f"image size must be a positive multiple of {BUILTIN_SIZE_MULTIPLE} for the built-in "
                         f"prior, got {size!r}")
    return heldout_crops(heldout_images(weights), size, n)
