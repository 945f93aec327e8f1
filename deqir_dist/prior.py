"""``deqir train-prior``: train the small built-in diffusion prior on scikit-image's photographs.

What it does (everything is recorded in the JSON model card written next to the weights):

* **data**: the natural colour photographs that ship inside scikit-image (``skimage.data``, read
  from the package's own files, no network). :data:`TRAIN_IMAGES` are used for training,
  :data:`HELDOUT_IMAGES` never are (``chelsea`` and ``cat`` are the same photograph: neither is
  trained on). Each image is resized (Pillow bicubic, antialiased) to a pyramid of
  ``pyramid_levels`` scales whose short side runs log-uniformly from ``min_short`` to
  ``max_short`` pixels (scale jitter); a training crop picks an image uniformly, a scale
  uniformly, a position uniformly, then one of the 8 flips / 90-degree rotations uniformly.
* **objective**: DDPM eps-prediction (Ho et al. 2020): linear betas 1e-4..0.02 over 1000 steps,
  t uniform in 0..999, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, loss = MSE(eps_theta(x_t, t), eps).
* **optimiser**: AdamW, linear warm-up then cosine decay to 10 % of the peak rate, gradient norm
  clipped at 1; an exponential moving average (EMA) of the weights is what gets saved.
  bfloat16 autocast (``--amp bf16``) when the device supports it; the weights stay float32.
* **crops**: ``--crops 32,64`` alternates the crop size step by step with the batch scaled so
  every step sees the same number of pixels (``batch`` crops at the largest size).
* **validation**: eps-MSE of the EMA model at a few t on fixed held-out crops with fixed noise
  (every ``--val-every`` steps), and at the end restoration PSNR on held-out crops (serial
  DDNM sampler) next to the bicubic / A+ y baselines.

Everything random comes from ``--seed`` (model initialisation, data, noise, t), so the same
command on the same machine and thread count gives the same loss sequence.

The weights file is a plain safetensors state dict with the library's metadata (``deqir_arch``,
``deqir_config``: any DDPM loader reads it), plus ``deqir_heldout_png``: the held-out photographs
(resized, PNG, base64) so ``deqir demo`` needs neither scikit-image nor a download.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .denoiser import resolve_device
from .errors import DeqirError, check_int
from .schedule import TRAIN_STEPS, linear_alphas_cumprod

__all__ = ["TRAIN_IMAGES", "HELDOUT_IMAGES", "load_skimage_photo", "resize_short", "CropSampler",
           "TrainConfig", "train_prior", "write_prior", "write_together", "check_outputs",
           "read_heldout_png", "add_parser", "cmd_train_prior", "CARD_FORMAT"]

# Natural colour photographs shipped inside scikit-image (checked: all load offline from
# skimage/data). motorcycle_left/right are the two views of one stereo pair (both trained on).
TRAIN_IMAGES = ("astronaut", "rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
                "immunohistochemistry", "retina")
HELDOUT_IMAGES = ("chelsea", "coffee")
CARD_FORMAT = "deqir-prior-card/1"
HELDOUT_SHORT = 256          # short side of the held-out photographs stored in the weights file
VAL_TIMES = (25, 100, 250, 500, 750)


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


# ----------------------------------------------------------------------------- training

class TrainConfig(dict):
    """The training settings (a plain dict with defaults; every field is recorded in the card)."""

    DEFAULTS = dict(
        model=dict(ch=32, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                   in_channels=3, resolution=64, resamp_with_conv=True),
        steps=3600, batch=16, crops=(32, 64), lr=1e-3, warmup=200, min_lr_frac=0.1, weight_decay=0.0,
        grad_clip=1.0, ema=0.999, amp="bf16", seed=0, threads=None, device="cpu",
        train_images=TRAIN_IMAGES, heldout_images=HELDOUT_IMAGES, min_short=80, max_short=512,
        pyramid_levels=8, val_every=300, val_crops=8, val_size=64, restore_eval=True,
        time_limit_min=None, store_dtype="float16",
    )

    def __init__(self, **kw):
        unknown = set(kw) - set(self.DEFAULTS)
        if unknown:
            raise DeqirError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        super().__init__({**self.DEFAULTS, **kw})


def _lr_at(cfg, step: int) -> float:
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    span = max(cfg["steps"] - cfg["warmup"], 1)
    p = min((step - cfg["warmup"]) / span, 1.0)
    lo = cfg["lr"] * cfg["min_lr_frac"]
    return lo + 0.5 * (cfg["lr"] - lo) * (1 + math.cos(math.pi * p))


def _amp_ctx(amp: str, device: torch.device):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    import contextlib
    return contextlib.nullcontext()


def _check_cfg(cfg) -> None:
    for key in ("steps", "batch", "val_crops", "val_size", "pyramid_levels", "min_short", "max_short"):
        check_int(key, cfg[key])
    for key in ("warmup", "val_every"):
        check_int(key, cfg[key], 0)
    if cfg["threads"] is not None:
        check_int("threads", cfg["threads"])
    resolve_device(cfg["device"])
    limit = cfg["time_limit_min"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not math.isfinite(limit) or limit <= 0):
        raise DeqirError(f"time limit must be a positive number of minutes, got {limit!r}")
    for key in ("weight_decay", "grad_clip"):
        if not (isinstance(cfg[key], (int, float)) and math.isfinite(cfg[key]) and cfg[key] >= 0):
            raise DeqirError(f"{key} must be a finite number >= 0, got {cfg[key]!r}")
    if not (isinstance(cfg["min_lr_frac"], (int, float)) and 0 <= cfg["min_lr_frac"] <= 1):
        raise DeqirError(f"min_lr_frac must be in [0, 1], got {cfg['min_lr_frac']!r}")
    crops = tuple(int(c) for c in cfg["crops"])
    mult = 2 ** (len(cfg["model"]["ch_mult"]) - 1)
    if not crops or any(c < 8 or c % mult for c in crops):
        raise DeqirError(f"crop sizes must be >= 8 and multiples of {mult} (the model's down-sampling factor), "
                         f"got {crops}")
    if max(crops) > cfg["min_short"]:
        raise DeqirError(f"the largest crop ({max(crops)}) exceeds min_short={cfg['min_short']}")
    if cfg["val_size"] % mult:
        raise DeqirError(f"val_size must be a multiple of {mult}")
    if cfg["amp"] not in ("bf16", "none"):
        raise DeqirError(f"amp must be bf16 or none, got {cfg['amp']!r}")
    if cfg["store_dtype"] not in ("float16", "float32"):
        raise DeqirError(f"store_dtype must be float16 or float32, got {cfg['store_dtype']!r}")
    if not (0 <= cfg["ema"] < 1) or not (cfg["lr"] > 0 and math.isfinite(cfg["lr"])):
        raise DeqirError(f"need 0 <= ema < 1 and a finite lr > 0, got ema {cfg['ema']!r} and lr {cfg['lr']!r}")
    overlap = set(cfg["train_images"]) & set(cfg["heldout_images"])
    if overlap or ("cat" in cfg["train_images"] and "chelsea" in cfg["heldout_images"]):
        raise DeqirError(f"training and held-out images overlap: {sorted(overlap) or ['cat/chelsea']}")


@torch.no_grad()
def eps_mse(model, x0: torch.Tensor, times=VAL_TIMES, seed: int = 1234) -> dict[str, float]:
    """Validation eps-MSE of ``model`` at each t on images x0, with noise fixed by ``seed``."""
    ac = linear_alphas_cumprod().float()
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    out = {}
    for t in times:
        eps = torch.randn(x0.shape, generator=gen)
        a = float(ac[t])
        xt = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
        tt = torch.full((x0.shape[0],), t, dtype=torch.int64)
        pred = model(xt.to(dev), tt.to(dev)).float().cpu()
        out[str(t)] = round(float((pred[:, :3] - eps).pow(2).mean()), 6)
    return out


@torch.no_grad()
def restoration_eval(model, x: torch.Tensor, steps: int = 25, seed: int = 0) -> dict:
    """Serial-sampler restoration PSNR on clean crops x (B, 3, S, S) for a few tasks, with baselines."""
    from .baselines import best_baseline
    from .metrics import psnr
    from .operators import make_operator
    from .restore import restore
    shape = tuple(x.shape[1:])
    out = {}
    for label, name, params in (("sr_bicubic_x4", "sr_bicubic", {"scale": 4}), ("deblur_gauss", "deblur_gauss", {}),
                                ("inpaint_box", "inpaint", {"mask": "box"}),
                                ("inpaint_random", "inpaint", {"mask": "random"})):
        op = make_operator(name, shape, **params)
        y = op.A(x)
        gen = torch.Generator().manual_seed(seed)
        res = restore(model, y, op, steps=steps, solver="serial", generator=gen)
        base_name, base = best_baseline(op, y, x)
        out[label] = {"psnr": round(float(psnr(res.image.clamp(-1, 1), x).mean()), 3),
                      "best_baseline": base_name,
                      "baseline_psnr": round(float(psnr(base.clamp(-1, 1), x).mean()), 3)}
    return out


def train_prior(cfg: TrainConfig, progress: bool = True, log_path: str | os.PathLike | None = None,
                on_step=None) -> dict:
    """Train; returns {"model": EMA model (eval, float32), "losses": [...], "card": {...}}.

    ``on_step(step, loss)`` is called after every optimiser step (tests use it).
    """
    from .models.ddpm import DDPMUNet
    _check_cfg(cfg)
    device = resolve_device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    amp = cfg["amp"]
    if amp == "bf16" and device.type == "cpu" and not _cpu_bf16_ok():
        amp = "none"
    t_start = time.perf_counter()
    train = {n: load_skimage_photo(n) for n in cfg["train_images"]}
    # held-out photographs exactly as stored in the weights file (short side HELDOUT_SHORT), so the
    # validation crops are the crops ``deqir demo`` uses
    held_full = {n: load_skimage_photo(n) for n in cfg["heldout_images"]}
    held = {n: _stored_heldout(img) for n, img in held_full.items()}
    sampler = CropSampler(train, cfg["min_short"], cfg["max_short"], cfg["pyramid_levels"], cfg["seed"] + 1)
    val_x = heldout_crops(held, cfg["val_size"], cfg["val_crops"]) if held else None

    torch.manual_seed(cfg["seed"])
    model = DDPMUNet(**cfg["model"]).to(device)
    ema = DDPMUNet(**cfg["model"]).to(device)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    ac = linear_alphas_cumprod().float().to(device)
    noise_gen = torch.Generator().manual_seed(cfg["seed"] + 2)
    crops = tuple(int(c) for c in cfg["crops"])
    big = max(crops)

    losses: list[float] = []
    val_history = []
    log = open(log_path, "w", buffering=1) if log_path else None  # noqa: SIM115
    if log:
        log.write("step,loss,lr,crop,batch,seconds\n")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg["steps"], desc="train-prior", unit="step", dynamic_ncols=True)
    stopped_early = None
    step = 0
    try:
        for step in range(cfg["steps"]):
            size = crops[step % len(crops)]
            bs = cfg["batch"] * (big // size) ** 2
            x0 = sampler.batch(bs, size)
            t = torch.randint(0, TRAIN_STEPS, (bs,), generator=noise_gen)
            eps = torch.randn(x0.shape, generator=noise_gen)
            x0, t, eps = x0.to(device), t.to(device), eps.to(device)
            a = ac[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            lr = _lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            with _amp_ctx(amp, device):
                pred = model(xt, t)
            loss = F.mse_loss(pred.float(), eps)
            if not torch.isfinite(loss):
                raise DeqirError(f"training diverged at step {step} (loss {float(loss)}); try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            decay = min(cfg["ema"], (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            lv = float(loss.detach())
            losses.append(lv)
            if on_step is not None:
                on_step(step, lv)
            elapsed = time.perf_counter() - t_start
            if log:
                log.write(f"{step},{lv:.6f},{lr:.6g},{size},{bs},{elapsed:.1f}\n")
            if val_x is not None and cfg["val_every"] and (step + 1) % cfg["val_every"] == 0 \
                    and step + 1 < cfg["steps"]:
                v = eps_mse(ema, val_x)
                val_history.append({"step": step + 1, "seconds": round(elapsed, 1), "eps_mse": v})
                if bar is not None:
                    bar.write(f"step {step + 1}: val eps-MSE {v}")
            if bar is not None:
                recent = losses[-50:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr:.2e}")
                bar.update(1)
            if cfg["time_limit_min"] and elapsed > 60 * cfg["time_limit_min"]:
                stopped_early = step + 1
                break
    finally:
        if bar is not None:
            bar.close()
        if log:
            log.close()
    train_seconds = time.perf_counter() - t_start
    ema = ema.float().eval()
    steps_done = len(losses)
    validation = {"heldout_images": list(held), "crops": cfg["val_crops"], "crop_size": cfg["val_size"],
                  "crop_rule": "photograph resized to short side 2 x crop, centre crop then a fixed ring of offsets",
                  "eps_mse_times": list(VAL_TIMES), "eps_mse_history": val_history}
    if val_x is not None:
        validation["eps_mse"] = eps_mse(ema, val_x)
        if cfg["restore_eval"]:
            validation["restoration"] = {"sampler": "serial DDNM, 25 steps, etw 0, nw 0, noise seed 0",
                                         "tasks": restoration_eval(ema, val_x)}
    window = min(100, steps_done)
    curve = []
    every = max(1, steps_done // 60)
    for s in range(0, steps_done, every):
        chunk = losses[s:s + every]
        curve.append([s + len(chunk), round(sum(chunk) / len(chunk), 5)])
    training = {
        "steps": cfg["steps"], "steps_done": steps_done, "stopped_early_by_time_limit": stopped_early is not None,
        "batch_at_largest_crop": cfg["batch"], "crops": list(crops),
        "batch_per_crop": {str(c): cfg["batch"] * (big // c) ** 2 for c in crops},
        "crop_schedule": "crop sizes alternate step by step; equal pixels per step",
        "optimizer": "AdamW", "lr": cfg["lr"], "weight_decay": cfg["weight_decay"],
        "lr_schedule": f"linear warm-up {cfg['warmup']} steps, cosine decay to {cfg['min_lr_frac']} x lr",
        "grad_clip": cfg["grad_clip"], "ema_decay": cfg["ema"], "ema_warmup": "decay = min(ema, (1+n)/(10+n))",
        "amp": amp, "seed": cfg["seed"], "threads": torch.get_num_threads(), "device": str(device),
        "device_name": _device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "wall_seconds": round(train_seconds, 1),
        "final_loss": round(sum(losses[-window:]) / max(window, 1), 5) if losses else None,
        "final_loss_note": f"mean training loss over the last {window} steps",
        "loss_curve": curve,
    }
    return {"model": ema, "losses": losses, "held": held, "train_images": train,
            "held_shapes": {n: list(img.shape) for n, img in held_full.items()},
            "training": training, "validation": validation, "cfg": cfg,
            "wall_seconds": time.perf_counter() - t_start}


def _cpu_bf16_ok() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            return True
    except OSError:
        pass
    return False


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def write_prior(result: dict, out: str | os.PathLike, card_path: str | os.PathLike | None = None,
                command: str | None = None, invocation: str | None = None,
                extra: list | None = None) -> tuple[Path, Path]:
    """Write the EMA weights (safetensors) and the model card (JSON) together (``write_together``:
    both or neither, with ``extra`` [(path, bytes)] such as the loss log); returns
    both paths. Missing parent folders are created."""
    from safetensors.torch import save as st_save
    extra = list(extra or [])
    cfg = result["cfg"]
    out = Path(out)
    card_path = Path(card_path) if card_path else out.with_suffix(".json")
    check_outputs(out, card_path)
    model = result["model"]
    store = torch.float16 if cfg["store_dtype"] == "float16" else torch.float32
    sd = {k: v.detach().to("cpu", store).contiguous() for k, v in model.state_dict().items()}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}
    held_small = {n: _stored_heldout(img) for n, img in result["held"].items()}
    load_shape = result.get("held_shapes", {})
    held_b64 = {n: _png_b64(img) for n, img in held_small.items()}
    meta = {"deqir_arch": "ddpm", "deqir_config": json.dumps(config), "deqir_card_format": CARD_FORMAT,
            "deqir_heldout_png": json.dumps(held_b64)}
    blob = st_save(sd, metadata=meta)
    n_params = sum(v.numel() for v in model.state_dict().values())
    train_info = [{"name": n, "shape": list(img.shape)} for n, img in result["train_images"].items()]
    try:
        import skimage
        sk_version = skimage.__version__
    except ImportError:  # pragma: no cover
        sk_version = None
    card = {
        "format": CARD_FORMAT,
        "name": out.stem,
        "summary": (f"Small DDPM eps-prediction UNet trained on {len(result['train_images'])} natural "
                    "photographs bundled with scikit-image: a demonstration prior, not a paper-grade model "
                    "(use the ADM / CelebA-HQ checkpoints for that)."),
        "command": command,
        "invocation": invocation,
        "weights": {"file": out.name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                    "dtype": cfg["store_dtype"], "parameters": n_params, "tensors": len(sd),
                    "metadata_keys": sorted(meta),
                    "loaded_as": "float32 by default (deqir_dist.models.builtin.load_builtin)"},
        "architecture": "ddpm", "config": config,
        "size_multiple": 2 ** (len(config["ch_mult"]) - 1),
        "size_rule": "runs on any H, W that are multiples of size_multiple (fully convolutional); "
                     "other sizes raise an error naming the multiple",
        "objective": {"type": "DDPM eps-prediction", "loss": "MSE(eps_theta(x_t, t), eps)",
                      "schedule": "linear betas 1e-4..0.02", "train_steps": TRAIN_STEPS,
                      "t_sampling": "uniform 0..999", "image_range": "[-1, 1]"},
        "data": {
            "source": f"scikit-image {sk_version} bundled photographs (skimage.data, no network)",
            "train_images": train_info,
            "heldout_images": [{"name": n, "shape": list(load_shape.get(n, img.shape)),
                                "stored_in_weights_as": "PNG in the safetensors metadata deqir_heldout_png",
                                "stored_shape": list(held_small[n].shape),
                                "sha256_png": hashlib.sha256(base64.b64decode(held_b64[n])).hexdigest()}
                               for n, img in result["held"].items()],
            "heldout_note": "never trained on; skimage.data.cat() is the same photograph as chelsea and is not "
                            "used either",
            "crops": list(cfg["crops"]),
            "scale_jitter": (f"each image resized (Pillow bicubic, antialiased) to {cfg['pyramid_levels']} scales "
                             f"with short side log-spaced from {cfg['min_short']} to min({cfg['max_short']}, "
                             f"original); a crop picks an image uniformly, then a scale uniformly"),
            "augmentations": ["random position", "horizontal flip", "90-degree rotations (all 8 dihedral "
                              "transforms, uniform)", "scale jitter (image pyramid)"],
        },
        "training": result["training"],
        "validation": result["validation"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    card_bytes = (json.dumps(card, indent=2) + "\n").encode()
    write_together([(out, blob), (card_path, card_bytes), *extra])
    return out, card_path


def write_together(files: list) -> None:
    """Write [(path, bytes), ...] so that the files appear together or not at all.

    Each file is written (and fsynced) to a temp name beside its target first, as
    ``imageio.atomic_write`` does; only when every one is complete are they renamed into place
    (an existing target is moved aside first and put back if a later rename fails). Missing
    parent folders are created. On a failure the temp files (and any folders created here) are
    removed, the targets are as before, and an OSError becomes a DeqirError."""
    import uuid
    made_dirs: list[Path] = []
    temps: list[tuple[Path, Path]] = []
    done = False
    current = None
    backups: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for path, data in files:
            path = current = Path(path)
            missing = []
            p = path.parent
            while not p.exists() and p != p.parent:
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                d.mkdir()
                made_dirs.append(d)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
            temps.append((tmp, path))
            with open(tmp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in temps:                 # existing targets step aside until all are in place
            current = path
            if path.exists():
                bak = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.bak"
                os.replace(path, bak)
                backups.append((bak, path))
            os.replace(tmp, path)
            placed.append(path)
        done = True
    except OSError as e:
        raise DeqirError(f"cannot write {current}: {e.strerror or type(e).__name__}") from None
    finally:
        if done:
            for bak, _ in backups:
                _unlink(bak)
        else:                                        # undo: nothing new stays, old files come back
            for path in placed:
                _unlink(path)
            for bak, path in backups:
                try:
                    os.replace(bak, path)
                except OSError:
                    pass
            for tmp, _ in temps:
                _unlink(tmp)
            for d in reversed(made_dirs):
                try:
                    d.rmdir()
                except OSError:
                    pass


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def check_outputs(*paths) -> None:
    """Before any work: the output files are distinct, none is a folder, and each can be created
    (its folder exists and is writable, or can be created: missing folders are made when writing)."""
    from .imageio import check_dir_creatable
    seen = {}
    for p in map(Path, paths):
        key = os.path.abspath(p)
        if key in seen:
            raise DeqirError(f"two outputs would be the same file {p}; give them different names")
        seen[key] = p
        if p.is_dir():
            raise DeqirError(f"output {p} is a folder, not a file")
        check_dir_creatable(p.parent)


# ----------------------------------------------------------------------------- CLI

def add_parser(subparsers):
    """Register ``train-prior`` on an argparse subparsers object; returns the parser."""
    d = TrainConfig.DEFAULTS
    p = subparsers.add_parser("train-prior", help="train the small built-in diffusion prior on scikit-image photos",
                              description="Train a small DDPM eps-prediction UNet on scikit-image's bundled "
                                          "photographs; writes safetensors weights and a JSON model card.")
    p.add_argument("-o", "--out", required=True,
                   help="weights file (.safetensors); the card goes beside it (.json). The weights, card and "
                        "loss log appear together when training has finished (missing folders are created)")
    p.add_argument("--card", help="model card path (default: OUT with .json)")
    p.add_argument("--log", help="loss log CSV (default: OUT with .loss.csv; kept in the temp folder while "
                                 "training)")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"optimiser steps (default {d['steps']})")
    p.add_argument("--batch", type=int, default=d["batch"], help=f"crops per step at the largest crop size "
                                                                 f"(default {d['batch']})")
    p.add_argument("--crops", default=",".join(map(str, d["crops"])),
                   help="crop sizes, alternated step by step (default 32,64)")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate (default {d['lr']})")
    p.add_argument("--warmup", type=int, default=d["warmup"], help=f"warm-up steps, >= 0 (default {d['warmup']})")
    p.add_argument("--ema", type=float, default=d["ema"], help=f"EMA decay (default {d['ema']})")
    p.add_argument("--ch", type=int, default=d["model"]["ch"], help="base width (multiple of 32)")
    p.add_argument("--ch-mult", default=",".join(map(str, d["model"]["ch_mult"])), help="width multipliers")
    p.add_argument("--res-blocks", type=int, default=d["model"]["num_res_blocks"])
    p.add_argument("--attn", default="", help="attention resolutions relative to 64 (e.g. 16); default none "
                                              "(the middle block always has attention)")
    p.add_argument("--amp", default=d["amp"], choices=("bf16", "none"), help="autocast (default bf16 when supported)")
    p.add_argument("--store-dtype", default=d["store_dtype"], choices=("float16", "float32"))
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--threads", type=int, help="torch CPU threads, >= 1 (default: torch's choice)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--val-every", type=int, default=d["val_every"])
    p.add_argument("--val-crops", type=int, default=d["val_crops"])
    p.add_argument("--no-restore-eval", action="store_true", help="skip the final restoration PSNR check")
    p.add_argument("--time-limit", type=float, help="stop after this many minutes, > 0 (recorded in the card)")
    p.add_argument("--train-images", help=f"comma list (default {','.join(TRAIN_IMAGES)})")
    p.add_argument("--heldout-images", help=f"comma list (default {','.join(HELDOUT_IMAGES)})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_prior)
    return p


def _ints(text: str, what: str) -> tuple:
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise DeqirError(f"{what} must be a comma-separated list of integers, got {text!r}") from None


def config_from_args(args) -> TrainConfig:
    model = dict(TrainConfig.DEFAULTS["model"], ch=args.ch, ch_mult=_ints(args.ch_mult, "--ch-mult"),
                 num_res_blocks=args.res_blocks, attn_resolutions=_ints(args.attn, "--attn"))
    if args.ch < 32 or args.ch % 32:
        raise DeqirError(f"--ch must be a positive multiple of 32 (GroupNorm with 32 groups), got {args.ch}")
    if not model["ch_mult"]:
        raise DeqirError("--ch-mult needs at least one level")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kw = dict(model=model, steps=args.steps, batch=args.batch, crops=_ints(args.crops, "--crops"), lr=args.lr,
              warmup=args.warmup, ema=args.ema, amp=args.amp, seed=args.seed, threads=args.threads,
              device=device, val_every=args.val_every, val_crops=args.val_crops,
              restore_eval=not args.no_restore_eval, time_limit_min=args.time_limit, store_dtype=args.store_dtype)
    if args.train_images:
        kw["train_images"] = tuple(s.strip() for s in args.train_images.split(",") if s.strip())
    if args.heldout_images:
        kw["heldout_images"] = tuple(s.strip() for s in args.heldout_images.split(",") if s.strip())
    return TrainConfig(**kw)


def canonical_command(args) -> str:
    """The ``deqir train-prior`` command line equivalent to ``args`` (every setting explicit)."""
    parts = ["deqir", "train-prior", "-o", str(args.out), "--steps", str(args.steps), "--batch", str(args.batch),
             "--crops", args.crops, "--lr", repr(args.lr), "--warmup", str(args.warmup), "--ema", repr(args.ema),
             "--ch", str(args.ch), "--ch-mult", args.ch_mult, "--res-blocks", str(args.res_blocks),
             "--amp", args.amp, "--store-dtype", args.store_dtype, "--seed", str(args.seed),
             "--val-every", str(args.val_every), "--val-crops", str(args.val_crops)]
    if args.attn:
        parts += ["--attn", args.attn]
    for flag, v in (("--card", args.card), ("--log", args.log), ("--threads", args.threads),
                    ("--device", args.device), ("--time-limit", args.time_limit),
                    ("--train-images", args.train_images), ("--heldout-images", args.heldout_images)):
        if v is not None:
            parts += [flag, str(v)]
    if args.no_restore_eval:
        parts.append("--no-restore-eval")
    return shlex.join(parts)


def cmd_train_prior(args) -> int:
    """Check every setting and output path, train, then write weights, card and log together."""
    import tempfile
    if args.threads is not None:
        check_int("--threads", args.threads)
    if args.device:
        resolve_device(args.device)
    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise DeqirError(f"--time-limit must be a positive number of minutes, got {args.time_limit}")
    if args.warmup < 0:
        raise DeqirError(f"--warmup must be >= 0, got {args.warmup}")
    cfg = config_from_args(args)
    _check_cfg(cfg)
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise DeqirError(f"--out must be a .safetensors file, got {out}")
    card = Path(args.card) if args.card else out.with_suffix(".json")
    log = Path(args.log) if args.log else out.with_suffix(".loss.csv")
    check_outputs(out, card, log)
    for name in cfg["train_images"] + cfg["heldout_images"]:
        if name not in ("motorcycle_left", "motorcycle_right") and not hasattr(_skimage_data(), name):
            raise DeqirError(f"scikit-image has no bundled image {name!r}")
    fd, tmp_log = tempfile.mkstemp(prefix="deqir-train-", suffix=".loss.csv")
    os.close(fd)
    try:
        result = train_prior(cfg, progress=not args.no_progress, log_path=tmp_log)
        prog = Path(sys.argv[0]).name if sys.argv else "deqir"
        prog = "python -m deqir_dist.prior" if prog == "prior.py" else prog
        invocation = " ".join([prog, shlex.join(sys.argv[1:])]) if sys.argv else None
        w, c = write_prior(result, out, card, command=canonical_command(args), invocation=invocation,
                           extra=[(log, Path(tmp_log).read_bytes())])
    finally:
        try:
            os.unlink(tmp_log)
        except OSError:
            pass
    tr, val = result["training"], result["validation"]
    print(f"wrote {w} ({w.stat().st_size / 1e6:.2f} MB) and {c}")
    print(f"steps {tr['steps_done']}, wall {tr['wall_seconds']:.0f} s, final loss {tr['final_loss']}, "
          f"val eps-MSE {val.get('eps_mse')}")
    for task, r in val.get("restoration", {}).get("tasks", {}).items():
        print(f"  {task}: restored {r['psnr']:.2f} dB vs best baseline ({r['best_baseline']}) {r['baseline_psnr']:.2f} dB")
    return 0


def main(argv=None) -> int:
    """``python -m deqir_dist.prior COMMAND ...``: the ``deqir`` command line."""
    from .cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
