"""Run setup: accelerate, seeds, batch plan, experiment folder, resume point, logs."""
import os
import random
import re
import sys
import types
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

import models
from runtime.checkpoint import CheckpointError, read_checkpoint
from runtime.distributed import init_distributed
from runtime.logging import create_logger

from .config import ConfigError
from .graphed_losses import graphing_problem

CHECKPOINT_NAME = re.compile(r"(\d+)\.pt")  # checkpoints/{step:07d}.pt
EXPERIMENT_NAME = re.compile(r"(\d+)-(.+)")  # {index:03d}-{model name with / as -}
TENSORBOARD_WITHOUT_TENSORFLOW = "tensorboard.compat.notf"


@dataclass
class Run:
    accelerator: Accelerator
    experiment_dir: str
    logger: object
    writer: Optional[object]  # TensorBoard's SummaryWriter, main process only
    mini_batch_size: int
    accumulation_steps: int
    resume_checkpoint: Optional[dict]  # the checkpoint to resume from, already read

    @property
    def checkpoint_dir(self):
        return os.path.join(self.experiment_dir, "checkpoints")

    @property
    def is_main(self):
        return self.accelerator.is_main_process

    @property
    def rank(self):
        return self.accelerator.process_index

    @property
    def world_size(self):
        return self.accelerator.num_processes

    @property
    def device(self):
        return self.accelerator.device

    def checkpoint_path(self, step):
        return os.path.join(self.checkpoint_dir, f"{step:07d}.pt")

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.accelerator.end_training()


#################################################################################
#                              Processes and seeds                              #
#################################################################################

def create_accelerator(mixed_precision):
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU")
    init_distributed()  # the process group, joined safely across torchelastic restarts
    # Without cpu=True a CPU-only machine under torchrun or accelerate launch would give every
    # process a world of its own, and each would train alone without a word.
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if accelerator.num_processes != launched:
        raise ConfigError(f"the launcher started {launched} processes but accelerate joined "
                          f"{accelerator.num_processes}; check the accelerate config")
    return accelerator


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(global_seed, rank, world_size):
    """Each process draws its own noise, timesteps and label drops (DiT's per-rank seeding)."""
    return global_seed * world_size + rank


def batch_plan(global_batch_size, mini_batch_size, world_size):
    """(micro-batch size per process, micro-batches per optimizer step)."""
    mini_batch_size = mini_batch_size or global_batch_size // world_size
    per_micro_step = mini_batch_size * world_size
    if mini_batch_size < 1 or global_batch_size % per_micro_step:
        raise ConfigError(f"--global-batch-size {global_batch_size} must be a multiple of "
                          f"{world_size} processes x --mini-batch-size {mini_batch_size}")
    return mini_batch_size, global_batch_size // per_micro_step


#################################################################################
#                          Experiment folder and resume                         #
#################################################################################

def model_slug(model_name):
    return model_name.replace("/", "-")


def numbered_experiments(results_dir):
    """[(index, model slug, path)] of the experiment folders in results_dir."""
    names = os.listdir(results_dir) if os.path.isdir(results_dir) else []
    return [(int(match[1]), match[2], os.path.join(results_dir, match[0]))
            for match in map(EXPERIMENT_NAME.fullmatch, names) if match]


def experiment_dirs(results_dir, model_name):
    """This model's experiment folders in results_dir, newest (highest index) first."""
    return [path for _, slug, path in sorted(numbered_experiments(results_dir), reverse=True)
            if slug == model_slug(model_name)]


def latest_checkpoint(experiment_dir):
    """The path of the highest-step checkpoint of an experiment, or None."""
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    steps = {int(match[1]): match[0] for match in map(CHECKPOINT_NAME.fullmatch, names) if match}
    return os.path.join(checkpoint_dir, steps[max(steps)]) if steps else None


def find_resume_path(resume, results_dir, model_name):
    """--resume latest: the highest step of the newest experiment of this model that has one,
    or None (a fresh start, so the same command starts a job and continues it after a
    restart or preemption); otherwise a checkpoint file. Checkpoints are renamed into place
    only once complete, so a half-written one is never found."""
    if resume != "latest":
        if not os.path.isfile(resume):
            raise ConfigError(f"--resume {resume}: no such checkpoint file")
        return resume
    for experiment_dir in experiment_dirs(results_dir, model_name):
        path = latest_checkpoint(experiment_dir)
        if path is not None:
            return path
    return None


def owning_experiment(checkpoint_path):
    """The experiment folder a checkpoint sits in (EXP/checkpoints/NNNNNNN.pt), or None."""
    checkpoint_dir = os.path.dirname(os.path.abspath(checkpoint_path))
    if os.path.basename(checkpoint_dir) != "checkpoints":
        return None
    return os.path.dirname(checkpoint_dir)


def create_experiment_dir(results_dir, model_name):
    index = max((index for index, _, _ in numbered_experiments(results_dir)), default=-1) + 1
    path = os.path.join(results_dir, f"{index:03d}-{model_slug(model_name)}")
    os.makedirs(os.path.join(path, "checkpoints"))
    return path


def read_resume_checkpoint(path, model_config, global_batch_size):
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    saved = checkpoint.get("model_config") if isinstance(checkpoint, dict) else None
    if saved is None or "step" not in checkpoint:
        raise ConfigError(f"{path} is not a training checkpoint of this script (no model_config/step)")
    if saved != model_config:
        raise ConfigError(f"{path} was trained as {saved}, but these options and features give "
                          f"{model_config}")
    saved_batch_size = checkpoint["args"].global_batch_size
    if saved_batch_size != global_batch_size:
        # The saved position within the epoch counts batches of the saved size.
        raise ConfigError(f"{path} was trained with --global-batch-size {saved_batch_size}; "
                          f"resume with the same global batch size")
    return checkpoint


def tensorboard_writer(log_dir, purge_step):
    """On the main process only. TensorBoard writes through TensorFlow's file API when TensorFlow
    is installed (for the ADM evaluator), and importing it costs about 5 s of every launch; where
    the module tensorboard.compat.notf exists, TensorBoard takes its own stub of that API, which
    writes local event files (and remote ones through fsspec) without TensorFlow."""
    sys.modules.setdefault(TENSORBOARD_WITHOUT_TENSORFLOW, types.ModuleType(TENSORBOARD_WITHOUT_TENSORFLOW))
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir, purge_step=purge_step)


def on_main(accelerator, decide):
    """Runs decide() on the main process only (it reads and creates folders) and hands every
    process its result, or raises its ConfigError on every process."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = (decide(), None)
        except ConfigError as error:
            outcome[0] = (None, str(error))
    broadcast_object_list(outcome)
    result, error = outcome[0]
    if error:
        raise ConfigError(error)
    return result


def new_or_owning_experiment(results_dir, model_name, resume_path):
    """A resumed run goes on in its checkpoint's experiment folder; anything else gets a new one."""
    return (resume_path and owning_experiment(resume_path)) or create_experiment_dir(results_dir, model_name)


#################################################################################
#                                    Setup                                      #
#################################################################################

def setup_run(args, config):
    """Everything the loop needs around the model: processes, seeds, folders, logs.

    Raises ConfigError (before any folder is created) for inconsistent options."""
    accelerator = create_accelerator(args.mixed_precision)
    mini_batch_size, accumulation_steps = batch_plan(
        args.global_batch_size, args.mini_batch_size, accelerator.num_processes)
    problem = args.cuda_graphs and graphing_problem(models.model_class(config.model_name), not args.no_mask,
                                                    accumulation_steps, args.grad_checkpointing, accelerator.device)
    if problem:
        raise ConfigError(problem)
    if config.num_images < args.global_batch_size:
        raise ConfigError(f"--global-batch-size {args.global_batch_size} exceeds the "
                          f"{config.num_images} images in {args.feature_path}")
    seed_everything(rank_seed(args.global_seed, accelerator.process_index, accelerator.num_processes))

    resume_path = args.resume and on_main(
        accelerator, lambda: find_resume_path(args.resume, args.results_dir, config.model_name))
    resume_checkpoint = resume_path and read_resume_checkpoint(resume_path, config.model_config,
                                                               args.global_batch_size)
    experiment_dir = on_main(accelerator, lambda: new_or_owning_experiment(
        args.results_dir, config.model_name, resume_path))
    logger = create_logger(experiment_dir, accelerator.is_main_process)
    writer = None
    if accelerator.is_main_process:
        # On resume, TensorBoard hides the earlier events of steps >= purge_step: those written after
        # the checkpoint, not the checkpoint's own step's loss and evaluation.
        purge_step = resume_checkpoint["step"] + 1 if resume_checkpoint else None
        writer = tensorboard_writer(os.path.join(experiment_dir, "tensorboard"), purge_step)
    if resume_path:
        logger.info(f"resuming from {resume_path} (step {resume_checkpoint['step']})")
    elif args.resume:
        logger.info(f"--resume latest: no checkpoint of {config.model_name} in "
                    f"{args.results_dir} yet, starting a new run")
    logger.info(f"experiment folder {experiment_dir}; {accelerator.num_processes} processes on "
                f"{accelerator.device.type}, micro-batch {mini_batch_size} x {accumulation_steps} "
                f"accumulation steps per process, global batch {args.global_batch_size}")
    return Run(accelerator, experiment_dir, logger, writer, mini_batch_size, accumulation_steps,
               resume_checkpoint)
