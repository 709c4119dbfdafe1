"""The training loop: epochs of steps, EMA, logging and periodic checkpoints."""
import math
import time

import torch
from tqdm import tqdm

from runtime.ema import update_ema, warmed_up_decay

from .preemption import PreemptionWatch
from .schedule import learning_rate, set_learning_rate
from .step import optimization_step


class LossMeter:
    """Sums step losses on the device (no per-step synchronisation) until the next log."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = None
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, losses):
        values = torch.stack([losses.total, losses.full, losses.masked])  # (3,)
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1

    def exclude(self, seconds):
        """Leaves time spent on something else (an evaluation) out of the throughput."""
        self.start += seconds

    def summary(self, accelerator, global_batch_size):
        """Losses averaged over steps and processes, and the throughput since the last reset."""
        means = accelerator.reduce(self.sums / self.steps, reduction="mean").tolist()
        steps_per_sec = self.steps / (time.perf_counter() - self.start)
        return {"loss": means[0], "loss_full": means[1], "loss_masked": means[2],
                "steps_per_sec": steps_per_sec, "samples_per_sec": steps_per_sec * global_batch_size}


def total_steps(args, steps_per_epoch):
    """Training stops after --epochs or --max-steps, whichever comes first."""
    return min(args.epochs * steps_per_epoch, args.max_steps or math.inf)


def prepare_model(args, run, state):
    model = torch.compile(state.model) if args.compile else state.model
    return run.accelerator.prepare(model, state.optimizer)


def log_progress(run, state, meter, global_batch_size, lr, progress):
    summary = meter.summary(run.accelerator, global_batch_size)
    run.logger.info(f"(step={state.step:07d}) loss {summary['loss']:.4f} (full {summary['loss_full']:.4f}, "
                    f"masked {summary['loss_masked']:.4f}), lr {lr:.3g}, "
                    f"{summary['steps_per_sec']:.2f} steps/s, {summary['samples_per_sec']:.1f} samples/s")
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


def train_step(args, run, state, model, optimizer, diffusion, micro_batches, mask_flag):
    """One optimizer update and its EMA update; returns (losses, learning rate)."""
    lr = learning_rate(state.step, args.init_lr, args.final_lr, args.lr_decay_steps)
    set_learning_rate(optimizer, lr)
    losses = optimization_step(run.accelerator, model, optimizer, diffusion,
                               state.schedule_sampler, micro_batches, mask_flag=mask_flag,
                               fused=args.fused_mask_batch)
    decay = warmed_up_decay(args.ema_decay, state.step) if args.ema_warmup else args.ema_decay
    update_ema(state.ema, state.model, decay)
    return losses, lr


def train(args, run, state, diffusion, data, evaluator=None):
    """Trains until --epochs or --max-steps; saves every --ckpt-every steps and at the end, and
    evaluates every --eval-every steps with `evaluator` (training/evaluation.py), if given.

    On SIGTERM it saves at the next step boundary and returns early (--resume latest goes on
    bit-exactly). Returns True when training reached its last step."""
    model, optimizer = prepare_model(args, run, state)
    model.train()  # enables label dropout for classifier-free guidance
    last_step = total_steps(args, data.steps_per_epoch)
    saved_step = state.step if state.step else None  # a resumed run's checkpoint exists
    progress = tqdm(total=last_step, initial=state.step, unit="step", disable=not run.is_main)
    meter = LossMeter()
    mask_flag = None if args.no_mask else state.model.masked_training_flag
    run.logger.info(f"training from step {state.step} (epoch {state.epoch}) to step {last_step}")
    preempted = False
    with PreemptionWatch(run.accelerator) as preemption:
        while state.step < last_step and not preempted:
            for micro_batches in data.steps(state.epoch, state.epoch_step):
                losses, lr = train_step(args, run, state, model, optimizer, diffusion,
                                        micro_batches, mask_flag)
                state.advance(data.steps_per_epoch)
                meter.add(losses)
                progress.update(1)
                if state.step % args.log_every == 0:
                    log_progress(run, state, meter, args.global_batch_size, lr, progress)
                if state.step % args.ckpt_every == 0:
                    save(run, state)
                    saved_step = state.step
                if evaluator is not None and state.step % args.eval_every == 0:
                    evaluate(evaluator, state, meter)
                if state.step >= last_step:
                    break
                if preemption.should_stop():
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
