"""What the fast paths launch: every adaLN modulation from one matmul, and under autocast at
inference no cast of a parameter, a modulation or a residual branch. CUDA's autocast is checked
here on the CPU through fake CUDA tensors, which dispatch as on a GPU without running."""
import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import launch_count
from models import blocks
from models.blocks import gated_residual, modulate
from models.onednn import PackedLinear
from test_mdt import tiny_mdt
from test_models import model_inputs, randomize, tiny_dit, tiny_edt

BUILDERS = {"edt": tiny_edt, "dit": tiny_dit, "mdt": lambda **kwargs: tiny_mdt(input_size=16, **kwargs)}


class Casts(TorchDispatchMode):
    """Records each cast (`aten::_to_copy`) as (source tensor, target dtype), and counts all operators."""

    def __init__(self):
        super().__init__()
        self.casts, self.operators = [], collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.operators[func.overloadpacket.__name__] += 1
        if func.overloadpacket is torch.ops.aten._to_copy:
            self.casts.append((args[0], kwargs.get("dtype")))
        return func(*args, **kwargs)


def parameter_casts(model, casts):
    parameters = {id(parameter) for parameter in model.parameters()}
    return [source for source, _ in casts if id(source) in parameters]


def activation_upcasts(casts):
    """Casts of (N, T, C) activations from a lower precision to float32."""
    return [source for source, dtype in casts
            if source.dim() == 3 and dtype == torch.float32 and source.dtype in (torch.bfloat16, torch.float16)]


def silu_calls(model, *inputs):
    with Casts() as counted:
        model(*inputs)
    return counted.operators["silu"]


@pytest.mark.parametrize("name", BUILDERS)
def test_every_modulation_comes_from_one_silu_and_one_matmul(monkeypatch, name):
    model = randomize(BUILDERS[name](class_dropout_prob=0.0)).train()
    inputs = model_inputs()
    unmasked = [module for module in model.modulated_modules if module not in getattr(model, "sideblocks", ())]
    one_by_one = 1 + len(unmasked)  # the timestep MLP's SiLU and each modulation's
    with torch.no_grad():
        assert silu_calls(model, *inputs) == 2
    assert silu_calls(model, *inputs) == one_by_one  # with autograd on the CPU, where stacking costs more
    monkeypatch.setattr(blocks, "STACKED_MODULATION_TRAINING_DEVICES", ("cuda", "cpu"))
    assert silu_calls(model, *inputs) == 2  # with autograd on a GPU
    model.set_fast_paths(False)
    assert silu_calls(model, *inputs) == one_by_one > 2


@pytest.mark.parametrize("name", BUILDERS)
def test_stacked_modulations_train_as_each_modules_own(monkeypatch, name):
    monkeypatch.setattr(blocks, "STACKED_MODULATION_TRAINING_DEVICES", ("cuda", "cpu"))
    model = randomize(BUILDERS[name](class_dropout_prob=0.0)).train()
    inputs = model_inputs()
    results = []
    for fast in (True, False):
        model.set_fast_paths(fast)
        out = model(*inputs)
        out.square().mean().backward()
        results.append((out.detach(), [parameter.grad for parameter in model.parameters()]))
        model.zero_grad(set_to_none=True)
    (out_stacked, grads_stacked), (out_plain, grads_plain) = results
    torch.testing.assert_close(out_stacked, out_plain, rtol=1e-5, atol=1e-5)
    for stacked, plain in zip(grads_stacked, grads_plain):  # None for MDT's side block, unmasked
        torch.testing.assert_close(stacked, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BUILDERS)
def test_stacked_modulations_equal_each_modules_own(name):
    model = randomize(BUILDERS[name]())
    c = torch.randn(4, model.pos_embed.shape[-1])
    modules = model.modulated_modules
    stacked = model.modulations(c, modules)
    assert list(stacked) == modules
    for module in modules:
        torch.testing.assert_close(stacked[module], module.adaLN_modulation(c), rtol=1e-6, atol=1e-6)


def test_a_copy_modulates_its_own_modules():
    model = randomize(tiny_edt())
    x, t, y = model_inputs()
    with torch.no_grad():
        model(x, t, y)  # the list of modulated modules and the stacked weights exist before copying
        copied = copy.deepcopy(model)
        assert [id(module) for module in copied.modulated_modules] == [
            id(module) for module in copied.modules() if hasattr(module, "adaLN_modulation")]
        copied.final_layer.adaLN_modulation[1].bias.add_(1.0)
        assert not torch.allclose(copied(x, t, y), model(x, t, y))


def test_mdt_side_block_is_left_out_of_unmasked_forwards():
    """Its modulation unused, the side block's weights would get zero gradients instead of none,
    and Adan would move them."""
    model = randomize(tiny_mdt(input_size=16, class_dropout_prob=0.0)).train()
    model(*model_inputs()).square().mean().backward()
    assert all(parameter.grad is None for parameter in model.sideblocks.parameters())
    assert model.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() > 0


def test_kept_autocast_weights_equal_autocasts_own_and_follow_changes():
    linear = randomize(PackedLinear(16, 24))
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float16, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype):
                kept, _ = linear.weight_and_bias(x)
                assert kept.dtype == dtype and linear.weight_and_bias(x)[0] is kept
                torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias), rtol=0, atol=0)
        linear.weight.mul_(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(linear.weight_and_bias(x)[0], linear.weight.bfloat16(), rtol=0, atol=0)
        assert linear.weight_and_bias(x)[0] is linear.weight  # no autocast: the parameter itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear.weight_and_bias(x)[0] is linear.weight  # autograd: autocast's cast, differentiable


def test_gated_residual_reads_a_half_precision_branch_as_autocast_would_cast_it():
    x, gate = torch.randn(2, 6, 8), torch.randn(2, 8)
    branch = torch.randn(2, 6, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = gated_residual(x, gate, branch)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, torch.addcmul(x, gate.unsqueeze(1), branch.float()), rtol=0, atol=0)


def test_modulation_at_inference_under_autocast_is_written_as_the_next_linear_reads_it():
    x, shift, scale = torch.randn(2, 6, 8), torch.randn(2, 8), torch.randn(2, 8)
    exact = torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            inference = modulate(x, shift, scale)
        training = modulate(x, shift, scale)
    assert inference.dtype == torch.bfloat16 and training.dtype == torch.float32
    torch.testing.assert_close(inference, exact.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(training, exact, rtol=0, atol=0)


@pytest.mark.parametrize("name", BUILDERS)
def test_fast_and_plain_paths_agree_under_autocast(name):
    model = randomize(BUILDERS[name](class_dropout_prob=0.0))
    x, t, y = model_inputs()
    outputs = {}
    for train in (False, True):
        model.train(train)
        for fast in (True, False):
            model.set_fast_paths(fast)
            with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16):
                outputs[train, fast] = model(x, t, y).float()
    for train in (False, True):
        error = (outputs[train, True] - outputs[train, False]).abs().max() / outputs[train, False].abs().max()
        assert error < 2e-2, (train, error)  # bfloat16 keeps 8 bits


@pytest.mark.parametrize("name", BUILDERS)
def test_cuda_autocast_inference_casts_no_parameter_modulation_or_branch(name):
    model = randomize(BUILDERS[name]()).eval()
    inputs = model_inputs()
    with launch_count.fake_cuda() as to_fake_cuda:
        model = model._apply(to_fake_cuda)
        inputs = [to_fake_cuda(tensor) for tensor in inputs]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(*inputs)  # derives the kept weights
            with Casts() as fast:
                model(*inputs)
            model.set_fast_paths(False)
            with Casts() as plain:
                model(*inputs)
    assert parameter_casts(model, plain.casts)  # autocast's, at every call
    assert parameter_casts(model, fast.casts) == []
    # CUDA's autocast casts the lower-precision operands of a multiply-add to float32 in passes of
    # their own (EDT: two per block); the plain path's are LayerNorm's (of MDT's skip Linear outputs).
    assert len(activation_upcasts(fast.casts)) <= len(activation_upcasts(plain.casts))
    assert len(fast.casts) < len(plain.casts)
