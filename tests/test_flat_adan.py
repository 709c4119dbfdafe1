import functools
import io

import pytest
import torch
from timm.optim import Adan

from models import create_model
from training.build import ADAN_BETAS, ADAN_EPS
from training.flat_adan import STATE_NAMES, FlatAdan


def edt_s_parameters():
    torch.manual_seed(0)
    return [param.detach().requires_grad_() for param in create_model("EDT-S/2", input_size=32).parameters()]


def copies(params):
    return [param.detach().clone().requires_grad_() for param in params]


def take_steps(optimizer, params, steps, first=0):
    """Random gradients (the same for the same step), a changing learning rate, and one step
    where a parameter has no gradient."""
    for step in range(first, first + steps):
        generator = torch.Generator().manual_seed(step)
        for index, param in enumerate(params):
            skipped = step == 2 and index == 3
            param.grad = None if skipped else torch.randn(param.shape, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 / (1 + step)
        optimizer.step()


def largest_relative_difference(actual, expected):
    return max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(actual, expected))


def states(optimizer, params):
    return [optimizer.state[param][name] for param in params for name in STATE_NAMES]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_flat_adan_follows_timm_adan_on_edt_s(compiled):
    """Eager, bit for bit; compiled, to rounding (its kernel contracts and vectorises its own way)."""
    params = edt_s_parameters()
    flat_params = copies(params)
    settings = dict(betas=ADAN_BETAS, eps=ADAN_EPS, weight_decay=0.02)
    reference, flat = Adan(params, lr=1e-3, **settings), FlatAdan(flat_params, lr=1e-3, compiled=compiled, **settings)
    take_steps(reference, params, 4)
    take_steps(flat, flat_params, 4)
    assert flat.param_groups[0]["step"] == reference.param_groups[0]["step"] == 4
    tolerance = 1e-6 if compiled else 0.0
    assert largest_relative_difference(flat_params, params) <= tolerance
    assert largest_relative_difference(states(flat, flat_params), states(reference, params)) <= tolerance
    assert not torch.equal(flat_params[0], edt_s_parameters()[0])  # it did move them


def small_parameters():
    torch.manual_seed(0)
    return [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True),
            torch.randn(4, 4, requires_grad=True), torch.randn(2, requires_grad=True)]


def saved_and_continued(optimizer_type, steps_before=3, steps_after=2, parameters=small_parameters):
    """(parameters after steps_before, the optimizer's state dict then as saved bytes, parameters
    after steps_after more)."""
    params = parameters()
    optimizer = optimizer_type(params, lr=1e-3, betas=ADAN_BETAS, eps=ADAN_EPS)
    take_steps(optimizer, params, steps_before)
    snapshot, buffer = copies(params), io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    take_steps(optimizer, params, steps_after, first=steps_before)
    return snapshot, buffer.getvalue(), params


def resumed(optimizer_type, snapshot, saved, steps_before=3, steps_after=2):
    params = copies(snapshot)
    optimizer = optimizer_type(params, lr=1e-3, betas=ADAN_BETAS, eps=ADAN_EPS)
    optimizer.load_state_dict(torch.load(io.BytesIO(saved)))
    take_steps(optimizer, params, steps_after, first=steps_before)
    return params, optimizer


def test_flat_adan_resumes_exactly_and_shares_checkpoints_with_timm_adan():
    snapshot, saved, continued = saved_and_continued(FlatAdan)
    params, optimizer = resumed(FlatAdan, snapshot, saved)
    assert all(torch.equal(a, b) for a, b in zip(params, continued))
    assert optimizer.param_groups[0]["step"] == 5
    timm_params, _ = resumed(Adan, snapshot, saved)  # timm's Adan goes on from FlatAdan's checkpoint
    assert largest_relative_difference(timm_params, continued) < 1e-6

    eager_flat = functools.partial(FlatAdan, compiled=False)  # timm's arithmetic: the same, bit for bit
    eager_snapshot, eager_saved, eager_continued = saved_and_continued(eager_flat)
    timm_params, _ = resumed(Adan, eager_snapshot, eager_saved)
    assert all(torch.equal(a, b) for a, b in zip(timm_params, eager_continued))
    timm_snapshot, timm_saved, timm_continued = saved_and_continued(Adan)
    flat_params, _ = resumed(eager_flat, timm_snapshot, timm_saved)  # and the other way round
    assert all(torch.equal(a, b) for a, b in zip(flat_params, timm_continued))
    flat_state, timm_state = torch.load(io.BytesIO(saved)), torch.load(io.BytesIO(timm_saved))
    assert flat_state["param_groups"] == timm_state["param_groups"]
    assert {index: set(state) for index, state in flat_state["state"].items()} == \
        {index: set(state) for index, state in timm_state["state"].items()}


def test_compiled_flat_adan_resumes_edt_s_bit_exactly_on_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        snapshot, saved, continued = saved_and_continued(FlatAdan, 2, 2, edt_s_parameters)
        params, optimizer = resumed(FlatAdan, snapshot, saved, 2, 2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(params, continued))
    assert optimizer.param_groups[0]["step"] == 4


def test_flat_adan_refuses_a_group_of_mixed_dtypes():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    for param in params:
        param.grad = torch.ones_like(param)
    with pytest.raises(ValueError, match="one dtype and device"):
        FlatAdan(params, lr=1e-3).step()
