"""Exponential moving average of model weights, updated with multi-tensor (foreach) kernels."""
import copy

import torch


def create_ema(model):
    """A frozen copy of `model` that an `EmaUpdate` keeps as the moving average."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


class EmaUpdate:
    """update(decay): ema <- decay * ema + (1 - decay) * model for every parameter; buffers (the
    fixed sin-cos position tables, index tables) are copied, so the EMA is a complete model.

    Both models' tensor lists are gathered once: walking the two module trees at every update
    took nine tenths of an EDT-S/2-shaped update's host time, and a training step at batch 32 is
    paced by the host. The optimizer and load_state_dict write the tensors in place, so the
    lists stay valid; a model whose tensors are replaced needs a new EmaUpdate."""

    def __init__(self, ema_model, model):
        self.ema_params = list(ema_model.parameters())
        self.model_params = list(model.parameters())
        self.ema_buffers = list(ema_model.buffers())
        self.model_buffers = list(model.buffers())

    @torch.no_grad()
    def __call__(self, decay):
        torch._foreach_lerp_(self.ema_params, self.model_params, 1.0 - decay)
        if self.ema_buffers:  # the multi-tensor copy refuses empty lists (the release's EDT has no buffers)
            torch._foreach_copy_(self.ema_buffers, self.model_buffers)


def warmed_up_decay(decay, step):
    """The decay for update number `step` with warm-up: min(decay, (1 + step) / (10 + step)),
    so a short run's EMA is not dominated by the initial weights."""
    return min(decay, (1 + step) / (10 + step))
