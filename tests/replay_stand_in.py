"""A stand-in for training.loop.graph_training_losses on the CPU, where torch cannot capture CUDA
graphs; kept apart from the test modules so that a launched training process imports only it."""
import torch


def replayed_without_capture(losses, latent_shape, batch_size, device):
    """`losses` run as a replay would: outside accelerate's autocast, with their own autocast only."""
    forward = losses.forward

    def as_replayed(*args):
        with torch.autocast(device.type, enabled=False):
            return forward(*args)
    losses.forward = as_replayed
    return losses
