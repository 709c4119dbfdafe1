"""The training losses' forward and backward replayed from CUDA graphs (--cuda-graphs).

At batch 32 per GPU the bf16 masked step of EDT-S/2 took 61 ms on an H200 whose arithmetic
needs 8 ms of it (benchmarks/gpu_floor.py): the GPU waits on Python launching a few thousand
small kernels. torch.cuda.make_graphed_callables records the losses' forward and their backward
once and replays each with one launch, on the same memory and with the same kernels.

A graph holds one shape, so only models whose training forward keeps its shapes can be graphed:
EDT (its keep masks multiply tokens, drawn on the device) and DiT, and MDTv2 without its masked
pass (which keeps a random number of tokens, read on the host each step). The random numbers
(noise, label drops, masks) come from the device's generator, whose offset each replay advances
as the eager kernels would.
"""
import contextlib

import torch
import torch.nn as nn

from sampling.sampler import PRECISIONS

from .step import per_sample_losses


class AutocastModel(nn.Module):
    """The model under autocast to `dtype` (None: none) with its output in float32, as an
    accelerate-prepared model runs; autocast's cache of cast weights is off, because a graph
    casts them on every replay."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x, *args, **kwargs):
        precision = (contextlib.nullcontext() if self.dtype is None
                     else torch.autocast(x.device.type, dtype=self.dtype, cache_enabled=False))
        with precision:
            return self.model(x, *args, **kwargs).float()


class TrainingLosses(nn.Module):
    """forward(x, y, t) -> (full-token losses, masked losses), each (B,): per_sample_losses
    (training/step.py) as a module whose parameters are the model's, so that it can be graphed
    and wrapped in DDP. mixed_precision: accelerate's name (no, bf16, fp16)."""

    def __init__(self, model, diffusion, mask_flag, fused, mixed_precision):
        super().__init__()
        self.model = AutocastModel(model, PRECISIONS[mixed_precision])
        self.diffusion = diffusion
        self.mask_flag = mask_flag
        self.fused = fused

    def forward(self, x, y, t):
        return per_sample_losses(self.model, self.diffusion, x, y, t, self.mask_flag, self.fused)


def graph_training_losses(losses, latent_shape, batch_size, device):
    """`losses` (a TrainingLosses in training mode) with its forward and backward replayed from
    CUDA graphs captured for micro-batches of `batch_size` latents of `latent_shape` (C, H, W).

    The capture runs the losses a few times; the device's random state is put back after it, so
    that a run resumed from a checkpoint draws what an uninterrupted run draws. Returns the
    module, to be wrapped in DDP (accelerate's prepare) only now."""
    x = torch.zeros(batch_size, *latent_shape, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    timesteps = torch.zeros(batch_size, dtype=torch.long, device=device)
    random_state = torch.cuda.get_rng_state(device)
    # Unused parameters (MDTv2's masked-pass ones without it) keep no gradient, as in eager steps.
    graphed = torch.cuda.make_graphed_callables(losses, (x, labels, timesteps), allow_unused_input=True)
    torch.cuda.set_rng_state(random_state, device)
    return graphed


def graphing_problem(model_class, masked, accumulation_steps, gradient_checkpointing, device):
    """Why the training step of a `model_class` model cannot run from CUDA graphs here, or None."""
    if device.type != "cuda":
        return "--cuda-graphs needs a GPU"
    if masked and not model_class.masking_keeps_shapes:
        return (f"{model_class.__name__}'s masked pass keeps a random number of tokens each step, which no "
                f"graph can hold: train it with --no-mask or without --cuda-graphs")
    if accumulation_steps > 1:
        return ("--cuda-graphs takes one micro-batch per step: a graph's backward writes its gradients into the same "
                "memory each time; drop --mini-batch-size or use more processes")
    if gradient_checkpointing:
        return "--cuda-graphs cannot recompute activations in its backward: drop --grad-checkpointing"
    return None
