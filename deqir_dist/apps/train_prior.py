"""`deqir train-prior`: the command, its flags and writing the prior with its card."""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from deqir_dist.apps.prior_training import (
    CARD_FORMAT,
    TrainConfig,
    _check_cfg,
    train_prior,
)
from deqir_dist.data.photos import (
    HELDOUT_IMAGES,
    TRAIN_IMAGES,
    _png_b64,
    _skimage_data,
    _stored_heldout,
)
from deqir_dist.errors import DeqirError, check_int
from deqir_dist.io.files import check_dir_creatable
from deqir_dist.sampling.denoiser import resolve_device
from deqir_dist.sampling.schedule import TRAIN_STEPS


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
    used = set(result["train_images"]) | set(result["held"])
    provenance = _data_provenance(cfg.get("data_dir"), used)
    card = {
        "format": CARD_FORMAT,
        "name": out.stem,
        "summary": card_summary(list(result["train_images"]), provenance),
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
        "objective": {"type": "DDPM eps-prediction", "loss": ("MSE(eps_theta(x_t, t), eps)" if cfg.get("loss_weight", "uniform") == "uniform" else
                               f"min(SNR_t, gamma) / SNR_t x MSE(eps_theta(x_t, t), eps) ({cfg['loss_weight']})"),
                      "schedule": "linear betas 1e-4..0.02", "train_steps": TRAIN_STEPS,
                      "t_sampling": "uniform 0..999", "image_range": "[-1, 1]"},
        "data": {
            "source": f"scikit-image {sk_version} bundled photographs (skimage.data, no network)"
                      + (" and " + provenance["source"] if provenance else ""),
            **({"files": provenance["files"], "data_command": provenance["command"]} if provenance else {}),
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


def card_summary(train_names: list, provenance: dict) -> str:
    """The card's one-line summary: how many photographs, and from where (``provenance``: _data_provenance's)."""
    n = len(train_names)
    n_deb = sum(1 for name in train_names if name in provenance.get("files", {}))
    origin = ("photographs bundled with scikit-image" if not n_deb else
              f"photographs ({n - n_deb} bundled with scikit-image, {n_deb} from Debian packages under free "
              "licences, listed in data.files)")
    return (f"Small DDPM eps-prediction UNet trained on {n} natural {origin}: a demonstration prior, not a "
            "paper-grade model (use the ADM / CelebA-HQ checkpoints for that).")


def _data_provenance(data_dir, used: set) -> dict:
    """Where each photograph from a ``--data`` folder came from and under which licence, read from the
    folder's manifest.json (bench/prior_data.py writes it); {} without a folder or a manifest."""
    if not data_dir:
        return {}
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as fh:
            man = json.loads(fh.read(16 << 20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DeqirError(f"{path}: not a readable prior_data.py manifest ({type(e).__name__})") from None
    files = {}
    for f in man.get("files", []) if isinstance(man, dict) else []:
        if isinstance(f, dict) and f.get("name") in used and "scikit-image" not in (f.get("source") or {}):
            files[f["name"]] = {"split": f.get("split"), "source": f.get("source"), "licence": f.get("licence")}
    return {"source": "photographs from Debian wallpaper packages (bench/prior_data.py; per file below)",
            "files": files, "command": man.get("command")} if files else {}


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
    p.add_argument("--ch", type=int, default=d["model"]["ch"], help=f"base width, a multiple of 32 (default {d['model']['ch']})")
    p.add_argument("--ch-mult", default=",".join(map(str, d["model"]["ch_mult"])),
                   help=f"width multiplier per resolution (default {','.join(map(str, d['model']['ch_mult']))})")
    p.add_argument("--res-blocks", type=int, default=d["model"]["num_res_blocks"],
                   help=f"residual blocks per resolution (default {d['model']['num_res_blocks']})")
    p.add_argument("--attn", default="", help="attention resolutions relative to 64 (e.g. 16); default none "
                                              "(the middle block always has attention)")
    p.add_argument("--amp", default=d["amp"], choices=("bf16", "none"), help="autocast (default bf16 when supported)")
    p.add_argument("--store-dtype", default=d["store_dtype"], choices=("float16", "float32"),
                   help=f"precision of the saved weights (default {d['store_dtype']})")
    p.add_argument("--seed", type=int, default=d["seed"], help=f"seed of the crops and noise (default {d['seed']})")
    p.add_argument("--threads", type=int, help="torch CPU threads, >= 1 (default: torch's choice)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--val-every", type=int, default=d["val_every"],
                   help=f"steps between validation losses (default {d['val_every']})")
    p.add_argument("--val-crops", type=int, default=d["val_crops"],
                   help=f"held-out crops in each validation (default {d['val_crops']})")
    p.add_argument("--no-restore-eval", action="store_true", help="skip the final restoration PSNR check")
    p.add_argument("--time-limit", type=float, help="stop after this many minutes, > 0 (recorded in the card)")
    p.add_argument("--state", help="training-state file: saved every --state-every steps and at a --time-limit "
                                   "stop; an existing one is resumed (same flags), so training can span sittings")
    p.add_argument("--state-every", type=int, default=200, help="steps between state saves (default 200)")
    p.add_argument("--init", help="fine-tune: start from this weights file (.safetensors of the same architecture, "
                                  "e.g. the shipped builtin) instead of a random initialisation; with more "
                                  "--res-blocks than it has, it is deepened first (the new blocks start as "
                                  "identities: the same function)")
    p.add_argument("--data", help="extra photographs: a folder from bench/prior_data.py (train/, heldout/ PNGs)")
    p.add_argument("--train-images", help=f"comma list (default {','.join(TRAIN_IMAGES)})")
    p.add_argument("--heldout-images", help=f"comma list (default {','.join(HELDOUT_IMAGES)})")
    p.add_argument("--loss-weight", default=d["loss_weight"],
                   help="per-timestep loss weight: uniform (plain eps-MSE, the default) or min_snr:GAMMA "
                        "(min-SNR-gamma: weight min(SNR, GAMMA) / SNR)")
    p.add_argument("--channels-last", action="store_true", help="train in channels-last memory format")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
              restore_eval=not args.no_restore_eval, time_limit_min=args.time_limit, store_dtype=args.store_dtype,
              state_path=args.state, state_every=args.state_every, data_dir=args.data, init=args.init,
              loss_weight=args.loss_weight, channels_last=args.channels_last)
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
             "--val-every", str(args.val_every), "--val-crops", str(args.val_crops),
             "--loss-weight", args.loss_weight]
    if args.channels_last:
        parts.append("--channels-last")
    if args.attn:
        parts += ["--attn", args.attn]
    for flag, v in (("--card", args.card), ("--log", args.log), ("--threads", args.threads),
                    ("--device", args.device), ("--time-limit", args.time_limit),
                    ("--train-images", args.train_images), ("--heldout-images", args.heldout_images),
                    ("--data", args.data), ("--init", args.init)):
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
        prog = "python -m deqir_dist" if prog == "__main__.py" else prog
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
