"""ADM: the UNet of guided-diffusion (Dhariwal & Nichol, 2021), as used by DeqIR for ImageNet.

A from-scratch implementation whose parameter names and shapes are those of guided-diffusion's
``UNetModel`` (so its released checkpoints load as plain state dicts) and whose forward pass is
the same function:

* timestep embedding: ``[cos(t f), sin(t f)]`` with ``f_i = exp(-ln(10000) i / half)``, i < half,
  computed in float32 from the raw integer timestep, then Linear -> SiLU -> Linear (4x width);
* GroupNorm with 32 groups and eps 1e-5, evaluated in (at least) float32 and cast back to the
  activation dtype; SiLU; dropout just before the second conv of a residual block;
* residual block: norm, SiLU, [resample], conv3x3; time projection (SiLU, Linear) either added
  (``h + e``) or as FiLM after the second norm (``norm(h) * (1 + scale) + shift``); norm, SiLU,
  dropout, zero-initialised conv3x3; skip = identity or 1x1 conv (resampled the same way);
* resampling: nearest x2 [+ conv3x3] up; stride-2 conv3x3 (padding 1) or 2x2 average pool down;
  inside a residual block (``resblock_updown``) always the parameter-free variants;
* attention: norm, 1x1 qkv conv, per-head softmax(q k^T / sqrt(d)) v with q and k each scaled by
  d^-1/4 and the softmax taken in float32, zero-initialised 1x1 output projection, residual.
  The legacy head split cuts the 3*C qkv channels into heads first (per head: q, k, v); the new
  order (``use_new_attention_order``) cuts into q, k, v first, then into heads;
* decoder: each block concatenates ``[h, skip]`` (h first); the output head (norm, SiLU,
  zero-initialised conv3x3) runs in its own precision (float32 after ``convert_to_fp16``).

Precision: :meth:`ADMUNet.convert_to_fp16` casts exactly the convolutions of the input, middle
and output blocks to float16, like guided-diffusion; the model then computes those blocks in
float16 while the time embedding, the Linear layers, every GroupNorm and the output head stay in
float32. The activation dtype is taken from the torso's weights (not from ``use_fp16``, which is
recorded only), so a ``use_fp16=True`` model whose weights are still float32 runs in float32.

The network is fully convolutional: any H, W divisible by ``2 ** (len(channel_mult) - 1)``.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deqir_dist.errors import DeqirError
from deqir_dist.models.attention import attend


def adm_timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """guided-diffusion's sinusoidal embedding of (B,) timesteps: float32 (B, dim), cos first.

    Built on ``t``'s device (no host tensor is created or copied).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    phase = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _atleast32(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _Norm32(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5) in (at least) float32, result cast back to the input dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xx = _atleast32(x)
        return F.group_norm(xx, self.num_groups, self.weight.to(xx.dtype), self.bias.to(xx.dtype),
                            self.eps).to(x.dtype)


def _zeroed(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


class _Up(nn.Module):
    """Nearest-neighbour x2, optionally followed by a 3x3 conv (parameter ``conv``)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.with_conv else x


class _Down(nn.Module):
    """Stride-2 3x3 conv with padding 1 (parameter ``op``), or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv \
            else nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class _ResBlock(nn.Module):
    takes_emb = True

    def __init__(self, cin: int, emb_dim: int, dropout: float, cout: int | None = None,
                 scale_shift: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        cout = cout or cin
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(_Norm32(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.resample = up or down
        if up:
            self.h_upd, self.x_upd = _Up(cin, False), _Up(cin, False)
        elif down:
            self.h_upd, self.x_upd = _Down(cin, False), _Down(cin, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout if scale_shift else cout))
        self.out_layers = nn.Sequential(_Norm32(cout), nn.SiLU(), nn.Dropout(p=dropout),
                                        _zeroed(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip_connection = nn.Identity() if cout == cin else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        norm, act, conv = self.in_layers
        h = act(norm(x))
        if self.resample:
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv(h)
        lin = self.emb_layers[1]
        e = self.emb_layers(emb.to(lin.weight.dtype)).to(h.dtype)[:, :, None, None]
        norm2, act2, drop, conv2 = self.out_layers
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + e)
        return self.skip_connection(x) + conv2(drop(act2(h)))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: (N, d, T) -> (N, d, T); weights softmax_s(q_t . k_s / sqrt(d)), in memory linear in T
    (:func:`deqir_dist.models.attention.attend`)."""
    return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class _Attention(nn.Module):
    takes_emb = False

    def __init__(self, channels: int, heads: int, new_order: bool):
        super().__init__()
        self.heads = heads
        self.new_order = new_order
        self.norm = _Norm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww)
        qkv = self.qkv(self.norm(x))
        n, d, T = b * self.heads, c // self.heads, hh * ww
        if self.new_order:   # [q (all heads) | k | v], each then split by head
            q, k, v = (z.reshape(n, d, T) for z in qkv.chunk(3, dim=1))
        else:                # per head [q | k | v]
            q, k, v = qkv.reshape(n, 3 * d, T).split(d, dim=1)
        a = _attend(q, k, v).reshape(b, c, T)
        return (x + self.proj_out(a)).reshape(b, c, hh, ww)


class _Stage(nn.Sequential):
    """A sequence of layers; those with ``takes_emb`` also receive the time embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if getattr(layer, "takes_emb", False) else layer(x)
        return x


def _heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels == -1:
        if num_heads < 1 or channels % num_heads:
            raise DeqirError(f"attention width {channels} is not divisible by num_heads={num_heads}")
        return num_heads
    if num_head_channels < 1 or channels % num_head_channels:
        raise DeqirError(f"attention width {channels} is not divisible by num_head_channels={num_head_channels}")
    return channels // num_head_channels


class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (unconditional, 2-D), same keyword arguments.

    ``attention_resolutions`` are down-sampling rates (1, 2, 4, ...), as in ``UNetModel``.
    ``forward(x, t)`` takes x (B, in_channels, H, W) and t (B,) raw integer timesteps and returns
    (B, out_channels, H, W) in x's dtype (the first 3 channels are eps when out_channels is 6).
    """

    tileable = True          # fully convolutional: api/budget may run it in tiles (models/tiled)

    arch = "adm"

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult=(1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes=None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        if dims != 2:
            raise DeqirError("ADMUNet supports 2-D images only (dims=2)")
        if num_classes is not None:
            raise DeqirError("class-conditional ADM models are not supported (num_classes must be None)")
        channel_mult = tuple(channel_mult)
        attention_resolutions = tuple(sorted({int(r) for r in attention_resolutions}))
        if not channel_mult or num_res_blocks < 1:
            raise DeqirError("ADMUNet needs at least one level and one residual block per level")
        widths = [int(m * model_channels) for m in channel_mult]
        if any(w <= 0 or w % 32 for w in widths):
            raise DeqirError(f"every level width must be a positive multiple of 32 (GroupNorm(32)); got {widths}")
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.config = dict(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            out_channels=out_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, dropout=dropout, channel_mult=channel_mult,
            conv_resample=conv_resample, use_fp16=use_fp16, num_heads=num_heads,
            num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.channel_mult = channel_mult
        self.use_fp16 = use_fp16
        self.size_multiple = 2 ** (len(channel_mult) - 1)

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))

        def res(cin, cout, **kw):
            return _ResBlock(cin, emb_dim, dropout, cout, use_scale_shift_norm, **kw)

        def attn(c, heads):
            return _Attention(c, _heads(c, heads, num_head_channels), use_new_attention_order)

        ch = widths[0]
        self.input_blocks = nn.ModuleList([_Stage(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips = [ch]
        rate = 1
        last = len(channel_mult) - 1
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers = [res(ch, width)]
                ch = width
                if rate in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(_Stage(*layers))
                skips.append(ch)
            if level != last:
                down = res(ch, ch, down=True) if resblock_updown else _Down(ch, conv_resample)
                self.input_blocks.append(_Stage(down))
                skips.append(ch)
                rate *= 2

        self.middle_block = _Stage(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level in range(last, -1, -1):
            width = widths[level]
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), width)]
                ch = width
                if rate in attention_resolutions:
                    layers.append(attn(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else _Up(ch, conv_resample))
                    rate //= 2
                self.output_blocks.append(_Stage(*layers))

        self.out = nn.Sequential(_Norm32(ch), nn.SiLU(),
                                 _zeroed(nn.Conv2d(widths[0], out_channels, 3, padding=1)))

    def _torso(self):
        return (self.input_blocks, self.middle_block, self.output_blocks)

    def convert_to_fp16(self) -> "ADMUNet":
        """Cast the convolutions of the input, middle and output blocks to float16 (in place)."""
        for part in self._torso():
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.half()
        return self

    def convert_to_fp32(self) -> "ADMUNet":
        """Undo :meth:`convert_to_fp16`."""
        for part in self._torso():
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.float()
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_input(x, t, self.in_channels, self.size_multiple, "ADMUNet")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        lin = self.time_embed[0]
        emb = self.time_embed(adm_timestep_embedding(t.to(x.device), self.model_channels).to(lin.weight.dtype))
        h = x.to(self.input_blocks[0][0].weight.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out_dtype = self.out[2].weight.dtype
        return self.out(h.to(out_dtype)).to(x.dtype)


def _check_input(x, t, channels: int, multiple: int, name: str) -> None:
    """Shape checks only (no device synchronisation: safe under CUDA-graph capture)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise DeqirError(f"{name} expects x of shape (B, C, H, W); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] != channels:
        raise DeqirError(f"{name} expects {channels} input channels; got {x.shape[1]}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise DeqirError(f"{name}: image size {h}x{w} must be a positive multiple of {multiple} "
                         f"(2 ** (levels - 1)); pad or crop the input")
    if not isinstance(t, torch.Tensor) or not (t.dim() == 0 or (t.dim() == 1 and t.shape[0] == x.shape[0])):
        raise DeqirError(f"{name} expects t of shape (B,) = ({x.shape[0]},); got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def _ints(value) -> tuple:
    if isinstance(value, str):
        return tuple(float(v) if "." in v else int(v) for v in value.split(",") if v.strip())
    return tuple(value)


def adm_config(image_size: int = 256, num_channels: int = 128, num_res_blocks: int = 2,
               channel_mult="", learn_sigma: bool = False, attention_resolutions="16,8",
               num_heads: int = 4, num_head_channels: int = -1, num_heads_upsample: int = -1,
               use_scale_shift_norm: bool = True, dropout: float = 0.0, resblock_updown: bool = False,
               use_fp16: bool = False, use_new_attention_order: bool = False, in_channels: int = 3,
               **ignored) -> dict:
    """``ADMUNet`` keyword arguments from guided-diffusion's ``create_model`` settings.

    Same names and defaults as guided-diffusion's script settings: ``attention_resolutions``
    here are pixel resolutions (``"32,16,8"``), turned into rates ``image_size // r``;
    ``channel_mult=""`` picks the default for the image size; ``learn_sigma`` doubles the output
    channels (eps and the variance interpolation). ``class_cond``/``use_checkpoint`` are ignored
    (must be falsy for the former).
    """
    if ignored.get("class_cond"):
        raise DeqirError("class-conditional ADM models are not supported")
    if channel_mult in ("", None, ()):
        defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                    64: (1, 2, 3, 4)}
        if image_size not in defaults:
            raise DeqirError(f"no default channel_mult for image_size {image_size}; give channel_mult")
        channel_mult = defaults[image_size]
    else:
        channel_mult = _ints(channel_mult)
    rates = tuple(sorted(image_size // int(r) for r in _ints(attention_resolutions)))
    return dict(image_size=image_size, in_channels=in_channels, model_channels=num_channels,
                out_channels=in_channels * (2 if learn_sigma else 1), num_res_blocks=num_res_blocks,
                attention_resolutions=rates, dropout=dropout, channel_mult=tuple(channel_mult),
                use_fp16=use_fp16, num_heads=num_heads, num_head_channels=num_head_channels,
                num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
                resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order)


def adm_256_uncond_config() -> dict:
    """``ADMUNet`` kwargs of guided-diffusion's ``256x256_diffusion_uncond.pt`` (552,814,086 params)."""
    return adm_config(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="",
                      learn_sigma=True, attention_resolutions="32,16,8", num_heads=4,
                      num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True,
                      dropout=0.1, resblock_updown=True, use_fp16=True, use_new_attention_order=False)
