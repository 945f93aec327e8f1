"""Checkpoint files for the pretrained UNets: safe reading, architecture detection, building.

Formats: ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` are read with ``torch.load(weights_only=True,
map_location="cpu")`` (memory-mapped when the file is a zip archive), so pickled code is never
run: a file with anything but tensors and plain containers is refused. ``.safetensors`` files
are read with safetensors (other suffixes are sniffed). Accepted content: a plain state dict
(name -> tensor, the upstream format of both released checkpoints), optionally with a
``module.`` prefix on every name, or this library's wrapper ``{"arch", "config", "state_dict"}``
(safetensors: metadata keys ``deqir_arch`` / ``deqir_config``), written by :func:`save_denoiser`.

Which architecture and configuration (first rule that applies):

1. an explicit ``config`` (with the architecture from ``name``, the file's metadata, or its keys);
2. a preset name (``adm-256-uncond``, ``sdedit-celeba-hq``): its published configuration;
3. a configuration stored in the file (:func:`save_denoiser`);
4. the file's names and shapes equal a preset's exactly: that preset (this is how the two
   released files are recognised);
5. inferred from the names and shapes. The architecture comes from the key pattern
   (guided-diffusion ``input_blocks.*`` / ``time_embed.*``; ermongroup ``down.*.block.*`` /
   ``temb.dense.*``). DDPM is fully determined by shapes (``resolution`` is only nominal: 256, the
   attention levels are what matters). ADM is determined by shapes except the attention head
   split, which no tensor records: guided-diffusion's convention (``num_head_channels=64``, legacy
   order, as in all its releases) is assumed with a warning; pass ``config`` otherwise.

Every inferred configuration is checked by building the model on the ``meta`` device and
comparing every name and shape; a mismatch raises a one-line ``DeqirError`` naming the first
missing, unexpected and wrongly-shaped keys.
"""
from __future__ import annotations

import inspect
import json
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch

from deqir_dist.errors import DeqirError, one_line
from deqir_dist.io.limits import zip_members
from deqir_dist.models.adm import ADMUNet, adm_256_uncond_config
from deqir_dist.models.ddpm import DDPMUNet, sdedit_celeba_hq_config
from deqir_dist.models.settings import PRESET_SAMPLERS

ARCHITECTURES = {"adm": ADMUNet, "ddpm": DDPMUNet}
# name -> (architecture, config factory, where the weights come from)
PRESETS = {
    "adm-256-uncond": ("adm", adm_256_uncond_config,
                       "guided-diffusion 256x256_diffusion_uncond.pt (ImageNet, 256x256)"),
    "sdedit-celeba-hq": ("ddpm", sdedit_celeba_hq_config, "SDEdit celeba_hq.ckpt (CelebA-HQ faces, 256x256)"),
}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
_ZIP_MAGIC = b"PK\x03\x04"




# ----------------------------------------------------------------------------- reading

def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_torch(path: Path):
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == _ZIP_MAGIC
    if head.lstrip()[:1] in (b"{", b"["):
        raise DeqirError(f"{path} is a JSON file, not a checkpoint (a diffusers folder is loaded by its folder: "
                         f"diffusers:{path.parent})")
    if is_zip:
        # torch maps a zip member's bytes as the tensor's data: a deflated member (an archive
        # re-zipped by a tool) would load as garbage weights, so it is read without mmap, and only
        # if its declared size is that of a real checkpoint (deflated weights shrink little; a zip
        # bomb's members claim hundreds of times the file)
        size, compressed = zip_members(path, f"checkpoint {path}")
        if compressed:
            cap = 4 * path.stat().st_size + (64 << 20)
            if size > cap:
                raise DeqirError(f"refused to load {path}: its compressed members would inflate to {size} bytes, "
                                 f"over {cap} for a file of {path.stat().st_size} bytes (save it with torch.save)")
            is_zip = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        msg = str(e)
        if "Weights only load failed" in msg:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg) or \
                re.search(r"Unsupported operand \d+", msg)
            why = f" ({found.group(0)})" if found else ""
            raise DeqirError(f"refused to load {path}: it contains pickled objects other than tensors{why}; "
                             f"only plain state dicts are loaded (pickled code is never run)") from None
        raise DeqirError(f"cannot read checkpoint {path}: truncated or corrupt file ({one_line(e, limit=160)})") from None


def _read_safetensors(path: Path, shapes_only: bool = False):
    try:
        from safetensors import safe_open
    except ImportError:
        raise DeqirError("reading .safetensors files needs the safetensors package (pip install safetensors)") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: (tuple(f.get_slice(k).get_shape()) if shapes_only else f.get_tensor(k)) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise DeqirError(f"cannot read checkpoint {path}: truncated or corrupt safetensors file "
                         f"({one_line(e, limit=160)})") from None
    info = {}
    if "deqir_arch" in meta:
        info["arch"] = meta["deqir_arch"]
    if "deqir_config" in meta:
        try:
            info["config"] = json.loads(meta["deqir_config"])
        except (ValueError, RecursionError):
            raise DeqirError(f"{path}: metadata deqir_config is not valid JSON") from None
    return sd, info


def read_state_dict(path, shapes_only: bool = False) -> tuple[dict, dict]:
    """(state dict of tensors, info) from a checkpoint file; info may hold ``arch`` and ``config``.

    ``shapes_only``: name -> shape instead of tensors (a safetensors file: from its header only)."""
    p = Path(path)
    if not p.is_file():
        raise DeqirError(f"checkpoint file not found: {path}")
    if _is_safetensors(p):
        sd, info = _read_safetensors(p, shapes_only)
        if shapes_only:
            sd = {k: torch.empty(v, device="meta") for k, v in sd.items()}
    else:
        obj = _read_torch(p)
        info = {}
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            info = {k: obj[k] for k in ("arch", "config") if k in obj}
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise DeqirError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
        sd = dict(obj)
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DeqirError(f"{path}: expected a state dict (name -> tensor); entries such as {bad[0]!r} "
                         f"are not tensors (top-level keys: {', '.join(map(str, list(sd)[:6]))})")
    if not sd:
        raise DeqirError(f"{path}: the checkpoint holds no tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "config" in info and not isinstance(info["config"], Mapping):
        raise DeqirError(f"{path}: the stored config is not a mapping")
    return (_shapes(sd) if shapes_only else sd), info


# ----------------------------------------------------------------------------- configuration

def _shapes(sd: Mapping) -> dict:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in sd.items()}


def _model_shapes(arch: str, config: Mapping) -> dict:
    with torch.device("meta"):
        model = ARCHITECTURES[arch](**config)
    return _shapes(model.state_dict())


def state_dict_mismatch(expected: Mapping, found: Mapping, show: int = 4) -> str | None:
    """None when the names and shapes agree, else one line naming the first differences."""
    exp, got = _shapes(expected), _shapes(found)
    missing = [k for k in exp if k not in got]
    unexpected = [k for k in got if k not in exp]
    shape = [f"{k} {list(got[k])} (model {list(exp[k])})" for k in exp if k in got and got[k] != exp[k]]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
        if items:
            more = f", ... (+{len(items) - show})" if len(items) > show else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:show])}{more}")
    return "; ".join(parts) or None


def detect_architecture(keys) -> str:
    """``adm`` or ``ddpm`` from the parameter names (guided-diffusion vs ermongroup layout)."""
    keys = set(keys)
    if "time_embed.0.weight" in keys and "input_blocks.0.0.weight" in keys:
        return "adm"
    if "temb.dense.0.weight" in keys and "conv_in.weight" in keys and any(k.startswith("down.0.block.") for k in keys):
        return "ddpm"
    first = ", ".join(sorted(keys)[:3])
    raise DeqirError(f"unrecognised checkpoint layout (keys such as {first}); expected guided-diffusion "
                     f"(input_blocks.*, time_embed.*) or ermongroup/ddim (down.*.block.*, temb.dense.*)")


def _count(shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in shapes for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def _infer_ddpm(shapes: Mapping) -> dict:
    try:
        ch, cin = shapes["conv_in.weight"][:2]
        out_ch = shapes["conv_out.weight"][0]
        levels = _count(shapes, r"down\.(\d+)\.")
        nrb = _count(shapes, r"down\.0\.block\.(\d+)\.")
        mult = []
        for i in range(levels):
            w = shapes[f"down.{i}.block.0.conv1.weight"][0]
            if w % ch:
                raise KeyError(w)
            mult.append(w // ch)
    except (KeyError, ValueError, IndexError):
        raise DeqirError("cannot infer the DDPM configuration from the checkpoint's shapes; pass config=") from None
    resolution = max(256, 2 ** (levels - 1))
    attn = tuple(resolution >> i for i in range(levels) if f"down.{i}.attn.0.q.weight" in shapes)
    with_conv = levels == 1 or "down.0.downsample.conv.weight" in shapes
    return dict(ch=ch, out_ch=out_ch, ch_mult=tuple(mult), num_res_blocks=nrb, attn_resolutions=attn,
                dropout=0.0, in_channels=cin, resolution=resolution, resamp_with_conv=with_conv)


def _infer_adm(shapes: Mapping) -> dict:
    try:
        mc = shapes["time_embed.0.weight"][1]
        cin = shapes["input_blocks.0.0.weight"][1]
        out = shapes["out.2.weight"][0]
    except (KeyError, IndexError):
        raise DeqirError("cannot infer the ADM configuration from the checkpoint's shapes; pass config=") from None
    n_out = _count(shapes, r"output_blocks\.(\d+)\.")
    for nrb in range(1, n_out):
        if n_out % (nrb + 1):
            continue
        levels = n_out // (nrb + 1)
        try:
            mult, rates = [], []
            for lv in range(levels):
                first = f"input_blocks.{1 + lv * (nrb + 1)}"
                w = shapes[f"{first}.0.in_layers.2.weight"][0]
                mult.append(w // mc if w % mc == 0 else w / mc)
                if f"{first}.1.qkv.weight" in shapes:
                    rates.append(2 ** lv)
            down = f"input_blocks.{nrb + 1}.0"
            updown = levels > 1 and f"{down}.in_layers.0.weight" in shapes
            conv_resample = levels == 1 or updown or f"{down}.op.weight" in shapes
            w1 = shapes["input_blocks.1.0.in_layers.2.weight"][0]
            scale_shift = shapes["input_blocks.1.0.emb_layers.1.weight"][0] == 2 * w1
        except (KeyError, IndexError):
            continue
        cfg = dict(image_size=256, in_channels=cin, model_channels=mc, out_channels=out, num_res_blocks=nrb,
                   attention_resolutions=tuple(rates), dropout=0.0, channel_mult=tuple(mult),
                   conv_resample=conv_resample, num_heads=1, num_head_channels=-1,
                   use_scale_shift_norm=scale_shift, resblock_updown=updown)
        try:
            if state_dict_mismatch(_model_shapes("adm", cfg), shapes) is None:
                return cfg
        except DeqirError:
            continue
    raise DeqirError("cannot infer the ADM configuration from the checkpoint's shapes; pass config=")


def infer_config(shapes: Mapping, arch: str | None = None) -> tuple[str, dict, str | None]:
    """(architecture, config, preset name or None) reproducing these names -> shapes.

    ``shapes`` maps parameter names to tensors or shapes. A preset is returned when the shapes
    equal its model's exactly.
    """
    shapes = _shapes(shapes)
    arch = arch or detect_architecture(shapes)
    for name, (parch, factory, _) in PRESETS.items():
        if parch == arch and state_dict_mismatch(_model_shapes(arch, factory()), shapes) is None:
            return arch, factory(), name
    if arch == "ddpm":
        cfg = _infer_ddpm(shapes)
    else:
        cfg = _infer_adm(shapes)
        widths = [shapes[k][1] for k in shapes if k.endswith(".qkv.weight")]
        if any(w % 64 for w in widths):
            raise DeqirError("the attention head split of this ADM checkpoint is not stored in its weights "
                             "and its widths are not multiples of 64; pass config= with num_heads or "
                             "num_head_channels")
        warnings.warn("ADM checkpoint: attention heads are not recorded in the weights; assuming "
                      "guided-diffusion's num_head_channels=64 with the legacy order (pass config= to override)",
                      stacklevel=4)
        cfg.update(num_heads=4, num_head_channels=64, use_new_attention_order=False)
    mismatch = state_dict_mismatch(_model_shapes(arch, cfg), shapes)
    if mismatch:
        raise DeqirError(f"cannot infer the {arch.upper()} configuration from the checkpoint ({mismatch}); "
                         f"pass config=")
    return arch, cfg, None


# ----------------------------------------------------------------------------- building

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise DeqirError(f"unsupported model dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise DeqirError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return _DTYPES[key]


def apply_precision(model: torch.nn.Module, dtype) -> torch.nn.Module:
    """float32 (default); float16: ADM as guided-diffusion's ``convert_to_fp16`` (torso convs in
    float16, norms, Linear layers and output head in float32), DDPM entirely in float16; bfloat16:
    the whole model. Norms, softmax and the timestep sinusoid always compute in float32."""
    dtype = parse_dtype(dtype) or torch.float32
    model.float()
    if dtype == torch.float16 and isinstance(model, ADMUNet):
        model.convert_to_fp16()
    elif dtype != torch.float32:
        model.to(dtype)
    return model


def _normalise_config(arch: str, config: Mapping) -> dict:
    if not isinstance(config, Mapping):
        raise DeqirError(f"config must be a mapping of {arch} keyword arguments")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config).items()}
    params = inspect.signature(ARCHITECTURES[arch].__init__).parameters
    unknown = [k for k in cfg if k not in params]
    if unknown:
        raise DeqirError(f"unknown {arch} config field(s): {', '.join(unknown)}")
    return cfg


def build_model(arch: str, config: Mapping, device=None) -> torch.nn.Module:
    """A freshly initialised model (on ``device``, default cpu; ``meta`` builds no storage)."""
    if arch not in ARCHITECTURES:
        raise DeqirError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    cfg = _normalise_config(arch, config)
    try:
        with torch.device(device or "cpu"):
            return ARCHITECTURES[arch](**cfg)
    except TypeError as e:
        raise DeqirError(f"bad {arch} config: {one_line(e, limit=160)}") from None


def load_checkpoint(path, name: str | None = None, config: Mapping | None = None) -> torch.nn.Module:
    """The model stored in ``path`` (float32, cpu, eval mode); see the module doc for the rules.

    ``name``: a preset or an architecture (``adm`` / ``ddpm``) the file must hold; ``config``:
    the architecture's keyword arguments (overrides everything else).
    """
    sd, info = read_state_dict(path)
    model = _checked_model(path, _shapes(sd), info, name, config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.float()
    preset = name if name in PRESETS else getattr(model, "preset_name", None)
    if preset in PRESET_SAMPLERS:       # the public checkpoints' recommended sampler settings
        model.sampler_card = dict(PRESET_SAMPLERS[preset])
    return model.eval()


def check_checkpoint(path, name: str | None = None, config: Mapping | None = None) -> None:
    """``load_checkpoint``'s checks (architecture, configuration, names and shapes) without loading
    the weights: a safetensors file is read by its header only, a torch file memory-mapped."""
    shapes, info = read_state_dict(path, shapes_only=True)
    _checked_model(path, shapes, info, name, config)


def _checked_model(path, shapes: Mapping, info: Mapping, name: str | None, config: Mapping | None):
    """The model (on the meta device) that a checkpoint of these shapes holds, or DeqirError."""
    if name is not None and name not in PRESETS and name not in ARCHITECTURES:
        raise DeqirError(f"unknown model {name!r}; choose from {', '.join((*PRESETS, *ARCHITECTURES))}")
    found = detect_architecture(shapes)
    arch = PRESETS[name][0] if name in PRESETS else name or found
    label = name or Path(path).name
    if found != arch:
        raise DeqirError(f"{path} holds a {found.upper()} state dict, not {label} ({arch.upper()})")
    if config is not None:
        cfg = config
    elif name in PRESETS:
        cfg = PRESETS[name][1]()
    elif "config" in info and info.get("arch") == arch:
        cfg = info["config"]
    else:
        _, cfg, preset = infer_config(shapes, arch=arch)
        label = preset or label
    model = build_model(arch, cfg, device="meta")
    if name in PRESETS or label in PRESETS:
        model.preset_name = name if name in PRESETS else label
    mismatch = state_dict_mismatch(model.state_dict(), shapes)
    if mismatch:
        raise DeqirError(f"{path} does not match {label}: {mismatch}")
    return model


def save_denoiser(model: torch.nn.Module, path) -> Path:
    """Write an ADMUNet / DDPMUNet with its configuration (``.safetensors`` or torch ``.pt``)."""
    arch = getattr(model, "arch", None)
    if arch not in ARCHITECTURES or not hasattr(model, "config"):
        raise DeqirError("save_denoiser takes an ADMUNet or a DDPMUNet")
    p = Path(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(p), metadata={"deqir_arch": arch, "deqir_config": json.dumps(config)})
    else:
        torch.save({"arch": arch, "config": config, "state_dict": sd}, p)
    return p
