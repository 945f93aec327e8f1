"""DEQ inversion: the implicit gradient equals autograd through the serial sampler, and its chain
is restore's (the noise model for sigma_y > 0, the padded canvas, the model card's settings); the
adjoint pieces equal autograd of the joint map; phantom is the linear term only; noise optimisation."""
import math

import pytest
import torch

from deqir_dist import DeqirError, make_operator, restore
from deqir_dist.api.inversion import noise_gradient
from deqir_dist.api.optimize import optimize_noise
from deqir_dist.models.analytic import GaussianMixtureDenoiser
from deqir_dist.parallel.comm import split_rows
from deqir_dist.physics.padded import PaddedOperator
from deqir_dist.sampling.adjoint import AdjointBlock, ReverseCarry, reverse_scan
from deqir_dist.sampling.chain import ChainBlock
from deqir_dist.sampling.denoiser import EpsFn
from deqir_dist.sampling.noise import draw_noise
from deqir_dist.sampling.schedule import chain_coefficients, linear_alphas_cumprod
from deqir_dist.sampling.serial import sample_serial

SHAPE = (3, 8, 8)
STEPS = 8


def problem(gmm, name, params, batch=2, seed=0, steps=STEPS, nw=0.0, sigma_y=0.0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    op = make_operator(name, shape, **params)
    x = gmm.sample(batch, shape, g).double()
    y = op.A(x)
    if sigma_y:
        y = y + sigma_y * torch.randn(y.shape, generator=g, dtype=torch.float64)
    xi = torch.randn((batch, *shape), generator=g, dtype=torch.float64)
    z = torch.randn((batch, steps, *shape), generator=g, dtype=torch.float64) if nw > 0 else None
    target = gmm.sample(batch, shape, g).double()
    return op, x, y, xi, z, target


def serial_chain(gmm, op, y, xi, steps=STEPS, etw=0.0, nw=0.0, z=None, sigma_y=0.0, clip_x0=False, multiple=1):
    """restore's serial chain written out, float64, differentiable in xi: with sigma_y > 0 the
    operator for the noise and the filtered y; an image size off ``multiple`` padded to it (xi and
    z on the canvas), the result cropped back."""
    if sigma_y > 0:
        op = op.for_noise(sigma_y)
        y = op.filter_measurement(y, sigma_y)
    _, H, W = op.image_shape
    canvas = (-(-H // multiple) * multiple, -(-W // multiple) * multiple)
    if canvas != (H, W):
        op = PaddedOperator(op, canvas)
    c = chain_coefficients(steps, etw=etw, nw=nw, sigma_y=sigma_y)
    eps = EpsFn(gmm, 3, torch.float64, clip_abar=linear_alphas_cumprod() if clip_x0 else None)
    return sample_serial(eps, op, c, y, xi, z)[..., :H, :W]


def autograd_serial(gmm, op, y, xi, loss_fn, steps=STEPS, **kw):
    """The reference: backprop through the serial sampler (``serial_chain``), float64."""
    x = xi.clone().requires_grad_(True)
    g, = torch.autograd.grad(loss_fn(serial_chain(gmm, op, y, x, steps, **kw)).sum(), x)
    return g


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def mse_to(t):
    return lambda h: (h - t).pow(2).flatten(1).mean(1)


EXACT_FWD = dict(solver="anderson", tol=300.0, dtype=torch.float64)      # runs to the exact end (N)


@pytest.mark.parametrize("name,params,etw,nw,sigma_y,adjoint", [
    ("sr_avgpool", {"scale": 2}, 0.0, 0.0, 0.0, "serial"),
    ("inpaint", {"mask": "random", "fraction": 0.6}, 0.0, 0.0, 0.0, "picard"),
    ("colorize", {}, 0.1, 0.3, 0.0, "anderson"),
    ("deblur_gauss", {}, 0.0, 0.0, 0.0, "serial"),
    ("sr_bicubic", {"scale": 2}, 0.0, 0.0, 0.05, "anderson"),    # noisy y: the range part is a recurrence,
    ("deblur_gauss", {}, 0.1, 0.2, 0.01, "serial"),              # and for_noise drops directions
])
def test_implicit_equals_autograd_through_serial(gmm, name, params, etw, nw, sigma_y, adjoint):
    op, _, y, xi, z, target = problem(gmm, name, params, nw=nw, sigma_y=sigma_y)
    loss = mse_to(target)
    want = autograd_serial(gmm, op, y, xi, loss, etw=etw, nw=nw, z=z, sigma_y=sigma_y)
    got = noise_gradient(gmm, y, op, xi, loss, steps=STEPS, etw=etw, nw=nw, step_noise=z, sigma_y=sigma_y,
                         adjoint=adjoint, **EXACT_FWD)
    assert got.grad.shape == xi.shape
    assert rel(got.grad, want) <= 1e-10          # measured: 1e-13 .. 6e-12
    assert got.adjoint_iterations == STEPS
    # the loss and image are those of the serial result
    h = serial_chain(gmm, op, y, xi, etw=etw, nw=nw, z=z, sigma_y=sigma_y)
    assert (got.image - h).abs().max() < 1e-9
    assert torch.allclose(got.loss, loss(h))


def test_noisy_measurements_differentiate_restores_chain(gmm):
    """sigma_y > 0 on a blur whose weak directions for_noise drops: noise_gradient's image is
    restore(solver="serial", noise=xi)'s, its gradient autograd's through that chain, and not the
    gradient of the chain on the unfiltered operator (what it differentiated before)."""
    sigma_y = 0.01
    op, _, y, xi, z, target = problem(gmm, "deblur_gauss", {}, nw=0.2, sigma_y=sigma_y)
    assert 0 < op.for_noise(sigma_y).rank < op.rank
    loss = mse_to(target)
    kw = dict(steps=STEPS, etw=0.1, nw=0.2, sigma_y=sigma_y)
    ref = restore(gmm, y, op, solver="serial", noise=xi, step_noise=z, dtype=torch.float64, **kw)
    want = autograd_serial(gmm, op, y, xi, loss, etw=0.1, nw=0.2, z=z, sigma_y=sigma_y)
    for solver in ("serial", "anderson"):
        got = noise_gradient(gmm, y, op, xi, loss, step_noise=z, solver=solver, tol=300.0, dtype=torch.float64,
                             **kw)
        assert (got.image - ref.image).abs().max() < 1e-12, solver
        assert rel(got.grad, want) <= 1e-10, solver
    c = chain_coefficients(STEPS, etw=0.1, nw=0.2, sigma_y=sigma_y)
    x = xi.clone().requires_grad_(True)
    raw, = torch.autograd.grad(loss(sample_serial(EpsFn(gmm, 3, torch.float64), op, c, y, x, z)).sum(), x)
    assert rel(raw, want) > 1e-2


def test_padded_canvas_as_restore(gmm):
    """A size off the model's multiple runs on restore's padded canvas: xi, z, grad and trajectory
    on the canvas, loss_fn and image on the user's size; sigma_y > 0 and x0 clipping as restore."""
    model = GaussianMixtureDenoiser(seed=0)
    model.size_multiple = 4
    sigma_y = 0.01
    op, _, y, _, _, target = problem(gmm, "deblur_gauss", {}, sigma_y=sigma_y, shape=(3, 6, 10))
    g = torch.Generator().manual_seed(5)
    xi = torch.randn((2, 3, 8, 12), generator=g, dtype=torch.float64)
    z = torch.randn((2, STEPS, 3, 8, 12), generator=g, dtype=torch.float64)
    seen = []

    def loss(h):
        seen.append(tuple(h.shape))
        return mse_to(target)(h)

    kw = dict(steps=STEPS, etw=0.1, nw=0.2, sigma_y=sigma_y, clip_x0=True)
    ref = restore(model, y, op, solver="serial", noise=xi, step_noise=z, dtype=torch.float64, **kw)
    want = autograd_serial(gmm, op, y, xi, mse_to(target), etw=0.1, nw=0.2, z=z, sigma_y=sigma_y, clip_x0=True,
                           multiple=4)
    for adjoint in ("serial", "picard"):
        got = noise_gradient(model, y, op, xi, loss, step_noise=z, solver="serial", adjoint=adjoint,
                             dtype=torch.float64, **kw)
        assert got.image.shape == (2, 3, 6, 10) and got.grad.shape == xi.shape
        assert got.trajectory.shape == (2, STEPS, 3, 8, 12)
        assert set(seen) == {(2, 3, 6, 10)}
        assert (got.image - ref.image).abs().max() < 1e-12
        assert rel(got.grad, want) <= 1e-10, adjoint
    assert got.grad[..., 6:, :].abs().max() > 0          # the padding's noise does reach the image
    ph = noise_gradient(model, y, op, xi, loss, step_noise=z, method="phantom", dtype=torch.float64, **kw)
    assert ph.image.shape == (2, 3, 6, 10) and ph.grad.shape == xi.shape
    with pytest.raises(DeqirError, match=r"xi must be on the model's canvas \(3, 8, 12\).*multiples of 4"):
        noise_gradient(model, y, op, xi[..., :6, :10], loss, **kw)
    with pytest.raises(DeqirError, match=r"step_noise must be on the model's canvas.*multiples of 4"):
        noise_gradient(model, y, op, xi, loss, step_noise=z[..., :6, :10], **kw)
    with pytest.raises(DeqirError, match="clip_x0"):
        noise_gradient(model, y, op, xi, loss, step_noise=z, **{**kw, "clip_x0": 1})


def test_serial_forward_and_vjp_chunks_agree(gmm):
    op, _, y, xi, _, target = problem(gmm, "sr_avgpool", {"scale": 2})
    loss = mse_to(target)
    want = autograd_serial(gmm, op, y, xi, loss)
    for kw in (dict(solver="serial", adjoint="picard"), dict(solver="serial", adjoint="anderson", vjp_chunk=3)):
        got = noise_gradient(gmm, y, op, xi, loss, steps=STEPS, dtype=torch.float64, **kw)
        assert rel(got.grad, want) <= 1e-8, kw


def test_float32_default_is_close(gmm):
    op, x, y, xi, _, _ = problem(gmm, "inpaint", {"mask": "box"}, steps=10)
    loss = mse_to(x)
    want = autograd_serial(gmm, op, y, xi, loss, steps=10)
    got = noise_gradient(gmm, y.float(), op, xi.float(), loss, steps=10)
    assert got.grad.dtype == torch.float32
    cos = float(torch.nn.functional.cosine_similarity(got.grad.double().flatten(), want.flatten(), 0))
    assert cos > 0.999 and rel(got.grad, want) < 2e-2


# ---------------------------------------------------------------- the adjoint pieces

@pytest.mark.parametrize("name,params,sigma_y", [
    ("sr_avgpool", {"scale": 2}, 0.0), ("deblur_aniso", {}, 0.0), ("inpaint", {"mask": "box"}, 0.2),
    ("colorize", {}, 0.0), ("cs_wht", {"ratio": 4}, 0.1), ("denoise", {}, 0.0), ("sr_bicubic", {"scale": 2}, 0.2),
])
def test_adjoint_block_is_the_vjp_of_the_joint_map(gmm, name, params, sigma_y):
    """J_h^T lam and J_xi^T lam from reverse scans + one denoiser VJP == autograd of F(h; xi)."""
    op, _, y, xi, z, _ = problem(gmm, name, params, nw=0.2, sigma_y=sigma_y)
    c = chain_coefficients(STEPS, nw=0.2, sigma_y=sigma_y, etw=0.1)
    eps_fn = EpsFn(gmm, 3, torch.float64)
    g = torch.Generator().manual_seed(3)
    h = torch.randn((2, STEPS, *SHAPE), generator=g, dtype=torch.float64)
    lam = torch.randn(h.shape, generator=g, dtype=torch.float64)
    hh, xx = h.clone().requires_grad_(True), xi.clone().requires_grad_(True)
    block = ChainBlock(eps_fn, op, c, y, xx, 0, STEPS, z)
    inputs = block.inputs(hh, xx)
    f = block.outputs(*block.increments(block.denoise(inputs), inputs, torch.arange(2)), block.carry0)
    want_h, want_xi = torch.autograd.grad(f, (hh, xx), grad_outputs=lam)

    adj = AdjointBlock(op, c, 0, STEPS)
    mu_p, mu_q = adj.scan(lam)
    a = adj.eps_adjoint(mu_p, mu_q)
    inp = torch.cat([xi.unsqueeze(1), h[:, :-1]], 1).requires_grad_(True)
    eps = eps_fn(inp.flatten(0, 1), c.taus.repeat(2)).view(inp.shape)
    v, = torch.autograd.grad(eps, inp, grad_outputs=a)
    assert (v[:, 1:] - want_h[:, :-1]).abs().max() < 1e-9 * (1 + want_h.abs().max())
    assert want_h[:, -1].abs().max() == 0                       # row N feeds nothing
    got_xi = v[:, 0] + adj.xi_linear(mu_p, mu_q)
    assert (got_xi - want_xi).abs().max() < 1e-9 * (1 + want_xi.abs().max())


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("sigma_y", [0.0, 0.2])
def test_adjoint_blocks_with_reverse_carry_equal_whole(parts, sigma_y):
    """Sharding design: per-block scans + exclusive REVERSE scan of block summaries == whole scan."""
    op = make_operator("deblur_gauss", SHAPE)
    c = chain_coefficients(STEPS, sigma_y=sigma_y)
    lam = torch.randn((2, STEPS, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = AdjointBlock(op, c, 0, STEPS)
    mp, mq = whole.scan(lam)
    want = whole.eps_adjoint(mp, mq)
    blocks = split_rows(STEPS, parts)
    carry = ReverseCarry(torch.zeros_like(lam[:, 0]), torch.zeros_like(lam[:, 0]))
    outs = []
    for lo, hi in reversed(blocks):
        blk = AdjointBlock(op, c, lo, hi)
        p, q = blk.scan(lam[:, lo:hi], carry)
        outs.insert(0, blk.eps_adjoint(p, q))
        carry = blk.summary(lam[:, lo:hi]).apply(carry)
        if lo == 0:
            assert (blk.xi_linear(p, q) - whole.xi_linear(mp, mq)).abs().max() < 1e-10
    assert (torch.cat(outs, 1) - want).abs().max() < 1e-10


def test_reverse_scan_matches_loop():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    init = torch.randn(2, 3, generator=g, dtype=torch.float64)
    for dn in (torch.zeros(6), torch.ones(6), torch.tensor([.5, 1, .2, 0, .9, .3])):
        v, want = init, [None] * 6
        for i in range(5, -1, -1):
            v = w[:, i] + float(dn[i]) * v
            want[i] = v
        assert torch.allclose(reverse_scan(dn.double(), w, init), torch.stack(want, 1))


# ---------------------------------------------------------------- phantom

def test_phantom_one_step_is_the_linear_term_only(gmm):
    """Official defaults (k = 1, tau = 0.1): dL/dxi = tau P(dL/dh_N) / sqrt(a_1), no denoiser Jacobian."""
    op, x, y, xi, _, _ = problem(gmm, "sr_avgpool", {"scale": 2})
    loss = mse_to(x)
    ph = noise_gradient(gmm, y, op, xi, loss, steps=STEPS, method="phantom", **EXACT_FWD)
    img = ph.image.clone().requires_grad_(True)
    dl, = torch.autograd.grad(loss(img).sum(), img)
    a1 = float(chain_coefficients(STEPS).a[0])
    assert (ph.grad - 0.1 * op.P(dl) / math.sqrt(a1)).abs().max() < 1e-12 * (1 + ph.grad.abs().max())
    want = autograd_serial(gmm, op, y, xi, loss)
    ph3 = noise_gradient(gmm, y, op, xi, loss, steps=STEPS, method="phantom", phantom_steps=3, **EXACT_FWD)
    for g in (ph.grad, ph3.grad):
        cos = float(torch.nn.functional.cosine_similarity(g.flatten(), want.flatten(), 0))
        assert math.isfinite(cos) and -1 <= cos <= 1
    assert rel(ph3.grad, ph.grad) > 1e-6                          # k >= 2 does see the denoiser


# ---------------------------------------------------------------- optimisation

def test_consistency_decreases_with_noisy_measurements(gmm):
    op, _, y, xi, _, _ = problem(gmm, "sr_avgpool", {"scale": 2}, batch=2, sigma_y=0.1, shape=(3, 16, 16))
    r = optimize_noise(gmm, y.float(), op, loss="consistency", steps=10, iters=6, lr=0.2, xi=xi.float(),
                       sigma_y=0.1)
    assert not r.oracle and len(r.history) == 6
    first, last = r.history[0]["loss"], min(h["loss"][0] for h in r.history)
    assert last < 0.9 * first[0]
    for rec in r.history:
        assert len(rec["consistency"]) == 2 and all(math.isfinite(v) for v in rec["consistency"])
        assert rec["loss"][0] == pytest.approx(rec["consistency"][0] ** 2, rel=1e-4)
    # the best iterate is the one kept, per image
    for i in range(2):
        best = r.best_iteration[i]
        assert r.history[best]["loss"][i] == min(h["loss"][i] for h in r.history)
    assert r.image.shape == r.xi.shape == xi.shape


def test_consistency_refused_without_measurement_noise(gmm):
    op, _, y, xi, _, _ = problem(gmm, "sr_avgpool", {"scale": 2})
    with pytest.raises(DeqirError, match="sigma_y"):
        optimize_noise(gmm, y, op, loss="consistency", steps=STEPS, iters=2, xi=xi)
    # and indeed: with sigma_y = 0 the consistency gradient vanishes
    g = noise_gradient(gmm, y, op, xi, lambda h: (op.A(h) - y).pow(2).flatten(1).sum(1), steps=STEPS,
                       dtype=torch.float64)
    assert g.grad.abs().max() < 1e-9


def test_oracle_and_reference(gmm):
    op, x, y, xi, _, target = problem(gmm, "inpaint", {"mask": "box"}, batch=1)
    with pytest.raises(DeqirError, match="ground-truth"):
        optimize_noise(gmm, y, op, loss="oracle", steps=STEPS, iters=2, xi=xi)
    with pytest.raises(DeqirError, match="reference"):
        optimize_noise(gmm, y, op, loss="reference", steps=STEPS, iters=2, xi=xi)
    o = optimize_noise(gmm, y.float(), op, loss="oracle", target=x.float(), steps=STEPS, iters=5, lr=0.2,
                       xi=xi.float())
    assert o.oracle and o.loss == "oracle"
    assert min(h["loss"][0] for h in o.history) < o.history[0]["loss"][0]
    r = optimize_noise(gmm, y.float(), op, loss="reference", target=target[:1].float(), steps=STEPS, iters=4,
                       lr=0.2, xi=xi.float(), method="phantom", phantom_steps=2)
    assert not r.oracle and torch.isfinite(r.image).all()


def test_optimize_noise_is_restore_with_the_model_card(gmm):
    """optimize_noise takes the settings left out from the model card as restore does, draws the xi
    restore would draw, and its image is restore(noise=xi, solver="serial")'s (sigma_y > 0, a
    padded size, a card that clips x0 for this task)."""
    model = GaussianMixtureDenoiser(seed=0)
    model.size_multiple = 4
    model.sampler_card = {"steps": 6, "etw": 0.3, "nw": 0.2, "clip_x0": {"default": False, "deblur_gauss": True},
                          "source": "test card"}
    sigma_y = 0.01
    op, x, y, _, _, _ = problem(gmm, "deblur_gauss", {}, batch=1, sigma_y=sigma_y, shape=(3, 6, 10))
    r = optimize_noise(model, y, op, loss="oracle", target=x, iters=3, lr=0.2, solver="serial", sigma_y=sigma_y,
                       dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert r.settings == {"steps": 6, "etw": 0.3, "nw": 0.2, "clip_x0": True, "sigma_y": sigma_y}
    assert r.settings_source["etw"] == "test card" and r.settings_source["sigma_y"] == "user"
    assert r.xi.shape == (1, 3, 8, 12) and r.image.shape == (1, 3, 6, 10)
    first = restore(model, y, op, solver="serial", sigma_y=sigma_y, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))
    assert first.settings == r.settings
    assert (r.initial_image - first.image).abs().max() < 1e-12          # the same xi and z drawn
    assert r.best_iteration[0] > 0                                      # Adam moved xi; the z rows stay
    xi0, zs = draw_noise(1, (3, 8, 12), 6, 0.2, torch.Generator().manual_seed(7))
    assert not torch.equal(r.xi, xi0.double())
    final = restore(model, y, op, solver="serial", noise=r.xi, step_noise=zs, sigma_y=sigma_y, dtype=torch.float64)
    assert (r.image - final.image).abs().max() < 1e-12
    user = optimize_noise(model, y, op, loss="oracle", target=x, steps=4, etw=0.0, nw=0.0, clip_x0=False, iters=1,
                          solver="serial", sigma_y=sigma_y, dtype=torch.float64, xi=r.xi)
    assert user.settings == {"steps": 4, "etw": 0.0, "nw": 0.0, "clip_x0": False, "sigma_y": sigma_y}
    assert set(user.settings_source.values()) == {"user"}
    with pytest.raises(DeqirError, match="multiples of 4"):
        optimize_noise(model, y, op, loss="oracle", target=x, iters=1, xi=r.xi[..., :6, :10], sigma_y=sigma_y)


def test_noise_gradient_takes_the_model_card_as_restore_does(gmm):
    """noise_gradient with no sampler settings runs the card's (steps, etw, clip_x0 for the task):
    its image is restore(noise=xi, solver="serial")'s, its gradient autograd's through that chain;
    what is given wins over the card."""
    model = GaussianMixtureDenoiser(seed=0)
    model.sampler_card = {"steps": 6, "etw": 0.4, "nw": 0.0, "clip_x0": {"default": False, "sr_avgpool": True},
                          "source": "test card"}
    op, x, y, xi, _, _ = problem(gmm, "sr_avgpool", {"scale": 2}, batch=1)

    def loss(h):
        return (h - x).pow(2).flatten(1).sum(1)

    r = noise_gradient(model, y, op, xi, loss, solver="serial", dtype=torch.float64)
    assert r.settings == {"steps": 6, "etw": 0.4, "nw": 0.0, "clip_x0": True, "sigma_y": 0.0}
    assert set(r.settings_source.values()) == {"test card", "user"} and r.settings_source["etw"] == "test card"
    ref = restore(model, y, op, solver="serial", noise=xi, dtype=torch.float64)
    assert ref.settings == r.settings and (r.image - ref.image).abs().max() < 1e-12
    c = chain_coefficients(6, etw=0.4)
    leaf = xi.clone().requires_grad_(True)
    h = sample_serial(EpsFn.for_chain(model, 3, torch.float64, True), op, c, y, leaf)
    g, = torch.autograd.grad(loss(h).sum(), leaf)
    assert (r.grad - g).abs().max() <= 1e-10 * g.abs().max()
    given = noise_gradient(model, y, op, xi, loss, steps=4, etw=0.0, clip_x0=False, solver="serial", dtype=torch.float64)
    assert given.settings == {"steps": 4, "etw": 0.0, "nw": 0.0, "clip_x0": False, "sigma_y": 0.0}
    assert given.settings_source == {"steps": "user", "etw": "user", "nw": "test card", "clip_x0": "user",
                                     "sigma_y": "user"}


def test_bad_arguments(gmm):
    op, x, y, xi, _, _ = problem(gmm, "sr_avgpool", {"scale": 2}, batch=1)
    loss = mse_to(x)
    for kw, match in [(dict(method="newton"), "method"), (dict(solver="x"), "solver"), (dict(adjoint="x"), "adjoint"),
                      (dict(method="phantom", tau=0.0), "tau"), (dict(vjp_chunk=0), "vjp_chunk"),
                      (dict(nw=0.3), "step_noise")]:
        with pytest.raises(DeqirError, match=match):
            noise_gradient(gmm, y, op, xi, loss, steps=STEPS, **kw)
    with pytest.raises(DeqirError, match="shape"):
        noise_gradient(gmm, y, op, xi[:, :, :4], loss, steps=STEPS)
    with pytest.raises(DeqirError, match="loss_fn"):
        noise_gradient(gmm, y, op, xi, lambda h: h, steps=STEPS)
    for kw, match in [(dict(loss="lpips"), "unknown loss"), (dict(iters=0), "iters"), (dict(lr=-1.0), "lr")]:
        with pytest.raises(DeqirError, match=match):
            optimize_noise(gmm, y, op, **kw)


def test_data_std_reaches_the_forward_and_leaves_the_gradient(gmm):
    """data_std is honoured: it changes the forward's path (a truncated forward lands elsewhere),
    not its fixed point, so the exact gradient is the same for every choice."""
    op, _, y, xi, _, target = problem(gmm, "inpaint", {"mask": "random", "fraction": 0.6})
    loss = mse_to(target)
    want = autograd_serial(gmm, op, y, xi, loss)
    grads, trunc = [], []
    for ds in (None, 0.5, 2.0):
        got = noise_gradient(gmm, y, op, xi, loss, steps=STEPS, adjoint="picard", data_std=ds, **EXACT_FWD)
        assert rel(got.grad, want) <= 1e-10, ds
        grads.append(got.grad)
        short = noise_gradient(gmm, y, op, xi, loss, steps=STEPS, solver="picard", max_iter=2, tol=300.0,
                               dtype=torch.float64, data_std=ds)
        trunc.append(short.trajectory)
    assert not torch.equal(trunc[0], trunc[1]) and not torch.equal(trunc[1], trunc[2])
    for bad in (0.0, -1.0, float("inf"), "wide"):
        with pytest.raises(DeqirError, match="data_std"):
            noise_gradient(gmm, y, op, xi, loss, steps=STEPS, data_std=bad)
    with pytest.raises(DeqirError, match="unknown solver option"):     # serial ignores options, not typos
        noise_gradient(gmm, y, op, xi, loss, steps=STEPS, solver="serial", data_stdev=0.5)
