"""Training that survives bad steps: gradient clipping, non-finite steps skipped by every process
alike, a stop or a rollback after too many in a row, and loss-spike alarms.

Each step every process puts its loss, the gradient norm and whether it was asked to stop
(training/preemption.py) through one small all-reduce (the gradients are already all-reduced, so
the norm is the global one), the one value the host waits for: a step whose loss or gradient
norm is not finite on any process is skipped on all of them, before the optimizer, the EMA or the
timestep sampler sees it, and all processes stop after the same step. Under fp16 a non-finite
gradient is the GradScaler's overflow, which skips the update and lowers the loss scale by
itself: it is logged, not counted as bad.
"""
import collections
import math
import statistics
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from accelerate.utils import gather_object

SPIKE_MIN_HISTORY = 20  # losses seen before the running median is trusted


class TooManyBadSteps(RuntimeError):
    pass


@dataclass
class StepCheck:
    """What every process agrees on about one step."""
    loss: float  # mean over processes (not finite when any process's is not)
    grad_norm: float
    bad_ranks: List[int]  # processes whose loss was not finite
    overflow: bool  # fp16: the gradient scaler skips this update itself
    stop_requested: bool = False  # some process was asked to stop (preemption)

    @property
    def skipped(self):
        return bool(self.bad_ranks) or not math.isfinite(self.grad_norm)

    @property
    def bad(self):
        """Counted towards --max-bad-steps: skipped, and not a mere fp16 overflow."""
        return self.skipped and not (self.overflow and not self.bad_ranks)


def gradient_norm(accelerator, parameters, max_norm=None):
    """The global norm of the gradients (tensor), clipped to max_norm first when given.
    Gradients are unscaled first under fp16."""
    parameters = [p for p in parameters if p.grad is not None]
    if max_norm is not None:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    accelerator.unscale_gradients()
    return torch.nn.utils.get_total_norm([p.grad for p in parameters])


def agree_on_step(accelerator, loss, grad_norm, fp16, stop_requested=False):
    """One all-reduce of [this process's loss is not finite, one slot per process; the loss;
    the gradient norm; this process was asked to stop] gives every process the same StepCheck."""
    world, rank = accelerator.num_processes, accelerator.process_index
    loss = loss.detach().float().reshape(())
    finite = torch.isfinite(loss)
    local = torch.zeros(world + 3, device=loss.device)
    local[rank] = (~finite).float()
    local[world] = torch.where(finite, loss, torch.zeros_like(loss)) / world
    local[world + 1] = grad_norm.detach().float() / world  # the same on every process
    local[world + 2] = float(stop_requested)  # a scalar fill: no copy from the host
    total = accelerator.reduce(local, reduction="sum") if world > 1 else local
    values = total.tolist()
    bad_ranks = [index for index in range(world) if values[index] > 0]
    mean_loss = float("nan") if bad_ranks else values[world]
    grad_norm_value = values[world + 1]
    overflow = fp16 and not math.isfinite(grad_norm_value)
    return StepCheck(mean_loss, grad_norm_value, bad_ranks, overflow, stop_requested=values[world + 2] > 0)


@dataclass
class BadStepGuard:
    """Counts bad steps, raises TooManyBadSteps after max_bad_steps in a row, and raises loss-spike
    alarms: a good step whose loss exceeds spike_factor times the running median of the last
    spike_window good steps."""
    max_bad_steps: int
    spike_factor: float
    spike_window: int
    in_a_row: int = 0
    total_bad: int = 0
    first_of_run: Optional[int] = None  # the step that began the current run of bad steps
    losses: collections.deque = field(default_factory=collections.deque)
    rollbacks: int = 0  # since the last checkpoint was saved (not saved itself)

    def record(self, step, check):
        """Bookkeeping for a finished step; returns the spike ratio of an alarmed step, else None.
        Raises TooManyBadSteps when this bad step is one too many in a row."""
        if check.bad:
            self.total_bad += 1
            self.in_a_row += 1
            self.first_of_run = step if self.in_a_row == 1 else self.first_of_run
            if self.in_a_row >= self.max_bad_steps:
                raise TooManyBadSteps(f"{self.in_a_row} bad steps in a row (steps {self.first_of_run} to {step})")
            return None
        if check.skipped:  # an fp16 overflow: neither bad nor a loss to learn the median from
            return None
        self.in_a_row, self.first_of_run = 0, None
        ratio = self.spike_ratio(check.loss)
        self.losses.append(check.loss)
        while len(self.losses) > self.spike_window:
            self.losses.popleft()
        return ratio if ratio is not None and ratio > self.spike_factor else None

    def spike_ratio(self, loss):
        if len(self.losses) < min(SPIKE_MIN_HISTORY, self.spike_window):
            return None
        median = statistics.median(self.losses)
        return loss / median if median > 0 else None

    def state_dict(self):
        return {"in_a_row": self.in_a_row, "total_bad": self.total_bad, "first_of_run": self.first_of_run,
                "losses": list(self.losses)}

    def load_state_dict(self, state):
        self.in_a_row, self.total_bad = state["in_a_row"], state["total_bad"]
        self.first_of_run = state["first_of_run"]
        self.losses = collections.deque(state["losses"])


def describe_bad_step(accelerator, check, timesteps):
    """A log line for a skipped step: which processes, the loss, the gradient norm, and every
    process's timestep draws (a collective: call it on every process)."""
    draws = gather_object([timesteps.tolist()])  # [process 0's draws, process 1's, ...]
    if check.bad_ranks:
        cause = f"non-finite loss on process(es) {check.bad_ranks}"
    elif check.overflow:
        cause = "fp16 gradient overflow (the gradient scaler skips the update and lowers its scale)"
    else:
        cause = "non-finite gradient norm"
    draws_text = "; ".join(f"process {rank}: {values}" for rank, values in enumerate(draws))
    return (f"{cause}: loss {check.loss:.4g}, gradient norm {check.grad_norm:.4g}; "
            f"timesteps drawn: {draws_text}")
