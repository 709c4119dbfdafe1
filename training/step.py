"""One optimizer step of masked training (EDT's or MDT's), over accumulated micro-batches."""
import contextlib
import functools
from dataclasses import dataclass

import torch

from .guard import agree_on_step, gradient_norm


@dataclass
class StepLosses:
    """Importance-weighted mean losses of one step (detached, averaged over micro-batches)."""
    total: torch.Tensor
    full: torch.Tensor
    masked: torch.Tensor


def micro_batch_losses(model, diffusion, schedule_sampler, x, y, mask_flag, sampler_feedback=None):
    """(full-token loss, masked loss), each the importance-weighted batch mean (scalars).

    mask_flag: the model's forward keyword that masks (`masked_training_flag`), None for no
    masked pass. Both passes share the timesteps and weights; each draws its own noise and
    label drops. The sampler learns from the sum of both per-sample losses, as the EDT and MDT
    references do: at once, or, given a list `sampler_feedback`, once the step is known to be
    finite (the (timesteps, losses) pair is appended there)."""
    t, weights = schedule_sampler.sample(x.shape[0], x.device)  # (B,), (B,)
    full = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))["loss"]  # (B,)
    if mask_flag is not None:
        masked_loss = diffusion.training_losses(
            model, x, t, model_kwargs={"y": y, mask_flag: True})["loss"]  # (B,)
    else:
        masked_loss = torch.zeros_like(full)
    give_feedback(schedule_sampler, t, full + masked_loss, sampler_feedback)
    return (full * weights).mean(), (masked_loss * weights).mean()


def give_feedback(schedule_sampler, t, losses, sampler_feedback):
    if sampler_feedback is None:
        schedule_sampler.update_with_local_losses(t, losses.detach())
    else:
        sampler_feedback.append((t, losses.detach()))


def fused_micro_batch_losses(model, diffusion, schedule_sampler, x, y, sampler_feedback=None):
    """The same two losses from one forward pass over [batch, batch], masking only the second
    half (EDT's mask_start; EDT only). Equal in distribution to micro_batch_losses, but the random
    numbers are drawn in one call per kind instead of two, so runs differ bit for bit."""
    batch = x.shape[0]
    t, weights = schedule_sampler.sample(batch, x.device)  # (B,), (B,)
    model_kwargs = dict(y=torch.cat([y, y]), enable_down_mask=True, mask_start=batch)
    losses = diffusion.training_losses(model, torch.cat([x, x]), torch.cat([t, t]),
                                       model_kwargs=model_kwargs)["loss"]  # (2B,)
    full, masked_loss = losses.chunk(2)  # (B,), (B,)
    give_feedback(schedule_sampler, t, full + masked_loss, sampler_feedback)
    return (full * weights).mean(), (masked_loss * weights).mean()


def optimization_step(accelerator, model, optimizer, diffusion, schedule_sampler, micro_batches,
                      mask_flag, fused=False, grad_clip=None):
    """Forward and backward every micro-batch, then one optimizer update, unless the step is
    not finite on some process. Returns (StepLosses, StepCheck, this process's timesteps).

    Gradients are all-reduced only on the last micro-batch (DDP's no_sync before it); each
    micro-batch's loss is divided by their number, so the update sees the mean gradient.
    mask_flag: as in micro_batch_losses; fused: the masked pass shares the full pass's forward
    (fused_micro_batch_losses); grad_clip: the global gradient norm is clipped to it. Every
    process agrees whether the step is finite (training/guard.py): a skipped step updates
    neither the parameters, the optimizer state nor the timestep sampler."""
    losses_of = (fused_micro_batch_losses if fused and mask_flag is not None
                 else functools.partial(micro_batch_losses, mask_flag=mask_flag))
    accumulation_steps = len(micro_batches)
    full_sum = masked_sum = 0.0
    feedback = []
    for index, (x, y) in enumerate(micro_batches):
        last = index == accumulation_steps - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            full, masked_loss = losses_of(model, diffusion, schedule_sampler, x, y, sampler_feedback=feedback)
            accelerator.backward((full + masked_loss) / accumulation_steps)
        full_sum = full_sum + full.detach()
        masked_sum = masked_sum + masked_loss.detach()
    full_mean, masked_mean = full_sum / accumulation_steps, masked_sum / accumulation_steps
    grad_norm = gradient_norm(accelerator, model.parameters(), grad_clip)
    fp16 = accelerator.scaler is not None
    check = agree_on_step(accelerator, full_mean + masked_mean, grad_norm, fp16)
    if fp16 or not check.skipped:  # under fp16 the gradient scaler skips an overflowing update itself
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not check.skipped:
        for t, losses in feedback:
            schedule_sampler.update_with_local_losses(t, losses)
    timesteps = torch.cat([t for t, _ in feedback])
    return StepLosses(full_mean + masked_mean, full_mean, masked_mean), check, timesteps
