"""diffusers folders as models: ``load_denoiser("diffusers:FOLDER")`` (or the folder itself).

Layouts: a model folder (``config.json`` with ``_class_name: UNet2DModel`` and its weights, plus
``scheduler_config.json`` beside it as in google/ddpm-*), a pipeline folder (``model_index.json``,
``unet/``, ``scheduler/``), or a pipeline's ``unet/`` (its ``../scheduler/`` is used). Weights:
``diffusion_pytorch_model[.fp16].safetensors`` or ``.bin`` (read with ``weights_only=True``:
pickled code is never run), or a sharded ``.safetensors.index.json``; the fp16 variant is used
when it is the only one (or asked for), upcast to float32 unless ``dtype`` says otherwise.

A model is identified by what its config.json says, never by its tensor shapes: diffusers'
default UNet2DModel has google's names and shapes and is another function (0.38 relative error).

* google's DDPM family (ddpm-cifar10-32, ddpm-celebahq-256, ddpm-ema-church-256, ...): every
  field in :data:`GOOGLE` has google's value (absent fields take diffusers' defaults,
  :data:`UNET_DEFAULTS`), blocks are ``DownBlock2D`` / ``AttnDownBlock2D`` mirrored by
  ``UpBlock2D`` / ``AttnUpBlock2D``. It converts key by key onto this project's ``DDPMUNet`` (no
  diffusers dependency; fp16, padding and CUDA graphs as for the built-in architectures).
* any other UNet2DModel config runs through diffusers' own ``UNet2DModel`` (the optional
  ``[diffusers]`` extra), the weights still read here; without diffusers, one line names the
  first field that needs it.

The result is a :class:`~deqir_dist.models.scheduled.ScheduledDenoiser`: the folder's scheduler
(or the library's schedule when it has none) travels with the network.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from deqir_dist.errors import DeqirError, one_line
from deqir_dist.models.ddpm import DDPMUNet
from deqir_dist.models.loading import read_state_dict, state_dict_mismatch
from deqir_dist.models.scheduled import LIBRARY_SCHEDULE, ScheduledDenoiser, default_schedule
from deqir_dist.sampling.scheduler import Schedule, read_json_config, schedule_from_config

PREFIX = "diffusers:"
WEIGHTS = "diffusion_pytorch_model"
# UNet2DModel.__init__'s defaults (diffusers 0.42): what an absent config.json field means
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
# the fields on which google's DDPM family (= ermongroup's Model, this project's DDPMUNet) is fixed
GOOGLE = {
    "center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 1, "flip_sin_to_cos": False,
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_padding": 0,
    "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu", "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-6, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None,
}
_ATTN_ALIASES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}   # diffusers < 0.14


def is_diffusers_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "config.json").is_file())


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(the UNet's folder, its scheduler_config.json or None)."""
    if path.is_file() and (path.name == "config.json" or path.name.startswith(f"{WEIGHTS}.")):
        path = path.parent          # a folder's file: the folder (its config.json says what the weights are)
    if not path.is_dir():
        raise DeqirError(f"diffusers folder not found: {path} (a local folder; to use a Hub model, download it "
                         "first, e.g. huggingface-cli download google/ddpm-cifar10-32 --local-dir DIR)")
    index = path / "model_index.json"
    if index.is_file():
        entry = read_json_config(index).get("unet")
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == "UNet2DModel"):
            raise DeqirError(f"{index}: unet is {entry!r}; only pixel-space UNet2DModel pipelines are supported "
                             "(DDPMPipeline, DDIMPipeline)")
        sched = path / "scheduler" / "scheduler_config.json"
        return path / "unet", (sched if sched.is_file() else None)
    if not (path / "config.json").is_file():
        raise DeqirError(f"{path} is not a diffusers folder: it has neither model_index.json nor config.json")
    for sched in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json",
                  path.parent / "scheduler" / "scheduler_config.json"):
        if sched.is_file() and (sched.parent == path or sched.parent.parent == path
                                or (path.parent / "model_index.json").is_file()):
            return path, sched
    return path, None


def _weights_file(folder: Path, variant: str | None) -> list[Path]:
    """The weights file(s) of a model folder (see the module doc for the order)."""
    tags = ([f".{variant}"] if variant else ["", ".fp16"])
    for tag in tags:
        for ext in (".safetensors", ".bin"):
            f = folder / f"{WEIGHTS}{tag}{ext}"
            if f.is_file():
                return [f]
            idx = folder / f"{WEIGHTS}{tag}{ext}.index.json"
            if idx.is_file():
                wmap = read_json_config(idx, max_bytes=16 << 20).get("weight_map")
                if not isinstance(wmap, dict) or not wmap:
                    raise DeqirError(f"{idx}: no weight_map")
                names = sorted(set(wmap.values()))
                if any(not isinstance(n, str) or os.path.basename(n) != n or n.startswith(".") for n in names):
                    raise DeqirError(f"{idx}: shard names must be plain file names in {folder}")
                return [folder / n for n in names]
    want = f"{WEIGHTS}.{variant}.safetensors" if variant else f"{WEIGHTS}.safetensors (or .bin, .fp16.*)"
    raise DeqirError(f"{folder}: no weights file ({want})")


def read_weights(folder: Path, variant: str | None = None, shapes_only: bool = False) -> dict:
    """name -> tensor (old attention names renamed); ``shapes_only``: meta tensors, from the headers."""
    sd = {}
    for f in _weights_file(folder, variant):
        part, _ = read_state_dict(f, shapes_only=shapes_only)
        sd.update({k: torch.empty(v, device="meta") for k, v in part.items()} if shapes_only else part)
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if "attentions" in parts and parts[-2] in _ATTN_ALIASES:     # old attention names
            k = ".".join(parts[:-2] + [_ATTN_ALIASES[parts[-2]], parts[-1]])
        out[k] = v
    return out


def unet_config(folder: Path) -> dict:
    raw = read_json_config(folder / "config.json")
    if raw.get("_class_name") != "UNet2DModel":
        raise DeqirError(f"{folder / 'config.json'}: _class_name is {raw.get('_class_name')!r}; only UNet2DModel "
                         "(pixel-space diffusion) is supported")
    return {**UNET_DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}


def google_mismatch(cfg: dict) -> str | None:
    """None when ``cfg`` (defaults filled) is google's DDPM family, else the first field that is not
    (as 'field=value (google's: ...)')."""
    for key in cfg:
        if key not in UNET_DEFAULTS:
            return f"{key}={cfg[key]!r} (a field this loader does not know)"
    for key, want in GOOGLE.items():
        if cfg[key] != want:
            return f"{key}={cfg[key]!r} (google's DDPM: {want!r})"
    blocks, down, up = cfg["block_out_channels"], cfg["down_block_types"], cfg["up_block_types"]
    if not isinstance(blocks, list) or not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0
                                                         for b in blocks):
        return f"block_out_channels={blocks!r}"
    if not isinstance(down, list) or not isinstance(up, list) or not len(down) == len(up) == len(blocks):
        return "down_block_types / up_block_types (one per block_out_channels entry)"
    for i, kind in enumerate(down):
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            return f"down_block_types[{i}]={kind!r} (google's DDPM: DownBlock2D or AttnDownBlock2D)"
        mirror = "AttnUpBlock2D" if kind == "AttnDownBlock2D" else "UpBlock2D"
        if up[len(up) - 1 - i] != mirror:
            return f"up_block_types[{len(up) - 1 - i}]={up[len(up) - 1 - i]!r} (mirroring down level {i}: {mirror!r})"
    if blocks[0] % 32 or any(b % blocks[0] for b in blocks):
        return f"block_out_channels={blocks!r} (multiples of the first, itself a multiple of 32)"
    if cfg["time_embedding_dim"] not in (None, 4 * blocks[0]):
        return f"time_embedding_dim={cfg['time_embedding_dim']!r} (google's DDPM: 4 x {blocks[0]})"
    head = cfg["attention_head_dim"]
    widths = {blocks[i] for i, kind in enumerate(down) if kind == "AttnDownBlock2D"} | {blocks[-1]}
    if head is not None and widths != {head}:
        return f"attention_head_dim={head!r} (google's DDPM: null, one head per attention)"
    lpb = cfg["layers_per_block"]
    if isinstance(lpb, bool) or not isinstance(lpb, int) or lpb < 1:
        return f"layers_per_block={lpb!r}"
    return None


def ddpm_kwargs(cfg: dict) -> dict:
    """``DDPMUNet`` keyword arguments of a google-family config (``google_mismatch`` is None)."""
    blocks, levels = cfg["block_out_channels"], len(cfg["block_out_channels"])
    resolution = max(256, 2 ** (levels - 1))        # nominal: only which levels carry attention matters
    attn = tuple(resolution >> i for i, kind in enumerate(cfg["down_block_types"]) if kind == "AttnDownBlock2D")
    return dict(ch=blocks[0], out_ch=cfg["out_channels"], ch_mult=tuple(b // blocks[0] for b in blocks),
                num_res_blocks=cfg["layers_per_block"], attn_resolutions=attn, dropout=float(cfg["dropout"]),
                in_channels=cfg["in_channels"], resolution=resolution, resamp_with_conv=True)


_LEAF = {"time_emb_proj": "temb_proj", "conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q",
         "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def to_ddpm_names(sd: dict, levels: int) -> dict:
    """diffusers UNet2DModel names -> DDPMUNet (ermongroup) names; attention Linear -> 1x1 conv."""
    out = {}
    for k, v in sd.items():
        name = k
        for a, b in (("time_embedding.linear_1.", "temb.dense.0."), ("time_embedding.linear_2.", "temb.dense.1."),
                     ("conv_norm_out.", "norm_out."), ("mid_block.resnets.0.", "mid.block_1."),
                     ("mid_block.attentions.0.", "mid.attn_1."), ("mid_block.resnets.1.", "mid.block_2.")):
            if name.startswith(a):
                name = b + name[len(a):]
        parts = name.split(".")
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3 and parts[1].isdigit():
            i = int(parts[1])
            level = i if parts[0] == "down_blocks" else levels - 1 - i
            sub = {"resnets": "block", "attentions": "attn", "downsamplers": "downsample", "upsamplers": "upsample"}
            if parts[2] not in sub:
                raise DeqirError(f"unexpected diffusers weight {k}")
            head = ["down" if parts[0] == "down_blocks" else "up", str(level), sub[parts[2]]]
            rest = parts[4:] if parts[2] in ("downsamplers", "upsamplers") else parts[3:]
            name = ".".join(head + rest)
        for a, b in _LEAF.items():
            name = name.replace(f".{a}.", f".{b}.")
        if (".attn." in name or name.startswith("mid.attn_1.")) and name.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]
        out[name] = v
    return out


def _diffusers_unet(cfg: dict, sd: dict, folder: Path, why: str, shapes_only: bool = False):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from diffusers import UNet2DModel
    except Exception:  # noqa: BLE001 - absent or broken: the same one line
        raise DeqirError(f"{folder / 'config.json'}: {why} is not google's DDPM family, which this library runs "
                         "natively; other UNet2DModel configs need diffusers: pip install 'deqir-dist[diffusers]'") \
            from None
    def build(device):
        try:
            with warnings.catch_warnings(), torch.device(device):
                warnings.simplefilter("ignore")
                return UNet2DModel.from_config(cfg)
        except Exception as e:  # noqa: BLE001
            raise DeqirError(f"{folder / 'config.json'}: diffusers cannot build this UNet2DModel "
                             f"({one_line(e, limit=160)})") from None
    # on the meta device first: a config is checked against the weights before any memory is taken
    mismatch = state_dict_mismatch(build("meta").state_dict(), sd)
    if mismatch:
        raise DeqirError(f"{folder}: the weights do not match config.json: {mismatch}")
    if shapes_only:
        return None
    net = build("cpu")
    net.load_state_dict(sd, strict=True)
    return net.float().eval()


def check_diffusers(path, variant: str | None = None) -> None:
    """``load_diffusers``'s checks (configs, scheduler, weight names and shapes from the file headers)
    without reading the weights: what a Ray driver checks before its workers load the folder."""
    load_diffusers(path, variant, shapes_only=True)


def load_diffusers(path, variant: str | None = None, shapes_only: bool = False) -> ScheduledDenoiser | None:
    """The denoiser a diffusers folder holds (float32, cpu, eval), with its schedule."""
    raw = os.fspath(path)
    given = Path(raw[len(PREFIX):] if raw.startswith(PREFIX) else raw)
    if variant is None and given.is_file() and given.name.startswith(f"{WEIGHTS}.fp16."):
        variant = "fp16"            # the fp16 weights file itself was named
    folder, sched_file = _locate(given)
    cfg = unet_config(folder)
    why = google_mismatch(cfg)
    schedule = schedule_from_config(read_json_config(sched_file), str(sched_file)) if sched_file else None
    sd = read_weights(folder, variant, shapes_only)
    levels = len(cfg["block_out_channels"]) if isinstance(cfg["block_out_channels"], list) else 1
    if why is None:
        kw = ddpm_kwargs(cfg)
        with torch.device("meta"):
            net = DDPMUNet(**kw)
        converted = to_ddpm_names(sd, levels)
        mismatch = state_dict_mismatch(net.state_dict(), converted)
        if mismatch:
            raise DeqirError(f"{folder}: the weights do not match config.json: {mismatch}")
        if shapes_only:
            return None
        net.load_state_dict(converted, strict=True, assign=True)
        net = net.float().eval()
        kind = "DDPMUNet (google's DDPM family, converted)"
    else:
        net = _diffusers_unet(cfg, sd, folder, why, shapes_only)
        if shapes_only:
            return None
        kind = "diffusers UNet2DModel"
    if schedule is None:
        base = default_schedule()
        schedule = Schedule(base.alphas_cumprod, source=f"{LIBRARY_SCHEDULE}: {folder} has no scheduler_config.json",
                            config=base.config)
    model = ScheduledDenoiser(net, schedule, 2 ** (levels - 1), cfg["in_channels"], label=f"{PREFIX}{folder}")
    model.kind = kind
    return model.eval()
