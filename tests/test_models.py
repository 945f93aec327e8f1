"""The pretrained-UNet architectures (ADM, DDPM) and their checkpoint loading.

Full-size models are only built on the ``meta`` device (names, shapes, counts, output shapes);
every numerical test runs on small configurations of the same classes. The forward passes are
checked against independent functional re-derivations written here from the originals'
documented op order (guided-diffusion ``UNetModel``, ermongroup/ddim ``Model``).
"""
from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deqir_dist.errors import DeqirError
from deqir_dist.models import (
    MODEL_NAMES,
    ADMUNet,
    CUDAGraphDenoiser,
    DDPMUNet,
    adm_256_uncond_config,
    adm_config,
    infer_config,
    load_denoiser,
    save_denoiser,
    sdedit_celeba_hq_config,
)
from deqir_dist.models.adm import adm_timestep_embedding
from deqir_dist.models.ddpm import ddpm_timestep_embedding

KEYS = Path("/work/shared/checkpoints")
ADM_JSON = KEYS / "guided_diffusion_256_uncond.keys.json"
DDPM_JSON = KEYS / "sdedit_celeba_hq.keys.json"
needs_keys = pytest.mark.skipif(not (ADM_JSON.exists() and DDPM_JSON.exists()),
                                reason="checkpoint key manifests not available")

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: thread hand-offs cost more than they save on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL_ADM = dict(image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                 attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=8,
                 resblock_updown=True, use_scale_shift_norm=True)
ADM_VARIANTS = {
    "updown-scaleshift-legacy": SMALL_ADM,
    "updown-scaleshift-new": {**SMALL_ADM, "use_new_attention_order": True},
    "conv-resample-add-heads": {**SMALL_ADM, "resblock_updown": False, "use_scale_shift_norm": False,
                                "num_head_channels": -1, "num_heads": 2, "num_heads_upsample": 4,
                                "attention_resolutions": (1, 2), "use_new_attention_order": True},
}
SMALL_DDPM = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0,
                  in_channels=3, resolution=32, resamp_with_conv=True)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the originals zero some output convs at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:                       # conv / linear: variance-preserving
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith(".weight"):        # 1-D weights are GroupNorm scales
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def small_adm(cfg=SMALL_ADM, seed=0):
    return randomize(ADMUNet(**cfg), seed)


def small_ddpm(cfg=SMALL_DDPM, seed=0):
    return randomize(DDPMUNet(**cfg), seed)


def inputs(shape=(2, 3, 16, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.tensor([3, 971][:shape[0]] + [500] * max(0, shape[0] - 2))


# ----------------------------------------------------------------------------- full-size manifests

@needs_keys
@pytest.mark.parametrize("cls,cfg,path,out_ch", [(ADMUNet, adm_256_uncond_config, ADM_JSON, 6),
                                                 (DDPMUNet, sdedit_celeba_hq_config, DDPM_JSON, 3)])
def test_full_size_names_shapes_counts(cls, cfg, path, out_ch):
    ref = json.loads(path.read_text())
    with torch.device("meta"):
        model = cls(**cfg())
    mine = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert mine == list(ref["tensors"].items())          # every name and shape, in order
    assert len(mine) == ref["num_tensors"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    assert list(model.buffers()) == [] and ref["buffers"] == []
    # the full models run shape-only on meta: no host tensor is made inside forward
    with torch.device("meta"):
        out = model(torch.empty(1, 3, 256, 256), torch.zeros(1, dtype=torch.int64))
    assert tuple(out.shape) == (1, out_ch, 256, 256)


@needs_keys
def test_full_size_configs_and_fp16_set():
    ref = json.loads(ADM_JSON.read_text())
    c = ref["config"]
    cfg = adm_config(**{k: v for k, v in c.items() if not k.startswith("resolved")})
    assert cfg == adm_256_uncond_config()
    assert cfg["out_channels"] == 6 and cfg["channel_mult"] == tuple(c["resolved_channel_mult"])
    assert cfg["attention_resolutions"] == tuple(c["resolved_attention_ds"])
    with torch.device("meta"):
        model = ADMUNet(**cfg).convert_to_fp16()
    half = [k for k, v in model.state_dict().items() if v.dtype == torch.float16]
    assert half == ref["tensors_converted_to_fp16_by_convert_to_fp16"]
    d = json.loads(DDPM_JSON.read_text())["config"]
    ddpm = {k: d[k] for k in ("ch", "out_ch", "num_res_blocks", "dropout", "in_channels", "resamp_with_conv")}
    assert sdedit_celeba_hq_config() == {**ddpm, "ch_mult": tuple(d["ch_mult"]),
                                         "attn_resolutions": tuple(d["attn_resolutions"]),
                                         "resolution": d["image_size"]}
    with torch.device("meta"):
        assert DDPMUNet(**sdedit_celeba_hq_config()).attention_levels == ((4,), (4,))


@needs_keys
@pytest.mark.parametrize("path,arch,preset", [(ADM_JSON, "adm", "adm-256-uncond"),
                                              (DDPM_JSON, "ddpm", "sdedit-celeba-hq")])
def test_detects_released_checkpoints_from_keys(path, arch, preset):
    shapes = json.loads(path.read_text())["tensors"]
    found_arch, cfg, found_preset = infer_config(shapes)
    assert (found_arch, found_preset) == (arch, preset)
    assert cfg == (adm_256_uncond_config() if arch == "adm" else sdedit_celeba_hq_config())
    # without the preset table, the shapes alone give the same structure
    from deqir_dist.models.loading import _infer_adm, _infer_ddpm
    tuples = {k: tuple(v) for k, v in shapes.items()}
    if arch == "ddpm":
        assert _infer_ddpm(tuples) == sdedit_celeba_hq_config()
    else:
        structural = ("in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
                      "channel_mult", "use_scale_shift_norm", "resblock_updown")
        got = _infer_adm(tuples)
        assert {k: got[k] for k in structural} == {k: cfg[k] for k in structural}


@needs_keys
@pytest.mark.parametrize("path,preset", [(ADM_JSON, "adm-256-uncond"), (DDPM_JSON, "sdedit-celeba-hq")])
def test_released_checkpoint_flows_on_meta_tensors(monkeypatch, path, preset):
    """load_denoiser's named and auto-detected paths, fed the released files' names and shapes."""
    import deqir_dist.models.loading as loading
    ref = json.loads(path.read_text())
    fake = {k: torch.empty(v, device="meta") for k, v in ref["tensors"].items()}
    monkeypatch.setattr(loading, "read_state_dict", lambda p: (dict(fake), {}))
    for args, kw in (((preset,), {"checkpoint": "x.ckpt"}), (("x.pt",), {}), ((None,), {"checkpoint": "x.pt"})):
        model = load_denoiser(*args, **kw, dtype=torch.float16)
        assert not model.training and sum(p.numel() for p in model.parameters()) == ref["num_params"]
        half = sorted(k for k, v in model.state_dict().items() if v.dtype == torch.float16)
        if preset == "adm-256-uncond":     # guided-diffusion's convert_to_fp16 set exactly
            assert half == sorted(ref["tensors_converted_to_fp16_by_convert_to_fp16"])
        else:
            assert len(half) == ref["num_tensors"]


def test_named_models_fresh_and_unknown_name():
    for name, cls, n in (("adm-256-uncond", ADMUNet, 552_814_086), ("sdedit-celeba-hq", DDPMUNet, 113_673_219)):
        m = load_denoiser(name, device="meta", random_weights=True)
        assert isinstance(m, cls) and not m.training
        with pytest.raises(DeqirError, match="has no weights here.*random_weights=True"):
            load_denoiser(name, device="meta")
        assert sum(p.numel() for p in m.parameters()) == n
    assert MODEL_NAMES == ("builtin", "analytic", "adm-256-uncond", "sdedit-celeba-hq")
    with pytest.raises(DeqirError, match="unknown model"):
        load_denoiser("imagenet-512")
    with pytest.raises(DeqirError, match="not found"):
        load_denoiser("no/such/file.pt")
    m = load_denoiser("ddpm", config=SMALL_DDPM)
    assert isinstance(m, DDPMUNet) and not m.training


# ----------------------------------------------------------------------------- timestep embedding, attention

def test_timestep_embeddings_follow_each_original_formula():
    t = torch.tensor([0, 1, 17, 250, 999])
    tt = t.double().numpy()[:, None]
    for dim in (32, 33):
        half = dim // 2
        f = np.exp(-math.log(10000) * np.arange(half) / half)           # ADM: i / half, cos first
        ref = np.concatenate([np.cos(tt * f), np.sin(tt * f)] + ([np.zeros((5, 1))] if dim % 2 else []), 1)
        np.testing.assert_allclose(adm_timestep_embedding(t, dim).numpy(), ref, atol=5e-4)
        f = np.exp(-math.log(10000) * np.arange(half) / (half - 1))     # DDPM: i / (half - 1), sin first
        ref = np.concatenate([np.sin(tt * f), np.cos(tt * f)] + ([np.zeros((5, 1))] if dim % 2 else []), 1)
        np.testing.assert_allclose(ddpm_timestep_embedding(t, dim).numpy(), ref, atol=5e-4)
    assert adm_timestep_embedding(t, 32).dtype == torch.float32
    assert adm_timestep_embedding(t.to("meta"), 32).device.type == "meta"     # built on t's device


def _hand_attention(q, k, v):
    """Per head: out[:, i] = sum_j softmax_j(q_i . k_j / sqrt(d)) v[:, j]; q, k, v (d, T) float64."""
    logits = q.T @ k / math.sqrt(q.shape[0])
    w = torch.exp(logits - logits.max(1, keepdim=True).values)
    w = w / w.sum(1, keepdim=True)
    return v @ w.T


@pytest.mark.parametrize("new_order", [False, True])
def test_adm_attention_matches_hand_computation(new_order):
    from deqir_dist.models.adm import _Attention
    att = randomize(_Attention(64, heads=4, new_order=new_order).double(), seed=3)
    x = torch.randn(2, 64, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        got = att(x)
        b, c, T, d = 2, 64, 15, 16
        qkv = att.qkv(att.norm(x.reshape(b, c, T)))
        want = torch.empty(b, c, T, dtype=torch.float64)
        for i in range(b):
            for h in range(4):
                if new_order:        # channels [q heads | k heads | v heads]
                    q, k, v = (qkv[i, s * c + h * d: s * c + (h + 1) * d] for s in range(3))
                else:                # channels [head0 (q k v) | head1 (q k v) | ...]
                    q, k, v = (qkv[i, h * 3 * d + s * d: h * 3 * d + (s + 1) * d] for s in range(3))
                want[i, h * d:(h + 1) * d] = _hand_attention(q, k, v)
        want = x + att.proj_out(want).reshape(x.shape)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_ddpm_attention_matches_hand_computation():
    from deqir_dist.models.ddpm import _AttnBlock
    att = randomize(_AttnBlock(32).double(), seed=4)
    x = torch.randn(2, 32, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        z = att.norm(x)
        q, k, v = (m(z).flatten(2) for m in (att.q, att.k, att.v))
        o = torch.stack([_hand_attention(q[i], k[i], v[i]) for i in range(2)]).reshape(x.shape)
        torch.testing.assert_close(att(x), x + att.proj_out(o), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- functional re-derivations

def _conv(sd, h, n, stride=1, pad=1):
    w = sd[n + ".weight"]
    fn = F.conv1d if w.dim() == 3 else F.conv2d
    return fn(h, w, sd[n + ".bias"], stride=stride, padding=pad)


def _lin(sd, h, n):
    return F.linear(h, sd[n + ".weight"], sd[n + ".bias"])


def _silu(h):
    return h * torch.sigmoid(h)


def ref_ddpm(sd, cfg, x, t):
    """ermongroup/ddim Model.forward, written out with functional ops on the state dict."""
    gn = lambda h, n: F.group_norm(h, 32, sd[n + ".weight"], sd[n + ".bias"], 1e-6)  # noqa: E731
    half = cfg["ch"] // 2
    f = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    e = t.float()[:, None] * f[None]
    temb = torch.cat([torch.sin(e), torch.cos(e)], 1).to(x.dtype)
    temb = _lin(sd, _silu(_lin(sd, temb, "temb.dense.0")), "temb.dense.1")

    def res(h, n):
        z = _conv(sd, _silu(gn(h, n + ".norm1")), n + ".conv1")
        z = z + _lin(sd, _silu(temb), n + ".temb_proj")[:, :, None, None]
        z = _conv(sd, _silu(gn(z, n + ".norm2")), n + ".conv2")
        if n + ".nin_shortcut.weight" in sd:
            h = _conv(sd, h, n + ".nin_shortcut", pad=0)
        return h + z

    def attn(h, n):
        b, c, hh, ww = h.shape
        z = gn(h, n + ".norm")
        q, k, v = (_conv(sd, z, f"{n}.{s}", pad=0).flatten(2) for s in "qkv")
        w = torch.softmax(q.transpose(1, 2) @ k * c ** -0.5, dim=2)      # (b, i, j)
        return h + _conv(sd, (v @ w.transpose(1, 2)).reshape(b, c, hh, ww), n + ".proj_out", pad=0)

    levels, nrb = len(cfg["ch_mult"]), cfg["num_res_blocks"]
    hs = [_conv(sd, x, "conv_in")]
    for i in range(levels):
        for j in range(nrb):
            h = res(hs[-1], f"down.{i}.block.{j}")
            if f"down.{i}.attn.{j}.q.weight" in sd:
                h = attn(h, f"down.{i}.attn.{j}")
            hs.append(h)
        if i < levels - 1:
            hs.append(_conv(sd, F.pad(hs[-1], (0, 1, 0, 1)), f"down.{i}.downsample.conv", stride=2, pad=0))
    h = res(attn(res(hs[-1], "mid.block_1"), "mid.attn_1"), "mid.block_2")
    for i in reversed(range(levels)):
        for j in range(nrb + 1):
            h = res(torch.cat([h, hs.pop()], 1), f"up.{i}.block.{j}")
            if f"up.{i}.attn.{j}.q.weight" in sd:
                h = attn(h, f"up.{i}.attn.{j}")
        if i > 0:
            h = _conv(sd, F.interpolate(h, scale_factor=2.0, mode="nearest"), f"up.{i}.upsample.conv")
    return _conv(sd, _silu(gn(h, "norm_out")), "conv_out")


def ref_adm(sd, cfg, x, t):
    """guided-diffusion UNetModel.forward (fp32 path), written out with functional ops."""
    gn = lambda h, n: F.group_norm(h, 32, sd[n + ".weight"], sd[n + ".bias"], 1e-5)  # noqa: E731
    mc, mult, nrb = cfg["model_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
    rates = cfg["attention_resolutions"]
    nhc = cfg.get("num_head_channels", -1)
    new = cfg.get("use_new_attention_order", False)
    heads_dn = cfg.get("num_heads", 1)
    heads_up = cfg.get("num_heads_upsample", -1)
    heads_up = heads_dn if heads_up == -1 else heads_up
    half = mc // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    e = t.float()[:, None] * f[None]
    emb = torch.cat([torch.cos(e), torch.sin(e)], 1).to(x.dtype)
    emb = _lin(sd, _silu(_lin(sd, emb, "time_embed.0")), "time_embed.2")

    def res(h, n, mode=None):
        z = _silu(gn(h, n + ".in_layers.0"))
        if mode == "down":
            z, h = F.avg_pool2d(z, 2), F.avg_pool2d(h, 2)
        elif mode == "up":
            z, h = F.interpolate(z, scale_factor=2, mode="nearest"), F.interpolate(h, scale_factor=2, mode="nearest")
        z = _conv(sd, z, n + ".in_layers.2")
        s = _lin(sd, _silu(emb), n + ".emb_layers.1")[:, :, None, None]
        if cfg.get("use_scale_shift_norm"):
            scale, shift = s.chunk(2, 1)
            z = gn(z, n + ".out_layers.0") * (1 + scale) + shift
        else:
            z = gn(z + s, n + ".out_layers.0")
        z = _conv(sd, _silu(z), n + ".out_layers.3")
        if n + ".skip_connection.weight" in sd:
            h = _conv(sd, h, n + ".skip_connection", pad=0)
        return h + z

    def attn(h, n, heads):
        b, c, hh, ww = h.shape
        heads = c // nhc if nhc != -1 else heads
        d, T = c // heads, hh * ww
        qkv = _conv(sd, gn(h.reshape(b, c, T), n + ".norm"), n + ".qkv", pad=0)
        if new:
            q, k, v = (z.reshape(b * heads, d, T) for z in qkv.chunk(3, 1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * d, T).split(d, 1)
        w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(d), dim=-1)     # (n, t, s)
        o = (v @ w.transpose(1, 2)).reshape(b, c, T)
        return h + _conv(sd, o, n + ".proj_out", pad=0).reshape(b, c, hh, ww)

    updown = cfg.get("resblock_updown")
    h = _conv(sd, x, "input_blocks.0.0")
    hs, k = [h], 1
    for lv in range(len(mult)):
        for _ in range(nrb):
            h = res(h, f"input_blocks.{k}.0")
            if 2 ** lv in rates:
                h = attn(h, f"input_blocks.{k}.1", heads_dn)
            hs.append(h)
            k += 1
        if lv < len(mult) - 1:
            h = res(h, f"input_blocks.{k}.0", "down") if updown else \
                _conv(sd, h, f"input_blocks.{k}.0.op", stride=2, pad=1)
            hs.append(h)
            k += 1
    h = res(attn(res(h, "middle_block.0"), "middle_block.1", heads_dn), "middle_block.2")
    k = 0
    for lv in reversed(range(len(mult))):
        for i in range(nrb + 1):
            h = res(torch.cat([h, hs.pop()], 1), f"output_blocks.{k}.0")
            j = 1
            if 2 ** lv in rates:
                h, j = attn(h, f"output_blocks.{k}.1", heads_up), 2
            if lv and i == nrb:
                h = res(h, f"output_blocks.{k}.{j}", "up") if updown else \
                    _conv(sd, F.interpolate(h, scale_factor=2, mode="nearest"), f"output_blocks.{k}.{j}.conv")
            k += 1
    return _conv(sd, _silu(gn(h, "out.0")), "out.2")


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 3, 8, 12)])
def test_ddpm_forward_equals_functional_reference(shape):
    model = small_ddpm().double()
    assert model.attention_levels == ((1,), (1,))         # resolution 32, attention at 16 -> level 1
    x, t = inputs(shape)
    x = x.double()
    with torch.no_grad():
        got = model(x, t)
        want = ref_ddpm(model.state_dict(), SMALL_DDPM, x, t)
    assert got.shape == (shape[0], 3, *shape[2:])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    with torch.no_grad():                                   # float32, same weights
        got32 = model.float()(x.float(), t)
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", list(ADM_VARIANTS))
def test_adm_forward_equals_functional_reference(variant):
    cfg = ADM_VARIANTS[variant]
    model = small_adm(cfg).double()
    x, t = inputs((2, 3, 8, 16))
    x = x.double()
    with torch.no_grad():
        got = model(x, t)
        want = ref_adm(model.state_dict(), cfg, x, t)
    assert got.shape == (2, 6, 8, 16)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_attention_order_and_fully_convolutional_sizes():
    legacy = small_adm(SMALL_ADM)
    new = ADMUNet(**ADM_VARIANTS["updown-scaleshift-new"])
    new.load_state_dict(legacy.state_dict())
    x, t = inputs()
    with torch.no_grad():
        assert not torch.allclose(legacy(x, t), new.eval()(x, t), atol=1e-4)   # the head split matters
    ddpm = small_ddpm()
    with torch.no_grad():
        assert ddpm(torch.randn(1, 3, 6, 10), torch.tensor([1])).shape == (1, 3, 6, 10)
        assert ddpm(torch.randn(2, 3, 16, 16), torch.tensor(7)).shape == (2, 3, 16, 16)   # scalar t
    for model in (ddpm, legacy):
        with pytest.raises(DeqirError, match="multiple of 2"):
            model(torch.randn(1, 3, 15, 16), torch.tensor([1]))
        with pytest.raises(DeqirError, match="channels"):
            model(torch.randn(1, 4, 16, 16), torch.tensor([1]))
        with pytest.raises(DeqirError, match="t of shape"):
            model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))
    # attention levels come from `resolution`, not from the runtime size
    deep = DDPMUNet(**{**SMALL_DDPM, "ch_mult": (1, 1, 2), "resolution": 64, "attn_resolutions": (16,)})
    assert deep.attention_levels == ((2,), (2,))
    with pytest.raises(DeqirError, match="multiples of 32"):
        DDPMUNet(**{**SMALL_DDPM, "ch": 48})


# ----------------------------------------------------------------------------- precision

def test_fp16_as_guided_diffusion_and_bf16(tmp_path):
    model = small_adm()
    x, t = inputs()
    with torch.no_grad():
        ref = model(x, t)
    path = tmp_path / "adm.safetensors"
    save_denoiser(model, path)
    half = load_denoiser(str(path), dtype=torch.float16)
    # torso convolutions in fp16; time embedding, Linear layers, norms and output head in fp32
    dtypes = {k: v.dtype for k, v in half.state_dict().items()}
    assert dtypes["input_blocks.1.0.in_layers.2.weight"] == torch.float16
    assert dtypes["input_blocks.2.0.in_layers.0.weight"] == torch.float32     # a norm
    assert dtypes["input_blocks.1.0.emb_layers.1.weight"] == torch.float32
    assert dtypes["middle_block.1.qkv.weight"] == torch.float16
    assert dtypes["out.2.weight"] == torch.float32 and dtypes["time_embed.0.weight"] == torch.float32
    with torch.no_grad():
        out = half(x, t)
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 1e-2
    bf = load_denoiser(str(path), dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    with torch.no_grad():
        out = bf(x.bfloat16(), t)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).norm() / ref.norm() < 5e-2

    ddpm = small_ddpm()
    with torch.no_grad():
        ref = ddpm(x, t)
    p2 = tmp_path / "ddpm.pt"
    torch.save(ddpm.state_dict(), p2)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        m = load_denoiser(str(p2), dtype=dtype)
        with torch.no_grad():
            out = m(x.to(dtype), t)
        assert out.dtype == dtype and (out.float() - ref).norm() / ref.norm() < tol


# ----------------------------------------------------------------------------- round trips and detection

def test_ddpm_plain_pt_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file
    model = small_ddpm(seed=5)
    x, t = inputs()
    with torch.no_grad():
        ref = model(x, t)
    torch.save(model.state_dict(), tmp_path / "m.ckpt")                       # the upstream format
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "dp.pt")
    for name in ("m.ckpt", "m.safetensors", "dp.pt"):
        loaded = load_denoiser(str(tmp_path / name))                          # config inferred from shapes
        assert isinstance(loaded, DDPMUNet) and not loaded.training
        assert loaded.config["ch_mult"] == (1, 2) and loaded.attention_levels == ((1,), (1,))
        with torch.no_grad():
            assert torch.equal(loaded(x, t), ref)
    loaded = load_denoiser("ddpm", checkpoint=tmp_path / "m.ckpt", config=SMALL_DDPM)
    assert loaded.config == DDPMUNet(**SMALL_DDPM).config


@pytest.mark.parametrize("variant", list(ADM_VARIANTS))
def test_adm_round_trip(tmp_path, variant):
    cfg = ADM_VARIANTS[variant]
    model = small_adm(cfg, seed=6)
    x, t = inputs()
    with torch.no_grad():
        ref = model(x, t)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    save_denoiser(model, tmp_path / "with_config.safetensors")
    save_denoiser(model, tmp_path / "with_config.pt")
    loaded = [load_denoiser(str(tmp_path / "plain.pt"), config=cfg),           # heads are not in the weights
              load_denoiser("adm", checkpoint=str(tmp_path / "plain.pt"), config=cfg),
              load_denoiser(str(tmp_path / "with_config.safetensors")),
              load_denoiser(tmp_path / "with_config.pt")]
    for m in loaded:
        assert isinstance(m, ADMUNet) and not m.training
        with torch.no_grad():
            assert torch.equal(m(x, t), ref)


def test_adm_inferred_from_shapes(tmp_path):
    cfg = {**SMALL_ADM, "num_head_channels": 64}     # guided-diffusion's head convention
    model = small_adm(cfg, seed=7)
    torch.save(model.state_dict(), tmp_path / "a.pt")
    with pytest.warns(UserWarning, match="num_head_channels=64"):
        loaded = load_denoiser(str(tmp_path / "a.pt"))
    assert loaded.config["resblock_updown"] and loaded.config["use_scale_shift_norm"]
    assert loaded.config["attention_resolutions"] == (2,) and loaded.config["channel_mult"] == (1, 2)
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
    other = small_adm({**ADM_VARIANTS["conv-resample-add-heads"], "attention_resolutions": (2,)}, seed=8)
    torch.save(other.state_dict(), tmp_path / "b.pt")
    with pytest.warns(UserWarning):
        got = load_denoiser(str(tmp_path / "b.pt")).config
    assert not got["resblock_updown"] and not got["use_scale_shift_norm"] and got["conv_resample"]


# ----------------------------------------------------------------------------- loader safety and errors

class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"conv_in.weight": _Evil(str(target))}))
    zipped = tmp_path / "zipped.ckpt"
    torch.save({"conv_in.weight": _Evil(str(target))}, zipped)
    for path in (raw, zipped):
        with pytest.raises(DeqirError, match="refused") as e:
            load_denoiser(str(path))
        assert "\n" not in str(e.value)
        with pytest.raises(DeqirError, match="refused"):
            load_denoiser("sdedit-celeba-hq", checkpoint=str(path))
    assert not target.exists()


def test_truncated_and_malformed_files(tmp_path):
    model = small_ddpm()
    full = tmp_path / "full.pt"
    torch.save(model.state_dict(), full)
    data = full.read_bytes()
    from safetensors.torch import save_file
    save_file(dict(model.state_dict()), tmp_path / "full.safetensors")
    sdata = (tmp_path / "full.safetensors").read_bytes()
    cases = {"cut.pt": data[: len(data) // 2], "cut.ckpt": data[:10], "cut.safetensors": sdata[: len(sdata) // 2],
             "empty.pt": b""}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DeqirError, match="truncated or corrupt") as e:
            load_denoiser(str(tmp_path / name))
        assert "\n" not in str(e.value)
    torch.save([model.state_dict()], tmp_path / "list.pt")
    with pytest.raises(DeqirError, match="expected a state dict"):
        load_denoiser(str(tmp_path / "list.pt"))
    torch.save({"a": torch.zeros(3)}, tmp_path / "odd.pt")
    with pytest.raises(DeqirError, match="unrecognised checkpoint"):
        load_denoiser(str(tmp_path / "odd.pt"))


def test_state_dict_mismatch_lists_keys(tmp_path):
    sd = dict(small_ddpm().state_dict())
    sd["conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    del sd["norm_out.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(DeqirError) as e:
        load_denoiser("ddpm", checkpoint=str(tmp_path / "bad.pt"), config=SMALL_DDPM)
    msg = str(e.value)
    assert "1 missing: norm_out.bias" in msg and "1 unexpected: extra.weight" in msg
    assert "shape mismatch: conv_out.weight [3, 32, 1, 1] (model [3, 32, 3, 3])" in msg and "\n" not in msg
    # a small checkpoint given with a preset name: the first differing keys are listed
    torch.save(small_ddpm().state_dict(), tmp_path / "small.pt")
    with pytest.raises(DeqirError, match=r"does not match sdedit-celeba-hq: \d+ missing: down\.0\.block\.1"):
        load_denoiser("sdedit-celeba-hq", checkpoint=str(tmp_path / "small.pt"))
    with pytest.raises(DeqirError, match="holds a DDPM state dict"):
        load_denoiser("adm-256-uncond", checkpoint=str(tmp_path / "small.pt"))


def test_check_checkpoint_agrees_with_loading_without_reading_weights(tmp_path):
    from safetensors.torch import save_file

    from deqir_dist.models.loading import check_checkpoint, load_checkpoint
    good_st, good_pt = tmp_path / "good.safetensors", tmp_path / "good.pt"
    save_denoiser(small_ddpm(), good_st)
    torch.save(small_ddpm().state_dict(), good_pt)
    sd = dict(small_ddpm().state_dict())
    sd["conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    save_file(sd, tmp_path / "bad.safetensors")
    check_checkpoint(good_st)
    check_checkpoint(good_pt, "ddpm", config=SMALL_DDPM)
    for path, name, cfg in ((tmp_path / "bad.safetensors", "ddpm", SMALL_DDPM), (good_pt, "adm-256-uncond", None),
                            (good_pt, "sdedit-celeba-hq", None)):
        with pytest.raises(DeqirError) as loaded:
            load_checkpoint(path, name, cfg)
        with pytest.raises(DeqirError) as checked:
            check_checkpoint(path, name, cfg)
        assert str(checked.value) == str(loaded.value)


# ----------------------------------------------------------------------------- CUDA graph wrapper, CLI

def test_cuda_graph_wrapper_on_cpu():
    model = small_ddpm()
    x, t = inputs()
    if not torch.cuda.is_available():
        with pytest.raises(DeqirError, match="CUDA graphs need the model on a CUDA device"):
            CUDAGraphDenoiser(model, x.shape)
    wrapped = CUDAGraphDenoiser(model, x.shape, fallback=True)
    with torch.no_grad():
        assert torch.equal(wrapped(x, t), model(x, t))
        assert torch.equal(wrapped(x[:1], t[:1]), model(x[:1], t[:1]))
    assert wrapped.eager_calls == 2 and wrapped.replays == 0 and wrapped.graph is None
    with pytest.raises(DeqirError, match="batch_shape"):
        CUDAGraphDenoiser(model, (2, 3, 16), fallback=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager():
    model = small_adm().cuda()
    x, t = inputs((3, 3, 16, 16))
    x, t = x.cuda(), t.cuda()
    wrapped = CUDAGraphDenoiser(model, x.shape)
    with torch.no_grad():
        ref = model(x, t)
        torch.testing.assert_close(wrapped(x, t), ref)
        torch.testing.assert_close(wrapped(x[:2], t[:2]), ref[:2])      # smaller batch: padded replay
    assert wrapped.replays == 2 and wrapped.eager_calls == 0


def test_cli_restore_with_checkpoint_paths(tmp_path, capsys):
    from PIL import Image

    from deqir_dist.apps.cli import main
    img = tmp_path / "face.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(img)
    ddpm = tmp_path / "ddpm.ckpt"
    torch.save(small_ddpm().state_dict(), ddpm)
    adm = tmp_path / "adm.safetensors"
    save_denoiser(small_adm(), adm)
    base = ["restore", str(img), "--from-clean", "--task", "sr_avgpool", "--scale", "2", "--steps", "3",
            "--solver", "serial", "--no-progress", "--device", "cpu"]
    runs = {"a": ["--model", str(ddpm)], "b": ["--checkpoint", str(ddpm)],
            "c": ["--model", "ddpm", "--checkpoint", str(ddpm)], "d": ["--model", str(adm)]}
    for out, flags in runs.items():
        assert main(base + ["-o", str(tmp_path / out)] + flags) == 0
        assert (tmp_path / out / "face.png").exists()
    assert main(base + ["-o", str(tmp_path / "e"), "--model", "sdedit-celeba-hq", "--checkpoint", str(ddpm)]) == 2
    err = capsys.readouterr().err
    assert "does not match sdedit-celeba-hq" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "e" / "face.png")


# ----------------------------------------------------------------------------- attention (issue 25)

def test_attention_matches_the_explicit_formula_and_is_batch_invariant():
    from deqir_dist.models.attention import _attend_chunked, attend, attend_reference
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 257, 32, generator=g) for _ in range(3))
    ref = attend_reference(q, k, v)
    assert torch.allclose(attend(q, k, v), ref, atol=2e-6, rtol=1e-5)
    # the fallback, in blocks of a few queries, is the formula exactly
    assert torch.equal(_attend_chunked(q, k, v, max_logits=3 * 257 * 5), ref)
    # a row's result does not depend on what else is in the batch (parallel = serial relies on it)
    assert torch.equal(attend(q, k, v)[1:2], attend(q[1:2], k[1:2], v[1:2]))


def test_unet_attention_blocks_equal_the_einsum_they_replaced():
    """The DDPM and ADM attention layers, fed the same features, against the T x T formula."""
    from deqir_dist.models.adm import _attend
    from deqir_dist.models.ddpm import _AttnBlock
    g = torch.Generator().manual_seed(1)
    blk = _AttnBlock(32)
    x = torch.randn(2, 32, 6, 10, generator=g)
    with torch.no_grad():
        b, c, h, w = x.shape
        z = blk.norm(x)
        q, k, v = (m(z).reshape(b, c, h * w) for m in (blk.q, blk.k, blk.v))
        wts = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=2)
        want = x + blk.proj_out(torch.einsum("bij,bcj->bci", wts, v).reshape(b, c, h, w))
        assert torch.allclose(blk(x), want, atol=1e-5, rtol=1e-5)
    q, k, v = (torch.randn(4, 16, 60, generator=g) for _ in range(3))
    wts = torch.softmax(torch.einsum("ndt,nds->nts", q, k) * 16 ** -0.5, dim=-1)
    assert torch.allclose(_attend(q, k, v), torch.einsum("nts,nds->ndt", wts, v), atol=1e-5, rtol=1e-5)


def test_attention_memory_is_linear_in_pixels():
    """A 640x428 output's mid-block map (160x107 = 17,120 tokens): the explicit product would hold
    1.2 GB of logits; the kernel must stay far below that (measured in a child, RSS growth)."""
    import subprocess
    import sys
    # VmHWM: this process image's own peak (ru_maxrss would carry the forked pytest parent's across exec)
    code = ("import torch\n"
            "def peak():\n"
            "    return next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
            "from deqir_dist.models.attention import attend\n"
            "q, k, v = (torch.randn(1, 17120, 64) for _ in range(3))\n"
            "qt, kt, vt = (torch.randn(1, 64, 17120).transpose(1, 2) for _ in range(3))\n"
            "before = peak()\n"
            "attend(q, k, v)\n"
            "attend(qt, kt, vt)   # the UNets' layout: (N, C, T) maps seen as (N, T, C)\n"
            "print((peak() - before) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 300, f"attention grew RSS by {out.stdout.strip()} MB"


@pytest.mark.parametrize("attn", [(), (32,)])
def test_deepen_adds_identity_blocks_the_same_function(attn):
    """models.ddpm.deepen: R -> R' residual blocks per level computing exactly the same eps (with
    attention after every block of a level too), and the new blocks are really there."""
    from deqir_dist.models.ddpm import DDPMUNet, deepen
    torch.manual_seed(0)
    cfg = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=attn, resolution=64)
    small = DDPMUNet(**cfg).eval()
    with torch.no_grad():                       # no zero biases by chance: every weight matters
        for p in small.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 24, 36), torch.tensor([3, 640])
    for rb in (2, 3):
        big = DDPMUNet(**{**small.config, "num_res_blocks": rb}).eval()
        big.load_state_dict(deepen(small.state_dict(), small.config, rb))
        with torch.no_grad():
            assert torch.equal(small(x, t), big(x, t))
        assert len(big.down[0].block) == rb and len(big.up[0].block) == rb + 1
    with pytest.raises(DeqirError, match="fewer"):
        deepen(small.state_dict(), small.config, 0)
