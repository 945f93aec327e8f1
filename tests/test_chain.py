"""The serial sampler against an independent transcription, and every parallel solver against it."""
import math

import pytest
import torch

from deqir_dist import DeqirError, make_operator, restore
from deqir_dist.parallel.comm import split_rows
from deqir_dist.quality.metrics import psnr
from deqir_dist.sampling.chain import ChainBlock, linear_scan
from deqir_dist.sampling.denoiser import EpsFn
from deqir_dist.sampling.schedule import chain_coefficients, timestep_grid

SHAPE = (3, 16, 16)
OPS = [("sr_avgpool", {"scale": 2}), ("sr_bicubic", {"scale": 2}), ("deblur_gauss", {}),
       ("deblur_uniform", {}), ("deblur_aniso", {}), ("inpaint", {"mask": "random", "fraction": 0.6}),
       ("colorize", {}), ("cs_wht", {"ratio": 4}), ("denoise", {})]


def reference_serial(model, op, y, xi, steps, etw=0.0, nw=0.0, z=None, sigma_y=0.0, clip=False):
    """docs/design.md section 1, (1.1)-(1.4), transcribed directly, float64, with its own schedule arithmetic
    (``clip``: x0 clamped to [-1, 1] and eps re-derived from it, as DDIM's clip_sample does)."""
    betas = [1e-4 + (0.02 - 1e-4) * k / 999 for k in range(1000)]
    abar, acc = [], 1.0
    for b in betas:
        acc *= 1 - b
        abar.append(acc)
    skip = 1000 // steps
    seq = [k * skip for k in range(steps)]
    taus = seq[::-1]
    h = xi.double()
    y = y.double()
    for i, t in enumerate(taus):
        a = abar[t]
        a_next = abar[taus[i + 1]] if i + 1 < steps else 1.0
        eps = model(h, torch.full((h.shape[0],), t, dtype=torch.int64))[:, :3].double()
        x0 = (h - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (h - math.sqrt(a) * x0) / math.sqrt(1 - a)
        lam = 1.0 if sigma_y == 0 else min(1.0, math.sqrt(1 / a_next - 1) / sigma_y)
        x0t = x0 - lam * op.A_pinv(op.A(x0) - y)
        h = math.sqrt(a_next) * x0t + math.sqrt(1 - a_next) * math.sqrt(1 - etw**2) * eps
        if nw > 0:
            h = h + math.sqrt(1 - a_next) * nw * z[:, i].double()
    return h


def problem(gmm, name, params, batch=1, seed=0, steps=10, nw=0.0, sigma_y=0.0):
    g = torch.Generator().manual_seed(seed)
    op = make_operator(name, SHAPE, **params)
    x = gmm.sample(batch, SHAPE, g)
    y = op.A(x)
    if sigma_y:
        y = y + sigma_y * torch.randn(y.shape, generator=g)
    xi = torch.randn((batch, *SHAPE), generator=g)
    z = torch.randn((batch, steps, *SHAPE), generator=g) if nw > 0 else None
    return op, x, y, xi, z


# ---------------------------------------------------------------- schedule

@pytest.mark.parametrize("n", [1, 7, 20, 25, 30, 100, 333, 400, 999, 1000])
def test_grid_has_exactly_n_steps(n):
    taus = timestep_grid(n)
    assert taus.numel() == n
    skip = 1000 // n
    assert taus.tolist() == [k * skip for k in range(n)][::-1]


@pytest.mark.parametrize("n,start", [(0, 1000), (-3, 1000), (1001, 1000), (30, 20)])
def test_grid_rejects_bad_steps(n, start):
    with pytest.raises(DeqirError, match="steps"):
        timestep_grid(n, start)


def test_coefficients_identities():
    c = chain_coefficients(25, etw=0.1, nw=0.3)
    assert torch.allclose(c.a_next[:-1], c.a[1:]) and c.a_next[-1] == 1
    assert c.k2[-1] == 0 and c.kn[-1] == 0
    assert torch.allclose(c.k1, torch.sqrt(1 / c.a - 1))
    assert not c.range_recurrent
    assert chain_coefficients(25, sigma_y=0.1).range_recurrent


def test_linear_scan_matches_loop():
    """Every path of linear_scan (cumsum, identity, closed form, loop) equals the recurrence."""
    g = torch.Generator().manual_seed(1)
    b = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    init = torch.randn(2, 3, generator=g, dtype=torch.float64)
    for decay in (torch.zeros(30), torch.ones(30), torch.tensor([0, .5, 1, .2, 0, .9] * 5),
                  torch.full((30,), 0.97), torch.linspace(0.5, 0.7, 30)):
        v, want = init, []
        for i in range(30):
            v = float(decay[i]) * v + b[:, i]
            want.append(v)
        got = linear_scan(decay.double(), b, init)
        assert (got - torch.stack(want, 1)).abs().max() < 1e-10


# ---------------------------------------------------------------- serial

@pytest.mark.parametrize("name,params", OPS)
def test_serial_equals_transcription(gmm, name, params):
    steps = 10
    op, _, y, xi, z = problem(gmm, name, params, batch=2, steps=steps, nw=0.2)
    want = reference_serial(gmm, op, y, xi, steps, etw=0.1, nw=0.2, z=z)
    got = restore(gmm, y.double(), op, steps=steps, solver="serial", noise=xi.double(), etw=0.1, nw=0.2,
                  step_noise=z, dtype=torch.float64).image
    assert (got.double() - want).abs().max() < 1e-5


def test_serial_noisy_measurement_matches_transcription(gmm):
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2}, sigma_y=0.1)
    want = reference_serial(gmm, op, y, xi, 10, sigma_y=0.1)
    got = restore(gmm, y, op, steps=10, solver="serial", noise=xi, sigma_y=0.1, dtype=torch.float64).image
    assert (got.double() - want).abs().max() < 1e-5


def test_learned_variance_output_is_cut(gmm):
    class TwoC(torch.nn.Module):
        def forward(self, x, t):
            return torch.cat([gmm(x, t), torch.full_like(x, 7.0)], 1)
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2})
    a = restore(gmm, y, op, steps=8, solver="serial", noise=xi).image
    b = restore(TwoC(), y, op, steps=8, solver="serial", noise=xi).image
    assert torch.equal(a, b)


# ---------------------------------------------------------------- parallel == serial

@pytest.mark.parametrize("name,params", OPS)
@pytest.mark.parametrize("etw,nw", [(0.0, 0.0), (0.1, 0.3)])
def test_picard_n_sweeps_is_exact(gmm, name, params, etw, nw):
    steps = 10
    op, _, y, xi, z = problem(gmm, name, params, batch=3, steps=steps, nw=nw)
    kw = dict(steps=steps, noise=xi.double(), etw=etw, nw=nw, step_noise=z, dtype=torch.float64)
    s = restore(gmm, y.double(), op, solver="serial", **kw).image
    p = restore(gmm, y.double(), op, solver="picard", stop="none", max_iter=steps, **kw)
    assert p.iterations == steps
    assert (p.image - s).abs().max() < 1e-9


@pytest.mark.parametrize("sigma_y", [0.05, 0.3])
def test_noisy_measurement_fixed_point_is_serial(gmm, sigma_y):
    op, _, y, xi, _ = problem(gmm, "deblur_gauss", {}, batch=2, sigma_y=sigma_y)
    kw = dict(steps=10, noise=xi, sigma_y=sigma_y, dtype=torch.float64)
    s = restore(gmm, y, op, solver="serial", **kw).image
    p = restore(gmm, y, op, solver="picard", stop="none", max_iter=10, **kw).image
    assert (p - s).abs().max() < 1e-9


def test_float32_picard_matches_serial_to_rounding(gmm):
    op, _, y, xi, _ = problem(gmm, "sr_bicubic", {"scale": 2}, batch=2, steps=25)
    s = restore(gmm, y, op, steps=25, solver="serial", noise=xi).image
    p = restore(gmm, y, op, steps=25, solver="picard", stop="none", max_iter=25, noise=xi).image
    assert p.dtype == torch.float32
    assert (p - s).abs().max() < 1e-4


@pytest.mark.parametrize("name,params", OPS)
@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_tight_stopping_reaches_60db(gmm, name, params, solver):
    op, _, y, xi, _ = problem(gmm, name, params, batch=1, steps=25)
    s = restore(gmm, y, op, steps=25, solver="serial", noise=xi).image
    p = restore(gmm, y, op, steps=25, solver=solver, noise=xi, stop="final", stop_tol=80.0)
    assert float(psnr(p.image, s).min()) >= 60


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("etw,nw", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.3)])
@pytest.mark.parametrize("batch", [1, 3])
def test_defaults_within_40db_of_serial(gmm, steps, etw, nw, batch):
    op, _, y, xi, z = problem(gmm, "sr_bicubic", {"scale": 2}, batch=batch, steps=steps, nw=nw)
    kw = dict(steps=steps, noise=xi, etw=etw, nw=nw, step_noise=z)
    s = restore(gmm, y, op, solver="serial", **kw).image
    for solver in ("picard", "anderson"):
        p = restore(gmm, y, op, solver=solver, **kw)
        assert float(psnr(p.image, s).min()) >= 40, (solver, p.iterations_per_image)
        assert p.iterations <= steps


def test_anderson_needs_fewer_iterations_than_picard(gmm):
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2}, batch=3, steps=50)
    k_p = restore(gmm, y, op, steps=50, solver="picard", noise=xi).iterations_per_image
    k_a = restore(gmm, y, op, steps=50, solver="anderson", noise=xi).iterations_per_image
    assert sum(k_a) < sum(k_p)


def test_batch_equals_each_image_alone(gmm):
    op, _, y, xi, _ = problem(gmm, "inpaint", {"mask": "box"}, batch=3, steps=25)
    kw = dict(steps=25, solver="anderson", dtype=torch.float64)
    both = restore(gmm, y, op, noise=xi, **kw)
    for i in range(3):
        one = restore(gmm, y[i:i + 1], op, noise=xi[i:i + 1], **kw)
        assert one.iterations == both.iterations_per_image[i]
        assert (one.image[0] - both.image[i]).abs().max() < 1e-9


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_rows_stopping_bounds_every_row(gmm, solver):
    """The per-row rule stops once every row moved by <= tol of its noise level, and not before."""
    op, _, y, xi, _ = problem(gmm, "inpaint", {"mask": "box"}, batch=2, steps=25)
    s = restore(gmm, y, op, steps=25, solver="serial", noise=xi).image
    r = restore(gmm, y, op, steps=25, solver=solver, noise=xi, stop="rows", stop_tol=0.03)
    for i, k in enumerate(r.iterations_per_image):
        q = [row[i] for row in r.trace[:k]]
        assert q[-1] <= 0.03 and all(v > 0.03 for v in q[:-1])
    assert float(psnr(r.image, s).min()) >= 45
    loose = restore(gmm, y, op, steps=25, solver=solver, noise=xi, stop="rows", stop_tol=1.0)
    assert loose.iterations < r.iterations


def test_anderson_under_rows_rule_does_not_stall():
    """N = 100, sr_avgpool: without the stall fallback one image needed 36 evaluations (Picard: 20)."""
    from deqir_dist.apps.bench import run_bench
    rows = run_bench("analytic", steps=(100,), images=3)["rows"]
    k = {r["solver"]: r["K"] for r in rows}
    assert k["anderson"] <= k["picard"]
    assert min(r["psnr_vs_serial"] for r in rows) >= 60


def test_residual_and_none_stopping(gmm):
    op, _, y, xi, _ = problem(gmm, "colorize", {}, steps=25)
    r = restore(gmm, y, op, steps=25, solver="picard", noise=xi, stop="residual", stop_tol=1e-3)
    assert r.trace[r.iterations - 1][0] <= 1e-3 or r.iterations == 25
    n = restore(gmm, y, op, steps=25, solver="anderson", noise=xi, stop="none", max_iter=6)
    assert n.iterations == 6 and len(n.trace) == 6


@pytest.mark.parametrize("data_std", [None, 0.5])
def test_prefix_rows_exact_after_k_sweeps(gmm, data_std):
    """Causality: after k Picard sweeps from any start, rows 1..k equal the serial states."""
    steps = 8
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2}, steps=steps)
    xi, y = xi.double(), y.double()
    states = []
    restore(gmm, y, op, steps=steps, solver="serial", noise=xi, dtype=torch.float64,
            callback=lambda k, ids, h, q: states.append(h.clone()))
    coeffs = chain_coefficients(steps)
    block = ChainBlock(EpsFn(gmm, 3, torch.float64), op, coeffs, y, xi, 0, steps, data_std=data_std)
    idx = torch.arange(1)
    x = torch.randn(1, steps, *SHAPE, dtype=torch.float64)
    for k in range(1, steps + 1):
        inputs = block.inputs(x, xi)
        x = block.outputs(*block.increments(block.denoise(inputs), inputs, idx), block.carry0)
        for i in range(k):
            assert (x[:, i] - states[i]).abs().max() < 1e-9


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("sigma_y", [0.0, 0.2])
@pytest.mark.parametrize("data_std", [None, 0.5])
def test_blocks_with_halo_and_carry_equal_whole_map(gmm, parts, sigma_y, data_std):
    """The unit of distributed work: blocks + halo rows + exclusive scan of summaries == one map."""
    steps = 10
    op, _, y, xi, z = problem(gmm, "deblur_aniso", {}, batch=2, steps=steps, nw=0.2, sigma_y=sigma_y)
    coeffs = chain_coefficients(steps, etw=0.3, nw=0.2, sigma_y=sigma_y)
    eps_fn = EpsFn(gmm, 3, torch.float64)
    y, xi, z = y.double(), xi.double(), z.double()
    idx = torch.arange(2)
    x = torch.randn(2, steps, *SHAPE, dtype=torch.float64)
    whole = ChainBlock(eps_fn, op, coeffs, y, xi, 0, steps, z, data_std)
    inputs = whole.inputs(x, xi)
    want = whole.outputs(*whole.increments(whole.denoise(inputs), inputs, idx), whole.carry0)
    carry, outs = whole.carry0, []
    for lo, hi in split_rows(steps, parts):
        blk = ChainBlock(eps_fn, op, coeffs, y, xi, lo, hi, z[:, lo:hi], data_std)
        inputs = blk.inputs(x[:, lo:hi], xi if lo == 0 else x[:, lo - 1])
        bp, bq = blk.increments(blk.denoise(inputs), inputs, idx)
        outs.append(blk.outputs(bp, bq, carry))
        carry = blk.summary(bp, bq).apply(carry)
    assert (torch.cat(outs, 1) - want).abs().max() < 1e-10


def test_split_rows_covers_everything():
    for n in range(1, 30):
        for p in range(1, n + 1):
            blocks = split_rows(n, p)
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(b[0] < b[1] for b in blocks)
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert max(b[1] - b[0] for b in blocks) - min(b[1] - b[0] for b in blocks) <= 1


def test_low_precision_denoiser_keeps_float32_state(gmm):
    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))

        def forward(self, x, t):
            assert x.dtype == torch.bfloat16
            return (gmm(x.float(), t) * self.w.float()).to(torch.bfloat16)
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2})
    r = restore(Half(), y.double(), op, steps=10, solver="anderson", noise=xi)
    assert r.image.dtype == torch.float32 and torch.isfinite(r.image).all()


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw,match", [
    (dict(steps=1001), "steps"), (dict(steps=0), "steps"), (dict(solver="newton"), "unknown solver"),
    (dict(stop="never"), "unknown stop"), (dict(max_iter=0), "max_iter"), (dict(etw=2.0), "etw"),
    (dict(stop="residual", stop_tol=0.0), "stop_tol"), (dict(stop_tol="abc"), "stop_tol"),
    (dict(solver="anderson", m=2.5), "m "), (dict(solver="anderson", m="3"), "m "),
    (dict(solver="anderson", ridge=0.0), "ridge"), (dict(solver="anderson", ridge=float("nan")), "ridge"),
    (dict(solver="anderson", beta=float("inf")), "beta"), (dict(solver="anderson", beta="1"), "beta"),
    (dict(safeguard=1.0), "safeguard"), (dict(dtype=torch.bfloat16), "dtype"), (dict(dtype="float32"), "dtype"),
    # the serial sampler checks the solver options too
    (dict(solver="serial", bogus=1), "unknown solver option"), (dict(solver="serial", window=-5), "window"),
    (dict(solver="serial", stop="nonsense"), "unknown stop"), (dict(solver="serial", max_iter=-3), "max_iter"),
    # solver="auto" checks before it times the denoiser
    (dict(solver="auto", steps=0), "steps"), (dict(solver="auto", steps=2.5), "steps"),
    (dict(solver="auto", profile={"a": 1.0}), "cost profile"), (dict(solver="auto", profile={4: -1.0}), "cost profile"),
    (dict(start=5000), "start=5000 is past the model's noise schedule: start .* at most 1000"),
])
def test_bad_arguments(gmm, kw, match):
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2})
    args = dict(steps=10, noise=xi)
    args.update(kw)
    with pytest.raises(DeqirError, match=match):
        restore(gmm, y, op, **args)


def test_bad_tensors(gmm):
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2})
    bad = y.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DeqirError, match="NaN"):
        restore(gmm, bad, op, steps=5)
    with pytest.raises(DeqirError, match="shape"):
        restore(gmm, y[:, :2], op, steps=5)
    with pytest.raises(DeqirError, match="noise"):
        restore(gmm, y, op, steps=5, noise=xi[:, :, :8])
    with pytest.raises(DeqirError, match="step_noise"):
        restore(gmm, y, op, steps=5, noise=xi, nw=0.5, step_noise=torch.zeros(1, 4, *SHAPE))
    for solver in ("serial", "picard"):
        with pytest.raises(DeqirError, match="no images"):
            restore(gmm, y[:0], op, steps=5, solver=solver)


def test_numpy_scalars_are_accepted(gmm):
    np = pytest.importorskip("numpy")
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2})
    a = restore(gmm, y, op, steps=np.int64(6), etw=np.float32(0.25), noise=xi, max_iter=np.int64(6), solver="picard")
    b = restore(gmm, y, op, steps=6, etw=0.25, noise=xi, solver="picard")
    assert torch.equal(a.image, b.image) and a.iterations_per_image == b.iterations_per_image


def test_anderson_is_exact_and_stops_after_n_evaluations(gmm):
    """Anderson keeps the exact prefix rows, so like Picard it is done after N evaluations."""
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2})
    ref = restore(gmm, y, op, steps=6, solver="serial", noise=xi).image
    r = restore(gmm, y, op, steps=6, solver="anderson", noise=xi, stop="rows", stop_tol=1e-12, warm_start=0)
    assert r.iterations == 6
    assert (r.image - ref).abs().max() < 1e-5


def test_anderson_survives_a_singular_history(gmm):
    """Past N evaluations the residuals are exactly zero: the Gram system is singular, the step is Picard."""
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2})
    ref = restore(gmm, y, op, steps=4, solver="serial", noise=xi).image
    r = restore(gmm, y, op, steps=4, solver="anderson", noise=xi, stop="none", max_iter=12, m=5, ridge=1e-300)
    assert r.iterations == 12 and torch.isfinite(r.image).all()
    assert (r.image - ref).abs().max() < 1e-5


def test_callback_has_one_signature_for_every_solver(gmm):
    op, _, y, xi, _ = problem(gmm, "sr_avgpool", {"scale": 2}, batch=2)
    for solver in ("serial", "picard", "anderson"):
        seen = []
        r = restore(gmm, y, op, steps=5, solver=solver, noise=xi,
                    callback=lambda k, ids, rows, q: seen.append((k, list(ids), rows.clone(), q)))
        assert [s[0] for s in seen] == list(range(len(seen))) and seen[0][1] == [0, 1]
        assert (seen[-1][3] is None) == (solver == "serial")
        assert torch.allclose(seen[-1][2][-1], r.image[seen[-1][1][-1]].to(seen[-1][2]), atol=1e-6)


@pytest.mark.parametrize("warm", [1, 3])
def test_warm_start_keeps_the_fixed_point(gmm, warm):
    op, _, y, xi, _ = problem(gmm, "inpaint", {"mask": "box"}, batch=2, steps=25)
    s = restore(gmm, y, op, steps=25, solver="serial", noise=xi).image
    a = restore(gmm, y, op, steps=25, solver="anderson", noise=xi, warm_start=warm)
    assert float(psnr(a.image, s).min()) >= 40
    p = restore(gmm, y, op, steps=25, solver="picard", stop="none", max_iter=25, noise=xi, warm_start=warm)
    assert (p.image - s).abs().max() < 1e-4
    with pytest.raises(DeqirError, match="warm_start"):
        restore(gmm, y, op, steps=25, noise=xi, warm_start=-1)



# ---------------------------------------------------------------- x0 clipping (opt-in)

@pytest.mark.parametrize("name,params", [("colorize", {}), ("inpaint", {"mask": "box"})])
def test_clipped_x0_serial_matches_transcription_and_picard_reaches_it(gmm, name, params):
    op, _, y, xi, _ = problem(gmm, name, params, batch=2, steps=10)
    xi = 2.5 * xi                                              # push x0 predictions out of [-1, 1]
    ref = reference_serial(gmm, op, y.double(), xi.double(), 10, clip=True)
    plain = reference_serial(gmm, op, y.double(), xi.double(), 10)
    ser = restore(gmm, y.double(), op, steps=10, solver="serial", noise=xi.double(), dtype=torch.float64,
                  clip_x0=True)
    assert float((ser.image - ref).abs().max()) < 1e-9
    assert float((plain - ref).abs().max()) > 1e-3               # the clip is active here
    for window in (10, 0, 3):
        par = restore(gmm, y.double(), op, steps=10, solver="picard", noise=xi.double(), dtype=torch.float64,
                      clip_x0=True, window=window, stop_tol=1e-12, warm_start=0)
        assert float((par.image - ref).abs().max()) < 1e-9


def test_clip_x0_must_be_a_bool(gmm):
    op, _, y, xi, _ = problem(gmm, "denoise", {})
    with pytest.raises(DeqirError, match="clip_x0"):
        restore(gmm, y, op, steps=5, noise=xi, clip_x0="yes")
