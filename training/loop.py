"""The training loop: epochs of steps, EMA, logging, periodic checkpoints, and what happens
after bad steps (training/guard.py)."""
import functools
import math
import time

import torch
from tqdm import tqdm

from runtime.checkpoint import read_checkpoint
from runtime.ema import warmed_up_decay

from .graphed_losses import TrainingLosses, graph_training_losses
from .guard import TooManyBadSteps, describe_bad_step
from .preemption import PreemptionWatch
from .schedule import learning_rate, set_learning_rate
from .setup import latest_checkpoint
from .step import optimization_step, per_sample_losses

MAX_ROLLBACKS_PER_CHECKPOINT = 3  # then the bad steps follow the checkpoint, not the data


class LossMeter:
    """Sums the losses of the steps taken on the device (no extra synchronisation) and counts
    the skipped ones until the next log."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = None
        self.grad_norm_sum = 0.0
        self.steps = 0
        self.skipped = 0
        self.start = time.perf_counter()

    def add(self, losses, check):
        if check.skipped:
            self.skipped += 1
            return
        values = torch.stack([losses.total, losses.full, losses.masked])  # (3,)
        self.sums = values if self.sums is None else self.sums + values
        self.grad_norm_sum += check.grad_norm
        self.steps += 1

    def exclude(self, seconds):
        """Leaves time spent on something else (an evaluation) out of the throughput."""
        self.start += seconds

    def summary(self, accelerator, global_batch_size):
        """Losses and gradient norm averaged over the steps taken and the processes, the skipped
        steps, and the throughput since the last reset."""
        taken = max(self.steps, 1)
        sums = self.sums if self.sums is not None else torch.full((3,), math.nan, device=accelerator.device)
        means = accelerator.reduce(sums / taken, reduction="mean").tolist()
        steps_per_sec = (self.steps + self.skipped) / (time.perf_counter() - self.start)
        return {"loss": means[0], "loss_full": means[1], "loss_masked": means[2],
                "grad_norm": self.grad_norm_sum / taken if self.steps else math.nan, "skipped_steps": self.skipped,
                "steps_per_sec": steps_per_sec, "samples_per_sec": steps_per_sec * global_batch_size}


def total_steps(args, steps_per_epoch):
    """Training stops after --epochs or --max-steps, whichever comes first."""
    return min(args.epochs * steps_per_epoch, args.max_steps or math.inf)


def prepare_training(args, run, state, diffusion, data):
    """(the prepared module that holds the parameters, losses_of(x, y, t) -> per-sample losses,
    the prepared optimizer); with --cuda-graphs the losses replay from CUDA graphs."""
    if args.compile:
        state.model.compile_blocks()
    mask_flag = None if args.no_mask else state.model.masked_training_flag
    fused = args.fused_mask_batch
    if not args.cuda_graphs:
        model, optimizer = run.accelerator.prepare(state.model, state.optimizer)
        return model, functools.partial(per_sample_losses, model, diffusion, mask_flag=mask_flag, fused=fused), optimizer
    losses = TrainingLosses(state.model, diffusion, mask_flag, fused, args.mixed_precision).train()
    losses = graph_training_losses(losses, data.dataset.latent_shape, run.mini_batch_size, run.device)
    losses, optimizer = run.accelerator.prepare(losses, state.optimizer)
    run.logger.info("the training losses' forward and backward replay from CUDA graphs")
    return losses, losses, optimizer


def log_progress(run, state, meter, global_batch_size, lr, progress):
    summary = meter.summary(run.accelerator, global_batch_size)
    skipped = f", {summary['skipped_steps']} skipped" if summary["skipped_steps"] else ""
    run.logger.info(f"(step={state.step:07d}) loss {summary['loss']:.4f} (full {summary['loss_full']:.4f}, "
                    f"masked {summary['loss_masked']:.4f}), grad norm {summary['grad_norm']:.4g}{skipped}, "
                    f"lr {lr:.3g}, {summary['steps_per_sec']:.2f} steps/s, {summary['samples_per_sec']:.1f} samples/s")
    if run.writer is not None:
        for name, value in {**summary, "lr": lr}.items():
            run.writer.add_scalar(f"train/{name}", value, state.step)
    progress.set_postfix(loss=f"{summary['loss']:.4f}")
    meter.reset()


def save(run, state):
    path = run.checkpoint_path(state.step)
    state.save(path, run.accelerator)
    run.logger.info(f"saved {path}")


def evaluate(evaluator, state, meter):
    start = time.perf_counter()
    evaluator(state)
    meter.exclude(time.perf_counter() - start)


def train_step(args, run, state, model, losses_of, optimizer, micro_batches, stop_requested):
    """One optimizer update and its EMA update, both skipped for a step that is not finite;
    returns (losses, learning rate, StepCheck, this process's timesteps). model, losses_of,
    optimizer: as prepare_training returns them; stop_requested: this process was asked to stop."""
    lr = learning_rate(state.step, args.init_lr, args.final_lr, args.lr_decay_steps)
    set_learning_rate(optimizer, lr)
    losses, check, timesteps = optimization_step(run.accelerator, model, losses_of, optimizer, state.schedule_sampler,
                                                 micro_batches, args.grad_clip, stop_requested)
    if not check.skipped:
        decay = warmed_up_decay(args.ema_decay, state.step) if args.ema_warmup else args.ema_decay
        state.update_ema(decay)
    return losses, lr, check, timesteps


def watch_step(args, run, state, check, timesteps):
    """Logs a skipped step or a loss spike of the step just counted; returns True after a
    rollback (the data order then restarts at the current step). Stops the run, or rolls back
    with --rollback, after --max-bad-steps bad steps in a row."""
    position = f"step {state.step:07d} (epoch {state.epoch}, step {state.epoch_step} of the epoch)"
    if check.skipped:
        details = describe_bad_step(run.accelerator, check, timesteps)
        run.logger.warning(f"skipped {position}: {details}; {state.guard.in_a_row + check.bad} in a row")
    try:
        spike = state.guard.record(state.step, check)
    except TooManyBadSteps as error:
        if not args.rollback:
            stop_after_bad_steps(run, error)
        roll_back(run, state, error)
        return True
    if spike is not None:
        run.logger.warning(f"loss spike at {position}: {check.loss:.4f}, {spike:.1f} times the running median")
        if run.writer is not None:
            run.writer.add_scalar("train/loss_spike_ratio", spike, state.step)
    return False


def stop_after_bad_steps(run, error):
    last = latest_checkpoint(run.experiment_dir)
    kept = f"the last checkpoint, {last}, is kept as it was" if last else "no checkpoint was saved yet"
    message = f"{error}; stopped without saving: {kept} (--rollback reloads it and goes on past them)"
    run.logger.error(message)
    raise SystemExit(f"error: {message}" if run.is_main else 1)


def roll_back(run, state, error):
    """Reloads the last checkpoint into `state` and keeps the current position, so the data order
    goes on past the bad steps."""
    path = latest_checkpoint(run.experiment_dir)
    if path is None or state.guard.rollbacks >= MAX_ROLLBACKS_PER_CHECKPOINT:
        reason = ("no checkpoint to roll back to" if path is None else
                  f"rolled back to {path} {state.guard.rollbacks} times already")
        stop_after_bad_steps(run, f"{error}, {reason}")
    position = (state.step, state.epoch, state.epoch_step)
    counts = state.guard.state_dict()
    checkpoint = read_checkpoint(path)
    state.load(checkpoint, run.rank, run.world_size)
    state.step, state.epoch, state.epoch_step = position
    state.guard.load_state_dict({**counts, "in_a_row": 0, "first_of_run": None})
    state.guard.rollbacks += 1
    run.logger.warning(f"{error}: rolled back to {path} (step {checkpoint['step']}); going on from step "
                       f"{state.step}, past them")


def train(args, run, state, diffusion, data, evaluator=None):
    """Trains until --epochs or --max-steps; saves every --ckpt-every steps and at the end, and
    evaluates every --eval-every steps with `evaluator` (training/evaluation.py), if given.

    On SIGTERM it saves at the next step boundary and returns early (--resume latest goes on
    bit-exactly). Returns True when training reached its last step."""
    model, losses_of, optimizer = prepare_training(args, run, state, diffusion, data)
    model.train()  # enables label dropout for classifier-free guidance
    last_step = total_steps(args, data.steps_per_epoch)
    saved_step = state.step if state.step else None  # a resumed run's checkpoint exists
    progress = tqdm(total=last_step, initial=state.step, unit="step", disable=not run.is_main)
    meter = LossMeter()
    run.logger.info(f"training from step {state.step} (epoch {state.epoch}) to step {last_step}")
    preempted = False
    with PreemptionWatch() as preemption:
        while state.step < last_step and not preempted:
            for micro_batches in data.steps(state.epoch, state.epoch_step):
                losses, lr, check, timesteps = train_step(args, run, state, model, losses_of, optimizer, micro_batches,
                                                          preemption.requested)
                state.advance(data.steps_per_epoch)
                meter.add(losses, check)
                progress.update(1)
                if watch_step(args, run, state, check, timesteps):
                    break  # rolled back: the data order restarts at the current step
                if state.step % args.log_every == 0:
                    log_progress(run, state, meter, args.global_batch_size, lr, progress)
                # No checkpoint in the middle of bad steps: the last one stays the one to go back to.
                if state.step % args.ckpt_every == 0 and not state.guard.in_a_row:
                    save(run, state)
                    saved_step = state.step
                    state.guard.rollbacks = 0
                if evaluator is not None and state.step % args.eval_every == 0:
                    evaluate(evaluator, state, meter)
                if state.step >= last_step:
                    break
                if check.stop_requested:  # on every process alike: the step's all-reduce carried it
                    preempted = True
                    break
        progress.close()
        if saved_step != state.step:
            save(run, state)
    if preempted:
        run.logger.info(f"stopped by SIGTERM at step {state.step} with its checkpoint saved; "
                        f"run again with --resume latest to go on")
        return False
    run.logger.info("done")
    return True
