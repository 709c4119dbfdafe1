"""How a VAE's latents z become the model's latents x, and back: a LatentNorm is the VAE config's
`scaling_factor` and `shift_factor` (0.18215 and none for sd-vae-ft-*, as released), or the
per-channel mean and standard deviation measured over the extracted latents (--latent-norm
channel). It is recorded in the features manifest and in every checkpoint as `record()`."""
from dataclasses import dataclass
from typing import Optional

import torch

LATENT_NORMS = ("vae", "channel")  # --latent-norm: the VAE config's factors, or measured per channel


@dataclass(frozen=True)
class LatentNorm:
    """x = normalise(z). kind "vae": (z - shift_factor) * scaling_factor, the VAE config's
    factors; kind "channel": (z - mean[c]) / std[c] with statistics measured over the data."""
    kind: str
    scaling_factor: Optional[float] = None
    shift_factor: Optional[float] = None
    mean: Optional[tuple] = None  # (C,)
    std: Optional[tuple] = None  # (C,)

    @classmethod
    def of_vae_config(cls, config):
        return cls("vae", scaling_factor=float(config.scaling_factor),
                   shift_factor=None if getattr(config, "shift_factor", None) is None else float(config.shift_factor))

    @classmethod
    def of_channels(cls, mean, std):
        if min(std) <= 0:
            raise ValueError(f"a latent channel is constant (std {list(std)}): it cannot be normalised")
        return cls("channel", mean=tuple(map(float, mean)), std=tuple(map(float, std)))

    @classmethod
    def from_record(cls, record):
        """The inverse of record(); None (pixels) stays None."""
        if record is None:
            return None
        if record["kind"] == "channel":
            return cls.of_channels(record["mean"], record["std"])
        return cls("vae", scaling_factor=record["scaling_factor"], shift_factor=record.get("shift_factor"))

    def record(self):
        if self.kind == "channel":
            return {"kind": "channel", "mean": list(self.mean), "std": list(self.std)}
        return {"kind": "vae", "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    def _channel_stats(self, x):
        shape = (-1, 1, 1)  # broadcast over (N, C, h, w)
        return (torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape),
                torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape))

    def normalise(self, z):
        """VAE latents (N, C, h, w) -> the model's."""
        if self.kind == "channel":
            mean, std = self._channel_stats(z)
            return (z - mean) / std
        shifted = z if self.shift_factor is None else z - self.shift_factor
        return shifted * self.scaling_factor

    def denormalise(self, x):
        """The model's latents (N, C, h, w) -> VAE latents; the released z / 0.18215 for SD VAEs."""
        if self.kind == "channel":
            mean, std = self._channel_stats(x)
            return x * std + mean
        z = x / self.scaling_factor
        return z if self.shift_factor is None else z + self.shift_factor

    def describe(self):
        if self.kind == "channel":
            return f"per-channel mean {rounded(self.mean)} and std {rounded(self.std)}"
        shift = "" if self.shift_factor is None else f", shift_factor {self.shift_factor:g}"
        return f"scaling_factor {self.scaling_factor:g}{shift}"


def rounded(values, digits=4):
    return [round(value, digits) for value in values]
