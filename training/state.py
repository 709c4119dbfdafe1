"""TrainState: everything a bit-exact resume needs, with one save and one load.

A checkpoint holds the model, its EMA, the optimizer, the timestep sampler, the gradient scaler
(fp16), the position (step, epoch, step within the epoch), the random-number states of every
process, and the run description (args and training.config.RunConfig.describe(): model_config,
VAE, latent normalisation, image size, class names) that the sampling scripts use to rebuild the
model, load `ema` and decode its latents.
"""
import copy
import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from accelerate.utils import gather_object

from runtime.checkpoint import save_checkpoint
from runtime.ema import EmaUpdate


#################################################################################
#                              Random-number states                             #
#################################################################################

def capture_rng_state():
    """This process's python, numpy, torch (and CUDA) generator states, in types that
    `torch.load(weights_only=True)` accepts."""
    version, python_state, gauss_next = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(python_state), gauss_next],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state):
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


#################################################################################
#                                  TrainState                                   #
#################################################################################

@dataclass
class TrainState:
    model: torch.nn.Module  # the bare model (not wrapped by DDP or torch.compile)
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule_sampler: object
    grad_scaler: Optional[object] = None  # accelerate's GradScaler under fp16
    guard: Optional[object] = None  # training.guard.BadStepGuard: bad-step counts, loss history
    description: dict = field(default_factory=dict)  # args and RunConfig.describe()
    step: int = 0  # optimizer updates done
    epoch: int = 0
    epoch_step: int = 0  # updates done within `epoch`

    def __post_init__(self):
        self.update_ema = EmaUpdate(self.ema, self.model)  # update_ema(decay)

    def advance(self, steps_per_epoch):
        """Counts one optimizer update; an epoch ends after steps_per_epoch of them."""
        self.step += 1
        self.epoch_step += 1
        if self.epoch_step == steps_per_epoch:
            self.epoch, self.epoch_step = self.epoch + 1, 0

    def save(self, path, accelerator):
        """A collective (every process contributes its RNG state); the main process writes
        `path` atomically."""
        rng_states = gather_object([capture_rng_state()])  # [state of rank 0, rank 1, ...]
        if accelerator.is_main_process:
            save_checkpoint({
                **self.description,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "opt": self.optimizer.state_dict(),
                "schedule_sampler": self.schedule_sampler.state_dict(),
                "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None,
                "guard": self.guard.state_dict() if self.guard else None,
                "step": self.step,
                "epoch": self.epoch,
                "epoch_step": self.epoch_step,
                "world_size": accelerator.num_processes,
                "rng": rng_states,
            }, path)
        accelerator.wait_for_everyone()

    def load(self, checkpoint, rank, world_size):
        """Restores everything from a checkpoint read with runtime.checkpoint.read_checkpoint.

        Returns False when the random states could not be restored because the checkpoint
        was written by a different number of processes (training goes on, not bit-exactly)."""
        self.model.load_state_dict(checkpoint["model"], strict=True)
        self.ema.load_state_dict(checkpoint["ema"], strict=True)
        # The optimizer would keep the checkpoint's (memory-mapped) tensors: a copy of its own
        # lets the mapping go with the checkpoint.
        self.optimizer.load_state_dict(copy.deepcopy(checkpoint["opt"]))
        self.schedule_sampler.load_state_dict(checkpoint["schedule_sampler"])
        if self.grad_scaler is not None and checkpoint["grad_scaler"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
        if self.guard is not None and checkpoint.get("guard") is not None:
            self.guard.load_state_dict(checkpoint["guard"])
        self.step = checkpoint["step"]
        self.epoch = checkpoint["epoch"]
        self.epoch_step = checkpoint["epoch_step"]
        if checkpoint["world_size"] != world_size:
            return False
        restore_rng_state(checkpoint["rng"][rank])
        return True
