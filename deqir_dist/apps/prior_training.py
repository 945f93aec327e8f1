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

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F

from deqir_dist.api.restore import restore
from deqir_dist.data.photos import (
    HELDOUT_IMAGES,
    TRAIN_IMAGES,
    CropSampler,
    _stored_heldout,
    heldout_crops,
    load_skimage_photo,
)
from deqir_dist.errors import DeqirError, check_int
from deqir_dist.models.builtin import read_builtin_file
from deqir_dist.models.ddpm import DDPMUNet, deepen
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.baselines import best_baseline
from deqir_dist.quality.metrics import psnr
from deqir_dist.sampling.denoiser import resolve_device
from deqir_dist.sampling.schedule import TRAIN_STEPS, linear_alphas_cumprod

CARD_FORMAT = "deqir-prior-card/1"
VAL_TIMES = (25, 100, 250, 500, 750)


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
        time_limit_min=None, store_dtype="float16", state_path=None, state_every=200, data_dir=None, init=None,
        loss_weight="uniform", channels_last=False,
    )

    def __init__(self, **kw):
        unknown = set(kw) - set(self.DEFAULTS)
        if unknown:
            raise DeqirError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        super().__init__({**self.DEFAULTS, **kw})


def loss_gamma(weight: str):
    """GAMMA of a 'min_snr:GAMMA' loss weight (Hang et al. 2023), None for anything else."""
    if isinstance(weight, str) and weight.startswith("min_snr:"):
        try:
            g = float(weight.split(":", 1)[1])
        except ValueError:
            return None
        return g if math.isfinite(g) and g > 0 else None
    return None


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
    if loss_gamma(cfg["loss_weight"]) is None and cfg["loss_weight"] != "uniform":
        raise DeqirError(f"loss weight must be 'uniform' or 'min_snr:GAMMA' (GAMMA > 0), got {cfg['loss_weight']!r}")
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
    _check_cfg(cfg)
    device = resolve_device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    amp = cfg["amp"]
    if amp == "bf16" and device.type == "cpu" and not _cpu_bf16_ok():
        amp = "none"
    t_start = time.perf_counter()
    train, held_full, held = _photos(cfg)
    sampler = CropSampler(train, cfg["min_short"], cfg["max_short"], cfg["pyramid_levels"], cfg["seed"] + 1)
    val_x = heldout_crops(held, cfg["val_size"], cfg["val_crops"]) if held else None

    torch.manual_seed(cfg["seed"])
    model = DDPMUNet(**cfg["model"]).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if cfg["init"]:                     # fine-tune: start from a weights file of the same architecture
        model.load_state_dict(init_weights(cfg["init"], cfg["model"], cfg["seed"]))
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
        from deqir_dist.sampling.progress import progress_bar
        bar = progress_bar(cfg["steps"], "train-prior", "step", dynamic_ncols=True)
    stopped_early = None
    step = 0
    first = 0
    state_path = Path(cfg["state_path"]) if cfg["state_path"] else None
    if state_path is not None and state_path.is_file():     # resume where the last run saved its state
        first = _load_state(state_path, cfg, model, ema, opt, sampler, noise_gen, losses, val_history)
        if bar is not None:
            bar.update(first)
    t_start -= getattr(opt, "_deqir_seconds", 0.0)       # wall time of the earlier sittings
    try:
        for step in range(first, cfg["steps"]):
            size = crops[step % len(crops)]
            bs = cfg["batch"] * (big // size) ** 2
            lr = _lr_at(cfg, step)
            lv = _train_step(cfg, step, model, ema, opt, sampler.batch(bs, size), noise_gen, ac, lr, amp, device)
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
            if state_path is not None and ((step + 1) % cfg["state_every"] == 0 or step + 1 == cfg["steps"]):
                _save_state(state_path, cfg, step + 1, model, ema, opt, sampler, noise_gen, losses, val_history,
                            elapsed)
            if cfg["time_limit_min"] and elapsed > 60 * cfg["time_limit_min"]:
                stopped_early = step + 1
                if state_path is not None:
                    _save_state(state_path, cfg, step + 1, model, ema, opt, sampler, noise_gen, losses,
                                val_history, elapsed)
                break
    finally:
        if bar is not None:
            bar.close()
        if log:
            log.close()
    train_seconds = time.perf_counter() - t_start
    ema = ema.float().eval()
    validation = _validation(cfg, ema, val_x, held, val_history)
    training = _training_record(cfg, losses, crops, amp, device, train_seconds, stopped_early is not None)
    return {"model": ema, "losses": losses, "held": held, "train_images": train,
            "held_shapes": {n: list(img.shape) for n, img in held_full.items()},
            "training": training, "validation": validation, "cfg": cfg,
            "wall_seconds": time.perf_counter() - t_start}


def init_weights(path, model_cfg: dict, seed: int = 0) -> dict:
    """The float32 state dict of a prior weights file (safetensors, no pickle) whose architecture
    is ``model_cfg``. One that differs only by having fewer residual blocks per level is deepened
    to ``model_cfg`` computing the same function (``models.ddpm.deepen``: the new blocks start as
    identities, drawn from ``seed``); any other difference is refused with the first differing
    setting."""
    sd, cfg, _ = read_builtin_file(path)
    want = {k: list(v) if isinstance(v, tuple) else v for k, v in model_cfg.items()}
    have = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    rb_want, rb_have = want.get("num_res_blocks"), have.get("num_res_blocks")
    for k in sorted(set(want) | set(have)):
        if want.get(k) != have.get(k) and not (k == "num_res_blocks" and rb_want > rb_have):
            raise DeqirError(f"--init {path}: its {k} is {have.get(k)!r}, the training config's is {want.get(k)!r} "
                             "(fine-tuning needs the same architecture flags, or more --res-blocks)")
    sd = {k: v.float() for k, v in sd.items()}
    return deepen(sd, cfg, rb_want, seed) if rb_want != rb_have else sd


def _photos(cfg) -> tuple[dict, dict, dict]:
    """(training photographs, held-out photographs as read, held-out photographs as stored)."""
    train = {n: load_skimage_photo(n) for n in cfg["train_images"]}
    # held-out photographs exactly as stored in the weights file (short side HELDOUT_SHORT), so the
    # validation crops are the crops ``deqir demo`` uses
    held_full = {n: load_skimage_photo(n) for n in cfg["heldout_images"]}
    if cfg["data_dir"]:                 # bench/prior_data.py's folder: train/*.png, heldout/*.png by name
        train.update(_folder_photos(Path(cfg["data_dir"]) / "train", exclude=held_full))
        held_full.update(_folder_photos(Path(cfg["data_dir"]) / "heldout", exclude=train))
    return train, held_full, {n: _stored_heldout(img) for n, img in held_full.items()}


def _train_step(cfg, step: int, model, ema, opt, x0: torch.Tensor, noise_gen, ac: torch.Tensor, lr: float,
                amp: str, device) -> float:
    """One optimiser step of the eps-prediction loss on the crops ``x0``, then the EMA; the loss."""
    bs = x0.shape[0]
    t = torch.randint(0, TRAIN_STEPS, (bs,), generator=noise_gen)
    eps = torch.randn(x0.shape, generator=noise_gen)
    x0, t, eps = x0.to(device), t.to(device), eps.to(device)
    if cfg["channels_last"]:
        x0, eps = x0.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
    a = ac[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    with _amp_ctx(amp, device):
        pred = model(xt, t)
    gamma = loss_gamma(cfg["loss_weight"])
    if gamma is None:
        loss = F.mse_loss(pred.float(), eps)
    else:   # min-SNR-gamma for eps-prediction: weight min(SNR, gamma) / SNR, SNR = abar / (1 - abar)
        snr = (a / (1 - a)).view(-1)
        per = (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (per * snr.clamp(max=gamma) / snr).mean()
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
    return float(loss.detach())


def _validation(cfg, ema, val_x, held: dict, val_history: list) -> dict:
    """The card's validation record: eps-MSE history and final, and the restoration check."""
    validation = {"heldout_images": list(held), "crops": cfg["val_crops"], "crop_size": cfg["val_size"],
                  "crop_rule": "photograph resized to short side 2 x crop, centre crop then a fixed ring of offsets",
                  "eps_mse_times": list(VAL_TIMES), "eps_mse_history": val_history}
    if val_x is not None:
        validation["eps_mse"] = eps_mse(ema, val_x)
        if cfg["restore_eval"]:
            validation["restoration"] = {"sampler": "serial DDNM, 25 steps, etw 0, nw 0, noise seed 0",
                                         "tasks": restoration_eval(ema, val_x)}
    return validation


def _training_record(cfg, losses: list[float], crops: tuple, amp: str, device, train_seconds: float,
                     stopped_early: bool) -> dict:
    """The card's training record: settings, machine, wall time, final loss and the loss curve."""
    big = max(crops)
    steps_done = len(losses)
    window = min(100, steps_done)
    curve = []
    every = max(1, steps_done // 60)
    for s in range(0, steps_done, every):
        chunk = losses[s:s + every]
        curve.append([s + len(chunk), round(sum(chunk) / len(chunk), 5)])
    return {
        "steps": cfg["steps"], "steps_done": steps_done, "stopped_early_by_time_limit": stopped_early,
        "batch_at_largest_crop": cfg["batch"], "crops": list(crops),
        "batch_per_crop": {str(c): cfg["batch"] * (big // c) ** 2 for c in crops},
        "crop_schedule": "crop sizes alternate step by step; equal pixels per step",
        "optimizer": "AdamW", "lr": cfg["lr"], "weight_decay": cfg["weight_decay"],
        "lr_schedule": f"linear warm-up {cfg['warmup']} steps, cosine decay to {cfg['min_lr_frac']} x lr",
        "grad_clip": cfg["grad_clip"], "ema_decay": cfg["ema"], "ema_warmup": "decay = min(ema, (1+n)/(10+n))",
        "amp": amp, "loss_weight": cfg["loss_weight"], "channels_last": cfg["channels_last"],
        "seed": cfg["seed"], "threads": torch.get_num_threads(), "device": str(device),
        "device_name": _device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "wall_seconds": round(train_seconds, 1),
        "final_loss": round(sum(losses[-window:]) / max(window, 1), 5) if losses else None,
        "final_loss_note": f"mean training loss over the last {window} steps",
        "loss_curve": curve,
        "init": _init_record(cfg["init"], cfg["model"]),
    }


def _init_record(path, model_cfg: dict | None = None) -> dict | None:
    """Which weights a fine-tuning run started from (name and sha256), None for a fresh start."""
    if not path:
        return None
    rec = {"file": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
           "note": "model and EMA initialised from these weights (fine-tuning); the EMA warm-up restarts"}
    have = read_builtin_file(path)[1].get("num_res_blocks")
    want = (model_cfg or {}).get("num_res_blocks", have)
    if want != have:
        rec["deepened"] = {"from_res_blocks": have, "to_res_blocks": want,
                           "how": "models.ddpm.deepen: the new blocks start as identities (conv2 zero; up-path "
                                  "shortcut [I | 0]), so training starts from the same function"}
    return rec


_STATE_KEYS = ("model", "steps", "batch", "crops", "lr", "seed", "train_images", "heldout_images", "data_dir", "init",
               "loss_weight")


def _save_state(path: Path, cfg, step: int, model, ema, opt, sampler, noise_gen, losses, val_history,
                seconds: float) -> None:
    """Everything the loop needs to continue bit for bit (weights, EMA, AdamW moments, both RNGs,
    the loss log), written to a temp name and renamed, so a killed run leaves the last good state."""
    state = {"format": "deqir-prior-state/1", "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
             "opt": opt.state_dict(), "sampler_rng": sampler.gen.get_state(), "noise_rng": noise_gen.get_state(),
             "losses": list(losses), "val_history": list(val_history), "seconds": seconds,
             "cfg": json.dumps({k: cfg[k] for k in _STATE_KEYS}, default=list)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, cfg, model, ema, opt, sampler, noise_gen, losses, val_history) -> int:
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one line for a corrupt state file
        raise DeqirError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
    if st.get("format") != "deqir-prior-state/1":
        raise DeqirError(f"{path} is not a train-prior state file")
    if st["cfg"] != json.dumps({k: cfg[k] for k in _STATE_KEYS}, default=list):
        raise DeqirError(f"{path} was written by a run with other settings (model, steps, batch, crops, lr, seed "
                         "or data); resume with the same flags, or remove it to start over")
    model.load_state_dict(st["model"])
    ema.load_state_dict(st["ema"])
    opt.load_state_dict(st["opt"])
    sampler.gen.set_state(st["sampler_rng"])
    noise_gen.set_state(st["noise_rng"])
    losses[:] = st["losses"]
    val_history[:] = st["val_history"]
    opt._deqir_seconds = float(st.get("seconds", 0.0))
    return int(st["step"])


def _folder_photos(folder: Path, exclude) -> dict:
    """name -> (H, W, 3) uint8 of every PNG in ``folder`` (names in ``exclude`` refused: a photo
    may not be in both splits)."""
    out = {}
    for f in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if f.stem in exclude:
            raise DeqirError(f"{f.stem} is both a training and a held-out photograph")
        with Image.open(f) as im:
            out[f.stem] = np.asarray(im.convert("RGB")).copy()
    return out


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

