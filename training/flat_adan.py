"""Adan whose update reads and writes each parameter's tensors once.

timm's multi-tensor Adan (the sail-sg algorithm the release trains with) updates its states in
sixteen passes over memory, about 168 bytes per float32 parameter: at EDT-XL/2's 699 M parameters
that is 24 ms of an H200's bandwidth per step, a quarter of the bf16 masked step's floor
(benchmarks/gpu_floor.py). FlatAdan keeps the same algorithm, hyperparameters, state and
checkpoints, but holds each state of a parameter group in one flat buffer (the per-parameter
states are views of it), gathers the gradients and parameters into flat buffers, and updates
them in one compiled elementwise function: 68 bytes per parameter (the two gathers,
the update's 44, the parameters copied back). Its results equal timm's up to rounding (compiled
arithmetic may contract and order operations its own way), so it is a flag (`--flat-adan`),
not the default. The gathered gradients and parameters take two parameter-sized buffers during
the step.
"""
import functools
import math

import torch
from timm.optim import Adan

from runtime.host_copies import to_device_without_waiting

STATE_NAMES = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")


def adan_update_(param, grad, exp_avg, exp_avg_sq, exp_avg_diff, neg_pre_grad, coefficients, betas, eps, no_prox):
    """One Adan step in place on flat (N,) tensors, in timm's order of operations. coefficients
    (4,) holds what changes between steps: lr / bias_correction1, lr beta2 / bias_correction2,
    sqrt(bias_correction3) and 1 -+ lr weight_decay."""
    beta1, beta2, beta3 = betas
    step_size, step_size_diff, bias_correction3_sqrt, decay = coefficients.unbind()
    difference = neg_pre_grad + grad  # g_t - g_{t-1}
    exp_avg.lerp_(grad, 1 - beta1)  # m_t
    exp_avg_diff.mul_(beta2).add_(difference, alpha=1 - beta2)  # diff_t
    update = difference * beta2 + grad  # g_t + beta2 (g_t - g_{t-1})
    exp_avg_sq.mul_(beta3).addcmul_(update, update, value=1 - beta3)  # n_t
    denominator = exp_avg_sq.sqrt() / bias_correction3_sqrt + eps
    if no_prox:
        param.mul_(decay)
    # addcdiv's order on the CPU, multiplying before dividing: eager, this equals timm bit for bit there.
    param.sub_(exp_avg * step_size / denominator).sub_(exp_avg_diff * step_size_diff / denominator)
    if not no_prox:
        param.div_(decay)
    neg_pre_grad.copy_(-grad)


@functools.cache
def compiled_adan_update_():
    return torch.compile(adan_update_, dynamic=False)  # one kernel per flat size


class FlatGroup:
    """A parameter group's states as flat buffers, for one list of parameters with gradients;
    the optimizer's per-parameter states become views of them."""

    def __init__(self, params, state):
        kinds = {(param.dtype, param.device) for param in params}
        if len(kinds) != 1:
            raise ValueError(f"FlatAdan needs a parameter group of one dtype and device, got {sorted(map(str, kinds))}")
        self.params = params
        self.numels = [param.numel() for param in params]
        self.flat_states = {}
        for name in STATE_NAMES:
            self.flat_states[name] = torch.cat([state[param][name].reshape(-1) for param in params])
            for param, view in zip(params, self.flat_states[name].split(self.numels)):
                state[param][name] = view.view_as(param)

    def covers(self, params):
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))


class FlatAdan(Adan):
    """timm's Adan (without its `caution` variant), updated through flat buffers (see the module).
    `compiled=False` runs the update eager: the same arithmetic in separate passes over the flat
    buffers, equal to timm's Adan bit for bit on the CPU (the reference the tests hold the
    compiled update to), but slow: on two CPU cores an EDT-S/2 step took 948 ms eager, 215 ms
    with timm's Adan and 152 ms compiled."""

    def __init__(self, params, compiled=True, **kwargs):
        if kwargs.get("caution"):
            raise ValueError("FlatAdan has no caution variant")
        super().__init__(params, **kwargs)
        self.compiled = compiled
        self.flat_groups = {}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.flat_groups = {}  # the loaded states are the optimizer's own now: gathered anew

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [param for param in group["params"] if param.grad is not None]
            if params:
                self.update_group(index, group, params)
        return loss

    def update_group(self, index, group, params):
        group["step"] = group.get("step", 0) + 1
        states_replaced = self.initialise_states(group, params)
        flat_group = self.flat_groups.get(index)
        if flat_group is None or states_replaced or not flat_group.covers(params):
            flat_group = self.flat_groups[index] = FlatGroup(params, self.state)
        weights = torch.cat([param.reshape(-1) for param in params])
        grads = torch.cat([param.grad.reshape(-1) for param in params])
        update = compiled_adan_update_() if self.compiled else adan_update_
        update(weights, grads, *flat_group.flat_states.values(), self.coefficients(group, weights),
               tuple(group["betas"]), group["eps"], group["no_prox"])
        updated = [view.view_as(param) for param, view in zip(params, weights.split(flat_group.numels))]
        torch._foreach_copy_(params, updated)

    def initialise_states(self, group, params):
        """timm's: zero moments, and the previous gradient taken as the first one (at the first
        step, also after timm's `restart_opt`). Returns whether it replaced any state."""
        replaced = False
        for param in params:
            state = self.state[param]
            if len(state) == 0:
                for name in STATE_NAMES[:3]:
                    state[name] = torch.zeros_like(param)
            if "neg_pre_grad" not in state or group["step"] == 1:
                state["neg_pre_grad"] = -param.grad
                replaced = True
        return replaced

    @staticmethod
    def coefficients(group, like):
        """The step's scalars, rounded to the parameters' dtype as timm's kernels round theirs."""
        beta1, beta2, beta3 = group["betas"]
        step, lr, weight_decay = group["step"], group["lr"], group["weight_decay"]
        decay = 1 - lr * weight_decay if group["no_prox"] else 1 + lr * weight_decay
        values = (lr / (1 - beta1 ** step), lr * beta2 / (1 - beta2 ** step), math.sqrt(1 - beta3 ** step), decay)
        return to_device_without_waiting(torch.tensor(values, dtype=like.dtype), like.device)
