"""DiT's Gaussian diffusion with EDT's Min-SNR weighting, behind DiT's `create_diffusion`."""
from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .timestep_sampler import (
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)

__all__ = [
    "create_diffusion",
    "create_named_schedule_sampler",
    "LossSecondMomentResampler",
    "ScheduleSampler",
    "SpacedDiffusion",
    "UniformSampler",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
    min_snr_gamma=5.0,
    exact_decoder_nll=False,
):
    """A SpacedDiffusion as DiT builds it; `timestep_respacing` "" or None keeps every step.

    min_snr_gamma: Min-SNR-gamma weighting of the MSE term (EDT uses 5); None gives DiT's
    unweighted loss.
    exact_decoder_nll: the decoder NLL at t = 0 with the exact normal CDF instead of the tanh
    approximation that DiT and the EDT release (whose checkpoints were trained with it) use.
    """
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=gd.get_named_beta_schedule(noise_schedule, diffusion_steps),
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
        min_snr_gamma=min_snr_gamma,
        exact_decoder_nll=exact_decoder_nll,
    )
