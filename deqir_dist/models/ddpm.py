"""DDPM UNet (Ho et al., 2020) in the PyTorch layout of ermongroup/ddim, as used by SDEdit/DeqIR.

A from-scratch implementation whose parameter names and shapes are those of ``models/diffusion.py``
``Model`` in ermongroup/ddim (so SDEdit's ``celeba_hq.ckpt`` loads as a plain state dict) and whose
forward pass is the same function:

* timestep embedding: ``[sin(t f), cos(t f)]`` with ``f_i = exp(-ln(10000) i / (half - 1))``,
  float32, then Linear -> swish -> Linear (4x width);
* GroupNorm with 32 groups and eps 1e-6 (evaluated in float32, cast back); swish ``x sigmoid(x)``;
* residual block: norm1, swish, conv1; ``+ temb_proj(swish(temb))``; norm2, swish, dropout,
  conv2; shortcut 1x1 conv (``nin_shortcut``) when the width changes; no zero initialisation;
* attention (one head): norm, 1x1 q/k/v convs, softmax_j(q_i . k_j / sqrt(C)) v, 1x1 proj_out,
  residual;
* down: zero-pad right/bottom by one, 3x3 conv stride 2 (or 2x2 average pool); up: nearest x2
  [+ 3x3 conv]; decoder blocks concatenate ``[h, skip]`` (h first);
* output: norm_out, swish, conv_out.

Fully convolutional: attention is placed per level (level i has attention when the original's
running resolution at that level, computed from ``resolution``, is in ``attn_resolutions``), so
the model runs on any H, W divisible by ``2 ** (len(ch_mult) - 1)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deqir_dist.errors import DeqirError
from deqir_dist.models.adm import _atleast32, _check_input
from deqir_dist.models.attention import attend


def ddpm_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The DDPM / fairseq sinusoidal embedding of (B,) timesteps: float32 (B, dim), sin first.

    Built on ``t``'s device (no host tensor is created or copied).
    """
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -step)
    phase = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(phase), torch.cos(phase)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _swish(x):
    return x * torch.sigmoid(x)


class _Norm(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-6) in (at least) float32, result cast back to the input dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels, eps=1e-6, affine=True)

    def forward(self, x):
        xx = _atleast32(x)
        return F.group_norm(xx, self.num_groups, self.weight.to(xx.dtype), self.bias.to(xx.dtype),
                            self.eps).to(x.dtype)


class _Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class _Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class _ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _Norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_ch, cout)
        self.norm2 = _Norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, stride=1, padding=0)
        else:
            self.nin_shortcut = None

    def forward(self, x, temb):
        h = self.conv1(_swish(self.norm1(x)))
        p = self.temb_proj(_swish(temb).to(self.temb_proj.weight.dtype))
        h = h + p.to(h.dtype)[:, :, None, None]
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class _AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _Norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        z = self.norm(x)
        q, k, v = (m(z).reshape(b, c, hh * ww).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = attend(q, k, v).transpose(1, 2).reshape(b, c, hh, ww)     # memory linear in hh * ww
        return x + self.proj_out(out)


class _Level(nn.Module):
    """One resolution level: ``block`` (ModuleList), ``attn`` (ModuleList), optional resampler."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class DDPMUNet(nn.Module):
    """ermongroup/ddim's ``Model`` with its config fields as keyword arguments.

    ``resolution`` is the config's ``data.image_size``; it only decides which levels carry
    attention. ``forward(x, t)``: x (B, in_channels, H, W), t (B,) int timesteps -> (B, out_ch, H, W)
    in x's dtype.
    """

    tileable = True          # fully convolutional: api/budget may run it in tiles (models/tiled)

    arch = "ddpm"

    def __init__(self, ch: int = 128, out_ch: int = 3, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks: int = 2,
                 attn_resolutions=(16,), dropout: float = 0.0, in_channels: int = 3,
                 resolution: int = 256, resamp_with_conv: bool = True):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if not ch_mult or num_res_blocks < 1:
            raise DeqirError("DDPMUNet needs at least one level and one residual block per level")
        in_mult = (1,) + ch_mult
        if any(ch * m <= 0 or (ch * m) % 32 for m in in_mult):
            raise DeqirError(f"ch * ch_mult must be positive multiples of 32 (GroupNorm(32)); "
                             f"got ch={ch}, ch_mult={ch_mult}")
        self.config = dict(ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                           attn_resolutions=attn_resolutions, dropout=dropout, in_channels=in_channels,
                           resolution=resolution, resamp_with_conv=resamp_with_conv)
        self.ch = ch
        self.temb_ch = 4 * ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_ch
        self.size_multiple = 2 ** (len(ch_mult) - 1)

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1)

        # The original tracks a running resolution: halved (floor) going down, doubled going up.
        res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(self.num_resolutions):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(_ResnetBlock(block_in, block_out, self.temb_ch, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(_AttnBlock(block_in))
            if i != self.num_resolutions - 1:
                level.downsample = _Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = _ResnetBlock(block_in, block_in, self.temb_ch, dropout)
        self.mid.attn_1 = _AttnBlock(block_in)
        self.mid.block_2 = _ResnetBlock(block_in, block_in, self.temb_ch, dropout)

        ups = []
        for i in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = ch * ch_mult[i]
            for j in range(num_res_blocks + 1):
                skip = ch * (in_mult[i] if j == num_res_blocks else ch_mult[i])
                level.block.append(_ResnetBlock(block_in + skip, block_out, self.temb_ch, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(_AttnBlock(block_in))
            if i != 0:
                level.upsample = _Upsample(block_in, resamp_with_conv)
                res *= 2
            ups.append(level)
        self.up = nn.ModuleList(reversed(ups))   # up[i] is level i

        self.norm_out = _Norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, stride=1, padding=1)

    @property
    def attention_levels(self) -> tuple:
        """(down levels with attention, up levels with attention)."""
        return (tuple(i for i, lv in enumerate(self.down) if len(lv.attn)),
                tuple(i for i, lv in enumerate(self.up) if len(lv.attn)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_input(x, t, self.in_channels, self.size_multiple, "DDPMUNet")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        d0, d1 = self.temb.dense
        temb = ddpm_timestep_embedding(t.to(x.device), self.ch).to(d0.weight.dtype)
        temb = d1(_swish(d0(temb)))

        hs = [self.conv_in(x.to(self.conv_in.weight.dtype))]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if i != self.num_resolutions - 1:
                hs.append(level.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)

        h = self.conv_out(_swish(self.norm_out(h)).to(self.conv_out.weight.dtype))
        return h.to(x.dtype)


def deepen(state: dict, config: dict, num_res_blocks: int, seed: int = 0) -> dict:
    """The state dict of ``DDPMUNet(**config)`` with ``num_res_blocks`` residual blocks per level
    instead of ``config["num_res_blocks"]``, computing the same function (net2net-style growth).

    Down level i keeps its blocks 0..R-1 and appends R'-R blocks that start as identities
    (conv2 and its bias zero: the block returns its input); their outputs join the skips, copies
    of block R-1's. Up level i pops those copies first: its block 0 is the old block 0, blocks
    1..R'-R start as identities on h that ignore their skip (conv2 zero, the 1x1 shortcut
    [I | 0]), and blocks R'-R+1..R' are the old blocks 1..R. An attention block after a new
    block starts with proj_out zero (residual: the identity). The new blocks' other weights are
    PyTorch's default initialisation, drawn from ``seed``."""
    old_rb = int(config["num_res_blocks"])
    if num_res_blocks < old_rb:
        raise DeqirError(f"deepen: {num_res_blocks} residual blocks per level is fewer than the {old_rb} there are")
    d = num_res_blocks - old_rb
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = DDPMUNet(**{**config, "num_res_blocks": num_res_blocks}).state_dict()
    out = {k: v.clone() for k, v in new.items()}

    def copy(prefix_new: str, prefix_old: str) -> None:
        for k in new:
            if k.startswith(prefix_new + "."):
                out[k] = state[prefix_old + k[len(prefix_new):]].to(new[k].dtype).clone()

    def identity(prefix: str, with_shortcut: bool) -> None:
        out[f"{prefix}.conv2.weight"].zero_()
        out[f"{prefix}.conv2.bias"].zero_()
        if with_shortcut:
            w = out[f"{prefix}.nin_shortcut.weight"]
            w.zero_()
            w[:, :w.shape[0], 0, 0] = torch.eye(w.shape[0], dtype=w.dtype)
            out[f"{prefix}.nin_shortcut.bias"].zero_()

    def attn_identity(prefix: str) -> None:
        out[f"{prefix}.proj_out.weight"].zero_()
        out[f"{prefix}.proj_out.bias"].zero_()

    levels = len(config["ch_mult"])
    for k in new:        # everything outside the levels' blocks and attention is where it was
        if not any(k.startswith(f"{p}.{i}.{part}.") for p in ("down", "up") for i in range(levels)
                   for part in ("block", "attn")):
            out[k] = state[k].to(new[k].dtype).clone()
    for i in range(levels):
        has_attn = any(k.startswith(f"down.{i}.attn.") for k in new)
        for j in range(num_res_blocks):                 # down: old blocks, then identities
            if j < old_rb:
                copy(f"down.{i}.block.{j}", f"down.{i}.block.{j}")
                if has_attn:
                    copy(f"down.{i}.attn.{j}", f"down.{i}.attn.{j}")
            else:
                identity(f"down.{i}.block.{j}", False)
                if has_attn:
                    attn_identity(f"down.{i}.attn.{j}")
        up_attn = any(k.startswith(f"up.{i}.attn.") for k in new)
        for j in range(num_res_blocks + 1):             # up: old 0, identities, old 1..R
            src = 0 if j == 0 else (None if j <= d else j - d)
            if src is None:
                identity(f"up.{i}.block.{j}", True)
                if up_attn:
                    attn_identity(f"up.{i}.attn.{j}")
            else:
                copy(f"up.{i}.block.{j}", f"up.{i}.block.{src}")
                if up_attn:
                    copy(f"up.{i}.attn.{j}", f"up.{i}.attn.{src}")
    return out


def sdedit_celeba_hq_config() -> dict:
    """``DDPMUNet`` kwargs of SDEdit's ``celeba_hq.ckpt`` (DeqIR configs/celeba_hq.yml; 113,673,219 params)."""
    return dict(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                dropout=0.0, in_channels=3, resolution=256, resamp_with_conv=True)
