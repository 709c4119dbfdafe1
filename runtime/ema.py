"""Exponential moving average of model weights, updated with multi-tensor (foreach) kernels."""
import copy

import torch


def create_ema(model):
    """A frozen copy of `model` that `update_ema` keeps as the moving average."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model for every parameter; buffers (the fixed
    sin-cos position tables, index tables) are copied, so the EMA is a complete model."""
    ema_params = list(ema_model.parameters())
    model_params = [param.detach() for param in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    ema_buffers = list(ema_model.buffers())
    if ema_buffers:  # the multi-tensor copy refuses empty lists (the release's EDT has no buffers)
        torch._foreach_copy_(ema_buffers, list(model.buffers()))


def warmed_up_decay(decay, step):
    """The decay for update number `step` with warm-up: min(decay, (1 + step) / (10 + step)),
    so a short run's EMA is not dominated by the initial weights."""
    return min(decay, (1 + step) / (10 + step))
