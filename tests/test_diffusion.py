"""The diffusion package against the mathematics: closed-form schedules, posteriors, KL and
decoder likelihoods computed here from their definitions, Min-SNR weights by hand, and samplers
run on a Gaussian data distribution whose exact noise predictor is known."""
import math
import os
import types
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import special

from diffusion import (
    LossSecondMomentResampler,
    UniformSampler,
    create_diffusion,
    create_named_schedule_sampler,
)
from diffusion.gaussian_diffusion import get_named_beta_schedule
from diffusion.losses import discretized_gaussian_log_likelihood

T = 1000
GAUSSIAN_MEAN, GAUSSIAN_STD = 0.5, 0.5
NUM_DRAWS = 20000


# Small tensors: on shared cores, intra-op threads only wait for each other.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_alphas_cumprod(num_steps=T):
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) for DDPM's linear betas, from the definition."""
    scale = 1000 / num_steps
    betas = np.linspace(1e-4 * scale, 0.02 * scale, num_steps)
    return np.cumprod(1 - betas), betas


#################################################################################
#                                  Schedules                                    #
#################################################################################

@pytest.mark.parametrize("num_steps", [1000, 100])
def test_linear_schedule_endpoints_and_monotonicity(num_steps):
    betas = get_named_beta_schedule("linear", num_steps)
    scale = 1000 / num_steps
    assert betas[0] == pytest.approx(1e-4 * scale) and betas[-1] == pytest.approx(0.02 * scale)
    assert (np.diff(betas) > 0).all()
    diffusion = create_diffusion("", diffusion_steps=num_steps)
    alphas_cumprod = diffusion.alphas_cumprod
    assert (np.diff(alphas_cumprod) < 0).all() and 0 < alphas_cumprod[-1] < alphas_cumprod[0] < 1
    np.testing.assert_allclose(alphas_cumprod, linear_alphas_cumprod(num_steps)[0], rtol=1e-12)


def test_cosine_schedule_follows_its_alpha_bar():
    betas = get_named_beta_schedule("squaredcos_cap_v2", T)
    f = lambda u: np.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    steps = np.arange(T - 1)  # the last beta is capped at 0.999
    np.testing.assert_allclose(np.cumprod(1 - betas)[steps], f(steps + 1) / f(0), rtol=1e-9)
    assert betas.max() <= 0.999
    with pytest.raises(ValueError, match="linear"):
        get_named_beta_schedule("quadratic", T)


@pytest.mark.parametrize("respacing, num_kept", [("250", 250), ("ddim50", 50), ("10,15,20", 45)])
def test_respacing_keeps_alpha_bar_at_kept_steps(respacing, num_kept):
    spaced = create_diffusion(respacing)
    kept = np.array(spaced.timestep_map)
    assert spaced.num_timesteps == len(kept) == num_kept and (np.diff(kept) > 0).all()
    np.testing.assert_allclose(spaced.alphas_cumprod, linear_alphas_cumprod()[0][kept], rtol=1e-12)
    if respacing == "ddim50":
        assert kept.tolist() == list(range(0, T, 20))
    if respacing == "250":
        assert kept[0] == 0 and kept[-1] == T - 1
    if respacing == "10,15,20":  # sections of 334, 333, 333 steps
        counts = [((kept >= lo) & (kept < hi)).sum() for lo, hi in [(0, 334), (334, 667), (667, T)]]
        assert counts == [10, 15, 20]


@pytest.mark.parametrize("respacing", ["ddim999", "1001", "10,400,10"])
def test_impossible_respacing_is_rejected(respacing):
    with pytest.raises(ValueError):
        create_diffusion(respacing)


#################################################################################
#                         Forward Process and Posterior                         #
#################################################################################

def test_q_sample_moments():
    diffusion = create_diffusion("")
    alphas_cumprod = linear_alphas_cumprod()[0]
    x_start = torch.tensor([-0.8, 0.1, 0.9], dtype=torch.float64).repeat(NUM_DRAWS, 1)  # (N, 3)
    generator = torch.Generator().manual_seed(0)
    for step in (0, 300, 999):
        t = torch.full((NUM_DRAWS,), step)
        noise = torch.randn(x_start.shape, generator=generator, dtype=torch.float64)
        x_t = diffusion.q_sample(x_start, t, noise=noise)
        ab = alphas_cumprod[step]
        stderr = math.sqrt((1 - ab) / NUM_DRAWS)
        np.testing.assert_allclose(x_t.mean(0), math.sqrt(ab) * x_start[0], atol=4 * stderr)
        np.testing.assert_allclose(x_t.var(0), np.full(3, 1 - ab), rtol=0.05)


def test_posterior_equals_bayes_rule():
    """q(x_{t-1} | x_t, x_0) is proportional to N(x_t; sqrt(a_t) x_{t-1}, b_t) times
    N(x_{t-1}; sqrt(ab_{t-1}) x_0, 1 - ab_{t-1}): precisions add, means are precision-weighted."""
    diffusion = create_diffusion("")
    alphas_cumprod, betas = linear_alphas_cumprod()
    generator = torch.Generator().manual_seed(1)
    steps = torch.tensor([1, 2, 10, 500, 999])
    x_start = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    x_t = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, steps)
    beta, ab_prev = betas[steps][:, None], alphas_cumprod[steps - 1][:, None]
    bayes_variance = 1 / ((1 - beta) / beta + 1 / (1 - ab_prev))
    bayes_mean = bayes_variance * (
        np.sqrt(1 - beta) * x_t.numpy() / beta + np.sqrt(ab_prev) * x_start.numpy() / (1 - ab_prev)
    )
    np.testing.assert_allclose(mean, bayes_mean, rtol=1e-9)
    np.testing.assert_allclose(variance, np.broadcast_to(bayes_variance, (5, 3)), rtol=1e-9)
    np.testing.assert_allclose(log_variance, np.log(variance.numpy()), rtol=1e-9)
    # At t = 0 the posterior is a point mass at x_0.
    mean0, variance0, _ = diffusion.q_posterior_mean_variance(x_start, x_t, torch.zeros(5).long())
    np.testing.assert_allclose(mean0, x_start, atol=1e-12)
    assert (variance0 == 0).all()


#################################################################################
#                              Variational Bound                                #
#################################################################################

def test_exact_decoder_likelihood_matches_normal_cdf():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # every bin centre
    for mean, log_scale in [(0.3, math.log(0.2)), (-0.95, math.log(0.01))]:
        log_probs = discretized_gaussian_log_likelihood(
            bins, means=torch.tensor(mean, dtype=torch.float64),
            log_scales=torch.tensor(log_scale, dtype=torch.float64), exact=True,
        )
        assert torch.exp(log_probs).sum().item() == pytest.approx(1.0, abs=1e-9)
    # Deep in the upper tail, where a difference of CDFs would round to zero.
    x, mean, scale = 0.5, -0.5, 0.1
    lower, upper = (x - 1 / 255 - mean) / scale, (x + 1 / 255 - mean) / scale
    log_sf_lower, log_sf_upper = special.log_ndtr(-lower), special.log_ndtr(-upper)
    expected = log_sf_lower + math.log1p(-math.exp(log_sf_upper - log_sf_lower))
    log_prob = discretized_gaussian_log_likelihood(
        torch.tensor(x, dtype=torch.float64), means=torch.tensor(mean, dtype=torch.float64),
        log_scales=torch.tensor(math.log(scale), dtype=torch.float64), exact=True,
    )
    assert log_prob.item() == pytest.approx(expected, rel=1e-9)


def test_default_decoder_likelihood_is_the_released_tanh_approximation():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, scale in [(0.3, 0.2), (-0.95, 0.01), (0.5, 0.004)]:
        means = torch.tensor(mean, dtype=torch.float64)
        log_scales = torch.tensor(math.log(scale), dtype=torch.float64)
        approx = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales)
        # 1 + tanh cancels in the far tails, where numpy's tanh and torch's differ in the last bit.
        np.testing.assert_allclose(approx, _log_discretized_tanh(bins.numpy(), mean, scale), rtol=1e-6)
        assert torch.exp(approx).sum().item() == pytest.approx(1.0, abs=1e-9)  # the bins telescope
        exact = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales, exact=True)
        # An approximation: the CDF is off by up to about 2e-4, a tenth of a nat in bins of P ~ 1e-3.
        likely = exact > math.log(1e-3)
        assert 0 < (approx - exact)[likely].abs().max() < 0.2
    # Far in a tail the approximation's probability is floored at 1e-12, as released.
    log_prob = discretized_gaussian_log_likelihood(
        torch.tensor(0.5, dtype=torch.float64), means=torch.tensor(-0.5, dtype=torch.float64),
        log_scales=torch.tensor(math.log(0.1), dtype=torch.float64))
    assert log_prob.item() == pytest.approx(math.log(1e-12), rel=1e-12)


def _log_discretized_normal(x, mean, std):
    """log P(bin of x) for x on the 256 bin centres of [-1, 1], via scipy's normal CDF."""
    upper, lower = (x + 1 / 255 - mean) / std, (x - 1 / 255 - mean) / std
    with np.errstate(divide="ignore"):  # edge bins' "inner" values are not used
        inner = np.log(special.ndtr(upper) - special.ndtr(lower))
    highest = np.where(x > 0.999, special.log_ndtr(-lower), inner)
    return np.where(x < -0.999, special.log_ndtr(upper), highest)


def _tanh_normal_cdf(z):
    """ADM's approximation of the normal CDF, from its definition."""
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def _log_discretized_tanh(x, mean, std):
    """_log_discretized_normal as ADM, DiT and the EDT release compute it: the tanh CDF, each
    bin's probability floored at 1e-12 before the logarithm."""
    cdf_upper = _tanh_normal_cdf((x + 1 / 255 - mean) / std)
    cdf_lower = _tanh_normal_cdf((x - 1 / 255 - mean) / std)
    floored_log = lambda p: np.log(np.maximum(p, 1e-12))  # noqa: E731
    highest = np.where(x > 0.999, floored_log(1 - cdf_lower), floored_log(cdf_upper - cdf_lower))
    return np.where(x < -0.999, floored_log(cdf_upper), highest)


@pytest.mark.parametrize("options, log_likelihood", [
    ({}, _log_discretized_tanh),  # the default: the released decoder likelihood
    ({"exact_decoder_nll": True}, _log_discretized_normal),
])
def test_vb_is_decoder_nll_at_zero_and_gaussian_kl_after(options, log_likelihood):
    diffusion = create_diffusion("", min_snr_gamma=None, **options)
    alphas_cumprod, betas = linear_alphas_cumprod()
    generator = torch.Generator().manual_seed(2)
    steps = np.array([0, 0, 1, 7, 500, 999])
    shape = (len(steps), 2, 2, 2)  # (B, C, H, W)
    x_start = -1 + 2 * torch.randint(0, 256, shape, generator=generator).double() / 255
    x_start[0, 0, 0, 0], x_start[1, 0, 0, 0] = -1.0, 1.0  # both open-ended bins
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    eps_out = torch.randn(shape, generator=generator, dtype=torch.float64)
    v_out = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    output = torch.cat([eps_out, v_out], dim=1).requires_grad_()  # (B, 2C, H, W)
    terms = diffusion.training_losses(
        lambda x, t: output, x_start, torch.from_numpy(steps), noise=noise
    )

    # DDPM's reverse mean, eq. 11, and the learned-range variance.
    x0, eps, z, v = (a.detach().numpy() for a in (x_start, eps_out, noise, v_out))
    view = (-1, 1, 1, 1)
    ab, beta = alphas_cumprod[steps].reshape(view), betas[steps].reshape(view)
    ab_prev = np.where(steps > 0, alphas_cumprod[np.maximum(steps - 1, 0)], 1.0).reshape(view)
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * z
    mean_p = (x_t - beta / np.sqrt(1 - ab) * eps) / np.sqrt(1 - beta)
    posterior_var_1 = betas[1] * (1 - alphas_cumprod[0]) / (1 - alphas_cumprod[1])
    posterior_var = np.where(ab_prev < 1, beta * (1 - ab_prev) / (1 - ab), posterior_var_1)
    frac = (v + 1) / 2
    var_p = np.exp(frac * np.log(beta) + (1 - frac) * np.log(posterior_var))

    with np.errstate(divide="ignore", invalid="ignore"):  # the t = 0 rows are not used here
        var_q = 1 / ((1 - beta) / beta + 1 / (1 - ab_prev))
        mean_q = var_q * (np.sqrt(1 - beta) * x_t / beta + np.sqrt(ab_prev) * x0 / (1 - ab_prev))
        kl = 0.5 * (np.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1)
    nll = -log_likelihood(x0, mean_p, np.sqrt(var_p))
    per_sample = lambda a: a.reshape(len(steps), -1).mean(1) / math.log(2)  # noqa: E731
    expected_vb = np.where(steps == 0, per_sample(nll), per_sample(kl))
    np.testing.assert_allclose(terms["vb"].detach(), expected_vb, rtol=1e-7)
    expected_mse = ((z - eps) ** 2).reshape(len(steps), -1).mean(1)  # the eps channels only
    np.testing.assert_allclose(terms["mse"].detach(), expected_mse, rtol=1e-12)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])

    # The mean is frozen for VB: VB trains only the variance channels.
    terms["vb"].sum().backward()
    assert (output.grad[:, :2] == 0).all() and (output.grad[:, 2:] != 0).any()


def test_rescaled_and_kl_losses():
    x_start = torch.rand(4, 2, 2, 2, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x_start)
    output = torch.randn(4, 4, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 3, 100, 249])
    vb = {}
    variants = {"plain": {}, "rescaled": {"rescale_learned_sigmas": True}, "kl": {"use_kl": True}}
    for name, kwargs in variants.items():
        diffusion = create_diffusion("250", **kwargs)
        vb[name] = diffusion.training_losses(lambda x, t: output, x_start, t, noise=noise)
    torch.testing.assert_close(vb["rescaled"]["vb"], vb["plain"]["vb"] * 250 / 1000)
    torch.testing.assert_close(vb["kl"]["loss"], vb["plain"]["vb"] * 250)
    assert (vb["kl"]["mse"] == 0).all()


#################################################################################
#                                   Min-SNR                                     #
#################################################################################

def test_min_snr_weights_by_hand():
    alphas_cumprod = linear_alphas_cumprod()[0]
    steps = [0, 100, 200, 500, 999]
    # SNR = ab / (1 - ab): about 9999, 8.5, 1.9, 0.084, 4e-5 at these steps.
    snr = np.array([alphas_cumprod[s] / (1 - alphas_cumprod[s]) for s in steps])
    assert snr[0] > 5 and snr[1] > 5 and snr[2] < 5
    eps_weights = np.array([5 / snr[0], 5 / snr[1], 1.0, 1.0, 1.0])
    x0_weights = np.array([5.0, 5.0, snr[2], snr[3], snr[4]])

    x_start = torch.rand(len(steps), 3, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x_start)
    zero_model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    t = torch.tensor(steps)
    cases = [
        ({}, noise, eps_weights),
        ({"predict_xstart": True}, x_start, x0_weights),
        ({"min_snr_gamma": None}, noise, np.ones(len(steps))),
    ]
    for kwargs, target, weights in cases:
        diffusion = create_diffusion("", learn_sigma=False, **kwargs)
        terms = diffusion.training_losses(zero_model, x_start, t, noise=noise)
        expected = weights * (target ** 2).mean(1).numpy()
        np.testing.assert_allclose(terms["mse"], expected, rtol=1e-10)
        assert (terms["vb"] == 0).all()

    # Respaced: index i weighs as the original step timestep_map[i].
    spaced = create_diffusion("ddim50", learn_sigma=False)
    t = torch.tensor([0, 5, 49])
    terms = spaced.training_losses(zero_model, x_start[:3], t, noise=noise[:3])
    original_snr = alphas_cumprod[[0, 100, 980]] / (1 - alphas_cumprod[[0, 100, 980]])
    weights = np.minimum(original_snr, 5) / original_snr
    np.testing.assert_allclose(terms["mse"], weights * (noise[:3] ** 2).mean(1).numpy(), rtol=1e-10)


#################################################################################
#                       Sampling a Gaussian Data Distribution                   #
#################################################################################

def exact_gaussian_eps(x_t, t):
    """E[eps | x_t] for x_0 ~ N(mu, s^2), with t an ORIGINAL timestep index."""
    ab = torch.from_numpy(linear_alphas_cumprod()[0])[t].view(-1, 1)
    mu, s2 = GAUSSIAN_MEAN, GAUSSIAN_STD ** 2
    return torch.sqrt(1 - ab) * (x_t - torch.sqrt(ab) * mu) / (ab * s2 + 1 - ab)


def _start_noise(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_DRAWS, 1, generator=generator, dtype=torch.float64)  # (N, 1)


@pytest.mark.parametrize("respacing", ["", "250"])
def test_ddpm_samples_the_gaussian(respacing):
    diffusion = create_diffusion(respacing, learn_sigma=False)
    torch.manual_seed(3)
    samples = diffusion.p_sample_loop(
        exact_gaussian_eps, (NUM_DRAWS, 1), noise=_start_noise(4), clip_denoised=False
    )
    assert samples.mean().item() == pytest.approx(GAUSSIAN_MEAN, rel=0.03)
    assert samples.std().item() == pytest.approx(GAUSSIAN_STD, rel=0.03)


def _ddim_exact_moments(kept_steps):
    """Mean and std after DDIM (eta 0, eq. 12 of the DDIM paper) from x_T ~ N(0, 1); with the
    exact predictor every step is affine, x_prev = a x + b, so the moments are exact."""
    alphas_cumprod = linear_alphas_cumprod()[0]
    mean, var = 0.0, 1.0
    mu, s2 = GAUSSIAN_MEAN, GAUSSIAN_STD ** 2
    for i in reversed(range(len(kept_steps))):
        ab = alphas_cumprod[kept_steps[i]]
        ab_prev = alphas_cumprod[kept_steps[i - 1]] if i > 0 else 1.0
        gain = math.sqrt(ab) * s2 / (ab * s2 + 1 - ab)  # E[x_0 | x] = mu + gain (x - sqrt(ab) mu)
        x0_a, x0_b = gain, mu * (1 - gain * math.sqrt(ab))
        eps_a = (1 - math.sqrt(ab) * x0_a) / math.sqrt(1 - ab)  # eps = (x - sqrt(ab) x_0) / ..
        eps_b = -math.sqrt(ab) * x0_b / math.sqrt(1 - ab)
        a = math.sqrt(ab_prev) * x0_a + math.sqrt(1 - ab_prev) * eps_a
        b = math.sqrt(ab_prev) * x0_b + math.sqrt(1 - ab_prev) * eps_b
        mean, var = a * mean + b, a * a * var
    return mean, math.sqrt(var)


def test_ddim_samples_the_gaussian_and_is_deterministic():
    diffusion = create_diffusion("ddim50", learn_sigma=False)
    noise = _start_noise(5)
    torch.manual_seed(6)
    sample = partial(
        diffusion.ddim_sample_loop, exact_gaussian_eps, noise.shape, noise=noise,
        clip_denoised=False, eta=0.0,
    )
    samples = sample()
    torch.manual_seed(7)
    again = sample()
    assert torch.equal(samples, again)
    # 50 deterministic steps shrink the spread a little (about 5 % here), a known DDIM
    # discretisation error; the samples must match the exact 50-step moments closely.
    exact_mean, exact_std = _ddim_exact_moments(list(range(0, T, 20)))
    assert samples.mean().item() == pytest.approx(exact_mean, rel=0.02)
    assert samples.std().item() == pytest.approx(exact_std, rel=0.02)
    assert samples.mean().item() == pytest.approx(GAUSSIAN_MEAN, rel=0.03)
    assert samples.std().item() == pytest.approx(GAUSSIAN_STD, rel=0.07)


def test_ddim_with_eta_one_is_ddpm_with_posterior_variance():
    """With eta = 1, sigma_t^2 is beta~_t and the DDIM mean is the posterior mean (DDIM paper,
    eq. 16): a DDIM step is a DDPM step with FIXED_SMALL variance, draw for draw."""
    ddim = create_diffusion("ddim10", learn_sigma=False)
    ddpm = create_diffusion("ddim10", learn_sigma=False, sigma_small=True)
    x = _start_noise(8)[:100]
    for step in (1, 5, 9):
        t = torch.full((100,), step)
        torch.manual_seed(step)
        ddim_sample = ddim.ddim_sample(exact_gaussian_eps, x, t, clip_denoised=False, eta=1.0)
        torch.manual_seed(step)
        ddpm_sample = ddpm.p_sample(exact_gaussian_eps, x, t, clip_denoised=False)
        torch.testing.assert_close(
            ddim_sample["sample"], ddpm_sample["sample"], rtol=1e-10, atol=1e-12
        )
        redrawn = ddim.ddim_sample(exact_gaussian_eps, x, t, clip_denoised=False, eta=1.0)
        assert not torch.equal(ddim_sample["sample"], redrawn["sample"])


#################################################################################
#                     Learned Variance, Timestep Map, Progress                  #
#################################################################################

def test_learned_range_splits_channels_like_dit():
    diffusion = create_diffusion("")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)  # (B, C, H, W)
    t = torch.tensor([0, 600])
    alphas_cumprod, betas = linear_alphas_cumprod()

    def posterior(s):  # beta~_s, s >= 1
        return betas[s] * (1 - alphas_cumprod[s - 1]) / (1 - alphas_cumprod[s])

    # v = -1: the posterior variance (beta~_1 at t = 0, where beta~_0 = 0); v = +1: beta_t.
    expected_variances = {-1.0: [posterior(1), posterior(600)], 1.0: [betas[0], betas[600]]}
    for v, expected in expected_variances.items():
        output = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)  # (B, 2C, H, W)
        out = diffusion.p_mean_variance(lambda x, t: output, x, t, clip_denoised=False)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            assert out[key].shape == x.shape
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0], np.log(expected), rtol=1e-12)
        # Zero predicted noise: x_0 = x_t / sqrt(ab).
        sqrt_ab = np.sqrt(alphas_cumprod[[0, 600]]).reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(out["pred_xstart"], x.numpy() / sqrt_ab, rtol=1e-12)
    with pytest.raises(ValueError, match="8 output channels"):
        diffusion.p_mean_variance(lambda x, t: x, x, t)
    sampled = create_diffusion("ddim5").p_sample_loop(
        lambda x, t: torch.cat([x, torch.zeros_like(x)], dim=1), (2, 4, 3, 3), clip_denoised=True
    )
    assert sampled.shape == (2, 4, 3, 3) and sampled.abs().max() <= 1


def test_fixed_variances():
    """FIXED_LARGE uses beta_t (beta~_1 at t = 0); FIXED_SMALL the posterior beta~_t, whose
    logarithm borrows beta~_1 at t = 0, where beta~_0 = 0."""
    alphas_cumprod, betas = linear_alphas_cumprod()
    steps = np.array([0, 1, 50, 999])
    posterior = betas[1:] * (1 - alphas_cumprod[:-1]) / (1 - alphas_cumprod[1:])  # t >= 1
    clipped = posterior[np.maximum(steps, 1) - 1]
    expected = {  # sigma_small: (variance, log-variance)
        False: (np.where(steps == 0, posterior[0], betas[steps]),) * 2,
        True: (np.where(steps == 0, 0.0, clipped), clipped),
    }
    x = torch.randn(len(steps), 2, dtype=torch.float64)
    for sigma_small, (variance, log_variance_of) in expected.items():
        diffusion = create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
        out = diffusion.p_mean_variance(lambda x, t: x, x, torch.from_numpy(steps))
        np.testing.assert_allclose(out["variance"][:, 0], variance, rtol=1e-12)
        np.testing.assert_allclose(out["log_variance"][:, 1], np.log(log_variance_of), rtol=1e-12)


def test_ddpm_adds_no_noise_at_t0():
    diffusion = create_diffusion("")
    x = torch.randn(3, 2, 4, 4)
    model = lambda x, t: torch.cat([x, torch.zeros_like(x)], dim=1)  # noqa: E731
    t0, t1 = torch.zeros(3).long(), torch.ones(3).long()
    torch.testing.assert_close(
        diffusion.p_sample(model, x, t0)["sample"], diffusion.p_mean_variance(model, x, t0)["mean"]
    )
    first, second = (diffusion.p_sample(model, x, t1)["sample"] for _ in range(2))
    assert not torch.equal(first, second)


def test_model_sees_original_timesteps(capsys):
    diffusion = create_diffusion("10", learn_sigma=False)
    seen = []

    def model(x, t, y):
        assert y == "label"  # model_kwargs are passed through
        seen.append(t.tolist())
        return torch.zeros_like(x)

    diffusion.p_sample_loop(model, (3, 1), model_kwargs={"y": "label"}, progress=True)
    assert [steps[0] for steps in seen] == diffusion.timestep_map[::-1]
    assert all(len(set(steps)) == 1 for steps in seen)
    assert "10/10" in capsys.readouterr().err  # tqdm progress bar
    seen.clear()
    t = torch.tensor([0, 4, 9])
    diffusion.training_losses(model, torch.zeros(3, 1), t, model_kwargs={"y": "label"})
    assert seen == [[diffusion.timestep_map[i] for i in (0, 4, 9)]]
    progressive = list(
        diffusion.ddim_sample_loop_progressive(model, (3, 1), model_kwargs={"y": "label"})
    )
    assert len(progressive) == 10 and set(progressive[0]) == {"sample", "pred_xstart"}


#################################################################################
#                              Timestep Samplers                                #
#################################################################################

def _reference_update(history, counts, ts, losses, history_per_term=10):
    """improved-diffusion's semantics, one loss at a time: append until full, then shift."""
    for t, loss in zip(ts.tolist(), losses.tolist()):
        if counts[t] == history_per_term:
            history[t, :-1] = history[t, 1:].copy()
            history[t, -1] = loss
        else:
            history[t, counts[t]] = loss
            counts[t] += 1


def _chronological(state, history_per_term=10):
    """The sampler's ring buffers in arrival order, and its counts capped at the history size."""
    history, counts = state["loss_history"].numpy().copy(), state["loss_counts"].numpy()
    for t in range(len(counts)):
        if counts[t] >= history_per_term:
            history[t] = np.roll(history[t], -(counts[t] % history_per_term))
    return history, np.minimum(counts, history_per_term)


def test_uniform_sampler():
    sampler = create_named_schedule_sampler("uniform", create_diffusion("250"))
    assert isinstance(sampler, UniformSampler)
    t, weights = sampler.sample(1000, "cpu")
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 250 and (weights == 1).all()
    assert sampler.state_dict() == {}


def test_loss_second_moment_update_matches_one_at_a_time():
    num_steps = 6
    diffusion = types.SimpleNamespace(num_timesteps=num_steps)  # all a sampler needs
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    history, counts = np.zeros((num_steps, 10)), np.zeros(num_steps, dtype=int)
    generator = torch.Generator().manual_seed(9)
    # Batch sizes include one where a timestep repeats more than 10 times.
    for batch_size in (5, 40, 3, 64, 1, 17):
        ts = torch.randint(0, num_steps, (batch_size,), generator=generator)
        losses = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        sampler.update_with_local_losses(ts, losses)
        _reference_update(history, counts, ts, losses)
        got_history, got_counts = _chronological(sampler.state_dict())
        np.testing.assert_array_equal(got_counts, counts)
        np.testing.assert_array_equal(got_history, history)


def test_loss_second_moment_probabilities_and_state():
    num_steps = 4
    diffusion = types.SimpleNamespace(num_timesteps=num_steps)
    sampler = LossSecondMomentResampler(diffusion)
    # Warm-up: uniform until every timestep has 10 losses.
    sampler.update_with_local_losses(torch.tensor([0, 1, 2] * 10 + [3] * 9), torch.ones(39))
    assert (sampler.sample(50, "cpu")[1] == 1).all()
    sampler.update_with_local_losses(torch.tensor([3] * 10), torch.full((10,), 3.0))
    sampler.update_with_local_losses(torch.tensor([0] * 5), torch.full((5,), 2.0))
    # History rms: t0 sqrt((5 * 1 + 5 * 4) / 10), t1 = t2 = 1, t3 = 3.
    rms = np.array([math.sqrt(2.5), 1.0, 1.0, 3.0])
    probs = rms / rms.sum() * (1 - 0.001) + 0.001 / num_steps
    t, weights = sampler.sample(200, "cpu", generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(weights, 1 / (num_steps * probs[t.numpy()]), rtol=1e-6)
    t_again, _ = sampler.sample(200, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t_again)
    t_many, _ = sampler.sample(20000, "cpu", generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(np.bincount(t_many.numpy(), minlength=4) / 20000, probs, atol=0.015)

    resumed = LossSecondMomentResampler(diffusion)
    resumed.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(resumed.weights(), sampler.weights())
    for s in (sampler, resumed):
        s.update_with_local_losses(torch.tensor([1, 1, 2]), torch.tensor([5.0, 6.0, 7.0]))
    torch.testing.assert_close(resumed.state_dict(), sampler.state_dict())
    with pytest.raises(ValueError, match="shape"):
        other = LossSecondMomentResampler(types.SimpleNamespace(num_timesteps=5))
        other.load_state_dict(sampler.state_dict())


def test_unknown_sampler_names_the_choices():
    with pytest.raises(ValueError, match="uniform, loss-second-moment"):
        create_named_schedule_sampler("lossaware", create_diffusion("10"))


DISTRIBUTED_STEPS = 6
RANK_BATCH_SIZES = (7, 12)  # unequal on purpose


def _rank_batches(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(6):
        ts = torch.randint(0, DISTRIBUTED_STEPS, (RANK_BATCH_SIZES[rank],), generator=generator)
        yield ts, torch.rand(RANK_BATCH_SIZES[rank], generator=generator)


def _distributed_sampler_worker(rank, store_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        sampler = LossSecondMomentResampler(types.SimpleNamespace(num_timesteps=DISTRIBUTED_STEPS))
        for ts, losses in _rank_batches(rank):
            sampler.update_with_local_losses(ts, losses)
        torch.save(sampler.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_loss_second_moment_synchronises_ranks(tmp_path):
    mp.spawn(_distributed_sampler_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=0)
    single = LossSecondMomentResampler(types.SimpleNamespace(num_timesteps=DISTRIBUTED_STEPS))
    for (ts0, losses0), (ts1, losses1) in zip(_rank_batches(0), _rank_batches(1)):
        single.update_with_local_losses(torch.cat([ts0, ts1]), torch.cat([losses0, losses1]))
    torch.testing.assert_close(states[0], single.state_dict(), rtol=0, atol=0)
    assert (states[0]["loss_counts"] >= 10).all()  # the ring buffers wrapped
