"""Gaussian diffusion (DDPM): forward noising, the learned reverse process, the hybrid MSE + VB
loss of improved DDPM with EDT's Min-SNR weighting of the MSE term, and DDPM / DDIM sampling.

Timesteps t index this diffusion's own schedule; the model is called with
`self.model_timesteps(t)`, which a respaced diffusion maps back to the original indices.
"""
import enum
import math
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl


#################################################################################
#                               Noise Schedules                                 #
#################################################################################

LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
REFERENCE_NUM_STEPS = 1000  # the linear endpoints are given for 1000 steps and scale with 1000/T
COSINE_OFFSET = 0.008  # improved DDPM's s: keeps beta_0 from vanishing
COSINE_MAX_BETA = 0.999  # caps the betas near t = T, where alpha_bar -> 0


def get_named_beta_schedule(name, num_diffusion_timesteps):
    """Betas (T,) float64 of a named schedule: "linear" (DDPM) or "squaredcos_cap_v2" (cosine)."""
    if name == "linear":
        scale = REFERENCE_NUM_STEPS / num_diffusion_timesteps
        return np.linspace(
            scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_diffusion_timesteps,
            dtype=np.float64,
        )
    if name == "squaredcos_cap_v2":
        steps = np.arange(num_diffusion_timesteps + 1, dtype=np.float64) / num_diffusion_timesteps
        alpha_bar = np.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], COSINE_MAX_BETA)
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'squaredcos_cap_v2'")


#################################################################################
#                        What the Model Predicts and Learns                     #
#################################################################################

class ModelMeanType(enum.Enum):
    EPSILON = enum.auto()  # the noise added to x_0
    START_X = enum.auto()  # x_0 itself


class ModelVarType(enum.Enum):
    LEARNED_RANGE = enum.auto()  # extra channels v in [-1, 1] between log beta_t and log beta~_t
    FIXED_SMALL = enum.auto()  # the posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (beta~_1 at t = 0, whose beta~_0 is zero)


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE (+ VB when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, with VB scaled by T / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the variational bound times T

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def min_snr_mse_weights(alphas_cumprod, gamma, model_mean_type):
    """Per-timestep MSE weights (T,) of Min-SNR-gamma; ones when gamma is None.

    The x_0 loss weighted by min(SNR, gamma) equals the epsilon loss weighted by
    min(SNR, gamma) / SNR, since ||x_0 - x_0_hat||^2 = ||eps - eps_hat||^2 / SNR.
    """
    if gamma is None:
        return np.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = np.minimum(snr, gamma)
    return clipped / snr if model_mean_type == ModelMeanType.EPSILON else clipped


#################################################################################
#                              Gaussian Diffusion                               #
#################################################################################

class GaussianDiffusion:
    """A diffusion over `len(betas)` steps. Schedule arrays are float64 numpy (T,), as in DiT."""

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, min_snr_gamma=None,
                 exact_decoder_nll=False):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.min_snr_gamma = min_snr_gamma
        self.exact_decoder_nll = exact_decoder_nll

        self.betas = np.asarray(betas, dtype=np.float64)
        if self.betas.ndim != 1 or not ((self.betas > 0) & (self.betas <= 1)).all():
            raise ValueError("betas must be a 1-D array of values in (0, 1]")
        if len(self.betas) < 2:
            raise ValueError("a diffusion needs at least 2 steps")
        self.num_timesteps = len(self.betas)
        self._device_tables = {}

        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = (
            self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # beta~_0 = 0 has no logarithm; t = 0 borrows beta~_1.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = np.log(self.betas)
        self.large_variance = np.append(self.posterior_variance[1], self.betas[1:])
        self.large_log_variance = np.log(self.large_variance)
        self.mse_loss_weights = min_snr_mse_weights(
            self.alphas_cumprod, min_snr_gamma, model_mean_type
        )

    # ---------------------------------------------------------------- tables --

    def _table(self, name, device, dtype):
        """Schedule array `name` as a tensor on `device`, built once per (device, dtype)."""
        key = (name, torch.device(device), dtype)
        if key not in self._device_tables:
            values = torch.as_tensor(np.asarray(getattr(self, name)), dtype=dtype)
            self._device_tables[key] = values.to(device)
        return self._device_tables[key]

    def _extract(self, name, t, x):
        """Schedule array `name` at timesteps t (B,), shaped (B, 1, ..., 1) to broadcast on x.

        Computed in float32, or float64 when x is float64.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        values = self._table(name, t.device, dtype)[t]  # (B,)
        return values.view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t):
        """Timestep indices the model is called with; a respaced diffusion maps them."""
        return t

    # ------------------------------------------------------- forward process --

    def q_sample(self, x_start, t, noise=None):
        """Draws x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------- reverse process --

    def _split_model_output(self, model_output, x):
        """(B, 2C, ...) -> prediction and variance values (B, C, ...) each, for a learned
        variance; otherwise (prediction, None)."""
        if self.model_var_type != ModelVarType.LEARNED_RANGE:
            return model_output, None
        channels = x.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"a learned variance needs {2 * channels} output channels, "
                f"got {model_output.shape[1]}"
            )
        return model_output.split(channels, dim=1)

    def _variance(self, var_values, x, t):
        """Variance and log-variance of p(x_{t-1} | x_t), each (B, C, ...)."""
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_variance), log_variance
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            names = ("large_variance", "large_log_variance")
        else:
            names = ("posterior_variance", "posterior_log_variance_clipped")
        return tuple(self._extract(name, t, x).expand_as(x) for name in names)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised):
        prediction, var_values = self._split_model_output(model_output, x)
        variance, log_variance = self._variance(var_values, x, t)
        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = self._predict_xstart_from_eps(x, t, prediction)
        else:
            pred_xstart = prediction
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None):
        """Runs the model on x_t and returns p(x_{t-1} | x_t): a dict of `mean`, `variance`,
        `log_variance` and `pred_xstart`, each shaped like x (B, C, ...)."""
        model_output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self._p_mean_variance_from_output(model_output, x, t, clip_denoised)

    # -------------------------------------------------------------- training --

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        """Variational-bound term per sample (B,) in bits per dimension: the decoder NLL at
        t = 0, KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) otherwise."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"], exact=self.exact_decoder_nll
        )
        return torch.where(t == 0, mean_flat(decoder_nll), mean_flat(kl)) / math.log(2.0)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Loss terms for x_start (B, C, ...) at timesteps t (B,): a dict of `loss`, `mse` and
        `vb`, each (B,), with loss = mse + vb."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))

        if self.loss_type.is_vb():
            vb = self._vb_terms_bpd(model_output, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_KL:
                vb = vb * self.num_timesteps
            mse = torch.zeros_like(vb)
            return {"loss": vb, "mse": mse, "vb": vb}

        prediction, var_values = self._split_model_output(model_output, x_t)
        if var_values is None:
            vb = torch.zeros(x_start.shape[0], device=x_start.device, dtype=prediction.dtype)
        else:
            # The VB term trains only the variance: the mean is learned by the MSE alone.
            frozen_output = torch.cat([prediction.detach(), var_values], dim=1)  # (B, 2C, ...)
            vb = self._vb_terms_bpd(frozen_output, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                vb = vb * (self.num_timesteps / REFERENCE_NUM_STEPS)

        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x_start
        dtype = torch.promote_types(prediction.dtype, torch.float32)
        weights = self._table("mse_loss_weights", t.device, dtype)[t]  # (B,)
        mse = weights * mean_flat((target - prediction) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -------------------------------------------------------------- sampling --

    def p_sample(self, model, x, t, clip_denoised=True, model_kwargs=None):
        """One DDPM step x_t -> x_{t-1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        std = torch.exp(0.5 * out["log_variance"])
        sample = out["mean"] + self._nonzero_mask(t, x) * std * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, eta=0.0):
        """One DDIM step x_t -> x_{t-1}; eta = 0 is deterministic, eta = 1 matches DDPM's
        posterior variance."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        )
        sample = mean + self._nonzero_mask(t, x) * sigma * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @staticmethod
    def _nonzero_mask(t, x):
        return (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)

    def _reverse_loop(self, step, shape, noise, device, progress):
        """Yields step(x_t, t) for t = T-1 .. 0, starting from `noise` or a fresh N(0, I)."""
        x = noise if noise is not None else torch.randn(*shape, device=device)
        if device is not None:
            x = x.to(device)
        timesteps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            timesteps = tqdm(timesteps)
        for i in timesteps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = step(x, t)
            yield out
            x = out["sample"]

    def p_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, device=None,
        progress=False,
    ):
        """Yields each DDPM step's {"sample", "pred_xstart"}."""
        step = partial(
            self.p_sample, model, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        yield from self._reverse_loop(step, shape, noise, device, progress)

    def p_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, device=None,
        progress=False,
    ):
        """DDPM samples of `shape`; `noise` (if given) is x_T."""
        for out in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, model_kwargs, device, progress
        ):
            final = out
        return final["sample"]

    def ddim_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, device=None,
        progress=False, eta=0.0,
    ):
        """Yields each DDIM step's {"sample", "pred_xstart"}."""
        step = partial(
            self.ddim_sample, model, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
            eta=eta,
        )
        yield from self._reverse_loop(step, shape, noise, device, progress)

    def ddim_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, device=None,
        progress=False, eta=0.0,
    ):
        """DDIM samples of `shape`; deterministic given `noise` when eta = 0."""
        for out in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, model_kwargs, device, progress, eta
        ):
            final = out
        return final["sample"]
