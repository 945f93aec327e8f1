"""diffusers folders as models, and their schedules and prediction types (issue 24).

Folders are written here as diffusers writes them (tests/diffusers_folders.py: random weights, the
real google configs' fields); the forward is matched against diffusers' own where it is installed.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import types

import pytest
import torch

from deqir_dist import load_denoiser, make_operator, restore
from deqir_dist.errors import DeqirError
from deqir_dist.models import GaussianMixtureDenoiser
from deqir_dist.models.ddpm import DDPMUNet
from deqir_dist.models.diffusers_folder import ddpm_kwargs, google_mismatch, to_ddpm_names, unet_config
from deqir_dist.models.scheduled import ScheduledDenoiser
from deqir_dist.sampling.schedule import chain_coefficients, timestep_grid
from deqir_dist.sampling.scheduler import schedule_from_config
from deqir_dist.sampling.serial import sample_serial
from tests.diffusers_folders import (CELEBAHQ_256, CIFAR10_32, GOOGLE_SCHEDULER, SMALL_GOOGLE, unet2d_state_dict,
                                     write_model, write_pipeline)

# imported inside the tests that need it (3 s): the others run without it
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers is not installed (the [diffusers] extra)")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def psnr_between(a, b):
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


@pytest.fixture
def no_diffusers(monkeypatch):
    """diffusers made unimportable, as in an install without the extra."""
    monkeypatch.setitem(sys.modules, "diffusers", None)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dfolders")
    return write_model(root / "flat", SMALL_GOOGLE, scheduler=GOOGLE_SCHEDULER, seed=1)


# ----------------------------------------------------------------------------- loading

def test_google_configs_convert_to_ddpm_by_their_fields():
    cifar, celeba = (unet_config_of(c) for c in (CIFAR10_32, CELEBAHQ_256))
    assert google_mismatch(cifar) is None and google_mismatch(celeba) is None
    from deqir_dist.models.ddpm import sdedit_celeba_hq_config
    assert ddpm_kwargs(celeba) == sdedit_celeba_hq_config()          # ddpm-celebahq-256 is SDEdit's network
    for cfg, params, tensors in ((CIFAR10_32, 35_746_307, None), (CELEBAHQ_256, 113_673_219, 450)):
        sd = unet2d_state_dict(cfg, device="meta")
        with torch.device("meta"):
            net = DDPMUNet(**ddpm_kwargs(unet_config_of(cfg)))
        conv = to_ddpm_names(sd, len(cfg["block_out_channels"]))
        assert {k: tuple(v.shape) for k, v in conv.items()} == {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert sum(v.numel() for v in sd.values()) == params
        assert tensors is None or len(sd) == tensors


def unet_config_of(cfg):
    from deqir_dist.models.diffusers_folder import UNET_DEFAULTS
    return {**UNET_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}


def test_every_way_to_name_a_folder_loads_the_same_model(small_folder, tmp_path):
    pipe = write_pipeline(tmp_path / "pipe", SMALL_GOOGLE, GOOGLE_SCHEDULER, seed=1)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700])
    outs = []
    for name in (f"diffusers:{small_folder}", str(small_folder), str(small_folder / "config.json"), str(pipe),
                 f"diffusers:{pipe}", str(pipe / "unet"), str(small_folder / "diffusion_pytorch_model.safetensors")):
        m = load_denoiser(name)
        assert isinstance(m, ScheduledDenoiser) and isinstance(m.net, DDPMUNet), name
        assert m.size_multiple == 4 and m.in_channels == 3 and m.schedule.train_steps == 1000
        assert m.sampler_card == {"source": m.schedule.source, "clip_x0": True}
        assert "scheduler_config.json" in m.schedule.source
        outs.append(m(x, t))
    assert load_denoiser(None, checkpoint=str(small_folder))(x, t).equal(outs[0])
    weights = str(pipe / "unet" / "diffusion_pytorch_model.safetensors")       # the file: its folder, not its shapes
    assert load_denoiser(None, checkpoint=weights)(x, t).equal(outs[0])
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_weights_land_on_the_named_ddpm_parameters(small_folder):
    from safetensors.torch import load_file
    sd = load_file(str(small_folder / "diffusion_pytorch_model.safetensors"))
    net = load_denoiser(str(small_folder)).net
    pairs = {"time_embedding.linear_1.weight": net.temb.dense[0].weight,
             "down_blocks.0.resnets.0.conv1.weight": net.down[0].block[0].conv1.weight,
             "down_blocks.1.resnets.0.conv_shortcut.weight": net.down[1].block[0].nin_shortcut.weight,
             "down_blocks.1.downsamplers.0.conv.bias": net.down[1].downsample.conv.bias,
             "mid_block.resnets.1.time_emb_proj.weight": net.mid.block_2.temb_proj.weight,
             "up_blocks.0.resnets.1.norm2.weight": net.up[2].block[1].norm2.weight,
             "up_blocks.0.upsamplers.0.conv.weight": net.up[2].upsample.conv.weight,
             "up_blocks.1.attentions.1.group_norm.bias": net.up[1].attn[1].norm.bias,
             "conv_norm_out.weight": net.norm_out.weight}
    for k, p in pairs.items():
        assert torch.equal(sd[k], p), k
    assert torch.equal(sd["up_blocks.1.attentions.0.to_out.0.weight"][:, :, None, None], net.up[1].attn[0].proj_out.weight)
    assert torch.equal(sd["down_blocks.1.attentions.0.to_k.weight"][:, :, None, None], net.down[1].attn[0].k.weight)


def test_bin_fp16_variant_and_old_attention_names(small_folder, tmp_path):
    x, t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    ref = load_denoiser(str(small_folder))(x, t)
    sd = unet2d_state_dict(SMALL_GOOGLE, seed=1)
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in sd.items()}
    assert torch.equal(load_denoiser(str(write_model(tmp_path / "bin", SMALL_GOOGLE, old, fmt="bin")))(x, t), ref)
    fp16 = load_denoiser(str(write_model(tmp_path / "fp16", SMALL_GOOGLE, sd, variant="fp16")))
    assert next(fp16.parameters()).dtype == torch.float32 and rel(fp16(x, t), ref) < 5e-3
    half = load_denoiser(str(tmp_path / "fp16"), dtype="float16")
    assert next(half.parameters()).dtype == torch.float16


def test_folder_refusals_are_one_line(tmp_path, no_diffusers):
    sd = unet2d_state_dict(SMALL_GOOGLE)
    bad = tmp_path / "pickle"
    write_model(bad, SMALL_GOOGLE, sd, fmt="bin")
    torch.save({"w": types.SimpleNamespace(a=1)}, bad / "diffusion_pytorch_model.bin")
    cases = [(bad, "pickled objects"),
             (write_model(tmp_path / "cond", {**SMALL_GOOGLE, "_class_name": "UNet2DConditionModel"}, sd),
              "only UNet2DModel"),
             (tmp_path / "nothing", "diffusers folder not found")]
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "not a diffusers folder"))
    short = dict(sd)
    short.pop("conv_out.bias")
    cases.append((write_model(tmp_path / "short", SMALL_GOOGLE, short), "1 missing: conv_out.bias"))
    cases.append((tmp_path / "short" / "diffusion_pytorch_model.safetensors", "1 missing: conv_out.bias"))
    big = write_model(tmp_path / "big", SMALL_GOOGLE, sd)
    (big / "config.json").write_text(json.dumps({**SMALL_GOOGLE, "pad": " " * (2 << 20)}))
    cases.append((big, "not a config file"))
    badjson = write_model(tmp_path / "badjson", SMALL_GOOGLE, sd)
    (badjson / "scheduler_config.json").write_text("{not json")
    cases.append((badjson, "not a valid JSON config"))
    escape = write_model(tmp_path / "escape", SMALL_GOOGLE, sd)
    (escape / "diffusion_pytorch_model.safetensors").unlink()
    (escape / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"conv_in.weight": "../big/diffusion_pytorch_model.safetensors"}}))
    cases.append((escape, "shard names must be plain file names"))
    with pytest.raises(DeqirError, match="a Hub id"):
        load_denoiser("google/ddpm-cifar10-32")
    for folder, match in cases:
        with pytest.raises(DeqirError, match=match) as e:
            load_denoiser(f"diffusers:{folder}")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("field,value", [("flip_sin_to_cos", True), ("freq_shift", 0), ("downsample_padding", 1),
                                         ("attention_head_dim", 8), ("norm_eps", 1e-5), ("center_input_sample", True),
                                         ("resnet_time_scale_shift", "scale_shift"), ("some_new_field", 1)])
def test_a_config_off_googles_is_refused_naming_the_field(tmp_path, no_diffusers, field, value):
    folder = write_model(tmp_path / "f", {**SMALL_GOOGLE, field: value}, unet2d_state_dict(SMALL_GOOGLE))
    with pytest.raises(DeqirError, match=rf"{field}=.*deqir-dist\[diffusers\]"):
        load_denoiser(str(folder))


def test_absent_fields_take_diffusers_defaults(tmp_path, no_diffusers):
    """A config that leaves out flip_sin_to_cos means diffusers' default (true): not google's."""
    cfg = {k: v for k, v in SMALL_GOOGLE.items() if k != "flip_sin_to_cos"}
    assert google_mismatch(unet_config(write_model(tmp_path / "f", cfg, unet2d_state_dict(SMALL_GOOGLE)))) \
        .startswith("flip_sin_to_cos=True")


def test_cli_runs_a_folder_and_records_its_schedule(small_folder, tmp_path, capsys):
    from deqir_dist.apps.cli import main
    from deqir_dist.io.images import write_image
    write_image(tmp_path / "a.png", torch.rand(3, 18, 18, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    outs = []
    for i, model in enumerate((f"diffusers:{small_folder}", str(small_folder))):
        out = tmp_path / f"o{i}"
        assert main(["restore", str(tmp_path / "a.png"), "--from-clean", "--task", "sr_avgpool", "--scale", "2", "--model", model,
                     "--steps", "3", "--solver", "serial", "-o", str(out), "--no-progress"]) == 0
        outs.append((out / "a.png").read_bytes())
    assert outs[0] == outs[1]
    sampler = json.loads((tmp_path / "o0" / "summary.json").read_text())["sampler"]
    assert sampler["settings"]["clip_x0"] is True and sampler["settings"]["schedule"]["start"] == 1000
    assert sampler["source"]["schedule"].endswith("scheduler_config.json")
    capsys.readouterr()


def test_cli_refuses_a_non_google_folder_in_one_line(tmp_path, capsys, no_diffusers):
    from deqir_dist.apps.cli import main
    from deqir_dist.io.images import write_image
    folder = write_model(tmp_path / "f", {**SMALL_GOOGLE, "freq_shift": 0}, unet2d_state_dict(SMALL_GOOGLE))
    write_image(tmp_path / "a.png", torch.zeros(3, 16, 16))
    assert main(["restore", str(tmp_path / "a.png"), "--from-clean", "--task", "sr_avgpool", "--scale", "2", "--model",
                 str(folder), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "freq_shift=0" in err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- against diffusers itself

@needs_diffusers
@pytest.mark.parametrize("cfg", [CIFAR10_32, SMALL_GOOGLE])
def test_google_folder_matches_diffusers_forward(cfg, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel
    unet = UNet2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    ours = unet2d_state_dict(cfg, seed=3)
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.items()}
    unet.load_state_dict(ours)
    unet.save_pretrained(tmp_path / "m")                 # diffusers' own writing (its full config)
    DDPMScheduler(**{k: v for k, v in GOOGLE_SCHEDULER.items() if not k.startswith("_")}).save_pretrained(tmp_path / "m")
    model = load_denoiser(f"diffusers:{tmp_path / 'm'}")
    assert isinstance(model.net, DDPMUNet)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for t in (torch.tensor([0, 17]), torch.tensor([500, 999])):
        with torch.no_grad():
            assert rel(model(x, t), unet(x, t).sample) < 1e-5


@needs_diffusers
def test_other_unet2d_configs_run_through_diffusers(tmp_path):
    from diffusers import UNet2DModel
    torch.manual_seed(5)
    unet = UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()      # diffusers' defaults otherwise
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "m")
    model = load_denoiser(str(tmp_path / "m"))
    assert type(model.net).__name__ == "UNet2DModel" and model.size_multiple == 2
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 800])
    with torch.no_grad():
        assert rel(model(x, t), unet(x, t).sample) < 1e-5
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [64, 4096]}))
    with pytest.raises(DeqirError, match="the weights do not match config.json"):       # checked on meta first
        load_denoiser(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    op = make_operator("sr_avgpool", (3, 18, 18), scale=2)      # 18 = 2 x 9: 9 is odd, padded to the multiple
    y = op.A(torch.zeros(1, 3, 18, 18))
    assert restore(model, y, op, steps=2, solver="serial").image.shape == (1, 3, 18, 18)


@needs_diffusers
def test_schedules_match_diffusers_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler
    for kw in ({"beta_schedule": "linear"}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
               {"beta_schedule": "squaredcos_cap_v2"}, {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000}):
        s = DDPMScheduler(**kw)
        ours = schedule_from_config(dict(s.config)).alphas_cumprod
        assert (ours - s.alphas_cumprod.double()).abs().max() < 5e-6
    for spacing, offset in (("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)):
        for n in (7, 25, 50):
            s = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
            s.set_timesteps(n)
            assert timestep_grid(n, 1000, spacing, offset).tolist() == s.timesteps.tolist(), (spacing, offset, n)


# ----------------------------------------------------------------------------- schedules and prediction types

def _abar(kind: str, n: int = 1000) -> torch.Tensor:
    """The reference schedules, written out (float64)."""
    if kind == "linear":
        betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    else:
        f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


SCHEDULERS = {"linear": {"_class_name": "DDPMScheduler", "clip_sample": False},
              "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
              "cosine": {"beta_schedule": "squaredcos_cap_v2"},
              "cosine4000": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000}}


class Reparameterised(torch.nn.Module):
    """The Gaussian-mixture oracle re-parameterised as v- or x0-prediction (exact, float64)."""

    def __init__(self, eps_model, kind: str):
        super().__init__()
        self.eps_model, self.kind = eps_model, kind

    def forward(self, x, t):
        eps = self.eps_model(x.double(), t).double()
        a = self.eps_model.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0 if self.kind == "v_prediction" else x0


def _problem(task: str, size: int = 16):
    x = GaussianMixtureDenoiser(seed=0).sample(1, (3, size, size), torch.Generator().manual_seed(7)) \
        .clamp(-1, 1).to(torch.float64)
    op = make_operator("sr_avgpool", (3, size, size), scale=4) if task == "sr" else \
        make_operator("inpaint", (3, size, size), mask="random", fraction=0.7, seed=1)
    return op, op.A(x).float()


@pytest.mark.parametrize("sched,pred", [("linear", "v_prediction"), ("linear", "sample"), ("scaled_linear", "epsilon"),
                                        ("cosine", "v_prediction"), ("cosine4000", "sample")])
@pytest.mark.parametrize("task", ["sr", "inpaint"])
def test_restore_with_the_scheduler_equals_the_reference_on_that_schedule(sched, pred, task):
    n = 4000 if sched == "cosine4000" else 1000
    ac = _abar("cosine" if sched.startswith("cosine") else sched, n)
    eps_model = GaussianMixtureDenoiser(seed=0, alphas_cumprod=ac)
    model = eps_model if pred == "epsilon" else Reparameterised(eps_model, pred)
    op, y = _problem(task)
    xi = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = sample_serial(eps_model, op, chain_coefficients(10, n, alphas_cumprod=ac), y, xi)
    cfg = {**SCHEDULERS[sched], "prediction_type": pred}
    res = restore(model, y, op, steps=10, solver="serial", noise=xi, scheduler=cfg)
    assert psnr_between(res.image, ref) >= 60
    assert res.settings["schedule"]["start"] == n and res.settings["schedule"]["prediction_type"] == pred
    assert res.settings_source["schedule"] == "scheduler= (user)"
    wrong = restore(model, y, op, steps=10, solver="serial", noise=xi)          # the schedule lost: far off
    assert psnr_between(wrong.image, ref) < 40


def test_prediction_type_alone_and_parallel_solvers_share_the_schedule():
    ac = _abar("scaled_linear")
    eps_model = GaussianMixtureDenoiser(seed=0, alphas_cumprod=ac)
    op, y = _problem("sr")
    xi = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = sample_serial(eps_model, op, chain_coefficients(8, 1000, alphas_cumprod=ac), y, xi)
    v = Reparameterised(eps_model, "v_prediction")
    got = restore(v, y, op, num_inference_steps=8, solver="picard", noise=xi, alphas_cumprod=ac,
                  prediction_type="v_prediction", stop_tol=1e-7, max_iter=8)
    assert psnr_between(got.image, ref) >= 60 and got.settings_source["schedule"] == "user"


def test_a_longer_schedule_sets_the_start_never_silently():
    ac = _abar("cosine", 4000)
    eps_model = GaussianMixtureDenoiser(seed=0, alphas_cumprod=ac)
    op, y = _problem("sr")
    xi = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = sample_serial(eps_model, op, chain_coefficients(6, 4000, alphas_cumprod=ac), y, xi)
    res = restore(eps_model, y, op, steps=6, solver="serial", noise=xi, alphas_cumprod=ac)
    assert psnr_between(res.image, ref) >= 60 and res.settings["schedule"]["start"] == 4000
    with pytest.raises(DeqirError, match="past the model's noise schedule"):
        restore(eps_model, y, op, steps=6, noise=xi, alphas_cumprod=ac[:500], start=1000)


def test_timestep_spacing_reaches_the_chain():
    ac = _abar("linear")
    eps_model = GaussianMixtureDenoiser(seed=0, alphas_cumprod=ac)
    op, y = _problem("sr")
    xi = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    seen = []
    model = lambda x, t: seen.append(int(t[0])) or eps_model(x, t)      # noqa: E731
    restore(model, y, op, steps=5, solver="serial", noise=xi, scheduler={"timestep_spacing": "trailing"})
    # the chain's calls are the last five (restore's memory estimate may probe the model first, at t = 500)
    assert seen[-5:] == [999, 799, 599, 399, 199] == timestep_grid(5, 1000, "trailing").tolist()
    assert timestep_grid(5, 1000, "linspace").tolist() == [999, 749, 500, 250, 0]
    assert timestep_grid(4, 1000, "leading", 1).tolist() == [751, 501, 251, 1]


def test_pipeline_objects_and_python_conventions():
    torch.manual_seed(0)
    net = DDPMUNet(**ddpm_kwargs(unet_config_of(SMALL_GOOGLE))).eval()
    sched = types.SimpleNamespace(config={"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"})
    pipe = types.SimpleNamespace(unet=net, scheduler=sched)
    op = make_operator("sr_avgpool", (3, 18, 18), scale=2)          # 18: not a multiple of the UNet's 4
    y = op.A(torch.zeros(1, 3, 18, 18))
    res = restore(pipe, y, op, num_inference_steps=2, solver="serial")
    assert res.image.shape == (1, 3, 18, 18) and res.steps == 2 and res.settings["clip_x0"] is True
    assert res.settings["schedule"]["prediction_type"] == "v_prediction"
    assert res.settings_source["schedule"] == "SimpleNamespace.scheduler (SimpleNamespace)"
    for kw, match in (({"steps": 3, "num_inference_steps": 2}, "num_inference_steps is another name for steps"),
                      ({"prediction_type": "x0"}, "prediction_type must be one of"),
                      ({"scheduler": {"beta_schedule": "sigmoid"}}, "beta_schedule 'sigmoid' is not supported"),
                      ({"scheduler": {"thresholding": True}}, "thresholding=true is not supported"),
                      ({"scheduler": {"rescale_betas_zero_snr": True}}, "rescale_betas_zero_snr"),
                      ({"scheduler": 3}, "scheduler must be a diffusers scheduler"),
                      ({"scheduler": {"num_train_timesteps": 10**9}}, "num_train_timesteps must be")):
        with pytest.raises(DeqirError, match=match) as e:
            restore(pipe, y, op, solver="serial", **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(DeqirError, match="must be callable"):
        restore(object(), y, op)


@needs_diffusers
def test_diffusers_objects_pipelines_and_sizes_off_the_multiple(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    torch.manual_seed(6)
    unet = UNet2DModel(**{k: v for k, v in SMALL_GOOGLE.items() if not k.startswith("_")}).eval()
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)
    op = make_operator("sr_avgpool", (3, 18, 18), scale=2)           # 18: off the UNet's multiple of 4
    y = op.A(torch.zeros(1, 3, 18, 18))
    xi = torch.randn(1, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    bare = restore(unet, y, op, steps=2, solver="serial", noise=xi)                  # padded, not a RuntimeError
    pipe = restore(DDPMPipeline(unet=unet, scheduler=sched), y, op, steps=2, solver="serial", noise=xi)
    given = restore(unet, y, op, steps=2, solver="serial", noise=xi, scheduler=sched)
    assert bare.image.shape == pipe.image.shape == (1, 3, 18, 18) and torch.equal(pipe.image, given.image)
    assert pipe.settings["schedule"]["prediction_type"] == "v_prediction" and "schedule" not in bare.settings
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "p")
    folder = restore(load_denoiser(f"diffusers:{tmp_path / 'p'}"), y, op, steps=2, solver="serial", noise=xi)
    assert rel(folder.image, pipe.image) < 1e-5


def test_ray_driver_checks_a_folder_without_reading_weights(small_folder, tmp_path, no_diffusers):
    from deqir_dist.ray.cluster import _check_model
    _check_model(str(small_folder), None)
    _check_model(f"diffusers:{small_folder}", None)
    sd = unet2d_state_dict(SMALL_GOOGLE)
    sd["conv_in.weight"] = sd["conv_in.weight"][:, :1]
    with pytest.raises(DeqirError, match=r"shape mismatch: conv_in.weight \[32, 1, 3, 3\]"):
        _check_model(str(write_model(tmp_path / "bad", SMALL_GOOGLE, sd)), None)
    with pytest.raises(DeqirError, match="freq_shift=0"):
        _check_model(str(write_model(tmp_path / "other", {**SMALL_GOOGLE, "freq_shift": 0}, sd)), None)
