"""One optimizer step of masked training (EDT's or MDT's), over accumulated micro-batches."""
import contextlib
from dataclasses import dataclass

import torch

from .guard import agree_on_step, gradient_norm


@dataclass
class StepLosses:
    """Importance-weighted mean losses of one step (detached, averaged over micro-batches)."""
    total: torch.Tensor
    full: torch.Tensor
    masked: torch.Tensor


def per_sample_losses(model, diffusion, x, y, t, mask_flag=None, fused=False):
    """(full-token losses, masked losses), each (B,), of latents x (B, C, H, W) at timesteps t.

    mask_flag: the model's forward keyword that masks (`masked_training_flag`), None for no
    masked pass (its losses are zeros). Both passes share the timesteps; each draws its own
    noise and label drops. fused: one forward over [batch, batch] that masks only the second
    half (EDT's mask_start): equal in distribution to two passes, but the random numbers are
    drawn in one call per kind instead of two, so runs differ bit for bit."""
    if mask_flag is None:
        full = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))["loss"]  # (B,)
        return full, torch.zeros_like(full)
    if fused:
        model_kwargs = {"y": torch.cat([y, y]), mask_flag: True, "mask_start": x.shape[0]}
        losses = diffusion.training_losses(model, torch.cat([x, x]), torch.cat([t, t]),
                                           model_kwargs=model_kwargs)["loss"]  # (2B,)
        return losses.chunk(2)  # (B,), (B,)
    full = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))["loss"]  # (B,)
    masked = diffusion.training_losses(model, x, t, model_kwargs={"y": y, mask_flag: True})["loss"]  # (B,)
    return full, masked


def micro_batch_losses(losses_of, schedule_sampler, x, y, sampler_feedback=None):
    """(full-token loss, masked loss), each the importance-weighted batch mean (scalars), from
    `losses_of(x, y, t)`: per_sample_losses with its model and options bound, or its module
    (training/graphed_losses.py). The sampler learns from the sum of both per-sample losses, as
    the EDT and MDT references do: at once, or, given a list `sampler_feedback`, once the step
    is known to be finite (the (timesteps, losses) pair is appended there)."""
    t, weights = schedule_sampler.sample(x.shape[0], x.device)  # (B,), (B,)
    full, masked_loss = losses_of(x, y, t)  # (B,), (B,)
    give_feedback(schedule_sampler, t, full + masked_loss, sampler_feedback)
    return (full * weights).mean(), (masked_loss * weights).mean()


def give_feedback(schedule_sampler, t, losses, sampler_feedback):
    if sampler_feedback is None:
        schedule_sampler.update_with_local_losses(t, losses.detach())
    else:
        sampler_feedback.append((t, losses.detach()))


def optimization_step(accelerator, model, losses_of, optimizer, schedule_sampler, micro_batches, grad_clip=None,
                      stop_requested=False):
    """Forward and backward every micro-batch, then one optimizer update, unless the step is
    not finite on some process. Returns (StepLosses, StepCheck, this process's timesteps).

    model: the prepared (DDP-wrapped) module that holds the parameters; losses_of: as in
    micro_batch_losses. Gradients are all-reduced only on the last micro-batch (DDP's no_sync
    before it); each micro-batch's loss is divided by their number, so the update sees the mean
    gradient. grad_clip: the global gradient norm is clipped to it. Every process agrees whether
    the step is finite (training/guard.py): a skipped step updates neither the parameters, the
    optimizer state nor the timestep sampler. stop_requested: this process was asked to stop; the
    StepCheck says whether any was."""
    accumulation_steps = len(micro_batches)
    full_sum = masked_sum = 0.0
    feedback = []
    for index, (x, y) in enumerate(micro_batches):
        last = index == accumulation_steps - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            full, masked_loss = micro_batch_losses(losses_of, schedule_sampler, x, y, sampler_feedback=feedback)
            accelerator.backward((full + masked_loss) / accumulation_steps)
        full_sum = full_sum + full.detach()
        masked_sum = masked_sum + masked_loss.detach()
    full_mean, masked_mean = full_sum / accumulation_steps, masked_sum / accumulation_steps
    grad_norm = gradient_norm(accelerator, model.parameters(), grad_clip)
    fp16 = accelerator.scaler is not None
    check = agree_on_step(accelerator, full_mean + masked_mean, grad_norm, fp16, stop_requested)
    if fp16 or not check.skipped:  # under fp16 the gradient scaler skips an overflowing update itself
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not check.skipped:
        for t, losses in feedback:
            schedule_sampler.update_with_local_losses(t, losses)
    timesteps = torch.cat([t for t, _ in feedback])
    return StepLosses(full_mean + masked_mean, full_mean, masked_mean), check, timesteps
