"""Timestep samplers for training: which t each sample gets, and the importance weight that
keeps the weighted loss an unbiased estimate of the uniform-t loss.

Timesteps are drawn on the CPU with `generator` when one is given (a CPU torch.Generator),
otherwise with the global torch RNG; seed it per rank so ranks draw different timesteps. They
reach the device without a host synchronisation (runtime/host_copies.py).
"""
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist

from runtime.host_copies import to_device_without_waiting

HISTORY_PER_TERM = 10  # losses remembered per timestep
UNIFORM_PROB = 0.001  # share of probability mass spread uniformly, so no timestep starves


#################################################################################
#                                Base Sampler                                   #
#################################################################################

class ScheduleSampler(ABC):
    """Draws t with probability p(t) proportional to `weights()`, with importance weights
    1 / (T p(t)), so that mean(weights * loss) estimates the loss averaged uniformly over t."""

    @abstractmethod
    def weights(self):
        """Unnormalised sampling weights (T,) float64."""

    def sample(self, batch_size, device, generator=None):
        """Timesteps (batch_size,) long and importance weights (batch_size,) float32."""
        weights = self.weights()
        probs = weights / weights.sum()  # (T,)
        timesteps = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        importance = 1.0 / (len(probs) * probs[timesteps])
        device = torch.device(device)
        return to_device_without_waiting(timesteps, device), to_device_without_waiting(importance.float(), device)

    def update_with_local_losses(self, local_ts, local_losses):
        """Feeds back this rank's losses; a no-op unless the sampler learns from losses."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        if state_dict:
            raise ValueError(f"{type(self).__name__} has no state; got {sorted(state_dict)}")


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self._weights = torch.ones(diffusion.num_timesteps, dtype=torch.float64)

    def weights(self):
        return self._weights


#################################################################################
#                         Loss-Second-Moment Resampler                          #
#################################################################################

def gather_from_all_ranks(ts, losses):
    """Every rank's (ts, losses), concatenated in rank order; the local ones without a
    process group. Ranks may hold different numbers of losses. A collective: call on all ranks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return ts, losses
    # One float64 payload (2, N): timesteps are exact in float64.
    payload = torch.stack([ts.to(torch.float64), losses.to(torch.float64)])
    local_size = torch.tensor([payload.shape[1]], device=payload.device)
    sizes = [torch.zeros_like(local_size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local_size)
    sizes = torch.cat(sizes).tolist()
    padded = payload.new_zeros(2, max(sizes))  # (2, max N)
    padded[:, : payload.shape[1]] = payload
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    payload = torch.cat([g[:, :size] for g, size in zip(gathered, sizes)], dim=1)  # (2, sum N)
    return payload[0].long(), payload[1]


class LossSecondMomentResampler(ScheduleSampler):
    """Samples t with p(t) proportional to sqrt(E[loss_t^2]) over the last HISTORY_PER_TERM
    losses of each timestep, mixed with UNIFORM_PROB of uniform; uniform until every
    timestep has a full history (improved DDPM's importance sampling of L_vlb).

    The history of each timestep is a ring buffer: its k-th loss ever sits in slot
    k % HISTORY_PER_TERM, so `loss_counts` (all losses seen) gives the order back.
    """

    def __init__(self, diffusion, history_per_term=HISTORY_PER_TERM, uniform_prob=UNIFORM_PROB):
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        num_timesteps = diffusion.num_timesteps
        self._loss_history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64)
        self._loss_counts = torch.zeros(num_timesteps, dtype=torch.long)

    def _warmed_up(self):
        return bool((self._loss_counts >= self.history_per_term).all())

    def weights(self):
        num_timesteps = len(self._loss_counts)
        if not self._warmed_up():
            return torch.ones(num_timesteps, dtype=torch.float64)
        weights = self._loss_history.pow(2).mean(dim=1).sqrt()  # (T,)
        weights = weights / weights.sum()
        return weights * (1 - self.uniform_prob) + self.uniform_prob / num_timesteps

    def update_with_local_losses(self, local_ts, local_losses):
        """Gathers every rank's losses, so that all ranks keep the same state, and records
        them. A collective under torch.distributed: call it on every rank at every step."""
        ts, losses = gather_from_all_ranks(local_ts.detach(), local_losses.detach())
        self.update_with_all_losses(ts, losses)

    def update_with_all_losses(self, ts, losses):
        """Records losses (N,) at timesteps ts (N,), as if one at a time in order."""
        ts = ts.to("cpu", torch.long).reshape(-1)
        losses = losses.to("cpu", torch.float64).reshape(-1)
        num_timesteps = len(self._loss_counts)
        # Stable sort: losses of one timestep stay in arrival order.
        order = torch.argsort(ts, stable=True)
        ts, losses = ts[order], losses[order]
        batch_counts = torch.bincount(ts, minlength=num_timesteps)  # (T,)
        group_starts = torch.cumsum(batch_counts, dim=0) - batch_counts  # (T,)
        arrival = torch.arange(len(ts)) - group_starts[ts]  # (N,) order within its timestep
        # Only each timestep's last history_per_term losses survive, each in its own slot.
        survives = arrival >= batch_counts[ts] - self.history_per_term
        slots = (self._loss_counts[ts] + arrival) % self.history_per_term
        self._loss_history[ts[survives], slots[survives]] = losses[survives]
        self._loss_counts += batch_counts

    def state_dict(self):
        return {
            "loss_history": self._loss_history.clone(),
            "loss_counts": self._loss_counts.clone(),
        }

    def load_state_dict(self, state_dict):
        for name, current in (
            ("loss_history", self._loss_history),
            ("loss_counts", self._loss_counts),
        ):
            saved = state_dict[name]
            if saved.shape != current.shape:
                raise ValueError(
                    f"{name} has shape {tuple(saved.shape)}, expected {tuple(current.shape)}"
                )
            current.copy_(saved)


#################################################################################
#                                  Registry                                     #
#################################################################################

SCHEDULE_SAMPLERS = {
    "uniform": UniformSampler,
    "loss-second-moment": LossSecondMomentResampler,
}


def create_named_schedule_sampler(name, diffusion):
    if name not in SCHEDULE_SAMPLERS:
        raise ValueError(
            f"unknown schedule sampler {name!r}; choose one of: {', '.join(SCHEDULE_SAMPLERS)}"
        )
    return SCHEDULE_SAMPLERS[name](diffusion)
