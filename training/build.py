"""Builds what is trained: the model, its EMA, Adan, the diffusion and the timestep sampler,
gathered in a TrainState (restored from the resume checkpoint when there is one)."""
import functools

import torch
from timm.optim import Adan
from torch.utils.checkpoint import checkpoint

import models
from diffusion import create_diffusion, create_named_schedule_sampler
from runtime.ema import create_ema

from .flat_adan import FlatAdan
from .guard import BadStepGuard
from .initialise import initialise_model
from .state import TrainState

# Adan as in sail-sg/Adan and the EDT release: no weight decay, no gradient clipping.
ADAN_BETAS = (0.98, 0.92, 0.99)
ADAN_EPS = 1e-8


def enable_gradient_checkpointing(model):
    """Recomputes each transformer block's activations in the backward pass instead of
    storing them. The blocks draw no random numbers, so results are unchanged."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def build_model(model_config, seed):
    """The same initial weights on every process and for any number of processes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build_model(model_config)


def build_training(args, config, run):
    """(TrainState, diffusion), resumed from run.resume_checkpoint if set, else initialised
    from --init-from if given; ConfigError for an --init-from checkpoint that does not fit."""
    model = build_model(config.model_config, args.global_seed).to(run.device)
    initialise_model(args, config, run, model)  # --init-from, before the EMA copies the model
    ema = create_ema(model)
    optimizer = (FlatAdan if args.flat_adan else Adan)(model.parameters(), lr=args.init_lr, betas=ADAN_BETAS,
                                                        eps=ADAN_EPS, weight_decay=0.0)
    diffusion = create_diffusion(timestep_respacing="", exact_decoder_nll=args.exact_decoder_nll)
    guard = BadStepGuard(args.max_bad_steps, args.loss_spike_factor, args.loss_spike_window)
    state = TrainState(model, ema, optimizer, create_named_schedule_sampler(args.schedule_sampler, diffusion),
                       grad_scaler=run.accelerator.scaler, guard=guard, description={"args": args, **config.describe()})
    if run.resume_checkpoint is not None:
        if not state.load(run.resume_checkpoint, run.rank, run.world_size):
            run.logger.warning(f"the checkpoint was written by {run.resume_checkpoint['world_size']} "
                               f"processes, this run has {run.world_size}: random states are not "
                               f"restored, so the run is not a bit-exact continuation")
        run.resume_checkpoint = None  # free the memory
    if args.grad_checkpointing:
        enable_gradient_checkpointing(model)
    run.logger.info(f"{config.model_name} ({config.model_config['kwargs']}): "
                    f"{models.count_trainable_parameters(model):,} trainable parameters, "
                    f"{models.count_macs(model) / 1e9:.3f} GMACs per forward")
    return state, diffusion
