"""Sampling functions whose every random number comes from one generator per image.

An image's start noise, its DDPM or SDE step noise and (by default) its class are drawn from a
generator seeded with (global seed, image index), on the CPU. A sample therefore depends on its index only,
never on the batch it shares, the batch size or the process that draws it (up to the last bits
of float32 kernels, whose blocking can change with the batch size):

    sampler = Sampler("ddpm", num_steps=250)
    sample = sampler.sample_fn(model_fn, latent_shape, device)            # chosen once
    latents = sample(*batch_inputs(seed, indices, num_classes))           # (B, C, H, W), per batch
"""
import contextlib
import inspect

import torch
from tqdm.auto import tqdm

from diffusion import create_diffusion
from runtime.seeding import item_generator

from .images import decode_to_uint8
from .solvers import SOLVERS, check_solver_steps, edt_scheduler, scheduler_method

SAMPLERS = ("ddpm", "ddim", *SOLVERS)
PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


#################################################################################
#                            Per-image randomness                               #
#################################################################################

def image_generators(seed, indices):
    """One CPU generator per image, seeded with (seed, index)."""
    return [item_generator(seed, index) for index in indices]


def draw_noise(generators, shape, device, dtype=torch.float32):
    """(B, *shape) standard normal noise, row b drawn from generators[b]."""
    noise = torch.stack([torch.randn(shape, generator=generator) for generator in generators])
    return noise.to(device=device, dtype=dtype)


def random_labels(generators, num_classes):
    """(B,) classes drawn uniformly, each from its image's generator (its first draw)."""
    return torch.cat([torch.randint(num_classes, (1,), generator=generator) for generator in generators])


def batch_inputs(seed, indices, num_classes, labels=None):
    """(generators, labels (B,)) of the images `indices`. An image's class is the first draw of
    its generator, its noise the following ones, unless `labels` (over all image indices)
    fixes the classes."""
    generators = image_generators(seed, indices)
    if labels is None:
        return generators, random_labels(generators, num_classes)
    return generators, labels[list(indices)]


def all_labels(seed, num_images, num_classes, labels=None):
    """(num_images,) the classes `batch_inputs` gives images 0 .. num_images - 1."""
    return batch_inputs(seed, range(num_images), num_classes, labels)[1]


def balanced_labels(seed, num_images, num_classes):
    """(num_images,) with every class exactly num_images / num_classes times, shuffled by seed."""
    if num_images % num_classes:
        raise ValueError(f"class-balanced sampling needs a number of images divisible by "
                         f"{num_classes} classes, got {num_images}")
    labels = torch.arange(num_images) % num_classes
    return labels[torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))]


#################################################################################
#                           Classifier-free guidance                            #
#################################################################################

def guided_model_fn(model, cfg_scale=1.0, cfg_channels=3, precision="no"):
    """model_fn(x, t, y) -> (B, C_out, H, W) for the diffusion loops.

    cfg_scale 1 is the plain forward. Otherwise the batch is run as [x, x] with labels
    [y, null] through `forward_with_cfg` (MDTv2's with its guidance schedule), guiding the first
    `cfg_channels` output channels (None: all); only the guided first half is returned, so each
    image keeps one state and one noise stream in the loop.
    """
    autocast_dtype = PRECISIONS[precision]
    null_class = model.y_embedder.num_classes

    def autocast(x):
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=autocast_dtype)

    if cfg_scale == 1.0:
        def model_fn(x, t, y):
            with autocast(x):
                out = model(x, t, y)
            return out.to(x.dtype)
        return model_fn

    def model_fn(x, t, y):
        batch = len(x)
        x_in = torch.cat([x, x])  # (2B, C, H, W)
        y_in = torch.cat([y, torch.full_like(y, null_class)])
        with autocast(x):
            out = model.forward_with_cfg(x_in, torch.cat([t, t]), y_in, cfg_scale, cfg_channels=cfg_channels)
        return out[:batch].to(x.dtype)  # (B, C_out, H, W), guided
    return model_fn


#################################################################################
#                                  Sampler                                      #
#################################################################################

class Sampler:
    """A DDPM or DDIM (eta = 0) sampler over `num_steps` respaced steps of the 1000-step
    diffusion, or `num_steps` steps of one of diffusers' solvers (sampling/solvers.py), run by
    `scheduler` if given (one of `edt_scheduler`'s); `sample_fn` hands back the sampling function.
    ValueError for an unknown method or a step count it cannot take."""

    def __init__(self, method="ddpm", num_steps=250, scheduler=None):
        if method not in SAMPLERS:
            raise ValueError(f"unknown sampler {method!r}; choose from {', '.join(SAMPLERS)}")
        self.method = method
        self.num_steps = num_steps
        if method in SOLVERS:
            check_solver_steps(method, num_steps)
            self.scheduler = scheduler or edt_scheduler(method)
        else:
            respacing = str(num_steps) if method == "ddpm" else f"ddim{num_steps}"
            self.diffusion = create_diffusion(respacing)

    @classmethod
    def for_scheduler(cls, scheduler, num_steps):
        """The sampler that a pipeline's scheduler stands for (`scheduler_method`)."""
        return cls(scheduler_method(scheduler), num_steps, scheduler)

    def sample_fn(self, model_fn, latent_shape, device, dtype=torch.float32):
        """Returns sample(generators, labels) -> (B, *latent_shape) latents."""
        builds = {"ddpm": self._ddpm_fn, "ddim": self._ddim_fn}
        build = builds.get(self.method, self._solver_fn)
        return build(model_fn, tuple(latent_shape), device, dtype)

    def _ddpm_fn(self, model_fn, latent_shape, device, dtype):
        diffusion = self.diffusion

        # The diffusion's own p_sample draws its step noise from the global RNG, which would
        # tie each image to its batch; this loop takes the mean and variance from the diffusion
        # and the noise from each image's generator.
        @torch.no_grad()
        def sample(generators, labels):
            x = draw_noise(generators, latent_shape, device, dtype)  # x_T
            labels = labels.to(device)
            for step in reversed(range(diffusion.num_timesteps)):
                t = torch.full((len(x),), step, device=device, dtype=torch.long)
                out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=False,
                                                model_kwargs={"y": labels})
                x = out["mean"]
                if step > 0:  # the last step returns the mean
                    noise = draw_noise(generators, latent_shape, device, dtype)
                    x = x + torch.exp(0.5 * out["log_variance"]) * noise
            return x
        return sample

    def _ddim_fn(self, model_fn, latent_shape, device, dtype):
        diffusion = self.diffusion

        @torch.no_grad()
        def sample(generators, labels):
            z = draw_noise(generators, latent_shape, device, dtype)  # x_T; eta = 0 adds no more
            return diffusion.ddim_sample_loop(model_fn, z.shape, noise=z, clip_denoised=False,
                                              model_kwargs={"y": labels.to(device)}, device=device)
        return sample

    def _solver_fn(self, model_fn, latent_shape, device, dtype):
        scheduler, num_steps = self.scheduler, self.num_steps
        channels = latent_shape[0]
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters

        @torch.no_grad()
        def sample(generators, labels):
            run = type(scheduler).from_config(scheduler.config)  # a fresh one: schedulers keep their run's state
            run.set_timesteps(num_steps, device=device)
            x = draw_noise(generators, latent_shape, device, dtype) * run.init_noise_sigma  # x_T
            labels = labels.to(device)
            # Given one generator per image, diffusers draws each image's step noise from its own.
            step_kwargs = {"generator": list(generators)} if takes_generator else {}
            for t in run.timesteps:
                out = model_fn(run.scale_model_input(x, t), t.expand(len(x)), labels)  # (B, C_out, H, W)
                x = run.step(out[:, :channels], t, x, **step_kwargs).prev_sample  # epsilon only
            return x
        return sample


#################################################################################
#                              Sampling in batches                              #
#################################################################################

def sample_images(sample, vae, seed, indices, batch_size, num_classes, labels=None, progress=False,
                  fill_batches=False):
    """Yields (batch indices, uint8 images (B, H, W, 3)) for `indices`, batch by batch.

    With `fill_batches`, a short last batch is filled up to `batch_size` with copies of its last
    image, dropped after decoding, so that every model and VAE call has the same number of rows on
    any number of processes: float32 kernels may round differently for another one (EDT-S/2 does)."""
    batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    for batch in tqdm(batches, disable=not progress, desc="sampling"):
        rows = [*batch, *[batch[-1]] * (batch_size - len(batch))] if fill_batches else batch
        generators, batch_labels = batch_inputs(seed, rows, num_classes, labels)
        yield batch, decode_to_uint8(vae, sample(generators, batch_labels))[:len(batch)]
