"""The public API a user types: restore_file, the result's pictures, the package's face; and what a
diffusers / deepinv user expects (issue 18): eta, device=, .sample, [0, 1] data, auto's cached profile,
self-describing measurement PNGs, eval on files, EXIF orientation, safe threads, Ray batches."""
import json
import re
import struct
import types
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import deqir_dist as dq
from deqir_dist.api import profile_cache
from deqir_dist.apps.cli import main
from deqir_dist.apps.demo import safe_threads
from deqir_dist.io.images import _png16_encode
from deqir_dist.io.pngtext import TEXT_KEY, read_description
from deqir_dist.ray.pool import batch_size, least_loaded

# the planner tests check its logic on fixed K values (conftest.reference_picard_table)
pytestmark = pytest.mark.usefixtures("reference_picard_table")


@pytest.fixture()
def photo(tmp_path):
    yy, xx = np.mgrid[0:16, 0:16]
    img = np.stack([np.sin(xx / 3), np.cos(yy / 4), np.sin((xx + yy) / 6)], -1)
    img = ((img + 1) * 127.5).clip(0, 255).astype(np.uint8)
    p = tmp_path / "cat.png"
    Image.fromarray(img).save(p)
    return p


def test_restore_file_gives_the_cli_picture(photo, tmp_path, capsys):
    """One file through the API and through `deqir degrade` + `deqir restore`: the same pixels."""
    meas = tmp_path / "meas"
    assert main(["degrade", str(photo), "--task", "sr_avgpool", "--scale", "2", "-o", str(meas)]) == 0
    assert main(["restore", str(meas / "cat.png"), "--task", "sr_avgpool", "--scale", "2", "--model", "analytic",
                 "--steps", "6", "--no-progress", "-o", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    res = dq.restore_file(meas / "cat.png", "sr_avgpool", model="analytic", scale=2, steps=6,
                          out=tmp_path / "api.png")
    cli = np.asarray(Image.open(tmp_path / "cli" / "cat.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "api.png")), cli)
    assert np.array_equal(np.asarray(res.to_pil()[0]), cli)
    assert res.images.shape == (1, 3, 16, 16) and float(res.images.abs().max()) <= 1.0


def test_restore_file_from_clean_and_errors(photo, tmp_path):
    res = dq.restore_file(photo, "inpaint", model="analytic", from_clean=True, mask="random", steps=4)
    assert res.image.shape == (1, 3, 16, 16)
    assert res.settings_source["sigma_y"].startswith("--from-clean")       # not given: the item says whence
    res = dq.restore_file(photo, "inpaint", model="analytic", from_clean=True, mask="random", steps=4, sigma_y=0.01)
    assert res.settings_source["sigma_y"] == "user" and res.settings["sigma_y"] == 0.01
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(dq.DeqirError, match="text.png: not an image format Pillow knows") as err:
        dq.restore_file(tmp_path / "text.png", "inpaint", model="analytic")
    assert "BytesIO" not in str(err.value)
    with pytest.raises(dq.DeqirError, match="not found"):
        dq.restore_file(tmp_path / "nope.png", "inpaint", model="analytic")
    with pytest.raises(dq.DeqirError, match="does not apply"):
        dq.restore_file(photo, "inpaint", model="analytic", from_clean=True, scale=2)


def test_images_are_clipped_copies():
    r = dq.RestoreResult(image=torch.tensor([[[[-3.0, 0.5]]]]), iterations=1, iterations_per_image=[1],
                         trace=[], solver="serial", steps=1, stop="none", stop_tol=0.0, seconds=0.0)
    assert r.images.tolist() == [[[[-1.0, 0.5]]]]
    assert r.image.min() == -3.0                 # the raw chain output is left as it is
    assert r.to_pil()[0].mode == "L"


# ----------------------------------------------------------------------------- issue 18: what a diffusers user types


def _problem(gmm, task="sr_avgpool", **params):
    x = gmm.sample(2, (3, 8, 8), torch.Generator().manual_seed(1)).float()
    op = dq.make_operator(task, image_shape=(3, 8, 8), **params)
    return x, op, op.A(x)


def test_eta_is_etw(gmm):
    _, op, y = _problem(gmm)
    xi = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = dq.restore(gmm, y, op, steps=5, noise=xi, etw=0.4, solver="serial").image
    b = dq.restore(gmm, y, op, steps=5, noise=xi, eta=0.4, solver="serial").image
    c = dq.restore(gmm, y, op, steps=5, noise=xi, solver="serial").image
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(dq.restore(gmm, y, op, steps=5, noise=xi, etw=0.4, eta=0.4, solver="serial").image, a)
    with pytest.raises(dq.DeqirError, match="eta is another name for etw"):
        dq.restore(gmm, y, op, steps=5, etw=0.4, eta=0.5)


class _DiffusersLike(torch.nn.Module):
    """A model that answers like a diffusers UNet: an object with .sample (or a 1-tuple)."""

    def __init__(self, inner, as_tuple=False):
        super().__init__()
        self.inner, self.as_tuple = inner, as_tuple

    def forward(self, x, t):
        eps = self.inner(x, t)
        return (eps,) if self.as_tuple else types.SimpleNamespace(sample=eps)


def test_model_output_with_sample_is_unwrapped(gmm):
    _, op, y = _problem(gmm)
    xi = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = dq.restore(gmm, y, op, steps=5, noise=xi, solver="picard").image
    for wrapped in (_DiffusersLike(gmm), _DiffusersLike(gmm, as_tuple=True)):
        assert torch.equal(dq.restore(wrapped, y, op, steps=5, noise=xi, solver="picard").image, ref)
    with pytest.raises(dq.DeqirError, match="denoiser returned"):
        dq.restore(lambda x, t: {"eps": x}, y, op, steps=2)


def test_device_is_accepted_or_says_what_to_do(gmm):
    _, op, y = _problem(gmm)
    xi = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = dq.restore(gmm, y, op, steps=4, noise=xi, solver="picard").image
    assert torch.equal(dq.restore(gmm, y, op, steps=4, noise=xi, device="cpu", solver="picard").image, ref)
    assert torch.equal(dq.restore(gmm, y, op, steps=4, noise=xi, device=torch.device("cpu"), solver="picard").image,
                       ref)
    with pytest.raises(dq.DeqirError, match="unknown device"):
        dq.restore(gmm, y, op, steps=4, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(dq.DeqirError, match="sees no CUDA device.*use device 'cpu'"):
            dq.restore(gmm, y, op, steps=4, device="cuda")
        with pytest.raises(dq.DeqirError, match="sees no CUDA device.*use device 'cpu'"):
            dq.load_denoiser("builtin", device="cuda")
        with pytest.raises(dq.DeqirError, match="sees no CUDA device"):
            dq.load_denoiser("analytic", device="cuda:0")


def test_random_weights_only_for_presets():
    with pytest.raises(dq.DeqirError, match="random_weights=True"):
        dq.load_denoiser("adm-256-uncond", device="meta")
    with pytest.raises(dq.DeqirError, match="untrained preset"):
        dq.load_denoiser("builtin", random_weights=True)
    with pytest.raises(dq.DeqirError, match="untrained preset"):
        dq.load_denoiser("sdedit-celeba-hq", checkpoint="x.pt", random_weights=True)


@pytest.mark.parametrize("task,params", [("sr_avgpool", {"scale": 2}), ("inpaint", {"mask": "random"}),
                                         ("colorize", {})])
def test_value_range_zero_one_is_converted_exactly(gmm, task, params):
    """A [0, 1] measurement with value_range=(0, 1) restores to the [-1, 1] one's result (A is linear)."""
    x, op, y = _problem(gmm, task, **params)
    y01 = op.A((x + 1) / 2)
    xi = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = dq.restore(gmm, y, op, steps=5, noise=xi, solver="picard").image
    got = dq.restore(gmm, y01, op, steps=5, noise=xi, value_range=(0, 1), solver="picard").image
    assert torch.allclose(got, ref, atol=1e-5)


def test_zero_one_input_is_warned_about(gmm):
    _, op, y = _problem(gmm)
    y01 = (y.clamp(-1, 1) + 1) / 2
    with pytest.warns(UserWarning, match=r"y lies in \[0, 1\].*value_range=\(0, 1\)"):
        dq.restore(gmm, y01, op, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dq.restore(gmm, y01, op, steps=2, value_range=(-1, 1))      # said to be right: silent
        dq.restore(gmm, y, op, steps=2)                              # [-1, 1] data: silent
    with pytest.raises(dq.DeqirError, match="value_range must be"):
        dq.restore(gmm, y, op, steps=2, value_range=(0, 255))


# ----------------------------------------------------------------------------- solver="auto": one profile per key


def _count_measure(monkeypatch, cost=None):
    """Record each timing auto asks for; ``cost(b)`` (ms) stands in for the clock when given."""
    calls = []
    real = profile_cache.measure_cost

    def counting(model, shape, batches, **kw):
        calls.append((tuple(shape), tuple(batches)))
        if cost is not None:
            return {b: float(cost(b)) for b in batches}
        return real(model, shape, batches=batches, repeats=1, warmup=0)
    monkeypatch.setattr(profile_cache, "measure_cost", counting)
    return calls


def test_auto_measures_once_per_model_and_size(gmm, tmp_path, monkeypatch):
    monkeypatch.setenv("DEQIR_CACHE_DIR", str(tmp_path / "cache"))
    calls = _count_measure(monkeypatch)
    _, op, y = _problem(gmm)
    first = dq.restore(gmm, y, op, steps=6, solver="auto")
    assert len(calls) == 1 and first.plan["profile"]["source"] == "measured"
    files = list((tmp_path / "cache" / "profiles").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["image_shape"] == [3, 8, 8]
    second = dq.restore(gmm, y, op, steps=6, solver="auto")
    assert len(calls) == 1 and second.plan["profile"] == {**first.plan["profile"], "source": "cache"}
    assert second.plan["c_ms"] == first.plan["c_ms"] and second.solver == first.solver
    assert second.plan["chosen"] == second.solver and second.solver in second.plan["reason"]
    big = dq.make_operator("sr_avgpool", image_shape=(3, 16, 16), scale=2)
    dq.restore(gmm, big.A(torch.zeros(1, 3, 16, 16)), big, steps=6, solver="auto")   # another image size
    assert calls[-1] == ((3, 16, 16), (1,)) and len(calls) == 2     # N = 6: K = N, one row decides it


@pytest.mark.parametrize("cost,steps,timed,chosen", [
    (lambda b: b, 100, [1, 4], "serial"),                         # CPU-like: 4 rows already rule parallel out
    (lambda b: 10 + 0.01 * b, 25, [1, 4, 6, 12, 25], "picard"),   # launch-bound: every window is weighed
    (lambda b: 10.0, 6, [1], "serial")])                          # K = N: nothing to time beyond one row
def test_auto_times_the_model_only_until_serial_is_certain(gmm, tmp_path, monkeypatch, cost, steps, timed, chosen):
    """auto times c(b) smallest batch first and stops once no untimed cost could make a parallel
    solver pay; the answer is the one the whole table gives, and the next run times nothing."""
    from deqir_dist.api.planner import choose_solver, profile_batches
    monkeypatch.setenv("DEQIR_CACHE_DIR", str(tmp_path / "cache"))
    calls = _count_measure(monkeypatch, cost)
    _, op, y = _problem(gmm)
    res = dq.restore(gmm, y, op, steps=steps, solver="auto")
    assert [b for _, (b,) in calls] == timed and res.solver == res.plan["chosen"] == chosen
    assert set(res.plan) >= {"seconds", "c_ms"}                     # planning is timed apart from the sampling
    whole = {b: float(cost(b)) for b in profile_batches(steps)}
    assert choose_solver(whole, steps)[0] == chosen
    again = dq.restore(gmm, y, op, steps=steps, solver="auto")
    assert len(calls) == len(timed) and again.plan["profile"]["source"] == "cache" and again.solver == chosen


def test_profile_key_changes_with_weights_dtype_torch(gmm, monkeypatch):
    from deqir_dist.models import GaussianMixtureDenoiser
    a, b = GaussianMixtureDenoiser(seed=0), GaussianMixtureDenoiser(seed=0)
    key = profile_cache.profile_key(a, (3, 8, 8))
    assert profile_cache.profile_key(b, (3, 8, 8)) == key                    # same weights: same key
    with torch.no_grad():
        b.offset[0, 0] += 1e-3
    assert profile_cache.profile_key(b, (3, 8, 8))["model"] != key["model"]  # changed weights
    assert profile_cache.profile_key(GaussianMixtureDenoiser(seed=1), (3, 8, 8)) != key
    assert profile_cache.profile_key(a, (3, 8, 16)) != key
    assert profile_cache.profile_key(a, (3, 8, 8), dtype=torch.float16) != key
    monkeypatch.setattr(torch, "__version__", "0.0-other")
    assert profile_cache.profile_key(a, (3, 8, 8)) != key
    assert profile_cache.profile_key(lambda x, t: x, (3, 8, 8)) is None


def test_cache_folder_and_stale_files(gmm, tmp_path, monkeypatch):
    monkeypatch.delenv("DEQIR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert profile_cache.cache_dir() == tmp_path / "xdg" / "deqir-dist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert profile_cache.cache_dir() == tmp_path / "home" / ".cache" / "deqir-dist"
    monkeypatch.setenv("DEQIR_CACHE_DIR", str(tmp_path / "c"))
    calls = _count_measure(monkeypatch)
    _, info = profile_cache.cached_cost(gmm, (3, 8, 8), (1, 4))
    path = tmp_path / "c" / "profiles" / profile_cache._path_for(info["key"]).name
    assert info["file"] == str(path) and len(calls) == 1
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "key": {**data["key"], "torch": "other"}}))   # a file for another key
    assert profile_cache.cached_cost(gmm, (3, 8, 8), (1, 4))[1]["source"] == "measured" and len(calls) == 2
    path.write_text("{not json")
    assert profile_cache.cached_cost(gmm, (3, 8, 8), (1, 4))[1]["source"] == "measured" and len(calls) == 3
    assert profile_cache.cached_cost(gmm, (3, 8, 8), (4, 1))[1]["source"] == "cache" and len(calls) == 3
    monkeypatch.setenv("DEQIR_PROFILE_CACHE", "off")
    assert profile_cache.cached_cost(gmm, (3, 8, 8), (1, 4))[1]["file"] is None and len(calls) == 4


# ----------------------------------------------------------------------------- measurement PNGs describe themselves


def _degrade(photo, out, *flags):
    assert main(["degrade", str(photo), "-o", str(out), *map(str, flags)]) == 0


def _restore(args, capsys):
    code = main(["restore", *map(str, args), "--model", "analytic", "--steps", "4", "--no-progress"])
    return code, capsys.readouterr().err


def test_degrade_writes_the_description_restore_uses_it(photo, tmp_path, capsys):
    meas = tmp_path / "m"
    _degrade(photo, meas, "--task", "inpaint", "--mask", "random", "--mask-seed", "7", "--bits", "8")
    desc = read_description(meas / "cat.png")
    assert desc == {"format": 1, "task": "inpaint", "image_shape": [3, 16, 16], "bits": 8, "sigma_y": 0.0,
                    "params": {"mask": "random", "fraction": 0.5, "seed": 7}}
    assert json.loads(Image.open(meas / "cat.png").info[TEXT_KEY]) == desc
    assert read_description(photo) is None
    code, err = _restore([meas / "cat.png", "-o", tmp_path / "bare"], capsys)          # no task flags at all
    assert code == 0, err
    code, err = _restore([meas / "cat.png", "-o", tmp_path / "full", "--task", "inpaint", "--mask", "random",
                          "--mask-seed", "7"], capsys)
    assert code == 0, err
    assert (tmp_path / "bare" / "cat.png").read_bytes() == (tmp_path / "full" / "cat.png").read_bytes()
    summary = json.loads((tmp_path / "bare" / "summary.json").read_text())
    assert summary["task"] == "inpaint" and summary["operator"] == desc["params"]


@pytest.mark.parametrize("flags,match", [
    (["--mask", "box"], "degraded with --mask random.*--mask box contradicts it"),
    (["--mask-seed", "3"], "degraded with --mask-seed 7.*the flags give --mask-seed 3"),
    (["--task", "sr_bicubic"], "is a inpaint measurement .*, not sr_bicubic"),
    (["--sigma-y", "0.1"], "sigma_y=0.*--sigma-y 0.1 contradicts it"),
])
def test_contradicting_flags_are_refused(photo, tmp_path, capsys, flags, match):
    meas = tmp_path / "m"
    _degrade(photo, meas, "--task", "inpaint", "--mask", "random", "--mask-seed", "7")
    code, err = _restore([meas / "cat.png", "-o", tmp_path / "never", *flags], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    assert not (tmp_path / "never").exists()


def test_scale_contradiction_and_mask_file(photo, tmp_path, capsys):
    _degrade(photo, tmp_path / "x4", "--task", "sr_bicubic", "--scale", "4")
    code, err = _restore([tmp_path / "x4" / "cat.png", "-o", tmp_path / "never", "--scale", "2"], capsys)
    assert code == 2 and "degraded with --scale 4" in err and not (tmp_path / "never").exists()
    code, err = _restore([tmp_path / "x4" / "cat.png", "-o", tmp_path / "never", "--scale", "3"], capsys)
    assert code == 2 and "degraded with --scale 4 (its PNG description); the flags give --scale 3" in err
    assert dq.restore_file(tmp_path / "x4" / "cat.png", model="analytic", scale=np.int64(4), steps=3).image.shape[-1] == 16
    with pytest.raises(dq.DeqirError, match="needs integer scale"):        # a wrong type: the operator says which
        dq.restore_file(tmp_path / "x4" / "cat.png", model="analytic", scale="4", steps=3)
    code, err = _restore([tmp_path / "x4" / "cat.png", "-o", tmp_path / "ok"], capsys)
    assert code == 0 and Image.open(tmp_path / "ok" / "cat.png").size == (16, 16)
    mask = np.ones((16, 16), np.uint8) * 255
    mask[4:9, 3:12] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(255 - mask).save(tmp_path / "other.png")
    _degrade(photo, tmp_path / "mf", "--task", "inpaint", "--mask", tmp_path / "mask.png")
    code, err = _restore([tmp_path / "mf" / "cat.png", "-o", tmp_path / "never"], capsys)
    assert code == 2 and "mask file (digest sha256:" in err and "--mask FILE" in err
    code, err = _restore([tmp_path / "mf" / "cat.png", "-o", tmp_path / "never", "--mask", tmp_path / "other.png"],
                         capsys)
    assert code == 2 and "the flags give --mask sha256:" in err
    code, err = _restore([tmp_path / "mf" / "cat.png", "-o", tmp_path / "mo", "--mask", tmp_path / "mask.png"], capsys)
    assert code == 0, err


def test_task_needed_without_a_description(photo, tmp_path, capsys):
    code, err = _restore([photo, "-o", tmp_path / "never"], capsys)
    assert code == 2 and "give --task" in err and "carries no operator description" in err
    _degrade(photo, tmp_path / "a", "--task", "inpaint")
    (tmp_path / "b").mkdir()
    _degrade(photo, tmp_path / "b", "--task", "colorize")
    (tmp_path / "b" / "cat.png").rename(tmp_path / "b" / "dog.png")
    code, err = _restore([tmp_path / "a" / "cat.png", tmp_path / "b" / "dog.png", "-o", tmp_path / "never"], capsys)
    assert code == 2 and "different tasks" in err
    res = dq.restore_file(tmp_path / "a" / "cat.png", model="analytic", steps=3)        # the API reads it too
    # a file that is no image at all does not decide the task: its own read names what is wrong with it
    (tmp_path / "a" / "zz.png").write_text("not a picture")
    (tmp_path / "a" / "zy.png").write_bytes(b"\x89PNG\r\n\x1a\n then garbage")
    code, err = _restore([tmp_path / "a", "-o", tmp_path / "never"], capsys)
    assert code == 2 and "zy.png: not an image format Pillow knows" in err and "Error" not in err and not (tmp_path / "never").exists()
    code, err = _restore([tmp_path / "a" / "zz.png", "-o", tmp_path / "never"], capsys)
    assert code == 2 and "zz.png is not an image file Pillow can open" in err
    assert res.image.shape == (1, 3, 16, 16)


def test_auto_summary_records_the_plan(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DEQIR_CACHE_DIR", str(tmp_path / "cache"))
    _degrade(photo, tmp_path / "m", "--task", "sr_avgpool", "--scale", "2")
    (tmp_path / "m" / "cow.png").write_bytes((tmp_path / "m" / "cat.png").read_bytes())
    code, err = _restore([tmp_path / "m", "-o", tmp_path / "r", "--solver", "auto"], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    chosen = s["images"][0]["plan"]["chosen"]
    assert s["solver"] == "auto" and s["summary"]["solvers"] == {chosen: 2}
    assert [r["solver"] for r in s["images"]] == [chosen, chosen]
    assert s["summary"]["profile_sources"] == {"cache": 1, "measured": 1}
    (plan,) = s["summary"]["plans"]
    assert plan["images"] == 2 and plan["reason"].startswith(chosen)


# ----------------------------------------------------------------------------- eval, EXIF, threads, Ray batches


def test_eval_takes_files_or_folders(photo, tmp_path, capsys):
    other = tmp_path / "other.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    assert main(["eval", str(photo), str(other), "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["images"]
    ref = float(dq.psnr(dq.read_image(photo)[None], dq.read_image(other)[None])[0])
    assert len(rows) == 1 and rows[0]["psnr"] == pytest.approx(ref, abs=1e-3)
    assert main(["eval", str(photo), str(tmp_path)]) == 0                 # a file against a folder (by name)
    assert main(["eval", str(tmp_path / "nope.png"), str(photo)]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("orientation,turn", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                              (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
                                              (2, lambda a: a[:, ::-1])])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    stored = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "p.png", exif=exif.tobytes())
    got = ((dq.read_image(tmp_path / "p.png") + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(got, turn(stored))


def _with_chunk(png: bytes, ctype: bytes, body: bytes) -> bytes:
    """``png`` with one more chunk right after IHDR (8 + 25 bytes)."""
    chunk = struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))
    return png[:33] + chunk + png[33:]


def test_exif_orientation_of_16_bit_colour_pngs_as_pillows(tmp_path):
    """16-bit colour PNGs go through the package's own decoder; their eXIf chunk turns them upright
    exactly as Pillow turns the same picture stored at 8 bits (all eight orientations); a broken
    EXIF block is ignored."""
    stored = (np.arange(4 * 6 * 3).reshape(4, 6, 3) * 3).astype(np.uint8)
    for orientation in range(1, 9):
        im = Image.fromarray(stored)
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(tmp_path / "p8.png", exif=exif.tobytes())
        (tmp_path / "p16.png").write_bytes(
            _with_chunk(_png16_encode(stored.astype(np.uint16) * 257), b"eXIf", exif.tobytes()))
        want, got = dq.read_image(tmp_path / "p8.png"), dq.read_image(tmp_path / "p16.png")
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6), orientation
    (tmp_path / "bad.png").write_bytes(_with_chunk(_png16_encode(stored.astype(np.uint16) * 257), b"eXIf", b"MM\0*junk"))
    assert dq.read_image(tmp_path / "bad.png").shape == (3, 4, 6)


def test_exif_orientation_jpeg(tmp_path):
    im = Image.fromarray(np.full((8, 16, 3), 200, np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6                        # a phone held upright: stored sideways
    im.save(tmp_path / "p.jpg", exif=exif.tobytes())
    assert dq.read_image(tmp_path / "p.jpg").shape == (3, 16, 8)


def test_safe_threads():
    assert safe_threads(cpus=2, load=0.0, default=2) == 1
    assert safe_threads(cpus=16, load=12.2, default=16) == 4
    assert safe_threads(cpus=8, load=0.3, default=8) == 8
    assert safe_threads(cpus=8, load=30.0, default=8) == 1
    assert 1 <= safe_threads() <= max(1, torch.get_num_threads())


def test_ray_batches_give_every_worker_work():
    assert batch_size(6, 2, 4) == 3 and batch_size(100, 2, 4) == 4 and batch_size(1, 8, 4) == 1
    assert batch_size(5, 2, 4) == 3 and batch_size(0, 2, 4) == 1
    ws = [types.SimpleNamespace(index=i, alive=True, inflight=[]) for i in range(3)]
    order = []
    while (w := least_loaded(ws, 2)) is not None:
        w.inflight.append(object())
        order.append(w.index)
    assert order == [0, 1, 2, 0, 1, 2]
    ws[1].alive, ws[0].inflight = False, []
    assert least_loaded(ws, 2).index == 0
