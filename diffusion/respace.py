"""Timestep respacing: a diffusion that runs on a subset of an original diffusion's steps,
with betas chosen so that alpha_bar at every kept step is the original's."""
import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion

DDIM_PREFIX = "ddim"  # "ddimN": N steps with a constant integer stride, starting at 0


def _ddim_timesteps(num_timesteps, desired_count):
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired_count:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"cannot take exactly {desired_count} equally strided steps from {num_timesteps}"
    )


def _section_timesteps(start, size, count):
    """`count` steps spread evenly over [start, start + size), both ends included."""
    if count > size:
        raise ValueError(f"cannot take {count} steps from a section of {size}")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    return {start + round(i * stride) for i in range(count)}


def space_timesteps(num_timesteps, section_counts):
    """The original steps to keep, as a set.

    section_counts: "ddimN"; or comma-separated counts ("10,15,20") for equal sections of the
    original steps, each getting that many evenly spaced steps; or an int or a list of ints.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith(DDIM_PREFIX):
            return _ddim_timesteps(num_timesteps, int(section_counts[len(DDIM_PREFIX):]))
        section_counts = [int(count) for count in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    # Sections as equal as possible; the first (num_timesteps % n) are one step longer.
    base_size, extra = divmod(num_timesteps, len(section_counts))
    kept, start = set(), 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < extra else 0)
        kept |= _section_timesteps(start, size, count)
        start += size
    return kept


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion on the kept steps `use_timesteps` of the diffusion with `betas`.

    Timesteps index the kept steps; the model still sees the original indices
    (`timestep_map[t]`).
    """

    def __init__(self, use_timesteps, *, betas, **kwargs):
        original_alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        self.original_num_steps = len(original_alphas_cumprod)
        self.timestep_map = sorted(use_timesteps)
        kept_in_range = all(0 <= step < self.original_num_steps for step in self.timestep_map)
        if not self.timestep_map or not kept_in_range:
            raise ValueError(f"kept steps must lie in [0, {self.original_num_steps})")
        kept_alphas_cumprod = original_alphas_cumprod[self.timestep_map]
        previous = np.append(1.0, kept_alphas_cumprod[:-1])
        super().__init__(betas=1.0 - kept_alphas_cumprod / previous, **kwargs)

    def model_timesteps(self, t):
        return self._table("timestep_map", t.device, torch.long)[t]
