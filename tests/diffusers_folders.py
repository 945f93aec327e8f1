"""Test helpers: diffusers folders written as diffusers writes them, without diffusers.

The UNet2DModel state dict is enumerated here from diffusers' block logic (UNet2DModel,
get_down_block / get_up_block, ResnetBlock2D, Attention), independently of the loader's
converter; where diffusers is installed, tests check these names and shapes against its own.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# google/ddpm-cifar10-32's config.json (diffusers 0.0.4 era: the fields it lists)
CIFAR10_32 = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# google/ddpm-celebahq-256's (ddpm-ema-church-256 and ddpm-cat-256 share it)
CELEBAHQ_256 = {
    **CIFAR10_32, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
# the same fields at a test size
SMALL_GOOGLE = {**CIFAR10_32, "block_out_channels": [32, 64, 64], "sample_size": 16, "layers_per_block": 1,
                "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
# google/ddpm-cifar10-32's scheduler_config.json
GOOGLE_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                    "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
                    "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"}


def unet2d_state_dict(cfg: dict, seed: int = 0, device: str = "cpu") -> dict:
    """A UNet2DModel state dict for ``cfg`` (google-family block types), random values off any init."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def rnd(*shape, base=0.0):
        if device == "meta":
            return torch.empty(shape, device="meta")
        fan = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if len(shape) > 1 else 16
        return base + torch.randn(shape, generator=g) / math.sqrt(fan)

    def conv(name, o, i, k):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd(o, i, k, k), rnd(o)

    def lin(name, o, i):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd(o, i), rnd(o)

    def norm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd(c, base=1.0), rnd(c)

    ch = cfg["block_out_channels"]
    levels, nrb, temb = len(ch), cfg["layers_per_block"], 4 * ch[0]

    def resnet(name, i, o):
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, 3)
        lin(f"{name}.time_emb_proj", o, temb)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.conv_shortcut", o, i, 1)

    def attn(name, c):
        norm(f"{name}.group_norm", c)
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            lin(f"{name}.{p}", c, c)

    conv("conv_in", ch[0], cfg["in_channels"], 3)
    lin("time_embedding.linear_1", temb, ch[0])
    lin("time_embedding.linear_2", temb, temb)
    out = ch[0]
    for i in range(levels):
        inp, out = out, ch[i]
        for j in range(nrb):
            resnet(f"down_blocks.{i}.resnets.{j}", inp if j == 0 else out, out)
            if cfg["down_block_types"][i].startswith("Attn"):
                attn(f"down_blocks.{i}.attentions.{j}", out)
        if i < levels - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", out, out, 3)
    resnet("mid_block.resnets.0", ch[-1], ch[-1])
    attn("mid_block.attentions.0", ch[-1])
    resnet("mid_block.resnets.1", ch[-1], ch[-1])
    rev = ch[::-1]
    prev = rev[0]
    for i in range(levels):
        out, inp = rev[i], rev[min(i + 1, levels - 1)]
        for j in range(nrb + 1):
            skip = inp if j == nrb else out
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else out) + skip, out)
            if cfg["up_block_types"][i].startswith("Attn"):
                attn(f"up_blocks.{i}.attentions.{j}", out)
        if i < levels - 1:
            conv(f"up_blocks.{i}.upsamplers.0.conv", out, out, 3)
        prev = out
    norm("conv_norm_out", ch[0])
    conv("conv_out", cfg["out_channels"], ch[0], 3)
    return sd


def write_model(folder: Path, cfg: dict, sd: dict | None = None, fmt: str = "safetensors", variant: str | None = None,
                scheduler: dict | None = None, seed: int = 0) -> Path:
    """A model folder as ``UNet2DModel.save_pretrained`` (+ ``DDPMScheduler.save_pretrained``) writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = unet2d_state_dict(cfg, seed) if sd is None else sd
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    if variant == "fp16":
        sd = {k: v.half() for k, v in sd.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / f"{name}.safetensors"),
                  metadata={"format": "pt"})
    else:
        torch.save(sd, folder / f"{name}.bin")
    if scheduler is not None:
        (folder / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    return folder


def write_pipeline(folder: Path, cfg: dict, scheduler: dict, seed: int = 0, **kw) -> Path:
    """A pipeline folder as ``DDPMPipeline.save_pretrained`` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
                                                         "scheduler": ["diffusers", "DDPMScheduler"],
                                                         "unet": ["diffusers", "UNet2DModel"]}))
    write_model(folder / "unet", cfg, seed=seed, **kw)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder
